//! The userspace DNS server: answers what the kernel passes up (over UDP), everything over
//! TCP, and forwards names outside the cluster.

pub mod autopath;
pub mod cache;
pub mod external;
pub mod forward;
pub mod handover;
pub mod heartbeat;
pub mod limits;
pub mod listen_address;
pub mod routing;
pub mod sockets;
pub mod tcp;
pub mod tls;
pub mod udp;
pub mod upstream;

use std::{
    net::IpAddr,
    sync::{Arc, RwLock},
};

use dns_common::FLAG_RA;
use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query as HQuery, ResponseCode},
    rr::{DNSClass, Record, RecordType},
};

use self::{
    cache::Answer,
    external::{ExternalResolver, Resolved},
    forward::Question,
    limits::Limits,
};
use crate::{
    dns::{self, Body, EXT_RCODE_BADVERS, Query, Reject},
    metrics::{Metrics, Path},
    zone::{
        NXDOMAIN_FLAGS, Resolution, ZONE_FLAGS, ZoneModel,
        encode::encode_sections,
        name::{WireName, to_name},
    },
};

pub use crate::dns::Transport;

pub struct Handler {
    pub zone: Arc<RwLock<ZoneModel>>,
    /// Cache and forwarder for names outside the cluster.
    pub external: Arc<ExternalResolver>,
    pub metrics: Arc<Metrics>,
    /// Queries being answered right now (a shutdown waits for them).
    pub in_flight: std::sync::atomic::AtomicUsize,
    /// The agent's own liveness probe, answered apart.
    pub probe: heartbeat::Probe,
    /// Per-client rate, queries waiting for upstreams, TCP connections.
    pub limits: Arc<Limits>,
    /// Search-path completion (`--autopath`).
    pub autopath: Option<autopath::Autopath>,
}

/// Counts a query in flight for as long as it lives.
struct InFlight<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A query [`Handler::handle_now`] could not answer without waiting for an upstream.
pub struct Pending {
    msg: Vec<u8>,
    limit: Option<usize>,
    zone: ZoneReply,
    /// Its place among the queries waiting for an upstream (`--max-pending`).
    _waiting: tokio::sync::OwnedSemaphorePermit,
}

impl Handler {
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The reply to one message from `client`, or `None` when it deserves none.
    pub async fn handle(
        &self,
        msg: &[u8],
        transport: Transport,
        client: IpAddr,
    ) -> Option<Vec<u8>> {
        match self.handle_now(msg, transport, client) {
            Ok(reply) => reply,
            Err(pending) => Some(self.finish(pending).await),
        }
    }

    /// The reply to one message when it needs no waiting: errors, answers from the zone, and
    /// answers from the cache of upstream answers. Otherwise the query, for [`Self::finish`].
    /// Lets the UDP loop answer most queries without a task of their own. A client over its
    /// rate (`--rate-limit`) gets REFUSED, and so does a query that would wait for an upstream
    /// while `--max-pending` others wait.
    pub fn handle_now(
        &self,
        msg: &[u8],
        transport: Transport,
        client: IpAddr,
    ) -> Result<Option<Vec<u8>>, Pending> {
        self.metrics.request(transport);
        if !self.limits.within_rate(client) {
            return Ok(self.refuse(msg, transport));
        }
        let q = match dns::parse_query(msg) {
            Ok(q) => q,
            Err(Reject::Drop) => {
                self.metrics.dropped();
                return Ok(None);
            }
            Err(Reject::Error {
                id,
                flags,
                rcode,
                question,
            }) => {
                self.metrics.response(rcode);
                return Ok(Some(dns::build_error(msg, id, flags, rcode, question)));
            }
        };
        let limit = match transport {
            Transport::Udp => Some(q.udp_limit()),
            Transport::Tcp => None,
        };
        let from_zone = {
            let zone = self.zone.read().expect("zone lock poisoned");
            self.complete_now(&zone, &q, client.to_canonical(), limit)
                .unwrap_or_else(|| answer_from_zone(&zone, &q, limit))
        };
        let reply = match from_zone {
            ZoneReply::Reply(r) => {
                self.metrics.path(Path::Userspace);
                r
            }
            zone => {
                self.metrics.path(Path::Forwarded);
                let now = match zone {
                    ZoneReply::Forward => self.forward_now(&q, limit),
                    _ => None,
                };
                match now {
                    Some(reply) => reply,
                    None => match self.limits.pending() {
                        Some(waiting) => {
                            return Err(Pending {
                                msg: msg.to_vec(),
                                limit,
                                zone,
                                _waiting: waiting,
                            });
                        }
                        None => {
                            dns::build_reply(&q, Body::empty(FLAG_RA | dns::RCODE_REFUSED), limit)
                        }
                    },
                }
            }
        };
        self.metrics
            .response(u16::from_be_bytes([reply[2], reply[3]]) & 0xf);
        Ok(Some(reply))
    }

