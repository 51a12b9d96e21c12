//! The answer maps: `(name, qtype)`, then `(name, OTHER)`, then the zone's NXDOMAIN rule
//! (`dns-common` describes the contract). Decides what the reply carries, or passes the query
//! up.

use aya_ebpf::helpers::generated::bpf_ktime_get_ns;
use dns_common::{
    ACTION_ANSWER, ACTION_NODATA, AnswerValue, CONFIG_NXDOMAIN, LONG_NAME_LEN, LongKey,
    QTYPE_OTHER, SHORT_NAME_LEN, SOA_RECORD_LEN, ShortKey, ZoneConfig, counter,
};

use crate::{
    Outcome,
    maps::{ANSWERS_LONG, ANSWERS_SHORT, Scratch},
    packet::{at, bounded},
    pass,
    question::Query,
};

/// What the reply carries after the question.
pub enum Sections {
    /// Section bytes from an entry (inline or blob).
    Data(*const AnswerValue),
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

#[inline(always)]
pub fn answer(scratch: &mut Scratch, config: &ZoneConfig, q: &Query) -> Result<Answer, Outcome> {
    let name_len = q.name_len;
    scratch.key.qtype = q.qtype;
    let mut value = lookup(scratch, name_len);
    if value.is_none() {
        scratch.key.qtype = QTYPE_OTHER;
        value = lookup(scratch, name_len);
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
    let Some(v) = value else {
        // Every existing name of the zone is in the maps: a name below the zone that is not
        // does not exist. Pod names are synthesised per query by userspace.
        if config.flags & CONFIG_NXDOMAIN == 0
            || zone_suffix(scratch, config, name_len) != Some(false)
        {
            return Err(pass(counter::PASS_MISS));
        }
        return Ok(soa(config.nxdomain_flags, counter::ANSWERED_NXDOMAIN));
    };
    // SAFETY: map values stay valid for the duration of the program run.
    let v = unsafe { &*v };
    // SAFETY: a helper without arguments.
    if v.expires_ns != 0 && unsafe { bpf_ktime_get_ns() } > v.expires_ns {
        return Err(pass(counter::PASS_EXPIRED));
    }
    match v.action {
        ACTION_ANSWER => Ok(Answer {
            sections: Sections::Data(v),
            flags: v.flags,
            an: v.ancount,
            ns: v.nscount,
            ar: v.arcount,
            data_len: v.data_len as usize,
            counter: counter::ANSWERED,
        }),
        ACTION_NODATA => {
            if zone_suffix(scratch, config, name_len).is_none() {
                return Err(pass(counter::PASS_USERSPACE));
            }
            Ok(soa(config.nodata_flags, counter::ANSWERED_NODATA))
        }
        // ACTION_PASS, and anything this program does not know.
        _ => Err(pass(counter::PASS_USERSPACE)),
    }
}

#[inline(always)]
// Passing the 260-byte key by value would copy it onto the 512-byte BPF stack.
#[allow(clippy::needless_borrows_for_generic_args)]
fn lookup(scratch: &Scratch, name_len: usize) -> Option<*const AnswerValue> {
    if name_len <= SHORT_NAME_LEN {
        // SAFETY: LongKey starts with a ShortKey's layout (asserted in dns-common), and the
        // bytes past a short name are zero.
        let key = unsafe { &*(&scratch.key as *const LongKey as *const ShortKey) };
        ANSWERS_SHORT.get_ptr(key)
    } else {
        ANSWERS_LONG.get_ptr(&scratch.key)
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
