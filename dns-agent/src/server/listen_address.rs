//! The listen addresses on the node. The agent puts a missing one there itself, as NodeLocal
//! DNSCache's setup does: on a dummy interface of its own, or on `lo` where the kernel has no
//! dummy driver. On a clean exit it removes what is its own, unless another agent still serves
//! on it (a handover: the next agent binds its sockets before the old one leaves).
//!
//! What is "its own" survives the agent that added it, so that a later agent can clean up:
//! every address on the dummy interface, and IPv4 addresses on `lo` labelled `lo:xdns`. (IPv6
//! addresses carry no label: on `lo`, only the agent that added one removes it.) Left behind
//! after a SIGKILL, an address is harmless: nothing routes the cluster's traffic to it.

use std::net::IpAddr;

use crate::capabilities::{Capability, Missing};
use futures::TryStreamExt as _;
use rtnetlink::{
    Handle, LinkDummy, LinkUnspec,
    packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage},
};

/// The agent's dummy interface.
pub const DEVICE: &str = "xdns0";
/// The label of IPv4 addresses the agent puts on `lo`.
const LO_LABEL: &str = "lo:xdns";

#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("opening a netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("interface {0} not found")]
    NoInterface(String),
    #[error("{missing}")]
    Capability {
        missing: Missing,
        #[source]
        source: rtnetlink::Error,
    },
}

/// The kernel answers EPERM to a netlink request the sender lacks CAP_NET_ADMIN for.
fn refused(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EPERM)
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> AddressError {
    let what = what.into();
    move |source| {
        if refused(&source)
            && let Some(missing) = Missing::explain(&[Capability::NetAdmin], what.as_str())
        {
            return AddressError::Capability { missing, source };
        }
        AddressError::Netlink { what, source }
    }
}

/// One listen address as found or placed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    pub address: IpAddr,
    pub interface: String,
    /// This agent added it.
    pub added: bool,
}

/// The node's side of the listen addresses.
pub struct ListenAddresses {
    handle: Handle,
    placed: Vec<Placed>,
}

impl ListenAddresses {
    /// Puts every address of `listen` that the node lacks on [`DEVICE`] (created and brought up
    /// if missing), or on `lo` when the kernel cannot make dummy interfaces.
    pub async fn ensure(listen: &[IpAddr]) -> Result<Self, AddressError> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        let present = addresses(&handle, None).await?;
        let mut placed = Vec::new();
        let mut device: Option<(u32, String)> = None;
        for &address in listen {
            if let Some(m) = present.iter().find(|m| address_of(m) == Some(address)) {
                placed.push(Placed {
                    address,
                    interface: link_name(&handle, m.header.index).await?,
                    added: false,
                });
                continue;
            }
            let (index, name) = match &device {
                Some(d) => d.clone(),
                None => {
                    let d = dummy_or_lo(&handle).await?;
                    device = Some(d.clone());
                    d
                }
            };
            let prefix = if address.is_ipv4() { 32 } else { 128 };
            let mut add = handle.address().add(index, address, prefix);
            let m = add.message_mut();
            // No duplicate address detection: the address is the node's own, and a tentative
            // IPv6 address cannot be bound for a second.
            m.header.flags |= AddressHeaderFlags::Nodad;
            m.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
            if address.is_ipv4() && name == "lo" {
                m.attributes.push(AddressAttribute::Label(LO_LABEL.into()));
            }
            add.execute()
                .await
                .map_err(netlink(format!("adding {address} to {name}")))?;
            tracing::info!(%address, interface = %name, "listen address added");
            placed.push(Placed {
                address,
                interface: name,
                added: true,
            });
        }
        Ok(Self { handle, placed })
    }

    pub fn placed(&self) -> &[Placed] {
        &self.placed
    }

    /// Removes the listen addresses that are the agent's own, except those `in_use` (another
    /// agent serves on them), and the dummy interface once it holds nothing.
    pub async fn release(self, in_use: impl Fn(IpAddr) -> bool) {
        let present = match addresses(&self.handle, None).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "listing addresses to remove failed");
                return;
            }
        };
        for p in &self.placed {
            if in_use(p.address) {
                continue;
            }
            let Some(m) = present.iter().find(|m| address_of(m) == Some(p.address)) else {
                continue;
            };
            let ours = p.added || p.interface == DEVICE || label_of(m) == Some(LO_LABEL);
            if !ours {
                continue;
            }
            match self.handle.address().del(m.clone()).execute().await {
                Ok(()) => {
                    tracing::info!(address = %p.address, interface = %p.interface, "listen address removed")
                }
                Err(e) => {
                    tracing::warn!(address = %p.address, error = %e, "removing a listen address failed")
                }
            }
        }
        if let Ok(Some(index)) = link_index(&self.handle, DEVICE).await
            && addresses(&self.handle, Some(index))
                .await
                .is_ok_and(|a| a.iter().all(|m| address_of(m).is_none_or(is_link_local_v6)))
        {
            match self.handle.link().del(index).execute().await {
                Ok(()) => tracing::info!(interface = DEVICE, "interface removed"),
                Err(e) => {
                    tracing::warn!(interface = DEVICE, error = %e, "removing the interface failed")
                }
            }
        }
    }
}

