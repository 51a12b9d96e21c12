//! The userspace DNS server: answers what the kernel passes up (over UDP), everything over
//! TCP, and forwards names outside the cluster.

pub mod forward;
pub mod tcp;
pub mod udp;

use std::sync::{Arc, RwLock};

use dns_common::FLAG_RA;
use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query as HQuery, ResponseCode},
    rr::{DNSClass, Name, Record, RecordType},
};

use self::forward::{Forwarder, Question};
use crate::{
    dns::{self, Body, EXT_RCODE_BADVERS, Query, Reject},
    metrics::{Metrics, Path},
    zone::{NXDOMAIN_FLAGS, Resolution, ZONE_FLAGS, ZoneModel, encode::encode_sections, name::to_name},
};

/// The transport a query came over: UDP replies are limited in size, TCP ones are not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

pub struct Handler {
    pub zone: Arc<RwLock<ZoneModel>>,
    pub forwarder: Forwarder,
    pub metrics: Arc<Metrics>,
}

impl Handler {
    /// The reply to one message, or `None` when it deserves none.
    pub async fn handle(&self, msg: &[u8], transport: Transport) -> Option<Vec<u8>> {
        self.metrics.request(transport);
        let q = match dns::parse_query(msg) {
            Ok(q) => q,
            Err(Reject::Drop) => {
                self.metrics.dropped();
                return None;
            }
            Err(Reject::Error { id, flags, rcode, question }) => {
                self.metrics.response(rcode);
                return Some(dns::build_error(msg, id, flags, rcode, question));
            }
        };
        let limit = match transport {
            Transport::Udp => Some(q.udp_limit()),
            Transport::Tcp => None,
        };
        let reply = self.answer(&q, limit).await;
        self.metrics.response(u16::from_be_bytes([reply[2], reply[3]]) & 0xf);
        Some(reply)
    }

    async fn answer(&self, q: &Query<'_>, limit: Option<usize>) -> Vec<u8> {
        if let Some(e) = q.edns {
            if e.version > 0 {
                return dns::build_reply(q, Body { ext_rcode: EXT_RCODE_BADVERS, ..Body::empty(FLAG_RA) }, limit);
            }
        }
        if q.qclass != dns::CLASS_IN {
            return dns::build_reply(q, Body::empty(FLAG_RA | dns::RCODE_REFUSED), limit);
        }
        // Everything that needs the zone is answered under one read lock; what needs the
        // network (forwarding, chasing a CNAME out of the zone) after it.
        let resolution = {
            let zone = self.zone.read().expect("zone lock poisoned");
            match zone.resolve(&q.qname, q.qtype) {
                Resolution::Answer { flags, sections } => {
                    self.metrics.path(Path::Userspace);
                    let body = Body::sections(flags, sections.ancount, sections.nscount, sections.arcount, &sections.data);
                    return dns::build_reply(q, body, limit);
                }
                negative @ (Resolution::Nodata | Resolution::Nxdomain) => {
                    self.metrics.path(Path::Userspace);
                    let soa = zone.negative_soa(&q.qname);
                    let flags =
                        if negative == Resolution::Nodata { ZONE_FLAGS } else { NXDOMAIN_FLAGS };
                    return dns::build_reply(q, Body::sections(flags, 0, 1, 0, &soa), limit);
                }
                Resolution::NotReady => {
                    self.metrics.path(Path::Userspace);
                    return dns::build_reply(q, Body::empty(FLAG_RA | dns::RCODE_SERVFAIL), limit);
                }
                Resolution::Refused => {
                    self.metrics.path(Path::Userspace);
                    return dns::build_reply(q, Body::empty(FLAG_RA | dns::RCODE_REFUSED), limit);
                }
                Resolution::Cname { cname, target } => {
                    match zone.answer_records(&target, q.qtype) {
                        // The target is in the zone: chase it here.
                        Ok(records) => {
                            self.metrics.path(Path::Userspace);
                            let mut answers = vec![cname];
                            answers.extend(records);
                            let s = encode_sections(&q.qname, q.qtype, answers, vec![], vec![]);
                            let body = Body::sections(ZONE_FLAGS, s.ancount, s.nscount, s.arcount, &s.data);
                            return dns::build_reply(q, body, limit);
                        }
                        Err(Resolution::Forward) => Resolution::Cname { cname, target },
                        Err(_) => {
                            // Target in the zone without data of this type: the alias alone.
                            self.metrics.path(Path::Userspace);
                            let s = encode_sections(&q.qname, q.qtype, vec![cname], vec![], vec![]);
                            let body = Body::sections(ZONE_FLAGS, s.ancount, s.nscount, s.arcount, &s.data);
                            return dns::build_reply(q, body, limit);
                        }
                    }
                }
                Resolution::Forward => Resolution::Forward,
            }
        };
        self.metrics.path(Path::Forwarded);
        match resolution {
            Resolution::Cname { cname, target } => self.chase_upstream(q, cname, &target, limit).await,
            _ => self.forward(q, limit).await,
        }
    }

