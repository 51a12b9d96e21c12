//! The serving path against the reference: whatever the zone went through, the reply the
//! handler gives (from answers it keeps encoded per thread) is byte for byte the reply
//! [`answer_from_zone`] builds from the model as it is now; and a UDP receive loop gives every
//! datagram that reply.

use std::{
    net::IpAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use super::*;
use crate::{
    metrics::Metrics,
    server::{
        cache::{Cache, CacheSettings},
        forward::{ForwardSettings, Forwarder, Policy, Timeouts},
    },
    zone::{
        Change, ZoneSettings,
        name::{reverse_name, wire_from_dotted},
        objects::{
            ClusterObject, EndpointInfo, Kind, ObjectKey, Port, Protocol, ServiceInfo, ServiceKind,
            SliceInfo,
        },
    },
};

fn handler(zone: Arc<RwLock<ZoneModel>>) -> Handler {
    let metrics = Arc::new(Metrics::default());
    let forward = ForwardSettings {
        policy: Policy::Sequential,
        timeouts: Timeouts {
            attempt: Duration::from_secs(1),
            total: Duration::from_millis(1900),
        },
        force_tcp: false,
        max_concurrent: 10,
        health_check: Duration::from_millis(500),
        max_fails: 2,
        tls: None,
    };
    let forwarder = Arc::new(Forwarder::new(Vec::new(), forward, metrics.clone()));
    let cache = Cache::new(
        CacheSettings {
            capacity: 100,
            min_ttl: 5,
            max_ttl: 3600,
            negative_max_ttl: 1800,
            servfail_ttl: 5,
            prefetch: 0,
            serve_stale: Duration::ZERO,
        },
        metrics.cache.clone(),
    );
    let external = Arc::new(ExternalResolver::new(forwarder, cache, metrics.clone()));
    Handler::new(
        zone,
        external,
        metrics,
        heartbeat::Probe::new("cluster.local"),
    )
}

fn model() -> ZoneModel {
    ZoneModel::new(ZoneSettings {
        domain: "cluster.local".into(),
        ttl: 30,
        negative_ttl: 5,
        ns_addrs: vec!["169.254.20.10".parse().unwrap()],
        serial: 7,
    })
}

/// xorshift: the same sequence every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const NAMESPACES: [&str; 3] = ["a", "b", "c"];
const SERVICES: [&str; 4] = ["web", "db", "api", "cache"];

fn address(rng: &mut Rng) -> IpAddr {
    if rng.below(4) == 0 {
        format!("2001:db8::{:x}", 1 + rng.below(6)).parse().unwrap()
    } else {
        format!("10.1.0.{}", 1 + rng.below(6)).parse().unwrap()
    }
}

fn port(rng: &mut Rng) -> Port {
    Port {
        name: ["http", "grpc"].get(rng.below(3)).map(|n| (*n).into()),
        port: 80 + rng.below(3) as u16,
        protocol: Protocol::Tcp,
    }
}

/// A random change to a small cluster: Services of every kind appearing, changing and going,
/// slices with endpoints coming and going ready, namespaces created and deleted.
fn change(rng: &mut Rng) -> Change {
    let ns = NAMESPACES[rng.below(NAMESPACES.len())];
    let svc = SERVICES[rng.below(SERVICES.len())];
    match rng.below(7) {
        0 => Change::Upsert(ClusterObject::Namespace(ns.into())),
        1 => Change::DeleteNamespace(ns.into()),
        2 => Change::Delete(Kind::Service, ObjectKey::new(ns, svc)),
        3 => Change::Delete(
            Kind::EndpointSlice,
            ObjectKey::new(ns, &format!("{svc}-{}", rng.below(2))),
        ),
        4 | 5 => {
            let endpoints = (0..rng.below(4))
                .map(|_| EndpointInfo {
                    addresses: vec![address(rng)],
                    hostname: (rng.below(3) == 0).then(|| format!("h{}", rng.below(2)).into()),
                    ready: rng.below(4) != 0,
                })
                .collect();
            Change::Upsert(ClusterObject::Slice(
                ObjectKey::new(ns, &format!("{svc}-{}", rng.below(2))),
                SliceInfo {
                    service: svc.into(),
                    endpoints,
                    ports: (0..rng.below(3)).map(|_| port(rng)).collect(),
                },
            ))
        }
        _ => {
            let kind = match rng.below(4) {
                0 => ServiceKind::Headless,
                1 => ServiceKind::ExternalName(
                    ["web.a.svc.cluster.local", "example.org"][rng.below(2)].into(),
                ),
                _ => ServiceKind::ClusterIp(vec![
                    format!("10.96.0.{}", rng.below(5)).parse().unwrap(),
                ]),
            };
            Change::Upsert(ClusterObject::Service(
                ObjectKey::new(ns, svc),
                ServiceInfo {
                    kind,
                    ports: (0..rng.below(3)).map(|_| port(rng)).collect(),
                },
            ))
        }
    }
}

/// A name pods could ask: every form of the schema over the same small cluster, and junk.
fn name(rng: &mut Rng) -> Vec<u8> {
    let ns = NAMESPACES[rng.below(NAMESPACES.len())];
    let svc = SERVICES[rng.below(SERVICES.len())];
    let text = match rng.below(13) {
        // Outside the zone, some of them close to it.
        10 => "example.org".to_string(),
        11 => "cluster.local.example.org".to_string(),
        12 => "notcluster.local".to_string(),
        0 => format!("{ns}.svc.cluster.local"),
        1 => format!("{ns}.pod.cluster.local"),
        2 => format!("10-1-0-{}.{ns}.pod.cluster.local", rng.below(4)),
        3 => format!("10-1-0-{}.{svc}.{ns}.svc.cluster.local", 1 + rng.below(6)),
        4 => format!("h{}.{svc}.{ns}.svc.cluster.local", rng.below(2)),
        5 => format!("_http._tcp.{svc}.{ns}.svc.cluster.local"),
        6 => return reverse_name(address(rng)),
        7 => return reverse_name(format!("10.96.0.{}", rng.below(5)).parse().unwrap()),
        8 => format!("example.org.{svc}.{ns}.svc.cluster.local"),
        _ => format!("{svc}.{ns}.svc.cluster.local"),
    };
    wire_from_dotted(&text)
}

fn query(rng: &mut Rng, id: u16) -> Vec<u8> {
    let mut name = name(rng);
    // Clients randomise case: the reply must carry their question as sent.
    for b in name.iter_mut() {
        if b.is_ascii_lowercase() && rng.below(3) == 0 {
            *b = b.to_ascii_uppercase();
        }
    }
    // AXFR now and then: refused, inside the zone or not.
    let qtype: u16 = [1, 28, 33, 12, 5, 16, 255, 252][rng.below(8)];
    let edns = rng.below(2) == 0;
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, edns as u8]);
    m.extend_from_slice(&name);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    if edns {
        // A small UDP size now and then, so that some answers are truncated.
        let size: u16 = if rng.below(4) == 0 { 512 } else { 1232 };
        m.extend_from_slice(&[0, 0, 41]);
        m.extend_from_slice(&size.to_be_bytes());
        m.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    }
    m
}

