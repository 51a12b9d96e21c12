//! The kernel fast path: loading the XDP program, attaching it, and its maps.

pub mod attach;
pub mod cache_sync;
pub mod links;
pub mod maps;
pub mod sync;
pub mod trace;

use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{
        LinkOrder, ProgramInfo, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use dns_common::{
    AnswerValue, BlobL, BlobM, BlobS, CacheLongKey, CacheShortKey, DEFAULT_GRACE_NS,
    DEFAULT_STALE_AFTER_NS, EGRESS_PROGRAM_NAME, LAYOUT_VERSION, Liveness, LongKey,
    MAP_ANSWERS_LONG, MAP_ANSWERS_SHORT, MAP_BLOBS_L, MAP_BLOBS_M, MAP_BLOBS_S, MAP_CACHE_LONG,
    MAP_CACHE_SHORT, MAP_CONFIG, MAP_COUNTERS, MAP_FLOWS, MAP_LIVENESS, MAP_PODS,
    MAP_TRACE_CONTROL, MAP_TRACE_EVENTS, PROGRAM_NAME, PodKey, PodNamespace, ShortKey, ZoneConfig,
    counter,
};

pub use self::maps::KernelMaps;
use crate::capabilities::{self, Capability, Missing};

/// The XDP program, built by `build.rs` and embedded: one binary is all a node needs.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dns-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("loading the eBPF object failed (is this root, on a kernel with BPF?): {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the verifier rejected the XDP program: {0}")]
    Verify(#[source] aya::programs::ProgramError),
    #[error(
        "attaching to {interface} in {mode} mode failed: {source}{hint}",
        hint = if *mode == AttachMode::Driver { "; try --attach-mode generic" } else { "" }
    )]
    Attach {
        interface: String,
        mode: AttachMode,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("--interface {0}: no such interface in this network namespace")]
    NoInterface(String),
    #[error("{0}: an agent started after this one serves it already; leaving it to that agent")]
    NewerAgent(String),
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("pinning maps under {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Bpffs(String),
    #[error("BPF_PROG_TEST_RUN failed: {0}")]
    TestRun(#[source] aya::programs::ProgramError),
    #[error("pinning map {name}: {source}")]
    PinMap {
        name: &'static str,
        #[source]
        source: aya::pin::PinError,
    },
    /// The kernel refused for want of a capability this process lacks.
    #[error("{missing}")]
    Capability {
        missing: Missing,
        #[source]
        source: Box<KernelError>,
    },
}

impl KernelError {
    /// A refusal that a capability missing from `needed` explains says so, naming it.
    fn for_want_of(self, needed: &[Capability], what: impl Into<String>) -> Self {
        if capabilities::refused(&self)
            && let Some(missing) = Missing::explain(needed, what)
        {
            return Self::Capability {
                missing,
                source: Box::new(self),
            };
        }
        self
    }
}

/// How the program is attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// Generic XDP (in the network stack): works on every interface; the right choice for
    /// veth pairs, where XDP_TX in driver mode needs a program on the peer too.
    Generic,
    /// Native XDP in the driver: for physical NICs that support it.
    Driver,
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Generic => "generic",
            Self::Driver => "driver",
        })
    }
}

impl From<AttachMode> for XdpMode {
    fn from(m: AttachMode) -> Self {
        match m {
            AttachMode::Generic => XdpMode::Skb,
            AttachMode::Driver => XdpMode::Driver,
        }
    }
}

/// Capacities of the answer maps (entries). Memory follows the entries present; only each
/// map's bucket array (16 bytes per entry of capacity) is allocated up front.
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    pub short: u32,
    pub long: u32,
    pub blobs_s: u32,
    pub blobs_m: u32,
    pub blobs_l: u32,
    /// Entries of the cache of upstream answers (`--cache-size`; 0: none in the kernel). The
    /// cache never holds more, so neither do its maps; each blob class gets as much room more
    /// (and a little for blobs retired but not yet deleted), so the cache never takes the
    /// zone's.
    pub cache: u32,
}

