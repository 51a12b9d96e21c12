//! Metrics and health, in the conventions operators already use: a Prometheus text endpoint
//! (CoreDNS metric names where the meaning is the same), `/health` and `/ready`.

use std::{
    convert::Infallible,
    fmt,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, prometheus_text},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::{net::TcpListener, sync::Semaphore};

use crate::dns::Transport;

/// Which part of xdns answered a query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// The userspace server, from the zone.
    Userspace,
    /// Names outside the cluster and ExternalName targets: answered from the cache of upstream
    /// answers or upstream (`coredns_cache_hits_total` tells them apart).
    Forwarded,
}

/// A histogram of durations with fixed buckets (seconds).
pub struct Histogram(prometheus_client::metrics::histogram::Histogram);

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self(prometheus_client::metrics::histogram::Histogram::new(
            bounds.iter().copied(),
        ))
    }

    pub fn observe(&self, d: Duration) {
        self.0.observe(d.as_secs_f64());
    }

    fn encode(&self, e: &mut DescriptorEncoder, name: &str, help: &str) -> fmt::Result {
        let descriptor = e.encode_descriptor(name, help, None, MetricType::Histogram)?;
        EncodeMetric::encode(&self.0, descriptor)
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
    /// Zone loaded, queries steered to this agent and its programs attached: /ready says 200.
    serving: AtomicBool,
    api_connected: AtomicBool,
    pub zone_services: AtomicU64,
    pub zone_endpoints: AtomicU64,
    pub kernel_entries: AtomicU64,
    pub kernel_writes: AtomicU64,
    pub kernel_write_failures: AtomicU64,
    /// Entries the cache of upstream answers has in the kernel.
    pub kernel_cache_entries: AtomicU64,
    /// Where the kernel counters are pinned (None: no kernel path).
    kernel_pin_path: Mutex<Option<PathBuf>>,
    pub cache: Arc<CacheCounters>,
    pub forward: ForwardCounters,
    pub limits: Arc<LimitCounters>,
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
            serving: AtomicBool::new(false),
            api_connected: AtomicBool::new(false),
            zone_services: AtomicU64::new(0),
            zone_endpoints: AtomicU64::new(0),
            kernel_entries: AtomicU64::new(0),
            kernel_writes: AtomicU64::new(0),
            kernel_write_failures: AtomicU64::new(0),
            kernel_cache_entries: AtomicU64::new(0),
            kernel_pin_path: Mutex::new(None),
            cache: Arc::default(),
            forward: ForwardCounters::default(),
            limits: Arc::default(),
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

    /// The agent serves: its zone is loaded, queries come to it, its programs are attached.
    /// Only then is it ready — a rolling update stops the old agent once the new one is ready,
    /// and the old one must not leave before the new one has taken over.
    pub fn set_serving(&self) {
        self.serving.store(true, Relaxed);
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

    /// The Prometheus text exposition (format 0.0.4), as `/metrics` serves it.
    pub fn render(self: &Arc<Self>) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scrape(self.clone())));
        let mut out = String::new();
        prometheus_text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail, and the collector fails only with it");
        out
    }

    /// Every metric, read at scrape time. Counter names are given without `_total`: the
    /// encoder appends it (`xdns_queries` is exposed as `xdns_queries_total`).
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let kernel = self
            .kernel_pin_path
            .lock()
            .expect("metrics lock")
            .as_ref()
            .and_then(|p| crate::kernel::read_pinned_counters(p).ok())
            .unwrap_or_default();
        let kernel_count = |names: &[&str]| -> u64 {
            kernel
                .iter()
                .filter(|(n, _)| names.contains(n))
                .map(|(_, v)| v)
                .sum()
        };
        let kernel_zone = kernel_count(&["answered", "answered_nodata", "answered_nxdomain"]);
        let kernel_cache = kernel_count(&["answered_cached"]);
        let kernel_autopath = kernel_count(&["answered_autopath"]);

        counters(
            &mut e,
            "xdns_queries",
            "Queries answered, by the path that answered them (kernel: from the zone; \
             kernel_cache: from the cache of upstream answers; kernel_autopath: a completed \
             search path).",
            "path",
            [
                ("kernel", kernel_zone),
                ("kernel_cache", kernel_cache),
                ("kernel_autopath", kernel_autopath),
                ("userspace", self.userspace.load(Relaxed)),
                ("forwarded", self.forwarded.load(Relaxed)),
            ],
        )?;
        counters(
            &mut e,
            "xdns_kernel_packets",
            "Packets seen by the XDP program, by outcome.",
            "result",
            kernel.iter().map(|(name, v)| (*name, *v)),
        )?;
        counters(
            &mut e,
            "coredns_dns_requests",
            "Requests that reached the userspace server.",
            "proto",
            [
                ("udp", self.requests_udp.load(Relaxed)),
                ("tcp", self.requests_tcp.load(Relaxed)),
            ],
        )?;
        counters(
            &mut e,
            "coredns_dns_responses",
            "Responses of the userspace server, by rcode.",
            "rcode",
            RCODES
                .iter()
                .zip(&self.responses)
                .map(|(rcode, v)| (*rcode, v.load(Relaxed))),
        )?;
        counter(
            &mut e,
            "xdns_dropped_messages",
            "Messages not worth a reply (responses, runts).",
            self.dropped.load(Relaxed),
        )?;
        counter(
            &mut e,
            "xdns_forward_failures",
            "Forwarded queries no upstream answered (SERVFAIL).",
            self.forward_failures.load(Relaxed),
        )?;
        self.upstream_latency.encode(
            &mut e,
            "coredns_forward_request_duration_seconds",
            "Upstream round trips.",
        )?;
        self.programming_latency.encode(
            &mut e,
            "xdns_programming_latency_seconds",
            "From an object change reaching the agent to the kernel answering it.",
        )?;
        for (name, help, v) in [
            (
                "xdns_zone_synced",
                "1 once the whole zone has been loaded.",
                self.synced.load(Relaxed) as u64,
            ),
            (
                "xdns_api_connected",
                "1 while the Kubernetes API watch is healthy.",
                self.api_connected.load(Relaxed) as u64,
            ),
            (
                "xdns_zone_services",
                "Services in the zone.",
                self.zone_services.load(Relaxed),
            ),
            (
                "xdns_zone_endpoints",
                "Endpoints in the zone.",
                self.zone_endpoints.load(Relaxed),
            ),
            (
                "xdns_kernel_entries",
                "Entries in the kernel answer maps.",
                self.kernel_entries.load(Relaxed),
            ),
            (
                "xdns_kernel_cache_entries",
                "Entries of the cache of upstream answers in the kernel.",
                self.kernel_cache_entries.load(Relaxed),
            ),
        ] {
            gauge(&mut e, name, help, v)?;
        }
        counter(
            &mut e,
            "xdns_kernel_map_writes",
            "Kernel map entries written.",
            self.kernel_writes.load(Relaxed),
        )?;
        counter(
            &mut e,
            "xdns_kernel_map_write_failures",
            "Kernel map writes that failed (a full map).",
            self.kernel_write_failures.load(Relaxed),
        )?;
        self.cache.encode(&mut e)?;
        self.limits.encode(&mut e)?;
        self.forward.encode(&mut e)
    }
}

