//! The agent's listening sockets: UDP and TCP on port 53 of every listen address, and the
//! metrics port, all bound with SO_REUSEPORT so that a new agent binds beside the old one during
//! an upgrade (see [`super::handover`] for how queries move from one to the other).

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

use tokio::{net::TcpListener, runtime::Handle, task::JoinSet};

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

/// One listen address's sockets, and where they sit in the reuseport groups they share with an
/// agent being replaced.
struct Listener {
    addr: SocketAddr,
    /// One per receive loop, in the order bound: loop k's socket is at index `udp_before + k`
    /// of the group (until sockets bound before them close).
    udp: Vec<std::net::UdpSocket>,
    /// Sockets of earlier agents in the UDP group when these were bound; 0 once they are gone
    /// and the group steered by the new indices ([`Sockets::settle`]).
    udp_before: AtomicU32,
    tcp: Arc<TcpListener>,
    tcp_index: u32,
}

/// The DNS sockets of every listen address, and the metrics listener.
pub struct Sockets {
    listeners: Vec<Listener>,
    loops: usize,
    /// The UDP receive loops' threads, once serving: stopped (and waited for) when the sockets
    /// are dropped.
    udp_loops: Mutex<Vec<udp::Loop>>,
    /// Taken by the metrics server.
    pub metrics: Option<TcpListener>,
}

impl Drop for Sockets {
    fn drop(&mut self) {
        let loops = self.udp_loops.get_mut().unwrap_or_else(|e| e.into_inner());
        for l in loops.iter() {
            l.stop();
        }
        // Dropping each waits for its thread.
        loops.clear();
    }
}

impl Sockets {
    /// Binds port 53 of every listen address — `loops` UDP sockets (one per receive loop) and
    /// a TCP listener — steered to the agent already serving there (if any) until
    /// [`Sockets::steer_to_self`]; and the metrics port, steered to this agent at once:
    /// kubelet's readiness probe must see the new agent's /ready (503 until its zone is loaded),
    /// not the old agent's.
    pub fn bind(
        listen: &[IpAddr],
        metrics_addr: SocketAddr,
        loops: usize,
    ) -> Result<Self, BindError> {
        let loops = loops.max(1);
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
            let udp_before = handover::bound_before(addr, false) as u32;
            let tcp_index = handover::bound_before(addr, true) as u32;
            let udp = (0..loops)
                .map(|_| bind_udp(addr))
                .collect::<io::Result<Vec<_>>>()
                .map_err(fail)?;
            let tcp = bind_tcp(addr).map_err(fail)?;
            // Before this agent's sockets: the serving agent's; with none, these (answering
            // SERVFAIL until the zone is loaded, as a lone agent must).
            let serving = if udp_before > 0 {
                udp_before
            } else {
                loops as u32
            };
            handover::steer_by_client(&udp[0], addr.is_ipv6(), 0, serving).map_err(steer)?;
            handover::steer_to(&tcp, 0).map_err(steer)?;
            if udp_before > 0 {
                tracing::info!(%addr, "another agent serves {addr}: taking over once the zone is loaded");
            }
            listeners.push(Listener {
                addr,
                udp,
                udp_before: AtomicU32::new(udp_before),
                tcp: Arc::new(tcp),
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
            loops,
            udp_loops: Mutex::new(Vec::new()),
            metrics: Some(metrics),
        })
    }

    /// UDP receive loops (and sockets) per listen address.
    pub fn loops(&self) -> usize {
        self.loops
    }

    /// Serves every DNS socket with `handler`: a receive loop per UDP socket, an accept loop
    /// per TCP listener.
    pub fn serve(
        &self,
        tasks: &mut JoinSet<io::Result<()>>,
        handler: &Arc<Handler>,
    ) -> io::Result<()> {
        for l in &self.listeners {
            for socket in &l.udp {
                // The loop's own handle on the socket; this one stays for steering the group.
                let (receive_loop, ended) =
                    udp::Loop::spawn(socket.try_clone()?, handler.clone(), Handle::current())?;
                self.udp_loops
                    .lock()
                    .expect("loops lock")
                    .push(receive_loop);
                tasks.spawn(async move {
                    ended
                        .await
                        .unwrap_or_else(|_| Err(io::Error::other("a UDP receive loop panicked")))
                });
            }
            tasks.spawn(tcp::serve(l.tcp.clone(), handler.clone()));
        }
        Ok(())
    }

    /// Queries to this agent from now on (its zone is loaded).
    pub fn steer_to_self(&self) -> Result<(), BindError> {
        for l in &self.listeners {
            let steer = |source| BindError::Steer {
                addr: l.addr,
                source,
            };
            let before = l.udp_before.load(Ordering::Relaxed);
            handover::steer_by_client(&l.udp[0], l.addr.is_ipv6(), before, l.udp.len() as u32)
                .map_err(steer)?;
            handover::steer_to(&*l.tcp, l.tcp_index).map_err(steer)?;
        }
        Ok(())
    }

    /// Once this agent serves: when the agent before it has closed its sockets, this agent's
    /// moved to the indices they left free (the kernel fills a hole with the group's last
    /// socket), and the program, still counting from where they were, sends some queries to
    /// the kernel's hash fallback instead: right, but uneven. Steer by their places now.
    /// Call now and then; cheap when there is nothing to do.
    pub fn settle(&self) -> Result<(), BindError> {
        for l in &self.listeners {
            if l.udp_before.load(Ordering::Relaxed) == 0
                || handover::bound_before(l.addr, false) != l.udp.len()
            {
                continue;
            }
            handover::steer_by_client(&l.udp[0], l.addr.is_ipv6(), 0, l.udp.len() as u32).map_err(
                |source| BindError::Steer {
                    addr: l.addr,
                    source,
                },
            )?;
            l.udp_before.store(0, Ordering::Relaxed);
            tracing::info!(addr = %l.addr, "the agent before this one is gone: its UDP sockets' places are this agent's");
        }
        Ok(())
    }
}

/// The receive buffer asked for each UDP socket: a burst of queries the loop is not there for
/// (another process on its core, a page fault) waits here rather than being dropped. 4 MiB is
/// what unbound's documentation advises for a busy server (`so-rcvbuf`); the kernel caps it at
/// `net.core.rmem_max` (default 208 KiB) and charges only what queued packets use.
const UDP_RECEIVE_BUFFER: usize = 4 << 20;

/// A UDP socket on `addr` with SO_REUSEPORT: a new agent binds next to the old one during an
/// upgrade, and the kernel shares queries between them until the old one leaves.
fn bind_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if let Err(e) = sock.set_recv_buffer_size(UDP_RECEIVE_BUFFER) {
        tracing::debug!(%addr, error = %e, "setting the UDP receive buffer");
    }
    sock.set_reuse_port(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    // Blocking: each receive loop sleeps in its own receive call (`udp`).
    sock.bind(&addr.into())?;
    Ok(sock.into())
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
