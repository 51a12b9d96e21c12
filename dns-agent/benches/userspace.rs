//! Userspace cost per query: the agent's own handler, in-process, no sockets. What the UDP and
//! TCP loops spend on a query between receiving its bytes and having the reply's bytes, for the
//! query sets of `cargo xtask bench` (5,000 ClusterIP Services in 50 namespaces; cluster
//! names, search-path junk that is NXDOMAIN, external names held in the cache).
//!
//! `cargo bench -p dns-agent --bench userspace [-- --quick] [--threads N] [--case NAME]
//! [--secs S]`. With `--threads N`, N threads ask at once (the agent's loops share the zone
//! and the cache): the figure is the aggregate rate. For profiling one case, run the bench
//! binary under `perf record -g` with `--case cluster --secs 10`.
//!
//! Figures, never assertions; every reply is checked once before measuring.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::{
    net::Ipv4Addr,
    str::FromStr,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use dns_agent::{
    metrics::Metrics,
    server::{
        Handler, Transport, ZoneReply, answer_from_zone,
        cache::{Answer, Cache, CacheSettings, Kind},
        external::ExternalResolver,
        forward::{ForwardSettings, Forwarder, Policy, Question, Timeouts},
        heartbeat::Probe,
    },
    zone::name::wire_from_dotted,
};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{Name, RData, Record, RecordType},
};
use support::frames::dns_query;

const SERVICES: usize = 5000;
const NAMESPACES: usize = support::SERVICE_NAMESPACES;
const EXTERNAL: usize = 200;

struct Options {
    quick: bool,
    threads: Vec<usize>,
    case: Option<String>,
    secs: Option<f64>,
}

fn options() -> Options {
    let mut o = Options {
        quick: false,
        threads: vec![1, 2],
        case: None,
        secs: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--threads" => {
                o.threads = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .map(|n| vec![n])
                    .unwrap_or(o.threads)
            }
            "--case" => o.case = args.next(),
            "--secs" => o.secs = args.next().and_then(|s| s.parse().ok()),
            // `cargo bench` adds `--bench`.
            _ => {}
        }
    }
    o
}

fn external_name(j: usize) -> String {
    format!("ext-{j}.example.org")
}

/// The upstream's answer for an external name, as the cache keeps it.
fn upstream_answer(j: usize) -> Answer {
    let name = Name::from_str(&format!("{}.", external_name(j))).expect("a name");
    let mut m = Message::new(1, MessageType::Response, OpCode::Query);
    m.metadata.recursion_available = true;
    m.add_query(Query::query(name.clone(), RecordType::A));
    m.add_answer(Record::from_rdata(
        name,
        3600,
        RData::A(Ipv4Addr::new(203, 0, 113, (j % 250 + 1) as u8).into()),
    ));
    let bytes = m.to_vec().expect("encodes");
    Answer::from_upstream(&bytes, &m).expect("a plain answer")
}

fn handler() -> Arc<Handler> {
    let objects = support::services(SERVICES);
    let zone = support::zone_from(objects);
    let metrics = Arc::new(Metrics::default());
    let forward = ForwardSettings {
        policy: Policy::Random,
        timeouts: Timeouts {
            attempt: Duration::from_secs(1),
            total: Duration::from_millis(1900),
        },
        force_tcp: false,
        max_concurrent: 1000,
        health_check: Duration::from_millis(500),
        max_fails: 2,
        tls: None,
    };
    let forwarder = Arc::new(Forwarder::new(Vec::new(), forward, metrics.clone()));
    let cache = Cache::new(
        CacheSettings {
            capacity: 10_000,
            min_ttl: 5,
            max_ttl: 3600,
            negative_max_ttl: 1800,
            servfail_ttl: 5,
            prefetch: 10,
            serve_stale: Duration::ZERO,
        },
        metrics.cache.clone(),
    );
    let now = Instant::now();
    for j in 0..EXTERNAL {
        let name = wire_from_dotted(&external_name(j));
        let q = Question {
            upstream_set: forwarder.upstream_set_of(&name),
            name,
            qtype: 1,
            qclass: 1,
            dnssec_ok: false,
            checking_disabled: false,
        };
        cache.insert(&q, Arc::new(upstream_answer(j)), 3600, Kind::Success, now);
    }
    Arc::new(Handler::new(
        Arc::new(RwLock::new(zone)),
        Arc::new(ExternalResolver::new(forwarder, cache, metrics.clone())),
        metrics,
        Probe::new("cluster.local"),
    ))
}

/// A query set: the queries, and the RCODE and answer count every reply must have.
struct Case {
    name: &'static str,
    what: &'static str,
    queries: Vec<Vec<u8>>,
    rcode: u8,
    answers: u16,
}

