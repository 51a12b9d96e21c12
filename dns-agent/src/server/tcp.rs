//! TCP (RFC 7766): length-prefixed messages, several per connection. How many connections a
//! client may hold, and for how long they may wait for it, is `limits`' business.
//!
//! A connection is read in chunks: every complete message a read brought is answered into one
//! output buffer, and those replies leave in one write. Buffers live as long as the
//! connection, so a client that sends thousands of queries on it costs no allocation per
//! query, and they grow with what arrives, not with a length prefix (a client announcing 64 KiB
//! and sending nothing holds no 64 KiB). A query that waits for an upstream does not hold up
//! the ones behind it: its reply is written when it comes, possibly after later ones (RFC 7766
//! §6.2.1.1 allows answers out of order; the ID tells the client which is which).

use std::{io, net::IpAddr, sync::Arc, time::Instant};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

use super::{
    Handler, Transport,
    limits::{Closed, TcpConnection},
};
use crate::accept::accept_failed;

/// Queries of one connection waiting for an upstream at once. Beyond, the connection is not
/// read until one is answered (RFC 7766 §6.2.1.1 lets a server limit what it processes in
/// parallel per connection).
const WAITING_PER_CONNECTION: usize = 64;

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
    let (mut reader, mut writer) = stream.split();
    let mut input: Vec<u8> = Vec::with_capacity(4096);
    let mut output: Vec<u8> = Vec::with_capacity(4096);
    let (answered_tx, mut answered) = mpsc::channel::<Vec<u8>>(WAITING_PER_CONNECTION);
    let mut waiting = 0usize;
    let mut client_done = false;
    loop {
        let read = if waiting == 0 {
            // Nothing in flight: the connection waits for its client, at most the idle timeout
            // (in the middle of a message: stalled), and may be closed to make room for another.
            Some(
                slot.read(input.is_empty(), reader.read_buf(&mut input))
                    .await?,
            )
        } else {
            tokio::select! {
                Some(reply) = answered.recv() => {
                    waiting -= 1;
                    frame(&mut output, |out| out.extend_from_slice(&reply));
                    None
                }
                read = reader.read_buf(&mut input),
                    if !client_done && waiting < WAITING_PER_CONNECTION => Some(read?),
            }
        };
        match read {
            // The client sent all it will; what waits for an upstream is still sent.
            Some(0) => client_done = true,
            Some(_) => {
                let used = answer_all(
                    &handler,
                    client,
                    &input,
                    &mut output,
                    &mut waiting,
                    &answered_tx,
                );
                input.drain(..used);
            }
            None => {}
        }
        if !output.is_empty() {
            slot.write(writer.write_all(&output)).await?;
            output.clear();
        }
        if client_done && waiting == 0 {
            return Ok(());
        }
    }
}

/// Answers every complete message at the start of `input` into `output` (framed); those that
/// wait for an upstream get a task that sends the reply to `answered`. Returns the bytes
/// used. Stops early when [`WAITING_PER_CONNECTION`] queries wait.
fn answer_all(
    handler: &Arc<Handler>,
    client: IpAddr,
    input: &[u8],
    output: &mut Vec<u8>,
    waiting: &mut usize,
    answered: &mpsc::Sender<Vec<u8>>,
) -> usize {
    let mut used = 0;
    while *waiting < WAITING_PER_CONNECTION {
        let Some(len) = input
            .get(used..used + 2)
            .map(|l| u16::from_be_bytes([l[0], l[1]]) as usize)
        else {
            break;
        };
        let Some(msg) = input.get(used + 2..used + 2 + len) else {
            break;
        };
        used += 2 + len;
        let mut pending = None;
        frame(output, |out| {
            match handler.answer_now(msg, Transport::Tcp, client, out) {
                Ok(_) => {}
                Err(p) => pending = Some(p),
            }
        });
        if let Some(p) = pending {
            *waiting += 1;
            let (handler, answered) = (handler.clone(), answered.clone());
            tokio::spawn(async move {
                let reply = handler.finish(p).await;
                let _ = answered.send(reply).await;
            });
        }
    }
    used
}

/// Appends one framed message that `write` appends: its two-byte length, then the message. A
/// write that appends nothing leaves nothing.
fn frame(output: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let start = output.len();
    output.extend_from_slice(&[0, 0]);
    write(output);
    let len = output.len() - start - 2;
    if len == 0 {
        output.truncate(start);
        return;
    }
    // Replies over TCP are built with a limit of 65,535 bytes (TC beyond), so this fits.
    let len = u16::try_from(len).expect("a TCP reply fits its length field");
    output[start..start + 2].copy_from_slice(&len.to_be_bytes());
}
