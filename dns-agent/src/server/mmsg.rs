//! Datagrams in batches: one `recvmmsg(2)` takes up to [`BATCH`] queries off a socket, one
//! `sendmmsg(2)` sends their replies. The socket is in blocking mode with timeouts
//! (`SO_RCVTIMEO`, `SO_SNDTIMEO`): a receive sleeps until the first datagram comes, then takes
//! what else is queued without waiting. Batches save system calls (and the wake-ups between
//! them); each datagram still crosses the network stack on its own.

use std::{io, mem, net::SocketAddr, os::fd::AsRawFd, ptr};

use socket2::{SockAddr, SockAddrStorage};

/// Datagrams per system call.
pub const BATCH: usize = 32;

/// Room for one query. A query is a header, one question and an OPT record with its options: a
/// few hundred bytes. A longer datagram is dropped whole (the kernel says `MSG_TRUNC`), never
/// answered from its first bytes.
pub const QUERY_ROOM: usize = 4096;

/// A datagram taken off the socket.
pub struct Datagram<'a> {
    pub bytes: &'a [u8],
    /// Longer than [`QUERY_ROOM`]: `bytes` is only its beginning.
    pub truncated: bool,
    peer: &'a libc::sockaddr_storage,
    peer_len: libc::socklen_t,
}

impl Datagram<'_> {
    /// The sender, in the form `sendmmsg` takes it back.
    pub fn peer(&self) -> SockAddr {
        let mut storage = SockAddrStorage::zeroed();
        // SAFETY: `sockaddr_storage` is one of this platform's sockaddr types, and the kernel
        // wrote `peer_len` bytes of an address of the socket's family into `peer`.
        unsafe {
            *storage.view_as::<libc::sockaddr_storage>() = *self.peer;
            SockAddr::new(storage, self.peer_len)
        }
    }
}

/// Buffers for one `recvmmsg` call, reused for every call.
pub struct RecvBatch {
    bufs: Vec<u8>,
    addrs: [libc::sockaddr_storage; BATCH],
    iovecs: [libc::iovec; BATCH],
    headers: [libc::mmsghdr; BATCH],
    received: usize,
}

impl RecvBatch {
    pub fn new() -> Box<Self> {
        Box::new(Self {
            bufs: vec![0; BATCH * QUERY_ROOM],
            // SAFETY: all-zero bytes are valid for these plain C structs (null pointers, zero
            // lengths); `recv` points them at the buffers before every call.
            addrs: unsafe { mem::zeroed() },
            iovecs: unsafe { mem::zeroed() },
            headers: unsafe { mem::zeroed() },
            received: 0,
        })
    }

    /// Waits for a datagram, then takes what else the socket holds, up to [`BATCH`] in all:
    /// `WouldBlock` when the socket's receive timeout passed with nothing.
    pub fn recv(&mut self, socket: &impl AsRawFd) -> io::Result<usize> {
        self.received = 0;
        for i in 0..BATCH {
            self.iovecs[i] = libc::iovec {
                iov_base: self.bufs[i * QUERY_ROOM..].as_mut_ptr().cast(),
                iov_len: QUERY_ROOM,
            };
            let h = &mut self.headers[i].msg_hdr;
            h.msg_name = ptr::from_mut(&mut self.addrs[i]).cast();
            h.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iovecs[i];
            h.msg_iovlen = 1;
            h.msg_control = ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
            self.headers[i].msg_len = 0;
        }
        // SAFETY: every header points at buffers of this struct that outlive the call, with
        // their true lengths.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.headers.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.received = n as usize;
        Ok(self.received)
    }

    /// The datagrams of the last call.
    pub fn iter(&self) -> impl Iterator<Item = Datagram<'_>> {
        (0..self.received).map(|i| {
            let h = &self.headers[i];
            let len = (h.msg_len as usize).min(QUERY_ROOM);
            Datagram {
                bytes: &self.bufs[i * QUERY_ROOM..i * QUERY_ROOM + len],
                truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
                peer: &self.addrs[i],
                peer_len: h.msg_hdr.msg_namelen,
            }
        })
    }
}

// SAFETY: the raw pointers in the headers point into the struct's own buffers and are rebuilt
// before each call; nothing else refers to them.
unsafe impl Send for RecvBatch {}

/// Replies waiting for one `sendmmsg` call, their buffers reused for every batch.
pub struct SendBatch {
    replies: Vec<(Vec<u8>, Option<SockAddr>)>,
    ready: usize,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

impl Default for SendBatch {
    fn default() -> Self {
        Self {
            replies: Vec::with_capacity(BATCH),
            ready: 0,
            iovecs: Vec::with_capacity(BATCH),
            headers: Vec::with_capacity(BATCH),
        }
    }
}

impl SendBatch {
    /// The buffer for the next reply, empty. It joins the batch only with [`Self::commit`].
    pub fn next_reply(&mut self) -> &mut Vec<u8> {
        if self.ready == self.replies.len() {
            self.replies.push((Vec::with_capacity(512), None));
        }
        let buf = &mut self.replies[self.ready].0;
        buf.clear();
        buf
    }

    /// The reply written into [`Self::next_reply`] goes to `peer`.
    pub fn commit(&mut self, peer: SockAddr) {
        self.replies[self.ready].1 = Some(peer);
        self.ready += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.ready == 0
    }

    pub fn len(&self) -> usize {
        self.ready
    }

    /// Sends replies `from..` of the batch in one call: how many went out (`WouldBlock` when
    /// the socket's send buffer stayed full for its send timeout). A reply that fails for a reason
    /// of its own (say, no route to its client) is reported as the error with nothing sent;
    /// the caller skips it.
    pub fn send(&mut self, socket: &impl AsRawFd, from: usize) -> io::Result<usize> {
        self.iovecs.clear();
        self.headers.clear();
        for (buf, peer) in &self.replies[from..self.ready] {
            self.iovecs.push(libc::iovec {
                iov_base: buf.as_ptr().cast_mut().cast(),
                iov_len: buf.len(),
            });
            let peer = peer.as_ref().expect("committed replies have a peer");
            // SAFETY: all-zero is a valid `mmsghdr`; the fields that matter are set below.
            let mut h: libc::mmsghdr = unsafe { mem::zeroed() };
            h.msg_hdr.msg_name = peer.as_ptr().cast_mut().cast();
            h.msg_hdr.msg_namelen = peer.len();
            h.msg_hdr.msg_iovlen = 1;
            self.headers.push(h);
        }
        // The iovecs no longer move: point the headers at them.
        for (h, iov) in self.headers.iter_mut().zip(self.iovecs.iter_mut()) {
            h.msg_hdr.msg_iov = iov;
        }
        // SAFETY: every header points at an address and a buffer owned by `self.replies`,
        // unchanged during the call; sendmmsg only reads them.
        let n = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                self.headers.as_mut_ptr(),
                self.headers.len() as libc::c_uint,
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Forgets the batch (after it was sent).
    pub fn clear(&mut self) {
        self.ready = 0;
    }

    /// The client of reply `i`, for a log line.
    pub fn peer_of(&self, i: usize) -> Option<SocketAddr> {
        self.replies.get(i)?.1.as_ref()?.as_socket()
    }
}

// SAFETY: the raw pointers in `iovecs` and `headers` are rebuilt before every call and point
// into `replies`, which the struct owns.
unsafe impl Send for SendBatch {}
