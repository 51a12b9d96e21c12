//! `cargo xtask build-ebpf`: builds the XDP object on its own, for inspection
//! (`bpftool`, `llvm-objdump`) and for the benchmark's reflector. The agent's build script
//! builds the same objects the same way (`dns-ebpf-build`) and embeds them.

use anyhow::Context as _;

use crate::util::root;

/// Builds into `target/` and returns the directory of the objects
/// (`target/bpfel-unknown-none/release`).
pub fn build_ebpf() -> anyhow::Result<std::path::PathBuf> {
    let dir = dns_ebpf_build::build(
        &root().join("target"),
        std::env::consts::ARCH,
        dns_ebpf_build::BuildOutput::Inherit,
    )
    .context("building the XDP program")?;
    for object in dns_ebpf_build::objects(&dir)? {
        let size = std::fs::metadata(&object)?.len();
        println!("XDP object: {} ({size} bytes)", object.display());
    }
    Ok(dir)
}
