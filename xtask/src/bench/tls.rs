//! DNS over TLS: what forwarding over TLS costs beside plain DNS. Two agents (userspace only,
//! release build) forward external names to one unbound, one over plain DNS and one over TLS
//! (`tls://…`, a certificate from a CA made for the run), and are measured in rotation:
//!
//! - uncached names one at a time (every name new, so every query goes upstream): the latency
//!   TLS adds to an uncached query on a warm connection;
//! - uncached names at a fixed load (own load generator): latency percentiles, and the agent's
//!   CPU time per query (summed over its threads from `/proc/PID/task/*/schedstat`);
//! - cached names at a fixed load: the cache hides the transport, so these should not differ.
//!
//! The upstream answers every name under `ext.test.` from local data (one `redirect` zone), so
//! its own work is the same for both. Self-contained: its own namespaces, addresses and
//! processes, cleaned up like the rest of the bench. `cargo xtask bench` runs it after the
//! main measurements; `cargo xtask bench-tls [--quick]` runs it alone.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    loadgen::{self, LatencyRun},
    workload::{Expect, Query, QuerySet},
};
use crate::netns::{self, Netns};

const UPSTREAM: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 80);
const ANSWER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const SERVER_NAME: &str = "upstream.bench.test";

struct Plan {
    rounds: usize,
    sequential: usize,
    load: u32,
    load_secs: f64,
    cached: usize,
    cached_load: u32,
    cached_secs: f64,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                rounds: 1,
                sequential: 200,
                load: 1000,
                load_secs: 0.5,
                cached: 100,
                cached_load: 2000,
                cached_secs: 0.5,
            }
        } else {
            Self {
                rounds: 5,
                sequential: 1000,
                load: 2000,
                load_secs: 2.0,
                cached: 200,
                cached_load: 10_000,
                cached_secs: 1.0,
            }
        }
    }
}

/// One agent and what was measured of it.
struct Side {
    id: &'static str,
    listen: Ipv4Addr,
    upstream: String,
    /// The `to` label of its upstream.
    to: String,
    metrics: SocketAddr,
    child: Option<Child>,
    sequential_ns: Vec<u64>,
    load: LatencyRun,
    cpu_ns: u64,
    cached: LatencyRun,
}

