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
};

use dns_agent::{
    dns,
    kernel::{
        Capacity, Kernel,
        sync::{KernelSync, entries_of},
    },
    server::{ZoneReply, answer_from_zone},
    zone::ZoneModel,
};
use support::{
    LISTEN_V4, LISTEN_V6,
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
    zone: ZoneModel,
    pin: std::path::PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin);
    }
}

fn fixture_with(synced: bool) -> Fixture {
    support::require_root();
    let mut objects = support::example_objects();
    objects.extend(support::headless_with(40));
    objects.extend(support::headless_with(100));
    let zone = support::zone_from(objects);
    let pin = std::path::PathBuf::from("/sys/fs/bpf").join(support::unique("xdns-p"));
    let (kernel, maps) =
        Kernel::load(Capacity::default(), &pin, true).expect("loading the XDP program");
    let mut sync = KernelSync::new(maps);
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
