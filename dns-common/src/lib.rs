//! The contract between the xdns XDP program (`dns-ebpf`) and its agent (`dns-agent`).
//!
//! Every type that crosses the kernel/userspace line lives here: `#[repr(C)]`, integers and
//! byte arrays only, explicit padding, and a size assertion each, so that both sides agree on
//! every byte. Map names, capacities and counter indices are constants here for the same reason.
//!
//! # How the kernel answers
//!
//! The agent pre-encodes every answer of the cluster zone. For a query `(name, qtype)` the XDP
//! program builds a key from the lowercased wire-format name and looks it up:
//!
//! 1. `(name, qtype)` → an [`AnswerValue`]: the answer, authority and additional sections as
//!    bytes, ready to be copied after the question ([`ACTION_ANSWER`]), or "the name exists but
//!    has no such type" ([`ACTION_NODATA`]), or "userspace answers this" ([`ACTION_PASS`]).
//! 2. else `(name, QTYPE_OTHER)` → the same, for every type the name has no entry of its own for.
//! 3. else, when the zone is synced and [`CONFIG_NXDOMAIN`] is set, a name below the cluster zone
//!    (but not below `pod.<zone>`, whose names are synthesised by userspace) does not exist:
//!    NXDOMAIN.
//! 4. else, for a name outside the cluster zone, the cache of upstream answers: `(name, qtype,
//!    DO, CD)` in [`MAP_CACHE_SHORT`] or [`MAP_CACHE_LONG`] → an [`AnswerValue`] whose TTL
//!    fields the program counts down to the seconds left before [`AnswerValue::expires_ns`].
//! 5. else the query goes up the stack to the agent.
//!
//! Map elements are not snapshots: since Linux 6.1 a hash map hands the memory of a replaced or
//! deleted element to the next insert on that CPU at once. The program copies an entry, looks
//! it up again and compares the element and its [`AnswerValue::generation`]; the agent deletes blobs
//! only [`BLOB_RETIRE_NS`] after no entry points at them.
//!
//! Negative answers carry the zone's SOA record, built from [`ZoneConfig::soa`] with its three
//! names compressed against the question (see [`SOA_PTR_OFFSETS`]).
//!
//! Section bytes are positioned right after the question, so compression pointers into the
//! question (`0xC00C` for the question name) are valid; the question itself is echoed exactly
//! as received, so clients that randomise the case of their names see their own bytes.
#![no_std]

/// Bumped whenever the layout of a pinned map changes (the flows map's key and value: the
/// other maps live and die with one agent). Pinned maps live in a directory named after it, so
/// an agent never reads maps written with another layout, and an upgrade that keeps it keeps
/// the flows of intercepted queries across the handover.
pub const LAYOUT_VERSION: u32 = 3;

// ---------------------------------------------------------------------------------------------
// Map and program names (ELF symbol names; the kernel keeps the first 15 bytes).

/// Program name of the XDP entry point.
pub const PROGRAM_NAME: &str = "xdns_xdp";
/// Program name of the tc egress program that gives replies to intercepted queries their
/// original source address back.
pub const EGRESS_PROGRAM_NAME: &str = "xdns_egress";
/// `HashMap<ShortKey, AnswerValue>`: answers for names of at most [`SHORT_NAME_LEN`] bytes.
pub const MAP_ANSWERS_SHORT: &str = "XDNS_ANS_SHORT";
/// `HashMap<LongKey, AnswerValue>`: answers for longer names (IPv6 reverse names, deep names).
pub const MAP_ANSWERS_LONG: &str = "XDNS_ANS_LONG";
/// `HashMap<u32, BlobS>`, `HashMap<u32, BlobM>`, `HashMap<u32, BlobL>`: section bytes too
/// long for [`AnswerValue::data`], by size class (see [`BLOB_CLASS_SHIFT`]).
pub const MAP_BLOBS_S: &str = "XDNS_BLOBS_S";
pub const MAP_BLOBS_M: &str = "XDNS_BLOBS_M";
pub const MAP_BLOBS_L: &str = "XDNS_BLOBS_L";
/// `HashMap<CacheShortKey, AnswerValue>` and `HashMap<CacheLongKey, AnswerValue>`: the agent's
/// cache of upstream answers (names outside the cluster zone), kept in step with it.
pub const MAP_CACHE_SHORT: &str = "XDNS_CACHE_S";
pub const MAP_CACHE_LONG: &str = "XDNS_CACHE_L";
/// `HashMap<PodKey, PodNamespace>`: the namespace of every pod on this node, by address, for
/// search-path completion.
pub const MAP_PODS: &str = "XDNS_PODS";
/// `Array<ZoneConfig>` with one entry.
pub const MAP_CONFIG: &str = "XDNS_CONFIG";
/// `PerCpuArray<u64>` indexed by [`counter`].
pub const MAP_COUNTERS: &str = "XDNS_COUNTERS";
/// `Array<Liveness>` with one entry, memory-mapped by the agent (`BPF_F_MMAPABLE`): its
/// heartbeat is one aligned 8-byte store, never torn, ten times a second.
pub const MAP_LIVENESS: &str = "XDNS_LIVENESS";
/// `LruHashMap<FlowKey, FlowValue>`: queries to an intercepted address steered to the agent,
/// so that the egress program gives their replies the intercepted address back.
pub const MAP_FLOWS: &str = "XDNS_FLOWS";

