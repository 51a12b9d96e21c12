//! Command line, and the checks that refuse a bad configuration at start.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::{Args, Parser, Subcommand};

use crate::{
    kernel::AttachMode,
    server::{
        cache::CacheSettings,
        forward::{ForwardSettings, Policy, Timeouts},
        limits::{self, LimitSettings, Rate},
        routing::{DefaultUpstreams, RouteFlags, StubDomain, UpstreamRules},
        tls::{TlsConfigError, client_config},
        upstream::Upstream,
    },
    source::kubernetes::ClientSource,
};

#[derive(Parser, Debug)]
#[command(
    name = "dns-agent",
    version,
    about = "xdns node agent: an eBPF-accelerated node-local DNS cache for Kubernetes",
    long_about = "xdns node agent. Answers cached cluster.local queries in the kernel with an XDP \
                  program, serves the rest from userspace, and forwards names outside the cluster \
                  upstream. Runs on every node, in place of NodeLocal DNSCache."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once at start; boxing would only add noise at every use"
)]
pub enum Command {
    /// Load the XDP program, fill its maps from the cluster, and serve DNS.
    Run(RunArgs),
    /// Print the kernel counters (and the userspace ones) of a running agent.
    Stats(StatsArgs),
    /// Show, live and per packet, what the XDP program of a running agent decided and why,
    /// until Ctrl-C. While no `trace` runs, the program writes no events; it only checks a flag.
    Trace(TraceArgs),
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Kubernetes objects as YAML (Namespace, Service, EndpointSlice, and the kube-dns
    /// ConfigMap; several documents or `kind: List`) instead of the API. Edits apply without a
    /// restart.
    #[arg(long, value_name = "PATH")]
    pub zone_file: Option<PathBuf>,

    /// Watch the Kubernetes API named by this kubeconfig (its current context). Without it
    /// (and without --zone-file) the agent must run in a pod, and uses its service account.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,

    /// Address to serve DNS on, IPv4 or IPv6 (repeatable). The XDP program answers queries to
    /// these addresses only. Each must be assigned to an interface of the node.
    #[arg(long = "listen", value_name = "ADDR", default_value = "169.254.20.10")]
    pub listen: Vec<IpAddr>,

    /// Interface to attach the XDP program to (repeatable): the host side of pod veths, or a
    /// NIC. Without any, only userspace answers.
    #[arg(long = "interface", value_name = "NAME")]
    pub interfaces: Vec<String>,

    /// Attach the XDP program to every interface whose name matches (repeatable; shell globs:
    /// `*`, `?`, `[0-9]`, `{a,b}`), those there now and those that appear later: pod veths,
    /// e.g. `cali*` (Calico), `lxc*` (Cilium), `veth*` (bridge CNIs' host sides).
    #[arg(long = "interface-pattern", value_name = "GLOB")]
    pub interface_patterns: Vec<String>,

    /// XDP attach mode: generic works everywhere and is the right one for veths; driver for NICs
    /// whose driver supports XDP.
    #[arg(long, value_enum, default_value_t = AttachMode::Generic)]
    pub attach_mode: AttachMode,

    /// The cluster domain.
    #[arg(long, value_name = "DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,

    /// Upstream resolver for names outside the cluster (repeatable): ADDR, ADDR:PORT or
    /// [IPv6]:PORT for plain DNS (port 53), tls://ADDR[:PORT][#SERVERNAME] for DNS over TLS
    /// (port 853; the certificate must be valid for SERVERNAME, or for ADDR without one).
    /// Overrides the kube-dns ConfigMap's upstreamNameservers. Default: upstreamNameservers if
    /// the ConfigMap has them; else, with --intercept, the ready endpoints of the intercepted
    /// Service (kube-dns), followed live; else the nameservers of /etc/resolv.conf.
    #[arg(long = "upstream", value_name = "[tls://]ADDR[:PORT][#SERVERNAME]")]
    pub upstreams: Vec<String>,

    /// Names at or below DOMAIN go to these upstreams instead (repeatable; addresses in the
    /// forms of --upstream, comma-separated), with the same policy, health checks and cache;
    /// the longest matching domain wins. Overrides the kube-dns ConfigMap's stubDomains entry
    /// for the same domain. E.g. corp.example=192.0.2.53,tls://192.0.2.54#dns.corp.example
    #[arg(
        long = "stub-domain",
        value_name = "DOMAIN=ADDR[,ADDR...]",
        help_heading = "Forwarding"
    )]
    pub stub_domains: Vec<String>,

    /// CA certificates (PEM) that the certificates of tls:// upstreams are checked against,
    /// instead of the system's CA store (repeatable; give the system bundle too to trust both).
    #[arg(long = "upstream-ca", value_name = "PATH", help_heading = "Forwarding")]
    pub upstream_ca: Vec<PathBuf>,

    /// TTL of positive answers from the cluster zone, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub ttl: u32,

    /// TTL of negative answers (NXDOMAIN, NODATA) from the cluster zone, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    pub negative_ttl: u32,

    /// bpffs directory where the agent pins its maps and XDP links (the next agent takes the
    /// links over, so a restart drops no query).
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/xdns")]
    pub pin_path: PathBuf,

    /// Prometheus metrics, /health and /ready. ":PORT" listens on every address.
    #[arg(long, value_name = "ADDR:PORT", default_value = ":9253")]
    pub metrics_addr: String,

    /// Capacity of the kernel answer map for names of up to 62 bytes, in entries; the other
    /// maps are sized in proportion. Memory is used per entry present (about 256 bytes), plus
    /// 16 bytes per entry of capacity. A zone that does not fit is still answered, by
    /// userspace, and the agent says so.
    #[arg(long, value_name = "ENTRIES", default_value_t = dns_common::DEFAULT_ANSWERS_SHORT_MAX)]
    pub kernel_capacity: u32,

    /// Serve from userspace only: do not load the XDP program.
    #[arg(long)]
    pub no_kernel: bool,

    /// UDP receive loops per listen address, each with a socket of its own (SO_REUSEPORT,
    /// queries spread over them by source port and DNS ID): one per CPU the agent may use (its CPU
    /// affinity and cgroup CPU limit counted), at most N.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub max_udp_loops: usize,

    /// Serve the queries pods send to this address — the kube-dns Service's cluster IP — without
    /// it being assigned on the node and without iptables (repeatable; IPv4 and IPv6). The XDP
    /// program answers what it holds; the rest it steers to the agent's listen address of the
    /// same family while the agent answers, and otherwise leaves to the node's Service proxy, so
    /// kube-dns answers as if xdns were not installed. UDP only: TCP goes to kube-dns.
    #[arg(long = "intercept", value_name = "ADDR")]
    pub intercept: Vec<IpAddr>,

    /// Complete search paths (CoreDNS `autopath`): a query from a pod of this node for a name
    /// under its namespace's first search element (`<name>.<ns>.svc.<zone>`) that does not
    /// exist is answered with the first name of the rest of the search list (`svc.<zone>`,
    /// `<zone>`, then the bare name) that does, behind a CNAME, in one round trip instead of four
    /// or five. Needs the Pods of this node (their namespaces by address): watched from the API
    /// (get/list/watch on pods) with --node-name, or `kind: Pod` objects of the zone file.
    /// Off by default, as in CoreDNS: turn it on when pods use the Kubernetes `resolv.conf`
    /// (`ndots:5`) and do not change their search path.
    #[arg(long)]
    pub autopath: bool,

    /// The node this agent runs on: its Pods are watched for --autopath (field selector
    /// `spec.nodeName`). The DaemonSet sets NODE_NAME from the pod's `spec.nodeName`.
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// How long the XDP program keeps answering from its maps after the agent stopped answering
    /// (killed, hung, crash-looping); after that every query passes to the Service. At least 1s.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub kernel_grace: Duration,

    /// Order in which upstreams are tried for each query.
    #[arg(long, value_enum, default_value_t = Policy::Random, help_heading = "Forwarding")]
    pub upstream_policy: Policy,

    /// How long one upstream gets to answer before the next one is tried (e.g. 800ms, 1s); also
    /// the timeout of a health check.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration, help_heading = "Forwarding")]
    pub upstream_timeout: Duration,

    /// How long a query may spend upstream in all before the client gets SERVFAIL (or a stale
    /// answer).
    #[arg(long, value_name = "DURATION", default_value = "1900ms", value_parser = parse_duration, help_heading = "Forwarding")]
    pub forward_timeout: Duration,

    /// Interval of the `. IN NS` health checks of an upstream after it failed a query; they
    /// stop once it answers.
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = parse_duration, help_heading = "Forwarding")]
    pub health_check: Duration,

    /// Failed health checks in a row that mark an upstream down (skipped while another is up).
    /// 0: no health checks, never down.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 2,
        help_heading = "Forwarding"
    )]
    pub max_fails: u32,

    /// Ask upstreams over TCP only (default: UDP, and TCP when the answer is truncated).
    #[arg(long, help_heading = "Forwarding")]
    pub force_tcp: bool,

    /// Upstream queries in flight at once (identical questions share one); a query that would
    /// need another gets REFUSED.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1000,
        help_heading = "Forwarding"
    )]
    pub max_concurrent: usize,

    /// Entries in the cache of upstream answers (positive, negative and failures together); the
    /// least recently used is evicted. 0 turns the cache off.
    #[arg(
        long,
        value_name = "ENTRIES",
        default_value_t = 10_000,
        help_heading = "Cache"
    )]
    pub cache_size: usize,

    /// Lowest TTL an upstream answer is cached (and served) with, in seconds.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 5,
        help_heading = "Cache"
    )]
    pub cache_min_ttl: u32,

    /// Highest TTL a positive upstream answer is cached (and served) with, in seconds.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 3600,
        help_heading = "Cache"
    )]
    pub cache_max_ttl: u32,

    /// Highest TTL a negative upstream answer (NXDOMAIN, NODATA) is cached with, in seconds.
    /// Its own TTL is min(SOA TTL, SOA MINIMUM) (RFC 2308).
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 1800,
        help_heading = "Cache"
    )]
    pub cache_negative_max_ttl: u32,

    /// How long a failed question (no upstream answering, or every one answering SERVFAIL or
    /// REFUSED) is remembered and answered with that error without asking again, in seconds
    /// (RFC 9520). 0: not remembered.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 5,
        help_heading = "Cache"
    )]
    pub cache_servfail_ttl: u32,

    /// Refresh a cached name in the background when it has been asked this many times (with no
    /// gap of a minute) and has at most 10% of its TTL left. With the kernel's copy of the cache
    /// (the default), the queries counted are those of that last 10%: the kernel answers the
    /// rest without the agent seeing them. 0: no prefetch.
    #[arg(
        long,
        value_name = "HITS",
        default_value_t = 10,
        help_heading = "Cache"
    )]
    pub cache_prefetch: u32,

    /// How long after expiry a cached answer may still be served (with TTL 30) when every
    /// upstream fails (RFC 8767). 0: never serve stale answers.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration, help_heading = "Cache")]
    pub serve_stale: Duration,

    /// TCP connections open at once, all clients together. At the limit, a connection waiting
    /// for its client (idle, or in the middle of a query) is closed to make room for a new one:
    /// the longest-waiting one of the client holding the most; when none is waiting, the new
    /// one is closed.
    #[arg(
        long,
        value_name = "N",
        default_value_t = limits::DEFAULT_TCP_CONNECTIONS,
        help_heading = "Limits"
    )]
    pub tcp_max_connections: usize,

    /// TCP connections open at once from one client address; at the limit, that client's
    /// longest-waiting connection is closed to make room. Clients behind one address (a node's
    /// host-network pods) share it.
    #[arg(
        long,
        value_name = "N",
        default_value_t = limits::DEFAULT_TCP_CONNECTIONS_PER_CLIENT,
        help_heading = "Limits"
    )]
    pub tcp_max_connections_per_client: usize,

    /// How long a TCP connection may wait for its client: for its next query, for the rest of
    /// one, or to take a reply; then it is closed.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration, help_heading = "Limits")]
    pub tcp_idle_timeout: Duration,

    /// Client queries waiting for upstream answers at once, UDP and TCP together (several may
    /// wait for one upstream query); a query that would be one more gets REFUSED. Each takes
    /// under 2 KiB while it waits.
    #[arg(
        long,
        value_name = "N",
        default_value_t = limits::DEFAULT_MAX_PENDING,
        help_heading = "Limits"
    )]
    pub max_pending: usize,

    /// Queries per second one client address may send to the agent; beyond it, REFUSED (counted
    /// in xdns_refused_queries_total). Queries the kernel answers never reach the agent and are
    /// not counted. Clients behind one address (a node's host-network pods) share its rate.
    /// 0: no limit.
    #[arg(long, value_name = "QPS", default_value_t = 0, help_heading = "Limits")]
    pub rate_limit: u32,

    /// Queries a client may send at once after being quiet, with --rate-limit. Default: the
    /// rate (one second's worth).
    #[arg(long, value_name = "N", help_heading = "Limits")]
    pub rate_limit_burst: Option<u32>,
    /// Keep the cache of upstream answers out of the kernel. By default every answer the cache
    /// holds is also written to the XDP program's maps with its expiry, and the kernel answers
    /// it until then with its TTLs counted down (stale answers and prefetch stay the agent's:
    /// with --cache-prefetch, the last 10% of each TTL is answered by the agent, which counts
    /// the name's queries there); the kernel's room for them is --cache-size entries.
    #[arg(long, help_heading = "Cache")]
    pub no_kernel_cache: bool,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    /// The running agent's --pin-path.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/xdns")]
    pub pin_path: PathBuf,

    /// The running agent's --metrics-addr, for the userspace counters.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9253")]
    pub metrics_addr: String,
}