impl Capacity {
    /// All capacities scaled from the short-name map's: the proportions of a real zone (a
    /// quarter of the names are long, half the answers need a small blob, few a big one).
    pub fn scaled(short: u32) -> Self {
        Self {
            short,
            long: (short / 4).max(1024),
            blobs_s: (short / 2).max(1024),
            blobs_m: (short / 16).max(256),
            blobs_l: (short / 64).max(256),
            cache: DEFAULT_CACHE_ENTRIES,
        }
    }

    /// The same with room for `entries` cached upstream answers.
    pub fn with_cache(self, entries: u32) -> Self {
        Self {
            cache: entries,
            ..self
        }
    }
}

/// `--cache-size`'s default.
pub const DEFAULT_CACHE_ENTRIES: u32 = 10_000;

impl Default for Capacity {
    fn default() -> Self {
        Self::scaled(dns_common::DEFAULT_ANSWERS_SHORT_MAX)
    }
}

/// Where a running agent pins its maps: `<pin-path>/v<layout>`.
pub fn pin_dir(pin_path: &Path) -> PathBuf {
    pin_path.join(format!("v{LAYOUT_VERSION}"))
}

/// What loading the programs needs: maps and programs (CAP_BPF), programs of networking types
/// (CAP_NET_ADMIN), and the verifier's leave for packet pointer arithmetic (CAP_PERFMON: without
/// it the verifier refuses `data_end - data`, "pointer -= pointer prohibited").
const PROGRAM_LOAD_NEEDS: &[Capability] =
    &[Capability::Bpf, Capability::NetAdmin, Capability::Perfmon];

/// How an interface was attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Takeover {
    /// No program was there: a new attachment.
    Fresh,
    /// A previous agent's attachment, switched to this program.
    TookOver,
}

/// What one `BPF_PROG_TEST_RUN` gave.
#[derive(Debug)]
pub struct TestRunOutcome {
    /// `XDP_*` verdict.
    pub action: u32,
    pub frame: Vec<u8>,
    /// Mean time per run, as the kernel measured it.
    pub duration: std::time::Duration,
}

/// Where on an interface a program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    /// The XDP program, on frames arriving from the pod.
    Xdp,
    /// The tc egress program, on frames leaving towards the pod (intercepted addresses only).
    Egress,
}

impl Hook {
    /// Directory of this hook's pinned links under `--pin-path`. Outside the layout's
    /// directory, so that an agent with another map layout still takes the links over (the
    /// swap replaces the whole program, maps included).
    fn dir(self) -> &'static str {
        match self {
            Self::Xdp => "links",
            Self::Egress => "links-egress",
        }
    }

    fn program(self) -> &'static str {
        match self {
            Self::Xdp => PROGRAM_NAME,
            Self::Egress => EGRESS_PROGRAM_NAME,
        }
    }
}

/// One attachment: a bpf_link pinned at `<pin-path>/<hook dir>/<interface>`.
struct Attachment {
    interface: String,
    hook: Hook,
    link: PinnedLink,
}

/// The loaded programs with their maps and attachments. Dropping it detaches the programs,
/// unless another agent has taken its attachments over.
///
/// Every attachment is a bpf_link pinned under `<pin-path>`: it outlives this process, so the
/// next agent takes it over (an atomic program swap) and no query goes unanswered while agents
/// change. (bpf_links for XDP exist since Linux 5.9, tcx links since 6.6; the XDP program
/// needs 5.18 for bpf_xdp_load_bytes anyway.)
pub struct Kernel {
    ebpf: Ebpf,
    links: Vec<Attachment>,
    pin_path: PathBuf,
    pin_dir: PathBuf,
    /// Attach the egress program too: there are intercepted addresses.
    egress: bool,
    /// Id of this agent's counters map: pins that hold another id are another agent's.
    counters_id: Option<u32>,
    /// `detach_all` has run: nothing of ours is left to remove.
    released: bool,
}

