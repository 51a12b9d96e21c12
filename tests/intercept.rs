//! Intercept mode, through the real path: a node with pods on veths (routed, as Calico wires
//! them), the kube-dns Service's cluster IP carried by a kube-proxy stand-in (nftables DNAT to
//! two "CoreDNS" pods running unbound) or by plain routing, and the agent answering that cluster
//! IP with no address, route or rule of its own for it. Pods ask the cluster IP; the kernel
//! answers what it holds, the agent the rest; when the agent dies or hangs, kube-dns answers.
//!
//! Needs root, nftables, iptables and unbound (`cargo xtask setup` installs them).

mod support;

use std::{
    path::{Path, PathBuf},
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
use support::{
    Agent, Client, answers,
    kube_node::{COREDNS, Cluster, KUBE_DNS, LISTEN, ServicePath},
    unique,
    wait::eventually,
};

/// What kube-dns (the unbound pods) and the example cluster both say.
const WEB: (&str, &str) = ("web.shop.svc.cluster.local", "10.96.10.20");
const EXTERNAL: (&str, &str) = ("www.example.org", "203.0.113.80");
/// A pod record: synthesised by the agent per query (never in the kernel), answered by
/// kube-dns too (unbound's local data here).
const POD: (&str, &str) = ("10-244-1-21.shop.pod.cluster.local", "10.244.1.21");

/// What the CoreDNS pods answer besides the names below `whoami.test`.
fn coredns_data() -> Vec<String> {
    vec![
        format!("{} 5 IN A {}", WEB.0, WEB.1),
        format!("{} 5 IN A {}", EXTERNAL.0, EXTERNAL.1),
        format!("{} 5 IN A {}", POD.0, POD.1),
    ]
}

impl Cluster {
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
            &self.interface_pattern(),
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

#[test]
fn pods_asking_the_kube_dns_address_are_answered_by_the_kernel_and_the_agent() {
    let cluster = Cluster::new(ServicePath::KubeProxy, &coredns_data());
    let before = cluster.state();
    let pin = PathBuf::from("/sys/fs/bpf").join(unique("xdns-i"));
    let agent = cluster.agent(&pin, "30s");
    let during = cluster.state();

    for pod in 0..cluster.pods.len() {
        let client = cluster.client(pod, Duration::from_secs(3));
        // The client's socket takes replies from the cluster IP only: every answer below came
        // from the address the pod asked.
        let kernel = agent.kernel_counter("answered");
        assert_answer(&client, WEB);
        assert_eq!(
            agent.kernel_counter("answered"),
            kernel + 1,
            "the kernel answered {}",
            WEB.0
        );

        // The outside name: steered to the agent the first time, then (once the agent's
        // cache is in the kernel, within milliseconds) answered by the kernel as well.
        let (steered, restored, cached) = (
            agent.kernel_counter("steered"),
            agent.kernel_counter("egress_restored"),
            agent.kernel_counter("answered_cached"),
        );
        assert_answer(&client, EXTERNAL);
        let by_kernel = agent.kernel_counter("answered_cached") - cached;
        assert_eq!(
            (agent.kernel_counter("steered") - steered) + by_kernel,
            1,
            "{} steered to the agent or answered from the kernel's cache",
            EXTERNAL.0
        );
        if pod == 0 {
            assert_eq!(
                by_kernel, 0,
                "asked for the first time: the agent forwards it"
            );
        }
        let steered = agent.kernel_counter("steered");
        assert_answer(&client, POD);
        assert_eq!(
            agent.kernel_counter("steered"),
            steered + 1,
            "the pod name steered to the agent"
        );
        assert_eq!(
            agent.kernel_counter("egress_restored") - restored,
            2 - by_kernel,
            "every reply of the agent given the cluster IP back"
        );
    }
    assert!(agent.forwarded() >= 1, "the outside name went upstream");
    assert_eq!(agent.kernel_counter("left_to_service"), 0);

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
    let cluster = Cluster::new(ServicePath::KubeProxy, &coredns_data());
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
    let kernel = second.kernel_counter("answered");
    assert_answer(&client, WEB);
    assert_eq!(
        second.kernel_counter("answered"),
        kernel + 1,
        "the kernel answers again"
    );

    // SIGSTOP: the socket stays but nothing reads it; the heartbeat goes stale.
    while_asking(&cluster, "SIGSTOP", || second.signal(libc::SIGSTOP));
    assert!(
        second.kernel_counter("left_to_service") > 0,
        "queries left to the Service"
    );
    second.signal(libc::SIGCONT);
    let steered = second.kernel_counter("steered");
    eventually(
        "steering resumes after SIGCONT",
        Duration::from_secs(5),
        || {
            ask(&client, EXTERNAL.0)?;
            (second.kernel_counter("steered") > steered).then_some(())
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
    let cluster = Cluster::new(ServicePath::Routing, &coredns_data());
    let pin = PathBuf::from("/sys/fs/bpf").join(unique("xdns-i"));
    let mut agent = cluster.agent(&pin, "30s");
    let client = cluster.client(0, Duration::from_secs(3));
    let steered = agent.kernel_counter("steered");
    assert_answer(&client, EXTERNAL);
    assert_eq!(agent.kernel_counter("steered"), steered + 1);

    while_asking(&cluster, "SIGKILL, kube-dns routed", || agent.kill());
    assert_answer(&client, POD);
}
