//! The benchmark's ceiling: an XDP program that does the least a node-local DNS answer needs
//! on the wire. For a UDP/IPv4 query to port 53 it swaps the MAC and IP addresses and the
//! ports, sets QR (so load generators count the echo as a reply) and sends the frame back with
//! `XDP_TX`. No lookup, no rewrite of the message: how close xdns comes to this program says
//! what its DNS work costs.
//!
//! The UDP checksum is set to zero ("none", valid for IPv4), the least work a valid reply
//! needs. Updating it incrementally is not enough: a query sent over a veth with checksum
//! offload carries only the pseudo-header sum, and in driver mode nothing completes it, so
//! the client's stack would drop the echo (`UdpInCsumErrors`). xdns computes the full
//! checksum from scratch, which is part of the DNS work the comparison shows.
//!
//! Also `xdns_pass`, which passes everything: on a veth in driver mode, `XDP_TX` frames from
//! the host side only arrive when the pod-side peer has an XDP program too (DESIGN.md).
//!
//! And the bench's load generator, both ends of it (`xtask/src/bench/xdpgen.rs`):
//! `xdns_gen_query` is run by `BPF_PROG_TEST_RUN` in live-frames mode on the pod side of a
//! veth and turns every frame it is given into the next query of `GEN_FRAMES` sent with
//! `XDP_TX`, so queries leave without a socket, a system call or a copy per packet;
//! `xdns_count_reply`, attached to the same pod-side interface, counts the replies by rcode
//! and drops them, so the client side costs little more than the wire. `xdns_drop` drops
//! everything: the sink that measures what the generator can send on its own.
//!
//! Loaded by `cargo xtask bench` from `target/bpfel-unknown-none/release/reflector`.
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_xdp_adjust_tail, bpf_xdp_store_bytes},
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPV4_HLEN: usize = 20;
const IPPROTO_UDP: u8 = 17;
const UDP_HLEN: usize = 8;
const DNS_PORT: u16 = 53;
const FLAG_QR: u8 = 0x80;

/// Bytes of one `GEN_FRAMES` slot: a 2-byte little-endian length, then the whole frame
/// (Ethernet, IPv4, UDP, DNS query). xtask writes them; keep in step with `xdpgen.rs`.
const GEN_SLOT: usize = 256;
const GEN_MAX_FRAMES: u32 = 4096;
/// Shortest frame the generator sends: Ethernet, IPv4, UDP and a DNS header.
const GEN_MIN_FRAME: usize = ETH_HLEN + IPV4_HLEN + UDP_HLEN + 12;
/// Length of the frame `BPF_PROG_TEST_RUN` hands the generator on every run (the kernel
/// resets it to the input's length each time): xtask passes a slot's worth of bytes.
const GEN_INPUT_LEN: usize = GEN_SLOT - 2;

/// `BENCH_COUNTS` indices (keep in step with `xdpgen.rs`): replies by what they say, and
/// queries sent.
const REPLY_NOERROR_ANSWER: u32 = 0;
const REPLY_NOERROR_EMPTY: u32 = 1;
const REPLY_NXDOMAIN: u32 = 2;
const REPLY_SERVFAIL: u32 = 3;
const REPLY_OTHER: u32 = 4;
const QUERIES_SENT: u32 = 5;
const BENCH_COUNTERS: u32 = 6;

#[map(name = "GEN_FRAMES")]
static GEN_FRAMES: Array<[u8; GEN_SLOT]> = Array::with_max_entries(GEN_MAX_FRAMES, 0);

/// [0]: how many `GEN_FRAMES` slots are in use.
#[map(name = "GEN_CONFIG")]
static GEN_CONFIG: Array<u32> = Array::with_max_entries(1, 0);

/// Per CPU, the next slot to send: each sender thread walks the whole set in order.
#[map(name = "GEN_CURSOR")]
static GEN_CURSOR: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "BENCH_COUNTS")]
static BENCH_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(BENCH_COUNTERS, 0);