/// Runs the comparison and returns it as a Markdown section.
pub fn measure(root: &Path, agent_bin: &Path, dir: &Path, quick: bool) -> anyhow::Result<String> {
    let plan = Plan::new(quick);
    let dir = dir.join("tls");
    std::fs::create_dir_all(&dir)?;
    let tag = std::process::id() % 10_000;
    let node = Netns::new(format!("xtls-node-{tag}"))?;
    let pod = Netns::new(format!("xtls-pod-{tag}"))?;
    let (host_if, pod_if) = (format!("xtlsh{tag}"), format!("xtlsp{tag}"));
    netns::veth(&node, &host_if, &pod, &pod_if)?;
    node.ip(&["addr", "add", &format!("{UPSTREAM}/32"), "dev", "lo"])?;
    node.ip(&["addr", "add", "192.0.2.1/24", "dev", &host_if])?;
    node.ip(&["link", "set", &host_if, "up"])?;
    pod.ip(&["addr", "add", "192.0.2.2/24", "dev", &pod_if])?;
    pod.ip(&["link", "set", &pod_if, "up"])?;
    pod.ip(&["route", "add", "169.254.20.0/24", "via", "192.0.2.1"])?;

    write_certificates(&dir)?;
    let mut unbound = node.spawn(
        node.command("unbound")
            .arg("-d")
            .arg("-c")
            .arg(write_unbound_conf(&dir)?)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("unbound.stderr"))?),
    )?;
    wait_answering(
        &node,
        SocketAddr::new(IpAddr::V4(UPSTREAM), 53),
        &mut unbound,
        &dir.join("unbound.log"),
    )?;

    let mut sides = [
        Side::new("plain", 30, UPSTREAM.to_string(), format!("{UPSTREAM}:53")),
        Side::new(
            "tls",
            31,
            format!("tls://{UPSTREAM}#{SERVER_NAME}"),
            format!("tls://{UPSTREAM}:853#{SERVER_NAME}"),
        ),
    ];
    let zone = root.join("deploy/examples/cluster.yaml");
    for s in &mut sides {
        node.ip(&["addr", "add", &format!("{}/32", s.listen), "dev", "lo"])?;
        let log = dir.join(format!("agent-{}.log", s.id));
        let mut c = node.command(agent_bin);
        c.arg("run")
            .arg("--zone-file")
            .arg(&zone)
            .arg("--no-kernel")
            .args(["--listen", &s.listen.to_string()])
            .args(["--upstream", &s.upstream])
            .arg("--upstream-ca")
            .arg(dir.join("ca.pem"))
            .args(["--metrics-addr", &s.metrics.to_string()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        let mut child = node.spawn(&mut c)?;
        wait_answering(&pod, s.server(), &mut child, &log)?;
        s.child = Some(child);
    }

    for round in 0..plan.rounds {
        // Alternate which side goes first, so drift on the machine spreads over both.
        for k in 0..sides.len() {
            let s = &mut sides[(k + round) % 2];
            let names: Vec<String> = (0..plan.sequential)
                .map(|i| format!("s{round}-{i}.{}.ext.test", s.id))
                .collect();
            let lat = sequential(&pod, s.server(), &names)?;
            s.sequential_ns.extend(lat);

            let total = (plan.load as f64 * plan.load_secs).ceil() as usize;
            let set = query_set((0..total).map(|i| format!("l{round}-{i}.{}.ext.test", s.id)));
            let pid = s.child.as_ref().expect("started").id();
            let cpu_before = cpu_ns(pid)?;
            let r = loadgen::run(
                &pod,
                s.server(),
                &set,
                plan.load,
                Duration::from_secs_f64(plan.load_secs),
                false,
            )?;
            s.cpu_ns += cpu_ns(pid)? - cpu_before;
            check(s.id, "uncached", &r)?;
            eprintln!(
                "tls bench  uncached {:<6} {:>5}/s sent {:>6} valid {:>6}",
                s.id, plan.load, r.sent, r.valid,
            );
            s.load.merge(r);
        }
    }
    // Cached: warmed one at a time, then at a fixed load.
    let cached = query_set((0..plan.cached).map(|i| format!("c{i}.ext.test")));
    for s in &mut sides {
        let names: Vec<String> = cached.queries.iter().map(|q| q.name.clone()).collect();
        sequential(&pod, s.server(), &names)?;
    }
    for round in 0..plan.rounds {
        for k in 0..sides.len() {
            let s = &mut sides[(k + round) % 2];
            let r = loadgen::run(
                &pod,
                s.server(),
                &cached,
                plan.cached_load,
                Duration::from_secs_f64(plan.cached_secs),
                false,
            )?;
            check(s.id, "cached", &r)?;
            s.cached.merge(r);
        }
    }

    // Honest labels: the TLS side really went over TLS, on few connections.
    let tls_metrics = metrics(&node, &sides[1])?;
    let connections = series(
        &tls_metrics,
        "xdns_forward_tls_connections_total",
        &sides[1].to,
    );
    let tls_requests = series(&tls_metrics, "coredns_forward_requests_total", &sides[1].to);
    let plain_requests = series(
        &metrics(&node, &sides[0])?,
        "coredns_forward_requests_total",
        &sides[0].to,
    );
    // Every uncached query answered needed its own upstream query.
    for (s, requests) in [(&sides[0], plain_requests), (&sides[1], tls_requests)] {
        let answered = (s.sequential_ns.len() as u64 + s.load.valid) as f64;
        if requests < answered {
            bail!(
                "{}: {requests} upstream queries for {answered} uncached answers",
                s.id
            );
        }
    }
    Ok(markdown(&plan, &sides, connections, tls_requests))
}

impl Side {
    fn new(id: &'static str, last_octet: u8, upstream: String, to: String) -> Self {
        Self {
            id,
            listen: Ipv4Addr::new(169, 254, 20, last_octet),
            upstream,
            to,
            metrics: SocketAddr::new(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                9300 + u16::from(last_octet),
            ),
            child: None,
            sequential_ns: Vec::new(),
            load: LatencyRun::default(),
            cpu_ns: 0,
            cached: LatencyRun::default(),
        }
    }

    fn server(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.listen), 53)
    }
}

fn query_set(names: impl Iterator<Item = String>) -> QuerySet {
    QuerySet {
        id: "tls",
        title: "external names",
        queries: names
            .map(|name| Query {
                name,
                expect: Expect::A(ANSWER),
            })
            .collect(),
    }
}

fn check(id: &str, what: &str, r: &LatencyRun) -> anyhow::Result<()> {
    if r.wrong > 0 {
        bail!("{id}: {} wrong replies to {what} external names", r.wrong);
    }
    Ok(())
}

