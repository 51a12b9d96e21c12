//! The XDP program on crafted frames, with BPF_PROG_TEST_RUN: no network, the real verifier
//! and the real kernel. Each case checks the verdict, the counter that moved, and for
//! answers the rewritten frame: headers and checksums, and a DNS payload equal byte for byte
//! to what the userspace server answers to the same query.
//!
//! Needs root (`cargo xtask test` runs it).

mod support;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

use dns_agent::{
    dns,
    kernel::{
        Capacity, Kernel,
        cache_sync::KernelCache,
        sync::{KernelSync, entries_of},
    },
    server::{ZoneReply, answer_from_zone, cache::Answer, forward::Question, reply_from_answer},
    zone::{ZoneModel, name::wire_from_dotted},
};
use hickory_proto::{
    op::ResponseCode,
    rr::{Name, RData, Record},
};
use support::{
    LISTEN_V4, LISTEN_V6,
    answers::{a, question, record, ttls, upstream, upstream_soa},
    frames::{check_reply, dns_query, query_frame, udp_frame},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const CLIENT_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));
const CLIENT_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2));
const SERVER_V4: IpAddr = IpAddr::V4(LISTEN_V4);
const SERVER_V6: IpAddr = IpAddr::V6(LISTEN_V6);
/// The kube-dns Service's cluster IPs, intercepted.
const KUBE_DNS_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const KUBE_DNS_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x53, 0, 0, 0, 0, 0x10);

const A: u16 = 1;
const CNAME: u16 = 5;
const SOA: u16 = 6;
const PTR: u16 = 12;
const MX: u16 = 15;
const TXT: u16 = 16;
const AAAA: u16 = 28;
const SRV: u16 = 33;
const HTTPS: u16 = 65;

struct Fixture {
    kernel: Kernel,
    sync: KernelSync,
    /// The cache of upstream answers' side of the maps.
    cache: KernelCache,
    zone: ZoneModel,
    pin: std::path::PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin);
    }
}

fn fixture_with(synced: bool) -> Fixture {
    fixture_sized(synced, Capacity::default())
}

fn fixture_sized(synced: bool, capacity: Capacity) -> Fixture {
    support::require_root();
    let mut objects = support::example_objects();
    objects.extend(support::headless_with(40));
    objects.extend(support::headless_with(100));
    let zone = support::zone_from(objects);
    let pin = std::path::PathBuf::from("/sys/fs/bpf").join(support::unique("xdns-p"));
    let (kernel, maps) = Kernel::load(capacity, &pin, true).expect("loading the XDP program");
    let mut sync = KernelSync::new(maps);
    let cache = KernelCache::new(sync.maps_mut().take_cache().expect("the cache maps"));
    sync.maps_mut()
        .set_listen(&[LISTEN_V4.octets()], &[LISTEN_V6.octets()])
        .unwrap();
    sync.maps_mut()
        .set_intercept(&[KUBE_DNS_V4.octets()], &[KUBE_DNS_V6.octets()])
        .unwrap();
    sync.write_config(&zone).unwrap();
    let names = zone.all_names();
    let stats = sync.apply(Vec::new(), entries_of(&zone, &names));
    assert_eq!(stats.failed, 0);
    assert!(stats.written > 100, "{stats:?}");
    if synced {
        sync.set_synced().unwrap();
    }
    // As a running agent does: the program answers only within the grace period after the
    // agent's last heartbeat.
    sync.maps().heartbeat().beat();
    Fixture {
        kernel,
        sync,
        cache,
        zone,
        pin,
    }
}

fn fixture() -> Fixture {
    fixture_with(true)
}

impl Fixture {
    fn counters(&self) -> HashMap<&'static str, u64> {
        self.sync.maps().counters().unwrap().into_iter().collect()
    }

    /// Runs one frame; asserts the verdict and that exactly `counter` moved (by one).
    fn run(&self, frame: &[u8], verdict: u32, counter: &str) -> Vec<u8> {
        self.run_counting(frame, verdict, &[counter])
    }

    /// Runs one frame; asserts the verdict and that exactly `counters` moved (by one each).
    fn run_counting(&self, frame: &[u8], verdict: u32, counters: &[&str]) -> Vec<u8> {
        let before = self.counters();
        let out = self.kernel.test_run(frame, 1).expect("BPF_PROG_TEST_RUN");
        let after = self.counters();
        let mut moved: Vec<_> = after
            .iter()
            .filter(|(k, v)| before[*k] != **v)
            .map(|(k, v)| (*k, v - before[k]))
            .collect();
        moved.sort();
        let mut want: Vec<_> = counters.iter().map(|c| (counter_name(c), 1)).collect();
        want.sort();
        assert_eq!(moved, want, "counters that moved");
        let counter = counters[0];
        assert_eq!(out.action, verdict, "verdict for {counter}");
        if verdict == XDP_PASS {
            assert_eq!(out.frame, frame, "a passed frame is untouched");
        }
        out.frame
    }

    /// The userspace server's reply to `dns` over UDP.
    fn userspace(&self, dns_bytes: &[u8]) -> Vec<u8> {
        let q = dns::parse_query(dns_bytes).expect("a query userspace parses");
        match answer_from_zone(&self.zone, &q, Some(q.udp_limit())) {
            ZoneReply::Reply(r) => r,
            other => panic!("userspace would not answer from the zone: {other:?}"),
        }
    }

    /// A query the kernel must answer: checks the reply frame and that its DNS payload is what
    /// userspace answers.
    fn answered(&self, client: IpAddr, server: IpAddr, dns_bytes: &[u8], counter: &str) -> Vec<u8> {
        let frame = query_frame(client, server, dns_bytes);
        let out = self.run(&frame, XDP_TX, counter);
        let reply = check_reply(&frame, &out);
        assert_eq!(
            reply.dns,
            self.userspace(dns_bytes),
            "kernel and userspace answers differ"
        );
        reply.dns
    }
}

fn counter_name(c: &str) -> &'static str {
    dns_common::counter::NAMES
        .iter()
        .find(|n| **n == c)
        .unwrap_or_else(|| panic!("no counter {c}"))
}

fn rcode(reply: &[u8]) -> u16 {
    u16::from_be_bytes([reply[2], reply[3]]) & 0xf
}

fn counts(reply: &[u8]) -> [u16; 4] {
    [4, 6, 8, 10].map(|i| u16::from_be_bytes([reply[i], reply[i + 1]]))
}

#[test]
fn answers_a_and_aaaa_over_ipv4_and_ipv6() {
    let f = fixture();
    let r = f.answered(
        CLIENT_V4,
        SERVER_V4,
        &dns_query(1, "web.shop.svc.cluster.local", A, None),
        "answered",
    );
    assert_eq!(counts(&r), [1, 1, 0, 0]);
    assert_eq!(&r[r.len() - 4..], &[10, 96, 10, 20]);
    let r = f.answered(
        CLIENT_V6,
        SERVER_V6,
        &dns_query(
            2,
            "web.shop.svc.cluster.local",
            AAAA,
            Some((1232, 0, false)),
        ),
        "answered",
    );
    assert_eq!(counts(&r), [1, 1, 0, 1], "answer plus our OPT");
    let r = f.answered(
        CLIENT_V4,
        SERVER_V4,
        &dns_query(3, "kubernetes.default.svc.cluster.local", A, None),
        "answered",
    );
    assert_eq!(&r[r.len() - 4..], &[10, 96, 0, 1]);
}

