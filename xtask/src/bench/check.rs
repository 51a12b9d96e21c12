//! Before and after the load: every system answers every query of every set it is measured on
//! correctly (which also warms the caches with the external names), and SRV, PTR and AAAA
//! questions about a sample of Services; the fast paths (the xdns XDP program, knotd's AF_XDP
//! socket) really answer.
//!
//! What is compared is what a client uses: the rcode and the answer records (for SRV the port
//! and target; priority and weight differ by design: dnsmasq writes 0 0, the others 0 100).
//! Authority sections are not compared: negative answers carry different SOA records by
//! design (see `peers`).

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use aya::maps::{MapData, PerCpuArray};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{Name, RData, RecordType},
};

use super::{
    topo::{Kind, Process, System, Topology},
    workload::{Expect, QuerySet, Workload, service_ip, service_name},
};
use crate::netns::Netns;

/// The XDP program's counters of an agent, summed over CPUs, by index.
pub fn kernel_counters(pin: &Path) -> anyhow::Result<Vec<u64>> {
    let path = pin
        .join(format!("v{}", dns_common::LAYOUT_VERSION))
        .join(dns_common::MAP_COUNTERS);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let map = PerCpuArray::<MapData, u64>::try_from(aya::maps::Map::PerCpuArray(data))?;
    (0..dns_common::counter::COUNT)
        .map(|i| Ok(map.get(&i, 0)?.iter().sum::<u64>()))
        .collect()
}

fn exchange(sock: &UdpSocket, server: SocketAddr, bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    for _ in 0..3 {
        sock.send_to(bytes, server)?;
        loop {
            match sock.recv_from(&mut buf) {
                Ok((n, from)) if from == server && n >= 2 && buf[..2] == bytes[..2] => {
                    return Ok(buf[..n].to_vec());
                }
                Ok(_) => continue,
                Err(_) => break,
            }
        }
    }
    bail!("no reply from {server}")
}

/// Where a system's fast path counts what it answered, if it has one.
pub enum FastPath<'a> {
    None,
    /// The xdns XDP program's counters, under the agent's pin path.
    Xdns(PathBuf),
    /// Frames knotd's XDP program redirected to its AF_XDP socket (the veth's counters).
    AfXdp {
        node: &'a Netns,
        iface: String,
    },
}

impl<'a> FastPath<'a> {
    pub fn of(
        topo: &'a Topology,
        system: &System,
        process: Option<&Process>,
    ) -> anyhow::Result<Self> {
        Ok(match system.kind {
            Kind::XdnsKernel(_) => FastPath::Xdns(
                process
                    .and_then(|p| p.pin.clone())
                    .context("an xdns kernel-path system without a pin path")?,
            ),
            Kind::Knot { xdp: true } => FastPath::AfXdp {
                node: &topo.node,
                iface: topo.links[system.link].host_if.clone(),
            },
            _ => FastPath::None,
        })
    }

    /// The counters now; `None` without a fast path.
    pub fn read(&self) -> anyhow::Result<Option<Vec<u64>>> {
        match self {
            FastPath::None => Ok(None),
            FastPath::Xdns(pin) => kernel_counters(pin).map(Some),
            FastPath::AfXdp { node, iface } => {
                let out = node.command("ethtool").args(["-S", iface]).output()?;
                let text = String::from_utf8_lossy(&out.stdout);
                let redirected = text
                    .lines()
                    .filter_map(|l| l.trim().split_once(": "))
                    .filter(|(k, _)| k.starts_with("rx_queue_") && k.ends_with("_xdp_redirect"))
                    .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
                    .sum();
                Ok(Some(vec![redirected]))
            }
        }
    }

    /// Answered by the fast path since `start`, and the other counters that moved.
    pub fn since(&self, start: &[u64]) -> anyhow::Result<(u64, String)> {
        let now = self.read()?.unwrap_or_default();
        match self {
            FastPath::None => Ok((0, String::new())),
            FastPath::AfXdp { .. } => Ok((now[0] - start[0], "redirected to AF_XDP".into())),
            FastPath::Xdns(_) => {
                use dns_common::counter;
                let answering = [
                    counter::ANSWERED,
                    counter::ANSWERED_NODATA,
                    counter::ANSWERED_NXDOMAIN,
                    counter::ANSWERED_CACHED,
                    counter::ANSWERED_AUTOPATH,
                ];
                let answered = answering
                    .iter()
                    .map(|&i| now[i as usize] - start[i as usize])
                    .sum();
                let others: Vec<String> = (0..counter::COUNT as usize)
                    .filter(|&i| !answering.contains(&(i as u32)))
                    .filter(|&i| now[i] > start[i])
                    .map(|i| format!("{} {}", counter::NAMES[i], now[i] - start[i]))
                    .collect();
                Ok((answered, others.join(", ")))
            }
        }
    }
}

