//! Intercept mode, through the real path: a node with pods on veths (routed, as Calico wires
//! them), the kube-dns Service's cluster IP carried by a kube-proxy stand-in (nftables DNAT to
//! two "CoreDNS" pods running unbound) or by plain routing, and the agent answering that cluster
//! IP with no address, route or rule of its own for it. Pods ask the cluster IP; the kernel
//! answers what it holds, the agent the rest; when the agent dies or hangs, kube-dns answers.
//!
//! Needs root, nftables, iptables and unbound (`cargo xtask setup` installs them).

mod support;

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, ResponseCode},
    rr::RecordType,
};
use support::{Agent, Client, Netns, answers, run, servers::Server, unique, wait::eventually};

/// The kube-dns Service's cluster IP.
const KUBE_DNS: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// The agent's own listen address: where the kernel steers what it does not answer.
const LISTEN: Ipv4Addr = Ipv4Addr::new(169, 254, 20, 10);
/// The pods' gateway, on the node (as Calico's 169.254.1.1).
const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
const COREDNS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(203, 0, 113, 11),
    Ipv4Addr::new(203, 0, 113, 12),
];

/// What kube-dns (the unbound pods) and the example cluster both say.
const WEB: (&str, &str) = ("web.shop.svc.cluster.local", "10.96.10.20");
const EXTERNAL: (&str, &str) = ("www.example.org", "203.0.113.80");
/// A pod record: synthesised by the agent per query (never in the kernel), answered by
/// kube-dns too (unbound's local data here).
const POD: (&str, &str) = ("10-244-1-21.shop.pod.cluster.local", "10.244.1.21");

/// One pod: a namespace with a veth to the node, its address routed by the node.
struct Pod {
    ns: Netns,
}

/// How queries to the cluster IP reach kube-dns without the agent.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ServicePath {
    /// nftables DNAT in the node namespace, as kube-proxy's nftables mode.
    KubeProxy,
    /// No Service proxy: the cluster IP is routed to the first CoreDNS pod, which has it.
    Routing,
}

struct Cluster {
    node: Netns,
    /// Prefix of the host-side veth names: the agent's --interface-pattern.
    prefix: String,
    pods: Vec<Pod>,
    _coredns: Vec<(Pod, Server)>,
}

impl Cluster {
    fn new(path: ServicePath) -> Self {
        support::require_root();
        for (tool, package) in [("nft", "nftables"), ("iptables-save", "iptables")] {
            assert!(
                Command::new(tool).arg("--version").output().is_ok(),
                "`{tool}` is missing: `apt-get install {package}` (`cargo xtask setup` does)"
            );
        }
        let node = Netns::new("xn");
        node.ip(&["addr", "add", &format!("{GATEWAY}/32"), "dev", "lo"]);
        sysctl(&node, "net.ipv4.ip_forward=1");
        let prefix = unique("xi");
        let mut next = 0;
        let mut pod = |addr: Ipv4Addr| {
            next += 1;
            plug(&node, &format!("{prefix}{next}"), addr)
        };
        let pods = vec![
            pod(Ipv4Addr::new(192, 0, 2, 21)),
            pod(Ipv4Addr::new(192, 0, 2, 22)),
        ];
        let coredns = COREDNS
            .iter()
            .enumerate()
            .map(|(i, &addr)| {
                let p = pod(addr);
                let mut listen = vec![addr];
                if path == ServicePath::Routing && i == 0 {
                    p.ns.ip(&["addr", "add", &format!("{KUBE_DNS}/32"), "dev", "lo"]);
                    listen.push(KUBE_DNS);
                }
                let server = kube_dns(&p.ns, &listen);
                (p, server)
            })
            .collect();
        match path {
            ServicePath::KubeProxy => kube_proxy(&node),
            ServicePath::Routing => node.ip(&[
                "route",
                "add",
                &format!("{KUBE_DNS}/32"),
                "via",
                &COREDNS[0].to_string(),
            ]),
        }
        Self {
            node,
            prefix,
            pods,
            _coredns: coredns,
        }
    }

    fn agent_args(&self, grace: &str) -> Vec<String> {
        [
            "run",
            "--zone-file",
            &support::example_cluster().display().to_string(),
            "--listen",
            &LISTEN.to_string(),
            "--intercept",
            &KUBE_DNS.to_string(),
            "--interface-pattern",
            &format!("{}*", self.prefix),
            "--upstream",
            &COREDNS[0].to_string(),
            "--kernel-grace",
            grace,
        ]
        .map(String::from)
        .to_vec()
    }

