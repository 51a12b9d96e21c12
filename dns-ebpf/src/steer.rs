//! Intercepted addresses (the kube-dns Service's cluster IPs): what the kernel does not answer
//! goes to the agent while it answers, and untouched to the cluster's DNS Service — through the
//! node's own Service proxy, as if xdns were not there — when it does not.
//!
//! Steering rewrites the destination to the agent's listen address of the same family and
//! records the flow; the egress program (`egress.rs`) gives the reply the intercepted address
//! back as its source. The agent counts as answering while its heartbeat is fresh and its
//! socket is bound: a killed agent's socket is gone at once, a stopped one's heartbeat within
//! [`dns_common::DEFAULT_STALE_AFTER_NS`].

use aya_ebpf::{
    bindings::BPF_F_CURRENT_NETNS,
    helpers::generated::{bpf_ktime_get_coarse_ns, bpf_sk_lookup_udp, bpf_sk_release},
    programs::XdpContext,
};
use dns_common::{FlowKey, FlowValue, ZoneConfig, counter};

use crate::{
    csum,
    maps::{self, CONFIG, FLOWS, LIVENESS, SCRATCH, Scratch},
    packet::{
        DNS_PORT, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_UDP, IPV4_HLEN, IPV6_HLEN, ptr_at,
        read_be16,
    },
};

/// What the agent's heartbeat says.
pub struct Liveness {
    /// It answers: queries it must answer may be steered to it.
    pub fresh: bool,
    /// Its maps may still be served: it answered within the grace period.
    pub in_grace: bool,
}

#[inline(always)]
pub fn liveness(config: &ZoneConfig) -> Liveness {
    let beat = match LIVENESS.get_ptr(0) {
        // SAFETY: array values live as long as the map; the agent writes the heartbeat with one
        // aligned 8-byte store, so a read sees the old value or the new.
        Some(l) => unsafe { core::ptr::read_volatile(&(*l).heartbeat_ns) },
        None => 0,
    };
    if beat == 0 {
        return Liveness {
            fresh: false,
            in_grace: false,
        };
    }
    // Every query asks, so the cheap clock: CLOCK_MONOTONIC as of the last timer tick (a few
    // memory reads; the precise clock costs about 45 ns a read in a VM). The heartbeat is on
    // the same clock and may be up to a tick ahead of it (age 0); the thresholds are hundreds of
    // milliseconds and up.
    // SAFETY: a helper without arguments.
    let age = unsafe { bpf_ktime_get_coarse_ns() }.saturating_sub(beat);
    Liveness {
        fresh: age <= config.stale_after_ns,
        in_grace: age <= config.grace_ns,
    }
}

/// A query to an intercepted address the kernel did not answer: steered to the agent if it
/// answers, else left untouched for the Service. Reads what it needs from the packet again
/// (its layers were checked on the way in, and nothing has changed them).
#[inline(always)]
pub fn steer_or_leave(ctx: &XdpContext) {
    let steered = CONFIG.get_ptr(0).is_some_and(|config| {
        // SAFETY: array map values live as long as the map.
        let config = unsafe { &*config };
        liveness(config).fresh
            && match read_be16(ctx, 12) {
                Some(ETH_P_IP) => steer_v4(ctx, config).is_some(),
                Some(ETH_P_IPV6) => steer_v6(ctx, config).is_some(),
                _ => false,
            }
    });
    maps::count(if steered {
        counter::STEERED
    } else {
        counter::LEFT_TO_SERVICE
    });
}

