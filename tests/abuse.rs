//! Abuse from a pod, through the real path: the agent process in the node's namespace, the XDP
//! program on the pod's veth, a pod that holds thousands of TCP connections open or trickles
//! them, floods the agent with unique or slow names, sends faster than its rate, or sends
//! random bytes. Each time the agent keeps answering everyone else, on every path, within
//! bounded memory, and counts what it turned away.
//!
//! Every load loop is bounded in count and in time. Needs root (`cargo xtask test` runs it).

mod support;

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    sync::Arc,
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, ResponseCode},
    rr::{RData, Record, RecordType, rdata::A},
};
use support::{
    Agent, Client, LISTEN_V4, LISTEN_V6, Netns, Topology, UPSTREAM_V4, answers,
    cluster_gen::Rng,
    query_message,
    upstream::{Action, Behaviour, Upstream, example_zone, reply_to},
    wait::eventually,
};

// ---------------------------------------------------------------------------------------------
// Helpers.

/// A field of /proc/<pid>/status, in KiB.
fn status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .expect("a number of kB")
}

fn rss_kib(agent: &Agent) -> u64 {
    status_kib(agent.pid(), "VmRSS:")
}

/// Starts the agent's peak RSS (VmHWM) again from its RSS now.
fn reset_peak(agent: &Agent) {
    std::fs::write(format!("/proc/{}/clear_refs", agent.pid()), "5").expect("clear_refs");
}

fn open_files(agent: &Agent) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", agent.pid()))
        .expect("agent fds")
        .count()
}

/// Lets this test process hold `n` sockets (its soft limit raised to the hard one).
fn allow_open_files(n: u64) {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) };
    assert!(
        l.rlim_max >= n,
        "this test holds {n} sockets and the hard limit of open files is {}: raise it \
         (`ulimit -Hn`, LimitNOFILE=)",
        l.rlim_max
    );
    l.rlim_cur = l.rlim_max;
    // SAFETY: as above; raising the soft limit up to the hard one is always allowed.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) };
}

/// An upstream that answers every A question with 203.0.113.1, TTL 300: every answer cached.
fn answers_everything() -> Behaviour {
    Arc::new(|q: &Message| {
        let mut r = reply_to(q);
        r.add_answer(Record::from_rdata(
            q.queries[0].name().clone(),
            300,
            RData::A(A::new(203, 0, 113, 1)),
        ));
        Action::Reply(r)
    })
}

/// Puts more addresses on the pod's interface: other pods, as the node sees them.
fn pod_addrs(topo: &Topology, addrs: impl IntoIterator<Item = Ipv4Addr>) {
    for a in addrs {
        topo.pod
            .ip(&["addr", "add", &format!("{a}/24"), "dev", &topo.pod_if]);
    }
}

/// A UDP socket in the pod bound to `src`.
fn udp_from(ns: &Netns, src: Ipv4Addr) -> UdpSocket {
    let s = ns.enter(move || UdpSocket::bind((src, 0)).expect("bind in the pod"));
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s
}

/// A TCP connection from `src` in `ns` (None if the connect failed or timed out).
fn tcp_from(src: Ipv4Addr, dst: SocketAddr, timeout: Duration) -> Option<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    s.bind(&SocketAddr::new(IpAddr::V4(src), 0).into()).ok()?;
    s.connect_timeout(&dst.into(), timeout).ok()?;
    Some(s.into())
}

