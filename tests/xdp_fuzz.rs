//! Differential fuzzing of the XDP program: structure-aware mutations of real queries run
//! through BPF_PROG_TEST_RUN (the real verifier and kernel), each verdict judged against the
//! agent:
//!
//! - `XDP_PASS`: the frame is untouched;
//! - `XDP_TX`: the frame is one the kernel stack would have delivered to the agent's socket,
//!   and the reply's MACs, addresses, ports, lengths and IPv4 and UDP checksums are right, and
//!   its DNS payload is byte for byte what the agent answers to the same query: from the zone,
//!   from its cache of upstream answers (a few external names are cached, their TTLs counted
//!   down), or, for a search-path expansion from the IPv4 client (a pod of namespace `shop`;
//!   the IPv6 client is no known pod), the completed search path;
//! - nothing else (`XDP_DROP`, `XDP_ABORTED`), and every frame moves exactly one counter.
//!
//! `XDNS_FUZZ_FRAMES` frames (default 100,000), from `XDNS_FUZZ_SEED` (default: random,
//! printed). A failure names the frame's own seed; `XDNS_FUZZ_REPLAY=<seed>` runs that frame
//! alone and prints it. `cargo xtask fuzz` runs this in release mode. Needs root.

mod support;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
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
    server::{
        ZoneReply, answer_from_zone, autopath::complete, cache::Answer, forward::Question,
        reply_from_answer,
    },
    zone::{ZoneModel, name::wire_from_dotted},
};
use hickory_proto::op::{Message, ResponseCode};
use support::{
    LISTEN_V4, LISTEN_V6,
    answers::{a, question, upstream, upstream_soa},
    frames::{CLIENT_MAC, NODE_MAC, check_reply, dns_query, ipv4_checksum, udp_checksum},
};

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
/// Counters are compared once per batch: reading them per frame would dominate the run.
const BATCH: usize = 1000;

const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);

// ---------------------------------------------------------------------------------------------
// Randomness: one small generator per frame, seeded from the run's seed and the frame's index,
// so that any frame can be rebuilt from its seed alone.

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn frame_seed(run_seed: u64, index: u64) -> u64 {
    Rng(run_seed ^ index.wrapping_mul(0xd6e8_feb8_6659_fd93)).next()
}

// ---------------------------------------------------------------------------------------------
// A query frame, its layers kept apart so that mutations stay structure-aware; `encode` lays
// it out with every length and checksum right unless a mutation asked otherwise.

#[derive(Clone, Debug)]
struct Opt {
    owner: Vec<u8>,
    rtype: u16,
    size: u16,
    ext_rcode: u8,
    version: u8,
    flags: u16,
    options: Vec<(u16, Vec<u8>)>,
    /// Added to each option's length field, and to RDLENGTH.
    option_len_delta: i32,
    rdlen_delta: i32,
}

#[derive(Clone, Debug)]
struct Frame {
    v6: bool,
    vlan: Vec<[u8; 4]>,
    ethertype: Option<u16>,
    ip_version: Option<u8>,
    ipv4_options: Vec<u8>,
    ipv6_ext: Option<(u8, Vec<u8>)>,
    tos: u8,
    ttl: u8,
    frag: u16,
    proto: u8,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    ip_len_delta: i32,
    udp_len_delta: i32,
    bad_ip_csum: bool,
    // DNS
    id: u16,
    flags: u16,
    /// QDCOUNT, ANCOUNT, NSCOUNT, ARCOUNT when set; otherwise counted from what is there.
    counts: Option<[u16; 4]>,
    qname: Vec<u8>,
    qtype: u16,
    qclass: u16,
    answers: Vec<Vec<u8>>,
    opt: Option<Opt>,
    extra_additional: Vec<Vec<u8>>,
    dns_trailing: Vec<u8>,
    /// Bytes after the IP packet (Ethernet padding).
    frame_trailing: Vec<u8>,
    truncate: Option<usize>,
    flips: Vec<(usize, u8)>,
}

fn wire(name: &str) -> Vec<u8> {
    let mut w = Vec::new();
    for l in name.split('.').filter(|l| !l.is_empty()) {
        w.push(l.len() as u8);
        w.extend_from_slice(l.as_bytes());
    }
    w.push(0);
    w
}