#[derive(Args, Debug)]
pub struct TraceArgs {
    /// The running agent's --pin-path.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/xdns")]
    pub pin_path: PathBuf,

    /// Only queries for this name (case-insensitive, trailing dot optional). Packets the
    /// program refused before reading their question carry no name and are not shown then.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Only packets that arrived on this interface.
    #[arg(long, value_name = "IFACE")]
    pub interface: Option<String>,
}

/// A refused configuration: the flag, what is wrong, how to fix it.
#[derive(Debug, thiserror::Error)]
#[error("--{flag}: {problem}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub problem: String,
}

fn refuse(flag: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        flag,
        problem: problem.into(),
    }
}

/// Most entries the kernel's cache maps take (`--cache-size` with the kernel cache on).
const MAX_KERNEL_CACHE: usize = 1 << 23;

/// Largest TTL DNS allows (RFC 2181 §8).
const MAX_TTL: u32 = i32::MAX as u32;
/// Longest a failure may be remembered (RFC 2308 §7.1, RFC 9520: five minutes).
const MAX_SERVFAIL_TTL: u32 = 300;
/// Longest stale answers may be served (RFC 8767 §5 suggests one to three days).
const MAX_SERVE_STALE: Duration = Duration::from_secs(3 * 24 * 3600);

