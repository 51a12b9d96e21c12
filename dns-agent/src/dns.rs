//! DNS messages as the userspace server sees them: parsing queries (the same rules as the XDP
//! program, plus what only userspace answers) and building replies that splice pre-encoded
//! sections after the question exactly as the kernel does.

use dns_common::{
    CLASSIC_UDP_LIMIT, EDNS_UDP_SIZE, FLAG_CD, FLAG_QR, FLAG_RD, FLAG_TC, MAX_LABEL_LEN,
    MAX_NAME_LEN, MAX_UDP_REPLY, OPCODE_MASK, OPT_RECORD_LEN,
};

use crate::zone::name::WireName;

pub const RCODE_FORMERR: u16 = 1;
pub const RCODE_SERVFAIL: u16 = 2;
pub const RCODE_NXDOMAIN: u16 = 3;
pub const RCODE_NOTIMP: u16 = 4;
pub const RCODE_REFUSED: u16 = 5;
/// Extended RCODE 16 (BADVERS) is 1 in the OPT record's upper RCODE bits, 0 in the header.
pub const EXT_RCODE_BADVERS: u8 = 1;

/// The transport a query came over: UDP replies are limited in size, TCP ones are not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

pub const TYPE_OPT: u16 = 41;
pub const CLASS_IN: u16 = 1;

/// The EDNS part of a query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edns {
    pub udp_size: u16,
    pub version: u8,
    pub dnssec_ok: bool,
}

/// A query the server can answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query<'a> {
    pub id: u16,
    pub flags: u16,
    /// The question as received: name (client's case), type, class.
    pub question: &'a [u8],
    /// The name lowercased, wire format.
    pub qname: WireName,
    pub qtype: u16,
    pub qclass: u16,
    pub edns: Option<Edns>,
}

/// Why a message gets no ordinary answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Reject {
    /// Not worth a reply: too short to carry an ID, or a response (never answer those).
    Drop,
    /// Reply with this RCODE (and the question, when it could be read).
    Error {
        id: u16,
        flags: u16,
        rcode: u16,
        question: Option<(usize, usize)>,
    },
}

/// Reads a name starting at `off` without following pointers in the question;
/// returns (lowercased wire name, offset after it).
fn read_question_name(msg: &[u8], mut off: usize) -> Option<(WireName, usize)> {
    let start = off;
    let mut name = Vec::with_capacity(64);
    loop {
        let len = *msg.get(off)? as usize;
        if len == 0 {
            name.push(0);
            off += 1;
            break;
        }
        if len > MAX_LABEL_LEN {
            return None;
        }
        let label = msg.get(off + 1..off + 1 + len)?;
        name.push(len as u8);
        name.extend(label.iter().map(u8::to_ascii_lowercase));
        off += 1 + len;
        if off - start > MAX_NAME_LEN {
            return None;
        }
    }
    (name.len() <= MAX_NAME_LEN).then_some((name, off))
}

/// Skips a possibly compressed name; returns the offset after it. 128 labels is more than any
/// legal name has: a bound, not a pointer chase.
pub(crate) fn skip_name(msg: &[u8], mut off: usize) -> Option<usize> {
    for _ in 0..128 {
        let len = *msg.get(off)?;
        match len {
            0 => return Some(off + 1),
            l if l & 0xc0 == 0xc0 => {
                msg.get(off + 1)?;
                return Some(off + 2);
            }
            l if l as usize > MAX_LABEL_LEN => return None,
            l => off += 1 + l as usize,
        }
    }
    None
}

fn be16(msg: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*msg.get(off)?, *msg.get(off + 1)?]))
}

