//! External names as a pod resolves them: glibc's `getaddrinfo` in the pod's namespace, with
//! the `resolv.conf` the kubelet writes (`search ns-0.svc.cluster.local svc.cluster.local
//! cluster.local`, `options ndots:5`), resolving the workload's external names (A and AAAA, as
//! glibc asks them, in parallel). A name with fewer than five dots goes through the search list
//! first: without search-path completion that is four round trips, three NXDOMAINs and the
//! answer; with it, one. Measured for xdns without and with `--autopath` (the kernel path,
//! generic mode), unbound and dnsmasq: time per resolution (as the caller of `getaddrinfo` sees
//! it) and packets per resolution (what the pod sent on its link).
//!
//! The autopath agent gets a link of its own (an XDP program per link), and a zone file that
//! holds the pod (its address on that link, namespace `ns-0`). The resolver runs as this
//! binary's hidden `bench-resolve` command under `ip netns exec`, which puts
//! `/etc/netns/<pod>/resolv.conf` in place of `/etc/resolv.conf`.

use std::{
    fmt::Write as _,
    fs::File,
    net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    topo::{Process, Topology, UPSTREAM},
    workload::{Expect, Workload, ZONE, service_name},
};
use crate::netns;

/// The autopath agent's listen address, link (the one after the topology's) and metrics port.
const AUTOPATH_LISTEN: Ipv4Addr = Ipv4Addr::new(169, 254, 20, 30);
const AUTOPATH_LINK: usize = super::topo::LINKS;
const AUTOPATH_METRICS: u16 = 9270;
/// The pod's namespace in the search list.
const POD_NAMESPACE: &str = "ns-0";

/// One system of this set: where it listens, and the pod-side interface its queries leave by.
struct Target {
    id: &'static str,
    title: &'static str,
    listen: Ipv4Addr,
    pod_if: String,
}

/// What one system measured.
#[derive(Default)]
struct Outcome {
    micros: Vec<u64>,
    packets: u64,
}

impl Outcome {
    fn percentile(&self, p: f64) -> f64 {
        if self.micros.is_empty() {
            return 0.0;
        }
        let mut v = self.micros.clone();
        v.sort_unstable();
        v[((v.len() - 1) as f64 * p).round() as usize] as f64
    }

    fn mean(&self) -> f64 {
        self.micros.iter().sum::<u64>() as f64 / self.micros.len().max(1) as f64
    }

    fn packets_per_resolution(&self) -> f64 {
        self.packets as f64 / self.micros.len().max(1) as f64
    }
}

/// Runs the set on the bench's topology (its systems already running); returns the report's
/// section.
pub fn measure(
    topo: &Topology,
    agent_bin: &Path,
    workload: &Workload,
    dir: &Path,
    quick: bool,
) -> anyhow::Result<String> {
    let (rounds, per_round) = if quick { (1, 100) } else { (3, 600) };
    let autopath = start_autopath_agent(topo, agent_bin, workload, dir)?;
    // The systems of the run that resolve as a pod's resolver would ask them, and the autopath
    // agent beside them.
    let mut targets: Vec<Target> = super::topo::systems()
        .into_iter()
        .filter(|s| ["xdns-generic", "unbound", "dnsmasq"].contains(&s.id))
        .map(|s| Target {
            id: s.id,
            title: s.title,
            listen: s.listen,
            pod_if: topo.links[s.link].pod_if.clone(),
        })
        .collect();
    targets.insert(
        targets.len().min(1),
        Target {
            id: "xdns-autopath",
            title: "xdns kernel path, generic, --autopath",
            listen: AUTOPATH_LISTEN,
            pod_if: format!("xb{}l{AUTOPATH_LINK}p", std::process::id() % 100_000),
        },
    );
    // The names and the address each must resolve to.
    let external = &workload.sets[2];
    let names = dir.join("resolve-names.txt");
    let mut text = String::new();
    for q in &external.queries {
        let Expect::A(ip) = q.expect else {
            bail!("external names resolve to addresses");
        };
        writeln!(text, "{} {ip}", q.name)?;
    }
    std::fs::write(&names, text)?;
    let etc = PathBuf::from("/etc/netns").join(&topo.pod.name);
    std::fs::create_dir_all(&etc)?;
    netns::remove_on_exit(etc.clone());
    let exe = std::env::current_exe().context("this program's path")?;

    // A round that is not measured: caches filled, completions made.
    for t in &targets {
        run_resolver(topo, &exe, &etc, &names, t, external.queries.len())?;
    }
    let mut outcomes: Vec<Outcome> = targets.iter().map(|_| Outcome::default()).collect();
    for round in 0..rounds {
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            let o = run_resolver(topo, &exe, &etc, &names, &targets[i], per_round)?;
            eprintln!(
                "resolve    {:<14} {} resolutions, median {:.0} µs, {:.2} packets each",
                targets[i].id,
                o.micros.len(),
                o.percentile(0.5),
                o.packets_per_resolution()
            );
            outcomes[i].micros.extend(o.micros);
            outcomes[i].packets += o.packets;
        }
    }
    let kernel = super::check::kernel_counters(&autopath.pin.clone().expect("a pin"))?;
    let completed = kernel[dns_common::counter::ANSWERED_AUTOPATH as usize];
    let _ = std::fs::remove_dir_all(&etc);
    Ok(report(&targets, &outcomes, completed, rounds * per_round))
}

