//! Where names outside the cluster go, through the real path.
//!
//! - Intercept mode without `--upstream`: the agent forwards to the kube-dns Service's ready
//!   endpoints, read from its EndpointSlices (a zone file here), and follows them as the pods
//!   roll; with none ready it answers SERVFAIL and says so once.
//! - `--stub-domain`: a domain to its own upstreams (the longest domain wins), over DNS over
//!   TLS too.
//! - The kube-dns ConfigMap (`stubDomains`, `upstreamNameservers`) from the fake API server and
//!   from a zone file: applied, changed live, a malformed version refused while the last good
//!   settings keep working, the command line's stub domain winning over the ConfigMap's.
//!
//! The intercept topology is tests/intercept.rs's (`support::kube_node`): pods on routed veths
//! ask the kube-dns cluster IP; the XDP program steers what it cannot answer to the agent. The
//! "CoreDNS" pods are unbound, answering every name below `whoami.test` with their own address,
//! so an answer says which endpoint the agent asked. Other upstreams are the scriptable test
//! server, answering every name with its own address.
//!
//! Needs root, nftables, iptables and unbound (`cargo xtask setup` installs them).

mod support;

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::Duration,
};

use hickory_proto::{
    op::{Message, ResponseCode},
    rr::{RData, Record, RecordType},
};
use serde_json::json;
use support::{
    Agent, Client, LISTEN_V4, Netns, Topology, UPSTREAM_V4,
    fake_api::{self, FakeApi, Resource},
    kube_node::{COREDNS, Cluster, KUBE_DNS, LISTEN, Pod, ServicePath, WHOAMI},
    servers::Server,
    tls::TestCa,
    unique,
    upstream::{Action, Behaviour, Upstream, reply_to},
    wait::eventually,
};

/// A CoreDNS pod that joins in a roll.
const COREDNS_NEW: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 13);
/// Upstreams the ConfigMap and the flags name, each a pod.
const STUB_X: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 21);
const STUB_Z: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 23);
const STUB_W: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 24);
const RESOLVER_Y: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 22);

/// How long a change may take to reach the answers: the zone file is polled every second.
const CHANGE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Helpers.

/// Answers every question with one A record: the server's own address.
fn answers_as(addr: Ipv4Addr) -> Behaviour {
    Arc::new(move |q: &Message| {
        let mut r = reply_to(q);
        r.add_answer(Record::from_rdata(
            q.queries[0].name().clone(),
            300,
            RData::A(addr.into()),
        ));
        Action::Reply(r)
    })
}

/// A pod running the scriptable upstream on `addr`:53, answering as [`answers_as`].
fn upstream_pod(cluster: &Cluster, addr: Ipv4Addr) -> (Pod, Upstream) {
    let pod = cluster.plug(addr);
    let up = Upstream::start(
        &pod.ns,
        SocketAddr::new(IpAddr::V4(addr), 53),
        answers_as(addr),
    );
    (pod, up)
}

/// The reply to `name` A, if any came.
fn ask(client: &Client, name: &str) -> Option<Message> {
    let q = support::query_message(name, RecordType::A, false);
    let reply = client.exchange_raw(&q.to_vec().expect("encode"))?;
    Message::from_vec(&reply).ok()
}

/// The one address `name` A is answered with (NOERROR), or the reason there is none.
fn answered_by(client: &Client, name: &str) -> Result<Ipv4Addr, String> {
    let m = ask(client, name).ok_or_else(|| format!("{name}: no reply"))?;
    if m.metadata.response_code != ResponseCode::NoError {
        return Err(format!("{name}: {}", m.metadata.response_code));
    }
    match m.answers.as_slice() {
        [r] => match &r.data {
            RData::A(a) => Ok(a.0),
            other => Err(format!("{name}: {other:?}")),
        },
        other => Err(format!("{name}: {other:?}")),
    }
}

fn must_be_answered_by(client: &Client, name: &str) -> Ipv4Addr {
    answered_by(client, name).unwrap_or_else(|e| panic!("{e}"))
}

/// Waits until `name` (a fresh one each time: `{n}` is replaced by a counter, so that no
/// cache stands in the way) is answered by `want`; returns the last name asked.
fn await_answer_from(client: &Client, name: &str, want: Ipv4Addr) -> String {
    let mut n = 0;
    eventually(&format!("{name} answered by {want}"), CHANGE, || {
        n += 1;
        let asked = name.replace("{n}", &format!("w{n}"));
        (answered_by(client, &asked).ok() == Some(want)).then_some(asked)
    })
}

