//! Metrics and health, in the conventions operators already use: a Prometheus text endpoint
//! (CoreDNS metric names where the meaning is the same), `/health` and `/ready`.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::server::Transport;

/// Which part of xdns answered a query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// The userspace server, from the zone.
    Userspace,
    /// Names outside the cluster and ExternalName targets: answered from the cache of upstream
    /// answers or upstream (`coredns_cache_hits_total` tells them apart).
    Forwarded,
}

/// A histogram with fixed buckets (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (b, bound) in self.buckets.iter().zip(self.bounds) {
            if s <= *bound {
                b.fetch_add(1, Relaxed);
            }
        }
        self.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// The smallest bucket bound holding at least `q` of the observations.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let want = (q * n as f64).ceil() as u64;
        self.buckets
            .iter()
            .zip(self.bounds)
            .find(|(b, _)| b.load(Relaxed) >= want)
            .map(|(_, bound)| *bound)
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, bound) in self.buckets.iter().zip(self.bounds) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {}",
                b.load(Relaxed)
            );
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braces} {}",
            self.sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

/// Latency buckets, 50 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

const RCODES: [&str; 11] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "YXDOMAIN", "YXRRSET",
    "NXRRSET", "NOTAUTH", "NOTZONE",
];

pub struct Metrics {
    requests_udp: AtomicU64,
    requests_tcp: AtomicU64,
    dropped: AtomicU64,
    responses: [AtomicU64; 16],
    userspace: AtomicU64,
    forwarded: AtomicU64,
    forward_failures: AtomicU64,
    pub upstream_latency: Histogram,
    pub programming_latency: Histogram,
    synced: AtomicBool,
    api_connected: AtomicBool,
    pub zone_services: AtomicU64,
    pub zone_endpoints: AtomicU64,
    pub kernel_entries: AtomicU64,
    pub kernel_writes: AtomicU64,
    pub kernel_write_failures: AtomicU64,
    /// Where the kernel counters are pinned (None: no kernel path).
    kernel_pin_path: Mutex<Option<PathBuf>>,
    pub cache: Arc<CacheCounters>,
    pub forward: ForwardCounters,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests_udp: AtomicU64::new(0),
            requests_tcp: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            responses: Default::default(),
            userspace: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            forward_failures: AtomicU64::new(0),
            upstream_latency: Histogram::new(LATENCY_BUCKETS),
            programming_latency: Histogram::new(LATENCY_BUCKETS),
            synced: AtomicBool::new(false),
            api_connected: AtomicBool::new(false),
            zone_services: AtomicU64::new(0),
            zone_endpoints: AtomicU64::new(0),
            kernel_entries: AtomicU64::new(0),
            kernel_writes: AtomicU64::new(0),
            kernel_write_failures: AtomicU64::new(0),
            kernel_pin_path: Mutex::new(None),
            cache: Arc::default(),
            forward: ForwardCounters::default(),
        }
    }
}

impl Metrics {
    /// The zone's size after a change.
    pub fn set_zone_size(&self, services: usize, endpoints: usize) {
        self.zone_services.store(services as u64, Relaxed);
        self.zone_endpoints.store(endpoints as u64, Relaxed);
    }

    /// What a kernel map sync did: entries written or removed, writes that failed, entries now.
    pub fn kernel_synced(&self, changed: usize, failed: usize, entries: usize) {
        self.kernel_writes.fetch_add(changed as u64, Relaxed);
        self.kernel_write_failures.fetch_add(failed as u64, Relaxed);
        self.kernel_entries.store(entries as u64, Relaxed);
    }

    pub fn request(&self, t: Transport) {
        match t {
            Transport::Udp => &self.requests_udp,
            Transport::Tcp => &self.requests_tcp,
        }
        .fetch_add(1, Relaxed);
    }

    pub fn dropped(&self) {
        self.dropped.fetch_add(1, Relaxed);
    }

    pub fn response(&self, rcode: u16) {
        self.responses[(rcode & 0xf) as usize].fetch_add(1, Relaxed);
    }

    pub fn path(&self, p: Path) {
        match p {
            Path::Userspace => &self.userspace,
            Path::Forwarded => &self.forwarded,
        }
        .fetch_add(1, Relaxed);
    }

    pub fn forward_failed(&self) {
        self.forward_failures.fetch_add(1, Relaxed);
    }

    pub fn set_synced(&self, v: bool) {
        self.synced.store(v, Relaxed);
    }

    pub fn is_synced(&self) -> bool {
        self.synced.load(Relaxed)
    }

    pub fn set_api_connected(&self, v: bool) {
        self.api_connected.store(v, Relaxed);
    }

    pub fn set_kernel_pin_path(&self, p: PathBuf) {
        *self.kernel_pin_path.lock().expect("metrics lock") = Some(p);
    }