#[inline(always)]
// The flow's key and value live in scratch memory to spare the stack; by value they would be
// copied onto it.
#[allow(clippy::needless_borrows_for_generic_args)]
fn steer_v4(ctx: &XdpContext, config: &ZoneConfig) -> Option<()> {
    let listen = config.listen_v4[0];
    if listen == [0; 4] {
        return None;
    }
    let s = scratch()?;
    let ip = ptr_at::<[u8; 20]>(ctx, ETH_HLEN)?;
    let udp = ptr_at::<[u8; 8]>(ctx, ETH_HLEN + IPV4_HLEN)?;
    // SAFETY: bounds checked by ptr_at.
    let (ip, udp) = unsafe { (&mut *ip, &mut *udp) };
    if ip[0] != 0x45 || ip[9] != IPPROTO_UDP {
        return None;
    }
    let intercepted = [ip[16], ip[17], ip[18], ip[19]];
    s.flow_key = FlowKey {
        client: [0; 16],
        port: [udp[0], udp[1]],
        family: 4,
        _pad: 0,
    };
    s.flow_key.client[..4].copy_from_slice(&ip[12..16]);
    // SAFETY: the union's IPv4 member, written whole.
    unsafe {
        let t = &mut s.tuple.__bindgen_anon_1.ipv4;
        t.saddr = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
        t.daddr = u32::from_ne_bytes(listen);
        t.sport = u16::from_ne_bytes([udp[0], udp[1]]);
        t.dport = DNS_PORT.to_be();
    }
    if !agent_socket(ctx, s, 12) {
        return None;
    }
    s.flow_value = FlowValue {
        intercepted: [0; 16],
        listen: [0; 16],
    };
    s.flow_value.intercepted[..4].copy_from_slice(&intercepted);
    s.flow_value.listen[..4].copy_from_slice(&listen);
    FLOWS.insert(&s.flow_key, &s.flow_value, 0).ok()?;

    // The destination, and both checksums over it (RFC 1624). A zero UDP checksum means
    // "none" in IPv4 and stays zero.
    let ip_check = u16::from_be_bytes([ip[10], ip[11]]);
    ip[10..12].copy_from_slice(&csum::replace(ip_check, &intercepted, &listen).to_be_bytes());
    let udp_check = u16::from_be_bytes([udp[6], udp[7]]);
    if udp_check != 0 {
        udp[6..8].copy_from_slice(&udp_replace(udp_check, &intercepted, &listen).to_be_bytes());
    }
    ip[16..20].copy_from_slice(&listen);
    Some(())
}

#[inline(always)]
#[allow(clippy::needless_borrows_for_generic_args)]
fn steer_v6(ctx: &XdpContext, config: &ZoneConfig) -> Option<()> {
    let listen = &config.listen_v6[0];
    if *listen == [0; 16] {
        return None;
    }
    let s = scratch()?;
    let ip = ptr_at::<[u8; 40]>(ctx, ETH_HLEN)?;
    let udp = ptr_at::<[u8; 8]>(ctx, ETH_HLEN + IPV6_HLEN)?;
    // SAFETY: bounds checked by ptr_at.
    let (ip, udp) = unsafe { (&mut *ip, &mut *udp) };
    if ip[6] != IPPROTO_UDP {
        return None;
    }
    s.flow_key.client.copy_from_slice(&ip[8..24]);
    s.flow_key.port = [udp[0], udp[1]];
    s.flow_key.family = 6;
    s.flow_key._pad = 0;
    s.flow_value.intercepted.copy_from_slice(&ip[24..40]);
    s.flow_value.listen = *listen;
    // SAFETY: the union's IPv6 member, written whole.
    unsafe {
        let t = &mut s.tuple.__bindgen_anon_1.ipv6;
        let mut i = 0;
        while i < 4 {
            let w = |a: &[u8], i: usize| {
                u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]])
            };
            t.saddr[i] = w(&s.flow_key.client, i);
            t.daddr[i] = w(listen, i);
            i += 1;
        }
        t.sport = u16::from_ne_bytes([udp[0], udp[1]]);
        t.dport = DNS_PORT.to_be();
    }
    if !agent_socket(ctx, s, 36) {
        return None;
    }
    FLOWS.insert(&s.flow_key, &s.flow_value, 0).ok()?;

    let udp_check = u16::from_be_bytes([udp[6], udp[7]]);
    udp[6..8]
        .copy_from_slice(&udp_replace(udp_check, &s.flow_value.intercepted, listen).to_be_bytes());
    ip[24..40].copy_from_slice(listen);
    Some(())
}

/// A UDP checksum over a changed address: zero is "none", so a computed zero is sent as
/// all ones (RFC 768).
#[inline(always)]
fn udp_replace<const N: usize>(check: u16, old: &[u8; N], new: &[u8; N]) -> u16 {
    match csum::replace(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

#[inline(always)]
fn scratch() -> Option<&'static mut Scratch> {
    let s = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU scratch, not shared with any other program run.
    Some(unsafe { &mut *s })
}

/// Is a socket of this network namespace bound where the query would be steered? A killed
/// agent's sockets close with it: its queries go to the cluster's DNS Service at once, without
/// waiting for its heartbeat to age.
#[inline(always)]
fn agent_socket(ctx: &XdpContext, s: &mut Scratch, size: u32) -> bool {
    // SAFETY: the tuple lives in scratch memory; the returned reference is released below.
    let sk = unsafe {
        bpf_sk_lookup_udp(
            ctx.ctx.cast(),
            &mut s.tuple,
            size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a socket the lookup returned, released once.
    unsafe { bpf_sk_release(sk.cast()) };
    true
}
