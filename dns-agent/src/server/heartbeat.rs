//! The agent's heartbeat: proof, ten times a second, that it answers. The XDP program steers
//! queries for intercepted addresses to the agent only while the heartbeat is fresh, and
//! answers from its maps only within the grace period after the last one.
//!
//! A timer alone would beat on while the serving loop is stuck; so every beat is earned by a
//! real question, sent to the agent's own listen address and answered through the same socket,
//! loop and zone lock that pods' queries take. The serving loop recognises the probe by its
//! source (the listen address itself) and its name (random, per agent), and leaves it out of
//! the metrics.

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

/// Beats `heartbeat` for as long as the agent answers `probe` sent to `listen`.
pub async fn run(heartbeat: Arc<Heartbeat>, listen: IpAddr, probe: Probe) -> std::io::Result<()> {
    // Bound to the listen address: the serving loop knows the probe by this source.
    let socket = UdpSocket::bind(SocketAddr::new(listen, 0)).await?;
    socket.connect(SocketAddr::new(listen, 53)).await?;
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = [0u8; 512];
    loop {
        tick.tick().await;
        let id: u16 = rand::random();
        let _ = socket.send(&probe.query(id)).await;
        // A reply to an earlier probe that came late does not count for this one.
        let answered = tokio::time::timeout(INTERVAL, async {
            loop {
                match socket.recv(&mut buf).await {
                    Ok(n) if n >= 2 && buf[..2] == id.to_be_bytes() => return true,
                    Ok(_) => continue,
                    Err(_) => return false,
                }
            }
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
}
