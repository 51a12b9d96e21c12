//! `cargo xtask setup`: installs what building and testing xdns needs on a Debian 12 machine,
//! skipping what is already there.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::util::{cmd, have, run};

/// Debian packages: LLVM 22 for bpf-linker (it must match nightly rustc's LLVM), network and
/// DNS tools for the tests, the demo and the benchmarks.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libclang-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "pkg-config",
    "iproute2",
    "util-linux",
    "ethtool",
    "bpftool",
    "bind9-dnsutils",
    "knot-dnsutils",
    "dnsperf",
    "unbound",
    "dnsmasq-base",
];

/// Services Debian would start when their package is installed: tests start their own copies
/// inside network namespaces, never the machine's.
const SERVICES: &[&str] = &["unbound"];

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

fn missing_packages() -> anyhow::Result<Vec<&'static str>> {
    let mut missing = Vec::new();
    for p in PACKAGES {
        let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
        let installed = matches!(&out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"));
        if !installed {
            missing.push(*p);
        }
    }
    Ok(missing)
}

pub fn setup() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !have("dpkg-query") {
        bail!("this setup knows Debian (12, bookworm); install the packages in xtask/src/setup.rs by hand elsewhere");
    }
    let missing = missing_packages()?;
    if missing.is_empty() {
        println!("setup: Debian packages present");
    } else {
        if !root {
            bail!("setup: packages {missing:?} are missing and installing them needs root (run as root)");
        }
        println!("setup: installing {}", missing.join(" "));
        // Keep Debian from starting the DNS servers we install for tests.
        let policy = Path::new("/usr/sbin/policy-rc.d");
        let placed_policy = !policy.exists();
        if placed_policy {
            std::fs::write(policy, "#!/bin/sh\nexit 101\n")?;
            run(cmd("chmod").args(["755", "/usr/sbin/policy-rc.d"]))?;
        }
        let result = run(cmd("apt-get").args(["update", "-qq"])).and_then(|()| {
            run(cmd("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"))
        });
        if placed_policy {
            let _ = std::fs::remove_file(policy);
        }
        result.context("installing Debian packages")?;
        if have("systemctl") {
            for s in SERVICES {
                let _ = cmd("systemctl").args(["disable", "--now", s]).output();
            }
        }
    }

    // Nightly with the core sources: the XDP program is built with -Z build-std=core.
    let has_rust_src = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("rust-src"))
        .unwrap_or(false);
    if has_rust_src {
        println!("setup: nightly rust-src present");
    } else {
        println!("setup: installing the nightly toolchain with rust-src");
        run(cmd("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal", "--component", "rust-src"]))?;
    }

    // Stable's rustfmt and clippy, for `cargo xtask test`.
    for component in ["rustfmt", "clippy"] {
        let present = Command::new("rustup")
            .args(["component", "list", "--installed"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with(component)))
            .unwrap_or(false);
        if !present {
            println!("setup: installing {component}");
            run(cmd("rustup").args(["component", "add", component]))?;
        }
    }

    if Command::new("bpf-linker").arg("--version").output().is_ok_and(|o| o.status.success()) {
        println!("setup: bpf-linker present");
    } else {
        println!("setup: building bpf-linker against LLVM 22 (about a minute)");
        run(cmd("cargo")
            .args(["install", "bpf-linker@0.13.0", "--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX))
        .context("installing bpf-linker")?;
    }
    Ok(())
}
