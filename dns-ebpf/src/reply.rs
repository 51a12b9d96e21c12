//! The reply: the UDP checksum computed from parts before anything is written, then the query
//! rewritten in place — frame resized, sections and OPT record after the question, addresses
//! and ports swapped, headers and counts set. (The TTLs of a cached answer are counted down
//! after, by `ttl.rs`; their share of the checksum is added here.)

use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_xdp_adjust_tail, maps::HashMap,
    programs::XdpContext,
};
use dns_common::{
    BLOB_CLASS_M, BLOB_CLASS_S, BLOB_CLASS_SHIFT, Blob, EDNS_UDP_SIZE, FLAG_CD, FLAG_QR, FLAG_RD,
    INLINE_DATA_LEN, OPT_RECORD_LEN, SOA_PTR_OFFSETS, SOA_RECORD_LEN, ZoneConfig, counter,
};

use crate::{
    Outcome,
    csum::{at_parity, fold},
    layers::Layers,
    lookup::{Answer, Sections},
    maps::{BLOBS_L, BLOBS_M, BLOBS_S, Scratch},
    packet::{
        DNS_HLEN, ETH_HLEN, IPPROTO_UDP, IPV4_HLEN, IPV6_HLEN, TYPE_OPT, UDP_HLEN, ptr_at,
        read_be16, store, write_be16,
    },
    pass,
    question::Query,
};

/// TTL of the reply's IP header.
const REPLY_TTL: u8 = 64;

/// Rewrites the query into the reply and sends it back (`XDP_TX`); passes it up untouched
/// when it cannot (too big for the client, no room in the frame).
#[inline(always)]
pub fn send(
    ctx: &XdpContext,
    layers: &Layers,
    config: &ZoneConfig,
    scratch: &mut Scratch,
    q: &Query,
    a: &Answer,
) -> Result<Outcome, Outcome> {
    let name_len = scratch.name_len();
    let (edns, data_len) = (q.edns, a.data_len);
    let (an, ns, ar) = (a.an, a.ns, a.ar);
    let dns = layers.l4 + UDP_HLEN;
    let opt_len = if edns { OPT_RECORD_LEN } else { 0 };
    let reply_len = DNS_HLEN + name_len + 4 + data_len + opt_len;
    if reply_len > q.client_limit {
        return Err(pass(counter::PASS_TOO_BIG));
    }

    // --- checksum of the reply, from parts --------------------------------------------------
    let rflags = FLAG_QR | (q.flags & (FLAG_RD | FLAG_CD)) | a.flags;
    let ar_total = ar + edns as u16;
    let udp_len = (UDP_HLEN + reply_len) as u32;
    // Pseudo-header: addresses, protocol, length. UDP header: ports (swapped, same sum),
    // length, checksum 0. IPv6's pseudo-header length is 32 bits; its upper half is zero.
    let mut sum: u32 = layers.addr_sum + IPPROTO_UDP as u32 + udp_len;
    sum += read_be16(ctx, layers.l4).ok_or(pass(counter::PASS_MALFORMED))? as u32;
    sum += read_be16(ctx, layers.l4 + 2).ok_or(pass(counter::PASS_MALFORMED))? as u32;
    sum += udp_len;
    // DNS header.
    sum += q.id as u32 + rflags as u32 + 1 + an as u32 + ns as u32 + ar_total as u32;
    // Question: name bytes as received (even start), then type and class after the name.
    sum += q.csum;
    let sections_off = DNS_HLEN + name_len + 4;
    // Negative answers only exist for names in the zone (checked above), so this is the
    // offset of the zone's name inside the question.
    let zone_ptr =
        (0xc000 | ((DNS_HLEN + name_len).saturating_sub(config.zone_len as usize) & 0x3fff)) as u16;
    match a.sections {
        Sections::Data => {
            let v = &scratch.value;
            sum += at_parity(v.data_csum as u32, sections_off);
            // TTL fields to count down are zero in the bytes and their sum: add the seconds
            // left, once per field, at each field's parity.
            let fields = scratch.ttl_fields as u32;
            if fields != 0 {
                let ttl = scratch.ttl as u32;
                let per_field = (ttl >> 16) + (ttl & 0xffff);
                let odd = (v.ttl_odd as u32).min(fields);
                sum += at_parity((fields - odd) * per_field, sections_off);
                sum += at_parity(odd * per_field, sections_off + 1);
            }
        }
        Sections::Soa => {
            sum += at_parity(config.soa_csum as u32, sections_off);
            sum += at_parity(zone_ptr as u32, sections_off + SOA_PTR_OFFSETS[0]);
            sum += at_parity(zone_ptr as u32, sections_off + SOA_PTR_OFFSETS[1]);
            sum += at_parity(zone_ptr as u32, sections_off + SOA_PTR_OFFSETS[2]);
        }
    }
    let opt_bytes = opt_record(q.do_bit);
    if edns {
        sum += at_parity(crate::csum::opt_bytes(&opt_bytes), sections_off + data_len);
    }
    let mut udp_csum = !fold(sum);
    if udp_csum == 0 {
        udp_csum = 0xffff;
    }

    // Where the section bytes come from, found before anything changes: a blob missing now (the
    // entry was replaced and its blob deleted since the copy) passes the query up intact.
    let data = match a.sections {
        Sections::Data => Some(data_source(scratch, data_len)?),
        Sections::Soa => None,
    };

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
    scratch.ttl_at = dns_sections as u64;
    match data {
        Some(src) => {
            if data_len != 0 && !store(ctx, dns_sections, src, data_len) {
                return Err(write_error);
            }
        }
        None => {
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
        counter: a.counter,
    })
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

/// The section bytes of the copied entry: inline in the copy, or in its blob. A blob's memory
/// stays its own while the program runs: the agent never rewrites a blob, and deletes one only
/// long after no entry points at it (`dns_common::BLOB_RETIRE_NS`).
#[inline(always)]
fn data_source(scratch: &Scratch, len: usize) -> Result<*const u8, Outcome> {
    let v = &scratch.value;
    // Each class its own arm, so the verifier sees a constant bound for each.
    match v.blob >> BLOB_CLASS_SHIFT {
        0 if len <= INLINE_DATA_LEN => Ok(v.data.as_ptr()),
        0 => Err(pass(counter::PASS_USERSPACE)),
        BLOB_CLASS_S => blob(&BLOBS_S, v.blob, len),
        BLOB_CLASS_M => blob(&BLOBS_M, v.blob, len),
        _ => blob(&BLOBS_L, v.blob, len),
    }
}

#[inline(always)]
fn blob<const N: usize>(
    map: &HashMap<u32, Blob<N>>,
    id: u32,
    len: usize,
) -> Result<*const u8, Outcome> {
    if len > N {
        return Err(pass(counter::PASS_USERSPACE));
    }
    let blob = map.get_ptr(id).ok_or(pass(counter::PASS_RACE))?;
    // SAFETY: a pointer into the map value just looked up; not dereferenced here.
    Ok(unsafe { (*blob).data.as_ptr() })
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
        let sum = crate::csum::words(ip, 0, IPV4_HLEN);
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