    /// Queries answered by userspace from the zone.
    pub fn userspace_answers(&self) -> u64 {
        self.userspace.load(Relaxed)
    }

    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Relaxed)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let kernel = self
            .kernel_pin_path
            .lock()
            .expect("metrics lock")
            .as_ref()
            .and_then(|p| crate::kernel::read_pinned_counters(p).ok())
            .unwrap_or_default();
        let kernel_answered: u64 = kernel
            .iter()
            .filter(|(n, _)| n.starts_with("answered"))
            .map(|(_, v)| v)
            .sum();

        let _ = writeln!(
            o,
            "# HELP xdns_queries_total Queries answered, by the path that answered them."
        );
        let _ = writeln!(o, "# TYPE xdns_queries_total counter");
        let _ = writeln!(o, "xdns_queries_total{{path=\"kernel\"}} {kernel_answered}");
        let _ = writeln!(
            o,
            "xdns_queries_total{{path=\"userspace\"}} {}",
            self.userspace.load(Relaxed)
        );
        let _ = writeln!(
            o,
            "xdns_queries_total{{path=\"forwarded\"}} {}",
            self.forwarded.load(Relaxed)
        );

        let _ = writeln!(
            o,
            "# HELP xdns_kernel_packets_total Packets seen by the XDP program, by outcome."
        );
        let _ = writeln!(o, "# TYPE xdns_kernel_packets_total counter");
        for (name, v) in &kernel {
            let _ = writeln!(o, "xdns_kernel_packets_total{{result=\"{name}\"}} {v}");
        }

        let _ = writeln!(
            o,
            "# HELP coredns_dns_requests_total Requests that reached the userspace server."
        );
        let _ = writeln!(o, "# TYPE coredns_dns_requests_total counter");
        let _ = writeln!(
            o,
            "coredns_dns_requests_total{{proto=\"udp\"}} {}",
            self.requests_udp.load(Relaxed)
        );
        let _ = writeln!(
            o,
            "coredns_dns_requests_total{{proto=\"tcp\"}} {}",
            self.requests_tcp.load(Relaxed)
        );
        let _ = writeln!(
            o,
            "# HELP coredns_dns_responses_total Responses of the userspace server, by rcode."
        );
        let _ = writeln!(o, "# TYPE coredns_dns_responses_total counter");
        for (i, rcode) in RCODES.iter().enumerate() {
            let _ = writeln!(
                o,
                "coredns_dns_responses_total{{rcode=\"{rcode}\"}} {}",
                self.responses[i].load(Relaxed)
            );
        }
        let _ = writeln!(
            o,
            "# HELP xdns_dropped_messages_total Messages not worth a reply (responses, runts)."
        );
        let _ = writeln!(o, "# TYPE xdns_dropped_messages_total counter");
        let _ = writeln!(
            o,
            "xdns_dropped_messages_total {}",
            self.dropped.load(Relaxed)
        );

        let _ = writeln!(
            o,
            "# HELP xdns_forward_failures_total Forwarded queries no upstream answered (SERVFAIL)."
        );
        let _ = writeln!(o, "# TYPE xdns_forward_failures_total counter");
        let _ = writeln!(
            o,
            "xdns_forward_failures_total {}",
            self.forward_failures.load(Relaxed)
        );
        let _ = writeln!(
            o,
            "# HELP coredns_forward_request_duration_seconds Upstream round trips."
        );
        let _ = writeln!(
            o,
            "# TYPE coredns_forward_request_duration_seconds histogram"
        );
        self.upstream_latency
            .render(&mut o, "coredns_forward_request_duration_seconds", "");

        let _ = writeln!(
            o,
            "# HELP xdns_programming_latency_seconds From an object change reaching the agent to the kernel answering it."
        );
        let _ = writeln!(o, "# TYPE xdns_programming_latency_seconds histogram");
        self.programming_latency
            .render(&mut o, "xdns_programming_latency_seconds", "");

        let gauge = |o: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} gauge");
            let _ = writeln!(o, "{name} {v}");
        };
        gauge(
            &mut o,
            "xdns_zone_synced",
            "1 once the whole zone has been loaded.",
            self.synced.load(Relaxed) as u64,
        );
        gauge(
            &mut o,
            "xdns_api_connected",
            "1 while the Kubernetes API watch is healthy.",
            self.api_connected.load(Relaxed) as u64,
        );
        gauge(
            &mut o,
            "xdns_zone_services",
            "Services in the zone.",
            self.zone_services.load(Relaxed),
        );
        gauge(
            &mut o,
            "xdns_zone_endpoints",
            "Endpoints in the zone.",
            self.zone_endpoints.load(Relaxed),
        );
        gauge(
            &mut o,
            "xdns_kernel_entries",
            "Entries in the kernel answer maps.",
            self.kernel_entries.load(Relaxed),
        );
        let _ = writeln!(
            o,
            "# HELP xdns_kernel_map_writes_total Kernel map entries written."
        );
        let _ = writeln!(o, "# TYPE xdns_kernel_map_writes_total counter");
        let _ = writeln!(
            o,
            "xdns_kernel_map_writes_total {}",
            self.kernel_writes.load(Relaxed)
        );
        let _ = writeln!(
            o,
            "xdns_kernel_map_write_failures_total {}",
            self.kernel_write_failures.load(Relaxed)
        );
        self.cache.render(&mut o);
        self.forward.render(&mut o);
        o
    }
}

