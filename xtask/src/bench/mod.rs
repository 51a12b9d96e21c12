//! `cargo xtask bench [--quick] [--publish]`: what xdns buys, side by side with what operators
//! run today, measured in one run on one machine.
//!
//! Systems (see `topo`): the xdns kernel path in generic and driver mode, xdns userspace only,
//! unbound, knotd (XDP and sockets), kresd, PowerDNS Recursor and dnsmasq holding the same
//! records, and the ceilings: bare XDP reflectors, the reflector after one name lookup, and a
//! UDP echo on sockets (`echo`). Query sets (see `workload`): cluster names, search-path junk that
//! must be NXDOMAIN, cached external names. Figures: the highest throughput under 0.1% loss
//! (kxdpgun), latency percentiles at fixed offered loads (own load generator), the in-kernel
//! cost per query (`cargo bench -p dns-agent --bench kernel_cost`) and memory; and external
//! names as a pod resolves them (glibc `getaddrinfo` through the search list, with and without
//! `--autopath`: time and packets per resolution, see `resolve`).
//!
//! Systems are measured in rotation (every trial of a step for every system, then the next
//! step), so noise from other work on the machine spreads over all of them. Nothing here
//! asserts on speed: a run fails only when a system answers wrongly or cannot be measured.
//! Results go to `results/<timestamp>/`; `--publish` also writes docs/benchmarks.md's
//! generated section and docs/benchmarks.svg.

mod check;
pub mod echo;
mod kxdpgun;
mod loadgen;
mod peers;
mod report;
pub mod resolve;
mod throughput;
pub mod tls;
mod topo;
pub mod userspace;
mod workload;
mod xdpgen;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use self::{
    loadgen::LatencyRun,
    throughput::{Figure, Generator, Search, Valid},
    topo::{Process, System, Topology},
    workload::Workload,
};
use crate::{
    netns,
    util::{cmd, require_root, root, run},
};

#[derive(Clone, Debug)]
pub struct Options {
    pub quick: bool,
    pub publish: bool,
    /// Sender threads of the throughput generator (default: one per CPU).
    pub senders: Option<usize>,
    /// Only these systems (development); all when empty.
    pub systems: Vec<String>,
}

/// Loss bound asserted on every system and set (quick and full runs): at the lowest latency
/// load (1,000 queries/s) and, in `--quick`, in its throughput trial at `QUICK_RATE` (cluster
/// names), fewer than this share of the queries may go without a valid reply. A working
/// server answers that much; a system that SERVFAILs or drops under load does not. At these
/// rates a server's socket buffer holds a few hundred milliseconds of queries, so a loss here
/// means it stalled that long or is broken: one that breaks the bound is measured once more,
/// and fails the run if it breaks it again.
pub const LOSS_BOUND: f64 = 0.01;
/// The quick run's one throughput trial per system and set.
const QUICK_RATE: u64 = 2_000;

/// How much of everything a run does.
struct Plan {
    quick: bool,
    services: usize,
    external: usize,
    trial_secs: f64,
    /// Trials of a first search, and of each repeat.
    max_trials: usize,
    repeat_trials: usize,
    /// Searches per (system, set).
    repeats: usize,
    start_rate: u64,
    /// (offered load, seconds per round).
    loads: Vec<(u32, f64)>,
    rounds: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                quick,
                services: 5000,
                external: 200,
                trial_secs: 0.5,
                max_trials: 1,
                repeat_trials: 1,
                repeats: 1,
                start_rate: QUICK_RATE,
                loads: vec![(1000, 1.0)],
                rounds: 1,
            }
        } else {
            Self {
                quick,
                services: 5000,
                external: 200,
                trial_secs: 1.0,
                max_trials: 6,
                repeat_trials: 4,
                repeats: 3,
                start_rate: 200_000,
                loads: vec![(1000, 2.5), (10_000, 1.25), (50_000, 0.75)],
                rounds: 2,
            }
        }
    }
}

