//! The agent watching a Kubernetes API: the real agent process in the node's namespace,
//! `--kubeconfig` naming a fake API server (tests/support/fake_api.rs) that speaks list/watch
//! over HTTP, the XDP program on the pod's veth, queries from the pod's namespace. Every
//! answer the tests wait for is then checked to come from the kernel, by its counters.
//!
//! Needs root (`cargo xtask test` runs it).

mod support;

use std::{net::IpAddr, time::Duration};

use hickory_proto::{op::ResponseCode, rr::RecordType};
use support::{
    Agent, Client, LISTEN_V4, Topology, answers,
    fake_api::{self, FakeApi, Resource},
    wait::{Want, assert_kernel_answers, await_kernel, eventually},
};

/// How long any change may take to show. Generous: the machine is shared; the benchmark
/// measures the real figure.
const CHANGE_DEADLINE: Duration = Duration::from_secs(10);
/// Reconnecting waits for kube-runtime's backoff (0.8 s doubling, with jitter).
const RECONNECT_DEADLINE: Duration = Duration::from_secs(40);

struct Setup {
    // Dropped in order: the agent first, then the API it watches, then the namespaces.
    agent: Agent,
    api: FakeApi,
    client: Client,
    _dir: tempfile::TempDir,
    _topo: Topology,
}

/// A topology, a fake API holding `objects`, and the agent watching it, ready.
fn setup(objects: Vec<serde_json::Value>) -> Setup {
    let topo = Topology::new();
    let api = FakeApi::start(&topo.node);
    for o in objects {
        api.apply(o);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start_api(&topo, &api.kubeconfig(dir.path()), &[]);
    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));
    Setup {
        agent,
        api,
        client,
        _dir: dir,
        _topo: topo,
    }
}

fn cluster_basics() -> Vec<serde_json::Value> {
    vec![
        fake_api::namespace("default"),
        fake_api::namespace("kube-system"),
        fake_api::service("default", "kubernetes", "10.96.0.1"),
        fake_api::slice("default", "kubernetes", "kubernetes", &["192.0.2.10"]),
    ]
}

impl Setup {
    fn await_kernel(&self, name: &str, qtype: RecordType, want: Want) {
        await_kernel(
            &self.agent,
            &self.client,
            name,
            qtype,
            want,
            CHANGE_DEADLINE,
        );
    }

    fn assert_kernel_answers(&self, name: &str, qtype: RecordType, want: &Want) {
        assert_kernel_answers(&self.agent, &self.client, name, qtype, want);
    }

    fn connected(&self) -> f64 {
        self.agent.metric("xdns_api_connected")
    }
}

#[test]
fn namespaces_are_created_changed_and_deleted() {
    let s = setup(cluster_basics());
    let name = "blue.svc.cluster.local.";
    s.assert_kernel_answers(name, RecordType::A, &Want::Nxdomain);

    s.api.apply(fake_api::namespace("blue"));
    s.await_kernel(name, RecordType::A, Want::Nodata);
    // Pod names are not kernel entries (there are 2^32 of them): userspace answers, from the
    // same namespace set.
    let pod = "1-2-3-4.blue.pod.cluster.local.";
    let m = s.client.query(pod, RecordType::A, true);
    assert_eq!(answers(&m), ["A 1.2.3.4"], "{pod}");

    // A change with no DNS meaning (a label) keeps the namespace.
    let mut labelled = fake_api::namespace("blue");
    labelled["metadata"]["labels"] = serde_json::json!({"team": "blue"});
    s.api.apply(labelled);
    // Events apply in order: once a later change shows, the label change has been applied.
    s.api
        .apply(fake_api::service("default", "marker", "10.96.0.99"));
    s.await_kernel(
        "marker.default.svc.cluster.local.",
        RecordType::A,
        Want::Records(&["A 10.96.0.99"]),
    );
    s.assert_kernel_answers(name, RecordType::A, &Want::Nodata);

    s.api
        .delete(Resource::Namespaces, "", "blue")
        .expect("exists");
    s.await_kernel(name, RecordType::A, Want::Nxdomain);
    let m = s.client.query(pod, RecordType::A, true);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{pod}");
}