#[test]
fn mixed_case_is_echoed_and_matched() {
    let f = fixture();
    let q = dns_query(
        7,
        "KuBeRnEtEs.DEFAULT.svc.Cluster.Local",
        A,
        Some((4096, 0, true)),
    );
    let r = f.answered(CLIENT_V4, SERVER_V4, &q, "answered");
    let qlen = q.len() - 12 - 11;
    assert_eq!(
        r[12..12 + qlen],
        q[12..12 + qlen],
        "question echoed byte for byte"
    );
    // OPT: our size, version 0, DO echoed.
    let opt = &r[r.len() - 11..];
    assert_eq!(opt, &[0, 0, 41, 0x04, 0xd0, 0, 0, 0x80, 0, 0, 0]);
}

#[test]
fn every_record_type_of_the_schema() {
    let f = fixture();
    for (name, qtype) in [
        ("_http._tcp.web.shop.svc.cluster.local", SRV),
        ("web.shop.svc.cluster.local", SRV),
        ("postgres.shop.svc.cluster.local", A),
        ("postgres-0.postgres.shop.svc.cluster.local", A),
        ("_pg._tcp.postgres.shop.svc.cluster.local", SRV),
        ("10-244-1-41.cache.shop.svc.cluster.local", A),
        ("payments.shop.svc.cluster.local", CNAME),
        ("dns-version.cluster.local", TXT),
        ("cluster.local", SOA),
        ("10.0.96.10.in-addr.arpa", PTR),
        ("31.1.244.10.in-addr.arpa", PTR),
        // A full-nibble IPv6 reverse name: longer than 62 bytes, the long-key map.
        (
            "4.1.a.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.0.d.f.ip6.arpa",
            PTR,
        ),
    ] {
        let r = f.answered(
            CLIENT_V4,
            SERVER_V4,
            &dns_query(9, name, qtype, Some((1232, 0, false))),
            "answered",
        );
        assert_eq!(rcode(&r), 0, "{name}");
        assert!(counts(&r)[1] >= 1, "{name} {qtype}: an answer");
    }
}

#[test]
fn negative_answers_carry_the_soa() {
    let f = fixture();
    // The name exists, the type does not: NODATA, for any type.
    for qtype in [TXT, MX, HTTPS, AAAA] {
        let r = f.answered(
            CLIENT_V4,
            SERVER_V4,
            &dns_query(1, "kubernetes.default.svc.cluster.local", qtype, None),
            "answered_nodata",
        );
        assert_eq!((rcode(&r), counts(&r)), (0, [1, 0, 1, 0]), "type {qtype}");
    }
    // Search-path expansions and unknown names: NXDOMAIN, in the kernel.
    for name in [
        "www.example.com.shop.svc.cluster.local",
        "example.com.svc.cluster.local",
        "nothing.default.svc.cluster.local",
        "no-such-ns.svc.cluster.local",
        "batch.shop.svc.cluster.local",
    ] {
        let r = f.answered(
            CLIENT_V4,
            SERVER_V4,
            &dns_query(1, name, A, Some((1232, 0, false))),
            "answered_nxdomain",
        );
        assert_eq!((rcode(&r), counts(&r)), (3, [1, 0, 1, 1]), "{name}");
    }
}

#[test]
fn what_userspace_answers_goes_up() {
    let f = fixture();
    for (name, qtype, counter) in [
        // Synthesised per query by userspace.
        ("10-1-2-3.shop.pod.cluster.local", A, "pass_miss"),
        // A CNAME to chase.
        ("payments.shop.svc.cluster.local", A, "pass_userspace"),
        // Not the cluster's.
        ("www.example.com", A, "pass_miss"),
        ("1.2.0.192.in-addr.arpa", PTR, "pass_miss"),
        // 100 endpoints: more than the kernel holds for one answer.
        ("bulk-100.shop.svc.cluster.local", A, "pass_userspace"),
        // Meta types.
        ("web.shop.svc.cluster.local", 255, "pass_unsupported"),
        ("cluster.local", 252, "pass_unsupported"),
    ] {
        let frame = query_frame(
            CLIENT_V4,
            SERVER_V4,
            &dns_query(5, name, qtype, Some((1232, 0, false))),
        );
        f.run(&frame, XDP_PASS, counter);
    }
}

#[test]
fn answers_that_do_not_fit_go_up_unless_edns_allows_them() {
    let f = fixture();
    // 40 A records: 12 + 32 + 40*16 = 684 bytes: too big for 512, fine for EDNS 1232.
    let name = "bulk-40.shop.svc.cluster.local";
    let frame = query_frame(CLIENT_V4, SERVER_V4, &dns_query(5, name, A, None));
    f.run(&frame, XDP_PASS, "pass_too_big");
    let frame = query_frame(
        CLIENT_V4,
        SERVER_V4,
        &dns_query(5, name, A, Some((600, 0, false))),
    );
    f.run(&frame, XDP_PASS, "pass_too_big");
    let r = f.answered(
        CLIENT_V4,
        SERVER_V4,
        &dns_query(5, name, A, Some((1232, 0, false))),
        "answered",
    );
    assert_eq!(counts(&r)[1], 40);
}

#[test]
fn nothing_is_answered_before_the_zone_is_synced() {
    let f = fixture_with(false);
    let frame = query_frame(
        CLIENT_V4,
        SERVER_V4,
        &dns_query(1, "web.shop.svc.cluster.local", A, None),
    );
    f.run(&frame, XDP_PASS, "pass_not_synced");
}

/// A valid query frame, then `edit` applied to it.
fn edited(edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut dns = dns_query(1, "web.shop.svc.cluster.local", A, None);
    edit(&mut dns);
    query_frame(CLIENT_V4, SERVER_V4, &dns)
}

