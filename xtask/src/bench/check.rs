//! Before any load: every system answers every query of every set correctly (which also warms
//! the caches with the external names), and the xdns kernel path really answers in the kernel.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail};
use aya::maps::{MapData, PerCpuArray};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{Name, RData, RecordType},
};

use super::{
    topo::{System, Topology},
    workload::{Expect, QuerySet},
};

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