/// The metrics as a prometheus-client collector: read at each scrape, so the counters stay
/// plain atomics on the query path and the kernel's per-CPU counters are summed only when asked.
struct Scrape(Arc<Metrics>);

impl fmt::Debug for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Scrape")
    }
}

impl Collector for Scrape {
    fn encode(&self, e: DescriptorEncoder) -> fmt::Result {
        self.0.encode(e)
    }
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    ConstCounter::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// A counter with one label, a sample per value of it.
fn counters<'a>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    samples: impl IntoIterator<Item = (&'a str, u64)>,
) -> fmt::Result {
    labelled(e, name, help, MetricType::Counter, label, samples)
}

fn labelled<'a>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    label: &str,
    samples: impl IntoIterator<Item = (&'a str, u64)>,
) -> fmt::Result {
    let mut family = e.encode_descriptor(name, help, None, kind)?;
    for (value, v) in samples {
        let labels = [(label, value)];
        let sample = family.encode_family(&labels)?;
        match kind {
            MetricType::Gauge => ConstGauge::new(v).encode(sample)?,
            _ => ConstCounter::new(v).encode(sample)?,
        }
    }
    Ok(())
}

/// Which limit turned a query or a connection away (`server::limits`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusedBy {
    /// A query over its client's `--rate-limit`.
    Rate = 0,
    /// A query that would have waited for an upstream beyond `--max-pending`.
    Pending = 1,
    /// A connection beyond `--tcp-max-connections-per-client`, none of the client's waiting.
    PerClient = 2,
    /// A connection beyond `--tcp-max-connections`, none waiting for its client.
    Total = 3,
}