/// One DNS exchange over an open TCP connection.
fn tcp_exchange(s: &mut TcpStream, q: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(q);
    s.write_all(&framed)?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

/// Asks `name` A over a new TCP connection from `src`, as a client that retries on a fresh
/// connection when one is closed under it (RFC 7766 §6.2.3) would: the answer, and how long it
/// took.
fn tcp_query_from(ns: &Netns, src: Ipv4Addr, name: &str) -> (Message, Duration) {
    let q = query_message(name, RecordType::A, false).to_vec().unwrap();
    let name = name.to_string();
    ns.enter(move || {
        let started = Instant::now();
        let server = SocketAddr::new(IpAddr::V4(LISTEN_V4), 53);
        let mut last = String::new();
        for _ in 0..3 {
            let Some(mut s) = tcp_from(src, server, Duration::from_secs(3)) else {
                last = "connect failed".into();
                continue;
            };
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            match tcp_exchange(&mut s, &q) {
                Ok(r) => {
                    return (
                        Message::from_vec(&r).expect("reply parses"),
                        started.elapsed(),
                    );
                }
                Err(e) => last = e.to_string(),
            }
        }
        panic!("{name} over TCP from {src}: no answer in 3 tries ({last})");
    })
}

/// The names every check asks: one per path.
const KERNEL_NAME: &str = "web.shop.svc.cluster.local.";
const KERNEL_ANSWER: &str = "A 10.96.10.20";
/// Synthesised per query by the agent: userspace, never the kernel.
const USERSPACE_NAME: &str = "10-1-2-3.shop.pod.cluster.local.";
const USERSPACE_ANSWER: &str = "A 10.1.2.3";
/// Forwarded to `example_zone()`.
const FORWARDED_NAME: &str = "www.example.";
const FORWARDED_ANSWER: &str = "A 203.0.113.2";

/// Every path answers, correctly, a client that did nothing wrong: the kernel (its counter
/// moves), userspace from the zone, forwarded names, and TCP.
fn every_path_answers(agent: &Agent, client: &Client, what: &str) {
    let kernel = agent.kernel_answered();
    let m = client.query(KERNEL_NAME, RecordType::A, true);
    assert_eq!(answers(&m), [KERNEL_ANSWER], "{what}: kernel path");
    assert_eq!(
        agent.kernel_answered(),
        kernel + 1,
        "{what}: the kernel answered it"
    );
    let m = client.query(USERSPACE_NAME, RecordType::A, true);
    assert_eq!(answers(&m), [USERSPACE_ANSWER], "{what}: userspace zone");
    let m = client.query(FORWARDED_NAME, RecordType::A, true);
    assert_eq!(answers(&m), [FORWARDED_ANSWER], "{what}: forwarded");
    let q = query_message(USERSPACE_NAME, RecordType::A, false)
        .to_vec()
        .unwrap();
    let m = Message::from_vec(&client.query_tcp(&q)).expect("TCP reply parses");
    assert_eq!(answers(&m), [USERSPACE_ANSWER], "{what}: TCP");
}

// ---------------------------------------------------------------------------------------------
// TCP connections.

/// Forty pods (addresses) open fifty connections each, 2,000 in all: half of them idle, half
/// starting a query they never finish (a length prefix announcing 64 KiB, two bytes of it).
/// The agent keeps at most `--tcp-max-connections`, closing the heaviest clients'
/// longest-waiting connections to make room; another pod's connection, kept open and asked on
/// every 20 ms, is never the one closed, and its new TCP and UDP queries are answered at once
/// throughout. Idle and stalled connections are closed after `--tcp-idle-timeout`.
#[test]
fn thousands_of_idle_and_slow_tcp_connections_do_not_stop_answers() {
    const PODS: u8 = 40;
    const PER_POD: usize = 50;
    const MAX: usize = 256;
    const PER_CLIENT: usize = 32;
    allow_open_files(4096);
    let topo = Topology::new();
    let _upstream = Upstream::start(&topo.node, (UPSTREAM_V4, 53).into(), example_zone());
    let agent = Agent::start(
        &topo,
        &support::example_cluster(),
        &[
            "--tcp-max-connections",
            &MAX.to_string(),
            "--tcp-max-connections-per-client",
            &PER_CLIENT.to_string(),
            "--tcp-idle-timeout",
            "3s",
        ],
    );
    let attackers: Vec<Ipv4Addr> = (0..PODS)
        .map(|i| Ipv4Addr::new(192, 0, 2, 100 + i))
        .collect();
    let victim = Ipv4Addr::new(192, 0, 2, 200);
    pod_addrs(&topo, attackers.iter().copied().chain([victim]));
    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));
    let rss_before = rss_kib(&agent);
    let files_before = open_files(&agent);

    // Another pod keeps one connection and asks on it every 20 ms throughout: holding one
    // connection, it is never the one closed to make room.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let steady = {
        let stop = stop.clone();
        let ns = Netns::existing(&topo.pod.name);
        std::thread::spawn(move || {
            ns.enter(move || {
                let server = SocketAddr::new(IpAddr::V4(LISTEN_V4), 53);
                let mut s = tcp_from(victim, server, Duration::from_secs(3)).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                let q = query_message(USERSPACE_NAME, RecordType::A, false)
                    .to_vec()
                    .unwrap();
                let deadline = Instant::now() + Duration::from_secs(90);
                let mut asked = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline
                {
                    let r = tcp_exchange(&mut s, &q)
                        .unwrap_or_else(|e| panic!("query {asked} on the kept connection: {e}"));
                    let m = Message::from_vec(&r).unwrap();
                    assert_eq!(answers(&m), [USERSPACE_ANSWER]);
                    asked += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                asked
            })
        })
    };

    // Open them all (bounded: 60 s), keeping every socket.
    let list = attackers.clone();
    let mut held: Vec<TcpStream> = topo.pod.enter(move || {
        let server = SocketAddr::new(IpAddr::V4(LISTEN_V4), 53);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut held = Vec::new();
        'all: for i in 0..PER_POD {
            for (p, src) in list.iter().enumerate() {
                if Instant::now() > deadline {
                    break 'all;
                }
                let Some(mut s) = tcp_from(*src, server, Duration::from_secs(2)) else {
                    continue;
                };
                if (i + p) % 2 == 1 {
                    // Slow: announces the largest message, sends two bytes of it.
                    let _ = s.write_all(&[0xff, 0xff, 0x12, 0x34]);
                }
                held.push(s);
            }
        }
        held
    });
    eprintln!("{} connections opened", held.len());
    assert!(
        held.len() >= PODS as usize * PER_POD * 9 / 10,
        "only {} of {} connections opened",
        held.len(),
        PODS as usize * PER_POD
    );

    // Meanwhile another pod is answered, over TCP and UDP, promptly.
    for _ in 0..10 {
        let (m, took) = tcp_query_from(&topo.pod, victim, USERSPACE_NAME);
        assert_eq!(answers(&m), [USERSPACE_ANSWER]);
        assert!(took < Duration::from_secs(2), "a TCP answer took {took:?}");
    }
    every_path_answers(&agent, &client, "with 2,000 connections held");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let asked = steady
        .join()
        .expect("the kept connection answered every query");
    assert!(asked >= 5, "{asked} queries on the kept connection");

    let open = agent.metric("xdns_tcp_connections");
    let evicted = agent.metric("xdns_tcp_closed_connections_total{reason=\"evicted\"}");
    let files = open_files(&agent);
    let rss = rss_kib(&agent);
    eprintln!(
        "open {open}, evicted {evicted}, files {files_before} -> {files}, RSS {rss_before} -> {rss} KiB"
    );
    assert!(
        open <= MAX as f64,
        "{open} connections open, --tcp-max-connections {MAX}"
    );
    assert!(
        evicted >= (held.len() - MAX) as f64,
        "{evicted} evicted of {} opened",
        held.len()
    );
    assert!(
        files <= files_before + MAX + 16,
        "{files} files open (before: {files_before}): a socket per connection beyond the limit"
    );
    // A message announced as 64 KiB is not allocated before it arrives: 256 connections that
    // announce one hold no 16 MiB.
    assert!(
        rss < rss_before + 8 * 1024,
        "RSS grew from {rss_before} to {rss} KiB"
    );

    // Past the idle timeout every one of them is closed: the idle ones as idle, the slow
    // ones as stalled in the middle of a message.
    eventually(
        "the held connections closed after --tcp-idle-timeout",
        Duration::from_secs(15),
        || (agent.metric("xdns_tcp_connections") == 0.0).then_some(()),
    );
    let idle = agent.metric("xdns_tcp_closed_connections_total{reason=\"idle\"}");
    let stalled = agent.metric("xdns_tcp_closed_connections_total{reason=\"stalled\"}");
    assert!(
        idle > 0.0 && stalled > 0.0,
        "idle {idle}, stalled {stalled}"
    );
    // And the client side sees it: a held connection reads the end of the stream.
    let mut buf = [0u8; 16];
    let s = held.last_mut().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert!(
        matches!(s.read(&mut buf), Ok(0) | Err(_)),
        "a held connection is closed"
    );
    every_path_answers(&agent, &client, "after the idle timeout");
}