impl Kernel {
    /// Loads and verifies the programs, sizes their maps, and pins the maps under `pin_path`
    /// (so `dns-agent stats` and operators' tools find them). `egress`: queries to intercepted
    /// addresses are steered, and the egress program is attached beside the XDP program.
    pub fn load(
        capacity: Capacity,
        pin_path: &Path,
        egress: bool,
    ) -> Result<(Self, KernelMaps), KernelError> {
        ensure_bpffs(pin_path)?;
        let pin_dir = pin_dir(pin_path);
        fs::create_dir_all(&pin_dir).map_err(|source| KernelError::Pin {
            path: pin_dir.clone(),
            source,
        })?;
        // Maps another agent pinned (it is being replaced, or was killed) are replaced by this
        // agent's, which it fills itself; its links stay (`attach` takes them over). Except the
        // flows of steered queries: both agents' programs run during a handover (the XDP and
        // the egress links are swapped one after the other), so they share one flows map, or
        // a reply to a query one steered would leave through the other's egress unrestored.
        for name in dns_common::ALL_MAPS {
            if name != MAP_FLOWS {
                let _ = fs::remove_file(pin_dir.join(name));
            }
        }
        let flows_pin = pin_dir.join(MAP_FLOWS);
        // A map needs one entry at least, even when the cache is off.
        let cache = capacity.cache.max(1);
        let cache_blobs = capacity.cache + capacity.cache / 8;
        let mut ebpf = EbpfLoader::new()
            .map_pin_path(MAP_FLOWS, flows_pin.as_path())
            .map_max_entries(MAP_ANSWERS_SHORT, capacity.short)
            .map_max_entries(MAP_ANSWERS_LONG, capacity.long)
            .map_max_entries(MAP_CACHE_SHORT, cache)
            .map_max_entries(MAP_CACHE_LONG, cache)
            .map_max_entries(MAP_BLOBS_S, capacity.blobs_s + cache_blobs)
            .map_max_entries(MAP_BLOBS_M, capacity.blobs_m + cache_blobs)
            .map_max_entries(MAP_BLOBS_L, capacity.blobs_l + cache_blobs)
            .load(PROGRAM)
            .map_err(|e| {
                KernelError::Load(e).for_want_of(&[Capability::Bpf], "creating the BPF maps")
            })?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(KernelError::MissingProgram(PROGRAM_NAME))?
            .try_into()
            .map_err(KernelError::Verify)?;
        program.load().map_err(|e| {
            KernelError::Verify(e).for_want_of(PROGRAM_LOAD_NEEDS, "loading the XDP program")
        })?;
        if egress {
            let program: &mut SchedClassifier = ebpf
                .program_mut(EGRESS_PROGRAM_NAME)
                .ok_or(KernelError::MissingProgram(EGRESS_PROGRAM_NAME))?
                .try_into()
                .map_err(KernelError::Verify)?;
            program.load().map_err(|e| {
                KernelError::Verify(e)
                    .for_want_of(PROGRAM_LOAD_NEEDS, "loading the tc egress program")
            })?;
        }

        let liveness: Array<MapData, Liveness> = take_map(&mut ebpf, MAP_LIVENESS, &pin_dir)?;
        let blobs = maps::BlobMaps::new(
            take_map::<HashMap<MapData, u32, BlobS>>(&mut ebpf, MAP_BLOBS_S, &pin_dir)?,
            take_map::<HashMap<MapData, u32, BlobM>>(&mut ebpf, MAP_BLOBS_M, &pin_dir)?,
            take_map::<HashMap<MapData, u32, BlobL>>(&mut ebpf, MAP_BLOBS_L, &pin_dir)?,
        );
        let cache = cache_sync::CacheMaps {
            short: take_map::<HashMap<MapData, CacheShortKey, AnswerValue>>(
                &mut ebpf,
                MAP_CACHE_SHORT,
                &pin_dir,
            )?,
            long: take_map::<HashMap<MapData, CacheLongKey, AnswerValue>>(
                &mut ebpf,
                MAP_CACHE_LONG,
                &pin_dir,
            )?,
            blobs: blobs.share().map_err(|source| KernelError::Map {
                name: MAP_BLOBS_S,
                source,
            })?,
        };
        let maps = KernelMaps {
            short: take_map::<HashMap<MapData, ShortKey, AnswerValue>>(
                &mut ebpf,
                MAP_ANSWERS_SHORT,
                &pin_dir,
            )?,
            long: take_map::<HashMap<MapData, LongKey, AnswerValue>>(
                &mut ebpf,
                MAP_ANSWERS_LONG,
                &pin_dir,
            )?,
            blobs,
            cache: Some(cache),
            pods: take_map::<HashMap<MapData, PodKey, PodNamespace>>(
                &mut ebpf, MAP_PODS, &pin_dir,
            )?,
            addresses: {
                let mut c = ZoneConfig::zeroed();
                c.stale_after_ns = DEFAULT_STALE_AFTER_NS;
                c.grace_ns = DEFAULT_GRACE_NS;
                c
            },
            config: take_map::<Array<MapData, ZoneConfig>>(&mut ebpf, MAP_CONFIG, &pin_dir)?,
            counters: take_map::<PerCpuArray<MapData, u64>>(&mut ebpf, MAP_COUNTERS, &pin_dir)?,
            heartbeat: std::sync::Arc::new(maps::Heartbeat::new(liveness).map_err(|source| {
                KernelError::Pin {
                    path: pin_dir.join(MAP_LIVENESS),
                    source,
                }
            })?),
        };
        let counters_id = MapData::from_pin(pin_dir.join(MAP_COUNTERS))
            .ok()
            .and_then(|m| m.info().ok())
            .map(|i| i.id());
        // The trace maps stay with the program; `dns-agent trace` opens them from their pins.
        for name in [MAP_TRACE_CONTROL, MAP_TRACE_EVENTS] {
            let map = ebpf.map(name).ok_or(KernelError::MissingMap(name))?;
            pin_map(map, name, &pin_dir)?;
        }
        Ok((
            Self {
                ebpf,
                links: Vec::new(),
                pin_path: pin_path.to_path_buf(),
                pin_dir,
                egress,
                counters_id,
                released: false,
            },
            maps,
        ))
    }

