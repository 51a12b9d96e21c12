//! Typed access to the XDP program's maps: answers, blobs, the zone config (with the listen
//! and intercepted addresses), the agent's heartbeat, counters.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap, HashSet, VecDeque},
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, IterableMap as _, MapData, MapError, PerCpuArray};
use dns_common::{
    ACTION_ANSWER, ACTION_NODATA, ACTION_PASS, AnswerValue, BLOB_CLASS_M, BLOB_CLASS_S,
    BLOB_CLASS_SHIFT, BLOB_DATA_LEN, BLOB_M_LEN, BLOB_RETIRE_NS, BLOB_S_LEN, Blob, BlobL, BlobM,
    BlobS, INLINE_DATA_LEN, LONG_NAME_LEN, Liveness, LongKey, MAX_INTERCEPT, MAX_LISTEN, PodKey,
    PodNamespace, SHORT_NAME_LEN, SOA_RECORD_LEN, ShortKey, ZoneConfig, blob_class, counter, csum,
};

use super::KernelError;
use crate::zone::{KernelAnswer, name::WireName};

/// The maps, taken out of the loaded object.
pub struct KernelMaps {
    pub(super) short: HashMap<MapData, ShortKey, AnswerValue>,
    pub(super) long: HashMap<MapData, LongKey, AnswerValue>,
    pub(super) blobs: BlobMaps,
    /// The cache of upstream answers' maps, until [`KernelMaps::take_cache`] hands them to
    /// their writer.
    pub(super) cache: Option<super::cache_sync::CacheMaps>,
    /// The namespace of each pod of the node, by address (search-path completion).
    pub(super) pods: HashMap<MapData, PodKey, PodNamespace>,
    /// The parts of the zone config set once at start — listen and intercepted addresses,
    /// liveness settings — written with the rest by [`KernelMaps::write_config`].
    pub(super) addresses: ZoneConfig,
    pub(super) config: Array<MapData, ZoneConfig>,
    pub(super) counters: PerCpuArray<MapData, u64>,
    pub(super) heartbeat: Arc<Heartbeat>,
}

/// The agent's heartbeat in the liveness map, memory-mapped: the program reads it per packet,
/// the agent writes it ten times a second with one atomic 8-byte store (a map update would
/// copy through the kernel, and a reader could see it half written).
pub struct Heartbeat {
    _map: Array<MapData, Liveness>,
    value: NonNull<AtomicU64>,
    len: usize,
}

// SAFETY: the mapping is shared memory written only through the atomic, and lives as long as
// the struct.
unsafe impl Send for Heartbeat {}
// SAFETY: as above.
unsafe impl Sync for Heartbeat {}

impl Heartbeat {
    pub(super) fn new(map: Array<MapData, Liveness>) -> std::io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let len = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let fd = map.map().fd().as_fd().as_raw_fd();
        // SAFETY: a shared mapping of the map's one page of values (BPF_F_MMAPABLE); the
        // first value (the heartbeat) is 8-aligned at offset 0.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            _map: map,
            value: NonNull::new(ptr.cast()).expect("mmap gave a mapping"),
            len,
        })
    }

    /// The agent answers now.
    pub fn beat(&self) {
        // SAFETY: `value` points into the live mapping (see `new`).
        unsafe { self.value.as_ref() }.store(monotonic_ns(), Ordering::Release);
    }

    /// The last heartbeat, `CLOCK_MONOTONIC` nanoseconds (0: none yet).
    pub fn last(&self) -> u64 {
        // SAFETY: as in `beat`.
        unsafe { self.value.as_ref() }.load(Ordering::Acquire)
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.value.as_ptr().cast(), self.len) };
    }
}

/// `instant` on `bpf_ktime_get_ns()`'s clock. `Instant` reads `CLOCK_MONOTONIC` too, but keeps
/// its value to itself: one pair of readings taken side by side gives the offset, to within
/// tens of nanoseconds, for the life of the process.
pub fn monotonic_ns_at(instant: Instant) -> u64 {
    static BASE: OnceLock<(Instant, u64)> = OnceLock::new();
    let (base, base_ns) = *BASE.get_or_init(|| {
        let before = Instant::now();
        let ns = monotonic_ns();
        let after = Instant::now();
        (before + (after - before) / 2, ns)
    });
    if instant >= base {
        base_ns + (instant - base).as_nanos() as u64
    } else {
        base_ns.saturating_sub((base - instant).as_nanos() as u64)
    }
}

