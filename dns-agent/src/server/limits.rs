//! What one client, or all of them together, can make the userspace server hold or do: TCP
//! connections (per client and in all; idle ones closed; when full, a connection waiting for
//! its client closed to make room, the heaviest client's first), queries waiting for an
//! upstream, and queries per second per client.
//!
//! Every table here is bounded by a setting, never by what clients send: a pod cannot grow the
//! agent's memory by opening connections, asking slow names, or sending from many addresses.
//!
//! Queries the kernel answers never reach the agent, so none of this applies to them: a client
//! over its rate still gets the cluster names the XDP program holds.

use std::{
    collections::{BTreeMap, HashMap, hash_map::RandomState},
    future::Future,
    hash::BuildHasher as _,
    io,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::metrics::{ClosedBy, LimitCounters, RefusedBy};

/// The limit options of `dns-agent run`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitSettings {
    /// TCP connections open at once, all clients together.
    pub tcp_connections: usize,
    /// TCP connections open at once from one client address.
    pub tcp_connections_per_client: usize,
    /// How long a TCP connection may wait for the client: for the next query, for the rest of
    /// one, or for the client to take a reply.
    pub tcp_idle_timeout: Duration,
    /// Client queries waiting for an upstream answer at once (UDP and TCP together).
    pub max_pending: usize,
    /// Queries per second and burst per client address; `None`: no limit.
    pub rate: Option<Rate>,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            tcp_connections: DEFAULT_TCP_CONNECTIONS,
            tcp_connections_per_client: DEFAULT_TCP_CONNECTIONS_PER_CLIENT,
            tcp_idle_timeout: DEFAULT_TCP_IDLE_TIMEOUT,
            max_pending: DEFAULT_MAX_PENDING,
            rate: None,
        }
    }
}

pub const DEFAULT_TCP_CONNECTIONS: usize = 1024;
pub const DEFAULT_TCP_CONNECTIONS_PER_CLIENT: usize = 64;
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_PENDING: usize = 10_000;

/// File descriptors the agent needs besides TCP connections and upstream sockets: listeners,
/// BPF maps and programs, netlink, metrics connections (at most 64), TLS upstream connections.
pub const FD_RESERVE: u64 = 256;

/// A per-client query rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    /// Queries a client may send at once after being quiet.
    pub burst: u32,
}

/// The limits of one running server, and the tables they keep.
pub struct Limits {
    settings: LimitSettings,
    tcp: Mutex<TcpTable>,
    pending: Arc<Semaphore>,
    rate: Option<RateLimiter>,
    counters: Arc<LimitCounters>,
}

impl Limits {
    pub fn new(settings: LimitSettings, counters: Arc<LimitCounters>) -> Self {
        Self {
            tcp: Mutex::new(TcpTable::default()),
            pending: Arc::new(Semaphore::new(settings.max_pending)),
            rate: settings.rate.map(RateLimiter::new),
            settings,
            counters,
        }
    }

    /// May `client` send a query now? Counts a refusal. Every message counts, whatever it
    /// holds: garbage costs the server as much as a query.
    pub fn within_rate(&self, client: IpAddr) -> bool {
        let Some(rate) = &self.rate else {
            return true;
        };
        let ok = rate.admit(client, Instant::now());
        if !ok {
            self.counters.refused(RefusedBy::Rate);
        }
        ok
    }

    /// A place among the queries waiting for an upstream, held until the reply is sent;
    /// `None` (counted) when `--max-pending` are waiting already.
    pub fn pending(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.pending.clone().try_acquire_owned().ok();
        if permit.is_none() {
            self.counters.refused(RefusedBy::Pending);
        }
        permit
    }

