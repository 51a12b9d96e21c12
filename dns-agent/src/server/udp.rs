//! UDP: the queries the kernel passes up, taken off the socket and answered in batches.
//!
//! Each listen address has one socket per receive loop, in one `SO_REUSEPORT` group; the
//! group's steering program spreads queries over the loops by source port and DNS ID (see
//! [`super::handover`]). A loop takes up to [`mmsg::BATCH`] queries per system call, answers
//! those the zone or the cache can answer into reusable buffers, and sends their replies with
//! one system call. A query that waits for an upstream gets a task on the agent's main
//! runtime, which sends its reply when it comes.

use std::{io, net::SocketAddr, sync::Arc};

use tokio::{io::Interest, net::UdpSocket, runtime::Handle};

use super::{
    Handler, Transport,
    mmsg::{Datagram, RecvBatch, SendBatch},
};

/// Serves one UDP socket until the task is cancelled. Queries that wait for an upstream are
/// spawned on `upstream_runtime`.
pub async fn serve(
    socket: Arc<UdpSocket>,
    handler: Arc<Handler>,
    upstream_runtime: Handle,
) -> io::Result<()> {
    let local = socket.local_addr().ok();
    let mut queries = RecvBatch::new();
    let mut replies = SendBatch::default();
    loop {
        socket.readable().await?;
        // Batches until the socket is empty; then tokio waits for the next datagram.
        loop {
            match socket.try_io(Interest::READABLE, || queries.recv(&*socket)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // ICMP errors from earlier sends surface here on some kernels; not fatal.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e),
            }
            for query in queries.iter() {
                answer(
                    &handler,
                    &socket,
                    query,
                    local,
                    &mut replies,
                    &upstream_runtime,
                );
            }
            flush(&socket, &mut replies).await;
            // Under a steady stream the socket is never empty: let the runtime's other tasks
            // run now and then.
            tokio::task::consume_budget().await;
        }
    }
}

/// One datagram: its reply joins the batch, or a task waits for the upstream.
fn answer(
    handler: &Arc<Handler>,
    socket: &Arc<UdpSocket>,
    query: Datagram<'_>,
    local: Option<SocketAddr>,
    replies: &mut SendBatch,
    upstream_runtime: &Handle,
) {
    if query.truncated {
        // Longer than any query a resolver sends: not answered from its first bytes.
        handler.metrics.dropped();
        return;
    }
    let peer = query.peer();
    let Some(peer_addr) = peer.as_socket() else {
        return;
    };
    if handler.probe.is(query.bytes, peer_addr, local) {
        if handler.answer_probe(query.bytes, replies.next_reply()) {
            replies.commit(peer);
        }
        return;
    }
    match handler.answer_now(
        query.bytes,
        Transport::Udp,
        peer_addr.ip(),
        replies.next_reply(),
    ) {
        Ok(true) => replies.commit(peer),
        Ok(false) => {}
        Err(pending) => {
            let (socket, handler) = (socket.clone(), handler.clone());
            upstream_runtime.spawn(async move {
                let reply = handler.finish(pending).await;
                if let Err(e) = socket.send_to(&reply, peer_addr).await {
                    tracing::debug!(peer = %peer_addr, error = %e, "sending a UDP reply failed");
                }
            });
        }
    }
}

/// Sends the batch: one system call when the socket takes it all, more when it takes part.
async fn flush(socket: &UdpSocket, replies: &mut SendBatch) {
    let mut sent = 0;
    while sent < replies.len() {
        match socket.try_io(Interest::WRITABLE, || replies.send(socket, sent)) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if socket.writable().await.is_err() {
                    break;
                }
            }
            Err(e) => {
                // This reply cannot go (its client's route, say): the others still can.
                tracing::debug!(peer = ?replies.peer_of(sent), error = %e, "sending a UDP reply failed");
                sent += 1;
            }
        }
    }
    replies.clear();
}
