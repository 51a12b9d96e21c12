//! The soak: mixed traffic at a set rate while the zone churns through the API, the upstream
//! flaps and the agent is replaced now and then. Every answer is checked against the zone as it
//! was when the query left (allowing for the programming latency), and the agent's memory, file
//! descriptors, threads and kernel map memory are sampled throughout.
//!
//! In the suite it runs 60 s; `cargo xtask soak --duration 30m` runs it long (settings below
//! come from `XDNS_SOAK_*` variables). It writes a CSV of the samples and an SVG plot, and
//! fails on any wrong answer, any unexplained unanswered query, or a leak.
//!
//! Needs root (`cargo xtask test` runs it).

mod support;

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData, Record, RecordType, rdata::A},
};
use support::{
    Agent, LISTEN_V4, LISTEN_V6, Netns, Topology, UPSTREAM_V4,
    fake_api::{self, FakeApi},
    upstream::{Action, Behaviour, Upstream, reply_to},
};

const NS: &str = "soak";
const SERVICES: usize = 100;
const HEADLESS: usize = 20;
/// A change is visible to queries sent at most this long after it was written. Generous: the
/// benchmark measures the real programming latency (a millisecond or so); this only keeps a
/// busy shared machine from turning a late answer into a "wrong" one.
const ALLOW: Duration = Duration::from_secs(2);
/// A query without a reply after this long is unanswered.
const GIVE_UP: Duration = Duration::from_secs(5);
/// Failures are remembered for 5 s (`--cache-servfail-ttl`): a SERVFAIL for an outside name is
/// right within this long after the upstream misbehaved.
const FAILURE_MEMORY: Duration = Duration::from_secs(7);

struct Settings {
    duration: Duration,
    qps: u64,
    churn_per_s: u64,
    replace_every: Duration,
    out: PathBuf,
}