    /// REFUSED, to a message a limit stops before it is looked at: the question echoed when
    /// the message has one, nothing for a message that deserves no reply at all.
    fn refuse(&self, msg: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let reply = match dns::parse_query(msg) {
            Ok(q) => {
                let limit = match transport {
                    Transport::Udp => Some(q.udp_limit()),
                    Transport::Tcp => None,
                };
                dns::build_reply(&q, Body::empty(FLAG_RA | dns::RCODE_REFUSED), limit)
            }
            Err(Reject::Drop) => {
                self.metrics.dropped();
                return None;
            }
            Err(Reject::Error {
                id,
                flags,
                question,
                ..
            }) => dns::build_error(msg, id, flags, dns::RCODE_REFUSED, question),
        };
        self.metrics.response(dns::RCODE_REFUSED);
        Some(reply)
    }

    /// The reply to the agent's own heartbeat probe (`heartbeat.rs`): answered from the zone
    /// like a pod's query, through the same lock, and left out of the metrics.
    pub fn answer_probe(&self, msg: &[u8]) -> Option<Vec<u8>> {
        let q = dns::parse_query(msg).ok()?;
        let zone = self.zone.read().expect("zone lock poisoned");
        match answer_from_zone(&zone, &q, Some(q.udp_limit())) {
            ZoneReply::Reply(r) => Some(r),
            _ => None,
        }
    }

    /// The reply to a query that waits for an upstream.
    pub async fn finish(&self, p: Pending) -> Vec<u8> {
        // Counted while the upstream is awaited: a shutdown waits for these.
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _in_flight = InFlight(&self.in_flight);
        let q = dns::parse_query(&p.msg).expect("handle_now parsed this message");
        let reply = match p.zone {
            ZoneReply::Chase { cname, target } => {
                self.chase_upstream(&q, *cname, &target, p.limit).await
            }
            ZoneReply::Complete(deferred) => self.complete_later(&q, *deferred, p.limit).await,
            _ => self.forward(&q, p.limit).await,
        };
        self.metrics
            .response(u16::from_be_bytes([reply[2], reply[3]]) & 0xf);
        reply
    }

    /// The upstream question (and cache key) for `name`, asked as `q` asks, to the upstreams
    /// `name` routes to now.
    fn question_of(&self, q: &Query<'_>, name: WireName) -> Question {
        Question {
            upstream_set: self.external.forwarder().upstream_set_of(&name),
            name,
            qtype: q.qtype,
            qclass: q.qclass,
            dnssec_ok: q.edns.is_some_and(|e| e.dnssec_ok),
            checking_disabled: q.flags & dns_common::FLAG_CD != 0,
        }
    }

