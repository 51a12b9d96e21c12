//! DNS over TLS to upstreams (RFC 7858), on long-lived connections that every query shares.
//!
//! Queries are pipelined (RFC 7766 §6.2.1.1): many are in flight on one connection, and replies
//! are matched to them by message ID, in whatever order they come. A connection is opened when
//! the open ones are busy (more than [`PIPELINE_DEPTH`] queries in flight each, up to
//! [`MAX_CONNECTIONS`]), and closed when no query has been sent on it for [`IDLE_TIMEOUT`].
//! Queries that arrive while a connection is being set up wait for it, so a burst of misses
//! costs one handshake, not one per query.
//!
//! A connection that cannot be set up (TCP connect, TLS handshake, certificate check) fails the
//! queries waiting for it at once with the reason, so the forwarder moves on to the next
//! upstream and health checks this one. The next attempt waits for a backoff (from
//! [`MIN_BACKOFF`], doubling to [`MAX_BACKOFF`]); meanwhile queries to this upstream fail at
//! once. The reason is logged once when connecting starts to fail, and the recovery once.

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::{AsRawFd as _, BorrowedFd, RawFd},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use hickory_proto::op::Message;
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject as _},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf},
    net::TcpStream,
    sync::{mpsc, oneshot},
};
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::forward::{Exchange, ExchangeError, matches};
use crate::metrics::UpstreamCounters;

/// Queries in flight on one connection before another is opened. Servers bound the queries they
/// work on at once per connection (BIND's pipelining quota, for one), so past a few dozen a
/// deeper pipeline only queues on their side; another connection spreads the work instead.
pub const PIPELINE_DEPTH: usize = 32;
/// Connections to one upstream at most; past that, queries queue on the least busy one.
pub const MAX_CONNECTIONS: usize = 4;
/// A connection no query has been sent on for this long is closed (CoreDNS `forward`'s
/// `expire` default).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Wait before the first reconnection after a failure; doubles with every failure in a row.
pub const MIN_BACKOFF: Duration = Duration::from_millis(250);
pub const MAX_BACKOFF: Duration = Duration::from_secs(8);

/// Why the CA certificates for TLS upstreams could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error(
        "no CA certificate could be read from the system store{detail}; install the \
         ca-certificates package, point SSL_CERT_FILE at a PEM bundle, or give --upstream-ca PATH"
    )]
    NoSystemRoots { detail: String },
    #[error("{}: {reason}", path.display())]
    CaFile { path: PathBuf, reason: String },
}

/// The TLS client settings of every TLS upstream: certificates are checked against the CAs in
/// `ca_files` (PEM), or against the system's CA store when there are none.
///
/// The system store is read with rustls-native-certs, as OpenSSL finds it
/// (`/etc/ssl/certs/ca-certificates.crt` on Debian, or `SSL_CERT_FILE` / `SSL_CERT_DIR`): a
/// private CA that an operator adds to the node's or the image's store is trusted, which a
/// compiled-in list such as webpki-roots would ignore, and the list gets security updates with
/// the distribution instead of with a rebuild of the agent.
pub fn client_config(ca_files: &[PathBuf]) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    if ca_files.is_empty() {
        let found = rustls_native_certs::load_native_certs();
        let (added, _unusable) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            let detail = if found.errors.is_empty() {
                String::new()
            } else {
                format!(
                    " ({})",
                    found
                        .errors
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            };
            return Err(TlsConfigError::NoSystemRoots { detail });
        }
    } else {
        for path in ca_files {
            for cert in read_pem_certificates(path)? {
                roots.add(cert).map_err(|e| TlsConfigError::CaFile {
                    path: path.clone(),
                    reason: format!("not a usable CA certificate: {e}"),
                })?;
            }
        }
    }
    Ok(Arc::new(client_config_with(roots)))
}

/// A client that trusts nothing: every handshake fails (with the reason), never silently
/// unverified.
pub fn client_config_without_roots() -> Arc<ClientConfig> {
    Arc::new(client_config_with(RootCertStore::empty()))
}

/// TLS 1.2 and 1.3 with rustls's safe defaults, on ring (the provider kube uses too), so the
/// process-wide default provider plays no part.
fn client_config_with(roots: RootCertStore) -> ClientConfig {
    ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports rustls's default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

fn read_pem_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let bad = |reason: String| TlsConfigError::CaFile {
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad(
            "no PEM certificate in it (-----BEGIN CERTIFICATE-----)".to_string(),
        ));
    }
    Ok(certs)
}

/// One DNS-over-TLS upstream: its connections and what connecting to it has shown.
pub struct TlsUpstream {
    addr: SocketAddr,
    server_name: ServerName<'static>,
    /// How the upstream is named in logs (`tls://ADDR:PORT[#NAME]`).
    label: String,
    connector: TlsConnector,
    /// How long a TCP connect and TLS handshake may take together.
    setup_timeout: Duration,
    counters: Arc<UpstreamCounters>,
    pool: Mutex<Pool>,
}