/// What the reference path says for `msg` over UDP on the model as it is.
fn reference(zone: &RwLock<ZoneModel>, msg: &[u8]) -> Option<Vec<u8>> {
    let q = dns::parse_query(msg).expect("a well-formed query");
    match answer_from_zone(&zone.read().unwrap(), &q, Some(q.udp_limit())) {
        ZoneReply::Reply(r) => Some(r),
        ZoneReply::Forward | ZoneReply::Chase { .. } | ZoneReply::Complete(_) => None,
    }
}

/// Any client: the handler has no rate limit and no search-path completion.
const CLIENT: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 244, 1, 9));

fn served(handler: &Handler, msg: &[u8]) -> Option<Vec<u8>> {
    let mut out = vec![0xee; 3];
    match handler.answer_now(msg, Transport::Udp, CLIENT, &mut out) {
        Ok(true) => Some(out.split_off(3)),
        Ok(false) => panic!("no reply to a well-formed query"),
        Err(_) => None,
    }
}

#[test]
fn kept_answers_equal_the_reference_through_any_change() {
    let zone = Arc::new(RwLock::new(model()));
    let handler = handler(zone.clone());
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    // Asked before the first load: SERVFAIL, never kept.
    let q = query(&mut rng, 1);
    assert_eq!(served(&handler, &q), reference(&zone, &q));
    zone.write().unwrap().set_synced();
    let mut kept_hits = 0;
    for round in 0..400 {
        let changes: Vec<Change> = (0..1 + rng.below(3)).map(|_| change(&mut rng)).collect();
        zone.write().unwrap().apply(changes);
        // Many questions per change, each asked twice, so that most replies come from answers
        // kept in an earlier round.
        for k in 0..60 {
            let q = query(&mut rng, (round * 100 + k) as u16);
            for _ in 0..2 {
                let want = reference(&zone, &q);
                assert_eq!(served(&handler, &q), want, "round {round}: query {q:02x?}");
                kept_hits += want.is_some() as usize;
            }
        }
    }
    assert!(
        kept_hits > 10_000,
        "the zone answered only {kept_hits} queries"
    );
}

