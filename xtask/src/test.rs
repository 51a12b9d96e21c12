//! `cargo xtask test`: the whole suite, as CI runs it.

use crate::util::{cmd, require_root, root, run};

pub fn test() -> anyhow::Result<()> {
    crate::setup::setup(crate::setup::Scope::All)?;
    require_root("the test suite (it loads XDP programs and builds network namespaces)")?;
    let root = root();
    let cargo = |args: &[&str]| {
        let mut c = cmd("cargo");
        c.current_dir(&root).args(args);
        c
    };
    run(&mut cargo(&["fmt", "--all", "--check"]))?;
    run(&mut cargo(&[
        "clippy",
        "--workspace",
        "--exclude",
        "dns-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The XDP program, linted for its own target with its own toolchain.
    let xdp = dns_ebpf_build::Toolchain::pinned()?;
    run(xdp
        .cargo(
            "clippy",
            &root.join("target/ebpf-clippy"),
            std::env::consts::ARCH,
        )
        .args(["--", "-D", "warnings"]))?;
    // Unit tests, then the root tests: BPF_PROG_TEST_RUN of the XDP program and real queries
    // in network namespaces. One at a time: they load programs and make namespaces.
    run(&mut cargo(&[
        "test",
        "--workspace",
        "--exclude",
        "dns-ebpf",
        "--",
        "--test-threads=1",
    ]))?;
    // Last, the benchmark in its quick mode: it keeps working, and every system it compares
    // must answer correctly. Speed is never asserted.
    crate::bench::bench(crate::bench::Options {
        quick: true,
        publish: false,
        senders: None,
        systems: Vec::new(),
    })?;
    Ok(())
}