/// The metrics page.
fn metrics(agent: &Agent) -> String {
    agent.http_get("/metrics").expect("metrics endpoint").1
}

/// Writes `text` so that the agent's poll sees the old file or the new, never half of one.
fn write_zone(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("writing the zone file");
    std::fs::rename(&tmp, path).expect("replacing the zone file");
}

/// The kube-dns Service (cluster IP [`KUBE_DNS`]) and one EndpointSlice of `endpoints`
/// (address, ready) on the `dns` ports, and `more` documents, as a zone file.
fn kube_dns_zone(endpoints: &[(Ipv4Addr, bool)], more: &str) -> String {
    let endpoints: String = endpoints
        .iter()
        .map(|(a, ready)| format!("- addresses: [{a}]\n  conditions: {{ready: {ready}}}\n"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: kube-system}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: kube-dns, namespace: kube-system}}\n\
         spec:\n  clusterIP: {KUBE_DNS}\n  ports:\n  - {{name: dns, port: 53, protocol: UDP}}\n  \
         - {{name: dns-tcp, port: 53, protocol: TCP}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: kube-dns-a\n  namespace: kube-system\n  \
         labels: {{kubernetes.io/service-name: kube-dns}}\naddressType: IPv4\n\
         ports:\n- {{name: dns, port: 53, protocol: UDP}}\n- {{name: dns-tcp, port: 53, protocol: TCP}}\n\
         endpoints:\n{endpoints}{more}"
    )
}

/// The kube-dns ConfigMap as a zone file document.
fn config_map_doc(data: &[(&str, &str)]) -> String {
    let data: String = data
        .iter()
        .map(|(k, v)| format!("  {k}: '{v}'\n"))
        .collect();
    format!(
        "\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: kube-dns, namespace: kube-system}}\n\
         data:\n{data}"
    )
}

