//! xdns XDP fast path.
//!
//! Reads like the protocol: ethernet → IPv4/IPv6 → UDP → DNS header → question → OPT, then
//! looks the question up in the answer maps the agent fills (see `dns-common`), and when it
//! finds an answer rewrites the query in place into the response and sends it back out of the
//! interface it came in on (`XDP_TX`).
//!
//! Rules (DESIGN.md): fail open. Anything not fully understood — and anything whose answer is
//! not in the maps — goes up the stack untouched (`XDP_PASS`), where the agent answers it. The
//! program never drops, except a packet it has already started to rewrite and then cannot
//! finish (never seen; counted as `ERROR_WRITE`), because passing a half-written query up could
//! get it a wrong answer.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

use core::mem::size_of;

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, xdp_action},
    helpers::generated::{
        bpf_csum_diff, bpf_ktime_get_ns, bpf_xdp_adjust_tail, bpf_xdp_load_bytes,
        bpf_xdp_store_bytes,
    },
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray},
    programs::XdpContext,
};
use dns_common::{
    ACTION_ANSWER, ACTION_NODATA, ACTION_PASS, AnswerValue, BLOB_CLASS_M, BLOB_CLASS_S,
    BLOB_CLASS_SHIFT, Blob, BlobL, BlobM, BlobS, CLASSIC_UDP_LIMIT, CONFIG_NXDOMAIN, CONFIG_SYNCED,
    DEFAULT_ANSWERS_LONG_MAX, DEFAULT_ANSWERS_SHORT_MAX, DEFAULT_BLOBS_L_MAX, DEFAULT_BLOBS_M_MAX,
    DEFAULT_BLOBS_S_MAX, EDNS_UDP_SIZE, FLAG_CD, FLAG_QR, FLAG_RD, FLAG_TC, INLINE_DATA_LEN,
    LONG_NAME_LEN, LongKey, MAX_KERNEL_QUERY, MAX_LABEL_LEN, MAX_LISTEN, MAX_NAME_LEN,
    MAX_UDP_REPLY, OPCODE_MASK, OPT_RECORD_LEN, QTYPE_OTHER, SHORT_NAME_LEN, SOA_PTR_OFFSETS,
    SOA_RECORD_LEN, ShortKey, ZoneConfig, counter,
};

// ---------------------------------------------------------------------------------------------
// Maps. Sizes here are defaults; the agent sets the real capacities at load time. Answer maps
// allocate on insert (BPF_F_NO_PREALLOC): memory follows the zone, not the capacity, and an
// update swaps the element atomically for concurrent readers.

#[map(name = "XDNS_ANS_SHORT")]
static ANSWERS_SHORT: HashMap<ShortKey, AnswerValue> =
    HashMap::with_max_entries(DEFAULT_ANSWERS_SHORT_MAX, BPF_F_NO_PREALLOC);

#[map(name = "XDNS_ANS_LONG")]
static ANSWERS_LONG: HashMap<LongKey, AnswerValue> =
    HashMap::with_max_entries(DEFAULT_ANSWERS_LONG_MAX, BPF_F_NO_PREALLOC);

#[map(name = "XDNS_BLOBS_S")]
static BLOBS_S: HashMap<u32, BlobS> =
    HashMap::with_max_entries(DEFAULT_BLOBS_S_MAX, BPF_F_NO_PREALLOC);

#[map(name = "XDNS_BLOBS_M")]
static BLOBS_M: HashMap<u32, BlobM> =
    HashMap::with_max_entries(DEFAULT_BLOBS_M_MAX, BPF_F_NO_PREALLOC);

#[map(name = "XDNS_BLOBS_L")]
static BLOBS_L: HashMap<u32, BlobL> =
    HashMap::with_max_entries(DEFAULT_BLOBS_L_MAX, BPF_F_NO_PREALLOC);

#[map(name = "XDNS_CONFIG")]
static CONFIG: Array<ZoneConfig> = Array::with_max_entries(1, 0);

