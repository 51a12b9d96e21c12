//! The agent's heartbeat: proof, ten times a second, that it answers. The XDP program steers
//! queries for intercepted addresses to the agent only while the heartbeat is fresh, and
//! answers from its maps only within the grace period after the last one.
//!
//! A timer alone would beat on while a serving loop is stuck; so every beat is earned by real
//! questions, sent to the agent's own listen address and answered through the same sockets,
//! loops and zone lock that pods' queries take: one question per UDP receive loop, each with an
//! ID the reuseport group's program steers to that loop from the probe's source port
//! ([`super::handover::steer_by_client`]), and a beat only when every one is answered. A loop that hangs stops the heartbeat, as pods
//! whose queries land on it would stop getting answers. (While an agent before this one still
//! holds its sockets' places, or for the second after it left, the probes may land on other
//! loops than theirs: the beat then proves that loops answer, not each one.) The loops recognise
//! the probe by its source (the listen address itself) and its name (random, per agent), and
//! leave it out of the metrics.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::net::UdpSocket;

use crate::kernel::maps::Heartbeat;

/// How often the agent proves it answers. The program's staleness limit
/// ([`dns_common::DEFAULT_STALE_AFTER_NS`]) allows for a few missed beats.
pub const INTERVAL: Duration = Duration::from_millis(100);

/// The probe's question: a name no one else asks (a random label below the zone, answered
/// NXDOMAIN from the zone), so that a node process querying from the listen address itself is
/// never taken for the probe.
#[derive(Clone, Debug)]
pub struct Probe {
    /// Wire-format name, lowercase.
    name: Vec<u8>,
}

impl Probe {
    pub fn new(zone: &str) -> Self {
        let token = format!("xdns-heartbeat-{:016x}", rand::random::<u64>());
        let mut name = Vec::with_capacity(64);
        for label in
            std::iter::once(token.as_str()).chain(zone.split('.').filter(|l| !l.is_empty()))
        {
            name.push(label.len() as u8);
            name.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
        }
        name.push(0);
        Self { name }
    }

    /// The query, with `id`.
    fn query(&self, id: u16) -> Vec<u8> {
        let mut m = Vec::with_capacity(16 + self.name.len());
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        m.extend_from_slice(&self.name);
        m.extend_from_slice(&1u16.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m
    }

    /// Is `msg`, from `peer` to the socket at `local`, this probe? Only the listen address
    /// itself sends it, so other sources cost one comparison.
    pub fn is(&self, msg: &[u8], peer: SocketAddr, local: Option<SocketAddr>) -> bool {
        local.is_some_and(|l| l.ip() == peer.ip())
            && msg.get(12..12 + self.name.len()) == Some(self.name.as_slice())
    }
}

/// IDs for one round of probes from source `port`, one per loop: the k-th is steered to loop k
/// ([`super::handover::loop_of`]). Random beyond that, so that a late reply to an earlier round
/// cannot pass for one of this round's.
pub fn probe_ids(port: u16, loops: usize) -> Vec<u16> {
    let loops = loops.clamp(1, 1 << 16) as u32;
    let base = rand::random_range(0..(1u32 << 16) / loops);
    let shift = (loops - u32::from(port) % loops) % loops;
    (0..loops)
        .map(|k| (base * loops + (k + shift) % loops) as u16)
        .collect()
}

/// Beats `heartbeat` for as long as all `loops` UDP receive loops answer `probe` sent to
/// `listen`.
pub async fn run(
    heartbeat: Arc<Heartbeat>,
    listen: IpAddr,
    probe: Probe,
    loops: usize,
) -> std::io::Result<()> {
    // Bound to the listen address: the serving loops know the probe by this source.
    let socket = UdpSocket::bind(SocketAddr::new(listen, 0)).await?;
    socket.connect(SocketAddr::new(listen, 53)).await?;
    let port = socket.local_addr()?.port();
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = [0u8; 512];
    loop {
        tick.tick().await;
        let mut unanswered = probe_ids(port, loops);
        for id in &unanswered {
            let _ = socket.send(&probe.query(*id)).await;
        }
        let answered = tokio::time::timeout(INTERVAL, async {
            while !unanswered.is_empty() {
                match socket.recv(&mut buf).await {
                    Ok(n) if n >= 2 => {
                        let id = u16::from_be_bytes([buf[0], buf[1]]);
                        unanswered.retain(|u| *u != id);
                    }
                    Ok(_) => continue,
                    Err(_) => return false,
                }
            }
            true
        })
        .await
        .unwrap_or(false);
        if answered {
            heartbeat.beat();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_is_a_query_only_the_listen_address_sends() {
        let probe = Probe::new("cluster.local");
        let bytes = probe.query(0x1234);
        let m = hickory_proto::op::Message::from_vec(&bytes).expect("a DNS message");
        assert_eq!(m.metadata.id, 0x1234);
        let name = m.queries[0].name().to_string();
        assert!(
            name.starts_with("xdns-heartbeat-") && name.ends_with(".cluster.local."),
            "{name}"
        );
        let listen: SocketAddr = "169.254.20.10:53".parse().unwrap();
        let own: SocketAddr = "169.254.20.10:40000".parse().unwrap();
        let pod: SocketAddr = "192.0.2.2:40000".parse().unwrap();
        assert!(probe.is(&bytes, own, Some(listen)));
        assert!(
            !probe.is(&bytes, pod, Some(listen)),
            "a pod asking the same name"
        );
        let other = Probe::new("cluster.local").query(0x1234);
        assert!(
            !probe.is(&other, own, Some(listen)),
            "another question from the node"
        );
    }

    #[test]
    fn a_round_of_probes_reaches_every_loop_once() {
        for loops in [1, 2, 3, 7, 16, 256] {
            for port in [0, 1, 2, 53, 40000, 65535] {
                for _ in 0..20 {
                    let ids = probe_ids(port, loops);
                    let reached: Vec<usize> = ids
                        .iter()
                        .map(|id| super::super::handover::loop_of(port, *id, loops))
                        .collect();
                    assert_eq!(reached, (0..loops).collect::<Vec<_>>(), "{ids:?}");
                }
            }
        }
    }
}
