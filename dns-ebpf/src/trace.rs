//! `dns-agent trace`: one event per DNS packet, written to a ring buffer only while a tracer
//! has set the flag in `XDNS_TRACE_CTL`. A normal run pays one array lookup and one compare per
//! packet; everything below that check runs only while someone listens.
//!
//! The event is put together after the verdict, from what is still there: the addresses and
//! ports are read again from the frame (an answered one has them swapped; swapped back here),
//! the name from the lookup key in scratch memory. The key is only this packet's when the
//! program got as far as the lookup, which the counter tells; otherwise the event has no name.

use aya_ebpf::{
    bindings::{xdp_action, xdp_md},
    macros::map,
    maps::{Array, RingBuf},
    programs::XdpContext,
};
use dns_common::{
    TRACE_FAMILY_NONE, TRACE_FAMILY_V4, TRACE_FAMILY_V6, TRACE_ON, TRACE_RING_BYTES, TraceControl,
    TraceEvent, counter,
};

use crate::{
    Outcome,
    maps::{KEY_WORDS, Scratch},
    packet::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPV4_HLEN, IPV6_HLEN, at, ptr_at, read_be16},
};

#[map(name = "XDNS_TRACE_CTL")]
pub static TRACE_CONTROL: Array<TraceControl> = Array::with_max_entries(1, 0);

#[map(name = "XDNS_TRACE_EVT")]
pub static TRACE_EVENTS: RingBuf = RingBuf::with_byte_size(TRACE_RING_BYTES, 0);

/// Is a tracer listening for packets of this interface?
#[inline(always)]
pub fn wanted(ctx: &XdpContext) -> bool {
    let Some(c) = TRACE_CONTROL.get_ptr(0) else {
        return false;
    };
    // SAFETY: array map values live as long as the map.
    let c = unsafe { &*c };
    c.enabled == TRACE_ON && (c.ifindex == 0 || c.ifindex as usize == ctx.ingress_ifindex())
}

/// The counters that mean the lookup key in scratch memory is this packet's.
#[inline(always)]
fn key_is_this_packets(c: u32) -> bool {
    matches!(
        c,
        counter::ANSWERED
            | counter::ANSWERED_NODATA
            | counter::ANSWERED_NXDOMAIN
            | counter::PASS_MISS
            | counter::PASS_USERSPACE
            | counter::PASS_TOO_BIG
            | counter::PASS_EXPIRED
            | counter::PASS_NO_ROOM
            | counter::ERROR_WRITE
            | counter::ANSWERED_CACHED
            | counter::ANSWERED_AUTOPATH
            | counter::PASS_AUTOPATH
            | counter::PASS_RACE
    )
}

/// Writes the event of one packet; a full ring buffer loses the event, never the packet.
/// A function of its own (a BPF-to-BPF call): the packet path's code and registers stay as
/// they are without a tracer, and the verifier checks this once, apart from the pipeline.
#[inline(never)]
pub fn emit(ctx: *mut xdp_md, action: u32, reason: u32, scratch: *const Scratch) {
    let ctx = XdpContext::new(ctx);
    let ctx = &ctx;
    let outcome = Outcome {
        action,
        counter: reason,
    };
    let outcome = &outcome;
    if outcome.counter == counter::PASS_NOT_DNS {
        return;
    }
    let Some(mut entry) = TRACE_EVENTS.reserve::<TraceEvent>(0) else {
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: the reserved record is ours until submitted; every field is written below
    // (the key only where it is this packet's, else zeroed), so nothing stale leaves.
    unsafe {
        (*e).ifindex = ctx.ingress_ifindex() as u32;
        (*e).action = outcome.action;
        (*e).counter = outcome.counter;
        (*e)._pad = [0; 3];
        (*e)._pad2 = [0; 4];
        addresses(ctx, outcome.action == xdp_action::XDP_TX, &mut *e);
        let words = (&raw mut (*e).key).cast::<u64>();
        let from = if key_is_this_packets(outcome.counter) && !scratch.is_null() {
            let len = (*scratch).name_len();
            (*e).name_len = len as u16;
            // The question type follows the name in the question as loaded.
            (*e).qtype =
                u16::from_be_bytes([at(&(*scratch).raw, len), at(&(*scratch).raw, len + 1)]);
            (&raw const (*scratch).key).cast::<u64>()
        } else {
            (*e).name_len = 0;
            (*e).qtype = 0;
            core::ptr::null()
        };
        // Word copies: a plain struct copy of this size becomes a `memcpy` call.
        let mut w = 0;
        while w < KEY_WORDS {
            let v = if from.is_null() {
                0
            } else {
                from.add(w).read_volatile()
            };
            words.add(w).write_volatile(v);
            w += 1;
        }
    }
    entry.submit(0);
}

/// The querier's and the listen address's addresses and ports, as the query carried them.
#[inline(always)]
fn addresses(ctx: &XdpContext, answered: bool, e: &mut TraceEvent) {
    e.family = TRACE_FAMILY_NONE;
    e.client = [0; 16];
    e.server = [0; 16];
    e.client_port = 0;
    e.server_port = 0;
    let l4 = match read_be16(ctx, 12) {
        Some(ETH_P_IP) => {
            let Some(ip) = ptr_at::<[u8; IPV4_HLEN]>(ctx, ETH_HLEN) else {
                return;
            };
            // SAFETY: bounds checked by ptr_at.
            let ip = unsafe { &*ip };
            // The program only answers option-less IPv4: with options the ports are elsewhere.
            if ip[0] != 0x45 {
                return;
            }
            e.family = TRACE_FAMILY_V4;
            e.client[..4].copy_from_slice(&ip[12..16]);
            e.server[..4].copy_from_slice(&ip[16..20]);
            ETH_HLEN + IPV4_HLEN
        }
        Some(ETH_P_IPV6) => {
            let Some(ip) = ptr_at::<[u8; IPV6_HLEN]>(ctx, ETH_HLEN) else {
                return;
            };
            // SAFETY: bounds checked by ptr_at.
            let ip = unsafe { &*ip };
            e.family = TRACE_FAMILY_V6;
            e.client.copy_from_slice(&ip[8..24]);
            e.server.copy_from_slice(&ip[24..40]);
            ETH_HLEN + IPV6_HLEN
        }
        _ => return,
    };
    let sport = read_be16(ctx, l4).unwrap_or(0);
    let dport = read_be16(ctx, l4 + 2).unwrap_or(0);
    e.client_port = sport;
    e.server_port = dport;
    if answered {
        core::mem::swap(&mut e.client, &mut e.server);
        core::mem::swap(&mut e.client_port, &mut e.server_port);
    }
}
