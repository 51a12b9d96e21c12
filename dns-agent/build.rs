//! Builds the XDP program (`dns-ebpf`: nightly, `-Z build-std=core`, bpf-linker) into
//! OUT_DIR, where `src/kernel/mod.rs` embeds it: the agent binary is all a node needs, and it
//! never loads a stale object from `target/`.
//!
//! The nested build's output is kept and shown only when it fails, so that every build of the
//! agent does not print a page of warnings.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir
        .parent()
        .ok_or_else(|| anyhow!("dns-agent has no parent directory"))?;
    let ebpf_dir = root.join("dns-ebpf");
    // The build dependency on dns-ebpf's library covers dns-common and aya-ebpf; its binary
    // sources need saying.
    println!("cargo:rerun-if-changed={}", ebpf_dir.display());
    println!("cargo:rerun-if-env-changed=XDNS_EBPF_TOOLCHAIN");

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    // A target dir of its own: sharing the outer one would deadlock on cargo's lock.
    let target_dir = out_dir.join("ebpf-target");
    let arch = env::var("CARGO_CFG_TARGET_ARCH")?;
    let toolchain = env::var("XDNS_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".to_string());
    let output = Command::new("rustup")
        .args([
            "run",
            &toolchain,
            "cargo",
            "build",
            "--package",
            "dns-ebpf",
            "--bins",
            "--release",
        ])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(root)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
        )
        // The outer build's compiler is stable; the nested one must pick nightly's.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .output()
        .context(
            "running `rustup run nightly cargo`: is rustup installed? (`cargo xtask setup`)",
        )?;
    if !output.status.success() {
        for line in String::from_utf8_lossy(&output.stderr).lines() {
            println!("cargo:warning={line}");
        }
        bail!(
            "building the XDP program failed (output above); `cargo xtask setup` installs what \
             it needs: the nightly toolchain with rust-src, and bpf-linker"
        );
    }
    let built = target_dir.join("bpfel-unknown-none/release");
    let mut copied = 0;
    for entry in fs::read_dir(&built).with_context(|| built.display().to_string())? {
        let path = entry?.path();
        // The program objects are the extensionless files (binaries) of the release dir.
        if path.is_file() && path.extension().is_none() {
            copy(&path, &out_dir)?;
            copied += 1;
        }
    }
    if copied == 0 {
        bail!("the XDP build produced no object in {}", built.display());
    }
    Ok(())
}

fn copy(from: &Path, out_dir: &Path) -> anyhow::Result<()> {
    let to = out_dir.join(from.file_name().ok_or_else(|| anyhow!("no file name"))?);
    fs::copy(from, &to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}