#[test]
fn services_are_created_changed_and_deleted() {
    let mut objects = cluster_basics();
    objects.push(fake_api::namespace("shop"));
    let s = setup(objects);
    let name = "web.shop.svc.cluster.local.";
    s.assert_kernel_answers(name, RecordType::A, &Want::Nxdomain);

    s.api.apply(fake_api::service("shop", "web", "10.96.20.1"));
    s.await_kernel(name, RecordType::A, Want::Records(&["A 10.96.20.1"]));
    s.assert_kernel_answers(
        "_http._tcp.web.shop.svc.cluster.local.",
        RecordType::SRV,
        &Want::Records(&["SRV 0 100 80 web.shop.svc.cluster.local."]),
    );
    s.assert_kernel_answers(
        "1.20.96.10.in-addr.arpa.",
        RecordType::PTR,
        &Want::Records(&["PTR web.shop.svc.cluster.local."]),
    );

    s.api.apply(fake_api::service("shop", "web", "10.96.20.2"));
    s.await_kernel(name, RecordType::A, Want::Records(&["A 10.96.20.2"]));
    s.assert_kernel_answers(
        "2.20.96.10.in-addr.arpa.",
        RecordType::PTR,
        &Want::Records(&["PTR web.shop.svc.cluster.local."]),
    );

    // An object the agent cannot use is skipped (logged), not fatal: the others still change.
    s.api
        .apply(fake_api::service("shop", "broken", "10.96.20.300"));
    s.api
        .apply(fake_api::service("shop", "after", "10.96.20.3"));
    s.await_kernel(
        "after.shop.svc.cluster.local.",
        RecordType::A,
        Want::Records(&["A 10.96.20.3"]),
    );
    s.assert_kernel_answers(
        "broken.shop.svc.cluster.local.",
        RecordType::A,
        &Want::Nxdomain,
    );
    assert!(
        s.agent.log().contains("object skipped"),
        "the skipped object is logged"
    );

    s.api
        .delete(Resource::Services, "shop", "web")
        .expect("exists");
    s.await_kernel(name, RecordType::A, Want::Nxdomain);
    s.assert_kernel_answers(
        "_http._tcp.web.shop.svc.cluster.local.",
        RecordType::SRV,
        &Want::Nxdomain,
    );
}

#[test]
fn endpoint_slices_are_created_changed_and_deleted() {
    let mut objects = cluster_basics();
    objects.push(fake_api::namespace("shop"));
    objects.push(fake_api::headless("shop", "db"));
    let s = setup(objects);
    let name = "db.shop.svc.cluster.local.";
    // Headless with no ready endpoint: the name does not exist.
    s.assert_kernel_answers(name, RecordType::A, &Want::Nxdomain);

    s.api
        .apply(fake_api::slice("shop", "db-1", "db", &["10.244.1.1"]));
    s.await_kernel(name, RecordType::A, Want::Records(&["A 10.244.1.1"]));
    s.assert_kernel_answers(
        "10-244-1-1.db.shop.svc.cluster.local.",
        RecordType::A,
        &Want::Records(&["A 10.244.1.1"]),
    );

    s.api.apply(fake_api::slice(
        "shop",
        "db-1",
        "db",
        &["10.244.1.2", "10.244.1.3"],
    ));
    s.await_kernel(
        name,
        RecordType::A,
        Want::Records(&["A 10.244.1.2", "A 10.244.1.3"]),
    );
    s.assert_kernel_answers(
        "10-244-1-1.db.shop.svc.cluster.local.",
        RecordType::A,
        &Want::Nxdomain,
    );
    s.assert_kernel_answers(
        "_db._tcp.db.shop.svc.cluster.local.",
        RecordType::SRV,
        &Want::Records(&[
            "SRV 0 50 5432 10-244-1-2.db.shop.svc.cluster.local.",
            "SRV 0 50 5432 10-244-1-3.db.shop.svc.cluster.local.",
        ]),
    );

    s.api
        .delete(Resource::EndpointSlices, "shop", "db-1")
        .expect("exists");
    s.await_kernel(name, RecordType::A, Want::Nxdomain);
    s.assert_kernel_answers(
        "10-244-1-2.db.shop.svc.cluster.local.",
        RecordType::A,
        &Want::Nxdomain,
    );
}