/// Parses a query. Everything a well-behaved client sends parses; anything else gets the
/// error reply the RFCs ask for.
pub fn parse_query(msg: &[u8]) -> Result<Query<'_>, Reject> {
    if msg.len() < 12 {
        return Err(Reject::Drop);
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    if flags & FLAG_QR != 0 {
        return Err(Reject::Drop);
    }
    let error = |rcode, question| Reject::Error {
        id,
        flags,
        rcode,
        question,
    };
    if flags & OPCODE_MASK != 0 {
        return Err(error(RCODE_NOTIMP, None));
    }
    let qdcount = u16::from_be_bytes([msg[4], msg[5]]);
    let ancount = u16::from_be_bytes([msg[6], msg[7]]);
    let nscount = u16::from_be_bytes([msg[8], msg[9]]);
    let arcount = u16::from_be_bytes([msg[10], msg[11]]);
    if qdcount != 1 {
        return Err(error(RCODE_FORMERR, None));
    }
    let (qname, off) = read_question_name(msg, 12).ok_or(error(RCODE_FORMERR, None))?;
    let qtype = be16(msg, off).ok_or(error(RCODE_FORMERR, None))?;
    let qclass = be16(msg, off + 2).ok_or(error(RCODE_FORMERR, None))?;
    let q_end = off + 4;
    let question = Some((12, q_end));
    // Walk the other sections: a malformed record means a malformed message.
    let mut off = q_end;
    let mut edns = None;
    let total = ancount as usize + nscount as usize + arcount as usize;
    for i in 0..total {
        let name_start = off;
        off = skip_name(msg, off).ok_or(error(RCODE_FORMERR, question))?;
        let rtype = be16(msg, off).ok_or(error(RCODE_FORMERR, question))?;
        let rclass = be16(msg, off + 2).ok_or(error(RCODE_FORMERR, question))?;
        let ttl = msg
            .get(off + 4..off + 8)
            .ok_or(error(RCODE_FORMERR, question))?;
        let rdlen = be16(msg, off + 8).ok_or(error(RCODE_FORMERR, question))? as usize;
        let rdata_end = off + 10 + rdlen;
        if rdata_end > msg.len() {
            return Err(error(RCODE_FORMERR, question));
        }
        if rtype == TYPE_OPT {
            // One OPT, with the root name, in the additional section (RFC 6891 §6.1.1).
            let in_additional = i >= ancount as usize + nscount as usize;
            if edns.is_some() || !in_additional || msg[name_start] != 0 || off != name_start + 1 {
                return Err(error(RCODE_FORMERR, question));
            }
            edns = Some(Edns {
                udp_size: rclass,
                version: ttl[1],
                dnssec_ok: ttl[2] & 0x80 != 0,
            });
        }
        off = rdata_end;
    }
    if off != msg.len() {
        return Err(error(RCODE_FORMERR, question));
    }
    Ok(Query {
        id,
        flags,
        question: &msg[12..q_end],
        qname,
        qtype,
        qclass,
        edns,
    })
}

impl Query<'_> {
    /// The largest UDP reply the client takes, capped at what xdns ever sends over UDP.
    pub fn udp_limit(&self) -> usize {
        let client = match self.edns {
            Some(e) => (e.udp_size as usize).max(CLASSIC_UDP_LIMIT),
            None => CLASSIC_UDP_LIMIT,
        };
        client.min(MAX_UDP_REPLY)
    }
}

/// The OPT record of a reply: our UDP size, the extended RCODE bits, version 0, DO echoed.
pub fn opt_record(ext_rcode: u8, dnssec_ok: bool) -> [u8; OPT_RECORD_LEN] {
    let size = EDNS_UDP_SIZE.to_be_bytes();
    [
        0,
        0,
        TYPE_OPT as u8,
        size[0],
        size[1],
        ext_rcode,
        0,
        if dnssec_ok { 0x80 } else { 0 },
        0,
        0,
        0,
    ]
}

/// Sections to put after the question.
#[derive(Clone, Copy, Debug)]
pub struct Body<'a> {
    /// Header bits besides QR, TC, RD, CD and the opcode: AA, RA, RCODE.
    pub flags: u16,
    /// Upper bits of an extended RCODE, sent in the OPT record.
    pub ext_rcode: u8,
    pub ancount: u16,
    pub nscount: u16,
    pub arcount: u16,
    pub data: &'a [u8],
}

