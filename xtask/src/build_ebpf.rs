//! `cargo xtask build-ebpf`: builds the XDP object on its own, for inspection
//! (`bpftool`, `llvm-objdump`). The agent binary does not use this file: its build script
//! builds and embeds the same object with the same flags.

use anyhow::Context as _;

use crate::util::{cmd, root, run};

pub fn build_ebpf() -> anyhow::Result<std::path::PathBuf> {
    let root = root();
    let target_dir = root.join("target");
    run(cmd("cargo")
        .current_dir(&root)
        .args(["+nightly", "build", "-p", "dns-ebpf", "--bins", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        // The flags aya-build uses for the embedded object: BTF, debug info, the target arch.
        .env("CARGO_ENCODED_RUSTFLAGS", "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER"))
    .context("building the XDP program (missing tools? run `cargo xtask setup`)")?;
    let object = target_dir.join("bpfel-unknown-none/release/dns-ebpf");
    let size = std::fs::metadata(&object).with_context(|| format!("{}", object.display()))?.len();
    println!("XDP object: {} ({size} bytes)", object.display());
    Ok(object)
}
