//! `cargo xtask bench [--quick] [--publish]`: what xdns buys, side by side with what operators
//! run today, measured in one run on one machine.
//!
//! Systems (see `topo`): the xdns kernel path in generic and driver mode, xdns userspace only,
//! unbound and dnsmasq as node-local caches holding the same records, and a bare XDP reflector
//! as the machine's ceiling. Query sets (see `workload`): cluster names, search-path junk that
//! must be NXDOMAIN, cached external names. Figures: the highest throughput under 0.1% loss
//! (kxdpgun), latency percentiles at fixed offered loads (own load generator), the in-kernel
//! cost per query (`cargo bench -p dns-agent --bench kernel_cost`) and memory.
//!
//! Systems are measured in rotation (every trial of a step for every system, then the next
//! step), so noise from other work on the machine spreads over all of them. Nothing here
//! asserts on speed: a run fails only when a system answers wrongly or cannot be measured.
//! Results go to `results/<timestamp>/`; `--publish` also writes docs/benchmarks.md's
//! generated section and docs/benchmarks.svg.

mod check;
mod loadgen;
mod report;
mod throughput;
pub mod tls;
mod topo;
pub mod userspace;
mod workload;

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
    throughput::Search,
    topo::{Kind, Process, System, Topology},
    workload::Workload,
};
use crate::{
    netns,
    util::{cmd, require_root, root, run},
};

#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub quick: bool,
    pub publish: bool,
}