/// One client alone: beyond `--tcp-max-connections-per-client` its own longest-waiting
/// connection is closed for its new one, and while every one of its connections is busy with
/// a query, a new one is closed at once and counted.
#[test]
fn one_client_cannot_hold_more_than_its_share() {
    allow_open_files(1024);
    let topo = Topology::new();
    let agent = Agent::start(
        &topo,
        &support::example_cluster(),
        &["--tcp-max-connections-per-client", "8"],
    );
    let src = Ipv4Addr::new(192, 0, 2, 2);
    let server = SocketAddr::new(IpAddr::V4(LISTEN_V4), 53);
    let mut held: Vec<TcpStream> = topo.pod.enter(move || {
        (0..20)
            .filter_map(|_| tcp_from(src, server, Duration::from_secs(2)))
            .collect()
    });
    assert_eq!(held.len(), 20);
    eventually("8 connections left open", Duration::from_secs(5), || {
        (agent.metric("xdns_tcp_connections") == 8.0).then_some(())
    });
    assert_eq!(
        agent.metric("xdns_tcp_closed_connections_total{reason=\"evicted\"}"),
        12.0
    );
    // The newest eight serve queries; the oldest twelve were closed.
    let q = query_message(USERSPACE_NAME, RecordType::A, false)
        .to_vec()
        .unwrap();
    for (i, s) in held.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let r = tcp_exchange(s, &q);
        if i < 12 {
            assert!(r.is_err(), "connection {i} was closed");
        } else {
            let m = Message::from_vec(&r.expect("an answer")).unwrap();
            assert_eq!(answers(&m), [USERSPACE_ANSWER], "connection {i}");
        }
    }
    assert_eq!(
        agent.metric("xdns_tcp_refused_connections_total{limit=\"per_client\"}"),
        0.0
    );
}

