//! The answer maps: `(name, qtype)`, then `(name, OTHER)`, then the zone's NXDOMAIN rule — or,
//! for a pod asking under its own namespace's search element, the completed search path
//! (`autopath.rs`) — and for names outside the zone the cache of upstream answers
//! (`dns-common` describes the contract). Decides what the reply carries, or passes the query
//! up.
//!
//! An entry is read through a pointer into a hash map element, and since Linux 6.1 the memory of
//! a replaced element goes to the next insert at once: the entry is copied into scratch memory,
//! looked up again, and used only if the same element still holds the same write
//! (`AnswerValue::generation`). Every later stage reads the copy.

use aya_ebpf::{helpers::generated::bpf_ktime_get_ns, programs::XdpContext};
use dns_common::{
    ACTION_ANSWER, ACTION_NODATA, AnswerValue, CACHE_AUTOPATH, CACHE_CD, CACHE_DO, CONFIG_AUTOPATH,
    CONFIG_NXDOMAIN, CacheLongKey, CacheShortKey, FLAG_CD, LONG_NAME_LEN, LongKey, QTYPE_OTHER,
    SHORT_NAME_LEN, SOA_RECORD_LEN, ShortKey, ZoneConfig, counter,
};

use crate::{
    Outcome, autopath,
    maps::{ANSWERS_LONG, ANSWERS_SHORT, CACHE_LONG, CACHE_SHORT, Scratch, VALUE_WORDS},
    packet::{at, bounded},
    pass,
    question::Query,
};

/// What the reply carries after the question.
pub enum Sections {
    /// Section bytes of the entry copied into `Scratch::value` (inline, or the blob it names).
    Data,
    /// Only the zone SOA (NODATA or NXDOMAIN).
    Soa,
}

/// The reply's content: its sections, header bits and record counts, and the counter that
/// records it once sent.
pub struct Answer {
    pub sections: Sections,
    /// Header bits besides QR, RD and CD (AA, RA, RCODE).
    pub flags: u16,
    pub an: u16,
    pub ns: u16,
    pub ar: u16,
    /// Length of the section bytes.
    pub data_len: usize,
    pub counter: u32,
}

/// Which maps an entry comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Table {
    /// The cluster zone: `(name, qtype)`.
    Zone,
    /// The cache of upstream answers: `(name, qtype, DO, CD)`.
    Cache,
}

