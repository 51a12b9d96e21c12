//! Latency at a fixed offered load: an open-loop UDP load generator with a timestamp per
//! query.
//!
//! A sender thread paces queries at the offered rate (sleeping with a 1 ns timer slack;
//! when a sleep overshoots, the queries that fell due are sent back to back, so at high rates
//! they leave in small bursts). Each query's send time is read from `CLOCK_REALTIME` right
//! before its `send()`. A receiver thread reads replies with their kernel receive timestamps
//! (`SO_TIMESTAMPNS`, the same clock), so the latency is send call → reply in the client's
//! socket, without the receiver's own wake-up delay. A reply counts when its ID, rcode and
//! answer count are what the query must get; a query without a valid reply within 1 s is lost.
//! After the run (outside the timed part) every such reply is parsed (hickory-proto) and held
//! to the exact answer: the question asked, and for an A query the one expected address; one
//! that differs counts as wrong.
//! Rates above 60k/s would reuse DNS IDs within that second, so they are refused.

use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::bail;
use hickory_proto::{
    op::Message,
    rr::{RData, RecordType},
};

use super::workload::{Expect, QuerySet};
use crate::netns::Netns;

const REPLY_TIMEOUT_NS: u64 = 1_000_000_000;
pub const MAX_RATE: u32 = 60_000;

#[derive(Clone, Debug, Default)]
pub struct LatencyRun {
    pub offered_qps: u32,
    pub sent: u64,
    pub valid: u64,
    /// Replies with the wrong rcode or answer count (SERVFAIL counted apart).
    pub wrong: u64,
    pub servfail: u64,
    /// Latencies of valid replies, ns.
    pub lat_ns: Vec<u64>,
    pub send_secs: f64,
}

impl LatencyRun {
    pub fn merge(&mut self, other: LatencyRun) {
        self.offered_qps = other.offered_qps;
        self.sent += other.sent;
        self.valid += other.valid;
        self.wrong += other.wrong;
        self.servfail += other.servfail;
        self.lat_ns.extend(other.lat_ns);
        // Kept sorted, for the percentiles.
        self.lat_ns.sort_unstable();
        self.send_secs += other.send_secs;
    }

    pub fn loss(&self) -> f64 {
        if self.sent == 0 {
            return 1.0;
        }
        1.0 - self.valid as f64 / self.sent as f64
    }

    /// Percentile `p` (0..1) of the valid replies' latency, µs (of a merged, sorted run).
    pub fn pct_us(&self, p: f64) -> Option<f64> {
        if self.lat_ns.is_empty() {
            return None;
        }
        let i = ((self.lat_ns.len() as f64 * p).ceil() as usize).clamp(1, self.lat_ns.len()) - 1;
        Some(self.lat_ns[i] as f64 / 1000.0)
    }

    pub fn achieved_qps(&self) -> f64 {
        self.sent as f64 / self.send_secs.max(1e-9)
    }
}

/// A query in wire format (RD, no EDNS), ID zero.
fn encode(name: &str) -> Vec<u8> {
    let mut m = vec![0, 0, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.extend_from_slice(&[0, 0, 1, 0, 1]);
    m
}

fn realtime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn setsockopt_int(fd: i32, level: i32, opt: i32, v: i32) -> anyhow::Result<()> {
    // SAFETY: a valid socket and an int option.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const i32).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    if rc != 0 {
        bail!("setsockopt {opt}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// One reply and its kernel receive time; `None` on timeout.
fn recv_timestamped(fd: i32, buf: &mut [u8]) -> Option<(usize, u64)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 16];
    // SAFETY: a zeroed msghdr is valid; fields set below point at live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: msg points at valid buffers for the duration of the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return None;
    }
    let mut rx = 0;
    // SAFETY: walking the control buffer the kernel filled, with the libc macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::timespec);
                rx = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if rx == 0 {
        rx = realtime_ns();
    }
    Some((n as usize, rx))
}

