//! `cargo xtask demo`: xdns on the example cluster, no Kubernetes needed.
//!
//! A node namespace and a pod namespace joined by a veth pair, as a CNI makes them; the agent
//! in the node namespace with its XDP program on the host side of the veth, serving
//! deploy/examples/cluster.yaml; dnsmasq as the upstream for names outside the cluster (there
//! is no internet here). Queries go from the pod's namespace; each answer is shown with the
//! path that answered it and its latency.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::maps::{MapData, PerCpuArray};
use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query},
    rr::{Name, RecordType},
};

use crate::{
    netns::{self, Netns},
    util::{cmd, require_root, root, run},
};

const LISTEN: Ipv4Addr = Ipv4Addr::new(169, 254, 20, 10);
const UPSTREAM: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);
/// The kube-dns Service's cluster IP, intercepted.
const KUBE_DNS: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// The "CoreDNS" pod behind it (dnsmasq), reached through a kube-proxy stand-in.
const COREDNS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const METRICS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9253);

/// The demo's queries: name, type, what it shows.
const QUERIES: &[(&str, RecordType, &str)] = &[
    (
        "kubernetes.default.svc.cluster.local",
        RecordType::A,
        "ClusterIP Service",
    ),
    (
        "web.shop.svc.cluster.local",
        RecordType::A,
        "dual-stack Service, IPv4",
    ),
    (
        "web.shop.svc.cluster.local",
        RecordType::AAAA,
        "dual-stack Service, IPv6",
    ),
    (
        "_http._tcp.web.shop.svc.cluster.local",
        RecordType::SRV,
        "named port",
    ),
    (
        "postgres.shop.svc.cluster.local",
        RecordType::A,
        "headless: ready endpoints",
    ),
    (
        "postgres-0.postgres.shop.svc.cluster.local",
        RecordType::A,
        "StatefulSet pod",
    ),
    (
        "10.0.96.10.in-addr.arpa",
        RecordType::PTR,
        "reverse of a ClusterIP",
    ),
    (
        "kube-dns.kube-system.svc.cluster.local",
        RecordType::TXT,
        "name exists, type does not",
    ),
    (
        "example.org.shop.svc.cluster.local",
        RecordType::A,
        "search-path expansion",
    ),
    (
        "10-244-1-21.shop.pod.cluster.local",
        RecordType::A,
        "pod record",
    ),
    (
        "payments.shop.svc.cluster.local",
        RecordType::A,
        "ExternalName, chased upstream",
    ),
    ("www.example.org", RecordType::A, "outside the cluster"),
    ("www.example.org", RecordType::A, "again: from the cache"),
    (
        "wEb.sHoP.svc.cluster.local",
        RecordType::A,
        "mixed case, echoed",
    ),
];

pub fn demo() -> anyhow::Result<()> {
    crate::setup::setup(crate::setup::Scope::All)?;
    require_root("the demo")?;
    let root = root();
    run(cmd("cargo")
        .current_dir(&root)
        .args(["build", "--release", "-p", "dns-agent"]))?;
    let agent_bin = root.join("target/release/dns-agent");
    netns::cleanup_on_ctrl_c();
    let result = run_demo(&root, &agent_bin);
    netns::cleanup();
    result
}