/// Sends every query of `set` to `system` once and checks each reply. Returns the number of
/// queries.
pub fn check_set(topo: &Topology, system: &System, set: &QuerySet) -> anyhow::Result<u64> {
    let server = SocketAddr::new(IpAddr::V4(system.listen), 53);
    let sock = topo.pod.enter(|| UdpSocket::bind("0.0.0.0:0"))??;
    sock.set_read_timeout(Some(Duration::from_millis(700)))?;
    for (k, q) in set.queries.iter().enumerate() {
        let mut m = Message::new(k as u16, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(
            Name::from_ascii(format!("{}.", q.name))?,
            RecordType::A,
        ));
        let bytes = m.to_vec()?;
        let reply = exchange(&sock, server, &bytes)
            .with_context(|| format!("{}: {} A", system.id, q.name))?;
        let fail = |why: String| anyhow::anyhow!("{}: {} A: {why}", system.id, q.name);
        if system.is_reflector() {
            let mut expected = bytes.clone();
            expected[2] |= 0x80;
            if reply != expected {
                return Err(fail(
                    "the reflector's reply is not the query with QR set".into(),
                ));
            }
            continue;
        }
        let r =
            Message::from_vec(&reply).map_err(|e| fail(format!("reply does not parse: {e}")))?;
        let rcode = r.metadata.response_code.low();
        let addrs: Vec<IpAddr> = r
            .answers
            .iter()
            .filter_map(|rr| match &rr.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                _ => None,
            })
            .collect();
        match q.expect {
            Expect::A(ip) => {
                if rcode != 0 || addrs != [IpAddr::V4(ip)] {
                    return Err(fail(format!(
                        "rcode {rcode}, A {addrs:?}; expected NOERROR, A {ip}"
                    )));
                }
            }
            Expect::Nxdomain => {
                if rcode != 3 || !r.answers.is_empty() {
                    return Err(fail(format!(
                        "rcode {rcode} with {} answers; expected NXDOMAIN",
                        r.answers.len()
                    )));
                }
            }
        }
    }
    Ok(set.queries.len() as u64)
}

fn ask(
    sock: &UdpSocket,
    server: SocketAddr,
    id: u16,
    name: &str,
    rtype: RecordType,
) -> anyhow::Result<Message> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name)?, rtype));
    let reply = exchange(sock, server, &m.to_vec()?)?;
    Message::from_vec(&reply).map_err(|e| anyhow::anyhow!("reply does not parse: {e}"))
}

/// SRV, PTR and AAAA questions about a sample of Services: SRV port 80 → the Service's name,
/// PTR of the ClusterIP → the Service's name, AAAA → NODATA (the Services are IPv4 only).
pub fn check_records(topo: &Topology, system: &System, w: &Workload) -> anyhow::Result<()> {
    let server = SocketAddr::new(IpAddr::V4(system.listen), 53);
    let sock = topo.pod.enter(|| UdpSocket::bind("0.0.0.0:0"))??;
    sock.set_read_timeout(Some(Duration::from_millis(700)))?;
    for k in 0..20usize {
        let i = (k * 251 + 7) % w.services;
        let name = format!("{}.", service_name(i));
        let target = Name::from_ascii(&name)?;
        let o = service_ip(i).octets();
        let reverse = format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0]);
        let srv = format!("_http._tcp.{name}");
        let fail = |q: &str, why: String| anyhow::anyhow!("{}: {q}: {why}", system.id);

        let r = ask(&sock, server, 3 * k as u16, &srv, RecordType::SRV)
            .map_err(|e| fail(&format!("{srv} SRV"), e.to_string()))?;
        let srvs: Vec<(u16, Name)> = r
            .answers
            .iter()
            .filter_map(|rr| match &rr.data {
                RData::SRV(s) => Some((s.port, s.target.clone())),
                _ => None,
            })
            .collect();
        if r.metadata.response_code.low() != 0 || srvs != [(80, target.clone())] {
            return Err(fail(
                &format!("{srv} SRV"),
                format!(
                    "rcode {}, SRV {srvs:?}; expected NOERROR, SRV port 80 → {name}",
                    r.metadata.response_code.low()
                ),
            ));
        }

        let r = ask(&sock, server, 3 * k as u16 + 1, &reverse, RecordType::PTR)
            .map_err(|e| fail(&format!("{reverse} PTR"), e.to_string()))?;
        let ptrs: Vec<Name> = r
            .answers
            .iter()
            .filter_map(|rr| match &rr.data {
                RData::PTR(p) => Some(p.0.clone()),
                _ => None,
            })
            .collect();
        if r.metadata.response_code.low() != 0 || ptrs != [target.clone()] {
            return Err(fail(
                &format!("{reverse} PTR"),
                format!(
                    "rcode {}, PTR {ptrs:?}; expected NOERROR, PTR {name}",
                    r.metadata.response_code.low()
                ),
            ));
        }

        let r = ask(&sock, server, 3 * k as u16 + 2, &name, RecordType::AAAA)
            .map_err(|e| fail(&format!("{name} AAAA"), e.to_string()))?;
        if r.metadata.response_code.low() != 0 || !r.answers.is_empty() {
            return Err(fail(
                &format!("{name} AAAA"),
                format!(
                    "rcode {} with {} answers; expected NODATA (NOERROR, no answer)",
                    r.metadata.response_code.low(),
                    r.answers.len()
                ),
            ));
        }
    }
    Ok(())
}
