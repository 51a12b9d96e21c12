//! A generated cluster for the conformance suite, and an oracle: the Kubernetes DNS schema
//! written again, independently of the agent's zone model, straight from the specification
//! (and CoreDNS where it is silent). The suite asks the agent every name and type the cluster
//! implies and compares its answers with the oracle's.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

pub const ZONE: &str = "cluster.local";

#[derive(Clone, Debug)]
pub enum Kind {
    ClusterIp(Vec<IpAddr>),
    Headless,
    External(String),
}

#[derive(Clone, Debug)]
pub struct Port {
    pub name: Option<String>,
    pub port: u16,
    pub proto: &'static str,
}

#[derive(Clone, Debug)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub hostname: Option<String>,
    pub ready: bool,
}

#[derive(Clone, Debug)]
pub struct Slice {
    pub name: String,
    pub v6: bool,
    pub endpoints: Vec<Endpoint>,
    pub ports: Vec<Port>,
}

#[derive(Clone, Debug)]
pub struct Service {
    pub ns: String,
    pub name: String,
    pub kind: Kind,
    pub ports: Vec<Port>,
    pub slices: Vec<Slice>,
}

#[derive(Debug, Default)]
pub struct Cluster {
    /// Namespaces with a Namespace object.
    pub namespaces: Vec<String>,
    pub services: Vec<Service>,
    /// Addresses of `ns.dns.<zone>` (the agent's listen addresses).
    pub ns_addrs: Vec<IpAddr>,
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

impl Cluster {
    /// `services` Services of every kind over several namespaces, dual-stack.
    pub fn generate(seed: u64, services: usize, ns_addrs: Vec<IpAddr>) -> Self {
        let mut rng = Rng::new(seed);
        let namespaces: Vec<String> = ["default", "kube-system", "team-a", "team-b", "empty-ns"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        // "orphan" has Services but no Namespace object: it exists all the same.
        let service_ns = ["default", "kube-system", "team-a", "team-b", "orphan"];
        let mut cluster = Cluster {
            namespaces,
            ns_addrs,
            ..Default::default()
        };
        let mut next_v4 = 0u32;
        let mut next_pod = 0u32;
        let mut v4 = || {
            next_v4 += 1;
            IpAddr::V4(Ipv4Addr::new(10, 96, (next_v4 >> 8) as u8, next_v4 as u8))
        };
        let v6_of = |ip: IpAddr| match ip {
            IpAddr::V4(a) => {
                let o = a.octets();
                IpAddr::V6(Ipv6Addr::new(
                    0xfd00,
                    o[0] as u16,
                    0,
                    0,
                    0,
                    0,
                    o[1] as u16,
                    u16::from_be_bytes([o[2], o[3]]),
                ))
            }
            v6 => v6,
        };
        let mut pod = || {
            next_pod += 1;
            IpAddr::V4(Ipv4Addr::new(
                10,
                244,
                (next_pod >> 8) as u8,
                next_pod as u8,
            ))
        };
        let protos = ["TCP", "UDP", "SCTP"];
        let port_names = ["http", "https", "grpc", "metrics", "db", "dns", "admin"];
        for i in 0..services {
            let ns = service_ns[i % service_ns.len()].to_string();
            let name = format!("svc-{i}");
            let kind_roll = rng.below(100);
            let mut ports = Vec::new();
            for p in 0..rng.below(4) {
                let named = rng.chance(75);
                ports.push(Port {
                    name: named
                        .then(|| port_names[(p as usize + i) % port_names.len()].to_string()),
                    port: 1000 + (rng.below(60000) as u16),
                    proto: protos[rng.below(3) as usize],
                });
            }
            // Distinct names per service, as the API guarantees.
            let mut seen = BTreeSet::new();
            ports.retain(|p| p.name.as_ref().is_none_or(|n| seen.insert(n.clone())));
            let (kind, headless_names) = match kind_roll {
                0..40 => (Kind::ClusterIp(vec![v4()]), false),
                40..50 => (Kind::ClusterIp(vec![v6_of(v4())]), false),
                50..70 => {
                    let a = v4();
                    (Kind::ClusterIp(vec![a, v6_of(a)]), false)
                }
                70..80 => (Kind::Headless, true),
                80..90 => (Kind::Headless, false),
                _ => {
                    let target = match rng.below(3) {
                        0 => format!("api-{i}.example."),
                        // In the zone: an earlier Service (not itself an alias).
                        1 if i > 0
                            && !matches!(cluster.services[i - 1].kind, Kind::External(_)) =>
                        {
                            format!(
                                "svc-{}.{}.svc.{ZONE}.",
                                i - 1,
                                service_ns[(i - 1) % service_ns.len()]
                            )
                        }
                        _ => format!("gone-{i}.invalid."),
                    };
                    (Kind::External(target), false)
                }
            };
            if matches!(kind, Kind::ClusterIp(_)) && ports.is_empty() {
                ports.push(Port {
                    name: Some("http".into()),
                    port: 80,
                    proto: "TCP",
                });
            }
            let mut slices = Vec::new();
            if !matches!(kind, Kind::External(_)) && !rng.chance(10) {
                let dual = match &kind {
                    Kind::ClusterIp(ips) => ips.len() == 2,
                    _ => rng.chance(30),
                };
                let n = rng.below(9) as usize;
                let all_unready = matches!(kind, Kind::Headless) && rng.chance(10);
                let mut eps4 = Vec::new();
                let mut eps6 = Vec::new();
                for e in 0..n {
                    let addr = pod();
                    let hostname = headless_names.then(|| format!("{name}-{e}"));
                    let ready = !all_unready && rng.chance(85);
                    if dual {
                        eps6.push(Endpoint {
                            addr: v6_of(addr),
                            hostname: hostname.clone(),
                            ready,
                        });
                    }
                    eps4.push(Endpoint {
                        addr,
                        hostname,
                        ready,
                    });
                }
                let slice_ports: Vec<Port> = ports
                    .iter()
                    .map(|p| Port {
                        port: p.port + 1,
                        ..p.clone()
                    })
                    .collect();
                slices.push(Slice {
                    name: format!("{name}-v4"),
                    v6: false,
                    endpoints: eps4,
                    ports: slice_ports.clone(),
                });
                if dual {
                    slices.push(Slice {
                        name: format!("{name}-v6"),
                        v6: true,
                        endpoints: eps6,
                        ports: slice_ports,
                    });
                }
            }
            cluster.services.push(Service {
                ns,
                name,
                kind,
                ports,
                slices,
            });
        }
        // A pod selected by two Services: its address has two PTR names.
        if cluster.services.len() > 12 {
            let shared = Endpoint {
                addr: IpAddr::V4(Ipv4Addr::new(10, 244, 250, 1)),
                hostname: None,
                ready: true,
            };
            for i in [3, 4] {
                let s = &mut cluster.services[i];
                if !matches!(s.kind, Kind::External(_)) {
                    s.slices.push(Slice {
                        name: format!("{}-shared", s.name),
                        v6: false,
                        endpoints: vec![shared.clone()],
                        ports: vec![],
                    });
                }
            }
        }
        // A headless Service too big for one UDP answer.
        cluster.services.push(Service {
            ns: "team-a".into(),
            name: "big".into(),
            kind: Kind::Headless,
            ports: vec![],
            slices: vec![Slice {
                name: "big-1".into(),
                v6: false,
                endpoints: (0..120)
                    .map(|i| Endpoint {
                        addr: IpAddr::V4(Ipv4Addr::new(10, 245, 0, i as u8 + 1)),
                        hostname: None,
                        ready: true,
                    })
                    .collect(),
                ports: vec![Port {
                    name: Some("db".into()),
                    port: 5432,
                    proto: "TCP",
                }],
            }],
        });
        cluster
    }

    /// The cluster as a zone file.
    pub fn to_yaml(&self) -> String {
        let mut y = String::new();
        for ns in &self.namespaces {
            let _ = writeln!(y, "---\nkind: Namespace\nmetadata: {{name: {ns}}}");
        }
        let ports_yaml = |ports: &[Port]| {
            ports
                .iter()
                .map(|p| match &p.name {
                    Some(n) => format!("{{name: {n}, port: {}, protocol: {}}}", p.port, p.proto),
                    None => format!("{{port: {}, protocol: {}}}", p.port, p.proto),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        for s in &self.services {
            let _ = writeln!(
                y,
                "---\nkind: Service\nmetadata: {{name: {}, namespace: {}}}\nspec:",
                s.name, s.ns
            );
            match &s.kind {
                Kind::ClusterIp(ips) => {
                    let _ = writeln!(y, "  clusterIP: \"{}\"", ips[0]);
                    let list: Vec<String> = ips.iter().map(|i| format!("\"{i}\"")).collect();
                    let _ = writeln!(y, "  clusterIPs: [{}]", list.join(", "));
                }
                Kind::Headless => {
                    let _ = writeln!(y, "  clusterIP: None");
                }
                Kind::External(t) => {
                    let _ = writeln!(y, "  type: ExternalName\n  externalName: {t}");
                }
            }
            let _ = writeln!(y, "  ports: [{}]", ports_yaml(&s.ports));
            for sl in &s.slices {
                let _ = writeln!(
                    y,
                    "---\nkind: EndpointSlice\nmetadata: {{name: {}, namespace: {}, labels: {{kubernetes.io/service-name: {}}}}}\n\
                     addressType: {}\nports: [{}]\nendpoints:",
                    sl.name,
                    s.ns,
                    s.name,
                    if sl.v6 { "IPv6" } else { "IPv4" },
                    ports_yaml(&sl.ports)
                );
                if sl.endpoints.is_empty() {
                    y.push_str("  []\n");
                }
                for e in &sl.endpoints {
                    let _ = write!(
                        y,
                        "- addresses: [\"{}\"]\n  conditions: {{ready: {}}}\n",
                        e.addr, e.ready
                    );
                    if let Some(h) = &e.hostname {
                        let _ = writeln!(y, "  hostname: {h}");
                    }
                }
            }
        }
        y
    }

    fn service(&self, ns: &str, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.ns == ns && s.name == name)
    }

    fn ns_exists(&self, ns: &str) -> bool {
        self.namespaces.iter().any(|n| n == ns) || self.services.iter().any(|s| s.ns == ns)
    }

    /// Every name the cluster implies, plus junk and search-path expansions.
    pub fn query_names(&self) -> Vec<String> {
        let mut names = BTreeSet::new();
        let z = ZONE;
        for n in ["", "svc.", "pod.", "dns-version.", "ns.dns."] {
            names.insert(format!("{n}{z}."));
        }
        for ns in self
            .namespaces
            .iter()
            .map(String::as_str)
            .chain(["orphan", "no-such-ns"])
        {
            names.insert(format!("{ns}.svc.{z}."));
            names.insert(format!("{ns}.pod.{z}."));
            names.insert(format!("10-244-0-9.{ns}.pod.{z}."));
            names.insert(format!("www.example.com.{ns}.svc.{z}."));
            names.insert(format!("example.com.{ns}.svc.{z}."));
        }
        names.insert(format!("example.com.svc.{z}."));
        names.insert(format!("example.com.{z}."));
        names.insert(format!("a.b.c.d.e.f.svc.{z}."));
        for s in &self.services {
            let base = format!("{}.{}.svc.{z}.", s.name, s.ns);
            names.insert(base.clone());
            names.insert(format!("nope.{base}"));
            names.insert(format!("_nope._tcp.{base}"));
            names.insert(format!("x.y.{base}"));
            for p in s
                .ports
                .iter()
                .chain(s.slices.iter().flat_map(|sl| sl.ports.iter()))
            {
                if let Some(n) = &p.name {
                    names.insert(format!("_{n}._{}.{base}", p.proto.to_ascii_lowercase()));
                }
            }
            if let Kind::ClusterIp(ips) = &s.kind {
                for ip in ips {
                    names.insert(reverse(*ip));
                }
            }
            for sl in &s.slices {
                for e in &sl.endpoints {
                    names.insert(format!("{}.{base}", label(e)));
                    names.insert(reverse(e.addr));
                }
            }
        }
        names.insert(reverse(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 77))));
        names.into_iter().collect()
    }

    /// What the schema says the reply to `(qname, qtype)` is, section by section. `qname`
    /// lowercased, dotted, with the trailing dot; `s`: the agent's TTLs and its SOA serial.
    pub fn expect(&self, qname: &str, qtype: u16, s: &Settings) -> Expected {
        let node = self.node(qname, s);
        let meta = qtype == 255 || qtype == 0;
        match node {
            Node::Forward => Expected::forwarded(qname, qtype),
            Node::Reverse(ptrs) => {
                if qtype == 12 {
                    Expected::positive(records(qname, &ptrs, s), Vec::new())
                } else {
                    Expected::forwarded(qname, qtype)
                }
            }
            Node::Cname(target) => {
                let cname = Rec::exact(qname, s.ttl, &format!("CNAME {target}"));
                if qtype == 5 {
                    return Expected::positive(vec![cname], Vec::new());
                }
                let mut e = match self.node(&target, s) {
                    Node::Forward => {
                        let mut f = Expected::forwarded(&target, qtype);
                        f.authoritative = false;
                        f
                    }
                    other @ (Node::Missing | Node::Data(_)) => {
                        let mut e = zone_answer(&target, &other, qtype, s);
                        e.additional.clear();
                        e
                    }
                    _ => panic!("the generator makes no CNAME chains"),
                };
                e.answer.push(cname);
                e.kernel = false;
                e
            }
            Node::Pod(ip) => {
                let t = if ip.is_ipv4() { 1 } else { 28 };
                let mut e = if qtype == t {
                    Expected::positive(vec![Rec::exact(qname, s.ttl, &rr_addr(ip))], Vec::new())
                } else {
                    Expected::negative(0, s)
                };
                e.kernel = false;
                e
            }
            Node::Data(_) | Node::Missing => {
                let mut e = zone_answer(qname, &node, qtype, s);
                // Per-endpoint names of ClusterIP Services are answered by userspace (the
                // kernel holds a marker for them).
                let cluster_ip_endpoint = matches!(node, Node::Data(_))
                    && {
                        let rel: Vec<&str> = qname
                            .trim_end_matches(&format!(".{ZONE}."))
                            .split('.')
                            .collect();
                        matches!(rel.as_slice(), [_, svc, ns, "svc"]
                        if self.service(ns, svc).is_some_and(|s| matches!(s.kind, Kind::ClusterIp(_))))
                    };
                // Names below pod.<zone> that do not exist are userspace's too: the kernel's
                // NXDOMAIN rule leaves that subtree alone.
                let under_pod =
                    qname.ends_with(&format!(".pod.{ZONE}.")) && qname.split('.').count() > 4;
                e.kernel =
                    !(meta || cluster_ip_endpoint || under_pod && matches!(node, Node::Missing));
                e
            }
        }
    }

    fn node(&self, qname: &str, s: &Settings) -> Node {
        let z = format!(".{ZONE}.");
        let rel = if qname == format!("{ZONE}.") {
            Some(String::new())
        } else {
            qname.strip_suffix(&z).map(str::to_string)
        };
        let Some(rel) = rel else {
            if let Some(ip) = parse_reverse(qname) {
                let ptrs = self.ptr(ip);
                return if ptrs.is_empty() {
                    Node::Forward
                } else {
                    Node::Reverse(ptrs)
                };
            }
            return Node::Forward;
        };
        let labels: Vec<&str> = if rel.is_empty() {
            vec![]
        } else {
            rel.split('.').collect()
        };
        let ttl_none = BTreeMap::new;
        let mut rr: BTreeMap<u16, (BTreeSet<String>, BTreeSet<String>)> = ttl_none();
        let add = |rr: &mut BTreeMap<u16, (BTreeSet<String>, BTreeSet<String>)>, ip: IpAddr| {
            rr.entry(if ip.is_ipv4() { 1 } else { 28 })
                .or_default()
                .0
                .insert(rr_addr(ip));
        };
        match labels.as_slice() {
            [] => {
                rr.entry(6).or_default().0.insert(soa_data(s));
                let ns = rr.entry(2).or_default();
                ns.0.insert(format!("NS ns.dns.{ZONE}."));
                for ip in &self.ns_addrs {
                    ns.1.insert(format!("ns.dns.{ZONE}. {}", rr_addr(*ip)));
                }
                Node::Data(rr)
            }
            ["svc"] | ["pod"] => Node::Data(rr),
            ["dns-version"] => {
                rr.entry(16).or_default().0.insert("TXT 1.1.0".into());
                Node::Data(rr)
            }
            ["ns", "dns"] => {
                for ip in &self.ns_addrs {
                    add(&mut rr, *ip);
                }
                Node::Data(rr)
            }
            [ns, "svc"] | [ns, "pod"] => {
                if self.ns_exists(ns) {
                    Node::Data(rr)
                } else {
                    Node::Missing
                }
            }
            [pod, ns, "pod"] => match pod_ip(pod) {
                Some(ip) if self.ns_exists(ns) => Node::Pod(ip),
                _ => Node::Missing,
            },
            [svc, ns, "svc"] => {
                let Some(s) = self.service(ns, svc) else {
                    return Node::Missing;
                };
                let own = format!("{svc}.{ns}.svc.{ZONE}.");
                match &s.kind {
                    Kind::External(t) => Node::Cname(t.to_ascii_lowercase()),
                    Kind::ClusterIp(ips) => {
                        for ip in ips {
                            add(&mut rr, *ip);
                        }
                        let targets: Vec<(u16, String, Vec<IpAddr>)> = s
                            .ports
                            .iter()
                            .map(|p| (p.port, own.clone(), ips.clone()))
                            .collect();
                        srv(&mut rr, targets);
                        Node::Data(rr)
                    }
                    Kind::Headless => {
                        let mut targets = Vec::new();
                        for sl in &s.slices {
                            for e in sl.endpoints.iter().filter(|e| e.ready) {
                                add(&mut rr, e.addr);
                                for p in &sl.ports {
                                    targets.push((
                                        p.port,
                                        format!("{}.{own}", label(e)),
                                        vec![e.addr],
                                    ));
                                }
                            }
                        }
                        if rr.is_empty() {
                            return Node::Missing;
                        }
                        srv(&mut rr, targets);
                        Node::Data(rr)
                    }
                }
            }
            [ep, svc, ns, "svc"] => {
                let Some(s) = self.service(ns, svc) else {
                    return Node::Missing;
                };
                if matches!(s.kind, Kind::External(_)) {
                    return Node::Missing;
                }
                let own = format!("{ep}.{svc}.{ns}.svc.{ZONE}.");
                let mut targets = Vec::new();
                for sl in &s.slices {
                    for e in sl.endpoints.iter().filter(|e| e.ready && label(e) == *ep) {
                        add(&mut rr, e.addr);
                        for p in &sl.ports {
                            targets.push((p.port, own.clone(), vec![e.addr]));
                        }
                    }
                }
                if rr.is_empty() {
                    return Node::Missing;
                }
                srv(&mut rr, targets);
                Node::Data(rr)
            }
            [port, proto, svc, ns, "svc"] => {
                let (Some(port), Some(proto)) = (port.strip_prefix('_'), proto.strip_prefix('_'))
                else {
                    return Node::Missing;
                };
                let Some(s) = self.service(ns, svc) else {
                    return Node::Missing;
                };
                let matches = |p: &Port| {
                    p.name.as_deref() == Some(port) && p.proto.eq_ignore_ascii_case(proto)
                };
                let own = format!("{svc}.{ns}.svc.{ZONE}.");
                let mut targets = Vec::new();
                match &s.kind {
                    Kind::External(_) => return Node::Missing,
                    Kind::ClusterIp(ips) => {
                        for p in s.ports.iter().filter(|p| matches(p)) {
                            for ip in ips {
                                add(&mut rr, *ip);
                            }
                            targets.push((p.port, own.clone(), ips.clone()));
                        }
                    }
                    Kind::Headless => {
                        for sl in &s.slices {
                            for p in sl.ports.iter().filter(|p| matches(p)) {
                                for e in sl.endpoints.iter().filter(|e| e.ready) {
                                    add(&mut rr, e.addr);
                                    targets.push((
                                        p.port,
                                        format!("{}.{own}", label(e)),
                                        vec![e.addr],
                                    ));
                                }
                            }
                        }
                    }
                }
                if targets.is_empty() {
                    return Node::Missing;
                }
                srv(&mut rr, targets);
                Node::Data(rr)
            }
            _ => Node::Missing,
        }
    }

    fn ptr(&self, ip: IpAddr) -> BTreeSet<String> {
        let mut owners: Vec<&Service> = self
            .services
            .iter()
            .filter(|s| matches!(&s.kind, Kind::ClusterIp(ips) if ips.contains(&ip)))
            .collect();
        owners.sort_by(|a, b| (&a.ns, &a.name).cmp(&(&b.ns, &b.name)));
        if let Some(s) = owners.first() {
            return BTreeSet::from([format!("PTR {}.{}.svc.{ZONE}.", s.name, s.ns)]);
        }
        let mut out = BTreeSet::new();
        for s in &self.services {
            for sl in &s.slices {
                for e in sl.endpoints.iter().filter(|e| e.ready && e.addr == ip) {
                    out.insert(format!("PTR {}.{}.{}.svc.{ZONE}.", label(e), s.name, s.ns));
                }
            }
        }
        out
    }
}

enum Node {
    Missing,
    Forward,
    Cname(String),
    Data(BTreeMap<u16, (BTreeSet<String>, BTreeSet<String>)>),
    Reverse(BTreeSet<String>),
    Pod(IpAddr),
}

/// SRV records per (port, target), weights as CoreDNS shares them, targets' addresses
/// additional.
fn srv(
    rr: &mut BTreeMap<u16, (BTreeSet<String>, BTreeSet<String>)>,
    targets: Vec<(u16, String, Vec<IpAddr>)>,
) {
    let mut set: BTreeMap<(u16, String), BTreeSet<IpAddr>> = BTreeMap::new();
    for (port, target, addrs) in targets {
        set.entry((port, target)).or_default().extend(addrs);
    }
    if set.is_empty() {
        return;
    }
    let weight = (100 / set.len()).max(1);
    let entry = rr.entry(33).or_default();
    for ((port, target), addrs) in set {
        entry.0.insert(format!("SRV 0 {weight} {port} {target}"));
        for a in addrs {
            entry.1.insert(format!("{target} {}", rr_addr(a)));
        }
    }
}

fn rr_addr(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => format!("A {a}"),
        IpAddr::V6(a) => format!("AAAA {a}"),
    }
}

pub fn label(e: &Endpoint) -> String {
    e.hostname.clone().unwrap_or_else(|| match e.addr {
        IpAddr::V4(a) => a.to_string().replace('.', "-"),
        IpAddr::V6(a) => a.to_string().replace(':', "-"),
    })
}

fn pod_ip(label: &str) -> Option<IpAddr> {
    if label.matches('-').count() == 3 && !label.contains("--") {
        label
            .replace('-', ".")
            .parse::<Ipv4Addr>()
            .ok()
            .map(IpAddr::V4)
    } else {
        label
            .replace('-', ":")
            .parse::<Ipv6Addr>()
            .ok()
            .map(IpAddr::V6)
    }
}

pub fn reverse(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(a) => {
            let mut s = String::new();
            for b in a.octets().iter().rev() {
                let _ = write!(s, "{:x}.{:x}.", b & 0xf, b >> 4);
            }
            s + "ip6.arpa."
        }
    }
}

