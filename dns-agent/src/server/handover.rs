//! Sharing the DNS port with the agent being replaced, without losing a query.
//!
//! Both agents bind the listen sockets with SO_REUSEPORT. A reuseport group can carry one
//! classic BPF program that picks the socket for each packet by its index in the group (the
//! order of binding). Every agent first steers everything to index 0 — the oldest socket, the
//! agent still serving — so a new agent gets no query while it loads the zone; once loaded it
//! steers everything to its own index. The old agent's sockets then receive nothing new, it
//! finishes what it has and leaves; when its sockets close the index is out of range and the
//! kernel falls back to hashing over what is left: the new agent alone.

use std::{io, net::SocketAddr, os::fd::AsRawFd};

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic/socket.h).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
/// `BPF_RET | BPF_K`: return the constant.
const BPF_RET_K: u16 = 0x06;

/// Steers every packet of `socket`'s reuseport group to the socket at `index`.
pub fn steer_to(socket: &impl AsRawFd, index: u32) -> io::Result<()> {
    let filter = [libc::sock_filter {
        code: BPF_RET_K,
        jt: 0,
        jf: 0,
        k: index,
    }];
    let prog = libc::sock_fprog {
        len: 1,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: a valid socket fd and a program that lives for the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How many sockets of this network namespace are bound to `addr` (UDP or TCP listening):
/// the index the next one gets in their reuseport group.
pub fn bound_before(addr: SocketAddr, tcp: bool) -> usize {
    let table = match (addr, tcp) {
        (SocketAddr::V4(_), false) => "/proc/net/udp",
        (SocketAddr::V6(_), false) => "/proc/net/udp6",
        (SocketAddr::V4(_), true) => "/proc/net/tcp",
        (SocketAddr::V6(_), true) => "/proc/net/tcp6",
    };
    let want = proc_net_address(addr);
    std::fs::read_to_string(table)
        .map(|t| {
            t.lines()
                .skip(1)
                .filter(|l| {
                    let mut f = l.split_whitespace();
                    let local = f.nth(1);
                    // TCP: only listeners (state 0A), not connections to the address.
                    let state = f.nth(1);
                    local == Some(want.as_str()) && (!tcp || state == Some("0A"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// An address as /proc/net/{udp,tcp}{,6} print it: the address's 32-bit words in host
/// byte order, in hex, then the port.
fn proc_net_address(addr: SocketAddr) -> String {
    let words: Vec<u32> = match addr {
        SocketAddr::V4(a) => vec![u32::from_ne_bytes(a.ip().octets())],
        SocketAddr::V6(a) => a
            .ip()
            .octets()
            .chunks(4)
            .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    };
    let mut s: String = words.iter().map(|w| format!("{w:08X}")).collect();
    s.push_str(&format!(":{:04X}", addr.port()));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_format() {
        assert_eq!(
            proc_net_address("169.254.20.10:53".parse().unwrap()),
            "0A14FEA9:0035"
        );
        assert_eq!(
            proc_net_address("127.0.0.1:9253".parse().unwrap()),
            "0100007F:2425"
        );
    }

    #[test]
    fn steering_picks_the_socket() {
        // Two sockets in one group on loopback; steer to each in turn.
        let bind = || {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
            s.set_reuse_port(true).unwrap();
            s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
                .unwrap();
            s
        };
        let a = bind();
        let addr = a.local_addr().unwrap().as_socket().unwrap();
        let b = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        b.set_reuse_port(true).unwrap();
        b.bind(&addr.into()).unwrap();
        a.set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        b.set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for (index, to_b) in [(0u32, false), (1, true), (0, false)] {
            steer_to(&a, index).unwrap();
            for _ in 0..5 {
                tx.send_to(b"x", addr).unwrap();
            }
            let mut buf = [std::mem::MaybeUninit::new(0u8); 8];
            let (hit, miss) = if to_b { (&b, &a) } else { (&a, &b) };
            for _ in 0..5 {
                hit.recv(&mut buf).expect("steered here");
            }
            assert!(miss.recv(&mut buf).is_err(), "nothing on the other socket");
        }
    }
}
