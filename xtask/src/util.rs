//! Small process helpers.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

pub fn cmd(program: &str) -> Command {
    Command::new(program)
}

/// Runs a command, echoing it; fails on a non-zero exit.
pub fn run(c: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{c:?}");
    eprintln!("+ {}", shown.replace('"', ""));
    let status = c.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

/// Is `program` on the PATH?
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is in the workspace").to_path_buf()
}

/// Fails unless running as root, saying why root is needed.
pub fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (XDP programs, network namespaces): run it as root, e.g. `sudo -E cargo xtask ...`");
    }
    Ok(())
}