    /// A new TCP connection from `client`: its place in the table, or `None` (counted) when it
    /// must be closed at once. At a limit, a connection waiting for its client is closed to
    /// make room: at the per-client limit that client's longest-waiting one, at the total limit
    /// the longest-waiting one of the client holding the most. A client that sends a query is
    /// served before one that holds a connection idle (RFC 7766 §6.2.3 lets servers close idle
    /// connections under pressure; clients reconnect).
    pub fn admit_tcp(self: &Arc<Self>, client: IpAddr) -> Option<TcpConnection> {
        let client = client.to_canonical();
        let mut t = self.tcp.lock().expect("tcp table lock");
        let per_client = t.per_client.get(&client).copied().unwrap_or(0);
        if per_client >= self.settings.tcp_connections_per_client {
            if !t.evict_waiting(Some(client), &self.counters) {
                self.counters.refused(RefusedBy::PerClient);
                return None;
            }
        } else if t.open >= self.settings.tcp_connections && !t.evict_waiting(None, &self.counters)
        {
            self.counters.refused(RefusedBy::Total);
            return None;
        }
        t.open += 1;
        *t.per_client.entry(client).or_insert(0) += 1;
        t.next_id += 1;
        let id = t.next_id;
        // It waits for its first query from now on (its task may not have run yet).
        let since = Instant::now();
        let shared = Arc::new(Shared::default());
        t.waiting.insert((since, id), (client, shared.clone()));
        self.counters.tcp_open.fetch_add(1, Relaxed);
        Some(TcpConnection {
            limits: self.clone(),
            client,
            id,
            waiting_since: Some(since),
            shared,
        })
    }
}

/// Connections open, by client, and those waiting for their client in the order they started
/// waiting. Every entry is an open connection: the table is bounded by `--tcp-max-connections`.
#[derive(Default)]
struct TcpTable {
    open: usize,
    per_client: HashMap<IpAddr, usize>,
    /// (since, id) → the connection's client and its close signal.
    waiting: BTreeMap<(Instant, u64), (IpAddr, Arc<Shared>)>,
    next_id: u64,
}

impl TcpTable {
    /// Closes a connection waiting for its client: `client`'s longest-waiting one, or, with
    /// no client given, the longest-waiting one of the client that holds the most connections
    /// (a client with a connection or two keeps them while another holds dozens). It leaves
    /// the table when its task ends, a moment later; until then the table is one over.
    fn evict_waiting(&mut self, client: Option<IpAddr>, counters: &LimitCounters) -> bool {
        let held = |c: &IpAddr| self.per_client.get(c).copied().unwrap_or(0);
        let heaviest = match client {
            Some(c) => c,
            None => match self.waiting.values().max_by_key(|(c, _)| held(c)) {
                Some((c, _)) => *c,
                None => return false,
            },
        };
        let Some(key) = self
            .waiting
            .iter()
            .find(|(_, (c, _))| *c == heaviest)
            .map(|(k, _)| *k)
        else {
            return false;
        };
        let (_, shared) = self.waiting.remove(&key).expect("found above");
        shared.evicted.store(true, Relaxed);
        shared.close.notify_one();
        counters.tcp_closed(ClosedBy::Evicted);
        true
    }
}

/// What the table shares with one connection's task.
#[derive(Default)]
struct Shared {
    close: Notify,
    evicted: AtomicBool,
}

/// Why a connection ends before its client closes it.
#[derive(Debug, thiserror::Error)]
pub enum Closed {
    #[error("no query for the idle timeout")]
    Idle,
    #[error("the client did not finish a query, or take a reply, within the idle timeout")]
    Stalled,
    #[error("closed to make room for another connection")]
    Evicted,
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// One TCP connection's place in the table; leaving it when dropped.
pub struct TcpConnection {
    limits: Arc<Limits>,
    client: IpAddr,
    id: u64,
    waiting_since: Option<Instant>,
    shared: Arc<Shared>,
}

impl TcpConnection {
    /// Reads from the client: at most the idle timeout, and the connection may be closed
    /// meanwhile to make room for another. `between_queries`: the read of the next query's
    /// first bytes (ending there is the client being idle, not stalled).
    pub async fn read<T>(
        &mut self,
        between_queries: bool,
        read: impl Future<Output = io::Result<T>>,
    ) -> Result<T, Closed> {
        self.start_waiting();
        let idle = self.limits.settings.tcp_idle_timeout;
        let outcome = tokio::select! {
            r = tokio::time::timeout(idle, read) => match r {
                Ok(r) => r.map_err(Closed::Io),
                Err(_) if between_queries => Err(Closed::Idle),
                Err(_) => Err(Closed::Stalled),
            },
            _ = self.shared.close.notified() => Err(Closed::Evicted),
        };
        self.stop_waiting();
        if self.shared.evicted.load(Relaxed) {
            // Evicted while the read completed: the table counts it closed already.
            return Err(Closed::Evicted);
        }
        self.count(&outcome);
        outcome
    }