/// A fresh [`AnswerValue::generation`] for every write, from every writer: the program tells a
/// reused element from the one it looked up by it.
pub fn next_generation() -> u32 {
    static GENERATION: AtomicU32 = AtomicU32::new(1);
    GENERATION.fetch_add(1, Ordering::Relaxed)
}

/// `CLOCK_MONOTONIC` in nanoseconds: `bpf_ktime_get_ns()`'s clock.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: fills the timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A map write that failed; the entry is not in the kernel.
#[derive(Debug, thiserror::Error)]
#[error("writing {what}: {source}")]
pub struct WriteError {
    what: String,
    #[source]
    source: MapError,
}

impl WriteError {
    pub(super) fn new(what: String, source: MapError) -> Self {
        Self { what, source }
    }

    /// The map is full (E2BIG from the kernel).
    pub fn is_full(&self) -> bool {
        matches!(&self.source, MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::E2BIG))
    }
}

enum Key {
    Short(ShortKey),
    Long(LongKey),
}

/// `XDNS_PODS`' key of an address.
pub fn pod_key(addr: std::net::IpAddr) -> PodKey {
    let mut k = PodKey {
        addr: [0; 16],
        family: 4,
        _pad: [0; 3],
    };
    match addr {
        std::net::IpAddr::V4(a) => k.addr[..4].copy_from_slice(&a.octets()),
        std::net::IpAddr::V6(a) => {
            k.addr = a.octets();
            k.family = 6;
        }
    }
    k
}

fn key(name: &[u8], qtype: u16) -> Key {
    if name.len() <= SHORT_NAME_LEN {
        let mut k = ShortKey::zeroed();
        k.qtype = qtype;
        k.name[..name.len()].copy_from_slice(name);
        Key::Short(k)
    } else {
        let mut k = LongKey::zeroed();
        k.qtype = qtype;
        k.name[..name.len().min(LONG_NAME_LEN)]
            .copy_from_slice(&name[..name.len().min(LONG_NAME_LEN)]);
        Key::Long(k)
    }
}

/// Partial checksum of section bytes from an even offset, as the kernel expects it.
pub fn data_csum(data: &[u8]) -> u16 {
    csum::fold(csum::add_bytes(0, data))
}

/// The map value of `answer`, and the section bytes that go into a blob of the class
/// [`blob_class`] names when they do not fit inline (the caller gives the blob its id).
pub fn answer_value(answer: &KernelAnswer) -> (AnswerValue, Option<&[u8]>) {
    let mut v = AnswerValue::zeroed();
    let mut blob = None;
    match answer {
        KernelAnswer::Answer { flags, sections } => {
            v.action = ACTION_ANSWER;
            v.flags = *flags;
            v.ancount = sections.ancount;
            v.nscount = sections.nscount;
            v.arcount = sections.arcount;
            v.data_len = sections.data.len() as u16;
            v.data_csum = data_csum(&sections.data);
            if sections.data.len() <= INLINE_DATA_LEN {
                v.data[..sections.data.len()].copy_from_slice(&sections.data);
            } else {
                assert!(
                    sections.data.len() <= BLOB_DATA_LEN,
                    "the zone passes bigger answers"
                );
                blob = Some(&sections.data[..]);
            }
        }
        KernelAnswer::Nodata => v.action = ACTION_NODATA,
        KernelAnswer::Pass => v.action = ACTION_PASS,
    }
    (v, blob)
}

/// The three blob maps (section bytes too long for an entry), by size class.
pub struct BlobMaps {
    s: HashMap<MapData, u32, BlobS>,
    m: HashMap<MapData, u32, BlobM>,
    l: HashMap<MapData, u32, BlobL>,
}