/// Out of file descriptors (EMFILE, here by lowering the running agent's limit), `accept`
/// fails: the agent goes on serving UDP, and TCP once descriptors are free again. (It used to
/// end the TCP task, and with it the agent.)
#[test]
fn running_out_of_file_descriptors_does_not_stop_the_agent() {
    let topo = Topology::new();
    let _upstream = Upstream::start(&topo.node, (UPSTREAM_V4, 53).into(), example_zone());
    let agent = Agent::start(&topo, &support::example_cluster(), &[]);
    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));
    let pid = agent.pid() as libc::pid_t;
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit on our own child, with valid rlimit structs.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let rc = unsafe {
        libc::prlimit(
            pid,
            libc::RLIMIT_NOFILE,
            &libc::rlimit {
                rlim_cur: open_files(&agent) as u64 + 2,
                rlim_max: old.rlim_max,
            },
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());

    let src = Ipv4Addr::new(192, 0, 2, 2);
    let server = SocketAddr::new(IpAddr::V4(LISTEN_V4), 53);
    let mut held: Vec<TcpStream> = topo.pod.enter(move || {
        (0..20)
            .filter_map(|_| tcp_from(src, server, Duration::from_secs(2)))
            .collect()
    });
    std::thread::sleep(Duration::from_millis(500));
    eventually(
        "the agent reports accept failing",
        Duration::from_secs(5),
        || {
            agent
                .log()
                .contains("accepting a DNS over TCP connection failed")
                .then_some(())
        },
    );
    // UDP from the zone needs no descriptor: still answered, by the kernel and by userspace.
    let m = client.query(KERNEL_NAME, RecordType::A, true);
    assert_eq!(answers(&m), [KERNEL_ANSWER]);
    let m = client.query(USERSPACE_NAME, RecordType::A, true);
    assert_eq!(answers(&m), [USERSPACE_ANSWER]);

    // SAFETY: as above.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &old, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    // The connections waiting in the backlog are served now.
    let q = query_message(USERSPACE_NAME, RecordType::A, false)
        .to_vec()
        .unwrap();
    let s = held.last_mut().expect("connections made");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let m = Message::from_vec(&tcp_exchange(s, &q).expect("answered once files are free")).unwrap();
    assert_eq!(answers(&m), [USERSPACE_ANSWER]);
    every_path_answers(&agent, &client, "after running out of files");
}

// ---------------------------------------------------------------------------------------------
// Floods of names.

/// Sends `count` queries for `n<i>.<suffix>` (A), at most `window` unanswered at once, from
/// `ns`; bounded by `limit`. Returns how many were answered.
fn flood_unique(ns: &Netns, suffix: &str, count: usize, window: usize, limit: Duration) -> usize {
    let suffix = suffix.to_string();
    ns.enter(move || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let server = SocketAddr::new(IpAddr::V4(LISTEN_V4), 53);
        let started = Instant::now();
        let (mut sent, mut done, mut answered) = (0usize, 0usize, 0usize);
        let mut buf = [0u8; 1500];
        while done < count && started.elapsed() < limit {
            while sent < count && sent - done < window {
                let q = query_message(&format!("n{sent}.{suffix}"), RecordType::A, false)
                    .to_vec()
                    .unwrap();
                sock.send_to(&q, server).unwrap();
                sent += 1;
            }
            match sock.recv_from(&mut buf) {
                Ok(_) => {
                    done += 1;
                    answered += 1;
                }
                // Lost (the socket's queue overflowed): count the window as done.
                Err(_) => done = sent,
            }
        }
        answered
    })
}

