//! Sharing the DNS port with the agent being replaced, without losing a query.
//!
//! Both agents bind the listen sockets with SO_REUSEPORT. A reuseport group can carry one
//! classic BPF program that picks the socket for each packet by its index in the group (the
//! order of binding). A new agent first steers everything to the sockets bound before its own —
//! the agent still serving — so it gets no query while it loads the zone; once loaded it steers
//! everything to its own sockets. The old agent's sockets then receive nothing new, it finishes
//! what it has and leaves; when its sockets close, an index out of range makes the kernel fall
//! back to hashing over what is left: the new agent alone. It then steers to its sockets by
//! their new indices ([`super::sockets::Sockets::settle`]).
//!
//! An agent has several UDP sockets per address, one per receive loop, bound one after the
//! other: the program picks among them by the query's DNS ID ([`steer_by_query_id`]). TCP has
//! one listener per address and the metrics port one socket: [`steer_to`] one index.

use std::{io, net::SocketAddr, os::fd::AsRawFd};

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic/socket.h).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
/// `BPF_RET | BPF_K`: return the constant.
const BPF_RET_K: u16 = 0x06;
/// `BPF_LD | BPF_H | BPF_ABS`: A = the 16-bit big-endian word at offset k.
const BPF_LDH_ABS: u16 = 0x28;
/// `BPF_ALU | BPF_MOD | BPF_K`: A %= k.
const BPF_MOD_K: u16 = 0x94;
/// `BPF_ALU | BPF_ADD | BPF_K`: A += k.
const BPF_ADD_K: u16 = 0x04;
/// `BPF_RET | BPF_A`: return A.
const BPF_RET_A: u16 = 0x16;

fn insn(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

/// Steers every packet of `socket`'s reuseport group to the socket at `index`.
pub fn steer_to(socket: &impl AsRawFd, index: u32) -> io::Result<()> {
    attach(socket, &[insn(BPF_RET_K, index)])
}

/// Steers each datagram of `socket`'s (UDP) reuseport group to the socket at index
/// `first + id % count`, where `id` is the DNS ID of the query it carries. The kernel runs the
/// program with the UDP header pulled (`run_bpf_filter` in net/core/sock_reuseport.c), so
/// offset 0 is the DNS header. Stub resolvers pick IDs at random (RFC 5452), which spreads
/// queries evenly over the loops whatever the number of clients or the CPU their packets
/// arrive on; and the agent's heartbeat picks IDs to reach every loop in turn. A datagram too
/// short to hold an ID fails the load, which ends the program with 0: some socket gets it, and
/// drops it as it drops any message shorter than a header.
pub fn steer_by_query_id(socket: &impl AsRawFd, first: u32, count: u32) -> io::Result<()> {
    // The classic BPF checker refuses a division by a constant zero.
    let count = count.max(1);
    attach(
        socket,
        &[
            insn(BPF_LDH_ABS, 0),
            insn(BPF_MOD_K, count),
            insn(BPF_ADD_K, first),
            insn(BPF_RET_A, 0),
        ],
    )
}

fn attach(socket: &impl AsRawFd, filter: &[libc::sock_filter]) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: a valid socket fd and a program that lives for the call; the kernel copies it.
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

    #[test]
    fn queries_are_spread_over_a_run_of_sockets_by_their_id() {
        // Four sockets in one group: the first stands for an agent being replaced, the other
        // three for this agent's loops.
        let bind = |addr: Option<SocketAddr>| {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
            s.set_reuse_port(true).unwrap();
            s.bind(&addr.unwrap_or("127.0.0.1:0".parse().unwrap()).into())
                .unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_millis(200)))
                .unwrap();
            s
        };
        let first = bind(None);
        let addr = first.local_addr().unwrap().as_socket().unwrap();
        let socks = [first, bind(Some(addr)), bind(Some(addr)), bind(Some(addr))];
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut buf = [std::mem::MaybeUninit::new(0u8); 16];
        for (first_index, count) in [(1u32, 3u32), (0, 1)] {
            steer_by_query_id(&socks[2], first_index, count).unwrap();
            for id in [0u16, 1, 2, 3, 4, 5, 0xfffe, 0xffff] {
                let mut query = id.to_be_bytes().to_vec();
                query.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
                tx.send_to(&query, addr).unwrap();
                let want = (first_index + u32::from(id) % count) as usize;
                let (n, _) = socks[want]
                    .recv_from(&mut buf)
                    .unwrap_or_else(|e| panic!("ID {id} to socket {want}: {e}"));
                assert_eq!(n, query.len());
                // SAFETY: recv_from initialised the first n bytes.
                let got = unsafe { [buf[0].assume_init(), buf[1].assume_init()] };
                assert_eq!(got, id.to_be_bytes());
                for (other, s) in socks.iter().enumerate().filter(|(i, _)| *i != want) {
                    s.set_nonblocking(true).unwrap();
                    assert!(
                        s.recv_from(&mut buf).is_err(),
                        "ID {id} also reached socket {other}"
                    );
                    s.set_nonblocking(false).unwrap();
                }
            }
        }
    }
}