impl Body<'_> {
    pub const fn empty(flags: u16) -> Body<'static> {
        Body {
            flags,
            ext_rcode: 0,
            ancount: 0,
            nscount: 0,
            arcount: 0,
            data: &[],
        }
    }

    pub const fn sections(
        flags: u16,
        ancount: u16,
        nscount: u16,
        arcount: u16,
        data: &[u8],
    ) -> Body<'_> {
        Body {
            flags,
            ext_rcode: 0,
            ancount,
            nscount,
            arcount,
            data,
        }
    }
}

/// The reply to `query`: header, the question as received, the sections, OPT when the query
/// had one. With `limit`, a reply that would exceed it is cut to header, question and OPT with
/// TC set (RFC 2181 §9: the client retries over TCP).
pub fn build_reply(query: &Query<'_>, body: Body<'_>, limit: Option<usize>) -> Vec<u8> {
    let mut out = Vec::new();
    build_reply_into(query, body, limit, &mut out);
    out
}

/// [`build_reply`], appended to `out` (whose buffer the serving loops reuse).
pub fn build_reply_into(
    query: &Query<'_>,
    body: Body<'_>,
    limit: Option<usize>,
    out: &mut Vec<u8>,
) {
    let opt_len = if query.edns.is_some() {
        OPT_RECORD_LEN
    } else {
        0
    };
    let full = 12 + query.question.len() + body.data.len() + opt_len;
    let (body, tc) = match limit {
        Some(l) if full > l => (
            Body {
                ext_rcode: body.ext_rcode,
                ..Body::empty(body.flags)
            },
            FLAG_TC,
        ),
        _ => (body, 0),
    };
    let own = !(FLAG_QR | FLAG_TC | FLAG_RD | FLAG_CD | OPCODE_MASK);
    let flags = FLAG_QR | (query.flags & (FLAG_RD | FLAG_CD)) | (body.flags & own) | tc;
    out.reserve(full.min(limit.unwrap_or(full)));
    out.extend_from_slice(&query.id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&body.ancount.to_be_bytes());
    out.extend_from_slice(&body.nscount.to_be_bytes());
    out.extend_from_slice(&(body.arcount + query.edns.is_some() as u16).to_be_bytes());
    out.extend_from_slice(query.question);
    out.extend_from_slice(body.data);
    if let Some(e) = query.edns {
        out.extend_from_slice(&opt_record(body.ext_rcode, e.dnssec_ok));
    }
}

/// An error reply for a message that did not parse as a query we answer.
pub fn build_error(
    msg: &[u8],
    id: u16,
    flags: u16,
    rcode: u16,
    question: Option<(usize, usize)>,
) -> Vec<u8> {
    let mut out = Vec::new();
    build_error_into(msg, id, flags, rcode, question, &mut out);
    out
}