#[test]
fn every_pass_rule() {
    let f = fixture();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "a response (QR=1)",
            edited(|d| d[2] |= 0x80),
            "pass_unsupported",
        ),
        (
            "opcode NOTIFY",
            edited(|d| d[2] |= 4 << 3),
            "pass_unsupported",
        ),
        (
            "TC set in the query",
            edited(|d| d[2] |= 0x02),
            "pass_unsupported",
        ),
        ("two questions", edited(|d| d[5] = 2), "pass_unsupported"),
        ("an answer record", edited(|d| d[7] = 1), "pass_unsupported"),
        (
            "an authority record",
            edited(|d| d[9] = 1),
            "pass_unsupported",
        ),
        (
            "two additional records",
            edited(|d| d[11] = 2),
            "pass_unsupported",
        ),
        (
            "class CH",
            edited(|d| {
                let n = d.len();
                d[n - 1] = 3;
            }),
            "pass_unsupported",
        ),
        (
            "trailing bytes",
            edited(|d| d.extend_from_slice(&[0, 0])),
            "pass_malformed",
        ),
        (
            "a compression pointer in the question",
            {
                let mut d = vec![
                    0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'w', b'e', b'b', 0xc0, 0x0c, 0, 1, 0, 1,
                ];
                d.truncate(22);
                query_frame(CLIENT_V4, SERVER_V4, &d)
            },
            "pass_unsupported",
        ),
        (
            "a name longer than 255 bytes",
            {
                let long = vec!["a".repeat(63); 5].join(".");
                query_frame(CLIENT_V4, SERVER_V4, &dns_query(1, &long, A, None))
            },
            "pass_malformed",
        ),
        (
            "a label past the end",
            edited(|d| d[12] = 60),
            "pass_malformed",
        ),
        (
            "EDNS version 1",
            query_frame(
                CLIENT_V4,
                SERVER_V4,
                &dns_query(1, "web.shop.svc.cluster.local", A, Some((1232, 1, false))),
            ),
            "pass_unsupported",
        ),
        (
            "an additional record that is not OPT",
            edited(|d| {
                d[11] = 1;
                d.extend_from_slice(&[0, 0, 250, 0, 255, 0, 0, 0, 0, 0, 0]); // TSIG-ish
            }),
            "pass_unsupported",
        ),
        (
            "an OPT whose length runs past the end",
            edited(|d| {
                d[11] = 1;
                d.extend_from_slice(&[0, 0, 41, 4, 0, 0, 0, 0, 0, 0, 8, 0, 10, 0]);
            }),
            "pass_malformed",
        ),
        (
            "type 0",
            query_frame(
                CLIENT_V4,
                SERVER_V4,
                &dns_query(1, "web.shop.svc.cluster.local", 0, None),
            ),
            "pass_unsupported",
        ),
        (
            "not for a listen address",
            query_frame(
                CLIENT_V4,
                "192.0.2.1".parse().unwrap(),
                &dns_query(1, "web.shop.svc.cluster.local", A, None),
            ),
            "pass_not_dns",
        ),
        (
            "not port 53",
            udp_frame(
                CLIENT_V4,
                SERVER_V4,
                40000,
                5353,
                &dns_query(1, "web.shop.svc.cluster.local", A, None),
            ),
            "pass_not_dns",
        ),
        (
            "source port 0",
            udp_frame(
                CLIENT_V4,
                SERVER_V4,
                0,
                53,
                &dns_query(1, "web.shop.svc.cluster.local", A, None),
            ),
            "pass_unsupported",
        ),
    ];
    for (what, frame, counter) in cases {
        eprintln!("case: {what}");
        f.run(&frame, XDP_PASS, counter);
    }
}

#[test]
fn ip_layer_pass_rules() {
    let f = fixture();
    let base = query_frame(
        CLIENT_V4,
        SERVER_V4,
        &dns_query(1, "web.shop.svc.cluster.local", A, None),
    );
    // TCP to port 53.
    let mut tcp = base.clone();
    tcp[14 + 9] = 6;
    f.run(&tcp, XDP_PASS, "pass_not_dns");
    // More fragments.
    let mut frag = base.clone();
    frag[14 + 6] = 0x20;
    f.run(&frag, XDP_PASS, "pass_unsupported");
    // IP options: IHL 6.
    let mut opts = base.clone();
    opts[14] = 0x46;
    f.run(&opts, XDP_PASS, "pass_unsupported");
    // A wrong IPv4 header checksum: the stack would drop it, so the agent never answers it
    // (found by the differential fuzzer, tests/xdp_fuzz.rs).
    let mut bad_csum = base.clone();
    bad_csum[14 + 10] ^= 0x01;
    f.run(&bad_csum, XDP_PASS, "pass_malformed");
    // A VLAN tag.
    let mut vlan = base[..12].to_vec();
    vlan.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
    vlan.extend_from_slice(&base[12..]);
    f.run(&vlan, XDP_PASS, "pass_not_dns");
    // IPv6 with a hop-by-hop header in front of UDP.
    let mut hbh = query_frame(
        CLIENT_V6,
        SERVER_V6,
        &dns_query(1, "web.shop.svc.cluster.local", A, None),
    );
    hbh[14 + 6] = 0;
    f.run(&hbh, XDP_PASS, "pass_unsupported");
    // ARP.
    let mut arp = base[..12].to_vec();
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    f.run(&arp, XDP_PASS, "pass_not_dns");
}

#[test]
fn truncated_frames_are_passed_untouched() {
    let f = fixture();
    for edns in [None, Some((1232, 0, false))] {
        for (client, server) in [(CLIENT_V4, SERVER_V4), (CLIENT_V6, SERVER_V6)] {
            let full = query_frame(
                client,
                server,
                &dns_query(1, "web.shop.svc.cluster.local", A, edns),
            );
            for len in 0..full.len() {
                let out = f.kernel.test_run(&full[..len], 1);
                // The kernel refuses frames shorter than an Ethernet header itself.
                let Ok(out) = out else {
                    assert!(len < 14, "test run failed at {len}");
                    continue;
                };
                assert_eq!(out.action, XDP_PASS, "prefix of {len} bytes");
                assert_eq!(out.frame, &full[..len]);
            }
        }
    }
}

#[test]
fn garbage_never_gets_an_answer_it_should_not() {
    let f = fixture();
    let mut rng_state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    let base = dns_query(1, "web.shop.svc.cluster.local", A, Some((1232, 0, false)));
    let mut answered = 0;
    for i in 0..3000 {
        // Mutate a valid query: flip bytes, or random lengths of random bytes.
        let mut dns = base.clone();
        if i % 3 == 0 {
            let len = (next() % 80) as usize;
            dns = (0..len).map(|_| next() as u8).collect();
        } else {
            for _ in 0..(1 + next() % 4) {
                let at = (next() as usize) % dns.len();
                dns[at] = next() as u8;
            }
        }
        let frame = query_frame(CLIENT_V4, SERVER_V4, &dns);
        let out = f.kernel.test_run(&frame, 1).expect("test run");
        assert_ne!(out.action, XDP_DROP, "never drops: {dns:02x?}");
        if out.action == XDP_TX {
            // Only what userspace would answer the same way.
            let reply = check_reply(&frame, &out.frame);
            assert_eq!(reply.dns, f.userspace(&dns), "mutated query {dns:02x?}");
            answered += 1;
        } else {
            assert_eq!(out.action, XDP_PASS);
            assert_eq!(out.frame, frame);
        }
    }
    eprintln!("{answered} of 3000 mutated queries were still valid and answered");
}

#[test]
fn answers_change_with_the_zone() {
    let mut f = fixture();
    let q = dns_query(1, "web.shop.svc.cluster.local", A, None);
    let r = f.answered(CLIENT_V4, SERVER_V4, &q, "answered");
    assert_eq!(&r[r.len() - 4..], &[10, 96, 10, 20]);
    // Delete the Service: its names go, the kernel answers NXDOMAIN.
    use dns_agent::zone::{
        Change,
        objects::{Kind, ObjectKey},
    };
    let changes = vec![Change::Delete(Kind::Service, ObjectKey::new("shop", "web"))];
    let names = f.zone.touched(&changes);
    let before = entries_of(&f.zone, &names);
    f.zone.apply(changes);
    let after = entries_of(&f.zone, &names);
    let stats = f.sync.apply(before, after);
    assert!(stats.removed > 0 && stats.failed == 0, "{stats:?}");
    let r = f.answered(CLIENT_V4, SERVER_V4, &q, "answered_nxdomain");
    assert_eq!(rcode(&r), 3);
}

