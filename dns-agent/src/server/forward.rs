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
//! Upstreams that join later are probed as they join.
//!
//! Upstreams come in sets, one per route: the default set, and one per stub domain (names at
//! or below it; the longest domain wins). Sets change while the agent runs (the kube-dns
//! Service's endpoints, the kube-dns ConfigMap: [`super::routing`] decides what they hold); an
//! upstream in the sets before and after a change keeps what is known about it.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{
            AtomicBool, AtomicU32, AtomicUsize,
            Ordering::{Relaxed, SeqCst},
        },
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
    /// The route has no upstream at all (the kube-dns Service has no ready endpoint yet).
    #[error("no upstream to ask (none among {0})")]
    Empty(String),
    /// Every attempt failed or answered SERVFAIL/REFUSED; `rcode` is what the client gets.
    #[error("every upstream failed: {detail}")]
    Failed { rcode: u16, detail: String },
}

impl ForwardError {
    /// The RCODE a client gets for this failure.
    pub fn rcode(&self) -> u16 {
        match self {
            Self::Overloaded(_) => dns::RCODE_REFUSED,
            Self::NoUpstream | Self::Empty(_) => dns::RCODE_SERVFAIL,
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

/// Which set of upstreams a question goes to. Part of the cache key and of the single-flight
/// key: an answer fetched from one set is never served for a name that another set answers now
/// (after a stub domain or the kube-dns ConfigMap's `upstreamNameservers` changed). A name
/// always routes to one set at a time, so without such a change the key would not need it.
///
/// Two sets of the same upstreams have the same id, whatever their order or origin: they give
/// the same answers. The kube-dns Service's endpoints are one set however its pods roll, so a
/// roll keeps the cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UpstreamSetId(pub u64);

impl UpstreamSetId {
    /// The set of these upstreams.
    pub fn of(upstreams: &[Upstream]) -> Self {
        let mut shown: Vec<String> = upstreams.iter().map(ToString::to_string).collect();
        shown.sort();
        shown.dedup();
        Self::hash(("upstreams", shown))
    }

    /// A set followed live whose members come and go without its answers changing (the
    /// endpoints of one Service).
    pub fn named(name: &str) -> Self {
        Self::hash(("named", name))
    }

    fn hash(v: impl std::hash::Hash) -> Self {
        use std::hash::{BuildHasher as _, BuildHasherDefault};
        // Fixed keys: the id only has to tell sets apart within this process.
        Self(BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(v))
    }
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
    /// The upstreams the name routes to ([`Forwarder::upstream_set_of`]).
    pub upstream_set: UpstreamSetId,
}

/// A [`Question`] borrowed from a query: what the cache is asked with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuestionRef<'a> {
    pub name: &'a [u8],
    pub qtype: u16,
    pub qclass: u16,
    pub dnssec_ok: bool,
    pub checking_disabled: bool,
    pub upstream_set: UpstreamSetId,
}

impl QuestionRef<'_> {
    pub fn to_question(self) -> Question {
        Question {
            name: self.name.to_vec(),
            qtype: self.qtype,
            qclass: self.qclass,
            dnssec_ok: self.dnssec_ok,
            checking_disabled: self.checking_disabled,
            upstream_set: self.upstream_set,
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
            upstream_set: self.upstream_set,
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

/// One upstream and what is known about it. Kept for as long as the upstream is in some set:
/// a set that changes around it (a kube-dns pod roll, a ConfigMap edit) keeps its health, loop
/// verdict, TLS connections and metrics.
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
    /// It left every set: its health checks and loop probes stop.
    retired: AtomicBool,
    /// The name of this upstream's loop probe.
    loop_probe: WireName,
    counters: Arc<UpstreamCounters>,
}

impl UpstreamState {
    fn is_down(&self, max_fails: u32) -> bool {
        max_fails > 0 && self.fails.load(Relaxed) >= max_fails
    }
}

/// An upstream set as the routes want it ([`Forwarder::set_routes`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetSpec {
    pub id: UpstreamSetId,
    /// Where the set comes from, for logs: `--upstream`, `the kube-dns Service's endpoints`...
    pub origin: String,
    pub upstreams: Vec<Upstream>,
}

/// Where names outside the cluster go: names at or below a stub domain to its set (the longest
/// domain wins), every other name to the default set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    pub default: SetSpec,
    /// Lowercased wire-format domain, and its set.
    pub stubs: Vec<(WireName, SetSpec)>,
}

/// Upstreams a [`Forwarder::set_routes`] added to the sets, and those that left every set.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Membership {
    pub joined: Vec<Upstream>,
    pub left: Vec<Upstream>,
}