#[map(name = "XDNS_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Per-CPU working memory: too big for the 512-byte BPF stack.
#[repr(C, align(8))]
struct Scratch {
    /// The question as loaded from the packet: name, type, class.
    raw: [u8; RAW_LEN],
    /// The lookup key being built (lowercased name). 8-aligned, so it is zeroed in words.
    key: LongKey,
    _pad: [u8; 4],
    /// Bit `i` set: a label starts at name offset `i`.
    label_starts: [u64; 4],
    /// The name's length, passed through memory on purpose (see `parse_name`).
    name_len: u64,
    /// The key's bytes past the short-key prefix were written: zero them before the next
    /// packet (they are zero at the start of every run, so short names zero only the prefix).
    tail_dirty: u64,
}
// Power-of-two sizes let `& (LEN - 1)` prove every index in bounds (no panic paths).
const RAW_LEN: usize = 512;
const KEY_WORDS: usize = (core::mem::size_of::<LongKey>() + 4) / 8;
const SHORT_KEY_WORDS: usize = core::mem::size_of::<ShortKey>() / 8;
/// Labels in a name of at most 255 bytes (one byte each, plus the root).
const MAX_LABELS: usize = 128;
const _: () = assert!(core::mem::offset_of!(Scratch, key) % 8 == 0);
const _: () = assert!(core::mem::offset_of!(Scratch, label_starts) == RAW_LEN + KEY_WORDS * 8);

#[map(name = "XDNS_SCRATCH")]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

// ---------------------------------------------------------------------------------------------
// Wire constants.

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const IPPROTO_UDP: u8 = 17;
const UDP_HLEN: usize = 8;
const DNS_HLEN: usize = 12;
const DNS_PORT: u16 = 53;
const CLASS_IN: u16 = 1;
const TYPE_OPT: u16 = 41;
const REPLY_TTL: u8 = 64;
/// EDNS options in one OPT record the kernel will walk; more go to userspace.
const MAX_EDNS_OPTIONS: usize = 8;

/// How one packet ends: the verdict, and the counter that records why.
struct Outcome {
    action: u32,
    counter: u32,
}

const fn pass(counter: u32) -> Outcome {
    Outcome {
        action: xdp_action::XDP_PASS,
        counter,
    }
}

#[xdp]
pub fn xdns_xdp(ctx: XdpContext) -> u32 {
    let outcome = handle(&ctx);
    if let Some(scratch) = SCRATCH.get_ptr_mut(0) {
        // SAFETY: per-CPU scratch, not shared with any other program run.
        let scratch = unsafe { &mut *scratch };
        if scratch.tail_dirty != 0 {
            let words = (&mut scratch.key as *mut LongKey).cast::<u64>();
            let mut w = SHORT_KEY_WORDS;
            while w < KEY_WORDS {
                // SAFETY: `key` and the padding after it are KEY_WORDS 8-aligned words.
                unsafe { words.add(w).write_volatile(0) };
                w += 1;
            }
            scratch.tail_dirty = 0;
        }
    }
    if let Some(c) = COUNTERS.get_ptr_mut(outcome.counter) {
        // SAFETY: per-CPU slot, and XDP programs do not nest on one CPU.
        unsafe { *c += 1 };
    }
    outcome.action
}

// ---------------------------------------------------------------------------------------------
// Packet access.

/// A pointer to `T` at `off` bytes into the packet, or `None` past its end.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

#[inline(always)]
fn read_be16(ctx: &XdpContext, off: usize) -> Option<u16> {
    let p = ptr_at::<[u8; 2]>(ctx, off)?;
    // SAFETY: bounds checked by ptr_at.
    Some(u16::from_be_bytes(unsafe { *p }))
}

#[inline(always)]
fn write_be16(ctx: &XdpContext, off: usize, v: u16) -> Option<()> {
    let p = ptr_at::<[u8; 2]>(ctx, off)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { *p = v.to_be_bytes() };
    Some(())
}

/// `x & mask`, done in an instruction the compiler cannot drop. Where the compiler can prove
/// an index in bounds it removes a plain mask, and the verifier, which cannot prove it, then
/// rejects the access; this keeps the mask on the very register the access uses.
#[inline(always)]
fn bounded(x: usize, mask: usize) -> usize {
    let mut v = x as u64;
    // SAFETY: a register-only AND.
    unsafe { core::arch::asm!("{v} &= {m}", v = inout(reg) v, m = in(reg) mask as u64) };
    v as usize
}