/// The reply asks `name` A and answers as `expect` says: NOERROR with exactly that address,
/// or NXDOMAIN with no answer.
fn exact(reply: &[u8], name: &str, expect: Expect) -> bool {
    let Ok(m) = Message::from_vec(reply) else {
        return false;
    };
    let asked = m.queries.len() == 1
        && m.queries[0].query_type() == RecordType::A
        && m.queries[0]
            .name()
            .to_ascii()
            .trim_end_matches('.')
            .eq_ignore_ascii_case(name);
    let addresses: Vec<std::net::Ipv4Addr> = m
        .answers
        .iter()
        .filter_map(|rr| match &rr.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    asked
        && match expect {
            Expect::A(ip) => m.metadata.response_code.low() == 0 && addresses == [ip],
            Expect::Nxdomain => m.metadata.response_code.low() == 3 && m.answers.is_empty(),
        }
}

/// Sends `set` round and round to `server` from the pod's namespace at `rate` queries per
/// second for `duration`, and waits up to 1 s for the last replies. `echo`: the server is the
/// reflector, whose valid reply is the query itself with QR set.
pub fn run(
    pod: &Netns,
    server: SocketAddr,
    set: &QuerySet,
    rate: u32,
    duration: Duration,
    echo: bool,
) -> anyhow::Result<LatencyRun> {
    if rate == 0 || rate > MAX_RATE {
        bail!("offered load {rate}/s is outside 1..={MAX_RATE}");
    }
    let sock = pod.enter(|| UdpSocket::bind("0.0.0.0:0"))??;
    sock.connect(server)?;
    let fd = sock.as_raw_fd();
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1)?;
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, 4 << 20)?;
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, 4 << 20)?;
    sock.set_read_timeout(Some(Duration::from_millis(20)))?;
    let sock = Arc::new(sock);

    let total = (rate as u64 * duration.as_millis() as u64 / 1000).max(1) as usize;
    let wires: Vec<Vec<u8>> = set.queries.iter().map(|q| encode(&q.name)).collect();
    let expect_rcode = set.rcode();
    let expect_answer = matches!(set.queries[0].expect, Expect::A(_));

    let send_ns: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let seq_of_id: Arc<Vec<AtomicU32>> =
        Arc::new((0..65536).map(|_| AtomicU32::new(u32::MAX)).collect());
    let answered: Arc<Vec<AtomicBool>> =
        Arc::new((0..total).map(|_| AtomicBool::new(false)).collect());
    let sending_done = Arc::new(AtomicBool::new(false));
    let last_send = Arc::new(AtomicU64::new(u64::MAX));

    let receiver = {
        let sock = sock.clone();
        let send_ns = send_ns.clone();
        let seq_of_id = seq_of_id.clone();
        let answered = answered.clone();
        let sending_done = sending_done.clone();
        let last_send = last_send.clone();
        std::thread::spawn(move || {
            let mut out = LatencyRun::default();
            let mut buf = [0u8; 1500];
            let mut valid_count = 0usize;
            // Replies that looked valid, for the exact check after the run: (query sequence
            // number, latency, range in `arena`).
            let mut kept: Vec<(usize, u64, std::ops::Range<usize>)> = Vec::new();
            let mut arena: Vec<u8> = Vec::new();
            loop {
                if sending_done.load(Ordering::Acquire) {
                    let all = valid_count >= total;
                    let waited = realtime_ns().saturating_sub(last_send.load(Ordering::Acquire));
                    if all || waited > REPLY_TIMEOUT_NS {
                        break;
                    }
                }
                let Some((n, rx)) = recv_timestamped(sock.as_raw_fd(), &mut buf) else {
                    continue;
                };
                if n < 12 {
                    continue;
                }
                let id = u16::from_be_bytes([buf[0], buf[1]]) as usize;
                let seq = seq_of_id[id].load(Ordering::Acquire);
                if seq == u32::MAX {
                    continue;
                }
                let seq = seq as usize;
                let sent_at = send_ns[seq].load(Ordering::Acquire);
                if rx < sent_at || rx - sent_at > REPLY_TIMEOUT_NS {
                    continue;
                }
                if answered[seq].swap(true, Ordering::AcqRel) {
                    continue;
                }
                let qr = buf[2] & 0x80 != 0;
                let rcode = buf[3] & 0x0f;
                let ancount = u16::from_be_bytes([buf[6], buf[7]]);
                let ok = if echo {
                    qr && rcode == 0
                } else {
                    qr && rcode == expect_rcode && (ancount > 0) == expect_answer
                };
                if ok {
                    valid_count += 1;
                    let start = arena.len();
                    arena.extend_from_slice(&buf[..n]);
                    kept.push((seq, rx - sent_at, start..arena.len()));
                } else if rcode == 2 {
                    out.servfail += 1;
                } else {
                    out.wrong += 1;
                }
            }
            (out, kept, arena)
        })
    };

    // Sender, on this thread.
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer; it only affects this thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64) };
    let mut msg = Vec::with_capacity(512);
    let start = Instant::now();
    let interval_ns = 1_000_000_000f64 / rate as f64;
    let mut send_errors = 0u64;
    for seq in 0..total {
        let due = Duration::from_nanos((seq as f64 * interval_ns) as u64);
        let now = start.elapsed();
        if due > now {
            std::thread::sleep(due - now);
        }
        let id = (seq % 65536) as u16;
        msg.clear();
        msg.extend_from_slice(&wires[seq % wires.len()]);
        msg[0..2].copy_from_slice(&id.to_be_bytes());
        seq_of_id[id as usize].store(seq as u32, Ordering::Release);
        send_ns[seq].store(realtime_ns(), Ordering::Release);
        if sock.send(&msg).is_err() {
            send_errors += 1;
        }
    }
    let send_secs = start.elapsed().as_secs_f64();
    last_send.store(realtime_ns(), Ordering::Release);
    sending_done.store(true, Ordering::Release);
    let (mut out, kept, arena) = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver thread panicked"))?;
    for (seq, lat, range) in kept {
        let query = &set.queries[seq % set.queries.len()];
        if echo || exact(&arena[range], &query.name, query.expect) {
            out.valid += 1;
            out.lat_ns.push(lat);
        } else {
            out.wrong += 1;
        }
    }
    out.offered_qps = rate;
    out.sent = total as u64;
    out.send_secs = send_secs;
    if send_errors > 0 {
        eprintln!("  ({send_errors} sends failed; counted as lost)");
    }
    Ok(out)
}