/// Where the cluster's objects come from: exactly one source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectSource {
    ZoneFile(PathBuf),
    Api(ClientSource),
}

/// The most UDP receive loops (sockets) per listen address `--max-udp-loops` accepts.
pub const MAX_UDP_LOOPS: usize = 256;

/// Checked settings of `run`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub args: RunArgs,
    /// UDP receive loops per listen address: one per CPU, at most `--max-udp-loops`.
    pub udp_loops: usize,
    pub source: ObjectSource,
    pub cluster_domain: String,
    /// Where names outside the cluster go, by the command line.
    pub routes: RouteFlags,
    pub metrics_addr: SocketAddr,
    pub forward: ForwardSettings,
    pub cache: CacheSettings,
    pub limits: LimitSettings,
    /// `--interface-pattern`s, checked.
    pub interface_patterns: Vec<crate::kernel::links::Pattern>,
}

/// Kubernetes sets this in every container: the agent runs in a pod and can use its service
/// account.
pub fn in_pod() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|v| !v.is_empty())
}

impl RunArgs {
    /// The cache of upstream answers goes into the kernel too.
    pub fn kernel_cache(&self) -> bool {
        !self.no_kernel && !self.no_kernel_cache && self.cache_size > 0
    }

    pub fn validate(self) -> Result<RunConfig, ConfigError> {
        self.validate_with(in_pod())
    }

