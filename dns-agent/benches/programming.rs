//! Programming latency and memory at scale: a fake API server holding 10,000 Services and
//! 100,000 endpoints, the agent watching it with the XDP program attached, single-object
//! changes timed from the fake writing the watch event to the kernel answering the new
//! address (polled with real queries from the pod's namespace).
//!
//! `cargo bench -p dns-agent --bench programming` as root. Prints Markdown tables. Bounded:
//! at most `changes()` changes per series and five minutes in all.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::BTreeMap,
    net::IpAddr,
    sync::atomic::{AtomicI64, Ordering},
    time::{Duration, Instant},
};

use hickory_proto::{op::ResponseCode, rr::RecordType};
use serde_json::{Value, json};
use support::{
    Agent, Client, LISTEN_V4, Topology, answers,
    fake_api::{self, FakeApi},
};

/// Counts the bytes this process has allocated and not freed, to measure the zone model's live
/// heap apart from what the allocator keeps (RSS includes memory freed but not returned).
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const ENDPOINTS_PER_SERVICE: u32 = 10;
const NAMESPACES: u32 = 50;
/// `--quick` (what `cargo xtask bench --quick` passes in CI): a tenth of the cluster and a
/// quarter of the changes, to check the bench works; the figures are the full run's.
static QUICK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn quick() -> bool {
    QUICK.load(std::sync::atomic::Ordering::Relaxed)
}

fn service_count() -> u32 {
    if quick() { 1_000 } else { 10_000 }
}

fn changes() -> u32 {
    if quick() { 50 } else { 200 }
}
const TARGET_P99: Duration = Duration::from_millis(10);
const BUDGET: Duration = Duration::from_secs(300);
const PER_CHANGE_DEADLINE: Duration = Duration::from_secs(5);

fn namespace_of(i: u32) -> String {
    format!("bench-{}", i % NAMESPACES)
}

fn service_ip(i: u32) -> String {
    format!("10.96.{}.{}", i / 250, i % 250 + 1)
}

/// Endpoint `k` of the cluster: 10.244.0.0/15, in order.
fn endpoint_ip(k: u32) -> String {
    format!("10.{}.{}.{}", 244 + k / 65536, (k / 256) % 256, k % 256)
}

