//! Forwarding names outside the cluster to the upstream resolvers.
//!
//! The semantics follow CoreDNS's `forward` plugin where it has one: a policy orders the
//! upstreams for each query (default `random`), an upstream that fails an exchange is health
//! checked with `. IN NS` every `--health-check` until it answers, and counts as down after
//! `--max-fails` failed checks in a row; down upstreams are skipped unless every upstream is
//! down, in which case all are tried anyway. A SERVFAIL or REFUSED answer moves on to the next
//! upstream too (CoreDNS's `failover SERVFAIL REFUSED`). Beyond `--max-concurrent` queries in
//! flight, new ones are REFUSED.
//!
//! Plain upstreams are asked over UDP (TCP when truncated); DNS-over-TLS upstreams
//! (`tls://…`) over shared, pipelined TLS connections ([`super::tls`]). Both kinds mix under the
//! same policy, health checks and failover: a TLS connection that cannot be set up is a failed
//! exchange like a timeout.
//!
//! Spoofing resistance (RFC 5452): a random ID and a fresh socket (random source port) per
//! attempt, and a reply is only accepted when its ID and question (name without case, type,
//! class) match what was sent. Anything else on the socket is ignored, so a spoofer cannot cut
//! the real answer short.
//!
//! Forwarding loops (an upstream that forwards back to this agent) are looked for at start, the
//! way CoreDNS's `loop` plugin does: a query for a random name `<n>.<n>.` of type HINFO goes to
//! each upstream; if it arrives at our own listener, that upstream loops and is never used.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query},
    rr::{DNSClass, RecordType},
};
use rand::seq::SliceRandom as _;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    sync::Semaphore,
};

use super::{tls::TlsUpstream, upstream::Upstream};
use crate::{
    dns,
    metrics::{Metrics, UpstreamCounters},
    zone::name::{WireName, to_name, to_text, wire_from_labels},
};

/// Why forwarding gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// `--max-concurrent` queries are already in flight: the client gets REFUSED.
    #[error("{0} upstream queries already in flight (--max-concurrent)")]
    Overloaded(usize),
    /// Every upstream loops back to us (see [`Forwarder::detect_loops`]).
    #[error("no upstream is usable: every one forwards our queries back to this agent")]
    NoUpstream,
    /// Every attempt failed or answered SERVFAIL/REFUSED; `rcode` is what the client gets.
    #[error("every upstream failed: {detail}")]
    Failed { rcode: u16, detail: String },
}

impl ForwardError {
    /// The RCODE a client gets for this failure.
    pub fn rcode(&self) -> u16 {
        match self {
            Self::Overloaded(_) => dns::RCODE_REFUSED,
            Self::NoUpstream => dns::RCODE_SERVFAIL,
            Self::Failed { rcode, .. } => *rcode,
        }
    }
}

/// Why one exchange with one upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("encoding the query: {0}")]
    Encode(#[from] hickory_proto::ProtoError),
    #[error("the TCP reply does not parse: {0}")]
    Decode(#[from] hickory_proto::serialize::binary::DecodeError),
    #[error("the TCP reply does not match the query (ID or question)")]
    Mismatch,
    /// No TLS connection (connect, handshake, certificate), or it closed before the reply.
    #[error("{0}")]
    Tls(String),
}

/// How long one attempt waits, and how long a client waits in all.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub attempt: Duration,
    pub total: Duration,
}

/// The order in which upstreams are tried for a query.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// Always in the order given.
    Sequential,
    /// A fresh random order for every query (CoreDNS's default).
    Random,
    /// Each query starts one upstream further along the list.
    RoundRobin,
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Sequential => "sequential",
            Self::Random => "random",
            Self::RoundRobin => "round-robin",
        })
    }
}

/// The forwarding options of `dns-agent run`.
#[derive(Clone, Debug)]
pub struct ForwardSettings {
    pub policy: Policy,
    pub timeouts: Timeouts,
    pub force_tcp: bool,
    /// Upstream queries in flight at once; more are REFUSED.
    pub max_concurrent: usize,
    /// Interval of the health checks of an upstream that failed.
    pub health_check: Duration,
    /// Failed health checks in a row that mark an upstream down; 0: never health check.
    pub max_fails: u32,
    /// The TLS client settings of `tls://` upstreams (trusted CAs); `None`: the system's CAs,
    /// read when a TLS upstream needs them.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// A question to ask upstream, and the key of the cache: the name is lowercased (DNS names are
/// case-insensitive, and one cache entry serves every spelling).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    /// Lowercased wire format.
    pub name: WireName,
    pub qtype: u16,
    pub qclass: u16,
    pub dnssec_ok: bool,
    /// CD is part of the key as well as DO: an answer fetched with checking disabled may hold
    /// data a validating upstream would have refused to give to everyone else.
    pub checking_disabled: bool,
}

