//! Conformance: a generated cluster (hundreds of Services of every kind, dual-stack, several
//! namespaces), every name and type it implies plus junk names, search-path expansions and
//! case variants, asked through real packets from a pod's namespace. Each reply must match
//! what the schema says (an oracle written independently of the agent: support/cluster_gen.rs)
//! section by section, record by record: owner names, TTLs (the agent runs with a `--ttl` and
//! `--negative-ttl` of its own), duplicates and the SOA's every field included. The kernel
//! must answer exactly what it should, and the kernel's answer over UDP must equal
//! userspace's answer over TCP byte for byte.
//!
//! Needs root (`cargo xtask test` runs it).

mod support;

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    time::Duration,
};

use hickory_proto::{
    op::Message,
    rr::{RData, Record},
};
use support::{
    Agent, Client, LISTEN_V4, LISTEN_V6, Topology, UPSTREAM_V4,
    cluster_gen::{Cluster, Expected, Rec, Rng, Settings},
    frames::dns_query,
    upstream::{Upstream, example_zone},
};

const TYPES: [u16; 11] = [1, 28, 33, 12, 16, 5, 15, 65, 2, 6, 255];

fn rdata_text(r: &Record) -> String {
    match &r.data {
        RData::SOA(soa) => format!(
            "SOA {} {} {} {} {} {} {}",
            soa.mname, soa.rname, soa.serial, soa.refresh, soa.retry, soa.expire, soa.minimum
        ),
        RData::TXT(txt) => {
            let parts: Vec<String> = txt
                .txt_data
                .iter()
                .map(|d| String::from_utf8_lossy(d).into_owned())
                .collect();
            format!("TXT {}", parts.join(" "))
        }
        other => format!("{} {other}", r.record_type()),
    }
}