/// The agent in intercept mode on the cluster, with `source` (`--zone-file PATH` or
/// `--kubeconfig PATH`) and no `--upstream`.
fn intercepting_agent(cluster: &Cluster, source: [&str; 2], extra: &[&str]) -> Agent {
    let mut args: Vec<String> = vec![
        "run".into(),
        source[0].into(),
        source[1].into(),
        "--listen".into(),
        LISTEN.to_string(),
        "--intercept".into(),
        KUBE_DNS.to_string(),
        "--interface-pattern".into(),
        cluster.interface_pattern(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let pin = PathBuf::from("/sys/fs/bpf").join(unique("xdns-u"));
    Agent::start_in(&cluster.node, args, pin, 9253)
}

fn to(addr: Ipv4Addr) -> String {
    format!("to=\"{addr}:53\"")
}

// ---------------------------------------------------------------------------------------------
// Intercept mode: the kube-dns endpoints.

#[test]
fn intercept_mode_forwards_to_the_kube_dns_endpoints_and_follows_them_as_pods_roll() {
    let mut cluster = Cluster::new(ServicePath::KubeProxy, &[]);
    let (_new_pod, coredns_new) = cluster.dns_pod(COREDNS_NEW, &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let zone = dir.path().join("zone.yaml");
    let [c1, c2] = COREDNS;
    // No endpoint ready yet (the CoreDNS pods are starting).
    write_zone(&zone, &kube_dns_zone(&[(c1, false), (c2, false)], ""));
    let agent = intercepting_agent(
        &cluster,
        ["--zone-file", &zone.display().to_string()],
        &["--upstream-policy", "round-robin"],
    );
    let client = cluster.client(0, Duration::from_secs(3));

    // No ready endpoint: SERVFAIL, and the log says why, once.
    for i in 0..3 {
        let name = format!("s{i}.{WHOAMI}");
        let m = ask(&client, &name).unwrap_or_else(|| panic!("no reply to {name}"));
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail, "{name}");
    }
    let said = |log: &str| log.matches("has no ready endpoint").count();
    assert_eq!(said(&agent.log()), 1, "said once:\n{}", agent.log());
    assert_eq!(agent.metric("xdns_kube_dns_endpoints"), 0.0);

    // Both ready: the agent forwards to the pods themselves, in turn.
    write_zone(&zone, &kube_dns_zone(&[(c1, true), (c2, true)], ""));
    await_answer_from(&client, &format!("{{n}}.{WHOAMI}"), c1);
    let steered = agent.kernel_counters()["steered"];
    let mut seen = BTreeSet::new();
    for i in 0..4 {
        let name = format!("a{i}.{WHOAMI}");
        let by = must_be_answered_by(&client, &name);
        let server = &cluster.coredns[COREDNS
            .iter()
            .position(|c| *c == by)
            .expect("a CoreDNS pod")]
        .1;
        server.wait_logged(&name);
        seen.insert(by);
    }
    assert_eq!(seen, BTreeSet::from(COREDNS), "both endpoints asked");
    assert_eq!(
        agent.kernel_counters()["steered"],
        steered + 4,
        "steered to the agent by the XDP program"
    );
    assert_eq!(agent.metric("xdns_kube_dns_endpoints"), 2.0);
    let text = metrics(&agent);
    assert!(
        text.contains(&to(c1)) && text.contains(&to(c2)),
        "the endpoints are the upstreams:\n{text}"
    );
    assert!(
        !text.contains(&to(KUBE_DNS)),
        "never the intercepted address itself:\n{text}"
    );
    assert!(agent.log().contains("ready endpoints again"));

    // c2 stops answering: health checks mark it down.
    let (c2_pod, c2_server) = cluster.coredns.remove(1);
    drop(c2_server);
    let healthy_c2 = format!("xdns_forward_upstream_healthy{{{}}}", to(c2));
    let mut n = 0;
    eventually("c2 marked down", CHANGE, || {
        n += 1;
        must_be_answered_by(&client, &format!("d{n}.{WHOAMI}"));
        (agent.metric(&healthy_c2) == 0.0).then_some(())
    });

    // A roll: c1 terminates (not ready), the new pod is ready; c2 stays, still down.
    write_zone(
        &zone,
        &kube_dns_zone(&[(c1, false), (c2, true), (COREDNS_NEW, true)], ""),
    );
    await_answer_from(&client, &format!("{{n}}.{WHOAMI}"), COREDNS_NEW);
    let requests_c2 = format!("coredns_forward_requests_total{{{}}}", to(c2));
    let asked_c2 = agent.metric(&requests_c2);
    for i in 0..4 {
        let name = format!("r{i}.{WHOAMI}");
        assert_eq!(
            must_be_answered_by(&client, &name),
            COREDNS_NEW,
            "{name}: the one healthy endpoint"
        );
        coredns_new.wait_logged(&name);
        assert_eq!(
            cluster.coredns[0].1.count(&name),
            0,
            "{name} never reached the pod that left"
        );
    }
    assert_eq!(
        agent.metric(&requests_c2),
        asked_c2,
        "c2 kept its down state through the roll: not asked at all"
    );
    assert_eq!(agent.metric(&healthy_c2), 0.0);
    let text = metrics(&agent);
    assert!(
        !text.contains(&to(c1)),
        "the series of the pod that left are gone:\n{text}"
    );
    assert!(text.contains(&to(COREDNS_NEW)), "{text}");
    assert_eq!(agent.metric("xdns_kube_dns_endpoints"), 2.0);
    drop(c2_pod);
}

// ---------------------------------------------------------------------------------------------
// --stub-domain, plain and TLS.

const STUB_A: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 81);
const STUB_B: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 82);
const STUB_DOT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 83);
const DOT_NAME: &str = "dns.example.test";