/// A [`Question`] borrowed from a query: what the cache is asked with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuestionRef<'a> {
    pub name: &'a [u8],
    pub qtype: u16,
    pub qclass: u16,
    pub dnssec_ok: bool,
    pub checking_disabled: bool,
}

impl QuestionRef<'_> {
    pub fn to_question(self) -> Question {
        Question {
            name: self.name.to_vec(),
            qtype: self.qtype,
            qclass: self.qclass,
            dnssec_ok: self.dnssec_ok,
            checking_disabled: self.checking_disabled,
        }
    }
}

/// A question, owned or borrowed, as a key: both hash and compare alike.
pub trait QuestionKey {
    fn key(&self) -> QuestionRef<'_>;
}

impl QuestionKey for Question {
    fn key(&self) -> QuestionRef<'_> {
        QuestionRef {
            name: &self.name,
            qtype: self.qtype,
            qclass: self.qclass,
            dnssec_ok: self.dnssec_ok,
            checking_disabled: self.checking_disabled,
        }
    }
}

impl QuestionKey for QuestionRef<'_> {
    fn key(&self) -> QuestionRef<'_> {
        *self
    }
}

// Hashed through its borrowed form, so that a map keyed on questions can be asked with one.
impl std::hash::Hash for Question {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key().hash(state)
    }
}

/// An accepted upstream reply: its bytes as received and their parse.
#[derive(Debug)]
pub struct Exchange {
    pub bytes: Vec<u8>,
    pub message: Message,
}

/// One upstream and what is known about it.
pub struct UpstreamState {
    pub upstream: Upstream,
    /// The connections of a `tls://` upstream.
    tls: Option<Arc<TlsUpstream>>,
    /// Failed health checks in a row.
    fails: AtomicU32,
    /// A health check loop is running.
    checking: AtomicBool,
    /// It sent our loop probe back to us: never used.
    looped: AtomicBool,
    /// The name of this upstream's loop probe.
    loop_probe: WireName,
    counters: Arc<UpstreamCounters>,
}

impl UpstreamState {
    fn is_down(&self, max_fails: u32) -> bool {
        max_fails > 0 && self.fails.load(Relaxed) >= max_fails
    }
}

pub struct Forwarder {
    upstreams: Vec<Arc<UpstreamState>>,
    settings: ForwardSettings,
    /// Round-robin position.
    next: AtomicUsize,
    permits: Semaphore,
    metrics: Arc<Metrics>,
    /// Health check loops, so that they end with the forwarder.
    health_tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

/// How many times the loop probe is sent to an upstream that does not answer it, and how far
/// apart: an upstream that starts after us is still checked.
const LOOP_PROBE_ATTEMPTS: u32 = 10;
const LOOP_PROBE_RETRY: Duration = Duration::from_secs(3);

impl Forwarder {
    pub fn new(upstreams: Vec<Upstream>, settings: ForwardSettings, metrics: Arc<Metrics>) -> Self {
        let mut tls_config = settings.tls.clone();
        let upstreams = upstreams
            .into_iter()
            .map(|upstream| {
                // CoreDNS's loop probe name: two random numbers under the root.
                let probe = wire_from_labels(&[
                    rand::random::<u64>().to_string(),
                    rand::random::<u64>().to_string(),
                ]);
                let counters = metrics.forward.upstream(&upstream.to_string());
                let tls = upstream.tls_server_name().map(|server_name| {
                    let config = tls_config.get_or_insert_with(system_tls_config).clone();
                    Arc::new(TlsUpstream::new(
                        upstream.addr(),
                        server_name,
                        upstream.to_string(),
                        config,
                        settings.timeouts.attempt,
                        counters.clone(),
                    ))
                });
                Arc::new(UpstreamState {
                    upstream,
                    tls,
                    fails: AtomicU32::new(0),
                    checking: AtomicBool::new(false),
                    looped: AtomicBool::new(false),
                    loop_probe: probe,
                    counters,
                })
            })
            .collect();
        Self {
            upstreams,
            permits: Semaphore::new(settings.max_concurrent),
            settings,
            next: AtomicUsize::new(0),
            metrics,
            health_tasks: Mutex::new(Vec::new()),
        }
    }