fn parse_reverse(name: &str) -> Option<IpAddr> {
    if let Some(v4) = name.strip_suffix(".in-addr.arpa.") {
        let parts: Vec<&str> = v4.split('.').collect();
        if parts.len() != 4 {
            return None;
        }
        let o: Vec<u8> = parts
            .iter()
            .rev()
            .map(|p| p.parse().ok())
            .collect::<Option<_>>()?;
        return Some(IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], o[3])));
    }
    let v6 = name.strip_suffix(".ip6.arpa.")?;
    let nibbles: Vec<u8> = v6
        .split('.')
        .map(|n| u8::from_str_radix(n, 16).ok())
        .collect::<Option<_>>()?;
    if nibbles.len() != 32 {
        return None;
    }
    let mut o = [0u8; 16];
    for (i, n) in nibbles.iter().rev().enumerate() {
        o[i / 2] |= if i % 2 == 0 { n << 4 } else { *n };
    }
    Some(IpAddr::V6(Ipv6Addr::from(o)))
}

/// What the agent is told that the schema leaves open: the TTLs (`--ttl`, `--negative-ttl`),
/// and the SOA serial it chose (its start time).
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub ttl: u32,
    pub negative_ttl: u32,
    pub serial: u32,
}

/// The zone's SOA record's data: `ns.dns.<zone>. hostmaster.<zone>.` (the specification),
/// CoreDNS's refresh, retry and expire, and the negative TTL as MINIMUM (RFC 2308 §4: the
/// TTL of negative answers).
fn soa_data(s: &Settings) -> String {
    format!(
        "SOA ns.dns.{ZONE}. hostmaster.{ZONE}. {} 7200 1800 86400 {}",
        s.serial, s.negative_ttl
    )
}

