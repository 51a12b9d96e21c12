//! Least privilege, through the real path: the agent run with exactly the capabilities
//! deploy/daemonset.yaml grants (setpriv), serving, intercepting and attaching; without any one of
//! them, stopping at start with a message that names it; and once serving, every one of its
//! threads holding CAP_BPF and CAP_NET_ADMIN and nothing else.
//!
//! Needs root and util-linux (setpriv, prlimit, unshare); `cargo xtask setup` installs it.

mod support;

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use hickory_proto::rr::RecordType;
use support::{
    Agent, Client, LISTEN_V4, LISTEN_V6, Topology, answers, example_cluster, unique,
    wait::{Want, await_kernel, eventually},
};

/// Capability numbers, from linux/capability.h.
const CAP_NET_BIND_SERVICE: u32 = 10;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// What a serving agent keeps.
const SERVING: u64 = 1 << CAP_BPF | 1 << CAP_NET_ADMIN;

/// The kube-dns Service's cluster IP, in intercept mode.
const KUBE_DNS: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);

fn require_util_linux() {
    support::require_root();
    for tool in ["setpriv", "prlimit", "unshare"] {
        assert!(
            Command::new(tool).arg("--version").output().is_ok(),
            "`{tool}` is missing: `apt-get install util-linux` (`cargo xtask setup` does)"
        );
    }
}

/// The capabilities the DaemonSet's agent container is given, as written there (`BPF`, ...),
/// after checking that it drops every other.
fn daemonset_capabilities() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/daemonset.yaml");
    let ds: serde_json::Value = serde_saphyr::from_str(&text).expect("the DaemonSet parses");
    let agent = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == "agent")
        .expect("a container named agent");
    let caps = &agent["securityContext"]["capabilities"];
    assert_eq!(
        caps["drop"],
        serde_json::json!(["ALL"]),
        "the DaemonSet drops every capability it does not add"
    );
    assert_ne!(
        agent["securityContext"]["privileged"],
        serde_json::json!(true),
        "the agent is not privileged"
    );
    caps["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|c| c.as_str().expect("a capability name").to_string())
        .collect()
}

/// `setpriv` running the agent as root with exactly `caps` (names as in the DaemonSet): the
/// bounding set limits what root's execve gives, and nothing is inherited or ambient.
fn with_only(caps: &[String]) -> Vec<String> {
    let mut bounding = "-all".to_string();
    for c in caps {
        bounding.push_str(&format!(",+{}", c.to_ascii_lowercase()));
    }
    [
        "setpriv",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        &format!("--bounding-set={bounding}"),
        "--",
    ]
    .map(String::from)
    .to_vec()
}

/// Every thread of `pid`: its tid and the capability sets /proc shows.
fn thread_capabilities(pid: u32) -> Vec<(String, Sets)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the agent's threads");
    tasks
        .filter_map(|t| {
            let t = t.ok()?;
            let status = std::fs::read_to_string(t.path().join("status")).ok()?;
            Some((
                t.file_name().to_string_lossy().into_owned(),
                Sets::parse(&status),
            ))
        })
        .collect()
}

#[derive(Debug, PartialEq, Eq)]
struct Sets {
    inheritable: u64,
    permitted: u64,
    effective: u64,
    ambient: u64,
}

impl Sets {
    fn parse(status: &str) -> Self {
        let field = |name: &str| {
            let line = status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {status}"));
            u64::from_str_radix(line.trim(), 16).expect("hex")
        };
        Self {
            inheritable: field("CapInh:"),
            permitted: field("CapPrm:"),
            effective: field("CapEff:"),
            ambient: field("CapAmb:"),
        }
    }
}

/// Every thread holds CAP_BPF and CAP_NET_ADMIN, effective and permitted, and nothing else.
fn assert_serving_set(agent: &Agent) {
    let threads = thread_capabilities(agent.pid());
    assert!(
        threads.len() > 1,
        "the agent runs several threads: {threads:?}"
    );
    for (tid, sets) in &threads {
        assert_eq!(
            sets,
            &Sets {
                inheritable: 0,
                permitted: SERVING,
                effective: SERVING,
                ambient: 0,
            },
            "thread {tid} of the agent: only CAP_BPF and CAP_NET_ADMIN (0x{SERVING:x})"
        );
    }
}

/// SIGTERM, and a clean exit. Not before the agent has logged "serving": /ready can answer 200
/// a moment before the main thread listens for SIGTERM (app.rs installs the listener when it
/// starts serving, after spawning the zone task), and a SIGTERM in that moment kills the
/// process without its clean-up.
fn stop_cleanly(agent: &mut Agent) {
    eventually(
        "the agent's \"serving\" line",
        Duration::from_secs(5),
        || {
            agent
                .log()
                .contains("dns_agent::app: serving")
                .then_some(())
        },
    );
    let status = agent.stop();
    assert!(status.success(), "clean exit ({status}):\n{}", agent.log());
}

