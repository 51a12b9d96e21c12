//! The run's report: Markdown tables, one SVG plot (throughput; latency percentiles per
//! system), raw TSV files, and the published copy under docs/.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::{Context as _, bail};

use super::{
    LOSS_BOUND, Measurements, systems_for,
    throughput::{GENERATOR_BOUND, Generator, MAX_LOSS},
    topo,
    workload::Workload,
};

pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    pub memory_gib: f64,
    pub load_before: String,
    pub tools: Vec<(String, String)>,
}

fn first_line(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|_| "not found".into())
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

impl Machine {
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let memory_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| {
                        v.split_whitespace()
                            .next()
                            .and_then(|n| n.parse::<f64>().ok())
                    })
            })
            .unwrap_or(0.0)
            / (1024.0 * 1024.0);
        Self {
            cpu,
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            kernel: first_line("uname", &["-r"]),
            memory_gib,
            load_before: loadavg(),
            tools: vec![
                ("unbound".into(), first_line("unbound", &["-V"])),
                ("dnsmasq".into(), first_line("dnsmasq", &["--version"])),
                ("knotd".into(), first_line("knotd", &["-V"])),
                ("kresd".into(), first_line("kresd", &["-V"])),
                (
                    "pdns_recursor".into(),
                    // It prints its banner behind a timestamp on stderr.
                    first_line("pdns_recursor", &["--version"])
                        .split_once("PowerDNS")
                        .map(|(_, v)| format!("PowerDNS{v}"))
                        .unwrap_or_default(),
                ),
            ],
        }
    }
}

/// Rows of the kernel_cost bench's TSV.
pub struct KernelCost {
    /// (services, case) → (mean ns, p50 ns, p99 ns, mean − baseline ns)
    pub rows: BTreeMap<(u64, String), (f64, f64, f64, f64)>,
}

impl KernelCost {
    pub fn parse(tsv: &str) -> Self {
        let mut rows = BTreeMap::new();
        for line in tsv.lines().skip(1) {
            let f: Vec<&str> = line.split('\t').collect();
            if f.len() < 6 || f[1].starts_with('#') {
                continue;
            }
            let n = |i: usize| f[i].parse::<f64>().unwrap_or(f64::NAN);
            if let Ok(services) = f[0].parse() {
                rows.insert((services, f[1].to_string()), (n(2), n(3), n(4), n(5)));
            }
        }
        Self { rows }
    }
}

pub struct Results<'a> {
    pub machine: Machine,
    pub quick: bool,
    pub command: String,
    pub services: usize,
    pub external: usize,
    /// (offered load, seconds measured per system in all).
    pub loads: Vec<(u32, f64)>,
    pub trial_secs: f64,
    /// Throughput searches per (system, set).
    pub repeats: usize,
    /// Sender threads asked for (`None`: one per CPU).
    pub senders: Option<usize>,
    pub workload: &'a Workload,
    pub m: Measurements,
    pub kernel_cost_md: String,
    pub kernel_cost: KernelCost,
    pub programming: Option<String>,
    pub network_secs: f64,
    pub total_secs: f64,
}