/// `Array<TraceControl>` with one entry: is a tracer listening (`dns-agent trace`)?
pub const MAP_TRACE_CONTROL: &str = "XDNS_TRACE_CTL";
/// Ring buffer of [`TraceEvent`]s, written only while [`TraceControl::enabled`] is set.
pub const MAP_TRACE_EVENTS: &str = "XDNS_TRACE_EVT";

/// Every map the program has, for pinning and reopening.
pub const ALL_MAPS: [&str; 14] = [
    MAP_ANSWERS_SHORT,
    MAP_ANSWERS_LONG,
    MAP_CACHE_SHORT,
    MAP_CACHE_LONG,
    MAP_PODS,
    MAP_BLOBS_S,
    MAP_BLOBS_M,
    MAP_BLOBS_L,
    MAP_CONFIG,
    MAP_COUNTERS,
    MAP_LIVENESS,
    MAP_FLOWS,
    MAP_TRACE_CONTROL,
    MAP_TRACE_EVENTS,
];

// ---------------------------------------------------------------------------------------------
// Limits.

/// Longest wire-format name (RFC 1035 §2.3.4), root label included.
pub const MAX_NAME_LEN: usize = 255;
/// Longest label.
pub const MAX_LABEL_LEN: usize = 63;
/// Names of at most this many wire bytes go into [`MAP_ANSWERS_SHORT`].
pub const SHORT_NAME_LEN: usize = 62;
/// Name bytes of a [`LongKey`]: every legal name, plus one zero byte of padding.
pub const LONG_NAME_LEN: usize = 256;
/// Section bytes held inline in an [`AnswerValue`].
pub const INLINE_DATA_LEN: usize = 96;
/// Section bytes of the three blob classes. Hash map elements are allocated from power-of-
/// two size buckets (element header 48 bytes, key 8, list node 8), so the classes are sized to
/// fill 256-, 512- and 2048-byte buckets: most big answers (SRV sets, a few endpoints) cost a
/// quarter of what one size for all would.
pub const BLOB_S_LEN: usize = 192;
pub const BLOB_M_LEN: usize = 448;
pub const BLOB_DATA_LEN: usize = 1216;
/// A blob id carries its class in its top two bits: 1 small, 2 medium, 3 large.
pub const BLOB_CLASS_SHIFT: u32 = 30;
pub const BLOB_CLASS_S: u32 = 1;
pub const BLOB_CLASS_M: u32 = 2;
pub const BLOB_CLASS_L: u32 = 3;
/// The largest DNS message the kernel sends, and the largest UDP answer userspace sends:
/// 1232 bytes fit in any IPv6 path without fragmentation (DNS Flag Day 2020).
pub const MAX_UDP_REPLY: usize = 1232;
/// The largest DNS message a client without EDNS accepts over UDP (RFC 1035).
pub const CLASSIC_UDP_LIMIT: usize = 512;
/// The UDP payload size xdns advertises in its OPT records.
pub const EDNS_UDP_SIZE: u16 = MAX_UDP_REPLY as u16;
/// Length of an OPT record without options.
pub const OPT_RECORD_LEN: usize = 11;
/// Queries longer than this go to userspace (the kernel's offsets stay small for the verifier).
pub const MAX_KERNEL_QUERY: usize = MAX_UDP_REPLY;

/// TTL fields the program counts down in one cached answer (a bounded loop); an answer with
/// more records is answered by the agent.
pub const MAX_TTL_FIELDS: usize = 32;
/// How long after no entry points at a blob the agent deletes it: far longer than any program
/// run that may have read the old entry, so its copy never reads memory given to another blob.
pub const BLOB_RETIRE_NS: u64 = 1_000_000_000;

