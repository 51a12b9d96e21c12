//! The throughput load generator: DNS queries injected on the pod side of a veth with
//! `BPF_PROG_TEST_RUN` in live-frames mode (as `xdp-trafficgen` from xdp-tools injects its UDP
//! frames), replies counted by an XDP program on the same interface.
//!
//! kxdpgun, the bench's first generator, runs one thread on a veth and copies every query
//! through an AF_XDP socket in copy mode (a socket buffer per frame): on some machines it sent
//! only 200-300k queries/s, below what the XDP systems answer, so their figures were the
//! generator's. Here the kernel builds the frames itself: each sender thread, pinned to its own
//! CPU, asks `BPF_PROG_TEST_RUN` to run `xdns_gen_query` on a batch of page-pool frames; the
//! program rewrites each into the next query of the set (`GEN_FRAMES`, written here) and
//! returns `XDP_TX`, which live-frames mode turns into a transmit out of the pod-side veth
//! (`ndo_xdp_xmit`: straight into the host side's receive ring, no socket, no copy to or
//! from userspace). `xdns_count_reply` on the pod side counts each reply by rcode and drops
//! it. Both programs are in `dns-ebpf/src/bin/reflector.rs`.
//!
//! What that means for the figures: a veth's receive work runs on the CPU that sent the
//! frame. For the XDP systems the server's whole path (the host side's NAPI poll, the XDP
//! program, the reply, the count) runs in the sender's own softirq, so an overloaded XDP
//! system slows its sender down rather than dropping: a trial that could not send what it
//! offered with no loss is *saturated*, and its answers per second are the figure. Which side
//! set that figure is told apart by the generator's own ceiling, measured in every run on a
//! link whose host side drops every frame in XDP (`xdns_drop`): a figure within 20% of it is
//! the generator's ("≥"), anything below is the system's.
//!
//! The veths get one queue per CPU (like a NIC with RSS): the sender on CPU k fills receive
//! queue k of the host side, so two senders drive two NAPI contexts, not one.

use std::{
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{Array, MapData, PerCpuArray, PerCpuValues},
    programs::{
        ProgramError, TestRun as _, TestRunAttrs, TestRunOptions, Xdp, XdpMode, xdp::XdpLinkId,
    },
};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{Name, RecordType},
};

use super::topo::Link;

/// One `GEN_FRAMES` slot: a 2-byte little-endian length, then the frame (the layout
/// `xdns_gen_query` reads).
pub const SLOT: usize = 256;
pub const MAX_FRAMES: usize = 4096;
/// First UDP source port of the queries; each query of a set has its own, so the 4-tuples
/// spread over the receive queues and `SO_REUSEPORT` sockets of the servers.
const FIRST_PORT: u16 = 20_000;
/// Live-frames mode's batch: frames built, run and flushed to the interface at a time.
const BATCH: u32 = 64;
/// Pacing: a sender makes one `BPF_PROG_TEST_RUN` call per this many nanoseconds, with the
/// frames that fell due. Shorter means smaller bursts, but every call sets up and tears down
/// a page pool (about 15 µs), and a pool whose pages still sit in a socket's queue when the
/// call returns lingers until they are read, each one making the next teardown slower (the
/// kernel walks every registered memory model under one lock): at 40,000 calls a second the
/// machine's workqueues stalled.
const CALL_INTERVAL_NS: f64 = 200_000.0;
/// Most frames in one call: what the generator sends in about a millisecond.
const MAX_CHUNK: u32 = 4096;

/// `BENCH_COUNTS` indices, as in reflector.rs.
mod counter {
    pub const NOERROR_ANSWER: usize = 0;
    pub const NOERROR_EMPTY: usize = 1;
    pub const NXDOMAIN: usize = 2;
    pub const SERVFAIL: usize = 3;
    pub const OTHER: usize = 4;
    pub const SENT: usize = 5;
}

/// Replies by what they said, and queries sent (counted by the programs).
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub noerror_answer: u64,
    pub noerror_empty: u64,
    pub nxdomain: u64,
    pub servfail: u64,
    pub other: u64,
    pub sent: u64,
}

impl Counts {
    pub fn replies(&self) -> u64 {
        self.noerror_answer + self.noerror_empty + self.nxdomain + self.servfail + self.other
    }

