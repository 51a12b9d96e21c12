//! Interfaces as they come and go: pod veths appear when pods start, so the program is attached
//! to every interface whose name matches `--interface-pattern`, now and later.
//!
//! Listens to the kernel's link notifications (rtnetlink, `RTMGRP_LINK`) rather than polling:
//! a new pod's veth gets the program within milliseconds of appearing.

use std::{
    ffi::CStr,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use tokio::{io::unix::AsyncFd, sync::mpsc};

/// A change of the node's interfaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// The interface exists (new, or reported again).
    Up(String),
    /// The interface is gone.
    Gone(String),
}

/// A shell-style pattern: `*` any run of characters, `?` one character.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    pub fn new(p: &str) -> Result<Self, String> {
        if p.is_empty() || p.len() > 15 {
            return Err(format!(
                "{p:?}: an interface name pattern is 1 to 15 characters"
            ));
        }
        if p.bytes().any(|c| c == b'/' || c.is_ascii_whitespace()) {
            return Err(format!("{p:?}: interface names have no '/' or spaces"));
        }
        Ok(Self(p.to_string()))
    }

    pub fn matches(&self, name: &str) -> bool {
        fn go(p: &[u8], n: &[u8]) -> bool {
            match (p.first(), n.first()) {
                (None, None) => true,
                (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
                (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
                (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
                _ => false,
            }
        }
        go(self.0.as_bytes(), name.as_bytes())
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The interfaces of this network namespace now.
pub fn current() -> Vec<String> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array ending in a zeroed entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 {
            out.push(CStr::from_ptr((*p).if_name).to_string_lossy().into_owned());
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

const RTMGRP_LINK: u32 = 1;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const IFLA_IFNAME: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

/// A netlink socket subscribed to link notifications.
fn subscribe() -> io::Result<OwnedFd> {
    // SAFETY: plain socket and bind calls; the fd is owned right away.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_nl = std::mem::zeroed();
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = RTMGRP_LINK;
        if libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }
}

/// The link events in one datagram of notifications.
pub fn parse(buf: &[u8]) -> Vec<LinkEvent> {
    let mut events = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().expect("2 bytes"));
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            break;
        }
        if kind == RTM_NEWLINK || kind == RTM_DELLINK {
            let msg = &buf[off + NLMSG_HDRLEN..off + len];
            if let Some(name) = ifname(msg) {
                events.push(if kind == RTM_NEWLINK {
                    LinkEvent::Up(name)
                } else {
                    LinkEvent::Gone(name)
                });
            }
        }
        off += (len + 3) & !3;
    }
    events
}

/// IFLA_IFNAME of an ifinfomsg and its attributes.
fn ifname(msg: &[u8]) -> Option<String> {
    let mut off = IFINFOMSG_LEN;
    while off + 4 <= msg.len() {
        let len = u16::from_ne_bytes([msg[off], msg[off + 1]]) as usize;
        let kind = u16::from_ne_bytes([msg[off + 2], msg[off + 3]]);
        if len < 4 || off + len > msg.len() {
            return None;
        }
        if kind == IFLA_IFNAME {
            let raw = &msg[off + 4..off + len];
            let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
            return Some(String::from_utf8_lossy(&raw[..end]).into_owned());
        }
        off += (len + 3) & !3;
    }
    None
}

/// Sends the interfaces that exist now, then every change, until the receiver goes away.
pub async fn watch(tx: mpsc::Sender<LinkEvent>) -> io::Result<()> {
    // Subscribe first, then list: a link that appears in between is reported twice, never
    // missed.
    // SAFETY: an OwnedFd: open for as long as the AsyncFd owns it, and always the same fd.
    let socket = unsafe { AsyncFd::register(subscribe()?) }.map_err(io::Error::from)?;
    for name in current() {
        if tx.send(LinkEvent::Up(name)).await.is_err() {
            return Ok(());
        }
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut guard = socket.readable().await?;
        // SAFETY: reading into our own buffer from our own socket.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => {
                    guard.clear_ready();
                    continue;
                }
                io::ErrorKind::Interrupted => continue,
                // The kernel dropped notifications (ENOBUFS): list again, as after a start.
                _ if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    tracing::warn!("link notifications overflowed; listing the interfaces again");
                    for name in current() {
                        if tx.send(LinkEvent::Up(name)).await.is_err() {
                            return Ok(());
                        }
                    }
                    continue;
                }
                _ => return Err(e),
            }
        }
        for event in parse(&buf[..n as usize]) {
            if tx.send(event).await.is_err() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let p = Pattern::new("cali*").unwrap();
        assert!(p.matches("cali1234abcd") && p.matches("cali") && !p.matches("eth0"));
        let p = Pattern::new("veth?x*").unwrap();
        assert!(p.matches("veth1x") && p.matches("veth2xyz") && !p.matches("vethx"));
        assert!(Pattern::new("").is_err());
        assert!(Pattern::new("a/b").is_err());
        assert!(Pattern::new("0123456789abcdef").is_err());
    }

    #[test]
    fn parses_link_notifications() {
        // nlmsghdr (16) + ifinfomsg (16) + IFLA_IFNAME "cali7\0" (4 + 6, padded to 12).
        let mut m = Vec::new();
        let len = 16 + 16 + 12;
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&RTM_DELLINK.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&[0; 16]);
        m.extend_from_slice(&10u16.to_ne_bytes());
        m.extend_from_slice(&IFLA_IFNAME.to_ne_bytes());
        m.extend_from_slice(b"cali7\0\0\0");
        assert_eq!(parse(&m), vec![LinkEvent::Gone("cali7".into())]);
        assert_eq!(parse(&m[..20]), vec![], "a cut message yields nothing");
    }

    #[test]
    fn lists_this_namespace() {
        assert!(current().iter().any(|n| n == "lo"));
    }
}
