//! Upstream answers as the agent's cache keeps them, for tests that put them in the kernel.

use std::{str::FromStr, sync::Arc};

use dns_agent::{
    server::{cache::Answer, forward::Question},
    zone::name::wire_from_dotted,
};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData, Record, RecordType, rdata::SOA},
};

/// The TTLs of every record of a reply but the OPT.
pub fn ttls(reply: &[u8]) -> Vec<u32> {
    let m = Message::from_vec(reply).expect("a reply that parses");
    m.answers
        .iter()
        .chain(&m.authorities)
        .chain(
            m.additionals
                .iter()
                .filter(|r| r.record_type() != RecordType::OPT),
        )
        .map(|r| r.ttl)
        .collect()
}

pub fn record(name: &str, ttl: u32, data: RData) -> Record {
    Record::from_rdata(Name::from_str(name).unwrap(), ttl, data)
}

pub fn a(name: &str, ttl: u32, ip: &str) -> Record {
    record(name, ttl, RData::A(ip.parse().unwrap()))
}

pub fn upstream_soa(zone: &str) -> Record {
    record(
        zone,
        3600,
        RData::SOA(SOA::new(
            Name::from_str(&format!("ns1.{zone}")).unwrap(),
            Name::from_str(&format!("hostmaster.{zone}")).unwrap(),
            2026112901,
            7200,
            900,
            1_209_600,
            300,
        )),
    )
}

/// An upstream's reply to `name`/`qtype`, kept as the agent's cache keeps it.
pub fn upstream(
    name: &str,
    qtype: u16,
    rcode: ResponseCode,
    answers: Vec<Record>,
    authorities: Vec<Record>,
) -> Arc<Answer> {
    let mut m = Message::new(0x4242, MessageType::Response, OpCode::Query);
    m.metadata.recursion_available = true;
    m.metadata.response_code = rcode;
    m.add_query(Query::query(
        Name::from_str(name).unwrap(),
        RecordType::from(qtype),
    ));
    m.insert_answers(answers);
    m.insert_authorities(authorities);
    let bytes = m.to_vec().unwrap();
    Arc::new(Answer::from_upstream(&bytes, &m).expect("an answer the cache keeps"))
}

/// The cache key of `name`/`qtype` (class IN).
pub fn question(name: &str, qtype: u16, dnssec_ok: bool, checking_disabled: bool) -> Question {
    Question {
        name: wire_from_dotted(name),
        qtype,
        qclass: 1,
        dnssec_ok,
        checking_disabled,
        upstream_set: Default::default(),
    }
}