fn slice_of(i: u32, addresses: &[String]) -> Value {
    let endpoints: Vec<Value> = addresses
        .iter()
        .map(|a| json!({"addresses": [a], "conditions": {"ready": true}}))
        .collect();
    json!({"kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-abcde"), "namespace": namespace_of(i),
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4", "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

fn endpoints_of(i: u32) -> Vec<String> {
    (0..ENDPOINTS_PER_SERVICE)
        .map(|e| endpoint_ip(i * ENDPOINTS_PER_SERVICE + e))
        .collect()
}

/// VmRSS and VmHWM of a process, in bytes.
fn memory_of(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The BPF maps a process holds: map id → (type, max entries, memlock bytes), from fdinfo.
/// On this kernel memlock is the map's memory in use (entries present for hash maps without
/// preallocation), not its capacity.
fn bpf_maps_of(pid: u32) -> BTreeMap<u32, (String, u64, u64)> {
    let mut maps = BTreeMap::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("proc fd")
        .flatten()
    {
        let is_map = std::fs::read_link(fd.path())
            .map(|t| t.to_string_lossy() == "anon_inode:bpf-map")
            .unwrap_or(false);
        if !is_map {
            continue;
        }
        let Ok(info) = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        )) else {
            continue;
        };
        let get = |k: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let Ok(id) = get("map_id:").parse() else {
            continue;
        };
        maps.insert(
            id,
            (
                get("map_type:"),
                get("max_entries:").parse().unwrap_or(0),
                get("memlock:").parse().unwrap_or(0),
            ),
        );
    }
    maps
}

/// Names of BPF maps by id, from bpftool if it is installed.
fn map_names() -> BTreeMap<u32, String> {
    let Ok(out) = std::process::Command::new("bpftool")
        .args(["-j", "map", "show"])
        .output()
    else {
        return BTreeMap::new();
    };
    let Ok(list) = serde_json::from_slice::<Vec<Value>>(&out.stdout) else {
        return BTreeMap::new();
    };
    list.iter()
        .filter_map(|m| {
            Some((
                m["id"].as_u64()? as u32,
                m["name"].as_str().unwrap_or("?").to_string(),
            ))
        })
        .collect()
}

/// The live heap of a zone model holding the benchmark's objects, built in this process with
/// the agent's own code (projections, relists), in bytes; and its kernel entry count.
fn zone_model_heap() -> u64 {
    use dns_agent::zone::{
        ZoneModel, ZoneSettings,
        objects::{Kind, project_namespace, project_service, project_slice},
    };
    let mut namespaces = Vec::new();
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for n in 0..NAMESPACES {
        let ns = serde_json::from_value(fake_api::namespace(&format!("bench-{n}"))).expect("ns");
        namespaces.push(project_namespace(&ns).expect("projects"));
    }
    for i in 0..service_count() {
        let svc = serde_json::from_value(fake_api::service(
            &namespace_of(i),
            &format!("svc-{i}"),
            &service_ip(i),
        ))
        .expect("service");
        services.push(project_service(&svc).expect("projects"));
        let slice = serde_json::from_value(slice_of(i, &endpoints_of(i))).expect("slice");
        slices.push(
            project_slice(&slice)
                .expect("projects")
                .expect("has a service"),
        );
    }
    let before = LIVE.load(Ordering::Relaxed);
    let mut zone = ZoneModel::new(ZoneSettings {
        domain: "cluster.local".into(),
        ttl: 30,
        negative_ttl: 5,
        ns_addrs: vec![IpAddr::V4(LISTEN_V4)],
        serial: 1,
    });
    for (kind, objects) in [
        (Kind::Namespace, namespaces),
        (Kind::Service, services),
        (Kind::EndpointSlice, slices),
    ] {
        // The relist consumes the projections: what stays is the model's.
        let changes = zone.diff_relist(kind, objects);
        zone.apply(changes);
    }
    let live = LIVE.load(Ordering::Relaxed) - before;
    assert_eq!(
        zone.endpoint_count(),
        (service_count() * ENDPOINTS_PER_SERVICE) as usize
    );
    drop(zone);
    live.max(0) as u64
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// Applies a change and waits until the kernel answers `name` with `want`; returns the time
/// from the fake writing the event to the first query that got the new answer.
fn timed_change(
    api: &FakeApi,
    client: &Client,
    object: Value,
    name: &str,
    want: &str,
    started: Instant,
) -> Duration {
    let rv = api.apply(object);
    let deadline = Instant::now() + PER_CHANGE_DEADLINE;
    let answered = loop {
        let m = client.query(name, RecordType::A, false);
        if m.metadata.response_code == ResponseCode::NoError
            && answers(&m).iter().any(|a| a == want)
        {
            break Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{name}: {want} not answered within {PER_CHANGE_DEADLINE:?} (last: {:?})",
            answers(&m)
        );
        assert!(started.elapsed() < BUDGET, "over the {BUDGET:?} budget");
    };
    let written = loop {
        if let Some(t) = api.written_at(rv) {
            break t;
        }
        assert!(Instant::now() < deadline, "the fake never wrote event {rv}");
        std::thread::sleep(Duration::from_millis(1));
    };
    answered.saturating_duration_since(written)
}

fn main() {
    if std::env::args().any(|a| a == "--quick") {
        QUICK.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let started = Instant::now();
    support::require_root();
    // First, while no other thread allocates.
    let model_heap = zone_model_heap();
    let topo = Topology::new();
    let dir = tempfile::tempdir().expect("tempdir");

    // Baseline: the agent with an almost empty cluster.
    let baseline = {
        let api = FakeApi::start(&topo.node);
        api.apply(fake_api::namespace("default"));
        let kubeconfig = api.kubeconfig(dir.path());
        let agent = Agent::start_api(&topo, &kubeconfig, &["--kernel-capacity", "1048576"]);
        memory_of(agent.pid()).0
    };

    let mut api = FakeApi::start(&topo.node);
    // A real API server sends bookmarks about once a minute.
    api.set_bookmark_every(Duration::from_secs(60));
    for n in 0..NAMESPACES {
        api.apply(fake_api::namespace(&format!("bench-{n}")));
    }
    for i in 0..service_count() {
        api.apply(fake_api::service(
            &namespace_of(i),
            &format!("svc-{i}"),
            &service_ip(i),
        ));
        api.apply(slice_of(i, &endpoints_of(i)));
    }
    // The initial objects are listed, not replayed from history.
    api.compact();
    let objects = u64::from(NAMESPACES + service_count() * (1 + ENDPOINTS_PER_SERVICE));
    eprintln!(
        "fake API: {} services, {} endpoints",
        service_count(),
        service_count() * ENDPOINTS_PER_SERVICE
    );

    let kubeconfig = api.kubeconfig(dir.path());
    let load_started = Instant::now();
    let mut agent = Agent::spawn_api(&topo, &kubeconfig, &["--kernel-capacity", "1048576"]);
    agent.wait_ready(Duration::from_secs(180));
    let load_time = load_started.elapsed();
    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));
    let pid = agent.pid();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), "dns-agent", "pid {pid} is the agent itself");
    let failures = agent.metric("xdns_kernel_map_write_failures_total");
    assert_eq!(failures, 0.0, "every entry fits in the kernel maps");
    let kernel_entries = agent.metric("xdns_kernel_entries") as u64;

    // Single-Service changes: a new cluster IP, polled at the Service's name.
    let mut service_changes = Vec::new();
    let kernel_before = agent.kernel_answered();
    let user_before = agent.userspace_answers();
    for c in 0..changes() {
        let i = (c * 7919) % service_count();
        let new_ip = format!("10.98.{}.{}", c / 250, c % 250 + 1);
        let name = format!("svc-{i}.{}.svc.cluster.local.", namespace_of(i));
        service_changes.push(timed_change(
            &api,
            &client,
            fake_api::service(&namespace_of(i), &format!("svc-{i}"), &new_ip),
            &name,
            &format!("A {new_ip}"),
            started,
        ));
    }
    // Single-EndpointSlice changes: one endpoint's address replaced, polled at its name.
    let mut slice_changes = Vec::new();
    for c in 0..changes() {
        let i = (c * 104_729 + 13) % service_count();
        let mut addresses = endpoints_of(i);
        let new_ip = format!("10.250.{}.{}", c / 250, c % 250 + 1);
        addresses[0] = new_ip.clone();
        let name = format!(
            "{}.svc-{i}.{}.svc.cluster.local.",
            new_ip.replace('.', "-"),
            namespace_of(i)
        );
        slice_changes.push(timed_change(
            &api,
            &client,
            slice_of(i, &addresses),
            &name,
            &format!("A {new_ip}"),
            started,
        ));
    }
    let kernel_answers = agent.kernel_answered() - kernel_before;
    let user_answers = agent.userspace_answers() - user_before;

    let (rss, hwm) = memory_of(pid);
    let maps = bpf_maps_of(pid);
    let names = map_names();
    let kernel_bytes: u64 = maps.values().map(|(_, _, m)| m).sum();
    let histogram_count = agent.metric("xdns_programming_latency_seconds_count");
    let histogram_sum = agent.metric("xdns_programming_latency_seconds_sum");
    agent.stop();
    drop(agent);
    api.set_down(true);

    println!(
        "\n### Programming latency ({} changes each, fake API event written → kernel answers)\n",
        changes()
    );
    println!("| change | n | first | p50 | p90 | p99 | max | p99 target |");
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    for (what, mut v) in [
        ("Service cluster IP", service_changes),
        ("EndpointSlice endpoint address", slice_changes),
    ] {
        // The first changes after the initial load may pay for the allocator tidying up
        // after it: shown apart, still counted.
        let first = v.first().copied().unwrap_or_default();
        v.sort();
        let p99 = quantile(&v, 0.99);
        println!(
            "| {what} | {} | {} | {} | {} | {} | {} | {} |",
            v.len(),
            ms(first),
            ms(quantile(&v, 0.5)),
            ms(quantile(&v, 0.9)),
            ms(p99),
            ms(*v.last().expect("changes")),
            if p99 < TARGET_P99 {
                "met (< 10 ms)"
            } else {
                "MISSED (≥ 10 ms)"
            }
        );
    }
    println!(
        "\nPolling queries answered by the kernel: {kernel_answers}, by userspace: {user_answers}. \
         Agent's own histogram (event received → kernel maps written): {} observations, mean {}.",
        histogram_count,
        ms(Duration::from_secs_f64(
            histogram_sum / histogram_count.max(1.0)
        ))
    );

    println!(
        "\n### Memory ({} Services, {} endpoints, {NAMESPACES} namespaces: {objects} objects; {kernel_entries} kernel entries)\n",
        service_count(),
        service_count() * ENDPOINTS_PER_SERVICE
    );
    println!("| | total | per object | per kernel entry |");
    println!("|---|---:|---:|---:|");
    println!(
        "| agent RSS (VmRSS) | {} | {:.0} B | |",
        mib(rss),
        rss as f64 / objects as f64
    );
    println!(
        "| agent RSS above an empty cluster ({} baseline) | {} | {:.0} B | |",
        mib(baseline),
        mib(rss.saturating_sub(baseline)),
        rss.saturating_sub(baseline) as f64 / objects as f64
    );
    println!(
        "| zone model live heap (same objects, counted in-process) | {} | {:.0} B | |",
        mib(model_heap),
        model_heap as f64 / objects as f64
    );
    println!(
        "| agent peak RSS (VmHWM, initial list) | {} | {:.0} B | |",
        mib(hwm),
        hwm as f64 / objects as f64
    );
    println!(
        "| kernel maps (fdinfo memlock, in use) | {} | {:.0} B | {:.0} B |",
        mib(kernel_bytes),
        kernel_bytes as f64 / objects as f64,
        kernel_bytes as f64 / kernel_entries.max(1) as f64
    );
    println!("\n| map | type | max entries | memlock |");
    println!("|---|---|---:|---:|");
    for (id, (ty, max, mem)) in &maps {
        println!(
            "| {} (id {id}) | {ty} | {max} | {} |",
            names.get(id).map(String::as_str).unwrap_or("?"),
            mib(*mem)
        );
    }
    println!(
        "\nInitial list and load: {} (from start to /ready). Whole run: {:.1} s.",
        ms(load_time),
        started.elapsed().as_secs_f64()
    );
}
