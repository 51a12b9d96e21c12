//! Names in wire format and the Kubernetes DNS schema of query names.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::rr::Name;

/// A lowercased wire-format name (root label included), the form of kernel map keys.
pub type WireName = Vec<u8>;

/// Splits a wire-format name into its labels. `None` if malformed.
pub fn labels(wire: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        let len = *wire.get(i)? as usize;
        if len == 0 {
            return (i + 1 == wire.len()).then_some(out);
        }
        if len > dns_common::MAX_LABEL_LEN {
            return None;
        }
        out.push(wire.get(i + 1..i + 1 + len)?);
        i += 1 + len;
    }
}

/// Length of the wire-format name at the start of `raw` (root label included), for names
/// followed by padding.
pub fn labels_end(raw: &[u8]) -> usize {
    let mut i = 0;
    while let Some(&len) = raw.get(i) {
        if len == 0 {
            return i + 1;
        }
        i += 1 + len as usize;
    }
    raw.len()
}

/// Builds a wire-format name from labels (lowercasing them).
pub fn wire_from_labels<L: AsRef<[u8]>>(labels: &[L]) -> WireName {
    let mut out =
        Vec::with_capacity(labels.iter().map(|l| l.as_ref().len() + 1).sum::<usize>() + 1);
    for l in labels {
        let l = l.as_ref();
        out.push(l.len() as u8);
        out.extend(l.iter().map(u8::to_ascii_lowercase));
    }
    out.push(0);
    out
}

/// Wire form of a dotted name (`"cluster.local"`, trailing dot optional).
pub fn wire_from_dotted(name: &str) -> WireName {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return vec![0];
    }
    wire_from_labels(&name.split('.').collect::<Vec<_>>())
}

/// The hickory `Name` of a wire name.
pub fn to_name(wire: &[u8]) -> Name {
    let labels = labels(wire).expect("wire names built by this crate are well-formed");
    Name::from_labels(labels).expect("labels of a well-formed wire name")
}

/// Dotted text of a wire name, for logs and errors.
pub fn to_text(wire: &[u8]) -> String {
    match labels(wire) {
        Some(l) if l.is_empty() => ".".to_string(),
        Some(l) => {
            let mut s = l
                .iter()
                .map(|l| String::from_utf8_lossy(l))
                .collect::<Vec<_>>()
                .join(".");
            s.push('.');
            s
        }
        None => format!("<malformed name {wire:02x?}>"),
    }
}

/// The reverse-lookup name of an address: `4.3.2.1.in-addr.arpa.` or the full-nibble
/// `ip6.arpa.` form.
pub fn reverse_name(ip: IpAddr) -> WireName {
    let mut labels: Vec<String> = Vec::with_capacity(34);
    match ip {
        IpAddr::V4(v4) => {
            labels.extend(v4.octets().iter().rev().map(u8::to_string));
            labels.push("in-addr".into());
        }
        IpAddr::V6(v6) => {
            for b in v6.octets().iter().rev() {
                labels.push(format!("{:x}", b & 0xf));
                labels.push(format!("{:x}", b >> 4));
            }
            labels.push("ip6".into());
        }
    }
    labels.push("arpa".into());
    wire_from_labels(&labels)
}

/// A query name, placed in the schema of the cluster zone.
#[derive(Debug, PartialEq, Eq)]
pub enum QueryName<'a> {
    /// At or below the cluster zone.
    Zone(ZoneName<'a>),
    /// Below `in-addr.arpa.` or `ip6.arpa.`: the address when the name spells a whole one.
    Reverse(Option<IpAddr>),
    /// Anything else: forwarded upstream.
    Outside,
}