#[test]
fn an_update_of_one_service_rewrites_only_its_own_entries() {
    use dns_agent::zone::{
        Change,
        name::{reverse_name, to_text},
        objects::{ClusterObject, ObjectKey, ServiceInfo, ServiceKind},
    };
    let mut f = fixture();
    let before = f.sync.maps().snapshot();
    // web gets a new IPv4 cluster IP.
    let key = ObjectKey::new("shop", "web");
    let old: IpAddr = "10.96.10.20".parse().unwrap();
    let new: IpAddr = "10.96.10.99".parse().unwrap();
    let mut info = ServiceInfo {
        kind: ServiceKind::ClusterIp(vec![new, "fd00:96::a14".parse().unwrap()]),
        ports: Vec::new(),
    };
    let dns_agent::zone::objects::ClusterObject::Service(_, current) = support::example_objects()
        .into_iter()
        .find(|o| matches!(o, ClusterObject::Service(k, _) if *k == key))
        .unwrap()
    else {
        unreachable!()
    };
    info.ports = current.ports;
    let changes = vec![Change::Upsert(ClusterObject::Service(key, info))];
    let names = f.zone.touched(&changes);
    let entries_before = entries_of(&f.zone, &names);
    f.zone.apply(changes);
    let stats = f.sync.apply(entries_before, entries_of(&f.zone, &names));
    let after = f.sync.maps().snapshot();

    let changed: Vec<String> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .map(|(name, qtype)| format!("{} {qtype}", to_text(name)))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let own = |entry: &String| {
        entry.contains("web.shop.svc.cluster.local.")
            || entry.starts_with(&to_text(&reverse_name(old)))
            || entry.starts_with(&to_text(&reverse_name(new)))
    };
    assert!(
        changed.iter().all(own),
        "entries of other names changed: {changed:?}"
    );
    assert_eq!(
        changed.len(),
        stats.written + stats.removed,
        "{stats:?} {changed:?}"
    );
    // A, SRV at the name and at both named ports (their additional A), the A records at the
    // port names, the old PTR removed and the new one added.
    assert!(
        changed.contains(&"web.shop.svc.cluster.local. 1".to_string()),
        "{changed:?}"
    );
    assert!(
        changed.contains(&format!("{} 12", to_text(&reverse_name(new)))),
        "{changed:?}"
    );
    assert!(
        !changed.contains(&"web.shop.svc.cluster.local. 28".to_string()),
        "AAAA did not change"
    );
    let r = f.answered(
        CLIENT_V4,
        SERVER_V4,
        &dns_query(1, "web.shop.svc.cluster.local", A, None),
        "answered",
    );
    assert_eq!(&r[r.len() - 4..], &[10, 96, 10, 99]);
}

#[test]
fn intercepted_addresses_are_answered_from_the_maps_too() {
    let f = fixture();
    // check_reply holds the reply to the query's addresses swapped: it comes from the
    // intercepted address the pod asked.
    let r = f.answered(
        CLIENT_V4,
        IpAddr::V4(KUBE_DNS_V4),
        &dns_query(1, "web.shop.svc.cluster.local", A, None),
        "answered",
    );
    assert_eq!(&r[r.len() - 4..], &[10, 96, 10, 20]);
    f.answered(
        CLIENT_V6,
        IpAddr::V6(KUBE_DNS_V6),
        &dns_query(2, "example.org.shop.svc.cluster.local", A, None),
        "answered_nxdomain",
    );
    // No agent socket in this namespace: what the kernel cannot answer is left untouched, for
    // the Service proxy to carry to kube-dns.
    for (client, server) in [
        (CLIENT_V4, IpAddr::V4(KUBE_DNS_V4)),
        (CLIENT_V6, IpAddr::V6(KUBE_DNS_V6)),
    ] {
        let frame = query_frame(client, server, &dns_query(3, "www.example.org", A, None));
        let out = f.run_counting(&frame, XDP_PASS, &["pass_miss", "left_to_service"]);
        assert_eq!(out, frame, "left untouched");
    }
}

#[test]
fn the_verifier_accepts_the_program_with_room_to_spare() {
    let f = fixture();
    let insns = f
        .kernel
        .verified_instructions()
        .expect("the kernel reports verified instructions");
    eprintln!("verifier: {insns} instructions processed (limit 1000000)");
    // Headroom: a change that brings the program near the kernel's limit fails here first,
    // with the count, rather than as a load failure on some other kernel's verifier.
    assert!(
        insns < 800_000,
        "{insns} instructions: within 20% of the verifier's limit"
    );
}

// ---------------------------------------------------------------------------------------------
// The cache of upstream answers in the kernel.

impl Fixture {
    /// Puts `answer` in the kernel for `q`, valid for `ttl` from now; returns when it expires.
    fn cache_put(&mut self, q: &Question, answer: &Arc<Answer>, ttl: Duration) -> Instant {
        let expires = Instant::now() + ttl;
        self.cache
            .set(q, Some((answer.clone(), expires)))
            .expect("writing a cached answer");
        expires
    }

