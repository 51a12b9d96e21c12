//! `cargo xtask bench-userspace`: the path that answers whatever the kernel cannot, alone —
//! xdns with `--no-kernel` beside unbound, in the main bench's topology with its zone and query
//! sets, measured in rotation, several rounds. Each round:
//!
//! - UDP: the highest rate answered with under 0.1% loss, per query set (cluster names,
//!   search-path NXDOMAINs, cached external names), with the main bench's kxdpgun search;
//! - UDP at a fixed load (100,000 queries/s offered for 2 s, cluster names and cached external
//!   names): the server's CPU time per answer, summed over its threads
//!   (`/proc/PID/task/*/schedstat`). It includes the kernel's work in the server's system calls,
//!   among it the delivery of each reply through the veth to the client (softirq work done on
//!   the sender's CPU), for every server alike. On a machine shared with other work this is the
//!   steadier figure: a loss-free rate depends on how long the server waits for a CPU;
//! - TCP: what dnsperf gets over persistent connections (`-m tcp`, 8 connections, 200 queries
//!   outstanding, queries pipelined on each connection), cluster names and cached external
//!   names, and the server's CPU time per answer meanwhile.
//!
//! Beside them, on cluster names over UDP only, the socket echo of the main bench
//! (`reflector-sockets`, `echo.rs`): no DNS work at all, so its rate is the most a server on
//! sockets can answer here, and its CPU time per answer at the fixed load is what the socket
//! path itself costs (the kernel's receive and send work, the system calls); a server's CPU time
//! per answer above the echo's is its own work.
//!
//! `--variant "ARGS"` adds an xdns system started with these extra arguments (`KEY=VALUE`
//! words are set in its environment instead; `bin=PATH` runs another build of the agent): to
//! compare settings, or two commits, in one run. Ratios are only
//! taken within a round. Results go to `results/userspace-<timestamp>/report.md`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs::File,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    check,
    throughput::{self, Generator, Search, Valid},
    topo::{self, Kind, Process, System, Topology, UPSTREAM},
    workload::{QuerySet, Workload},
};
use crate::{
    netns,
    util::{cmd, require_root, root, run},
};

pub struct Options {
    pub quick: bool,
    pub rounds: usize,
    /// Extra xdns systems: arguments (and `KEY=VALUE` environment, `bin=PATH` binary) of each.
    pub variants: Vec<String>,
}

/// The word of a variant that names the agent's binary rather than an environment variable.
const VARIANT_BIN: &str = "bin";

/// The link every userspace system sits behind (no XDP on it).
const LINK: usize = 0;
/// TCP load: connections, and queries outstanding over all of them.
const TCP_CONNECTIONS: u32 = 8;
const TCP_OUTSTANDING: u32 = 200;
/// The fixed UDP load of the CPU measurement, queries/s, and its length.
const FIXED_LOAD: u64 = 100_000;
const FIXED_SECS: u32 = 2;

/// One figure of one system in one round.
#[derive(Clone, Copy, Debug, Default)]
struct Figure {
    /// Answers of the expected rcode per second.
    rate: f64,
    /// Server CPU time per answer, µs.
    cpu_us: Option<f64>,
    loss: f64,
}

struct Contender {
    system: System,
    /// For xdns systems: extra arguments and environment, and another build of the agent.
    args: Vec<String>,
    env: Vec<(String, String)>,
    bin: Option<PathBuf>,
}

pub fn bench_userspace(opts: Options) -> anyhow::Result<()> {
    crate::setup::setup(crate::setup::Scope::All)?;
    require_root("the benchmark")?;
    let root = root();
    run(cmd("cargo")
        .current_dir(&root)
        .args(["build", "--release", "-p", "dns-agent"]))?;
    let objects = crate::build_ebpf::build_ebpf()?;
    let agent_bin = root.join("target/release/dns-agent");
    let stamp = String::from_utf8(
        Command::new("date")
            .args(["-u", "+%Y%m%d-%H%M%S"])
            .output()?
            .stdout,
    )?;
    let dir = root
        .join("results")
        .join(format!("userspace-{}", stamp.trim()));
    std::fs::create_dir_all(&dir)?;
    netns::cleanup_on_ctrl_c();
    let report = measure(&opts, &dir, &agent_bin, &objects.join("reflector"));
    netns::cleanup();
    let report = report?;
    std::fs::write(dir.join("report.md"), &report)?;
    println!("\n{report}");
    println!("results: {}", dir.display());
    Ok(())
}