    pub fn upstreams(&self) -> Vec<Upstream> {
        self.upstreams.iter().map(|u| u.upstream.clone()).collect()
    }

    pub fn settings(&self) -> &ForwardSettings {
        &self.settings
    }

    /// Asks the upstreams in policy order until one answers, within the total timeout; retries
    /// over TCP when a UDP answer is truncated. An upstream that answered SERVFAIL or REFUSED
    /// is not asked again for this query; one that timed out gets a second chance if time is
    /// left (a lost datagram is the usual reason).
    pub async fn resolve(&self, q: &Question) -> Result<Exchange, ForwardError> {
        let Ok(_permit) = self.permits.try_acquire() else {
            self.metrics.forward.reject();
            return Err(ForwardError::Overloaded(self.settings.max_concurrent));
        };
        let order = self.order();
        if order.is_empty() {
            return Err(ForwardError::NoUpstream);
        }
        let timeouts = self.settings.timeouts;
        let deadline = Instant::now() + timeouts.total;
        let mut errors = Vec::new();
        let mut answered = vec![false; self.upstreams.len()];
        let mut rcode = dns::RCODE_SERVFAIL;
        'rounds: for _round in 0..2 {
            for &i in &order {
                if answered[i] {
                    continue;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break 'rounds;
                }
                let up = &self.upstreams[i];
                let budget = left.min(timeouts.attempt);
                up.counters.requests.fetch_add(1, Relaxed);
                let started = Instant::now();
                match tokio::time::timeout(budget, exchange(up, q, self.settings.force_tcp)).await {
                    Ok(Ok(x)) => {
                        let got = x.message.metadata.response_code.low() as u16;
                        up.counters.response(got);
                        self.metrics.upstream_latency.observe(started.elapsed());
                        if got == dns::RCODE_SERVFAIL || got == dns::RCODE_REFUSED {
                            answered[i] = true;
                            rcode = got;
                            errors.push(format!("{}: rcode {got}", up.upstream));
                            continue;
                        }
                        return Ok(x);
                    }
                    Ok(Err(e)) => {
                        errors.push(format!("{}: {e}", up.upstream));
                        self.suspect(up);
                    }
                    Err(_) => {
                        errors.push(format!("{}: no answer in {budget:?}", up.upstream));
                        self.suspect(up);
                    }
                }
            }
        }
        Err(ForwardError::Failed {
            rcode,
            detail: errors.join("; "),
        })
    }

    /// Indices of the upstreams to try, in policy order: the healthy ones, or every one (but
    /// those that loop) when all are down, as CoreDNS does when health checking itself seems
    /// broken.
    fn order(&self) -> Vec<usize> {
        let mut usable: Vec<usize> = (0..self.upstreams.len())
            .filter(|&i| !self.upstreams[i].looped.load(Relaxed))
            .collect();
        if usable.is_empty() {
            return usable;
        }
        match self.settings.policy {
            Policy::Sequential => {}
            Policy::Random => usable.shuffle(&mut rand::rng()),
            Policy::RoundRobin => {
                let start = self.next.fetch_add(1, Relaxed) % usable.len();
                usable.rotate_left(start);
            }
        }
        let healthy: Vec<usize> = usable
            .iter()
            .copied()
            .filter(|&i| !self.upstreams[i].is_down(self.settings.max_fails))
            .collect();
        if healthy.is_empty() {
            self.metrics.forward.broken();
            usable
        } else {
            healthy
        }
    }

    /// An exchange with `up` failed: health check it until it answers (unless it is being
    /// checked already, or health checks are off).
    fn suspect(&self, up: &Arc<UpstreamState>) {
        if self.settings.max_fails == 0 || up.checking.swap(true, Relaxed) {
            return;
        }
        let task = tokio::spawn(health_check(up.clone(), self.settings.clone()));
        let mut tasks = self.health_tasks.lock().expect("health task lock");
        tasks.retain(|t| !t.is_finished());
        tasks.push(task.abort_handle());
    }