#[test]
fn stub_domains_go_to_their_own_upstreams_over_dns_and_tls() {
    let topo = Topology::new();
    for ip in [STUB_A, STUB_B, STUB_DOT] {
        topo.node
            .ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"]);
    }
    let default = Upstream::start(
        &topo.node,
        SocketAddr::new(IpAddr::V4(UPSTREAM_V4), 53),
        answers_as(UPSTREAM_V4),
    );
    let corp = Upstream::start(
        &topo.node,
        SocketAddr::new(IpAddr::V4(STUB_A), 53),
        answers_as(STUB_A),
    );
    let eng = Upstream::start(
        &topo.node,
        SocketAddr::new(IpAddr::V4(STUB_B), 53),
        answers_as(STUB_B),
    );
    let ca = TestCa::new("xdns stub CA");
    let dot = Server::unbound_dot(&topo.node, STUB_DOT, &ca.server_cert(DOT_NAME, false), "");
    let agent = Agent::start(
        &topo,
        &support::example_cluster(),
        &[
            "--stub-domain",
            &format!("corp.test={STUB_A}"),
            "--stub-domain",
            &format!("Eng.Corp.Test.={STUB_B}"),
            "--stub-domain",
            &format!("burst.test=tls://{STUB_DOT}#{DOT_NAME}"),
            "--upstream-ca",
            &ca.file(),
        ],
    );
    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));
    let cases = [
        ("www.example.org", UPSTREAM_V4, &default),
        ("corp.test", STUB_A, &corp),
        ("www.corp.test", STUB_A, &corp),
        ("a.b.eng.corp.test", STUB_B, &eng),
        // Whole labels: not below corp.test.
        ("www.xcorp.test", UPSTREAM_V4, &default),
    ];
    for (name, by, upstream) in cases {
        assert_eq!(must_be_answered_by(&client, name), by, "{name}");
        assert_eq!(upstream.queries_for(name), 1, "{name} asked there once");
        for other in [&default, &corp, &eng] {
            if !std::ptr::eq(other, upstream) {
                assert_eq!(other.queries_for(name), 0, "{name} asked nowhere else");
            }
        }
    }
    // Cached like any other answer.
    assert_eq!(must_be_answered_by(&client, "www.corp.test"), STUB_A);
    assert_eq!(
        corp.queries_for("www.corp.test"),
        1,
        "the second from the cache"
    );

    // DNS over TLS: unbound answers every name below burst.test with 192.0.2.77.
    assert_eq!(
        must_be_answered_by(&client, "x.burst.test"),
        Ipv4Addr::new(192, 0, 2, 77)
    );
    dot.wait_logged("x.burst.test. A IN");
    let (queries, over_tls) = dot.queries_and_tls();
    assert!(queries >= 1, "unbound saw {queries} queries");
    assert_eq!(
        over_tls, queries,
        "every query unbound received came over TLS (it serves plain DNS on port 53 too)"
    );
    assert_eq!(default.queries_for("x.burst.test"), 0);
    assert_eq!(
        agent.metric(&format!(
            "coredns_forward_requests_total{{to=\"tls://{STUB_DOT}:853#{DOT_NAME}\"}}"
        )),
        1.0
    );
}

// ---------------------------------------------------------------------------------------------
// The kube-dns ConfigMap.