fn report(targets: &[Target], outcomes: &[Outcome], completed: u64, per_system: usize) -> String {
    let unbound = targets
        .iter()
        .position(|t| t.id == "unbound")
        .map(|i| outcomes[i].percentile(0.5))
        .unwrap_or(0.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## External names as a pod resolves them\n\n\
         glibc `getaddrinfo` (A and AAAA) in the pod namespace with the kubelet's `resolv.conf`: \
         `search {POD_NAMESPACE}.svc.{ZONE} svc.{ZONE} {ZONE}`, `options ndots:5`; the {per_system} \
         resolutions per system are of the cached external names (`ext-N.example.org`, fewer \
         than five dots: the search list comes first), after one round that fills the caches. \
         Packets: what the pod sent on its link, per resolution.\n\n\
         | system | median µs | p99 µs | mean µs | packets per resolution | unbound's median ÷ this |\n\
         |---|---:|---:|---:|---:|---:|"
    );
    for (t, o) in targets.iter().zip(outcomes) {
        let median = o.percentile(0.5);
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.0} | {:.0} | {:.2} | {} |",
            t.title,
            median,
            o.percentile(0.99),
            o.mean(),
            o.packets_per_resolution(),
            if median > 0.0 && unbound > 0.0 {
                format!("{:.2}×", unbound / median)
            } else {
                "—".into()
            }
        );
    }
    let _ = writeln!(
        s,
        "\nThe autopath agent's kernel completed {completed} search paths in the measured and \
         warm-up rounds (`answered_autopath`)."
    );
    let autopath = targets.iter().position(|t| t.id == "xdns-autopath");
    let (packets, speedup) = autopath.map_or((None, None), |i| {
        let median = outcomes[i].percentile(0.5);
        (
            Some(outcomes[i].packets_per_resolution()),
            (median > 0.0 && unbound > 0.0).then(|| unbound / median),
        )
    });
    let met = |ok: Option<bool>| match ok {
        Some(true) => "yes",
        Some(false) => "no",
        None => "—",
    };
    let _ = writeln!(
        s,
        "\n| target (reported, not asserted) | measured | met |\n|---|---|---|\n\
         | one round trip per resolution with --autopath (2 packets: A and AAAA) | {} | {} |\n\
         | ≥ 3× lower time per resolution than unbound with --autopath (median) | {} | {} |",
        packets.map_or("—".into(), |p| format!("{p:.2} packets")),
        met(packets.map(|p| p <= 2.0)),
        speedup.map_or("—".into(), |x| format!("{x:.2}×")),
        met(speedup.map(|x| x >= 3.0)),
    );
    s
}

