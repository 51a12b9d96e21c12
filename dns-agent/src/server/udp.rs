//! UDP: the queries the kernel passes up.

use std::{io, net::SocketAddr, sync::Arc};

use tokio::net::UdpSocket;

use super::{Handler, Transport};

/// Serves one UDP socket until the task is cancelled.
pub async fn serve(socket: Arc<UdpSocket>, handler: Arc<Handler>) -> io::Result<()> {
    let mut buf = vec![0u8; 65535];
    let local = socket.local_addr().ok();
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            // ICMP errors from earlier sends surface here on some kernels; not fatal.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
            Err(e) => return Err(e),
        };
        if handler.probe.is(&buf[..n], peer, local) {
            let mut reply = Vec::new();
            if handler.answer_probe(&buf[..n], &mut reply) {
                send(&socket, &reply, peer).await;
            }
            continue;
        }
        // Answers from the zone and the cache are sent from here: a task per query would cost
        // more than the answer. Only queries that wait for an upstream get one.
        let pending = match handler.handle_now(&buf[..n], Transport::Udp) {
            Ok(Some(reply)) => {
                send(&socket, &reply, peer).await;
                continue;
            }
            Ok(None) => continue,
            Err(pending) => pending,
        };
        let socket = socket.clone();
        let handler = handler.clone();
        tokio::spawn(async move {
            let reply = handler.finish(pending).await;
            send(&socket, &reply, peer).await;
        });
    }
}

async fn send(socket: &UdpSocket, reply: &[u8], peer: SocketAddr) {
    if let Err(e) = socket.send_to(reply, peer).await {
        tracing::debug!(%peer, error = %e, "sending a UDP reply failed");
    }
}