/// Default capacities; `dns-agent run` can change them at load time.
/// Sized for 10,000 Services with 100,000 endpoints (about 330,000 short-name entries); each
/// entry of capacity costs 16 bytes of bucket array up front, entries cost memory when present.
pub const DEFAULT_ANSWERS_SHORT_MAX: u32 = 1 << 19;
pub const DEFAULT_ANSWERS_LONG_MAX: u32 = 1 << 17;
pub const DEFAULT_BLOBS_S_MAX: u32 = 1 << 18;
pub const DEFAULT_BLOBS_M_MAX: u32 = 1 << 15;
pub const DEFAULT_BLOBS_L_MAX: u32 = 1 << 13;
/// Listen addresses per family, held in [`ZoneConfig`]: the program compares a packet's
/// destination with them directly, cheaper than a map lookup per packet.
pub const MAX_LISTEN: usize = 8;
/// Intercepted addresses (the kube-dns Service's cluster IPs) per family.
pub const MAX_INTERCEPT: usize = 4;
/// Steered flows remembered; the least recently used is forgotten first. A flow lives from
/// a query to its reply (milliseconds), so this holds the flows of a very busy node.
pub const DEFAULT_FLOWS_MAX: u32 = 1 << 16;
/// A heartbeat older than this: the agent is not answering. Queries to intercepted addresses
/// then pass untouched, to the cluster's DNS Service; the agent writes one every 100 ms.
pub const DEFAULT_STALE_AFTER_NS: u64 = 500_000_000;
/// How long after the agent's last heartbeat the program still answers from its maps: the
/// default positive TTL, so no client holds an answer older than it would anyway.
pub const DEFAULT_GRACE_NS: u64 = 30_000_000_000;

// ---------------------------------------------------------------------------------------------
// Keys.

/// The `qtype` of the entry that answers every type a name has no entry of its own for.
/// (Type 0 is reserved and never asked for; the kernel passes queries for it.)
pub const QTYPE_OTHER: u16 = 0;

/// Key of [`MAP_ANSWERS_SHORT`]: query type (host order) and the lowercased wire-format name,
/// zero-padded. The name's own root label ends it, so no length is needed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShortKey {
    pub qtype: u16,
    pub name: [u8; SHORT_NAME_LEN],
}

/// Key of [`MAP_ANSWERS_LONG`]. Its first 64 bytes have the layout of a [`ShortKey`], so the
/// XDP program builds one buffer and uses its prefix for short names.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LongKey {
    pub qtype: u16,
    pub name: [u8; LONG_NAME_LEN],
    pub _pad: [u8; 2],
}

/// Key of [`MAP_CACHE_SHORT`]: a [`ShortKey`] and the rest of the agent's cache key. Its first
/// 64 bytes have a `ShortKey`'s layout and the variant sits where a [`LongKey`]'s name goes on,
/// so the program builds it in the same buffer. (The class is always IN: the kernel answers
/// nothing else.)
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheShortKey {
    pub qtype: u16,
    pub name: [u8; SHORT_NAME_LEN],
    /// `CACHE_DO | CACHE_CD` as the query asked.
    pub variant: u8,
    pub _pad: [u8; 7],
}

/// Key of [`MAP_CACHE_LONG`]: a [`LongKey`] with the variant in its first padding byte.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheLongKey {
    pub qtype: u16,
    pub name: [u8; LONG_NAME_LEN],
    pub variant: u8,
    pub _pad: u8,
}

/// Cache key variant bits: the query's EDNS DO bit, and its CD bit (an answer fetched with
/// checking disabled may hold what a validating upstream refuses everyone else).
pub const CACHE_DO: u8 = 1 << 0;
pub const CACHE_CD: u8 = 1 << 1;
/// Cache key variant bit of a completed search path: the answer to a name under the first
/// search element of a namespace (`<name>.<ns>.svc.<zone>`, which does not exist), as
/// CoreDNS's `autopath` gives it. Served only to pods of that namespace.
pub const CACHE_AUTOPATH: u8 = 1 << 2;

/// Key of [`MAP_PODS`]: a pod's address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PodKey {
    /// IPv4 addresses in the first four bytes, the rest zero.
    pub addr: [u8; 16],
    /// 4 or 6.
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Value of [`MAP_PODS`]: the pod's namespace, one DNS label.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodNamespace {
    /// Length of the label (1..=63).
    pub len: u8,
    /// The label, lowercase, zero-padded.
    pub label: [u8; MAX_LABEL_LEN],
}