/// Real questions: what the kernel answers (every record type, NODATA, NXDOMAIN, long keys,
/// blobs), what it passes up, and in between.
const QUESTIONS: &[(&str, u16)] = &[
    ("web.shop.svc.cluster.local", 1),
    ("web.shop.svc.cluster.local", 28),
    ("web.shop.svc.cluster.local", 33),
    ("_http._tcp.web.shop.svc.cluster.local", 33),
    ("kubernetes.default.svc.cluster.local", 1),
    ("kubernetes.default.svc.cluster.local", 15),
    ("postgres-0.postgres.shop.svc.cluster.local", 1),
    ("_pg._tcp.postgres.shop.svc.cluster.local", 33),
    ("10-244-1-41.cache.shop.svc.cluster.local", 1),
    ("payments.shop.svc.cluster.local", 5),
    ("payments.shop.svc.cluster.local", 1),
    ("dns-version.cluster.local", 16),
    ("cluster.local", 6),
    ("cluster.local", 2),
    ("ns.dns.cluster.local", 1),
    ("10.0.96.10.in-addr.arpa", 12),
    ("31.1.244.10.in-addr.arpa", 12),
    (
        "4.1.a.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.0.d.f.ip6.arpa",
        12,
    ),
    ("www.example.com.shop.svc.cluster.local", 1),
    ("nothing.default.svc.cluster.local", 28),
    ("no-such-ns.svc.cluster.local", 1),
    ("10-1-2-3.shop.pod.cluster.local", 1),
    ("www.example.com", 1),
    ("bulk-40.shop.svc.cluster.local", 1),
    ("bulk-100.shop.svc.cluster.local", 1),
    ("svc.cluster.local", 1),
    ("shop.svc.cluster.local", 65),
    // Cached upstream answers (see `fixture`), and names outside the zone that are not.
    ("www.example.org", 1),
    ("mail.example.org", 28),
    ("nothing.example.org", 1),
    (
        "a-rather-long-label-for-a-host.in-a-deep.subdomain.example.org",
        1,
    ),
    ("www.example.org", 28),
    // Search-path expansions: completed (from the IPv4 client), not completed, another
    // namespace's.
    ("www.example.org.shop.svc.cluster.local", 1),
    ("web.shop.shop.svc.cluster.local", 1),
    ("api.example.org.shop.svc.cluster.local", 1),
    ("www.example.org.default.svc.cluster.local", 1),
];

impl Frame {
    fn base(rng: &mut Rng) -> Self {
        let (name, qtype) = rng.pick(QUESTIONS);
        let mut qname = wire(name);
        if rng.chance(30) {
            for b in qname.iter_mut().filter(|b| b.is_ascii_lowercase()) {
                if rng.chance(50) {
                    *b = b.to_ascii_uppercase();
                }
            }
        }
        let v6 = rng.chance(40);
        let opt = rng.chance(60).then(|| Opt {
            owner: vec![0],
            rtype: 41,
            size: rng.pick(&[512, 1232, 4096, 1400]),
            ext_rcode: 0,
            version: 0,
            flags: if rng.chance(30) { 0x8000 } else { 0 },
            options: if rng.chance(20) {
                // A client cookie, as dig sends it.
                vec![(10, rng.bytes(8))]
            } else {
                Vec::new()
            },
            option_len_delta: 0,
            rdlen_delta: 0,
        });
        Frame {
            v6,
            vlan: Vec::new(),
            ethertype: None,
            ip_version: None,
            ipv4_options: Vec::new(),
            ipv6_ext: None,
            tos: 0,
            ttl: 64,
            frag: 0x4000,
            proto: 17,
            dst: if v6 {
                IpAddr::V6(LISTEN_V6)
            } else {
                IpAddr::V4(LISTEN_V4)
            },
            sport: 1024 + rng.below(60000) as u16,
            dport: 53,
            ip_len_delta: 0,
            udp_len_delta: 0,
            bad_ip_csum: false,
            id: rng.next() as u16,
            flags: if rng.chance(90) { 0x0100 } else { 0 } | if rng.chance(10) { 0x20 } else { 0 },
            counts: None,
            qname,
            qtype,
            qclass: 1,
            answers: Vec::new(),
            opt,
            extra_additional: Vec::new(),
            dns_trailing: Vec::new(),
            frame_trailing: Vec::new(),
            truncate: None,
            flips: Vec::new(),
        }
    }