fn run_demo(root: &Path, agent_bin: &Path) -> anyhow::Result<()> {
    let id = std::process::id() % 100_000;
    let node = Netns::new(format!("xdns-demo-node-{id}"))?;
    let pod = Netns::new(format!("xdns-demo-pod-{id}"))?;
    let (host_if, pod_if) = (format!("xdemo{id}h"), format!("xdemo{id}p"));
    netns::veth(&node, &host_if, &pod, &pod_if)?;
    node.ip(&["addr", "add", &format!("{LISTEN}/32"), "dev", "lo"])?;
    node.ip(&["addr", "add", &format!("{UPSTREAM}/32"), "dev", "lo"])?;
    node.ip(&["addr", "add", "192.0.2.1/24", "dev", &host_if])?;
    node.ip(&["link", "set", &host_if, "up"])?;
    pod.ip(&["addr", "add", "192.0.2.2/24", "dev", &pod_if])?;
    pod.ip(&["link", "set", &pod_if, "up"])?;
    pod.ip(&["route", "add", &format!("{LISTEN}/32"), "via", "192.0.2.1"])?;

    // The upstream: dnsmasq with local data only.
    node.spawn(
        node.command("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
            ])
            .arg(format!("--listen-address={UPSTREAM}"))
            .args([
                "--address=/example.org/203.0.113.80",
                "--address=/payments.example/203.0.113.81",
            ])
            .args(["--pid-file=", "--log-facility=-"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .context("starting dnsmasq (`cargo xtask setup` installs it)")?;

    kube_dns(&node, &pod, id)?;

    let pin = format!("/sys/fs/bpf/xdns-demo-{id}");
    netns::remove_on_exit(pin.clone().into());
    let log_path = std::env::temp_dir().join(format!("xdns-demo-{id}.log"));
    let agent_args = |log: std::fs::File| -> std::process::Command {
        let mut c = node.command(agent_bin);
        c.arg("run")
            .arg("--zone-file")
            .arg(root.join("deploy/examples/cluster.yaml"))
            .args(["--interface", &host_if, "--listen", &LISTEN.to_string()])
            .args(["--intercept", &KUBE_DNS.to_string(), "--kernel-grace", "3s"])
            .args(["--upstream", &UPSTREAM.to_string(), "--pin-path", &pin])
            .args(["--metrics-addr", &METRICS.to_string()])
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::null())
            .stderr(log);
        c
    };
    let mut agent = start_agent(
        &node,
        agent_args(std::fs::File::create(&log_path)?),
        &log_path,
    )?;
    println!();
    println!(
        "xdns demo: agent in namespace {} with XDP on {host_if}; queries from {}",
        node.name, pod.name
    );
    println!(
        "zone: deploy/examples/cluster.yaml   upstream: dnsmasq at {UPSTREAM}   listen: {LISTEN}"
    );
    println!();
    println!(
        "{:<44} {:<5} {:<9} {:<34} {:<12} {:>9}",
        "QUERY", "TYPE", "RCODE", "ANSWER", "ANSWERED BY", "LATENCY"
    );
    let sock = pod.enter(|| UdpSocket::bind("0.0.0.0:0"))??;
    sock.set_read_timeout(Some(Duration::from_secs(3)))?;
    let counters_path = Path::new(&pin)
        .join(format!("v{}", dns_common::LAYOUT_VERSION))
        .join(dns_common::MAP_COUNTERS);
    for (name, qtype, what) in QUERIES {
        let kernel_before = kernel_answered(&counters_path)?;
        let (user_before, fwd_before, hits_before) = userspace(&node)?;
        let (reply, latency) = query(&sock, name, *qtype)?;
        let kernel = kernel_label(kernel_before, kernel_answered(&counters_path)?);
        let (user, fwd, hits) = userspace(&node)?;
        let by = if let Some(k) = kernel {
            k
        } else if hits > hits_before {
            "cache"
        } else if fwd > fwd_before {
            "upstream"
        } else if user > user_before {
            "userspace"
        } else {
            "?"
        };
        let answer = summarize(&reply);
        println!(
            "{:<44} {:<5} {:<9} {:<34} {:<12} {:>7.0} µs   {what}",
            name,
            qtype.to_string(),
            rcode_name(reply.metadata.response_code.low()),
            answer,
            by,
            latency.as_secs_f64() * 1e6,
        );
    }
    println!();
    println!("kernel counters (dns-agent stats):");
    let out = node
        .command(agent_bin)
        .args([
            "stats",
            "--pin-path",
            &pin,
            "--metrics-addr",
            &METRICS.to_string(),
        ])
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));

    // Intercept mode: the pod asks the kube-dns cluster IP, as its resolv.conf says.
    println!();
    println!(
        "intercept mode: the pod asks the kube-dns Service's cluster IP {KUBE_DNS}; behind it a \
         kube-proxy stand-in (nftables DNAT) and a \"CoreDNS\" pod (dnsmasq at {COREDNS})"
    );
    let ask = |agent_up: bool| -> anyhow::Result<()> {
        for (name, what) in [
            ("web.shop.svc.cluster.local", "cluster name"),
            ("www.example.org", "outside the cluster"),
        ] {
            // The kernel's counters are pinned: they outlive a killed agent.
            let kernel_before = kernel_answered(&counters_path)?;
            let user_before = if agent_up {
                Some(userspace(&node)?)
            } else {
                None
            };
            let (reply, latency) = query_to(&sock, KUBE_DNS, name, RecordType::A)?;
            let kernel = kernel_label(kernel_before, kernel_answered(&counters_path)?);
            let by = if let Some(k) = kernel {
                k
            } else {
                match user_before {
                    None => "kube-dns",
                    Some((u, f, h)) => {
                        let (u2, f2, h2) = userspace(&node)?;
                        if h2 > h {
                            "cache"
                        } else if f2 > f {
                            "upstream"
                        } else if u2 > u {
                            "userspace"
                        } else {
                            "?"
                        }
                    }
                }
            };
            println!(
                "  {:<30} {:<9} {:<16} {:<12} {:>7.0} µs   {what}",
                name,
                rcode_name(reply.metadata.response_code.low()),
                summarize(&reply),
                by,
                latency.as_secs_f64() * 1e6,
            );
        }
        Ok(())
    };
    println!("agent running:");
    ask(true)?;
    agent.kill()?;
    agent.wait()?;
    println!(
        "agent killed (SIGKILL): its socket is gone, nothing is steered to it; the kernel keeps \
         answering cluster names for --kernel-grace (3s here)"
    );
    ask(false)?;
    std::thread::sleep(Duration::from_secs(3));
    println!("--kernel-grace later: the kernel answers nothing from its frozen maps");
    ask(false)?;
    println!("agent started again: it takes the pinned XDP and tc links over");
    let _agent = start_agent(
        &node,
        agent_args(std::fs::File::create(&log_path)?),
        &log_path,
    )?;
    ask(true)?;
    Ok(())
}

