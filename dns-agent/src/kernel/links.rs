//! Interfaces as they come and go: pod veths appear when pods start, so the program is attached
//! to every interface whose name matches `--interface-pattern`, now and later.
//!
//! Listens to the kernel's link notifications (rtnetlink, the `RTNLGRP_LINK` group) rather than
//! polling: a new pod's veth gets the program within milliseconds of appearing. The messages are
//! read and decoded by the `rtnetlink` crate (netlink-packet-route underneath).

use std::io;

use futures::{StreamExt as _, TryStreamExt as _};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
};
use rtnetlink::{Handle, MulticastGroup};
use tokio::sync::mpsc;

/// A change of the node's interfaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// The interface exists (new, or reported again).
    Up(String),
    /// The interface is gone.
    Gone(String),
}

/// A shell-style pattern of interface names (globset): `*` any run of characters, `?` one
/// character, `[abc]` one of a class, `{cali*,lxc*}` either.
#[derive(Clone, Debug)]
pub struct Pattern {
    text: String,
    matcher: globset::GlobMatcher,
}

impl Pattern {
    pub fn new(p: &str) -> Result<Self, String> {
        // IFNAMSIZ is 16 with the terminating zero.
        if p.is_empty() || p.len() > 15 {
            return Err(format!(
                "{p:?}: an interface name pattern is 1 to 15 characters"
            ));
        }
        if p.bytes().any(|c| c == b'/' || c.is_ascii_whitespace()) {
            return Err(format!("{p:?}: interface names have no '/' or spaces"));
        }
        let glob = globset::GlobBuilder::new(p)
            // No escapes: `\` is not special in the shell patterns operators write here.
            .backslash_escape(false)
            .build()
            .map_err(|e| format!("{p:?}: not a glob: {}", e.kind()))?;
        Ok(Self {
            text: p.to_string(),
            matcher: glob.compile_matcher(),
        })
    }

    pub fn matches(&self, name: &str) -> bool {
        self.matcher.is_match(name)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for Pattern {}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// An interface as the kernel numbers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
}

/// What a link notification says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkChange {
    /// The interface exists (new, changed, or renamed).
    New(Link),
    /// The interface was deleted.
    Del(Link),
}

/// The change a notification carries, if it names an interface.
pub fn change_of(message: NetlinkMessage<RouteNetlinkMessage>) -> Option<LinkChange> {
    let (link, new): (LinkMessage, bool) = match message.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => (l, true),
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => (l, false),
        _ => return None,
    };
    let link = link_of(link)?;
    Some(if new {
        LinkChange::New(link)
    } else {
        LinkChange::Del(link)
    })
}

fn link_of(link: LinkMessage) -> Option<Link> {
    let index = link.header.index;
    link.attributes.into_iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(Link { index, name }),
        _ => None,
    })
}

/// The interfaces of this network namespace now, by a link dump.
pub async fn current(handle: &Handle) -> io::Result<Vec<Link>> {
    handle
        .link()
        .get()
        .execute()
        .try_filter_map(|link| async move { Ok(link_of(link)) })
        .try_collect()
        .await
        .map_err(|e| io::Error::other(format!("listing the interfaces (rtnetlink): {e}")))
}