/// Pods remembered per node: far more than a node runs (Kubernetes' default limit is 110).
pub const DEFAULT_PODS_MAX: u32 = 4096;

// ---------------------------------------------------------------------------------------------
// Values.

/// Reply with [`AnswerValue::data`] (or the blob it names) after the question.
pub const ACTION_ANSWER: u8 = 1;
/// Reply NOERROR with no answer and the zone SOA in the authority section.
pub const ACTION_NODATA: u8 = 2;
/// Userspace answers this query (its answer is computed per query, e.g. a chased CNAME).
pub const ACTION_PASS: u8 = 3;

/// DNS header flag bits (second 16-bit word of the header, host order).
pub const FLAG_QR: u16 = 0x8000;
pub const FLAG_AA: u16 = 0x0400;
pub const FLAG_TC: u16 = 0x0200;
pub const FLAG_RD: u16 = 0x0100;
pub const FLAG_RA: u16 = 0x0080;
pub const FLAG_AD: u16 = 0x0020;
pub const FLAG_CD: u16 = 0x0010;
pub const OPCODE_MASK: u16 = 0x7800;
pub const RCODE_MASK: u16 = 0x000f;
pub const RCODE_NOERROR: u16 = 0;
pub const RCODE_NXDOMAIN: u16 = 3;

/// Value of both answer maps.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AnswerValue {
    /// One of `ACTION_*`.
    pub action: u8,
    /// TTL fields the program sets to the seconds left before [`AnswerValue::expires_ns`]
    /// (cached upstream answers; at most [`MAX_TTL_FIELDS`]); 0 for the zone's answers, whose
    /// TTLs are in their bytes. Their offsets into the section bytes are `u16`s (host order) at
    /// the end of [`AnswerValue::data`], the first one last: [`ttl_offset_at`].
    pub ttl_count: u8,
    /// Header bits the reply carries besides QR and the query's RD and CD: AA, RA, RCODE.
    pub flags: u16,
    /// Record counts of the section bytes (for [`ACTION_NODATA`] the kernel adds the SOA).
    pub ancount: u16,
    pub nscount: u16,
    pub arcount: u16,
    /// Length of the section bytes.
    pub data_len: u16,
    /// Internet checksum partial sum (folded, not inverted) of the section bytes, taken as if
    /// they started at an even offset. The kernel byte-swaps it when they start at an odd one.
    /// The TTL fields of [`AnswerValue::ttl_count`] are zero in the bytes and in this sum.
    pub data_csum: u16,
    /// Of the TTL fields, those at an odd offset into the section bytes (the checksum of a TTL
    /// depends on its parity).
    pub ttl_odd: u16,
    /// 0: the section bytes are [`AnswerValue::data`]; otherwise the key of a blob, its class
    /// in the top two bits.
    /// A blob is never rewritten in place: a changed answer gets a new blob id.
    pub blob: u32,
    /// Unique per write (it wraps after 2^32 writes): the program checks after its copy that
    /// the element it read still holds this write.
    pub generation: u32,
    /// `bpf_ktime_get_ns()` time after which the entry must not be served; 0 for never.
    pub expires_ns: u64,
    /// From this time on the program passes the entry's queries up although it has not
    /// expired (at most [`AnswerValue::expires_ns`]; 0 with it): the agent answers the last
    /// seconds of a cached answer's TTL itself, to see how popular it is and refresh it
    /// (prefetch).
    pub pass_from_ns: u64,
    pub data: [u8; INLINE_DATA_LEN],
}

/// Byte offset into [`AnswerValue::data`] of the `i`-th TTL offset.
pub const fn ttl_offset_at(i: usize) -> usize {
    INLINE_DATA_LEN - 2 * (i + 1)
}

/// Value of the blob maps.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Blob<const N: usize> {
    pub data: [u8; N],
}

pub type BlobS = Blob<BLOB_S_LEN>;
pub type BlobM = Blob<BLOB_M_LEN>;
pub type BlobL = Blob<BLOB_DATA_LEN>;

/// The smallest blob class that holds `len` bytes.
pub const fn blob_class(len: usize) -> u32 {
    if len <= BLOB_S_LEN {
        BLOB_CLASS_S
    } else if len <= BLOB_M_LEN {
        BLOB_CLASS_M
    } else {
        BLOB_CLASS_L
    }
}

// ---------------------------------------------------------------------------------------------
// Zone configuration.