impl BlobMaps {
    pub(super) fn new(
        s: HashMap<MapData, u32, BlobS>,
        m: HashMap<MapData, u32, BlobM>,
        l: HashMap<MapData, u32, BlobL>,
    ) -> Self {
        Self { s, m, l }
    }

    /// A second handle on the same maps: the cache of upstream answers writes its blobs
    /// beside the zone's, in ids of its own.
    pub(super) fn share(&self) -> Result<Self, MapError> {
        fn again<V: aya::Pod>(
            map: &HashMap<MapData, u32, V>,
        ) -> Result<HashMap<MapData, u32, V>, MapError> {
            let fd = map
                .map()
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|io_error| {
                    MapError::SyscallError(aya::sys::SyscallError {
                        call: "dup",
                        io_error,
                    })
                })?;
            HashMap::try_from(aya::maps::Map::HashMap(MapData::from_fd(fd)?))
        }
        Ok(Self {
            s: again(&self.s)?,
            m: again(&self.m)?,
            l: again(&self.l)?,
        })
    }

    pub(super) fn insert(&mut self, id: u32, data: &[u8]) -> Result<(), MapError> {
        fn put<const N: usize>(
            map: &mut HashMap<MapData, u32, Blob<N>>,
            id: u32,
            data: &[u8],
        ) -> Result<(), MapError> {
            let mut blob = Blob { data: [0; N] };
            blob.data[..data.len()].copy_from_slice(data);
            map.insert(id, blob, 0)
        }
        match id >> BLOB_CLASS_SHIFT {
            BLOB_CLASS_S => put(&mut self.s, id, data),
            BLOB_CLASS_M => put(&mut self.m, id, data),
            _ => put(&mut self.l, id, data),
        }
    }

    fn remove(&mut self, id: u32) {
        let _ = match id >> BLOB_CLASS_SHIFT {
            BLOB_CLASS_S => self.s.remove(&id),
            BLOB_CLASS_M => self.m.remove(&id),
            _ => self.l.remove(&id),
        };
    }

    pub(super) fn data(&self, id: u32, len: usize) -> Vec<u8> {
        match id >> BLOB_CLASS_SHIFT {
            BLOB_CLASS_S => self
                .s
                .get(&id, 0)
                .map(|b| b.data[..len.min(BLOB_S_LEN)].to_vec()),
            BLOB_CLASS_M => self
                .m
                .get(&id, 0)
                .map(|b| b.data[..len.min(BLOB_M_LEN)].to_vec()),
            _ => self
                .l
                .get(&id, 0)
                .map(|b| b.data[..len.min(BLOB_DATA_LEN)].to_vec()),
        }
        .unwrap_or_default()
    }

    /// Blobs present, of every writer (walks the maps: for tests and benchmarks).
    pub fn count(&self) -> usize {
        self.s.keys().count() + self.m.keys().count() + self.l.keys().count()
    }
}

/// Which writer an id belongs to: ids of the zone and of the cache of upstream answers never
/// meet, so two writers share the blob maps without sharing their bookkeeping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdRange {
    Zone = 0,
    Cache = 1,
}

/// Bits of an id below its class and range: ids cycle through 2^29 per class and writer.
const ID_BITS: u32 = BLOB_CLASS_SHIFT - 1;

/// Blob ids: never reused while in use, and handed out in a cycle of 2^29 per class and writer,
/// so an id freed now is not reused for a very long time (a reader that looked up the old id
/// either finds the old blob or nothing, never another answer's bytes). A blob no entry points
/// at any more is deleted only [`BLOB_RETIRE_NS`] later: a program run that copied the old
/// entry may still be copying the blob, and a deleted element's memory goes to the next insert
/// at once (Linux 6.1+).
pub struct BlobIds {
    range: IdRange,
    next: [u32; 4],
    live: StdHashMap<(WireName, u16), u32>,
    used: HashSet<u32>,
    /// Blobs no entry points at: (when they may be deleted, id), oldest first.
    retired: VecDeque<(u64, u32)>,
}

impl Default for BlobIds {
    fn default() -> Self {
        Self::new(IdRange::Zone)
    }
}