/// The upstreams of one route, in the order given.
pub struct UpstreamSet {
    id: UpstreamSetId,
    origin: String,
    upstreams: Vec<Arc<UpstreamState>>,
    /// Round-robin position.
    next: AtomicUsize,
}

/// The routes in force: replaced as a whole, read without waiting for a change.
struct Routes {
    default: Arc<UpstreamSet>,
    stubs: HashMap<WireName, Arc<UpstreamSet>>,
}

impl Routes {
    /// The set of the longest stub domain at or above `name`, else the default set.
    fn route(&self, name: &[u8]) -> &Arc<UpstreamSet> {
        if self.stubs.is_empty() {
            return &self.default;
        }
        // The name's suffixes, longest first, one label at a time.
        let mut at = 0;
        while let Some(&len) = name.get(at) {
            if len == 0 {
                break;
            }
            if let Some(set) = self.stubs.get(&name[at..]) {
                return set;
            }
            at += 1 + len as usize;
        }
        &self.default
    }

    fn sets(&self) -> impl Iterator<Item = &Arc<UpstreamSet>> {
        std::iter::once(&self.default).chain(self.stubs.values())
    }

    /// Every upstream of every set, once.
    fn states(&self) -> Vec<Arc<UpstreamState>> {
        let mut seen = std::collections::HashSet::new();
        self.sets()
            .flat_map(|s| s.upstreams.iter())
            .filter(|u| seen.insert(u.upstream.clone()))
            .cloned()
            .collect()
    }
}

pub struct Forwarder {
    routes: RwLock<Arc<Routes>>,
    settings: ForwardSettings,
    permits: Semaphore,
    metrics: Arc<Metrics>,
    /// Health check loops and loop probes, so that they end with the forwarder.
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    /// Set once the agent's listeners receive its queries: from then on every upstream that
    /// joins a set is probed for a forwarding loop.
    probing: AtomicBool,
    /// The TLS client settings, the system's loaded when a TLS upstream first needs them.
    tls_config: Mutex<Option<Arc<rustls::ClientConfig>>>,
    /// Woken when the routes change (the kernel's copy of the cache drops answers of a route
    /// that no longer applies).
    rerouted: tokio::sync::Notify,
}

/// How many times the loop probe is sent to an upstream that does not answer it, and how far
/// apart: an upstream that starts after us is still checked.
const LOOP_PROBE_ATTEMPTS: u32 = 10;
const LOOP_PROBE_RETRY: Duration = Duration::from_secs(3);

impl Forwarder {
    /// A forwarder whose every name goes to `upstreams` (until [`Self::set_routes`]).
    pub fn new(upstreams: Vec<Upstream>, settings: ForwardSettings, metrics: Arc<Metrics>) -> Self {
        let empty = Arc::new(Routes {
            default: Arc::new(UpstreamSet {
                id: UpstreamSetId::default(),
                origin: String::new(),
                upstreams: Vec::new(),
                next: AtomicUsize::new(0),
            }),
            stubs: HashMap::new(),
        });
        let forwarder = Self {
            routes: RwLock::new(empty),
            permits: Semaphore::new(settings.max_concurrent),
            tls_config: Mutex::new(settings.tls.clone()),
            settings,
            metrics,
            tasks: Mutex::new(Vec::new()),
            probing: AtomicBool::new(false),
            rerouted: tokio::sync::Notify::new(),
        };
        forwarder.set_routes(RouteSpec {
            default: SetSpec {
                id: UpstreamSetId::of(&upstreams),
                origin: "--upstream".to_string(),
                upstreams,
            },
            stubs: Vec::new(),
        });
        forwarder
    }

    fn new_state(&self, upstream: Upstream) -> Arc<UpstreamState> {
        // CoreDNS's loop probe name: two random numbers under the root.
        let probe = wire_from_labels(&[
            rand::random::<u64>().to_string(),
            rand::random::<u64>().to_string(),
        ]);
        let counters = self.metrics.forward.upstream(&upstream.to_string());
        let tls = upstream.tls_server_name().map(|server_name| {
            let config = self
                .tls_config
                .lock()
                .expect("TLS config lock")
                .get_or_insert_with(system_tls_config)
                .clone();
            Arc::new(TlsUpstream::new(
                upstream.addr(),
                server_name,
                upstream.to_string(),
                config,
                self.settings.timeouts.attempt,
                counters.clone(),
            ))
        });
        // A newcomer is healthy until it fails (its series may be a returning one's).
        counters.healthy.store(true, Relaxed);
        Arc::new(UpstreamState {
            upstream,
            tls,
            fails: AtomicU32::new(0),
            checking: AtomicBool::new(false),
            looped: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            loop_probe: probe,
            counters,
        })
    }