/// The agent has loaded the whole zone: the kernel may answer.
pub const CONFIG_SYNCED: u32 = 1 << 0;
/// Every existing name of the zone is in the maps: a name below the zone that is not there
/// does not exist. Cleared when the maps could not take every name (e.g. they are full).
pub const CONFIG_NXDOMAIN: u32 = 1 << 1;
/// Search-path completion (`--autopath`): a name under the first search element of the asking
/// pod's namespace that does not exist is completed ([`MAP_PODS`]), never answered NXDOMAIN
/// by the zone rule alone.
pub const CONFIG_AUTOPATH: u32 = 1 << 2;

/// Byte length of the zone SOA record template.
pub const SOA_RECORD_LEN: usize = 54;
/// Offsets in the template of the three compression pointers the kernel fills in, each
/// pointing at the zone's name inside the question: the owner, then the ends of the MNAME
/// (`ns.dns.<zone>`) and of the RNAME (`hostmaster.<zone>`).
pub const SOA_PTR_OFFSETS: [usize; 3] = [0, 19, 32];

/// Value of [`MAP_CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ZoneConfig {
    /// `CONFIG_*` bits.
    pub flags: u32,
    /// Wire length of [`ZoneConfig::zone`], root label included.
    pub zone_len: u16,
    /// Partial checksum of [`ZoneConfig::soa`] with its pointer slots zero (even start).
    pub soa_csum: u16,
    /// Header bits of an NXDOMAIN reply besides QR, RD and CD (AA, RA, RCODE).
    pub nxdomain_flags: u16,
    /// Header bits of a NODATA reply besides QR, RD and CD.
    pub nodata_flags: u16,
    /// The addresses the program answers queries to, network byte order; unused slots are
    /// zero (the unspecified address is never a listen address).
    pub listen_v4: [[u8; 4]; MAX_LISTEN],
    pub listen_v6: [[u8; 16]; MAX_LISTEN],
    /// The cluster zone, lowercased wire format, zero-padded.
    pub zone: [u8; LONG_NAME_LEN],
    /// The SOA record of negative answers, pointer slots zero.
    pub soa: [u8; SOA_RECORD_LEN],
    pub _pad: [u8; 2],
    /// Addresses whose queries the program answers, and steers to the agent when it cannot,
    /// while the agent is alive (the kube-dns Service's cluster IPs); network byte order,
    /// unused slots zero.
    pub intercept_v4: [[u8; 4]; MAX_INTERCEPT],
    pub intercept_v6: [[u8; 16]; MAX_INTERCEPT],
    pub _pad2: [u8; 4],
    /// [`Liveness::heartbeat_ns`] older than this: the agent is not answering; queries to
    /// intercepted addresses are not steered to it.
    pub stale_after_ns: u64,
    /// [`Liveness::heartbeat_ns`] older than this: the program answers nothing more from its
    /// maps (they stopped following the cluster when the agent stopped).
    pub grace_ns: u64,
}

/// Value of [`MAP_LIVENESS`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Liveness {
    /// `CLOCK_MONOTONIC` (`bpf_ktime_get_ns`) time of the agent's last answered self-probe.
    pub heartbeat_ns: u64,
}

/// Key of [`MAP_FLOWS`]: the client of a steered query.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowKey {
    /// IPv4 addresses in the first four bytes, the rest zero.
    pub client: [u8; 16],
    /// Network byte order, as on the wire.
    pub port: [u8; 2],
    /// 4 or 6.
    pub family: u8,
    pub _pad: u8,
}

/// Value of [`MAP_FLOWS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowValue {
    /// The address the client asked (the reply's source must be this).
    pub intercepted: [u8; 16],
    /// The listen address the query was steered to (the agent's reply comes from it).
    pub listen: [u8; 16],
}

// ---------------------------------------------------------------------------------------------
// Tracing (`dns-agent trace`).

/// [`TraceControl::enabled`]: no tracer; the program writes no events.
pub const TRACE_OFF: u32 = 0;
/// [`TraceControl::enabled`]: a tracer is reading [`MAP_TRACE_EVENTS`].
pub const TRACE_ON: u32 = 1;
/// Bytes of [`MAP_TRACE_EVENTS`] (a power of two and a multiple of the page size): room for
/// about 800 events a tracer has not read yet; beyond that the program drops events, never
/// packets.
pub const TRACE_RING_BYTES: u32 = 256 * 1024;