#[test]
fn a_delete_missed_while_the_api_was_down_is_applied_by_the_relist() {
    let mut objects = cluster_basics();
    objects.push(fake_api::namespace("shop"));
    objects.push(fake_api::service("shop", "gone", "10.96.30.1"));
    objects.push(fake_api::service("shop", "stays", "10.96.30.2"));
    let mut s = setup(objects);
    s.assert_kernel_answers(
        "gone.shop.svc.cluster.local.",
        RecordType::A,
        &Want::Records(&["A 10.96.30.1"]),
    );
    let lists_before = s.api.stats().list_pages;

    s.api.set_down(true);
    eventually("xdns_api_connected = 0", CHANGE_DEADLINE, || {
        (s.connected() == 0.0).then_some(())
    });
    // Changes the agent cannot see; then the history is compacted, so the watch cannot
    // resume where it stopped.
    s.api
        .delete(Resource::Services, "shop", "gone")
        .expect("exists");
    s.api
        .apply(fake_api::service("shop", "stays", "10.96.30.3"));
    s.api.compact();
    s.api.set_down(false);

    s.await_kernel(
        "gone.shop.svc.cluster.local.",
        RecordType::A,
        Want::Nxdomain,
    );
    s.await_kernel(
        "stays.shop.svc.cluster.local.",
        RecordType::A,
        Want::Records(&["A 10.96.30.3"]),
    );
    s.assert_kernel_answers(
        "3.30.96.10.in-addr.arpa.",
        RecordType::PTR,
        &Want::Records(&["PTR stays.shop.svc.cluster.local."]),
    );
    let stats = s.api.stats();
    assert!(stats.gone >= 1, "the resumed watch got 410 Gone: {stats:?}");
    assert!(
        stats.list_pages > lists_before,
        "and the agent relisted: {stats:?}"
    );
    eventually("xdns_api_connected = 1", RECONNECT_DEADLINE, || {
        (s.connected() == 1.0).then_some(())
    });
}

#[test]
fn answers_continue_from_the_last_state_while_the_api_is_down() {
    let mut objects = cluster_basics();
    objects.push(fake_api::namespace("shop"));
    objects.push(fake_api::service("shop", "web", "10.96.40.1"));
    let mut s = setup(objects);
    // No bookmarks: the agent must notice the API is back without any event arriving.
    s.api.set_bookmark_every(Duration::from_secs(3600));
    eventually("xdns_api_connected = 1", CHANGE_DEADLINE, || {
        (s.connected() == 1.0).then_some(())
    });

    s.api.set_down(true);
    eventually("xdns_api_connected = 0", CHANGE_DEADLINE, || {
        (s.connected() == 0.0).then_some(())
    });
    s.assert_kernel_answers(
        "web.shop.svc.cluster.local.",
        RecordType::A,
        &Want::Records(&["A 10.96.40.1"]),
    );
    s.assert_kernel_answers(
        "kubernetes.default.svc.cluster.local.",
        RecordType::A,
        &Want::Records(&["A 10.96.0.1"]),
    );
    s.assert_kernel_answers(
        "nope.shop.svc.cluster.local.",
        RecordType::A,
        &Want::Nxdomain,
    );
    assert_eq!(
        s.agent.http_get("/ready").map(|(c, _)| c),
        Some(200),
        "still ready: the zone is loaded"
    );
    assert!(
        s.agent
            .log()
            .contains("answers continue from the last known state"),
        "the outage is logged"
    );

    // Back up: the watches resume (no relist needed: the history is intact) and report it.
    let lists_before = s.api.stats().list_pages;
    s.api.set_down(false);
    eventually("xdns_api_connected = 1", RECONNECT_DEADLINE, || {
        (s.connected() == 1.0).then_some(())
    });
    eventually(
        "four watches open (the zone's three, the kube-dns ConfigMap)",
        RECONNECT_DEADLINE,
        || (s.api.open_watches() == 4).then_some(()),
    );
    s.api.apply(fake_api::service("shop", "web", "10.96.40.2"));
    s.await_kernel(
        "web.shop.svc.cluster.local.",
        RecordType::A,
        Want::Records(&["A 10.96.40.2"]),
    );
    assert_eq!(
        s.api.stats().list_pages,
        lists_before,
        "resumed from the last resourceVersion, without a relist"
    );
}