    fn minus(&self, before: &Counts) -> Counts {
        Counts {
            noerror_answer: self.noerror_answer - before.noerror_answer,
            noerror_empty: self.noerror_empty - before.noerror_empty,
            nxdomain: self.nxdomain - before.nxdomain,
            servfail: self.servfail - before.servfail,
            other: self.other - before.other,
            sent: self.sent - before.sent,
        }
    }
}

/// The generator's maps, taken out of the reflector object.
pub struct XdpGen {
    frames: Array<MapData, [u8; SLOT]>,
    config: Array<MapData, u32>,
    cursor: PerCpuArray<MapData, u32>,
    counts: PerCpuArray<MapData, u64>,
    /// CPUs the sender threads are pinned to, one thread each.
    pub cpus: Vec<usize>,
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> anyhow::Result<T> {
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the reflector object"))?;
    T::try_from(map).with_context(|| format!("map {name}"))
}

impl XdpGen {
    pub fn new(ebpf: &mut Ebpf, senders: Option<usize>) -> anyhow::Result<Self> {
        let allowed = allowed_cpus()?;
        let n = senders.unwrap_or(allowed.len()).clamp(1, allowed.len());
        Ok(Self {
            frames: take(ebpf, "GEN_FRAMES")?,
            config: take(ebpf, "GEN_CONFIG")?,
            cursor: take(ebpf, "GEN_CURSOR")?,
            counts: take(ebpf, "BENCH_COUNTS")?,
            cpus: allowed[..n].to_vec(),
        })
    }

    /// Makes `frames` the queries the generator sends, in turn, from the first.
    pub fn load(&mut self, frames: &[[u8; SLOT]]) -> anyhow::Result<()> {
        if frames.is_empty() || frames.len() > MAX_FRAMES {
            bail!(
                "{} query frames: the generator takes 1 to {MAX_FRAMES}",
                frames.len()
            );
        }
        for (i, f) in frames.iter().enumerate() {
            self.frames.set(i as u32, f, 0)?;
        }
        self.config.set(0, frames.len() as u32, 0)?;
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        self.cursor
            .set(0, PerCpuValues::try_from(vec![0u32; cpus])?, 0)?;
        Ok(())
    }

    pub fn counts(&self) -> anyhow::Result<Counts> {
        let sum =
            |i: usize| -> anyhow::Result<u64> { Ok(self.counts.get(&(i as u32), 0)?.iter().sum()) };
        Ok(Counts {
            noerror_answer: sum(counter::NOERROR_ANSWER)?,
            noerror_empty: sum(counter::NOERROR_EMPTY)?,
            nxdomain: sum(counter::NXDOMAIN)?,
            servfail: sum(counter::SERVFAIL)?,
            other: sum(counter::OTHER)?,
            sent: sum(counter::SENT)?,
        })
    }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> anyhow::Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the call fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is this thread; the size is the set's.
    if unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
    }
    // SAFETY: CPU_ISSET reads the set filled above.
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect();
    if cpus.is_empty() {
        bail!("no CPU to run the load generator on");
    }
    Ok(cpus)
}

fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed set, one CPU added, applied to this thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "sched_setaffinity to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            );
        }
        // Sleeps end on time (the default slack is 50 µs).
        libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64);
    }
    Ok(())
}

fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for c in chunks {
        for pair in c.chunks(2) {
            let word = if pair.len() == 2 {
                u16::from_be_bytes([pair[0], pair[1]])
            } else {
                u16::from_be_bytes([pair[0], 0])
            };
            sum += word as u32;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One frame per name: an A query (RD, no EDNS, as kxdpgun sent them) from the pod's address
/// on `link` to `server`, each with its own ID and source port, checksums complete.
pub fn query_frames(
    link: &Link,
    server: Ipv4Addr,
    names: &[&str],
) -> anyhow::Result<Vec<[u8; SLOT]>> {
    let mac = |s: &str| -> anyhow::Result<Vec<u8>> {
        s.split(':')
            .map(|h| u8::from_str_radix(h, 16).with_context(|| format!("MAC {s}")))
            .collect()
    };
    let (dst_mac, src_mac) = (mac(&link.host_mac)?, mac(&link.pod_mac)?);
    names
        .iter()
        .enumerate()
        .map(|(k, name)| {
            let mut m = Message::new(k as u16, MessageType::Query, OpCode::Query);
            m.metadata.recursion_desired = true;
            m.add_query(Query::query(
                Name::from_ascii(format!("{name}."))?,
                RecordType::A,
            ));
            let dns = m.to_vec()?;
            let udp_len = 8 + dns.len();
            let ip_len = 20 + udp_len;
            let frame_len = 14 + ip_len;
            if frame_len > SLOT - 2 {
                bail!("{name}: a {frame_len}-byte query frame does not fit the generator's slot");
            }
            let sport = FIRST_PORT + (k % 40_000) as u16;
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
            ip[4..6].copy_from_slice(&(k as u16).to_be_bytes());
            ip[6] = 0x40; // DF
            ip[8] = 64;
            ip[9] = 17;
            ip[12..16].copy_from_slice(&link.pod_ip.octets());
            ip[16..20].copy_from_slice(&server.octets());
            let ip_sum = checksum(&[&ip]);
            ip[10..12].copy_from_slice(&ip_sum.to_be_bytes());
            let mut udp = [0u8; 8];
            udp[0..2].copy_from_slice(&sport.to_be_bytes());
            udp[2..4].copy_from_slice(&53u16.to_be_bytes());
            udp[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
            let mut pseudo = [0u8; 12];
            pseudo[0..8].copy_from_slice(&ip[12..20]);
            pseudo[9] = 17;
            pseudo[10..12].copy_from_slice(&(udp_len as u16).to_be_bytes());
            let udp_sum = match checksum(&[&pseudo, &udp, &dns]) {
                0 => 0xffff, // RFC 768: a computed zero is sent as all ones
                s => s,
            };
            udp[6..8].copy_from_slice(&udp_sum.to_be_bytes());

            let mut slot = [0u8; SLOT];
            slot[0..2].copy_from_slice(&(frame_len as u16).to_le_bytes());
            let f = &mut slot[2..2 + frame_len];
            f[0..6].copy_from_slice(&dst_mac);
            f[6..12].copy_from_slice(&src_mac);
            f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
            f[14..34].copy_from_slice(&ip);
            f[34..42].copy_from_slice(&udp);
            f[42..].copy_from_slice(&dns);
            Ok(slot)
        })
        .collect()
}

fn program<'a>(ebpf: &'a Ebpf, name: &str) -> anyhow::Result<&'a Xdp> {
    let p: &Xdp = ebpf
        .program(name)
        .with_context(|| format!("program {name} missing from the reflector object"))?
        .try_into()?;
    Ok(p)
}

/// Attaches `xdns_count_reply` to the pod side of a link: in driver mode where the host side
/// answers with driver-mode `XDP_TX` (those frames arrive only at a peer with a driver-mode
/// program), in generic mode elsewhere (replies from the host's stack, generic XDP or AF_XDP
/// arrive as socket buffers, which only generic XDP sees on a veth).
pub fn attach_counter(
    ebpf: &mut Ebpf,
    pod: &Path,
    pod_if: &str,
    driver: bool,
) -> anyhow::Result<XdpLinkId> {
    let p: &mut Xdp = ebpf
        .program_mut("xdns_count_reply")
        .context("program xdns_count_reply missing from the reflector object")?
        .try_into()?;
    let mode = if driver {
        XdpMode::Driver
    } else {
        XdpMode::Skb
    };
    crate::netns::in_netns(pod, || p.attach(pod_if, mode))?
        .with_context(|| format!("attaching xdns_count_reply to {pod_if} ({mode:?})"))
}

pub fn detach_counter(ebpf: &mut Ebpf, pod: &Path, id: XdpLinkId) -> anyhow::Result<()> {
    let p: &mut Xdp = ebpf
        .program_mut("xdns_count_reply")
        .context("program xdns_count_reply missing")?
        .try_into()?;
    crate::netns::in_netns(pod, || p.detach(id))??;
    Ok(())
}

/// Frames the pod side could not hand to the host side (its receive ring was full):
/// the sum of the veth's `tx_queue_*_xdp_xmit_errors`.
pub fn ring_drops(pod: &crate::netns::Netns, pod_if: &str) -> anyhow::Result<u64> {
    let out = pod.command("ethtool").args(["-S", pod_if]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().split_once(": "))
        .filter(|(k, _)| k.starts_with("tx_queue_") && k.ends_with("_xdp_xmit_errors"))
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum())
}