    /// [`RunArgs::validate`], told whether the agent runs in a pod.
    pub fn validate_with(self, in_pod: bool) -> Result<RunConfig, ConfigError> {
        let domain = self
            .cluster_domain
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let labels_ok = !domain.is_empty()
            && domain.len() <= 253
            && domain.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !labels_ok {
            return Err(refuse(
                "cluster-domain",
                format!(
                    "{:?} is not a domain name (e.g. cluster.local)",
                    self.cluster_domain
                ),
            ));
        }
        if self.ttl > MAX_TTL {
            return Err(refuse(
                "ttl",
                format!("{} is above the largest TTL, {MAX_TTL}", self.ttl),
            ));
        }
        if self.negative_ttl > MAX_TTL {
            return Err(refuse(
                "negative-ttl",
                format!("{} is above the largest TTL, {MAX_TTL}", self.negative_ttl),
            ));
        }
        if self.listen.is_empty() {
            return Err(refuse("listen", "at least one listen address is needed"));
        }
        for (family, count) in [
            ("IPv4", self.listen.iter().filter(|a| a.is_ipv4()).count()),
            ("IPv6", self.listen.iter().filter(|a| a.is_ipv6()).count()),
        ] {
            if count > dns_common::MAX_LISTEN {
                return Err(refuse(
                    "listen",
                    format!(
                        "{count} {family} addresses; the kernel path takes at most {}",
                        dns_common::MAX_LISTEN
                    ),
                ));
            }
        }
        if let Some(a) = self.listen.iter().find(|a| a.is_unspecified()) {
            return Err(refuse(
                "listen",
                format!(
                    "{a} is not an address queries can be sent to; give the node-local address (169.254.20.10)"
                ),
            ));
        }
        if !(1..=MAX_UDP_LOOPS).contains(&self.max_udp_loops) {
            return Err(refuse(
                "max-udp-loops",
                format!(
                    "{} is out of range: from 1 (one loop) to {MAX_UDP_LOOPS}",
                    self.max_udp_loops
                ),
            ));
        }
        if self.kernel_capacity < 1024 {
            return Err(refuse(
                "kernel-capacity",
                format!("{} is too small; at least 1024", self.kernel_capacity),
            ));
        }
        let source = match (&self.zone_file, &self.kubeconfig) {
            (Some(_), Some(_)) => {
                return Err(refuse(
                    "zone-file",
                    "--zone-file and --kubeconfig are alternative sources of cluster objects: \
                     give one of them",
                ));
            }
            (Some(path), None) => ObjectSource::ZoneFile(path.clone()),
            (None, Some(path)) => {
                // Read it now: a bad path should stop the agent before it touches the kernel.
                kube::config::Kubeconfig::read_from(path).map_err(|e| {
                    refuse(
                        "kubeconfig",
                        format!(
                            "{}: {e}; give the path of a readable kubeconfig file",
                            path.display()
                        ),
                    )
                })?;
                ObjectSource::Api(ClientSource::Kubeconfig(path.clone()))
            }
            (None, None) if in_pod => ObjectSource::Api(ClientSource::InCluster),
            (None, None) => {
                return Err(refuse(
                    "kubeconfig",
                    "no source of cluster objects: not running in a pod (KUBERNETES_SERVICE_HOST \
                     is unset), so give --kubeconfig PATH to watch the Kubernetes API, or \
                     --zone-file PATH to serve a file of objects",
                ));
            }
        };
        let patterns = self
            .interface_patterns
            .iter()
            .map(|p| {
                crate::kernel::links::Pattern::new(p).map_err(|e| refuse("interface-pattern", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !patterns.is_empty() && self.no_kernel {
            return Err(refuse(
                "interface-pattern",
                "--no-kernel serves from userspace only; drop --interface-pattern or --no-kernel",
            ));
        }
        if !self.interfaces.is_empty() && self.no_kernel {
            return Err(refuse(
                "interface",
                "--no-kernel serves from userspace only; drop --interface or --no-kernel",
            ));
        }
        self.check_intercept(&patterns)?;
        if self.autopath
            && matches!(source, ObjectSource::Api(_))
            && self.node_name.as_deref().is_none_or(str::is_empty)
        {
            return Err(refuse(
                "node-name",
                "--autopath watches the Pods of this node: give the node's name (the DaemonSet \
                 sets NODE_NAME from spec.nodeName), or drop --autopath",
            ));
        }
        let rules = UpstreamRules::new(&self.listen, &self.intercept, &domain);
        let upstreams = self.default_upstreams(&rules)?;
        let stub_domains = self.stub_domains(&rules)?;
        let metrics_addr = crate::metrics::parse_addr(&self.metrics_addr)
            .map_err(|e| refuse("metrics-addr", e))?;
        let mut forward = self.forward_settings()?;
        // Loaded now, so that a missing CA store or a bad --upstream-ca stops the agent at
        // start rather than failing every handshake later.
        let tls_flag = match &upstreams {
            DefaultUpstreams::Flags(u) if u.iter().any(Upstream::is_tls) => Some("upstream"),
            _ if stub_domains
                .iter()
                .any(|s| s.upstreams.iter().any(Upstream::is_tls)) =>
            {
                Some("stub-domain")
            }
            _ => None,
        };
        if tls_flag.is_some() || !self.upstream_ca.is_empty() {
            forward.tls = Some(client_config(&self.upstream_ca).map_err(|e| match e {
                TlsConfigError::NoSystemRoots { .. } => {
                    refuse(tls_flag.unwrap_or("upstream"), e.to_string())
                }
                TlsConfigError::CaFile { .. } => refuse("upstream-ca", e.to_string()),
            })?);
        }
        let cache = self.cache_settings()?;
        if self.kernel_cache() && self.cache_size > MAX_KERNEL_CACHE {
            return Err(refuse(
                "cache-size",
                format!(
                    "{} entries do not fit in the kernel's cache maps (at most {MAX_KERNEL_CACHE}); \
                     lower it, or add --no-kernel-cache",
                    self.cache_size
                ),
            ));
        }
        let limits = self.limit_settings(limits::fd_hard_limit().ok())?;
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        Ok(RunConfig {
            udp_loops: cpus.min(self.max_udp_loops),
            interface_patterns: patterns,
            source,
            cluster_domain: domain,
            routes: RouteFlags {
                default: upstreams,
                stub_domains,
                rules,
                intercept: self.intercept.clone(),
            },
            metrics_addr,
            forward,
            cache,
            limits,
            args: self,
        })
    }

    /// `--upstream`; without it, in intercept mode the kube-dns endpoints (found at run time),
    /// else the nameservers of /etc/resolv.conf.
    fn default_upstreams(&self, rules: &UpstreamRules) -> Result<DefaultUpstreams, ConfigError> {
        if !self.upstreams.is_empty() {
            let upstreams = self
                .upstreams
                .iter()
                .map(|u| {
                    let u = parse_upstream_for("upstream", u)?;
                    rules
                        .check_upstream(&u)
                        .map_err(|e| refuse("upstream", e))?;
                    Ok(u)
                })
                .collect::<Result<Vec<_>, ConfigError>>()?;
            return Ok(DefaultUpstreams::Flags(upstreams));
        }
        if !self.intercept.is_empty() {
            return Ok(DefaultUpstreams::KubeDnsEndpoints);
        }
        let upstreams: Vec<Upstream> =
            resolv_conf_nameservers(std::path::Path::new("/etc/resolv.conf"))
                .map_err(|e| {
                    refuse(
                        "upstream",
                        format!("none given and /etc/resolv.conf unusable: {e}"),
                    )
                })?
                .into_iter()
                .map(Upstream::Dns)
                .collect();
        for u in &upstreams {
            rules.check_upstream(u).map_err(|e| {
                refuse(
                    "upstream",
                    format!("none given, and /etc/resolv.conf names {u}: {e}; give --upstream"),
                )
            })?;
        }
        Ok(DefaultUpstreams::ResolvConf(upstreams))
    }

    /// `--stub-domain DOMAIN=ADDR[,ADDR...]`, each domain once.
    fn stub_domains(&self, rules: &UpstreamRules) -> Result<Vec<StubDomain>, ConfigError> {
        let flag = "stub-domain";
        let mut out: Vec<StubDomain> = Vec::new();
        for given in &self.stub_domains {
            let (domain, addresses) = given.split_once('=').ok_or_else(|| {
                refuse(
                    flag,
                    format!(
                        "{given:?} is not DOMAIN=ADDR[,ADDR...]; e.g. \
                         --stub-domain corp.example=192.0.2.53,tls://192.0.2.54#dns.corp.example"
                    ),
                )
            })?;
            let (wire, name) = rules
                .stub_domain(domain)
                .map_err(|e| refuse(flag, format!("{given:?}: {e}")))?;
            if out.iter().any(|s| s.domain == wire) {
                return Err(refuse(
                    flag,
                    format!(
                        "{name} is given twice; give it once, with every address: \
                         --stub-domain {name}=ADDR,ADDR"
                    ),
                ));
            }
            if addresses.trim().is_empty() {
                return Err(refuse(
                    flag,
                    format!("{given:?}: no address after '='; e.g. {name}=192.0.2.53"),
                ));
            }
            let upstreams = addresses
                .split(',')
                .map(|a| {
                    let u = parse_upstream_for(flag, a.trim())?;
                    rules
                        .check_upstream(&u)
                        .map_err(|e| refuse(flag, format!("{name}: {e}")))?;
                    Ok(u)
                })
                .collect::<Result<Vec<_>, ConfigError>>()?;
            out.push(StubDomain {
                domain: wire,
                name,
                upstreams,
            });
        }
        Ok(out)
    }

    fn check_intercept(
        &self,
        patterns: &[crate::kernel::links::Pattern],
    ) -> Result<(), ConfigError> {
        if self.kernel_grace < Duration::from_secs(1) {
            return Err(refuse(
                "kernel-grace",
                format!(
                    "{:?} is shorter than the agent's heartbeat may lag on a busy node; at least 1s",
                    self.kernel_grace
                ),
            ));
        }
        if self.intercept.is_empty() {
            return Ok(());
        }
        if self.no_kernel {
            return Err(refuse(
                "intercept",
                "intercepting needs the XDP program; drop --no-kernel",
            ));
        }
        if self.interfaces.is_empty() && patterns.is_empty() {
            return Err(refuse(
                "intercept",
                "queries are intercepted on the interfaces the XDP program is attached to: give \
                 --interface-pattern (e.g. veth* for bridge CNIs, cali* for Calico, lxc* for \
                 Cilium) or --interface",
            ));
        }
        for (family, v6) in [("IPv4", false), ("IPv6", true)] {
            let count = self.intercept.iter().filter(|a| a.is_ipv6() == v6).count();
            if count > dns_common::MAX_INTERCEPT {
                return Err(refuse(
                    "intercept",
                    format!(
                        "{count} {family} addresses; the kernel path takes at most {}",
                        dns_common::MAX_INTERCEPT
                    ),
                ));
            }
        }
        for a in &self.intercept {
            if a.is_unspecified() || a.is_loopback() || a.is_multicast() {
                return Err(refuse(
                    "intercept",
                    format!("{a} is not a Service address; give the kube-dns Service's cluster IP"),
                ));
            }
            if self.listen.contains(a) {
                return Err(refuse(
                    "intercept",
                    format!("{a} is also a --listen address; an address is one or the other"),
                ));
            }
            if !self.listen.iter().any(|l| l.is_ipv6() == a.is_ipv6()) {
                return Err(refuse(
                    "intercept",
                    format!(
                        "{a}: queries the kernel does not answer are steered to the agent's \
                         listen address of the same family, and no --listen address is {}; add one \
                         (e.g. --listen {})",
                        if a.is_ipv6() { "IPv6" } else { "IPv4" },
                        if a.is_ipv6() {
                            "fd00::10"
                        } else {
                            "169.254.20.10"
                        }
                    ),
                ));
            }
        }
        Ok(())
    }

    fn forward_settings(&self) -> Result<ForwardSettings, ConfigError> {
        if self.upstream_timeout.is_zero() {
            return Err(refuse("upstream-timeout", "must be above 0 (e.g. 1s)"));
        }
        if self.forward_timeout < self.upstream_timeout {
            return Err(refuse(
                "forward-timeout",
                format!(
                    "{:?} is shorter than --upstream-timeout {:?}: raise it, or lower --upstream-timeout",
                    self.forward_timeout, self.upstream_timeout
                ),
            ));
        }
        if self.health_check < Duration::from_millis(10) {
            return Err(refuse(
                "health-check",
                format!("{:?} is too short; at least 10ms", self.health_check),
            ));
        }
        if self.max_concurrent == 0 {
            return Err(refuse(
                "max-concurrent",
                "0 would refuse every query sent upstream; at least 1",
            ));
        }
        Ok(ForwardSettings {
            policy: self.upstream_policy,
            timeouts: Timeouts {
                attempt: self.upstream_timeout,
                total: self.forward_timeout,
            },
            force_tcp: self.force_tcp,
            max_concurrent: self.max_concurrent,
            health_check: self.health_check,
            max_fails: self.max_fails,
            tls: None,
        })
    }

    /// The limits, checked; `fd_limit`: the process's hard limit of open files, when known.
    fn limit_settings(&self, fd_limit: Option<u64>) -> Result<LimitSettings, ConfigError> {
        if self.tcp_max_connections == 0 {
            return Err(refuse(
                "tcp-max-connections",
                "0 would close every TCP connection (clients retry truncated answers over TCP); at least 1",
            ));
        }
        if self.tcp_max_connections_per_client == 0 {
            return Err(refuse(
                "tcp-max-connections-per-client",
                "0 would close every TCP connection; at least 1",
            ));
        }
        if self.tcp_max_connections_per_client > self.tcp_max_connections {
            return Err(refuse(
                "tcp-max-connections-per-client",
                format!(
                    "{} is above --tcp-max-connections {}: lower it, or raise --tcp-max-connections",
                    self.tcp_max_connections_per_client, self.tcp_max_connections
                ),
            ));
        }
        if self.tcp_idle_timeout < Duration::from_millis(100)
            || self.tcp_idle_timeout > Duration::from_secs(600)
        {
            return Err(refuse(
                "tcp-idle-timeout",
                format!(
                    "{:?}: give 100ms to 10m (RFC 7766: seconds; clients reconnect)",
                    self.tcp_idle_timeout
                ),
            ));
        }
        if self.max_pending < self.max_concurrent {
            return Err(refuse(
                "max-pending",
                format!(
                    "{} is below --max-concurrent {}: every upstream query has a client waiting \
                     for it; raise --max-pending or lower --max-concurrent",
                    self.max_pending, self.max_concurrent
                ),
            ));
        }
        if self.rate_limit > 1_000_000_000 {
            return Err(refuse(
                "rate-limit",
                format!(
                    "{} queries per second is no limit; at most 1000000000",
                    self.rate_limit
                ),
            ));
        }
        let rate = match (self.rate_limit, self.rate_limit_burst) {
            (0, Some(_)) => {
                return Err(refuse(
                    "rate-limit-burst",
                    "given without --rate-limit: give --rate-limit QPS too, or drop it",
                ));
            }
            (0, None) => None,
            (_, Some(0)) => {
                return Err(refuse(
                    "rate-limit-burst",
                    "0 would refuse every query; at least 1",
                ));
            }
            (per_second, burst) => Some(Rate {
                per_second,
                burst: burst.unwrap_or(per_second),
            }),
        };
        let settings = LimitSettings {
            tcp_connections: self.tcp_max_connections,
            tcp_connections_per_client: self.tcp_max_connections_per_client,
            tcp_idle_timeout: self.tcp_idle_timeout,
            max_pending: self.max_pending,
            rate,
        };
        let needed = limits::fds_needed(&settings, self.max_concurrent);
        if let Some(limit) = fd_limit
            && needed > limit
        {
            return Err(refuse(
                "tcp-max-connections",
                format!(
                    "{} TCP connections, {} upstream queries (--max-concurrent) and {} other \
                     files need {needed} file descriptors, and this process may open {limit} \
                     (`ulimit -Hn`): lower --tcp-max-connections or --max-concurrent, or raise \
                     the limit (LimitNOFILE=, the container runtime's nofile)",
                    self.tcp_max_connections,
                    self.max_concurrent,
                    limits::FD_RESERVE
                ),
            ));
        }
        Ok(settings)
    }

    fn cache_settings(&self) -> Result<CacheSettings, ConfigError> {
        for (flag, v) in [
            ("cache-min-ttl", self.cache_min_ttl),
            ("cache-max-ttl", self.cache_max_ttl),
            ("cache-negative-max-ttl", self.cache_negative_max_ttl),
        ] {
            if v > MAX_TTL {
                return Err(refuse(
                    flag,
                    format!("{v} is above the largest TTL, {MAX_TTL}"),
                ));
            }
        }
        for (flag, max) in [
            ("cache-max-ttl", self.cache_max_ttl),
            ("cache-negative-max-ttl", self.cache_negative_max_ttl),
        ] {
            if max < self.cache_min_ttl {
                return Err(refuse(
                    flag,
                    format!(
                        "{max} is below --cache-min-ttl {}: raise it, or lower --cache-min-ttl",
                        self.cache_min_ttl
                    ),
                ));
            }
        }
        if self.cache_servfail_ttl > MAX_SERVFAIL_TTL {
            return Err(refuse(
                "cache-servfail-ttl",
                format!(
                    "{} is longer than failures may be cached (RFC 2308 §7.1); at most {MAX_SERVFAIL_TTL}",
                    self.cache_servfail_ttl
                ),
            ));
        }
        if self.serve_stale > MAX_SERVE_STALE {
            return Err(refuse(
                "serve-stale",
                format!(
                    "{:?} is longer than RFC 8767 advises; at most 3d",
                    self.serve_stale
                ),
            ));
        }
        Ok(CacheSettings {
            capacity: self.cache_size,
            min_ttl: self.cache_min_ttl,
            max_ttl: self.cache_max_ttl,
            negative_max_ttl: self.cache_negative_max_ttl,
            servfail_ttl: self.cache_servfail_ttl,
            prefetch: self.cache_prefetch,
            serve_stale: self.serve_stale,
        })
    }
}

/// A duration: a number and a unit (`ms`, `s`, `m`, `h`, `d`), e.g. `500ms`, `1h`; `0` alone
/// is zero.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration like 500ms, 2s, 5m, 1h or 1d");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    n.checked_mul(ms).map(Duration::from_millis).ok_or_else(bad)
}

/// An upstream given in `flag` (a flag without its dashes, or a configuration field): see
/// [`Upstream::parse`] for the forms; a refusal names the flag.
pub fn parse_upstream_for(flag: &'static str, s: &str) -> Result<Upstream, ConfigError> {
    Upstream::parse(s).map_err(|e| refuse(flag, e.to_string()))
}

/// The `nameserver` lines of a resolv.conf.
pub fn resolv_conf_nameservers(path: &std::path::Path) -> Result<Vec<SocketAddr>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let servers: Vec<SocketAddr> = text
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
        })
        // A scope suffix (fe80::1%eth0) cannot be used from another interface's namespace.
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect();
    if servers.is_empty() {
        return Err("no nameserver lines".to_string());
    }
    Ok(servers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> RunArgs {
        let mut argv = vec!["dns-agent", "run", "--zone-file", "z.yaml"];
        argv.extend_from_slice(extra);
        bare(&argv[2..])
    }

    /// `run` with only these arguments (and a test upstream).
    fn bare(extra: &[&str]) -> RunArgs {
        let mut argv = vec!["dns-agent", "run", "--upstream", "192.0.2.53"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn exactly_one_source_of_objects() {
        let c = args(&[]).validate_with(true).unwrap();
        assert_eq!(c.source, ObjectSource::ZoneFile("z.yaml".into()));

        let e = bare(&[]).validate_with(false).unwrap_err();
        assert_eq!(e.flag, "kubeconfig");
        assert!(
            e.to_string().contains("give --kubeconfig PATH")
                && e.to_string().contains("--zone-file PATH"),
            "{e}"
        );
        let c = bare(&[]).validate_with(true).unwrap();
        assert_eq!(c.source, ObjectSource::Api(ClientSource::InCluster));

        let dir = tempfile::tempdir().unwrap();
        let kc = dir.path().join("kubeconfig");
        std::fs::write(
            &kc,
            "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'http://127.0.0.1:1'}}]\n\
             users: [{name: u, user: {}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\n\
             current-context: x\n",
        )
        .unwrap();
        let kc_arg = kc.to_str().unwrap();
        let c = bare(&["--kubeconfig", kc_arg]).validate_with(true).unwrap();
        assert_eq!(
            c.source,
            ObjectSource::Api(ClientSource::Kubeconfig(kc.clone()))
        );

        let e = args(&["--kubeconfig", kc_arg])
            .validate_with(false)
            .unwrap_err();
        assert_eq!(e.flag, "zone-file");
        assert!(e.to_string().contains("give one of them"), "{e}");

        let missing = dir.path().join("nope");
        let e = bare(&["--kubeconfig", missing.to_str().unwrap()])
            .validate_with(false)
            .unwrap_err();
        assert_eq!(e.flag, "kubeconfig");
        assert!(e.to_string().contains("readable kubeconfig"), "{e}");
        std::fs::write(&kc, "clusters: 7\n").unwrap();
        let e = bare(&["--kubeconfig", kc_arg])
            .validate_with(false)
            .unwrap_err();
        assert_eq!(e.flag, "kubeconfig");
    }

    #[test]
    fn refuses_with_flag_and_fix() {
        let e = args(&["--cluster-domain", "bad_domain..local"])
            .validate()
            .unwrap_err();
        assert_eq!(e.flag, "cluster-domain");
        let e = args(&["--upstream", "169.254.20.10"])
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("loop"), "{e}");
        let e = args(&["--upstream", "nope"]).validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "--upstream: \"nope\" is not ADDR[:PORT], [IPv6]:PORT or \
             tls://ADDR[:PORT][#SERVERNAME] (ADDR is an IP address: a resolver's name would \
             need a resolver)"
        );
        let e = args(&["--upstream", "tls://192.0.2.53#bad name"])
            .validate()
            .unwrap_err();
        assert_eq!(e.flag, "upstream");
        assert!(
            e.to_string().contains("after # is not a server name"),
            "{e}"
        );
        let e = args(&["--ttl", "4294967295"]).validate().unwrap_err();
        assert_eq!(e.flag, "ttl");
    }

    #[test]
    fn defaults() {
        let c = args(&[]).validate_with(false).unwrap();
        assert_eq!(c.cluster_domain, "cluster.local");
        assert_eq!(
            c.args.listen,
            vec!["169.254.20.10".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            c.routes.default,
            DefaultUpstreams::Flags(vec![Upstream::Dns("192.0.2.53:53".parse().unwrap())])
        );
        assert!(c.routes.stub_domains.is_empty());
        assert!(c.forward.tls.is_none(), "no TLS upstream, no CA store read");
    }

    #[test]
    fn forwarding_and_cache_defaults() {
        let c = args(&[]).validate().unwrap();
        assert_eq!(c.forward.policy, Policy::Random);
        assert_eq!(c.forward.timeouts.attempt, Duration::from_secs(1));
        assert_eq!(c.forward.timeouts.total, Duration::from_millis(1900));
        assert_eq!(c.forward.health_check, Duration::from_millis(500));
        assert_eq!(c.forward.max_fails, 2);
        assert_eq!(c.forward.max_concurrent, 1000);
        assert!(!c.forward.force_tcp);
        assert_eq!(c.cache.capacity, 10_000);
        assert_eq!((c.cache.min_ttl, c.cache.max_ttl), (5, 3600));
        assert_eq!(c.cache.negative_max_ttl, 1800);
        assert_eq!(c.cache.servfail_ttl, 5);
        assert_eq!(c.cache.prefetch, 10);
        assert_eq!(c.cache.serve_stale, Duration::from_secs(3600));
        let c = args(&["--upstream-policy", "round-robin", "--serve-stale", "0"])
            .validate()
            .unwrap();
        assert_eq!(c.forward.policy, Policy::RoundRobin);
        assert_eq!(c.cache.serve_stale, Duration::ZERO);
    }

    #[test]
    fn refuses_bad_forwarding_and_cache_settings() {
        let flag = |extra: &[&str]| args(extra).validate().unwrap_err().flag;
        assert_eq!(
            flag(&["--cache-min-ttl", "60", "--cache-max-ttl", "30"]),
            "cache-max-ttl"
        );
        assert_eq!(
            flag(&["--cache-min-ttl", "60", "--cache-negative-max-ttl", "30"]),
            "cache-negative-max-ttl"
        );
        assert_eq!(flag(&["--cache-servfail-ttl", "301"]), "cache-servfail-ttl");
        assert_eq!(flag(&["--serve-stale", "4d"]), "serve-stale");
        assert_eq!(flag(&["--max-concurrent", "0"]), "max-concurrent");
        assert_eq!(flag(&["--upstream-timeout", "0"]), "upstream-timeout");
        assert_eq!(
            flag(&["--upstream-timeout", "3s", "--forward-timeout", "2s"]),
            "forward-timeout"
        );
        assert_eq!(flag(&["--health-check", "1ms"]), "health-check");
        let e = args(&["--cache-min-ttl", "60", "--cache-max-ttl", "30"])
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("lower --cache-min-ttl"), "{e}");
        assert!(
            Cli::try_parse_from(["dns-agent", "run", "--serve-stale", "1 hour"]).is_err(),
            "durations need a unit"
        );
    }

    #[test]
    fn limits_defaults_and_refusals() {
        let c = args(&[]).validate().unwrap();
        assert_eq!(c.limits, LimitSettings::default());
        assert_eq!(c.limits.tcp_connections, 1024);
        assert_eq!(c.limits.tcp_connections_per_client, 64);
        assert_eq!(c.limits.tcp_idle_timeout, Duration::from_secs(10));
        assert_eq!(c.limits.max_pending, 10_000);
        assert_eq!(c.limits.rate, None, "no rate limit unless asked");
        let c = args(&["--rate-limit", "200"]).validate().unwrap();
        assert_eq!(
            c.limits.rate,
            Some(Rate {
                per_second: 200,
                burst: 200
            })
        );
        let c = args(&["--rate-limit", "200", "--rate-limit-burst", "1000"])
            .validate()
            .unwrap();
        assert_eq!(c.limits.rate.unwrap().burst, 1000);

        let flag = |extra: &[&str]| args(extra).validate().unwrap_err().flag;
        assert_eq!(flag(&["--tcp-max-connections", "0"]), "tcp-max-connections");
        assert_eq!(
            flag(&["--tcp-max-connections-per-client", "0"]),
            "tcp-max-connections-per-client"
        );
        assert_eq!(
            flag(&[
                "--tcp-max-connections",
                "10",
                "--tcp-max-connections-per-client",
                "11"
            ]),
            "tcp-max-connections-per-client"
        );
        assert_eq!(flag(&["--tcp-idle-timeout", "50ms"]), "tcp-idle-timeout");
        assert_eq!(flag(&["--tcp-idle-timeout", "11m"]), "tcp-idle-timeout");
        assert_eq!(flag(&["--max-pending", "999"]), "max-pending");
        assert_eq!(flag(&["--rate-limit-burst", "10"]), "rate-limit-burst");
        assert_eq!(
            flag(&["--rate-limit", "10", "--rate-limit-burst", "0"]),
            "rate-limit-burst"
        );
        assert_eq!(flag(&["--rate-limit", "2000000000"]), "rate-limit");
        let e = args(&["--max-pending", "999"]).validate().unwrap_err();
        assert!(e.to_string().contains("lower --max-concurrent"), "{e}");

        // The file descriptors the limits need, against what the process may open.
        let a = args(&["--tcp-max-connections", "4000"]);
        let e = a.limit_settings(Some(4096)).unwrap_err();
        assert_eq!(e.flag, "tcp-max-connections");
        assert!(e.to_string().contains("5256 file descriptors"), "{e}");
        assert!(a.limit_settings(Some(5256)).is_ok());
        assert!(a.limit_settings(None).is_ok(), "unknown limit: not refused");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in ["", "5", "s", "1.5s", "-1s", "3w"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    /// A self-signed CA certificate in a file of its own (for --upstream-ca), and the directory
    /// that holds it (removed when dropped).
    fn ca_file() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        std::fs::write(&ca, params.self_signed(&key).unwrap().pem()).unwrap();
        (dir, ca)
    }

    #[test]
    fn upstream_forms() {
        // The forms themselves are tested with the parser (server::upstream); here, that the
        // flag takes them, mixed, in order.
        let (_dir, ca) = ca_file();
        let c = args(&[
            "--upstream",
            "tls://192.0.2.1#dns.example.com",
            "--upstream",
            "[2001:db8::1]:5353",
            "--upstream-ca",
            ca.to_str().unwrap(),
        ])
        .validate()
        .unwrap();
        let DefaultUpstreams::Flags(upstreams) = &c.routes.default else {
            panic!("--upstream given: {:?}", c.routes.default)
        };
        let shown: Vec<String> = upstreams.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "192.0.2.53:53",
                "tls://192.0.2.1:853#dns.example.com",
                "[2001:db8::1]:5353"
            ]
        );
        assert!(c.forward.tls.is_some());
        // Our own listen address over TLS is no loop: nothing of ours listens on 853.
        args(&[
            "--upstream",
            "tls://169.254.20.10",
            "--upstream-ca",
            ca.to_str().unwrap(),
        ])
        .validate()
        .unwrap();
    }

