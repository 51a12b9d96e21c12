//! The whole path over real packets: a pod's namespace, a veth to the node's namespace, the
//! XDP program on the host side, the agent process serving the rest. The counters prove which
//! path answered.
//!
//! Needs root (`cargo xtask test` runs it).

mod support;

use std::{net::IpAddr, time::Duration};

use hickory_proto::{op::ResponseCode, rr::RecordType};
use support::{
    Agent, Client, LISTEN_V4, LISTEN_V6, Topology, UPSTREAM_V4, answers, upstream::Upstream,
};

#[test]
fn cluster_names_are_answered_by_the_kernel() {
    let topo = Topology::new();
    let agent = Agent::start(&topo, &support::example_cluster(), &[]);
    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));
    let kernel_before = agent.kernel_answered();
    let user_before = agent.userspace_answers();

    let m = client.query("web.shop.svc.cluster.local.", RecordType::A, false);
    assert_eq!(answers(&m), vec!["A 10.96.10.20"]);
    assert!(m.metadata.authoritative);
    let m = client.query("kubernetes.default.svc.cluster.local.", RecordType::A, true);
    assert_eq!(answers(&m), vec!["A 10.96.0.1"]);
    let m = client.query("nope.default.svc.cluster.local.", RecordType::A, true);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(m.authorities.len(), 1, "SOA in the authority section");

    assert_eq!(
        agent.kernel_answered(),
        kernel_before + 3,
        "the kernel answered all three"
    );
    assert_eq!(
        agent.userspace_answers(),
        user_before,
        "userspace answered none"
    );
}

#[test]
fn ipv6_queries_are_answered_by_the_kernel() {
    let topo = Topology::new();
    let agent = Agent::start(&topo, &support::example_cluster(), &[]);
    let client = Client::new(&topo.pod, IpAddr::V6(LISTEN_V6));
    let before = agent.kernel_answered();
    let m = client.query("web.shop.svc.cluster.local.", RecordType::AAAA, true);
    assert_eq!(answers(&m), vec!["AAAA fd00:96::a14"]);
    let m = client.query(
        "_http._tcp.web.shop.svc.cluster.local.",
        RecordType::SRV,
        true,
    );
    assert_eq!(
        answers(&m),
        vec!["SRV 0 100 80 web.shop.svc.cluster.local."]
    );
    assert_eq!(agent.kernel_answered(), before + 2);
    assert_eq!(agent.userspace_answers(), 0);
}

#[test]
fn names_outside_the_cluster_reach_the_upstream() {
    let topo = Topology::new();
    let upstream = Upstream::start(
        &topo.node,
        (UPSTREAM_V4, 53).into(),
        support::upstream::example_zone(),
    );
    let agent = Agent::start(&topo, &support::example_cluster(), &[]);
    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));
    let m = client.query("www.example.", RecordType::A, true);
    assert_eq!(answers(&m), vec!["A 203.0.113.2"]);
    // By name: the agent also sends the upstream a loop probe at start.
    assert_eq!(upstream.queries_for("www.example."), 1);
    assert_eq!(agent.forwarded(), 1);
    let c = agent.kernel_counters();
    assert_eq!(c["pass_miss"], 1, "the kernel passed it up: {c:?}");
    // ExternalName: the CNAME comes from the zone, its target from upstream.
    let m = client.query("payments.shop.svc.cluster.local.", RecordType::A, true);
    assert_eq!(
        answers(&m),
        vec!["A 203.0.113.3", "CNAME api.payments.example."]
    );
    assert_eq!(upstream.queries_for("api.payments.example."), 1);
}

#[test]
fn a_dead_upstream_gets_servfail_within_two_seconds() {
    let topo = Topology::new();
    let upstream = Upstream::start(
        &topo.node,
        (UPSTREAM_V4, 53).into(),
        std::sync::Arc::new(|_| support::upstream::Action::Drop),
    );
    let _agent = Agent::start(&topo, &support::example_cluster(), &[]);
    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));
    let started = std::time::Instant::now();
    let m = client.query("slow.example.", RecordType::A, false);
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(upstream.query_count() >= 1);
}

#[test]
fn truncated_udp_answers_are_complete_over_tcp() {
    let topo = Topology::new();
    let dir = tempfile::tempdir().unwrap();
    let zone = dir.path().join("zone.yaml");
    let mut text = std::fs::read_to_string(support::example_cluster()).unwrap();
    text.push_str(&support::headless_yaml(200));
    std::fs::write(&zone, text).unwrap();
    let agent = Agent::start(&topo, &zone, &[]);
    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));
    let q = support::query_message("bulk-200.shop.svc.cluster.local.", RecordType::A, true);
    let bytes = q.to_vec().unwrap();
    let udp = hickory_proto::op::Message::from_vec(&client.exchange_raw(&bytes).unwrap()).unwrap();
    assert!(udp.metadata.truncation, "200 A records do not fit in UDP");
    assert!(udp.answers.is_empty());
    let tcp = hickory_proto::op::Message::from_vec(&client.query_tcp(&bytes)).unwrap();
    assert!(!tcp.metadata.truncation);
    assert_eq!(tcp.answers.len(), 200);
    assert_eq!(
        agent.kernel_counters()["pass_userspace"],
        1,
        "the kernel left it to userspace"
    );
}