    /// Offsets of the label length bytes of the question name.
    fn label_starts(&self) -> Vec<usize> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.qname.len() && self.qname[i] != 0 && self.qname[i] < 64 {
            out.push(i);
            i += 1 + self.qname[i] as usize;
        }
        out
    }

    fn mutate(&mut self, rng: &mut Rng) {
        match rng.below(30) {
            // Header flags: one bit, or an opcode.
            0 | 1 => self.flags ^= 1 << rng.below(16),
            2 => self.flags = (self.flags & !0x7800) | ((rng.below(16) as u16) << 11),
            3 => self.id = rng.next() as u16,
            4 | 5 => {
                let mut c = self.counts.unwrap_or_else(|| self.natural_counts());
                c[rng.below(4)] = {
                    let random = rng.next();
                    rng.pick(&[0, 1, 2, 3, 0xffff, random as u16])
                };
                self.counts = Some(c);
            }
            // Label lengths: off by one, zero, the limits, the pointer and extended-label bits.
            6 | 7 => {
                let starts = self.label_starts();
                if let Some(&at) = starts.get(rng.below(starts.len().max(1))) {
                    let len = self.qname[at];
                    self.qname[at] = {
                        let random = rng.next();
                        rng.pick(&[
                            len.wrapping_add(1),
                            len.wrapping_sub(1),
                            0,
                            63,
                            64,
                            0x40 | len,
                            0x80 | len,
                            0xc0,
                            random as u8,
                        ])
                    };
                }
            }
            // A compression pointer for the rest of the name.
            8 => {
                let starts = self.label_starts();
                let at = starts
                    .get(rng.below(starts.len().max(1)))
                    .copied()
                    .unwrap_or(0);
                self.qname.truncate(at);
                let target = {
                    let random = rng.next();
                    rng.pick(&[12u16, 0, 2, 13, random as u16 & 0x3fff])
                };
                self.qname
                    .extend_from_slice(&(0xc000 | target).to_be_bytes());
            }
            9 => {
                for b in self.qname.iter_mut() {
                    if b.is_ascii_alphabetic() && rng.chance(50) {
                        *b ^= 0x20;
                    }
                }
            }
            10 | 11 => {
                self.qtype = {
                    let random = rng.next();
                    rng.pick(&[
                        0,
                        1,
                        2,
                        5,
                        6,
                        12,
                        15,
                        16,
                        28,
                        33,
                        41,
                        65,
                        127,
                        128,
                        250,
                        251,
                        252,
                        255,
                        256,
                        0xffff,
                        random as u16,
                    ])
                }
            }
            12 => {
                self.qclass = {
                    let random = rng.next();
                    rng.pick(&[0, 1, 3, 4, 254, 255, 0x8001, random as u16])
                }
            }
            // Long names: labels put in front up to and past 255 bytes.
            13 => {
                let target = rng.pick(&[62, 63, 64, 200, 253, 254, 255, 256, 300]);
                while self.qname.len() < target {
                    let len = rng
                        .pick(&[1usize, 10, 62, 63])
                        .min(target - self.qname.len());
                    let mut l = vec![len.saturating_sub(1) as u8];
                    l.extend(std::iter::repeat_n(b'a', len.saturating_sub(1)));
                    if len <= 1 {
                        break;
                    }
                    l.extend_from_slice(&self.qname);
                    self.qname = l;
                }
            }
            14 => {
                let cut = rng.below(self.qname.len() + 4);
                self.qname.truncate(cut);
            }
            // EDNS.
            15 => {
                self.opt = match self.opt.take() {
                    Some(_) => None,
                    None => Some(Opt {
                        owner: vec![0],
                        rtype: 41,
                        size: 1232,
                        ext_rcode: 0,
                        version: 0,
                        flags: 0,
                        options: Vec::new(),
                        option_len_delta: 0,
                        rdlen_delta: 0,
                    }),
                }
            }
            16..=18 => {
                if let Some(o) = self.opt.as_mut() {
                    match rng.below(9) {
                        0 => o.version = rng.pick(&[0, 1, 2, 255]),
                        1 => {
                            o.size = {
                                let random = rng.next();
                                rng.pick(&[
                                    0,
                                    1,
                                    511,
                                    512,
                                    513,
                                    1231,
                                    1232,
                                    1233,
                                    4096,
                                    65535,
                                    random as u16,
                                ])
                            }
                        }
                        2 => o.flags ^= 1 << rng.below(16),
                        3 => o.ext_rcode = rng.next() as u8,
                        4 => {
                            for _ in 0..=rng.below(10) {
                                let code = {
                                    let random = rng.next();
                                    rng.pick(&[3, 8, 10, 11, 12, 15, random as u16])
                                };
                                let len = rng.pick(&[0, 2, 4, 8, 24, 40]);
                                o.options.push((code, rng.bytes(len)));
                            }
                        }
                        5 => o.option_len_delta = rng.pick(&[-2, -1, 1, 2, 300]),
                        6 => o.rdlen_delta = rng.pick(&[-4, -1, 1, 3, 100]),
                        7 => {
                            o.owner = rng
                                .pick(&[&[1u8, b'a', 0][..], &[0xc0, 12], &[0, 0]])
                                .to_vec()
                        }
                        _ => o.rtype = rng.pick(&[250, 24, 1, 0, 41]),
                    }
                }
            }
            // Other records: an answer in the query, a second OPT, a TSIG-like record.
            19 => self
                .answers
                .push(record(&[0xc0, 0x0c], 1, 1, &[192, 0, 2, 1])),
            20 => {
                let rec = if rng.chance(50) {
                    record(&[0], 41, 1232, &[])
                } else {
                    let len = rng.below(20);
                    record(&[0], 250, 255, &rng.bytes(len))
                };
                self.extra_additional.push(rec);
            }
            // Bytes after the message: inside the datagram, or after the IP packet.
            21 => {
                self.dns_trailing = {
                    let n = rng.pick(&[1, 2, 11, 100]);
                    rng.bytes(n)
                }
            }
            22 => {
                self.frame_trailing = {
                    let n = rng.pick(&[1, 2, 6, 40]);
                    rng.bytes(n)
                }
            }
            // Lengths that disagree.
            23 => self.ip_len_delta = rng.pick(&[-20, -9, -1, 1, 2, 1000]),
            24 => self.udp_len_delta = rng.pick(&[-100, -8, -1, 1, 2, 1000]),
            // IP layer: options, fragments, extension headers, versions, protocols, addresses.
            25 => {
                if self.v6 {
                    let next = rng.pick(&[0u8, 43, 44, 60, 59, 6]);
                    self.ipv6_ext = Some((next, vec![0; 6]));
                } else {
                    let words = 1 + rng.below(10);
                    let mut o = vec![1u8; words * 4]; // NOP
                    if rng.chance(50) {
                        o[..4].copy_from_slice(&[0x94, 4, 0, 0]); // router alert
                    }
                    self.ipv4_options = o;
                }
            }
            26 => {
                if self.v6 {
                    self.ip_version = Some(rng.pick(&[4, 0, 15]));
                } else {
                    match rng.below(4) {
                        0 => self.frag = 0x2000,
                        1 => self.frag = rng.pick(&[1, 0x2001, 0x1fff, 0]),
                        2 => self.ip_version = Some(rng.pick(&[6, 0, 15])),
                        _ => self.bad_ip_csum = true,
                    }
                }
            }
            27 => {
                self.vlan.push([0x81, 0x00, 0x00, rng.next() as u8]);
                if rng.chance(30) {
                    self.vlan.insert(0, [0x88, 0xa8, 0x00, 0x05]);
                }
            }
            28 => match rng.below(6) {
                0 => self.proto = rng.pick(&[6, 1, 0, 255]),
                1 => {
                    self.dst = if self.v6 {
                        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x20, 0, 0, 0, 0, 0x11))
                    } else {
                        IpAddr::V4(Ipv4Addr::new(169, 254, 20, 11))
                    }
                }
                2 => self.dport = rng.pick(&[5353, 0, 54, 853]),
                3 => self.sport = rng.pick(&[0, 53, 65535]),
                4 => self.ttl = rng.pick(&[0, 1, 255]),
                _ => {
                    self.tos = rng.next() as u8;
                    self.ethertype = Some(rng.pick(&[0x0806, 0x88cc, 0x86dd, 0x0800]));
                }
            },
            // Cut the frame short, or corrupt bytes of it.
            _ => {
                if rng.chance(50) {
                    self.truncate = Some(rng.below(120));
                } else {
                    for _ in 0..=rng.below(3) {
                        self.flips.push((rng.next() as usize, rng.next() as u8));
                    }
                }
            }
        }
    }

    fn natural_counts(&self) -> [u16; 4] {
        [
            1,
            self.answers.len() as u16,
            0,
            (self.opt.is_some() as usize + self.extra_additional.len()) as u16,
        ]
    }

    fn dns(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(128);
        m.extend_from_slice(&self.id.to_be_bytes());
        m.extend_from_slice(&self.flags.to_be_bytes());
        for c in self.counts.unwrap_or_else(|| self.natural_counts()) {
            m.extend_from_slice(&c.to_be_bytes());
        }
        m.extend_from_slice(&self.qname);
        m.extend_from_slice(&self.qtype.to_be_bytes());
        m.extend_from_slice(&self.qclass.to_be_bytes());
        for a in &self.answers {
            m.extend_from_slice(a);
        }
        if let Some(o) = &self.opt {
            let mut rdata = Vec::new();
            for (code, data) in &o.options {
                rdata.extend_from_slice(&code.to_be_bytes());
                let len = (data.len() as i32 + o.option_len_delta).clamp(0, 0xffff) as u16;
                rdata.extend_from_slice(&len.to_be_bytes());
                rdata.extend_from_slice(data);
            }
            m.extend_from_slice(&o.owner);
            m.extend_from_slice(&o.rtype.to_be_bytes());
            m.extend_from_slice(&o.size.to_be_bytes());
            m.extend_from_slice(&[o.ext_rcode, o.version]);
            m.extend_from_slice(&o.flags.to_be_bytes());
            let rdlen = (rdata.len() as i32 + o.rdlen_delta).clamp(0, 0xffff) as u16;
            m.extend_from_slice(&rdlen.to_be_bytes());
            m.extend_from_slice(&rdata);
        }
        for r in &self.extra_additional {
            m.extend_from_slice(r);
        }
        m.extend_from_slice(&self.dns_trailing);
        m
    }

    fn encode(&self) -> Vec<u8> {
        let dns = self.dns();
        let src = if self.v6 {
            IpAddr::V6(CLIENT_V6)
        } else {
            IpAddr::V4(CLIENT_V4)
        };
        let mut udp = Vec::with_capacity(8 + dns.len());
        udp.extend_from_slice(&self.sport.to_be_bytes());
        udp.extend_from_slice(&self.dport.to_be_bytes());
        let udp_len = (8 + dns.len() as i32 + self.udp_len_delta).clamp(0, 0xffff) as u16;
        udp.extend_from_slice(&udp_len.to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&dns);
        // A checksum as the sender computed it (when the families agree).
        if src.is_ipv4() == self.dst.is_ipv4() {
            let c = udp_checksum(src, self.dst, &udp);
            udp[6..8].copy_from_slice(&c.to_be_bytes());
        }

        let mut f = Vec::with_capacity(128 + udp.len());
        f.extend_from_slice(&NODE_MAC);
        f.extend_from_slice(&CLIENT_MAC);
        for tag in &self.vlan {
            f.extend_from_slice(tag);
        }
        match (src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&self.ethertype.unwrap_or(0x0800).to_be_bytes());
                let hlen = 20 + self.ipv4_options.len();
                let total = (hlen as i32 + udp.len() as i32 + self.ip_len_delta).clamp(0, 0xffff);
                let mut ip = Vec::with_capacity(hlen);
                ip.push((self.ip_version.unwrap_or(4) << 4) | ((hlen / 4) as u8 & 0xf));
                ip.push(self.tos);
                ip.extend_from_slice(&(total as u16).to_be_bytes());
                ip.extend_from_slice(&[0x12, 0x34]);
                ip.extend_from_slice(&self.frag.to_be_bytes());
                ip.extend_from_slice(&[self.ttl, self.proto, 0, 0]);
                ip.extend_from_slice(&s.octets());
                ip.extend_from_slice(&d.octets());
                ip.extend_from_slice(&self.ipv4_options);
                let mut c = ipv4_checksum(&ip);
                if self.bad_ip_csum {
                    c ^= 0x0101;
                }
                ip[10..12].copy_from_slice(&c.to_be_bytes());
                f.extend_from_slice(&ip);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&self.ethertype.unwrap_or(0x86dd).to_be_bytes());
                let ext_len = self.ipv6_ext.as_ref().map_or(0, |(_, e)| 2 + e.len());
                let payload =
                    (ext_len as i32 + udp.len() as i32 + self.ip_len_delta).clamp(0, 0xffff);
                f.push((self.ip_version.unwrap_or(6) << 4) | (self.tos >> 4));
                f.extend_from_slice(&[self.tos << 4, 0, 0]);
                f.extend_from_slice(&(payload as u16).to_be_bytes());
                let next = match &self.ipv6_ext {
                    Some((next, _)) => *next,
                    None => self.proto,
                };
                f.extend_from_slice(&[next, self.ttl]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                if let Some((_, e)) = &self.ipv6_ext {
                    f.extend_from_slice(&[self.proto, 0]);
                    f.extend_from_slice(e);
                }
            }
            _ => unreachable!("the destination keeps the family"),
        }
        f.extend_from_slice(&udp);
        f.extend_from_slice(&self.frame_trailing);
        for &(at, x) in &self.flips {
            let n = f.len();
            f[at % n] ^= x;
        }
        if let Some(len) = self.truncate {
            f.truncate(len.max(14));
        }
        f
    }
}