fn contenders(opts: &Options, topo: &Topology) -> anyhow::Result<Vec<Contender>> {
    let by_id = |id: &str| {
        topo::systems()
            .into_iter()
            .find(|s| s.id == id)
            .expect("known system")
    };
    let mut out = vec![
        Contender {
            system: by_id("xdns-userspace"),
            args: Vec::new(),
            env: Vec::new(),
            bin: None,
        },
        Contender {
            system: by_id("unbound"),
            args: Vec::new(),
            env: Vec::new(),
            bin: None,
        },
        Contender {
            system: by_id("reflector-sockets"),
            args: Vec::new(),
            env: Vec::new(),
            bin: None,
        },
    ];
    for (k, variant) in opts.variants.iter().enumerate() {
        // Listen addresses after the main bench's, routed over the same link.
        let listen = Ipv4Addr::new(169, 254, 20, 40 + k as u8);
        topo.node
            .ip(&["addr", "add", &format!("{listen}/32"), "dev", "lo"])?;
        topo.pod.ip(&[
            "route",
            "add",
            &format!("{listen}/32"),
            "via",
            &topo.links[LINK].host_ip.to_string(),
        ])?;
        let (env, args): (Vec<&str>, Vec<&str>) = variant
            .split_whitespace()
            .partition(|w| !w.starts_with('-') && w.contains('='));
        let (bin, env): (Vec<_>, Vec<_>) = env
            .iter()
            .filter_map(|w| w.split_once('='))
            .partition(|(k, _)| *k == VARIANT_BIN);
        let id: &'static str = Box::leak(format!("xdns {variant}").into_boxed_str());
        out.push(Contender {
            system: System {
                id,
                title: id,
                kind: Kind::XdnsUserspace,
                listen,
                link: LINK,
            },
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            bin: bin.last().map(|(_, path)| PathBuf::from(path)),
        });
    }
    Ok(out)
}

