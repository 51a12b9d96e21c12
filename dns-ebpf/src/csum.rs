//! Internet checksum arithmetic (RFC 1071) for building the reply's UDP checksum from parts:
//! every part is summed as if it started at an even offset, then placed at its real parity.

use dns_common::OPT_RECORD_LEN;

/// Folds a 32-bit running sum to 16 bits (not inverted).
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// A partial sum computed from an even offset, placed at `offset` (RFC 1071: bytes one
/// position off swap the bytes of the sum).
#[inline(always)]
pub fn at_parity(sum: u32, offset: usize) -> u32 {
    let s = fold(sum) as u32;
    if offset & 1 == 0 {
        s
    } else {
        ((s & 0xff) << 8) | (s >> 8)
    }
}

/// Partial sum of an OPT record buffer from an even offset (its 12th byte is padding, zero).
#[inline(always)]
pub fn opt_bytes(b: &[u8; OPT_RECORD_LEN + 1]) -> u32 {
    let mut s = 0u32;
    let mut i = 0;
    while i < b.len() {
        s += u16::from_be_bytes([b[i], b[i + 1]]) as u32;
        i += 2;
    }
    s
}

/// Sum of the 16-bit big-endian words of `b` (an even-length header slice).
#[inline(always)]
pub fn words<const N: usize>(b: &[u8; N], from: usize, to: usize) -> u32 {
    let mut sum = 0u32;
    let mut i = from;
    while i < to {
        sum += u16::from_be_bytes([b[i], b[i + 1]]) as u32;
        i += 2;
    }
    sum
}

/// A checksum with the bytes `old` replaced by `new` (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')),
/// both at an even offset.
#[inline(always)]
pub fn replace<const N: usize>(check: u16, old: &[u8; N], new: &[u8; N]) -> u16 {
    let mut sum = (!check) as u32;
    let mut i = 0;
    while i + 1 < N {
        sum += (!u16::from_be_bytes([old[i], old[i + 1]])) as u32;
        sum += u16::from_be_bytes([new[i], new[i + 1]]) as u32;
        i += 2;
    }
    !fold(sum)
}