impl Settings {
    fn from_env() -> Self {
        let var = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let secs = var("XDNS_SOAK_SECONDS", 60);
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Self {
            duration: Duration::from_secs(secs),
            qps: var("XDNS_SOAK_QPS", 800),
            churn_per_s: var("XDNS_SOAK_CHURN", 60),
            replace_every: Duration::from_secs(var(
                "XDNS_SOAK_REPLACE_SECONDS",
                (secs / 3).clamp(20, 300),
            )),
            out: std::env::var("XDNS_SOAK_OUT")
                .map(PathBuf::from)
                .unwrap_or_else(|_| {
                    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                        .join("../target/soak")
                        .join(stamp.to_string())
                }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What the zone said, and when.

/// An A answer: the sorted addresses, or `None` for NXDOMAIN.
type Answer = Option<Vec<Ipv4Addr>>;

/// For each churned name, the answers it had, each from the moment its change was written.
#[derive(Default)]
struct History {
    names: HashMap<String, Vec<(Instant, Answer)>>,
    /// When the upstream misbehaved: (from, to), `to` unset while it still does.
    upstream_trouble: Vec<(Instant, Option<Instant>)>,
}

impl History {
    fn set(&mut self, name: &str, at: Instant, answer: Answer) {
        self.names
            .entry(name.to_string())
            .or_default()
            .push((at, answer));
    }

    /// Was `got` the name's answer at some moment between `sent - ALLOW` and `received`?
    fn acceptable(&self, name: &str, sent: Instant, received: Instant, got: &Answer) -> bool {
        let Some(timeline) = self.names.get(name) else {
            return false;
        };
        let from = sent.checked_sub(ALLOW).unwrap_or(sent);
        // The answer in force at `from`, and every later one up to `received`.
        let start = timeline.iter().rposition(|(t, _)| *t <= from).unwrap_or(0);
        timeline[start..]
            .iter()
            .take_while(|(t, _)| *t <= received)
            .any(|(_, a)| a == got)
    }

    fn upstream_troubled(&self, sent: Instant, received: Instant) -> bool {
        self.upstream_trouble
            .iter()
            .any(|(a, b)| *a <= received && b.is_none_or(|b| sent <= b + FAILURE_MEMORY))
    }
}

// ---------------------------------------------------------------------------------------------
// The churn: Services and EndpointSlices created, changed and deleted through the API.

struct Churn {
    api: Arc<FakeApi>,
    history: Arc<Mutex<History>>,
    rng: u64,
    services: Vec<Option<Ipv4Addr>>,
    headless: Vec<Vec<Ipv4Addr>>,
    changes: u64,
}

impl Churn {
    fn new(api: Arc<FakeApi>, history: Arc<Mutex<History>>) -> Self {
        let mut c = Self {
            api,
            history,
            rng: 0x9e37_79b9_7f4a_7c15,
            services: vec![None; SERVICES],
            headless: vec![Vec::new(); HEADLESS],
            changes: 0,
        };
        c.api.apply(fake_api::namespace(NS));
        for i in 0..SERVICES {
            if i % 2 == 0 {
                c.set_service(i);
            } else {
                c.record(&svc_name(i), None);
            }
        }
        for j in 0..HEADLESS {
            c.api.apply(fake_api::headless(NS, &hl(j)));
            c.set_slice(j);
        }
        c
    }

    fn next(&mut self) -> u64 {
        // xorshift: the churn is the same on every run of a given length.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn record(&self, name: &str, answer: Answer) {
        self.history
            .lock()
            .expect("history")
            .set(name, Instant::now(), answer);
    }

    fn address(&mut self, net: u8) -> Ipv4Addr {
        let r = self.next();
        Ipv4Addr::new(10, net, (r >> 8) as u8, (r as u8).max(1))
    }

    /// Creates or changes Service `i` (a new cluster IP).
    fn set_service(&mut self, i: usize) {
        let ip = self.address(97);
        let name = svc_name(i);
        // Recorded before the write: from here on the new answer may be seen.
        self.record(&name, Some(vec![ip]));
        self.api
            .apply(fake_api::service(NS, &format!("svc-{i}"), &ip.to_string()));
        self.services[i] = Some(ip);
    }

    fn delete_service(&mut self, i: usize) {
        self.record(&svc_name(i), None);
        self.api
            .delete(fake_api::Resource::Services, NS, &format!("svc-{i}"));
        self.services[i] = None;
    }

    /// New ready endpoints (none: the headless name stops existing) for headless `j`.
    fn set_slice(&mut self, j: usize) {
        let n = (self.next() % 4) as usize;
        let mut addrs: Vec<Ipv4Addr> = (0..n).map(|_| self.address(244)).collect();
        addrs.sort();
        addrs.dedup();
        self.record(&hl_name(j), (!addrs.is_empty()).then(|| addrs.clone()));
        let text: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        let text: Vec<&str> = text.iter().map(String::as_str).collect();
        self.api.apply(fake_api::slice(
            NS,
            &format!("{}-slice", hl(j)),
            &hl(j),
            &text,
        ));
        self.headless[j] = addrs;
    }

    fn step(&mut self) {
        let r = self.next();
        match r % 3 {
            0 => {
                let j = (r >> 8) as usize % HEADLESS;
                self.set_slice(j);
            }
            _ => {
                let i = (r >> 8) as usize % SERVICES;
                if self.services[i].is_some() && (r >> 32).is_multiple_of(3) {
                    self.delete_service(i);
                } else {
                    self.set_service(i);
                }
            }
        }
        self.changes += 1;
    }
}

fn svc_name(i: usize) -> String {
    format!("svc-{i}.{NS}.svc.cluster.local")
}

fn hl(j: usize) -> String {
    format!("hl-{j}")
}

fn hl_name(j: usize) -> String {
    format!("hl-{j}.{NS}.svc.cluster.local")
}

// ---------------------------------------------------------------------------------------------
// The upstream: example names, with spells of trouble.

const NORMAL: u8 = 0;
const DOWN: u8 = 1;
const SLOW: u8 = 2;
const SERVFAIL: u8 = 3;

fn external_ip(name: &str) -> Ipv4Addr {
    let n = name.trim_end_matches('.').split('.').count() as u8;
    Ipv4Addr::new(203, 0, 113, n)
}

fn flapping(mode: Arc<AtomicU8>) -> Behaviour {
    Arc::new(move |q: &Message| {
        let mut r = reply_to(q);
        let question = &q.queries[0];
        match mode.load(Relaxed) {
            DOWN => return Action::Drop,
            SERVFAIL => {
                r.metadata.response_code = ResponseCode::ServFail;
                return Action::Reply(r);
            }
            _ => {}
        }
        let name = question.name().to_ascii().to_ascii_lowercase();
        if name.ends_with("example.") {
            if question.query_type() == RecordType::A {
                r.add_answer(Record::from_rdata(
                    question.name().clone(),
                    30,
                    RData::A(A::from(external_ip(&name))),
                ));
            }
        } else {
            // The root's health checks and anything else.
            if question.query_type() != RecordType::NS {
                r.metadata.response_code = ResponseCode::NXDomain;
            }
        }
        if mode.load(Relaxed) == SLOW {
            Action::Delayed(Duration::from_millis(2500), Box::new(Action::Reply(r)))
        } else {
            Action::Reply(r)
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The queries.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A churned cluster name: checked against the history.
    Cluster,
    /// A search-path expansion: always NXDOMAIN.
    Expansion,
    /// A name outside the cluster: its one address, or SERVFAIL while the upstream misbehaves.
    External,
    /// EDNS version 1: BADVERS.
    BadVersion,
    /// Garbage: no records back, ever.
    Malformed,
}

struct Pending {
    name: String,
    kind: Kind,
    sent: Instant,
}

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    answered: AtomicU64,
    unanswered: AtomicU64,
    /// Unanswered outside any spell of upstream trouble, for queries that need no upstream.
    unexplained: AtomicU64,
    tcp: AtomicU64,
    wrong: Mutex<Vec<String>>,
    /// When unanswered queries were sent, for the summary.
    unanswered_at: Mutex<Vec<Instant>>,
}

impl Tally {
    fn wrong(&self, what: String) {
        let mut w = self.wrong.lock().expect("tally");
        if w.len() < 50 {
            w.push(what);
        }
    }
}

fn query_bytes(id: u16, name: &str, edns: Option<(u8, bool)>) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(
        Name::from_ascii(format!("{name}.")).expect("a name"),
        RecordType::A,
    ));
    if let Some((version, dnssec_ok)) = edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        e.set_version(version);
        e.set_dnssec_ok(dnssec_ok);
        m.set_edns(e);
    }
    m.to_vec().expect("encode")
}

fn a_answer(m: &Message) -> Answer {
    if m.metadata.response_code == ResponseCode::NXDomain {
        return None;
    }
    let mut v: Vec<Ipv4Addr> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    v.sort();
    Some(v)
}

/// Checks one reply against what was asked.
fn judge(
    p: &Pending,
    bytes: &[u8],
    received: Instant,
    history: &History,
    tally: &Tally,
) -> Result<(), String> {
    if p.kind == Kind::BadVersion {
        // BADVERS (RFC 6891): no records, an OPT of version 0 whose extended RCODE is 1.
        tally.answered.fetch_add(1, Relaxed);
        let opt = bytes.len().checked_sub(11).map(|at| &bytes[at..]);
        let ok = bytes.len() >= 12
            && bytes[6..8] == [0, 0]
            && opt.is_some_and(|o| o[2] == 41 && o[5] == 1 && o[6] == 0);
        return if ok {
            Ok(())
        } else {
            Err(format!(
                "{}: EDNS version 1 was not answered BADVERS",
                p.name
            ))
        };
    }
    let Ok(m) = Message::from_vec(bytes) else {
        return if p.kind == Kind::Malformed {
            Ok(())
        } else {
            Err(format!("{}: an unparsable reply", p.name))
        };
    };
    tally.answered.fetch_add(1, Relaxed);
    let rcode = m.metadata.response_code;
    match p.kind {
        Kind::Cluster => {
            let got = a_answer(&m);
            if rcode != ResponseCode::NoError && rcode != ResponseCode::NXDomain {
                return Err(format!("{}: {rcode}", p.name));
            }
            if !history.acceptable(&p.name, p.sent, received, &got) {
                return Err(format!(
                    "{}: {got:?}, never its answer between {:?} before sending and receiving",
                    p.name, ALLOW
                ));
            }
        }
        Kind::Expansion => {
            if rcode != ResponseCode::NXDomain || !m.answers.is_empty() {
                return Err(format!("{}: {rcode} {:?}", p.name, m.answers));
            }
        }
        Kind::External => match rcode {
            ResponseCode::NoError if a_answer(&m) == Some(vec![external_ip(&p.name)]) => {}
            ResponseCode::ServFail if history.upstream_troubled(p.sent, received) => {}
            _ => return Err(format!("{}: {rcode} {:?}", p.name, m.answers)),
        },
        Kind::BadVersion => unreachable!("judged above"),
        Kind::Malformed => {
            if !m.answers.is_empty() {
                return Err(format!("garbage got records: {:?}", m.answers));
            }
        }
    }
    Ok(())
}

/// One UDP client socket (one address family) in the pod: a sender at a fixed rate and a
/// receiver that judges each reply.
#[derive(Clone)]
struct Asker {
    sock: Arc<UdpSocket>,
    server: SocketAddr,
    pending: Arc<Mutex<HashMap<u16, Pending>>>,
}

impl Asker {
    fn new(pod: &Netns, server: IpAddr) -> Self {
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let sock = pod.enter(move || UdpSocket::bind(bind).expect("bind"));
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Self {
            sock: Arc::new(sock),
            server: SocketAddr::new(server, 53),
            pending: Arc::default(),
        }
    }

    fn receiver(
        &self,
        stop: Arc<AtomicBool>,
        history: Arc<Mutex<History>>,
        tally: Arc<Tally>,
    ) -> std::thread::JoinHandle<()> {
        let (sock, server, pending) = (self.sock.clone(), self.server, self.pending.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65535];
            let mut last_sweep = Instant::now();
            while !stop.load(Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let received = Instant::now();
                    if from == server && n >= 2 {
                        let id = u16::from_be_bytes([buf[0], buf[1]]);
                        let p = pending.lock().expect("pending").remove(&id);
                        if let Some(p) = p {
                            let h = history.lock().expect("history");
                            if let Err(e) = judge(&p, &buf[..n], received, &h, &tally) {
                                tally.wrong(e);
                            }
                        }
                    }
                }
                if last_sweep.elapsed() > Duration::from_millis(500) {
                    last_sweep = Instant::now();
                    sweep(&pending, &history, &tally, GIVE_UP);
                }
            }
        })
    }