/// UDP datagrams the node's sockets dropped because their receive buffer was full
/// (`RcvbufErrors` of the namespace's `/proc/net/snmp`).
pub fn socket_drops(node: &crate::netns::Netns) -> anyhow::Result<u64> {
    let out = node.command("cat").arg("/proc/net/snmp").output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut udp = text.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        bail!("no Udp lines in the node's /proc/net/snmp");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .context("no RcvbufErrors in the node's /proc/net/snmp")
}

/// What one offer did.
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    pub counts: Counts,
    /// From the first frame to the last, seconds.
    pub secs: f64,
}

/// Offers the loaded queries at `rate` per second for `duration`, split over the sender
/// threads, into the pod side `pod_if` of a link, then waits `drain` for late replies.
/// Counts are what the programs counted in that time (the caller attaches the counter).
pub fn offer(
    ebpf: &Ebpf,
    generator: &XdpGen,
    pod: &Path,
    pod_if: &str,
    rate: u64,
    duration: Duration,
    drain: Duration,
) -> anyhow::Result<Sent> {
    let prog = program(ebpf, "xdns_gen_query")?;
    let ifindex = crate::netns::in_netns(pod, || {
        let name = std::ffi::CString::new(pod_if).expect("interface names have no NUL");
        // SAFETY: a valid C string.
        unsafe { libc::if_nametoindex(name.as_ptr()) }
    })?;
    if ifindex == 0 {
        bail!("{pod_if}: no such interface in the pod namespace");
    }
    // The frame every run starts from; the program cuts it to the query's length and
    // overwrites it (BPF_PROG_TEST_RUN requires data_end to equal the input's length).
    let template = [0u8; SLOT - 2];
    let mut ctx = [0u8; 24]; // struct xdp_md
    ctx[4..8].copy_from_slice(&(template.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());

    let before = generator.counts()?;
    let per_sender = rate as f64 / generator.cpus.len() as f64;
    let chunk = ((per_sender * CALL_INTERVAL_NS / 1e9) as u32).clamp(1, MAX_CHUNK);
    let pod_ns = std::fs::File::open(pod).with_context(|| pod.display().to_string())?;
    let started = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let senders: Vec<_> = generator
            .cpus
            .iter()
            .map(|&cpu| {
                let (template, ctx, pod_ns) = (&template, &ctx, &pod_ns);
                s.spawn(move || -> anyhow::Result<()> {
                    // SAFETY: a namespace fd; only this thread changes namespace.
                    if unsafe { libc::setns(pod_ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        bail!("setns: {}", std::io::Error::last_os_error());
                    }
                    pin_to_cpu(cpu)?;
                    let start = Instant::now();
                    let mut sent = 0u64;
                    while start.elapsed() < duration {
                        let now = start.elapsed().as_secs_f64();
                        let due = sent as f64 / per_sender;
                        let repeat = if due > now {
                            std::thread::sleep(Duration::from_secs_f64(due - now));
                            chunk
                        } else {
                            // Behind: send what fell due, in bigger calls.
                            (((now - due) * per_sender) as u32).clamp(chunk, MAX_CHUNK)
                        };
                        let run = prog.test_run(TestRunOptions {
                            data_in: Some(template),
                            ctx_in: Some(ctx),
                            repeat,
                            attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                            ..TestRunOptions::new()
                        });
                        match run {
                            Ok(_) => sent += repeat as u64,
                            Err(e) => return Err(live_frames_error(e)),
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for t in senders {
            t.join()
                .map_err(|_| anyhow::anyhow!("a sender thread panicked"))??;
        }
        Ok(())
    })?;
    let secs = started.elapsed().as_secs_f64();
    std::thread::sleep(drain);
    let counts = generator.counts()?.minus(&before);
    Ok(Sent { counts, secs })
}

fn live_frames_error(e: ProgramError) -> anyhow::Error {
    anyhow::Error::new(e).context(
        "BPF_PROG_TEST_RUN in live-frames mode failed (it needs Linux 5.18 or newer, root, and \
         a veth whose peer can receive XDP frames: GRO or an XDP program on the host side)",
    )
}