/// A CA and a server certificate for [`SERVER_NAME`], made for this run.
fn write_certificates(dir: &Path) -> anyhow::Result<()> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "xdns bench CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    std::fs::write(dir.join("ca.pem"), ca.self_signed(&ca_key)?.pem())?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    std::fs::write(dir.join("cert.pem"), leaf.signed_by(&key, &issuer)?.pem())?;
    std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
    Ok(())
}

/// unbound with plain DNS and DNS over TLS on [`UPSTREAM`], answering every name under
/// `ext.test.` from local data.
fn write_unbound_conf(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let d = dir.display();
    let conf = format!(
        "server:\n  interface: {UPSTREAM}@53\n  interface: {UPSTREAM}@853\n  tls-port: 853\n  \
         tls-service-pem: \"{d}/cert.pem\"\n  tls-service-key: \"{d}/key.pem\"\n  \
         do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n  directory: \"{d}\"\n  \
         pidfile: \"{d}/unbound.pid\"\n  use-syslog: no\n  logfile: \"{d}/unbound.log\"\n  verbosity: 1\n  \
         do-ip6: no\n  num-threads: 1\n  access-control: 0.0.0.0/0 allow\n  \
         module-config: \"iterator\"\n  local-zone: \".\" static\n  \
         local-zone: \"ext.test.\" redirect\n  local-data: \"ext.test. 3600 IN A {ANSWER}\"\n\
         remote-control:\n  control-enable: no\n"
    );
    let path = dir.join("unbound.conf");
    std::fs::write(&path, conf)?;
    Ok(path)
}

/// An A query for `name` (RD), with `id`.
fn encode(name: &str, id: u16) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.extend_from_slice(&[0, 0, 1, 0, 1]);
    m
}

/// Asks `names` one at a time from the pod; the latency of each (send to reply), ns. Every
/// reply must be NOERROR with an answer.
fn sequential(pod: &Netns, server: SocketAddr, names: &[String]) -> anyhow::Result<Vec<u64>> {
    let sock = pod.enter(|| UdpSocket::bind("0.0.0.0:0"))??;
    sock.connect(server)?;
    sock.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut buf = [0u8; 1500];
    let mut out = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let id = i as u16;
        let started = Instant::now();
        sock.send(&encode(name, id))?;
        loop {
            let n = sock
                .recv(&mut buf)
                .with_context(|| format!("no reply from {server} to {name}"))?;
            if n < 12 || buf[..2] != id.to_be_bytes() {
                continue;
            }
            let rcode = buf[3] & 0x0f;
            let ancount = u16::from_be_bytes([buf[6], buf[7]]);
            if rcode != 0 || ancount == 0 {
                bail!("{server} answered {name} with rcode {rcode}, {ancount} answers");
            }
            out.push(started.elapsed().as_nanos() as u64);
            break;
        }
    }
    Ok(out)
}

/// Time on CPU of every thread of `pid`, ns.
pub(super) fn cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = std::fs::read_to_string(task?.path().join("schedstat")).unwrap_or_default();
        total += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

/// Waits until `server` answers `ready.ext.test` (20 s at most).
fn wait_answering(
    ns: &Netns,
    server: SocketAddr,
    child: &mut Child,
    log: &Path,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "{server}: exited ({status}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        let names = ["ready.ext.test".to_string()];
        if ns
            .enter(|| {
                let sock = UdpSocket::bind("0.0.0.0:0").ok()?;
                sock.set_read_timeout(Some(Duration::from_millis(200)))
                    .ok()?;
                sock.connect(server).ok()?;
                sock.send(&encode(&names[0], 7)).ok()?;
                let mut buf = [0u8; 512];
                let n = sock.recv(&mut buf).ok()?;
                (n >= 12 && buf[3] & 0x0f == 0).then_some(())
            })?
            .is_some()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{server} does not answer:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn metrics(node: &Netns, s: &Side) -> anyhow::Result<String> {
    let (code, body) = node.http_get(s.metrics, "/metrics")?;
    if code != 200 {
        bail!("{}: /metrics answered {code}", s.id);
    }
    Ok(body)
}

/// The value of `name{to="to"}` in a Prometheus text body (0 when absent).
fn series(body: &str, name: &str, to: &str) -> f64 {
    let prefix = format!("{name}{{to=\"{to}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn pct(sorted_ns: &[u64], p: f64) -> f64 {
    if sorted_ns.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted_ns.len() as f64 * p).ceil() as usize).clamp(1, sorted_ns.len()) - 1;
    sorted_ns[i] as f64 / 1000.0
}

