//! A Kubernetes node in namespaces: pods on routed veths (as Calico wires them), the kube-dns
//! Service's cluster IP carried by a kube-proxy stand-in (nftables DNAT to two "CoreDNS" pods
//! running unbound) or by plain routing. The agent runs in the node's namespace with its XDP
//! program on the pods' veths (`--interface-pattern`); more pods (more DNS servers) can be
//! plugged in as a test needs them.
//!
//! Needs root, nftables, iptables and unbound (`cargo xtask setup` installs them).

use std::{
    cell::Cell,
    net::{IpAddr, Ipv4Addr},
    process::Command,
    time::Duration,
};

use super::{Client, Netns, run, servers::Server, unique};

/// The kube-dns Service's cluster IP.
pub const KUBE_DNS: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// The agent's own listen address: where the kernel steers what it does not answer.
pub const LISTEN: Ipv4Addr = Ipv4Addr::new(169, 254, 20, 10);
/// The pods' gateway, on the node (as Calico's 169.254.1.1).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The "CoreDNS" pods: the kube-dns Service's endpoints.
pub const COREDNS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(203, 0, 113, 11),
    Ipv4Addr::new(203, 0, 113, 12),
];
/// Every name below it is answered by each DNS pod with the pod's own address (as CoreDNS's
/// `whoami`): the answer says which pod answered.
pub const WHOAMI: &str = "whoami.test";

/// One pod: a namespace with a veth to the node, its address routed by the node.
pub struct Pod {
    pub ns: Netns,
    pub addr: Ipv4Addr,
}

/// How queries to the cluster IP reach kube-dns without the agent.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ServicePath {
    /// nftables DNAT in the node namespace, as kube-proxy's nftables mode.
    KubeProxy,
    /// No Service proxy: the cluster IP is routed to the first CoreDNS pod, which has it.
    Routing,
}

pub struct Cluster {
    pub node: Netns,
    /// Prefix of the host-side veth names: the agent's --interface-pattern.
    pub prefix: String,
    /// Client pods.
    pub pods: Vec<Pod>,
    /// The CoreDNS pods, at [`COREDNS`].
    pub coredns: Vec<(Pod, Server)>,
    plugged: Cell<usize>,
}

impl Cluster {
    /// Two client pods, and two CoreDNS pods answering `coredns_data` (unbound `local-data`
    /// lines) and the [`WHOAMI`] names.
    pub fn new(path: ServicePath, coredns_data: &[String]) -> Self {
        super::require_root();
        for (tool, package) in [("nft", "nftables"), ("iptables-save", "iptables")] {
            assert!(
                Command::new(tool).arg("--version").output().is_ok(),
                "`{tool}` is missing: `apt-get install {package}` (`cargo xtask setup` does)"
            );
        }
        let node = Netns::new("xn");
        node.ip(&["addr", "add", &format!("{GATEWAY}/32"), "dev", "lo"]);
        sysctl(&node, "net.ipv4.ip_forward=1");
        let mut cluster = Self {
            node,
            prefix: unique("xi"),
            pods: Vec::new(),
            coredns: Vec::new(),
            plugged: Cell::new(0),
        };
        cluster.pods = vec![
            cluster.plug(Ipv4Addr::new(192, 0, 2, 21)),
            cluster.plug(Ipv4Addr::new(192, 0, 2, 22)),
        ];
        cluster.coredns = COREDNS
            .iter()
            .enumerate()
            .map(|(i, &addr)| {
                let p = cluster.plug(addr);
                let mut listen = vec![addr];
                if path == ServicePath::Routing && i == 0 {
                    p.ns.ip(&["addr", "add", &format!("{KUBE_DNS}/32"), "dev", "lo"]);
                    listen.push(KUBE_DNS);
                }
                let server = dns_server(&p, &listen, coredns_data);
                (p, server)
            })
            .collect();
        match path {
            ServicePath::KubeProxy => kube_proxy(&cluster.node),
            ServicePath::Routing => cluster.node.ip(&[
                "route",
                "add",
                &format!("{KUBE_DNS}/32"),
                "via",
                &COREDNS[0].to_string(),
            ]),
        }
        cluster
    }

    /// A pod at `addr` behind a new interface of the node, Calico's way: a /32 on the pod's
    /// side, a route per pod on the node, the pod's default route via the node's link-local
    /// gateway (which the node answers ARP for, as it is one of its own addresses).
    pub fn plug(&self, addr: Ipv4Addr) -> Pod {
        let n = self.plugged.get() + 1;
        self.plugged.set(n);
        let host_if = format!("{}{n}", self.prefix);
        let ns = Netns::new("xp");
        let pod_if = unique("xq");
        run(
            "ip",
            &[
                "link",
                "add",
                &host_if,
                "netns",
                &self.node.name,
                "type",
                "veth",
                "peer",
                "name",
                &pod_if,
                "netns",
                &ns.name,
            ],
        );
        self.node.ip(&["link", "set", &host_if, "up"]);
        self.node
            .ip(&["route", "add", &format!("{addr}/32"), "dev", &host_if]);
        ns.ip(&["addr", "add", &format!("{addr}/32"), "dev", &pod_if]);
        ns.ip(&["link", "set", &pod_if, "up"]);
        ns.ip(&["route", "add", &format!("{GATEWAY}/32"), "dev", &pod_if]);
        ns.ip(&["route", "add", "default", "via", &GATEWAY.to_string()]);
        Pod { ns, addr }
    }

    /// Another DNS server pod at `addr` (unbound, answering `local_data` and the [`WHOAMI`]
    /// names).
    pub fn dns_pod(&self, addr: Ipv4Addr, local_data: &[String]) -> (Pod, Server) {
        let pod = self.plug(addr);
        let server = dns_server(&pod, &[addr], local_data);
        (pod, server)
    }

    /// The `--interface-pattern` that matches every pod's veth.
    pub fn interface_pattern(&self) -> String {
        format!("{}*", self.prefix)
    }

    /// A client in client pod `pod`, asking the kube-dns cluster IP.
    pub fn client(&self, pod: usize, timeout: Duration) -> Client {
        Client::with_timeout(&self.pods[pod].ns, IpAddr::V4(KUBE_DNS), timeout)
    }

    /// What the node has that an agent could change: rules of both firewalls, addresses.
    pub fn state(&self) -> NodeState {
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
pub struct NodeState {
    pub nft: String,
    pub iptables: String,
    pub addresses: Vec<String>,
}

fn sysctl(ns: &Netns, setting: &str) {
    let ok = ns
        .command("sysctl")
        .args(["-q", "-w", setting])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "sysctl -w {setting} in {}", ns.name);
}

/// unbound in `pod`, on `listen`, answering from local data only (no recursion: nothing
/// leaves the namespace), and every name below [`WHOAMI`] with the pod's own address.
fn dns_server(pod: &Pod, listen: &[Ipv4Addr], local_data: &[String]) -> Server {
    let data: Vec<&str> = local_data.iter().map(String::as_str).collect();
    let mut extra: String = listen[1..]
        .iter()
        .map(|a| format!("  interface: {a}\n"))
        .collect();
    extra.push_str(&format!(
        "  local-zone: \"{WHOAMI}.\" redirect\n  local-data: \"{WHOAMI}. 300 IN A {}\"\n",
        pod.addr
    ));
    Server::unbound_with(&pod.ns, listen[0], &data, &[], &extra, false)
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
