//! Accepting connections on the agent's listening sockets (DNS over TCP, metrics) without
//! letting a transient failure end the server.

use std::{
    io,
    time::{Duration, Instant},
};

/// An `accept` that failed: `Ok` when the listener is still good and the loop should go on
/// after a pause (out of file descriptors or memory, a connection reset before it was
/// accepted), the error when the socket itself is broken.
pub async fn accept_failed(
    e: io::Error,
    what: &str,
    last_warned: &mut Option<Instant>,
) -> io::Result<()> {
    let broken = matches!(
        e.raw_os_error(),
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP | libc::EFAULT)
    );
    if broken {
        return Err(e);
    }
    if last_warned.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
        tracing::warn!(
            error = %e,
            "accepting a {what} connection failed; retrying (out of file descriptors? see \
             --tcp-max-connections, --max-concurrent)"
        );
        *last_warned = Some(Instant::now());
    }
    // The connection stays in the backlog: without a pause, EMFILE would spin the loop.
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(())
}