#[inline(always)]
pub fn answer(
    ctx: &XdpContext,
    scratch: &mut Scratch,
    config: &ZoneConfig,
    q: &Query,
) -> Result<Answer, Outcome> {
    let name_len = q.name_len;
    scratch.ttl_fields = 0;
    scratch.key.qtype = q.qtype;
    let mut table = Table::Zone;
    let mut answered = counter::ANSWERED;
    let mut found = entry(scratch, name_len, table);
    if found.is_none() {
        scratch.key.qtype = QTYPE_OTHER;
        found = entry(scratch, name_len, table);
    }
    let soa = |flags, counter| Answer {
        sections: Sections::Soa,
        flags,
        an: 0,
        ns: 1,
        ar: 0,
        data_len: SOA_RECORD_LEN,
        counter,
    };
    if found.is_none() {
        match zone_suffix(scratch, config, name_len) {
            // Every existing name of the zone is in the maps: a name below the zone that is
            // not does not exist. Pod names are synthesised per query by userspace.
            Some(false) if config.flags & CONFIG_NXDOMAIN != 0 => {
                if config.flags & CONFIG_AUTOPATH == 0
                    || !autopath::asked_under_own_namespace(ctx, scratch, config, name_len)
                {
                    return Ok(soa(config.nxdomain_flags, counter::ANSWERED_NXDOMAIN));
                }
                // A search-path expansion: never NXDOMAIN; what the search path completes it
                // to, if the agent has completed it before.
                scratch.key.qtype = q.qtype;
                table = Table::Cache;
                answered = counter::ANSWERED_AUTOPATH;
                set_variant(scratch, name_len, variant(q) | CACHE_AUTOPATH);
                found = entry(scratch, name_len, table);
                if found.is_none() {
                    set_variant(scratch, name_len, 0);
                    return Err(pass(counter::PASS_AUTOPATH));
                }
            }
            Some(_) => return Err(pass(counter::PASS_MISS)),
            // Not the cluster's: the agent forwards it, and its cache may be here too.
            None => {
                scratch.key.qtype = q.qtype;
                table = Table::Cache;
                answered = counter::ANSWERED_CACHED;
                set_variant(scratch, name_len, variant(q));
                found = entry(scratch, name_len, table);
            }
        }
    }
    let Some(p) = found else {
        set_variant(scratch, name_len, 0);
        return Err(pass(counter::PASS_MISS));
    };
    let whole = snapshot(scratch, name_len, table, p, q.qtype);
    set_variant(scratch, name_len, 0);
    if !whole {
        return Err(pass(counter::PASS_RACE));
    }
    let v = &scratch.value;
    // The clock only for entries that expire (a clock read is not free in a VM).
    let now = if v.expires_ns != 0 {
        // SAFETY: a helper without arguments.
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    // The agent's cache serves an entry while now < expiry: so does this, but for the last
    // seconds, which the agent answers itself to refresh popular names (prefetch).
    if v.expires_ns != 0 && now >= v.pass_from_ns {
        return Err(pass(counter::PASS_EXPIRED));
    }
    let data = Answer {
        sections: Sections::Data,
        flags: v.flags,
        an: v.ancount,
        ns: v.nscount,
        ar: v.arcount,
        data_len: v.data_len as usize,
        counter: answered,
    };
    match v.action {
        ACTION_ANSWER if v.ttl_count == 0 => Ok(data),
        ACTION_ANSWER => {
            // A cached upstream answer: every TTL is the seconds left, as the agent's cache
            // serves it. Written after the reply (`ttl.rs`); counted in its checksum here.
            if v.expires_ns == 0 {
                return Err(pass(counter::PASS_USERSPACE));
            }
            scratch.ttl = (v.expires_ns - now) / 1_000_000_000;
            scratch.ttl_fields = v.ttl_count as u64;
            Ok(data)
        }
        ACTION_NODATA if table == Table::Zone => {
            if zone_suffix(scratch, config, name_len).is_none() {
                return Err(pass(counter::PASS_USERSPACE));
            }
            Ok(soa(config.nodata_flags, counter::ANSWERED_NODATA))
        }
        // ACTION_PASS, and anything this program does not know.
        _ => Err(pass(counter::PASS_USERSPACE)),
    }
}

/// The rest of the agent's cache key: the query's DO and CD bits.
#[inline(always)]
fn variant(q: &Query) -> u8 {
    let mut v = 0;
    if q.do_bit != 0 {
        v |= CACHE_DO;
    }
    if q.flags & FLAG_CD != 0 {
        v |= CACHE_CD;
    }
    v
}

/// Writes the cache key's variant byte where the key buffer has it for this name's length (see
/// `CacheShortKey`); 0 restores the zone key (and the zeroed tail the next packet expects).
#[inline(always)]
fn set_variant(scratch: &mut Scratch, name_len: usize, variant: u8) {
    if name_len <= SHORT_NAME_LEN {
        scratch.key.name[SHORT_NAME_LEN] = variant;
    } else {
        scratch.key._pad[0] = variant;
    }
}

#[inline(always)]
// Passing the 260-byte key by value would copy it onto the 512-byte BPF stack.
#[allow(clippy::needless_borrows_for_generic_args)]
fn entry(scratch: &Scratch, name_len: usize, table: Table) -> Option<*const AnswerValue> {
    let key = &scratch.key as *const LongKey;
    // SAFETY: the key buffer has the layout of every key type's prefix (asserted in
    // dns-common), and its bytes past a short name are zero but for the variant.
    unsafe {
        match (table, name_len <= SHORT_NAME_LEN) {
            (Table::Zone, true) => ANSWERS_SHORT.get_ptr(&*(key as *const ShortKey)),
            (Table::Zone, false) => ANSWERS_LONG.get_ptr(&*key),
            (Table::Cache, true) => CACHE_SHORT.get_ptr(&*(key as *const CacheShortKey)),
            (Table::Cache, false) => CACHE_LONG.get_ptr(&*(key as *const CacheLongKey)),
        }
    }
}

/// Copies the entry at `p` into `Scratch::value`; true if the copy is one whole write of the
/// entry for this key. The element may be replaced (and its memory handed to another key's
/// insert) at any moment: after the copy the key is looked up again, and the copy counts only if
/// the same element still holds the same write. An element given to another key and back holds
/// another write (generations are unique), so no mix of writes passes.
///
/// A catch-all (`QTYPE_OTHER`) answers only while the name has no entry of the asked type: that
/// entry is looked up again between the copy and the check, while the catch-all is shown to
/// have been there throughout. The agent writes a name's typed entries before its catch-all and
/// removes them after it, so a typed entry missing then is missing from the name.
#[inline(always)]
fn snapshot(
    scratch: &mut Scratch,
    name_len: usize,
    table: Table,
    p: *const AnswerValue,
    qtype: u16,
) -> bool {
    // SAFETY: `p` came from a map lookup in this program run (RCU keeps the memory mapped);
    // what it holds is checked below before anything uses it. Volatile word copies: a struct
    // copy becomes `memcpy`, and the reads must not move past the second lookup.
    unsafe {
        let generation = core::ptr::read_volatile(&(*p).generation);
        let from = p.cast::<u64>();
        let to = (&raw mut scratch.value).cast::<u64>();
        let mut w = 0;
        while w < VALUE_WORDS {
            to.add(w).write_volatile(from.add(w).read_volatile());
            w += 1;
        }
        if table == Table::Zone && scratch.key.qtype == QTYPE_OTHER {
            scratch.key.qtype = qtype;
            let typed = entry(scratch, name_len, table).is_some();
            scratch.key.qtype = QTYPE_OTHER;
            if typed {
                return false;
            }
        }
        match entry(scratch, name_len, table) {
            Some(again) => {
                again == p
                    && core::ptr::read_volatile(&(*again).generation) == generation
                    && scratch.value.generation == generation
            }
            None => false,
        }
    }
}

#[inline(always)]
fn label_starts_at(scratch: &Scratch, off: usize) -> bool {
    let word = at(&scratch.label_starts, off >> 6);
    word & (1u64 << (off & 63)) != 0
}

/// `None`: the name is not the cluster zone or below it. `Some(under_pod)`: it is, and
/// `under_pod` says whether it is below `pod.<zone>`.
#[inline(always)]
fn zone_suffix(scratch: &Scratch, config: &ZoneConfig, name_len: usize) -> Option<bool> {
    let zone_len = config.zone_len as usize;
    if zone_len == 0 || zone_len > name_len || zone_len > LONG_NAME_LEN {
        return None;
    }
    // Bounded so that the compiler keeps it a non-negative index (the verifier rejects a
    // pointer moved backwards by a variable amount).
    let start = bounded(name_len - zone_len, LONG_NAME_LEN - 1);
    if !label_starts_at(scratch, start) {
        return None;
    }
    let mut j = 0;
    while j < LONG_NAME_LEN {
        if j >= zone_len {
            break;
        }
        // start + j < name_len <= 255: the mask never changes the index, it only keeps the
        // verifier's bounds on the value actually used for the access.
        if at(&scratch.key.name, start + j) != at(&config.zone, j) {
            return None;
        }
        j += 1;
    }
    // The label right before the zone is `pod` and something comes before it.
    let name_at = |i: usize| at(&scratch.key.name, i);
    let under_pod = start > 4
        && label_starts_at(scratch, start - 4)
        && name_at(start - 4) == 3
        && name_at(start - 3) == b'p'
        && name_at(start - 2) == b'o'
        && name_at(start - 1) == b'd';
    Some(under_pod)
}