/// A name of the cluster zone, by its place in the Kubernetes DNS schema.
#[derive(Debug, PartialEq, Eq)]
pub enum ZoneName<'a> {
    Apex,
    /// `svc.<zone>`
    SvcApex,
    /// `pod.<zone>`
    PodApex,
    /// `dns-version.<zone>`
    DnsVersion,
    /// `ns.dns.<zone>`: the name server of the apex NS record.
    NsDns,
    /// `<ns>.svc.<zone>`
    SvcNamespace(&'a str),
    /// `<svc>.<ns>.svc.<zone>`
    Service {
        ns: &'a str,
        svc: &'a str,
    },
    /// `<endpoint>.<svc>.<ns>.svc.<zone>`
    Endpoint {
        ns: &'a str,
        svc: &'a str,
        endpoint: &'a str,
    },
    /// `_<port>._<proto>.<svc>.<ns>.svc.<zone>`
    PortProto {
        ns: &'a str,
        svc: &'a str,
        port: &'a str,
        proto: &'a str,
    },
    /// `<ns>.pod.<zone>`
    PodNamespace(&'a str),
    /// `<a-b-c-d>.<ns>.pod.<zone>`
    Pod {
        ns: &'a str,
        ip: IpAddr,
    },
    /// Not a name the schema has (too many labels, unknown form): NXDOMAIN.
    Invalid,
}

fn text(label: &[u8]) -> Option<&str> {
    std::str::from_utf8(label).ok()
}

/// Places `qname` (lowercased wire format) relative to `zone` (wire format).
pub fn classify<'a>(qname: &'a [u8], zone: &[u8]) -> QueryName<'a> {
    let Some(qlabels) = labels(qname) else {
        return QueryName::Outside;
    };
    let zlabels = labels(zone).unwrap_or_default();
    if qlabels.len() >= zlabels.len() && qlabels[qlabels.len() - zlabels.len()..] == zlabels[..] {
        let rel = &qlabels[..qlabels.len() - zlabels.len()];
        return QueryName::Zone(classify_zone(rel));
    }
    let n = qlabels.len();
    if n >= 2 && qlabels[n - 1] == b"arpa" {
        if qlabels[n - 2] == b"in-addr" {
            return QueryName::Reverse(parse_reverse_v4(&qlabels[..n - 2]));
        }
        if qlabels[n - 2] == b"ip6" {
            return QueryName::Reverse(parse_reverse_v6(&qlabels[..n - 2]));
        }
    }
    QueryName::Outside
}

fn classify_zone<'a>(rel: &[&'a [u8]]) -> ZoneName<'a> {
    use ZoneName::*;
    let Some(strs) = rel
        .iter()
        .map(|l| text(l))
        .collect::<Option<Vec<&'a str>>>()
    else {
        return Invalid;
    };
    match strs.as_slice() {
        [] => Apex,
        ["svc"] => SvcApex,
        ["pod"] => PodApex,
        ["dns-version"] => DnsVersion,
        ["ns", "dns"] => NsDns,
        [ns, "svc"] => SvcNamespace(ns),
        [svc, ns, "svc"] => Service { ns, svc },
        [endpoint, svc, ns, "svc"] => Endpoint { ns, svc, endpoint },
        [port, proto, svc, ns, "svc"] => match (port.strip_prefix('_'), proto.strip_prefix('_')) {
            (Some(port), Some(proto)) if !port.is_empty() && !proto.is_empty() => PortProto {
                ns,
                svc,
                port,
                proto,
            },
            _ => Invalid,
        },
        [ns, "pod"] => PodNamespace(ns),
        [pod, ns, "pod"] => match pod_ip(pod) {
            Some(ip) => Pod { ns, ip },
            None => Invalid,
        },
        _ => Invalid,
    }
}

/// CoreDNS's `pods insecure` form: `10-1-2-3` is 10.1.2.3; dashes stand for the colons of an
/// IPv6 address otherwise.
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

fn parse_reverse_v4(labels: &[&[u8]]) -> Option<IpAddr> {
    if labels.len() != 4 {
        return None;
    }
    let mut octets = [0u8; 4];
    for (i, l) in labels.iter().rev().enumerate() {
        let s = text(l)?;
        // Canonical decimal only: "010" or "+1" do not name an address.
        if s.is_empty() || s.len() > 3 || (s.len() > 1 && s.starts_with('0')) {
            return None;
        }
        if !s.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        octets[i] = s.parse().ok()?;
    }
    Some(IpAddr::V4(Ipv4Addr::from(octets)))
}

