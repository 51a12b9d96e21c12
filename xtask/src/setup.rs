//! `cargo xtask setup`: installs what building and testing xdns needs on a Debian 12 machine,
//! pinned, skipping what is already there.
//!
//! The pins: the workspace toolchain (`rust-toolchain.toml`), the XDP toolchain
//! (`dns-ebpf/rust-toolchain.toml`), and in `dns-ebpf-build` the LLVM major they share with
//! bpf-linker and Debian's `llvm-N-dev`, and bpf-linker's version. A user's own toolchains
//! (a floating `nightly` among them) are left alone.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};
use dns_ebpf_build::{BPF_LINKER_VERSION, LLVM_MAJOR, Toolchain};

/// The cargo-fuzz release `cargo xtask fuzz` runs the fuzz targets with (fuzz/).
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

use crate::util::{cmd, have, root, run};

/// What the tests, the demo and the benchmarks run besides xdns.
const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "util-linux",
    "ethtool",
    "bpftool",
    "bind9-dnsutils",
    "knot-dnsutils",
    "dnsperf",
    "unbound",
    "dnsmasq-base",
    // Intercept mode's tests and demo: a kube-proxy stand-in, and the node's rules checked
    // before and after.
    "nftables",
    "iptables",
    // The manifests' validator (kubernetes-validate, from PyPI) runs in a venv of Debian's
    // Python.
    "python3-venv",
    // The benchmark's peers: knotd (with its XDP mode), kresd, PowerDNS Recursor.
    "knot",
    "knot-resolver",
    "pdns-recursor",
];

/// Services Debian would start when their package is installed: tests start their own copies
/// inside network namespaces, never the machine's.
const SERVICES: &[&str] = &[
    "unbound",
    "knot",
    "kresd.target",
    "kres-cache-gc",
    "pdns-recursor",
];

/// What building needs: bpf-linker links against LLVM `LLVM_MAJOR` (Debian 12 has it from
/// bookworm-security).
fn build_packages() -> Vec<String> {
    let mut p: Vec<String> = ["llvm", "libclang", "libpolly"]
        .iter()
        .map(|n| format!("{n}-{LLVM_MAJOR}-dev"))
        .collect();
    p.extend(["libzstd-dev", "zlib1g-dev", "pkg-config"].map(String::from));
    p
}

fn llvm_prefix() -> String {
    format!("/usr/lib/llvm-{LLVM_MAJOR}")
}

/// cargo-deny checks the dependency graph (`deny.toml`): licenses, bans, sources.
pub const CARGO_DENY_VERSION: &str = "0.20.2";

/// What to install.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Building the agent only (the Containerfile).
    Build,
    /// Building, testing, the demo and the benchmarks.
    All,
}

pub fn setup(scope: Scope) -> anyhow::Result<()> {
    timed("Debian packages", || apt_packages(scope))?;
    timed("workspace components", workspace_components)?;
    let toolchain = Toolchain::pinned()?;
    timed("XDP toolchain", || xdp_toolchain(&toolchain))?;
    timed("bpf-linker", bpf_linker)?;
    if scope == Scope::All {
        timed("cargo-fuzz", cargo_fuzz)?;
        timed("cargo-deny", cargo_deny)?;
        timed(
            "kubernetes-validate",
            crate::deploy::setup_kubernetes_validate,
        )?;
    }
    // Whatever was there before: the two LLVMs must now agree, or no build can succeed.
    dns_ebpf_build::check_llvm(&toolchain, &dns_ebpf_build::bpf_linker()?)?;
    Ok(())
}

