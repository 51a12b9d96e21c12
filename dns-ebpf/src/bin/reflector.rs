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
//! `xdns_reflect_lookup` does the same after one step of DNS work: it finds the question's name
//! in a hash map with a key the size of xdns' zone map key (64 bytes: the name in wire form,
//! zero-padded), and passes the query if the name is not there. What a name lookup alone costs
//! against the bare echo is the least any server that answers from a map of names pays.
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
    bindings::{BPF_F_NO_PREALLOC, xdp_action},
    helpers::generated::{bpf_xdp_adjust_tail, bpf_xdp_load_bytes, bpf_xdp_store_bytes},
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray},
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

/// Key of `REFLECT_NAMES`: as long as xdns's short key; names of 64 bytes or more are passed.
const NAME_KEY: usize = 64;
const NAME_WORDS: usize = NAME_KEY / 8;
/// Labels walked in a name of under 64 bytes.
const MAX_LABELS: usize = 32;

/// The names `xdns_reflect_lookup` answers, in wire form and zero-padded; xtask fills it.
#[map(name = "REFLECT_NAMES")]
static REFLECT_NAMES: HashMap<[u8; NAME_KEY], u8> =
    HashMap::with_max_entries(65_536, BPF_F_NO_PREALLOC);

/// The key being built (too big for the stack beside the rest).
#[map(name = "REFLECT_KEY")]
static REFLECT_KEY: PerCpuArray<[u64; NAME_WORDS]> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "BENCH_COUNTS")]
static BENCH_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(BENCH_COUNTERS, 0);

#[xdp]
pub fn xdns_reflect(ctx: XdpContext) -> u32 {
    reflect(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

#[xdp]
pub fn xdns_reflect_lookup(ctx: XdpContext) -> u32 {
    reflect_lookup(&ctx).unwrap_or(xdp_action::XDP_PASS)
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

// Ethernet, IPv4 without options, UDP to port 53, and the DNS header.
const QUERY_HEAD: usize = ETH_HLEN + IPV4_HLEN + UDP_HLEN + 12;
const IP: usize = ETH_HLEN;
const UDP: usize = IP + IPV4_HLEN;
const DNS: usize = UDP + UDP_HLEN;

/// The frame's headers if it is a UDP/IPv4 DNS query to port 53.
#[inline(always)]
fn query_head(ctx: &XdpContext) -> Option<*mut [u8; QUERY_HEAD]> {
    let p = ptr_at::<[u8; QUERY_HEAD]>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let f = unsafe { &*p };
    if u16::from_be_bytes([f[12], f[13]]) != ETH_P_IP
        || f[IP] != 0x45
        || f[IP + 9] != IPPROTO_UDP
        || u16::from_be_bytes([f[UDP + 2], f[UDP + 3]]) != DNS_PORT
        || f[DNS + 2] & FLAG_QR != 0
    {
        return None;
    }
    Some(p)
}

/// Turns the query into its echo: addresses and ports swapped, QR set, no UDP checksum.
#[inline(always)]
fn echo(p: *mut [u8; QUERY_HEAD]) -> u32 {
    // SAFETY: from query_head, in bounds; nothing else refers to the frame meanwhile.
    let f = unsafe { &mut *p };
    for i in 0..6 {
        f.swap(i, 6 + i);
    }
    for i in 0..4 {
        f.swap(IP + 12 + i, IP + 16 + i);
    }
    for i in 0..2 {
        f.swap(UDP + i, UDP + 2 + i);
    }
    f[DNS + 2] |= FLAG_QR;
    f[UDP + 6] = 0;
    f[UDP + 7] = 0;
    xdp_action::XDP_TX
}

#[inline(always)]
fn reflect(ctx: &XdpContext) -> Option<u32> {
    query_head(ctx).map(echo)
}

#[inline(always)]
fn reflect_lookup(ctx: &XdpContext) -> Option<u32> {
    let f = query_head(ctx)?;
    // The name's wire length, by its length bytes.
    let mut len = 0usize;
    let mut labels = 0;
    loop {
        if labels == MAX_LABELS || len >= NAME_KEY {
            return None;
        }
        let l = *ptr_at::<u8>(ctx, QUERY_HEAD + len).map(|p| unsafe { &*p })? as usize;
        len += 1 + l;
        if l == 0 {
            break;
        }
        if l > 63 {
            return None;
        }
        labels += 1;
    }
    if len >= NAME_KEY {
        return None;
    }
    let key = REFLECT_KEY.get_ptr_mut(0)?;
    // SAFETY: a per-CPU slot of NAME_WORDS words; the helper writes `len` < NAME_KEY bytes into
    // it and checks the packet's bounds itself.
    unsafe {
        let words = key.cast::<u64>();
        for w in 0..NAME_WORDS {
            words.add(w).write_volatile(0);
        }
        let n = len & (NAME_KEY - 1);
        if n == 0 || bpf_xdp_load_bytes(ctx.ctx, QUERY_HEAD as u32, key.cast(), n as u32) != 0 {
            return None;
        }
        // By reference: by value would copy the key onto the 512-byte stack.
        #[allow(clippy::needless_borrows_for_generic_args)]
        REFLECT_NAMES.get(&*key.cast::<[u8; NAME_KEY]>())?;
    }
    Some(echo(f))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