#[derive(Default)]
struct Pool {
    connections: Vec<Arc<Connection>>,
    /// Set after a failed setup: no connection is attempted before then.
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Why the last setup failed, while setups keep failing.
    failure: Option<Arc<str>>,
}

impl TlsUpstream {
    pub fn new(
        addr: SocketAddr,
        server_name: ServerName<'static>,
        label: String,
        config: Arc<ClientConfig>,
        setup_timeout: Duration,
        counters: Arc<UpstreamCounters>,
    ) -> Self {
        Self {
            addr,
            server_name,
            label,
            connector: TlsConnector::from(config),
            setup_timeout,
            counters,
            pool: Mutex::new(Pool::default()),
        }
    }

    /// Asks `query` on a shared connection (its ID is replaced by one free on that connection).
    /// A connection the upstream closed before answering, after it had answered other queries,
    /// is retried once on a fresh one: servers close idle connections when they like (RFC 7766
    /// §6.2.3), and a query can cross the close.
    pub async fn exchange(self: &Arc<Self>, query: &Message) -> Result<Exchange, ExchangeError> {
        let mut query = query.clone();
        let mut last = None;
        for _attempt in 0..2 {
            let conn = self.connection()?;
            let Some(mut waiter) = conn.register() else {
                // Closed between the pick and now: pick again.
                continue;
            };
            query.metadata.id = waiter.id;
            let bytes = query.to_vec()?;
            let mut framed = Vec::with_capacity(bytes.len() + 2);
            framed.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
            framed.extend_from_slice(&bytes);
            if conn.queries.send(framed).is_err() {
                continue;
            }
            match (&mut waiter.reply).await {
                Ok(reply) => {
                    let message = Message::from_vec(&reply)?;
                    if !matches(&query, &message) {
                        return Err(ExchangeError::Mismatch);
                    }
                    return Ok(Exchange {
                        bytes: reply,
                        message,
                    });
                }
                Err(_) => {
                    let reason = conn.closed_reason();
                    if !waiter.reused {
                        return Err(ExchangeError::Tls(reason.to_string()));
                    }
                    last = Some(reason);
                }
            }
        }
        Err(ExchangeError::Tls(match last {
            Some(reason) => format!("{reason} (and again on a fresh connection)"),
            None => "every connection closed before the query could be sent".to_string(),
        }))
    }

    /// The least busy open connection, a new one if all are busy (or there is none), or the
    /// reason connecting fails while in backoff.
    fn connection(self: &Arc<Self>) -> Result<Arc<Connection>, ExchangeError> {
        let mut pool = self.pool.lock().expect("TLS pool lock");
        pool.connections.retain(|c| !c.is_closed());
        let least_busy = pool
            .connections
            .iter()
            .min_by_key(|c| c.in_flight())
            .cloned();
        if let Some(c) = &least_busy
            && (c.in_flight() < PIPELINE_DEPTH || pool.connections.len() >= MAX_CONNECTIONS)
        {
            return Ok(c.clone());
        }
        if let Some(at) = pool.retry_at
            && Instant::now() < at
        {
            if let Some(c) = least_busy {
                return Ok(c);
            }
            let failure = pool.failure.clone().unwrap_or_else(|| "failed".into());
            return Err(ExchangeError::Tls(format!(
                "{failure} (next connection attempt in {:?})",
                at - Instant::now()
            )));
        }
        let (conn, queries) = Connection::new();
        pool.connections.push(conn.clone());
        drop(pool);
        tokio::spawn(self.clone().run(conn.clone(), queries));
        Ok(conn)
    }