    /// From `when` on, `dns_bytes` is passed up as expired.
    fn passed_up_from(&self, when: Instant, dns_bytes: &[u8]) {
        while Instant::now() < when {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.run(
            &query_frame(CLIENT_V4, SERVER_V4, dns_bytes),
            XDP_PASS,
            "pass_expired",
        );
    }

    /// A query the kernel answers from the cache: checks the frame, and that its DNS payload is
    /// the agent's cache's reply at that moment (the seconds left, counted down), byte for byte.
    /// Returns the reply and the TTL it carried.
    fn cached(
        &self,
        client: IpAddr,
        server: IpAddr,
        dns_bytes: &[u8],
        answer: &Answer,
        expires: Instant,
    ) -> (Vec<u8>, u32) {
        let frame = query_frame(client, server, dns_bytes);
        let ttl_now = || expires.saturating_duration_since(Instant::now()).as_secs() as u32;
        let before = ttl_now();
        let out = self.run(&frame, XDP_TX, "answered_cached");
        let after = ttl_now();
        let reply = check_reply(&frame, &out).dns;
        let q = dns::parse_query(dns_bytes).unwrap();
        // The second may turn between the two readings: the kernel's reply is one of the two.
        let agent: Vec<_> = [before, after]
            .iter()
            .map(|t| {
                (
                    reply_from_answer(&q, answer, Some(*t), Some(q.udp_limit())),
                    *t,
                )
            })
            .collect();
        let Some((_, ttl)) = agent.iter().find(|(r, _)| *r == reply) else {
            panic!(
                "the kernel's reply is not the agent's:\n kernel {reply:02x?}\n agent  {:02x?}",
                agent[0].0
            );
        };
        (reply, *ttl)
    }
}

#[test]
fn cached_answers_are_the_agents_bytes_positive_nodata_and_nxdomain() {
    let mut f = fixture();
    let positive = upstream(
        "www.example.org.",
        A,
        ResponseCode::NoError,
        vec![
            a("www.example.org.", 300, "192.0.2.80"),
            a("www.example.org.", 300, "192.0.2.81"),
        ],
        vec![],
    );
    // A CNAME chain: longer than an entry holds, so its bytes go to a blob.
    let chain = upstream(
        "api.example.net.",
        A,
        ResponseCode::NoError,
        vec![
            record(
                "api.example.net.",
                60,
                RData::CNAME(hickory_proto::rr::rdata::CNAME(
                    Name::from_str("api.eu-west-1.edge.example.net.").unwrap(),
                )),
            ),
            record(
                "api.eu-west-1.edge.example.net.",
                60,
                RData::CNAME(hickory_proto::rr::rdata::CNAME(
                    Name::from_str("lb-7.eu-west-1.edge.example.net.").unwrap(),
                )),
            ),
            a("lb-7.eu-west-1.edge.example.net.", 60, "198.51.100.7"),
            a("lb-7.eu-west-1.edge.example.net.", 60, "198.51.100.8"),
            a("lb-7.eu-west-1.edge.example.net.", 60, "198.51.100.9"),
        ],
        vec![],
    );
    let nodata = upstream(
        "mail.example.org.",
        AAAA,
        ResponseCode::NoError,
        vec![],
        vec![upstream_soa("example.org.")],
    );
    let nxdomain = upstream(
        "nothing.example.org.",
        A,
        ResponseCode::NXDomain,
        vec![],
        vec![upstream_soa("example.org.")],
    );
    // Longer than 62 bytes: the long-key map.
    let long_name = "a-rather-long-label-for-a-host.in-a-deep.subdomain.example.org.";
    let long = upstream(
        long_name,
        A,
        ResponseCode::NoError,
        vec![a(long_name, 120, "203.0.113.5")],
        vec![],
    );
    let entries = [
        ("www.example.org.", A, &positive, "inline"),
        ("api.example.net.", A, &chain, "blob"),
        ("mail.example.org.", AAAA, &nodata, "NODATA"),
        ("nothing.example.org.", A, &nxdomain, "NXDOMAIN"),
        (long_name, A, &long, "long name"),
    ];
    for (name, qtype, answer, what) in entries {
        for edns in [None, Some((1232, 0, false))] {
            let q = question(name, qtype, false, false);
            let expires = f.cache_put(&q, answer, Duration::from_secs(100));
            for (client, server) in [(CLIENT_V4, SERVER_V4), (CLIENT_V6, SERVER_V6)] {
                // Any spelling: the key is lowercased, the question echoed as asked.
                let spelled = name.to_ascii_uppercase();
                let (r, ttl) = f.cached(
                    client,
                    server,
                    &dns_query(7, &spelled, qtype, edns),
                    answer,
                    expires,
                );
                assert!((98..=100).contains(&ttl), "{what}: TTL {ttl}");
                assert!(
                    ttls(&r).iter().all(|t| *t == ttl),
                    "{what}: every TTL counted down: {:?}",
                    ttls(&r)
                );
                let (expected_rcode, records) = match what {
                    "NXDOMAIN" => (3, [1, 0, 1]),
                    "NODATA" => (0, [1, 0, 1]),
                    "blob" => (0, [1, 5, 0]),
                    "inline" => (0, [1, 2, 0]),
                    _ => (0, [1, 1, 0]),
                };
                assert_eq!(rcode(&r), expected_rcode, "{what}");
                assert_eq!(counts(&r)[..3], records, "{what}");
            }
        }
    }
}

#[test]
fn nothing_is_answered_from_the_maps_after_the_grace_period() {
    let mut f = fixture();
    let query = query_frame(
        CLIENT_V4,
        SERVER_V4,
        &dns_query(1, "web.shop.svc.cluster.local", A, None),
    );
    f.run(&query, XDP_TX, "answered");
    f.sync
        .maps_mut()
        .set_grace(std::time::Duration::from_millis(50));
    f.sync.write_config(&f.zone).unwrap();
    f.sync.maps().heartbeat().beat();
    f.run(&query, XDP_TX, "answered");
    std::thread::sleep(std::time::Duration::from_millis(100));
    f.run(&query, XDP_PASS, "pass_agent_down");
    let to_kube_dns = query_frame(
        CLIENT_V4,
        IpAddr::V4(KUBE_DNS_V4),
        &dns_query(2, "www.example.org", A, None),
    );
    // Not steered either: the agent is gone.
    f.run(&to_kube_dns, XDP_PASS, "pass_agent_down");
    f.sync.maps().heartbeat().beat();
    f.run(&query, XDP_TX, "answered");
}

#[test]
fn steered_queries_reach_the_agent_socket_and_their_replies_the_intercepted_address() {
    // In a namespace of its own with the listen addresses and sockets bound on them, as the
    // agent's: BPF_PROG_TEST_RUN runs in the caller's namespace, and so does the program's
    // socket lookup.
    let ns = support::Netns::new("xs");
    ns.ip(&["addr", "add", &format!("{LISTEN_V4}/32"), "dev", "lo"]);
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{LISTEN_V6}/128"),
        "dev",
        "lo",
        "nodad",
    ]);
    let cases = [
        (CLIENT_V4, IpAddr::V4(KUBE_DNS_V4), SERVER_V4),
        (CLIENT_V6, IpAddr::V6(KUBE_DNS_V6), SERVER_V6),
    ];
    let dns_bytes = dns_query(7, "www.example.org", A, None);
    let mut reply_dns = dns_bytes.clone();
    reply_dns[2] |= 0x80;
    let (d, r) = (dns_bytes.clone(), reply_dns.clone());
    let (frames, counters) = ns.enter(move || {
        let _agent = [
            std::net::UdpSocket::bind((LISTEN_V4, 53)).expect("bind the IPv4 listen address"),
            std::net::UdpSocket::bind((LISTEN_V6, 53)).expect("bind the IPv6 listen address"),
        ];
        let f = fixture();
        let mut frames = Vec::new();
        for (client, intercepted, listen) in cases {
            let query = query_frame(client, intercepted, &d);
            let out = f.kernel.test_run(&query, 1).expect("test run");
            assert_eq!(out.action, XDP_PASS);
            // The agent's reply to the steered query, as it leaves towards the pod.
            let reply = udp_frame(listen, client, 53, support::frames::CLIENT_PORT, &r);
            let restored = f.kernel.test_run_egress(&reply).expect("egress test run");
            frames.push((out.frame, restored.frame));
        }
        (frames, f.counters())
    });
    assert_eq!(counters["pass_miss"], 2);
    assert_eq!(counters["steered"], 2);
    assert_eq!(counters["left_to_service"], 0);
    assert_eq!(counters["egress_restored"], 2);
    for ((client, intercepted, listen), (steered, restored)) in cases.into_iter().zip(frames) {
        // The steered query: destination rewritten to the listen address, checksums valid.
        assert_eq!(
            steered,
            query_frame(client, listen, &dns_bytes),
            "the query as if sent to the listen address"
        );
        // The reply: source given the intercepted address back, checksums valid.
        assert_eq!(
            restored,
            udp_frame(
                intercepted,
                client,
                53,
                support::frames::CLIENT_PORT,
                &reply_dns
            ),
            "the reply as if sent from the intercepted address"
        );
    }
}