/// The CoreDNS `type` label of cache metrics, by [`crate::server::cache::Kind`].
const CACHE_TYPES: [&str; 2] = ["success", "denial"];

/// Counters of the cache of upstream answers (CoreDNS `cache` plugin names), indexed by
/// [`crate::server::cache::Kind`] where they have a type.
#[derive(Default)]
pub struct CacheCounters {
    pub hits: [AtomicU64; 2],
    pub misses: AtomicU64,
    pub prefetch: AtomicU64,
    pub served_stale: AtomicU64,
    pub entries: [AtomicU64; 2],
    pub evictions: [AtomicU64; 2],
}

impl CacheCounters {
    fn render(&self, o: &mut String) {
        let typed = |o: &mut String, name: &str, kind: &str, help: &str, v: &[AtomicU64; 2]| {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} {kind}");
            for (t, v) in CACHE_TYPES.iter().zip(v) {
                let _ = writeln!(o, "{name}{{type=\"{t}\"}} {}", v.load(Relaxed));
            }
        };
        typed(
            o,
            "coredns_cache_entries",
            "gauge",
            "Entries in the cache of upstream answers.",
            &self.entries,
        );
        typed(
            o,
            "coredns_cache_hits_total",
            "counter",
            "Queries answered from the cache.",
            &self.hits,
        );
        typed(
            o,
            "coredns_cache_evictions_total",
            "counter",
            "Entries evicted at capacity.",
            &self.evictions,
        );
        for (name, help, v) in [
            (
                "coredns_cache_misses_total",
                "Queries the cache had no answer for.",
                &self.misses,
            ),
            (
                "coredns_cache_prefetch_total",
                "Popular entries refreshed before they expired.",
                &self.prefetch,
            ),
            (
                "coredns_cache_served_stale_total",
                "Queries answered with expired entries because upstreams failed.",
                &self.served_stale,
            ),
        ] {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} counter");
            let _ = writeln!(o, "{name} {}", v.load(Relaxed));
        }
    }
}

/// Counters of one upstream, the `to` label of CoreDNS `forward` metrics.
pub struct UpstreamCounters {
    pub to: String,
    pub requests: AtomicU64,
    pub responses: [AtomicU64; 16],
    pub healthcheck_failures: AtomicU64,
    /// False while down after failed health checks.
    pub healthy: AtomicBool,
    /// It forwards back to this agent (a loop) and is not used.
    pub looped: AtomicBool,
    /// DNS over TLS: connections set up, ...
    pub tls_connections: AtomicU64,
    /// ... open now, ...
    pub tls_open: AtomicU64,
    /// ... and set-ups that failed in the TLS handshake (certificate, server name, protocol) or
    /// did not finish within the upstream timeout.
    pub tls_handshake_failures: AtomicU64,
}

impl UpstreamCounters {
    pub fn response(&self, rcode: u16) {
        self.responses[(rcode & 0xf) as usize].fetch_add(1, Relaxed);
    }
}

/// Counters of the forwarder (CoreDNS `forward` plugin names).
#[derive(Default)]
pub struct ForwardCounters {
    max_concurrent_rejects: AtomicU64,
    healthcheck_broken: AtomicU64,
    upstreams: Mutex<Vec<Arc<UpstreamCounters>>>,
}

impl ForwardCounters {
    /// The counters of upstream `to` (as [`crate::server::upstream::Upstream`] displays it),
    /// created on first use.
    pub fn upstream(&self, to: &str) -> Arc<UpstreamCounters> {
        let to = to.to_string();
        let mut all = self.upstreams.lock().expect("metrics lock");
        if let Some(u) = all.iter().find(|u| u.to == to) {
            return u.clone();
        }
        let u = Arc::new(UpstreamCounters {
            to,
            requests: AtomicU64::new(0),
            responses: Default::default(),
            healthcheck_failures: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            looped: AtomicBool::new(false),
            tls_connections: AtomicU64::new(0),
            tls_open: AtomicU64::new(0),
            tls_handshake_failures: AtomicU64::new(0),
        });
        all.push(u.clone());
        u
    }