/// Value of [`MAP_TRACE_CONTROL`]. Written by the tracer only; the program reads it once per
/// packet, which is all a normal run pays for tracing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceControl {
    /// [`TRACE_OFF`] or [`TRACE_ON`].
    pub enabled: u32,
    /// Only packets that arrived on this interface; 0 for every interface.
    pub ifindex: u32,
    /// Process id of the tracer, so a new one can tell a tracer that is gone without having
    /// cleared the flag (killed) from one that is still running.
    pub tracer_pid: u32,
    pub _pad: u32,
}

/// [`TraceEvent::family`] values.
pub const TRACE_FAMILY_NONE: u8 = 0;
pub const TRACE_FAMILY_V4: u8 = 4;
pub const TRACE_FAMILY_V6: u8 = 6;

/// One packet to a listen address on port 53 and what the program did with it. Packets not
/// addressed to the DNS listen addresses (`counter::PASS_NOT_DNS`) produce no event.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TraceEvent {
    /// Interface the query arrived on.
    pub ifindex: u32,
    /// The verdict, `XDP_*` (`XDP_TX`: answered; `XDP_PASS`: up to the agent).
    pub action: u32,
    /// Why: the [`counter`] the packet was counted in.
    pub counter: u32,
    /// Question type, host order (valid when `name_len` is not 0).
    pub qtype: u16,
    /// Wire length of the question name in [`TraceEvent::key`]; 0 when the program stopped
    /// before it had read the question (the reason says where).
    pub name_len: u16,
    /// [`TRACE_FAMILY_V4`] or [`TRACE_FAMILY_V6`]; [`TRACE_FAMILY_NONE`] when the addresses
    /// could not be read again.
    pub family: u8,
    pub _pad: [u8; 3],
    /// The querier's and the listen address's port, host order.
    pub client_port: u16,
    pub server_port: u16,
    /// The querier's address and the listen address the query was sent to (IPv4 in the first
    /// four bytes), as the query carried them (an answered packet has them swapped on the way
    /// out; the program swaps them back for the event).
    pub client: [u8; 16],
    pub server: [u8; 16],
    /// The lookup key as the program built it: the lowercased wire-format name, zero-padded.
    /// Its `qtype` field is the last one looked up (perhaps `QTYPE_OTHER`): see `qtype`.
    pub key: LongKey,
    pub _pad2: [u8; 4],
}

// ---------------------------------------------------------------------------------------------
// Counters.

/// Indices of [`MAP_COUNTERS`]. Every packet the program sees lands in exactly one of the
/// `ANSWERED_*`, `PASS_*` or `ERROR_*` counters.
pub mod counter {
    /// Answered in the kernel with data.
    pub const ANSWERED: u32 = 0;
    /// Answered in the kernel: the name exists, the type does not.
    pub const ANSWERED_NODATA: u32 = 1;
    /// Answered in the kernel: the name does not exist.
    pub const ANSWERED_NXDOMAIN: u32 = 2;
    /// Not a UDP packet to a listen address on port 53: not ours to look at.
    pub const PASS_NOT_DNS: u32 = 3;
    /// A query whose name is not in the maps.
    pub const PASS_MISS: u32 = 4;
    /// The entry says userspace answers.
    pub const PASS_USERSPACE: u32 = 5;
    /// The answer does not fit the client's limit: userspace answers with TC=1.
    pub const PASS_TOO_BIG: u32 = 6;
    /// A message outside the kernel's rules (response, opcode, counts, class, EDNS version,
    /// meta type, IP options or fragments, VLAN tags): userspace decides.
    pub const PASS_UNSUPPORTED: u32 = 7;
    /// Truncated or malformed: userspace decides (usually FORMERR).
    pub const PASS_MALFORMED: u32 = 8;
    /// The zone is not loaded yet (userspace answers SERVFAIL).
    pub const PASS_NOT_SYNCED: u32 = 9;
    /// The entry has expired.
    pub const PASS_EXPIRED: u32 = 10;
    /// The frame has no room to grow into the reply: passed up unchanged, userspace answers.
    /// Generic XDP on a veth leaves a few hundred bytes of tailroom, so large answers (many
    /// SRV records with their addresses, big headless Services) take this path there.
    pub const PASS_NO_ROOM: u32 = 11;
    /// Writing the reply failed after the packet was resized: dropped, the client retries.
    pub const ERROR_WRITE: u32 = 12;
    /// No heartbeat from the agent within the grace period: the maps no longer follow the
    /// cluster, and every query passes untouched.
    pub const PASS_AGENT_DOWN: u32 = 13;