/// How much of everything a run does.
struct Plan {
    services: usize,
    external: usize,
    trial_secs: u32,
    max_trials: usize,
    start_rate: u64,
    /// (offered load, seconds per round).
    loads: Vec<(u32, f64)>,
    rounds: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                services: 5000,
                external: 200,
                trial_secs: 1,
                max_trials: 1,
                start_rate: 20_000,
                loads: vec![(1000, 1.0)],
                rounds: 1,
            }
        } else {
            Self {
                services: 5000,
                external: 200,
                trial_secs: 1,
                max_trials: 5,
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
    pub throughput: BTreeMap<(&'static str, &'static str), Search>,
    pub latency: BTreeMap<(&'static str, &'static str, u32), LatencyRun>,
    /// (system, set) → (answered in the kernel, queries checked, the other counters that
    /// moved).
    pub kernel_share: BTreeMap<(&'static str, &'static str), (u64, u64, String)>,
    pub memory: BTreeMap<&'static str, Memory>,
}

/// Systems measured on a query set: the reflectors only on cluster names (they answer every
/// query alike).
fn systems_for(set: &str) -> Vec<System> {
    topo::systems()
        .into_iter()
        .filter(|s| set == "cluster" || !s.is_reflector())
        .collect()
}

pub fn bench(opts: Options) -> anyhow::Result<()> {
    let started = Instant::now();
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
    let measured = measure(&plan, &workload, &dir, &agent_bin, &reflector);
    netns::cleanup();
    let measured = measured?;
    let network_secs = started.elapsed().as_secs_f64();
    // DNS over TLS beside plain DNS (its own namespaces).
    let tls = tls::measure(&root, &agent_bin, &dir, opts.quick);
    netns::cleanup();
    let tls = tls?;

    // In-kernel cost, after the namespaces are gone (less noise).
    let tsv = dir.join("kernel_cost.tsv");
    let mut c = cmd("cargo");
    c.current_dir(&root)
        .args(["bench", "-p", "dns-agent", "--bench", "kernel_cost", "--"]);
    if opts.quick {
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
    let kernel_cost_md = String::from_utf8_lossy(&out.stdout).to_string();
    let kernel_cost = report::KernelCost::parse(&std::fs::read_to_string(&tsv)?);

    // Hook: the Kubernetes API programming-latency bench, when the tree has it.
    let programming = programming_bench(&root, opts.quick)?;

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
        workload: &workload,
        m: measured,
        kernel_cost_md,
        kernel_cost,
        programming,
        network_secs,
        total_secs: started.elapsed().as_secs_f64(),
    };
    let md = report::markdown(&results) + &tls;
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
) -> anyhow::Result<Measurements> {
    let zone_file = dir.join("zone.yaml");
    std::fs::write(&zone_file, workload.zone_yaml())?;
    let mut topo = Topology::new(reflector)?;
    let by_id = |id: &str| {
        topo::systems()
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
    let mut query_files = BTreeMap::new();
    for set in &workload.sets {
        let p = dir.join(format!("queries-{}.txt", set.id));
        set.write_kxdpgun(&p)?;
        query_files.insert(set.id, p);
    }

    let _upstream = topo::start_upstream(&topo, dir)?;
    let mut processes: BTreeMap<&'static str, Process> = BTreeMap::new();
    for (k, s) in topo::systems().iter().enumerate() {
        eprintln!("starting {}", s.id);
        if let Some(p) = topo::start(&topo, s, agent_bin, &zone_file, dir, 9253 + k as u16)? {
            processes.insert(s.id, p);
        }
    }

    // Correctness, and the caches warmed with the external names.
    let mut m = Measurements {
        throughput: BTreeMap::new(),
        latency: BTreeMap::new(),
        kernel_share: BTreeMap::new(),
        memory: BTreeMap::new(),
    };
    for set in &workload.sets {
        for s in systems_for(set.id) {
            let pin = processes.get(s.id).and_then(|p| p.pin.clone());
            let kernel = matches!(s.kind, Kind::XdnsKernel(_));
            let before = if kernel {
                Some(check::kernel_counters(pin.as_deref().expect("pin"))?)
            } else {
                None
            };
            let n = check::check_set(&topo, &s, set)?;
            if let Some(before) = before {
                let after = check::kernel_counters(pin.as_deref().expect("pin"))?;
                let answered: u64 = [
                    dns_common::counter::ANSWERED,
                    dns_common::counter::ANSWERED_NODATA,
                    dns_common::counter::ANSWERED_NXDOMAIN,
                ]
                .iter()
                .map(|&i| after[i as usize] - before[i as usize])
                .sum();
                let others: Vec<String> = (0..dns_common::counter::COUNT as usize)
                    .filter(|&i| i > dns_common::counter::ANSWERED_NXDOMAIN as usize)
                    .filter(|&i| after[i] > before[i])
                    .map(|i| format!("{} {}", dns_common::counter::NAMES[i], after[i] - before[i]))
                    .collect();
                m.kernel_share
                    .insert((s.id, set.id), (answered, n, others.join(", ")));
                // Correct answers from userspace are still correct; a kernel path that answers
                // nothing of what it should is a broken setup.
                if set.id != "external" && answered == 0 {
                    bail!(
                        "{}: the kernel answered none of the {n} {} queries",
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

    for (id, p) in &processes {
        m.memory.entry(id).or_default().rss_ready = p.rss();
    }

    // Throughput, per set, the systems' searches interleaved.
    for set in &workload.sets {
        let systems = systems_for(set.id);
        let rcode = if set.rcode() == 3 {
            "NXDOMAIN"
        } else {
            "NOERROR"
        };
        // Each system's search on the later sets starts from its cluster-names figure.
        let mut searches: Vec<Search> = systems
            .iter()
            .map(|s| {
                let known = m
                    .throughput
                    .get(&("cluster", s.id))
                    .and_then(Search::result);
                let start = match known {
                    Some(v) if plan.max_trials > 1 => (v as u64).clamp(10_000, plan.start_rate),
                    _ => plan.start_rate,
                };
                Search::new(start, plan.max_trials)
            })
            .collect();
        topo.detach_pass()?;
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
                let t = throughput::trial(
                    &topo,
                    &topo.links[s.link],
                    s.link,
                    s.listen,
                    &query_files[set.id],
                    rcode,
                    rate,
                    plan.trial_secs,
                )?;
                eprintln!(
                    "throughput {:<9} {:<18} offered {:>8} sent {:>9.0}/s answered {:>9.0}/s loss {:>6.2}%{}",
                    set.id,
                    s.id,
                    rate,
                    t.sent_pps(),
                    t.valid_pps(),
                    t.loss() * 100.0,
                    if t.wrong > 0 {
                        format!(" WRONG {}", t.wrong)
                    } else {
                        String::new()
                    }
                );
                if t.wrong > 0 {
                    bail!(
                        "{}: {} replies with a wrong rcode to {} queries",
                        s.id,
                        t.wrong,
                        set.id
                    );
                }
                if !t.passed() {
                    // Let late replies and forwarding timeouts of this trial drain.
                    std::thread::sleep(Duration::from_millis(300));
                }
                searches[i].record(t);
            }
            round += 1;
        }
        topo.attach_pass()?;
        for (s, search) in systems.iter().zip(searches) {
            m.throughput.insert((set.id, s.id), search);
        }
    }

    // Latency at fixed loads, in rounds.
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
                        bail!(
                            "{}: {} wrong replies to {} queries at {load}/s",
                            s.id,
                            r.wrong,
                            set.id
                        );
                    }
                    m.latency.entry((set.id, s.id, load)).or_default().merge(r);
                }
            }
        }
    }

    // Still correct after the load.
    for s in systems_for("cluster") {
        check::check_set(&topo, &s, &workload.sets[0])?;
    }
    for (id, p) in &processes {
        let mem = m.memory.entry(id).or_default();
        mem.rss_end = p.rss();
        mem.hwm = p.hwm();
        mem.maps = p.map_memory();
    }
    Ok(m)
}