/// Memory of one server process, bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    pub rss_ready: u64,
    pub rss_end: u64,
    /// Peak RSS (VmHWM).
    pub hwm: u64,
    /// BPF maps the process holds (kernel `memlock` accounting).
    pub maps: u64,
}

pub struct Measurements {
    pub throughput: BTreeMap<(&'static str, &'static str), Figure>,
    /// What each generator sends on its own (queries/s), at the start and the end of the
    /// throughput part.
    pub generator: Vec<(Generator, f64)>,
    /// Broken bounds: the run fails with these after writing its report.
    pub failures: Vec<String>,
    pub latency: BTreeMap<(&'static str, &'static str, u32), LatencyRun>,
    /// (system, set) → (answered in the kernel, queries checked, the other counters that
    /// moved).
    pub kernel_share: BTreeMap<(&'static str, &'static str), (u64, u64, String)>,
    pub memory: BTreeMap<&'static str, Memory>,
    /// The report's section on external names as a pod resolves them (`resolve.rs`).
    pub resolutions: String,
}

/// Systems measured on a query set: the reflectors only on cluster names (they answer every
/// query alike), the authoritative-only ones not on external names.
fn systems_for(set: &str) -> Vec<System> {
    topo::systems()
        .into_iter()
        .filter(|s| s.skips(set).is_none())
        .collect()
}

pub fn bench(opts: Options) -> anyhow::Result<()> {
    let started = Instant::now();
    let partial = !opts.systems.is_empty();
    if partial {
        if opts.publish {
            bail!("--publish publishes a run of every system: drop --systems");
        }
        topo::select(&opts.systems)?;
    }
    crate::setup::setup(crate::setup::Scope::All)?;
    require_root("the benchmark")?;
    let root = root();
    run(cmd("cargo")
        .current_dir(&root)
        .args(["build", "--release", "-p", "dns-agent"]))?;
    let objects = crate::build_ebpf::build_ebpf()?;
    let agent_bin = root.join("target/release/dns-agent");
    let reflector = objects.join("reflector");

    let stamp = String::from_utf8(
        Command::new("date")
            .args(["-u", "+%Y%m%d-%H%M%S"])
            .output()?
            .stdout,
    )?;
    let dir = root.join("results").join(stamp.trim());
    std::fs::create_dir_all(&dir)?;
    let machine = report::Machine::probe();
    let plan = Plan::new(opts.quick);
    let workload = Workload::new(plan.services, plan.external);

    netns::cleanup_on_ctrl_c();
    let measured = measure(&plan, &workload, &dir, &agent_bin, &reflector, opts.senders);
    netns::cleanup();
    let measured = measured?;
    let network_secs = started.elapsed().as_secs_f64();
    // DNS over TLS beside plain DNS (its own namespaces).
    let tls = tls::measure(&root, &agent_bin, &dir, opts.quick);
    netns::cleanup();
    let tls = tls?;

    // In-kernel cost, after the namespaces are gone (less noise); not in a partial run.
    let (kernel_cost_md, kernel_cost) = if partial {
        (
            "(not measured: a run of some systems only, `--systems`)".to_string(),
            report::KernelCost::parse(""),
        )
    } else {
        kernel_cost_bench(&root, &dir, opts.quick)?
    };

    // Hook: the Kubernetes API programming-latency bench, when the tree has it.
    let programming = if partial {
        None
    } else {
        programming_bench(&root, opts.quick)?
    };

    let results = report::Results {
        machine,
        quick: opts.quick,
        command: format!(
            "cargo xtask bench{}",
            if opts.quick { " --quick" } else { "" }
        ),
        services: plan.services,
        external: plan.external,
        loads: plan
            .loads
            .iter()
            .map(|(l, s)| (*l, *s * plan.rounds as f64))
            .collect(),
        trial_secs: plan.trial_secs,
        repeats: plan.repeats,
        senders: opts.senders,
        workload: &workload,
        m: measured,
        kernel_cost_md,
        kernel_cost,
        programming,
        network_secs,
        total_secs: started.elapsed().as_secs_f64(),
    };
    let md = report::markdown(&results) + &results.m.resolutions + &tls;
    let svg = report::svg(&results);
    std::fs::write(dir.join("report.md"), &md)?;
    std::fs::write(dir.join("bench.svg"), &svg)?;
    report::write_raw(&results, &dir)?;
    println!("\n{md}");
    println!("results: {}", dir.display());
    if opts.publish {
        report::publish(&root, &md, &svg)?;
        println!("published to docs/benchmarks.md and docs/benchmarks.svg");
    }
    results.failures()
}

