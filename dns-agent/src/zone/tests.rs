//! Unit tests of the zone model: changes, relists, and the answers they lead to. The full
//! schema is checked against real packets by tests/conformance.rs.

use std::net::IpAddr;

use super::*;
use crate::zone::{
    name::{to_text, wire_from_dotted},
    objects::{EndpointInfo, Port, Protocol, ServiceInfo, SliceInfo},
};

fn model() -> ZoneModel {
    let mut m = ZoneModel::new(ZoneSettings {
        domain: "cluster.local".into(),
        ttl: 30,
        negative_ttl: 5,
        ns_addrs: vec!["169.254.20.10".parse().unwrap()],
        serial: 7,
    });
    m.set_synced();
    m
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn service(ns: &str, name: &str, kind: ServiceKind) -> Change {
    Change::Upsert(ClusterObject::Service(
        ObjectKey::new(ns, name),
        ServiceInfo {
            kind,
            ports: vec![Port {
                name: Some("http".into()),
                port: 80,
                protocol: Protocol::Tcp,
            }],
        },
    ))
}

fn slice(ns: &str, name: &str, svc: &str, eps: &[(&str, bool)]) -> Change {
    Change::Upsert(ClusterObject::Slice(
        ObjectKey::new(ns, name),
        SliceInfo {
            service: svc.into(),
            endpoints: eps
                .iter()
                .map(|(a, ready)| EndpointInfo {
                    addresses: vec![ip(a)],
                    hostname: None,
                    ready: *ready,
                })
                .collect(),
            ports: vec![Port {
                name: Some("http".into()),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
        },
    ))
}

fn resolve(m: &ZoneModel, name: &str, qtype: u16) -> Resolution {
    m.resolve(&wire_from_dotted(name), qtype)
}

fn answer_count(r: &Resolution) -> u16 {
    match r {
        Resolution::Answer { sections, .. } => sections.ancount,
        other => panic!("not an answer: {other:?}"),
    }
}

#[test]
fn nothing_is_answered_before_the_first_load() {
    let m = ZoneModel::new(model().settings().clone());
    assert_eq!(
        resolve(&m, "kubernetes.default.svc.cluster.local", T_A),
        Resolution::NotReady
    );
    assert_eq!(resolve(&m, "nope.cluster.local", T_A), Resolution::NotReady);
    // Names outside the zone are forwarded even now.
    assert_eq!(resolve(&m, "example.com", T_A), Resolution::Forward);
}

#[test]
fn headless_services_follow_readiness() {
    let mut m = model();
    m.apply([
        service("db", "pg", ServiceKind::Headless),
        slice("db", "pg-1", "pg", &[("10.1.0.1", false)]),
    ]);
    assert_eq!(
        resolve(&m, "pg.db.svc.cluster.local", T_A),
        Resolution::Nxdomain,
        "none ready"
    );
    m.apply([slice(
        "db",
        "pg-1",
        "pg",
        &[("10.1.0.1", true), ("10.1.0.2", true)],
    )]);
    assert_eq!(
        answer_count(&resolve(&m, "pg.db.svc.cluster.local", T_A)),
        2
    );
    assert_eq!(
        answer_count(&resolve(&m, "10-1-0-2.pg.db.svc.cluster.local", T_A)),
        1
    );
    assert_eq!(
        answer_count(&resolve(&m, "2.0.1.10.in-addr.arpa", T_PTR)),
        1
    );
    assert_eq!(
        resolve(&m, "pg.db.svc.cluster.local", T_TXT),
        Resolution::Nodata
    );
}

#[test]
fn a_relist_is_the_new_truth() {
    let mut m = model();
    m.apply([
        service("a", "one", ServiceKind::ClusterIp(vec![ip("10.96.0.1")])),
        service("a", "two", ServiceKind::ClusterIp(vec![ip("10.96.0.2")])),
    ]);
    // The relist lacks "two" (its delete was missed): it goes; "one" is unchanged: no change.
    let one = ClusterObject::Service(
        ObjectKey::new("a", "one"),
        ServiceInfo {
            kind: ServiceKind::ClusterIp(vec![ip("10.96.0.1")]),
            ports: vec![Port {
                name: Some("http".into()),
                port: 80,
                protocol: Protocol::Tcp,
            }],
        },
    );
    let changes = m.diff_relist(Kind::Service, vec![one]);
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert!(matches!(&changes[0], Change::Delete(Kind::Service, k) if k.to_string() == "a/two"));
    m.apply(changes);
    assert_eq!(
        resolve(&m, "two.a.svc.cluster.local", T_A),
        Resolution::Nxdomain
    );
    assert_eq!(
        answer_count(&resolve(&m, "one.a.svc.cluster.local", T_A)),
        1
    );
}

#[test]
fn touched_names_are_the_objects_own() {
    let mut m = model();
    m.apply([
        service("a", "web", ServiceKind::ClusterIp(vec![ip("10.96.0.9")])),
        slice("a", "web-1", "web", &[("10.1.0.9", true)]),
        service("b", "other", ServiceKind::ClusterIp(vec![ip("10.96.0.8")])),
    ]);
    let names: Vec<String> = m
        .touched(&[service(
            "a",
            "web",
            ServiceKind::ClusterIp(vec![ip("10.96.0.10")]),
        )])
        .iter()
        .map(|n| to_text(n))
        .collect();
    for n in &names {
        assert!(
            n.contains("web.a.svc") || n.ends_with("in-addr.arpa.") || n.starts_with("a."),
            "{n} is not web's"
        );
    }
    assert!(
        names.contains(&"9.0.96.10.in-addr.arpa.".to_string()),
        "old PTR: {names:?}"
    );
    assert!(
        names.contains(&"10.0.96.10.in-addr.arpa.".to_string()),
        "new PTR: {names:?}"
    );
    assert!(names.contains(&"_http._tcp.web.a.svc.cluster.local.".to_string()));
}

#[test]
fn a_cluster_ip_names_its_service_before_any_endpoint() {
    let mut m = model();
    m.apply([
        service("a", "web", ServiceKind::ClusterIp(vec![ip("10.96.0.9")])),
        // An endpoint elsewhere that (oddly) has the same address.
        service("b", "hl", ServiceKind::Headless),
        slice("b", "hl-1", "hl", &[("10.96.0.9", true)]),
    ]);
    let Resolution::Answer { sections, .. } = resolve(&m, "9.0.96.10.in-addr.arpa", T_PTR) else {
        panic!()
    };
    assert_eq!(sections.ancount, 1);
    let text = String::from_utf8_lossy(&sections.data).to_string();
    assert!(text.contains("web"), "{text}");
}

#[test]
fn kernel_entries_cover_every_name_that_exists() {
    let mut m = model();
    m.apply([
        service("a", "web", ServiceKind::ClusterIp(vec![ip("10.96.0.9")])),
        slice("a", "web-1", "web", &[("10.1.0.9", true)]),
        service("a", "ext", ServiceKind::ExternalName("example.org".into())),
    ]);
    for name in m.all_names() {
        let entries = m.kernel_entries(&name);
        let exists = !matches!(
            m.resolve(&name, 999),
            Resolution::Nxdomain | Resolution::Forward
        );
        // Every existing name of the zone has an entry for "other types" — the kernel's
        // NXDOMAIN rule depends on it — and reverse names have their PTR.
        if exists && !to_text(&name).ends_with("arpa.") {
            assert!(
                entries.iter().any(|(q, _)| *q == QTYPE_OTHER),
                "{}",
                to_text(&name)
            );
        }
    }
    let ext = m.kernel_entries(&wire_from_dotted("ext.a.svc.cluster.local"));
    assert!(
        ext.iter()
            .any(|(q, a)| *q == T_CNAME && matches!(a, KernelAnswer::Answer { .. }))
    );
    assert!(
        ext.iter()
            .any(|(q, a)| *q == QTYPE_OTHER && *a == KernelAnswer::Pass),
        "A is chased by userspace"
    );
    let endpoint = m.kernel_entries(&wire_from_dotted("10-1-0-9.web.a.svc.cluster.local"));
    assert_eq!(
        endpoint,
        vec![(QTYPE_OTHER, KernelAnswer::Pass)],
        "ClusterIP endpoint names: a marker"
    );
}
