//! In-kernel cost per query of the XDP program, from `BPF_PROG_TEST_RUN`: no network, the
//! real verifier, the real kernel, the agent's real zone and map code.
//!
//! `cargo bench -p dns-agent --bench kernel_cost [-- --quick] [--tsv FILE]` (root).
//! `cargo xtask bench` runs it and puts its table in the report. For profiling one case:
//! `-- --case hit --services 100000 --runs 2000000` prints the program id and waits 3 s, time
//! to start `bpftool prog profile id ID duration 5 cycles instructions llc_misses`.
//!
//! Method: **many runs with `repeat = 1`, averaging the duration the kernel reports for each**.
//! With `repeat > 1` the kernel runs the program again and again on the same buffer, and an
//! answered query has by then been rewritten in place into a response (QR=1), so every run
//! after the first would measure the pass path. The live-frames mode
//! (`BPF_F_TEST_XDP_LIVE_FRAMES`) resets frames between runs, but its timer also covers
//! resetting the page-pool frame and really transmitting (`XDP_TX` becomes a redirect) or
//! injecting (`XDP_PASS`) every frame, so it does not isolate the program either.
//! A `repeat = 1` run includes the timer's own overhead (two clock reads, bottom halves off and
//! on): the baseline case, a frame passed at the program's first check (not IPv4/IPv6),
//! measures exactly that plus the program's entry and counter update, so `case − baseline`
//! is the DNS work. For the cases that pass the frame untouched the table also shows the
//! amortized figure from one `repeat = N` run, as a cross-check of that overhead.
//!
//! Each case cycles through many different names (a different hash bucket each run), so map
//! lookups are not all served from one hot cache line.
//!
//! A repeat=1 run starts cold: the program's code and the packet's path through the harness
//! are out of the CPU's caches, which weighs most on the longest paths. The **warm** column is
//! the other end: the kernel's own run-time statistics of the program (`BPF_ENABLE_STATS`,
//! two clock reads around each run and nothing else) over live-frames runs
//! (`BPF_F_TEST_XDP_LIVE_FRAMES`: each run starts from the query as given), 64 runs of each of
//! 256 names in turn — the per-query cost of a program kept busy, as under load.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::Instant,
};

use dns_agent::kernel::{
    Capacity, Kernel,
    cache_sync::KernelCache,
    sync::{KernelSync, entries_of},
};
use support::{
    LISTEN_V4, LISTEN_V6,
    frames::{dns_query, query_frame},
};

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));
const SERVER: IpAddr = IpAddr::V4(LISTEN_V4);
const NAMESPACES: usize = support::SERVICE_NAMESPACES;
/// Distinct names each case cycles through.
const NAMES_PER_CASE: usize = 1024;

struct Options {
    quick: bool,
    tsv: Option<PathBuf>,
    /// Profiling: only this case (and the baseline), only this many Services, this many runs.
    case: Option<String>,
    services: Option<usize>,
    runs: Option<usize>,
}

fn options() -> Options {
    let mut o = Options {
        quick: false,
        tsv: None,
        case: None,
        services: None,
        runs: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--tsv" => o.tsv = args.next().map(PathBuf::from),
            "--case" => o.case = args.next(),
            "--services" => o.services = args.next().and_then(|n| n.parse().ok()),
            "--runs" => o.runs = args.next().and_then(|n| n.parse().ok()),
            // `cargo bench` adds `--bench`.
            _ => {}
        }
    }
    o
}

/// IDs of the BPF programs this process holds (for `bpftool prog profile id …`).
fn program_ids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fdinfo") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .collect()
}

/// External names in the kernel's copy of the cache.
fn cached_name(k: usize) -> String {
    format!("cached-{k}.example.org")
}

fn service_name(i: usize) -> String {
    format!("svc-{i}.ns-{}.svc.cluster.local", i % NAMESPACES)
}

/// One kind of frame, and what the program must do with it.
struct Case {
    name: &'static str,
    what: &'static str,
    frames: Vec<Vec<u8>>,
    verdict: u32,
    counter: &'static str,
}

