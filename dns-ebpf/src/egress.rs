//! The tc egress program on the interfaces the XDP program serves: a reply from the agent's
//! listen address to a client whose query was steered there from an intercepted address gets
//! the intercepted address back as its source, so the client sees the reply come from the
//! address it asked. Everything else leaves untouched.
//!
//! It runs after netfilter, so the node's connection tracking saw the query and its reply as
//! one flow between the client and the listen address. The checksum helpers know whether the
//! kernel still has to complete the UDP checksum (checksum offload) and update it either way.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_UNSPEC},
    helpers::generated::bpf_csum_diff,
    macros::classifier,
    programs::TcContext,
};
use dns_common::{FlowKey, counter};

use crate::{
    addrs::{has_v4, has_v6},
    maps::{self, CONFIG, FLOWS},
    packet::{DNS_PORT, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_UDP, IPV4_HLEN, IPV6_HLEN},
};

/// Offsets in the frame.
const IP4_CHECK: usize = ETH_HLEN + 10;
const IP4_SRC: usize = ETH_HLEN + 12;
const IP6_SRC: usize = ETH_HLEN + 8;

#[classifier]
pub fn xdns_egress(ctx: TcContext) -> i32 {
    if restore(&ctx).is_some() {
        maps::count(counter::EGRESS_RESTORED);
    }
    // "No verdict": the next program on the interface (a CNI's) still runs.
    TC_ACT_UNSPEC
}

#[inline(always)]
// The key by reference: by value it would be copied again for the lookup.
#[allow(clippy::needless_borrows_for_generic_args)]
fn restore(ctx: &TcContext) -> Option<()> {
    // SAFETY: array map values live as long as the map.
    let config = unsafe { &*CONFIG.get_ptr(0)? };
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    if ethertype == ETH_P_IP {
        let ip = ctx.load::<[u8; IPV4_HLEN]>(ETH_HLEN).ok()?;
        if ip[0] != 0x45 || ip[9] != IPPROTO_UDP {
            return None;
        }
        let l4 = ETH_HLEN + IPV4_HLEN;
        let ports = ctx.load::<[u8; 4]>(l4).ok()?;
        let src = [ip[12], ip[13], ip[14], ip[15]];
        if u16::from_be_bytes([ports[0], ports[1]]) != DNS_PORT || !has_v4(&config.listen_v4, src) {
            return None;
        }
        let mut key = FlowKey {
            client: [0; 16],
            port: [ports[2], ports[3]],
            family: 4,
            _pad: 0,
        };
        key.client[..4].copy_from_slice(&[ip[16], ip[17], ip[18], ip[19]]);
        // SAFETY: LRU values stay valid for the program run; copied at once.
        let flow = unsafe { *FLOWS.get_ptr(&key)? };
        if flow.listen[..4] != src {
            return None;
        }
        let from = u32::from_ne_bytes(src);
        let to = u32::from_ne_bytes([
            flow.intercepted[0],
            flow.intercepted[1],
            flow.intercepted[2],
            flow.intercepted[3],
        ]);
        let udp_check = l4 + 6;
        ctx.l4_csum_replace(
            udp_check,
            from as u64,
            to as u64,
            (BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0) as u64 | 4,
        )
        .ok()?;
        ctx.l3_csum_replace(IP4_CHECK, from as u64, to as u64, 4)
            .ok()?;
        ctx.store(IP4_SRC, &to, 0).ok()?;
        Some(())
    } else if ethertype == ETH_P_IPV6 {
        let ip = ctx.load::<[u8; IPV6_HLEN]>(ETH_HLEN).ok()?;
        if ip[6] != IPPROTO_UDP {
            return None;
        }
        let l4 = ETH_HLEN + IPV6_HLEN;
        let ports = ctx.load::<[u8; 4]>(l4).ok()?;
        let mut src = [0u8; 16];
        src.copy_from_slice(&ip[8..24]);
        if u16::from_be_bytes([ports[0], ports[1]]) != DNS_PORT || !has_v6(&config.listen_v6, &src)
        {
            return None;
        }
        let mut key = FlowKey {
            client: [0; 16],
            port: [ports[2], ports[3]],
            family: 6,
            _pad: 0,
        };
        key.client.copy_from_slice(&ip[24..40]);
        // SAFETY: LRU values stay valid for the program run; copied at once.
        let mut flow = unsafe { *FLOWS.get_ptr(&key)? };
        if flow.listen != src {
            return None;
        }
        // The checksum difference of the whole address, then one update of the UDP checksum.
        // SAFETY: both buffers hold 16 bytes.
        let diff = unsafe {
            bpf_csum_diff(
                src.as_mut_ptr().cast(),
                16,
                flow.intercepted.as_mut_ptr().cast(),
                16,
                0,
            )
        };
        if diff < 0 {
            return None;
        }
        ctx.l4_csum_replace(l4 + 6, 0, diff as u64, BPF_F_PSEUDO_HDR as u64)
            .ok()?;
        ctx.store(IP6_SRC, &flow.intercepted, 0).ok()?;
        Some(())
    } else {
        None
    }
}