    fn question_of(q: &Query<'_>, name: Name) -> Question {
        Question {
            name,
            qtype: RecordType::from(q.qtype),
            qclass: DNSClass::from(q.qclass),
            dnssec_ok: q.edns.is_some_and(|e| e.dnssec_ok),
            checking_disabled: q.flags & dns_common::FLAG_CD != 0,
        }
    }

    async fn forward(&self, q: &Query<'_>, limit: Option<usize>) -> Vec<u8> {
        // Ask with the client's own spelling of the name.
        let name = to_name(&q.question[..q.qname.len()]);
        match self.forwarder.resolve(&Self::question_of(q, name)).await {
            Ok(upstream) => reply_from_upstream(q, &upstream, Vec::new(), limit),
            Err(e) => {
                tracing::debug!(error = %e, "forwarding failed");
                self.metrics.forward_failed();
                dns::build_reply(q, Body::empty(FLAG_RA | dns::RCODE_SERVFAIL), limit)
            }
        }
    }

    async fn chase_upstream(&self, q: &Query<'_>, cname: Record, target: &[u8], limit: Option<usize>) -> Vec<u8> {
        match self.forwarder.resolve(&Self::question_of(q, to_name(target))).await {
            Ok(upstream) => reply_from_upstream(q, &upstream, vec![cname], limit),
            Err(e) => {
                tracing::debug!(error = %e, "chasing an ExternalName target failed");
                self.metrics.forward_failed();
                dns::build_reply(q, Body::empty(FLAG_RA | dns::RCODE_SERVFAIL), limit)
            }
        }
    }
}

/// The client's reply made from an upstream answer: the client's ID and question bytes, the
/// upstream's sections (its OPT replaced by ours), `prefix` records first in the answer.
fn reply_from_upstream(q: &Query<'_>, upstream: &Message, prefix: Vec<Record>, limit: Option<usize>) -> Vec<u8> {
    let mut m = Message::new(q.id, MessageType::Response, OpCode::Query);
    m.metadata.recursion_desired = q.flags & dns_common::FLAG_RD != 0;
    m.metadata.checking_disabled = q.flags & dns_common::FLAG_CD != 0;
    m.metadata.recursion_available = true;
    m.metadata.authentic_data = upstream.metadata.authentic_data;
    m.metadata.response_code = ResponseCode::from_low(upstream.metadata.response_code.low());
    let qname = to_name(&q.question[..q.qname.len()]);
    let mut query = HQuery::query(qname, RecordType::from(q.qtype));
    query.set_query_class(DNSClass::from(q.qclass));
    m.add_query(query);
    let mut answers = prefix;
    answers.extend(upstream.answers.iter().cloned());
    m.insert_answers(answers);
    m.insert_authorities(upstream.authorities.clone());
    m.insert_additionals(upstream.additionals.clone());
    if let Some(e) = q.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(dns_common::EDNS_UDP_SIZE);
        edns.set_dnssec_ok(e.dnssec_ok);
        m.set_edns(edns);
    }
    let bytes = match m.to_vec() {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "re-encoding an upstream answer failed");
            return dns::build_reply(q, Body::empty(FLAG_RA | dns::RCODE_SERVFAIL), limit);
        }
    };
    match limit {
        Some(l) if bytes.len() > l => {
            let rcode = m.metadata.response_code.low() as u16;
            let mut r = dns::build_reply(q, Body::empty(FLAG_RA | rcode), None);
            r[2] |= (dns_common::FLAG_TC >> 8) as u8;
            r
        }
        _ => bytes,
    }
}