/// Runs one step, and says how long it took when it had something to do (a fresh machine's
/// set-up time, step by step).
fn timed(step: &str, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    f()?;
    let took = started.elapsed();
    if took > std::time::Duration::from_secs(1) {
        println!("setup: {step}: {:.1} s", took.as_secs_f64());
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn apt_packages(scope: Scope) -> anyhow::Result<()> {
    if !have("dpkg-query") {
        bail!(
            "this setup knows Debian 12 (bookworm); elsewhere install by hand what \
             xtask/src/setup.rs lists, with LLVM {LLVM_MAJOR}"
        );
    }
    let mut wanted = build_packages();
    if scope == Scope::All {
        wanted.extend(TEST_PACKAGES.iter().map(|p| p.to_string()));
    }
    let missing: Vec<String> = wanted.into_iter().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        println!("setup: Debian packages present");
        return Ok(());
    }
    if !is_root() {
        bail!(
            "setup: packages {missing:?} are missing and installing them needs root (run as root)"
        );
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
    result.with_context(|| {
        format!(
            "installing Debian packages (llvm-{LLVM_MAJOR}-dev comes from bookworm-security: is \
             `deb http://deb.debian.org/debian-security bookworm-security main` in the apt sources?)"
        )
    })?;
    if have("systemctl") {
        for s in SERVICES {
            let _ = cmd("systemctl").args(["disable", "--now", s]).output();
        }
    }
    Ok(())
}

/// rustfmt and clippy for the workspace toolchain (rustup installs the toolchain itself from
/// `rust-toolchain.toml` the first time cargo runs here).
fn workspace_components() -> anyhow::Result<()> {
    let listed = Command::new("rustup")
        .current_dir(root())
        .args(["component", "list", "--installed"])
        .output()
        .context("running rustup: xdns is built with rustup's toolchains (https://rustup.rs)")?;
    let text = String::from_utf8_lossy(&listed.stdout);
    for component in ["rustfmt", "clippy"] {
        if !text.lines().any(|l| l.starts_with(component)) {
            println!("setup: installing {component}");
            run(cmd("rustup")
                .current_dir(root())
                .args(["component", "add", component]))?;
        }
    }
    Ok(())
}

fn xdp_toolchain(toolchain: &Toolchain) -> anyhow::Result<()> {
    if toolchain.is_installed() {
        println!("setup: XDP toolchain {toolchain} present");
        return Ok(());
    }
    println!("setup: installing the XDP toolchain {toolchain}");
    let mut c = cmd("rustup");
    c.args([
        "toolchain",
        "install",
        &toolchain.channel,
        "--profile",
        "minimal",
    ]);
    if !toolchain.components.is_empty() {
        c.arg("--component").arg(toolchain.components.join(","));
    }
    run(&mut c)
}

/// bpf-linker at the pinned version, built against the pinned LLVM: anything else is rebuilt.
fn bpf_linker() -> anyhow::Result<()> {
    let present = dns_ebpf_build::bpf_linker().ok().and_then(|path| {
        let version = dns_ebpf_build::bpf_linker_version(&path)?;
        let llvm = dns_ebpf_build::bpf_linker_llvm_major(&path).ok()?;
        Some((path, version, llvm))
    });
    match &present {
        Some((_, version, llvm)) if version == BPF_LINKER_VERSION && *llvm == LLVM_MAJOR => {
            println!("setup: bpf-linker {version} (LLVM {llvm}) present");
            return Ok(());
        }
        Some((path, version, llvm)) => println!(
            "setup: {} is bpf-linker {version} with LLVM {llvm}; installing {BPF_LINKER_VERSION} \
             with LLVM {LLVM_MAJOR}",
            path.display()
        ),
        None => {
            println!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR}")
        }
    }
    let prefix = llvm_prefix();
    run(cmd("cargo")
        .current_dir(root())
        .args(["install", "--locked", "--force"])
        .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{LLVM_MAJOR}"))
        .env("LLVM_PREFIX", &prefix)
        .env(format!("LLVM_SYS_{LLVM_MAJOR}1_PREFIX"), &prefix))
    .context("installing bpf-linker")
}

/// cargo-fuzz at the pinned version (it drives the fuzz targets of `fuzz/` with the XDP
/// toolchain's nightly, which libFuzzer's instrumentation needs).
fn cargo_fuzz() -> anyhow::Result<()> {
    cargo_tool("fuzz", CARGO_FUZZ_VERSION)
}

/// cargo-deny at the pinned version (`cargo xtask test` runs it).
fn cargo_deny() -> anyhow::Result<()> {
    cargo_tool("deny", CARGO_DENY_VERSION)
}

/// `cargo-<tool>` at `version`, installed with its own lock file; another version is replaced.
fn cargo_tool(tool: &str, version: &str) -> anyhow::Result<()> {
    let present = Command::new("cargo")
        .args([tool, "--version"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match present {
        // `cargo-fuzz 0.13.2`, `cargo-deny 0.20.2`
        Some(v) if v.split_whitespace().nth(1) == Some(version) => {
            println!("setup: {v} present");
            return Ok(());
        }
        Some(v) => println!("setup: {v} present; installing cargo-{tool} {version}"),
        None => println!("setup: installing cargo-{tool} {version}"),
    }
    run(cmd("cargo")
        .current_dir(root())
        .args(["install", "--locked", "--force"])
        .arg(format!("cargo-{tool}@{version}")))
    .with_context(|| format!("installing cargo-{tool}"))
}
