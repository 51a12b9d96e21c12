//! The benchmark's network: one node namespace, one client ("pod") namespace, and one veth
//! pair per XDP setup, so every system stays up for the whole run and only the one being
//! measured sees the traffic (an XDP program on a link costs every packet on it).
//!
//! | link | host side XDP | pod side XDP | systems (listen address on the node's `lo`) |
//! |---|---|---|---|
//! | 0 | none | none | xdns userspace (.12), unbound (.13), dnsmasq (.14), knotd (.17), kresd (.19), pdns-recursor (.20), socket echo (.21) |
//! | 1 | xdns, generic | none | xdns kernel path, generic (.10) |
//! | 2 | xdns, driver | `xdns_pass` | xdns kernel path, driver (.11) |
//! | 3 | reflector, generic | none | reflector, generic (.15) |
//! | 4 | reflector, driver | `xdns_pass` | reflector, driver (.16) |
//! | 5 | knotd's own (AF_XDP) | none | knotd in XDP mode (.18) |
//! | 6 | `xdns_drop`, driver | none | none: the load generator's own ceiling |
//! | 7 | reflector with a name lookup, generic | none | `xdns_reflect_lookup`, generic (.22) |
//! | 8 | reflector with a name lookup, driver | `xdns_pass` | `xdns_reflect_lookup`, driver (.23) |
//!
//! Driver-mode `XDP_TX` on a veth needs a program on the peer (DESIGN.md), hence `xdns_pass`
//! on the pod side of links 2, 4 and 8. The throughput generator (`xdpgen`) puts its reply
//! counter on the pod side for each trial, in place of `xdns_pass`. knotd in XDP mode takes
//! every UDP packet to port 53 that arrives on its interface, whatever the address: it needs a
//! link of its own.
//!
//! Every veth has one queue per CPU, as a NIC with receive-side scaling would, and GRO on the
//! host side: that gives each receive queue a NAPI context, which is where frames the
//! generator transmits with `ndo_xdp_xmit` land when the host side has no driver-mode program.
//! Except knotd's: knotd counts an interface's queues by its combined channels, which a veth
//! does not report, so it opens one AF_XDP socket, on queue 0, and frames arriving on another
//! queue would go up the stack to its UDP sockets instead. Its link has one queue, and
//! knotd one XDP worker.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
};

use super::xdpgen::XdpGen;
use crate::netns::{self, Netns};

pub const UPSTREAM: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);
pub const LINKS: usize = 9;
/// knotd's own link in XDP mode.
const KNOT_XDP_LINK: usize = 5;
/// The link whose host side drops everything (the generator's ceiling).
pub const SINK_LINK: usize = 6;

/// How a system is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Reflector(XdpMode),
    /// The reflector after one name lookup in a hash map (`xdns_reflect_lookup`).
    LookupReflector(XdpMode),
    /// The socket path's ceiling: an echo on UDP sockets (`echo.rs`), no DNS work.
    SocketReflector,
    XdnsKernel(XdpMode),
    XdnsUserspace,
    Unbound,
    Dnsmasq,
    /// knotd with the cluster zone as an authoritative zone; `xdp`: in its AF_XDP mode.
    Knot {
        xdp: bool,
    },
    Kresd,
    PdnsRecursor,
}

#[derive(Clone, Debug)]
pub struct System {
    pub id: &'static str,
    pub title: &'static str,
    pub kind: Kind,
    pub listen: Ipv4Addr,
    pub link: usize,
}

impl System {
    /// Echoes every query with QR set (the XDP reflectors and the socket echo).
    pub fn is_reflector(&self) -> bool {
        matches!(
            self.kind,
            Kind::Reflector(_) | Kind::LookupReflector(_) | Kind::SocketReflector
        )
    }
    /// An XDP reflector: answers in the kernel, so the live-frames generator drives it.
    pub fn is_xdp_reflector(&self) -> bool {
        matches!(self.kind, Kind::Reflector(_) | Kind::LookupReflector(_))
    }
    pub fn driver_link(&self) -> bool {
        matches!(
            self.kind,
            Kind::Reflector(XdpMode::Driver)
                | Kind::LookupReflector(XdpMode::Driver)
                | Kind::XdnsKernel(XdpMode::Driver)
        )
    }
    /// Answers only its own zones: no forwarding, so no external names.
    pub fn authoritative_only(&self) -> bool {
        matches!(self.kind, Kind::Knot { .. })
    }
    /// Whether `set` is measured on this system, and if not, why (for the report).
    pub fn skips(&self, set: &str) -> Option<&'static str> {
        if self.is_reflector() && set != "cluster" {
            Some("reflector: answers every query alike")
        } else if self.authoritative_only() && set == "external" {
            Some("authoritative only: no forwarding")
        } else {
            None
        }
    }
}