/// Removes the topology's listen addresses from the node: the agent puts them there itself.
fn without_listen_addresses(topo: &Topology) {
    for (addr, prefix) in [(IpAddr::V4(LISTEN_V4), 32), (IpAddr::V6(LISTEN_V6), 128)] {
        let _ = Command::new("ip")
            .args(["-n", &topo.node.name, "addr", "del"])
            .arg(format!("{addr}/{prefix}"))
            .args(["dev", "lo"])
            .status();
    }
}

fn node_addresses(topo: &Topology) -> String {
    let out = topo
        .node
        .command("ip")
        .args(["-o", "addr", "show"])
        .output()
        .expect("ip addr");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A veth whose host side, `host_if`, appears in the node after the agent started.
fn new_pod_veth(topo: &Topology, host_if: &str) {
    support::run(
        "ip",
        &[
            "link",
            "add",
            host_if,
            "netns",
            &topo.node.name,
            "type",
            "veth",
            "peer",
            "name",
            &unique("xq"),
            "netns",
            &topo.pod.name,
        ],
    );
    topo.node.ip(&["link", "set", host_if, "up"]);
}

/// The XDP program (and with `egress`, the tc egress program) is attached to `iface` through
/// links the agent pinned.
fn assert_attached(topo: &Topology, agent: &Agent, iface: &str, egress: bool) {
    eventually(
        &format!("the programs attached to {iface}"),
        Duration::from_secs(5),
        || {
            let pinned = agent.pin_path.join("links").join(iface).exists()
                && (!egress || agent.pin_path.join("links-egress").join(iface).exists());
            let out = topo
                .node
                .command("ip")
                .args(["-d", "link", "show", "dev", iface])
                .output()
                .ok()?;
            let shown = String::from_utf8_lossy(&out.stdout).contains("xdpgeneric");
            (pinned && shown).then_some(())
        },
    );
}

#[test]
fn once_serving_every_thread_keeps_only_cap_bpf_and_cap_net_admin() {
    let topo = Topology::new();
    // The sets of this test's thread, which starts the agent.
    let ours = Sets::parse(&std::fs::read_to_string("/proc/thread-self/status").unwrap());
    for cap in [CAP_PERFMON, CAP_NET_BIND_SERVICE, CAP_SYS_ADMIN] {
        assert!(
            ours.effective & 1 << cap != 0,
            "the test runs as root with capability {cap}: the agent starts with it"
        );
    }
    without_listen_addresses(&topo);
    let dir = tempfile::tempdir().unwrap();
    let zone = dir.path().join("cluster.yaml");
    std::fs::copy(example_cluster(), &zone).unwrap();
    let later = unique("xk");
    let mut agent = Agent::start(&topo, &zone, &["--interface-pattern", &format!("{later}*")]);
    assert_serving_set(&agent);

    // What the agent still does: answers from the kernel, writes the maps when the zone
    // changes, attaches to a pod veth that appears, removes its listen address on exit.
    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));
    await_kernel(
        &agent,
        &client,
        "web.shop.svc.cluster.local",
        RecordType::A,
        Want::Records(&["A 10.96.10.20"]),
        Duration::from_secs(5),
    );
    let mut text = std::fs::read_to_string(&zone).unwrap();
    text.push_str(&support::headless_yaml(3));
    std::fs::write(&zone, text).unwrap();
    await_kernel(
        &agent,
        &client,
        "bulk-3.shop.svc.cluster.local",
        RecordType::A,
        Want::Records(&["A 10.250.0.1", "A 10.250.0.2", "A 10.250.0.3"]),
        Duration::from_secs(10),
    );
    let new_if = format!("{later}1");
    new_pod_veth(&topo, &new_if);
    assert_attached(&topo, &agent, &new_if, false);
    assert!(
        node_addresses(&topo).contains(&LISTEN_V4.to_string()),
        "the agent put its listen address on the node"
    );

    stop_cleanly(&mut agent);
    let left = node_addresses(&topo);
    assert!(
        !left.contains(&LISTEN_V4.to_string()) && !left.contains(&LISTEN_V6.to_string()),
        "the listen addresses removed on exit (CAP_NET_ADMIN kept for it):\n{left}"
    );
}