/// A section as (owner, TTL, data), names lowercased (names compressed against the question
/// come back in the client's case), sorted; the OPT record left out.
fn section(records: &[Record]) -> Vec<(String, u32, String)> {
    let mut v: Vec<(String, u32, String)> = records
        .iter()
        .filter(|r| r.record_type() != hickory_proto::rr::RecordType::OPT)
        .map(|r| {
            (
                r.name.to_ascii().to_ascii_lowercase(),
                r.ttl,
                rdata_text(r).to_ascii_lowercase(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Where the reply `m` differs from the oracle's: the header bits it decides, and every
/// section record by record (owner, TTL, data; duplicates count).
fn differences(expected: &Expected, m: &Message) -> Vec<String> {
    let mut out = Vec::new();
    let rcode = m.metadata.response_code.low() as u16;
    if rcode != expected.rcode {
        out.push(format!("rcode {rcode}, expected {}", expected.rcode));
    }
    if m.metadata.authoritative != expected.authoritative {
        out.push(format!(
            "AA {}, expected {}",
            m.metadata.authoritative, expected.authoritative
        ));
    }
    for (name, want, got) in [
        ("answer", &expected.answer, section(&m.answers)),
        ("authority", &expected.authority, section(&m.authorities)),
        ("additional", &expected.additional, section(&m.additionals)),
    ] {
        let mut want: Vec<Rec> = want
            .iter()
            .map(|r| Rec {
                owner: r.owner.to_ascii_lowercase(),
                data: r.data.to_ascii_lowercase(),
                ttl: r.ttl,
            })
            .collect();
        want.sort();
        let same = want.len() == got.len()
            && want.iter().zip(&got).all(|(w, (owner, ttl, data))| {
                w.owner == *owner && w.data == *data && w.ttl.admits(*ttl)
            });
        if !same {
            out.push(format!("{name}: expected {want:?}\n    got {got:?}"));
        }
    }
    out
}

/// The same message with every TTL zeroed (forwarded answers age between two queries).
fn without_ttls(m: &Message) -> Message {
    let mut m = m.clone();
    for r in m
        .answers
        .iter_mut()
        .chain(m.authorities.iter_mut())
        .chain(m.additionals.iter_mut())
    {
        r.ttl = 0;
    }
    m
}

/// Varies the case of a name: what clients that randomise case (0x20) send.
fn case_variant(name: &str, rng: &mut Rng) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphabetic() && rng.chance(50) {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

struct Tcp(TcpStream);

impl Tcp {
    fn connect(topo: &Topology, server: IpAddr) -> Self {
        let s = topo.pod.enter(move || {
            TcpStream::connect_timeout(&SocketAddr::new(server, 53), Duration::from_secs(3))
                .expect("TCP connect")
        });
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Self(s)
    }

    fn exchange(&mut self, q: &[u8]) -> Vec<u8> {
        let mut framed = (q.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(q);
        self.0.write_all(&framed).expect("TCP write");
        let mut len = [0u8; 2];
        self.0.read_exact(&mut len).expect("TCP reply length");
        let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
        self.0.read_exact(&mut buf).expect("TCP reply");
        buf
    }
}

#[test]
fn a_generated_cluster_answers_as_the_schema_says() {
    let topo = Topology::new();
    let _upstream = Upstream::start(&topo.node, (UPSTREAM_V4, 53).into(), example_zone());
    let cluster = Cluster::generate(
        0x5eed,
        240,
        vec![IpAddr::V4(LISTEN_V4), IpAddr::V6(LISTEN_V6)],
    );
    let dir = tempfile::tempdir().unwrap();
    let zone = dir.path().join("cluster.yaml");
    std::fs::write(&zone, cluster.to_yaml()).unwrap();
    // TTLs other than the defaults: the flags must reach every record, kernel and userspace.
    let (ttl, negative_ttl) = (41, 7);
    let unix_now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as u32
    };
    let started = unix_now();
    let agent = Agent::start(
        &topo,
        &zone,
        &[
            "--ttl",
            &ttl.to_string(),
            "--negative-ttl",
            &negative_ttl.to_string(),
        ],
    );

    let clients = [
        Client::new(&topo.pod, IpAddr::V4(LISTEN_V4)),
        Client::new(&topo.pod, IpAddr::V6(LISTEN_V6)),
    ];
    let mut tcp = Tcp::connect(&topo, IpAddr::V4(LISTEN_V4));
    // The serial is the agent's to choose (its start time, seconds since the epoch); every
    // SOA it gives must carry the same one.
    let apex = Message::from_vec(&tcp.exchange(&dns_query(1, "cluster.local.", 6, None)))
        .expect("SOA reply parses");
    let serial = match apex.answers.first().map(|r| &r.data) {
        Some(RData::SOA(soa)) => soa.serial,
        other => panic!("no SOA at the apex: {other:?}"),
    };
    assert!(
        (started.saturating_sub(5)..=unix_now() + 5).contains(&serial),
        "SOA serial {serial}: not the agent's start time ({started})"
    );
    let settings = Settings {
        ttl,
        negative_ttl,
        serial,
    };
    let mut rng = Rng::new(7);
    let names = cluster.query_names();
    let mut failures: Vec<String> = Vec::new();
    let (mut queries, mut by_kernel, mut truncated, mut no_room_count) = (0u64, 0u64, 0u64, 0u64);
    for (i, name) in names.iter().enumerate() {
        for qtype in TYPES {
            queries += 1;
            let spelled = if i % 3 == 0 {
                case_variant(name, &mut rng)
            } else {
                name.clone()
            };
            let edns = if i % 4 == 0 {
                None
            } else {
                Some((1232, 0, i % 5 == 0))
            };
            let q = dns_query(rng.next() as u16, &spelled, qtype, edns);
            let client = &clients[i % 2];
            let counters_before = agent.kernel_counters();
            let kernel_before = agent.kernel_answered();
            let Some(udp) = client.exchange_raw(&q) else {
                failures.push(format!("{name} {qtype}: no UDP answer"));
                continue;
            };
            let kernel_answered = agent.kernel_answered() - kernel_before;
            by_kernel += kernel_answered;
            let tcp_reply = tcp.exchange(&q);
            let what = format!("{spelled} type {qtype}");

            // The question comes back exactly as asked.
            let qlen = q.len() - 12 - if edns.is_some() { 11 } else { 0 };
            if udp.get(12..12 + qlen) != Some(&q[12..12 + qlen]) {
                failures.push(format!("{what}: question not echoed byte for byte"));
            }
            let udp_msg = Message::from_vec(&udp).expect("UDP reply parses");
            let tcp_msg = Message::from_vec(&tcp_reply).expect("TCP reply parses");
            let tc = udp_msg.metadata.truncation;
            truncated += tc as u64;

            let expected = cluster.expect(&name.to_ascii_lowercase(), qtype, &settings);
            // The kernel answers exactly what it should.
            let kernel_should = expected.kernel && !tc;
            // Generic XDP on a veth gives the frame a few hundred bytes to grow: a reply much
            // larger than its query goes to userspace (counted as pass_no_room).
            let no_room = agent.kernel_counters()["pass_no_room"] > counters_before["pass_no_room"];
            if no_room {
                no_room_count += 1;
                if udp.len() < q.len() + 256 {
                    failures.push(format!(
                        "{what}: no room for a reply of {} bytes to a query of {}",
                        udp.len(),
                        q.len()
                    ));
                }
            }
            if kernel_should != (kernel_answered == 1) && !(kernel_should && no_room) {
                let after = agent.kernel_counters();
                let moved: Vec<_> = after
                    .iter()
                    .filter(|(k, v)| counters_before[*k] != **v)
                    .map(|(k, _)| k.clone())
                    .collect();
                failures.push(format!(
                    "{what}: kernel answered {kernel_answered}, expected {} (moved: {moved:?})",
                    kernel_should as u8
                ));
            }
            // Kernel (UDP) and userspace (TCP) say the same: bytes when the kernel answered,
            // records (TTLs aside) otherwise.
            if !tc {
                if kernel_answered == 1 {
                    if udp != tcp_reply {
                        failures.push(format!("{what}: kernel and userspace bytes differ\n  udp {udp:02x?}\n  tcp {tcp_reply:02x?}"));
                    }
                } else if without_ttls(&udp_msg) != without_ttls(&tcp_msg) {
                    failures.push(format!("{what}: UDP and TCP answers differ"));
                }
            } else if !udp_msg.answers.is_empty() {
                failures.push(format!("{what}: a truncated answer carries records"));
            }
            // And what they say is what the schema says, section by section, TTLs included:
            // over TCP (userspace), and over UDP (the kernel, when it answered) unless cut.
            for (how, m) in [("tcp", Some(&tcp_msg)), ("udp", (!tc).then_some(&udp_msg))] {
                let Some(m) = m else { continue };
                for d in differences(&expected, m) {
                    failures.push(format!("{what} ({how}): {d}"));
                }
            }
            // OPT in the reply exactly when the query had one.
            for (how, bytes) in [("udp", &udp), ("tcp", &tcp_reply)] {
                let m = Message::from_vec(bytes).expect("reply parses");
                if m.edns.is_some() != edns.is_some() {
                    failures.push(format!("{what} ({how}): OPT {}", m.edns.is_some()));
                }
            }
        }
    }
    eprintln!(
        "{} names, {queries} queries: {by_kernel} answered in the kernel, {no_room_count} too large to grow in place, {truncated} truncated over UDP, {} failures",
        names.len(),
        failures.len()
    );
    assert!(
        names.len() > 1000,
        "the generated cluster implies {} names",
        names.len()
    );
    // Per query, the kernel answered exactly what it should (checked above); overall that is
    // a large share, or the suite is not exercising the kernel at all.
    assert!(
        by_kernel * 3 > queries,
        "the kernel answered {by_kernel} of {queries}"
    );
    assert!(
        failures.is_empty(),
        "{} failures, first ones:\n{}",
        failures.len(),
        failures
            .iter()
            .take(15)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    let c = agent.kernel_counters();
    assert_eq!(c["error_write"], 0, "{c:?}");
}
