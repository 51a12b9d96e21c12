//! `dns-agent trace`: the XDP program's decisions, per packet, read from its ring buffer.
//!
//! The tracer sets the flag in the pinned control map while it runs (and clears it when it
//! ends, on Ctrl-C too); the program writes events only while the flag is set. The interface
//! filter is applied in the kernel (one compare, so other interfaces' packets cost nothing);
//! the name filter here: comparing names in the program would need a loop over up to 255 bytes
//! per packet, verified with the pipeline, to save the copy of events nobody asked for, and
//! events are only written while someone traces.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use aya::maps::{Array, Map, MapData, RingBuf};
use dns_common::{
    MAP_TRACE_CONTROL, MAP_TRACE_EVENTS, TRACE_FAMILY_V4, TRACE_FAMILY_V6, TRACE_OFF, TRACE_ON,
    TraceControl, TraceEvent, counter,
};
use hickory_proto::rr::RecordType;
use tokio::io::unix::AsyncFd;

use super::{KernelError, pin_dir};
use crate::zone::name::{WireName, to_text, wire_from_dotted};

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error(
        "opening {map} under {dir}: {source} (is an agent of this version running with this \
         --pin-path?)"
    )]
    Open {
        map: &'static str,
        dir: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("another `dns-agent trace` is running (pid {0}); one tracer at a time")]
    Busy(u32),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("reading trace events: {0}")]
    Read(#[source] std::io::Error),
}

/// What a tracer wants to see.
#[derive(Clone, Debug, Default)]
pub struct TraceFilter {
    /// Only this question name (lowercased wire format).
    pub name: Option<WireName>,
    /// Only this interface (kernel index); 0 for all.
    pub ifindex: u32,
}

impl TraceFilter {
    pub fn new(name: Option<&str>, ifindex: u32) -> Self {
        Self {
            name: name.map(|n| wire_from_dotted(&n.to_ascii_lowercase())),
            ifindex,
        }
    }

    pub fn wants(&self, e: &TraceEvent) -> bool {
        match &self.name {
            None => true,
            Some(n) => event_name(e) == Some(n.as_slice()),
        }
    }
}

/// A running trace. Dropping it turns the program's tracing off again.
pub struct Tracer {
    control: Array<MapData, TraceControl>,
    events: AsyncFd<RingBuf<MapData>>,
    filter: TraceFilter,
}

fn open(dir: &Path, name: &'static str) -> Result<MapData, TraceError> {
    MapData::from_pin(dir.join(name)).map_err(|source| TraceError::Open {
        map: name,
        dir: dir.display().to_string(),
        source,
    })
}

impl Tracer {
    /// Opens the running agent's trace maps under `pin_path` and turns tracing on. Must run
    /// inside a Tokio runtime (the ring buffer is polled through it).
    pub fn start(pin_path: &Path, filter: TraceFilter) -> Result<Self, TraceError> {
        let dir = pin_dir(pin_path);
        let map_err = |name: &'static str| {
            let dir = dir.display().to_string();
            move |source| TraceError::Open {
                map: name,
                dir,
                source,
            }
        };
        let mut control =
            Array::<MapData, TraceControl>::try_from(Map::Array(open(&dir, MAP_TRACE_CONTROL)?))
                .map_err(map_err(MAP_TRACE_CONTROL))?;
        let events = RingBuf::try_from(Map::RingBuf(open(&dir, MAP_TRACE_EVENTS)?))
            .map_err(map_err(MAP_TRACE_EVENTS))?;
        let now = control.get(&0, 0).map_err(map_err(MAP_TRACE_CONTROL))?;
        let me = std::process::id();
        if now.enabled == TRACE_ON && now.tracer_pid != me && alive(now.tracer_pid) {
            return Err(TraceError::Busy(now.tracer_pid));
        }
        control
            .set(
                0,
                TraceControl {
                    enabled: TRACE_ON,
                    ifindex: filter.ifindex,
                    tracer_pid: me,
                    _pad: 0,
                },
                0,
            )
            .map_err(map_err(MAP_TRACE_CONTROL))?;
        Ok(Self {
            control,
            // SAFETY: the ring buffer owns its fd for as long as the AsyncFd owns it.
            events: unsafe { AsyncFd::register(events) }.map_err(|e| TraceError::Read(e.into()))?,
            filter,
        })
    }

    /// The next events the filter lets through (waits for at least one).
    pub async fn next(&mut self) -> Result<Vec<TraceEvent>, TraceError> {
        loop {
            let mut guard = self.events.readable_mut().await.map_err(TraceError::Read)?;
            let ring = guard.get_inner_mut();
            let mut out = Vec::new();
            while let Some(item) = ring.next() {
                if let Some(e) = decode(&item)
                    && self.filter.wants(&e)
                {
                    out.push(e);
                }
            }
            guard.clear_ready();
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let off = TraceControl {
            enabled: TRACE_OFF,
            ..TraceControl::default()
        };
        if let Err(e) = self.control.set(0, off, 0) {
            tracing::warn!(error = %e, "could not turn tracing off; the next trace will");
        }
    }
}