/// `a[i mod N]` for a power-of-two `N`, without a bounds check the verifier would see as a
/// path to a panic.
#[inline(always)]
fn at<T: Copy, const N: usize>(a: &[T; N], i: usize) -> T {
    const { assert!(N.is_power_of_two()) };
    // SAFETY: bounded() keeps the index below N.
    unsafe { *a.get_unchecked(bounded(i, N - 1)) }
}

/// Where the layers of a query start, and what the checksum needs of its addresses.
struct Layers {
    ipv6: bool,
    /// Offset of the UDP header.
    l4: usize,
    /// Length of the DNS message per the UDP header.
    dns_len: usize,
    /// Partial sum of the source and destination addresses (unchanged by swapping them).
    addr_sum: u32,
}

// ---------------------------------------------------------------------------------------------
// The pipeline.

#[inline(always)]
fn handle(ctx: &XdpContext) -> Outcome {
    let Some(config) = CONFIG.get_ptr(0) else {
        return pass(counter::PASS_NOT_DNS);
    };
    // SAFETY: array map values live as long as the map.
    let config = unsafe { &*config };
    let layers = match parse_layers(ctx, config) {
        Ok(l) => l,
        Err(o) => return o,
    };
    match answer(ctx, &layers, config) {
        Ok(o) | Err(o) => o,
    }
}

/// Is `dst` one of the listen addresses? (A short scan of the config: cheaper than a lookup.)
#[inline(always)]
fn listens_v4(config: &ZoneConfig, dst: [u8; 4]) -> bool {
    let dst = u32::from_ne_bytes(dst);
    let mut i = 0;
    while i < MAX_LISTEN {
        let a = u32::from_ne_bytes(config.listen_v4[i]);
        if a == 0 {
            return false;
        }
        if a == dst {
            return true;
        }
        i += 1;
    }
    false
}

#[inline(always)]
fn listens_v6(config: &ZoneConfig, dst: &[u8; 16]) -> bool {
    let d0 = u64::from_ne_bytes([
        dst[0], dst[1], dst[2], dst[3], dst[4], dst[5], dst[6], dst[7],
    ]);
    let d1 = u64::from_ne_bytes([
        dst[8], dst[9], dst[10], dst[11], dst[12], dst[13], dst[14], dst[15],
    ]);
    let mut i = 0;
    while i < MAX_LISTEN {
        let a = &config.listen_v6[i];
        let a0 = u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]);
        let a1 = u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]);
        if a0 == 0 && a1 == 0 {
            return false;
        }
        if a0 == d0 && a1 == d1 {
            return true;
        }
        i += 1;
    }
    false
}