    pub fn reject(&self) {
        self.max_concurrent_rejects.fetch_add(1, Relaxed);
    }

    /// Every upstream was down: all were tried anyway.
    pub fn broken(&self) {
        self.healthcheck_broken.fetch_add(1, Relaxed);
    }

    fn render(&self, o: &mut String) {
        let all = self.upstreams.lock().expect("metrics lock").clone();
        let per = |o: &mut String,
                   name: &str,
                   kind: &str,
                   help: &str,
                   v: &dyn Fn(&UpstreamCounters) -> u64| {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} {kind}");
            for u in &all {
                let _ = writeln!(o, "{name}{{to=\"{}\"}} {}", u.to, v(u));
            }
        };
        per(
            o,
            "coredns_forward_requests_total",
            "counter",
            "Queries sent to each upstream.",
            &|u| u.requests.load(Relaxed),
        );
        let _ = writeln!(
            o,
            "# HELP coredns_forward_responses_total Answers from each upstream, by rcode."
        );
        let _ = writeln!(o, "# TYPE coredns_forward_responses_total counter");
        for u in &all {
            for (i, rcode) in RCODES.iter().enumerate() {
                let _ = writeln!(
                    o,
                    "coredns_forward_responses_total{{to=\"{}\",rcode=\"{rcode}\"}} {}",
                    u.to,
                    u.responses[i].load(Relaxed)
                );
            }
        }
        per(
            o,
            "coredns_forward_healthcheck_failures_total",
            "counter",
            "Failed health checks of each upstream.",
            &|u| u.healthcheck_failures.load(Relaxed),
        );
        per(
            o,
            "xdns_forward_upstream_healthy",
            "gauge",
            "1 unless the upstream is down after failed health checks.",
            &|u| u.healthy.load(Relaxed) as u64,
        );
        per(
            o,
            "xdns_forward_loop_detected",
            "gauge",
            "1 when the upstream forwards back to this agent; it is not used.",
            &|u| u.looped.load(Relaxed) as u64,
        );
        let tls: Vec<_> = all.iter().filter(|u| u.to.starts_with("tls://")).collect();
        if !tls.is_empty() {
            for (name, kind, help, v) in [
                (
                    "xdns_forward_tls_connections_total",
                    "counter",
                    "TLS connections set up to each DNS-over-TLS upstream.",
                    (|u: &UpstreamCounters| u.tls_connections.load(Relaxed))
                        as fn(&UpstreamCounters) -> u64,
                ),
                (
                    "xdns_forward_tls_open_connections",
                    "gauge",
                    "TLS connections open to each DNS-over-TLS upstream.",
                    |u| u.tls_open.load(Relaxed),
                ),
                (
                    "xdns_forward_tls_handshake_failures_total",
                    "counter",
                    "TLS connections to each DNS-over-TLS upstream whose handshake failed \
                     (certificate, server name, protocol) or timed out.",
                    |u| u.tls_handshake_failures.load(Relaxed),
                ),
            ] {
                let _ = writeln!(o, "# HELP {name} {help}");
                let _ = writeln!(o, "# TYPE {name} {kind}");
                for u in &tls {
                    let _ = writeln!(o, "{name}{{to=\"{}\"}} {}", u.to, v(u));
                }
            }
        }
        for (name, help, v) in [
            (
                "coredns_forward_max_concurrent_rejects_total",
                "Queries refused because --max-concurrent upstream queries were in flight.",
                &self.max_concurrent_rejects,
            ),
            (
                "coredns_forward_healthcheck_broken_total",
                "Queries sent while every upstream was down (all tried anyway).",
                &self.healthcheck_broken,
            ),
        ] {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} counter");
            let _ = writeln!(o, "{name} {}", v.load(Relaxed));
        }
    }
}

/// Serves `/metrics`, `/health` and `/ready` until the task is cancelled.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> std::io::Result<()> {
    loop {
        let (mut stream, _) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            // Read the request head (bounded in size and time).
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while n < buf.len() {
                    match stream.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(m) => {
                            n += m;
                            if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                                break;
                            }
                        }
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let (status, ctype, body) = match path {
                "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
                "/health" => ("200 OK", "text/plain", "OK\n".to_string()),
                "/ready" if metrics.is_synced() => ("200 OK", "text/plain", "OK\n".to_string()),
                "/ready" => (
                    "503 Service Unavailable",
                    "text/plain",
                    "zone not loaded yet\n".to_string(),
                ),
                _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
        });
    }
}

/// Parses `--metrics-addr`: `:9253` means every address.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let s = if let Some(port) = s.strip_prefix(':') {
        format!("0.0.0.0:{port}")
    } else {
        s.to_string()
    };
    s.parse()
        .map_err(|_| format!("{s:?} is not ADDR:PORT or :PORT"))
}