fn mean_us(ns: &[u64]) -> f64 {
    ns.iter().sum::<u64>() as f64 / ns.len().max(1) as f64 / 1000.0
}

fn markdown(plan: &Plan, sides: &[Side; 2], connections: f64, tls_requests: f64) -> String {
    let [plain, tls] = sides;
    let mut seq: Vec<Vec<u64>> = sides.iter().map(|s| s.sequential_ns.clone()).collect();
    for v in &mut seq {
        v.sort_unstable();
    }
    let cpu = |s: &Side| s.cpu_ns as f64 / s.load.sent.max(1) as f64 / 1000.0;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "\n## DNS over TLS upstream\n\n\
         Two agents (userspace only, release build) forward external names to one unbound, one \
         over plain DNS (`--upstream {UPSTREAM}`) and one over TLS (`--upstream \
         tls://{UPSTREAM}#{SERVER_NAME}`), measured in rotation, {} round(s). Uncached: every \
         name is new, so every query goes upstream; one at a time ({} per round), and at {}/s for \
         {} s per round. Cached: {} names, warmed, at {}/s. CPU is the agent's time on CPU \
         (all threads) during the uncached load, per query.\n",
        plan.rounds, plan.sequential, plan.load, plan.load_secs, plan.cached, plan.cached_load
    );
    let _ = writeln!(o, "| | plain upstream | TLS upstream | TLS − plain |");
    let _ = writeln!(o, "|---|---|---|---|");
    let mut row = |what: &str, a: f64, b: f64, unit: &str| {
        let _ = writeln!(
            o,
            "| {what} | {a:.0} {unit} | {b:.0} {unit} | {:+.0} {unit} |",
            b - a
        );
    };
    row(
        "uncached, one at a time: median",
        pct(&seq[0], 0.5),
        pct(&seq[1], 0.5),
        "µs",
    );
    row(
        "uncached, one at a time: mean",
        mean_us(&seq[0]),
        mean_us(&seq[1]),
        "µs",
    );
    row(
        "uncached, one at a time: p99",
        pct(&seq[0], 0.99),
        pct(&seq[1], 0.99),
        "µs",
    );
    let p = |r: &LatencyRun, q: f64| r.pct_us(q).unwrap_or(f64::NAN);
    row(
        &format!("uncached at {}/s: p50", plan.load),
        p(&plain.load, 0.5),
        p(&tls.load, 0.5),
        "µs",
    );
    row(
        &format!("uncached at {}/s: p99", plan.load),
        p(&plain.load, 0.99),
        p(&tls.load, 0.99),
        "µs",
    );
    row("agent CPU per uncached query", cpu(plain), cpu(tls), "µs");
    row(
        &format!("cached at {}/s: p50", plan.cached_load),
        p(&plain.cached, 0.5),
        p(&tls.cached, 0.5),
        "µs",
    );
    row(
        &format!("cached at {}/s: p99", plan.cached_load),
        p(&plain.cached, 0.99),
        p(&tls.cached, 0.99),
        "µs",
    );
    let _ = writeln!(
        o,
        "\nLoss: uncached {:.2}% plain, {:.2}% TLS; cached {:.2}% plain, {:.2}% TLS. The TLS \
         agent asked its upstream {tls_requests:.0} times over {connections:.0} TLS \
         connection(s).",
        plain.load.loss() * 100.0,
        tls.load.loss() * 100.0,
        plain.cached.loss() * 100.0,
        tls.cached.loss() * 100.0
    );
    o
}

/// `cargo xtask bench-tls [--quick]`: this comparison alone.
pub fn bench_tls(quick: bool) -> anyhow::Result<()> {
    crate::util::require_root("the TLS benchmark")?;
    let root = crate::util::root();
    crate::util::run(crate::util::cmd("cargo").current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "dns-agent",
    ]))?;
    let dir = root
        .join("results")
        .join(format!("tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    netns::cleanup_on_ctrl_c();
    let md = measure(&root, &root.join("target/release/dns-agent"), &dir, quick);
    netns::cleanup();
    let md = md?;
    std::fs::write(dir.join("tls.md"), &md)?;
    println!("{md}");
    println!("results: {}", dir.display());
    Ok(())
}