/// Ethernet, IP and UDP: is this a UDP packet for a listen address on port 53?
#[inline(always)]
fn parse_layers(ctx: &XdpContext, config: &ZoneConfig) -> Result<Layers, Outcome> {
    let not_dns = pass(counter::PASS_NOT_DNS);
    let unsupported = pass(counter::PASS_UNSUPPORTED);
    let malformed = pass(counter::PASS_MALFORMED);

    // VLAN-tagged frames land here too: their ethertype is 0x8100, not ours.
    let ethertype = read_be16(ctx, 12).ok_or(pass(counter::PASS_NOT_DNS))?;
    let frame_len = ctx.data_end() - ctx.data();

    let (ipv6, l4, ip_payload_len, addr_sum) = if ethertype == ETH_P_IP {
        let ip = ptr_at::<[u8; IPV4_HLEN]>(ctx, ETH_HLEN).ok_or(pass(counter::PASS_NOT_DNS))?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        if ip[9] != IPPROTO_UDP {
            return Err(not_dns);
        }
        let dst = [ip[16], ip[17], ip[18], ip[19]];
        if !listens_v4(config, dst) {
            return Err(not_dns);
        }
        if ip[0] >> 4 != 4 {
            return Err(malformed);
        }
        // Options (IHL > 5) could ask for source routing or recording: not ours to reflect.
        if ip[0] & 0x0f != 5 {
            return Err(unsupported);
        }
        // Fragments: the DNS message is not all here.
        let frag = u16::from_be_bytes([ip[6], ip[7]]);
        if frag & 0x3fff != 0 {
            return Err(unsupported);
        }
        // A header whose checksum is wrong never reaches the agent (the stack drops it, RFC
        // 791): answering it would answer what userspace never sees.
        let mut hsum = 0u32;
        let mut i = 0;
        while i < IPV4_HLEN {
            hsum += u16::from_be_bytes([ip[i], ip[i + 1]]) as u32;
            i += 2;
        }
        if fold(hsum) != 0xffff {
            return Err(malformed);
        }
        let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        if total < IPV4_HLEN || ETH_HLEN + total > frame_len {
            return Err(malformed);
        }
        let mut sum = 0u32;
        let mut i = 12;
        while i < 20 {
            sum += u16::from_be_bytes([ip[i], ip[i + 1]]) as u32;
            i += 2;
        }
        (false, ETH_HLEN + IPV4_HLEN, total - IPV4_HLEN, sum)
    } else if ethertype == ETH_P_IPV6 {
        let ip = ptr_at::<[u8; IPV6_HLEN]>(ctx, ETH_HLEN).ok_or(pass(counter::PASS_NOT_DNS))?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        let mut dst = [0u8; 16];
        dst.copy_from_slice(&ip[24..40]);
        if !listens_v6(config, &dst) {
            return Err(not_dns);
        }
        let next = ip[6];
        if next != IPPROTO_UDP {
            // Extension headers: perhaps a query for us, but outside the kernel's rules.
            if matches!(next, 0 | 43 | 44 | 50 | 51 | 60 | 135) {
                return Err(unsupported);
            }
            return Err(not_dns);
        }
        if ip[0] >> 4 != 6 {
            return Err(malformed);
        }
        let payload = u16::from_be_bytes([ip[4], ip[5]]) as usize;
        if ETH_HLEN + IPV6_HLEN + payload > frame_len {
            return Err(malformed);
        }
        let mut sum = 0u32;
        let mut i = 8;
        while i < 40 {
            sum += u16::from_be_bytes([ip[i], ip[i + 1]]) as u32;
            i += 2;
        }
        (true, ETH_HLEN + IPV6_HLEN, payload, sum)
    } else {
        return Err(not_dns);
    };

    let udp = ptr_at::<[u8; UDP_HLEN]>(ctx, l4).ok_or(pass(counter::PASS_NOT_DNS))?;
    // SAFETY: bounds checked by ptr_at.
    let udp = unsafe { &*udp };
    if u16::from_be_bytes([udp[2], udp[3]]) != DNS_PORT {
        return Err(not_dns);
    }
    // A reply to port 0 cannot be delivered.
    if u16::from_be_bytes([udp[0], udp[1]]) == 0 {
        return Err(unsupported);
    }
    let udp_len = u16::from_be_bytes([udp[4], udp[5]]) as usize;
    // Bytes after the UDP datagram inside the IP packet are not part of any DNS message.
    if udp_len != ip_payload_len || udp_len < UDP_HLEN + DNS_HLEN {
        return Err(malformed);
    }
    if udp_len > UDP_HLEN + MAX_KERNEL_QUERY {
        return Err(unsupported);
    }
    Ok(Layers {
        ipv6,
        l4,
        dns_len: udp_len - UDP_HLEN,
        addr_sum,
    })
}

/// What the reply carries after the question.
enum Sections {
    /// Section bytes from an entry (inline or blob).
    Data(*const AnswerValue),
    /// Only the zone SOA (NODATA or NXDOMAIN).
    Soa,
}