    fn xdp_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM_NAME)
            .expect("checked at load")
            .try_into()
            .expect("checked at load")
    }

    fn egress_mut(&mut self) -> &mut SchedClassifier {
        self.ebpf
            .program_mut(EGRESS_PROGRAM_NAME)
            .expect("checked at load")
            .try_into()
            .expect("checked at load")
    }

    /// The kernel's view of one of this agent's programs.
    fn program_info(&self, hook: Hook) -> Option<ProgramInfo> {
        let program = self.ebpf.program(hook.program())?;
        match hook {
            Hook::Xdp => <&Xdp>::try_from(program).ok()?.info().ok(),
            Hook::Egress => <&SchedClassifier>::try_from(program).ok()?.info().ok(),
        }
    }

    fn link_pin(&self, hook: Hook, interface: &str) -> PathBuf {
        self.pin_path.join(hook.dir()).join(interface)
    }

    /// Attaches the programs to `interface`. If a previous agent left pinned links there, they
    /// are switched to this agent's programs in one step each (the kernel swaps programs
    /// atomically), so queries never find the interface without an answering program.
    pub fn attach(&mut self, interface: &str, mode: AttachMode) -> Result<Takeover, KernelError> {
        // The egress program first: once the XDP program steers a query, its reply must find
        // the program that gives it the intercepted address back (without it the pod would
        // drop the reply, from an address it did not ask).
        if self.egress {
            self.attach_hook(interface, Hook::Egress, mode)?;
        }
        self.attach_hook(interface, Hook::Xdp, mode)
    }

    fn attach_hook(
        &mut self,
        interface: &str,
        hook: Hook,
        mode: AttachMode,
    ) -> Result<Takeover, KernelError> {
        let attach_error = |source| {
            KernelError::Attach {
                interface: interface.to_string(),
                mode,
                source,
            }
            .for_want_of(
                &[Capability::Bpf, Capability::NetAdmin],
                format!("attaching to {interface}"),
            )
        };
        let link_pin = self.link_pin(hook, interface);
        let dir = link_pin
            .parent()
            .expect("a pin path has a parent")
            .to_path_buf();
        fs::create_dir_all(&dir).map_err(|source| KernelError::Pin { path: dir, source })?;
        let found = self.pinned_link(hook, &link_pin);
        if let PinnedState::Newer = found {
            // Another agent started after this one and already serves the interface: it
            // owns it. Taking it back would leave the interface with this agent's maps,
            // frozen once this agent leaves.
            return Err(KernelError::NewerAgent(interface.to_string()));
        }
        let takeover = if matches!(found, PinnedState::Older(_)) {
            Takeover::TookOver
        } else {
            Takeover::Fresh
        };
        let fd = match (hook, found) {
            (Hook::Xdp, PinnedState::Older(link)) => {
                let link =
                    XdpLink::try_from(link).map_err(|e| KernelError::Bpffs(e.to_string()))?;
                let id = self.xdp_mut().attach_to_link(link).map_err(attach_error)?;
                FdLink::try_from(self.xdp_mut().take_link(id).map_err(attach_error)?)
            }
            (Hook::Xdp, _) => {
                let id = self
                    .xdp_mut()
                    .attach(interface, mode.into())
                    .map_err(attach_error)?;
                FdLink::try_from(self.xdp_mut().take_link(id).map_err(attach_error)?)
            }
            (Hook::Egress, PinnedState::Older(link)) => {
                let link = SchedClassifierLink::try_from(link)
                    .map_err(|e| KernelError::Bpffs(e.to_string()))?;
                let id = self
                    .egress_mut()
                    .attach_to_link(link)
                    .map_err(attach_error)?;
                FdLink::try_from(self.egress_mut().take_link(id).map_err(attach_error)?)
            }
            (Hook::Egress, _) => {
                let id = self
                    .egress_mut()
                    .attach_with_options(
                        interface,
                        TcAttachType::Egress,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .map_err(attach_error)?;
                FdLink::try_from(self.egress_mut().take_link(id).map_err(attach_error)?)
            }
        }
        .map_err(|e| {
            KernelError::Bpffs(format!(
                "attaching to {interface} did not give a bpf_link ({e}): xdns needs Linux 5.18 \
                 or newer (6.6 for --intercept)"
            ))
        })?;
        // A taken-over link is already pinned there; pin our own handle afresh either way.
        let _ = fs::remove_file(&link_pin);
        let link = fd.pin(&link_pin).map_err(|source| KernelError::PinMap {
            name: "link",
            source,
        })?;
        self.links.push(Attachment {
            interface: interface.to_string(),
            hook,
            link,
        });
        Ok(takeover)
    }

    /// What is pinned for `hook` on an interface: nothing usable, a previous agent's link (to
    /// take over), or a newer agent's (to leave alone).
    fn pinned_link(&self, hook: Hook, path: &Path) -> PinnedState {
        if !path.exists() {
            return PinnedState::None;
        }
        let link = match PinnedLink::from_pin(path) {
            Ok(pinned) => FdLink::from(pinned),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "a pinned link cannot be opened; attaching anew");
                let _ = fs::remove_file(path);
                return PinnedState::None;
            }
        };
        // The kernel numbers programs in the order they are loaded (cyclically, over 2^31
        // ids): a higher id than ours is an agent that started later.
        let theirs = link.info().ok().map(|i| i.program_id());
        let ours = self.program_info(hook).map(|p| p.id());
        match (theirs, ours) {
            (Some(t), Some(o)) if t > o => PinnedState::Newer,
            _ => PinnedState::Older(link),
        }
    }

    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.links
            .iter()
            .filter(|a| a.hook == Hook::Xdp)
            .map(|a| a.interface.as_str())
    }

    pub fn is_attached(&self, interface: &str) -> bool {
        self.links.iter().any(|a| a.interface == interface)
    }

    /// The interface is gone: the kernel has released the programs' attachments with it; drop
    /// our handles and their pins.
    pub fn forget(&mut self, interface: &str) {
        let (gone, kept) = std::mem::take(&mut self.links)
            .into_iter()
            .partition(|a| a.interface == interface);
        self.links = kept;
        for a in gone {
            let _ = a.link.unpin();
        }
    }

    /// Instructions the verifier processed to accept the XDP program (its limit is 1,000,000):
    /// how close the program is to what the kernel accepts at all.
    pub fn verified_instructions(&self) -> Option<u32> {
        self.program_info(Hook::Xdp)?.verified_instruction_count()
    }

    /// Runs the program on one frame with `BPF_PROG_TEST_RUN`: no network needed. Returns
    /// the verdict, the frame as the program left it, and the kernel's mean run time over
    /// `repeat` runs.
    pub fn test_run(&self, frame: &[u8], repeat: u32) -> Result<TestRunOutcome, KernelError> {
        test_run(self.xdp(), frame, repeat)
    }

    fn xdp(&self) -> &Xdp {
        self.ebpf
            .program(PROGRAM_NAME)
            .expect("checked at load")
            .try_into()
            .expect("checked at load")
    }

    /// Runs the program `repeat` times on copies of one frame in live-frames mode
    /// (`BPF_F_TEST_XDP_LIVE_FRAMES`): every run starts from the frame as given, and what the
    /// program sends goes to the loopback device (which drops it). With the kernel's run-time
    /// statistics on ([`aya::sys::enable_stats`]), [`Kernel::run_stats`] then tells the
    /// program's own time per run on a warm CPU, without the test harness around it.
    pub fn test_run_live(&self, frame: &[u8], repeat: u32) -> Result<(), KernelError> {
        aya::programs::TestRun::test_run(
            self.xdp(),
            aya::programs::TestRunOptions {
                data_in: Some(frame),
                repeat,
                attrs: aya::programs::TestRunAttrs::new().xdp_live_frames(64),
                ..aya::programs::TestRunOptions::new()
            },
        )
        .map_err(KernelError::TestRun)?;
        Ok(())
    }

    /// The XDP program's accumulated run time and run count, as the kernel keeps them while
    /// its run-time statistics are on (zero otherwise).
    pub fn run_stats(&self) -> Option<(std::time::Duration, u64)> {
        let info = self.program_info(Hook::Xdp)?;
        Some((info.run_time(), info.run_count()))
    }

    /// Runs the egress program (loaded with `egress`) on one frame, as it would leave an
    /// interface: the verdict (`TC_ACT_*`) and the frame as the program left it.
    pub fn test_run_egress(&self, frame: &[u8]) -> Result<TestRunOutcome, KernelError> {
        let program: &SchedClassifier = self
            .ebpf
            .program(EGRESS_PROGRAM_NAME)
            .ok_or(KernelError::MissingProgram(EGRESS_PROGRAM_NAME))?
            .try_into()
            .map_err(KernelError::TestRun)?;
        test_run(program, frame, 1)
    }

    /// Detaches from every interface this agent still serves, and removes its pins. An
    /// attachment another agent has taken over is left to that agent, and so are its pins.
    pub fn detach_all(&mut self) {
        if std::mem::replace(&mut self.released, true) {
            return;
        }
        let own = [Hook::Xdp, Hook::Egress].map(|h| self.program_info(h).map(|p| p.id()));
        for a in std::mem::take(&mut self.links) {
            let running = PinnedLink::from_pin(self.link_pin(a.hook, &a.interface))
                .ok()
                .and_then(|p| FdLink::from(p).info().ok())
                .map(|i| i.program_id());
            let ours = own[a.hook as usize];
            if running.is_some() && running != ours {
                tracing::info!(interface = a.interface, hook = ?a.hook, "link handed over to the next agent");
                continue;
            }
            // Unpinned and closed, the link is gone: the program is detached.
            match a.link.unpin() {
                Ok(link) => {
                    drop(link);
                    tracing::info!(interface = a.interface, hook = ?a.hook, "program detached");
                }
                Err(e) => {
                    tracing::warn!(interface = a.interface, error = %e, "unpinning a link failed")
                }
            }
        }
        // Our maps' pins, unless a successor has pinned its own there.
        let pinned_counters = MapData::from_pin(self.pin_dir.join(MAP_COUNTERS))
            .ok()
            .and_then(|m| m.info().ok())
            .map(|i| i.id());
        if pinned_counters.is_none() || pinned_counters == self.counters_id {
            for name in dns_common::ALL_MAPS {
                let _ = fs::remove_file(self.pin_dir.join(name));
            }
            let _ = fs::remove_dir(&self.pin_dir);
        }
        for hook in [Hook::Xdp, Hook::Egress] {
            // Only if empty: another agent's links stay.
            let _ = fs::remove_dir(self.pin_path.join(hook.dir()));
        }
    }
}