#[test]
fn with_only_the_daemonsets_capabilities_the_agent_intercepts_serves_and_attaches() {
    require_util_linux();
    let caps = daemonset_capabilities();
    assert_eq!(
        caps.iter().cloned().collect::<BTreeSet<_>>(),
        ["BPF", "NET_ADMIN", "NET_BIND_SERVICE", "PERFMON"]
            .map(String::from)
            .into(),
        "the DaemonSet's capabilities are the ones this test proves needed, no more"
    );
    let topo = Topology::new();
    without_listen_addresses(&topo);
    topo.pod.ip(&[
        "route",
        "add",
        &format!("{KUBE_DNS}/32"),
        "via",
        "192.0.2.1",
    ]);
    let later = unique("xk");
    let args: Vec<String> = [
        "run",
        "--zone-file",
        &example_cluster().display().to_string(),
        "--listen",
        &LISTEN_V4.to_string(),
        "--intercept",
        &KUBE_DNS.to_string(),
        "--interface",
        &topo.host_if,
        "--interface-pattern",
        &format!("{later}*"),
        "--upstream",
        "198.51.100.53",
    ]
    .map(String::from)
    .to_vec();
    // RLIMIT_MEMLOCK 0 as well: since Linux 5.11 BPF memory is charged to the memory cgroup,
    // so neither CAP_SYS_RESOURCE nor CAP_IPC_LOCK is needed to raise it.
    let mut wrapper = ["prlimit", "--memlock=0:0"].map(String::from).to_vec();
    wrapper.extend(with_only(&caps));
    let mut agent = Agent::spawn_wrapped(
        &topo.node,
        &wrapper,
        args,
        PathBuf::from("/sys/fs/bpf").join(unique("xdns-c")),
        9253,
    );
    agent.wait_ready(Duration::from_secs(20));
    assert_serving_set(&agent);

    // The kernel answers the cluster IP; what it does not hold is steered to the agent and the
    // reply given the cluster IP back (the tc egress program).
    let client = Client::new(&topo.pod, IpAddr::V4(KUBE_DNS));
    let counters = agent.kernel_counters();
    let m = client.query("web.shop.svc.cluster.local", RecordType::A, false);
    assert_eq!(answers(&m), ["A 10.96.10.20"]);
    let m = client.query("10-244-1-21.shop.pod.cluster.local", RecordType::A, false);
    assert_eq!(answers(&m), ["A 10.244.1.21"]);
    let after = agent.kernel_counters();
    for (counter, by) in [("answered", 1), ("steered", 1), ("egress_restored", 1)] {
        assert_eq!(
            after[counter],
            counters[counter] + by,
            "{counter}: {after:?}"
        );
    }
    assert_attached(&topo, &agent, &topo.host_if, true);
    let new_if = format!("{later}1");
    new_pod_veth(&topo, &new_if);
    assert_attached(&topo, &agent, &new_if, true);

    stop_cleanly(&mut agent);
    assert!(
        !node_addresses(&topo).contains(&LISTEN_V4.to_string()),
        "the listen address removed on exit"
    );
}

/// Runs the agent under `wrapper` and expects it to stop at start with a log naming
/// `capability`.
fn refuses_without(topo: &Topology, wrapper: &[String], capability: &str, case: &str) {
    let args = Agent::args(topo, "--zone-file", &example_cluster(), &[]);
    let mut agent = Agent::spawn_wrapped(
        &topo.node,
        wrapper,
        args,
        PathBuf::from("/sys/fs/bpf").join(unique("xdns-c")),
        9253,
    );
    let status = agent
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("{case}: the agent did not stop:\n{}", agent.log()));
    assert!(!status.success(), "{case}: it failed");
    let log = agent.log();
    assert!(
        log.contains(&format!("needs {capability}")),
        "{case}: the error names {capability}:\n{log}"
    );
    eprintln!(
        "{case}: {}",
        log.lines()
            .find(|l| l.contains(capability))
            .unwrap_or_default()
    );
}

#[test]
fn without_any_one_of_them_the_agent_stops_at_start_naming_it() {
    require_util_linux();
    let caps = daemonset_capabilities();
    let topo = Topology::new();
    for missing in &caps {
        let rest: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let name = format!("CAP_{missing}");
        if missing == "NET_ADMIN" {
            // Twice: putting the listen address on the node, and (with the address there)
            // loading the programs.
            without_listen_addresses(&topo);
            refuses_without(&topo, &with_only(&rest), &name, "no listen address yet");
            topo.node
                .ip(&["addr", "replace", &format!("{LISTEN_V4}/32"), "dev", "lo"]);
            topo.node.ip(&[
                "addr",
                "replace",
                &format!("{LISTEN_V6}/128"),
                "dev",
                "lo",
                "nodad",
            ]);
        }
        refuses_without(&topo, &with_only(&rest), &name, &format!("without {name}"));
    }

    // No BPF filesystem at /sys/fs/bpf (a mount namespace of its own, where it is unmounted):
    // mounting one needs CAP_SYS_ADMIN, which the DaemonSet does not grant. With it, the agent
    // mounts one and serves.
    let unmounted = |caps: &[String]| {
        let mut w = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "umount /sys/fs/bpf && exec \"$@\"",
            "sh",
        ]
        .map(String::from)
        .to_vec();
        w.extend(with_only(caps));
        w
    };
    refuses_without(
        &topo,
        &unmounted(&caps),
        "CAP_SYS_ADMIN",
        "no BPF filesystem",
    );
    let mut with_sys_admin = caps.clone();
    with_sys_admin.push("SYS_ADMIN".into());
    let args = Agent::args(&topo, "--zone-file", &example_cluster(), &[]);
    let mut agent = Agent::spawn_wrapped(
        &topo.node,
        &unmounted(&with_sys_admin),
        args,
        PathBuf::from("/sys/fs/bpf").join(unique("xdns-c")),
        9253,
    );
    agent.wait_ready(Duration::from_secs(20));
    assert!(
        agent.log().contains("mounted a BPF filesystem"),
        "{}",
        agent.log()
    );
    assert_serving_set(&agent);
    stop_cleanly(&mut agent);
}