    /// Answered in the kernel from the cache of upstream answers (any RCODE).
    pub const ANSWERED_CACHED: u32 = 14;
    /// Answered in the kernel with a completed search path (autopath).
    pub const ANSWERED_AUTOPATH: u32 = 15;
    /// A search-path expansion the kernel holds no completed answer for: the agent completes it.
    pub const PASS_AUTOPATH: u32 = 16;
    /// The entry changed while the program read it (its element was replaced, or its blob was
    /// gone): passed up rather than answered from a mix.
    pub const PASS_RACE: u32 = 17;

    /// Counters up to here are outcomes: every packet lands in exactly one.
    pub const OUTCOMES: u32 = 18;

    /// Of the passes above, queries to an intercepted address steered to the agent.
    pub const STEERED: u32 = 18;
    /// Of the passes above, queries to an intercepted address left untouched, for the node's
    /// Service proxy to carry to the cluster's DNS Service: the agent is not answering (a stale
    /// heartbeat, or no socket).
    pub const LEFT_TO_SERVICE: u32 = 19;
    /// Replies to steered queries given the intercepted address back (tc egress program).
    pub const EGRESS_RESTORED: u32 = 20;

    pub const COUNT: u32 = 21;

    /// Names for display and metrics, by index.
    pub const NAMES: [&str; COUNT as usize] = [
        "answered",
        "answered_nodata",
        "answered_nxdomain",
        "pass_not_dns",
        "pass_miss",
        "pass_userspace",
        "pass_too_big",
        "pass_unsupported",
        "pass_malformed",
        "pass_not_synced",
        "pass_expired",
        "pass_no_room",
        "error_write",
        "pass_agent_down",
        "answered_cached",
        "answered_autopath",
        "pass_autopath",
        "pass_race",
        "steered",
        "left_to_service",
        "egress_restored",
    ];
}

// ---------------------------------------------------------------------------------------------
// Layout checks: a change here is a change of the contract (bump LAYOUT_VERSION if the map is
// pinned).

const _: () = assert!(core::mem::size_of::<ShortKey>() == 64);
const _: () = assert!(core::mem::size_of::<LongKey>() == 260);
const _: () =
    assert!(core::mem::offset_of!(LongKey, name) == core::mem::offset_of!(ShortKey, name));
const _: () = assert!(core::mem::size_of::<AnswerValue>() == 136);
const _: () = assert!(core::mem::offset_of!(AnswerValue, generation) == 20);
const _: () = assert!(core::mem::size_of::<CacheShortKey>() == 72);
const _: () = assert!(
    core::mem::offset_of!(CacheShortKey, variant)
        == core::mem::offset_of!(LongKey, name) + SHORT_NAME_LEN
);
const _: () = assert!(core::mem::size_of::<CacheLongKey>() == core::mem::size_of::<LongKey>());
const _: () =
    assert!(core::mem::offset_of!(CacheLongKey, variant) == core::mem::offset_of!(LongKey, _pad));