    fn send(&self, id: u16, bytes: &[u8], name: String, kind: Kind) {
        self.pending.lock().expect("pending").insert(
            id,
            Pending {
                name,
                kind,
                sent: Instant::now(),
            },
        );
        let _ = self.sock.send_to(bytes, self.server);
    }
}

/// Counts queries older than `after` as unanswered.
fn sweep(
    pending: &Mutex<HashMap<u16, Pending>>,
    history: &Mutex<History>,
    tally: &Tally,
    after: Duration,
) {
    let now = Instant::now();
    let old: Vec<Pending> = {
        let mut p = pending.lock().expect("pending");
        let ids: Vec<u16> = p
            .iter()
            .filter(|(_, q)| now.duration_since(q.sent) > after)
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter().filter_map(|id| p.remove(&id)).collect()
    };
    let h = history.lock().expect("history");
    for q in old {
        // Garbage deserves no reply.
        if q.kind == Kind::Malformed {
            continue;
        }
        tally.unanswered.fetch_add(1, Relaxed);
        tally.unanswered_at.lock().expect("tally").push(q.sent);
        let explained = q.kind == Kind::External && h.upstream_troubled(q.sent, now);
        if !explained {
            tally.unexplained.fetch_add(1, Relaxed);
            tally.wrong(format!("unanswered: {} ({:?})", q.name, q.kind));
        }
    }
}