/// What the kernel calls interface `index` now, if it exists.
pub fn name_of_index(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as the call requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    Some(
        unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// The interfaces reported so far, by index: turns notifications and relists into the events
/// attachments need.
///
/// Names are what attachments go by, but a name is not an interface: a pod's veth deleted and
/// created again under the same name (Calico names veths after the pod) is a new interface
/// that needs the program attached afresh. Notifications say so (a delete, then a new link);
/// after the kernel dropped some (ENOBUFS) only a listing is left, and it is compared with the
/// table by index: a name whose index changed was deleted and created again, and gets `Gone`
/// then `Up` like any interface that vanished or appeared meanwhile.
#[derive(Debug, Default)]
pub struct LinkTable {
    by_index: std::collections::BTreeMap<u32, String>,
}

impl LinkTable {
    /// A full listing: the new truth. `Gone` for every interface that is not in it under the
    /// same index and name, then `Up` for every one in it.
    pub fn relist(&mut self, links: Vec<Link>) -> Vec<LinkEvent> {
        let now: std::collections::BTreeMap<u32, String> =
            links.into_iter().map(|l| (l.index, l.name)).collect();
        let mut events: Vec<LinkEvent> = self
            .by_index
            .iter()
            .filter(|(index, name)| now.get(index) != Some(*name))
            .map(|(_, name)| LinkEvent::Gone(name.clone()))
            .collect();
        events.extend(now.values().map(|name| LinkEvent::Up(name.clone())));
        self.by_index = now;
        events
    }

    /// One notification. Those read after a relist may be older than it (the kernel queues
    /// them before it reports the overflow), so a new link is believed only if
    /// `current_name(index)` (the kernel, asked now) still says so, and a delete only of an
    /// interface the table holds under that index.
    pub fn notified(
        &mut self,
        change: LinkChange,
        current_name: impl Fn(u32) -> Option<String>,
    ) -> Vec<LinkEvent> {
        match change {
            LinkChange::New(link) => {
                if current_name(link.index).as_deref() != Some(link.name.as_str()) {
                    return Vec::new();
                }
                let mut events = Vec::new();
                // Renamed: the old name is gone.
                if let Some(old) = self.by_index.get(&link.index)
                    && *old != link.name
                {
                    events.push(LinkEvent::Gone(old.clone()));
                }
                // The name under another index: that interface was deleted (its notification
                // is yet to come, or was lost), this one is new.
                let stale: Vec<u32> = self
                    .by_index
                    .iter()
                    .filter(|(i, n)| **i != link.index && **n == link.name)
                    .map(|(i, _)| *i)
                    .collect();
                for i in stale {
                    self.by_index.remove(&i);
                    events.push(LinkEvent::Gone(link.name.clone()));
                }
                self.by_index.insert(link.index, link.name.clone());
                events.push(LinkEvent::Up(link.name));
                events
            }
            LinkChange::Del(link) => match self.by_index.remove(&link.index) {
                Some(name) => vec![LinkEvent::Gone(name)],
                None => Vec::new(),
            },
        }
    }
}

/// Sends `events` in order; false once the receiver is gone.
async fn send_all(tx: &mpsc::Sender<LinkEvent>, events: Vec<LinkEvent>) -> bool {
    for event in events {
        if tx.send(event).await.is_err() {
            return false;
        }
    }
    true
}

/// Sends the interfaces that exist now, then every change, until the receiver goes away.
pub async fn watch(tx: mpsc::Sender<LinkEvent>) -> io::Result<()> {
    // Subscribe first, then list (on the same socket): a link that appears in between is
    // reported twice, never missed.
    let (connection, handle, mut notifications) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Link])?;
    let connection = tokio::spawn(connection);
    let mut table = LinkTable::default();
    let outcome = async {
        if !send_all(&tx, table.relist(current(&handle).await?)).await {
            return Ok(());
        }
        while let Some((message, _)) = notifications.next().await {
            if let NetlinkPayload::Overrun(_) = message.payload {
                // The kernel dropped notifications (ENOBUFS): list again, and tell what
                // changed meanwhile.
                tracing::warn!("link notifications overflowed; listing the interfaces again");
                if !send_all(&tx, table.relist(current(&handle).await?)).await {
                    return Ok(());
                }
                continue;
            }
            let Some(change) = change_of(message) else {
                continue;
            };
            if !send_all(&tx, table.notified(change, name_of_index)).await {
                return Ok(());
            }
        }
        Err(io::Error::other(
            "the link notification socket closed (rtnetlink)",
        ))
    }
    .await;
    connection.abort();
    outcome
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::NetlinkHeader;
    use netlink_packet_route::link::LinkHeader;

    use super::*;

    #[test]
    fn patterns() {
        let p = Pattern::new("cali*").unwrap();
        assert!(p.matches("cali1234abcd") && p.matches("cali") && !p.matches("eth0"));
        let p = Pattern::new("veth?x*").unwrap();
        assert!(p.matches("veth1x") && p.matches("veth2xyz") && !p.matches("vethx"));
        let p = Pattern::new("{cali,lxc}*").unwrap();
        assert!(p.matches("lxc12") && p.matches("cali9") && !p.matches("veth1"));
        assert!(
            !Pattern::new("eth0").unwrap().matches("eth01"),
            "whole names"
        );
        assert!(Pattern::new("").is_err());
        assert!(Pattern::new("a/b").is_err());
        assert!(Pattern::new("0123456789abcdef").is_err());
        let err = Pattern::new("veth[").unwrap_err();
        assert!(err.contains("not a glob"), "{err}");
    }

    fn link_message(name: Option<&str>, up: bool) -> NetlinkMessage<RouteNetlinkMessage> {
        let mut link = LinkMessage::default();
        link.header = LinkHeader::default();
        link.header.index = 7;
        if let Some(n) = name {
            link.attributes.push(LinkAttribute::IfName(n.to_string()));
        }
        let inner = if up {
            RouteNetlinkMessage::NewLink(link)
        } else {
            RouteNetlinkMessage::DelLink(link)
        };
        let mut m = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(inner));
        m.finalize();
        m
    }

    #[test]
    fn link_notifications_become_events() {
        // Through the wire format and back, as the kernel's datagrams arrive.
        let mut buf = vec![0; 256];
        let m = link_message(Some("cali7"), false);
        let len = m.buffer_len();
        m.serialize(&mut buf[..len]);
        let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[..len])
            .expect("a valid message");
        assert_eq!(change_of(parsed), Some(LinkChange::Del(link(7, "cali7"))));
        assert_eq!(
            change_of(link_message(Some("veth1"), true)),
            Some(LinkChange::New(link(7, "veth1")))
        );
        assert_eq!(
            change_of(link_message(None, true)),
            None,
            "no name, no event"
        );
        assert!(
            NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[..20]).is_err(),
            "a cut message is refused"
        );
    }

    #[tokio::test]
    async fn lists_this_namespace() {
        let (connection, handle, _) = rtnetlink::new_connection().expect("netlink socket");
        tokio::spawn(connection);
        let links = current(&handle).await.expect("link dump");
        assert!(links.contains(&link(1, "lo")), "{links:?}");
        assert_eq!(name_of_index(1).as_deref(), Some("lo"));
    }

    fn link(index: u32, name: &str) -> Link {
        Link {
            index,
            name: name.to_string(),
        }
    }

    fn up(name: &str) -> LinkEvent {
        LinkEvent::Up(name.to_string())
    }

    fn gone(name: &str) -> LinkEvent {
        LinkEvent::Gone(name.to_string())
    }

    /// Notifications lost to ENOBUFS (the kernel cannot make the multicast socket reproduce
    /// them on demand, so the relist that follows is tested here on the table itself; the
    /// integration test `a_veth_recreated_while_notifications_overflow_is_attached_again`
    /// overflows the real socket).
    #[test]
    fn a_relist_reports_what_vanished_and_what_was_created_again() {
        let mut t = LinkTable::default();
        let first = t.relist(vec![
            link(1, "lo"),
            link(10, "cali1"),
            link(11, "cali2"),
            link(12, "cali3"),
        ]);
        assert_eq!(first, [up("lo"), up("cali1"), up("cali2"), up("cali3")]);
        // Meanwhile, notifications lost: cali1 deleted and created again (index 20), cali2
        // deleted, cali4 created, cali3 renamed to cali5 (same index).
        let events = t.relist(vec![
            link(1, "lo"),
            link(12, "cali5"),
            link(20, "cali1"),
            link(21, "cali4"),
        ]);
        let split = events
            .iter()
            .position(|e| matches!(e, LinkEvent::Up(_)))
            .unwrap();
        let (gones, ups) = events.split_at(split);
        let mut gones = gones.to_vec();
        gones.sort_by_key(|e| format!("{e:?}"));
        assert_eq!(gones, [gone("cali1"), gone("cali2"), gone("cali3")]);
        assert_eq!(ups, [up("lo"), up("cali5"), up("cali1"), up("cali4")]);
        // An unchanged listing: nothing is gone.
        let again = t.relist(vec![
            link(1, "lo"),
            link(12, "cali5"),
            link(20, "cali1"),
            link(21, "cali4"),
        ]);
        assert!(!again.iter().any(|e| matches!(e, LinkEvent::Gone(_))));
    }

    #[test]
    fn notifications_older_than_the_relist_change_nothing() {
        let mut t = LinkTable::default();
        t.relist(vec![link(1, "lo"), link(10, "cali1")]);
        // After an overflow: the relist finds cali1 created again as index 20.
        let events = t.relist(vec![link(1, "lo"), link(20, "cali1")]);
        assert_eq!(events, [gone("cali1"), up("lo"), up("cali1")]);
        // Then the notifications the kernel had queued before it dropped the rest: the old
        // cali1's new-link and delete. The kernel no longer has index 10.
        let kernel = |i: u32| match i {
            1 => Some("lo".to_string()),
            20 => Some("cali1".to_string()),
            _ => None,
        };
        assert!(
            t.notified(LinkChange::New(link(10, "cali1")), kernel)
                .is_empty()
        );
        assert!(
            t.notified(LinkChange::Del(link(10, "cali1")), kernel)
                .is_empty()
        );
        // The new one's notification repeats what the table knows.
        assert_eq!(
            t.notified(LinkChange::New(link(20, "cali1")), kernel),
            [up("cali1")]
        );
        // Its delete is real.
        assert_eq!(
            t.notified(LinkChange::Del(link(20, "cali1")), kernel),
            [gone("cali1")]
        );
    }

    #[test]
    fn notifications_in_order() {
        let mut t = LinkTable::default();
        t.relist(vec![link(1, "lo"), link(10, "cali1")]);
        let kernel = |i: u32| match i {
            10 => Some("cali1".to_string()),
            11 => Some("cali9".to_string()),
            30 => Some("cali1".to_string()),
            _ => None,
        };
        // Created again with its delete lost: the new link says the old one is gone.
        assert_eq!(
            t.notified(LinkChange::New(link(30, "cali1")), kernel),
            [gone("cali1"), up("cali1")]
        );
        // A rename: the old name is gone.
        let renamed = |i: u32| (i == 30).then(|| "cali8".to_string());
        assert_eq!(
            t.notified(LinkChange::New(link(30, "cali8")), renamed),
            [gone("cali1"), up("cali8")]
        );
        // A new link that vanished before its notification was read: nothing.
        assert!(
            t.notified(LinkChange::New(link(40, "cali2")), kernel)
                .is_empty()
        );
        assert_eq!(
            t.notified(LinkChange::New(link(11, "cali9")), kernel),
            [up("cali9")]
        );
    }
}