fn test_run<P: aya::programs::TestRun<Result = aya::programs::TestRunResult>>(
    program: &P,
    frame: &[u8],
    repeat: u32,
) -> Result<TestRunOutcome, KernelError>
where
    for<'a> P::Opts<'a>: From<aya::programs::TestRunOptions<'a>>,
{
    let mut out = vec![0u8; 4096];
    let result = program
        .test_run(
            aya::programs::TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat,
                ..Default::default()
            }
            .into(),
        )
        .map_err(KernelError::TestRun)?;
    out.truncate(result.data_size_out as usize);
    Ok(TestRunOutcome {
        action: result.return_value,
        frame: out,
        duration: result.duration,
    })
}

/// What is pinned where an attachment's link would go.
enum PinnedState {
    None,
    /// A link of an agent loaded before this one (or of unknown age): taken over.
    Older(FdLink),
    /// A link of an agent loaded after this one: left alone.
    Newer,
}

impl Drop for Kernel {
    fn drop(&mut self) {
        self.detach_all();
    }
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct; `c` is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Makes sure `pin_path` lives on a BPF filesystem, mounting one at /sys/fs/bpf when the pin
/// path is below it and nothing is mounted there yet (as on a bare node or in a fresh
/// network namespace test).
fn ensure_bpffs(pin_path: &Path) -> Result<(), KernelError> {
    let mut probe = pin_path.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if is_bpffs(&probe) {
        return Ok(());
    }
    let root = Path::new(DEFAULT_BPFFS);
    if pin_path.starts_with(root) && !is_bpffs(root) {
        let src = c"bpf";
        let target = c"/sys/fs/bpf";
        // SAFETY: constant, valid C strings.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                c"mode=0700".as_ptr().cast(),
            )
        };
        if rc == 0 {
            tracing::info!("mounted a BPF filesystem at /sys/fs/bpf");
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        // The DaemonSet does not grant CAP_SYS_ADMIN: the node mounts the filesystem.
        let lacking = capabilities::refused(&err)
            .then(|| Missing::explain(&[Capability::SysAdmin], "mounting"))
            .flatten()
            .map(|_| ": mounting needs CAP_SYS_ADMIN, which this process lacks")
            .unwrap_or_default();
        return Err(KernelError::Bpffs(format!(
            "--pin-path {}: /sys/fs/bpf is not a BPF filesystem and mounting one failed \
             ({err}){lacking}; mount it on the node (`mount -t bpf bpf /sys/fs/bpf`; systemd \
             does at boot) and into the container (deploy/daemonset.yaml's bpffs volume)",
            pin_path.display()
        )));
    }
    Err(KernelError::Bpffs(format!(
        "--pin-path {}: not on a BPF filesystem; choose a directory below a bpffs mount such as /sys/fs/bpf",
        pin_path.display()
    )))
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str, pin_dir: &Path) -> Result<M, KernelError>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(KernelError::MissingMap(name))?;
    pin_map(&map, name, pin_dir)?;
    M::try_from(map).map_err(|source| KernelError::Map { name, source })
}

