//! UDP: the queries the kernel passes up, taken off the socket and answered in batches.
//!
//! Each listen address has one socket per receive loop, in one `SO_REUSEPORT` group; the
//! group's steering program spreads queries over the loops by source port and DNS ID (see
//! [`super::handover`]). A loop is a thread of its own, as in unbound or Knot: it sleeps in
//! `recvmmsg` until a query comes, takes up to [`mmsg::BATCH`] queries at once, answers those the
//! zone or the cache can answer into reusable buffers, and sends their replies with one
//! `sendmmsg`: two system calls per batch. (A loop on the async runtime took four: the
//! runtime's `epoll_wait`, the receive, the send, and a receive that found the socket empty.)
//! A query that waits for an upstream gets a task on the agent's runtime, which sends its reply
//! when it comes.

use std::{
    io,
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use socket2::SockRef;
use tokio::{runtime::Handle, sync::oneshot};

use super::{
    Handler, Transport,
    mmsg::{Datagram, RecvBatch, SendBatch},
};

/// How long a loop sleeps in `recvmmsg` before it looks whether it should stop.
const STOP_CHECK: Duration = Duration::from_millis(100);
/// How long a loop waits for room in the socket's send buffer before it drops the rest of a
/// batch of replies (the clients ask again).
const SEND_WAIT: Duration = Duration::from_millis(100);

/// A receive loop: a thread serving one UDP socket until the loop is dropped or the socket
/// fails. Dropping it stops the thread and waits for it (at most [`STOP_CHECK`]), so that the
/// socket has left its reuseport group when the drop returns.
pub struct Loop {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Loop {
    /// Starts serving `socket`; queries that wait for an upstream are spawned on `runtime`. The
    /// receiver gets how the loop ended if it ends by itself (an error of the socket).
    pub fn spawn(
        socket: UdpSocket,
        handler: Arc<Handler>,
        runtime: Handle,
    ) -> io::Result<(Self, oneshot::Receiver<io::Result<()>>)> {
        let stop = Arc::new(AtomicBool::new(false));
        let (done_tx, done) = oneshot::channel();
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("xdns-udp".into())
            .spawn(move || {
                // Tasks the handler starts (a prefetch, say) go to the runtime too.
                let _runtime = runtime.enter();
                let result = receive_loop(Arc::new(socket), &handler, &runtime, &thread_stop);
                if !thread_stop.load(Ordering::Relaxed) {
                    let _ = done_tx.send(result);
                }
            })?;
        Ok((
            Self {
                stop,
                thread: Some(thread),
            },
            done,
        ))
    }

    /// Tells the thread to stop, without waiting for it: stopping many loops at once takes one
    /// [`STOP_CHECK`], not one each.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        self.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn receive_loop(
    socket: Arc<UdpSocket>,
    handler: &Arc<Handler>,
    runtime: &Handle,
    stop: &AtomicBool,
) -> io::Result<()> {
    // Blocking, with timeouts: the loop sleeps in the system calls themselves.
    socket.set_nonblocking(false)?;
    socket.set_read_timeout(Some(STOP_CHECK))?;
    socket.set_write_timeout(Some(SEND_WAIT))?;
    let local = socket.local_addr().ok();
    let mut queries = RecvBatch::new();
    let mut replies = SendBatch::default();
    while !stop.load(Ordering::Relaxed) {
        match queries.recv(&*socket) {
            Ok(_) => {}
            // The timeout: nothing came.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // ICMP errors from earlier sends surface here on some kernels; not fatal.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
            Err(e) => return Err(e),
        }
        for query in queries.iter() {
            answer(handler, &socket, query, local, &mut replies, runtime);
        }
        flush(&socket, &mut replies);
    }
    Ok(())
}

/// One datagram: its reply joins the batch, or a task waits for the upstream.
fn answer(
    handler: &Arc<Handler>,
    socket: &Arc<UdpSocket>,
    query: Datagram<'_>,
    local: Option<SocketAddr>,
    replies: &mut SendBatch,
    runtime: &Handle,
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
            runtime.spawn(async move {
                let reply = handler.finish(pending).await;
                // Without waiting: the socket is the loop's, in blocking mode. A full send
                // buffer loses this reply as the network would; the client asks again.
                if let Err(e) = SockRef::from(&*socket).send_to_with_flags(
                    &reply,
                    &peer_addr.into(),
                    libc::MSG_DONTWAIT,
                ) {
                    tracing::debug!(peer = %peer_addr, error = %e, "sending a UDP reply failed");
                }
            });
        }
    }
}

/// Sends the batch: one system call when the socket takes it all, more when it takes part.
fn flush(socket: &UdpSocket, replies: &mut SendBatch) {
    let mut sent = 0;
    while sent < replies.len() {
        match replies.send(socket, sent) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // No room for SEND_WAIT: the rest of the batch is lost, as on a congested link.
                tracing::debug!(
                    lost = replies.len() - sent,
                    "the UDP send buffer stayed full"
                );
                break;
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
