//! Developer commands for xdns. `cargo xtask --help` lists them.

mod bench;
mod build_ebpf;
mod demo;
mod deploy;
mod fuzz;
mod netns;
mod setup;
mod soak;
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
    /// Validate deploy/*.yaml and deploy/examples/*.yaml against the Kubernetes API schemas of
    /// the version the agent is built for (k8s-openapi's feature), offline (root: it runs the
    /// validator in a network namespace of its own). `test` runs it too.
    Manifests,
    /// Run xdns on the built-in example cluster in network namespaces and query it.
    Demo,
    /// Run the whole test suite as CI does: fmt, clippy, cargo deny, the manifests against the
    /// Kubernetes API schemas, unit tests, XDP and namespace tests, the fuzz targets for a short
    /// time.
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
    /// Benchmark xdns against unbound, dnsmasq, knotd (XDP and UDP), kresd, PowerDNS Recursor
    /// and the paths' ceilings (bare XDP reflectors, with and without a name lookup, and a UDP
    /// echo on sockets) in network namespaces: throughput, latency percentiles, in-kernel cost,
    /// memory. Results go to results/<timestamp>/.
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
    /// The soak: mixed traffic at a set rate against a churning zone (fake API server), a
    /// flapping upstream and agents replaced now and then, every answer checked; the agent's
    /// memory, descriptors, threads and kernel maps sampled (root). Fails on any wrong answer
    /// or leak. Samples, plot and summary go to target/soak/<time>/.
    Soak {
        /// How long: 90s, 30m, 2h.
        #[arg(long, default_value = "10m", value_parser = soak::parse_duration)]
        duration: std::time::Duration,
        /// UDP queries offered per second (open loop), IPv4 and IPv6 in turn.
        #[arg(long, default_value_t = 800)]
        qps: u64,
        /// Service and EndpointSlice changes per second through the API.
        #[arg(long, default_value_t = 60)]
        churn: u64,
        /// How often the agent is replaced by a new one (default: a third of the run, 20 s to
        /// 5 min).
        #[arg(long, value_parser = soak::parse_duration)]
        replace_every: Option<std::time::Duration>,
    },
    /// Only the DNS-over-TLS part of the benchmark: external names, cached and uncached,
    /// through a TLS upstream beside a plain one. Results go to results/tls-<pid>/.
    BenchTls {
        /// A short run (CI); not a measurement.
        #[arg(long)]
        quick: bool,
    },
    /// (Run by `bench` in the pod namespace.) Resolve the first COUNT names of NAMES with
    /// getaddrinfo, printing the microseconds of each.
    #[command(hide = true)]
    BenchResolve {
        names: std::path::PathBuf,
        count: usize,
    },
    /// (Run by `bench` in the node namespace.) The socket ceiling: echo every UDP query to
    /// ADDR:53 with QR set, a thread per CPU (recvmmsg/sendmmsg).
    #[command(hide = true)]
    BenchEcho { listen: std::net::Ipv4Addr },
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
        /// environment, bin=PATH runs another build of the agent), e.g. --variant
        /// "--max-udp-loops 1" or --variant "bin=../old/target/release/dns-agent" (repeatable).
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
        Command::Manifests => {
            crate::util::require_root(
                "validating the manifests (the validator runs without a network)",
            )?;
            deploy::setup_kubernetes_validate()?;
            deploy::validate_manifests()
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
        Command::BenchTls { quick } => bench::tls::bench_tls(quick),
        Command::Soak {
            duration,
            qps,
            churn,
            replace_every,
        } => {
            let o = soak::Options {
                duration,
                qps,
                churn,
                replace_every,
            };
            soak::check(&o)?;
            soak::soak(o)
        }
        Command::BenchEcho { listen } => bench::echo::serve(listen),
        Command::BenchResolve { names, count } => bench::resolve::resolve_loop(&names, count),
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