fn cases() -> Vec<Case> {
    let edns = Some((1232, 0, false));
    vec![
        Case {
            name: "cluster",
            what: "A of a Service (1,000 spread over the zone)",
            queries: (0..1000)
                .map(|k| {
                    let i = (k * 7919 + 13) % SERVICES;
                    let name = format!("svc-{i}.ns-{}.svc.cluster.local", i % NAMESPACES);
                    dns_query(k as u16, &name, 1, edns)
                })
                .collect(),
            rcode: 0,
            answers: 1,
        },
        Case {
            name: "nxdomain",
            what: "search-path expansions of external names (999): NXDOMAIN",
            queries: (0..999)
                .map(|k| {
                    let ext = external_name(k / 3 % EXTERNAL);
                    let name = match k % 3 {
                        0 => format!("{ext}.ns-{}.svc.cluster.local", k % NAMESPACES),
                        1 => format!("{ext}.svc.cluster.local"),
                        _ => format!("{ext}.cluster.local"),
                    };
                    dns_query(k as u16, &name, 1, edns)
                })
                .collect(),
            rcode: 3,
            answers: 0,
        },
        Case {
            name: "external",
            what: "A of an external name in the cache (200)",
            queries: (0..EXTERNAL)
                .map(|j| dns_query(j as u16, &external_name(j), 1, edns))
                .collect(),
            rcode: 0,
            answers: 1,
        },
    ]
}

/// How a reply is made.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    /// As the serving loops make it: [`Handler::answer_now`] into a reused buffer.
    Served,
    /// Resolved and encoded with hickory-proto for every query, as every zone answer was
    /// before answers were kept encoded ([`answer_from_zone`], the reference path).
    Reference,
}

/// Answers `q`; the reply's length.
fn answer(handler: &Handler, path: Path, q: &[u8], out: &mut Vec<u8>) -> usize {
    out.clear();
    if path == Path::Reference {
        let query = dns_agent::dns::parse_query(q).expect("a query");
        let zone = handler.zone.read().expect("zone lock");
        match answer_from_zone(&zone, &query, Some(query.udp_limit())) {
            ZoneReply::Reply(r) => out.extend_from_slice(&r),
            _ => panic!("not a zone answer"),
        }
        return out.len();
    }
    let client = std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 244, 1, 9));
    match handler.answer_now(q, Transport::Udp, client, out) {
        Ok(true) => out.len(),
        Ok(false) => panic!("no reply"),
        Err(_) => panic!("the query waits for an upstream: not a cached answer"),
    }
}

fn check(handler: &Handler, case: &Case) {
    let mut out = Vec::new();
    for q in &case.queries {
        answer(handler, Path::Served, q, &mut out);
        let m = Message::from_vec(&out).expect("the reply parses");
        assert_eq!(
            m.metadata.response_code.low(),
            case.rcode,
            "{}: RCODE of {m:?}",
            case.name
        );
        assert_eq!(
            m.answers.len(),
            case.answers as usize,
            "{}: answers of {m:?}",
            case.name
        );
        assert_eq!(&out[..2], &q[..2], "reply ID");
        if case.name != "external" {
            let served = out.clone();
            answer(handler, Path::Reference, q, &mut out);
            assert_eq!(served, out, "{}: the reference path's bytes", case.name);
        }
    }
}

/// Queries answered per second by `threads` threads for `secs`.
fn measure(handler: &Arc<Handler>, path: Path, case: &Case, threads: usize, secs: f64) -> f64 {
    let queries = Arc::new(case.queries.clone());
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (handler, queries) = (handler.clone(), queries.clone());
            std::thread::spawn(move || {
                let mut out = Vec::new();
                let mut n = 0u64;
                let mut k = t * 7;
                let mut bytes = 0usize;
                // Checks the clock every 256 queries: a bounded loop, in count and time.
                while Instant::now() < until {
                    for _ in 0..256 {
                        bytes += answer(&handler, path, &queries[k % queries.len()], &mut out);
                        k += 1;
                    }
                    n += 256;
                }
                std::hint::black_box(bytes);
                n
            })
        })
        .collect();
    let total: u64 = handles
        .into_iter()
        .map(|h| h.join().expect("a measuring thread"))
        .sum();
    total as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let o = options();
    let secs = o.secs.unwrap_or(if o.quick { 0.3 } else { 2.0 });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let _guard = runtime.enter();
    let handler = handler();
    let cases: Vec<Case> = cases()
        .into_iter()
        .filter(|c| o.case.as_deref().is_none_or(|n| n == c.name))
        .collect();
    for c in &cases {
        check(&handler, c);
    }
    println!(
        "Userspace handler, in-process ({SERVICES} Services; `cargo bench -p dns-agent --bench \
         userspace`, {secs} s per row)\n"
    );
    println!("| case | what | path | threads | queries/s | ns per query per thread |");
    println!("|---|---|---|---:|---:|---:|");
    for c in &cases {
        let paths: &[(Path, &str)] = if c.name == "external" {
            &[(Path::Served, "served")]
        } else {
            &[
                (Path::Served, "served"),
                (Path::Reference, "re-encoded per query"),
            ]
        };
        for &(path, path_name) in paths {
            for &threads in &o.threads {
                let rate = measure(&handler, path, c, threads, secs);
                println!(
                    "| {} | {} | {path_name} | {threads} | {:.0}k | {:.0} |",
                    c.name,
                    c.what,
                    rate / 1000.0,
                    1e9 * threads as f64 / rate
                );
            }
        }
    }
}