/// 200,000 unique external names against a cache of 10,000: the cache holds 10,000, the
/// agent's memory levels off (the second 90,000 names add next to nothing, where keeping them
/// would take 30 MiB at the cache's 360 bytes an entry) and stays within a bound set by the
/// cache's size, and the agent answers throughout.
///
/// The bound: 4 KiB of resident memory per cache entry (the cache's structures hold 360 bytes
/// per entry with a small answer, `server::cache::memory`; under a flood the allocator leaves
/// the rest of a resident 2 to 2.6 KiB between entries) and 32 MiB for everything else a flood
/// of forwarded queries grows (27 MiB measured with a cache of one entry).
#[test]
fn a_flood_of_unique_names_keeps_memory_within_the_cache_size() {
    const CACHE: usize = 10_000;
    // Queries outstanding at once: well within what the agent's socket queues (about 270
    // datagrams in the default 208 KiB), so none is lost to a full queue.
    const WINDOW: usize = 128;
    let topo = Topology::new();
    let _upstream = Upstream::start(&topo.node, (UPSTREAM_V4, 53).into(), answers_everything());
    let agent = Agent::start(
        &topo,
        &support::example_cluster(),
        &["--cache-size", &CACHE.to_string()],
    );
    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));
    let limit = Duration::from_secs(90);
    let start = rss_kib(&agent);
    let mut answered = flood_unique(&topo.pod, "warm.flood.example.", 2 * CACHE, WINDOW, limit);
    let full = rss_kib(&agent);
    assert_eq!(
        agent.metric("coredns_cache_entries{type=\"success\"}"),
        CACHE as f64,
        "the cache is full"
    );
    let mut rss = Vec::new();
    for round in 0..2 {
        answered += flood_unique(
            &topo.pod,
            &format!("r{round}.flood.example."),
            90_000,
            WINDOW,
            limit,
        );
        rss.push(rss_kib(&agent));
        let m = client.query(USERSPACE_NAME, RecordType::A, true);
        assert_eq!(answers(&m), [USERSPACE_ANSWER], "during the flood");
    }
    let (mid, after) = (rss[0], rss[1]);
    let evictions = agent.metric("coredns_cache_evictions_total{type=\"success\"}");
    eprintln!(
        "RSS: {start} KiB at start, {full} KiB with the cache full, {mid} KiB after 110,000 \
         names, {after} KiB after {answered} answered; {evictions} evictions"
    );
    assert!(
        answered > 190_000,
        "only {answered} of 200,000 names answered"
    );
    assert_eq!(
        agent.metric("coredns_cache_entries{type=\"success\"}"),
        CACHE as f64
    );
    assert!(evictions >= (answered - CACHE) as f64 * 0.9, "{evictions}");
    assert!(
        after <= mid + 8 * 1024,
        "RSS grew from {mid} to {after} KiB over the last 90,000 names: memory follows the \
         names asked, not the cache's size"
    );
    let bound = start + CACHE as u64 * 4 + 32 * 1024;
    assert!(after <= bound, "RSS {after} KiB, bound {bound} KiB");
    every_path_answers_without_upstream_change(&agent, &client);
}

/// The checks of [`every_path_answers`] that need no particular upstream: kernel and zone.
fn every_path_answers_without_upstream_change(agent: &Agent, client: &Client) {
    let kernel = agent.kernel_answered();
    let m = client.query(KERNEL_NAME, RecordType::A, true);
    assert_eq!(answers(&m), [KERNEL_ANSWER]);
    assert_eq!(agent.kernel_answered(), kernel + 1);
    let m = ask_as_a_resolver(client, USERSPACE_NAME);
    assert_eq!(answers(&m), [USERSPACE_ANSWER]);
}

/// Asks as a stub resolver does: again when no answer comes (a flood leaves a backlog in the
/// agent's socket, and a query sent into a full buffer is lost — the kernel drops it, not the
/// agent); five tries of 3 s.
fn ask_as_a_resolver(client: &Client, name: &str) -> hickory_proto::op::Message {
    for _ in 0..5 {
        let q = query_message(name, RecordType::A, true);
        if let Some(reply) = client.exchange_raw(&q.to_vec().unwrap()) {
            let m = hickory_proto::op::Message::from_vec(&reply).expect("a reply");
            if m.metadata.id == q.metadata.id {
                return m;
            }
        }
    }
    panic!("no answer to {name} in five tries");
}