#[test]
fn the_kernel_holds_the_answer_of_the_upstreams_a_name_routes_to_now() {
    use dns_agent::server::forward::UpstreamSetId;
    let mut f = fixture();
    let (first, second) = (UpstreamSetId(1), UpstreamSetId(2));
    let from = |set| {
        let mut q = question("www.example.org", A, false, false);
        q.upstream_set = set;
        q
    };
    let old_answer = upstream(
        "www.example.org.",
        A,
        ResponseCode::NoError,
        vec![a("www.example.org.", 300, "192.0.2.80")],
        vec![],
    );
    let new_answer = upstream(
        "www.example.org.",
        A,
        ResponseCode::NoError,
        vec![a("www.example.org.", 300, "198.51.100.80")],
        vec![],
    );
    let query = dns_query(1, "www.example.org", A, None);
    let old_expires = f.cache_put(&from(first), &old_answer, Duration::from_secs(60));
    f.cached(CLIENT_V4, SERVER_V4, &query, &old_answer, old_expires);
    // The routes still send the name to the first set: nothing leaves.
    assert_eq!(f.cache.drop_rerouted(&|_| first), 0);
    f.cached(CLIENT_V4, SERVER_V4, &query, &old_answer, old_expires);
    // A stub domain now sends it to the second set: the first set's answer leaves the kernel.
    assert_eq!(f.cache.drop_rerouted(&|_| second), 1);
    let frame = query_frame(CLIENT_V4, SERVER_V4, &query);
    f.run(&frame, XDP_PASS, "pass_miss");
    // The second set's answer takes the key; the first's end (it expires in the agent's cache)
    // leaves it alone.
    let new_expires = f.cache_put(&from(second), &new_answer, Duration::from_secs(60));
    f.cache.set(&from(first), None).unwrap();
    f.cached(CLIENT_V4, SERVER_V4, &query, &new_answer, new_expires);
    f.cache.set(&from(second), None).unwrap();
    f.run(&frame, XDP_PASS, "pass_miss");
}

#[test]
fn the_cache_key_is_the_agents_name_type_do_and_cd() {
    let mut f = fixture();
    let answer = upstream(
        "www.example.org.",
        A,
        ResponseCode::NoError,
        vec![a("www.example.org.", 300, "192.0.2.80")],
        vec![],
    );
    let plain = question("www.example.org", A, false, false);
    let expires = f.cache_put(&plain, &answer, Duration::from_secs(60));
    let miss = |f: &Fixture, dns_bytes: Vec<u8>| {
        f.run(
            &query_frame(CLIENT_V4, SERVER_V4, &dns_bytes),
            XDP_PASS,
            "pass_miss",
        );
    };
    // DO=1 and CD=1 are other keys; so is another type.
    miss(
        &f,
        dns_query(1, "www.example.org", A, Some((1232, 0, true))),
    );
    let mut cd = dns_query(1, "www.example.org", A, None);
    cd[3] |= 0x10;
    miss(&f, cd.clone());
    miss(&f, dns_query(1, "www.example.org", AAAA, None));
    f.cached(
        CLIENT_V4,
        SERVER_V4,
        &dns_query(1, "www.example.org", A, Some((1232, 0, false))),
        &answer,
        expires,
    );
    // With DO and CD set, the entry written for them.
    let both = question("www.example.org", A, true, true);
    let expires = f.cache_put(&both, &answer, Duration::from_secs(60));
    let mut q = dns_query(1, "www.example.org", A, Some((1232, 0, true)));
    q[3] |= 0x10;
    f.cached(CLIENT_V4, SERVER_V4, &q, &answer, expires);
    // Gone from the cache, gone from the kernel.
    f.cache.set(&plain, None).unwrap();
    miss(&f, dns_query(1, "www.example.org", A, None));
    // A zone name is the zone's, whatever a cache entry says.
    let zone_name = question("web.shop.svc.cluster.local", A, false, false);
    f.cache_put(&zone_name, &answer, Duration::from_secs(60));
    f.answered(
        CLIENT_V4,
        SERVER_V4,
        &dns_query(1, "web.shop.svc.cluster.local", A, None),
        "answered",
    );
}

#[test]
fn cached_ttls_count_down_and_an_expired_entry_goes_up() {
    let mut f = fixture();
    let answer = upstream(
        "countdown.example.org.",
        A,
        ResponseCode::NoError,
        vec![a("countdown.example.org.", 300, "192.0.2.9")],
        vec![upstream_soa("example.org.")],
    );
    let q = question("countdown.example.org", A, false, false);
    let expires = f.cache_put(&q, &answer, Duration::from_millis(3500));
    let query = dns_query(3, "countdown.example.org", A, None);
    let mut seen = Vec::new();
    while Instant::now() + Duration::from_millis(150) < expires {
        let (r, ttl) = f.cached(CLIENT_V4, SERVER_V4, &query, &answer, expires);
        assert_eq!(ttls(&r), vec![ttl, ttl], "answer and authority");
        seen.push(ttl);
        std::thread::sleep(Duration::from_millis(400));
    }
    seen.dedup();
    assert_eq!(seen, vec![3, 2, 1, 0], "counted down second by second");
    f.passed_up_from(expires, &query);
}

#[test]
fn the_prefetch_window_is_passed_up_before_expiry() {
    let mut f = fixture();
    let answer = upstream(
        "window.example.org.",
        A,
        ResponseCode::NoError,
        vec![a("window.example.org.", 300, "192.0.2.10")],
        vec![],
    );
    let q = question("window.example.org", A, false, false);
    let expires = Instant::now() + Duration::from_secs(60);
    let kernel_until = Instant::now() + Duration::from_millis(600);
    f.cache
        .set_held(
            &q,
            Some(dns_agent::server::cache::Held {
                answer: answer.clone(),
                expires,
                kernel_until,
            }),
        )
        .unwrap();
    let query = dns_query(4, "window.example.org", A, None);
    // Until the window: the TTL is the seconds left before expiry, not before the window.
    let (_, ttl) = f.cached(CLIENT_V4, SERVER_V4, &query, &answer, expires);
    assert!(ttl >= 58, "TTL {ttl}");
    // In the window the agent answers (its entry is fresh for almost a minute yet).
    f.passed_up_from(kernel_until, &query);
}

#[test]
fn an_answer_with_more_ttls_than_the_kernel_counts_stays_with_the_agent() {
    let mut f = fixture();
    let many: Vec<Record> = (0..33)
        .map(|i| a("many.example.org.", 60, &format!("192.0.2.{i}")))
        .collect();
    let answer = upstream("many.example.org.", A, ResponseCode::NoError, many, vec![]);
    let q = question("many.example.org", A, false, false);
    f.cache_put(&q, &answer, Duration::from_secs(60));
    assert!(f.cache.is_empty(), "not written");
    f.run(
        &query_frame(
            CLIENT_V4,
            SERVER_V4,
            &dns_query(1, "many.example.org", A, Some((1232, 0, false))),
        ),
        XDP_PASS,
        "pass_miss",
    );
    // 32 fit.
    let fits: Vec<Record> = (0..32)
        .map(|i| a("fits.example.org.", 60, &format!("192.0.2.{i}")))
        .collect();
    let answer = upstream("fits.example.org.", A, ResponseCode::NoError, fits, vec![]);
    let q = question("fits.example.org", A, false, false);
    let expires = f.cache_put(&q, &answer, Duration::from_secs(60));
    let (r, _) = f.cached(
        CLIENT_V4,
        SERVER_V4,
        &dns_query(1, "fits.example.org", A, Some((1232, 0, false))),
        &answer,
        expires,
    );
    assert_eq!(counts(&r)[1], 32);
}

