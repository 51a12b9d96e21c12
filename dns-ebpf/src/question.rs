//! The DNS message: header, question and OPT record. Checks that the query is one the
//! kernel may answer, loads the question into scratch memory, builds the lookup key (the
//! lowercased name) and reads what the client accepts (EDNS, UDP size, DO).

use aya_ebpf::{
    helpers::generated::{bpf_csum_diff, bpf_xdp_load_bytes},
    programs::XdpContext,
};
use dns_common::{
    CLASSIC_UDP_LIMIT, FLAG_QR, FLAG_TC, LONG_NAME_LEN, LongKey, MAX_LABEL_LEN, MAX_NAME_LEN,
    MAX_UDP_REPLY, OPCODE_MASK, OPT_RECORD_LEN, SHORT_NAME_LEN, counter,
};

use crate::{
    Outcome, csum,
    layers::Layers,
    maps::{RAW_LEN, SHORT_KEY_WORDS, Scratch},
    packet::{CLASS_IN, DNS_HLEN, TYPE_OPT, UDP_HLEN, at, bounded, ptr_at, read_be16},
    pass,
};

/// EDNS options in one OPT record the kernel will walk; more go to userspace.
const MAX_EDNS_OPTIONS: usize = 8;
/// Labels in a name of at most 255 bytes (one byte each, plus the root).
const MAX_LABELS: usize = 128;

/// The header fields the reply needs.
pub struct Header {
    pub id: u16,
    pub flags: u16,
    pub arcount: u16,
}

/// Never answer a response (no reflection loops), another opcode, a truncated query, or
/// anything but one question with at most an OPT record.
#[inline(always)]
pub fn header(ctx: &XdpContext, layers: &Layers) -> Result<Header, Outcome> {
    let unsupported = pass(counter::PASS_UNSUPPORTED);
    let dns = layers.l4 + UDP_HLEN;
    let hdr = ptr_at::<[u8; DNS_HLEN]>(ctx, dns).ok_or(pass(counter::PASS_MALFORMED))?;
    // SAFETY: bounds checked by ptr_at.
    let hdr = unsafe { &*hdr };
    let id = u16::from_be_bytes([hdr[0], hdr[1]]);
    let flags = u16::from_be_bytes([hdr[2], hdr[3]]);
    let qdcount = u16::from_be_bytes([hdr[4], hdr[5]]);
    let ancount = u16::from_be_bytes([hdr[6], hdr[7]]);
    let nscount = u16::from_be_bytes([hdr[8], hdr[9]]);
    let arcount = u16::from_be_bytes([hdr[10], hdr[11]]);
    if flags & (FLAG_QR | OPCODE_MASK | FLAG_TC) != 0 {
        return Err(unsupported);
    }
    if qdcount != 1 || ancount != 0 || nscount != 0 || arcount > 1 {
        return Err(unsupported);
    }
    Ok(Header { id, flags, arcount })
}

/// A query the kernel may answer, its name's key built in scratch memory.
pub struct Query {
    pub id: u16,
    pub flags: u16,
    /// Wire length of the name, root label included.
    pub name_len: usize,
    pub qtype: u16,
    /// Partial checksum of the question as received (name, type, class), from an even offset.
    pub csum: u32,
    /// The query has an OPT record: so does the reply.
    pub edns: bool,
    /// The DO bit, echoed.
    pub do_bit: u16,
    /// The largest reply the client accepts over UDP.
    pub client_limit: usize,
}