    /// Writes a reply: at most the idle timeout (a client that does not read its replies holds
    /// the connection no longer than an idle one).
    pub async fn write(
        &mut self,
        write: impl Future<Output = io::Result<()>>,
    ) -> Result<(), Closed> {
        let outcome = match tokio::time::timeout(self.limits.settings.tcp_idle_timeout, write).await
        {
            Ok(r) => r.map_err(Closed::Io),
            Err(_) => Err(Closed::Stalled),
        };
        self.count(&outcome);
        outcome
    }

    fn count<T>(&self, outcome: &Result<T, Closed>) {
        match outcome {
            Err(Closed::Idle) => self.limits.counters.tcp_closed(ClosedBy::Idle),
            Err(Closed::Stalled) => self.limits.counters.tcp_closed(ClosedBy::Stalled),
            _ => {}
        }
    }

    fn start_waiting(&mut self) {
        if self.waiting_since.is_some() {
            return;
        }
        let since = Instant::now();
        let mut t = self.limits.tcp.lock().expect("tcp table lock");
        t.waiting
            .insert((since, self.id), (self.client, self.shared.clone()));
        self.waiting_since = Some(since);
    }

    fn stop_waiting(&mut self) {
        if let Some(since) = self.waiting_since.take() {
            let mut t = self.limits.tcp.lock().expect("tcp table lock");
            t.waiting.remove(&(since, self.id));
        }
    }
}

impl Drop for TcpConnection {
    fn drop(&mut self) {
        self.stop_waiting();
        let mut t = self.limits.tcp.lock().expect("tcp table lock");
        t.open -= 1;
        if let Some(n) = t.per_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                t.per_client.remove(&self.client);
            }
        }
        self.limits.counters.tcp_open.fetch_sub(1, Relaxed);
    }
}

/// Raises the soft limit of open files to the hard one and returns it: every TCP connection
/// and every upstream query holds a file descriptor.
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if l.rlim_cur < l.rlim_max {
        l.rlim_cur = l.rlim_max;
        // SAFETY: setrlimit reads the struct; raising the soft limit up to the hard one is
        // always allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(l.rlim_cur)
}

/// The hard limit of open files of this process.
pub fn fd_hard_limit() -> io::Result<u64> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(l.rlim_max)
}

/// Clients tracked by the rate limiter: sets of [`WAYS`] slots, a client's set chosen by a
/// keyed hash of its address. A fixed table whatever clients send (`SETS × WAYS` slots of 32
/// bytes: 128 KiB), far more slots than a node has pods.
const SETS: usize = 1024;
const WAYS: usize = 4;

/// Per-client token buckets in a fixed table.
///
/// Each slot keeps one client's exact address and its bucket as the time its bucket is full
/// again (GCRA: one number per client). A client is never charged for another's queries: a new
/// client takes the slot of its set whose bucket is fullest (a bucket that is full again holds
/// nothing worth keeping). The hash is keyed per process, so no one can choose addresses that
/// land in a victim's set; a client that sends from many addresses (spoofed) can at worst push
/// out a busy client's state, which gives that client a full bucket: the limiter fails open.
struct RateLimiter {
    sets: Box<[Mutex<[Slot; WAYS]>]>,
    hasher: RandomState,
    /// Nanoseconds between two queries at the steady rate.
    interval: u64,
    /// How far ahead of now a bucket may run: (burst − 1) intervals.
    tolerance: u64,
    epoch: Instant,
}

#[derive(Clone, Copy, Default)]
struct Slot {
    /// The client, as an IPv6 address (IPv4 mapped); meaningful when `full_at > 0`.
    client: u128,
    /// Nanoseconds since the epoch at which the bucket is full; 0: the slot is free.
    full_at: u64,
}