/// A TTL as the client must see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ttl {
    /// The zone's: exactly this.
    Exact(u32),
    /// An upstream's answer, served from the cache: its TTL counting down, at most this (and
    /// not more than [`COUNTDOWN_SLACK`] seconds less, in a test this short).
    CountingDown(u32),
}

pub const COUNTDOWN_SLACK: u32 = 10;

impl Ttl {
    pub fn admits(&self, ttl: u32) -> bool {
        match *self {
            Ttl::Exact(t) => ttl == t,
            Ttl::CountingDown(max) => ttl <= max && ttl + COUNTDOWN_SLACK >= max,
        }
    }
}

/// One resource record: owner (lowercase, dotted, trailing dot), TTL, "TYPE rdata".
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rec {
    pub owner: String,
    pub data: String,
    pub ttl: Ttl,
}

impl Rec {
    pub fn exact(owner: &str, ttl: u32, data: &str) -> Self {
        Self {
            owner: owner.to_string(),
            data: data.to_string(),
            ttl: Ttl::Exact(ttl),
        }
    }
}

/// Records of one RRset at `owner`, with the zone's TTL; the SOA record's is the negative TTL
/// (its TTL and MINIMUM are what negative answers are cached for, RFC 2308 §3).
fn records(owner: &str, data: &BTreeSet<String>, s: &Settings) -> Vec<Rec> {
    data.iter()
        .map(|d| {
            let ttl = if d.starts_with("SOA ") {
                s.negative_ttl
            } else {
                s.ttl
            };
            Rec::exact(owner, ttl, d)
        })
        .collect()
}

