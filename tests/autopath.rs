//! Search-path completion (`--autopath`) through the real path: a pod (192.0.2.2, namespace
//! `shop`) asks the first search-path expansion of a name, as glibc does with the Kubernetes
//! `resolv.conf`, and gets in one round trip what CoreDNS's `autopath` answers — the first name
//! of the search list that exists, behind a CNAME from the asked name — from the agent, then
//! from the kernel, also with the agent stopped. Addresses of no known pod get the plain
//! answer. The Pods come from the zone file, or from the API's Pods of this node.
//!
//! Needs root.

mod support;

use std::{
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, ResponseCode},
    rr::RecordType,
};
use support::{
    Agent, Client, LISTEN_V4, LISTEN_V6, Topology, UPSTREAM_V4,
    fake_api::{self, FakeApi},
    query_message,
    upstream::{Upstream, example_org},
    wait::eventually,
};

/// The test pod's address (the pod side of the topology's veth).
const POD_V4: &str = "192.0.2.2";

/// `www.example.org`: two A records; anything else: NXDOMAIN with the SOA.
fn upstream(topo: &Topology) -> Upstream {
    Upstream::start(
        &topo.node,
        (UPSTREAM_V4, 53).into(),
        example_org(&[("www.example.org.", 300)]),
    )
}

/// The example cluster with the test pod in `shop`, as a zone file.
fn zone_with_pod(dir: &std::path::Path) -> PathBuf {
    let mut text = std::fs::read_to_string(support::example_cluster()).unwrap();
    text.push_str(&format!(
        "\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: shopper, namespace: shop}}\n\
         spec: {{containers: [{{name: c, image: x}}], nodeName: node-1}}\n\
         status: {{phase: Running, podIP: {POD_V4}, podIPs: [{{ip: {POD_V4}}}]}}\n"
    ));
    let path = dir.join("cluster.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

fn ask(client: &Client, name: &str, qtype: RecordType) -> Message {
    client.query(name, qtype, true)
}

/// Answer records as `owner TYPE rdata`, in order.
fn records(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .map(|r| {
            format!(
                "{} {} {}",
                r.name.to_ascii().to_ascii_lowercase(),
                r.record_type(),
                r.data
            )
        })
        .collect()
}

/// The completions CoreDNS's autopath gives, and the plain answers it leaves alone.
fn assert_completions(client: &Client) {
    // An external name: the search list ends at the bare name.
    let m = ask(
        client,
        "www.example.org.shop.svc.cluster.local.",
        RecordType::A,
    );
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        m.queries[0].name().to_ascii(),
        "www.example.org.shop.svc.cluster.local.",
        "the question as asked"
    );
    assert_eq!(
        records(&m),
        [
            "www.example.org.shop.svc.cluster.local. CNAME www.example.org.",
            "www.example.org. A 192.0.2.80",
            "www.example.org. A 192.0.2.81",
        ]
    );
    assert!(!m.metadata.authoritative, "an upstream's answer");
    // A Service's full name asked as a relative one: the bare name is the zone's.
    let m = ask(
        client,
        "web.shop.svc.cluster.local.shop.svc.cluster.local.",
        RecordType::A,
    );
    assert_eq!(
        records(&m),
        [
            "web.shop.svc.cluster.local.shop.svc.cluster.local. CNAME web.shop.svc.cluster.local.",
            "web.shop.svc.cluster.local. A 10.96.10.20",
        ]
    );
    assert!(m.metadata.authoritative, "the zone's answer");
    // `<svc>.<ns>`: the second element (svc.<zone>) completes it.
    let m = ask(client, "web.shop.shop.svc.cluster.local.", RecordType::A);
    assert_eq!(
        records(&m),
        [
            "web.shop.shop.svc.cluster.local. CNAME web.shop.svc.cluster.local.",
            "web.shop.svc.cluster.local. A 10.96.10.20",
        ]
    );
    // NODATA at the name the search list ends at: no CNAME (CoreDNS's cnamer needs an answer
    // record), NOERROR with the zone's SOA.
    let m = ask(client, "web.shop.shop.svc.cluster.local.", RecordType::TXT);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
    // Nothing anywhere: the asked name's own NXDOMAIN.
    let m = ask(
        client,
        "nothing.example.org.shop.svc.cluster.local.",
        RecordType::A,
    );
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    // A name that exists is answered as it is; another namespace's element is not completed.
    let m = ask(client, "web.shop.svc.cluster.local.", RecordType::A);
    assert_eq!(records(&m), ["web.shop.svc.cluster.local. A 10.96.10.20"]);
    let m = ask(
        client,
        "www.example.org.default.svc.cluster.local.",
        RecordType::A,
    );
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
}

#[test]
fn search_paths_are_completed_by_the_agent_then_by_the_kernel_also_with_the_agent_stopped() {
    let topo = Topology::new();
    let _up = upstream(&topo);
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        &topo,
        &zone_with_pod(dir.path()),
        &["--autopath", "--kernel-grace", "120s"],
    );
    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));
    assert_completions(&client);
    assert!(
        agent.forwarded() + agent.userspace_answers() > 0,
        "the agent completed them"
    );

    // Completed once, the kernel has them: one round trip, no userspace.
    let completed = [
        ("www.example.org.shop.svc.cluster.local.", RecordType::A),
        (
            "web.shop.svc.cluster.local.shop.svc.cluster.local.",
            RecordType::A,
        ),
        ("web.shop.shop.svc.cluster.local.", RecordType::A),
    ];
    for (name, qtype) in completed {
        let query = query_message(name, qtype, true).to_vec().unwrap();
        eventually(
            &format!("{name} completed by the kernel"),
            Duration::from_secs(5),
            || {
                let before = agent.kernel_counter("answered_autopath");
                client.exchange_raw(&query)?;
                (agent.kernel_counter("answered_autopath") > before).then_some(())
            },
        );
        // The kernel's reply (UDP) and the agent's (TCP, from the same pod), within one second,
        // byte for byte.
        let (kernel, user) = eventually(
            &format!("{name}: both replies within a second"),
            Duration::from_secs(10),
            || {
                let at = Instant::now();
                let before = agent.kernel_counter("answered_autopath");
                let kernel = client.exchange_raw(&query)?;
                let user = client.query_tcp(&query);
                (agent.kernel_counter("answered_autopath") == before + 1
                    && at.elapsed() < Duration::from_millis(200)
                    && kernel.len() == user.len())
                .then_some((kernel, user))
            },
        );
        assert_eq!(
            kernel, user,
            "{name}: the kernel's completion is the agent's"
        );
    }
    // Not completed by the kernel: a search-path expansion whose completion the kernel does not
    // hold goes up (pass_autopath); an address of no known pod gets NXDOMAIN from the kernel.
    let before = agent.kernel_counter("pass_autopath");
    let m = ask(
        &client,
        "api.example.org.shop.svc.cluster.local.",
        RecordType::A,
    );
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(agent.kernel_counter("pass_autopath"), before + 1);
    let v6 = Client::new(&topo.pod, IpAddr::V6(LISTEN_V6));
    let nx = agent.kernel_counter("answered_nxdomain");
    let m = ask(
        &v6,
        "www.example.org.shop.svc.cluster.local.",
        RecordType::A,
    );
    assert_eq!(
        m.metadata.response_code,
        ResponseCode::NXDomain,
        "not a known pod"
    );
    assert_eq!(agent.kernel_counter("answered_nxdomain"), nx + 1);

    // The agent stops; the kernel keeps completing what it holds.
    agent.signal(libc::SIGSTOP);
    for (name, qtype) in completed {
        let before = agent.kernel_counter("answered_autopath");
        let m = ask(&client, name, qtype);
        assert_eq!(m.answers[0].record_type(), RecordType::CNAME, "{name}");
        assert_eq!(
            agent.kernel_counter("answered_autopath"),
            before + 1,
            "{name}: the kernel"
        );
    }
    agent.signal(libc::SIGCONT);
}

