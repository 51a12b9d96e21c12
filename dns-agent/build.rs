//! Builds the XDP program (`dns-ebpf`, with the toolchain pinned in
//! `dns-ebpf/rust-toolchain.toml`) into OUT_DIR, where `src/kernel/mod.rs` embeds it: the agent
//! binary is all a node needs, and it never loads a stale object from `target/`.
//! `dns-ebpf-build` checks the toolchain and bpf-linker first, and keeps the nested build's
//! output out of sight unless it fails.

use std::{env, fs, path::PathBuf};

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let root = dns_ebpf_build::workspace_root();
    // The build dependency on dns-ebpf's library covers dns-common and aya-ebpf; its binary
    // sources and its toolchain file need saying.
    println!("cargo:rerun-if-changed={}", root.join("dns-ebpf").display());

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    // A target dir of its own: sharing the outer one would deadlock on cargo's lock.
    let target_dir = out_dir.join("ebpf-target");
    let arch = env::var("CARGO_CFG_TARGET_ARCH")?;
    let built = dns_ebpf_build::build(&target_dir, &arch, dns_ebpf_build::BuildOutput::OnFailure)?;
    for object in dns_ebpf_build::objects(&built).context("listing the XDP objects")? {
        let to = out_dir.join(object.file_name().expect("a file"));
        fs::copy(&object, &to)
            .with_context(|| format!("copying {} to {}", object.display(), to.display()))?;
    }
    Ok(())
}