/// DNS header, question and OPT: look the question up and, on a hit, rewrite and send.
#[inline(always)]
fn answer(ctx: &XdpContext, layers: &Layers, config: &ZoneConfig) -> Result<Outcome, Outcome> {
    let unsupported = pass(counter::PASS_UNSUPPORTED);
    let malformed = pass(counter::PASS_MALFORMED);

    let dns = layers.l4 + UDP_HLEN;
    let hdr = ptr_at::<[u8; DNS_HLEN]>(ctx, dns).ok_or(pass(counter::PASS_MALFORMED))?;
    // SAFETY: bounds checked by ptr_at.
    let hdr = unsafe { &*hdr };
    let id = u16::from_be_bytes([hdr[0], hdr[1]]);
    let qflags = u16::from_be_bytes([hdr[2], hdr[3]]);
    let qdcount = u16::from_be_bytes([hdr[4], hdr[5]]);
    let ancount = u16::from_be_bytes([hdr[6], hdr[7]]);
    let nscount = u16::from_be_bytes([hdr[8], hdr[9]]);
    let arcount = u16::from_be_bytes([hdr[10], hdr[11]]);
    // Never answer a response (no reflection loops), another opcode, or a truncated query.
    if qflags & (FLAG_QR | OPCODE_MASK | FLAG_TC) != 0 {
        return Err(unsupported);
    }
    if qdcount != 1 || ancount != 0 || nscount != 0 || arcount > 1 {
        return Err(unsupported);
    }

    if config.flags & CONFIG_SYNCED == 0 {
        return Err(pass(counter::PASS_NOT_SYNCED));
    }

    // --- question -----------------------------------------------------------------------------
    let scratch = SCRATCH
        .get_ptr_mut(0)
        .ok_or(pass(counter::PASS_MALFORMED))?;
    // SAFETY: per-CPU scratch, not shared with any other program run.
    let scratch = unsafe { &mut *scratch };

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

    // --- lookup -------------------------------------------------------------------------------
    scratch.key.qtype = qtype;
    let mut value = lookup(scratch, name_len);
    if value.is_none() {
        scratch.key.qtype = QTYPE_OTHER;
        value = lookup(scratch, name_len);
    }

    let mut nxdomain = false;
    let (sections, flags, an, ns, ar, data_len) = match value {
        Some(v) => {
            // SAFETY: map values stay valid for the duration of the program run.
            let v = unsafe { &*v };
            if v.expires_ns != 0 && unsafe { bpf_ktime_get_ns() } > v.expires_ns {
                return Err(pass(counter::PASS_EXPIRED));
            }
            match v.action {
                ACTION_ANSWER => (
                    Sections::Data(v),
                    v.flags,
                    v.ancount,
                    v.nscount,
                    v.arcount,
                    v.data_len as usize,
                ),
                ACTION_NODATA => {
                    if zone_suffix(scratch, config, name_len).is_none() {
                        return Err(pass(counter::PASS_USERSPACE));
                    }
                    (Sections::Soa, config.nodata_flags, 0, 1, 0, SOA_RECORD_LEN)
                }
                ACTION_PASS => return Err(pass(counter::PASS_USERSPACE)),
                _ => return Err(pass(counter::PASS_USERSPACE)),
            }
        }
        None => {
            // Every existing name of the zone is in the maps: a name below the zone that is
            // not does not exist. Pod names are synthesised per query by userspace.
            if config.flags & CONFIG_NXDOMAIN == 0
                || zone_suffix(scratch, config, name_len) != Some(false)
            {
                return Err(pass(counter::PASS_MISS));
            }
            nxdomain = true;
            (
                Sections::Soa,
                config.nxdomain_flags,
                0,
                1,
                0,
                SOA_RECORD_LEN,
            )
        }
    };
    let counter_on_success = match sections {
        Sections::Data(_) => counter::ANSWERED,
        Sections::Soa if nxdomain => counter::ANSWERED_NXDOMAIN,
        Sections::Soa => counter::ANSWERED_NODATA,
    };

    let opt_len = if edns { OPT_RECORD_LEN } else { 0 };
    let reply_len = DNS_HLEN + name_len + 4 + data_len + opt_len;
    if reply_len > client_limit {
        return Err(pass(counter::PASS_TOO_BIG));
    }

    // --- checksum of the reply, from parts --------------------------------------------------
    let rflags = FLAG_QR | (qflags & (FLAG_RD | FLAG_CD)) | flags;
    let ar_total = ar + edns as u16;
    let udp_len = (UDP_HLEN + reply_len) as u32;
    // Pseudo-header: addresses, protocol, length. UDP header: ports (swapped, same sum),
    // length, checksum 0. IPv6's pseudo-header length is 32 bits; its upper half is zero.
    let mut sum: u32 = layers.addr_sum + IPPROTO_UDP as u32 + udp_len;
    sum += read_be16(ctx, layers.l4).ok_or(pass(counter::PASS_MALFORMED))? as u32;
    sum += read_be16(ctx, layers.l4 + 2).ok_or(pass(counter::PASS_MALFORMED))? as u32;
    sum += udp_len;
    // DNS header.
    sum += id as u32 + rflags as u32 + 1 + an as u32 + ns as u32 + ar_total as u32;
    // Question: name bytes as received (even start), then type and class after the name.
    sum += parsed.csum;
    let sections_off = DNS_HLEN + name_len + 4;
    // Negative answers only exist for names in the zone (checked above), so this is the
    // offset of the zone's name inside the question.
    let zone_ptr =
        (0xc000 | ((DNS_HLEN + name_len).saturating_sub(config.zone_len as usize) & 0x3fff)) as u16;
    match sections {
        Sections::Data(v) => {
            // SAFETY: see above.
            sum += at_parity(unsafe { (*v).data_csum } as u32, sections_off);
        }
        Sections::Soa => {
            sum += at_parity(config.soa_csum as u32, sections_off);
            sum += at_parity(zone_ptr as u32, sections_off + SOA_PTR_OFFSETS[0]);
            sum += at_parity(zone_ptr as u32, sections_off + SOA_PTR_OFFSETS[1]);
            sum += at_parity(zone_ptr as u32, sections_off + SOA_PTR_OFFSETS[2]);
        }
    }
    let opt_bytes = opt_record(do_bit);
    if edns {
        sum += at_parity(csum_bytes(&opt_bytes), sections_off + data_len);
    }
    let mut udp_csum = !fold(sum);
    if udp_csum == 0 {
        udp_csum = 0xffff;
    }

    // --- rewrite ------------------------------------------------------------------------------
    // Until the resize nothing has changed: every failure so far passed the query up intact.
    let frame_len = ctx.data_end() - ctx.data();
    let new_frame_len = layers.l4 + UDP_HLEN + reply_len;
    let delta = new_frame_len as i32 - frame_len as i32;
    if delta != 0 {
        // SAFETY: the helper validates the new size against the frame.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
            return Err(pass(counter::PASS_NO_ROOM));
        }
    }
    // From here on a failure leaves a half-written packet: drop it.
    let write_error = Outcome {
        action: xdp_action::XDP_DROP,
        counter: counter::ERROR_WRITE,
    };

    let dns_sections = (dns + sections_off) as u32;
    match sections {
        Sections::Data(v) => {
            // SAFETY: see above.
            let v = unsafe { &*v };
            if !store_data(ctx, v, dns_sections, data_len) {
                return Err(write_error);
            }
        }
        Sections::Soa => {
            if !store(ctx, dns_sections, config.soa.as_ptr(), SOA_RECORD_LEN) {
                return Err(write_error);
            }
            let ptr = zone_ptr.to_be_bytes();
            for slot in [SOA_PTR_OFFSETS[0], SOA_PTR_OFFSETS[1], SOA_PTR_OFFSETS[2]] {
                if !store(ctx, dns_sections + slot as u32, ptr.as_ptr(), 2) {
                    return Err(write_error);
                }
            }
        }
    }
    if edns
        && !store(
            ctx,
            dns_sections + data_len as u32,
            opt_bytes.as_ptr(),
            OPT_RECORD_LEN,
        )
    {
        return Err(write_error);
    }

    if rewrite_headers(ctx, layers, reply_len, rflags, an, ns, ar_total, udp_csum).is_none() {
        return Err(write_error);
    }
    Ok(Outcome {
        action: xdp_action::XDP_TX,
        counter: counter_on_success,
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
    // SAFETY: plain field of the scratch value.
    let len = unsafe { core::ptr::read_volatile(&scratch.name_len) } as usize;
    if len == 0 || len > MAX_NAME_LEN || len > load {
        return Err(counter::PASS_MALFORMED);
    }
    // Copy into the key, lowercased eight bytes at a time. Length bytes (1..=63) and bytes
    // outside A..Z are left as they are, so labels need no separate treatment; the bytes of the
    // last word past the name are masked off (the key must be zero there).
    let words = len.div_ceil(8);
    let mut w = 0;
    while w < LONG_NAME_LEN / 8 {
        if w >= words {
            break;
        }
        let at_byte = bounded(w * 8, RAW_LEN - 8);
        // SAFETY: `raw` is 8-aligned with RAW_LEN bytes; bounded() keeps the word inside.
        let x = unsafe { scratch.raw.as_ptr().add(at_byte).cast::<u64>().read() };
        let mut y = lowercase8(x);
        let rest = len - w * 8;
        if rest < 8 {
            // Little-endian: the first bytes in memory are the low ones.
            y &= (1u64 << (rest * 8)) - 1;
        }
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
    let csum = fold(sum as u32).swap_bytes() as u32;
    Ok(ParsedName { len, csum })
}

#[inline(always)]
// Passing the 260-byte key by value would copy it onto the 512-byte BPF stack.
#[allow(clippy::needless_borrows_for_generic_args)]
fn lookup(scratch: &Scratch, name_len: usize) -> Option<*const AnswerValue> {
    if name_len <= SHORT_NAME_LEN {
        // SAFETY: LongKey starts with a ShortKey's layout (asserted in dns-common), and the
        // bytes past a short name are zero.
        let key = unsafe { &*(&scratch.key as *const LongKey as *const ShortKey) };
        ANSWERS_SHORT.get_ptr(key)
    } else {
        ANSWERS_LONG.get_ptr(&scratch.key)
    }
}

#[inline(always)]
fn label_starts_at(scratch: &Scratch, off: usize) -> bool {
    let word = at(&scratch.label_starts, off >> 6);
    word & (1u64 << (off & 63)) != 0
}

/// `None`: the name is not the cluster zone or below it. `Some(under_pod)`: it is, and
/// `under_pod` says whether it is below `pod.<zone>`.
#[inline(always)]
fn zone_suffix(scratch: &Scratch, config: &ZoneConfig, name_len: usize) -> Option<bool> {
    let zone_len = config.zone_len as usize;
    if zone_len == 0 || zone_len > name_len || zone_len > LONG_NAME_LEN {
        return None;
    }
    // Bounded so that the compiler keeps it a non-negative index (the verifier rejects a
    // pointer moved backwards by a variable amount).
    let start = bounded(name_len - zone_len, LONG_NAME_LEN - 1);
    if !label_starts_at(scratch, start) {
        return None;
    }
    let mut j = 0;
    while j < LONG_NAME_LEN {
        if j >= zone_len {
            break;
        }
        // start + j < name_len <= 255: the mask never changes the index, it only keeps the
        // verifier's bounds on the value actually used for the access.
        if at(&scratch.key.name, start + j) != at(&config.zone, j) {
            return None;
        }
        j += 1;
    }
    // The label right before the zone is `pod` and something comes before it.
    let name_at = |i: usize| at(&scratch.key.name, i);
    let under_pod = start > 4
        && label_starts_at(scratch, start - 4)
        && name_at(start - 4) == 3
        && name_at(start - 3) == b'p'
        && name_at(start - 2) == b'o'
        && name_at(start - 1) == b'd';
    Some(under_pod)
}

/// The OPT record of every EDNS reply: root owner, our UDP size, version 0, DO echoed.
#[inline(always)]
fn opt_record(do_bit: u16) -> [u8; OPT_RECORD_LEN + 1] {
    let size = EDNS_UDP_SIZE.to_be_bytes();
    let flags = do_bit.to_be_bytes();
    [
        0,
        0,
        TYPE_OPT as u8,
        size[0],
        size[1],
        0,
        0,
        flags[0],
        flags[1],
        0,
        0,
        0,
    ]
}

/// Partial sum of bytes from an even offset (the last, 12th byte of the OPT buffer is padding
/// and zero).
#[inline(always)]
fn csum_bytes(b: &[u8; OPT_RECORD_LEN + 1]) -> u32 {
    let mut s = 0u32;
    let mut i = 0;
    while i < b.len() {
        s += u16::from_be_bytes([b[i], b[i + 1]]) as u32;
        i += 2;
    }
    s
}

/// A partial sum computed from an even offset, placed at `offset` (RFC 1071: bytes one
/// position off swap the bytes of the sum).
#[inline(always)]
fn at_parity(sum: u32, offset: usize) -> u32 {
    let s = fold(sum) as u32;
    if offset & 1 == 0 {
        s
    } else {
        ((s & 0xff) << 8) | (s >> 8)
    }
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

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

#[inline(always)]
fn store(ctx: &XdpContext, off: u32, src: *const u8, len: usize) -> bool {
    // SAFETY: `src` points at `len` readable bytes; the helper checks the packet bounds.
    unsafe { bpf_xdp_store_bytes(ctx.ctx, off, src as *mut _, len as u32) == 0 }
}

#[inline(always)]
fn store_data(ctx: &XdpContext, v: &AnswerValue, off: u32, len: usize) -> bool {
    if len == 0 {
        return true;
    }
    // Each class its own copy, so the verifier sees a constant bound for each.
    match v.blob >> BLOB_CLASS_SHIFT {
        0 => len <= INLINE_DATA_LEN && store(ctx, off, v.data.as_ptr(), len),
        BLOB_CLASS_S => store_blob(&BLOBS_S, ctx, v.blob, off, len),
        BLOB_CLASS_M => store_blob(&BLOBS_M, ctx, v.blob, off, len),
        _ => store_blob(&BLOBS_L, ctx, v.blob, off, len),
    }
}

#[inline(always)]
fn store_blob<const N: usize>(
    map: &HashMap<u32, Blob<N>>,
    ctx: &XdpContext,
    id: u32,
    off: u32,
    len: usize,
) -> bool {
    let Some(blob) = map.get_ptr(id) else {
        return false;
    };
    // SAFETY: map values stay valid for the duration of the program run.
    let blob = unsafe { &*blob };
    len <= N && store(ctx, off, blob.data.as_ptr(), len)
}

/// Turns the query's headers into the reply's: swap addresses and ports, set lengths, TTL and
/// checksums, then the DNS header.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rewrite_headers(
    ctx: &XdpContext,
    layers: &Layers,
    reply_len: usize,
    rflags: u16,
    an: u16,
    ns: u16,
    ar: u16,
    udp_csum: u16,
) -> Option<()> {
    let eth = ptr_at::<[u8; ETH_HLEN]>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let eth = unsafe { &mut *eth };
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&eth[0..6]);
    eth.copy_within(6..12, 0);
    eth[6..12].copy_from_slice(&mac);

    let udp_len = (UDP_HLEN + reply_len) as u16;
    if layers.ipv6 {
        let ip = ptr_at::<[u8; IPV6_HLEN]>(ctx, ETH_HLEN)?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &mut *ip };
        ip[4..6].copy_from_slice(&udp_len.to_be_bytes());
        ip[7] = REPLY_TTL;
        let mut addr = [0u8; 16];
        addr.copy_from_slice(&ip[8..24]);
        ip.copy_within(24..40, 8);
        ip[24..40].copy_from_slice(&addr);
    } else {
        let ip = ptr_at::<[u8; IPV4_HLEN]>(ctx, ETH_HLEN)?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &mut *ip };
        ip[2..4].copy_from_slice(&(IPV4_HLEN as u16 + udp_len).to_be_bytes());
        // A fresh datagram of at most 1232 bytes: no fragments, don't fragment.
        ip[6] = 0x40;
        ip[7] = 0;
        ip[8] = REPLY_TTL;
        let mut addr = [0u8; 4];
        addr.copy_from_slice(&ip[12..16]);
        ip.copy_within(16..20, 12);
        ip[16..20].copy_from_slice(&addr);
        ip[10] = 0;
        ip[11] = 0;
        let mut sum = 0u32;
        let mut i = 0;
        while i < IPV4_HLEN {
            sum += u16::from_be_bytes([ip[i], ip[i + 1]]) as u32;
            i += 2;
        }
        ip[10..12].copy_from_slice(&(!fold(sum)).to_be_bytes());
    }

    let udp = ptr_at::<[u8; UDP_HLEN]>(ctx, layers.l4)?;
    // SAFETY: bounds checked by ptr_at.
    let udp = unsafe { &mut *udp };
    let mut port = [0u8; 2];
    port.copy_from_slice(&udp[0..2]);
    udp.copy_within(2..4, 0);
    udp[2..4].copy_from_slice(&port);
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    udp[6..8].copy_from_slice(&udp_csum.to_be_bytes());

    let dns = layers.l4 + UDP_HLEN;
    write_be16(ctx, dns + 2, rflags)?;
    write_be16(ctx, dns + 4, 1)?;
    write_be16(ctx, dns + 6, an)?;
    write_be16(ctx, dns + 8, ns)?;
    write_be16(ctx, dns + 10, ar)?;
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