/// Systems chosen with `--systems` (all when unset).
static SELECTED: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// Restricts the run to these systems; refuses an unknown id.
pub fn select(ids: &[String]) -> anyhow::Result<()> {
    let known: Vec<&str> = all_systems().iter().map(|s| s.id).collect();
    if let Some(bad) = ids.iter().find(|id| !known.contains(&id.as_str())) {
        bail!(
            "--systems: no system {bad:?}; the systems are {}",
            known.join(", ")
        );
    }
    SELECTED
        .set(ids.to_vec())
        .map_err(|_| anyhow::anyhow!("systems already selected"))
}

/// The systems of this run, in the order the bench rotates through them.
pub fn systems() -> Vec<System> {
    let selected = SELECTED.get();
    all_systems()
        .into_iter()
        .filter(|s| selected.is_none_or(|ids| ids.iter().any(|id| id == s.id)))
        .collect()
}

/// Every system.
pub fn all_systems() -> Vec<System> {
    let l = |d| Ipv4Addr::new(169, 254, 20, d);
    vec![
        System {
            id: "reflector-generic",
            title: "XDP reflector, generic",
            kind: Kind::Reflector(XdpMode::Skb),
            listen: l(15),
            link: 3,
        },
        System {
            id: "xdns-generic",
            title: "xdns kernel path, generic",
            kind: Kind::XdnsKernel(XdpMode::Skb),
            listen: l(10),
            link: 1,
        },
        System {
            id: "reflector-driver",
            title: "XDP reflector, driver",
            kind: Kind::Reflector(XdpMode::Driver),
            listen: l(16),
            link: 4,
        },
        System {
            id: "xdns-driver",
            title: "xdns kernel path, driver",
            kind: Kind::XdnsKernel(XdpMode::Driver),
            listen: l(11),
            link: 2,
        },
        System {
            id: "lookup-generic",
            title: "XDP reflector after a name lookup, generic",
            kind: Kind::LookupReflector(XdpMode::Skb),
            listen: l(22),
            link: 7,
        },
        System {
            id: "lookup-driver",
            title: "XDP reflector after a name lookup, driver",
            kind: Kind::LookupReflector(XdpMode::Driver),
            listen: l(23),
            link: 8,
        },
        System {
            id: "knot-xdp",
            title: "knotd, XDP mode (AF_XDP, 1 worker)",
            kind: Kind::Knot { xdp: true },
            listen: l(18),
            link: 5,
        },
        System {
            id: "xdns-userspace",
            title: "xdns userspace only (--no-kernel)",
            kind: Kind::XdnsUserspace,
            listen: l(12),
            link: 0,
        },
        System {
            id: "reflector-sockets",
            title: "UDP echo on sockets (recvmmsg/sendmmsg, a thread per CPU)",
            kind: Kind::SocketReflector,
            listen: l(21),
            link: 0,
        },
        System {
            id: "unbound",
            title: "unbound (2 threads)",
            kind: Kind::Unbound,
            listen: l(13),
            link: 0,
        },
        System {
            id: "knot",
            title: "knotd, UDP sockets (2 workers)",
            kind: Kind::Knot { xdp: false },
            listen: l(17),
            link: 0,
        },
        System {
            id: "kresd",
            title: "Knot Resolver (kresd, 1 process)",
            kind: Kind::Kresd,
            listen: l(19),
            link: 0,
        },
        System {
            id: "pdns-recursor",
            title: "PowerDNS Recursor (2 threads)",
            kind: Kind::PdnsRecursor,
            listen: l(20),
            link: 0,
        },
        System {
            id: "dnsmasq",
            title: "dnsmasq",
            kind: Kind::Dnsmasq,
            listen: l(14),
            link: 0,
        },
    ]
}