fn record(owner: &[u8], rtype: u16, class: u16, rdata: &[u8]) -> Vec<u8> {
    let mut r = owner.to_vec();
    r.extend_from_slice(&rtype.to_be_bytes());
    r.extend_from_slice(&class.to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 60]);
    r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    r.extend_from_slice(rdata);
    r
}

/// The frame of a given seed: a real query, then one to four mutations.
fn frame_of(seed: u64) -> (Frame, Vec<u8>) {
    let mut rng = Rng(seed);
    let mut f = Frame::base(&mut rng);
    // One in eight stays valid: the answered paths keep being exercised.
    let mutations = if rng.chance(12) { 0 } else { 1 + rng.below(4) };
    for _ in 0..mutations {
        f.mutate(&mut rng);
    }
    let bytes = f.encode();
    (f, bytes)
}

// ---------------------------------------------------------------------------------------------
// The oracle: what the kernel stack would hand the agent's socket, written from the RFCs
// (RFC 791, 8200, 768) and the stack's receive checks, independently of the program.

struct Delivered {
    dst: IpAddr,
    dport: u16,
    payload: Vec<u8>,
}

fn be16(b: &[u8], at: usize) -> usize {
    u16::from_be_bytes([b[at], b[at + 1]]) as usize
}

/// The source address of a frame the stack would deliver.
fn delivered_source(frame: &[u8]) -> Option<IpAddr> {
    delivered(frame)?;
    match be16(frame, 12) {
        0x0800 => {
            let s: [u8; 4] = frame.get(26..30)?.try_into().ok()?;
            Some(IpAddr::from(s))
        }
        _ => {
            let s: [u8; 16] = frame.get(22..38)?.try_into().ok()?;
            Some(IpAddr::from(s))
        }
    }
}