/// Starts the agent and waits until it is ready.
fn start_agent(
    node: &Netns,
    mut command: std::process::Command,
    log_path: &Path,
) -> anyhow::Result<std::process::Child> {
    let mut agent = node.spawn(&mut command)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = agent.try_wait()? {
            bail!(
                "dns-agent exited ({status}):\n{}",
                std::fs::read_to_string(log_path).unwrap_or_default()
            );
        }
        if matches!(node.http_get(METRICS, "/ready"), Ok((200, _))) {
            return Ok(agent);
        }
        if Instant::now() > deadline {
            bail!(
                "dns-agent not ready:\n{}",
                std::fs::read_to_string(log_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A "CoreDNS" pod behind the kube-dns cluster IP: dnsmasq with the cluster's names and the
/// outside one, in a namespace of its own on a veth, and kube-proxy's DNAT reduced to one
/// nftables rule. The pod routes the cluster IP to the node, as pods' default routes do.
fn kube_dns(node: &Netns, pod: &Netns, id: u32) -> anyhow::Result<()> {
    let coredns = Netns::new(format!("xdns-demo-dns-{id}"))?;
    let (node_if, dns_if) = (format!("xdemo{id}k"), format!("xdemo{id}d"));
    netns::veth(node, &node_if, &coredns, &dns_if)?;
    node.ip(&["addr", "add", "203.0.113.1/24", "dev", &node_if])?;
    node.ip(&["link", "set", &node_if, "up"])?;
    coredns.ip(&["addr", "add", &format!("{COREDNS}/24"), "dev", &dns_if])?;
    coredns.ip(&["link", "set", &dns_if, "up"])?;
    coredns.ip(&["route", "add", "default", "via", "203.0.113.1"])?;
    pod.ip(&[
        "route",
        "add",
        &format!("{KUBE_DNS}/32"),
        "via",
        "192.0.2.1",
    ])?;
    run(node
        .command("sysctl")
        .args(["-q", "-w", "net.ipv4.ip_forward=1"]))?;
    let rules = format!(
        "table ip xdns-demo-kube-proxy {{\n\tchain services {{\n\t\ttype nat hook prerouting \
         priority dstnat; policy accept;\n\t\tip daddr {KUBE_DNS} meta l4proto {{ tcp, udp }} th \
         dport 53 dnat to {COREDNS}\n\t}}\n}}\n"
    );
    let file = std::env::temp_dir().join(format!("xdns-demo-{id}.nft"));
    std::fs::write(&file, rules)?;
    run(node.command("nft").arg("-f").arg(&file))
        .context("nft (`cargo xtask setup` installs nftables)")?;
    let _ = std::fs::remove_file(&file);
    coredns
        .spawn(
            coredns
                .command("dnsmasq")
                .args([
                    "--keep-in-foreground",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                ])
                .arg(format!("--listen-address={COREDNS}"))
                .args([
                    "--address=/web.shop.svc.cluster.local/10.96.10.20",
                    "--address=/example.org/203.0.113.80",
                ])
                .args(["--pid-file=", "--log-facility=-"])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .context("starting dnsmasq")?;
    Ok(())
}

fn query(sock: &UdpSocket, name: &str, qtype: RecordType) -> anyhow::Result<(Message, Duration)> {
    query_to(sock, LISTEN, name, qtype)
}

fn query_to(
    sock: &UdpSocket,
    server: Ipv4Addr,
    name: &str,
    qtype: RecordType,
) -> anyhow::Result<(Message, Duration)> {
    let mut m = Message::new(rand::random(), MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(format!("{name}."))?, qtype));
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    m.set_edns(edns);
    let bytes = m.to_vec()?;
    let server = SocketAddr::new(IpAddr::V4(server), 53);
    let mut buf = vec![0u8; 65535];
    let start = Instant::now();
    sock.send_to(&bytes, server)?;
    // Only the address asked may answer: a reply from anywhere else is no answer.
    let n = loop {
        let (n, from) = sock
            .recv_from(&mut buf)
            .with_context(|| format!("no answer to {name} {qtype}"))?;
        if from == server {
            break n;
        }
    };
    let latency = start.elapsed();
    Ok((Message::from_vec(&buf[..n])?, latency))
}

fn rcode_name(rcode: u8) -> &'static str {
    match rcode {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        _ => "other",
    }
}

fn summarize(m: &Message) -> String {
    let mut parts: Vec<String> = m.answers.iter().map(|r| r.data.to_string()).collect();
    if parts.is_empty() && !m.authorities.is_empty() {
        parts.push("(SOA in authority)".into());
    }
    let s = parts.join(", ");
    if s.chars().count() > 34 {
        format!("{}…", s.chars().take(33).collect::<String>())
    } else {
        s
    }
}

/// (answered by the XDP program from the zone, answered from its copy of the cache).
fn kernel_answered(path: &Path) -> anyhow::Result<(u64, u64)> {
    let data = MapData::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    let map = PerCpuArray::<MapData, u64>::try_from(aya::maps::Map::PerCpuArray(data))?;
    let sum = |counters: &[u32]| -> anyhow::Result<u64> {
        let mut total = 0;
        for i in counters {
            total += map.get(i, 0)?.iter().sum::<u64>();
        }
        Ok(total)
    };
    use dns_common::counter::*;
    Ok((
        sum(&[ANSWERED, ANSWERED_NODATA, ANSWERED_NXDOMAIN])?,
        sum(&[ANSWERED_CACHED, ANSWERED_AUTOPATH])?,
    ))
}

/// Who answered, by the kernel's counters before and after a query: "kernel" (the zone),
/// "kernel cache" (its copy of the agent's cache), or `None` (not the kernel).
fn kernel_label(before: (u64, u64), after: (u64, u64)) -> Option<&'static str> {
    if after.0 > before.0 {
        Some("kernel")
    } else if after.1 > before.1 {
        Some("kernel cache")
    } else {
        None
    }
}

/// (answered by userspace from the zone, forwarded or from the cache, cache hits), from the
/// agent's metrics.
fn userspace(node: &Netns) -> anyhow::Result<(u64, u64, u64)> {
    let (_, body) = node.http_get(METRICS, "/metrics")?;
    let get = |series: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let hits = body
        .lines()
        .filter(|l| l.starts_with("coredns_cache_hits_total{"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<u64>().ok()))
        .sum();
    Ok((
        get("xdns_queries_total{path=\"userspace\"}"),
        get("xdns_queries_total{path=\"forwarded\"}"),
        hits,
    ))
}