    /// One connection's life: set up, then pipelined until idle or broken.
    async fn run(
        self: Arc<Self>,
        conn: Arc<Connection>,
        queries: mpsc::UnboundedReceiver<Vec<u8>>,
    ) {
        let stream = match tokio::time::timeout(self.setup_timeout, self.connect()).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(reason)) => {
                self.setup_failed(&conn, reason);
                return;
            }
            Err(_) => {
                self.counters.tls_handshake_failures.fetch_add(1, Relaxed);
                self.setup_failed(
                    &conn,
                    format!(
                        "no TLS connection to {} within {:?}",
                        self.label, self.setup_timeout
                    ),
                );
                return;
            }
        };
        self.set_up();
        let fd = stream.get_ref().0.as_raw_fd();
        let (reader, writer) = tokio::io::split(stream);
        let reason = tokio::select! {
            reason = read_replies(&conn, reader, fd) => reason,
            reason = write_queries(&conn, writer, queries) => reason,
        };
        conn.close(reason.into());
        self.counters.tls_open.fetch_sub(1, Relaxed);
    }

    async fn connect(&self) -> Result<TlsStream<TcpStream>, String> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("TCP connection to {} failed: {e}", self.label))?;
        // Queries are small and latency is what matters.
        tcp.set_nodelay(true)
            .map_err(|e| format!("TCP connection to {}: {e}", self.label))?;
        self.connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| {
                self.counters.tls_handshake_failures.fetch_add(1, Relaxed);
                format!(
                    "TLS handshake with {} (server name {}) failed: {e}",
                    self.label,
                    self.server_name.to_str()
                )
            })
    }

    fn set_up(&self) {
        self.counters.tls_connections.fetch_add(1, Relaxed);
        self.counters.tls_open.fetch_add(1, Relaxed);
        let mut pool = self.pool.lock().expect("TLS pool lock");
        pool.retry_at = None;
        pool.backoff = Duration::ZERO;
        if pool.failure.take().is_some() {
            tracing::info!(upstream = %self.label, "TLS connection to upstream set up again");
        }
    }

    fn setup_failed(&self, conn: &Connection, reason: String) {
        let reason: Arc<str> = reason.into();
        {
            let mut pool = self.pool.lock().expect("TLS pool lock");
            pool.backoff = (pool.backoff * 2).clamp(MIN_BACKOFF, MAX_BACKOFF);
            pool.retry_at = Some(Instant::now() + pool.backoff);
            // Once per run of failures: the reason of a handshake that fails for every query
            // (and every health check) is worth one line, not thousands.
            if pool.failure.is_none() {
                tracing::warn!(
                    upstream = %self.label,
                    "{reason}; queries go to the other upstreams, and connecting is retried \
                     with backoff (this is logged once until a connection succeeds)"
                );
            }
            pool.failure = Some(reason.clone());
        }
        conn.close(reason);
    }
}

/// One TLS connection, shared by every query in flight on it.
struct Connection {
    inflight: Mutex<Inflight>,
    /// Framed queries, written in order by the connection's task.
    queries: mpsc::UnboundedSender<Vec<u8>>,
    /// Number of queries registered, for [`Self::in_flight`] without the lock.
    load: AtomicU64,
}

#[derive(Default)]
struct Inflight {
    /// Queries waiting for their reply, by message ID.
    waiting: HashMap<u16, oneshot::Sender<Vec<u8>>>,
    /// Why the connection closed; once set, nothing more is sent on it.
    closed: Option<Arc<str>>,
    /// Replies received so far.
    answered: u64,
}

/// A query registered on a connection; leaves the connection's table when dropped (answered,
/// or given up by a timeout).
struct Waiter {
    conn: Arc<Connection>,
    id: u16,
    reply: oneshot::Receiver<Vec<u8>>,
    /// The connection had answered other queries before this one was sent.
    reused: bool,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Ok(mut inflight) = self.conn.inflight.lock()
            && inflight.waiting.remove(&self.id).is_some()
        {
            self.conn.load.fetch_sub(1, Relaxed);
        }
    }
}

impl Connection {
    fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<Vec<u8>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = Arc::new(Self {
            inflight: Mutex::new(Inflight::default()),
            queries: tx,
            load: AtomicU64::new(0),
        });
        (conn, rx)
    }

    fn in_flight(&self) -> usize {
        self.load.load(Relaxed) as usize
    }

    fn is_closed(&self) -> bool {
        self.inflight
            .lock()
            .expect("TLS connection lock")
            .closed
            .is_some()
    }

    fn closed_reason(&self) -> Arc<str> {
        self.inflight
            .lock()
            .expect("TLS connection lock")
            .closed
            .clone()
            .unwrap_or_else(|| "the connection closed".into())
    }

    /// A message ID that no other query in flight on this connection has (RFC 7766 §6.2.1.1),
    /// and the receiver of its reply; `None` once the connection is closed.
    fn register(self: &Arc<Self>) -> Option<Waiter> {
        let mut inflight = self.inflight.lock().expect("TLS connection lock");
        if inflight.closed.is_some() {
            return None;
        }
        // Random IDs still: the IDs in use are few (the pipeline depth, a few times over), so
        // this ends at once.
        let id = loop {
            let id = rand::random::<u16>();
            if !inflight.waiting.contains_key(&id) {
                break id;
            }
        };
        let (tx, rx) = oneshot::channel();
        inflight.waiting.insert(id, tx);
        self.load.fetch_add(1, Relaxed);
        Some(Waiter {
            conn: self.clone(),
            id,
            reply: rx,
            reused: inflight.answered > 0,
        })
    }

    /// Hands a reply to the query waiting for its ID. A reply nobody waits for (its query timed
    /// out) is dropped.
    fn deliver(&self, reply: Vec<u8>) {
        let id = u16::from_be_bytes([reply[0], reply[1]]);
        let mut inflight = self.inflight.lock().expect("TLS connection lock");
        inflight.answered += 1;
        if let Some(tx) = inflight.waiting.remove(&id) {
            self.load.fetch_sub(1, Relaxed);
            let _ = tx.send(reply);
        }
    }

    /// Closes the connection if no query waits on it: the idle timeout.
    fn close_if_idle(&self) -> bool {
        let mut inflight = self.inflight.lock().expect("TLS connection lock");
        if !inflight.waiting.is_empty() {
            return false;
        }
        inflight.closed = Some("closed after being idle".into());
        true
    }

    /// Marks the connection closed and fails every query waiting on it (their receivers see the
    /// sender dropped and read [`Self::closed_reason`]).
    fn close(&self, reason: Arc<str>) {
        let mut inflight = self.inflight.lock().expect("TLS connection lock");
        if inflight.closed.is_none() {
            inflight.closed = Some(reason);
        }
        let n = inflight.waiting.len() as u64;
        inflight.waiting.clear();
        self.load.fetch_sub(n, Relaxed);
    }
}

