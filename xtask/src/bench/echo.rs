//! The ceiling of any DNS server on UDP sockets: a server that does no DNS work at all. One
//! thread per CPU, each with its own `SO_REUSEPORT` socket (4 MiB receive buffer, as xdns and
//! the bench's unbound ask), takes queries off in `recvmmsg` batches of 32, sets QR and sends
//! every query straight back with one `sendmmsg` — the socket counterpart of the XDP reflector.
//! Whatever a real server does per query (parse, look up, encode) comes on top of this, so a
//! server's rate over this one's is the share of the socket path's ceiling it reaches, and this
//! one's rate over unbound's is the most any socket server can lead unbound by here.
//!
//! Run by `cargo xtask bench` as `cargo xtask bench-echo ADDR` in the node namespace; blocking
//! system calls, no runtime. Killed at the end of the run.

use std::{io, mem, net::Ipv4Addr, os::fd::RawFd, ptr};

use anyhow::Context as _;

/// Datagrams per system call, as xdns's loops take them.
const BATCH: usize = 32;
/// Room for one query.
const ROOM: usize = 2048;
const RCVBUF: libc::c_int = 4 << 20;

pub fn serve(listen: Ipv4Addr) -> anyhow::Result<()> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let sockets = (0..threads)
        .map(|_| socket(listen))
        .collect::<anyhow::Result<Vec<_>>>()
        .with_context(|| format!("binding {listen}:53"))?;
    let handles: Vec<_> = sockets
        .into_iter()
        .map(|fd| std::thread::spawn(move || echo_loop(fd)))
        .collect();
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("an echo thread panicked"))??;
    }
    Ok(())
}

fn check(rc: libc::c_int, what: &str) -> anyhow::Result<()> {
    if rc < 0 {
        return Err(io::Error::last_os_error()).context(what.to_string());
    }
    Ok(())
}

fn socket(listen: Ipv4Addr) -> anyhow::Result<RawFd> {
    // SAFETY: plain system calls on a descriptor this function owns; the option values and the
    // address are live locals of the sizes passed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        check(fd, "socket")?;
        let one: libc::c_int = 1;
        let opt = |name, value: &libc::c_int| {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                (value as *const libc::c_int).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        check(opt(libc::SO_REUSEPORT, &one), "SO_REUSEPORT")?;
        check(opt(libc::SO_RCVBUF, &RCVBUF), "SO_RCVBUF")?;
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 53u16.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(listen).to_be(),
            },
            sin_zero: [0; 8],
        };
        check(
            libc::bind(
                fd,
                (&raw const addr).cast(),
                mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ),
            "bind",
        )?;
        Ok(fd)
    }
}

fn echo_loop(fd: RawFd) -> anyhow::Result<()> {
    let mut bufs = vec![0u8; BATCH * ROOM];
    // SAFETY: all-zero bytes are valid for these C structs; they are pointed at the buffers
    // below before the first call.
    let mut addrs: [libc::sockaddr_in; BATCH] = unsafe { mem::zeroed() };
    let mut iovecs: [libc::iovec; BATCH] = unsafe { mem::zeroed() };
    let mut headers: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
    for i in 0..BATCH {
        iovecs[i].iov_base = bufs[i * ROOM..].as_mut_ptr().cast();
        let h = &mut headers[i].msg_hdr;
        h.msg_name = (&raw mut addrs[i]).cast();
        h.msg_iov = &raw mut iovecs[i];
        h.msg_iovlen = 1;
    }
    loop {
        // What the last round changed: the kernel writes each sender's address length, and the
        // replies were sent with the queries' lengths.
        for i in 0..BATCH {
            iovecs[i].iov_len = ROOM;
            headers[i].msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        }
        // SAFETY: every header points at live buffers of the lengths given.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                headers.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("recvmmsg");
        }
        let n = n as usize;
        for i in 0..n {
            let len = headers[i].msg_len as usize;
            iovecs[i].iov_len = len;
            if len >= 12 {
                bufs[i * ROOM + 2] |= 0x80;
            }
        }
        // SAFETY: as above; the first `n` headers hold what recvmmsg filled in.
        let sent = unsafe { libc::sendmmsg(fd, headers.as_mut_ptr(), n as libc::c_uint, 0) };
        if sent < 0 {
            let e = io::Error::last_os_error();
            // A full socket buffer loses the batch, as it would any server's replies.
            if !matches!(
                e.raw_os_error(),
                Some(libc::EAGAIN | libc::ENOBUFS | libc::EINTR)
            ) {
                return Err(e).context("sendmmsg");
            }
        }
    }
}