// ---------------------------------------------------------------------------------------------
// Readers against writers: the program on one CPU, the agent's writes on another.

/// How long each churn test runs its reader and writer side by side.
const CHURN: Duration = Duration::from_secs(3);

/// A zone-style answer of one A record for `name`.
fn a_answer(name: &str, ip: [u8; 4]) -> dns_agent::zone::KernelAnswer {
    let wire = wire_from_dotted(name);
    let sections = dns_agent::zone::encode::encode_sections(
        &wire,
        A,
        vec![a(&format!("{name}."), 30, &Ipv4Addr::from(ip).to_string())],
        vec![],
        vec![],
    );
    dns_agent::zone::KernelAnswer::Answer {
        flags: dns_agent::zone::ZONE_FLAGS,
        sections,
    }
}

/// The short-name answer map, through its pin: the test writes it as the agent does, but in
/// batches (`BPF_MAP_UPDATE_BATCH`: one syscall, elements in order), so that the element a
/// replacement frees is handed to the next insert within a microsecond.
struct AnswerMap {
    map: aya::maps::HashMap<aya::maps::MapData, dns_common::ShortKey, dns_common::AnswerValue>,
}

impl AnswerMap {
    fn open(f: &Fixture) -> Self {
        let path = dns_agent::kernel::pin_dir(&f.pin).join(dns_common::MAP_ANSWERS_SHORT);
        let data = aya::maps::MapData::from_pin(&path).expect("the pinned answer map");
        Self {
            map: aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).unwrap(),
        }
    }

    fn key(name: &str, qtype: u16) -> dns_common::ShortKey {
        let wire = wire_from_dotted(name);
        let mut k = dns_common::ShortKey::zeroed();
        k.qtype = qtype;
        k.name[..wire.len()].copy_from_slice(&wire);
        k
    }

    /// The entry the agent would write (a fresh generation each time).
    fn value(answer: &dns_agent::zone::KernelAnswer) -> dns_common::AnswerValue {
        let (mut v, blob) = dns_agent::kernel::maps::answer_value(answer);
        assert!(blob.is_none(), "inline answers only");
        v.generation = dns_agent::kernel::maps::next_generation();
        v
    }

    fn update_batch(&self, keys: &[dns_common::ShortKey], values: &[dns_common::AnswerValue]) {
        use aya::maps::IterableMap as _;
        use std::os::fd::{AsFd as _, AsRawFd as _};
        // The BPF_MAP_*_BATCH member of union bpf_attr.
        #[repr(C)]
        struct BatchAttr {
            in_batch: u64,
            out_batch: u64,
            keys: u64,
            values: u64,
            count: u32,
            map_fd: u32,
            elem_flags: u64,
            flags: u64,
        }
        const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
        let mut attr = BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: keys.len() as u32,
            map_fd: self.map.map().fd().as_fd().as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: the attribute points at `count` keys and values that outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        assert_eq!(
            rc,
            0,
            "BPF_MAP_UPDATE_BATCH: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[test]
fn readers_never_mix_answers_while_entries_churn() {
    let f = fixture();
    let x = "x.churn.example";
    let answers = [a_answer(x, [10, 9, 9, 1]), a_answer(x, [10, 9, 9, 2])];
    let query = dns_query(9, x, A, None);
    let q = dns::parse_query(&query).unwrap();
    let valid: Vec<Vec<u8>> = answers
        .iter()
        .map(|answer| {
            let dns_agent::zone::KernelAnswer::Answer { flags, sections } = answer else {
                unreachable!()
            };
            dns::build_reply(
                &q,
                dns::Body::sections(*flags, 1, 0, 0, &sections.data),
                Some(q.udp_limit()),
            )
        })
        .collect();
    let mut map = AnswerMap::open(&f);
    let x_key = AnswerMap::key(x, A);
    map.map
        .insert(x_key, AnswerMap::value(&answers[0]), 0)
        .unwrap();
    let frame = query_frame(CLIENT_V4, SERVER_V4, &query);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let kernel = &f.kernel;
    let (reads, races, batches) = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let (mut reads, mut races) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = kernel.test_run(&frame, 1).expect("test run");
                match out.action {
                    XDP_TX => {
                        let reply = check_reply(&frame, &out.frame).dns;
                        assert!(
                            valid.contains(&reply),
                            "a reply for {x} that is not one of its answers: {reply:02x?}"
                        );
                        reads += 1;
                    }
                    XDP_PASS => {
                        assert_eq!(out.frame, frame, "passed untouched");
                        races += 1;
                    }
                    other => panic!("verdict {other}"),
                }
            }
            (reads, races)
        });
        // Each batch replaces x (freeing its element) and inserts a name the map did not
        // have (taking the freed element); older names leave, so the map stays small.
        let mut n = 0u32;
        let until = Instant::now() + CHURN;
        while Instant::now() < until {
            let y = format!("y{}.churn.example", n % 4096);
            let y_answer = a_answer(&y, [10, 8, (n >> 8) as u8, n as u8]);
            map.update_batch(
                &[x_key, AnswerMap::key(&y, A)],
                &[
                    AnswerMap::value(&answers[(n % 2) as usize]),
                    AnswerMap::value(&y_answer),
                ],
            );
            let old = format!("y{}.churn.example", n.wrapping_sub(64) % 4096);
            let _ = map.map.remove(&AnswerMap::key(&old, A));
            n += 1;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (reads, races) = reader.join().unwrap();
        (reads, races, n)
    });
    eprintln!(
        "{batches} replacements of {x} each followed by another name's insert; {reads} answers \
         read, all {x}'s own; {races} passed up (pass_race)"
    );
    assert!(
        reads > 1000 && batches > 1000,
        "{reads} reads, {batches} batches"
    );
}

#[test]
fn a_name_coming_and_going_is_never_nodata_for_its_type() {
    let mut f = fixture();
    let z = "churn.shop.svc.cluster.local";
    let wire = wire_from_dotted(z);
    let present = vec![(
        wire.clone(),
        vec![
            (A, a_answer(z, [10, 7, 7, 7])),
            (
                dns_common::QTYPE_OTHER,
                dns_agent::zone::KernelAnswer::Nodata,
            ),
        ],
    )];
    let absent = vec![(wire.clone(), Vec::new())];
    let frame = query_frame(CLIENT_V4, SERVER_V4, &dns_query(4, z, A, None));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let kernel = &f.kernel;
    let sync = &mut f.sync;
    let (seen, flips) = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut seen = [0u64; 3];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = kernel.test_run(&frame, 1).expect("test run");
                if out.action != XDP_TX {
                    continue;
                }
                let reply = check_reply(&frame, &out.frame).dns;
                match (rcode(&reply), counts(&reply)[1]) {
                    (0, 1) => seen[0] += 1,
                    (3, 0) => seen[1] += 1,
                    _ => seen[2] += 1,
                }
            }
            seen
        });
        let mut flips = 0;
        let until = Instant::now() + CHURN;
        while Instant::now() < until {
            let stats = sync.apply(absent.clone(), present.clone());
            assert_eq!(stats.failed, 0);
            let stats = sync.apply(present.clone(), absent.clone());
            assert_eq!(stats.removed, 2);
            flips += 1;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (reader.join().unwrap(), flips)
    });
    eprintln!(
        "{flips} times added and removed: {} answers, {} NXDOMAIN, {} other",
        seen[0], seen[1], seen[2]
    );
    assert_eq!(
        seen[2], 0,
        "a query for a type the name has got NODATA while the name came or went"
    );
    assert!(seen[0] > 100 && seen[1] > 100, "{seen:?}");
}