    fn routes(&self) -> Arc<Routes> {
        self.routes.read().expect("routes lock").clone()
    }

    /// Puts `spec` in force. Upstreams that stay (in any set) keep their state: health, loop
    /// verdict, TLS connections, metrics. Those that leave every set stop being health checked;
    /// their metric series go when nothing uses them any more. Newcomers are probed for a loop
    /// once the agent receives its own queries ([`Self::detect_loops`]).
    pub fn set_routes(&self, spec: RouteSpec) -> Membership {
        let old = self.routes();
        let mut known: HashMap<Upstream, Arc<UpstreamState>> = old
            .states()
            .into_iter()
            .map(|s| (s.upstream.clone(), s))
            .collect();
        let mut joined = Vec::new();
        let mut build = |spec: SetSpec| {
            let mut upstreams: Vec<Arc<UpstreamState>> = Vec::new();
            for u in spec.upstreams {
                if upstreams.iter().any(|s| s.upstream == u) {
                    continue;
                }
                let state = known
                    .entry(u.clone())
                    .or_insert_with(|| {
                        let s = self.new_state(u);
                        joined.push(s.clone());
                        s
                    })
                    .clone();
                upstreams.push(state);
            }
            // The round-robin position carries over, so a change does not restart the turn.
            let next = old
                .sets()
                .find(|s| s.id == spec.id)
                .map_or(0, |s| s.next.load(Relaxed));
            Arc::new(UpstreamSet {
                id: spec.id,
                origin: spec.origin,
                upstreams,
                next: AtomicUsize::new(next),
            })
        };
        let routes = Routes {
            default: build(spec.default),
            stubs: spec
                .stubs
                .into_iter()
                .map(|(domain, set)| (domain, build(set)))
                .collect(),
        };
        let kept: std::collections::HashSet<Upstream> = routes
            .states()
            .into_iter()
            .map(|s| s.upstream.clone())
            .collect();
        let mut left = Vec::new();
        for s in old.states() {
            if !kept.contains(&s.upstream) {
                s.retired.store(true, Relaxed);
                left.push(s.upstream.clone());
            }
        }
        *self.routes.write().expect("routes lock") = Arc::new(routes);
        self.rerouted.notify_one();
        // After the store: a `detect_loops` that starts now sees the new routes, one that
        // started before has set `probing`, so every newcomer is probed at least once.
        if self.probing.load(SeqCst) {
            for s in &joined {
                self.spawn(probe_for_loop(s.clone(), self.settings.clone()));
            }
        }
        Membership {
            joined: joined.iter().map(|s| s.upstream.clone()).collect(),
            left,
        }
    }

    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let task = tokio::spawn(task);
        let mut tasks = self.tasks.lock().expect("task lock");
        tasks.retain(|t| !t.is_finished());
        tasks.push(task.abort_handle());
    }

    /// Every upstream of every route, once.
    pub fn upstreams(&self) -> Vec<Upstream> {
        self.routes()
            .states()
            .iter()
            .map(|u| u.upstream.clone())
            .collect()
    }

    /// The upstreams that names at or below `name` go to now.
    pub fn route_of(&self, name: &[u8]) -> (UpstreamSetId, Vec<Upstream>) {
        let routes = self.routes();
        let set = routes.route(name);
        (
            set.id,
            set.upstreams.iter().map(|u| u.upstream.clone()).collect(),
        )
    }

    /// Notified after each change of the routes (one waiter).
    pub fn rerouted(&self) -> &tokio::sync::Notify {
        &self.rerouted
    }

    /// The set `name` routes to now: the [`Question::upstream_set`] of a question for it.
    pub fn upstream_set_of(&self, name: &[u8]) -> UpstreamSetId {
        self.routes.read().expect("routes lock").route(name).id
    }

    pub fn settings(&self) -> &ForwardSettings {
        &self.settings
    }

    /// Asks the upstreams of the question's route in policy order until one answers, within
    /// the total timeout; retries over TCP when a UDP answer is truncated. An upstream that
    /// answered SERVFAIL or REFUSED is not asked again for this query; one that timed out gets
    /// a second chance if time is left (a lost datagram is the usual reason).
    pub async fn resolve(&self, q: &Question) -> Result<Exchange, ForwardError> {
        let Ok(_permit) = self.permits.try_acquire() else {
            self.metrics.forward.reject();
            return Err(ForwardError::Overloaded(self.settings.max_concurrent));
        };
        // The route now: after a change, a question keyed on the old set is answered by the
        // new one, and the answer is kept under a key no question will use again.
        let set = self.routes().route(&q.name).clone();
        if set.upstreams.is_empty() {
            return Err(ForwardError::Empty(set.origin.clone()));
        }
        let order = self.order(&set);
        if order.is_empty() {
            return Err(ForwardError::NoUpstream);
        }
        let timeouts = self.settings.timeouts;
        let deadline = Instant::now() + timeouts.total;
        let mut errors = Vec::new();
        let mut answered = vec![false; set.upstreams.len()];
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
                let up = &set.upstreams[i];
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

    /// Indices of the set's upstreams to try, in policy order: the healthy ones, or every one
    /// (but those that loop) when all are down, as CoreDNS does when health checking itself
    /// seems broken.
    fn order(&self, set: &UpstreamSet) -> Vec<usize> {
        let mut usable: Vec<usize> = (0..set.upstreams.len())
            .filter(|&i| !set.upstreams[i].looped.load(Relaxed))
            .collect();
        if usable.is_empty() {
            return usable;
        }
        match self.settings.policy {
            Policy::Sequential => {}
            Policy::Random => usable.shuffle(&mut rand::rng()),
            Policy::RoundRobin => {
                let start = set.next.fetch_add(1, Relaxed) % usable.len();
                usable.rotate_left(start);
            }
        }
        let healthy: Vec<usize> = usable
            .iter()
            .copied()
            .filter(|&i| !set.upstreams[i].is_down(self.settings.max_fails))
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
        self.spawn(health_check(up.clone(), self.settings.clone()));
    }

    /// Is `qname` one of our own loop probes? If so, the upstream it was sent to forwards back to
    /// us: from now on it is not used, and the caller must not forward the query (that would
    /// amplify the loop). Checked whenever the probe arrives, so an upstream that answers the
    /// probe before passing it on (e.g. one asking several servers at once) is caught too.
    pub fn is_loop_probe(&self, qname: &[u8]) -> bool {
        let routes = self.routes();
        let Some(up) = routes
            .sets()
            .flat_map(|s| s.upstreams.iter())
            .find(|u| u.loop_probe == qname)
        else {
            return false;
        };
        if !up.looped.swap(true, Relaxed) {
            up.counters.looped.store(true, Relaxed);
            let named_by: Vec<&str> = routes
                .sets()
                .filter(|s| s.upstreams.iter().any(|u| Arc::ptr_eq(u, up)))
                .map(|s| s.origin.as_str())
                .collect();
            tracing::error!(
                upstream = %up.upstream,
                probe = %to_text(&up.loop_probe),
                "forwarding loop: upstream {} sent our loop probe back to this agent, so it \
                 forwards to us; it will not be used. Fix: point that resolver elsewhere, or \
                 stop naming it ({})",
                up.upstream,
                named_by.join("; "),
            );
        }
        true
    }

    /// Sends each upstream a loop probe and marks those that send it back to us; from now on,
    /// upstreams that join a set are probed as they come. Upstreams that loop are logged and
    /// never used again. Fails when there are upstreams and every one loops: the agent cannot
    /// forward anything, and saying so beats amplifying every query.
    pub async fn detect_loops(&self) -> Result<(), ForwardError> {
        self.probing.store(true, SeqCst);
        let states = self.routes().states();
        let checks = states
            .iter()
            .map(|up| probe_for_loop(up.clone(), self.settings.clone()));
        futures::future::join_all(checks).await;
        if !states.is_empty() && states.iter().all(|u| u.looped.load(Relaxed)) {
            return Err(ForwardError::NoUpstream);
        }
        Ok(())
    }
}