#[test]
fn without_autopath_expansions_are_nxdomain() {
    let topo = Topology::new();
    let _up = upstream(&topo);
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&topo, &zone_with_pod(dir.path()), &[]);
    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));
    for _ in 0..3 {
        let m = ask(
            &client,
            "www.example.org.shop.svc.cluster.local.",
            RecordType::A,
        );
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    }
    assert_eq!(
        agent.kernel_counter("answered_nxdomain"),
        3,
        "the kernel, plainly"
    );
    assert_eq!(agent.kernel_counter("answered_autopath"), 0);
}

#[test]
fn the_pods_of_this_node_come_from_the_api() {
    let topo = Topology::new();
    let _up = upstream(&topo);
    let api = FakeApi::start(&topo.node);
    for o in [
        fake_api::namespace("default"),
        fake_api::namespace("shop"),
        fake_api::service("shop", "web", "10.96.10.20"),
    ] {
        api.apply(o);
    }
    let pod = |name: &str, node: &str, ip: &str| {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
        })
    };
    // The test pod's address, but on another node: not this agent's.
    api.apply(pod("elsewhere", "node-2", POD_V4));
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start_api(
        &topo,
        &api.kubeconfig(dir.path()),
        &["--autopath", "--node-name", "node-1"],
    );
    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));
    let name = "web.shop.shop.svc.cluster.local.";
    let m = ask(&client, name, RecordType::A);
    assert_eq!(
        m.metadata.response_code,
        ResponseCode::NXDomain,
        "a pod of another node"
    );
    // The pod comes to this node: its search paths are completed.
    api.apply(pod("shopper", "node-1", POD_V4));
    eventually("the pod known", Duration::from_secs(10), || {
        (ask(&client, name, RecordType::A).answers.len() == 2).then_some(())
    });
    let requests = api.requests();
    assert!(
        requests.iter().any(|r| r.path == "/api/v1/pods"
            && r.query.get("fieldSelector").map(String::as_str) == Some("spec.nodeName=node-1")),
        "the Pods of node-1 only"
    );
    // Gone: plain NXDOMAIN again.
    api.delete(fake_api::Resource::Pods, "shop", "shopper");
    eventually("the pod forgotten", Duration::from_secs(10), || {
        (ask(&client, name, RecordType::A).metadata.response_code == ResponseCode::NXDomain)
            .then_some(())
    });
    drop(agent);
}

#[test]
fn autopath_from_the_api_needs_the_node_name() {
    let topo = Topology::new();
    let api = FakeApi::start(&topo.node);
    let dir = tempfile::tempdir().unwrap();
    let out = topo
        .node
        .command(support::agent_bin())
        .args([
            "run",
            "--kubeconfig",
            api.kubeconfig(dir.path()).to_str().unwrap(),
            "--autopath",
            "--upstream",
            "198.51.100.53",
        ])
        .env_remove("NODE_NAME")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--node-name") && err.contains("NODE_NAME"),
        "{err}"
    );
}
