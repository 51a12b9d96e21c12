//! Ethernet, IPv4/IPv6 and UDP: is this frame a UDP datagram to a listen or an intercepted
//! address on port 53, and where does its DNS message start?

use aya_ebpf::programs::XdpContext;
use dns_common::{MAX_KERNEL_QUERY, ZoneConfig, counter};

use crate::{
    Outcome,
    addrs::{has_v4, has_v6},
    csum,
    packet::{
        DNS_HLEN, DNS_PORT, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_UDP, IPV4_HLEN, IPV6_HLEN,
        UDP_HLEN, ptr_at, read_be16,
    },
    pass,
};

/// Where the layers of a query start, and what the checksum needs of its addresses.
pub struct Layers {
    pub ipv6: bool,
    /// Offset of the UDP header.
    pub l4: usize,
    /// Length of the DNS message per the UDP header.
    pub dns_len: usize,
    /// Partial sum of the source and destination addresses (unchanged by swapping them).
    pub addr_sum: u32,
    /// Sent to an intercepted address (not a listen address): what the kernel does not answer
    /// is steered to the agent while it is alive, else left to the cluster's DNS Service.
    pub intercepted: bool,
}

/// Ethernet, IP and UDP: is this a UDP packet for a listen or an intercepted address on port
/// 53?
#[inline(always)]
pub fn parse(ctx: &XdpContext, config: &ZoneConfig) -> Result<Layers, Outcome> {
    let not_dns = pass(counter::PASS_NOT_DNS);
    let unsupported = pass(counter::PASS_UNSUPPORTED);
    let malformed = pass(counter::PASS_MALFORMED);

    // VLAN-tagged frames land here too: their ethertype is 0x8100, not ours.
    let ethertype = read_be16(ctx, 12).ok_or(pass(counter::PASS_NOT_DNS))?;
    let frame_len = ctx.data_end() - ctx.data();
    let mut intercepted = false;

    let (ipv6, l4, ip_payload_len, addr_sum) = if ethertype == ETH_P_IP {
        let ip = ptr_at::<[u8; IPV4_HLEN]>(ctx, ETH_HLEN).ok_or(pass(counter::PASS_NOT_DNS))?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        if ip[9] != IPPROTO_UDP {
            return Err(not_dns);
        }
        let dst = [ip[16], ip[17], ip[18], ip[19]];
        if !has_v4(&config.listen_v4, dst) {
            if !has_v4(&config.intercept_v4, dst) {
                return Err(not_dns);
            }
            intercepted = true;
        }
        if ip[0] >> 4 != 4 {
            return Err(malformed);
        }
        // Options (IHL > 5) could ask for source routing or recording: not ours to reflect.
        if ip[0] & 0x0f != 5 {
            return Err(unsupported);
        }
        // Fragments: the DNS message is not all here.
        let frag = u16::from_be_bytes([ip[6], ip[7]]);
        if frag & 0x3fff != 0 {
            return Err(unsupported);
        }
        // A header whose checksum is wrong never reaches the agent (the stack drops it, RFC
        // 791): answering it would answer what userspace never sees.
        if csum::fold(csum::words(ip, 0, IPV4_HLEN)) != 0xffff {
            return Err(malformed);
        }
        let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        if total < IPV4_HLEN || ETH_HLEN + total > frame_len {
            return Err(malformed);
        }
        let sum = csum::words(ip, 12, 20);
        (false, ETH_HLEN + IPV4_HLEN, total - IPV4_HLEN, sum)
    } else if ethertype == ETH_P_IPV6 {
        let ip = ptr_at::<[u8; IPV6_HLEN]>(ctx, ETH_HLEN).ok_or(pass(counter::PASS_NOT_DNS))?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        let mut dst = [0u8; 16];
        dst.copy_from_slice(&ip[24..40]);
        if !has_v6(&config.listen_v6, &dst) {
            if !has_v6(&config.intercept_v6, &dst) {
                return Err(not_dns);
            }
            intercepted = true;
        }
        let next = ip[6];
        if next != IPPROTO_UDP {
            // Extension headers: perhaps a query for us, but outside the kernel's rules.
            if matches!(next, 0 | 43 | 44 | 50 | 51 | 60 | 135) {
                return Err(unsupported);
            }
            return Err(not_dns);
        }
        if ip[0] >> 4 != 6 {
            return Err(malformed);
        }
        let payload = u16::from_be_bytes([ip[4], ip[5]]) as usize;
        if ETH_HLEN + IPV6_HLEN + payload > frame_len {
            return Err(malformed);
        }
        let sum = csum::words(ip, 8, 40);
        (true, ETH_HLEN + IPV6_HLEN, payload, sum)
    } else {
        return Err(not_dns);
    };

    let udp = ptr_at::<[u8; UDP_HLEN]>(ctx, l4).ok_or(pass(counter::PASS_NOT_DNS))?;
    // SAFETY: bounds checked by ptr_at.
    let udp = unsafe { &*udp };
    if u16::from_be_bytes([udp[2], udp[3]]) != DNS_PORT {
        return Err(not_dns);
    }
    // A reply to port 0 cannot be delivered.
    if u16::from_be_bytes([udp[0], udp[1]]) == 0 {
        return Err(unsupported);
    }
    let udp_len = u16::from_be_bytes([udp[4], udp[5]]) as usize;
    // Bytes after the UDP datagram inside the IP packet are not part of any DNS message.
    if udp_len != ip_payload_len || udp_len < UDP_HLEN + DNS_HLEN {
        return Err(malformed);
    }
    if udp_len > UDP_HLEN + MAX_KERNEL_QUERY {
        return Err(unsupported);
    }
    Ok(Layers {
        ipv6,
        l4,
        dns_len: udp_len - UDP_HLEN,
        addr_sum,
        intercepted,
    })
}