fn pin_map(map: &aya::maps::Map, name: &'static str, pin_dir: &Path) -> Result<(), KernelError> {
    let data: &MapData = match map {
        aya::maps::Map::HashMap(d)
        | aya::maps::Map::Array(d)
        | aya::maps::Map::PerCpuArray(d)
        | aya::maps::Map::RingBuf(d) => d,
        _ => return Ok(()),
    };
    data.pin(pin_dir.join(name))
        .map_err(|source| KernelError::PinMap { name, source })
}

/// Kernel counters of a running agent, read from its pinned map and summed over CPUs.
pub fn read_pinned_counters(pin_path: &Path) -> Result<Vec<(&'static str, u64)>, KernelError> {
    let path = pin_dir(pin_path).join(MAP_COUNTERS);
    let data = MapData::from_pin(&path).map_err(|source| KernelError::Map {
        name: MAP_COUNTERS,
        source,
    })?;
    let map = PerCpuArray::<MapData, u64>::try_from(aya::maps::Map::PerCpuArray(data)).map_err(
        |source| KernelError::Map {
            name: MAP_COUNTERS,
            source,
        },
    )?;
    maps::sum_counters(&map)
}

/// The `ZoneConfig` bits for listen addresses, split by family.
pub fn split_listen(addrs: &[IpAddr]) -> (Vec<[u8; 4]>, Vec<[u8; 16]>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for a in addrs {
        match a {
            IpAddr::V4(a) => v4.push(a.octets()),
            IpAddr::V6(a) => v6.push(a.octets()),
        }
    }
    (v4, v6)
}

/// Names of the kernel counters, by index.
pub fn counter_names() -> &'static [&'static str] {
    &counter::NAMES
}
