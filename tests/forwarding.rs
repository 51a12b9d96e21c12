//! Names outside the cluster: forwarding to upstreams and the cache of their answers, against
//! real resolvers (unbound, dnsmasq) serving local data only, and against the scriptable test
//! upstream misbehaving on purpose. Everything runs in namespaces the test creates; upstreams
//! listen on 198.51.100.0/24 addresses on the node's loopback.
//!
//! Needs root, and unbound and dnsmasq (`apt-get install unbound dnsmasq-base`).

mod support;

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Stdio,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, ResponseCode},
    rr::{DNSClass, Name, RData, Record, RecordType, rdata::SOA},
};
use support::{
    Agent, Client, LISTEN_V4, LISTEN_V6, Netns, Topology, UPSTREAM_V4, answers,
    servers::Server,
    tls::TestCa,
    upstream::{Action, Behaviour, Upstream, reply_to},
};

const UP_B: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 54);
const UP_C: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 55);
const UNBOUND: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 60);
const DNSMASQ: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 61);
/// A dnsmasq that forwards everything to the agent: a forwarding loop.
const LOOPER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 62);

// ---------------------------------------------------------------------------------------------
// Helpers.

/// Puts `ip` on the node's loopback, for another upstream.
fn add_node_addr(topo: &Topology, ip: Ipv4Addr) {
    topo.node
        .ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"]);
}

fn sock(ip: Ipv4Addr) -> SocketAddr {
    (ip, 53).into()
}