    fn agent(&self, pin: &Path, grace: &str) -> Agent {
        Agent::start_in(&self.node, self.agent_args(grace), pin.to_path_buf(), 9253)
    }

    fn client(&self, pod: usize, timeout: Duration) -> Client {
        Client::with_timeout(&self.pods[pod].ns, IpAddr::V4(KUBE_DNS), timeout)
    }

    /// What the node has that an agent could change: rules of both firewalls, addresses.
    fn state(&self) -> NodeState {
        let out = |program: &str, args: &[&str]| {
            let o = self
                .node
                .command(program)
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("{program}: {e}"));
            assert!(o.status.success(), "{program} {args:?} failed");
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        NodeState {
            nft: out("nft", &["list", "ruleset"]),
            iptables: out("iptables-save", &[])
                .lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>()
                .join("\n"),
            addresses: out("ip", &["-o", "addr", "show"])
                .lines()
                .map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    format!("{} {} {}", f[1], f[2], f[3])
                })
                .collect(),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct NodeState {
    nft: String,
    iptables: String,
    addresses: Vec<String>,
}

fn sysctl(ns: &Netns, setting: &str) {
    let ok = ns
        .command("sysctl")
        .args(["-q", "-w", setting])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "sysctl -w {setting} in {}", ns.name);
}

/// A pod at `addr` behind the node's interface `host_if`, Calico's way: a /32 on the pod's
/// side, a route per pod on the node, the pod's default route via the node's link-local
/// gateway (which the node answers ARP for, as it is one of its own addresses).
fn plug(node: &Netns, host_if: &str, addr: Ipv4Addr) -> Pod {
    let ns = Netns::new("xp");
    let pod_if = unique("xq");
    run(
        "ip",
        &[
            "link", "add", host_if, "netns", &node.name, "type", "veth", "peer", "name", &pod_if,
            "netns", &ns.name,
        ],
    );
    node.ip(&["link", "set", host_if, "up"]);
    node.ip(&["route", "add", &format!("{addr}/32"), "dev", host_if]);
    ns.ip(&["addr", "add", &format!("{addr}/32"), "dev", &pod_if]);
    ns.ip(&["link", "set", &pod_if, "up"]);
    ns.ip(&["route", "add", &format!("{GATEWAY}/32"), "dev", &pod_if]);
    ns.ip(&["route", "add", "default", "via", &GATEWAY.to_string()]);
    Pod { ns }
}

/// A "CoreDNS" pod: unbound answering the cluster's names and the outside name from local
/// data (no recursion: nothing leaves the namespace).
fn kube_dns(ns: &Netns, listen: &[Ipv4Addr]) -> Server {
    let data = [
        format!("{} 5 IN A {}", WEB.0, WEB.1),
        format!("{} 5 IN A {}", EXTERNAL.0, EXTERNAL.1),
        format!("{} 5 IN A {}", POD.0, POD.1),
    ];
    let data: Vec<&str> = data.iter().map(String::as_str).collect();
    let more: String = listen[1..]
        .iter()
        .map(|a| format!("  interface: {a}\n"))
        .collect();
    Server::unbound_with(ns, listen[0], &data, &[], &more, false)
}

/// kube-proxy's nftables mode, reduced to the kube-dns Service: DNAT of the cluster IP to the
/// endpoints, in turn, for pods' traffic and the node's own.
fn kube_proxy(node: &Netns) {
    let rule = format!(
        "ip daddr {KUBE_DNS} meta l4proto {{ tcp, udp }} th dport 53 \
         dnat to numgen inc mod 2 map {{ 0 : {}, 1 : {} }}",
        COREDNS[0], COREDNS[1]
    );
    let ruleset = format!(
        "table ip kube-proxy-test {{\n\
         \tchain services {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\t{rule}\n\t}}\n\
         \tchain services-out {{\n\t\ttype nat hook output priority -100; policy accept;\n\t\t{rule}\n\t}}\n\
         }}\n"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("kube-proxy.nft");
    std::fs::write(&file, ruleset).expect("ruleset");
    let ok = node
        .command("nft")
        .arg("-f")
        .arg(&file)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "nft -f {}", file.display());
}

fn a_of(m: &Message) -> Vec<String> {
    answers(m)
        .into_iter()
        .filter_map(|a| a.strip_prefix("A ").map(str::to_string))
        .collect()
}

fn ask(client: &Client, name: &str) -> Option<Message> {
    let q = support::query_message(name, RecordType::A, false);
    let reply = client.exchange_raw(&q.to_vec().expect("encode"))?;
    Message::from_vec(&reply).ok()
}