/// A pod asks one name whose upstream never answers, as fast as it can: every query waits for
/// the same upstream query, and each waiting one costs memory. At most `--max-pending` wait;
/// the rest get REFUSED at once (counted), and the agent's memory stays bounded. Before the
/// limit, 130,000 queries in 1.5 s grew the agent by 110 MiB (about 1.7 KiB a waiting query).
#[test]
fn queries_waiting_for_a_dead_upstream_are_bounded() {
    const PENDING: usize = 2000;
    let topo = Topology::new();
    let _upstream = Upstream::start(
        &topo.node,
        (UPSTREAM_V4, 53).into(),
        Arc::new(|_| Action::Drop),
    );
    let agent = Agent::start(
        &topo,
        &support::example_cluster(),
        &[
            "--max-pending",
            &PENDING.to_string(),
            "--max-concurrent",
            "100",
        ],
    );
    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));
    // As fast as the pod can send, for 1.5 s: first a name of the zone (the agent's threads
    // and allocator at their working size), then the dead one.
    let blast = |name: &'static str| {
        topo.pod.enter(move || {
            let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
            sock.set_nonblocking(true).unwrap();
            let server = SocketAddr::new(IpAddr::V4(LISTEN_V4), 53);
            let q = query_message(name, RecordType::A, false).to_vec().unwrap();
            let started = Instant::now();
            let (mut sent, mut refused) = (0u64, 0u64);
            let mut buf = [0u8; 512];
            while started.elapsed() < Duration::from_millis(1500) && sent < 300_000 {
                for _ in 0..100 {
                    if sock.send_to(&q, server).is_ok() {
                        sent += 1;
                    }
                }
                while let Ok((n, _)) = sock.recv_from(&mut buf) {
                    if n >= 4 && buf[3] & 0xf == 5 {
                        refused += 1;
                    }
                }
            }
            (sent, refused)
        })
    };
    blast(USERSPACE_NAME);
    std::thread::sleep(Duration::from_millis(500));
    reset_peak(&agent);
    let before = rss_kib(&agent);
    let (sent, refused) = blast("slow.example.");
    let peak = status_kib(agent.pid(), "VmHWM:");
    let counted = agent.metric("xdns_refused_queries_total{limit=\"pending\"}");
    eprintln!(
        "{sent} queries sent, {refused} REFUSED seen ({counted} counted); RSS {before} KiB, peak {peak} KiB"
    );
    assert!(counted > 0.0, "the limit was reached");
    assert!(refused > 0, "REFUSED reached the client");
    // 2,000 waiting queries at under 2 KiB each (1.7 KiB measured), with room for the
    // allocator: 8 MiB. Without the limit, the same flood took 110 MiB.
    assert!(
        peak <= before + 8 * 1024,
        "RSS peaked at {peak} KiB from {before} KiB"
    );
    // Others are answered throughout; once the forward timeout passes, the name is SERVFAIL.
    every_path_answers_without_upstream_change(&agent, &client);
}

// ---------------------------------------------------------------------------------------------
// The per-client rate.