impl BlobIds {
    pub fn new(range: IdRange) -> Self {
        Self {
            range,
            next: [0; 4],
            live: StdHashMap::new(),
            used: HashSet::new(),
            retired: VecDeque::new(),
        }
    }

    pub(super) fn allocate(&mut self, class: u32) -> u32 {
        let mask = (1u32 << ID_BITS) - 1;
        loop {
            let n = &mut self.next[class as usize];
            *n = (*n + 1) & mask;
            let id = (class << BLOB_CLASS_SHIFT) | ((self.range as u32) << ID_BITS) | *n;
            if *n != 0 && !self.used.contains(&id) {
                self.used.insert(id);
                return id;
            }
        }
    }

    /// A blob no entry ever pointed at (its entry's write failed): gone at once.
    pub(super) fn release_now(&mut self, blobs: &mut BlobMaps, id: u32) {
        blobs.remove(id);
        self.used.remove(&id);
    }

    /// A blob an entry pointed at until now: deleted after [`BLOB_RETIRE_NS`].
    pub(super) fn retire(&mut self, id: u32) {
        self.retired
            .push_back((monotonic_ns() + BLOB_RETIRE_NS, id));
    }

    /// Deletes the retired blobs whose time has come; returns how many.
    pub fn reap(&mut self, blobs: &mut BlobMaps) -> usize {
        let now = monotonic_ns();
        let mut n = 0;
        while let Some(&(due, id)) = self.retired.front()
            && due <= now
        {
            self.retired.pop_front();
            blobs.remove(id);
            self.used.remove(&id);
            n += 1;
        }
        n
    }

    /// Blobs retired and not deleted yet.
    pub fn retired_count(&self) -> usize {
        self.retired.len()
    }

    pub fn live_count(&self) -> usize {
        self.live.len()
    }
}

impl KernelMaps {
    /// Writes one entry. A changed blob answer gets a new blob, written before the entry
    /// points at it; the old one is deleted after.
    pub fn write(
        &mut self,
        blobs: &mut BlobIds,
        name: &[u8],
        qtype: u16,
        answer: &KernelAnswer,
    ) -> Result<(), WriteError> {
        let (mut v, blob_data) = answer_value(answer);
        v.generation = next_generation();
        let mut new_blob = None;
        if let Some(data) = blob_data {
            let id = blobs.allocate(blob_class(data.len()));
            if let Err(source) = self.blobs.insert(id, data) {
                blobs.release_now(&mut self.blobs, id);
                return Err(WriteError {
                    what: format!("blob {id}"),
                    source,
                });
            }
            v.blob = id;
            new_blob = Some(id);
        }
        let res = match key(name, qtype) {
            Key::Short(k) => self.short.insert(k, v, 0),
            Key::Long(k) => self.long.insert(k, v, 0),
        };
        if let Err(source) = res {
            if let Some(id) = new_blob {
                blobs.release_now(&mut self.blobs, id);
            }
            return Err(WriteError {
                what: format!("{} type {qtype}", crate::zone::name::to_text(name)),
                source,
            });
        }
        let slot = (name.to_vec(), qtype);
        let old = match new_blob {
            Some(id) => blobs.live.insert(slot, id),
            None => blobs.live.remove(&slot),
        };
        if let Some(old) = old {
            blobs.retire(old);
        }
        Ok(())
    }

    /// Removes one entry; its blob is retired.
    pub fn remove(&mut self, blobs: &mut BlobIds, name: &[u8], qtype: u16) {
        let _ = match key(name, qtype) {
            Key::Short(k) => self.short.remove(&k),
            Key::Long(k) => self.long.remove(&k),
        };
        if let Some(old) = blobs.live.remove(&(name.to_vec(), qtype)) {
            blobs.retire(old);
        }
    }

    /// Deletes the blobs retired long enough ago (see [`BlobIds`]).
    pub fn reap(&mut self, blobs: &mut BlobIds) -> usize {
        blobs.reap(&mut self.blobs)
    }