fn assert_answer(client: &Client, (name, ip): (&str, &str)) {
    let m = ask(client, name).unwrap_or_else(|| panic!("no answer to {name}"));
    assert_eq!(
        m.metadata.response_code,
        ResponseCode::NoError,
        "{name}: {m:?}"
    );
    assert_eq!(a_of(&m), vec![ip.to_string()], "{name}");
}

fn counter(agent: &Agent, name: &str) -> u64 {
    agent.kernel_counters()[name]
}

#[test]
fn pods_asking_the_kube_dns_address_are_answered_by_the_kernel_and_the_agent() {
    let cluster = Cluster::new(ServicePath::KubeProxy);
    let before = cluster.state();
    let pin = PathBuf::from("/sys/fs/bpf").join(unique("xdns-i"));
    let agent = cluster.agent(&pin, "30s");
    let during = cluster.state();

    for pod in 0..cluster.pods.len() {
        let client = cluster.client(pod, Duration::from_secs(3));
        // The client's socket takes replies from the cluster IP only: every answer below came
        // from the address the pod asked.
        let kernel = counter(&agent, "answered");
        assert_answer(&client, WEB);
        assert_eq!(
            counter(&agent, "answered"),
            kernel + 1,
            "the kernel answered {}",
            WEB.0
        );

        let (steered, restored) = (
            counter(&agent, "steered"),
            counter(&agent, "egress_restored"),
        );
        assert_answer(&client, EXTERNAL);
        assert_answer(&client, POD);
        assert_eq!(
            counter(&agent, "steered"),
            steered + 2,
            "both steered to the agent"
        );
        assert_eq!(
            counter(&agent, "egress_restored"),
            restored + 2,
            "both replies given the cluster IP back"
        );
    }
    assert!(agent.forwarded() >= 1, "the outside name went upstream");
    assert_eq!(counter(&agent, "left_to_service"), 0);

    // TCP is not intercepted: it reaches kube-dns through the Service proxy.
    let q = support::query_message(WEB.0, RecordType::A, false);
    let tcp = cluster
        .client(0, Duration::from_secs(3))
        .query_tcp(&q.to_vec().expect("encode"));
    let tcp = Message::from_vec(&tcp).expect("a TCP answer");
    assert_eq!(a_of(&tcp), vec![WEB.1.to_string()]);

    // No rule of either firewall, and no address but the agent's own listen address.
    assert_eq!(during.nft, before.nft, "nftables ruleset changed");
    assert_eq!(during.iptables, before.iptables, "iptables rules changed");
    let added: Vec<&String> = during
        .addresses
        .iter()
        .filter(|a| !before.addresses.contains(a))
        .collect();
    assert_eq!(
        added,
        vec![&format!("lo inet {LISTEN}/32")],
        "the only address added is the listen address (this kernel has no dummy driver)"
    );
    assert!(
        !during
            .addresses
            .iter()
            .any(|a| a.contains(&KUBE_DNS.to_string())),
        "the cluster IP is never a local address"
    );

    let mut agent = agent;
    agent.stop();
    assert_eq!(cluster.state(), before, "the node after a clean stop");
}

/// A pod asking every few milliseconds, in turn a name the kernel answers and two it steers to
/// the agent, each answer checked. The longest time without an answer, for each name, is what
/// a pod resolving that name feels.
struct Asker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Record>>,
}

const NAMES: [(&str, &str); 3] = [WEB, EXTERNAL, POD];

#[derive(Debug, Default)]
struct Record {
    asked: u64,
    answered: u64,
    wrong: Vec<String>,
    /// For each of [`NAMES`], the longest stretch without an answer to it.
    longest_gap: [Duration; 3],
}

impl Record {
    fn worst_gap(&self) -> Duration {
        self.longest_gap.iter().copied().max().unwrap_or_default()
    }
}