/// [`DEVICE`], created and up; or `lo` if dummy interfaces cannot be made here.
async fn dummy_or_lo(handle: &Handle) -> Result<(u32, String), AddressError> {
    if link_index(handle, DEVICE).await?.is_none()
        && let Err(e) = handle
            .link()
            .add(LinkDummy::new(DEVICE).build())
            .execute()
            .await
    {
        // Not allowed is not the same as not possible: lo would refuse as well.
        if refused(&e) {
            return Err(netlink(format!("creating the interface {DEVICE}"))(e));
        }
        tracing::warn!(
            error = %e,
            "this kernel cannot make a dummy interface (no dummy driver); the listen addresses go on lo"
        );
        let index = link_index(handle, "lo")
            .await?
            .ok_or_else(|| AddressError::NoInterface("lo".into()))?;
        return Ok((index, "lo".into()));
    }
    let index = link_index(handle, DEVICE)
        .await?
        .ok_or_else(|| AddressError::NoInterface(DEVICE.into()))?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(netlink(format!("bringing {DEVICE} up")))?;
    Ok((index, DEVICE.into()))
}

async fn addresses(
    handle: &Handle,
    index: Option<u32>,
) -> Result<Vec<AddressMessage>, AddressError> {
    let mut get = handle.address().get();
    if let Some(i) = index {
        get = get.set_link_index_filter(i);
    }
    get.execute()
        .try_collect()
        .await
        .map_err(netlink("listing addresses"))
}

async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, AddressError> {
    match handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link.map(|l| l.header.index)),
        // The kernel answers ENODEV for a name it does not know.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(netlink(format!("looking up {name}"))(e)),
    }
}

async fn link_name(handle: &Handle, index: u32) -> Result<String, AddressError> {
    let link = handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
        .map_err(netlink(format!("looking up interface {index}")))?;
    Ok(link
        .and_then(|l| {
            l.attributes.into_iter().find_map(|a| match a {
                rtnetlink::packet_route::link::LinkAttribute::IfName(n) => Some(n),
                _ => None,
            })
        })
        .unwrap_or_else(|| index.to_string()))
}

fn address_of(m: &AddressMessage) -> Option<IpAddr> {
    // IFA_LOCAL is the interface's own address (IFA_ADDRESS the peer's on point-to-point
    // links); IPv6 has only IFA_ADDRESS.
    let local = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    local.or_else(|| {
        m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })
}

fn label_of(m: &AddressMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Label(l) => Some(l.as_str()),
        _ => None,
    })
}

/// The kernel gives every interface an fe80:: address of its own.
fn is_link_local_v6(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}