#[xdp]
pub fn xdns_reflect(ctx: XdpContext) -> u32 {
    reflect(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

#[xdp]
pub fn xdns_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn xdns_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// Only ever run by `BPF_PROG_TEST_RUN` with `BPF_F_TEST_XDP_LIVE_FRAMES`, where `XDP_TX`
/// means "transmit out of the interface the frame was injected on". A frame it cannot
/// rewrite is dropped, and not counted as sent.
#[xdp]
pub fn xdns_gen_query(ctx: XdpContext) -> u32 {
    next_query(&ctx).unwrap_or(xdp_action::XDP_DROP)
}

/// Counts DNS replies (from port 53, QR set) by rcode and drops them; passes anything else.
#[xdp]
pub fn xdns_count_reply(ctx: XdpContext) -> u32 {
    match count_reply(&ctx) {
        Some(()) => xdp_action::XDP_DROP,
        None => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(c) = BENCH_COUNTS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn next_query(ctx: &XdpContext) -> Option<u32> {
    let in_use = *GEN_CONFIG.get(0)?;
    let cursor = GEN_CURSOR.get_ptr_mut(0)?;
    // SAFETY: a per-CPU slot, only this CPU touches it while the program runs.
    let slot_index = unsafe { *cursor };
    unsafe {
        *cursor = if slot_index + 1 >= in_use {
            0
        } else {
            slot_index + 1
        }
    };
    let slot = GEN_FRAMES.get(slot_index)?;
    let len = u16::from_le_bytes([slot[0], slot[1]]) as usize;
    // Bounds the length for the verifier as much as for sanity.
    if !(GEN_MIN_FRAME..=GEN_SLOT - 2).contains(&len) {
        return None;
    }
    // SAFETY: helper calls on the program's own context; the source is the map value,
    // `len` bytes from offset 2, within the slot as checked above.
    unsafe {
        // (Not `data_end - data`: the verifier refuses arithmetic on the end pointer.)
        if bpf_xdp_adjust_tail(ctx.ctx, len as i32 - GEN_INPUT_LEN as i32) != 0 {
            return None;
        }
        if bpf_xdp_store_bytes(ctx.ctx, 0, slot.as_ptr().add(2) as *mut _, len as u32) != 0 {
            return None;
        }
    }
    bump(QUERIES_SENT);
    Some(xdp_action::XDP_TX)
}

#[inline(always)]
fn count_reply(ctx: &XdpContext) -> Option<()> {
    const LEN: usize = ETH_HLEN + IPV4_HLEN + UDP_HLEN + 12;
    let f = ptr_at::<[u8; LEN]>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let f = unsafe { &*f };
    let ip = ETH_HLEN;
    let udp = ip + IPV4_HLEN;
    let dns = udp + UDP_HLEN;
    if u16::from_be_bytes([f[12], f[13]]) != ETH_P_IP
        || f[ip] != 0x45
        || f[ip + 9] != IPPROTO_UDP
        || u16::from_be_bytes([f[udp], f[udp + 1]]) != DNS_PORT
        || f[dns + 2] & FLAG_QR == 0
    {
        return None;
    }
    let answers = u16::from_be_bytes([f[dns + 6], f[dns + 7]]);
    bump(match f[dns + 3] & 0x0f {
        0 if answers > 0 => REPLY_NOERROR_ANSWER,
        0 => REPLY_NOERROR_EMPTY,
        2 => REPLY_SERVFAIL,
        3 => REPLY_NXDOMAIN,
        _ => REPLY_OTHER,
    });
    Some(())
}

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    if ctx.data() + off + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((ctx.data() + off) as *mut T)
}

#[inline(always)]
fn reflect(ctx: &XdpContext) -> Option<u32> {
    // Ethernet, IPv4 without options, UDP to port 53, and the first 4 bytes of the DNS header.
    const LEN: usize = ETH_HLEN + IPV4_HLEN + UDP_HLEN + 4;
    let f = ptr_at::<[u8; LEN]>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let f = unsafe { &mut *f };
    let ip = ETH_HLEN;
    let udp = ip + IPV4_HLEN;
    let dns = udp + UDP_HLEN;
    if u16::from_be_bytes([f[12], f[13]]) != ETH_P_IP
        || f[ip] != 0x45
        || f[ip + 9] != IPPROTO_UDP
        || u16::from_be_bytes([f[udp + 2], f[udp + 3]]) != DNS_PORT
        || f[dns + 2] & FLAG_QR != 0
    {
        return None;
    }
    for i in 0..6 {
        f.swap(i, 6 + i);
    }
    for i in 0..4 {
        f.swap(ip + 12 + i, ip + 16 + i);
    }
    for i in 0..2 {
        f.swap(udp + i, udp + 2 + i);
    }
    f[dns + 2] |= FLAG_QR;
    f[udp + 6] = 0;
    f[udp + 7] = 0;
    Some(xdp_action::XDP_TX)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