/// Runs `cargo bench -p dns-agent --bench kernel_cost`: its Markdown table and its figures.
fn kernel_cost_bench(
    root: &Path,
    dir: &Path,
    quick: bool,
) -> anyhow::Result<(String, report::KernelCost)> {
    let tsv = dir.join("kernel_cost.tsv");
    let mut c = cmd("cargo");
    c.current_dir(root)
        .args(["bench", "-p", "dns-agent", "--bench", "kernel_cost", "--"]);
    if quick {
        c.arg("--quick");
    }
    c.arg("--tsv").arg(&tsv);
    eprintln!("+ {c:?}");
    let out = c.output().context("running the kernel_cost bench")?;
    if !out.status.success() {
        bail!(
            "kernel_cost failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((
        String::from_utf8_lossy(&out.stdout).to_string(),
        report::KernelCost::parse(&std::fs::read_to_string(&tsv)?),
    ))
}

/// Runs `cargo bench -p dns-agent --bench programming` when that bench exists (it is being
/// written on another branch); its output goes into the report as it is.
fn programming_bench(root: &Path, quick: bool) -> anyhow::Result<Option<String>> {
    if !root.join("dns-agent/benches/programming.rs").exists() {
        return Ok(None);
    }
    let mut c = cmd("cargo");
    c.current_dir(root)
        .args(["bench", "-p", "dns-agent", "--bench", "programming"]);
    if quick {
        c.args(["--", "--quick"]);
    }
    eprintln!("+ {c:?}");
    let out = c.output().context("running the programming bench")?;
    if !out.status.success() {
        bail!(
            "the programming bench failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(Some(String::from_utf8_lossy(&out.stdout).to_string()))
}

fn measure(
    plan: &Plan,
    workload: &Workload,
    dir: &Path,
    agent_bin: &Path,
    reflector: &Path,
    senders: Option<usize>,
) -> anyhow::Result<Measurements> {
    let begun = Instant::now();
    let phase = |what: &str| eprintln!("[{:>4.0} s] {what}", begun.elapsed().as_secs_f64());
    let zone_file = dir.join("zone.yaml");
    std::fs::write(&zone_file, workload.zone_yaml())?;
    let mut topo = Topology::new(reflector, senders)?;
    // Every name asked (and the readiness probe's): the lookup reflector finds them all.
    let probe = workload::service_name(0);
    topo.reflect_names(
        workload
            .sets
            .iter()
            .flat_map(|set| set.queries.iter().map(|q| q.name.as_str()))
            .chain([probe.as_str()]),
    )?;
    let by_id = |id: &str| {
        topo::all_systems()
            .into_iter()
            .find(|s| s.id == id)
            .expect("known system")
    };
    std::fs::write(
        dir.join("unbound.conf"),
        workload.unbound_conf(by_id("unbound").listen, dir),
    )?;
    std::fs::write(
        dir.join("dnsmasq.conf"),
        workload.dnsmasq_conf(by_id("dnsmasq").listen),
    )?;
    std::fs::write(dir.join("upstream.conf"), workload.upstream_conf())?;
    peers::write_configs(workload, dir, &topo::systems(), &topo.links)?;
    for set in &workload.sets {
        set.write_queries(&dir.join(format!("queries-{}.txt", set.id)))?;
    }

    let _upstream = topo::start_upstream(&topo, dir)?;
    let mut processes: BTreeMap<&'static str, Process> = BTreeMap::new();
    for (k, s) in topo::systems().iter().enumerate() {
        eprintln!("starting {}", s.id);
        if let Some(p) = topo::start(&topo, s, agent_bin, &zone_file, dir, 9253 + k as u16)? {
            processes.insert(s.id, p);
        }
    }

    let mut m = Measurements {
        throughput: BTreeMap::new(),
        generator: Vec::new(),
        failures: Vec::new(),
        latency: BTreeMap::new(),
        kernel_share: BTreeMap::new(),
        memory: BTreeMap::new(),
        resolutions: String::new(),
    };

    phase("every system answers");
    // Correctness, and the caches warmed with the external names.
    check_all(&topo, &processes, workload, &mut m, true)?;
    phase("checked");
    for (id, p) in &processes {
        m.memory.entry(id).or_default().rss_ready = p.rss();
    }

    // Throughput, per set, the systems' searches interleaved, each search repeated.
    topo.detach_pass()?;
    let result = throughput_all(plan, workload, dir, &mut topo, &mut m);
    topo.attach_pass()?;
    result?;
    phase("throughput measured");

    // Latency at fixed loads, in rounds.
    let lowest_load = plan.loads.iter().map(|l| l.0).min().unwrap_or(0);
    for set in &workload.sets {
        let systems = systems_for(set.id);
        for &(load, secs) in &plan.loads {
            for round in 0..plan.rounds {
                for k in 0..systems.len() {
                    let s = &systems[(k + round) % systems.len()];
                    let server = SocketAddr::new(IpAddr::V4(s.listen), 53);
                    let r = loadgen::run(
                        &topo.pod,
                        server,
                        set,
                        load,
                        Duration::from_secs_f64(secs),
                        s.is_reflector(),
                    )?;
                    eprintln!(
                        "latency    {:<9} {:<18} {:>6}/s  sent {:>7} valid {:>7} servfail {} wrong {}",
                        set.id, s.id, load, r.sent, r.valid, r.servfail, r.wrong
                    );
                    if r.wrong > 0 {
                        m.failures.push(format!(
                            "{}: {} wrong replies to {} queries at {load}/s",
                            s.id, r.wrong, set.id
                        ));
                    }
                    m.latency.entry((set.id, s.id, load)).or_default().merge(r);
                }
            }
        }
        for s in &systems {
            let Some(r) = m.latency.get(&(set.id, s.id, lowest_load)) else {
                continue;
            };
            if r.loss() <= LOSS_BOUND {
                continue;
            }
            // A server that stalls for a few hundred milliseconds on a shared machine loses
            // a burst: measured once more, alone, before it counts as broken.
            let again = loadgen::run(
                &topo.pod,
                SocketAddr::new(IpAddr::V4(s.listen), 53),
                set,
                lowest_load,
                Duration::from_secs(1),
                s.is_reflector(),
            )?;
            eprintln!(
                "latency    {:<9} {:<18} {lowest_load:>6}/s  lost {:.2}%, measured again: lost {:.2}%",
                set.id,
                s.id,
                r.loss() * 100.0,
                again.loss() * 100.0
            );
            if again.loss() > LOSS_BOUND || again.wrong > 0 {
                m.failures.push(format!(
                    "{}: {:.2}% of the {} queries at {lowest_load}/s went without a valid reply \
                     ({} SERVFAIL), and {:.2}% measured again; the bound is {}%",
                    s.id,
                    r.loss() * 100.0,
                    set.id,
                    r.servfail,
                    again.loss() * 100.0,
                    LOSS_BOUND * 100.0
                ));
            }
        }
    }

    phase("latency measured");
    // Still correct after the load.
    check_all(&topo, &processes, workload, &mut m, false)?;
    phase("checked again");
    m.resolutions = resolve::measure(&topo, agent_bin, workload, dir, plan.quick)?;
    phase("resolutions measured");
    for (id, p) in &processes {
        let mem = m.memory.entry(id).or_default();
        mem.rss_end = p.rss();
        mem.hwm = p.hwm();
        mem.maps = p.map_memory();
    }
    Ok(m)
}

/// Every system answers every query of every set it is measured on, and the records check;
/// `before`: also which path answered (the kernel's counters, AF_XDP redirects).
fn check_all(
    topo: &Topology,
    processes: &BTreeMap<&'static str, Process>,
    workload: &Workload,
    m: &mut Measurements,
    before: bool,
) -> anyhow::Result<()> {
    for set in &workload.sets {
        for s in systems_for(set.id) {
            let fast_path = check::FastPath::of(topo, &s, processes.get(s.id))?;
            let what = if before {
                "before the load"
            } else {
                "after the load"
            };
            let mut start = fast_path.read()?;
            let mut n = check::check_set(topo, &s, set).context(what)?;
            if before && set.id == "external" {
                // The first pass filled the caches (the kernel's copy within milliseconds):
                // who answers is what the second one shows.
                std::thread::sleep(Duration::from_millis(200));
                start = fast_path.read()?;
                n = check::check_set(topo, &s, set).context(what)?;
            }
            if let (Some(start), true) = (start, before) {
                let (answered, others) = fast_path.since(&start)?;
                m.kernel_share
                    .insert((s.id, set.id), (answered, n, others.clone()));
                // Correct answers from userspace are still correct; a fast path that answers
                // nothing of what it should is a broken setup.
                if set.id != "external" && answered == 0 {
                    bail!(
                        "{}: the fast path answered none of the {n} {} queries ({others})",
                        s.id,
                        set.id
                    );
                }
            }
        }
        eprintln!(
            "checked: every system answers every {} query correctly",
            set.id
        );
    }
    for s in topo::systems().iter().filter(|s| !s.is_reflector()) {
        check::check_records(topo, s, workload)?;
    }
    eprintln!("checked: SRV, PTR and AAAA (NODATA) answers of every system");
    Ok(())
}

/// The throughput searches of every set.
fn throughput_all(
    plan: &Plan,
    workload: &Workload,
    dir: &Path,
    topo: &mut Topology,
    m: &mut Measurements,
) -> anyhow::Result<()> {
    let cluster_names: Vec<&str> = workload.sets[0]
        .queries
        .iter()
        .map(|q| q.name.as_str())
        .collect();
    let cluster_file = dir.join("queries-cluster.txt");
    // The generators' own ceilings move with the machine's load: measured before every round
    // of searches and at the end.
    let ceilings = |topo: &mut Topology, m: &mut Measurements| -> anyhow::Result<()> {
        for g in [Generator::LiveFrames, Generator::Kxdpgun] {
            let ceiling = throughput::generator_ceiling(
                topo,
                g,
                &cluster_names,
                &cluster_file,
                plan.trial_secs,
            )?;
            eprintln!("{} alone: {ceiling:.0} queries/s", g.name());
            m.generator.push((g, ceiling));
        }
        Ok(())
    };
    // The quick run drives both generators on cluster names only; every set is under load
    // in its latency run.
    let sets = if plan.quick {
        &workload.sets[..1]
    } else {
        &workload.sets[..]
    };
    for set in sets {
        let systems = systems_for(set.id);
        let valid = |s: &System| Valid::of(s, set);
        // Live frames where an XDP program answered (nearly) everything in the check.
        let generator = |s: &System| {
            let fast = m.kernel_share.get(&(s.id, set.id));
            if s.is_xdp_reflector()
                || fast.is_some_and(|(answered, n, _)| *answered as f64 >= 0.99 * *n as f64)
            {
                Generator::LiveFrames
            } else {
                Generator::Kxdpgun
            }
        };
        let query_file = dir.join(format!("queries-{}.txt", set.id));
        let names: Vec<&str> = set.queries.iter().map(|q| q.name.as_str()).collect();
        let frames: Vec<Vec<[u8; xdpgen::SLOT]>> = systems
            .iter()
            .map(|s| xdpgen::query_frames(&topo.links[s.link], s.listen, &names))
            .collect::<anyhow::Result<_>>()?;
        let mut figures: Vec<Figure> = systems
            .iter()
            .map(|s| Figure {
                generator: generator(s),
                searches: Vec::new(),
            })
            .collect();
        for repeat in 0..plan.repeats {
            ceilings(topo, m)?;
            let mut searches: Vec<Search> = systems
                .iter()
                .zip(&figures)
                .map(|(s, figure)| match figure.median() {
                    Some(v) if repeat > 0 => Search::repeat(v as u64, plan.repeat_trials),
                    _ => {
                        // Later sets start from the system's cluster-names figure.
                        let known = m
                            .throughput
                            .get(&("cluster", s.id))
                            .and_then(Figure::median);
                        let start = match known {
                            Some(v) if !plan.quick => (v as u64).clamp(10_000, plan.start_rate),
                            _ => plan.start_rate,
                        };
                        Search::new(start, plan.max_trials)
                    }
                })
                .collect();
            let mut round = 0;
            while searches.iter().any(|s| !s.done) {
                for k in 0..systems.len() {
                    // Rotate the order each round.
                    let i = (k + round) % systems.len();
                    if searches[i].done {
                        continue;
                    }
                    let s = &systems[i];
                    let rate = searches[i].next;
                    let g = figures[i].generator;
                    if g == Generator::LiveFrames {
                        topo.generator.load(&frames[i])?;
                    }
                    let t = throughput::trial(
                        topo,
                        s,
                        g,
                        valid(s),
                        &query_file,
                        rate,
                        plan.trial_secs,
                    )?;
                    eprintln!(
                        "throughput {:<9} {:<18} {:<11} offered {:>8} sent {:>9.0}/s answered {:>9.0}/s loss {:>6.2}% (ring {}, socket {}){}{}",
                        set.id,
                        s.id,
                        g.name(),
                        rate,
                        t.sent_pps(),
                        t.valid_pps(),
                        t.loss() * 100.0,
                        t.ring_drops,
                        t.socket_drops,
                        if t.servfail > 0 {
                            format!(" SERVFAIL {}", t.servfail)
                        } else {
                            String::new()
                        },
                        if t.wrong > 0 {
                            format!(" WRONG {}", t.wrong)
                        } else {
                            String::new()
                        }
                    );
                    if t.wrong > 0 {
                        m.failures.push(format!(
                            "{}: {} wrong replies to {} queries at {rate}/s offered",
                            s.id, t.wrong, set.id
                        ));
                    }
                    if plan.quick && t.loss() > LOSS_BOUND {
                        // As for latency: measured once more before it counts as broken.
                        std::thread::sleep(Duration::from_millis(300));
                        let again = throughput::trial(
                            topo,
                            s,
                            g,
                            valid(s),
                            &query_file,
                            rate,
                            plan.trial_secs,
                        )?;
                        eprintln!(
                            "throughput {:<9} {:<18} lost {:.2}%, measured again: lost {:.2}%",
                            set.id,
                            s.id,
                            t.loss() * 100.0,
                            again.loss() * 100.0
                        );
                        if again.loss() > LOSS_BOUND || again.wrong > 0 {
                            m.failures.push(format!(
                                "{}: {:.2}% of the {} queries at {rate}/s went without a valid \
                                 reply ({} SERVFAIL), and {:.2}% measured again; the bound is {}%",
                                s.id,
                                t.loss() * 100.0,
                                set.id,
                                t.servfail,
                                again.loss() * 100.0,
                                LOSS_BOUND * 100.0
                            ));
                        }
                    }
                    if !t.passed() {
                        // Let late replies and forwarding timeouts of this trial drain.
                        std::thread::sleep(Duration::from_millis(300));
                    }
                    searches[i].record(t);
                }
                round += 1;
            }
            for (f, search) in figures.iter_mut().zip(searches) {
                f.searches.push(search);
            }
        }
        for (s, figure) in systems.iter().zip(figures) {
            m.throughput.insert((set.id, s.id), figure);
        }
    }
    ceilings(topo, m)?;
    Ok(())
}