/// Why the server closed a TCP connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClosedBy {
    /// No query for `--tcp-idle-timeout`.
    Idle = 0,
    /// A query not finished, or a reply not taken, within `--tcp-idle-timeout`.
    Stalled = 1,
    /// The one that had waited longest for its client, to make room for a new connection.
    Evicted = 2,
}

/// Counters of the limits on what clients can make the userspace server hold.
#[derive(Default)]
pub struct LimitCounters {
    refused: [AtomicU64; 4],
    closed: [AtomicU64; 3],
    /// TCP connections open now.
    pub tcp_open: AtomicU64,
}

impl LimitCounters {
    pub fn refused(&self, by: RefusedBy) {
        self.refused[by as usize].fetch_add(1, Relaxed);
    }

    pub fn tcp_closed(&self, by: ClosedBy) {
        self.closed[by as usize].fetch_add(1, Relaxed);
    }

    fn encode(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let r = |by: RefusedBy| self.refused[by as usize].load(Relaxed);
        counters(
            e,
            "xdns_refused_queries",
            "Queries answered REFUSED by a limit: the client's rate (--rate-limit), or too many \
             queries waiting for upstreams (--max-pending).",
            "limit",
            [
                ("rate", r(RefusedBy::Rate)),
                ("pending", r(RefusedBy::Pending)),
            ],
        )?;
        gauge(
            e,
            "xdns_tcp_connections",
            "TCP connections open.",
            self.tcp_open.load(Relaxed),
        )?;
        counters(
            e,
            "xdns_tcp_refused_connections",
            "TCP connections closed as they were accepted: over a limit with none to close \
             instead.",
            "limit",
            [
                ("per_client", r(RefusedBy::PerClient)),
                ("total", r(RefusedBy::Total)),
            ],
        )?;
        counters(
            e,
            "xdns_tcp_closed_connections",
            "TCP connections the server closed, by reason.",
            "reason",
            [
                ("idle", self.closed[ClosedBy::Idle as usize].load(Relaxed)),
                (
                    "stalled",
                    self.closed[ClosedBy::Stalled as usize].load(Relaxed),
                ),
                (
                    "evicted",
                    self.closed[ClosedBy::Evicted as usize].load(Relaxed),
                ),
            ],
        )
    }
}

/// The CoreDNS `type` label of cache metrics, by the cache's kind of answer (success, denial).
const CACHE_TYPES: [&str; 2] = ["success", "denial"];