impl RateLimiter {
    fn new(rate: Rate) -> Self {
        let interval = 1_000_000_000 / u64::from(rate.per_second.max(1));
        Self {
            sets: (0..SETS)
                .map(|_| Mutex::new([Slot::default(); WAYS]))
                .collect(),
            hasher: RandomState::new(),
            interval,
            tolerance: interval * u64::from(rate.burst.max(1) - 1),
            epoch: Instant::now(),
        }
    }

    fn admit(&self, client: IpAddr, now: Instant) -> bool {
        let key = match client.to_canonical() {
            IpAddr::V4(a) => a.to_ipv6_mapped().to_bits(),
            IpAddr::V6(a) => a.to_bits(),
        };
        // +1: 0 marks a free slot.
        let now = now.saturating_duration_since(self.epoch).as_nanos() as u64 + 1;
        let set = self.hasher.hash_one(key) as usize % SETS;
        let mut slots = self.sets[set].lock().expect("rate limiter lock");
        let i = match slots.iter().position(|s| s.full_at > 0 && s.client == key) {
            Some(i) => i,
            None => {
                // The fullest bucket (earliest `full_at`, free slots first) makes room.
                let i = (0..WAYS)
                    .min_by_key(|&i| slots[i].full_at)
                    .expect("WAYS > 0");
                slots[i] = Slot {
                    client: key,
                    full_at: now,
                };
                i
            }
        };
        let full_at = slots[i].full_at.max(now);
        if full_at - now > self.tolerance {
            return false;
        }
        slots[i].full_at = full_at + self.interval;
        true
    }
}