/// The kube-dns Service with the CoreDNS pods as endpoints, for the fake API.
fn kube_dns_objects() -> Vec<serde_json::Value> {
    let endpoints: Vec<serde_json::Value> = COREDNS
        .iter()
        .map(|a| json!({"addresses": [a.to_string()], "conditions": {"ready": true}}))
        .collect();
    let ports = json!([{"name": "dns", "port": 53, "protocol": "UDP"},
                       {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]);
    vec![
        fake_api::namespace("kube-system"),
        json!({"kind": "Service", "metadata": {"name": "kube-dns", "namespace": "kube-system"},
               "spec": {"clusterIP": KUBE_DNS.to_string(), "clusterIPs": [KUBE_DNS.to_string()],
                        "ports": ports}}),
        json!({"kind": "EndpointSlice",
               "metadata": {"name": "kube-dns-a", "namespace": "kube-system",
                            "labels": {"kubernetes.io/service-name": "kube-dns"}},
               "addressType": "IPv4", "endpoints": endpoints, "ports": ports}),
    ]
}

fn kube_dns_config_map(data: &[(&str, &str)]) -> serde_json::Value {
    fake_api::config_map("kube-system", "kube-dns", data)
}

#[test]
fn the_kube_dns_config_map_from_the_api_is_applied_live_and_a_malformed_one_is_refused() {
    let cluster = Cluster::new(ServicePath::KubeProxy, &[]);
    let (_x, stub_x) = upstream_pod(&cluster, STUB_X);
    let (_y, resolver_y) = upstream_pod(&cluster, RESOLVER_Y);
    let (_z, stub_z) = upstream_pod(&cluster, STUB_Z);
    let api = FakeApi::start(&cluster.node);
    for o in kube_dns_objects() {
        api.apply(o);
    }
    let stubs = format!(r#"{{"corp.test": ["{STUB_X}"]}}"#);
    let nameservers = format!(r#"["{RESOLVER_Y}"]"#);
    api.apply(kube_dns_config_map(&[
        ("stubDomains", &stubs),
        ("upstreamNameservers", &nameservers),
    ]));
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = api.kubeconfig(dir.path());
    let agent = intercepting_agent(
        &cluster,
        ["--kubeconfig", &kubeconfig.display().to_string()],
        &[],
    );
    let client = cluster.client(0, Duration::from_secs(3));

    // The watch asks for the one ConfigMap, by name, in kube-system.
    let requests = api.requests();
    let watch = requests
        .iter()
        .find(|r| r.path == Resource::ConfigMaps.namespaced_path("kube-system") && r.is_watch())
        .unwrap_or_else(|| panic!("a watch of the kube-dns ConfigMap: {requests:?}"));
    assert_eq!(
        watch.query.get("fieldSelector").map(String::as_str),
        Some("metadata.name=kube-dns")
    );

    // Applied from the first answer on: the zone waited for the ConfigMap.
    assert_eq!(must_be_answered_by(&client, "www.corp.test"), STUB_X);
    assert_eq!(stub_x.queries_for("www.corp.test"), 1);
    assert_eq!(
        must_be_answered_by(&client, "www.example.org"),
        RESOLVER_Y,
        "upstreamNameservers replace the kube-dns endpoints"
    );
    assert_eq!(
        must_be_answered_by(&client, &format!("a.{WHOAMI}")),
        RESOLVER_Y
    );
    assert_eq!(agent.metric("xdns_kube_dns_config_valid"), 1.0);

    // Changed: corp.test moves, upstreamNameservers go (back to the kube-dns endpoints). The
    // name cached from the old stub upstream (TTL 300) is asked again of the new one.
    let stubs = format!(r#"{{"corp.test": ["{STUB_Z}"]}}"#);
    api.apply(kube_dns_config_map(&[("stubDomains", &stubs)]));
    eventually("www.corp.test answered by Z", CHANGE, || {
        (answered_by(&client, "www.corp.test").ok() == Some(STUB_Z)).then_some(())
    });
    assert_eq!(stub_z.queries_for("www.corp.test"), 1);
    let by = must_be_answered_by(&client, &format!("b.{WHOAMI}"));
    assert!(COREDNS.contains(&by), "the kube-dns endpoints again: {by}");
    assert_eq!(resolver_y.queries_for(&format!("b.{WHOAMI}")), 0);

    // Malformed: refused, counted, and the last good settings keep working.
    api.apply(kube_dns_config_map(&[(
        "stubDomains",
        r#"{"corp.test": ["203.0.113.99"], "#,
    )]));
    eventually("the ConfigMap refused", CHANGE, || {
        (agent.metric("xdns_kube_dns_config_refused_total") == 1.0).then_some(())
    });
    assert_eq!(agent.metric("xdns_kube_dns_config_valid"), 0.0);
    let log = agent.log();
    assert!(
        log.contains("ConfigMap kube-system/kube-dns: data.stubDomains: not a JSON object")
            && log.contains("the last good settings stay"),
        "the log says what is wrong and what stays:\n{log}"
    );
    assert_eq!(must_be_answered_by(&client, "new.corp.test"), STUB_Z);
    let by = must_be_answered_by(&client, &format!("c.{WHOAMI}"));
    assert!(COREDNS.contains(&by), "{by}");

    // Deleted: no stub domain any more; corp.test goes to kube-dns, which knows no such name.
    api.delete(Resource::ConfigMaps, "kube-system", "kube-dns")
        .expect("exists");
    let mut n = 0;
    eventually("corp.test names go to kube-dns", CHANGE, || {
        n += 1;
        let m = ask(&client, &format!("gone{n}.corp.test"))?;
        (m.metadata.response_code == ResponseCode::NXDomain).then_some(())
    });
    assert_eq!(agent.metric("xdns_kube_dns_config_valid"), 1.0);
}

#[test]
fn the_kube_dns_config_map_from_a_zone_file_and_a_stub_domain_flag_that_overrides_it() {
    let cluster = Cluster::new(ServicePath::KubeProxy, &[]);
    let (_x, stub_x) = upstream_pod(&cluster, STUB_X);
    let (_y, _resolver_y) = upstream_pod(&cluster, RESOLVER_Y);
    let (_z, _stub_z) = upstream_pod(&cluster, STUB_Z);
    let (_w, stub_w) = upstream_pod(&cluster, STUB_W);
    let dir = tempfile::tempdir().expect("tempdir");
    let zone = dir.path().join("zone.yaml");
    let ready = [(COREDNS[0], true), (COREDNS[1], true)];
    let stubs = format!(r#"{{"corp.test": ["{STUB_X}"], "flag.test": ["{STUB_X}"]}}"#);
    let nameservers = format!(r#"["{RESOLVER_Y}"]"#);
    write_zone(
        &zone,
        &kube_dns_zone(
            &ready,
            &config_map_doc(&[
                ("stubDomains", &stubs),
                ("upstreamNameservers", &nameservers),
            ]),
        ),
    );
    let agent = intercepting_agent(
        &cluster,
        ["--zone-file", &zone.display().to_string()],
        &["--stub-domain", &format!("flag.test={STUB_W}")],
    );
    let client = cluster.client(0, Duration::from_secs(3));
    assert_eq!(must_be_answered_by(&client, "www.corp.test"), STUB_X);
    assert_eq!(
        must_be_answered_by(&client, "www.flag.test"),
        STUB_W,
        "--stub-domain overrides the ConfigMap's entry for the same domain"
    );
    assert_eq!(stub_x.queries_for("www.flag.test"), 0);
    assert_eq!(stub_w.queries_for("www.flag.test"), 1);
    assert_eq!(must_be_answered_by(&client, "www.example.org"), RESOLVER_Y);
    assert!(
        agent.log().contains(
            "the kube-dns ConfigMap's stub domain flag.test is not used: --stub-domain \
             flag.test overrides it"
        ),
        "{}",
        agent.log()
    );

    // An edit: corp.test moves to Z, upstreamNameservers go.
    let stubs = format!(r#"{{"corp.test": ["{STUB_Z}"]}}"#);
    write_zone(
        &zone,
        &kube_dns_zone(&ready, &config_map_doc(&[("stubDomains", &stubs)])),
    );
    await_answer_from(&client, "{n}.corp.test", STUB_Z);
    let by = must_be_answered_by(&client, &format!("e.{WHOAMI}"));
    assert!(COREDNS.contains(&by), "the kube-dns endpoints again: {by}");

    // An edit whose ConfigMap is malformed, and which adds a Service: the Service is served,
    // the ConfigMap refused, and its last good settings stay.
    let web = "\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: kube-system}\n\
               spec: {clusterIP: 10.96.7.7}\n";
    write_zone(
        &zone,
        &kube_dns_zone(
            &ready,
            &format!(
                "{}{web}",
                config_map_doc(&[
                    ("stubDomains", &stubs),
                    ("upstreamNameservers", "[\"nope\"]")
                ])
            ),
        ),
    );
    eventually("the new Service answered", CHANGE, || {
        (answered_by(&client, "web.kube-system.svc.cluster.local").ok()
            == Some(Ipv4Addr::new(10, 96, 7, 7)))
        .then_some(())
    });
    eventually("the ConfigMap refused", CHANGE, || {
        (agent.metric("xdns_kube_dns_config_refused_total") == 1.0).then_some(())
    });
    assert!(
        agent.log().contains(
            "ConfigMap kube-system/kube-dns: data.upstreamNameservers[0]: \"nope\" is not ADDR"
        ),
        "{}",
        agent.log()
    );
    assert_eq!(must_be_answered_by(&client, "more.corp.test"), STUB_Z);
    let by = must_be_answered_by(&client, &format!("f.{WHOAMI}"));
    assert!(COREDNS.contains(&by), "{by}");
}

#[test]
fn a_zone_file_with_a_malformed_kube_dns_config_map_is_refused_at_start() {
    let node = Netns::new("xr");
    let dir = tempfile::tempdir().expect("tempdir");
    let zone = dir.path().join("zone.yaml");
    write_zone(
        &zone,
        &kube_dns_zone(
            &[(COREDNS[0], true)],
            &config_map_doc(&[("stubDomains", r#"{"svc.cluster.local": ["192.0.2.53"]}"#)]),
        ),
    );
    let out = node
        .command(support::agent_bin())
        .args(["run", "--zone-file"])
        .arg(&zone)
        .args(["--no-kernel", "--upstream", "192.0.2.53"])
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::null())
        .output()
        .expect("running dns-agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must be refused:\n{stderr}");
    assert!(
        stderr.contains("the zone file is refused")
            && stderr.contains(
                "ConfigMap kube-system/kube-dns: data.stubDomains[\"svc.cluster.local\"]: \
                 svc.cluster.local is at or below the cluster domain cluster.local"
            ),
        "{stderr}"
    );
}
