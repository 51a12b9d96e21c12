//! Scale: 10,000 Services with 100,000 endpoints loaded into the kernel maps. Reports the
//! time to build the zone and to fill the maps, the maps' kernel memory, the agent's own
//! memory for the zone, and what an update of one Service writes.
//!
//! `cargo bench -p dns-agent --bench zone_scale` (root: it loads the XDP program).
//! `XDNS_BENCH_SERVICES` and `XDNS_BENCH_ENDPOINTS_PER_SERVICE` change the size.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Instant,
};

use dns_agent::{
    kernel::{
        Capacity, Kernel,
        sync::{KernelSync, entries_of},
    },
    zone::{
        Change, ZoneModel, ZoneSettings,
        objects::{
            ClusterObject, EndpointInfo, ObjectKey, Port, Protocol, ServiceInfo, ServiceKind,
            SliceInfo,
        },
    },
};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")
                    .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A cluster of `services` Services over 50 namespaces: 90% ClusterIP (a third of them
/// dual-stack), 10% headless with hostnames (StatefulSets); `per` endpoints each, all ready.
fn cluster(services: usize, per: usize) -> Vec<ClusterObject> {
    let mut objects = Vec::with_capacity(services * 2 + 50);
    for n in 0..50 {
        objects.push(ClusterObject::Namespace(format!("ns-{n}").into()));
    }
    let mut pod = 0u32;
    for i in 0..services {
        let ns = format!("ns-{}", i % 50);
        let name = format!("svc-{i}");
        let ip4 = IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + i as u32 + 1));
        let headless = i % 10 == 9;
        let kind = if headless {
            ServiceKind::Headless
        } else if i % 3 == 0 {
            ServiceKind::ClusterIp(vec![
                ip4,
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, i as u16)),
            ])
        } else {
            ServiceKind::ClusterIp(vec![ip4])
        };
        let ports = vec![
            Port {
                name: Some("http".into()),
                port: 80,
                protocol: Protocol::Tcp,
            },
            Port {
                name: Some("metrics".into()),
                port: 9090,
                protocol: Protocol::Tcp,
            },
        ];
        objects.push(ClusterObject::Service(
            ObjectKey::new(&ns, &name),
            ServiceInfo {
                kind,
                ports: ports.clone(),
            },
        ));
        let endpoints = (0..per)
            .map(|e| {
                pod += 1;
                EndpointInfo {
                    addresses: vec![IpAddr::V4(Ipv4Addr::from(0x0af4_0000 + pod))],
                    hostname: headless.then(|| format!("{name}-{e}").into()),
                    ready: true,
                }
            })
            .collect();
        objects.push(ClusterObject::Slice(
            ObjectKey::new(&ns, &format!("{name}-abcde")),
            SliceInfo {
                service: name.as_str().into(),
                endpoints,
                ports,
            },
        ));
    }
    objects
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("zone_scale loads the XDP program: run it as root");
        std::process::exit(1);
    }
    let services = env("XDNS_BENCH_SERVICES", 10_000);
    let per = env("XDNS_BENCH_ENDPOINTS_PER_SERVICE", 10);
    let rss0 = rss_kib();

    let t = Instant::now();
    let objects = cluster(services, per);
    let mut zone = ZoneModel::new(ZoneSettings {
        domain: "cluster.local".into(),
        ttl: 30,
        negative_ttl: 5,
        ns_addrs: vec![IpAddr::V4(Ipv4Addr::new(169, 254, 20, 10))],
        serial: 1,
    });
    let by_kind = dns_agent::zone::objects::by_kind(objects);
    for (kind, objs) in by_kind {
        let changes = zone.diff_relist(kind, objs);
        zone.apply(changes);
    }
    zone.set_synced();
    let model_time = t.elapsed();
    let rss_model = rss_kib();

    let pin = PathBuf::from("/sys/fs/bpf").join(format!("xdns-bench-{}", std::process::id()));
    let capacity = Capacity::scaled(1 << 20);
    let (kernel, maps) = Kernel::load(capacity, &pin, false).expect("loading the XDP program");
    let mut sync = KernelSync::new(maps);
    sync.write_config(&zone).expect("zone config");

    let t = Instant::now();
    let names = zone.all_names();
    let entries = entries_of(&zone, &names);
    let encode_time = t.elapsed();
    let t = Instant::now();
    let stats = sync.apply(Vec::new(), entries);
    let load_time = t.elapsed();
    let counts = sync.maps().entry_counts();
    assert_eq!(
        stats.failed, 0,
        "every entry fits: {stats:?}, in the maps: {counts:?}"
    );
    sync.set_synced().expect("synced");
    let (short, long, blobs) = sync.maps().entry_counts();
    let memory = sync.maps().memory();
    let map_bytes: u64 = memory.iter().map(|(_, b)| b).sum();

    // One Service changes its cluster IP.
    let key = ObjectKey::new("ns-1", "svc-1");
    let info = ServiceInfo {
        kind: ServiceKind::ClusterIp(vec![IpAddr::V4(Ipv4Addr::new(10, 97, 0, 1))]),
        ports: vec![
            Port {
                name: Some("http".into()),
                port: 80,
                protocol: Protocol::Tcp,
            },
            Port {
                name: Some("metrics".into()),
                port: 9090,
                protocol: Protocol::Tcp,
            },
        ],
    };
    let t = Instant::now();
    let changes = vec![Change::Upsert(ClusterObject::Service(key, info))];
    let touched = zone.touched(&changes);
    let before = entries_of(&zone, &touched);
    zone.apply(changes);
    let after = entries_of(&zone, &touched);
    let update = sync.apply(before, after);
    let update_time = t.elapsed();

    let endpoints = zone.endpoint_count();
    let objects = services * 2 + 50;
    println!("## Zone scale: {services} Services, {endpoints} endpoints\n");
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| zone model built (projections, indexes) | {:.0} ms |",
        model_time.as_secs_f64() * 1e3
    );
    println!(
        "| answers encoded ({} names) | {:.0} ms |",
        names.len(),
        encode_time.as_secs_f64() * 1e3
    );
    println!(
        "| kernel maps filled ({} entries: {short} short, {long} long, {blobs} blobs) | {:.0} ms ({:.2} µs per entry) |",
        stats.written,
        load_time.as_secs_f64() * 1e3,
        load_time.as_secs_f64() * 1e6 / stats.written.max(1) as f64
    );
    for (name, bytes) in &memory {
        println!(
            "| kernel memory, {name} | {:.1} MiB |",
            *bytes as f64 / (1 << 20) as f64
        );
    }
    println!(
        "| kernel memory, answer maps in all | {:.1} MiB ({:.0} bytes per entry, {:.0} per endpoint) |",
        map_bytes as f64 / (1 << 20) as f64,
        map_bytes as f64 / stats.written.max(1) as f64,
        map_bytes as f64 / endpoints.max(1) as f64
    );
    println!(
        "| agent memory for the zone model (RSS growth) | {:.1} MiB ({:.0} bytes per object) |",
        (rss_model.saturating_sub(rss0)) as f64 / 1024.0,
        (rss_model.saturating_sub(rss0)) as f64 * 1024.0 / objects as f64
    );
    println!(
        "| one Service's cluster IP changed: names touched | {} |",
        touched.len()
    );
    println!(
        "| … entries written / removed / unchanged | {} / {} / {} |",
        update.written, update.removed, update.unchanged
    );
    println!(
        "| … time from change to maps written | {:.2} ms |",
        update_time.as_secs_f64() * 1e3
    );
    drop(kernel);
    let _ = std::fs::remove_dir_all(&pin);
}