fn delivered(frame: &[u8]) -> Option<Delivered> {
    if frame.len() < 14 {
        return None;
    }
    let (dst, udp) = match be16(frame, 12) {
        0x0800 => {
            let ip = frame.get(14..34)?;
            let ihl = (ip[0] & 0xf) as usize * 4;
            let header = frame.get(14..14 + ihl)?;
            let total = be16(ip, 2);
            if ip[0] >> 4 != 4
                || ihl < 20
                || ipv4_checksum(header) != 0
                || total < ihl
                || 14 + total > frame.len()
                || be16(ip, 6) & 0x3fff != 0
                || ip[9] != 17
            {
                return None;
            }
            let d: [u8; 4] = ip[16..20].try_into().expect("4 bytes");
            (IpAddr::from(d), &frame[14 + ihl..14 + total])
        }
        0x86dd => {
            let ip = frame.get(14..54)?;
            let payload = be16(ip, 4);
            // Extension headers: the program passes them all; judged no further here.
            if ip[0] >> 4 != 6 || ip[6] != 17 || 54 + payload > frame.len() {
                return None;
            }
            let d: [u8; 16] = ip[24..40].try_into().expect("16 bytes");
            (IpAddr::from(d), &frame[54..54 + payload])
        }
        _ => return None,
    };
    if udp.len() < 8 {
        return None;
    }
    let len = be16(udp, 4);
    // A datagram shorter than the IP payload is trimmed to its length; a longer one dropped.
    if len < 8 || len > udp.len() {
        return None;
    }
    Some(Delivered {
        dst,
        dport: be16(udp, 2) as u16,
        payload: udp[8..len].to_vec(),
    })
}