/// Counters of the cache of upstream answers (CoreDNS `cache` plugin names), indexed by the
/// cache's kind of answer (0 success, 1 denial) where they have a type.
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
    fn encode(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let typed = |v: &'_ [AtomicU64; 2]| -> [(&'static str, u64); 2] {
            [
                (CACHE_TYPES[0], v[0].load(Relaxed)),
                (CACHE_TYPES[1], v[1].load(Relaxed)),
            ]
        };
        labelled(
            e,
            "coredns_cache_entries",
            "Entries in the cache of upstream answers.",
            MetricType::Gauge,
            "type",
            typed(&self.entries),
        )?;
        counters(
            e,
            "coredns_cache_hits",
            "Queries answered from the cache.",
            "type",
            typed(&self.hits),
        )?;
        counters(
            e,
            "coredns_cache_evictions",
            "Entries evicted at capacity.",
            "type",
            typed(&self.evictions),
        )?;
        counter(
            e,
            "coredns_cache_misses",
            "Queries the cache had no answer for.",
            self.misses.load(Relaxed),
        )?;
        counter(
            e,
            "coredns_cache_prefetch",
            "Popular entries refreshed before they expired.",
            self.prefetch.load(Relaxed),
        )?;
        counter(
            e,
            "coredns_cache_served_stale",
            "Queries answered with expired entries because upstreams failed.",
            self.served_stale.load(Relaxed),
        )
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
    /// Held by the upstreams themselves: an upstream that leaves every set (a kube-dns pod
    /// that rolled away, an address dropped from the ConfigMap) takes its series with it once
    /// nothing uses it, so endpoints that come and go do not pile up series. One that comes
    /// back starts from zero, which Prometheus reads as a counter reset.
    upstreams: Mutex<Vec<Weak<UpstreamCounters>>>,
    /// The forwarding routes: the kube-dns ConfigMap and the kube-dns Service's endpoints.
    pub routing: RoutingCounters,
}

/// How the forwarding routes follow the cluster.
#[derive(Default)]
pub struct RoutingCounters {
    /// Versions of the kube-dns ConfigMap refused (malformed): the last good settings stay.
    pub config_refused: AtomicU64,
    /// The kube-dns ConfigMap as it is now is applied (or there is none); false while a
    /// refused version is the latest.
    pub config_refused_now: AtomicBool,
    /// Ready endpoints of the kube-dns Service that names go to (intercept mode).
    pub kube_dns_endpoints: AtomicU64,
}

