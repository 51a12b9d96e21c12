//! The cache of upstream answers in the kernel, through the real path: a pod asks over a veth,
//! the agent forwards to a test upstream and caches, the XDP program answers the cached names
//! from then on — byte for byte what the agent's cache answers at the same second, with every
//! TTL counted down — also with the agent stopped (SIGSTOP: its heartbeat ages, the kernel
//! keeps answering within `--kernel-grace`), and passes an expired entry up.
//!
//! Needs root.

mod support;

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, ResponseCode},
    rr::RecordType,
};
use support::{
    Agent, Client, LISTEN_V4, Topology, UPSTREAM_V4,
    answers::ttls,
    query_message,
    upstream::{Upstream, example_org},
    wait::eventually,
};

/// The TTL of the name whose countdown the test watches to its end.
const SHORT_TTL: u32 = 6;

/// `www` and `short`: A records (TTL 300 and [`SHORT_TTL`]); `mail`: an A record, so AAAA is
/// NODATA; anything else: NXDOMAIN.
fn upstream(topo: &Topology) -> Upstream {
    Upstream::start(
        &topo.node,
        (UPSTREAM_V4, 53).into(),
        example_org(&[
            ("www.example.org.", 300),
            ("short.example.org.", SHORT_TTL),
            ("mail.example.org.", 300),
        ]),
    )
}

/// One query over UDP that the kernel answers from the cache (its counter moves by one).
fn from_kernel(agent: &Agent, client: &Client, query: &[u8]) -> Vec<u8> {
    let before = agent.kernel_counter("answered_cached");
    let reply = client.exchange_raw(query).expect("a reply over UDP");
    assert_eq!(
        agent.kernel_counter("answered_cached"),
        before + 1,
        "the kernel answered from the cache"
    );
    reply
}

#[test]
fn the_kernel_answers_cached_names_with_the_agents_bytes_also_with_the_agent_stopped() {
    let topo = Topology::new();
    let up = upstream(&topo);
    // Without prefetch the kernel answers every cached name to its expiry (with it, the last
    // seconds are the agent's: tests/forwarding.rs, popular names are refreshed).
    let agent = Agent::start(
        &topo,
        &support::example_cluster(),
        &["--kernel-grace", "120s", "--cache-prefetch", "0"],
    );
    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));
    let cases = [
        ("www.example.org.", RecordType::A, ResponseCode::NoError, 2),
        (
            "mail.example.org.",
            RecordType::AAAA,
            ResponseCode::NoError,
            0,
        ),
        (
            "nothing.example.org.",
            RecordType::A,
            ResponseCode::NXDomain,
            0,
        ),
        (
            "short.example.org.",
            RecordType::A,
            ResponseCode::NoError,
            2,
        ),
    ];
    for edns in [false, true] {
        for (name, qtype, rcode, answers) in cases {
            let mut query = query_message(name, qtype, edns);
            let bytes = query.to_vec().unwrap();
            // The first time the agent forwards and caches; then the kernel has it.
            let first = Message::from_vec(&client.exchange_raw(&bytes).expect("a reply")).unwrap();
            assert_eq!(first.metadata.response_code, rcode, "{name} {qtype}");
            assert_eq!(first.answers.len(), answers, "{name} {qtype}");
            eventually(
                &format!("{name} {qtype} in the kernel"),
                Duration::from_secs(5),
                || {
                    let before = agent.kernel_counter("answered_cached");
                    client.exchange_raw(&bytes)?;
                    (agent.kernel_counter("answered_cached") > before).then_some(())
                },
            );
            // The kernel's reply (UDP) and the agent's (TCP, never the kernel's) to the same
            // message, within the same second, are the same bytes.
            query.metadata.id = query.metadata.id.wrapping_add(1);
            let bytes = query.to_vec().unwrap();
            let (kernel, agent_reply) = eventually(
                &format!("{name} {qtype}: two replies within one second"),
                Duration::from_secs(10),
                || {
                    let at = Instant::now();
                    let kernel = from_kernel(&agent, &client, &bytes);
                    let user = client.query_tcp(&bytes);
                    (at.elapsed() < Duration::from_millis(200) && ttls(&kernel) == ttls(&user))
                        .then_some((kernel, user))
                },
            );
            assert_eq!(kernel, agent_reply, "{name} {qtype} (EDNS {edns})");
        }
    }
    assert_eq!(
        up.queries_for("www.example.org"),
        1,
        "one upstream query (EDNS without DO is the same cache key): the rest came from the caches"
    );

    // The agent stops answering; the kernel keeps answering from its maps (grace 120 s).
    agent.signal(libc::SIGSTOP);
    let queries: Vec<Vec<u8>> = cases
        .iter()
        .map(|(name, qtype, ..)| query_message(name, *qtype, true).to_vec().unwrap())
        .collect();
    for (q, (name, qtype, rcode, answers)) in queries.iter().zip(cases) {
        let m = Message::from_vec(&from_kernel(&agent, &client, q)).unwrap();
        assert_eq!(m.metadata.response_code, rcode, "stopped: {name} {qtype}");
        assert_eq!(m.answers.len(), answers, "stopped: {name} {qtype}");
    }
    // The short-lived one counts down, second by second, to its expiry; then the kernel passes
    // it up, and nobody answers.
    let short = &queries[3];
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(SHORT_TTL as u64 + 5);
    let expired_before = agent.kernel_counter("pass_expired");
    let quiet = Client::with_timeout(&topo.pod, IpAddr::V4(LISTEN_V4), Duration::from_millis(300));
    loop {
        assert!(Instant::now() < deadline, "never expired: {seen:?}");
        match quiet.exchange_raw(short) {
            Some(reply) => {
                let t = ttls(&reply);
                assert!(t.iter().all(|x| *x == t[0]), "one TTL for all: {t:?}");
                seen.push(t[0]);
            }
            None => break,
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    seen.dedup();
    assert!(
        seen.len() >= 3 && seen.windows(2).all(|w| w[1] + 1 == w[0]) && seen.last() == Some(&0),
        "counted down a second at a time to 0: {seen:?}"
    );
    assert!(
        agent.kernel_counter("pass_expired") > expired_before,
        "the expired entry was passed up"
    );
    // Still answered: what has not expired.
    from_kernel(&agent, &client, &queries[0]);
    agent.signal(libc::SIGCONT);
    // The agent asks upstream again for the expired name.
    let m = client.query("short.example.org.", RecordType::A, true);
    assert_eq!(m.answers.len(), 2);
    assert!(up.queries_for("short.example.org") >= 2);
}

#[test]
fn with_no_kernel_cache_the_agent_answers_every_external_name() {
    let topo = Topology::new();
    let _up = upstream(&topo);
    let agent = Agent::start(&topo, &support::example_cluster(), &["--no-kernel-cache"]);
    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));
    for _ in 0..5 {
        let m = client.query("www.example.org.", RecordType::A, true);
        assert_eq!(m.answers.len(), 2);
    }
    assert_eq!(agent.kernel_counter("answered_cached"), 0);
    assert_eq!(agent.kernel_counter("pass_miss"), 5, "every one went up");
}