/// Sends `up` loop probes until it answers one (or sends it back: `looped` is set by
/// [`Forwarder::is_loop_probe`] when it arrives), it leaves every set, or the attempts run out.
async fn probe_for_loop(up: Arc<UpstreamState>, settings: ForwardSettings) {
    let probe = Question {
        name: up.loop_probe.clone(),
        qtype: u16::from(RecordType::HINFO),
        qclass: dns::CLASS_IN,
        dnssec_ok: false,
        checking_disabled: false,
        upstream_set: UpstreamSetId::default(),
    };
    for attempt in 1..=LOOP_PROBE_ATTEMPTS {
        let reply = tokio::time::timeout(
            settings.timeouts.total,
            exchange(&up, &probe, settings.force_tcp),
        )
        .await;
        // A looping upstream passes the probe on before it can answer it, so by now
        // `is_loop_probe` has seen it.
        if up.looped.load(Relaxed) || up.retired.load(Relaxed) {
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

/// The system's CAs, for a TLS upstream whose settings name none. The command line loads them at
/// start (and refuses to start without them); should they be missing here (a `tls://` upstream
/// from the kube-dns ConfigMap, on a node without CA certificates), every handshake fails with
/// the reason instead.
fn system_tls_config() -> Arc<rustls::ClientConfig> {
    super::tls::client_config(&[]).unwrap_or_else(|e| {
        tracing::error!("TLS upstreams cannot be verified: {e}");
        super::tls::client_config_without_roots()
    })
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Ok(tasks) = self.tasks.lock() {
            for t in tasks.iter() {
                t.abort();
            }
        }
    }
}

/// CoreDNS's health check: `. IN NS`, recursion desired, over the transport queries use. Any
/// reply (whatever its RCODE) means the upstream is up. Probes every `health_check` until one
/// succeeds; `max_fails` failures in a row mark it down. Stops when the upstream leaves every
/// set.
async fn health_check(up: Arc<UpstreamState>, settings: ForwardSettings) {
    let probe = Question {
        name: vec![0],
        qtype: u16::from(RecordType::NS),
        qclass: dns::CLASS_IN,
        dnssec_ok: false,
        checking_disabled: false,
        upstream_set: UpstreamSetId::default(),
    };
    loop {
        if up.retired.load(Relaxed) {
            up.checking.store(false, Relaxed);
            return;
        }
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
pub(crate) mod tests {
    use super::*;
    use crate::zone::name::wire_from_dotted;

    /// Settings for forwarders in unit tests: sequential, short timeouts.
    pub(crate) fn settings() -> ForwardSettings {
        ForwardSettings {
            policy: Policy::Sequential,
            timeouts: Timeouts {
                attempt: Duration::from_secs(1),
                total: Duration::from_secs(2),
            },
            force_tcp: false,
            max_concurrent: 10,
            health_check: Duration::from_millis(500),
            max_fails: 2,
            tls: None,
        }
    }

    fn up(s: &str) -> Upstream {
        Upstream::parse(s).unwrap()
    }

    fn set(origin: &str, upstreams: &[&str]) -> SetSpec {
        let upstreams: Vec<Upstream> = upstreams.iter().map(|u| up(u)).collect();
        SetSpec {
            id: UpstreamSetId::of(&upstreams),
            origin: origin.to_string(),
            upstreams,
        }
    }

    fn state(f: &Forwarder, u: &str) -> Arc<UpstreamState> {
        f.routes()
            .states()
            .into_iter()
            .find(|s| s.upstream == up(u))
            .unwrap_or_else(|| panic!("{u} in some set"))
    }

    #[test]
    fn the_longest_stub_domain_at_or_above_a_name_wins() {
        let f = Forwarder::new(vec![up("192.0.2.1")], settings(), Arc::default());
        f.set_routes(RouteSpec {
            default: set("--upstream", &["192.0.2.1"]),
            stubs: vec![
                (
                    wire_from_dotted("corp.example"),
                    set("corp", &["192.0.2.2"]),
                ),
                (
                    wire_from_dotted("eng.corp.example"),
                    set("eng", &["192.0.2.3"]),
                ),
            ],
        });
        let to = |name: &str| f.route_of(&wire_from_dotted(name)).1;
        assert_eq!(to("www.example.org"), [up("192.0.2.1")]);
        assert_eq!(to("corp.example"), [up("192.0.2.2")]);
        assert_eq!(to("www.corp.example"), [up("192.0.2.2")]);
        assert_eq!(to("eng.corp.example"), [up("192.0.2.3")]);
        assert_eq!(to("a.b.eng.corp.example"), [up("192.0.2.3")]);
        // Whole labels only: `xcorp.example` is not below `corp.example`.
        assert_eq!(to("xcorp.example"), [up("192.0.2.1")]);
        assert_eq!(to("example"), [up("192.0.2.1")]);
        assert_eq!(to(""), [up("192.0.2.1")]);
        // The cache key follows the set.
        assert_ne!(
            f.upstream_set_of(&wire_from_dotted("www.corp.example")),
            f.upstream_set_of(&wire_from_dotted("www.example.org"))
        );
    }

    #[test]
    fn set_ids_are_the_upstreams_whatever_their_order() {
        let a = [up("192.0.2.1"), up("tls://192.0.2.2#dns.example")];
        let b = [up("tls://192.0.2.2#dns.example"), up("192.0.2.1")];
        assert_eq!(UpstreamSetId::of(&a), UpstreamSetId::of(&b));
        assert_ne!(UpstreamSetId::of(&a), UpstreamSetId::of(&a[..1]));
        assert_ne!(
            UpstreamSetId::of(&[]),
            UpstreamSetId::named("kube-dns endpoints")
        );
    }

    #[test]
    fn upstreams_that_stay_keep_their_state_and_those_that_leave_are_retired() {
        let metrics = Arc::new(Metrics::default());
        let f = Forwarder::new(
            vec![up("203.0.113.11"), up("203.0.113.12")],
            settings(),
            metrics.clone(),
        );
        let stays = state(&f, "203.0.113.12");
        let leaves = state(&f, "203.0.113.11");
        stays.fails.store(2, Relaxed);
        stays.looped.store(true, Relaxed);
        stays.counters.requests.store(7, Relaxed);
        let m = f.set_routes(RouteSpec {
            default: SetSpec {
                id: UpstreamSetId::named("kube-dns endpoints"),
                origin: "kube-dns".into(),
                upstreams: vec![up("203.0.113.12"), up("203.0.113.13")],
            },
            stubs: vec![],
        });
        assert_eq!(
            m,
            Membership {
                joined: vec![up("203.0.113.13")],
                left: vec![up("203.0.113.11")],
            }
        );
        let now = state(&f, "203.0.113.12");
        assert!(Arc::ptr_eq(&now, &stays), "the same state, not a copy");
        assert!(now.is_down(2) && now.looped.load(Relaxed));
        assert!(leaves.retired.load(Relaxed), "its health checks stop");
        assert!(!now.retired.load(Relaxed));
        // An upstream in two sets is one state.
        f.set_routes(RouteSpec {
            default: set("a", &["203.0.113.12"]),
            stubs: vec![(
                wire_from_dotted("corp.example"),
                set("b", &["203.0.113.12"]),
            )],
        });
        assert_eq!(f.routes().states().len(), 1);
        assert!(Arc::ptr_eq(&state(&f, "203.0.113.12"), &stays));

        // The metric series of an upstream that left goes once nothing holds it.
        let text = metrics.render();
        assert!(text.contains("to=\"203.0.113.12:53\""), "{text}");
        assert!(!text.contains("to=\"203.0.113.13:53\""), "{text}");
        assert!(text.contains("to=\"203.0.113.11:53\""), "still held here");
        drop(leaves);
        let text = metrics.render();
        assert!(!text.contains("203.0.113.11"), "{text}");
        assert!(
            text.contains("coredns_forward_requests_total{to=\"203.0.113.12:53\"} 7"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn an_empty_set_answers_servfail_at_once() {
        let f = Forwarder::new(Vec::new(), settings(), Arc::default());
        f.set_routes(RouteSpec {
            default: SetSpec {
                id: UpstreamSetId::named("kube-dns endpoints"),
                origin: "the ready endpoints of the kube-dns Service".into(),
                upstreams: vec![],
            },
            stubs: vec![],
        });
        let q = Question {
            name: wire_from_dotted("www.example.org"),
            qtype: 1,
            qclass: 1,
            dnssec_ok: false,
            checking_disabled: false,
            upstream_set: f.upstream_set_of(&wire_from_dotted("www.example.org")),
        };
        let e = f.resolve(&q).await.unwrap_err();
        assert_eq!(e.rcode(), dns::RCODE_SERVFAIL);
        assert_eq!(
            e.to_string(),
            "no upstream to ask (none among the ready endpoints of the kube-dns Service)"
        );
        assert!(f.detect_loops().await.is_ok(), "no upstream is no loop");
    }

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
            upstream_set: UpstreamSetId::default(),
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
