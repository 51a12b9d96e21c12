//! The TTL countdown of a cached upstream answer: after the reply is written, every TTL field
//! the entry lists is set to the seconds left before it expires, as the agent's cache serves
//! it. The lookup stage computed the seconds and the reply stage counted them in the checksum;
//! this writes them.
//!
//! A stage of its own, run after the pipeline on what the stages left in scratch memory: a
//! bounded loop verified once, not once for every way the pipeline reaches an answer.

use aya_ebpf::programs::XdpContext;
use dns_common::{MAX_TTL_FIELDS, ttl_offset_at};

use crate::{maps::Scratch, packet::bounded, packet::ptr_at};

/// Frame offsets and section offsets stay far below this (a reply is at most 1232 bytes after
/// at most 62 bytes of headers): a mask the verifier can bound a packet offset with.
const OFFSET_MASK: usize = 0x7ff;

/// Writes the TTL fields of the answer in `scratch` into the reply; false if one does not fit
/// in the frame (never expected: the agent lists offsets inside the section bytes).
#[inline(always)]
pub fn count_down(ctx: &XdpContext, scratch: &Scratch) -> bool {
    // SAFETY: plain fields of the scratch value; read afresh (see `Scratch::name_len`).
    let (fields, base, ttl) = unsafe {
        (
            core::ptr::read_volatile(&scratch.ttl_fields) as usize,
            bounded(
                core::ptr::read_volatile(&scratch.ttl_at) as usize,
                OFFSET_MASK,
            ),
            core::ptr::read_volatile(&scratch.ttl) as u32,
        )
    };
    let ttl = ttl.to_be_bytes();
    let data = &scratch.value.data;
    let mut i = 0;
    while i < MAX_TTL_FIELDS {
        if i >= fields {
            break;
        }
        // i < MAX_TTL_FIELDS: the mask only shows the compiler that the index is in bounds.
        let at = ttl_offset_at(i & (MAX_TTL_FIELDS - 1));
        // SAFETY: ttl_offset_at(i) + 1 < INLINE_DATA_LEN for every i < MAX_TTL_FIELDS.
        let off =
            unsafe { u16::from_ne_bytes([*data.get_unchecked(at), *data.get_unchecked(at + 1)]) }
                as usize;
        let Some(field) = ptr_at::<[u8; 4]>(ctx, base + bounded(off, OFFSET_MASK)) else {
            return false;
        };
        // SAFETY: bounds checked by ptr_at.
        unsafe { *field = ttl };
        i += 1;
    }
    true
}