/// The agent with the XDP program on the pod's veth, forwarding to `upstreams`.
fn agent(topo: &Topology, upstreams: &[Ipv4Addr], extra: &[&str]) -> Agent {
    let mut args: Vec<String> = vec![
        "run".into(),
        "--zone-file".into(),
        support::example_cluster().display().to_string(),
        "--listen".into(),
        LISTEN_V4.to_string(),
        "--listen".into(),
        LISTEN_V6.to_string(),
        "--interface".into(),
        topo.host_if.clone(),
    ];
    for u in upstreams {
        args.extend(["--upstream".into(), u.to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Agent::start_with(topo, args)
}

fn client(topo: &Topology) -> Client {
    Client::new(&topo.pod, IpAddr::V4(LISTEN_V4))
}

/// Polls `f` until it holds, failing with `what` after `timeout`.
fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn qname(q: &Message) -> String {
    q.queries[0]
        .name()
        .to_ascii()
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

/// The agent's health check (`. NS`) or loop probe (HINFO).
fn is_probe(q: &Message) -> bool {
    let t = q.queries[0].query_type();
    (t == RecordType::NS && q.queries[0].name().is_root()) || t == RecordType::HINFO
}

fn a_record(name: &Name, ip: Ipv4Addr, ttl: u32) -> Record {
    Record::from_rdata(name.clone(), ttl, RData::A(ip.into()))
}

/// An answer with one A record.
fn a_reply(q: &Message, ip: Ipv4Addr, ttl: u32) -> Message {
    let mut r = reply_to(q);
    r.add_answer(a_record(q.queries[0].name(), ip, ttl));
    r
}

fn soa(ttl: u32, minimum: u32) -> Record {
    Record::from_rdata(
        Name::from_str("example.").unwrap(),
        ttl,
        RData::SOA(SOA::new(
            Name::from_str("ns.example.").unwrap(),
            Name::from_str("hostmaster.example.").unwrap(),
            1,
            3600,
            600,
            86400,
            minimum,
        )),
    )
}

/// Answers every name with `ip` (TTL 300).
fn answers_with(ip: Ipv4Addr) -> Behaviour {
    Arc::new(move |q: &Message| Action::Reply(a_reply(q, ip, 300)))
}

fn rcode_of(m: &Message) -> ResponseCode {
    m.metadata.response_code
}

fn ttl_of(m: &Message) -> u32 {
    m.answers
        .first()
        .or(m.authorities.first())
        .expect("a record")
        .ttl
}

// ---------------------------------------------------------------------------------------------
// Real upstreams.

#[test]
fn unbound_answers_are_cached_and_their_ttl_counts_down() {
    let topo = Topology::new();
    add_node_addr(&topo, UNBOUND);
    let unbound = Server::unbound(
        &topo.node,
        UNBOUND,
        &[
            "www.example.test. 300 IN A 192.0.2.80",
            "marker.example.test. 300 IN A 192.0.2.99",
        ],
    );
    // The agent's own countdown and hit counters (tests/kernel_cache.rs: the kernel's).
    let agent = agent(&topo, &[UNBOUND], &["--no-kernel-cache"]);
    let client = client(&topo);

    let first = client.query("www.example.test.", RecordType::A, true);
    assert_eq!(answers(&first), vec!["A 192.0.2.80"]);
    let ttl1 = ttl_of(&first);
    assert!((298..=300).contains(&ttl1), "first TTL {ttl1}");
    let nx1 = client.query("nx.example.test.", RecordType::A, true);
    assert_eq!(rcode_of(&nx1), ResponseCode::NXDomain);
    assert_eq!(nx1.authorities.len(), 1, "the SOA");
    assert_eq!(ttl_of(&nx1), 60, "min(SOA TTL 300, MINIMUM 60)");

    std::thread::sleep(Duration::from_millis(2100));
    // Another spelling of the name: the same cache entry, and the client's own question bytes.
    let q = support::query_message("wWw.ExAmple.TEST.", RecordType::A, true);
    let bytes = q.to_vec().unwrap();
    let raw = client.exchange_raw(&bytes).expect("a reply");
    let q_end = bytes.len() - 11; // the OPT record follows the question
    assert_eq!(&raw[12..q_end], &bytes[12..q_end], "the question is echoed");
    let second = Message::from_vec(&raw).unwrap();
    assert_eq!(second.metadata.id, q.metadata.id);
    assert_eq!(answers(&second), vec!["A 192.0.2.80"]);
    let ttl2 = ttl_of(&second);
    assert!(
        ttl2 + 2 <= ttl1 && ttl2 + 4 >= ttl1,
        "the TTL counts down: {ttl1} then {ttl2} about 2 s later"
    );
    let nx2 = client.query("nx.example.test.", RecordType::A, true);
    assert_eq!(rcode_of(&nx2), ResponseCode::NXDomain);
    assert!((57..=58).contains(&ttl_of(&nx2)), "{}", ttl_of(&nx2));

    // unbound logs in order: once the marker is there, so is every query before it.
    client.query("marker.example.test.", RecordType::A, true);
    unbound.wait_logged("marker.example.test. A IN");
    assert_eq!(unbound.count(" www.example.test. A IN"), 1, "cached");
    assert_eq!(
        unbound.count(" nx.example.test. A IN"),
        1,
        "negative answer cached"
    );
    assert_eq!(
        agent.metric("coredns_cache_hits_total{type=\"success\"}"),
        1.0
    );
    assert_eq!(
        agent.metric("coredns_cache_hits_total{type=\"denial\"}"),
        1.0
    );
    assert_eq!(agent.metric("coredns_cache_misses_total"), 3.0);
    assert_eq!(agent.metric("coredns_cache_entries{type=\"success\"}"), 2.0);
    assert_eq!(agent.metric("coredns_cache_entries{type=\"denial\"}"), 1.0);
    assert_eq!(
        agent.metric("coredns_forward_requests_total{to=\"198.51.100.60:53\"}"),
        3.0
    );
    assert_eq!(
        agent.metric("coredns_forward_responses_total{to=\"198.51.100.60:53\",rcode=\"NXDOMAIN\"}"),
        1.0
    );
}

#[test]
fn dnsmasq_answers_are_cached_but_its_negative_answers_without_soa_are_not() {
    let topo = Topology::new();
    add_node_addr(&topo, DNSMASQ);
    let dnsmasq = Server::dnsmasq(
        &topo.node,
        DNSMASQ,
        &[
            "--local=/test/",
            "--host-record=www.dnsmasq.test,192.0.2.81",
            "--host-record=marker.dnsmasq.test,192.0.2.99",
            "--local-ttl=120",
        ],
    );
    let _agent = agent(&topo, &[DNSMASQ], &[]);
    let client = client(&topo);
    for _ in 0..3 {
        let m = client.query("www.dnsmasq.test.", RecordType::A, false);
        assert_eq!(answers(&m), vec!["A 192.0.2.81"]);
        assert!(ttl_of(&m) <= 120);
        let nx = client.query("nx.dnsmasq.test.", RecordType::A, false);
        assert_eq!(rcode_of(&nx), ResponseCode::NXDomain);
        assert!(nx.authorities.is_empty(), "dnsmasq sends no SOA here");
    }
    client.query("marker.dnsmasq.test.", RecordType::A, false);
    dnsmasq.wait_logged("query[A] marker.dnsmasq.test");
    assert_eq!(dnsmasq.count("query[A] www.dnsmasq.test from"), 1, "cached");
    assert_eq!(
        dnsmasq.count("query[A] nx.dnsmasq.test from"),
        3,
        "RFC 2308 §5: a negative answer without SOA is not cached"
    );
}

// ---------------------------------------------------------------------------------------------
// Cache arithmetic, end to end.

#[test]
fn negative_answers_live_for_the_smaller_of_soa_ttl_and_minimum() {
    let topo = Topology::new();
    let upstream = Upstream::start(
        &topo.node,
        sock(UPSTREAM_V4),
        Arc::new(|q: &Message| {
            let mut r = reply_to(q);
            match qname(q).as_str() {
                "nodata.example" => {
                    r.add_authority(soa(600, 7));
                }
                "nx.example" => {
                    r.metadata.response_code = ResponseCode::NXDomain;
                    r.add_authority(soa(3, 900));
                }
                "capped.example" => {
                    r.metadata.response_code = ResponseCode::NXDomain;
                    r.add_authority(soa(3600, 3600));
                }
                _ => r.metadata.response_code = ResponseCode::NXDomain,
            }
            Action::Reply(r)
        }),
    );
    let agent = agent(
        &topo,
        &[UPSTREAM_V4],
        // The cache's own counters: the kernel's copy would answer the repeats before the
        // agent counts them (tests/kernel_cache.rs tests that path).
        &[
            "--cache-min-ttl",
            "0",
            "--cache-negative-max-ttl",
            "20",
            "--no-kernel-cache",
        ],
    );
    let client = client(&topo);
    let nodata = client.query("nodata.example.", RecordType::A, true);
    assert_eq!(rcode_of(&nodata), ResponseCode::NoError);
    assert!(nodata.answers.is_empty());
    assert_eq!(ttl_of(&nodata), 7, "min(600, 7)");
    let nx = client.query("nx.example.", RecordType::A, true);
    assert_eq!(rcode_of(&nx), ResponseCode::NXDomain);
    assert_eq!(ttl_of(&nx), 3, "min(3, 900)");
    let capped = client.query("capped.example.", RecordType::A, true);
    assert_eq!(ttl_of(&capped), 20, "--cache-negative-max-ttl");

    for name in ["nodata.example.", "nx.example.", "capped.example."] {
        let again = client.query(name, RecordType::A, true);
        assert_eq!(again.authorities.len(), 1);
        assert_eq!(upstream.queries_for(name), 1, "{name} came from the cache");
    }
    assert_eq!(
        agent.metric("coredns_cache_hits_total{type=\"denial\"}"),
        3.0
    );
    // nx.example lives 3 s.
    std::thread::sleep(Duration::from_millis(3200));
    let nx = client.query("nx.example.", RecordType::A, true);
    assert_eq!(rcode_of(&nx), ResponseCode::NXDomain);
    assert_eq!(
        upstream.queries_for("nx.example."),
        2,
        "expired, asked again"
    );
    assert_eq!(
        upstream.queries_for("nodata.example."),
        1,
        "7 s: still cached"
    );
}

#[test]
fn ttls_are_raised_to_the_minimum_and_cut_to_the_maximum() {
    let topo = Topology::new();
    let upstream = Upstream::start(
        &topo.node,
        sock(UPSTREAM_V4),
        Arc::new(|q: &Message| {
            let ttl = if qname(q) == "short.example" {
                1
            } else {
                100_000
            };
            Action::Reply(a_reply(q, Ipv4Addr::new(203, 0, 113, 1), ttl))
        }),
    );
    let _agent = agent(
        &topo,
        &[UPSTREAM_V4],
        &["--cache-min-ttl", "10", "--cache-max-ttl", "600"],
    );
    let client = client(&topo);
    assert_eq!(
        ttl_of(&client.query("short.example.", RecordType::A, false)),
        10
    );
    assert_eq!(
        ttl_of(&client.query("long.example.", RecordType::A, false)),
        600
    );
    std::thread::sleep(Duration::from_millis(1500));
    let short = client.query("short.example.", RecordType::A, false);
    assert_eq!(answers(&short), vec!["A 203.0.113.1"]);
    assert_eq!(ttl_of(&short), 8, "10 s, 1.5 s later");
    assert_eq!(
        upstream.queries_for("short.example."),
        1,
        "TTL 1 kept for 10 s"
    );
}

#[test]
fn the_least_recently_used_entry_is_evicted_at_capacity() {
    let topo = Topology::new();
    let upstream = Upstream::start(
        &topo.node,
        sock(UPSTREAM_V4),
        answers_with(Ipv4Addr::new(203, 0, 113, 5)),
    );
    // The recency order: only the agent's hits count in it (the kernel's copy answers repeats
    // without the agent seeing them), so the kernel's copy is off here.
    let agent = agent(
        &topo,
        &[UPSTREAM_V4],
        &["--cache-size", "2", "--no-kernel-cache"],
    );
    let client = client(&topo);
    for name in [
        "a.example.",
        "b.example.",
        "c.example.",
        "b.example.",
        "a.example.",
    ] {
        assert_eq!(
            answers(&client.query(name, RecordType::A, false)),
            vec!["A 203.0.113.5"]
        );
    }
    // a was evicted by c; b was used after c, so a's return evicted c.
    assert_eq!(upstream.queries_for("a.example."), 2);
    assert_eq!(upstream.queries_for("b.example."), 1);
    assert_eq!(upstream.queries_for("c.example."), 1);
    assert_eq!(
        agent.metric("coredns_cache_evictions_total{type=\"success\"}"),
        2.0
    );
    assert_eq!(agent.metric("coredns_cache_entries{type=\"success\"}"), 2.0);
    client.query("b.example.", RecordType::A, false);
    assert_eq!(upstream.queries_for("b.example."), 1, "b is still cached");
    client.query("c.example.", RecordType::A, false);
    assert_eq!(upstream.queries_for("c.example."), 2, "c was evicted");
}

#[test]
fn popular_names_are_refreshed_before_they_expire() {
    let topo = Topology::new();
    // Each answer says how many times the upstream was asked: 203.0.113.<n>.
    let asked = Arc::new(AtomicU8::new(0));
    let upstream = {
        let asked = asked.clone();
        Upstream::start(
            &topo.node,
            sock(UPSTREAM_V4),
            Arc::new(move |q: &Message| {
                if is_probe(q) {
                    return Action::Reply(reply_to(q));
                }
                let n = asked.fetch_add(1, Relaxed) + 1;
                Action::Reply(a_reply(q, Ipv4Addr::new(203, 0, 113, n), 6))
            }),
        )
    };
    let agent = agent(
        &topo,
        &[UPSTREAM_V4],
        &["--cache-min-ttl", "0", "--cache-prefetch", "2"],
    );
    let client = client(&topo);
    let q = || client.query("hot.example.", RecordType::A, false);
    let cached = || agent.kernel_counters()["answered_cached"];
    assert_eq!(answers(&q()), vec!["A 203.0.113.1"]);
    let t0 = Instant::now();
    // Early in the TTL the kernel's copy answers: the agent does not see these.
    wait_until(
        "the kernel answers the name",
        Duration::from_secs(2),
        || {
            let before = cached();
            assert_eq!(answers(&q()), vec!["A 203.0.113.1"]);
            cached() > before
        },
    );
    assert_eq!(upstream.queries_for("hot.example."), 1);
    // The last ceil(10 % of 6) = 1 s is the agent's: the kernel passes the name up, the agent
    // answers it from its cache and counts it; asked twice there, it is refreshed in the
    // background.
    std::thread::sleep(Duration::from_millis(5300).saturating_sub(t0.elapsed()));
    let before = cached();
    for _ in 0..2 {
        let late = q();
        assert_eq!(answers(&late), vec!["A 203.0.113.1"]);
        assert!(ttl_of(&late) <= 1, "TTL {}", ttl_of(&late));
    }
    assert_eq!(cached(), before, "the agent answered the prefetch window");
    wait_until(
        "the prefetch reaches the upstream",
        Duration::from_secs(2),
        || upstream.queries_for("hot.example.") == 2,
    );
    assert_eq!(agent.metric("coredns_cache_prefetch_total"), 1.0);
    // Past the first answer's expiry: the refreshed answer, from the kernel's copy again.
    std::thread::sleep(Duration::from_millis(6500).saturating_sub(t0.elapsed()));
    let before = cached();
    let after = q();
    assert_eq!(answers(&after), vec!["A 203.0.113.2"]);
    assert!(ttl_of(&after) >= 2, "TTL {}", ttl_of(&after));
    assert_eq!(
        cached(),
        before + 1,
        "the kernel answers the refreshed name"
    );
    assert_eq!(upstream.queries_for("hot.example."), 2);
    assert_eq!(
        agent.metric("coredns_cache_misses_total"),
        1.0,
        "never missed again"
    );
}

// ---------------------------------------------------------------------------------------------
// Failures.

/// An upstream that answers `203.0.113.7` (TTL 1) until `dead` is set, then nothing.
fn mortal(topo: &Topology) -> (Upstream, Arc<AtomicBool>) {
    let dead = Arc::new(AtomicBool::new(false));
    let up = {
        let dead = dead.clone();
        Upstream::start(
            &topo.node,
            sock(UPSTREAM_V4),
            Arc::new(move |q: &Message| {
                if dead.load(Relaxed) {
                    Action::Drop
                } else {
                    Action::Reply(a_reply(q, Ipv4Addr::new(203, 0, 113, 7), 1))
                }
            }),
        )
    };
    (up, dead)
}

const FAST_FAIL: [&str; 6] = [
    "--cache-min-ttl",
    "0",
    "--upstream-timeout",
    "400ms",
    "--forward-timeout",
    "800ms",
];

#[test]
fn stale_answers_are_served_when_every_upstream_fails() {
    let topo = Topology::new();
    let (upstream, dead) = mortal(&topo);
    let agent = agent(&topo, &[UPSTREAM_V4], &FAST_FAIL);
    let client = client(&topo);
    let fresh = client.query("stale.example.", RecordType::A, true);
    assert_eq!(answers(&fresh), vec!["A 203.0.113.7"]);
    assert_eq!(ttl_of(&fresh), 1);
    dead.store(true, Relaxed);
    std::thread::sleep(Duration::from_millis(1300));

    let started = Instant::now();
    let stale = client.query("stale.example.", RecordType::A, true);
    assert_eq!(rcode_of(&stale), ResponseCode::NoError);
    assert_eq!(answers(&stale), vec!["A 203.0.113.7"]);
    assert_eq!(ttl_of(&stale), 30, "RFC 8767: stale answers carry TTL 30");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let asked = upstream.queries_for("stale.example.");
    assert!(asked >= 2, "the refresh was tried first ({asked})");
    assert_eq!(agent.metric("coredns_cache_served_stale_total"), 1.0);

    // Within the 30 s recheck timer: stale again, without asking upstream.
    let again = client.query("stale.example.", RecordType::A, true);
    assert_eq!(answers(&again), vec!["A 203.0.113.7"]);
    assert_eq!(ttl_of(&again), 30);
    assert_eq!(upstream.queries_for("stale.example."), asked);
    assert_eq!(agent.metric("coredns_cache_served_stale_total"), 2.0);
    assert_eq!(agent.metric("xdns_forward_failures_total"), 0.0);
}

#[test]
fn without_serve_stale_a_dead_upstream_means_servfail() {
    let topo = Topology::new();
    let (upstream, dead) = mortal(&topo);
    let mut extra = FAST_FAIL.to_vec();
    extra.extend(["--serve-stale", "0"]);
    let agent = agent(&topo, &[UPSTREAM_V4], &extra);
    let client = client(&topo);
    assert_eq!(
        answers(&client.query("stale.example.", RecordType::A, true)),
        vec!["A 203.0.113.7"]
    );
    dead.store(true, Relaxed);
    std::thread::sleep(Duration::from_millis(1300));
    let m = client.query("stale.example.", RecordType::A, true);
    assert_eq!(rcode_of(&m), ResponseCode::ServFail);
    assert!(m.answers.is_empty());
    assert!(upstream.queries_for("stale.example.") >= 2);
    assert_eq!(agent.metric("coredns_cache_served_stale_total"), 0.0);
    assert_eq!(agent.metric("xdns_forward_failures_total"), 1.0);
}

#[test]
fn failover_moves_past_timeouts_and_servfail_and_failures_are_remembered_briefly() {
    let topo = Topology::new();
    add_node_addr(&topo, UP_B);
    add_node_addr(&topo, UP_C);
    let a = Upstream::start(&topo.node, sock(UPSTREAM_V4), Arc::new(|_| Action::Drop));
    let b = Upstream::start(
        &topo.node,
        sock(UP_B),
        Arc::new(|q: &Message| {
            let mut r = reply_to(q);
            r.metadata.response_code = ResponseCode::ServFail;
            Action::Reply(r)
        }),
    );
    let c = Upstream::start(
        &topo.node,
        sock(UP_C),
        Arc::new(|q: &Message| {
            let mut r = a_reply(q, Ipv4Addr::new(203, 0, 113, 3), 300);
            if qname(q) == "broken.example" {
                r = reply_to(q);
                r.metadata.response_code = ResponseCode::ServFail;
            }
            Action::Reply(r)
        }),
    );
    let agent = agent(
        &topo,
        &[UPSTREAM_V4, UP_B, UP_C],
        &[
            "--upstream-policy",
            "sequential",
            "--upstream-timeout",
            "300ms",
            // No health checks: which upstream is asked depends on the policy alone.
            "--max-fails",
            "0",
            "--cache-servfail-ttl",
            "2",
        ],
    );
    let client = client(&topo);

    let started = Instant::now();
    let m = client.query("www.example.", RecordType::A, false);
    assert_eq!(answers(&m), vec!["A 203.0.113.3"]);
    assert!(started.elapsed() < Duration::from_millis(1900));
    for (up, n) in [(&a, 1), (&b, 1), (&c, 1)] {
        assert_eq!(up.queries_for("www.example."), n, "{}", up.addr);
    }
    let metric = |s: &str| agent.metric(s);
    assert_eq!(
        metric("coredns_forward_requests_total{to=\"198.51.100.53:53\"}"),
        1.0
    );
    assert_eq!(
        metric("coredns_forward_responses_total{to=\"198.51.100.54:53\",rcode=\"SERVFAIL\"}"),
        1.0
    );
    assert_eq!(
        metric("coredns_forward_responses_total{to=\"198.51.100.55:53\",rcode=\"NOERROR\"}"),
        1.0
    );

    // Every upstream fails: SERVFAIL. The one that timed out gets a second chance, the ones
    // that answered SERVFAIL do not.
    let m = client.query("broken.example.", RecordType::A, false);
    assert_eq!(rcode_of(&m), ResponseCode::ServFail);
    assert_eq!(a.queries_for("broken.example."), 2);
    assert_eq!(b.queries_for("broken.example."), 1);
    assert_eq!(c.queries_for("broken.example."), 1);
    // Remembered for --cache-servfail-ttl 2: no upstream is asked meanwhile.
    let m = client.query("broken.example.", RecordType::A, false);
    assert_eq!(rcode_of(&m), ResponseCode::ServFail);
    assert_eq!(c.queries_for("broken.example."), 1);
    std::thread::sleep(Duration::from_millis(2200));
    let m = client.query("broken.example.", RecordType::A, false);
    assert_eq!(rcode_of(&m), ResponseCode::ServFail);
    assert_eq!(
        c.queries_for("broken.example."),
        2,
        "asked again once the failure expired"
    );
    assert_eq!(metric("xdns_forward_failures_total"), 3.0);
}

#[test]
fn policies_order_the_upstreams() {
    let topo = Topology::new();
    add_node_addr(&topo, UP_B);
    let _a = Upstream::start(
        &topo.node,
        sock(UPSTREAM_V4),
        answers_with(Ipv4Addr::new(203, 0, 113, 1)),
    );
    let _b = Upstream::start(
        &topo.node,
        sock(UP_B),
        answers_with(Ipv4Addr::new(203, 0, 113, 2)),
    );
    // Who answered each of 20 distinct names (distinct: the cache answers none of them).
    let run = |policy: &str| -> Vec<String> {
        let agent = agent(&topo, &[UPSTREAM_V4, UP_B], &["--upstream-policy", policy]);
        let client = client(&topo);
        let got = (0..20)
            .map(|i| {
                answers(&client.query(&format!("{policy}-{i}.example."), RecordType::A, false))
                    .join("")
            })
            .collect();
        drop(agent);
        got
    };
    let from_a = "A 203.0.113.1".to_string();
    let from_b = "A 203.0.113.2".to_string();

    let seq = run("sequential");
    assert!(seq.iter().all(|s| *s == from_a), "sequential: {seq:?}");

    let rr = run("round-robin");
    for pair in rr.chunks(2) {
        assert_ne!(pair[0], pair[1], "round-robin alternates: {rr:?}");
    }
    assert_eq!(rr.iter().filter(|s| **s == from_a).count(), 10, "{rr:?}");

    // 20 fair coin flips all alike: 2 in a million.
    let random = run("random");
    assert!(
        random.contains(&from_a) && random.contains(&from_b),
        "random: {random:?}"
    );
}

#[test]
fn health_checks_mark_an_upstream_down_and_up_again() {
    let topo = Topology::new();
    add_node_addr(&topo, UP_B);
    let alive = Arc::new(AtomicBool::new(false));
    let a = {
        let alive = alive.clone();
        Upstream::start(
            &topo.node,
            sock(UPSTREAM_V4),
            Arc::new(move |q: &Message| {
                if alive.load(Relaxed) {
                    Action::Reply(a_reply(q, Ipv4Addr::new(203, 0, 113, 1), 300))
                } else {
                    Action::Drop
                }
            }),
        )
    };
    let b = Upstream::start(
        &topo.node,
        sock(UP_B),
        answers_with(Ipv4Addr::new(203, 0, 113, 2)),
    );
    let agent = agent(
        &topo,
        &[UPSTREAM_V4, UP_B],
        &[
            "--upstream-policy",
            "sequential",
            "--upstream-timeout",
            "300ms",
            "--health-check",
            "200ms",
            "--max-fails",
            "2",
        ],
    );
    let client = client(&topo);
    let healthy = "xdns_forward_upstream_healthy{to=\"198.51.100.53:53\"}";
    assert_eq!(agent.metric(healthy), 1.0);

    // A times out, B answers; the failure starts A's health checks.
    let m = client.query("one.example.", RecordType::A, false);
    assert_eq!(answers(&m), vec!["A 203.0.113.2"]);
    assert_eq!(a.queries_for("one.example."), 1);
    wait_until("A marked down", Duration::from_secs(5), || {
        agent.metric(healthy) == 0.0
    });
    assert!(
        agent.metric("coredns_forward_healthcheck_failures_total{to=\"198.51.100.53:53\"}") >= 2.0
    );
    assert_eq!(
        agent.metric("coredns_forward_healthcheck_failures_total{to=\"198.51.100.54:53\"}"),
        0.0
    );

    // Down: skipped, although first in the order.
    let m = client.query("two.example.", RecordType::A, false);
    assert_eq!(answers(&m), vec!["A 203.0.113.2"]);
    assert_eq!(a.queries_for("two.example."), 0);

    alive.store(true, Relaxed);
    wait_until("A up again", Duration::from_secs(5), || {
        agent.metric(healthy) == 1.0
    });
    let m = client.query("three.example.", RecordType::A, false);
    assert_eq!(answers(&m), vec!["A 203.0.113.1"], "A is first again");
    assert_eq!(b.queries_for("three.example."), 0);
    assert_eq!(
        agent.metric("coredns_forward_healthcheck_broken_total"),
        0.0
    );
}

#[test]
fn when_every_upstream_is_down_all_are_tried_anyway() {
    let topo = Topology::new();
    add_node_addr(&topo, UP_B);
    // 0: silent; 1: answers queries but not health checks.
    let mode = Arc::new(AtomicU8::new(0));
    let behaviour = |ip: Ipv4Addr| -> Behaviour {
        let mode = mode.clone();
        Arc::new(move |q: &Message| match mode.load(Relaxed) {
            1 if !is_probe(q) => Action::Reply(a_reply(q, ip, 300)),
            _ => Action::Drop,
        })
    };
    let _a = Upstream::start(
        &topo.node,
        sock(UPSTREAM_V4),
        behaviour(Ipv4Addr::new(203, 0, 113, 1)),
    );
    let _b = Upstream::start(
        &topo.node,
        sock(UP_B),
        behaviour(Ipv4Addr::new(203, 0, 113, 2)),
    );
    let agent = agent(
        &topo,
        &[UPSTREAM_V4, UP_B],
        &[
            "--upstream-policy",
            "sequential",
            "--upstream-timeout",
            "300ms",
            "--forward-timeout",
            "1s",
            "--health-check",
            "200ms",
        ],
    );
    let client = client(&topo);
    let m = client.query("first.example.", RecordType::A, false);
    assert_eq!(rcode_of(&m), ResponseCode::ServFail);
    wait_until("both marked down", Duration::from_secs(5), || {
        agent.metric("xdns_forward_upstream_healthy{to=\"198.51.100.53:53\"}") == 0.0
            && agent.metric("xdns_forward_upstream_healthy{to=\"198.51.100.54:53\"}") == 0.0
    });
    mode.store(1, Relaxed);
    let m = client.query("second.example.", RecordType::A, false);
    assert_eq!(
        answers(&m),
        vec!["A 203.0.113.1"],
        "tried in policy order although down"
    );
    assert!(agent.metric("coredns_forward_healthcheck_broken_total") >= 1.0);
}

#[test]
fn over_the_concurrency_limit_queries_are_refused() {
    let topo = Topology::new();
    let upstream = Upstream::start(
        &topo.node,
        sock(UPSTREAM_V4),
        Arc::new(|q: &Message| {
            Action::Delayed(
                Duration::from_millis(500),
                Box::new(Action::Reply(a_reply(
                    q,
                    Ipv4Addr::new(203, 0, 113, 9),
                    300,
                ))),
            )
        }),
    );
    let agent = agent(&topo, &[UPSTREAM_V4], &["--max-concurrent", "2"]);
    let client = client(&topo);
    // Three distinct names (one shared query would serve identical ones) at once.
    for i in 0..3 {
        let q = support::query_message(&format!("c{i}.example."), RecordType::A, false);
        client.send_raw(&q.to_vec().unwrap());
    }
    let mut rcodes: Vec<ResponseCode> = (0..3)
        .map(|_| Message::from_vec(&client.recv_raw().expect("a reply")).unwrap())
        .map(|m| rcode_of(&m))
        .collect();
    rcodes.sort_by_key(|r| u16::from(*r));
    assert_eq!(
        rcodes,
        vec![
            ResponseCode::NoError,
            ResponseCode::NoError,
            ResponseCode::Refused
        ]
    );
    let asked: usize = (0..3)
        .map(|i| upstream.queries_for(&format!("c{i}.example.")))
        .sum();
    assert_eq!(asked, 2, "the refused one never went upstream");
    assert_eq!(
        agent.metric("coredns_forward_max_concurrent_rejects_total"),
        1.0
    );
    // Not a failure of the upstream: nothing was remembered, the name works now.
    let refused = (0..3)
        .find(|i| upstream.queries_for(&format!("c{i}.example.")) == 0)
        .expect("one name was refused");
    let m = client.query(&format!("c{refused}.example."), RecordType::A, false);
    assert_eq!(answers(&m), vec!["A 203.0.113.9"]);
}

#[test]
fn identical_misses_share_one_upstream_query() {
    let topo = Topology::new();
    let upstream = Upstream::start(
        &topo.node,
        sock(UPSTREAM_V4),
        Arc::new(|q: &Message| {
            Action::Delayed(
                Duration::from_millis(400),
                Box::new(Action::Reply(a_reply(
                    q,
                    Ipv4Addr::new(203, 0, 113, 4),
                    300,
                ))),
            )
        }),
    );
    // No cache: only sharing the query in flight can save upstream queries.
    let agent = agent(&topo, &[UPSTREAM_V4], &["--cache-size", "0"]);
    let client = client(&topo);
    let mut ids = Vec::new();
    for _ in 0..20 {
        let q = support::query_message("same.example.", RecordType::A, false);
        ids.push(q.metadata.id);
        client.send_raw(&q.to_vec().unwrap());
    }
    let mut answered = Vec::new();
    for _ in 0..20 {
        let m = Message::from_vec(&client.recv_raw().expect("a reply")).unwrap();
        assert_eq!(answers(&m), vec!["A 203.0.113.4"]);
        answered.push(m.metadata.id);
    }
    ids.sort();
    answered.sort();
    assert_eq!(answered, ids, "every query answered with its own ID");
    assert_eq!(upstream.queries_for("same.example."), 1);
    assert_eq!(agent.metric("coredns_cache_misses_total"), 20.0);
    // Once it landed, the next miss is a new query (there is no cache to answer it).
    client.query("same.example.", RecordType::A, false);
    assert_eq!(upstream.queries_for("same.example."), 2);
}

#[test]
fn many_queries_on_one_tcp_connection_are_answered_and_a_slow_one_holds_up_none() {
    use std::io::{Read as _, Write as _};
    let topo = Topology::new();
    let _upstream = Upstream::start(
        &topo.node,
        sock(UPSTREAM_V4),
        Arc::new(|q: &Message| {
            let reply = Action::Reply(a_reply(q, Ipv4Addr::new(203, 0, 113, 7), 300));
            if qname(q) == "slow.example" {
                Action::Delayed(Duration::from_millis(500), Box::new(reply))
            } else {
                reply
            }
        }),
    );
    let _agent = agent(&topo, &[UPSTREAM_V4], &[]);
    let mut tcp = topo.pod.enter(|| {
        std::net::TcpStream::connect_timeout(&sock(LISTEN_V4), Duration::from_secs(3))
            .expect("TCP connect")
    });
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The slow name first, then 300 cluster names, all in one write: the client pipelines
    // (RFC 7766 §6.2.1.1).
    let cluster = [
        "web.shop.svc.cluster.local.",
        "10-1-2-3.shop.pod.cluster.local.",
    ];
    let mut batch = Vec::new();
    let mut frame = |id: u16, name: &str| {
        let mut q = support::query_message(name, RecordType::A, false);
        q.metadata.id = id;
        let q = q.to_vec().unwrap();
        batch.extend_from_slice(&(q.len() as u16).to_be_bytes());
        batch.extend_from_slice(&q);
    };
    frame(0, "slow.example.");
    for id in 1..=300u16 {
        frame(id, cluster[id as usize % 2]);
    }
    let started = Instant::now();
    tcp.write_all(&batch).unwrap();
    let mut order = Vec::new();
    for _ in 0..301 {
        let mut len = [0u8; 2];
        tcp.read_exact(&mut len).expect("a reply length");
        let mut reply = vec![0u8; u16::from_be_bytes(len) as usize];
        tcp.read_exact(&mut reply).expect("a reply");
        let m = Message::from_vec(&reply).expect("a reply that parses");
        let id = m.metadata.id;
        let want = if id == 0 {
            "A 203.0.113.7"
        } else if id % 2 == 1 {
            "A 10.1.2.3"
        } else {
            "A 10.96.10.20"
        };
        assert_eq!(answers(&m), vec![want], "reply {id}");
        order.push((id, started.elapsed()));
    }
    let mut ids: Vec<u16> = order.iter().map(|(id, _)| *id).collect();
    ids.sort();
    assert_eq!(
        ids,
        (0..=300).collect::<Vec<_>>(),
        "every query answered once"
    );
    // The cluster names did not wait for the slow upstream: they came first.
    assert_eq!(
        order.last().unwrap().0,
        0,
        "the slow answer last: {order:?}"
    );
    assert!(
        order[299].1 < Duration::from_millis(400),
        "the cluster answers waited for the slow one: {:?}",
        order[299].1
    );
    // The connection stays usable after all that.
    let q = support::query_message("web.shop.svc.cluster.local.", RecordType::A, false)
        .to_vec()
        .unwrap();
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    tcp.write_all(&framed).unwrap();
    let mut len = [0u8; 2];
    tcp.read_exact(&mut len).expect("a reply length");
    let mut reply = vec![0u8; u16::from_be_bytes(len) as usize];
    tcp.read_exact(&mut reply).expect("a reply");
    assert_eq!(
        answers(&Message::from_vec(&reply).unwrap()),
        vec!["A 10.96.10.20"]
    );
}

// ---------------------------------------------------------------------------------------------
// Transports and spoofing.

#[test]
fn truncated_upstream_answers_are_retried_over_tcp() {
    let topo = Topology::new();
    let truncating: Behaviour = Arc::new(|q: &Message| {
        let mut r = reply_to(q);
        r.metadata.truncation = true;
        Action::Reply(r)
    });
    let full: Behaviour = Arc::new(|q: &Message| {
        let n = if qname(q) == "huge.example" { 100 } else { 40 };
        let mut r = reply_to(q);
        for i in 0..n {
            r.add_answer(a_record(
                q.queries[0].name(),
                Ipv4Addr::new(203, 0, 113, i),
                300,
            ));
        }
        Action::Reply(r)
    });
    let upstream = Upstream::start_with_tcp(&topo.node, sock(UPSTREAM_V4), truncating, full);
    let _agent = agent(&topo, &[UPSTREAM_V4], &[]);
    let client = client(&topo);

    let m = client.query("big.example.", RecordType::A, true);
    assert!(!m.metadata.truncation);
    assert_eq!(
        m.answers.len(),
        40,
        "the complete answer, from the TCP retry"
    );
    assert_eq!(upstream.queries_for("big.example."), 2);
    assert_eq!(upstream.tcp_queries_for("big.example."), 1);

    // Too big for the client's UDP: TC; its TCP retry is answered from the cache.
    let q = support::query_message("huge.example.", RecordType::A, true);
    let bytes = q.to_vec().unwrap();
    let udp = Message::from_vec(&client.exchange_raw(&bytes).unwrap()).unwrap();
    assert!(udp.metadata.truncation);
    assert!(udp.answers.is_empty());
    let tcp = Message::from_vec(&client.query_tcp(&bytes)).unwrap();
    assert_eq!(tcp.answers.len(), 100);
    assert_eq!(upstream.queries_for("huge.example."), 2, "one UDP, one TCP");
}

#[test]
fn force_tcp_never_uses_udp() {
    let topo = Topology::new();
    let upstream = Upstream::start(
        &topo.node,
        sock(UPSTREAM_V4),
        answers_with(Ipv4Addr::new(203, 0, 113, 6)),
    );
    let _agent = agent(&topo, &[UPSTREAM_V4], &["--force-tcp"]);
    let client = client(&topo);
    let m = client.query("tcp.example.", RecordType::A, false);
    assert_eq!(answers(&m), vec!["A 203.0.113.6"]);
    assert_eq!(upstream.tcp_queries_for("tcp.example."), 1);
    assert_eq!(upstream.queries_for("tcp.example."), 1, "no UDP query");
}

#[test]
fn spoofed_and_garbage_replies_are_ignored() {
    let topo = Topology::new();
    add_node_addr(&topo, UP_B);
    let spoofs = |q: &Message| -> Vec<Vec<u8>> {
        let fake = Ipv4Addr::new(192, 0, 2, 66);
        let mut wrong_id = a_reply(q, fake, 300);
        wrong_id.metadata.id = q.metadata.id.wrapping_add(1);
        let mut other_name = reply_to(q);
        other_name.queries[0].set_name(Name::from_str("other.example.").unwrap());
        other_name.add_answer(a_record(
            &Name::from_str("other.example.").unwrap(),
            fake,
            300,
        ));
        let mut other_type = reply_to(q);
        other_type.queries[0].set_query_type(RecordType::AAAA);
        let mut other_class = a_reply(q, fake, 300);
        other_class.queries[0].set_query_class(DNSClass::CH);
        let mut not_a_response = a_reply(q, fake, 300);
        not_a_response.metadata.message_type = hickory_proto::op::MessageType::Query;
        vec![
            b"\x00\x01garbage".to_vec(),
            vec![0xff; 40],
            wrong_id.to_vec().unwrap(),
            other_name.to_vec().unwrap(),
            other_type.to_vec().unwrap(),
            other_class.to_vec().unwrap(),
            not_a_response.to_vec().unwrap(),
        ]
    };
    let a = Upstream::start(
        &topo.node,
        sock(UPSTREAM_V4),
        Arc::new(move |q: &Message| {
            let mut all = spoofs(q);
            // The real answer last, except for names that only ever get spoofs.
            if qname(q) != "never.example" {
                all.push(
                    a_reply(q, Ipv4Addr::new(203, 0, 113, 77), 300)
                        .to_vec()
                        .unwrap(),
                );
            }
            Action::Many(all)
        }),
    );
    let b = Upstream::start(
        &topo.node,
        sock(UP_B),
        answers_with(Ipv4Addr::new(203, 0, 113, 2)),
    );
    let agent = agent(
        &topo,
        &[UPSTREAM_V4, UP_B],
        &[
            "--upstream-policy",
            "sequential",
            "--upstream-timeout",
            "300ms",
        ],
    );
    let client = client(&topo);

    let m = client.query("real.example.", RecordType::A, false);
    assert_eq!(
        answers(&m),
        vec!["A 203.0.113.77"],
        "the real answer after the spoofs"
    );
    assert_eq!(a.queries_for("real.example."), 1);
    assert_eq!(b.queries_for("real.example."), 0, "no timeout, no failover");
    assert_eq!(
        agent.metric("coredns_forward_requests_total{to=\"198.51.100.53:53\"}"),
        1.0
    );

    // Only spoofs: A times out and B answers.
    let m = client.query("never.example.", RecordType::A, false);
    assert_eq!(answers(&m), vec!["A 203.0.113.2"]);
    assert_eq!(a.queries_for("never.example."), 1);
    assert_eq!(b.queries_for("never.example."), 1);
}

// ---------------------------------------------------------------------------------------------
// Forwarding loops.

/// dnsmasq forwarding every query to the agent's listen address: an upstream that loops.
fn looper(topo: &Topology) -> Server {
    add_node_addr(topo, LOOPER);
    Server::dnsmasq(
        &topo.node,
        LOOPER,
        &[&format!("--server={LISTEN_V4}"), "--cache-size=0"],
    )
}

#[test]
fn an_upstream_that_forwards_back_is_detected_and_never_used() {
    let topo = Topology::new();
    let looper = looper(&topo);
    let good = Upstream::start(
        &topo.node,
        sock(UPSTREAM_V4),
        answers_with(Ipv4Addr::new(203, 0, 113, 8)),
    );
    let agent = agent(
        &topo,
        &[LOOPER, UPSTREAM_V4],
        &["--upstream-policy", "sequential"],
    );
    let detected = "xdns_forward_loop_detected{to=\"198.51.100.62:53\"}";
    wait_until("the loop is detected", Duration::from_secs(10), || {
        agent.metric(detected) == 1.0
    });
    assert_eq!(
        agent.metric("xdns_forward_loop_detected{to=\"198.51.100.53:53\"}"),
        0.0
    );
    let log = agent.log();
    assert!(
        log.contains("forwarding loop") && log.contains("198.51.100.62:53"),
        "the log names the looping upstream:\n{log}"
    );
    // The probe went through dnsmasq, and came back to the agent.
    looper.wait_logged("query[HINFO]");

    let client = client(&topo);
    for i in 0..5 {
        let name = format!("l{i}.example.");
        let m = client.query(&name, RecordType::A, false);
        assert_eq!(answers(&m), vec!["A 203.0.113.8"]);
        assert_eq!(good.queries_for(&name), 1);
    }
    assert_eq!(
        agent.metric("coredns_forward_requests_total{to=\"198.51.100.62:53\"}"),
        0.0,
        "the looping upstream is never asked, though first in the order"
    );
    assert_eq!(looper.count("query[A] l"), 0);
}

#[test]
fn an_agent_whose_every_upstream_loops_stops_and_says_why() {
    let topo = Topology::new();
    let _looper = looper(&topo);
    let dir = tempfile::tempdir().unwrap();
    let stderr = dir.path().join("stderr");
    let pin_path = PathBuf::from("/sys/fs/bpf").join(support::unique("xdns-t"));
    let mut child = topo
        .node
        .command(support::agent_bin())
        .args([
            "run",
            "--zone-file",
            &support::example_cluster().display().to_string(),
            "--listen",
            &LISTEN_V4.to_string(),
            "--upstream",
            &LOOPER.to_string(),
            "--no-kernel",
            "--pin-path",
            &pin_path.display().to_string(),
            "--metrics-addr",
            "127.0.0.1:9253",
        ])
        .stdout(Stdio::null())
        .stderr(File::create(&stderr).unwrap())
        .spawn()
        .expect("spawning dns-agent");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the agent kept running with a looping upstream only:\n{}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = std::fs::remove_dir_all(&pin_path);
    let log = std::fs::read_to_string(&stderr).unwrap();
    assert!(!status.success(), "exit status {status}:\n{log}");
    assert!(
        log.contains("every one forwards our queries back") && log.contains("198.51.100.62:53"),
        "the error names the loop and the upstream:\n{log}"
    );
}

// ---------------------------------------------------------------------------------------------
// DNS over TLS: unbound serving DoT with certificates from CAs the tests make.

const DOT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 70);
const DOT_EXPIRED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 71);
const DOT_ROGUE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 72);
const DOT_NAME: &str = "dns.example.test";

/// TCP connections accepted in `ns` so far (the kernel's `Tcp: PassiveOpens`): counted on the
/// server's side, by the kernel.
fn passive_opens(ns: &Netns) -> u64 {
    let out = ns
        .command("cat")
        .arg("/proc/net/snmp")
        .output()
        .expect("reading /proc/net/snmp");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (
        tcp.next().expect("Tcp header"),
        tcp.next().expect("Tcp values"),
    );
    let i = names
        .split_whitespace()
        .position(|n| n == "PassiveOpens")
        .expect("PassiveOpens");
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// Established TCP connections whose local port is 853 in `ns`: the server's ends.
fn dot_connections(ns: &Netns) -> usize {
    let out = ns
        .command("ss")
        .args(["-Htn", "state", "established", "( sport = :853 )"])
        .output()
        .expect("running ss");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

fn tls_upstream(ip: Ipv4Addr, name: &str) -> String {
    format!("tls://{ip}#{name}")
}

/// The `to` label of a TLS upstream.
fn to(ip: Ipv4Addr, name: &str) -> String {
    format!("tls://{ip}:853#{name}")
}

fn agent_tls_only(topo: &Topology, upstream: &str, ca_file: &str) -> Agent {
    agent(
        topo,
        &[],
        &["--upstream", upstream, "--upstream-ca", ca_file],
    )
}

#[test]
fn answers_come_over_tls_and_nothing_reaches_the_plain_port() {
    let topo = Topology::new();
    add_node_addr(&topo, DOT);
    let ca = TestCa::new("xdns test CA");
    let unbound = Server::unbound_dot(&topo.node, DOT, &ca.server_cert(DOT_NAME, false), "");
    let agent = agent_tls_only(&topo, &tls_upstream(DOT, DOT_NAME), &ca.file());
    let client = client(&topo);

    for _ in 0..3 {
        let m = client.query("www.example.test.", RecordType::A, true);
        assert_eq!(answers(&m), vec!["A 192.0.2.80"]);
        let m = client.query("mail.example.test.", RecordType::A, false);
        assert_eq!(answers(&m), vec!["A 192.0.2.81"]);
    }
    let nx = client.query("nx.example.test.", RecordType::A, true);
    assert_eq!(rcode_of(&nx), ResponseCode::NXDomain);

    unbound.wait_logged("nx.example.test. A IN");
    assert_eq!(unbound.count(" www.example.test. A IN"), 1, "cached");
    let (queries, tls) = unbound.queries_and_tls();
    assert!(queries >= 3, "unbound saw {queries} queries");
    assert_eq!(tls, queries, "every query unbound received came over TLS");
    let to = to(DOT, DOT_NAME);
    assert_eq!(
        agent.metric(&format!("coredns_forward_requests_total{{to=\"{to}\"}}")),
        3.0
    );
    assert_eq!(
        agent.metric(&format!(
            "coredns_forward_responses_total{{to=\"{to}\",rcode=\"NXDOMAIN\"}}"
        )),
        1.0
    );
    // The loop probe and three queries, one after the other: one connection, one handshake.
    assert_eq!(
        agent.metric(&format!(
            "xdns_forward_tls_connections_total{{to=\"{to}\"}}"
        )),
        1.0
    );
    assert_eq!(
        agent.metric(&format!("xdns_forward_tls_open_connections{{to=\"{to}\"}}")),
        1.0
    );
    assert_eq!(
        dot_connections(&topo.node),
        1,
        "one connection, server side"
    );
    assert_eq!(
        agent.metric(&format!(
            "xdns_forward_tls_handshake_failures_total{{to=\"{to}\"}}"
        )),
        0.0
    );
}

#[test]
fn the_system_ca_store_is_used_without_upstream_ca() {
    let topo = Topology::new();
    add_node_addr(&topo, DOT);
    let ca = TestCa::new("xdns test CA");
    let _unbound = Server::unbound_dot(&topo.node, DOT, &ca.server_cert(DOT_NAME, false), "");
    let ca_file = ca.file();
    // The system store as OpenSSL (and rustls-native-certs) finds it: SSL_CERT_FILE and
    // SSL_CERT_DIR, here the test's CA alone (the machine's own store does not know it: the
    // "unknown CA" case below).
    let no_dir = tempfile::tempdir().unwrap();
    let mut args = Agent::args(
        &topo,
        "--zone-file",
        &support::example_cluster(),
        &["--upstream", &tls_upstream(DOT, DOT_NAME)],
    );
    // Agent::args puts the plain test upstream first; this test wants the TLS one alone.
    let plain = args.iter().position(|a| a == "--upstream").unwrap();
    args.drain(plain..plain + 2);
    let agent = Agent::start_with_env(
        &topo,
        args,
        &[
            ("SSL_CERT_FILE", &ca_file),
            ("SSL_CERT_DIR", no_dir.path().to_str().unwrap()),
        ],
    );
    let m = client(&topo).query("www.example.test.", RecordType::A, true);
    assert_eq!(answers(&m), vec!["A 192.0.2.80"]);
    let to = to(DOT, DOT_NAME);
    assert_eq!(
        agent.metric(&format!(
            "xdns_forward_tls_connections_total{{to=\"{to}\"}}"
        )),
        1.0
    );
}

#[test]
fn a_wrong_name_an_unknown_ca_and_an_expired_certificate_are_refused_and_the_next_upstream_answers()
{
    let topo = Topology::new();
    for ip in [DOT, DOT_EXPIRED, DOT_ROGUE] {
        add_node_addr(&topo, ip);
    }
    let ca = TestCa::new("xdns test CA");
    let rogue_ca = TestCa::new("someone else's CA");
    let good = Server::unbound_dot(&topo.node, DOT, &ca.server_cert(DOT_NAME, false), "");
    let expired = Server::unbound_dot(&topo.node, DOT_EXPIRED, &ca.server_cert(DOT_NAME, true), "");
    let rogue = Server::unbound_dot(
        &topo.node,
        DOT_ROGUE,
        &rogue_ca.server_cert(DOT_NAME, false),
        "",
    );
    let bad = [
        (DOT, "wrong.example.test", "certificate not valid for name"),
        (DOT_EXPIRED, DOT_NAME, "certificate expired"),
        (DOT_ROGUE, DOT_NAME, "UnknownIssuer"),
    ];
    let mut extra: Vec<String> = vec![
        "--upstream-policy".into(),
        "sequential".into(),
        "--upstream-ca".into(),
        ca.file(),
    ];
    for (ip, name, _) in bad {
        extra.extend(["--upstream".into(), tls_upstream(ip, name)]);
    }
    extra.extend(["--upstream".into(), tls_upstream(DOT, DOT_NAME)]);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let agent = agent(&topo, &[], &extra);
    let client = client(&topo);

    // The three bad upstreams come first (sequential), each fails its handshake at once, and
    // the good one answers.
    let started = Instant::now();
    let m = client.query("www.example.test.", RecordType::A, true);
    assert_eq!(answers(&m), vec!["A 192.0.2.80"]);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "failed handshakes fail over at once, not at a timeout: {:?}",
        started.elapsed()
    );
    for (ip, name, _) in bad {
        let to = to(ip, name);
        assert!(
            agent.metric(&format!(
                "xdns_forward_tls_handshake_failures_total{{to=\"{to}\"}}"
            )) >= 1.0,
            "{to}"
        );
        assert_eq!(
            agent.metric(&format!(
                "xdns_forward_tls_connections_total{{to=\"{to}\"}}"
            )),
            0.0,
            "{to}"
        );
    }
    // Health checks mark them down; queries then go straight to the good one.
    for (ip, name, _) in bad {
        let series = format!("xdns_forward_upstream_healthy{{to=\"{}\"}}", to(ip, name));
        wait_until(&format!("{series} is 0"), Duration::from_secs(10), || {
            agent.metric(&series) == 0.0
        });
    }
    let requests = |ip: Ipv4Addr, name: &str| {
        agent.metric(&format!(
            "coredns_forward_requests_total{{to=\"{}\"}}",
            to(ip, name)
        ))
    };
    let asked_before: Vec<f64> = bad
        .iter()
        .map(|(ip, name, _)| requests(*ip, name))
        .collect();
    for i in 0..10 {
        let m = client.query(&format!("n{i}.burst.test."), RecordType::A, false);
        assert_eq!(answers(&m), vec!["A 192.0.2.77"]);
    }
    for ((ip, name, _), before) in bad.iter().zip(asked_before) {
        assert_eq!(requests(*ip, name), before, "a down upstream is skipped");
    }
    assert_eq!(requests(DOT, DOT_NAME), 11.0);
    assert_eq!(
        agent.metric(&format!(
            "xdns_forward_tls_handshake_failures_total{{to=\"{}\"}}",
            to(DOT, DOT_NAME)
        )),
        0.0
    );

    // Each failure was logged once, with its reason, though the handshake failed again and
    // again (loop probe, the query, health checks).
    let log = agent.log();
    for (ip, name, reason) in bad {
        let label = to(ip, name);
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("TLS handshake") && l.contains(&label))
            .collect();
        assert_eq!(lines.len(), 1, "{label} logged once:\n{log}");
        assert!(lines[0].contains(reason), "{label}: {reason}: {}", lines[0]);
        assert!(
            agent.metric(&format!(
                "xdns_forward_tls_handshake_failures_total{{to=\"{label}\"}}"
            )) >= 2.0,
            "{label}: failed more than once, logged once"
        );
    }
    // The servers whose certificate was refused were never asked anything: no query is sent
    // before the handshake checks out.
    assert_eq!(expired.queries_and_tls().0, 0);
    assert_eq!(rogue.queries_and_tls().0, 0);
    let (queries, tls) = good.queries_and_tls();
    assert_eq!(tls, queries);
}

#[test]
fn many_concurrent_misses_share_few_connections() {
    // Sent at once: more would overflow the agent's UDP receive buffer (about 200 queries with
    // the kernel's default size) before it reads them.
    const BURST: usize = 150;
    let topo = Topology::new();
    add_node_addr(&topo, DOT);
    let ca = TestCa::new("xdns test CA");
    let unbound = Server::unbound_dot(&topo.node, DOT, &ca.server_cert(DOT_NAME, false), "");
    let agent = agent_tls_only(&topo, &tls_upstream(DOT, DOT_NAME), &ca.file());
    let client = client(&topo);
    let to = to(DOT, DOT_NAME);
    let connections = format!("xdns_forward_tls_connections_total{{to=\"{to}\"}}");
    // The loop probe has its connection by now.
    wait_until(
        "the loop probe's connection",
        Duration::from_secs(5),
        || agent.metric(&connections) == 1.0,
    );
    let (queries_before, _) = unbound.queries_and_tls();
    // No metrics requests from here to the count: they are TCP connections to the node too.
    let opens_before = passive_opens(&topo.node);
    let mut ids = Vec::new();
    for i in 0..BURST {
        let q = support::query_message(&format!("q{i}.burst.test."), RecordType::A, false);
        ids.push(q.metadata.id);
        client.send_raw(&q.to_vec().unwrap());
    }
    let mut answered = Vec::new();
    for _ in 0..BURST {
        let m = Message::from_vec(&client.recv_raw().expect("a reply")).unwrap();
        assert_eq!(answers(&m), vec!["A 192.0.2.77"], "{m:?}");
        answered.push(m.metadata.id);
    }
    let opened = passive_opens(&topo.node) - opens_before;
    let open_now = dot_connections(&topo.node);
    ids.sort();
    answered.sort();
    assert_eq!(answered, ids, "every query answered with its own ID");

    let (queries_after, tls) = unbound.queries_and_tls();
    assert_eq!(tls, queries_after, "all over TLS");
    assert!(
        queries_after - queries_before >= BURST as u64,
        "{BURST} distinct names, each asked upstream: {}",
        queries_after - queries_before
    );
    // 150 queries at once: a few pipelined connections (at most 4), not one per query.
    assert!(
        opened <= 3,
        "{opened} connections accepted by the server for {BURST} queries"
    );
    assert!(
        (1..=4).contains(&open_now),
        "{open_now} connections open on the server"
    );
    assert_eq!(
        agent.metric(&connections),
        1.0 + opened as f64,
        "the agent's count agrees"
    );
    assert_eq!(
        agent.metric(&format!("coredns_forward_requests_total{{to=\"{to}\"}}")),
        BURST as f64
    );
}

#[test]
fn connections_the_server_closes_are_replaced_and_idle_ones_are_closed() {
    let topo = Topology::new();
    add_node_addr(&topo, DOT);
    let ca = TestCa::new("xdns test CA");
    let ca_file = ca.file();
    let upstream = tls_upstream(DOT, DOT_NAME);
    let to = to(DOT, DOT_NAME);
    let connections = format!("xdns_forward_tls_connections_total{{to=\"{to}\"}}");
    {
        // unbound closes connections idle for 500 ms.
        let _unbound = Server::unbound_dot(
            &topo.node,
            DOT,
            &ca.server_cert(DOT_NAME, false),
            "  tcp-idle-timeout: 500\n",
        );
        let agent = agent_tls_only(&topo, &upstream, &ca_file);
        let client = client(&topo);
        for i in 0..3 {
            std::thread::sleep(Duration::from_millis(1200));
            let m = client.query(&format!("late{i}.burst.test."), RecordType::A, false);
            assert_eq!(rcode_of(&m), ResponseCode::NoError, "{m:?}");
            assert_eq!(answers(&m), vec!["A 192.0.2.77"]);
        }
        let opened = agent.metric(&connections);
        assert!(
            opened >= 3.0,
            "the server closed each connection; new ones were set up ({opened})"
        );
        assert_eq!(
            agent.metric(&format!(
                "coredns_forward_healthcheck_failures_total{{to=\"{to}\"}}"
            )),
            0.0,
            "a connection closed by the server is no upstream failure"
        );
        assert_eq!(agent.metric("xdns_forward_failures_total"), 0.0);
    }

    // Our own idle timeout, against a server that keeps connections open (unbound's default
    // is 30 s): closed after 10 s without a query.
    let topo = Topology::new();
    add_node_addr(&topo, DOT);
    let _unbound = Server::unbound_dot(&topo.node, DOT, &ca.server_cert(DOT_NAME, false), "");
    let agent = agent_tls_only(&topo, &upstream, &ca_file);
    let client = client(&topo);
    let m = client.query("www.example.test.", RecordType::A, false);
    assert_eq!(answers(&m), vec!["A 192.0.2.80"]);
    let open = format!("xdns_forward_tls_open_connections{{to=\"{to}\"}}");
    assert_eq!(agent.metric(&open), 1.0);
    wait_until(
        "the idle connection is closed",
        Duration::from_secs(14),
        || agent.metric(&open) == 0.0,
    );
    wait_until("closed on the server too", Duration::from_secs(2), || {
        dot_connections(&topo.node) == 0
    });
    let m = client.query("mail.example.test.", RecordType::A, false);
    assert_eq!(answers(&m), vec!["A 192.0.2.81"]);
    assert_eq!(agent.metric(&connections), 2.0);
}

/// The agent's exit and its error, for a command line it must refuse before doing anything.
fn refused(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = std::process::Command::new(support::agent_bin());
    cmd.arg("run")
        .arg("--zone-file")
        .arg(support::example_cluster())
        .arg("--no-kernel")
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::null());
    let out = cmd.output().expect("running dns-agent");
    assert!(!out.status.success(), "{args:?} must be refused");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn tls_settings_that_cannot_work_are_refused_at_start() {
    let empty = tempfile::tempdir().unwrap();
    let empty_file = empty.path().join("empty.pem");
    std::fs::write(&empty_file, "").unwrap();
    let empty_file = empty_file.to_str().unwrap();
    // No CA anywhere: a TLS upstream could never be verified.
    let e = refused(
        &["--upstream", "tls://192.0.2.53#dns.example.test"],
        &[
            ("SSL_CERT_FILE", empty_file),
            ("SSL_CERT_DIR", empty.path().to_str().unwrap()),
        ],
    );
    assert!(
        e.contains("--upstream: no CA certificate could be read from the system store")
            && e.contains("--upstream-ca PATH"),
        "{e}"
    );
    let e = refused(
        &[
            "--upstream",
            "tls://192.0.2.53",
            "--upstream-ca",
            "/nonexistent/ca.pem",
        ],
        &[],
    );
    assert!(e.contains("--upstream-ca: /nonexistent/ca.pem"), "{e}");
    let e = refused(
        &[
            "--upstream",
            "tls://192.0.2.53",
            "--upstream-ca",
            empty_file,
        ],
        &[],
    );
    assert!(e.contains("no PEM certificate in it"), "{e}");
    let e = refused(&["--upstream", "192.0.2.53#dns.example.test"], &[]);
    assert!(
        e.contains("--upstream: ") && e.contains("only means something over TLS"),
        "{e}"
    );
}