    /// Is `qname` one of our own loop probes? If so, the upstream it was sent to forwards back to
    /// us: from now on it is not used, and the caller must not forward the query (that would
    /// amplify the loop). Checked whenever the probe arrives, so an upstream that answers the
    /// probe before passing it on (e.g. one asking several servers at once) is caught too.
    pub fn is_loop_probe(&self, qname: &[u8]) -> bool {
        let Some(up) = self.upstreams.iter().find(|u| u.loop_probe == qname) else {
            return false;
        };
        if !up.looped.swap(true, Relaxed) {
            up.counters.looped.store(true, Relaxed);
            tracing::error!(
                upstream = %up.upstream,
                probe = %to_text(&up.loop_probe),
                "forwarding loop: upstream {} sent our loop probe back to this agent, so it \
                 forwards to us; it will not be used. Fix: point that resolver elsewhere, or \
                 drop `--upstream {}`",
                up.upstream,
                up.upstream,
            );
        }
        true
    }

    /// Sends each upstream a loop probe and marks those that send it back to us. Upstreams that
    /// loop are logged and never used again. Fails when every upstream loops: the agent cannot
    /// forward anything, and saying so beats amplifying every query.
    pub async fn detect_loops(&self) -> Result<(), ForwardError> {
        let checks = self.upstreams.iter().map(|up| self.detect_loop(up));
        futures::future::join_all(checks).await;
        if self.upstreams.iter().all(|u| u.looped.load(Relaxed)) {
            return Err(ForwardError::NoUpstream);
        }
        Ok(())
    }

    async fn detect_loop(&self, up: &UpstreamState) {
        let probe = Question {
            name: up.loop_probe.clone(),
            qtype: u16::from(RecordType::HINFO),
            qclass: dns::CLASS_IN,
            dnssec_ok: false,
            checking_disabled: false,
        };
        for attempt in 1..=LOOP_PROBE_ATTEMPTS {
            let reply = tokio::time::timeout(
                self.settings.timeouts.total,
                exchange(up, &probe, self.settings.force_tcp),
            )
            .await;
            // A looping upstream passes the probe on before it can answer it, so by now
            // `is_loop_probe` has seen it.
            if up.looped.load(Relaxed) {
                return;
            }
            if matches!(reply, Ok(Ok(_))) {
                tracing::debug!(upstream = %up.upstream, "loop probe answered: no loop");
                return;
            }
            if attempt < LOOP_PROBE_ATTEMPTS {
                tokio::time::sleep(LOOP_PROBE_RETRY).await;
            }
        }
        tracing::warn!(
            upstream = %up.upstream,
            "the loop probe got no answer after {LOOP_PROBE_ATTEMPTS} attempts; loop detection \
             gave up on this upstream"
        );
    }
}

/// The system's CAs, for a TLS upstream whose settings name none. The command line loads them at
/// start (and refuses to start without them); should they be missing here, every handshake
/// fails with the reason instead.
fn system_tls_config() -> Arc<rustls::ClientConfig> {
    super::tls::client_config(&[]).unwrap_or_else(|e| {
        tracing::error!("TLS upstreams cannot be verified: {e}");
        super::tls::client_config_without_roots()
    })
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Ok(tasks) = self.health_tasks.lock() {
            for t in tasks.iter() {
                t.abort();
            }
        }
    }
}

/// CoreDNS's health check: `. IN NS`, recursion desired, over the transport queries use. Any
/// reply (whatever its RCODE) means the upstream is up. Probes every `health_check` until one
/// succeeds; `max_fails` failures in a row mark it down.
async fn health_check(up: Arc<UpstreamState>, settings: ForwardSettings) {
    let probe = Question {
        name: vec![0],
        qtype: u16::from(RecordType::NS),
        qclass: dns::CLASS_IN,
        dnssec_ok: false,
        checking_disabled: false,
    };
    loop {
        let reply = tokio::time::timeout(
            settings.timeouts.attempt,
            exchange(&up, &probe, settings.force_tcp),
        )
        .await;
        if matches!(reply, Ok(Ok(_))) {
            if up.fails.swap(0, Relaxed) >= settings.max_fails {
                tracing::info!(upstream = %up.upstream, "upstream answers health checks again: up");
            }
            up.counters.healthy.store(true, Relaxed);
            up.checking.store(false, Relaxed);
            return;
        }
        up.counters.healthcheck_failures.fetch_add(1, Relaxed);
        let fails = up.fails.fetch_add(1, Relaxed) + 1;
        if fails == settings.max_fails {
            up.counters.healthy.store(false, Relaxed);
            tracing::warn!(
                upstream = %up.upstream,
                "upstream failed {fails} health checks in a row: down, skipped while others are up"
            );
        }
        tokio::time::sleep(settings.health_check).await;
    }
}