/// The question and the OPT record after it.
#[inline(always)]
pub fn question(
    ctx: &XdpContext,
    layers: &Layers,
    header: &Header,
    scratch: &mut Scratch,
) -> Result<Query, Outcome> {
    let unsupported = pass(counter::PASS_UNSUPPORTED);
    let malformed = pass(counter::PASS_MALFORMED);
    let dns = layers.l4 + UDP_HLEN;
    let arcount = header.arcount;

    let qname_off = dns + DNS_HLEN;
    let avail = layers.dns_len - DNS_HLEN;
    // The question's name, type and class: at most 255 + 4 bytes.
    let load = if avail > MAX_NAME_LEN + 4 {
        MAX_NAME_LEN + 4
    } else {
        avail
    };
    // The mask is a no-op, but proves the size to the verifier.
    let load = bounded(load, RAW_LEN - 1);
    if load == 0 {
        return Err(malformed);
    }
    // SAFETY: `raw` has RAW_LEN >= load bytes; the helper checks the packet bounds.
    let rc = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            qname_off as u32,
            scratch.raw.as_mut_ptr().cast(),
            load as u32,
        )
    };
    if rc != 0 {
        return Err(malformed);
    }

    let parsed = parse_name(scratch, load).map_err(pass)?;
    let name_len = parsed.len;
    let q_end = qname_off + name_len + 4;
    if name_len + 4 > avail {
        return Err(malformed);
    }
    let raw_at = |i: usize| at(&scratch.raw, i);
    let qtype = u16::from_be_bytes([raw_at(name_len), raw_at(name_len + 1)]);
    let qclass = u16::from_be_bytes([raw_at(name_len + 2), raw_at(name_len + 3)]);
    if qclass != CLASS_IN {
        return Err(unsupported);
    }
    // Type 0, OPT and the meta types (ANY, AXFR, IXFR, TSIG, ...) are userspace's.
    if qtype == 0 || qtype == TYPE_OPT || (128..=255).contains(&qtype) {
        return Err(unsupported);
    }

    // --- EDNS ---------------------------------------------------------------------------------
    let mut edns = false;
    let mut client_limit = CLASSIC_UDP_LIMIT;
    let mut do_bit = 0u16;
    let dns_end = dns + layers.dns_len;
    if arcount == 1 {
        let opt =
            ptr_at::<[u8; OPT_RECORD_LEN]>(ctx, q_end).ok_or(pass(counter::PASS_MALFORMED))?;
        // SAFETY: bounds checked by ptr_at.
        let opt = unsafe { &*opt };
        // Root owner and type OPT; anything else (TSIG, SIG(0), ...) is userspace's.
        if opt[0] != 0 || u16::from_be_bytes([opt[1], opt[2]]) != TYPE_OPT {
            return Err(unsupported);
        }
        let size = u16::from_be_bytes([opt[3], opt[4]]) as usize;
        // Version above 0: userspace answers BADVERS.
        if opt[6] != 0 {
            return Err(unsupported);
        }
        do_bit = u16::from_be_bytes([opt[7], opt[8]]) & 0x8000;
        let rdlen = u16::from_be_bytes([opt[9], opt[10]]) as usize;
        if q_end + OPT_RECORD_LEN + rdlen != dns_end {
            return Err(malformed);
        }
        // Walk the options so that a malformed record is never taken as valid.
        let mut off = q_end + OPT_RECORD_LEN;
        let mut n = 0;
        while n < MAX_EDNS_OPTIONS && off < dns_end {
            let len = read_be16(ctx, off + 2).ok_or(pass(counter::PASS_MALFORMED))? as usize;
            off += 4 + len;
            n += 1;
        }
        if off != dns_end {
            return Err(if n == MAX_EDNS_OPTIONS {
                unsupported
            } else {
                malformed
            });
        }
        edns = true;
        client_limit = if size > CLASSIC_UDP_LIMIT {
            size
        } else {
            CLASSIC_UDP_LIMIT
        };
    } else if q_end != dns_end {
        // Trailing bytes after the question.
        return Err(malformed);
    }
    if client_limit > MAX_UDP_REPLY {
        client_limit = MAX_UDP_REPLY;
    }
    Ok(Query {
        id: header.id,
        flags: header.flags,
        name_len,
        qtype,
        csum: parsed.csum,
        edns,
        do_bit,
        client_limit,
    })
}

struct ParsedName {
    /// Wire length, root label included.
    len: usize,
    /// Partial checksum of the question as received (name, type, class), from an even offset.
    csum: u32,
}