/// The next query of the mix: (name, kind, bytes).
fn pick(n: u64, id: u16) -> (String, Kind, Vec<u8>) {
    let r = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 16;
    match n % 20 {
        0..=9 => {
            let name = if r.is_multiple_of(5) {
                hl_name(r as usize % HEADLESS)
            } else {
                svc_name(r as usize % SERVICES)
            };
            let edns = match r % 3 {
                0 => None,
                1 => Some((0, false)),
                _ => Some((0, true)),
            };
            let b = query_bytes(id, &name, edns);
            (name, Kind::Cluster, b)
        }
        10..=12 => {
            let name = match r % 2 {
                0 => format!("{}.{NS}.svc.cluster.local", svc_name(r as usize % SERVICES)),
                _ => format!("www.example.org.{NS}.svc.cluster.local"),
            };
            let b = query_bytes(id, &name, None);
            (name, Kind::Expansion, b)
        }
        13..=17 => {
            // A few hundred distinct names: most answers come from the cache, some miss.
            let name = format!("n{}.soak.example", r % 400);
            let b = query_bytes(id, &name, Some((0, false)));
            (name, Kind::External, b)
        }
        18 => {
            let name = svc_name(r as usize % SERVICES);
            let b = query_bytes(id, &name, Some((1, false)));
            (name, Kind::BadVersion, b)
        }
        _ => {
            // A query cut short, or bytes of no meaning with a query's ID.
            let mut b = query_bytes(id, &svc_name(0), None);
            if r.is_multiple_of(2) {
                b.truncate(12 + (r as usize % 10));
            } else {
                for (i, x) in b.iter_mut().enumerate().skip(2) {
                    *x = (r >> (i % 48)) as u8 ^ i as u8;
                }
                b[2] &= 0x7f; // a query, not a response: responses get no reply at all
            }
            ("(malformed)".into(), Kind::Malformed, b)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Resources.

#[derive(Clone, Copy, Debug)]
struct Sample {
    at: f64,
    generation: usize,
    rss_kib: u64,
    fds: u64,
    threads: u64,
    map_kib: u64,
}

fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(field)
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
        })
        .unwrap_or(0)
}