impl ForwardCounters {
    /// The counters of upstream `to` (as [`crate::server::upstream::Upstream`] displays it),
    /// created on first use, shared while any user holds them.
    pub fn upstream(&self, to: &str) -> Arc<UpstreamCounters> {
        let to = to.to_string();
        let mut all = self.upstreams.lock().expect("metrics lock");
        all.retain(|u| u.strong_count() > 0);
        if let Some(u) = all.iter().filter_map(Weak::upgrade).find(|u| u.to == to) {
            return u;
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
        all.push(Arc::downgrade(&u));
        u
    }

    pub fn reject(&self) {
        self.max_concurrent_rejects.fetch_add(1, Relaxed);
    }

    /// Every upstream was down: all were tried anyway.
    pub fn broken(&self) {
        self.healthcheck_broken.fetch_add(1, Relaxed);
    }

    fn encode(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let all: Vec<Arc<UpstreamCounters>> = self
            .upstreams
            .lock()
            .expect("metrics lock")
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let per = |e: &mut DescriptorEncoder,
                   name: &str,
                   kind: MetricType,
                   help: &str,
                   v: &dyn Fn(&UpstreamCounters) -> u64| {
            labelled(
                e,
                name,
                help,
                kind,
                "to",
                all.iter().map(|u| (u.to.as_str(), v(u))),
            )
        };
        per(
            e,
            "coredns_forward_requests",
            MetricType::Counter,
            "Queries sent to each upstream.",
            &|u| u.requests.load(Relaxed),
        )?;
        {
            let mut family = e.encode_descriptor(
                "coredns_forward_responses",
                "Answers from each upstream, by rcode.",
                None,
                MetricType::Counter,
            )?;
            for u in &all {
                for (rcode, v) in RCODES.iter().zip(&u.responses) {
                    let labels = [("to", u.to.as_str()), ("rcode", rcode)];
                    ConstCounter::new(v.load(Relaxed)).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        per(
            e,
            "coredns_forward_healthcheck_failures",
            MetricType::Counter,
            "Failed health checks of each upstream.",
            &|u| u.healthcheck_failures.load(Relaxed),
        )?;
        per(
            e,
            "xdns_forward_upstream_healthy",
            MetricType::Gauge,
            "1 unless the upstream is down after failed health checks.",
            &|u| u.healthy.load(Relaxed) as u64,
        )?;
        per(
            e,
            "xdns_forward_loop_detected",
            MetricType::Gauge,
            "1 when the upstream forwards back to this agent; it is not used.",
            &|u| u.looped.load(Relaxed) as u64,
        )?;
        let tls: Vec<_> = all
            .iter()
            .filter(|u| u.to.starts_with("tls://"))
            .cloned()
            .collect();
        if !tls.is_empty() {
            let per_tls = |e: &mut DescriptorEncoder,
                           name: &str,
                           kind: MetricType,
                           help: &str,
                           v: &dyn Fn(&UpstreamCounters) -> u64| {
                labelled(
                    e,
                    name,
                    help,
                    kind,
                    "to",
                    tls.iter().map(|u| (u.to.as_str(), v(u))),
                )
            };
            per_tls(
                e,
                "xdns_forward_tls_connections",
                MetricType::Counter,
                "TLS connections set up to each DNS-over-TLS upstream.",
                &|u| u.tls_connections.load(Relaxed),
            )?;
            per_tls(
                e,
                "xdns_forward_tls_open_connections",
                MetricType::Gauge,
                "TLS connections open to each DNS-over-TLS upstream.",
                &|u| u.tls_open.load(Relaxed),
            )?;
            per_tls(
                e,
                "xdns_forward_tls_handshake_failures",
                MetricType::Counter,
                "TLS connections to each DNS-over-TLS upstream whose handshake failed \
                 (certificate, server name, protocol) or timed out.",
                &|u| u.tls_handshake_failures.load(Relaxed),
            )?;
        }
        counter(
            e,
            "coredns_forward_max_concurrent_rejects",
            "Queries refused because --max-concurrent upstream queries were in flight.",
            self.max_concurrent_rejects.load(Relaxed),
        )?;
        counter(
            e,
            "coredns_forward_healthcheck_broken",
            "Queries sent while every upstream was down (all tried anyway).",
            self.healthcheck_broken.load(Relaxed),
        )?;
        let r = &self.routing;
        counter(
            e,
            "xdns_kube_dns_config_refused",
            "Versions of the kube-dns ConfigMap refused as malformed (the last good settings stay).",
            r.config_refused.load(Relaxed),
        )?;
        gauge(
            e,
            "xdns_kube_dns_config_valid",
            "0 while the kube-dns ConfigMap as it is now is refused and older settings are in force.",
            u64::from(!r.config_refused_now.load(Relaxed)),
        )?;
        gauge(
            e,
            "xdns_kube_dns_endpoints",
            "Ready endpoints of the kube-dns Service that names outside the cluster go to.",
            r.kube_dns_endpoints.load(Relaxed),
        )
    }
}

/// Connections served at once: the port is reachable from the node network, and a probe or a
/// scrape needs one or two.
const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request head, and how long one connection may live
/// (keep-alive included): a slow or idle client cannot hold a place for long.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

/// Serves `/metrics`, `/health` and `/ready` over HTTP/1.1 (hyper) until the task is cancelled.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let places = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut last_warned = None;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                crate::accept::accept_failed(e, "metrics", &mut last_warned).await?;
                continue;
            }
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics port busy; connection closed");
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let reply = respond(&req, &metrics);
                async move { Ok::<_, Infallible>(reply) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
                tracing::debug!(%peer, error = %e, "metrics connection failed");
            }
            drop(place);
        });
    }
}