/// Walks the name in `scratch.raw`: checks its labels, writes the lowercased name into the
/// key (zero-padded), marks label starts, and sums the received bytes for the checksum.
#[inline(always)]
fn parse_name(scratch: &mut Scratch, load: usize) -> Result<ParsedName, u32> {
    // The lookup hashes the whole key: the bytes after the name must be zero. The tail past
    // the short prefix is zero on entry (xdns_xdp cleans it after a long name); the prefix is
    // zeroed here. Volatile word stores, because a plain loop would become a call to memset.
    let words = (&mut scratch.key as *mut LongKey).cast::<u64>();
    let mut w = 0;
    while w < SHORT_KEY_WORDS {
        // SAFETY: `key` starts with SHORT_KEY_WORDS 8-aligned words (asserted).
        unsafe { words.add(w).write_volatile(0) };
        w += 1;
    }
    if load > SHORT_NAME_LEN {
        // The loop may write past the prefix.
        scratch.tail_dirty = 1;
    }
    scratch.label_starts = [0; 4];

    // The walk's comparisons narrow `load` differently on every path out of it; kept in memory
    // and read back after, it is one unknown again (see `name_len` below).
    // SAFETY: plain field of the scratch value.
    unsafe { core::ptr::write_volatile(&mut scratch.load, load as u64) };

    // Walk the labels by their length bytes: a handful of steps, not one per byte.
    let mut i = 0usize;
    let mut found = false;
    let mut steps = 0;
    while steps < MAX_LABELS {
        if i >= load {
            return Err(counter::PASS_MALFORMED);
        }
        let len = at(&scratch.raw, i) as usize;
        if len == 0 {
            // The verifier would otherwise verify everything after the loop once per path
            // that reaches here; a round trip through map memory makes the length an unknown
            // scalar again, so it verifies the rest once.
            // SAFETY: plain field of the scratch value.
            unsafe { core::ptr::write_volatile(&mut scratch.name_len, (i + 1) as u64) };
            found = true;
            break;
        }
        // Compression pointers (0xC0) and the obsolete extended labels (0x40, 0x80).
        if len > MAX_LABEL_LEN {
            return Err(counter::PASS_UNSUPPORTED);
        }
        let word = bounded(i >> 6, 3);
        // SAFETY: bounded() keeps the index below 4.
        unsafe { *scratch.label_starts.get_unchecked_mut(word) |= 1u64 << (i & 63) };
        i += 1 + len;
        // The root label must fit in 255 bytes.
        if i >= MAX_NAME_LEN {
            return Err(counter::PASS_MALFORMED);
        }
        steps += 1;
    }
    if !found {
        return Err(counter::PASS_MALFORMED);
    }
    // SAFETY: plain fields of the scratch value.
    let (len, load) = unsafe {
        (
            core::ptr::read_volatile(&scratch.name_len) as usize,
            bounded(
                core::ptr::read_volatile(&scratch.load) as usize,
                RAW_LEN - 1,
            ),
        )
    };
    if len == 0 || len > MAX_NAME_LEN || len > load {
        return Err(counter::PASS_MALFORMED);
    }
    // Copy into the key, lowercased eight bytes at a time. Length bytes (1..=63) and bytes
    // outside A..Z are left as they are, so labels need no separate treatment. The loop compares
    // only the word count, never `len` itself: a comparison per word on `len` would narrow it
    // on every way out of the loop, and the rest of the program would be verified once per
    // word count.
    let words = len.div_ceil(8);
    let mut w = 0;
    while w < LONG_NAME_LEN / 8 {
        if w >= words {
            break;
        }
        let at_byte = bounded(w * 8, RAW_LEN - 8);
        // SAFETY: `raw` is 8-aligned with RAW_LEN bytes; bounded() keeps the word inside.
        let x = unsafe { scratch.raw.as_ptr().add(at_byte).cast::<u64>().read() };
        let y = lowercase8(x);
        let to = bounded(w * 8, LONG_NAME_LEN - 8);
        // SAFETY: the key's name has LONG_NAME_LEN bytes; bounded() keeps the word inside.
        unsafe {
            scratch
                .key
                .name
                .as_mut_ptr()
                .add(to)
                .cast::<u64>()
                .write_unaligned(y)
        };
        w += 1;
    }
    // The last word also holds what follows the name (type, class, ...); the key must be zero
    // there. Little-endian: the name's bytes are the low ones.
    let tail = len & 7;
    if tail != 0 {
        let last = bounded((words - 1) * 8, LONG_NAME_LEN - 8);
        // SAFETY: the key's name has LONG_NAME_LEN bytes; bounded() keeps the word inside.
        unsafe {
            let p = scratch.key.name.as_mut_ptr().add(last).cast::<u64>();
            p.write_unaligned(p.read_unaligned() & ((1u64 << (tail * 8)) - 1));
        }
    }
    // The question's type and class follow the name.
    let qlen = len + 4;
    if qlen > load {
        return Err(counter::PASS_MALFORMED);
    }
    // Checksum of the question as received, in one helper call over whole 32-bit words: the
    // up to three bytes after it are zeroed (nothing reads them from here; the OPT record is
    // read from the packet).
    let padded = (qlen + 3) & !3;
    let mut p = qlen;
    while p < padded {
        // SAFETY: bounded() keeps the index below RAW_LEN.
        unsafe { *scratch.raw.get_unchecked_mut(bounded(p, RAW_LEN - 1)) = 0 };
        p += 1;
    }
    // SAFETY: `raw` holds RAW_LEN bytes and the size is a multiple of 4 below it.
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            scratch.raw.as_mut_ptr().cast(),
            bounded(padded, RAW_LEN - 4) as u32,
            0,
        )
    };
    if sum < 0 {
        return Err(counter::PASS_MALFORMED);
    }
    // The helper sums 16-bit words in the CPU's byte order; the rest of this program sums them
    // big-endian, which is the same sum with its bytes swapped (RFC 1071).
    let csum = csum::fold(sum as u32).swap_bytes() as u32;
    Ok(ParsedName { len, csum })
}

/// ASCII `A..=Z` to lowercase in each byte of `x`, other bytes unchanged (SWAR).
#[inline(always)]
fn lowercase8(x: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let low7 = x & !HIGH;
    // High bit set in a byte above 'Z' (0x5A), and in a byte at least 'A' (0x41).
    let above_z = low7 + ONES * (0x7f - b'Z' as u64);
    let from_a = low7 + ONES * (0x80 - b'A' as u64);
    let upper = (from_a & !above_z) & !x & HIGH;
    x | (upper >> 2)
}