fn sample(pid: u32, generation: usize, pin: &std::path::Path, start: Instant) -> Sample {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    let dir = dns_agent::kernel::pin_dir(pin);
    let mut map_bytes = 0;
    for name in dns_common::ALL_MAPS {
        if let Ok(m) = aya::maps::MapData::from_pin(dir.join(name)) {
            use std::os::fd::{AsFd as _, AsRawFd as _};
            let fd = m.fd().as_fd().as_raw_fd();
            map_bytes += std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
                .ok()
                .and_then(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("memlock:")?.trim().parse::<u64>().ok())
                })
                .unwrap_or(0);
        }
    }
    Sample {
        at: start.elapsed().as_secs_f64(),
        generation,
        rss_kib: proc_status(pid, "VmRSS:"),
        fds,
        threads: proc_status(pid, "Threads:"),
        map_kib: map_bytes / 1024,
    }
}

/// A leak, per agent: the last third's mean well above the second third's (the first third is
/// the warm-up: caches fill, the zone churns to its steady size).
fn leaks(samples: &[Sample]) -> Vec<String> {
    let mut out = Vec::new();
    let generations = samples.iter().map(|s| s.generation).max().unwrap_or(0);
    for g in 0..=generations {
        let s: Vec<&Sample> = samples.iter().filter(|s| s.generation == g).collect();
        if s.len() < 15 {
            continue;
        }
        let third = s.len() / 3;
        let mean = |part: &[&Sample], f: &dyn Fn(&Sample) -> u64| {
            part.iter().map(|x| f(x)).sum::<u64>() as f64 / part.len() as f64
        };
        let (mid, last) = (&s[third..2 * third], &s[2 * third..]);
        for (what, f, slack) in [
            (
                "RSS KiB",
                &(|x: &Sample| x.rss_kib) as &dyn Fn(&Sample) -> u64,
                8192.0,
            ),
            ("file descriptors", &|x: &Sample| x.fds, 16.0),
            ("threads", &|x: &Sample| x.threads, 4.0),
            ("kernel map KiB", &|x: &Sample| x.map_kib, 1024.0),
        ] {
            let (a, b) = (mean(mid, f), mean(last, f));
            if b > a * 1.2 + slack {
                out.push(format!("agent {g}: {what} grew from {a:.0} to {b:.0}"));
            }
        }
    }
    out
}

