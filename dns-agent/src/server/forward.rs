//! Forwarding names outside the cluster to the upstream resolvers.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query},
    rr::{DNSClass, Name, RecordType},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};

/// Why forwarding gave no answer (the client gets SERVFAIL).
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream answered within {0:?}")]
    Timeout(Duration),
    #[error("every upstream failed: {0}")]
    Failed(String),
}

/// How long one attempt waits, and how long a client waits in all.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub attempt: Duration,
    pub total: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            attempt: Duration::from_millis(1000),
            total: Duration::from_millis(1900),
        }
    }
}

/// A question to ask upstream.
#[derive(Clone, Debug)]
pub struct Question {
    pub name: Name,
    pub qtype: RecordType,
    pub qclass: DNSClass,
    pub dnssec_ok: bool,
    pub checking_disabled: bool,
}

pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeouts: Timeouts,
}

impl Forwarder {
    pub fn new(upstreams: Vec<SocketAddr>, timeouts: Timeouts) -> Self {
        Self {
            upstreams,
            timeouts,
        }
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// Asks the upstreams in turn until one answers; retries over TCP when a UDP answer is
    /// truncated. Gives up after the total timeout.
    pub async fn resolve(&self, q: &Question) -> Result<Message, ForwardError> {
        let deadline = Instant::now() + self.timeouts.total;
        let mut errors = Vec::new();
        for upstream in self.upstreams.iter().cycle().take(self.upstreams.len() * 2) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let budget = left.min(self.timeouts.attempt);
            match tokio::time::timeout(budget, exchange(*upstream, q)).await {
                Ok(Ok(m)) => return Ok(m),
                Ok(Err(e)) => errors.push(format!("{upstream}: {e}")),
                Err(_) => errors.push(format!("{upstream}: no answer in {budget:?}")),
            }
        }
        if errors.is_empty() {
            Err(ForwardError::Timeout(self.timeouts.total))
        } else {
            Err(ForwardError::Failed(errors.join("; ")))
        }
    }
}

fn query_message(q: &Question) -> Message {
    let mut m = Message::new(rand::random(), MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.metadata.checking_disabled = q.checking_disabled;
    let mut query = Query::query(q.name.clone(), q.qtype);
    query.set_query_class(q.qclass);
    m.add_query(query);
    let mut edns = Edns::new();
    edns.set_max_payload(dns_common::EDNS_UDP_SIZE);
    edns.set_dnssec_ok(q.dnssec_ok);
    m.set_edns(edns);
    m
}

/// Is `reply` the answer to `sent` (RFC 5452: ID, and the question, name compared without
/// case)?
fn matches(sent: &Message, reply: &Message) -> bool {
    reply.metadata.id == sent.metadata.id
        && reply.metadata.message_type == MessageType::Response
        && reply.queries.len() == 1
        // hickory compares names without case
        && reply.queries[0].name() == sent.queries[0].name()
        && reply.queries[0].query_type() == sent.queries[0].query_type()
        && reply.queries[0].query_class() == sent.queries[0].query_class()
}

async fn exchange(upstream: SocketAddr, q: &Question) -> anyhow::Result<Message> {
    let query = query_message(q);
    let bytes = query.to_vec()?;
    let reply = exchange_udp(upstream, &query, &bytes).await?;
    if reply.metadata.truncation {
        return exchange_tcp(upstream, &query, &bytes).await;
    }
    Ok(reply)
}

async fn exchange_udp(
    upstream: SocketAddr,
    query: &Message,
    bytes: &[u8],
) -> anyhow::Result<Message> {
    // A fresh socket per query: a random source port from the kernel, on top of the random ID.
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
            && matches(query, &reply) {
                return Ok(reply);
            }
    }
}

async fn exchange_tcp(
    upstream: SocketAddr,
    query: &Message,
    bytes: &[u8],
) -> anyhow::Result<Message> {
    let mut stream = TcpStream::connect(upstream).await?;
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).await?;
    let len = stream.read_u16().await? as usize;
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    let reply = Message::from_vec(&buf)?;
    anyhow::ensure!(matches(query, &reply), "TCP reply does not match the query");
    Ok(reply)
}