#[test]
fn a_thread_that_fell_behind_the_change_log_starts_over() {
    let zone = Arc::new(RwLock::new(model()));
    zone.write().unwrap().set_synced();
    let handler = handler(zone.clone());
    let svc = |ip: &str| {
        Change::Upsert(ClusterObject::Service(
            ObjectKey::new("a", "web"),
            ServiceInfo {
                kind: ServiceKind::ClusterIp(vec![ip.parse().unwrap()]),
                ports: vec![],
            },
        ))
    };
    zone.write().unwrap().apply([svc("10.96.0.1")]);
    let mut q = vec![0, 7, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    q.extend_from_slice(&wire_from_dotted("web.a.svc.cluster.local"));
    q.extend_from_slice(&[0, 1, 0, 1]);
    let before = served(&handler, &q).expect("a zone answer");
    // Far more changes than the log holds, all touching other names; then the asked one.
    let mut w = zone.write().unwrap();
    for i in 0..20_000 {
        w.apply([Change::Upsert(ClusterObject::Namespace(
            format!("ns-{i}").into(),
        ))]);
    }
    w.apply([svc("10.96.0.2")]);
    drop(w);
    let after = served(&handler, &q).expect("a zone answer");
    assert_ne!(before, after, "the new address");
    assert_eq!(Some(after), reference(&zone, &q));
}

#[test]
fn two_models_on_one_thread_keep_apart() {
    let first = Arc::new(RwLock::new(model()));
    let second = Arc::new(RwLock::new(model()));
    for (zone, ip) in [(&first, "10.96.0.1"), (&second, "10.96.0.2")] {
        let mut w = zone.write().unwrap();
        w.set_synced();
        w.apply([Change::Upsert(ClusterObject::Service(
            ObjectKey::new("a", "web"),
            ServiceInfo {
                kind: ServiceKind::ClusterIp(vec![ip.parse().unwrap()]),
                ports: vec![],
            },
        ))]);
    }
    let (h1, h2) = (handler(first.clone()), handler(second.clone()));
    let mut q = vec![0, 7, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    q.extend_from_slice(&wire_from_dotted("web.a.svc.cluster.local"));
    q.extend_from_slice(&[0, 1, 0, 1]);
    for _ in 0..3 {
        assert_eq!(served(&h1, &q), reference(&first, &q));
        assert_eq!(served(&h2, &q), reference(&second, &q));
    }
    assert_ne!(served(&h1, &q), served(&h2, &q));
}

/// A query for `name`, type A, with `id`.
fn query_for(name: &str, id: u16) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    m.extend_from_slice(&wire_from_dotted(name));
    m.extend_from_slice(&[0, 1, 0, 1]);
    m
}

#[test]
fn a_receive_loop_answers_every_datagram_and_leaves_its_socket_when_dropped() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let zone = Arc::new(RwLock::new(model()));
    zone.write().unwrap().set_synced();
    let handler = Arc::new(handler(zone));
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let (receive_loop, _ended) =
        udp::Loop::spawn(socket, handler.clone(), runtime.handle().clone()).unwrap();

    // More than one batch, sent at once: some wait in the socket while the loop answers others.
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let queries: Vec<Vec<u8>> = (0..2 * mmsg::BATCH as u16 + 5)
        .map(|id| query_for(&format!("nope-{id}.ns-1.svc.cluster.local"), id))
        .collect();
    for q in &queries {
        client.send_to(q, addr).unwrap();
    }
    let mut replies = std::collections::BTreeMap::new();
    let mut buf = [0u8; 1500];
    while replies.len() < queries.len() {
        let (n, from) = client.recv_from(&mut buf).expect("every query answered");
        assert_eq!(from, addr);
        replies.insert(u16::from_be_bytes([buf[0], buf[1]]), buf[..n].to_vec());
    }
    for (id, q) in queries.iter().enumerate() {
        let want = served(&handler, q).expect("the zone answers it");
        assert_eq!(want[3] & 0x0f, 3, "NXDOMAIN");
        assert_eq!(replies[&(id as u16)], want, "reply to query {id}");
    }

    // Dropped, the loop has stopped and closed its socket: it has left the port (and a
    // reuseport group) by the time the drop returns.
    assert_eq!(handover::bound_before(addr, false), 1);
    drop(receive_loop);
    assert_eq!(handover::bound_before(addr, false), 0);
}
