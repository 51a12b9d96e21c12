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
//! Loaded by `cargo xtask bench` from `target/bpfel-unknown-none/release/reflector`.
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPV4_HLEN: usize = 20;
const IPPROTO_UDP: u8 = 17;
const UDP_HLEN: usize = 8;
const DNS_PORT: u16 = 53;
const FLAG_QR: u8 = 0x80;

#[xdp]
pub fn xdns_reflect(ctx: XdpContext) -> u32 {
    reflect(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

#[xdp]
pub fn xdns_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
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
