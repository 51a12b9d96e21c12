//! Developer commands for xdns. `cargo xtask --help` lists them.

mod bench;
mod build_ebpf;
mod demo;
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
    /// Run the whole test suite as CI does: fmt, clippy, unit tests, XDP and namespace tests.
    Test,
    /// Benchmark xdns against unbound, dnsmasq, knotd (XDP and UDP), kresd, PowerDNS Recursor
    /// and a bare XDP reflector in network namespaces: throughput, latency percentiles,
    /// in-kernel cost, memory. Results go to results/<timestamp>/.
    Bench {
        /// A short run that checks every system answers correctly and within the loss bound
        /// (CI); not a measurement.
        #[arg(long)]
        quick: bool,
        /// Also write the results into docs/benchmarks.md and docs/benchmarks.svg.
        #[arg(long)]
        publish: bool,
        /// Sender threads of the throughput load generator, each pinned to its own CPU
        /// [default: one per CPU the bench may use].
        #[arg(long, value_name = "N")]
        senders: Option<usize>,
        /// Measure only these systems (comma-separated ids as in the report, e.g.
        /// `reflector-generic,xdns-generic`), for development; skips the in-kernel cost and
        /// programming benches; not with --publish [default: all].
        #[arg(long, value_name = "IDS", value_delimiter = ',')]
        systems: Vec<String>,
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
        Command::Bench {
            quick,
            publish,
            senders,
            systems,
        } => bench::bench(bench::Options {
            quick,
            publish,
            senders,
            systems,
        }),
    }
}