fn cases(services: usize) -> Vec<Case> {
    // Spread over the whole zone, the same spread at every size. Each case asks its own
    // names (`offset`): a case that asked the names the previous case just asked would find
    // their map entries in the CPU cache, and look cheaper than it is.
    let pick = |k: usize, offset: usize| ((k + offset) * 7919 + 13) % services;
    let a = 1u16;
    let query = |id: usize, name: &str, edns: bool| {
        query_frame(
            CLIENT,
            SERVER,
            &dns_query(id as u16, name, a, edns.then_some((1232, 0, false))),
        )
    };
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&support::frames::CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&support::frames::CLIENT_MAC);
    arp.extend_from_slice(&[192, 0, 2, 2, 0, 0, 0, 0, 0, 0, 169, 254, 20, 10]);
    vec![
        Case {
            name: "baseline",
            what: "ARP frame, passed at the first check",
            frames: vec![arp],
            verdict: XDP_PASS,
            counter: "pass_not_dns",
        },
        Case {
            name: "hit_same",
            what: "A of one Service, again and again (its entry stays in the CPU cache): answered",
            frames: vec![query(1, &service_name(pick(0, 3 * NAMES_PER_CASE)), false)],
            verdict: XDP_TX,
            counter: "answered",
        },
        Case {
            name: "hit",
            what: "A of a Service, no EDNS: answered",
            frames: (0..NAMES_PER_CASE)
                .map(|k| query(k, &service_name(pick(k, 0)), false))
                .collect(),
            verdict: XDP_TX,
            counter: "answered",
        },
        Case {
            name: "hit_edns",
            what: "A of a Service, EDNS 1232: answered with OPT",
            frames: (0..NAMES_PER_CASE)
                .map(|k| query(k, &service_name(pick(k, NAMES_PER_CASE)), true))
                .collect(),
            verdict: XDP_TX,
            counter: "answered",
        },
        Case {
            name: "nxdomain",
            what: "search-path expansion (ext.example.org.<ns>.svc.<zone>): NXDOMAIN",
            frames: (0..NAMES_PER_CASE)
                .map(|k| {
                    let name = format!(
                        "ext-{}.example.org.ns-{}.svc.cluster.local",
                        k % 200,
                        k % NAMESPACES
                    );
                    query(k, &name, false)
                })
                .collect(),
            verdict: XDP_TX,
            counter: "answered_nxdomain",
        },
        Case {
            name: "cached",
            what: "cached external name (cached.example.org), two A records: answered, TTLs counted down",
            frames: (0..NAMES_PER_CASE)
                .map(|k| query(k, &cached_name(k), false))
                .collect(),
            verdict: XDP_TX,
            counter: "answered_cached",
        },
        Case {
            name: "miss",
            what: "external name (ext.example.org): passed to userspace",
            frames: (0..NAMES_PER_CASE)
                .map(|k| query(k, &format!("ext-{k}.example.org"), false))
                .collect(),
            verdict: XDP_PASS,
            counter: "pass_miss",
        },
    ]
}

/// Per-run durations of one case, in ns.
#[derive(Default)]
struct Samples {
    ns: Vec<u64>,
}

impl Samples {
    fn mean(&self) -> f64 {
        self.ns.iter().sum::<u64>() as f64 / self.ns.len().max(1) as f64
    }
    fn pct(&self, p: f64) -> u64 {
        let mut v = self.ns.clone();
        v.sort_unstable();
        v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    }
}