/// An xdns agent with `--no-kernel` and the contender's extra arguments; waits until it
/// answers the first Service's name.
fn start_agent(
    topo: &Topology,
    c: &Contender,
    agent_bin: &Path,
    zone_file: &Path,
    dir: &Path,
    metrics_port: u16,
) -> anyhow::Result<Process> {
    let safe: String = c
        .system
        .id
        .chars()
        .map(|ch| if ch.is_ascii_alphanumeric() { ch } else { '_' })
        .collect();
    let log = dir.join(format!("{safe}.log"));
    let metrics = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), metrics_port);
    let agent_bin = c.bin.as_deref().unwrap_or(agent_bin);
    let mut command = topo.node.command(agent_bin);
    command
        .arg("run")
        .arg("--zone-file")
        .arg(zone_file)
        .args(["--listen", &c.system.listen.to_string()])
        .args(["--upstream", &UPSTREAM.to_string()])
        .args(["--metrics-addr", &metrics.to_string()])
        .arg("--no-kernel")
        .args(&c.args)
        .envs(c.env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(File::create(&log)?);
    let child = topo.node.spawn(&mut command)?;
    let mut p = Process {
        child,
        log: log.clone(),
        pin: None,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let server = SocketAddr::new(IpAddr::V4(c.system.listen), 53);
    let sock = topo.pod.enter(|| UdpSocket::bind("0.0.0.0:0"))??;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut q = vec![0x5a, 0x5a, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for l in super::workload::service_name(0).split('.') {
        q.push(l.len() as u8);
        q.extend_from_slice(l.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let mut buf = [0u8; 1500];
    loop {
        if let Some(status) = p.child.try_wait()? {
            bail!(
                "{} exited ({status}):\n{}",
                c.system.id,
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        let _ = sock.send_to(&q, server);
        if let Ok((n, _)) = sock.recv_from(&mut buf)
            && n >= 4
            && buf[..2] == [0x5a, 0x5a]
            && buf[3] & 0x0f == 0
        {
            return Ok(p);
        }
        if Instant::now() > deadline {
            bail!(
                "{} does not answer at {server}:\n{}",
                c.system.id,
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One dnsperf run over TCP from the pod: answers of the expected rcode per second, and how many
/// queries were answered.
fn tcp_run(
    topo: &Topology,
    server: Ipv4Addr,
    set: &QuerySet,
    file: &Path,
    secs: u32,
) -> anyhow::Result<(f64, f64)> {
    let out = topo
        .pod
        .command("dnsperf")
        .args(["-m", "tcp", "-s", &server.to_string()])
        .arg("-d")
        .arg(file)
        .args(["-l", &secs.to_string()])
        .args(["-c", &TCP_CONNECTIONS.to_string()])
        .args(["-q", &TCP_OUTSTANDING.to_string()])
        .args(["-T", "1", "-t", "2"])
        .output()
        .context("running dnsperf (`cargo xtask setup` installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!(
            "dnsperf failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let number = |key: &str| {
        text.lines()
            .find_map(|l| l.trim_start().strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
    };
    let completed = number("Queries completed:").context("dnsperf: no `Queries completed`")?;
    let elapsed = number("Run time (s):").context("dnsperf: no `Run time`")?;
    let rcode = if set.rcode() == 3 {
        "NXDOMAIN"
    } else {
        "NOERROR"
    };
    // "Response codes:       NOERROR 123 (100.00%)"
    let valid = text
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("Response codes:"))
        .and_then(|codes| {
            let words: Vec<&str> = codes.split_whitespace().collect();
            words
                .iter()
                .position(|w| *w == rcode)
                .and_then(|i| words.get(i + 1))
                .and_then(|n| n.parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    if valid < completed * 0.999 {
        bail!("dnsperf over TCP to {server}: {completed} answers, only {valid} {rcode}:\n{text}");
    }
    Ok((valid / elapsed.max(0.001), completed))
}

fn measure(
    opts: &Options,
    dir: &Path,
    agent_bin: &Path,
    reflector: &Path,
) -> anyhow::Result<String> {
    let workload = Workload::new(5000, 200);
    let zone_file = dir.join("zone.yaml");
    std::fs::write(&zone_file, workload.zone_yaml())?;
    let mut topo = Topology::new(reflector, None)?;
    let contenders = contenders(opts, &topo)?;
    let unbound = &contenders[1].system;
    std::fs::write(
        dir.join("unbound.conf"),
        workload.unbound_conf(unbound.listen, dir),
    )?;
    std::fs::write(dir.join("upstream.conf"), workload.upstream_conf())?;
    let _upstream = topo::start_upstream(&topo, dir)?;
    let mut processes: Vec<Process> = Vec::new();
    for (k, c) in contenders.iter().enumerate() {
        eprintln!("starting {}", c.system.id);
        let p = if matches!(c.system.kind, Kind::Unbound | Kind::SocketReflector) {
            topo::start(&topo, &c.system, agent_bin, &zone_file, dir, 0)?
                .context("unbound and the echo have a process")?
        } else {
            start_agent(&topo, c, agent_bin, &zone_file, dir, 9353 + k as u16)?
        };
        processes.push(p);
    }
    let mut kxdpgun_files = BTreeMap::new();
    let mut dnsperf_files = BTreeMap::new();
    for set in &workload.sets {
        for c in &contenders {
            check::check_set(&topo, &c.system, set)?;
        }
        let p = dir.join(format!("queries-{}.txt", set.id));
        set.write_queries(&p)?;
        kxdpgun_files.insert(set.id, p.clone());
        // dnsperf reads the same format: one "NAME TYPE" per line.
        dnsperf_files.insert(set.id, p);
        eprintln!("checked: every system answers every {} query", set.id);
    }
    let tcp_sets = ["cluster", "external"];
    let (max_trials, tcp_secs) = if opts.quick { (1, 1) } else { (6, 4) };
    // (round, set, system) → figure.
    let mut udp: BTreeMap<(usize, &str, usize), Search> = BTreeMap::new();
    let mut tcp: BTreeMap<(usize, &str, usize), Figure> = BTreeMap::new();
    let mut fixed: BTreeMap<(usize, &str, usize), Figure> = BTreeMap::new();
    let fixed_load = if opts.quick { 20_000 } else { FIXED_LOAD };
    topo.detach_pass()?;
    for round in 0..opts.rounds {
        for set in &workload.sets {
            let mut searches: Vec<Search> = contenders
                .iter()
                .map(|c| {
                    let mut s = Search::new(if opts.quick { 20_000 } else { 200_000 }, max_trials);
                    s.done = !measured(&c.system, set.id);
                    s
                })
                .collect();
            let mut step = 0;
            while searches.iter().any(|s| !s.done) {
                for k in 0..contenders.len() {
                    let i = (k + step + round) % contenders.len();
                    if searches[i].done {
                        continue;
                    }
                    let s = &contenders[i].system;
                    let rate = searches[i].next;
                    let t = throughput::trial(
                        &mut topo,
                        s,
                        Generator::Kxdpgun,
                        Valid::of(s, set),
                        &kxdpgun_files[set.id],
                        rate,
                        1.0,
                    )?;
                    eprintln!(
                        "round {round} udp {:<9} {:<28} offered {:>8} answered {:>9.0}/s loss {:>6.2}%",
                        set.id,
                        s.id,
                        rate,
                        t.valid_pps(),
                        t.loss() * 100.0
                    );
                    if t.wrong > 0 {
                        bail!("{}: {} wrong replies to {}", s.id, t.wrong, set.id);
                    }
                    if !t.passed() {
                        std::thread::sleep(Duration::from_millis(300));
                    }
                    searches[i].record(t);
                }
                step += 1;
            }
            for (i, s) in searches.into_iter().enumerate() {
                if measured(&contenders[i].system, set.id) {
                    udp.insert((round, set.id, i), s);
                }
            }
        }
        for set_id in tcp_sets {
            let set = workload
                .sets
                .iter()
                .find(|s| s.id == set_id)
                .expect("a set of the workload");
            for k in 0..contenders.len() {
                let i = (k + round) % contenders.len();
                let s = &contenders[i].system;
                if !measured(s, set.id) {
                    continue;
                }
                let pid = processes[i].pid();
                let cpu = super::tls::cpu_ns(pid)?;
                let t = throughput::trial(
                    &mut topo,
                    s,
                    Generator::Kxdpgun,
                    Valid::of(s, set),
                    &kxdpgun_files[set.id],
                    fixed_load,
                    f64::from(FIXED_SECS),
                )?;
                let cpu = super::tls::cpu_ns(pid)? - cpu;
                let f = Figure {
                    rate: t.valid_pps(),
                    cpu_us: (t.valid > 0).then(|| cpu as f64 / 1000.0 / t.valid as f64),
                    loss: t.loss(),
                };
                eprintln!(
                    "round {round} udp-fixed {:<9} {:<28} answered {:>9.0}/s loss {:>6.2}% cpu {:.2} µs/answer",
                    set.id,
                    s.id,
                    f.rate,
                    f.loss * 100.0,
                    f.cpu_us.unwrap_or(0.0)
                );
                fixed.insert((round, set.id, i), f);
                if s.is_reflector() {
                    // An echo is no DNS server over TCP.
                    continue;
                }
                let cpu = super::tls::cpu_ns(pid)?;
                let (rate, completed) =
                    tcp_run(&topo, s.listen, set, &dnsperf_files[set.id], tcp_secs)?;
                let cpu = super::tls::cpu_ns(pid)? - cpu;
                let f = Figure {
                    rate,
                    cpu_us: (completed > 0.0).then(|| cpu as f64 / 1000.0 / completed),
                    loss: 0.0,
                };
                eprintln!(
                    "round {round} tcp {:<9} {:<28} answered {:>9.0}/s cpu {:.2} µs/answer",
                    set.id,
                    s.id,
                    f.rate,
                    f.cpu_us.unwrap_or(0.0)
                );
                tcp.insert((round, set.id, i), f);
            }
        }
    }
    topo.attach_pass()?;
    for c in &contenders {
        check::check_set(&topo, &c.system, &workload.sets[0])?;
    }
    for p in &mut processes {
        let _ = p.child.kill();
        let _ = p.child.wait();
    }
    Ok(report(opts, &workload, &contenders, &udp, &fixed, &tcp))
}

/// Whether `system` is measured on `set` (the echo only on cluster names, as in the main bench).
fn measured(system: &System, set: &str) -> bool {
    system.skips(set).is_none()
}

fn report(
    opts: &Options,
    workload: &Workload,
    contenders: &[Contender],
    udp: &BTreeMap<(usize, &str, usize), Search>,
    fixed: &BTreeMap<(usize, &str, usize), Figure>,
    tcp: &BTreeMap<(usize, &str, usize), Figure>,
) -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## xdns userspace path against unbound (`cargo xtask bench-userspace{}`)\n",
        if opts.quick { " --quick" } else { "" }
    );
    let _ = writeln!(
        md,
        "{} Services, {} round(s), load average at the end {}. UDP: highest rate with under 0.1% \
         loss (kxdpgun, 1 s trials; \"≥\": kxdpgun could not send faster). UDP at {} queries/s: \
         answers/s, loss and the server's CPU time per answer. TCP: dnsperf -m tcp, \
         {TCP_CONNECTIONS} connections, {TCP_OUTSTANDING} queries outstanding, and the server's \
         CPU time per answer. \"× unbound\": this system's rate over unbound's in the same round; \
         \"CPU ÷\": unbound's CPU time per answer over this system's (above 1: cheaper). \
         `reflector-sockets`: a UDP echo with no DNS work (cluster names over UDP only), the \
         socket path's own ceiling and CPU cost per query.\n",
        workload.services,
        opts.rounds,
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        if opts.quick { 20_000 } else { FIXED_LOAD },
    );
    let _ = writeln!(
        md,
        "| round | measure | system | answers/s | × unbound | loss | CPU µs per answer | CPU ÷ |"
    );
    let _ = writeln!(md, "|---:|---|---|---:|---:|---:|---:|---:|");
    let unbound = contenders
        .iter()
        .position(|c| c.system.kind == Kind::Unbound)
        .expect("unbound is a contender");
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "—".into(),
    };
    for round in 0..opts.rounds {
        for set in &workload.sets {
            let base = udp.get(&(round, set.id, unbound)).and_then(Search::result);
            for (i, c) in contenders.iter().enumerate() {
                let Some(s) = udp.get(&(round, set.id, i)) else {
                    continue;
                };
                let figure = match s.result() {
                    Some(v) => format!("{}{:.0}k", if s.saturated { "≥ " } else { "" }, v / 1000.0),
                    None => "—".into(),
                };
                let _ = writeln!(
                    md,
                    "| {round} | UDP {}, highest loss-free rate | {} | {figure} | {} | < 0.1% | | |",
                    set.id,
                    c.system.id,
                    ratio(s.result(), base),
                );
            }
        }
        for (what, figures) in [("UDP at a fixed load", fixed), ("TCP", tcp)] {
            for set_id in ["cluster", "external"] {
                let base = figures.get(&(round, set_id, unbound)).copied();
                for (i, c) in contenders.iter().enumerate() {
                    let Some(f) = figures.get(&(round, set_id, i)) else {
                        continue;
                    };
                    let _ = writeln!(
                        md,
                        "| {round} | {what}, {set_id} | {} | {:.0}k | {} | {:.2}% | {} | {} |",
                        c.system.id,
                        f.rate / 1000.0,
                        ratio(Some(f.rate), base.map(|b| b.rate)),
                        f.loss * 100.0,
                        f.cpu_us.map_or("—".into(), |c| format!("{c:.2}")),
                        ratio(base.and_then(|b| b.cpu_us), f.cpu_us),
                    );
                }
            }
        }
    }
    md
}