    /// Tells the program the namespace of the pod at `addr`, or that no pod of this node has
    /// it (`None`).
    pub fn set_pod(
        &mut self,
        addr: std::net::IpAddr,
        namespace: Option<&str>,
    ) -> Result<(), WriteError> {
        let key = pod_key(addr);
        let Some(ns) = namespace else {
            let _ = self.pods.remove(&key);
            return Ok(());
        };
        let mut v = PodNamespace {
            len: 0,
            label: [0; dns_common::MAX_LABEL_LEN],
        };
        // A namespace is a DNS label (RFC 1123, at most 63 bytes), lowercase.
        let label = ns.as_bytes();
        let len = label.len().min(dns_common::MAX_LABEL_LEN);
        v.len = len as u8;
        v.label[..len].copy_from_slice(&label[..len]);
        for b in &mut v.label[..len] {
            b.make_ascii_lowercase();
        }
        self.pods
            .insert(key, v, 0)
            .map_err(|source| WriteError::new(format!("pod {addr}"), source))
    }

    /// The cache of upstream answers' maps, for their own writer (once).
    pub fn take_cache(&mut self) -> Option<super::cache_sync::CacheMaps> {
        self.cache.take()
    }

    /// Writes the zone configuration the program reads per packet.
    pub fn write_config(
        &mut self,
        zone: &[u8],
        soa_template: &[u8; SOA_RECORD_LEN],
        flags: u32,
        nodata_flags: u16,
        nxdomain_flags: u16,
    ) -> Result<(), KernelError> {
        let mut c = ZoneConfig::zeroed();
        c.flags = flags | (self.addresses.flags & dns_common::CONFIG_AUTOPATH);
        c.zone_len = zone.len() as u16;
        c.zone[..zone.len()].copy_from_slice(zone);
        c.soa = *soa_template;
        c.soa_csum = data_csum(soa_template);
        c.nodata_flags = nodata_flags;
        c.nxdomain_flags = nxdomain_flags;
        c.listen_v4 = self.addresses.listen_v4;
        c.listen_v6 = self.addresses.listen_v6;
        c.intercept_v4 = self.addresses.intercept_v4;
        c.intercept_v6 = self.addresses.intercept_v6;
        c.stale_after_ns = self.addresses.stale_after_ns;
        c.grace_ns = self.addresses.grace_ns;
        self.config.set(0, c, 0).map_err(|source| KernelError::Map {
            name: dns_common::MAP_CONFIG,
            source,
        })
    }

    /// The program answers queries to these addresses only (at most [`MAX_LISTEN`] of each
    /// family, checked at start). Takes effect with the next [`KernelMaps::write_config`].
    pub fn set_listen(&mut self, v4: &[[u8; 4]], v6: &[[u8; 16]]) -> Result<(), KernelError> {
        if v4.len() > MAX_LISTEN || v6.len() > MAX_LISTEN {
            return Err(KernelError::Bpffs(format!(
                "at most {MAX_LISTEN} listen addresses per family"
            )));
        }
        let a = &mut self.addresses;
        (a.listen_v4, a.listen_v6) = ([[0; 4]; MAX_LISTEN], [[0; 16]; MAX_LISTEN]);
        a.listen_v4[..v4.len()].copy_from_slice(v4);
        a.listen_v6[..v6.len()].copy_from_slice(v6);
        Ok(())
    }

    /// Queries to these addresses are answered by the program, and steered to the agent when it
    /// cannot answer them and the agent is alive (at most [`MAX_INTERCEPT`] of each family,
    /// checked at start). Takes effect with the next [`KernelMaps::write_config`].
    pub fn set_intercept(&mut self, v4: &[[u8; 4]], v6: &[[u8; 16]]) -> Result<(), KernelError> {
        if v4.len() > MAX_INTERCEPT || v6.len() > MAX_INTERCEPT {
            return Err(KernelError::Bpffs(format!(
                "at most {MAX_INTERCEPT} intercepted addresses per family"
            )));
        }
        let a = &mut self.addresses;
        (a.intercept_v4, a.intercept_v6) = ([[0; 4]; MAX_INTERCEPT], [[0; 16]; MAX_INTERCEPT]);
        a.intercept_v4[..v4.len()].copy_from_slice(v4);
        a.intercept_v6[..v6.len()].copy_from_slice(v6);
        Ok(())
    }