    /// A name outside the cluster, if it needs no upstream now: our own loop probe, or an
    /// answer from the cache.
    fn forward_now(&self, q: &Query<'_>, limit: Option<usize>) -> Option<Vec<u8>> {
        // Our own loop probe coming back: an upstream forwards to us. Forwarding it again
        // would amplify the loop; the forwarder notes it, the sender gets REFUSED.
        if self.external.forwarder().is_loop_probe(&q.qname) {
            return Some(dns::build_reply(
                q,
                Body::empty(FLAG_RA | dns::RCODE_REFUSED),
                limit,
            ));
        }
        let resolved = self
            .external
            .cached(&self.question_of(q, q.qname.clone()))?;
        Some(self.reply_from_resolved(q, resolved, limit))
    }

    async fn forward(&self, q: &Query<'_>, limit: Option<usize>) -> Vec<u8> {
        // The name lowercased: one cache entry and one upstream query serve every spelling;
        // the client still sees its own question bytes.
        let resolved = self
            .external
            .resolve(&self.question_of(q, q.qname.clone()))
            .await;
        self.reply_from_resolved(q, resolved, limit)
    }

    fn reply_from_resolved(&self, q: &Query<'_>, r: Resolved, limit: Option<usize>) -> Vec<u8> {
        match r {
            Resolved::Answer { answer, ttl } => reply_from_answer(q, &answer, ttl, limit),
            Resolved::Error(rcode) => self.error_reply(q, rcode, limit),
        }
    }

    fn error_reply(&self, q: &Query<'_>, rcode: u16, limit: Option<usize>) -> Vec<u8> {
        if rcode == dns::RCODE_SERVFAIL {
            self.metrics.forward_failed();
        }
        dns::build_reply(q, Body::empty(FLAG_RA | rcode), limit)
    }

    async fn chase_upstream(
        &self,
        q: &Query<'_>,
        cname: Record,
        target: &[u8],
        limit: Option<usize>,
    ) -> Vec<u8> {
        let question = self.question_of(q, target.to_vec());
        match self.external.resolve(&question).await {
            Resolved::Answer { answer, ttl } => match answer.to_message(&question, ttl) {
                Some(upstream) => reply_from_upstream(q, &upstream, vec![cname], limit),
                None => {
                    tracing::warn!("a cached answer for an ExternalName target does not parse");
                    self.error_reply(q, dns::RCODE_SERVFAIL, limit)
                }
            },
            Resolved::Error(rcode) => self.error_reply(q, rcode, limit),
        }
    }
}

/// What the zone makes of a query.
#[derive(Debug)]
pub enum ZoneReply {
    /// The reply, complete.
    Reply(Vec<u8>),
    /// Not the cluster's: ask upstream.
    Forward,
    /// An alias whose target is outside the cluster: ask upstream for the target.
    Chase {
        cname: Box<Record>,
        target: WireName,
    },
    /// A search path to complete once an upstream has answered (`autopath.rs`).
    Complete(Box<autopath::Deferred>),
}

/// Answers `q` from the zone alone: everything but forwarding. This is the userspace twin of
/// the XDP program, and for every query the kernel answers it gives the same bytes.
pub fn answer_from_zone(zone: &ZoneModel, q: &Query<'_>, limit: Option<usize>) -> ZoneReply {
    let reply = |body| ZoneReply::Reply(dns::build_reply(q, body, limit));
    if let Some(e) = q.edns
        && e.version > 0
    {
        return reply(Body {
            ext_rcode: EXT_RCODE_BADVERS,
            ..Body::empty(FLAG_RA)
        });
    }
    if q.qclass != dns::CLASS_IN {
        return reply(Body::empty(FLAG_RA | dns::RCODE_REFUSED));
    }
    match zone.resolve(&q.qname, q.qtype) {
        Resolution::Answer { flags, sections } => reply(Body::sections(
            flags,
            sections.ancount,
            sections.nscount,
            sections.arcount,
            &sections.data,
        )),
        negative @ (Resolution::Nodata | Resolution::Nxdomain) => {
            let soa = zone.negative_soa(&q.qname);
            let flags = if negative == Resolution::Nodata {
                ZONE_FLAGS
            } else {
                NXDOMAIN_FLAGS
            };
            reply(Body::sections(flags, 0, 1, 0, &soa))
        }
        Resolution::NotReady => reply(Body::empty(FLAG_RA | dns::RCODE_SERVFAIL)),
        Resolution::Refused => reply(Body::empty(FLAG_RA | dns::RCODE_REFUSED)),
        Resolution::Forward => ZoneReply::Forward,
        Resolution::Cname { cname, target } => chase_in_zone(zone, q, *cname, target, limit),
    }
}