#[test]
fn sigterm_detaches_and_exits_cleanly() {
    let topo = Topology::new();
    let mut agent = Agent::start(&topo, &support::example_cluster(), &[]);
    let status = agent.stop();
    assert!(status.success(), "exit status {status}");
    let out = topo
        .node
        .command("ip")
        .args(["link", "show", &topo.host_if])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("xdp"), "XDP still attached: {text}");
    assert!(!agent.pin_path.join("v1").exists(), "pins removed");
}

/// Raw query bytes: header flags and counts as given, one question for `name`/`qtype`.
fn raw_query(id: u16, flags: u16, name: &str, qtype: u16, extra: &[u8], arcount: u16) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&[0, 1, 0, 0, 0, 0]);
    m.extend_from_slice(&arcount.to_be_bytes());
    for l in name.split('.').filter(|l| !l.is_empty()) {
        m.push(l.len() as u8);
        m.extend_from_slice(l.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m.extend_from_slice(extra);
    m
}

fn rcode_of(reply: &[u8]) -> u16 {
    u16::from_be_bytes([reply[2], reply[3]]) & 0xf
}

#[test]
fn userspace_answers_what_the_kernel_passes_as_the_rfcs_say() {
    let topo = Topology::new();
    let agent = Agent::start(&topo, &support::example_cluster(), &[]);
    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));
    let name = "web.shop.svc.cluster.local";

    // NOTIMP: opcode 4 (NOTIFY). The reply keeps the ID and the opcode.
    let r = client
        .exchange_raw(&raw_query(0x1111, 0x2100, name, 1, &[], 0))
        .expect("NOTIMP reply");
    assert_eq!(
        (u16::from_be_bytes([r[0], r[1]]), rcode_of(&r), r[2] & 0x78),
        (0x1111, 4, 0x20)
    );

    // FORMERR: trailing garbage; a label running past the end.
    let r = client
        .exchange_raw(&raw_query(2, 0x0100, name, 1, &[0xde, 0xad], 0))
        .expect("FORMERR reply");
    assert_eq!(rcode_of(&r), 1);
    let mut cut = raw_query(3, 0x0100, name, 1, &[], 0);
    cut.truncate(20);
    let r = client.exchange_raw(&cut).expect("FORMERR reply");
    assert_eq!(rcode_of(&r), 1);

    // REFUSED: zone transfers, over UDP and TCP.
    let axfr = raw_query(4, 0, "cluster.local", 252, &[], 0);
    assert_eq!(rcode_of(&client.exchange_raw(&axfr).unwrap()), 5);
    assert_eq!(rcode_of(&client.query_tcp(&axfr)), 5);

    // BADVERS: EDNS version 1 gets extended RCODE 16 (1 in the OPT) and an OPT of version 0.
    let opt_v1 = [0, 0, 41, 4, 0, 0, 1, 0, 0, 0, 0];
    let r = client
        .exchange_raw(&raw_query(5, 0x0100, name, 1, &opt_v1, 1))
        .expect("BADVERS reply");
    assert_eq!(rcode_of(&r), 0);
    let opt = &r[r.len() - 11..];
    assert_eq!(
        (opt[2], opt[5], opt[6]),
        (41, 1, 0),
        "OPT with extended RCODE 1 (BADVERS), version 0"
    );

    // A response is never answered (no reflection loops).
    assert!(
        client
            .exchange_raw(&raw_query(6, 0x8180, name, 1, &[], 0))
            .is_none()
    );

    // None of it was answered in the kernel; it passed each up for the reason it should.
    let c = agent.kernel_counters();
    assert_eq!(agent.kernel_answered(), 0, "{c:?}");
    assert_eq!(
        c["pass_unsupported"], 4,
        "opcode, AXFR over UDP, EDNS version, QR: {c:?}"
    );
    assert_eq!(c["pass_malformed"], 2, "trailing bytes, cut label: {c:?}");
}