/// The query sent upstream for `q`: a random ID, RD, CD as the client asked, EDNS with our UDP
/// size and the client's DO.
pub fn query_message(q: &Question) -> Message {
    let mut m = Message::new(rand::random(), MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.metadata.checking_disabled = q.checking_disabled;
    let mut query = Query::query(to_name(&q.name), RecordType::from(q.qtype));
    query.set_query_class(DNSClass::from(q.qclass));
    m.add_query(query);
    let mut edns = Edns::new();
    edns.set_max_payload(dns_common::EDNS_UDP_SIZE);
    edns.set_dnssec_ok(q.dnssec_ok);
    m.set_edns(edns);
    m
}

/// Is `reply` the answer to `sent` (RFC 5452: ID, and the question, name compared without
/// case)? The opcode too: a reply of another opcode follows other rules (an UPDATE's records
/// may have empty RDATA) and is no answer to a query.
pub fn matches(sent: &Message, reply: &Message) -> bool {
    reply.metadata.id == sent.metadata.id
        && reply.metadata.message_type == MessageType::Response
        && reply.metadata.op_code == sent.metadata.op_code
        && reply.queries.len() == 1
        // hickory compares names without case
        && reply.queries[0].name() == sent.queries[0].name()
        && reply.queries[0].query_type() == sent.queries[0].query_type()
        && reply.queries[0].query_class() == sent.queries[0].query_class()
}

/// One question to one upstream: over its TLS connections; or UDP (then TCP if truncated), or
/// TCP alone with `force_tcp`. Each call makes a new query with a new random ID.
async fn exchange(
    up: &UpstreamState,
    q: &Question,
    force_tcp: bool,
) -> Result<Exchange, ExchangeError> {
    let query = query_message(q);
    if let Some(tls) = &up.tls {
        return tls.exchange(&query).await;
    }
    let upstream = up.upstream.addr();
    let bytes = query.to_vec()?;
    if force_tcp {
        return exchange_tcp(upstream, &query, &bytes).await;
    }
    let reply = exchange_udp(upstream, &query, &bytes).await?;
    if reply.message.metadata.truncation {
        return exchange_tcp(upstream, &query, &bytes).await;
    }
    Ok(reply)
}

async fn exchange_udp(
    upstream: SocketAddr,
    query: &Message,
    bytes: &[u8],
) -> Result<Exchange, ExchangeError> {
    // A fresh socket per query: a random source port from the kernel, on top of the random ID.
    // Connected, so the kernel drops datagrams from any other address.
    let local: SocketAddr = match upstream.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(upstream).await?;
    sock.send(bytes).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await?;
        // Replies that do not match are ignored, not fatal: a spoofer must not be able to
        // cut the real answer short.
        if let Ok(reply) = Message::from_vec(&buf[..n])
            && matches(query, &reply)
        {
            return Ok(Exchange {
                bytes: buf[..n].to_vec(),
                message: reply,
            });
        }
    }
}

async fn exchange_tcp(
    upstream: SocketAddr,
    query: &Message,
    bytes: &[u8],
) -> Result<Exchange, ExchangeError> {
    let mut stream = TcpStream::connect(upstream).await?;
    stream.set_nodelay(true)?;
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).await?;
    let len = stream.read_u16().await? as usize;
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    let reply = Message::from_vec(&buf)?;
    // Off-path spoofing needs the TCP handshake; a mismatch here is a broken upstream.
    if !matches(query, &reply) {
        return Err(ExchangeError::Mismatch);
    }
    Ok(Exchange {
        bytes: buf,
        message: reply,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_of_another_opcode_is_no_answer() {
        // Found by the upstream_reply fuzz target: an UPDATE "reply" carrying an A record with
        // no RDATA (legal in UPDATE) was cached and served, and clients cannot parse it.
        let q = Question {
            name: wire_from_labels(&["www", "example"]),
            qtype: 1,
            qclass: 1,
            dnssec_ok: false,
            checking_disabled: false,
        };
        let sent = query_message(&q);
        let mut reply = Message::new(sent.metadata.id, MessageType::Response, OpCode::Query);
        reply.add_queries(sent.queries.clone());
        assert!(matches(&sent, &reply));
        reply.metadata.op_code = OpCode::Update;
        assert!(!matches(&sent, &reply));
        let mut bytes = reply.to_vec().unwrap();
        // One authority record: the root, type A, class IN, TTL 0, RDLENGTH 0.
        bytes[9] = 1;
        bytes.extend_from_slice(&[0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0]);
        let parsed = Message::from_vec(&bytes).expect("hickory takes it as an UPDATE");
        assert!(!matches(&sent, &parsed));
    }
}