    /// `dns-agent run` in intercept mode with these arguments and no --upstream.
    fn intercepting(extra: &[&str]) -> RunArgs {
        let mut argv = vec![
            "dns-agent",
            "run",
            "--zone-file",
            "z.yaml",
            "--intercept",
            "198.51.100.10",
            "--interface-pattern",
            "veth*",
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn intercept_mode_without_upstream_forwards_to_the_kube_dns_endpoints() {
        let c = intercepting(&[]).validate_with(false).unwrap();
        assert_eq!(c.routes.default, DefaultUpstreams::KubeDnsEndpoints);
        assert_eq!(
            c.routes.intercept,
            ["198.51.100.10".parse::<IpAddr>().unwrap()]
        );
        // --upstream still overrides.
        let c = intercepting(&["--upstream", "203.0.113.53"])
            .validate_with(false)
            .unwrap();
        assert!(matches!(c.routes.default, DefaultUpstreams::Flags(_)));
        // Never the intercepted address itself, on any port, plain or TLS.
        for bad in ["198.51.100.10", "198.51.100.10:5353", "tls://198.51.100.10"] {
            let e = intercepting(&["--upstream", bad])
                .validate_with(false)
                .unwrap_err();
            assert_eq!(e.flag, "upstream", "{bad}");
            assert!(
                e.to_string()
                    .contains("is an intercepted address (--intercept)"),
                "{e}"
            );
        }
        let e = intercepting(&["--stub-domain", "corp.example=198.51.100.10"])
            .validate_with(false)
            .unwrap_err();
        assert_eq!(e.flag, "stub-domain");
        assert!(e.to_string().contains("intercepted address"), "{e}");
    }

    #[test]
    fn stub_domains_are_checked_and_kept() {
        let (_dir, ca) = ca_file();
        let c = args(&[
            "--stub-domain",
            "Corp.Example.=192.0.2.1, 192.0.2.2:5353",
            "--stub-domain",
            "10.in-addr.arpa=tls://192.0.2.3#dns.example.com",
            "--stub-domain",
            "local=192.0.2.4",
            "--upstream-ca",
            ca.to_str().unwrap(),
        ])
        .validate()
        .unwrap();
        let shown: Vec<(String, Vec<String>)> = c
            .routes
            .stub_domains
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    s.upstreams.iter().map(ToString::to_string).collect(),
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                (
                    "corp.example".to_string(),
                    vec!["192.0.2.1:53".to_string(), "192.0.2.2:5353".to_string()]
                ),
                (
                    "10.in-addr.arpa".to_string(),
                    vec!["tls://192.0.2.3:853#dns.example.com".to_string()]
                ),
                ("local".to_string(), vec!["192.0.2.4:53".to_string()]),
            ]
        );
        assert_eq!(
            c.routes.stub_domains[0].domain,
            crate::zone::name::wire_from_dotted("corp.example")
        );
        assert!(
            c.forward.tls.is_some(),
            "a tls:// stub domain loads the CAs"
        );
    }

