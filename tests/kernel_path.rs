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