const _: () = assert!(2 * MAX_TTL_FIELDS <= INLINE_DATA_LEN);
const _: () = assert!(MAX_TTL_FIELDS.is_power_of_two());
const _: () = assert!(core::mem::size_of::<PodKey>() == 20);
const _: () = assert!(core::mem::size_of::<PodNamespace>() == 64);
const _: () = assert!(core::mem::offset_of!(AnswerValue, expires_ns) == 24);
const _: () = assert!(core::mem::offset_of!(AnswerValue, pass_from_ns) == 32);
const _: () = assert!(core::mem::offset_of!(AnswerValue, data) == 40);
const _: () = assert!(core::mem::size_of::<BlobL>() == BLOB_DATA_LEN);
const _: () = assert!(
    core::mem::offset_of!(ZoneConfig, intercept_v4)
        == 12 + MAX_LISTEN * 20 + LONG_NAME_LEN + SOA_RECORD_LEN + 2
);
const _: () = assert!(core::mem::offset_of!(ZoneConfig, stale_after_ns) % 8 == 0);
const _: () = assert!(
    core::mem::size_of::<ZoneConfig>()
        == core::mem::offset_of!(ZoneConfig, intercept_v4) + MAX_INTERCEPT * 20 + 4 + 16
);
const _: () = assert!(core::mem::size_of::<Liveness>() == 8);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 20);
const _: () = assert!(core::mem::size_of::<FlowValue>() == 32);
const _: () = assert!(BLOB_DATA_LEN + 12 + 5 + OPT_RECORD_LEN >= MAX_UDP_REPLY);
const _: () = assert!(INLINE_DATA_LEN < BLOB_DATA_LEN);
const _: () = assert!(core::mem::size_of::<TraceControl>() == 16);
const _: () = assert!(core::mem::offset_of!(TraceEvent, qtype) == 12);
const _: () = assert!(core::mem::offset_of!(TraceEvent, family) == 16);
const _: () = assert!(core::mem::offset_of!(TraceEvent, client_port) == 20);
const _: () = assert!(core::mem::offset_of!(TraceEvent, client) == 24);
const _: () = assert!(core::mem::offset_of!(TraceEvent, server) == 40);
// The program copies the key in 8-byte words: it must start on one.
const _: () = assert!(core::mem::offset_of!(TraceEvent, key) == 56);
const _: () = assert!(core::mem::size_of::<TraceEvent>() == 56 + 264);
const _: () = assert!(TRACE_RING_BYTES.is_power_of_two());

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are `#[repr(C)]`, made of integers and byte arrays, with explicit
    // padding fields, so every bit pattern is valid and there are no implicit padding bytes.
    unsafe impl aya::Pod for ShortKey {}
    unsafe impl aya::Pod for LongKey {}
    unsafe impl aya::Pod for CacheShortKey {}
    unsafe impl aya::Pod for CacheLongKey {}
    unsafe impl aya::Pod for PodKey {}
    unsafe impl aya::Pod for PodNamespace {}
    unsafe impl aya::Pod for AnswerValue {}
    unsafe impl<const N: usize> aya::Pod for Blob<N> {}
    unsafe impl aya::Pod for ZoneConfig {}
    unsafe impl aya::Pod for Liveness {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for TraceControl {}
    unsafe impl aya::Pod for TraceEvent {}
}

impl ShortKey {
    pub const fn zeroed() -> Self {
        Self {
            qtype: 0,
            name: [0; SHORT_NAME_LEN],
        }
    }
}

impl LongKey {
    pub const fn zeroed() -> Self {
        Self {
            qtype: 0,
            name: [0; LONG_NAME_LEN],
            _pad: [0; 2],
        }
    }
}

impl CacheShortKey {
    pub const fn zeroed() -> Self {
        Self {
            qtype: 0,
            name: [0; SHORT_NAME_LEN],
            variant: 0,
            _pad: [0; 7],
        }
    }
}

impl CacheLongKey {
    pub const fn zeroed() -> Self {
        Self {
            qtype: 0,
            name: [0; LONG_NAME_LEN],
            variant: 0,
            _pad: 0,
        }
    }
}

impl AnswerValue {
    pub const fn zeroed() -> Self {
        Self {
            action: 0,
            ttl_count: 0,
            flags: 0,
            ancount: 0,
            nscount: 0,
            arcount: 0,
            data_len: 0,
            data_csum: 0,
            ttl_odd: 0,
            blob: 0,
            generation: 0,
            expires_ns: 0,
            pass_from_ns: 0,
            data: [0; INLINE_DATA_LEN],
        }
    }
}

impl ZoneConfig {
    pub const fn zeroed() -> Self {
        Self {
            flags: 0,
            zone_len: 0,
            soa_csum: 0,
            nxdomain_flags: 0,
            nodata_flags: 0,
            listen_v4: [[0; 4]; MAX_LISTEN],
            listen_v6: [[0; 16]; MAX_LISTEN],
            zone: [0; LONG_NAME_LEN],
            soa: [0; SOA_RECORD_LEN],
            _pad: [0; 2],
            intercept_v4: [[0; 4]; MAX_INTERCEPT],
            intercept_v6: [[0; 16]; MAX_INTERCEPT],
            _pad2: [0; 4],
            stale_after_ns: 0,
            grace_ns: 0,
        }
    }
}

/// Internet checksum arithmetic shared by both sides (RFC 1071).
pub mod csum {
    /// Adds `bytes` to a running partial sum, the first byte taken as the high byte of a
    /// 16-bit word (even offset).
    #[inline]
    pub fn add_bytes(mut sum: u64, bytes: &[u8]) -> u64 {
        let mut chunks = bytes.chunks_exact(2);
        for c in &mut chunks {
            sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u64::from(*last) << 8;
        }
        sum
    }

    /// Folds a running sum to 16 bits (not inverted).
    #[inline]
    pub const fn fold(mut sum: u64) -> u16 {
        sum = (sum & 0xffff_ffff) + (sum >> 32);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        sum as u16
    }
}
