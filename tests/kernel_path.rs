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

/// A dead upstream: SERVFAIL once `--forward-timeout` has passed, not before (a first attempt
/// of `--upstream-timeout`, a second with the rest, as with the defaults' 1 s + 0.9 s) and not
/// much after. The bound follows the settings: 1.5 s of headroom for a shared machine, never
/// a fixed 2 s against a 1.9 s timeout.
#[test]
fn a_dead_upstream_gets_servfail_when_the_forward_timeout_ends() {
    const UPSTREAM_TIMEOUT: Duration = Duration::from_millis(400);
    const FORWARD_TIMEOUT: Duration = Duration::from_millis(700);
    const HEADROOM: Duration = Duration::from_millis(1500);
    let topo = Topology::new();
    let upstream = Upstream::start(
        &topo.node,
        (UPSTREAM_V4, 53).into(),
        std::sync::Arc::new(|_| support::upstream::Action::Drop),
    );
    let _agent = Agent::start(
        &topo,
        &support::example_cluster(),
        &[
            "--upstream-timeout",
            &format!("{}ms", UPSTREAM_TIMEOUT.as_millis()),
            "--forward-timeout",
            &format!("{}ms", FORWARD_TIMEOUT.as_millis()),
        ],
    );
    let client = Client::with_timeout(
        &topo.pod,
        IpAddr::V4(LISTEN_V4),
        FORWARD_TIMEOUT + HEADROOM + Duration::from_secs(1),
    );
    let started = std::time::Instant::now();
    let m = client.query("slow.example.", RecordType::A, false);
    let took = started.elapsed();
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(
        took + Duration::from_millis(20) >= FORWARD_TIMEOUT && took < FORWARD_TIMEOUT + HEADROOM,
        "SERVFAIL after {took:?}; --forward-timeout {FORWARD_TIMEOUT:?}"
    );
    // Two attempts: 400 ms, then the 300 ms left.
    assert_eq!(upstream.queries_for("slow.example."), 2);
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
    use support::{Netns, unique};
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
    let plug = |host: &str, guest: &str| support::plug_pod(&topo.node, &pod, host, guest);
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

/// Defect 5c of the contract review: after the kernel drops link notifications (ENOBUFS), a
/// veth deleted and created again under the same name (Calico names veths after the pod) must
/// be attached again. The agent is stopped while a few hundred other links come and go, which
/// overflows its notification socket for real; meanwhile the pod's veth is replaced.
#[test]
fn a_veth_recreated_while_notifications_overflow_is_attached_again() {
    use support::{Netns, unique};
    let topo = Topology::new();
    let probe = unique("xg");
    let prefix = &probe[..probe.rfind('x').unwrap() + 1];
    let pattern = format!("{prefix}*");
    let agent = Agent::start(
        &topo,
        &support::example_cluster(),
        &["--interface-pattern", &pattern],
    );
    let pod = Netns::new("xp");
    let host = unique("xg");
    let guest = unique("xq");
    let plug = || support::plug_pod(&topo.node, &pod, &host, &guest);
    let attached = format!("XDP program attached (interface pattern) interface={host}");
    let wait_attached = |count: usize, what: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while agent.log().matches(&attached).count() < count {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: {host} not attached:\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let kernel_answers = |what: &str| {
        let client = Client::new(&pod, IpAddr::V4(LISTEN_V4));
        let (kernel, user) = (agent.kernel_answered(), agent.userspace_answers());
        let m = client.query("web.shop.svc.cluster.local.", RecordType::A, false);
        assert_eq!(answers(&m), vec!["A 10.96.10.20"], "{what}");
        assert_eq!(
            agent.kernel_answered(),
            kernel + 1,
            "{what}: the kernel answered"
        );
        assert_eq!(agent.userspace_answers(), user, "{what}");
    };
    plug();
    wait_attached(1, "first veth");
    kernel_answers("first veth");

    // Stopped, the agent reads no notifications; links that match no pattern come and go
    // until its socket's buffer (rmem_default, 208 KiB here) overflows; then the pod's veth
    // is replaced: its delete and re-creation are among the notifications the kernel drops.
    agent.signal(libc::SIGSTOP);
    let batch = tempfile::NamedTempFile::new().unwrap();
    let filler = unique("xf");
    let mut adds = String::new();
    let mut dels = String::new();
    for i in 0..300 {
        adds.push_str(&format!(
            "link add {filler}a{i} type veth peer name {filler}b{i}\n"
        ));
        dels.push_str(&format!("link del {filler}a{i}\n"));
    }
    std::fs::write(batch.path(), &adds).unwrap();
    topo.node
        .ip(&["-batch", &batch.path().display().to_string()]);
    std::fs::write(batch.path(), &dels).unwrap();
    topo.node
        .ip(&["-batch", &batch.path().display().to_string()]);
    topo.node.ip(&["link", "del", &host]);
    plug();
    agent.signal(libc::SIGCONT);

    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !agent.log().contains("link notifications overflowed") {
        assert!(
            std::time::Instant::now() < deadline,
            "the notification socket did not overflow (more filler links needed?):\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_attached(2, "after the overflow");
    kernel_answers("the veth created again");
}

/// Driver-mode XDP on the host side of a veth. `XDP_TX` replies in driver mode are dropped
/// unless the pod-side peer has an XDP program too (DESIGN.md; the bench does the same with
/// `xdns_pass`), and vanish with GRO on for the peer: both are set up here as the bench does.
#[test]
fn driver_mode_answers_from_the_kernel() {
    use aya::programs::{Xdp, XdpMode};
    static REFLECTOR: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/reflector"));
    let topo = Topology::new();
    let pod_if = topo.pod_if.clone();
    let _pass = topo.pod.enter(move || {
        let mut ebpf = aya::Ebpf::load(REFLECTOR).expect("loading the reflector object");
        let pass: &mut Xdp = ebpf
            .program_mut("xdns_pass")
            .expect("xdns_pass in the reflector object")
            .try_into()
            .unwrap();
        pass.load().expect("xdns_pass verifies");
        pass.attach(&pod_if, XdpMode::Driver)
            .expect("xdns_pass attached to the pod's side in driver mode");
        ebpf
    });
    let out = topo
        .pod
        .command("ethtool")
        .args(["-K", &topo.pod_if, "gro", "off"])
        .output()
        .expect("ethtool is missing: `apt-get install ethtool` (`cargo xtask setup` does)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let agent = Agent::start(
        &topo,
        &support::example_cluster(),
        &["--attach-mode", "driver"],
    );
    let link = topo
        .node
        .command("ip")
        .args(["-d", "link", "show", &topo.host_if])
        .output()
        .unwrap();
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(
        link.contains("xdp ") && !link.contains("xdpgeneric"),
        "attached in driver mode: {link}"
    );
    assert!(
        agent.log().contains("mode=driver"),
        "the agent says so:\n{}",
        agent.log()
    );

    // Every reply is right. The kernel sends what fits: on a veth in driver mode a frame's
    // tailroom is what its skb had to spare, a few dozen bytes or none (measured: an AAAA
    // answer fitting in one run and not in the next, a negative answer's SOA seldom), so a
    // reply that does not fit goes up, counted as pass_no_room, and userspace answers it.
    // (A NIC's driver gives page-sized buffers; on veths, generic mode is the one to use.)
    let before = agent.kernel_counters();
    let user = agent.userspace_answers();
    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));
    let client6 = Client::new(&topo.pod, IpAddr::V6(LISTEN_V6));
    for _ in 0..10 {
        let m = client.query("web.shop.svc.cluster.local.", RecordType::A, true);
        assert_eq!(answers(&m), vec!["A 10.96.10.20"]);
        let m = client6.query("web.shop.svc.cluster.local.", RecordType::AAAA, true);
        assert_eq!(answers(&m), vec!["AAAA fd00:96::a14"]);
        let m = client.query("nope.shop.svc.cluster.local.", RecordType::A, false);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(m.authorities.len(), 1);
    }
    let after = agent.kernel_counters();
    let moved = |c: &str| after[c] - before[c];
    let (kernel, no_room) = (
        moved("answered") + moved("answered_nxdomain"),
        moved("pass_no_room"),
    );
    eprintln!("driver mode: {kernel} answered in the kernel, {no_room} without room");
    assert_eq!(kernel + no_room, 30, "{after:?}");
    assert!(kernel > 0, "driver-mode replies reach the pod: {after:?}");
    assert_eq!(agent.userspace_answers(), user + no_room);
}

/// `dns-agent stats` beside a running agent prints the kernel's counters and the queries by
/// path, the same numbers the maps and /metrics hold; without an agent it says what to check.
#[test]
fn stats_prints_the_counters_of_a_running_agent() {
    let topo = Topology::new();
    let upstream = Upstream::start(
        &topo.node,
        (UPSTREAM_V4, 53).into(),
        support::upstream::example_zone(),
    );
    let agent = Agent::start(&topo, &support::example_cluster(), &[]);
    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));
    for _ in 0..3 {
        client.query("web.shop.svc.cluster.local.", RecordType::A, false);
    }
    client.query("nope.shop.svc.cluster.local.", RecordType::A, false);
    client.query("10-1-2-3.shop.pod.cluster.local.", RecordType::A, false);
    client.query("www.example.", RecordType::A, false);
    assert_eq!(upstream.queries_for("www.example."), 1);

    let run = |args: &[&str]| {
        let out = topo
            .node
            .command(support::agent_bin())
            .arg("stats")
            .args(args)
            .output()
            .expect("running dns-agent stats");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let pin = agent.pin_path.display().to_string();
    let metrics = format!("127.0.0.1:{}", agent.metrics_port);
    let (ok, out, err) = run(&["--pin-path", &pin, "--metrics-addr", &metrics]);
    assert!(ok, "dns-agent stats failed: {err}");
    let value = |section: &str, name: &str| -> u64 {
        out.split(section)
            .nth(1)
            .and_then(|rest| {
                rest.lines().find_map(|l| {
                    let mut w = l.split_whitespace();
                    (w.next() == Some(name)).then(|| w.next()?.parse().ok())?
                })
            })
            .unwrap_or_else(|| panic!("no {name} under {section:?} in:\n{out}"))
    };
    let counters = agent.kernel_counters();
    for name in dns_agent::kernel::counter_names() {
        assert_eq!(
            value("kernel (XDP) counters:", name),
            counters[*name],
            "{name}"
        );
    }
    assert_eq!(value("kernel (XDP) counters:", "answered"), 3);
    assert_eq!(value("kernel (XDP) counters:", "answered_nxdomain"), 1);
    assert_eq!(value("queries by path:", "kernel"), 4);
    assert_eq!(value("queries by path:", "userspace"), 1);
    assert_eq!(value("queries by path:", "forwarded"), 1);

    // The metrics port unreachable: the kernel counters all the same, and why the rest is not.
    let (ok, out, _) = run(&["--pin-path", &pin, "--metrics-addr", "127.0.0.1:1"]);
    assert!(ok);
    assert!(out.contains("answered_nxdomain"), "{out}");
    assert!(
        out.contains("userspace counters unavailable from 127.0.0.1:1"),
        "{out}"
    );
    // No agent with that pin path: a failure that says what to check.
    let (ok, _, err) = run(&["--pin-path", "/sys/fs/bpf/xdns-none-here"]);
    assert!(!ok);
    assert!(
        err.contains("is an agent running with this --pin-path?"),
        "{err}"
    );
}

/// A zone larger than `--kernel-capacity`: the writes that do not fit fail and are counted,
/// the kernel stops answering NXDOMAIN (a name missing from its maps may exist), and every
/// name is still answered correctly: by the kernel where its entries fit, by userspace where
/// they did not.
#[test]
fn a_zone_larger_than_the_kernel_maps_is_answered_by_userspace_where_they_are_full() {
    const ENDPOINTS: usize = 1500;
    let topo = Topology::new();
    let dir = tempfile::tempdir().unwrap();
    let zone = dir.path().join("zone.yaml");
    let mut text = std::fs::read_to_string(support::example_cluster()).unwrap();
    text.push_str(&support::headless_yaml(ENDPOINTS));
    std::fs::write(&zone, text).unwrap();
    let agent = Agent::start(&topo, &zone, &["--kernel-capacity", "1024"]);
    assert!(
        agent
            .log()
            .contains("a zone entry did not fit in the kernel maps"),
        "the agent says the maps are full:\n{}",
        agent.log()
    );
    let failures = agent.metric("xdns_kernel_map_write_failures_total");
    let entries = agent.metric("xdns_kernel_entries");
    assert!(failures > 0.0, "write failures counted");
    eprintln!("{entries} kernel entries, {failures} writes failed");

    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));
    let (kernel0, user0) = (agent.kernel_answered(), agent.userspace_answers());
    let mut asked = 0u64;
    for i in (0..ENDPOINTS).step_by(15) {
        let (a, b) = (i / 250, i % 250 + 1);
        let name = format!("10-250-{a}-{b}.bulk-{ENDPOINTS}.shop.svc.cluster.local.");
        let m = client.query(&name, RecordType::A, true);
        assert_eq!(answers(&m), vec![format!("A 10.250.{a}.{b}")], "{name}");
        let ptr = format!("{b}.{a}.250.10.in-addr.arpa.");
        let m = client.query(&ptr, RecordType::PTR, true);
        assert_eq!(answers(&m), vec![format!("PTR {name}")], "{ptr}");
        asked += 2;
    }
    let m = client.query("web.shop.svc.cluster.local.", RecordType::A, true);
    assert_eq!(answers(&m), vec!["A 10.96.10.20"]);
    asked += 1;
    let (kernel, user) = (
        agent.kernel_answered() - kernel0,
        agent.userspace_answers() - user0,
    );
    eprintln!("{asked} asked: {kernel} by the kernel, {user} by userspace");
    assert_eq!(kernel + user, asked, "every query answered by one path");
    assert!(kernel > 0, "the kernel answers what fits");
    assert!(user > 0, "userspace answers what does not");

    // A name that does not exist: NXDOMAIN, from userspace now.
    let nx_before = agent.kernel_counters()["answered_nxdomain"];
    let m = client.query("nope.shop.svc.cluster.local.", RecordType::A, true);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(m.authorities.len(), 1, "with the SOA");
    assert_eq!(
        agent.kernel_counters()["answered_nxdomain"],
        nx_before,
        "the kernel no longer answers NXDOMAIN"
    );
}

