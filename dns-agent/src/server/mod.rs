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
pub mod mmsg;
pub mod routing;
pub mod sockets;
pub mod tcp;
pub mod tls;
pub mod udp;
pub mod upstream;
pub mod zone_answers;

#[cfg(test)]
mod tests;

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
        NXDOMAIN_FLAGS, Resolution, ZONE_FLAGS, ZoneModel, ZoneVersion,
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
    /// The zone model's version, read without its lock: answers kept per thread
    /// ([`zone_answers`]) are served while it stands.
    zone_version: Arc<ZoneVersion>,
    /// The zone's name (wire format): names outside it go to the cache without the zone lock.
    zone_name: Vec<u8>,
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
    pub fn new(
        zone: Arc<RwLock<ZoneModel>>,
        external: Arc<ExternalResolver>,
        metrics: Arc<Metrics>,
        probe: heartbeat::Probe,
    ) -> Self {
        let (zone_version, zone_name) = {
            let z = zone.read().expect("zone lock poisoned");
            (z.version().clone(), z.zone_wire().to_vec())
        };
        Self {
            limits: Arc::new(Limits::new(
                limits::LimitSettings::default(),
                metrics.limits.clone(),
            )),
            zone,
            external,
            metrics,
            in_flight: Default::default(),
            probe,
            autopath: None,
            zone_version,
            zone_name,
        }
    }

    /// The handler with these limits (default: [`limits::LimitSettings::default`]).
    pub fn with_limits(self, limits: Arc<Limits>) -> Self {
        Self { limits, ..self }
    }

    /// The handler completing search paths (`--autopath`).
    pub fn with_autopath(self, autopath: Option<autopath::Autopath>) -> Self {
        Self { autopath, ..self }
    }

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
    /// A client over its rate (`--rate-limit`) gets REFUSED, and so does a query that would
    /// wait for an upstream while `--max-pending` others wait.
    pub fn handle_now(
        &self,
        msg: &[u8],
        transport: Transport,
        client: IpAddr,
    ) -> Result<Option<Vec<u8>>, Pending> {
        let mut out = Vec::new();
        Ok(self
            .answer_now(msg, transport, client, &mut out)?
            .then_some(out))
    }

    /// [`Self::handle_now`] without allocating: the reply, if the message deserves one, is
    /// appended to `out` (true). The serving loops reuse `out` from one query to the next.
    pub fn answer_now(
        &self,
        msg: &[u8],
        transport: Transport,
        client: IpAddr,
        out: &mut Vec<u8>,
    ) -> Result<bool, Pending> {
        self.metrics.request(transport);
        if !self.limits.within_rate(client) {
            return Ok(self.refuse(msg, transport, out));
        }
        let start = out.len();
        let q = match dns::parse_query(msg) {
            Ok(q) => q,
            Err(Reject::Drop) => {
                self.metrics.dropped();
                return Ok(false);
            }
            Err(Reject::Error {
                id,
                flags,
                rcode,
                question,
            }) => {
                self.metrics.response(rcode);
                dns::build_error_into(msg, id, flags, rcode, question, out);
                return Ok(true);
            }
        };
        let limit = match transport {
            Transport::Udp => Some(q.udp_limit()),
            // A TCP message's length is 16 bits: a longer reply gets TC like an oversized UDP
            // one.
            Transport::Tcp => Some(u16::MAX as usize),
        };
        match self.answer_from_zone_into(&q, client, limit, out) {
            None => self.metrics.path(Path::Userspace),
            Some(zone) => {
                self.metrics.path(Path::Forwarded);
                let answered =
                    matches!(zone, ZoneReply::Forward) && self.forward_now(&q, limit, out);
                if !answered {
                    match self.limits.pending() {
                        Some(waiting) => {
                            return Err(Pending {
                                msg: msg.to_vec(),
                                limit,
                                zone,
                                _waiting: waiting,
                            });
                        }
                        None => dns::build_reply_into(
                            &q,
                            Body::empty(FLAG_RA | dns::RCODE_REFUSED),
                            limit,
                            out,
                        ),
                    }
                }
            }
        }
        self.metrics
            .response(u16::from_be_bytes([out[start + 2], out[start + 3]]) & 0xf);
        Ok(true)
    }

    /// REFUSED, to a message a limit stops before it is looked at, appended to `out` (true):
    /// the question echoed when the message has one, nothing for a message that deserves no
    /// reply at all.
    fn refuse(&self, msg: &[u8], transport: Transport, out: &mut Vec<u8>) -> bool {
        match dns::parse_query(msg) {
            Ok(q) => {
                let limit = match transport {
                    Transport::Udp => Some(q.udp_limit()),
                    Transport::Tcp => Some(u16::MAX as usize),
                };
                dns::build_reply_into(&q, Body::empty(FLAG_RA | dns::RCODE_REFUSED), limit, out);
            }
            Err(Reject::Drop) => {
                self.metrics.dropped();
                return false;
            }
            Err(Reject::Error {
                id,
                flags,
                question,
                ..
            }) => out.extend_from_slice(&dns::build_error(
                msg,
                id,
                flags,
                dns::RCODE_REFUSED,
                question,
            )),
        }
        self.metrics.response(dns::RCODE_REFUSED);
        true
    }

    /// Answers `q` from the zone into `out` (`None`), or says what the upstream must answer
    /// ([`ZoneReply::Forward`] or [`ZoneReply::Chase`]). The same bytes as
    /// [`answer_from_zone`]; answers that every client asking the same question gets are
    /// encoded once per thread ([`zone_answers`]) and spliced after this client's question.
    /// With `--autopath`, a search path of `client` completed comes first.
    fn answer_from_zone_into(
        &self,
        q: &Query<'_>,
        client: IpAddr,
        limit: Option<usize>,
        out: &mut Vec<u8>,
    ) -> Option<ZoneReply> {
        if let Some(body) = refusal(q) {
            dns::build_reply_into(q, body, limit, out);
            return None;
        }
        if crate::zone::surely_forwarded(&self.zone_name, &q.qname, q.qtype) {
            return Some(ZoneReply::Forward);
        }
        // Search paths are completed for names under the zone only (`<ns>.svc.<zone>`).
        if self.autopath.is_some() {
            let zone = self.zone.read().expect("zone lock poisoned");
            match self.complete_now(&zone, q, client.to_canonical(), limit) {
                Some(ZoneReply::Reply(r)) => {
                    out.extend_from_slice(&r);
                    return None;
                }
                Some(upstream) => return Some(upstream),
                None => {}
            }
        }
        let build = |e: &zone_answers::Encoded, out: &mut Vec<u8>| {
            dns::build_reply_into(q, e.body(), limit, out)
        };
        if zone_answers::with_fresh(&self.zone_version, &q.qname, q.qtype, |e| build(e, out))
            .is_some()
        {
            return None;
        }
        let zone = self.zone.read().expect("zone lock poisoned");
        if zone_answers::with_current(&zone, &q.qname, q.qtype, |e| build(e, out)).is_some() {
            return None;
        }
        match encoded(&zone, &q.qname, zone.resolve(&q.qname, q.qtype)) {
            Ok(e) => {
                build(&e, out);
                if zone.answer_follows_name(&q.qname) {
                    zone_answers::keep(&zone, &q.qname, q.qtype, e);
                }
                None
            }
            Err(other) => match reply_from_resolution(&zone, q, other, limit) {
                ZoneReply::Reply(r) => {
                    out.extend_from_slice(&r);
                    None
                }
                upstream => Some(upstream),
            },
        }
    }

    /// The reply to the agent's own heartbeat probe (`heartbeat.rs`), appended to `out`:
    /// answered from the zone like a pod's query, always through the zone lock (a probe answered
    /// from a copy would not notice a lock that hangs), and left out of the metrics.
    pub fn answer_probe(&self, msg: &[u8], out: &mut Vec<u8>) -> bool {
        let Ok(q) = dns::parse_query(msg) else {
            return false;
        };
        let zone = self.zone.read().expect("zone lock poisoned");
        match answer_from_zone(&zone, &q, Some(q.udp_limit())) {
            ZoneReply::Reply(r) => {
                out.extend_from_slice(&r);
                true
            }
            _ => false,
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

    /// The cache key of `q` itself, borrowed from it, for the upstreams its name routes to
    /// now.
    fn question_ref<'a>(&self, q: &'a Query<'_>) -> forward::QuestionRef<'a> {
        forward::QuestionRef {
            upstream_set: self.external.forwarder().upstream_set_of(&q.qname),
            name: &q.qname,
            qtype: q.qtype,
            qclass: q.qclass,
            dnssec_ok: q.edns.is_some_and(|e| e.dnssec_ok),
            checking_disabled: q.flags & dns_common::FLAG_CD != 0,
        }
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
    /// answer from the cache. The reply is appended to `out` (true).
    fn forward_now(&self, q: &Query<'_>, limit: Option<usize>, out: &mut Vec<u8>) -> bool {
        // Our own loop probe coming back: an upstream forwards to us. Forwarding it again
        // would amplify the loop; the forwarder notes it, the sender gets REFUSED.
        if self.external.forwarder().is_loop_probe(&q.qname) {
            dns::build_reply_into(q, Body::empty(FLAG_RA | dns::RCODE_REFUSED), limit, out);
            return true;
        }
        let Some(resolved) = self.external.cached(&self.question_ref(q)) else {
            return false;
        };
        self.reply_from_resolved_into(q, resolved, limit, out);
        true
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
        let mut out = Vec::new();
        self.reply_from_resolved_into(q, r, limit, &mut out);
        out
    }

    fn reply_from_resolved_into(
        &self,
        q: &Query<'_>,
        r: Resolved,
        limit: Option<usize>,
        out: &mut Vec<u8>,
    ) {
        match r {
            Resolved::Answer { answer, ttl } => reply_from_answer_into(q, &answer, ttl, limit, out),
            Resolved::Error(rcode) => {
                if rcode == dns::RCODE_SERVFAIL {
                    self.metrics.forward_failed();
                }
                dns::build_reply_into(q, Body::empty(FLAG_RA | rcode), limit, out)
            }
        }
    }

    fn error_reply(&self, q: &Query<'_>, rcode: u16, limit: Option<usize>) -> Vec<u8> {
        let mut out = Vec::new();
        self.reply_from_resolved_into(q, Resolved::Error(rcode), limit, &mut out);
        out
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
/// the XDP program, and for every query the kernel answers it gives the same bytes. (The
/// serving loops give the same bytes again, from answers they keep encoded: see
/// [`zone_answers`].)
pub fn answer_from_zone(zone: &ZoneModel, q: &Query<'_>, limit: Option<usize>) -> ZoneReply {
    if let Some(body) = refusal(q) {
        return ZoneReply::Reply(dns::build_reply(q, body, limit));
    }
    match encoded(zone, &q.qname, zone.resolve(&q.qname, q.qtype)) {
        Ok(e) => ZoneReply::Reply(dns::build_reply(q, e.body(), limit)),
        Err(other) => reply_from_resolution(zone, q, other, limit),
    }
}

/// What is refused before the zone is asked: EDNS versions above 0 (BADVERS), classes other
/// than IN.
fn refusal(q: &Query<'_>) -> Option<Body<'static>> {
    if let Some(e) = q.edns
        && e.version > 0
    {
        return Some(Body {
            ext_rcode: EXT_RCODE_BADVERS,
            ..Body::empty(FLAG_RA)
        });
    }
    (q.qclass != dns::CLASS_IN).then_some(Body::empty(FLAG_RA | dns::RCODE_REFUSED))
}

/// The header bits and sections of an answer every client asking (`qname`, its type) gets:
/// positive answers and negative ones with the zone's SOA. Anything else comes back.
fn encoded(
    zone: &ZoneModel,
    qname: &[u8],
    resolution: Resolution,
) -> Result<zone_answers::Encoded, Resolution> {
    match resolution {
        Resolution::Answer { flags, sections } => {
            Ok(zone_answers::Encoded::from_sections(flags, sections))
        }
        negative @ (Resolution::Nodata | Resolution::Nxdomain) => {
            let soa = zone.negative_soa(qname);
            let flags = if negative == Resolution::Nodata {
                ZONE_FLAGS
            } else {
                NXDOMAIN_FLAGS
            };
            Ok(zone_answers::Encoded::new(Body::sections(
                flags, 0, 1, 0, &soa,
            )))
        }
        other => Err(other),
    }
}

/// The reply for the resolutions that are not plain answers: not ready, refused, aliases; or
/// the upstream's turn.
fn reply_from_resolution(
    zone: &ZoneModel,
    q: &Query<'_>,
    resolution: Resolution,
    limit: Option<usize>,
) -> ZoneReply {
    let reply = |body| ZoneReply::Reply(dns::build_reply(q, body, limit));
    match resolution {
        Resolution::NotReady => reply(Body::empty(FLAG_RA | dns::RCODE_SERVFAIL)),
        Resolution::Refused => reply(Body::empty(FLAG_RA | dns::RCODE_REFUSED)),
        Resolution::Forward => ZoneReply::Forward,
        Resolution::Cname { cname, target } => chase_in_zone(zone, q, *cname, target, limit),
        done @ (Resolution::Answer { .. } | Resolution::Nodata | Resolution::Nxdomain) => {
            match encoded(zone, &q.qname, done) {
                Ok(e) => reply(e.body()),
                Err(_) => unreachable!("answers and negative answers are encoded"),
            }
        }
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
    let mut out = Vec::new();
    reply_from_answer_into(q, answer, ttl, limit, &mut out);
    out
}

/// [`reply_from_answer`], appended to `out`.
pub fn reply_from_answer_into(
    q: &Query<'_>,
    answer: &Answer,
    ttl: Option<u32>,
    limit: Option<usize>,
    out: &mut Vec<u8>,
) {
    let body = Body::sections(
        answer.reply_flags(),
        answer.ancount,
        answer.nscount,
        answer.arcount,
        &answer.sections,
    );
    let start = out.len();
    dns::build_reply_into(q, body, limit, out);
    let truncated = u16::from_be_bytes([out[start + 2], out[start + 3]]) & dns_common::FLAG_TC != 0;
    if let Some(ttl) = ttl
        && !truncated
    {
        answer.patch_ttls(&mut out[start..], 12 + q.question.len(), ttl);
    }
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
