//! `cargo xtask test`: the whole suite, as CI runs it.

use crate::util::{cmd, require_root, root, run};

/// Seconds each cargo-fuzz target runs in CI (`cargo xtask fuzz --time` runs them longer).
const CI_FUZZ_SECONDS: u64 = 20;

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
    // The dependency graph against deny.toml. Offline: these checks need the crates already
    // fetched for the build, not the advisory database (which is not checked here).
    run(&mut cargo(&[
        "deny",
        "--offline",
        "--locked",
        "check",
        "bans",
        "licenses",
        "sources",
    ]))?;
    // deploy/*.yaml and deploy/examples/*.yaml against the API of the Kubernetes version the
    // agent is built for, offline.
    crate::deploy::validate_manifests()?;
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
    // The fuzz targets, briefly: each keeps running and finds nothing in its first seconds. The
    // XDP differential fuzzer ran above, in the root tests, at 100,000 frames.
    crate::fuzz::fuzz(crate::fuzz::Options {
        time: CI_FUZZ_SECONDS,
        frames: 0,
        targets: Vec::new(),
    })?;
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

#[cfg(test)]
mod tests {
    /// Every file of `tests/` is a `[[test]]` of dns-agent: a test file nobody registered never
    /// runs, and CI would stay green without it (a merge once dropped three).
    #[test]
    fn every_integration_test_file_is_registered() {
        let root = crate::util::root();
        let manifest = std::fs::read_to_string(root.join("dns-agent/Cargo.toml")).unwrap();
        let registered: Vec<&str> = manifest
            .lines()
            .filter_map(|l| l.trim().strip_prefix("path = \"../tests/"))
            .filter_map(|l| l.strip_suffix('"'))
            .collect();
        let mut missing = Vec::new();
        for entry in std::fs::read_dir(root.join("tests")).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            if name.ends_with(".rs") && !registered.contains(&name.as_str()) {
                missing.push(name);
            }
        }
        assert!(
            missing.is_empty(),
            "tests/{missing:?} have no [[test]] in dns-agent/Cargo.toml: add one each"
        );
    }
}
