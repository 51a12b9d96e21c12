//! The maps the agent fills and the program reads (layouts in `dns-common`), and the program's
//! per-CPU working memory.
//!
//! Sizes here are defaults; the agent sets the real capacities at load time. Answer maps
//! allocate on insert (BPF_F_NO_PREALLOC): memory follows the zone, not the capacity, and an
//! update swaps the element atomically for concurrent readers.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use dns_common::{
    AnswerValue, BlobL, BlobM, BlobS, CacheLongKey, CacheShortKey, DEFAULT_ANSWERS_LONG_MAX,
    DEFAULT_ANSWERS_SHORT_MAX, DEFAULT_BLOBS_L_MAX, DEFAULT_BLOBS_M_MAX, DEFAULT_BLOBS_S_MAX,
    DEFAULT_FLOWS_MAX, DEFAULT_PODS_MAX, FlowKey, FlowValue, Liveness, LongKey, PodKey,
    PodNamespace, ShortKey, ZoneConfig, counter,
};

#[map(name = "XDNS_ANS_SHORT")]
pub static ANSWERS_SHORT: HashMap<ShortKey, AnswerValue> =
    HashMap::with_max_entries(DEFAULT_ANSWERS_SHORT_MAX, BPF_F_NO_PREALLOC);

#[map(name = "XDNS_ANS_LONG")]
pub static ANSWERS_LONG: HashMap<LongKey, AnswerValue> =
    HashMap::with_max_entries(DEFAULT_ANSWERS_LONG_MAX, BPF_F_NO_PREALLOC);

// The cache of upstream answers; the agent sizes them from --cache-size.
#[map(name = "XDNS_CACHE_S")]
pub static CACHE_SHORT: HashMap<CacheShortKey, AnswerValue> =
    HashMap::with_max_entries(1024, BPF_F_NO_PREALLOC);

#[map(name = "XDNS_CACHE_L")]
pub static CACHE_LONG: HashMap<CacheLongKey, AnswerValue> =
    HashMap::with_max_entries(1024, BPF_F_NO_PREALLOC);

#[map(name = "XDNS_PODS")]
pub static PODS: HashMap<PodKey, PodNamespace> =
    HashMap::with_max_entries(DEFAULT_PODS_MAX, BPF_F_NO_PREALLOC);

#[map(name = "XDNS_BLOBS_S")]
pub static BLOBS_S: HashMap<u32, BlobS> =
    HashMap::with_max_entries(DEFAULT_BLOBS_S_MAX, BPF_F_NO_PREALLOC);

#[map(name = "XDNS_BLOBS_M")]
pub static BLOBS_M: HashMap<u32, BlobM> =
    HashMap::with_max_entries(DEFAULT_BLOBS_M_MAX, BPF_F_NO_PREALLOC);

#[map(name = "XDNS_BLOBS_L")]
pub static BLOBS_L: HashMap<u32, BlobL> =
    HashMap::with_max_entries(DEFAULT_BLOBS_L_MAX, BPF_F_NO_PREALLOC);

#[map(name = "XDNS_CONFIG")]
pub static CONFIG: Array<ZoneConfig> = Array::with_max_entries(1, 0);

#[map(name = "XDNS_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[map(name = "XDNS_LIVENESS")]
pub static LIVENESS: Array<Liveness> = Array::with_max_entries(1, BPF_F_MMAPABLE);

#[map(name = "XDNS_FLOWS")]
pub static FLOWS: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_FLOWS_MAX, 0);

/// Per-CPU working memory: too big for the 512-byte BPF stack.
#[repr(C, align(8))]
pub struct Scratch {
    /// The question as loaded from the packet: name, type, class.
    pub raw: [u8; RAW_LEN],
    /// The lookup key being built (lowercased name). 8-aligned, so it is zeroed in words.
    pub key: LongKey,
    pub _pad: [u8; 4],
    /// Bit `i` set: a label starts at name offset `i`.
    pub label_starts: [u64; 4],
    /// The name's length, passed through memory on purpose (see `question::parse_name`).
    pub name_len: u64,
    /// The key's bytes past the short-key prefix were written: zero them before the next
    /// packet (they are zero at the start of every run, so short names zero only the prefix).
    pub tail_dirty: u64,
    /// The question bytes loaded, passed through memory like `name_len`.
    pub load: u64,
    /// A steered query's flow and socket lookup (`steer.rs`): too big for the stack beside
    /// the rest.
    pub flow_key: FlowKey,
    pub flow_value: FlowValue,
    pub tuple: aya_ebpf::bindings::bpf_sock_tuple,
    /// The answer entry the lookup found, copied (`lookup::snapshot`): a map element is not a
    /// snapshot, and every later stage reads this copy.
    pub value: AnswerValue,
    /// The asking pod's namespace, copied from `XDNS_PODS` (`autopath.rs`): its length, then the
    /// label. 8-aligned, copied in words.
    pub pod_ns: [u8; 64],
    /// TTL fields of `value` to count down after the reply is written (`ttl.rs`), 0: none;
    /// the seconds to write there; and where the sections start in the frame.
    pub ttl_fields: u64,
    pub ttl: u64,
    pub ttl_at: u64,
    /// The asking pod's address, as `XDNS_PODS`' key.
    pub pod_key: PodKey,
}
// Power-of-two sizes let `& (LEN - 1)` prove every index in bounds (no panic paths).
pub const RAW_LEN: usize = 512;
pub const KEY_WORDS: usize = (core::mem::size_of::<LongKey>() + 4) / 8;
pub const SHORT_KEY_WORDS: usize = core::mem::size_of::<ShortKey>() / 8;
const _: () = assert!(core::mem::offset_of!(Scratch, key) % 8 == 0);
const _: () = assert!(core::mem::offset_of!(Scratch, label_starts) == RAW_LEN + KEY_WORDS * 8);
const _: () = assert!(core::mem::offset_of!(Scratch, value) % 8 == 0);
const _: () = assert!(core::mem::offset_of!(Scratch, pod_ns) % 8 == 0);
const _: () = assert!(core::mem::size_of::<PodNamespace>() == 64);
pub const VALUE_WORDS: usize = core::mem::size_of::<AnswerValue>() / 8;

#[map(name = "XDNS_SCRATCH")]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

impl Scratch {
    /// Zeroes the key's bytes past the short prefix if a long name wrote them, so the next
    /// packet starts with a clean key. Volatile word stores: a plain loop becomes `memset`.
    #[inline(always)]
    pub fn clean_tail(&mut self) {
        if self.tail_dirty == 0 {
            return;
        }
        let words = (&mut self.key as *mut LongKey).cast::<u64>();
        let mut w = SHORT_KEY_WORDS;
        while w < KEY_WORDS {
            // SAFETY: `key` and the padding after it are KEY_WORDS 8-aligned words.
            unsafe { words.add(w).write_volatile(0) };
            w += 1;
        }
        self.tail_dirty = 0;
    }
}

impl Scratch {
    /// The question name's length, read back from memory: every comparison on a length narrows
    /// it, and a stage that starts from a narrowed length is verified once per range the stages
    /// before it carved out. Read afresh, it is one unknown below 256 again.
    #[inline(always)]
    pub fn name_len(&self) -> usize {
        // SAFETY: plain field of the scratch value.
        let len = unsafe { core::ptr::read_volatile(&self.name_len) } as usize;
        crate::packet::bounded(len, 0xff)
    }
}

/// Counts one packet's outcome.
#[inline(always)]
pub fn count(counter: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(counter) {
        // SAFETY: per-CPU slot, and XDP programs do not nest on one CPU.
        unsafe { *c += 1 };
    }
}