/// How many aliases in a row the zone follows before giving up (a loop of ExternalNames).
const MAX_CHAIN: usize = 8;

/// Follows an alias through the zone: the target's answer if it is there, its negative answer
/// if it is the zone's and has none (RFC 6604: the RCODE is the last name's), or the upstream
/// when the chain leaves the zone.
fn chase_in_zone(
    zone: &ZoneModel,
    q: &Query<'_>,
    cname: Record,
    mut target: WireName,
    limit: Option<usize>,
) -> ZoneReply {
    let mut answers = vec![cname];
    for _ in 0..MAX_CHAIN {
        let (flags, soa) = match zone.answer_records(&target, q.qtype) {
            Ok(records) => {
                answers.extend(records);
                (ZONE_FLAGS, false)
            }
            Err(Resolution::Cname {
                cname,
                target: next,
            }) => {
                answers.push(*cname);
                target = next;
                continue;
            }
            Err(Resolution::Forward) => {
                let cname = answers.remove(0);
                if answers.is_empty() {
                    return ZoneReply::Chase {
                        cname: Box::new(cname),
                        target,
                    };
                }
                // A chain that leaves the zone after several aliases: answer with the
                // aliases; the client's resolver follows the last one.
                answers.insert(0, cname);
                (ZONE_FLAGS, false)
            }
            Err(Resolution::Nxdomain) => (NXDOMAIN_FLAGS, true),
            Err(_) => (ZONE_FLAGS, true),
        };
        let s = encode_sections(&q.qname, q.qtype, answers, vec![], vec![]);
        let mut data = s.data;
        if soa {
            data.extend_from_slice(&zone.negative_soa(&q.qname));
        }
        let body = Body::sections(flags, s.ancount, soa as u16, 0, &data);
        return ZoneReply::Reply(dns::build_reply(q, body, limit));
    }
    ZoneReply::Reply(dns::build_reply(
        q,
        Body::empty(FLAG_RA | dns::RCODE_SERVFAIL),
        limit,
    ))
}

/// The client's reply from a (cached) upstream answer: the client's ID, flags and question
/// bytes, the upstream's sections as they were received, every TTL set to `ttl` when given.
pub fn reply_from_answer(
    q: &Query<'_>,
    answer: &Answer,
    ttl: Option<u32>,
    limit: Option<usize>,
) -> Vec<u8> {
    let body = Body::sections(
        answer.reply_flags(),
        answer.ancount,
        answer.nscount,
        answer.arcount,
        &answer.sections,
    );
    let mut reply = dns::build_reply(q, body, limit);
    let truncated = u16::from_be_bytes([reply[2], reply[3]]) & dns_common::FLAG_TC != 0;
    if let Some(ttl) = ttl
        && !truncated
    {
        answer.patch_ttls(&mut reply, 12 + q.question.len(), ttl);
    }
    reply
}

/// The client's reply made from an upstream answer: the client's ID and question bytes, the
/// upstream's sections (its OPT replaced by ours), `prefix` records first in the answer.
pub fn reply_from_upstream(
    q: &Query<'_>,
    upstream: &Message,
    prefix: Vec<Record>,
    limit: Option<usize>,
) -> Vec<u8> {
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