/// One veth pair: names, addresses, MACs.
pub struct Link {
    pub host_if: String,
    pub pod_if: String,
    pub host_ip: Ipv4Addr,
    pub pod_ip: Ipv4Addr,
    pub host_mac: String,
    pub pod_mac: String,
}

pub struct Topology {
    pub node: Netns,
    pub pod: Netns,
    pub links: Vec<Link>,
    /// The reflector object: `xdns_reflect`, `xdns_pass`, `xdns_drop` and the load
    /// generator's `xdns_gen_query` and `xdns_count_reply`.
    pub programs: Ebpf,
    /// The load generator's maps.
    pub generator: XdpGen,
    /// `xdns_pass` attachments on the pod side, by link.
    pass_links: Vec<(usize, XdpLinkId)>,
}

/// A veth pair between the two namespaces with `queues` receive and transmit queues a side.
fn veth_pair(
    node: &Netns,
    host_if: &str,
    pod: &Netns,
    pod_if: &str,
    queues: usize,
) -> anyhow::Result<()> {
    let q = queues.to_string();
    let out = std::process::Command::new("ip")
        .args(["link", "add", host_if, "netns", &node.name])
        .args(["numtxqueues", &q, "numrxqueues", &q])
        .args(["type", "veth", "peer", "name", pod_if, "netns", &pod.name])
        .args(["numtxqueues", &q, "numrxqueues", &q])
        .output()
        .context("running ip (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip link add {host_if} type veth with {queues} queues: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Replies the host's stack sends (sockets, generic XDP) leave on transmit queue 0 whatever
/// the CPU (XPS), so they arrive on the pod side's receive queue 0: kxdpgun listens there
/// only (it finds one queue on a veth, as knotd does).
fn replies_on_queue_zero(node: &Netns, host_if: &str, queues: usize) -> anyhow::Result<()> {
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
    let all_cpus = format!("{:x}", (1u64 << cpus.min(63)) - 1);
    let mut script = format!("echo {all_cpus} > /sys/class/net/{host_if}/queues/tx-0/xps_cpus");
    for q in 1..queues {
        script += &format!(" && echo 0 > /sys/class/net/{host_if}/queues/tx-{q}/xps_cpus");
    }
    // `ip netns exec` mounts the namespace's own /sys/class/net.
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &node.name, "sh", "-c", &script])
        .output()?;
    if !out.status.success() {
        bail!(
            "setting XPS on {host_if}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ethtool(ns: &Netns, args: &[&str]) -> anyhow::Result<()> {
    let out = ns.command("ethtool").args(args).output()?;
    if !out.status.success() {
        bail!(
            "ethtool {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Xdp> {
    let p: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the reflector object"))?
        .try_into()?;
    Ok(p)
}

impl Topology {
    pub fn new(reflector_object: &Path, senders: Option<usize>) -> anyhow::Result<Self> {
        let id = std::process::id() % 100_000;
        let queues = std::thread::available_parallelism().map_or(1, |n| n.get());
        let node = Netns::new(format!("xdns-bench-node-{id}"))?;
        let pod = Netns::new(format!("xdns-bench-pod-{id}"))?;
        let mut links = Vec::new();
        for i in 0..LINKS {
            let l = Link {
                host_if: format!("xb{id}l{i}h"),
                pod_if: format!("xb{id}l{i}p"),
                host_ip: Ipv4Addr::new(192, 0, 2, (4 * i + 1) as u8),
                pod_ip: Ipv4Addr::new(192, 0, 2, (4 * i + 2) as u8),
                host_mac: format!("02:00:00:00:{i:02x}:01"),
                pod_mac: format!("02:00:00:00:{i:02x}:02"),
            };
            let link_queues = if i == KNOT_XDP_LINK { 1 } else { queues };
            veth_pair(&node, &l.host_if, &pod, &l.pod_if, link_queues)?;
            node.ip(&["link", "set", &l.host_if, "address", &l.host_mac])?;
            pod.ip(&["link", "set", &l.pod_if, "address", &l.pod_mac])?;
            node.ip(&[
                "addr",
                "add",
                &format!("{}/30", l.host_ip),
                "dev",
                &l.host_if,
            ])?;
            pod.ip(&["addr", "add", &format!("{}/30", l.pod_ip), "dev", &l.pod_if])?;
            node.ip(&["link", "set", &l.host_if, "up"])?;
            pod.ip(&["link", "set", &l.pod_if, "up"])?;
            // Static neighbours: no ARP in the measurements, and kxdpgun needs the MACs.
            node.ip(&[
                "neigh",
                "replace",
                &l.pod_ip.to_string(),
                "lladdr",
                &l.pod_mac,
                "dev",
                &l.host_if,
                "nud",
                "permanent",
            ])?;
            pod.ip(&[
                "neigh",
                "replace",
                &l.host_ip.to_string(),
                "lladdr",
                &l.host_mac,
                "dev",
                &l.pod_if,
                "nud",
                "permanent",
            ])?;
            // GRO on the receiving peer made driver-mode XDP_TX replies vanish (DESIGN.md).
            ethtool(&pod, &["-K", &l.pod_if, "gro", "off"])?;
            // A NAPI context per queue on the host side, for the generator's frames.
            ethtool(&node, &["-K", &l.host_if, "gro", "on"])?;
            if link_queues > 1 {
                replies_on_queue_zero(&node, &l.host_if, link_queues)?;
            }
            links.push(l);
        }
        node.ip(&["addr", "add", &format!("{UPSTREAM}/32"), "dev", "lo"])?;
        for s in all_systems() {
            node.ip(&["addr", "add", &format!("{}/32", s.listen), "dev", "lo"])?;
            pod.ip(&[
                "route",
                "add",
                &format!("{}/32", s.listen),
                "via",
                &links[s.link].host_ip.to_string(),
            ])?;
        }

        let mut programs = Ebpf::load_file(reflector_object)
            .with_context(|| format!("loading {}", reflector_object.display()))?;
        for name in [
            "xdns_reflect",
            "xdns_reflect_lookup",
            "xdns_pass",
            "xdns_drop",
            "xdns_gen_query",
            "xdns_count_reply",
        ] {
            xdp_program(&mut programs, name)?
                .load()
                .with_context(|| format!("loading {name}"))?;
        }
        let generator = XdpGen::new(&mut programs, senders)?;
        let mut topo = Self {
            node,
            pod,
            links,
            programs,
            generator,
            pass_links: Vec::new(),
        };
        // BPF_PROG_TEST_RUN with repeat > 1 adds the program to the kernel's XDP dispatcher
        // for the call and removes it after, each time waiting for an RCU grace period (26 ms
        // a call on the 2-core test machine). A program attached to an interface stays in the
        // dispatcher, so the generator's is attached in driver mode to a veth that stays down
        // and never sees a frame.
        let (anchor, anchor_peer) = (format!("xb{id}ga"), format!("xb{id}gb"));
        topo.pod.ip(&[
            "link",
            "add",
            &anchor,
            "type",
            "veth",
            "peer",
            "name",
            &anchor_peer,
        ])?;
        let prog = xdp_program(&mut topo.programs, "xdns_gen_query")?;
        crate::netns::in_netns(&topo.pod.path(), || prog.attach(&anchor, XdpMode::Driver))?
            .with_context(|| format!("attaching xdns_gen_query to {anchor} (down)"))?;
        let sink = topo.links[SINK_LINK].host_if.clone();
        let prog = xdp_program(&mut topo.programs, "xdns_drop")?;
        crate::netns::in_netns(&topo.node.path(), || prog.attach(&sink, XdpMode::Driver))?
            .with_context(|| format!("attaching xdns_drop to {sink}"))?;
        for s in systems() {
            let (program, mode) = match s.kind {
                Kind::Reflector(mode) => ("xdns_reflect", mode),
                Kind::LookupReflector(mode) => ("xdns_reflect_lookup", mode),
                _ => continue,
            };
            let iface = topo.links[s.link].host_if.clone();
            let prog = xdp_program(&mut topo.programs, program)?;
            crate::netns::in_netns(&topo.node.path(), || prog.attach(&iface, mode))?
                .with_context(|| format!("attaching {program} to {iface} ({mode:?})"))?;
        }
        topo.attach_pass()?;
        Ok(topo)
    }

    fn driver_links() -> Vec<usize> {
        systems()
            .iter()
            .filter(|s| s.driver_link())
            .map(|s| s.link)
            .collect()
    }

    /// The names `xdns_reflect_lookup` finds: each in wire form with its root label, zero-padded
    /// to 64 bytes (the size of xdns' zone map key). A name of 64 bytes or more is not kept: the
    /// program passes it.
    pub fn reflect_names<'n>(
        &mut self,
        names: impl IntoIterator<Item = &'n str>,
    ) -> anyhow::Result<()> {
        let mut map: aya::maps::HashMap<_, [u8; 64], u8> = self
            .programs
            .map_mut("REFLECT_NAMES")
            .context("map REFLECT_NAMES missing from the reflector object")?
            .try_into()?;
        for name in names {
            let mut key = [0u8; 64];
            let mut at = 0;
            for label in name.trim_end_matches('.').split('.') {
                // This label and the root label's zero byte: the name must stay under 64 bytes.
                if at + 1 + label.len() + 1 >= key.len() {
                    at = key.len();
                    break;
                }
                key[at] = label.len() as u8;
                key[at + 1..at + 1 + label.len()].copy_from_slice(label.as_bytes());
                at += 1 + label.len();
            }
            if at < key.len() {
                map.insert(key, 1, 0)?;
            }
        }
        Ok(())
    }

    /// Puts `xdns_pass` on the pod side of the driver-mode links.
    pub fn attach_pass(&mut self) -> anyhow::Result<()> {
        for link in Self::driver_links() {
            if self.pass_links.iter().any(|(l, _)| *l == link) {
                continue;
            }
            let iface = self.links[link].pod_if.clone();
            let prog = xdp_program(&mut self.programs, "xdns_pass")?;
            let id =
                crate::netns::in_netns(&self.pod.path(), || prog.attach(&iface, XdpMode::Driver))?
                    .with_context(|| format!("attaching xdns_pass to {iface}"))?;
            self.pass_links.push((link, id));
        }
        Ok(())
    }

    /// Takes `xdns_pass` off every pod-side link (the load generator's reply counter takes its
    /// place during a trial).
    pub fn detach_pass(&mut self) -> anyhow::Result<()> {
        let pod = self.pod.path();
        for (_, id) in std::mem::take(&mut self.pass_links) {
            let prog = xdp_program(&mut self.programs, "xdns_pass")?;
            crate::netns::in_netns(&pod, || prog.detach(id))??;
        }
        Ok(())
    }
}

/// A server process of the bench, with what the report needs of it.
pub struct Process {
    pub child: Child,
    pub log: PathBuf,
    /// Pin path of an xdns agent.
    pub pin: Option<PathBuf>,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory (VmRSS), bytes.
    pub fn rss(&self) -> u64 {
        status_kib(self.pid(), "VmRSS:") * 1024
    }

    /// Peak resident memory (VmHWM), bytes.
    pub fn hwm(&self) -> u64 {
        status_kib(self.pid(), "VmHWM:") * 1024
    }

    /// Sum of the kernel's `memlock` accounting over the BPF maps this process holds.
    pub fn map_memory(&self) -> u64 {
        let mut total = 0;
        let Ok(dir) = std::fs::read_dir(format!("/proc/{}/fdinfo", self.pid())) else {
            return 0;
        };
        for e in dir.flatten() {
            let Ok(text) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            if text.contains("map_type:") {
                total += text
                    .lines()
                    .find_map(|l| l.strip_prefix("memlock:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        total
    }
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// Starts the server of `system` (the reflectors have none) and waits until it answers.
pub fn start(
    topo: &Topology,
    system: &System,
    agent_bin: &Path,
    zone_file: &Path,
    dir: &Path,
    metrics_port: u16,
) -> anyhow::Result<Option<Process>> {
    let log = dir.join(format!("{}.log", system.id));
    let stderr = File::create(&log)?;
    let node = &topo.node;
    let (mut cmd, pin) = match system.kind {
        Kind::Reflector(_) | Kind::LookupReflector(_) => return Ok(None),
        Kind::XdnsKernel(_) | Kind::XdnsUserspace => {
            let metrics = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), metrics_port);
            let pin = PathBuf::from(format!(
                "/sys/fs/bpf/xdns-bench-{}-{}",
                std::process::id(),
                system.id
            ));
            netns::remove_on_exit(pin.clone());
            let mut c = node.command(agent_bin);
            c.arg("run")
                .arg("--zone-file")
                .arg(zone_file)
                .args(["--listen", &system.listen.to_string()])
                .args(["--upstream", &UPSTREAM.to_string()])
                .arg("--pin-path")
                .arg(&pin)
                .args(["--metrics-addr", &metrics.to_string()])
                .env("RUST_LOG", "info")
                .env("RUST_BACKTRACE", "0");
            match system.kind {
                Kind::XdnsKernel(mode) => {
                    c.args(["--interface", &topo.links[system.link].host_if])
                        .args([
                            "--attach-mode",
                            if mode == XdpMode::Driver {
                                "driver"
                            } else {
                                "generic"
                            },
                        ]);
                }
                _ => {
                    c.arg("--no-kernel");
                }
            }
            (c, Some(pin))
        }
        Kind::SocketReflector => {
            let mut c = node.command(std::env::current_exe()?);
            c.args(["bench-echo", &system.listen.to_string()]);
            (c, None)
        }
        Kind::Unbound => {
            let mut c = node.command("unbound");
            c.arg("-d").arg("-c").arg(dir.join("unbound.conf"));
            (c, None)
        }
        Kind::Knot { .. } | Kind::Kresd | Kind::PdnsRecursor => (
            super::peers::command(node, system, dir).expect("a peer"),
            None,
        ),
        Kind::Dnsmasq => {
            let mut c = node.command("dnsmasq");
            c.arg("--keep-in-foreground")
                .arg(format!(
                    "--conf-file={}",
                    dir.join("dnsmasq.conf").display()
                ))
                .args(["--pid-file=", "--log-facility=-"]);
            (c, None)
        }
    };
    let child = node.spawn(cmd.stdout(Stdio::null()).stderr(stderr))?;
    let mut p = Process {
        child,
        log: log.clone(),
        pin,
    };
    wait_answering(topo, system, &mut p)?;
    Ok(Some(p))
}

/// The upstream of external names.
pub fn start_upstream(topo: &Topology, dir: &Path) -> anyhow::Result<Process> {
    let log = dir.join("upstream.log");
    let child = topo.node.spawn(
        topo.node
            .command("dnsmasq")
            .arg("--keep-in-foreground")
            .arg(format!(
                "--conf-file={}",
                dir.join("upstream.conf").display()
            ))
            .args(["--pid-file=", "--log-facility=-"])
            .stdout(Stdio::null())
            .stderr(File::create(&log)?),
    )?;
    Ok(Process {
        child,
        log,
        pin: None,
    })
}

/// Polls with the A query of the first Service until the server answers NOERROR (20 s at
/// most). (Not the zone apex: the xdns kernel path answers NXDOMAIN for it, see
/// docs/benchmarks.md.)
fn wait_answering(topo: &Topology, system: &System, p: &mut Process) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let server = SocketAddr::new(IpAddr::V4(system.listen), 53);
    let sock = topo
        .pod
        .enter(|| std::net::UdpSocket::bind("0.0.0.0:0"))??;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    // ID 0x5a5a, RD.
    let mut q = vec![0x5a, 0x5a, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for l in super::workload::service_name(0).split('.') {
        q.push(l.len() as u8);
        q.extend_from_slice(l.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let mut buf = [0u8; 1500];
    loop {
        if let Some(status) = p.child.try_wait()? {
            bail!(
                "{} exited ({status}):\n{}",
                system.id,
                std::fs::read_to_string(&p.log).unwrap_or_default()
            );
        }
        let _ = sock.send_to(&q, server);
        if let Ok((n, _)) = sock.recv_from(&mut buf)
            && n >= 4
            && buf[..2] == [0x5a, 0x5a]
            && buf[3] & 0x0f == 0
        {
            // xdns answers SERVFAIL until its zone is loaded: NOERROR means ready.
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} does not answer at {server}:\n{}",
                system.id,
                std::fs::read_to_string(&p.log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