/// Reads length-prefixed replies (RFC 1035 §4.2.2) and hands each to its query, until the
/// connection ends; returns why it ended. `fd` is the connection's socket, which `reader` keeps
/// open.
async fn read_replies(
    conn: &Connection,
    mut reader: ReadHalf<TlsStream<TcpStream>>,
    fd: RawFd,
) -> String {
    // SAFETY: `reader` owns (half of) the stream that owns this socket, and outlives `socket`.
    let socket = unsafe { BorrowedFd::borrow_raw(fd) };
    let socket = socket2::SockRef::from(&socket);
    loop {
        // ACK what arrives at once. With queries pipelined, a server with Nagle on holds its
        // next reply segment until the previous one is ACKed, and a delayed ACK waits for our
        // next query to ride on, or for the 40 ms delayed-ACK timer when none comes. Measured
        // against unbound 1.17 at 2000 uncached queries/s (`cargo xtask bench-tls`): median
        // latency 0.5-0.8 ms and p99 44 ms without this, 0.1 ms and 4 ms with it. Linux clears
        // the flag as it sees fit, so it is set again before every read.
        let _ = socket.set_tcp_quickack(true);
        let len = match reader.read_u16().await {
            Ok(len) => len as usize,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return "the upstream closed the connection".to_string();
            }
            Err(e) => return format!("reading from the upstream: {e}"),
        };
        let mut reply = vec![0u8; len];
        if let Err(e) = reader.read_exact(&mut reply).await {
            return format!("reading from the upstream: {e}");
        }
        // Shorter than a header: the stream is out of step, nothing after it can be trusted.
        if len < 12 {
            return format!("the upstream sent a {len}-byte message, shorter than a DNS header");
        }
        conn.deliver(reply);
    }
}

/// Writes queries as they come, several per flush when they queue up; closes the connection
/// (TLS close_notify) after [`IDLE_TIMEOUT`] without a query.
async fn write_queries(
    conn: &Connection,
    mut writer: WriteHalf<TlsStream<TcpStream>>,
    mut queries: mpsc::UnboundedReceiver<Vec<u8>>,
) -> String {
    loop {
        let first = match tokio::time::timeout(IDLE_TIMEOUT, queries.recv()).await {
            Ok(Some(q)) => q,
            // The connection owns the sender: not while it lives.
            Ok(None) => return "closed".to_string(),
            Err(_) => {
                if conn.close_if_idle() {
                    let _ = tokio::time::timeout(Duration::from_secs(1), writer.shutdown()).await;
                    return "closed after being idle".to_string();
                }
                continue;
            }
        };
        if let Err(e) = writer.write_all(&first).await {
            return format!("writing to the upstream: {e}");
        }
        while let Ok(q) = queries.try_recv() {
            if let Err(e) = writer.write_all(&q).await {
                return format!("writing to the upstream: {e}");
            }
        }
        if let Err(e) = writer.flush().await {
            return format!("writing to the upstream: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_files_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = client_config(std::slice::from_ref(&missing)).unwrap_err();
        assert!(matches!(e, TlsConfigError::CaFile { .. }), "{e}");
        assert!(
            e.to_string().starts_with(&missing.display().to_string()),
            "{e}"
        );

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        let e = client_config(&[empty]).unwrap_err();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = client_config(&[garbage]).unwrap_err();
        assert!(e.to_string().contains("not a usable CA certificate"), "{e}");
    }

    #[test]
    fn a_ca_file_is_read() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, ca.pem()).unwrap();
        client_config(&[path]).unwrap();
    }
}