/// Resolves the first `count` names once, as the pod does with `target` as its nameserver.
fn run_resolver(
    topo: &Topology,
    exe: &Path,
    etc: &Path,
    names: &Path,
    target: &Target,
    count: usize,
) -> anyhow::Result<Outcome> {
    std::fs::write(
        etc.join("resolv.conf"),
        format!(
            "nameserver {}\nsearch {POD_NAMESPACE}.svc.{ZONE} svc.{ZONE} {ZONE}\noptions ndots:5\n",
            target.listen
        ),
    )?;
    let sent = || tx_packets(topo, &target.pod_if);
    let before = sent()?;
    let out = Command::new("ip")
        .args(["netns", "exec", &topo.pod.name])
        .arg(exe)
        .arg("bench-resolve")
        .arg(names)
        .arg(count.to_string())
        .stderr(Stdio::inherit())
        .output()
        .context("running the resolver in the pod namespace")?;
    if !out.status.success() {
        bail!("{}: resolving as a pod failed ({})", target.id, out.status);
    }
    let packets = sent()? - before;
    let micros = String::from_utf8(out.stdout)?
        .lines()
        .map(|l| l.trim().parse::<u64>())
        .collect::<Result<Vec<_>, _>>()
        .context("the resolver's output")?;
    Ok(Outcome { micros, packets })
}

/// Packets the pod has sent on `iface`.
fn tx_packets(topo: &Topology, iface: &str) -> anyhow::Result<u64> {
    let out = Command::new("ip")
        .args([
            "-n",
            &topo.pod.name,
            "-s",
            "-j",
            "link",
            "show",
            "dev",
            iface,
        ])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("ip -s -j link show {iface}"))?;
    v[0]["stats64"]["tx"]["packets"]
        .as_u64()
        .with_context(|| format!("no tx packets for {iface}"))
}