/// [`build_error`], appended to `out`.
pub fn build_error_into(
    msg: &[u8],
    id: u16,
    flags: u16,
    rcode: u16,
    question: Option<(usize, usize)>,
    out: &mut Vec<u8>,
) {
    let out_flags = FLAG_QR | (flags & (OPCODE_MASK | FLAG_RD | FLAG_CD)) | rcode;
    out.reserve(12 + question.map_or(0, |(a, b)| b - a));
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&out_flags.to_be_bytes());
    out.extend_from_slice(&(question.is_some() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    if let Some((a, b)) = question {
        out.extend_from_slice(&msg[a..b]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query_bytes(name: &str, qtype: u16, edns: Option<(u16, u8)>) -> Vec<u8> {
        let mut m = vec![
            0x12,
            0x34,
            0x01,
            0x00,
            0,
            1,
            0,
            0,
            0,
            0,
            0,
            edns.is_some() as u8,
        ];
        m.extend(crate::zone::name::wire_from_labels(&name.split('.').collect::<Vec<_>>()).iter());
        // keep the client's case in the question
        let start = 12;
        let mut i = start;
        for label in name.split('.') {
            m[i + 1..i + 1 + label.len()].copy_from_slice(label.as_bytes());
            i += 1 + label.len();
        }
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        if let Some((size, version)) = edns {
            m.extend_from_slice(&[0, 0, 41]);
            m.extend_from_slice(&size.to_be_bytes());
            m.extend_from_slice(&[0, version, 0x80, 0, 0, 0]);
        }
        m
    }

    #[test]
    fn parses_and_lowercases() {
        let m = query_bytes("Web.Default.svc.cluster.local", 1, Some((4096, 0)));
        let q = parse_query(&m).unwrap();
        assert_eq!(q.id, 0x1234);
        assert_eq!(q.qtype, 1);
        assert_eq!(&q.qname[..4], b"\x03web");
        assert_eq!(&q.question[..4], b"\x03Web");
        assert_eq!(
            q.edns,
            Some(Edns {
                udp_size: 4096,
                version: 0,
                dnssec_ok: true
            })
        );
        assert_eq!(q.udp_limit(), MAX_UDP_REPLY);
    }

    #[test]
    fn rejects_what_it_must() {
        assert_eq!(parse_query(&[0; 5]), Err(Reject::Drop));
        let mut resp = query_bytes("a.b", 1, None);
        resp[2] |= 0x80;
        assert_eq!(parse_query(&resp), Err(Reject::Drop));
        let mut notify = query_bytes("a.b", 1, None);
        notify[2] |= 4 << 3;
        assert!(matches!(
            parse_query(&notify),
            Err(Reject::Error {
                rcode: RCODE_NOTIMP,
                ..
            })
        ));
        let mut trailing = query_bytes("a.b", 1, None);
        trailing.push(0);
        assert!(matches!(
            parse_query(&trailing),
            Err(Reject::Error {
                rcode: RCODE_FORMERR,
                ..
            })
        ));
        let mut two_q = query_bytes("a.b", 1, None);
        two_q[5] = 2;
        assert!(matches!(
            parse_query(&two_q),
            Err(Reject::Error {
                rcode: RCODE_FORMERR,
                ..
            })
        ));
    }

    #[test]
    fn truncates_to_the_limit() {
        let m = query_bytes("a.b", 1, None);
        let q = parse_query(&m).unwrap();
        let data = vec![0u8; 600];
        let body = Body::sections(0x0480, 30, 0, 0, &data);
        let r = build_reply(&q, body, Some(q.udp_limit()));
        assert_eq!(r.len(), 12 + q.question.len());
        assert_eq!(u16::from_be_bytes([r[2], r[3]]) & FLAG_TC, FLAG_TC);
        assert_eq!(&r[6..8], &[0, 0]);
        let r = build_reply(&q, body, None);
        assert_eq!(r.len(), 12 + q.question.len() + 600);
    }

    #[test]
    fn garbage_never_panics_and_never_parses_wrong() {
        // Mutations of a valid query and random bytes: parsing either fails cleanly or gives
        // a query whose question is exactly the bytes after the header.
        let base = query_bytes("web.shop.svc.cluster.local", 1, Some((1232, 0)));
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for i in 0..20_000 {
            let msg: Vec<u8> = if i % 2 == 0 {
                let mut m = base.clone();
                for _ in 0..(1 + next() % 3) {
                    let at = (next() as usize) % m.len();
                    m[at] = next() as u8;
                }
                m
            } else {
                (0..(next() % 64)).map(|_| next() as u8).collect()
            };
            if let Ok(q) = parse_query(&msg) {
                assert_eq!(&msg[12..12 + q.question.len()], q.question);
                assert_eq!(q.question.len(), q.qname.len() + 4);
                let reply = build_reply(&q, Body::empty(0), Some(q.udp_limit()));
                assert!(reply.len() <= q.udp_limit().max(12 + q.question.len() + OPT_RECORD_LEN));
            }
        }
    }

    #[test]
    fn badvers_sets_extended_rcode() {
        let m = query_bytes("a.b", 1, Some((1232, 1)));
        let q = parse_query(&m).unwrap();
        let r = build_reply(
            &q,
            Body {
                ext_rcode: EXT_RCODE_BADVERS,
                ..Body::empty(0)
            },
            None,
        );
        let opt = &r[r.len() - OPT_RECORD_LEN..];
        assert_eq!(opt[5], 1, "extended RCODE 16 is 1 in the OPT");
        assert_eq!(u16::from_be_bytes([r[2], r[3]]) & 0xf, 0);
    }
}
