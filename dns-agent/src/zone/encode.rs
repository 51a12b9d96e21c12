//! Pre-encoding of answers: the bytes that follow the question in a reply.
//!
//! Both the kernel map and the userspace server serve these bytes, so the two paths give the
//! same answer byte for byte. Names are compressed against the question (hickory-proto's
//! encoder), which is why sections are encoded per query name.

use dns_common::{SOA_PTR_OFFSETS, SOA_RECORD_LEN};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{Record, RecordType},
};

use super::name::to_name;

/// Answer, authority and additional sections, encoded for one question.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Sections {
    pub data: Vec<u8>,
    pub ancount: u16,
    pub nscount: u16,
    pub arcount: u16,
}

/// Encodes records as they follow the question `qname` (lowercased wire format) / `qtype`.
pub fn encode_sections(
    qname: &[u8],
    qtype: u16,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
) -> Sections {
    let mut msg = Message::new(0, MessageType::Response, OpCode::Query);
    msg.add_query(Query::query(to_name(qname), RecordType::from(qtype)));
    let (ancount, nscount, arcount) = (
        answers.len() as u16,
        authorities.len() as u16,
        additionals.len() as u16,
    );
    msg.insert_answers(answers);
    msg.insert_authorities(authorities);
    msg.insert_additionals(additionals);
    let bytes = msg
        .to_vec()
        .expect("records built by the zone model encode");
    let question_end = 12 + qname.len() + 4;
    Sections {
        data: bytes[question_end..].to_vec(),
        ancount,
        nscount,
        arcount,
    }
}

/// The zone's SOA record for negative answers, with its three compression pointers (owner,
/// end of MNAME, end of RNAME) zero; the kernel and [`soa_record`] fill them in.
pub fn soa_template(negative_ttl: u32, serial: u32) -> [u8; SOA_RECORD_LEN] {
    let mut t = [0u8; SOA_RECORD_LEN];
    let mut w = 2; // owner pointer
    let mut put = |bytes: &[u8]| {
        t[w..w + bytes.len()].copy_from_slice(bytes);
        w += bytes.len();
    };
    put(&6u16.to_be_bytes()); // SOA
    put(&1u16.to_be_bytes()); // IN
    put(&negative_ttl.to_be_bytes());
    put(&42u16.to_be_bytes()); // RDLENGTH
    put(b"\x02ns\x03dns");
    put(&[0, 0]); // -> zone
    put(b"\x0ahostmaster");
    put(&[0, 0]); // -> zone
    put(&serial.to_be_bytes());
    put(&7200u32.to_be_bytes()); // refresh
    put(&1800u32.to_be_bytes()); // retry
    put(&86400u32.to_be_bytes()); // expire
    put(&negative_ttl.to_be_bytes()); // minimum: the negative TTL (RFC 2308)
    debug_assert_eq!(w, SOA_RECORD_LEN);
    t
}

/// The SOA record of a negative answer to a question whose name has the zone's name at
/// `zone_offset` (bytes into the name): the template with its pointers filled in.
pub fn soa_record(template: &[u8; SOA_RECORD_LEN], zone_offset: usize) -> [u8; SOA_RECORD_LEN] {
    let mut r = *template;
    let ptr = (0xc000u16 | (12 + zone_offset) as u16).to_be_bytes();
    for off in SOA_PTR_OFFSETS {
        r[off..off + 2].copy_from_slice(&ptr);
    }
    r
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use hickory_proto::rr::{Name, RData, rdata::SOA};

    use super::*;
    use crate::zone::name::wire_from_dotted;

    #[test]
    fn soa_template_matches_a_compressing_encoder() {
        // What hickory-proto writes for the same SOA after the question must be what the
        // kernel builds from the template: the two paths serve identical bytes.
        let zone = Name::from_str("cluster.local.").unwrap();
        let soa = Record::from_rdata(
            zone.clone(),
            5,
            RData::SOA(SOA::new(
                Name::from_str("ns.dns.cluster.local.").unwrap(),
                Name::from_str("hostmaster.cluster.local.").unwrap(),
                1234,
                7200,
                1800,
                86400,
                5,
            )),
        );
        for q in [
            "cluster.local",
            "web.default.svc.cluster.local",
            "a.b.c.d.e.f.g.cluster.local",
        ] {
            let qname = wire_from_dotted(q);
            let sections = encode_sections(&qname, 1, vec![], vec![soa.clone()], vec![]);
            let zone_offset = qname.len() - wire_from_dotted("cluster.local").len();
            assert_eq!(
                sections.data,
                soa_record(&soa_template(5, 1234), zone_offset),
                "{q}"
            );
        }
    }

    #[test]
    fn answers_point_at_the_question() {
        let qname = wire_from_dotted("web.default.svc.cluster.local");
        let a = Record::from_rdata(
            Name::from_str("web.default.svc.cluster.local.").unwrap(),
            30,
            RData::A("10.96.0.10".parse().unwrap()),
        );
        let s = encode_sections(&qname, 1, vec![a], vec![], vec![]);
        assert_eq!(s.ancount, 1);
        assert_eq!(
            s.data,
            [0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 10, 96, 0, 10]
        );
    }
}