// ---------------------------------------------------------------------------------------------
// Writes that fail, blobs that are gone.

/// `count` A records for `name` (more than 6 need a blob).
fn a_records(name: &str, count: u8) -> dns_agent::zone::KernelAnswer {
    let wire = wire_from_dotted(name);
    let records = (1..=count)
        .map(|i| a(&format!("{name}."), 30, &format!("10.6.6.{i}")))
        .collect();
    let sections = dns_agent::zone::encode::encode_sections(&wire, A, records, vec![], vec![]);
    dns_agent::zone::KernelAnswer::Answer {
        flags: dns_agent::zone::ZONE_FLAGS,
        sections,
    }
}

/// A name of the zone with `count` A records and the catch-all of a name that exists.
fn name_entries(name: &str, count: u8) -> dns_agent::kernel::sync::NameEntries {
    vec![(
        wire_from_dotted(name),
        vec![
            (A, a_records(name, count)),
            (
                dns_common::QTYPE_OTHER,
                dns_agent::zone::KernelAnswer::Nodata,
            ),
        ],
    )]
}

impl Fixture {
    /// Entries in the answer maps, counted by walking them.
    fn map_entries(&self) -> usize {
        let (short, long, _) = self.sync.maps().entry_counts();
        short + long
    }
}

#[test]
fn a_typed_entry_that_does_not_fit_goes_up_until_it_does_and_entries_stay_counted() {
    // Room for 2048 small blobs (filled in a second) and far more entries.
    let capacity = Capacity {
        blobs_s: 2048,
        ..Capacity::scaled(1 << 16)
    };
    let mut f = fixture_sized(true, capacity.with_cache(0));
    assert_eq!(f.sync.entries(), f.map_entries());
    // Fill the small-blob map: 7 A records need a small blob each.
    let mut full = None;
    for i in 0..300_000 {
        let name = format!("fill-{i}.shop.svc.cluster.local");
        let stats = f.sync.apply(Vec::new(), name_entries(&name, 7));
        if stats.failed > 0 {
            full = Some(name);
            break;
        }
    }
    let full = full.expect("the blob map filled up");
    f.sync.maps().heartbeat().beat();
    assert!(!f.sync.is_complete());
    assert_eq!(
        f.sync.entries(),
        f.map_entries(),
        "counted as the maps hold them"
    );
    // The name exists; its A answer is not in the kernel: userspace answers it, never the
    // catch-all's NODATA. Other types are NODATA, as they should be.
    let a_query = query_frame(CLIENT_V4, SERVER_V4, &dns_query(1, &full, A, None));
    f.run(&a_query, XDP_PASS, "pass_userspace");
    // (The test's names are the maps' alone, not the model's: the replies are checked here.)
    let aaaa = query_frame(CLIENT_V4, SERVER_V4, &dns_query(1, &full, AAAA, None));
    let r = check_reply(&aaaa, &f.run(&aaaa, XDP_TX, "answered_nodata")).dns;
    assert_eq!((rcode(&r), counts(&r)), (0, [1, 0, 1, 0]));
    // With an entry pending, the kernel answers no NXDOMAIN (a name could be missing).
    f.run(
        &query_frame(
            CLIENT_V4,
            SERVER_V4,
            &dns_query(1, "nothing.shop.svc.cluster.local", A, None),
        ),
        XDP_PASS,
        "pass_miss",
    );

    // A name the maps hold grows an answer that does not fit, then goes: counted once.
    let grows = "grows.shop.svc.cluster.local";
    f.sync.apply(Vec::new(), name_entries(grows, 1));
    let stats = f.sync.apply(name_entries(grows, 1), name_entries(grows, 7));
    assert_eq!(stats.failed, 1, "{stats:?}");
    f.run(
        &query_frame(CLIENT_V4, SERVER_V4, &dns_query(1, grows, A, None)),
        XDP_PASS,
        "pass_userspace",
    );
    assert_eq!(f.sync.entries(), f.map_entries());
    f.sync.apply(
        name_entries(grows, 7),
        vec![(wire_from_dotted(grows), Vec::new())],
    );
    assert_eq!(f.sync.entries(), f.map_entries(), "removed once");

    // Room again (blobs are deleted a second after their entry): the retry writes it.
    for i in 0..8 {
        let name = format!("fill-{i}.shop.svc.cluster.local");
        f.sync.apply(
            name_entries(&name, 7),
            vec![(wire_from_dotted(&name), Vec::new())],
        );
    }
    std::thread::sleep(Duration::from_millis(1100));
    let stats = f.sync.retry();
    assert!(stats.written >= 1 && stats.failed == 0, "{stats:?}");
    assert!(f.sync.is_complete());
    assert_eq!(f.sync.entries(), f.map_entries());
    let a_query = query_frame(
        CLIENT_V4,
        SERVER_V4,
        &dns_query(1, &full, A, Some((1232, 0, false))),
    );
    let r = check_reply(&a_query, &f.run(&a_query, XDP_TX, "answered")).dns;
    assert_eq!((rcode(&r), counts(&r)), (0, [1, 7, 0, 1]));
    f.answered(
        CLIENT_V4,
        SERVER_V4,
        &dns_query(1, "nothing.shop.svc.cluster.local", A, None),
        "answered_nxdomain",
    );
}

#[test]
fn a_blob_gone_since_the_entry_was_read_passes_the_query_up_intact() {
    use aya::maps::IterableMap as _;
    let mut f = fixture();
    let path = dns_agent::kernel::pin_dir(&f.pin).join(dns_common::MAP_BLOBS_S);
    let mut blobs: aya::maps::HashMap<aya::maps::MapData, u32, dns_common::BlobS> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(
            aya::maps::MapData::from_pin(&path).unwrap(),
        ))
        .unwrap();
    let ids = |b: &aya::maps::HashMap<_, u32, dns_common::BlobS>| -> Vec<u32> {
        b.keys().map(|k| k.unwrap()).collect()
    };
    let before = ids(&blobs);
    let name = "big.shop.svc.cluster.local";
    f.sync.apply(Vec::new(), name_entries(name, 7));
    let new: Vec<u32> = ids(&blobs)
        .into_iter()
        .filter(|id| !before.contains(id))
        .collect();
    assert_eq!(new.len(), 1, "one blob for the answer");
    let frame = query_frame(CLIENT_V4, SERVER_V4, &dns_query(1, name, A, None));
    f.run(&frame, XDP_TX, "answered");
    // What a reader sees when the entry it copied was replaced and its blob deleted at once.
    blobs.remove(&new[0]).unwrap();
    f.run(&frame, XDP_PASS, "pass_race");
    let _ = blobs.map();
}