/// An agent with `--autopath` on a link of its own; the zone file holds the pod (namespace
/// `ns-0`, its address on that link).
fn start_autopath_agent(
    topo: &Topology,
    agent_bin: &Path,
    workload: &Workload,
    dir: &Path,
) -> anyhow::Result<Process> {
    let id = std::process::id() % 100_000;
    let (host_if, pod_if) = (
        format!("xb{id}l{AUTOPATH_LINK}h"),
        format!("xb{id}l{AUTOPATH_LINK}p"),
    );
    let host_ip = Ipv4Addr::new(192, 0, 2, (4 * AUTOPATH_LINK + 1) as u8);
    let pod_ip = Ipv4Addr::new(192, 0, 2, (4 * AUTOPATH_LINK + 2) as u8);
    netns::veth(&topo.node, &host_if, &topo.pod, &pod_if)?;
    topo.node
        .ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if])?;
    topo.pod
        .ip(&["addr", "add", &format!("{pod_ip}/30"), "dev", &pod_if])?;
    topo.node.ip(&["link", "set", &host_if, "up"])?;
    topo.pod.ip(&["link", "set", &pod_if, "up"])?;
    // Static neighbours, as on the other links: no ARP in the packet counts.
    let (host_mac, pod_mac) = (
        format!("02:00:00:00:{AUTOPATH_LINK:02x}:01"),
        format!("02:00:00:00:{AUTOPATH_LINK:02x}:02"),
    );
    topo.node
        .ip(&["link", "set", &host_if, "address", &host_mac])?;
    topo.pod
        .ip(&["link", "set", &pod_if, "address", &pod_mac])?;
    topo.node.ip(&[
        "neigh",
        "replace",
        &pod_ip.to_string(),
        "lladdr",
        &pod_mac,
        "dev",
        &host_if,
        "nud",
        "permanent",
    ])?;
    topo.pod.ip(&[
        "neigh",
        "replace",
        &host_ip.to_string(),
        "lladdr",
        &host_mac,
        "dev",
        &pod_if,
        "nud",
        "permanent",
    ])?;
    topo.node
        .ip(&["addr", "add", &format!("{AUTOPATH_LISTEN}/32"), "dev", "lo"])?;
    topo.pod.ip(&[
        "route",
        "add",
        &format!("{AUTOPATH_LISTEN}/32"),
        "via",
        &host_ip.to_string(),
    ])?;

    let zone = dir.join("zone-autopath.yaml");
    std::fs::write(
        &zone,
        format!(
            "{}---\nkind: Pod\nmetadata: {{name: resolver, namespace: {POD_NAMESPACE}}}\n\
             spec: {{containers: [{{name: c, image: x}}]}}\n\
             status: {{phase: Running, podIP: {pod_ip}, podIPs: [{{ip: {pod_ip}}}]}}\n",
            workload.zone_yaml()
        ),
    )?;
    let pin = PathBuf::from(format!(
        "/sys/fs/bpf/xdns-bench-{}-autopath",
        std::process::id()
    ));
    netns::remove_on_exit(pin.clone());
    let log = dir.join("xdns-autopath.log");
    let mut c = topo.node.command(agent_bin);
    c.arg("run")
        .arg("--zone-file")
        .arg(&zone)
        .args(["--listen", &AUTOPATH_LISTEN.to_string()])
        .args(["--upstream", &UPSTREAM.to_string()])
        .args(["--interface", &host_if, "--attach-mode", "generic"])
        .arg("--autopath")
        .arg("--pin-path")
        .arg(&pin)
        .args(["--metrics-addr", &format!("127.0.0.1:{AUTOPATH_METRICS}")])
        .env("RUST_LOG", "info")
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::null())
        .stderr(File::create(&log)?);
    let child = topo.node.spawn(&mut c)?;
    let mut p = Process {
        child,
        log,
        pin: Some(pin),
    };
    // Answering once its zone is loaded: NOERROR for a Service.
    let server = SocketAddr::new(IpAddr::V4(AUTOPATH_LISTEN), 53);
    let sock = topo
        .pod
        .enter(|| std::net::UdpSocket::bind("0.0.0.0:0"))??;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut q = vec![0x5a, 0x5b, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for l in service_name(0).split('.') {
        q.push(l.len() as u8);
        q.extend_from_slice(l.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 1500];
    loop {
        if let Some(status) = p.child.try_wait()? {
            bail!(
                "the autopath agent exited ({status}):\n{}",
                std::fs::read_to_string(&p.log).unwrap_or_default()
            );
        }
        let _ = sock.send_to(&q, server);
        if let Ok((n, _)) = sock.recv_from(&mut buf)
            && n >= 4
            && buf[..2] == [0x5a, 0x5b]
            && buf[3] & 0x0f == 0
        {
            return Ok(p);
        }
        if Instant::now() > deadline {
            bail!(
                "the autopath agent does not answer:\n{}",
                std::fs::read_to_string(&p.log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `cargo xtask bench-resolve NAMES COUNT` (run by the bench in the pod namespace): resolves the
/// first COUNT names of NAMES (`name ipv4` per line) with the system's `getaddrinfo`, and
/// prints the microseconds of each resolution. Fails if one does not give its address.
pub fn resolve_loop(names: &Path, count: usize) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(names)?;
    let mut out = String::new();
    for line in text.lines().take(count) {
        let (name, want) = line
            .split_once(' ')
            .with_context(|| format!("{}: not `name address`", names.display()))?;
        let want: IpAddr = want.parse()?;
        let started = Instant::now();
        // glibc's getaddrinfo, AF_UNSPEC: A and AAAA through the search list.
        let got: Vec<SocketAddr> = (name, 0)
            .to_socket_addrs()
            .with_context(|| format!("resolving {name}"))?
            .collect();
        let took = started.elapsed();
        if !got.iter().any(|a| a.ip() == want) {
            bail!("{name} resolved to {got:?}, not {want}");
        }
        writeln!(out, "{}", took.as_micros())?;
    }
    print!("{out}");
    Ok(())
}