fn write_report(
    settings: &Settings,
    samples: &[Sample],
    summary: &str,
) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(&settings.out)?;
    let mut csv = String::from("seconds,agent,rss_kib,fds,threads,kernel_map_kib\n");
    for s in samples {
        csv.push_str(&format!(
            "{:.1},{},{},{},{},{}\n",
            s.at, s.generation, s.rss_kib, s.fds, s.threads, s.map_kib
        ));
    }
    std::fs::write(settings.out.join("samples.csv"), csv)?;
    std::fs::write(settings.out.join("summary.txt"), summary)?;
    // Four panels, one line each, agents told apart by gaps in the line.
    let (w, h, pad) = (900.0, 160.0, 40.0);
    let t_max = samples.last().map_or(1.0, |s| s.at).max(1.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n",
        4.0 * (h + pad) + pad
    );
    type Panel = (&'static str, fn(&Sample) -> u64);
    let panels: [Panel; 4] = [
        ("agent RSS (KiB)", |s| s.rss_kib),
        ("file descriptors", |s| s.fds),
        ("threads", |s| s.threads),
        ("kernel map memory (KiB)", |s| s.map_kib),
    ];
    for (k, (title, f)) in panels.iter().enumerate() {
        let top = pad + k as f64 * (h + pad);
        let max = samples.iter().map(f).max().unwrap_or(1).max(1) as f64;
        svg.push_str(&format!(
            "<text x=\"{pad}\" y=\"{}\">{title}: max {max:.0}</text>\n<rect x=\"{pad}\" y=\"{top}\" width=\"{}\" height=\"{h}\" fill=\"none\" stroke=\"#999\"/>\n",
            top - 6.0,
            w - 2.0 * pad
        ));
        let mut path = String::new();
        let mut last_gen = usize::MAX;
        for s in samples {
            let x = pad + s.at / t_max * (w - 2.0 * pad);
            let y = top + h - f(s) as f64 / max * h;
            path.push_str(&format!(
                "{}{x:.1},{y:.1} ",
                if s.generation == last_gen { "L" } else { "M" }
            ));
            last_gen = s.generation;
        }
        svg.push_str(&format!(
            "<path d=\"{path}\" fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\"/>\n"
        ));
    }
    svg.push_str(&format!(
        "<text x=\"{pad}\" y=\"{}\">seconds 0 … {t_max:.0}; a new line starts where an agent replaced the last</text>\n</svg>\n",
        4.0 * (h + pad) + pad - 10.0
    ));
    std::fs::write(settings.out.join("soak.svg"), svg)?;
    Ok(settings.out.clone())
}

// ---------------------------------------------------------------------------------------------

fn tcp_exchange(pod: &Netns, server: SocketAddr, msg: Vec<u8>) -> Option<Vec<u8>> {
    pod.enter(move || {
        let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        let mut framed = (msg.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&msg);
        s.write_all(&framed).ok()?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).ok()?;
        let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut buf).ok()?;
        Some(buf)
    })
}