fn parse_reverse_v6(labels: &[&[u8]]) -> Option<IpAddr> {
    if labels.len() != 32 {
        return None;
    }
    let mut octets = [0u8; 16];
    for (i, l) in labels.iter().rev().enumerate() {
        let [c] = l else { return None };
        let nibble = (*c as char).to_digit(16)? as u8;
        if c.is_ascii_uppercase() {
            return None;
        }
        if i % 2 == 0 {
            octets[i / 2] |= nibble << 4;
        } else {
            octets[i / 2] |= nibble;
        }
    }
    Some(IpAddr::V6(Ipv6Addr::from(octets)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify_text(name: &str) -> String {
        let wire = wire_from_dotted(name);
        let zone = wire_from_dotted("cluster.local");
        format!("{:?}", classify(&wire, &zone))
    }

    #[test]
    fn schema() {
        assert_eq!(classify_text("cluster.local"), "Zone(Apex)");
        assert_eq!(classify_text("CLUSTER.local."), "Zone(Apex)");
        assert_eq!(classify_text("svc.cluster.local"), "Zone(SvcApex)");
        assert_eq!(
            classify_text("default.svc.cluster.local"),
            "Zone(SvcNamespace(\"default\"))"
        );
        assert_eq!(
            classify_text("kubernetes.default.svc.cluster.local"),
            "Zone(Service { ns: \"default\", svc: \"kubernetes\" })"
        );
        assert_eq!(
            classify_text("web-0.web.shop.svc.cluster.local"),
            "Zone(Endpoint { ns: \"shop\", svc: \"web\", endpoint: \"web-0\" })"
        );
        assert_eq!(
            classify_text("_http._tcp.web.shop.svc.cluster.local"),
            "Zone(PortProto { ns: \"shop\", svc: \"web\", port: \"http\", proto: \"tcp\" })"
        );
        // Search-path expansions have too many labels, or no underscore where SRV needs one.
        assert_eq!(
            classify_text("www.example.com.default.svc.cluster.local"),
            "Zone(Invalid)"
        );
        assert_eq!(
            classify_text("a.b.c.d.e.f.svc.cluster.local"),
            "Zone(Invalid)"
        );
        assert_eq!(
            classify_text("10-1-2-3.default.pod.cluster.local"),
            "Zone(Pod { ns: \"default\", ip: 10.1.2.3 })"
        );
        assert_eq!(
            classify_text("2001-db8--5.default.pod.cluster.local"),
            "Zone(Pod { ns: \"default\", ip: 2001:db8::5 })"
        );
        assert_eq!(
            classify_text("300-1-2-3.default.pod.cluster.local"),
            "Zone(Invalid)"
        );
        assert_eq!(classify_text("example.com"), "Outside");
        assert_eq!(classify_text("local"), "Outside");
    }

    #[test]
    fn reverse_names_round_trip() {
        for ip in ["10.96.0.1", "192.0.2.255", "2001:db8::1", "fd00:96::20"] {
            let ip: IpAddr = ip.parse().unwrap();
            let wire = reverse_name(ip);
            assert_eq!(
                classify(&wire, &wire_from_dotted("cluster.local")),
                QueryName::Reverse(Some(ip))
            );
        }
        assert_eq!(
            to_text(&reverse_name("10.96.0.1".parse().unwrap())),
            "1.0.96.10.in-addr.arpa."
        );
        let zone = wire_from_dotted("cluster.local");
        let partial = wire_from_dotted("96.10.in-addr.arpa");
        assert_eq!(classify(&partial, &zone), QueryName::Reverse(None));
        let leading_zero = wire_from_dotted("01.0.96.10.in-addr.arpa");
        assert_eq!(classify(&leading_zero, &zone), QueryName::Reverse(None));
    }

    #[test]
    fn labels_reject_malformed() {
        assert!(labels(&[3, b'a', b'b']).is_none());
        assert!(labels(&[1, b'a', 0, 0]).is_none());
        assert!(labels(&[0xc0, 0x0c]).is_none());
        assert_eq!(labels(&[1, b'a', 0]).unwrap(), vec![b"a".as_slice()]);
    }
}