/// Is process `pid` still there? (A tracer killed with SIGKILL leaves its flag set.)
fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid != 0 && unsafe { libc::kill(pid as libc::pid_t, 0) } == 0
}

/// An event from the bytes of a ring buffer record (records are 8-aligned, but a copy costs
/// nothing here and needs no assumption).
pub fn decode(bytes: &[u8]) -> Option<TraceEvent> {
    if bytes.len() < size_of::<TraceEvent>() {
        return None;
    }
    // SAFETY: TraceEvent is Pod (integers and byte arrays only): every bit pattern is valid,
    // and the length was checked.
    Some(unsafe { bytes.as_ptr().cast::<TraceEvent>().read_unaligned() })
}

/// The question name of an event, lowercased wire format, if the program had read it.
pub fn event_name(e: &TraceEvent) -> Option<&[u8]> {
    let len = e.name_len as usize;
    (len > 0 && len <= e.key.name.len()).then(|| &e.key.name[..len])
}

/// What the program did, and why, in an operator's words.
pub fn verdict(reason: u32) -> &'static str {
    match reason {
        counter::ANSWERED => "answered in the kernel from the zone",
        counter::ANSWERED_NODATA => "answered in the kernel: NODATA (the name has no such type)",
        counter::ANSWERED_NXDOMAIN => "answered in the kernel: NXDOMAIN (no such name in the zone)",
        counter::PASS_MISS => "passed up: not in the kernel maps (userspace answers or forwards)",
        counter::PASS_USERSPACE => "passed up: the zone says userspace answers this name",
        counter::PASS_TOO_BIG => "passed up: the answer exceeds the client's UDP size (TC=1)",
        counter::PASS_UNSUPPORTED => "passed up: outside the kernel's rules",
        counter::PASS_MALFORMED => "passed up: truncated or malformed",
        counter::PASS_NOT_SYNCED => "passed up: the zone is not loaded yet",
        counter::PASS_EXPIRED => "passed up: the entry expired",
        counter::PASS_NO_ROOM => "passed up: no room in the frame for the reply",
        counter::ERROR_WRITE => "dropped: writing the reply failed",
        counter::PASS_AGENT_DOWN => {
            "passed up: no heartbeat from the agent within the grace period"
        }
        counter::ANSWERED_CACHED => {
            "answered in the kernel from the cache of upstream answers (TTLs counted down)"
        }
        counter::ANSWERED_AUTOPATH => "answered in the kernel: a completed search path",
        counter::PASS_AUTOPATH => {
            "passed up: a search-path expansion the kernel holds no completion for (the agent \
             completes it)"
        }
        counter::PASS_RACE => "passed up: the entry changed while it was read",
        _ => "unknown reason",
    }
}

fn addr(family: u8, bytes: &[u8; 16]) -> Option<IpAddr> {
    match family {
        TRACE_FAMILY_V4 => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        TRACE_FAMILY_V6 => Some(IpAddr::V6(Ipv6Addr::from(*bytes))),
        _ => None,
    }
}

/// One line per event: interface, client → listen address, question, verdict and reason.
pub fn describe(e: &TraceEvent, interface: &str) -> String {
    let peers = match (addr(e.family, &e.client), addr(e.family, &e.server)) {
        (Some(c), Some(s)) => format!(
            "{} -> {}",
            std::net::SocketAddr::new(c, e.client_port),
            std::net::SocketAddr::new(s, e.server_port)
        ),
        _ => "(addresses not read)".to_string(),
    };
    let question = match event_name(e) {
        Some(n) => format!("{} {}", to_text(n), RecordType::from(e.qtype)),
        None => "(question not read)".to_string(),
    };
    let name = counter::NAMES
        .get(e.counter as usize)
        .copied()
        .unwrap_or("?");
    format!(
        "{interface} {peers} {question}: {} [{name}]",
        verdict(e.counter)
    )
}