    #[test]
    fn bad_stub_domains_are_refused_with_the_fix() {
        let refused = |value: &str| {
            let e = args(&["--stub-domain", value]).validate().unwrap_err();
            assert_eq!(e.flag, "stub-domain", "{value}: {e}");
            e.to_string()
        };
        let e = refused("corp.example");
        assert!(e.contains("is not DOMAIN=ADDR[,ADDR...]"), "{e}");
        assert!(
            e.contains("e.g. --stub-domain corp.example=192.0.2.53"),
            "{e}"
        );
        let e = refused("=192.0.2.53");
        assert!(e.contains("empty domain"), "{e}");
        let e = refused(".=192.0.2.53");
        assert!(e.contains("the root domain covers every name"), "{e}");
        let e = refused("bad domain=192.0.2.53");
        assert!(e.contains("is not a domain name"), "{e}");
        let e = refused("a..b=192.0.2.53");
        assert!(e.contains("is not a domain name"), "{e}");
        let e = refused("corp.example=");
        assert!(e.contains("no address after '='"), "{e}");
        let e = refused("corp.example=nope");
        assert!(
            e.contains("\"nope\" is not ADDR[:PORT], [IPv6]:PORT or tls://"),
            "{e}"
        );
        let e = refused("corp.example=192.0.2.1,");
        assert!(e.contains("\"\" is not ADDR"), "{e}");
        let e = refused("corp.example=192.0.2.1#dns.example.com");
        assert!(e.contains("write tls://"), "{e}");
        // The cluster's own zone, and anything below it: the agent answers those names.
        for inside in [
            "cluster.local",
            "svc.cluster.local",
            "Foo.Svc.Cluster.Local.",
        ] {
            let e = refused(&format!("{inside}=192.0.2.53"));
            assert!(
                e.contains("is at or below the cluster domain cluster.local"),
                "{inside}: {e}"
            );
        }
        // A domain that merely ends in the same letters is outside it.
        args(&["--stub-domain", "mycluster.local=192.0.2.53"])
            .validate()
            .unwrap();
        let e = refused("corp.example=169.254.20.10");
        assert!(e.contains("queries would loop"), "{e}");
        let e = args(&[
            "--stub-domain",
            "corp.example=192.0.2.1",
            "--stub-domain",
            "CORP.example.=192.0.2.2",
        ])
        .validate()
        .unwrap_err();
        assert_eq!(e.flag, "stub-domain");
        assert!(e.to_string().contains("corp.example is given twice"), "{e}");
    }

    #[test]
    fn a_bad_upstream_ca_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = args(&["--upstream-ca", missing.to_str().unwrap()])
            .validate()
            .unwrap_err();
        assert_eq!(e.flag, "upstream-ca");
        assert!(e.to_string().contains("nope.pem"), "{e}");
    }
}