// ---------------------------------------------------------------------------------------------
// The program, loaded with the zone of the XDP tests.

struct Fixture {
    kernel: Kernel,
    sync: KernelSync,
    zone: ZoneModel,
    pin: std::path::PathBuf,
    _cache: KernelCache,
    /// What the kernel holds of the agent's cache: by question, the answer and its expiry.
    cached: HashMap<Question, (Arc<Answer>, Instant)>,
    /// The completed search paths it holds, by the asked name's question (pods of `shop`).
    completions: HashMap<Question, (Arc<Answer>, Option<Instant>)>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin);
    }
}

fn fixture() -> Fixture {
    support::require_root();
    let mut objects = support::example_objects();
    objects.extend(support::headless_with(40));
    objects.extend(support::headless_with(100));
    let zone = support::zone_from(objects);
    let pin = std::path::PathBuf::from("/sys/fs/bpf").join(support::unique("xdns-z"));
    let (kernel, maps) =
        Kernel::load(Capacity::default(), &pin, true).expect("loading the XDP program");
    let mut sync = KernelSync::new(maps);
    sync.maps_mut()
        .set_listen(&[LISTEN_V4.octets()], &[LISTEN_V6.octets()])
        .expect("listen addresses");
    // One heartbeat below stands for a live agent for the whole run, however long.
    sync.maps_mut()
        .set_grace(std::time::Duration::from_secs(u32::MAX as u64));
    sync.maps_mut().set_autopath(true);
    sync.maps_mut()
        .set_pod(IpAddr::V4(CLIENT_V4), Some("shop"))
        .expect("the pod's namespace");
    sync.write_config(&zone).expect("zone config");
    let stats = sync.apply(Vec::new(), entries_of(&zone, &zone.all_names()));
    assert_eq!(stats.failed, 0, "{stats:?}");
    sync.set_synced().expect("synced");
    sync.maps().heartbeat().beat();

    // The agent's cache: a day from now, so that no run sees an entry expire.
    let mut cache = KernelCache::new(sync.maps_mut().take_cache().expect("the cache maps"));
    let expires = Instant::now() + Duration::from_secs(86_400);
    let long = "a-rather-long-label-for-a-host.in-a-deep.subdomain.example.org.";
    let mut cached = HashMap::new();
    for (name, qtype, answer) in [
        (
            "www.example.org.",
            1,
            upstream(
                "www.example.org.",
                1,
                ResponseCode::NoError,
                vec![
                    a("www.example.org.", 300, "192.0.2.80"),
                    a("www.example.org.", 300, "192.0.2.81"),
                ],
                vec![],
            ),
        ),
        (
            "mail.example.org.",
            28,
            upstream(
                "mail.example.org.",
                28,
                ResponseCode::NoError,
                vec![],
                vec![upstream_soa("example.org.")],
            ),
        ),
        (
            "nothing.example.org.",
            1,
            upstream(
                "nothing.example.org.",
                1,
                ResponseCode::NXDomain,
                vec![],
                vec![upstream_soa("example.org.")],
            ),
        ),
        (
            long,
            1,
            upstream(
                long,
                1,
                ResponseCode::NoError,
                vec![a(long, 60, "203.0.113.5")],
                vec![],
            ),
        ),
    ] {
        let q = question(name, qtype, false, false);
        cache
            .set(&q, Some((answer.clone(), expires)))
            .expect("a cached answer");
        cached.insert(q, (answer, expires));
    }

    // Completions, as the agent makes them: one that ends upstream (with the cached answer's
    // expiry), one that ends in the zone.
    let mut completions = HashMap::new();
    let www = question("www.example.org", 1, false, false);
    let (www_answer, www_expires) = cached[&www].clone();
    let asked = dns_query(0, "www.example.org.shop.svc.cluster.local", 1, None);
    let q = dns::parse_query(&asked).expect("a query");
    let ended = www_answer.to_message(&www, Some(300)).expect("a message");
    let completion = Arc::new(complete(&q, &ended).expect("completed"));
    completions.insert(
        question("www.example.org.shop.svc.cluster.local", 1, false, false),
        (completion, Some(www_expires)),
    );
    let asked = dns_query(0, "web.shop.shop.svc.cluster.local", 1, None);
    let q = dns::parse_query(&asked).expect("a query");
    let target = dns_query(0, "web.shop.svc.cluster.local", 1, None);
    let tq = dns::parse_query(&target).expect("a query");
    let ZoneReply::Reply(bytes) = answer_from_zone(&zone, &tq, None) else {
        panic!("the zone answers web.shop");
    };
    let ended = Message::from_vec(&bytes).expect("a reply");
    let completion = Arc::new(complete(&q, &ended).expect("completed"));
    completions.insert(
        question("web.shop.shop.svc.cluster.local", 1, false, false),
        (completion, None),
    );
    for (q, (answer, expires)) in &completions {
        cache
            .set_completion(q, Some((answer.clone(), *expires)))
            .expect("a completion");
    }
    Fixture {
        kernel,
        sync,
        zone,
        pin,
        _cache: cache,
        cached,
        completions,
    }
}