    /// Search-path completion on or off (`--autopath`). Takes effect with the next
    /// [`KernelMaps::write_config`].
    pub fn set_autopath(&mut self, on: bool) {
        if on {
            self.addresses.flags |= dns_common::CONFIG_AUTOPATH;
        } else {
            self.addresses.flags &= !dns_common::CONFIG_AUTOPATH;
        }
    }

    /// How long after the agent's last heartbeat the program still answers from the maps.
    /// Takes effect with the next [`KernelMaps::write_config`].
    pub fn set_grace(&mut self, grace: Duration) {
        self.addresses.grace_ns = grace.as_nanos().min(u64::MAX as u128) as u64;
    }

    /// The heartbeat the program reads; the agent writes it while it answers.
    pub fn heartbeat(&self) -> Arc<Heartbeat> {
        self.heartbeat.clone()
    }

    /// The kernel counters, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(&'static str, u64)>, KernelError> {
        sum_counters(&self.counters)
    }

    /// Entries in the answer maps (walks the maps: for tests and benchmarks, not hot paths).
    pub fn entry_counts(&self) -> (usize, usize, usize) {
        (
            self.short.keys().count(),
            self.long.keys().count(),
            self.blobs.count(),
        )
    }

    /// Every answer entry: (name, qtype) → (action, flags, counts, section bytes). Walks the
    /// maps: for tests and benchmarks.
    pub fn snapshot(&self) -> BTreeMap<(WireName, u16), SnapshotEntry> {
        let mut out = BTreeMap::new();
        let mut put = |raw_name: &[u8], qtype: u16, v: AnswerValue| {
            let name = raw_name[..crate::zone::name::labels_end(raw_name)].to_vec();
            let len = v.data_len as usize;
            let data = if v.blob == 0 {
                v.data[..len.min(INLINE_DATA_LEN)].to_vec()
            } else {
                self.blobs.data(v.blob, len)
            };
            out.insert(
                (name, qtype),
                SnapshotEntry {
                    action: v.action,
                    flags: v.flags,
                    counts: [v.ancount, v.nscount, v.arcount],
                    data,
                },
            );
        };
        for (k, v) in self.short.iter().flatten() {
            put(&k.name, k.qtype, v);
        }
        for (k, v) in self.long.iter().flatten() {
            put(&k.name, k.qtype, v);
        }
        out
    }

    /// Kernel memory of the answer maps (`memlock` of each map's fdinfo, which for hash maps
    /// without preallocation counts the elements present).
    pub fn memory(&self) -> Vec<(&'static str, u64)> {
        let memlock = |m: &MapData| -> u64 {
            let fd = m.fd().as_fd().as_raw_fd();
            std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
                .ok()
                .and_then(|t| {
                    t.lines().find_map(|l| {
                        l.strip_prefix("memlock:")
                            .and_then(|v| v.trim().parse().ok())
                    })
                })
                .unwrap_or(0)
        };
        vec![
            (dns_common::MAP_ANSWERS_SHORT, memlock(self.short.map())),
            (dns_common::MAP_ANSWERS_LONG, memlock(self.long.map())),
            (dns_common::MAP_BLOBS_S, memlock(self.blobs.s.map())),
            (dns_common::MAP_BLOBS_M, memlock(self.blobs.m.map())),
            (dns_common::MAP_BLOBS_L, memlock(self.blobs.l.map())),
        ]
    }
}

/// One entry of [`KernelMaps::snapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotEntry {
    pub action: u8,
    pub flags: u16,
    pub counts: [u16; 3],
    pub data: Vec<u8>,
}

pub(super) fn sum_counters(
    map: &PerCpuArray<MapData, u64>,
) -> Result<Vec<(&'static str, u64)>, KernelError> {
    (0..counter::COUNT)
        .map(|i| {
            let values = map.get(&i, 0).map_err(|source| KernelError::Map {
                name: dns_common::MAP_COUNTERS,
                source,
            })?;
            Ok((counter::NAMES[i as usize], values.iter().sum()))
        })
        .collect()
}
