//! The benchmark's network: one node namespace, one client ("pod") namespace, and one veth
//! pair per XDP setup, so every system stays up for the whole run and only the one being
//! measured sees the traffic (an XDP program on a link costs every packet on it).
//!
//! | link | host side XDP | pod side XDP | systems (listen address on the node's `lo`) |
//! |---|---|---|---|
//! | 0 | none | none | xdns userspace (.12), unbound (.13), dnsmasq (.14) |
//! | 1 | xdns, generic | none | xdns kernel path, generic (.10) |
//! | 2 | xdns, driver | `xdns_pass` | xdns kernel path, driver (.11) |
//! | 3 | reflector, generic | none | reflector, generic (.15) |
//! | 4 | reflector, driver | `xdns_pass` | reflector, driver (.16) |
//!
//! Driver-mode `XDP_TX` on a veth needs a program on the peer (DESIGN.md), hence `xdns_pass`
//! on the pod side of links 2 and 4. kxdpgun attaches its own program to the pod side; the
//! bench detaches `xdns_pass` before it runs and removes kxdpgun's program after.

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

use crate::netns::{self, Netns};

pub const UPSTREAM: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);
pub const LINKS: usize = 5;

/// How a system is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Reflector(XdpMode),
    XdnsKernel(XdpMode),
    XdnsUserspace,
    Unbound,
    Dnsmasq,
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
    pub fn is_reflector(&self) -> bool {
        matches!(self.kind, Kind::Reflector(_))
    }
    pub fn driver_link(&self) -> bool {
        matches!(
            self.kind,
            Kind::Reflector(XdpMode::Driver) | Kind::XdnsKernel(XdpMode::Driver)
        )
    }
}

/// Every system, in the order the bench rotates through them.
pub fn systems() -> Vec<System> {
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
            id: "xdns-userspace",
            title: "xdns userspace only (--no-kernel)",
            kind: Kind::XdnsUserspace,
            listen: l(12),
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
    /// The reflector object: `xdns_reflect` and `xdns_pass`.
    programs: Ebpf,
    /// `xdns_pass` attachments on the pod side, by link.
    pass_links: Vec<(usize, XdpLinkId)>,
}

fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Xdp> {
    let p: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the reflector object"))?
        .try_into()?;
    Ok(p)
}

impl Topology {
    pub fn new(reflector_object: &Path) -> anyhow::Result<Self> {
        let id = std::process::id() % 100_000;
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
            netns::veth(&node, &l.host_if, &pod, &l.pod_if)?;
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
            let out = pod
                .command("ethtool")
                .args(["-K", &l.pod_if, "gro", "off"])
                .output()?;
            if !out.status.success() {
                bail!(
                    "ethtool -K {} gro off: {}",
                    l.pod_if,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            links.push(l);
        }
        node.ip(&["addr", "add", &format!("{UPSTREAM}/32"), "dev", "lo"])?;
        for s in systems() {
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
        for name in ["xdns_reflect", "xdns_pass"] {
            xdp_program(&mut programs, name)?.load()?;
        }
        let mut topo = Self {
            node,
            pod,
            links,
            programs,
            pass_links: Vec::new(),
        };
        for s in systems() {
            if let Kind::Reflector(mode) = s.kind {
                let iface = topo.links[s.link].host_if.clone();
                let prog = xdp_program(&mut topo.programs, "xdns_reflect")?;
                crate::netns::in_netns(&topo.node.path(), || prog.attach(&iface, mode))?
                    .with_context(|| format!("attaching the reflector to {iface} ({mode:?})"))?;
            }
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

    /// Takes `xdns_pass` off every pod-side link (kxdpgun attaches its own program there).
    pub fn detach_pass(&mut self) -> anyhow::Result<()> {
        let pod = self.pod.path();
        for (_, id) in std::mem::take(&mut self.pass_links) {
            let prog = xdp_program(&mut self.programs, "xdns_pass")?;
            crate::netns::in_netns(&pod, || prog.detach(id))??;
        }
        Ok(())
    }

    /// Removes whatever XDP program kxdpgun left on a pod-side interface.
    pub fn clear_pod_xdp(&self, link: usize) -> anyhow::Result<()> {
        self.pod
            .ip(&["link", "set", "dev", &self.links[link].pod_if, "xdp", "off"])
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
        Kind::Reflector(_) => return Ok(None),
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
        Kind::Unbound => {
            let mut c = node.command("unbound");
            c.arg("-d").arg("-c").arg(dir.join("unbound.conf"));
            (c, None)
        }
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