impl Results<'_> {
    fn tput(&self, set: &str, system: &str) -> Option<f64> {
        self.m.throughput.get(&(set, system))?.median()
    }

    /// A generator's own ceiling: the median of its measurements (before every round of
    /// searches, and at the end).
    pub fn generator_ceiling(&self, g: Generator) -> f64 {
        let mut v: Vec<f64> = self
            .m
            .generator
            .iter()
            .filter(|(x, _)| *x == g)
            .map(|(_, v)| *v)
            .collect();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => f64::INFINITY,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    fn generator_bound(&self, set: &str, system: &str) -> bool {
        self.m
            .throughput
            .get(&(set, system))
            .is_some_and(|f| f.generator_bound(self.generator_ceiling(f.generator)))
    }

    fn tput_cell(&self, set: &str, system: &topo::System) -> String {
        if let Some(why) = system.skips(set) {
            return format!("— ({why})");
        }
        let Some(f) = self.m.throughput.get(&(set, system.id)) else {
            return "—".into();
        };
        let k = |v: f64| format!("{:.0}k", v / 1000.0);
        match (f.median(), f.spread()) {
            (Some(m), Some((lo, hi))) => {
                let (found, of) = f.found();
                format!(
                    "{}{}{}{} {}",
                    if self.generator_bound(set, system.id) {
                        "≥ "
                    } else {
                        ""
                    },
                    k(m),
                    if of > 1 {
                        format!(" ({}–{})", k(lo), k(hi))
                    } else {
                        String::new()
                    },
                    if found < of {
                        format!(" [{found} of {of} searches]")
                    } else {
                        String::new()
                    },
                    match f.generator {
                        Generator::LiveFrames => "ᴸ",
                        Generator::Kxdpgun => "ᴷ",
                    }
                )
            }
            _ => {
                let lowest = f.trials().map(|(_, t)| t.offered).min().unwrap_or(0);
                format!("< {}", k(lowest as f64))
            }
        }
    }

    fn p(&self, set: &str, system: &str, load: u32, q: f64) -> Option<f64> {
        self.m.latency.get(&(set, system, load))?.pct_us(q)
    }

    /// Correctness failures and broken loss bounds: speed is never asserted.
    pub fn failures(&self) -> anyhow::Result<()> {
        if !self.m.failures.is_empty() {
            bail!(
                "{} failure(s) (see the report):\n  {}",
                self.m.failures.len(),
                self.m.failures.join("\n  ")
            );
        }
        Ok(())
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn fmt_opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "—".into())
}

fn us(v: Option<f64>) -> String {
    fmt_opt(v, |x| {
        if x < 100.0 {
            format!("{x:.1}")
        } else {
            format!("{x:.0}")
        }
    })
}

pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let systems = topo::systems();
    let _ = writeln!(
        s,
        "### Run\n\n\
         - command: `{}` ({}), network part {:.0} s, whole run {:.0} s\n\
         - machine: {} × {}, {:.0} GiB, kernel {}; load average at start {} (other work on the machine shares the cores)\n\
         - tools: {}\n\
         - zone: {} ClusterIP Services with a named port in 50 namespaces; the same A, SRV and PTR records in the xdns zone file, unbound `local-data`, dnsmasq `host-record`/`srv-host`, a master file for knotd and PowerDNS Recursor (`cluster.local.zone`, `96.10.in-addr.arpa.zone`) and a response policy zone for kresd (`cluster.local.rpz`); {} external names on an upstream dnsmasq (TTL 3600), warmed into every cache before measuring\n\
         - client: a second network namespace over a veth pair per setup; every server, the client and the load generator share the same cores; threads: unbound 2, knotd 2 UDP workers (in XDP mode 1 XDP worker: knotd finds one queue on a veth), PowerDNS Recursor 2, kresd 1 process, dnsmasq 1, the xdns agent a UDP receive thread per CPU (2) and its runtime's 2 workers\n",
        r.command,
        if r.quick {
            "quick: one short trial per system; checks answers, measures nothing"
        } else {
            "full"
        },
        r.network_secs,
        r.total_secs,
        r.machine.cores,
        r.machine.cpu,
        r.machine.memory_gib,
        r.machine.kernel,
        r.machine.load_before,
        r.machine
            .tools
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join("; "),
        r.services,
        r.external,
    );

    let k = |v: f64| format!("{:.0}k", v / 1000.0);
    let measured = |g: Generator| {
        r.m.generator
            .iter()
            .filter(|(x, _)| *x == g)
            .map(|(_, v)| k(*v))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        s,
        "### Throughput\n\n\
         Highest rate answered with under {}% loss (answers of the expected kind per second, {} s trials). \
         Each figure is the median of {} search(es) (in brackets: the lowest and highest), taken in rotation with the other systems.\n\n\
         Two load generators, chosen by where the correctness check saw the answers come from:\n\n\
         - *live frames* where an XDP program answered (the reflectors; the xdns kernel path where it answered at least 99% of the set; knotd's AF_XDP path): the bench's own generator, {} sender thread(s), each pinned to its own CPU, injecting the queries with `BPF_PROG_TEST_RUN` live frames on the pod side of the veth; replies counted by rcode in XDP on the same interface. Alone (into a link whose host side drops everything in XDP) it sends {} queries/s (median; measured before every round of searches and at the end: {}).\n\
         - *kxdpgun* (one thread, AF_XDP in copy mode) where a socket answered: its queries reach the server's socket as small buffers, as a pod's would; live frames arrive page-sized and overflow a server's default socket buffer long before the server is busy. Alone it sends {} queries/s ({}).\n\n\
         \"≥\": the figure's sending rate was within {:.0}% of its generator's own, so the generator, not the system, bounded it. Every other figure is the system's: it lost more than {}% of what was offered, or (the XDP systems, whose work runs in the sender's own softirq) it slowed the sender well below the generator's own rate.\n",
        MAX_LOSS * 100.0,
        r.trial_secs,
        r.repeats,
        r.senders
            .map_or_else(|| r.machine.cores.to_string(), |n| n.to_string()),
        k(r.generator_ceiling(Generator::LiveFrames)),
        measured(Generator::LiveFrames),
        k(r.generator_ceiling(Generator::Kxdpgun)),
        measured(Generator::Kxdpgun),
        (1.0 - GENERATOR_BOUND) * 100.0,
        MAX_LOSS * 100.0,
    );
    let _ = writeln!(
        s,
        "| system | {} |",
        r.workload
            .sets
            .iter()
            .map(|q| q.title)
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(s, "|---|{}", "---:|".repeat(r.workload.sets.len()));
    for sys in &systems {
        let cells: Vec<String> = r
            .workload
            .sets
            .iter()
            .map(|q| r.tput_cell(q.id, sys))
            .collect();
        let _ = writeln!(s, "| {} | {} |", sys.title, cells.join(" | "));
    }
    let _ = writeln!(
        s,
        "\nGenerator: ᴸ live frames, ᴷ kxdpgun. Every trial, with what the generator sent, the replies by kind and where queries were lost (the host side's receive ring full: `ring_drops`; a server's socket buffer full: `socket_drops`), is in `throughput.tsv`."
    );
    let _ = writeln!(
        s,
        "\nFor context, the most valid answers per second any trial got, whatever its loss (the search does not look far above its first failing rate, so this is a lower bound of the peak):\n"
    );
    let _ = writeln!(
        s,
        "| system | {} |",
        r.workload
            .sets
            .iter()
            .map(|q| q.id)
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(s, "|---|{}", "---:|".repeat(r.workload.sets.len()));
    for sys in &systems {
        let cells: Vec<String> = r
            .workload
            .sets
            .iter()
            .map(|q| {
                let peak = r.m.throughput.get(&(q.id, sys.id)).and_then(|x| x.peak());
                fmt_opt(peak, |v| format!("{:.0}k", v / 1000.0))
            })
            .collect();
        let _ = writeln!(s, "| {} | {} |", sys.id, cells.join(" | "));
    }

    let _ = writeln!(s, "\n### Ratios (same run)\n");
    let pairs = [
        (
            "xdns-generic",
            "reflector-generic",
            "of the reflector (generic)",
            "≥ 90%",
        ),
        (
            "xdns-driver",
            "reflector-driver",
            "of the reflector (driver)",
            "≥ 90%",
        ),
        (
            "lookup-generic",
            "reflector-generic",
            "of the reflector (generic)",
            "",
        ),
        (
            "lookup-driver",
            "reflector-driver",
            "of the reflector (driver)",
            "",
        ),
        ("xdns-generic", "unbound", "× unbound", ""),
        ("xdns-driver", "unbound", "× unbound", ""),
        ("xdns-generic", "knot-xdp", "× knotd XDP", ""),
        ("xdns-driver", "knot-xdp", "× knotd XDP", ""),
        ("xdns-generic", "knot", "× knotd", ""),
        ("xdns-generic", "kresd", "× kresd", ""),
        ("xdns-generic", "pdns-recursor", "× PowerDNS Recursor", ""),
        ("xdns-generic", "dnsmasq", "× dnsmasq", ""),
        ("xdns-userspace", "unbound", "× unbound", "≥ 2×"),
        (
            "xdns-userspace",
            "reflector-sockets",
            "of the socket echo",
            "",
        ),
        ("unbound", "reflector-sockets", "of the socket echo", ""),
        ("reflector-sockets", "unbound", "× unbound", ""),
        ("knot-xdp", "unbound", "× unbound", ""),
    ];
    let _ = writeln!(
        s,
        "| throughput | {} | target |",
        r.workload
            .sets
            .iter()
            .map(|q| q.id)
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(s, "|---|{}---|", "---:|".repeat(r.workload.sets.len()));
    for (a, b, what, target) in pairs {
        let cells: Vec<String> = r
            .workload
            .sets
            .iter()
            .map(|q| {
                fmt_opt(ratio(r.tput(q.id, a), r.tput(q.id, b)), |x| {
                    if what.starts_with("of") {
                        format!("{:.0}%", x * 100.0)
                    } else {
                        format!("{x:.2}×")
                    }
                })
            })
            .collect();
        let _ = writeln!(s, "| {a} {what} | {} | {target} |", cells.join(" | "));
    }
    for load in r.loads.iter().map(|l| l.0) {
        let cells: Vec<String> = r
            .workload
            .sets
            .iter()
            .map(|q| {
                let a = r.p(q.id, "xdns-generic", load, 0.99);
                let b = r.p(q.id, "unbound", load, 0.99);
                fmt_opt(ratio(a, b), |x| format!("{x:.3}"))
            })
            .collect();
        let _ = writeln!(
            s,
            "| p99 latency xdns-generic / unbound at {load}/s | {} | {} |",
            cells.join(" | "),
            if load == 10_000 { "≤ 0.1" } else { "" }
        );
    }

    let _ = writeln!(
        s,
        "\n### Latency\n\nMicroseconds from the client's `send()` to the reply's arrival in its socket (kernel receive timestamp), at fixed offered loads from the project's open-loop generator; loss = queries without a valid reply within 1 s (every reply is checked: rcode and the exact A record). Measured in {} rotation(s) per load. Bound, asserted: at {}/s every system loses under {}%.\n",
        if r.quick { 1 } else { 2 },
        r.loads.iter().map(|l| l.0).min().unwrap_or(0),
        LOSS_BOUND * 100.0
    );
    for q in &r.workload.sets {
        let _ = writeln!(s, "**{}**\n", q.title);
        let _ = writeln!(
            s,
            "| system | load/s | sent/s | measured s | p50 | p90 | p99 | p99.9 | loss |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for sys in systems_for(q.id) {
            for &(load, secs) in &r.loads {
                let Some(run) = r.m.latency.get(&(q.id, sys.id, load)) else {
                    continue;
                };
                let _ = writeln!(
                    s,
                    "| {} | {load} | {:.0} | {secs:.1} | {} | {} | {} | {} | {:.2}% |",
                    sys.id,
                    run.achieved_qps(),
                    us(run.pct_us(0.5)),
                    us(run.pct_us(0.9)),
                    us(run.pct_us(0.99)),
                    us(run.pct_us(0.999)),
                    run.loss() * 100.0
                );
            }
        }
        let _ = writeln!(s);
    }

    let _ = writeln!(
        s,
        "### In-kernel cost per query\n\n{}",
        r.kernel_cost_md.trim()
    );

    let _ = writeln!(
        s,
        "\n### Memory\n\n| system | RSS MiB, zone loaded | RSS MiB, after the run | peak RSS MiB | BPF maps MiB |\n|---|---:|---:|---:|---:|"
    );
    let mib = |b: u64| format!("{:.1}", b as f64 / 1048576.0);
    for (id, mem) in &r.m.memory {
        let _ = writeln!(
            s,
            "| {id} | {} | {} | {} | {} |",
            mib(mem.rss_ready),
            mib(mem.rss_end),
            mib(mem.hwm),
            if mem.maps > 0 {
                mib(mem.maps)
            } else {
                "—".into()
            }
        );
    }
    let _ = writeln!(
        s,
        "\nThe reflectors have no process. \"Zone loaded\": after the correctness check, before any load. BPF map memory is the kernel's `memlock` accounting of the maps the agent holds."
    );

    let _ = writeln!(
        s,
        "\n### Who answered\n\nDuring the correctness check (one query each; for cached external names, the second of two passes: the first fills the caches): for the xdns kernel-path systems, answered by the XDP program, and the program's other counters that moved (`pass_*`: handed to userspace, which answered); for knotd in XDP mode, frames its XDP program redirected to its AF_XDP socket (the veth's `xdp_redirect` counters):\n\n| system | set | answered on the fast path | other counters |\n|---|---|---:|---|"
    );
    for ((sys, set), (k, n, others)) in &r.m.kernel_share {
        let _ = writeln!(s, "| {sys} | {set} | {k} of {n} | {others} |");
    }
    let _ = writeln!(
        s,
        "\nExternal names reach the agent once (the first pass: the kernel does not hold them yet), which forwards and caches them; from then on the XDP program answers them from its copy of that cache (`answered_cached`), warmed before measuring like unbound's and dnsmasq's caches."
    );

    let _ = writeln!(
        s,
        "\n### Targets (reported, not asserted)\n\nEach target beside the ceiling that bounds it on this machine: the bare reflectors, the reflector after one name lookup (`lookup-*`), the UDP echo on sockets (`reflector-sockets`).\n\n| target | measured | met |\n|---|---|---|"
    );
    // `ok`: None for a row that gives context (a ceiling, a floor), not a target.
    let mut target = |name: &str,
                      v: Option<f64>,
                      fmt: &dyn Fn(f64) -> String,
                      ok: Option<&dyn Fn(f64) -> bool>| {
        let met = match (v, ok) {
            (Some(v), Some(ok)) if ok(v) => "yes",
            (Some(_), Some(_)) => "no",
            _ => "—",
        };
        let _ = writeln!(s, "| {name} | {} | {met} |", fmt_opt(v, fmt));
    };
    let pct = |x: f64| format!("{:.0}%", x * 100.0);
    let times = |x: f64| format!("{x:.2}×");
    for mode in ["generic", "driver"] {
        let (xdns, reflector, lookup) = (
            format!("xdns-{mode}"),
            format!("reflector-{mode}"),
            format!("lookup-{mode}"),
        );
        target(
            &format!("{xdns} ≥ 90% of {reflector} throughput (cluster names)"),
            ratio(r.tput("cluster", &xdns), r.tput("cluster", &reflector)),
            &pct,
            Some(&|x| x >= 0.9),
        );
        target(
            &format!("(ceiling) {lookup}: the reflector after one name lookup, of {reflector}"),
            ratio(r.tput("cluster", &lookup), r.tput("cluster", &reflector)),
            &pct,
            None,
        );
    }
    // The best peer on cluster names, whichever it is in this run.
    let peers = [
        "knot-xdp",
        "unbound",
        "knot",
        "kresd",
        "pdns-recursor",
        "dnsmasq",
    ];
    let best = peers
        .iter()
        .filter_map(|p| r.tput("cluster", p).map(|v| (v, *p)))
        .fold(None, |b: Option<(f64, &str)>, x| match b {
            Some(b) if b.0 >= x.0 => Some(b),
            _ => Some(x),
        });
    for a in ["xdns-generic", "xdns-driver"] {
        target(
            &format!(
                "{a} ≥ 2× the best peer's throughput on cluster names ({})",
                best.map_or("—", |b| b.1)
            ),
            ratio(r.tput("cluster", a), best.map(|b| b.0)),
            &times,
            Some(&|x| x >= 2.0),
        );
        target(
            &format!("{a} ≥ 3× unbound throughput (cached external names)"),
            ratio(r.tput("external", a), r.tput("external", "unbound")),
            &times,
            Some(&|x| x >= 3.0),
        );
        target(
            &format!("{a} p99 at 10k/s ≤ 1/10 of unbound's (cluster names)"),
            ratio(
                r.p("cluster", a, 10_000, 0.99),
                r.p("cluster", "unbound", 10_000, 0.99),
            ),
            &|x| format!("{x:.2}"),
            Some(&|x| x <= 0.1),
        );
    }
    target(
        "(floor) reflector-generic p99 at 10k/s over unbound's: the path with no DNS work",
        ratio(
            r.p("cluster", "reflector-generic", 10_000, 0.99),
            r.p("cluster", "unbound", 10_000, 0.99),
        ),
        &|x| format!("{x:.2}"),
        None,
    );
    for (set, what) in [
        ("cluster", "cluster names"),
        ("external", "cached external names"),
    ] {
        target(
            &format!("xdns-userspace ≥ 2× unbound throughput ({what})"),
            ratio(r.tput(set, "xdns-userspace"), r.tput(set, "unbound")),
            &times,
            Some(&|x| x >= 2.0),
        );
    }
    target(
        "(ceiling) reflector-sockets: a socket server with no DNS work, × unbound (cluster names)",
        ratio(
            r.tput("cluster", "reflector-sockets"),
            r.tput("cluster", "unbound"),
        ),
        &times,
        None,
    );
    let net = |services: u64| {
        let row = |case: &str| r.kernel_cost.rows.get(&(services, case.to_string()));
        Some(row("hit")?.0 - row("baseline")?.0)
    };
    target(
        "in-kernel hit − baseline at 100,000 Services ≤ 1.3× that at 1,000 (mean, repeat=1 runs)",
        ratio(net(100_000), net(1_000)),
        &|x| {
            format!(
                "{x:.2}× ({:.0} / {:.0} ns)",
                net(100_000).unwrap_or(f64::NAN),
                net(1_000).unwrap_or(f64::NAN)
            )
        },
        Some(&|x| x <= 1.3),
    );

    if let Some(p) = &r.programming {
        let _ = writeln!(
            s,
            "\n### Kubernetes API programming latency\n\n{}",
            p.trim()
        );
    }
    s
}

const COLORS: [&str; 14] = [
    "#7f7f7f", "#c7c7c7", "#1f77b4", "#bcbd22", "#17becf", "#8c564b", "#9467bd", "#d62728",
    "#e377c2", "#2ca02c", "#393b79", "#ff7f0e", "#aec7e8", "#98df8a",
];

/// One SVG: throughput per system and set (top: median bars, whiskers from the lowest to the
/// highest search), latency percentiles per system at each load for cluster names (bottom,
/// log scale).
pub fn svg(r: &Results) -> String {
    let systems = topo::systems();
    let (w, h) = (1200.0, 820.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>"
    );
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">xdns benchmark: {} × {}, kernel {} ({})</text>",
        w / 2.0,
        r.machine.cores,
        esc(&r.machine.cpu),
        esc(&r.machine.kernel),
        if r.quick { "quick run" } else { "full run" }
    );

    // Throughput bars.
    let (x0, y0, pw, ph) = (70.0, 50.0, 1100.0, 260.0);
    let max =
        r.m.throughput
            .values()
            .filter_map(|f| f.spread().map(|(_, hi)| hi))
            .fold(1.0f64, f64::max)
            * 1.1;
    let _ = writeln!(
        s,
        "<text x=\"{x0}\" y=\"{}\" font-size=\"13\">Throughput, &lt; 0.1% loss (thousand answers/s; bar: median of {} searches, whisker: lowest to highest; ≥: the generator's limit)</text>",
        y0 - 6.0,
        r.repeats
    );
    axis_y_linear(&mut s, x0, y0, pw, ph, max / 1000.0);
    let group = pw / systems.len() as f64;
    let set_colors = ["#1f77b4", "#2ca02c", "#ff7f0e"];
    for (i, sys) in systems.iter().enumerate() {
        let gx = x0 + i as f64 * group;
        for (j, q) in r.workload.sets.iter().enumerate() {
            let bw = group * 0.8 / r.workload.sets.len() as f64;
            let bx = gx + group * 0.1 + j as f64 * bw;
            let Some(f) = r.m.throughput.get(&(q.id, sys.id)) else {
                continue;
            };
            let (Some(v), Some((lo, hi))) = (f.median(), f.spread()) else {
                continue;
            };
            let y = |v: f64| y0 + ph - v / max * ph;
            let _ = writeln!(
                s,
                "<rect x=\"{bx:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{} {}: median {:.0}/s, {:.0}–{:.0}</title></rect>",
                y(v),
                bw - 2.0,
                v / max * ph,
                set_colors[j % 3],
                sys.id,
                q.id,
                v,
                lo,
                hi
            );
            let cx = bx + bw / 2.0 - 1.0;
            if hi > lo {
                let _ = writeln!(
                    s,
                    "<path d=\"M{:.1},{:.1}H{:.1}M{cx:.1},{:.1}V{:.1}M{:.1},{:.1}H{:.1}\" stroke=\"black\" stroke-width=\"1\"/>",
                    cx - 3.0,
                    y(hi),
                    cx + 3.0,
                    y(hi),
                    y(lo),
                    cx - 3.0,
                    y(lo),
                    cx + 3.0
                );
            }
            let _ = writeln!(
                s,
                "<text x=\"{cx:.1}\" y=\"{:.1}\" font-size=\"8\" text-anchor=\"middle\">{}{:.0}</text>",
                y(hi) - 3.0,
                if r.generator_bound(q.id, sys.id) {
                    "≥"
                } else {
                    ""
                },
                v / 1000.0
            );
        }
        let (lx, ly) = (gx + group / 2.0, y0 + ph + 14.0);
        let _ = writeln!(
            s,
            "<text x=\"{lx:.1}\" y=\"{ly:.1}\" text-anchor=\"end\" font-size=\"11\" transform=\"rotate(-25 {lx:.1} {ly:.1})\">{}</text>",
            sys.id
        );
    }
    for (j, q) in r.workload.sets.iter().enumerate() {
        let lx = x0 + 700.0 + j as f64 * 125.0;
        let ly = y0 + 14.0;
        let _ = writeln!(
            s,
            "<rect x=\"{lx}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{}</text>",
            ly - 9.0,
            set_colors[j % 3],
            lx + 14.0,
            ly,
            match q.id {
                "cluster" => "cluster names",
                "nxdomain" => "search-path junk",
                _ => "cached external names",
            }
        );
    }

    // Latency percentiles, cluster names, one panel per load.
    let (ly0, lph) = (420.0, 300.0);
    let _ = writeln!(
        s,
        "<text x=\"{x0}\" y=\"{}\" font-size=\"13\">Latency percentiles, cluster names (µs, log scale; client send() → reply in its socket)</text>",
        ly0 - 12.0
    );
    let loads: Vec<u32> = r.loads.iter().map(|l| l.0).collect();
    let all: Vec<f64> = systems
        .iter()
        .flat_map(|sys| {
            loads
                .iter()
                .flat_map(move |&l| [0.5, 0.9, 0.99, 0.999].map(|q| (sys.id, l, q)))
        })
        .filter_map(|(id, l, q)| r.p("cluster", id, l, q))
        .collect();
    let lo = all.iter().cloned().fold(f64::INFINITY, f64::min).max(0.1);
    let hi = all.iter().cloned().fold(1.0f64, f64::max);
    let (dlo, dhi) = (
        lo.log10().floor(),
        hi.log10().ceil().max(lo.log10().floor() + 1.0),
    );
    let panel_w = (pw - 20.0 * (loads.len().max(1) - 1) as f64) / loads.len().max(1) as f64;
    let pcts = [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p99.9")];
    for (k, &load) in loads.iter().enumerate() {
        let px = x0 + k as f64 * (panel_w + 20.0);
        let _ = writeln!(
            s,
            "<rect x=\"{px}\" y=\"{ly0}\" width=\"{panel_w:.1}\" height=\"{lph}\" fill=\"none\" stroke=\"#999\"/>\
             <text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{load} queries/s offered</text>",
            px + panel_w / 2.0,
            ly0 + 14.0
        );
        let mut d = dlo;
        while d <= dhi {
            let y = ly0 + lph - (d - dlo) / (dhi - dlo) * lph;
            let _ = writeln!(
                s,
                "<line x1=\"{px}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#eee\"/>",
                px + panel_w
            );
            if k == 0 {
                let _ = writeln!(
                    s,
                    "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                    px - 4.0,
                    y + 4.0,
                    10f64.powf(d)
                );
            }
            d += 1.0;
        }
        for (i, (_, label)) in pcts.iter().enumerate() {
            let x = px + (i as f64 + 0.5) / pcts.len() as f64 * panel_w;
            let _ = writeln!(
                s,
                "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{label}</text>",
                ly0 + lph + 14.0
            );
        }
        for (c, sys) in systems.iter().enumerate() {
            let pts: Vec<(f64, f64)> = pcts
                .iter()
                .enumerate()
                .filter_map(|(i, (q, _))| {
                    let v = r.p("cluster", sys.id, load, *q)?;
                    let x = px + (i as f64 + 0.5) / pcts.len() as f64 * panel_w;
                    let y = ly0 + lph - (v.max(0.1).log10() - dlo) / (dhi - dlo) * lph;
                    Some((x, y))
                })
                .collect();
            if pts.is_empty() {
                continue;
            }
            let path: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            let _ = writeln!(
                s,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\"><title>{}</title></polyline>",
                path.join(" "),
                COLORS[c % COLORS.len()],
                sys.id
            );
            for (x, y) in pts {
                let _ = writeln!(
                    s,
                    "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"{}\"/>",
                    COLORS[c % COLORS.len()]
                );
            }
        }
    }
    for (c, sys) in systems.iter().enumerate() {
        let lx = x0 + (c % 4) as f64 * 275.0;
        let ly = ly0 + lph + 34.0 + (c / 4) as f64 * 16.0;
        let _ = writeln!(
            s,
            "<rect x=\"{lx}\" y=\"{}\" width=\"14\" height=\"4\" fill=\"{}\"/><text x=\"{}\" y=\"{ly}\">{}</text>",
            ly - 5.0,
            COLORS[c % COLORS.len()],
            lx + 18.0,
            esc(sys.title)
        );
    }
    let _ = writeln!(s, "</svg>");
    s
}

fn axis_y_linear(s: &mut String, x0: f64, y0: f64, pw: f64, ph: f64, max: f64) {
    let step = nice_step(max / 5.0);
    let mut v = 0.0;
    while v <= max {
        let y = y0 + ph - v / max * ph;
        let _ = writeln!(
            s,
            "<line x1=\"{x0}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#eee\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v}</text>",
            x0 + pw,
            x0 - 4.0,
            y + 4.0
        );
        v += step;
    }
    let _ = writeln!(
        s,
        "<line x1=\"{x0}\" x2=\"{x0}\" y1=\"{y0}\" y2=\"{}\" stroke=\"#999\"/><line x1=\"{x0}\" x2=\"{}\" y1=\"{}\" y2=\"{}\" stroke=\"#999\"/>",
        y0 + ph,
        x0 + pw,
        y0 + ph,
        y0 + ph
    );
}

fn nice_step(raw: f64) -> f64 {
    let mag = 10f64.powf(raw.max(1e-9).log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * mag >= raw {
            return m * mag;
        }
    }
    10.0 * mag
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Raw figures, one TSV per kind.
pub fn write_raw(r: &Results, dir: &Path) -> anyhow::Result<()> {
    let mut t = String::from(
        "set\tsystem\tsearch\toffered\tsent\treplies\tvalid\tservfail\twrong\tsecs\tloss\tring_drops\tsocket_drops\n",
    );
    for ((set, sys), figure) in &r.m.throughput {
        for (search, x) in figure.trials() {
            let _ = writeln!(
                t,
                "{set}\t{sys}\t{search}\t{}\t{}\t{}\t{}\t{}\t{}\t{:.3}\t{:.5}\t{}\t{}",
                x.offered,
                x.sent,
                x.replies,
                x.valid,
                x.servfail,
                x.wrong,
                x.secs,
                x.loss(),
                x.ring_drops,
                x.socket_drops
            );
        }
    }
    let _ = writeln!(
        t,
        "# generators alone (queries/s): {}",
        r.m.generator
            .iter()
            .map(|(g, v)| format!("{} {v:.0}", g.name()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    std::fs::write(dir.join("throughput.tsv"), t)?;
    let mut l = String::from(
        "set\tsystem\tload\tsent\tvalid\tservfail\twrong\tp50_us\tp90_us\tp99_us\tp999_us\n",
    );
    for ((set, sys, load), run) in &r.m.latency {
        let _ = writeln!(
            l,
            "{set}\t{sys}\t{load}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            run.sent,
            run.valid,
            run.servfail,
            run.wrong,
            us(run.pct_us(0.5)),
            us(run.pct_us(0.9)),
            us(run.pct_us(0.99)),
            us(run.pct_us(0.999))
        );
    }
    std::fs::write(dir.join("latency.tsv"), l)?;
    Ok(())
}

const BEGIN: &str = "<!-- bench:begin (generated by `cargo xtask bench --publish`) -->";
const END: &str = "<!-- bench:end -->";

/// Replaces the generated section of docs/benchmarks.md and writes docs/benchmarks.svg.
pub fn publish(root: &Path, md: &str, svg: &str) -> anyhow::Result<()> {
    let docs = root.join("docs");
    std::fs::create_dir_all(&docs)?;
    std::fs::write(docs.join("benchmarks.svg"), svg)?;
    let path = docs.join("benchmarks.md");
    let old = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| format!("# Benchmarks\n\n{BEGIN}\n{END}\n"));
    let (Some(b), Some(e)) = (old.find(BEGIN), old.find(END)) else {
        bail!("{}: no generated section ({BEGIN} … {END})", path.display());
    };
    let new = format!(
        "{}{BEGIN}\n\n![benchmark plot](benchmarks.svg)\n\n{md}\n{}",
        &old[..b],
        &old[e..]
    );
    std::fs::write(&path, new).with_context(|| path.display().to_string())?;
    Ok(())
}