fn respond(req: &Request<Incoming>, metrics: &Arc<Metrics>) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => (
            StatusCode::OK,
            prometheus_text::CONTENT_TYPE,
            metrics.render(),
        ),
        (&Method::GET | &Method::HEAD, "/health") => (StatusCode::OK, TEXT, "OK\n".to_string()),
        (&Method::GET | &Method::HEAD, "/ready") if metrics.serving.load(Relaxed) => {
            (StatusCode::OK, TEXT, "OK\n".to_string())
        }
        (&Method::GET | &Method::HEAD, "/ready") => (
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            if metrics.is_synced() {
                "zone loaded; taking over\n"
            } else {
                "zone not loaded yet\n"
            }
            .to_string(),
        ),
        (&Method::GET | &Method::HEAD, _) => {
            (StatusCode::NOT_FOUND, TEXT, "not found\n".to_string())
        }
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "GET or HEAD\n".to_string(),
        ),
    };
    let mut reply = Response::new(Full::new(Bytes::from(body)));
    *reply.status_mut() = status;
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    reply
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

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use http_body_util::{BodyExt as _, Empty};
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};
    use prometheus_parse::{Sample, Scrape, Value};

    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> (StatusCode, String, String) {
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let reply = client
            .get(format!("http://{addr}{path}").parse().expect("a URI"))
            .await
            .expect("an HTTP reply");
        let status = reply.status();
        let ctype = reply
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().expect("ASCII").to_string())
            .unwrap_or_default();
        let body = reply
            .into_body()
            .collect()
            .await
            .expect("a body")
            .to_bytes();
        (
            status,
            ctype,
            String::from_utf8(body.to_vec()).expect("UTF-8"),
        )
    }

    fn sample<'a>(s: &'a Scrape, name: &str, labels: &[(&str, &str)]) -> &'a Sample {
        s.samples
            .iter()
            .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
            .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
    }

    fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
        match &sample(s, name, labels).value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            other => panic!("{name}: not a single value: {other:?}"),
        }
    }

    /// Serves on loopback, scrapes over HTTP, and reads the exposition back with a Prometheus
    /// text parser: the names, labels, types and values dashboards use.
    #[tokio::test]
    async fn scrape_parses_with_the_names_dashboards_use() {
        let metrics = Arc::new(Metrics::default());
        metrics.request(Transport::Udp);
        metrics.request(Transport::Udp);
        metrics.request(Transport::Tcp);
        metrics.response(3);
        metrics.path(Path::Userspace);
        metrics.path(Path::Forwarded);
        metrics.path(Path::Forwarded);
        metrics.set_zone_size(7, 11);
        metrics.kernel_synced(5, 1, 42);
        metrics.upstream_latency.observe(Duration::from_micros(300));
        metrics.upstream_latency.observe(Duration::from_millis(20));
        metrics.cache.hits[1].fetch_add(4, Relaxed);
        let up = metrics.forward.upstream("198.51.100.53:53");
        up.requests.fetch_add(9, Relaxed);
        up.response(2);

        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let server = tokio::spawn(serve(listener, metrics.clone()));

        let (status, ctype, body) = get(addr, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(ctype, "text/plain; version=0.0.4; charset=utf-8");
        let s = Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("parses");
        assert_eq!(
            value(&s, "xdns_queries_total", &[("path", "userspace")]),
            1.0
        );
        assert_eq!(
            value(&s, "xdns_queries_total", &[("path", "forwarded")]),
            2.0
        );
        assert_eq!(value(&s, "xdns_queries_total", &[("path", "kernel")]), 0.0);
        assert_eq!(
            value(&s, "coredns_dns_requests_total", &[("proto", "udp")]),
            2.0
        );
        assert_eq!(
            value(&s, "coredns_dns_requests_total", &[("proto", "tcp")]),
            1.0
        );
        assert_eq!(
            value(&s, "coredns_dns_responses_total", &[("rcode", "NXDOMAIN")]),
            1.0
        );
        assert_eq!(value(&s, "xdns_zone_services", &[]), 7.0);
        assert_eq!(value(&s, "xdns_zone_endpoints", &[]), 11.0);
        assert_eq!(value(&s, "xdns_kernel_entries", &[]), 42.0);
        assert_eq!(value(&s, "xdns_kernel_map_writes_total", &[]), 5.0);
        assert_eq!(value(&s, "xdns_kernel_map_write_failures_total", &[]), 1.0);
        assert_eq!(value(&s, "xdns_zone_synced", &[]), 0.0);
        assert_eq!(
            value(&s, "coredns_cache_hits_total", &[("type", "denial")]),
            4.0
        );
        let to = [("to", "198.51.100.53:53")];
        assert_eq!(value(&s, "coredns_forward_requests_total", &to), 9.0);
        assert_eq!(
            value(
                &s,
                "coredns_forward_responses_total",
                &[("to", "198.51.100.53:53"), ("rcode", "SERVFAIL")]
            ),
            1.0
        );
        assert_eq!(value(&s, "xdns_forward_upstream_healthy", &to), 1.0);
        // The types dashboards and recording rules rely on.
        for (name, ty) in [
            ("xdns_queries_total", Value::Counter(0.0)),
            ("xdns_zone_services", Value::Gauge(0.0)),
            ("coredns_cache_entries", Value::Gauge(0.0)),
        ] {
            assert_eq!(
                std::mem::discriminant(&sample(&s, name, &[]).value),
                std::mem::discriminant(&ty),
                "{name}"
            );
        }
        match &sample(&s, "coredns_forward_request_duration_seconds", &[]).value {
            Value::Histogram(buckets) => {
                let le = |b: f64| buckets.iter().find(|c| c.less_than == b).map(|c| c.count);
                assert_eq!(le(0.00025), Some(0.0));
                assert_eq!(le(0.0005), Some(1.0));
                assert_eq!(le(0.025), Some(2.0));
                assert_eq!(le(f64::INFINITY), Some(2.0));
            }
            other => panic!("not a histogram: {other:?}"),
        }
        assert_eq!(
            value(&s, "coredns_forward_request_duration_seconds_count", &[]),
            2.0
        );

        assert_eq!(get(addr, "/health").await.0, StatusCode::OK);
        let (status, _, body) = get(addr, "/ready").await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "zone not loaded yet\n")
        );
        metrics.set_synced(true);
        let (status, _, body) = get(addr, "/ready").await;
        assert_eq!(
            (status, body.as_str()),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "zone loaded; taking over\n"
            )
        );
        metrics.set_serving();
        assert_eq!(get(addr, "/ready").await.0, StatusCode::OK);
        assert_eq!(get(addr, "/nope").await.0, StatusCode::NOT_FOUND);
        server.abort();
    }

    /// Garbage on the port gets an HTTP error or a closed connection, never a crash, and the
    /// server keeps answering.
    #[tokio::test]
    async fn malformed_requests_do_not_stop_the_server() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        let metrics = Arc::new(Metrics::default());
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let server = tokio::spawn(serve(listener, metrics));
        for junk in [
            &b"\x00\x01\x02garbage\r\n\r\n"[..],
            b"GET / HTTP/9.9\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        ] {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            s.write_all(junk).await.expect("write");
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
            let text = String::from_utf8_lossy(&out);
            assert!(
                text.is_empty() || text.starts_with("HTTP/1.1 4"),
                "{junk:?} got {text}"
            );
        }
        assert_eq!(get(addr, "/health").await.0, StatusCode::OK);
        server.abort();
    }
}