#[test]
fn every_answer_is_right_while_the_zone_churns_the_upstream_flaps_and_agents_change() {
    let settings = Settings::from_env();
    let topo = Topology::new();
    let mode = Arc::new(AtomicU8::new(NORMAL));
    let _upstream = Upstream::start(
        &topo.node,
        SocketAddr::new(IpAddr::V4(UPSTREAM_V4), 53),
        flapping(mode.clone()),
    );
    let api = Arc::new(FakeApi::start(&topo.node));
    let history = Arc::new(Mutex::new(History::default()));
    let mut churn = Churn::new(api.clone(), history.clone());
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = api.kubeconfig(dir.path());
    let pin = PathBuf::from("/sys/fs/bpf").join(support::unique("xdns-s"));
    let args = Agent::args(&topo, "--kubeconfig", &kubeconfig, &[]);
    let mut agents = vec![Agent::start_at(&topo, args.clone(), pin.clone(), 9253)];
    // Agents replaced: kept until the end, as dropping one removes the pin directory the
    // serving agent shares.
    let mut retired = Vec::new();

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let askers = [
        Asker::new(&topo.pod, IpAddr::V4(LISTEN_V4)),
        Asker::new(&topo.pod, IpAddr::V6(LISTEN_V6)),
    ];
    let mut threads: Vec<_> = askers
        .iter()
        .map(|a| a.receiver(stop.clone(), history.clone(), tally.clone()))
        .collect();

    // The sender: open loop, at the set rate, whatever the answers do. It stops first, and the
    // receivers a little later, so that the last queries' answers are counted.
    let stop_sending = Arc::new(AtomicBool::new(false));
    {
        let (stop, tally) = (stop_sending.clone(), tally.clone());
        let askers: Vec<Asker> = askers.to_vec();
        let interval = Duration::from_secs_f64(1.0 / settings.qps.max(1) as f64);
        threads.push(std::thread::spawn(move || {
            let start = Instant::now();
            let mut n = 0u64;
            while !stop.load(Relaxed) {
                let due = start + interval.mul_f64(n as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let asker = &askers[(n % 2) as usize];
                let id = (n / 2 % 65536) as u16;
                let (name, kind, bytes) = pick(n, id);
                asker.send(id, &bytes, name, kind);
                tally.sent.fetch_add(1, Relaxed);
                n += 1;
            }
        }));
    }
    // TCP, a few a second, each checked like the rest.
    {
        let (stop, tally, history, pod) = (
            stop.clone(),
            tally.clone(),
            history.clone(),
            Netns::existing(&topo.pod.name),
        );
        threads.push(std::thread::spawn(move || {
            let mut n = 0usize;
            while !stop.load(Relaxed) {
                let name = svc_name(n * 7 % SERVICES);
                let sent = Instant::now();
                let reply = tcp_exchange(
                    &pod,
                    SocketAddr::new(IpAddr::V4(LISTEN_V4), 53),
                    query_bytes(n as u16, &name, None),
                );
                tally.tcp.fetch_add(1, Relaxed);
                let p = Pending {
                    name: name.clone(),
                    kind: Kind::Cluster,
                    sent,
                };
                match reply {
                    Some(b) => {
                        let h = history.lock().expect("history");
                        if let Err(e) = judge(&p, &b, Instant::now(), &h, &tally) {
                            tally.wrong(format!("TCP: {e}"));
                        }
                    }
                    None => {
                        tally.unanswered.fetch_add(1, Relaxed);
                        tally.unexplained.fetch_add(1, Relaxed);
                        tally.wrong(format!("TCP unanswered: {name}"));
                    }
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        }));
    }

    // The main loop: churn, upstream trouble, agent replacement and samples, until the end.
    let start = Instant::now();
    let churn_interval = Duration::from_secs_f64(1.0 / settings.churn_per_s.max(1) as f64);
    let mut next_sample = start;
    let mut next_replace = start + settings.replace_every;
    let mut samples = Vec::new();
    let mut trouble: Option<(u8, Instant)> = None;
    let mut replaced = 0;
    while start.elapsed() < settings.duration {
        // On schedule: a slow write (a busy machine) is caught up, not skipped.
        let mut due = 0;
        while start + churn_interval.mul_f64(churn.changes as f64) <= Instant::now() && due < 100 {
            churn.step();
            due += 1;
        }
        let now = Instant::now();
        // Every 10 s: 3 s of trouble, in turn down, slow and SERVFAIL.
        let phase = now.duration_since(start).as_secs() % 10;
        match (&trouble, phase >= 7) {
            (None, true) => {
                let m =
                    [DOWN, SLOW, SERVFAIL][(now.duration_since(start).as_secs() / 10 % 3) as usize];
                // Recorded before the upstream changes: an answer judged from now on knows.
                history
                    .lock()
                    .expect("history")
                    .upstream_trouble
                    .push((now, None));
                mode.store(m, Relaxed);
                trouble = Some((m, now));
            }
            (Some(_), false) => {
                mode.store(NORMAL, Relaxed);
                if let Some(last) = history.lock().expect("history").upstream_trouble.last_mut() {
                    last.1 = Some(now);
                }
                trouble = None;
            }
            _ => {}
        }
        if now >= next_replace {
            // The new agent beside the old, then the old stopped: a rolling update.
            let port = if replaced % 2 == 0 { 9254 } else { 9253 };
            let new = Agent::start_at(&topo, args.clone(), pin.clone(), port);
            let mut old = agents.pop().expect("an agent");
            old.stop();
            retired.push(old);
            agents.push(new);
            replaced += 1;
            next_replace = now + settings.replace_every;
        }
        if now >= next_sample {
            samples.push(sample(agents[0].pid(), replaced, &pin, start));
            next_sample += Duration::from_secs(1);
        }
        std::thread::sleep(
            (start + churn_interval.mul_f64(churn.changes as f64))
                .saturating_duration_since(Instant::now()),
        );
    }
    if trouble.is_some()
        && let Some(last) = history.lock().expect("history").upstream_trouble.last_mut()
    {
        last.1 = Some(Instant::now());
    }
    mode.store(NORMAL, Relaxed);
    stop_sending.store(true, Relaxed);
    // Longer than an outside name may take (the upstream timeouts: 1.9 s in all).
    std::thread::sleep(Duration::from_millis(2500));
    stop.store(true, Relaxed);
    for t in threads {
        t.join().expect("a soak thread");
    }
    for a in &askers {
        sweep(&a.pending, &history, &tally, Duration::ZERO);
    }

    let wrong = tally.wrong.lock().expect("tally").clone();
    // Unanswered queries by the second they were sent in.
    let mut by_second: std::collections::BTreeMap<u64, u64> = Default::default();
    for t in tally.unanswered_at.lock().expect("tally").iter() {
        *by_second
            .entry(t.duration_since(start).as_secs())
            .or_default() += 1;
    }
    let leaks = leaks(&samples);
    let summary = format!(
        "soak: {:?}, {} queries/s offered, {} changes/s, agent replaced every {:?}\n\
         UDP queries sent {}, answers judged {} (UDP and TCP), unanswered {} (unexplained {}), TCP queries {}\n\
         zone changes {} ({:.0}/s), agents {}, wrong answers {}\n\
         leaks: {}\n\
         unanswered by second sent: {:?}\n\
         first wrong answers: {:#?}\n",
        settings.duration,
        settings.qps,
        settings.churn_per_s,
        settings.replace_every,
        tally.sent.load(Relaxed),
        tally.answered.load(Relaxed),
        tally.unanswered.load(Relaxed),
        tally.unexplained.load(Relaxed),
        tally.tcp.load(Relaxed),
        churn.changes,
        churn.changes as f64 / settings.duration.as_secs_f64(),
        replaced + 1,
        wrong.len(),
        if leaks.is_empty() {
            "none".to_string()
        } else {
            leaks.join("; ")
        },
        by_second,
        &wrong[..wrong.len().min(10)],
    );
    let out = write_report(&settings, &samples, &summary).expect("writing the soak report");
    eprintln!("{summary}report: {}", out.display());
    // Agents are dropped after the checks: on a failure, their logs are printed.
    assert!(
        tally.sent.load(Relaxed) as f64
            > settings.qps as f64 * settings.duration.as_secs_f64() * 0.5,
        "the sender kept up with less than half the rate: {summary}"
    );
    assert!(wrong.is_empty(), "{summary}");
    assert!(leaks.is_empty(), "{summary}");
}
