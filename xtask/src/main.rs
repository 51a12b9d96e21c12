//! Developer commands for xdns. `cargo xtask --help` lists them.

mod bench;
mod build_ebpf;
mod demo;
mod fuzz;
mod netns;
mod setup;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "xdns developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing need (Debian 12), pinned: LLVM, the XDP toolchain
    /// (dns-ebpf/rust-toolchain.toml) with rust-src, bpf-linker, DNS and network tools. Skips
    /// what is already there; leaves other toolchains alone.
    Setup {
        /// Only what building the agent needs (the container image).
        #[arg(long)]
        build_only: bool,
    },
    /// Build the XDP object alone, to target/bpfel-unknown-none/release/dns-ebpf.
    BuildEbpf,
    /// Run xdns on the built-in example cluster in network namespaces and query it.
    Demo,
    /// Run the whole test suite as CI does: fmt, clippy, unit tests, XDP and namespace tests,
    /// the fuzz targets for a short time.
    Test,
    /// Fuzz: every cargo-fuzz target of fuzz/ for --time seconds, then the differential fuzzer
    /// of the XDP program for --frames frames (root). Fails on any crash or mismatch.
    Fuzz {
        /// Seconds per cargo-fuzz target (0: none).
        #[arg(long, default_value_t = 30)]
        time: u64,
        /// Frames for the XDP differential fuzzer (0: skip it).
        #[arg(long, default_value_t = 100_000)]
        frames: u64,
        /// Only this cargo-fuzz target (repeatable).
        #[arg(long)]
        target: Vec<String>,
        /// Regenerate the seed corpora in fuzz/corpus/ and exit.
        #[arg(long)]
        write_corpora: bool,
    },
    /// Benchmark xdns against unbound, dnsmasq and a bare XDP reflector in network
    /// namespaces: throughput, latency percentiles, in-kernel cost, memory. Results go to
    /// results/<timestamp>/.
    Bench {
        /// A short run that checks every system answers correctly (CI); not a measurement.
        #[arg(long)]
        quick: bool,
        /// Also write the results into docs/benchmarks.md and docs/benchmarks.svg.
        #[arg(long)]
        publish: bool,
    },
    /// Only the DNS-over-TLS part of the benchmark: external names, cached and uncached,
    /// through a TLS upstream beside a plain one. Results go to results/tls-<pid>/.
    BenchTls {
        /// A short run (CI); not a measurement.
        #[arg(long)]
        quick: bool,
    },
    /// The userspace path alone: xdns with --no-kernel against unbound, UDP (kxdpgun) and TCP
    /// (dnsperf), in rounds. Results go to results/userspace-<timestamp>/.
    BenchUserspace {
        /// A short run: every system must answer; not a measurement.
        #[arg(long)]
        quick: bool,
        /// Rounds; ratios are taken within a round.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Another xdns system, started with these extra arguments (KEY=VALUE words go to its
        /// environment), e.g. --variant "--max-udp-loops 1" (repeatable).
        #[arg(long, allow_hyphen_values = true)]
        variant: Vec<String>,
    },
}

fn main() -> std::process::ExitCode {
    // The cause chain on one line each, without a backtrace: these errors say what to do.
    match run(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Setup { build_only } => setup::setup(if build_only {
            setup::Scope::Build
        } else {
            setup::Scope::All
        }),
        Command::BuildEbpf => {
            setup::setup(setup::Scope::Build)?;
            build_ebpf::build_ebpf().map(|_| ())
        }
        Command::Demo => demo::demo(),
        Command::Test => test::test(),
        Command::Fuzz {
            time,
            frames,
            target,
            write_corpora,
        } => {
            if write_corpora {
                fuzz::write_corpora()
            } else {
                fuzz::fuzz(fuzz::Options {
                    time,
                    frames,
                    targets: target,
                })
            }
        }
        Command::Bench { quick, publish } => bench::bench(bench::Options { quick, publish }),
        Command::BenchTls { quick } => bench::tls::bench_tls(quick),
        Command::BenchUserspace {
            quick,
            rounds,
            variant,
        } => bench::userspace::bench_userspace(bench::userspace::Options {
            quick,
            rounds: rounds.max(1),
            variants: variant,
        }),
    }
}
