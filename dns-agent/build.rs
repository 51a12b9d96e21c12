//! Builds the XDP program (`dns-ebpf`, nightly + build-std + bpf-linker) into OUT_DIR, where
//! `src/kernel/mod.rs` embeds it: the agent binary is all a node needs, and it never loads a
//! stale object from `target/`.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
        .args(["locate-project", "--workspace", "--message-format", "plain"])
        .output()
        .context("cargo locate-project")?;
    let root = String::from_utf8(metadata.stdout)?;
    let root = std::path::Path::new(root.trim())
        .parent()
        .ok_or_else(|| anyhow!("workspace manifest has no parent"))?
        .to_path_buf();
    let ebpf_dir = root.join("dns-ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {ebpf_dir:?}"))?;
    aya_build::build_ebpf(
        [Package {
            name: "dns-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
    .context(
        "building the XDP program failed; `cargo xtask setup` installs what it needs \
         (nightly rust-src, bpf-linker)",
    )
}