#[test]
fn an_agent_replaced_by_another_drops_no_query() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    };
    let topo = Topology::new();
    let pin = std::path::PathBuf::from("/sys/fs/bpf").join(support::unique("xdns-h"));
    let zone = support::example_cluster();
    // Agents with different numbers of UDP sockets per address: the first one loop, the next
    // one a loop per CPU, the third one again. Each steers queries among its own sockets by
    // their places in the reuseport group, which move when the agent before leaves.
    let mut old = Agent::start_at(
        &topo,
        Agent::args(&topo, "--zone-file", &zone, &["--max-udp-loops", "1"]),
        pin.clone(),
        9253,
    );
    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));

    // Queries every millisecond, a kernel name and a userspace one, for the whole handover.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, lost) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, sent, lost) = (stop.clone(), sent.clone(), lost.clone());
        std::thread::spawn(move || {
            let names = [
                "web.shop.svc.cluster.local.",
                "10-1-2-3.shop.pod.cluster.local.",
            ];
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                let q = support::query_message(names[i % 2], RecordType::A, false)
                    .to_vec()
                    .unwrap();
                sent.fetch_add(1, Ordering::Relaxed);
                match client
                    .exchange_raw(&q)
                    .map(|r| hickory_proto::op::Message::from_vec(&r).unwrap())
                {
                    Some(m)
                        if m.metadata.response_code == ResponseCode::NoError
                            && m.answers.len() == 1 => {}
                    _ => {
                        lost.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(200));

    // The new agent starts beside the old one, loads the zone, then takes the XDP link over.
    // Same ports: the new agent shares the metrics port too, and kubelet-like readiness
    // checks reach the new agent (503 until its zone is loaded).
    let hand_over = |old: &mut Agent, extra: &[&str]| {
        let new = Agent::start_at(
            &topo,
            Agent::args(&topo, "--zone-file", &zone, extra),
            pin.clone(),
            9253,
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !new.log().contains("TookOver") {
            assert!(
                std::time::Instant::now() < deadline,
                "no takeover:\n{}",
                new.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        let status = old.stop();
        assert!(status.success());
        assert!(old.log().contains("handed over"), "{}", old.log());
        new
    };
    let mut new = hand_over(&mut old, &[]);
    // Once the old agent's sockets are gone, the new one steers by its sockets' new places.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !new.log().contains("sockets' places are this agent's") {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent never noticed the old one's sockets were gone:\n{}",
            new.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    // And hands over in turn.
    let newest = hand_over(&mut new, &["--max-udp-loops", "1"]);
    let kernel_before = newest.kernel_answered();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();

    let (sent, lost) = (sent.load(Ordering::Relaxed), lost.load(Ordering::Relaxed));
    assert!(sent > 600, "only {sent} queries sent");
    assert_eq!(
        lost, 0,
        "{lost} of {sent} queries went unanswered across the handovers"
    );
    assert!(
        newest.kernel_answered() > kernel_before,
        "the newest agent's program answers"
    );
    let out = topo
        .node
        .command("ip")
        .args(["link", "show", &topo.host_if])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("xdp"),
        "still attached"
    );
}

#[test]
fn interfaces_matching_a_pattern_are_attached_as_they_appear() {
    use support::{Netns, run, unique};
    let topo = Topology::new();
    // New pods' host-side veths are named xg<pid>x<n>: the pattern matches them only.
    let probe = unique("xg");
    let pattern = format!("{}*", &probe[..probe.rfind('x').unwrap() + 1]);
    let agent = Agent::start(
        &topo,
        &support::example_cluster(),
        &["--interface-pattern", &pattern],
    );

    let pod = Netns::new("xp");
    let plug = |host: &str, guest: &str| {
        run(
            "ip",
            &[
                "link",
                "add",
                host,
                "netns",
                &topo.node.name,
                "type",
                "veth",
                "peer",
                "name",
                guest,
                "netns",
                &pod.name,
            ],
        );
        topo.node
            .ip(&["addr", "add", "203.0.113.1/24", "dev", host]);
        topo.node.ip(&["link", "set", host, "up"]);
        pod.ip(&["addr", "add", "203.0.113.2/24", "dev", guest]);
        pod.ip(&["link", "set", guest, "up"]);
        pod.ip(&[
            "route",
            "add",
            &format!("{LISTEN_V4}/32"),
            "via",
            "203.0.113.1",
        ]);
    };
    let wait_log = |what: &str, needle: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !agent.log().contains(needle) {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}:\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let host = unique("xg");
    let guest = unique("xq");
    for round in 0..2 {
        // The pod appears after the agent started (the second time with the same names).
        let attached = format!("XDP program attached (interface pattern) interface={host}");
        let count = agent.log().matches(&attached).count();
        plug(&host, &guest);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while agent.log().matches(&attached).count() == count {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: {host} not attached:\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let client = Client::new(&pod, IpAddr::V4(LISTEN_V4));
        let (kernel, user) = (agent.kernel_answered(), agent.userspace_answers());
        let m = client.query("web.shop.svc.cluster.local.", RecordType::A, false);
        assert_eq!(answers(&m), vec!["A 10.96.10.20"]);
        assert_eq!(
            agent.kernel_answered(),
            kernel + 1,
            "round {round}: the new veth's program answered"
        );
        assert_eq!(agent.userspace_answers(), user);
        // The pod goes away.
        topo.node.ip(&["link", "del", &host]);
        wait_log(
            "the interface's removal is noticed",
            &format!("interface gone; its XDP attachment with it interface={host}"),
        );
        if round == 0 {
            // Its pin is gone too.
            assert!(!agent.pin_path.join("links").join(&host).exists());
        }
    }
}