/// Is `q`, from the IPv4 client (a pod of `shop`), a search-path expansion (a name under
/// `shop.svc.cluster.local`, below it) the agent completes? Written from the rule, not from the
/// agent's code.
fn expansion_of_shop(q: &dns::Query<'_>) -> bool {
    let element = wire_from_dotted("shop.svc.cluster.local");
    q.qclass == 1
        && q.edns.is_none_or(|e| e.version == 0)
        && q.qname.len() > element.len() + 1
        && q.qname.ends_with(&element)
        && {
            // At a label boundary.
            let mut i = 0;
            let at = q.qname.len() - element.len();
            while i < at {
                i += 1 + q.qname[i] as usize;
            }
            i == at
        }
}

impl Fixture {
    fn counters(&self) -> HashMap<&'static str, u64> {
        self.sync
            .maps()
            .counters()
            .expect("counters")
            .into_iter()
            .collect()
    }

    /// Runs one frame and judges the verdict; panics saying what is wrong.
    fn judge(&self, frame: &[u8]) -> u32 {
        let out = self.kernel.test_run(frame, 1).expect("BPF_PROG_TEST_RUN");
        match out.action {
            XDP_PASS => assert_eq!(out.frame, frame, "a passed frame is untouched"),
            XDP_TX => {
                let query = delivered(frame)
                    .expect("answered a frame the kernel stack would not deliver to the agent");
                assert!(
                    query.dport == 53
                        && (query.dst == IpAddr::V4(LISTEN_V4)
                            || query.dst == IpAddr::V6(LISTEN_V6)),
                    "answered a datagram not for a listen address and port 53"
                );
                let reply = check_reply(frame, &out.frame);
                let ip = &out.frame[14..];
                if ip[0] >> 4 == 4 {
                    assert_eq!(
                        (ip[6] & 0xbf, ip[7], ip[8], ip[9]),
                        (0, 0, 64, 17),
                        "IPv4 fields"
                    );
                } else {
                    assert_eq!((ip[6], ip[7]), (17, 64), "IPv6 next header, hop limit");
                }
                let q = dns::parse_query(&query.payload)
                    .expect("answered a query the agent refuses to parse");
                let limit = Some(q.udp_limit());
                let key = Question {
                    name: q.qname.clone(),
                    qtype: q.qtype,
                    qclass: q.qclass,
                    dnssec_ok: q.edns.is_some_and(|e| e.dnssec_ok),
                    checking_disabled: q.flags & dns_common::FLAG_CD != 0,
                    upstream_set: Default::default(),
                };
                // A held answer with an expiry: the kernel's TTLs are the seconds left, which
                // may have turned between the run and now.
                let agent = |answer: &Answer, expires: Option<Instant>| -> Vec<Vec<u8>> {
                    match expires {
                        None => vec![reply_from_answer(&q, answer, None, limit)],
                        Some(e) => {
                            let left = e.saturating_duration_since(Instant::now()).as_secs() as u32;
                            [left, left + 1]
                                .iter()
                                .map(|t| reply_from_answer(&q, answer, Some(*t), limit))
                                .collect()
                        }
                    }
                };
                let expected = match answer_from_zone(&self.zone, &q, limit) {
                    ZoneReply::Reply(user) => {
                        let from_pod = matches!(
                            delivered_source(frame),
                            Some(IpAddr::V4(ip)) if ip == CLIENT_V4
                        );
                        let nxdomain = u16::from_be_bytes([user[2], user[3]]) & 0xf == 3;
                        if from_pod && nxdomain && expansion_of_shop(&q) {
                            let (answer, expires) = self
                                .completions
                                .get(&key)
                                .expect("completed a search path the agent has not completed");
                            agent(answer, *expires)
                        } else {
                            vec![user]
                        }
                    }
                    ZoneReply::Forward => {
                        let (answer, expires) = self
                            .cached
                            .get(&key)
                            .expect("answered a name outside the zone that is not cached");
                        agent(answer, Some(*expires))
                    }
                    _ => panic!("answered a query the agent answers otherwise"),
                };
                assert!(
                    expected.contains(&reply.dns),
                    "kernel and agent answers differ:\n kernel {:02x?}\n agent  {:02x?}",
                    reply.dns,
                    expected[0]
                );
            }
            other => panic!("verdict {other}: only XDP_PASS and XDP_TX are allowed"),
        }
        out.action
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.replace('_', "").parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v}: {e}")))
}

