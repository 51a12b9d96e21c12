//! TCP (RFC 7766): length-prefixed messages, several per connection. How many connections a
//! client may hold, and for how long they may wait for it, is `limits`' business.

use std::{io, net::IpAddr, sync::Arc, time::Instant};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::{
    Handler, Transport,
    limits::{Closed, TcpConnection},
};
use crate::accept::accept_failed;

pub async fn serve(listener: Arc<TcpListener>, handler: Arc<Handler>) -> io::Result<()> {
    let mut last_warned: Option<Instant> = None;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                accept_failed(e, "DNS over TCP", &mut last_warned).await?;
                continue;
            }
        };
        // Over a limit, and nothing to make room: closed at once (dropped).
        let Some(slot) = handler.limits.admit_tcp(peer.ip()) else {
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, peer.ip(), handler, slot).await {
                tracing::debug!(%peer, error = %e, "TCP connection ended");
            }
        });
    }
}

async fn connection(
    mut stream: TcpStream,
    client: IpAddr,
    handler: Arc<Handler>,
    mut slot: TcpConnection,
) -> Result<(), Closed> {
    stream.set_nodelay(true)?;
    loop {
        let len = match slot.read(true, stream.read_u16()).await {
            Ok(len) => len,
            Err(Closed::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        // Read as it arrives, not allocated from the length prefix: a client announcing 64 KiB
        // and sending nothing holds no 64 KiB.
        let mut msg = Vec::new();
        slot.read(
            false,
            (&mut stream).take(u64::from(len)).read_to_end(&mut msg),
        )
        .await?;
        if msg.len() < usize::from(len) {
            // The client closed in the middle of a message.
            return Ok(());
        }
        let Some(reply) = handler.handle(&msg, Transport::Tcp, client).await else {
            continue;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&(reply.len() as u16).to_be_bytes());
        framed.extend_from_slice(&reply);
        slot.write(stream.write_all(&framed)).await?;
    }
}
