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
//! other: the program picks among them by the query's source port and DNS ID
//! ([`steer_by_client`]). TCP has one listener per address and the metrics port one socket:
//! [`steer_to`] one index.

use std::{io, net::SocketAddr, os::fd::AsRawFd};

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic/socket.h).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
/// `BPF_RET | BPF_K`: return the constant.
const BPF_RET_K: u16 = 0x06;
/// `BPF_LD | BPF_H | BPF_ABS`: A = the 16-bit big-endian word at offset k.
const BPF_LDH_ABS: u16 = 0x28;
/// `BPF_LD | BPF_H | BPF_IND`: A = the 16-bit big-endian word at offset X + k.
const BPF_LDH_IND: u16 = 0x48;
/// `BPF_LDX | BPF_B | BPF_MSH`: X = 4 * (the byte at offset k & 0xf), an IPv4 header's length.
const BPF_LDX_MSH: u16 = 0xb1;
/// `BPF_MISC | BPF_TAX`: X = A.
const BPF_TAX: u16 = 0x07;
/// `BPF_ALU | BPF_ADD | BPF_X`: A += X.
const BPF_ADD_X: u16 = 0x0c;
/// `BPF_ALU | BPF_MOD | BPF_K`: A %= k.
const BPF_MOD_K: u16 = 0x94;
/// `BPF_ALU | BPF_ADD | BPF_K`: A += k.
const BPF_ADD_K: u16 = 0x04;
/// `BPF_RET | BPF_A`: return A.
const BPF_RET_A: u16 = 0x16;
/// `SKF_NET_OFF` (linux/filter.h): offsets from here on count from the network header.
const SKF_NET_OFF: u32 = (-0x10_0000i32) as u32;

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
/// `first + (port + id) % count`, where `port` is the client's UDP source port and `id` the DNS
/// ID of its query. Either spreads clients over the loops: stub resolvers pick both at random
/// (RFC 5452), load generators often vary one and keep the other (kxdpgun: a fixed ID, one port
/// after the other; dnsperf: a fixed port, one ID after the other). A client that keeps both
/// stays on one loop. The heartbeat, knowing its own port, picks IDs to reach every loop in
/// turn ([`super::heartbeat::probe_ids`]).
///
/// The kernel runs the program with the UDP header pulled (`run_bpf_filter` in
/// net/core/sock_reuseport.c), so offset 0 is the DNS header; the port is read from the UDP
/// header through the network header's offset (`SKF_NET_OFF`): after the IPv4 header's length,
/// or after the 40 bytes of an IPv6 header (a datagram with extension headers reads other
/// bytes there, which spread as well). A failed load (a datagram too short to hold an ID) ends
/// the program with 0: some socket gets it, and drops it as it drops any message shorter than
/// a header.
pub fn steer_by_client(
    socket: &impl AsRawFd,
    ipv6: bool,
    first: u32,
    count: u32,
) -> io::Result<()> {
    // The classic BPF checker refuses a division by a constant zero.
    let count = count.max(1);
    let mut program = Vec::with_capacity(9);
    if ipv6 {
        program.push(insn(BPF_LDH_ABS, SKF_NET_OFF.wrapping_add(40)));
    } else {
        program.push(insn(BPF_LDX_MSH, SKF_NET_OFF));
        program.push(insn(BPF_LDH_IND, SKF_NET_OFF));
    }
    program.extend([
        insn(BPF_TAX, 0),
        insn(BPF_LDH_ABS, 0),
        insn(BPF_ADD_X, 0),
        insn(BPF_MOD_K, count),
        insn(BPF_ADD_K, first),
        insn(BPF_RET_A, 0),
    ]);
    attach(socket, &program)
}

/// The loop (`0..loops`, in the order the agent bound its sockets) that a query from source
/// `port` with DNS `id` reaches under [`steer_by_client`].
pub fn loop_of(port: u16, id: u16, loops: usize) -> usize {
    (usize::from(port) + usize::from(id)) % loops.max(1)
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
    fn queries_are_spread_over_a_run_of_sockets_by_port_and_id() {
        for (any, ipv6) in [("127.0.0.1:0", false), ("[::1]:0", true)] {
            let any: SocketAddr = any.parse().unwrap();
            let domain = socket2::Domain::for_address(any);
            // Four sockets in one group: the first stands for an agent being replaced, the
            // other three for this agent's loops.
            let bind = |addr: SocketAddr| {
                let s = socket2::Socket::new(domain, socket2::Type::DGRAM, None).unwrap();
                s.set_reuse_port(true).unwrap();
                s.bind(&addr.into()).unwrap();
                s.set_read_timeout(Some(std::time::Duration::from_millis(200)))
                    .unwrap();
                s
            };
            let first = bind(any);
            let addr = first.local_addr().unwrap().as_socket().unwrap();
            let socks = [first, bind(addr), bind(addr), bind(addr)];
            // Two clients: two source ports.
            let clients = [
                std::net::UdpSocket::bind(any).unwrap(),
                std::net::UdpSocket::bind(any).unwrap(),
            ];
            let mut buf = [std::mem::MaybeUninit::new(0u8); 16];
            for (first_index, count) in [(1u32, 3u32), (0, 1), (0, 4)] {
                steer_by_client(&socks[2], ipv6, first_index, count).unwrap();
                for tx in &clients {
                    let port = tx.local_addr().unwrap().port();
                    for id in [0u16, 1, 2, 3, 4, 5, 0xfffe, 0xffff] {
                        let mut query = id.to_be_bytes().to_vec();
                        query.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
                        tx.send_to(&query, addr).unwrap();
                        let want = first_index as usize + loop_of(port, id, count as usize);
                        let (n, _) = socks[want].recv_from(&mut buf).unwrap_or_else(|e| {
                            panic!("{addr}: port {port} ID {id} to socket {want}: {e}")
                        });
                        assert_eq!(n, query.len());
                        // SAFETY: recv_from initialised the first n bytes.
                        let got = unsafe { [buf[0].assume_init(), buf[1].assume_init()] };
                        assert_eq!(got, id.to_be_bytes());
                        for (other, s) in socks.iter().enumerate().filter(|(i, _)| *i != want) {
                            s.set_nonblocking(true).unwrap();
                            assert!(
                                s.recv_from(&mut buf).is_err(),
                                "port {port} ID {id} also reached socket {other}"
                            );
                            s.set_nonblocking(false).unwrap();
                        }
                    }
                }
            }
        }
    }
}