/// The answer of a name of the zone (data or missing).
fn zone_answer(owner: &str, node: &Node, qtype: u16, s: &Settings) -> Expected {
    match node {
        Node::Missing => Expected::negative(3, s),
        Node::Data(rr) => match rr.get(&qtype) {
            Some((answers, additional)) if qtype != 255 => Expected::positive(
                records(owner, answers, s),
                additional
                    .iter()
                    .map(|line| {
                        let (owner, data) = line.split_once(' ').expect("owner then data");
                        Rec::exact(owner, s.ttl, data)
                    })
                    .collect(),
            ),
            _ => Expected::negative(0, s),
        },
        _ => unreachable!(),
    }
}

/// The expected reply, every section whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    pub rcode: u16,
    pub answer: Vec<Rec>,
    pub authority: Vec<Rec>,
    /// The additional section without the OPT record.
    pub additional: Vec<Rec>,
    pub authoritative: bool,
    /// The kernel answers this one (when it fits the client's limit).
    pub kernel: bool,
}

impl Expected {
    fn positive(answer: Vec<Rec>, additional: Vec<Rec>) -> Self {
        Self {
            rcode: 0,
            answer,
            authority: Vec::new(),
            additional,
            authoritative: true,
            kernel: true,
        }
    }

    /// NXDOMAIN or NODATA: the zone's SOA in the authority section.
    fn negative(rcode: u16, s: &Settings) -> Self {
        Self {
            rcode,
            answer: Vec::new(),
            authority: vec![Rec::exact(
                &format!("{ZONE}."),
                s.negative_ttl,
                &soa_data(s),
            )],
            additional: Vec::new(),
            authoritative: true,
            kernel: true,
        }
    }

    /// What the test upstream (`upstream::example_zone`) answers: A records with TTL 300
    /// below `example.`, NXDOMAIN without an SOA elsewhere.
    fn forwarded(qname: &str, qtype: u16) -> Self {
        let mut e = Self {
            rcode: 0,
            answer: Vec::new(),
            authority: Vec::new(),
            additional: Vec::new(),
            authoritative: false,
            kernel: false,
        };
        if qname.ends_with("example.") {
            if qtype == 1 {
                let labels = qname.trim_end_matches('.').split('.').count();
                e.answer.push(Rec {
                    owner: qname.to_string(),
                    data: format!("A 203.0.113.{labels}"),
                    ttl: Ttl::CountingDown(300),
                });
            }
        } else {
            e.rcode = 3;
        }
        e
    }
}