#[test]
fn not_ready_and_servfail_until_the_first_full_list() {
    let topo = Topology::new();
    let api = FakeApi::start(&topo.node);
    for o in cluster_basics() {
        api.apply(o);
    }
    api.apply(fake_api::namespace("shop"));
    api.apply(fake_api::service("shop", "web", "10.96.50.1"));
    api.hold_lists(true);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut agent = Agent::spawn_api(&topo, &api.kubeconfig(dir.path()), &[]);
    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));

    let (code, body) = eventually("the metrics endpoint", CHANGE_DEADLINE, || {
        agent.http_get("/ready")
    });
    assert_eq!(code, 503, "not ready before the first list: {body}");
    eventually("the agent asks for its lists", CHANGE_DEADLINE, || {
        (api.requests().iter().filter(|r| !r.is_watch()).count() >= 3).then_some(())
    });
    let servfail = "coredns_dns_responses_total{rcode=\"SERVFAIL\"}";
    let before = agent.metric(servfail);
    for name in [
        "web.shop.svc.cluster.local.",
        "nope.shop.svc.cluster.local.",
        "cluster.local.",
    ] {
        let m = client.query(name, RecordType::A, true);
        assert_eq!(
            m.metadata.response_code,
            ResponseCode::ServFail,
            "{name}: never a wrong NXDOMAIN before the zone is loaded"
        );
    }
    assert_eq!(
        agent.metric(servfail),
        before + 3.0,
        "userspace said SERVFAIL"
    );
    assert_eq!(agent.kernel_answered(), 0, "the kernel answers nothing yet");
    assert_eq!(agent.metric("xdns_zone_synced"), 0.0);
    assert_eq!(
        agent.metric("xdns_api_connected"),
        0.0,
        "no list has completed"
    );
    assert_eq!(agent.http_get("/ready").map(|(c, _)| c), Some(503));

    api.hold_lists(false);
    agent.wait_ready(CHANGE_DEADLINE);
    assert_eq!(agent.metric("xdns_zone_synced"), 1.0);
    let m = client.query("web.shop.svc.cluster.local.", RecordType::A, true);
    assert_eq!(answers(&m), ["A 10.96.50.1"]);
    assert_eq!(agent.kernel_answered(), 1, "the kernel answers once synced");
    assert_eq!(agent.metric("xdns_api_connected"), 1.0);
}

#[test]
fn a_forbidden_resource_is_reported_with_the_fix() {
    let topo = Topology::new();
    let api = FakeApi::start(&topo.node);
    for o in cluster_basics() {
        api.apply(o);
    }
    api.forbid(Resource::EndpointSlices, true);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut agent = Agent::spawn_api(&topo, &api.kubeconfig(dir.path()), &[]);
    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));
    eventually("the RBAC fix in the log", CHANGE_DEADLINE, || {
        agent
            .log()
            .lines()
            .any(|l| {
                l.contains("WARN")
                    && l.contains("endpointslices")
                    && l.contains("403")
                    && l.contains("apply deploy/rbac.yaml")
            })
            .then_some(())
    });
    assert_eq!(agent.http_get("/ready").map(|(c, _)| c), Some(503));
    assert_eq!(agent.metric("xdns_api_connected"), 0.0);
    let m = client.query("kubernetes.default.svc.cluster.local.", RecordType::A, true);
    assert_eq!(
        m.metadata.response_code,
        ResponseCode::ServFail,
        "not loaded: two kinds of three are not the zone"
    );

    // Fixed (RBAC applied): the agent recovers by itself.
    api.forbid(Resource::EndpointSlices, false);
    agent.wait_ready(RECONNECT_DEADLINE);
    assert_kernel_answers(
        &agent,
        &client,
        "kubernetes.default.svc.cluster.local.",
        RecordType::A,
        &Want::Records(&["A 10.96.0.1"]),
    );
    eventually("xdns_api_connected = 1", CHANGE_DEADLINE, || {
        (agent.metric("xdns_api_connected") == 1.0).then_some(())
    });
}