/// With `--rate-limit 50`, a pod sending 500 queries as fast as it gets replies gets its
/// burst and its rate answered and REFUSED for the rest (counted); another pod is answered in full meanwhile; the
/// kernel still answers the first pod (its queries never reach the agent); a quiet second
/// later it is answered again.
#[test]
fn a_client_over_its_rate_is_refused_and_others_are_not() {
    let topo = Topology::new();
    let agent = Agent::start(
        &topo,
        &support::example_cluster(),
        &["--rate-limit", "50", "--rate-limit-burst", "50"],
    );
    let other = Ipv4Addr::new(192, 0, 2, 3);
    pod_addrs(&topo, [other]);
    let noisy = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));
    let q = |name: &str| query_message(name, RecordType::A, false).to_vec().unwrap();

    let started = Instant::now();
    let (mut ok, mut refused) = (0u32, 0u32);
    for _ in 0..500 {
        let r = noisy.exchange_raw(&q(USERSPACE_NAME)).expect("a reply");
        let m = Message::from_vec(&r).expect("reply parses");
        match m.metadata.response_code {
            ResponseCode::NoError if answers(&m) == [USERSPACE_ANSWER] => ok += 1,
            ResponseCode::Refused => {
                assert_eq!(m.queries.len(), 1, "REFUSED echoes the question");
                refused += 1
            }
            other => panic!("unexpected {other:?} {:?}", answers(&m)),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!("{ok} answered, {refused} refused in {elapsed:.2} s");
    assert!(ok >= 50, "the burst is answered: {ok}");
    assert!(
        f64::from(ok) <= 50.0 + 50.0 * elapsed + 1.0,
        "{ok} answered in {elapsed:.2} s at 50/s after a burst of 50"
    );
    assert_eq!(
        agent.metric("xdns_refused_queries_total{limit=\"rate\"}"),
        f64::from(refused)
    );

    // Another pod, right now: every query answered.
    let sock = udp_from(&topo.pod, other);
    let server = SocketAddr::new(IpAddr::V4(LISTEN_V4), 53);
    let mut buf = [0u8; 512];
    for _ in 0..40 {
        sock.send_to(&q(USERSPACE_NAME), server).unwrap();
        let (n, _) = sock.recv_from(&mut buf).expect("a reply");
        let m = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(
            answers(&m),
            [USERSPACE_ANSWER],
            "the other pod is not limited"
        );
    }

    // The noisy pod's cluster names are the kernel's: answered, over its rate or not.
    let kernel = agent.kernel_answered();
    for _ in 0..100 {
        let m = noisy.query(KERNEL_NAME, RecordType::A, false);
        assert_eq!(answers(&m), [KERNEL_ANSWER]);
    }
    assert_eq!(agent.kernel_answered(), kernel + 100);

    // Quiet for a second: answered again.
    std::thread::sleep(Duration::from_millis(1100));
    let m = noisy.query(USERSPACE_NAME, RecordType::A, false);
    assert_eq!(answers(&m), [USERSPACE_ANSWER]);
}

// ---------------------------------------------------------------------------------------------
// Random bytes.

/// An intercepted address (the kube-dns cluster IP of intercept mode).
const KUBE_DNS: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);

/// Random bytes, and valid queries with random bytes changed, cut or appended.
fn random_datagram(rng: &mut Rng, valid: &[Vec<u8>]) -> Vec<u8> {
    match rng.below(4) {
        0 => (0..rng.below(600)).map(|_| rng.next() as u8).collect(),
        1 => {
            // A plausible header (a query, one question), then noise.
            let mut m = vec![
                rng.next() as u8,
                rng.next() as u8,
                0x01,
                0x00,
                0,
                1,
                0,
                0,
                0,
                0,
            ];
            m.extend([0, rng.below(2) as u8]);
            m.extend((0..rng.below(300)).map(|_| rng.next() as u8));
            m
        }
        _ => {
            let mut m = valid[rng.below(valid.len() as u64) as usize].clone();
            for _ in 0..=rng.below(4) {
                let i = rng.below(m.len() as u64) as usize;
                match rng.below(3) {
                    0 => m[i] ^= 1 << rng.below(8),
                    1 => m[i] = rng.next() as u8,
                    _ => m.truncate(i.max(1)),
                }
            }
            if rng.chance(10) {
                m.extend((0..rng.below(40)).map(|_| rng.next() as u8));
            }
            m
        }
    }
}

