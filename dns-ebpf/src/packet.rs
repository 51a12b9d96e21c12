//! Packet access the verifier accepts: one bounds-checked pointer helper, masked indices, and
//! the helper-based copies into and out of the frame.

use aya_ebpf::{helpers::generated::bpf_xdp_store_bytes, programs::XdpContext};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const IPPROTO_UDP: u8 = 17;
pub const UDP_HLEN: usize = 8;
pub const DNS_HLEN: usize = 12;
pub const DNS_PORT: u16 = 53;
pub const CLASS_IN: u16 = 1;
pub const TYPE_OPT: u16 = 41;

/// A pointer to `T` at `off` bytes into the packet, or `None` past its end.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

#[inline(always)]
pub fn read_be16(ctx: &XdpContext, off: usize) -> Option<u16> {
    let p = ptr_at::<[u8; 2]>(ctx, off)?;
    // SAFETY: bounds checked by ptr_at.
    Some(u16::from_be_bytes(unsafe { *p }))
}

#[inline(always)]
pub fn write_be16(ctx: &XdpContext, off: usize, v: u16) -> Option<()> {
    let p = ptr_at::<[u8; 2]>(ctx, off)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { *p = v.to_be_bytes() };
    Some(())
}

/// `x & mask`, done in an instruction the compiler cannot drop. Where the compiler can prove
/// an index in bounds it removes a plain mask, and the verifier, which cannot prove it, then
/// rejects the access; this keeps the mask on the very register the access uses.
#[inline(always)]
pub fn bounded(x: usize, mask: usize) -> usize {
    let mut v = x as u64;
    // SAFETY: a register-only AND.
    unsafe { core::arch::asm!("{v} &= {m}", v = inout(reg) v, m = in(reg) mask as u64) };
    v as usize
}

/// `a[i mod N]` for a power-of-two `N`, without a bounds check the verifier would see as a
/// path to a panic.
#[inline(always)]
pub fn at<T: Copy, const N: usize>(a: &[T; N], i: usize) -> T {
    const { assert!(N.is_power_of_two()) };
    // SAFETY: bounded() keeps the index below N.
    unsafe { *a.get_unchecked(bounded(i, N - 1)) }
}

/// Copies `len` bytes from `src` into the frame at `off`; false if they do not fit.
#[inline(always)]
pub fn store(ctx: &XdpContext, off: u32, src: *const u8, len: usize) -> bool {
    // SAFETY: `src` points at `len` readable bytes; the helper checks the packet bounds.
    unsafe { bpf_xdp_store_bytes(ctx.ctx, off, src as *mut _, len as u32) == 0 }
}