#[test]
fn xdp_verdicts_match_the_agent_on_mutated_queries() {
    let f = fixture();
    if let Some(seed) = env_u64("XDNS_FUZZ_REPLAY") {
        let (layers, frame) = frame_of(seed);
        eprintln!("frame {seed:#018x}: {layers:#?}\n{frame:02x?}");
        let before = f.counters();
        let verdict = f.judge(&frame);
        let moved: Vec<_> = f
            .counters()
            .into_iter()
            .filter(|(k, v)| before[k] != *v)
            .collect();
        eprintln!("verdict {verdict}, counters moved: {moved:?}");
        return;
    }
    let frames = env_u64("XDNS_FUZZ_FRAMES").unwrap_or(100_000);
    let run_seed = env_u64("XDNS_FUZZ_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_nanos() as u64
    });
    eprintln!("xdp_fuzz: {frames} frames from seed {run_seed:#018x} (XDNS_FUZZ_SEED)");
    let started = Instant::now();
    let mut verdicts = [0u64; 2];
    let mut before = f.counters();
    let first = before.clone();
    let mut done = 0u64;
    while done < frames {
        let batch = (frames - done).min(BATCH as u64);
        let mut answered = 0;
        for i in done..done + batch {
            let seed = frame_seed(run_seed, i);
            let (_, frame) = frame_of(seed);
            let judged = std::panic::catch_unwind(|| f.judge(&frame));
            match judged {
                Ok(XDP_TX) => answered += 1,
                Ok(_) => {}
                Err(e) => {
                    eprintln!(
                        "xdp_fuzz: frame {i} failed; replay it with XDNS_FUZZ_REPLAY={seed:#018x}\n\
                         frame: {frame:02x?}"
                    );
                    std::panic::resume_unwind(e);
                }
            }
        }
        let after = f.counters();
        let moved: u64 = after.iter().map(|(k, v)| v - before[k]).sum();
        assert_eq!(
            moved,
            batch,
            "one counter per frame (frames {done}..{})",
            done + batch
        );
        let kernel_answered: u64 = [
            "answered",
            "answered_nodata",
            "answered_nxdomain",
            "answered_cached",
            "answered_autopath",
        ]
        .iter()
        .map(|k| after[k] - before[k])
        .sum();
        assert_eq!(
            kernel_answered, answered,
            "answer counters against XDP_TX verdicts"
        );
        assert_eq!(after["error_write"], before["error_write"], "write errors");
        verdicts[0] += batch - answered;
        verdicts[1] += answered;
        before = after;
        done += batch;
    }
    let took = started.elapsed();
    let mut by_counter: Vec<(&str, u64)> = before.iter().map(|(k, v)| (*k, v - first[k])).collect();
    by_counter.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    eprintln!(
        "xdp_fuzz: {frames} frames in {:.1} s ({:.0}/s): {} passed, {} answered; by counter: {by_counter:?}",
        took.as_secs_f64(),
        frames as f64 / took.as_secs_f64(),
        verdicts[0],
        verdicts[1],
    );
    // A mutator that only makes garbage, or only valid queries, would prove little.
    assert!(verdicts[1] * 20 > frames, "fewer than 5% answered");
    assert!(verdicts[0] * 4 > frames, "fewer than 25% passed");
}