/// Sum of `memlock` over this process's BPF map fds, as the kernel accounts them.
fn map_memory() -> u64 {
    let mut total = 0;
    let Ok(dir) = std::fs::read_dir("/proc/self/fdinfo") else {
        return 0;
    };
    for e in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        if !text.contains("map_type:") {
            continue;
        }
        total += text
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

struct SizeResult {
    services: usize,
    entries: usize,
    fill_secs: f64,
    map_bytes: u64,
    rows: Vec<Row>,
}

struct Row {
    name: String,
    what: String,
    samples: Samples,
    /// Mean ns of one `repeat = N` run (frames the program leaves untouched).
    amortized: Option<f64>,
    /// The program's own ns per run, warm (see the module doc).
    warm: f64,
}

/// Names of a case run warm, and runs of each.
const WARM_NAMES: usize = 256;
const WARM_REPEAT: u32 = 64;

/// The program's own time per run over live-frames runs of `frames`, from the kernel's
/// run-time statistics. They are on only here: they add two clock reads to every run of every
/// program, which the repeat=1 figures must not carry.
fn warm(kernel: &Kernel, frames: &[Vec<u8>]) -> f64 {
    // On for as long as this descriptor is open.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .expect("turning on the kernel's BPF run-time statistics");
    let (t0, n0) = kernel.run_stats().expect("program info");
    for f in frames.iter().cycle().take(WARM_NAMES) {
        kernel
            .test_run_live(f, WARM_REPEAT)
            .expect("BPF_PROG_TEST_RUN, live frames");
    }
    let (t1, n1) = kernel.run_stats().expect("program info");
    assert!(n1 > n0, "the kernel's run-time statistics are off");
    (t1 - t0).as_nanos() as f64 / (n1 - n0) as f64
}

fn measure(services: usize, runs: usize, only: Option<&str>) -> SizeResult {
    let objects = support::services(services);
    let started = Instant::now();
    let zone = support::zone_from(objects);
    let pin = PathBuf::from("/sys/fs/bpf").join(support::unique("xdns-kc"));
    let capacity = Capacity::scaled((services as u32 * 8).max(1 << 16));
    let (kernel, maps) =
        Kernel::load(capacity, &pin, false).expect("loading the XDP program (root?)");
    let mut sync = KernelSync::new(maps);
    sync.maps_mut()
        .set_listen(&[LISTEN_V4.octets()], &[LISTEN_V6.octets()])
        .expect("listen addresses");
    // One heartbeat below stands for a live agent for the whole run.
    sync.maps_mut()
        .set_grace(std::time::Duration::from_secs(u32::MAX as u64));
    sync.write_config(&zone).expect("zone config");
    let names = zone.all_names();
    let stats = sync.apply(Vec::new(), entries_of(&zone, &names));
    assert_eq!(stats.failed, 0, "every entry fits: {stats:?}");
    sync.set_synced().expect("synced");
    sync.maps().heartbeat().beat();
    // The agent's cache, as its writer puts it in the kernel: a day to live.
    let mut cache = KernelCache::new(sync.maps_mut().take_cache().expect("the cache maps"));
    let expires = Instant::now() + std::time::Duration::from_secs(86_400);
    for k in 0..NAMES_PER_CASE {
        let name = format!("{}.", cached_name(k));
        let answer = support::answers::upstream(
            &name,
            1,
            hickory_proto::op::ResponseCode::NoError,
            vec![
                support::answers::a(&name, 300, "203.0.113.7"),
                support::answers::a(&name, 300, "203.0.113.8"),
            ],
            vec![],
        );
        cache
            .set(
                &support::answers::question(&name, 1, false, false),
                Some((answer, expires)),
            )
            .expect("a cached answer");
    }
    let fill_secs = started.elapsed().as_secs_f64();
    let map_bytes = map_memory();

    let mut cases = cases(services);
    if let Some(only) = only {
        cases.retain(|c| c.name == "baseline" || c.name == only);
        eprintln!(
            "profiling {only} at {services} Services: program ids {:?}; starting in 3 s",
            program_ids()
        );
        std::thread::sleep(std::time::Duration::from_secs(3));
    }
    // Check every frame once: the verdict and the counter that moved. A benchmark of the
    // wrong path is worse than none.
    for case in &cases {
        for f in &case.frames {
            let before: std::collections::HashMap<_, _> = sync
                .maps()
                .counters()
                .expect("counters")
                .into_iter()
                .collect();
            let out = kernel.test_run(f, 1).expect("BPF_PROG_TEST_RUN");
            assert_eq!(out.action, case.verdict, "{}: verdict", case.name);
            let after: std::collections::HashMap<_, _> = sync
                .maps()
                .counters()
                .expect("counters")
                .into_iter()
                .collect();
            assert_eq!(
                after[case.counter],
                before[case.counter] + 1,
                "{}: counter {}",
                case.name,
                case.counter
            );
        }
    }

    // Interleave the cases in chunks, so that noise from other work on the machine spreads
    // over all of them.
    let mut samples: Vec<Samples> = cases.iter().map(|_| Samples::default()).collect();
    let chunk = 500;
    let mut done = 0;
    while done < runs {
        for (case, s) in cases.iter().zip(samples.iter_mut()) {
            for k in 0..chunk.min(runs - done) {
                let f = &case.frames[(done + k) % case.frames.len()];
                let out = kernel.test_run(f, 1).expect("BPF_PROG_TEST_RUN");
                assert_eq!(out.action, case.verdict, "{}", case.name);
                s.ns.push(out.duration.as_nanos() as u64);
            }
        }
        done += chunk;
    }
    let repeat = if runs >= 10_000 { 100_000 } else { 10_000 };
    let rows = cases
        .iter()
        .zip(samples)
        .map(|(case, s)| {
            // Untouched frames can be repeated in one call: the amortized figure.
            let amortized = (case.verdict == XDP_PASS).then(|| {
                let out = kernel
                    .test_run(&case.frames[0], repeat)
                    .expect("BPF_PROG_TEST_RUN");
                out.duration.as_nanos() as f64
            });
            Row {
                name: case.name.to_string(),
                what: case.what.to_string(),
                samples: s,
                amortized,
                warm: warm(&kernel, &case.frames),
            }
        })
        .collect();
    let entries = sync.entries();
    drop(kernel);
    let _ = std::fs::remove_dir_all(&pin);
    SizeResult {
        services,
        entries,
        fill_secs,
        map_bytes,
        rows,
    }
}

fn main() {
    let o = options();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "kernel_cost loads the XDP program with BPF_PROG_TEST_RUN: run it as root \
             (`sudo -E cargo bench -p dns-agent --bench kernel_cost`)"
        );
        std::process::exit(1);
    }
    let runs = o.runs.unwrap_or(if o.quick { 2_000 } else { 20_000 });
    let mut table = String::new();
    let mut tsv = String::from(
        "services\tcase\tmean_ns\tp50_ns\tp99_ns\tnet_ns\tamortized_ns\twarm_ns\twarm_net_ns\n",
    );
    writeln!(
        table,
        "| Services | case | what | mean ns | p50 ns | p99 ns | mean − baseline ns | amortized ns (repeat=N) | warm ns | warm − baseline ns |"
    )
    .unwrap();
    writeln!(table, "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|").unwrap();
    let mut sizes = String::new();
    let sizes_to_run = match o.services {
        Some(n) => vec![n],
        None => vec![1_000, 100_000],
    };
    for services in sizes_to_run {
        let r = measure(services, runs, o.case.as_deref());
        let baseline = r.rows[0].samples.mean();
        let warm_baseline = r.rows[0].warm;
        for Row {
            name,
            what,
            samples: s,
            amortized,
            warm,
        } in &r.rows
        {
            let net = s.mean() - baseline;
            let warm_net = warm - warm_baseline;
            let dash_for_baseline = |v: f64| {
                if name == "baseline" {
                    "—".to_string()
                } else {
                    format!("{v:.0}")
                }
            };
            writeln!(
                table,
                "| {} | {name} | {what} | {:.0} | {} | {} | {} | {} | {warm:.0} | {} |",
                r.services,
                s.mean(),
                s.pct(0.5),
                s.pct(0.99),
                dash_for_baseline(net),
                amortized.map_or("—".to_string(), |a| format!("{a:.0}")),
                dash_for_baseline(warm_net),
            )
            .unwrap();
            writeln!(
                tsv,
                "{}\t{name}\t{:.1}\t{}\t{}\t{net:.1}\t{}\t{warm:.1}\t{warm_net:.1}",
                r.services,
                s.mean(),
                s.pct(0.5),
                s.pct(0.99),
                amortized.map_or("".to_string(), |a| format!("{a:.1}")),
            )
            .unwrap();
        }
        writeln!(
            sizes,
            "- {} Services: {} kernel entries, zone built and maps filled in {:.1} s, BPF map memory {:.1} MiB (kernel `memlock` accounting)",
            r.services,
            r.entries,
            r.fill_secs,
            r.map_bytes as f64 / (1024.0 * 1024.0)
        )
        .unwrap();
        writeln!(
            tsv,
            "{}\t#map_bytes\t{}\t\t\t\t\n{}\t#entries\t{}\t\t\t\t",
            r.services, r.map_bytes, r.services, r.entries
        )
        .unwrap();
    }
    println!(
        "In-kernel cost per query (BPF_PROG_TEST_RUN, {runs} runs with repeat=1 per case, \
         kernel-reported ns per run; warm: the program's own time per run from the kernel's \
         run-time statistics over {WARM_NAMES} × {WARM_REPEAT} live-frames runs)\n"
    );
    println!("{table}");
    println!("{sizes}");
    if let Some(path) = o.tsv {
        std::fs::write(&path, tsv).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}
