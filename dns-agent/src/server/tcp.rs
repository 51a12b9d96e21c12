//! TCP (RFC 7766): length-prefixed messages, several per connection, idle connections closed.

use std::{io, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::{Handler, Transport};

/// How long a connection may sit idle between queries.
const IDLE: Duration = Duration::from_secs(10);

pub async fn serve(listener: Arc<TcpListener>, handler: Arc<Handler>) -> io::Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        let handler = handler.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, handler).await {
                tracing::debug!(%peer, error = %e, "TCP connection ended");
            }
        });
    }
}

async fn connection(mut stream: TcpStream, handler: Arc<Handler>) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let peer = stream.peer_addr().ok().map(|a| a.ip().to_canonical());
    loop {
        let len = match tokio::time::timeout(IDLE, stream.read_u16()).await {
            Ok(Ok(len)) => len as usize,
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        };
        let mut msg = vec![0u8; len];
        tokio::time::timeout(IDLE, stream.read_exact(&mut msg))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "message not completed"))??;
        let Some(reply) = handler.handle_from(&msg, Transport::Tcp, peer).await else {
            continue;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&(reply.len() as u16).to_be_bytes());
        framed.extend_from_slice(&reply);
        stream.write_all(&framed).await?;
    }
}