/// A bounded barrage of random datagrams (to the IPv4 and IPv6 listen addresses and to an
/// intercepted address) and random TCP streams from the pod: every reply it gets is a
/// well-formed response, and afterwards every path answers correctly.
#[test]
fn random_bytes_leave_every_path_answering() {
    let topo = Topology::new();
    topo.pod.ip(&[
        "route",
        "add",
        &format!("{KUBE_DNS}/32"),
        "via",
        "192.0.2.1",
    ]);
    let _upstream = Upstream::start(&topo.node, (UPSTREAM_V4, 53).into(), example_zone());
    let agent = Agent::start(
        &topo,
        &support::example_cluster(),
        &["--intercept", &KUBE_DNS.to_string()],
    );
    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));
    every_path_answers(&agent, &client, "before");
    let valid: Vec<Vec<u8>> = [
        KERNEL_NAME,
        USERSPACE_NAME,
        FORWARDED_NAME,
        "nope.shop.svc.cluster.local.",
        "_http._tcp.web.shop.svc.cluster.local.",
    ]
    .iter()
    .flat_map(|n| [false, true].map(|edns| query_message(n, RecordType::A, edns).to_vec().unwrap()))
    .collect();

    // Datagrams: 30,000 at most, 20 s at most.
    let targets = [
        SocketAddr::new(IpAddr::V4(LISTEN_V4), 53),
        SocketAddr::new(IpAddr::V6(LISTEN_V6), 53),
        SocketAddr::new(IpAddr::V4(KUBE_DNS), 53),
    ];
    let dgrams = valid.clone();
    let (sent, replies, bad) = topo.pod.enter(move || {
        let v4 = UdpSocket::bind("0.0.0.0:0").unwrap();
        let v6 = UdpSocket::bind("[::]:0").unwrap();
        for s in [&v4, &v6] {
            s.set_nonblocking(true).unwrap();
        }
        let mut rng = Rng::new(0xbad_b17e5);
        let started = Instant::now();
        let (mut sent, mut replies) = (0u64, 0u64);
        let mut bad = Vec::new();
        let mut buf = [0u8; 4096];
        while sent < 30_000 && started.elapsed() < Duration::from_secs(20) {
            let to = targets[sent as usize % targets.len()];
            let sock = if to.is_ipv4() { &v4 } else { &v6 };
            let _ = sock.send_to(&random_datagram(&mut rng, &dgrams), to);
            sent += 1;
            if sent % 64 == 0 {
                // Pace it a little: a shared CI machine, and replies to read.
                std::thread::sleep(Duration::from_micros(500));
            }
            for s in [&v4, &v6] {
                while let Ok((n, from)) = s.recv_from(&mut buf) {
                    replies += 1;
                    // Whatever came in, what goes out is a response (QR set), with a header,
                    // from the address that was asked.
                    if n < 12 || buf[2] & 0x80 == 0 || !targets.contains(&from) {
                        bad.push(format!("{from}: {:02x?}", &buf[..n.min(32)]));
                    }
                }
            }
        }
        (sent, replies, bad)
    });
    eprintln!("{sent} random datagrams sent, {replies} replies");
    assert!(sent >= 10_000, "only {sent} datagrams sent");
    assert!(bad.is_empty(), "malformed replies: {bad:?}");

    // TCP streams: 300 connections at most, 20 s at most; random bytes, some after a valid
    // length prefix, some after a whole valid query.
    let streams = valid.clone();
    let (connections, answered) = topo.pod.enter(move || {
        let mut rng = Rng::new(0x7c9_5eed);
        let started = Instant::now();
        let server = SocketAddr::new(IpAddr::V4(LISTEN_V4), 53);
        let (mut connections, mut answered) = (0u32, 0u32);
        while connections < 300 && started.elapsed() < Duration::from_secs(20) {
            let Some(mut s) = tcp_from(Ipv4Addr::new(192, 0, 2, 2), server, Duration::from_secs(2))
            else {
                continue;
            };
            connections += 1;
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let mut bytes = Vec::new();
            match rng.below(3) {
                0 => {}
                1 => {
                    let m = random_datagram(&mut rng, &streams);
                    bytes.extend((m.len() as u16).to_be_bytes());
                    bytes.extend(m);
                }
                _ => {
                    let m = &streams[rng.below(streams.len() as u64) as usize];
                    bytes.extend((m.len() as u16).to_be_bytes());
                    bytes.extend(m);
                }
            }
            bytes.extend((0..rng.below(2048)).map(|_| rng.next() as u8));
            let _ = s.write_all(&bytes);
            let mut buf = [0u8; 1024];
            if matches!(s.read(&mut buf), Ok(n) if n > 0) {
                answered += 1;
            }
        }
        (connections, answered)
    });
    eprintln!("{connections} random TCP streams, {answered} got bytes back");
    assert!(connections >= 100, "only {connections} TCP streams");

    every_path_answers(&agent, &client, "after the barrage");
    // The intercepted address too: the kernel answers it, the agent answers what it steers.
    let intercepted = Client::new(&topo.pod, IpAddr::V4(KUBE_DNS));
    let kernel = agent.kernel_answered();
    let m = intercepted.query(KERNEL_NAME, RecordType::A, true);
    assert_eq!(answers(&m), [KERNEL_ANSWER], "intercepted, kernel");
    assert_eq!(agent.kernel_answered(), kernel + 1);
    let m = intercepted.query(USERSPACE_NAME, RecordType::A, true);
    assert_eq!(
        answers(&m),
        [USERSPACE_ANSWER],
        "intercepted, steered to the agent"
    );
    let m = intercepted.query(FORWARDED_NAME, RecordType::A, true);
    assert_eq!(answers(&m), [FORWARDED_ANSWER], "intercepted, forwarded");
    let c = agent.kernel_counters();
    assert_eq!(c["error_write"], 0, "{c:?}");
    let log = agent.log();
    assert!(!log.contains("panicked"), "{log}");
}