impl Asker {
    fn start(cluster: &Cluster, pod: usize) -> Self {
        let client = cluster.client(pod, Duration::from_millis(100));
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut r = Record::default();
            let mut last = [Instant::now(); 3];
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut n = 0usize;
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                let k = n % NAMES.len();
                let (name, ip) = NAMES[k];
                n += 1;
                r.asked += 1;
                if let Some(m) = ask(&client, name) {
                    if m.metadata.response_code == ResponseCode::NoError && a_of(&m) == [ip] {
                        r.answered += 1;
                        r.longest_gap[k] = r.longest_gap[k].max(last[k].elapsed());
                        last[k] = Instant::now();
                    } else {
                        r.wrong.push(format!("{name}: {m:?}"));
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            for (gap, last) in r.longest_gap.iter_mut().zip(last) {
                *gap = (*gap).max(last.elapsed());
            }
            r
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Record {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().expect("running").join().expect("asker")
    }
}

/// Runs `event` while a pod asks, and returns what the pod saw.
fn while_asking(cluster: &Cluster, what: &str, event: impl FnOnce()) -> Record {
    let asker = Asker::start(cluster, 0);
    std::thread::sleep(Duration::from_millis(500));
    event();
    std::thread::sleep(Duration::from_millis(1500));
    let r = asker.finish();
    eprintln!(
        "{what}: longest gap without an answer: {:?} ({} {:?}, {} {:?}, {} {:?}); {} of {} answered",
        r.worst_gap(),
        NAMES[0].0,
        r.longest_gap[0],
        NAMES[1].0,
        r.longest_gap[1],
        NAMES[2].0,
        r.longest_gap[2],
        r.answered,
        r.asked
    );
    assert!(r.wrong.is_empty(), "{what}: wrong answers: {:?}", r.wrong);
    assert!(r.answered > 100, "{what}: {r:?}");
    assert!(r.worst_gap() <= MAX_GAP, "{what}: {r:?}");
    r
}

const MAX_GAP: Duration = Duration::from_secs(1);

#[test]
fn a_killed_or_hung_agent_leaves_kube_dns_answering_within_a_second() {
    let cluster = Cluster::new(ServicePath::KubeProxy);
    let pin = PathBuf::from("/sys/fs/bpf").join(unique("xdns-i"));
    let grace = Duration::from_secs(3);
    let mut first = cluster.agent(&pin, "3s");

    // SIGKILL: the socket is gone at once, and with it the steering.
    while_asking(&cluster, "SIGKILL", || first.kill());

    // Past the grace period the kernel answers nothing more from its frozen maps: kube-dns
    // answers the cluster's names too.
    std::thread::sleep(grace);
    let counters = dns_agent::kernel::read_pinned_counters(&pin).expect("pinned counters");
    let answered = |c: &[(&str, u64)]| c.iter().find(|(n, _)| *n == "answered").map(|(_, v)| *v);
    let down = |c: &[(&str, u64)]| {
        c.iter()
            .find(|(n, _)| *n == "pass_agent_down")
            .map(|(_, v)| *v)
    };
    let client = cluster.client(1, Duration::from_secs(3));
    assert_answer(&client, WEB);
    let after = dns_agent::kernel::read_pinned_counters(&pin).expect("pinned counters");
    assert_eq!(
        answered(&after),
        answered(&counters),
        "the kernel answered after the grace"
    );
    assert!(down(&after) > down(&counters), "passed as agent down");

    // A new agent takes over without losing a query, and the kernel answers again.
    let mut second = None;
    while_asking(&cluster, "restart after SIGKILL", || {
        second = Some(cluster.agent(&pin, "3s"))
    });
    let second = second.expect("started");
    let kernel = counter(&second, "answered");
    assert_answer(&client, WEB);
    assert_eq!(
        counter(&second, "answered"),
        kernel + 1,
        "the kernel answers again"
    );

    // SIGSTOP: the socket stays but nothing reads it; the heartbeat goes stale.
    while_asking(&cluster, "SIGSTOP", || second.signal(libc::SIGSTOP));
    assert!(
        counter(&second, "left_to_service") > 0,
        "queries left to the Service"
    );
    second.signal(libc::SIGCONT);
    let steered = counter(&second, "steered");
    eventually(
        "steering resumes after SIGCONT",
        Duration::from_secs(5),
        || {
            ask(&client, EXTERNAL.0)?;
            (counter(&second, "steered") > steered).then_some(())
        },
    );

    // A clean restart: the new agent starts beside the old one and takes over.
    let mut second = second;
    let mut third = None;
    while_asking(&cluster, "clean restart", || {
        let pin3 = pin.clone();
        let t = Agent::start_in(&cluster.node, cluster.agent_args("3s"), pin3, 9254);
        second.stop();
        third = Some(t);
    });
    drop(third);
    drop(first);
}

#[test]
fn without_a_service_proxy_the_routed_kube_dns_answers_when_the_agent_is_gone() {
    let cluster = Cluster::new(ServicePath::Routing);
    let pin = PathBuf::from("/sys/fs/bpf").join(unique("xdns-i"));
    let mut agent = cluster.agent(&pin, "30s");
    let client = cluster.client(0, Duration::from_secs(3));
    let steered = counter(&agent, "steered");
    assert_answer(&client, EXTERNAL);
    assert_eq!(counter(&agent, "steered"), steered + 1);

    while_asking(&cluster, "SIGKILL, kube-dns routed", || agent.kill());
    assert_answer(&client, POD);
}
