//! The agent's listening sockets: UDP and TCP on port 53 of every listen address, and the
//! metrics port, all bound with SO_REUSEPORT so that a new agent binds beside the old one during
//! an upgrade (see [`super::handover`] for how queries move from one to the other).

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tokio::{
    net::{TcpListener, UdpSocket},
    task::JoinSet,
};

use super::{Handler, handover, tcp, udp};
use crate::capabilities::{self, Capability, Missing};

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("binding {addr}: {missing}")]
    Privileged {
        addr: SocketAddr,
        missing: Missing,
        #[source]
        source: io::Error,
    },
    #[error(
        "binding {addr} failed: is {ip} assigned to an interface of this node? \
         (e.g. `ip addr add {ip}/{prefix} dev lo`): {source}",
        ip = addr.ip(),
        prefix = if addr.is_ipv4() { 32 } else { 128 }
    )]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("--metrics-addr {addr}: cannot listen: {source}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("steering the reuseport group of {addr}: {source}")]
    Steer {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// One listen address's sockets, and their indices in the reuseport groups they share with an
/// agent being replaced.
struct Listener {
    addr: SocketAddr,
    udp: Arc<UdpSocket>,
    tcp: Arc<TcpListener>,
    udp_index: u32,
    tcp_index: u32,
}

/// The DNS sockets of every listen address, and the metrics listener.
pub struct Sockets {
    listeners: Vec<Listener>,
    /// Taken by the metrics server.
    pub metrics: Option<TcpListener>,
}

impl Sockets {
    /// Binds port 53 of every listen address, steered to the agent already serving there (if
    /// any) until [`Sockets::steer_to_self`]; and the metrics port, steered to this agent at once:
    /// kubelet's readiness probe must see the new agent's /ready (503 until its zone is loaded),
    /// not the old agent's.
    pub fn bind(listen: &[IpAddr], metrics_addr: SocketAddr) -> Result<Self, BindError> {
        let mut listeners = Vec::new();
        for ip in listen {
            let addr = SocketAddr::new(*ip, 53);
            let fail = |source: io::Error| match capabilities::refused(&source)
                .then(|| Missing::explain(&[Capability::NetBindService], "a port below 1024"))
                .flatten()
            {
                Some(missing) => BindError::Privileged {
                    addr,
                    missing,
                    source,
                },
                None => BindError::Listen { addr, source },
            };
            let steer = |source| BindError::Steer { addr, source };
            // An agent being replaced may hold these already (SO_REUSEPORT): everything stays
            // with it until this one has loaded the zone.
            let udp_index = handover::bound_before(addr, false) as u32;
            let tcp_index = handover::bound_before(addr, true) as u32;
            let udp = bind_udp(addr).map_err(fail)?;
            let tcp = bind_tcp(addr).map_err(fail)?;
            handover::steer_to(&udp, 0).map_err(steer)?;
            handover::steer_to(&tcp, 0).map_err(steer)?;
            if udp_index > 0 {
                tracing::info!(%addr, "another agent serves {addr}: taking over once the zone is loaded");
            }
            listeners.push(Listener {
                addr,
                udp: Arc::new(udp),
                tcp: Arc::new(tcp),
                udp_index,
                tcp_index,
            });
        }
        let metrics_index = handover::bound_before(metrics_addr, true) as u32;
        let metrics = bind_tcp(metrics_addr).map_err(|source| BindError::Metrics {
            addr: metrics_addr,
            source,
        })?;
        handover::steer_to(&metrics, metrics_index).map_err(|source| BindError::Steer {
            addr: metrics_addr,
            source,
        })?;
        Ok(Self {
            listeners,
            metrics: Some(metrics),
        })
    }

    /// Serves every DNS socket with `handler`, a task each.
    pub fn serve(&self, tasks: &mut JoinSet<io::Result<()>>, handler: &Arc<Handler>) {
        for l in &self.listeners {
            tasks.spawn(udp::serve(l.udp.clone(), handler.clone()));
            tasks.spawn(tcp::serve(l.tcp.clone(), handler.clone()));
        }
    }

    /// Queries to this agent from now on (its zone is loaded).
    pub fn steer_to_self(&self) -> Result<(), BindError> {
        for l in &self.listeners {
            let steer = |source| BindError::Steer {
                addr: l.addr,
                source,
            };
            handover::steer_to(&*l.udp, l.udp_index).map_err(steer)?;
            handover::steer_to(&*l.tcp, l.tcp_index).map_err(steer)?;
        }
        Ok(())
    }
}

/// A UDP socket on `addr` with SO_REUSEPORT: a new agent binds next to the old one during an
/// upgrade, and the kernel shares queries between them until the old one leaves.
fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    sock.set_reuse_port(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    UdpSocket::from_std(sock.into())
}

fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_reuse_port(true)?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    TcpListener::from_std(sock.into())
}
