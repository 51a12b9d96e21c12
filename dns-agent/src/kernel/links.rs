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

/// The link event a notification or a dump entry carries, if it names an interface.
pub fn event_of(message: NetlinkMessage<RouteNetlinkMessage>) -> Option<LinkEvent> {
    let (link, up): (LinkMessage, bool) = match message.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => (l, true),
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => (l, false),
        _ => return None,
    };
    let name = name_of(link)?;
    Some(if up {
        LinkEvent::Up(name)
    } else {
        LinkEvent::Gone(name)
    })
}

fn name_of(link: LinkMessage) -> Option<String> {
    link.attributes.into_iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name),
        _ => None,
    })
}

/// The interfaces of this network namespace now, by a link dump.
pub async fn current(handle: &Handle) -> io::Result<Vec<String>> {
    handle
        .link()
        .get()
        .execute()
        .try_filter_map(|link| async move { Ok(name_of(link)) })
        .try_collect()
        .await
        .map_err(|e| io::Error::other(format!("listing the interfaces (rtnetlink): {e}")))
}

/// Sends every interface in `names` as present; false once the receiver is gone.
async fn send_all(tx: &mpsc::Sender<LinkEvent>, names: Vec<String>) -> bool {
    for name in names {
        if tx.send(LinkEvent::Up(name)).await.is_err() {
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
    let outcome = async {
        if !send_all(&tx, current(&handle).await?).await {
            return Ok(());
        }
        while let Some((message, _)) = notifications.next().await {
            if let NetlinkPayload::Overrun(_) = message.payload {
                // The kernel dropped notifications (ENOBUFS): list again, as after a start.
                tracing::warn!("link notifications overflowed; listing the interfaces again");
                if !send_all(&tx, current(&handle).await?).await {
                    return Ok(());
                }
                continue;
            }
            if let Some(event) = event_of(message)
                && tx.send(event).await.is_err()
            {
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
        assert_eq!(event_of(parsed), Some(LinkEvent::Gone("cali7".into())));
        assert_eq!(
            event_of(link_message(Some("veth1"), true)),
            Some(LinkEvent::Up("veth1".into()))
        );
        assert_eq!(
            event_of(link_message(None, true)),
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
        let names = current(&handle).await.expect("link dump");
        assert!(names.iter().any(|n| n == "lo"), "{names:?}");
    }
}