/// How many file descriptors the settings may hold at once besides [`FD_RESERVE`]: a socket per
/// TCP connection and one per upstream query in flight.
pub fn fds_needed(settings: &LimitSettings, max_concurrent: usize) -> u64 {
    (settings.tcp_connections + max_concurrent) as u64 + FD_RESERVE
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn limits(settings: LimitSettings) -> Arc<Limits> {
        Arc::new(Limits::new(settings, Arc::default()))
    }

    #[test]
    fn a_bucket_takes_its_burst_then_its_rate() {
        let r = RateLimiter::new(Rate {
            per_second: 10,
            burst: 5,
        });
        let a = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
        let t0 = Instant::now();
        let admitted = (0..20).filter(|_| r.admit(a, t0)).count();
        assert_eq!(admitted, 5, "the burst at once");
        assert!(!r.admit(a, t0 + Duration::from_millis(50)));
        assert!(
            r.admit(a, t0 + Duration::from_millis(101)),
            "one more per 100 ms"
        );
        assert!(!r.admit(a, t0 + Duration::from_millis(102)));
        // Quiet for a second: a full burst again, no more.
        let later = t0 + Duration::from_secs(2);
        assert_eq!((0..20).filter(|_| r.admit(a, later)).count(), 5);
    }

    #[test]
    fn clients_never_pay_for_each_other() {
        let r = RateLimiter::new(Rate {
            per_second: 1,
            burst: 2,
        });
        let t0 = Instant::now();
        let noisy = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 66));
        while r.admit(noisy, t0) {}
        // Every other address, however many, has its own bucket (or a fresh one): the same
        // IPv4 address written as a mapped IPv6 one is the same client.
        for i in 0..20_000u32 {
            let other = IpAddr::V6(Ipv6Addr::from_bits(0x2001_0db8_u128 << 96 | u128::from(i)));
            assert!(r.admit(other, t0), "client {i}");
        }
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 66).to_ipv6_mapped());
        // Twenty thousand new clients went through 4096 slots: the noisy one's state may have
        // been pushed out (it then has a full bucket again), never given to another client.
        let t1 = t0 + Duration::from_millis(10);
        let again = (0..5).filter(|_| r.admit(mapped, t1)).count();
        assert!(again <= 2, "at most a burst: {again}");
    }

    #[test]
    fn the_table_stays_its_size() {
        let r = RateLimiter::new(Rate {
            per_second: 100,
            burst: 100,
        });
        for i in 0..100_000u32 {
            r.admit(IpAddr::V4(Ipv4Addr::from_bits(i)), Instant::now());
        }
        assert_eq!(r.sets.len(), SETS);
        assert_eq!(std::mem::size_of::<Slot>(), 32);
    }

    #[tokio::test]
    async fn tcp_limits_close_the_longest_waiting_connection_first() {
        let l = limits(LimitSettings {
            tcp_connections: 3,
            tcp_connections_per_client: 2,
            ..LimitSettings::default()
        });
        let a = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        let b = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));
        let c = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 3));
        let mut a1 = l.admit_tcp(a).unwrap();
        let mut a2 = l.admit_tcp(a).unwrap();
        // Both busy with a query: the per-client limit refuses.
        a1.stop_waiting();
        a2.stop_waiting();
        assert!(l.admit_tcp(a).is_none());
        // a1 waits for its client again: it makes room for a's third.
        a1.start_waiting();
        let mut a3 = l.admit_tcp(a).unwrap();
        a3.stop_waiting();
        assert!(a1.shared.evicted.load(Relaxed));
        drop(a1);
        let mut b1 = l.admit_tcp(b).unwrap();
        b1.stop_waiting();
        // Three open (a2, a3, b1), all busy: the total limit refuses.
        assert!(l.admit_tcp(c).is_none());
        b1.start_waiting();
        let c1 = l.admit_tcp(c).unwrap();
        assert!(b1.shared.evicted.load(Relaxed));
        drop(b1);
        {
            let t = l.tcp.lock().unwrap();
            assert_eq!(t.open, 3);
            assert_eq!(t.per_client.len(), 2, "b left the table");
            assert_eq!(t.waiting.len(), 1, "c1 waits for its first query");
        }
        drop(c1);
        assert!(l.tcp.lock().unwrap().waiting.is_empty());
        assert_eq!(l.counters.tcp_open.load(Relaxed), 2);
        // A new connection waits for its first query: the next one, over the limit, closes it.
        let d = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 4));
        let d1 = l.admit_tcp(d).unwrap();
        let d2 = l.admit_tcp(d).unwrap();
        assert!(d1.shared.evicted.load(Relaxed));
        assert!(!d2.shared.evicted.load(Relaxed));
    }

    #[tokio::test]
    async fn at_the_total_limit_the_client_holding_most_makes_room() {
        let l = limits(LimitSettings {
            tcp_connections: 4,
            tcp_connections_per_client: 4,
            ..LimitSettings::default()
        });
        let light = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        let heavy = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));
        // The light client's connection waits longest, the heavy one holds three.
        let l1 = l.admit_tcp(light).unwrap();
        let h: Vec<TcpConnection> = (0..3).map(|_| l.admit_tcp(heavy).unwrap()).collect();
        let _new = l
            .admit_tcp(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 3)))
            .unwrap();
        assert!(
            !l1.shared.evicted.load(Relaxed),
            "the light client keeps its connection"
        );
        assert!(
            h[0].shared.evicted.load(Relaxed),
            "the heavy one's oldest made room"
        );
        assert!(!h[1].shared.evicted.load(Relaxed));
    }

    #[tokio::test]
    async fn an_evicted_reader_ends_at_once() {
        let l = limits(LimitSettings {
            tcp_connections: 1,
            ..LimitSettings::default()
        });
        let a = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        let mut first = l.admit_tcp(a).unwrap();
        first.stop_waiting();
        let l2 = l.clone();
        let reader = tokio::spawn(async move {
            first
                .read(true, std::future::pending::<io::Result<()>>())
                .await
        });
        // Once the reader waits, a new connection takes its place.
        let second = loop {
            if let Some(c) = l2.admit_tcp(a) {
                break c;
            }
            tokio::task::yield_now().await;
        };
        let outcome = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("the evicted reader ends")
            .unwrap();
        assert!(matches!(outcome, Err(Closed::Evicted)), "{outcome:?}");
        drop(second);
    }
}