#[test]
fn a_forbidden_kube_dns_config_map_holds_up_nothing_and_is_read_once_allowed() {
    let topo = Topology::new();
    let stub = std::net::Ipv4Addr::new(198, 51, 100, 91);
    topo.node
        .ip(&["addr", "add", &format!("{stub}/32"), "dev", "lo"]);
    let stub_upstream = support::upstream::Upstream::start(
        &topo.node,
        (stub, 53).into(),
        std::sync::Arc::new(move |q: &hickory_proto::op::Message| {
            let mut r = support::upstream::reply_to(q);
            r.add_answer(hickory_proto::rr::Record::from_rdata(
                q.queries[0].name().clone(),
                300,
                hickory_proto::rr::RData::A(stub.into()),
            ));
            support::upstream::Action::Reply(r)
        }),
    );
    let api = FakeApi::start(&topo.node);
    for o in cluster_basics() {
        api.apply(o);
    }
    api.apply(fake_api::config_map(
        "kube-system",
        "kube-dns",
        &[("stubDomains", &format!(r#"{{"corp.test": ["{stub}"]}}"#))],
    ));
    // As before deploy/rbac.yaml had the Role: the zone loads, and the log says the fix.
    api.forbid(Resource::ConfigMaps, true);
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start_api(&topo, &api.kubeconfig(dir.path()), &[]);
    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));
    assert!(
        agent.log().lines().any(|l| l.contains("WARN")
            && l.contains("kube-dns ConfigMap")
            && l.contains("403")
            && l.contains("its Role in kube-system")),
        "the fix in the log:\n{}",
        agent.log()
    );
    assert_kernel_answers(
        &agent,
        &client,
        "kubernetes.default.svc.cluster.local.",
        RecordType::A,
        &Want::Records(&["A 10.96.0.1"]),
    );
    eventually("xdns_api_connected = 1", CHANGE_DEADLINE, || {
        (agent.metric("xdns_api_connected") == 1.0).then_some(())
    });
    let m = client.query("www.corp.test.", RecordType::A, true);
    assert_ne!(answers(&m), [format!("A {stub}")], "no stub domain yet");

    // Allowed: the watch recovers by itself and the stub domain applies.
    api.forbid(Resource::ConfigMaps, false);
    let mut n = 0;
    eventually(
        "corp.test goes to its stub upstream",
        RECONNECT_DEADLINE,
        || {
            n += 1;
            let m = client.query(&format!("w{n}.corp.test."), RecordType::A, true);
            (answers(&m) == [format!("A {stub}")]).then_some(())
        },
    );
    assert_eq!(stub_upstream.queries_for(&format!("w{n}.corp.test")), 1);
}

#[test]
fn watches_speak_the_protocol_and_resume_without_relisting() {
    // 1,200 Services: more than one page of 500.
    let mut objects = cluster_basics();
    objects.push(fake_api::namespace("bulk"));
    for i in 0..1200u32 {
        objects.push(fake_api::service(
            "bulk",
            &format!("s{i}"),
            &format!("10.97.{}.{}", i / 250, i % 250 + 1),
        ));
    }
    let s = setup(objects);
    s.assert_kernel_answers(
        "s1199.bulk.svc.cluster.local.",
        RecordType::A,
        &Want::Records(&["A 10.97.4.200"]),
    );
    let requests = s.api.requests();
    let services: Vec<_> = requests
        .iter()
        .filter(|r| r.path == Resource::Services.path())
        .collect();
    let lists: Vec<_> = services.iter().filter(|r| !r.is_watch()).collect();
    assert_eq!(lists.len(), 3, "three pages: {lists:?}");
    assert_eq!(lists[0].query.get("limit").map(String::as_str), Some("500"));
    assert!(lists[1].query.contains_key("continue"), "{:?}", lists[1]);
    let watch = services
        .iter()
        .find(|r| r.is_watch())
        .expect("a watch of services");
    assert_eq!(
        watch.query.get("allowWatchBookmarks").map(String::as_str),
        Some("true")
    );
    assert!(
        watch.query.get("resourceVersion").is_some_and(|v| v != "0"),
        "the watch starts from the list's resourceVersion: {watch:?}"
    );
    assert_eq!(
        watch.headers.get("accept-encoding").map(String::as_str),
        Some("identity")
    );
    assert!(
        watch
            .headers
            .get("authorization")
            .is_some_and(|a| a.starts_with("Bearer ")),
        "the kubeconfig's token is used"
    );
    eventually("bookmarks sent", CHANGE_DEADLINE, || {
        (s.api.stats().bookmarks > 0).then_some(())
    });

    // A cut watch resumes from its last resourceVersion; what changed meanwhile arrives
    // without a relist.
    let stats = s.api.stats();
    s.api.drop_watches();
    s.api.apply(fake_api::service("bulk", "s0", "10.97.9.9"));
    s.await_kernel(
        "s0.bulk.svc.cluster.local.",
        RecordType::A,
        Want::Records(&["A 10.97.9.9"]),
    );
    let after = s.api.stats();
    assert_eq!(after.list_pages, stats.list_pages, "no relist: {after:?}");
    assert!(after.watches > stats.watches, "watches reopened: {after:?}");
    assert_eq!(s.connected(), 1.0);
}

/// The fake also serves kube's streaming lists (`sendInitialEvents`), which the agent does not
/// use today (kube's default is list-then-watch) but a later kube or a changed config would:
/// here kube-runtime's own watcher, no agent, runs against it in the node's namespace.
#[test]
fn the_fake_serves_streaming_lists_to_kube_watchers() {
    use futures::StreamExt as _;
    use k8s_openapi::api::core::v1::Service;
    use kube::runtime::watcher;

    async fn next_event(
        events: &mut (
                 impl futures::Stream<Item = Result<watcher::Event<Service>, watcher::Error>> + Unpin
             ),
    ) -> watcher::Event<Service> {
        tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("an event within 10 s")
            .expect("the watcher runs")
            .expect("no watch error")
    }

    support::require_root();
    let node = support::Netns::new("xs");
    let api = FakeApi::start(&node);
    api.apply(fake_api::service("shop", "a", "10.96.60.1"));
    api.apply(fake_api::service("shop", "b", "10.96.60.2"));
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = api.kubeconfig(dir.path());
    let api = std::sync::Arc::new(api);
    let fake = api.clone();
    let seen: Vec<String> = node.enter(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async move {
                let kc = kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig");
                let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .expect("config");
                let client = kube::Client::try_from(config).expect("client");
                let mut events = std::pin::pin!(watcher(
                    kube::Api::<Service>::all(client),
                    watcher::Config::default().streaming_lists(),
                ));
                let mut seen = Vec::new();
                loop {
                    match next_event(&mut events).await {
                        watcher::Event::Init => seen.push("init".to_string()),
                        watcher::Event::InitApply(s) => {
                            seen.push(format!("listed {}", s.metadata.name.unwrap_or_default()))
                        }
                        watcher::Event::InitDone => {
                            seen.push("done".to_string());
                            break;
                        }
                        other => panic!("unexpected before InitDone: {other:?}"),
                    }
                }
                fake.apply(fake_api::service("shop", "c", "10.96.60.3"));
                match next_event(&mut events).await {
                    watcher::Event::Apply(s) => {
                        seen.push(format!("applied {}", s.metadata.name.unwrap_or_default()))
                    }
                    other => panic!("wanted the new Service, got {other:?}"),
                }
                seen
            })
    });
    assert_eq!(
        seen,
        ["init", "listed a", "listed b", "done", "applied c"],
        "the initial events, the end-of-initial-events bookmark, then the watch"
    );
    let requests = api.requests();
    let first = requests.first().expect("a request");
    assert!(first.is_watch(), "a streaming list is a watch: {first:?}");
    assert_eq!(
        first.query.get("sendInitialEvents").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        first.query.get("resourceVersionMatch").map(String::as_str),
        Some("NotOlderThan")
    );
    assert_eq!(api.stats().list_pages, 0, "no list request at all");
}