/// Two agents overlap during a rolling update, and a pod's veth appears meanwhile: both see it.
/// The old agent must not take the new veth's link from the newer agent (it would leave the
/// veth with its own maps, frozen once it exits); nor, leaving, remove the newer agent's map
/// pins (`dns-agent stats` reads them).
#[test]
fn an_old_agent_leaves_a_newer_agents_links_and_pins_alone() {
    use support::{Netns, unique};
    let topo = Topology::new();
    let pin = std::path::PathBuf::from("/sys/fs/bpf").join(unique("xdns-o"));
    let zone = support::example_cluster();
    let probe = unique("xg");
    let pattern = format!("{}*", &probe[..probe.rfind('x').unwrap() + 1]);
    let args = Agent::args(
        &topo,
        "--zone-file",
        &zone,
        &["--interface-pattern", &pattern],
    );
    let mut old = Agent::start_at(&topo, args.clone(), pin.clone(), 9253);
    let new = Agent::start_at(&topo, args, pin.clone(), 9254);

    // A pod plugged in while both run.
    let pod = Netns::new("xp");
    let (host, guest) = (unique("xg"), unique("xq"));
    support::plug_pod(&topo.node, &pod, &host, &guest);
    support::wait::eventually(
        "both agents saw the new veth",
        Duration::from_secs(10),
        || {
            let seen = |a: &Agent| a.log().contains(&format!("interface={host}"));
            (seen(&old) && seen(&new)).then_some(())
        },
    );
    std::thread::sleep(Duration::from_millis(300));

    // The old agent leaves: the new veth must still be answered by the newer agent's program.
    old.stop();
    let client = Client::new(&pod, IpAddr::V4(LISTEN_V4));
    let kernel = new.kernel_answered();
    let m = client.query("web.shop.svc.cluster.local.", RecordType::A, false);
    assert_eq!(answers(&m), vec!["A 10.96.10.20"]);
    assert_eq!(
        new.kernel_answered(),
        kernel + 1,
        "the newer agent's program answers on the veth that appeared during the overlap"
    );
    // And its pins are where `dns-agent stats` looks.
    let stats = topo
        .node
        .command(support::agent_bin())
        .args([
            "stats",
            "--pin-path",
            &pin.display().to_string(),
            "--metrics-addr",
            "127.0.0.1:9254",
        ])
        .output()
        .expect("dns-agent stats");
    assert!(
        stats.status.success(),
        "stats after the old agent left: {}",
        String::from_utf8_lossy(&stats.stderr)
    );
    assert!(String::from_utf8_lossy(&stats.stdout).contains("answered"));
    drop(new);
    drop(old);
}
