//! Hand-built Ethernet frames for BPF_PROG_TEST_RUN, and checks of the frames the program
//! sends back.

use std::net::IpAddr;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const CLIENT_PORT: u16 = 40_000;

fn fold(mut s: u64) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn sum(bytes: &[u8]) -> u64 {
    bytes
        .chunks(2)
        .map(|c| u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

/// The UDP checksum of `udp` (header with a zero checksum field, then payload).
pub fn udp_checksum(src: IpAddr, dst: IpAddr, udp: &[u8]) -> u16 {
    let mut s = match (src, dst) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            sum(&a.octets()) + sum(&b.octets()) + 17 + udp.len() as u64
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            sum(&a.octets()) + sum(&b.octets()) + 17 + udp.len() as u64
        }
        _ => panic!("mixed families"),
    };
    s += sum(udp);
    let c = !fold(s);
    if c == 0 { 0xffff } else { c }
}

/// The IPv4 header checksum of `header` (its checksum field zero).
pub fn ipv4_checksum(header: &[u8]) -> u16 {
    !fold(sum(header))
}

/// Ethernet + IP + UDP around `payload`, with correct checksums.
pub fn udp_frame(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut udp = Vec::with_capacity(8 + payload.len());
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let c = udp_checksum(src, dst, &udp);
    udp[6..8].copy_from_slice(&c.to_be_bytes());

    let mut f = Vec::new();
    f.extend_from_slice(&NODE_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut ip = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0];
            ip[2..4].copy_from_slice(&((20 + udp.len()) as u16).to_be_bytes());
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let c = !fold(sum(&ip));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend_from_slice(&0x86ddu16.to_be_bytes());
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend_from_slice(&(udp.len() as u16).to_be_bytes());
            ip.extend_from_slice(&[17, 64]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            f.extend_from_slice(&ip);
        }
        _ => panic!("mixed families"),
    }
    f.extend_from_slice(&udp);
    f
}

/// A query frame from the client to `server`.
pub fn query_frame(client: IpAddr, server: IpAddr, dns: &[u8]) -> Vec<u8> {
    udp_frame(client, server, CLIENT_PORT, 53, dns)
}

/// A DNS query with the name spelled exactly as given (case kept).
pub fn dns_query(id: u16, name: &str, qtype: u16, edns: Option<(u16, u8, bool)>) -> Vec<u8> {
    let mut m = vec![0, 0, 0x01, 0x20, 0, 1, 0, 0, 0, 0, 0, edns.is_some() as u8];
    m[0..2].copy_from_slice(&id.to_be_bytes());
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    if let Some((size, version, dnssec_ok)) = edns {
        m.extend_from_slice(&[0, 0, 41]);
        m.extend_from_slice(&size.to_be_bytes());
        m.extend_from_slice(&[0, version, if dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
    }
    m
}

/// What a reply frame says, after its headers were checked.
#[derive(Debug)]
pub struct Reply {
    pub dns: Vec<u8>,
}

/// Checks the headers of a frame the program sent back for `query` (addresses, ports and
/// MACs swapped, lengths, IPv4 and UDP checksums) and returns its DNS payload.
pub fn check_reply(query: &[u8], reply: &[u8]) -> Reply {
    assert_eq!(reply[0..6], query[6..12], "destination MAC is the client's");
    assert_eq!(reply[6..12], query[0..6], "source MAC is the node's");
    let v6 = u16::from_be_bytes([query[12], query[13]]) == 0x86dd;
    let (l4, src, dst) = if v6 {
        let ip = &reply[14..54];
        assert_eq!(ip[0] >> 4, 6);
        assert_eq!(
            ip[8..24],
            query[14 + 24..14 + 40],
            "IPv6 source is the server"
        );
        assert_eq!(
            ip[24..40],
            query[14 + 8..14 + 24],
            "IPv6 destination is the client"
        );
        let payload = u16::from_be_bytes([ip[4], ip[5]]) as usize;
        assert_eq!(54 + payload, reply.len(), "IPv6 payload length");
        let s: [u8; 16] = ip[8..24].try_into().unwrap();
        let d: [u8; 16] = ip[24..40].try_into().unwrap();
        (54, IpAddr::from(s), IpAddr::from(d))
    } else {
        let ip = &reply[14..34];
        assert_eq!(ip[0], 0x45);
        assert_eq!(fold(sum(ip)), 0xffff, "IPv4 header checksum");
        assert_eq!(
            ip[12..16],
            query[14 + 16..14 + 20],
            "IPv4 source is the server"
        );
        assert_eq!(
            ip[16..20],
            query[14 + 12..14 + 16],
            "IPv4 destination is the client"
        );
        let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        assert_eq!(14 + total, reply.len(), "IPv4 total length");
        let s: [u8; 4] = ip[12..16].try_into().unwrap();
        let d: [u8; 4] = ip[16..20].try_into().unwrap();
        (34, IpAddr::from(s), IpAddr::from(d))
    };
    let udp = &reply[l4..];
    assert_eq!(udp[0..2], query[l4 + 2..l4 + 4], "source port 53");
    assert_eq!(
        udp[2..4],
        query[l4..l4 + 2],
        "destination port is the client's"
    );
    assert_eq!(
        u16::from_be_bytes([udp[4], udp[5]]) as usize,
        udp.len(),
        "UDP length"
    );
    let mut zeroed = udp.to_vec();
    zeroed[6..8].copy_from_slice(&[0, 0]);
    assert_eq!(
        u16::from_be_bytes([udp[6], udp[7]]),
        udp_checksum(src, dst, &zeroed),
        "UDP checksum"
    );
    Reply {
        dns: udp[8..].to_vec(),
    }
}
