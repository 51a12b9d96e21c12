//! The cache of upstream answers.
//!
//! Keyed on [`Question`]: lowercased name, type, class, DO, CD and upstream set. An entry keeps the upstream's
//! sections as the upstream sent them (its OPT record removed), with the offsets of their TTL
//! fields: serving a hit is a copy after the client's question and a TTL patch, no re-encoding.
//! This works because compression pointers in the sections point either into the question,
//! which the client's reply has at the same offset with the same length (only the case of the
//! name may differ), or into the sections themselves, which keep their offsets.
//!
//! TTLs (CoreDNS `cache` semantics, RFC 2308 for negative answers):
//! - positive answers live for the smallest TTL of their records; negative answers (NXDOMAIN,
//!   NODATA) for min(SOA TTL, SOA MINIMUM) of the SOA in the authority section, and are not
//!   cached without one (RFC 2308 §5); both clamped to `[min_ttl, max_ttl]` (negative:
//!   `[min_ttl, negative_max_ttl]`);
//! - every record is served with the entry's remaining lifetime, counted down;
//! - a failed question (no upstream answering, or every one answering SERVFAIL or REFUSED) is
//!   remembered for `servfail_ttl` (RFC 9520) and answered with that RCODE meanwhile; other
//!   error answers (FORMERR, NOTIMP, ...) pass through uncached; truncated answers are never
//!   cached.
//!
//! Serve-stale (RFC 8767): an expired entry is kept for `serve_stale` more; if refreshing it
//! fails, it is served with TTL [`STALE_TTL`], and for [`STALE_RECHECK`] it is served so without
//! asking upstream again.
//!
//! Prefetch (CoreDNS `prefetch AMOUNT 1m 10%`): a hit on an entry that has had `prefetch` hits
//! with no gap of [`PREFETCH_GAP`] between them, and has at most ceil(10 % of its TTL) seconds
//! left, asks the caller to refresh it in the background.
//!
//! Capacity: at most `capacity` entries (answers and remembered failures); the least recently
//! used goes first.
//!
//! The kernel's copy (`kernel::cache_sync`): with [`Cache::follow`], every key whose entry
//! changed (stored, replaced, evicted, swept) is noted, and the kernel's writer takes the notes
//! with [`Cache::take_changes`] and makes the kernel hold what the cache holds. The queries the
//! kernel answers never reach the cache: they count neither as hits nor as uses. With prefetch
//! on, the kernel leaves the last ceil(10 %) of each TTL to the agent ([`Held::kernel_until`]),
//! so a name's popularity is the queries of that window: one asked `prefetch` times there is
//! refreshed before it expires, and the kernel answers it again. The recency order sees only
//! the agent's hits: an entry the kernel answers often can be evicted before one the agent
//! answered last, and is then fetched again when next asked.

use std::{
    borrow::Borrow,
    collections::{HashMap, HashSet},
    hash::{Hash, Hasher},
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::RData,
};

use super::forward::{Question, QuestionKey};
use crate::{dns, metrics::CacheCounters};

/// TTL of stale answers (RFC 8767 §4 suggests 30 s).
pub const STALE_TTL: u32 = 30;
/// After a failed refresh, how long stale data is served without trying upstream again
/// (RFC 8767 §4: the failure recheck timer, 30 s suggested).
pub const STALE_RECHECK: Duration = Duration::from_secs(30);
/// Hits further apart than this start the popularity count again (CoreDNS's prefetch duration).
pub const PREFETCH_GAP: Duration = Duration::from_secs(60);
/// Prefetch when at most this share of the TTL is left (CoreDNS's default 10 %).
pub const PREFETCH_PERCENT: u32 = 10;

/// The cache options of `dns-agent run`.
#[derive(Clone, Debug)]
pub struct CacheSettings {
    /// Entries; 0 turns the cache off.
    pub capacity: usize,
    pub min_ttl: u32,
    pub max_ttl: u32,
    pub negative_max_ttl: u32,
    /// How long a failure is remembered; 0: not at all.
    pub servfail_ttl: u32,
    /// Hits that make an entry popular enough to prefetch; 0: no prefetch.
    pub prefetch: u32,
    /// How long after expiry an entry may still be served when upstreams fail; zero: never.
    pub serve_stale: Duration,
}

/// Positive or negative, for the CoreDNS `type` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Success = 0,
    Denial = 1,
}

/// Why an upstream reply cannot be kept as an [`Answer`].
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error("the reply is malformed at byte {0}")]
    Malformed(usize),
    #[error("re-encoding the reply: {0}")]
    Encode(#[from] hickory_proto::ProtoError),
    #[error("the sections are longer than 65535 bytes")]
    TooLong,
}

/// An upstream answer, ready to be spliced after a client's question.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    /// RCODE (the header's four bits).
    pub rcode: u16,
    pub authentic_data: bool,
    /// Replies say AA: a completed search path that ends in the zone (never an upstream's
    /// answer, which the cache serves as not authoritative).
    pub authoritative: bool,
    pub ancount: u16,
    pub nscount: u16,
    pub arcount: u16,
    /// The bytes after the question, OPT removed; pointers assume the question at offset 12.
    pub sections: Vec<u8>,
    /// Offsets into `sections` of every record's TTL field.
    pub ttl_offsets: Vec<u16>,
}

/// A walk over the records of a message: per record, its start, TTL offset, type and end.
fn walk_records(
    msg: &[u8],
    mut off: usize,
    count: usize,
) -> Option<Vec<(usize, usize, u16, usize)>> {
    // Every record takes at least 11 bytes: a bound on what the header's counts may claim.
    let mut out = Vec::with_capacity(count.min(msg.len() / 11));
    for _ in 0..count {
        let start = off;
        off = crate::dns::skip_name(msg, off)?;
        let rtype = u16::from_be_bytes([*msg.get(off)?, *msg.get(off + 1)?]);
        let rdlen = u16::from_be_bytes([*msg.get(off + 8)?, *msg.get(off + 9)?]) as usize;
        let end = off + 10 + rdlen;
        if end > msg.len() {
            return None;
        }
        out.push((start, off + 4, rtype, end));
        off = end;
    }
    Some(out)
}

/// The offset after an uncompressed question name.
fn question_name_end(msg: &[u8], mut off: usize) -> Option<usize> {
    for _ in 0..128 {
        let len = *msg.get(off)? as usize;
        if len == 0 {
            return Some(off + 1);
        }
        if len > dns_common::MAX_LABEL_LEN {
            return None;
        }
        off += 1 + len;
    }
    None
}

impl Answer {
    /// Keeps the sections of an accepted upstream reply (`bytes`, parsed as `message`).
    ///
    /// When the reply's OPT (or a TSIG) is its last record, which is where every server puts
    /// it, the bytes are kept as received; otherwise, and when the question is not laid out
    /// plainly, the parse is re-encoded without them.
    pub fn from_upstream(bytes: &[u8], message: &Message) -> Result<Self, AnswerError> {
        match Self::from_wire(bytes, true) {
            Some(a) => Ok(a),
            None => {
                let mut m = Message::new(0, MessageType::Response, OpCode::Query);
                m.metadata = message.metadata;
                m.add_queries(message.queries.clone());
                m.insert_answers(message.answers.clone());
                m.insert_authorities(message.authorities.clone());
                m.insert_additionals(message.additionals.clone());
                let bytes = m.to_vec()?;
                // hickory-proto points only at names it wrote: no pointer check needed.
                Self::from_wire(&bytes, false).ok_or(AnswerError::Malformed(0))
            }
        }
    }

    /// The sections of a reply laid out plainly. With `check_pointers`, `None` as well when a
    /// compression pointer could aim at bytes a client's reply does not share with this one.
    fn from_wire(msg: &[u8], check_pointers: bool) -> Option<Self> {
        if msg.len() < 12 || u16::from_be_bytes([msg[4], msg[5]]) != 1 {
            return None;
        }
        let count = |i: usize| u16::from_be_bytes([msg[i], msg[i + 1]]);
        let (ancount, nscount, mut arcount) = (count(6), count(8), count(10));
        let q_end = question_name_end(msg, 12)? + 4;
        if q_end > msg.len() {
            return None;
        }
        let answer_and_authority = ancount as usize + nscount as usize;
        let records = walk_records(msg, q_end, answer_and_authority + arcount as usize)?;
        let mut end = records.last().map_or(q_end, |r| r.3);
        if end != msg.len() {
            return None;
        }
        // OPT and TSIG belong to the upstream's message, not to the data: drop them while they
        // end the additional section (a TSIG is always last, an OPT usually is).
        let mut kept = records.len();
        while kept > answer_and_authority
            && matches!(records[kept - 1].2, dns::TYPE_OPT | TYPE_TSIG)
        {
            kept -= 1;
            arcount -= 1;
            end = records[kept].0;
        }
        // An OPT or TSIG anywhere else: not laid out as expected.
        if records[..kept]
            .iter()
            .any(|r| matches!(r.2, dns::TYPE_OPT | TYPE_TSIG))
        {
            return None;
        }
        if end - q_end > u16::MAX as usize {
            return None;
        }
        if check_pointers && !pointers_stay(msg, q_end, end, &records[..kept]) {
            return None;
        }
        let flags = u16::from_be_bytes([msg[2], msg[3]]);
        Some(Self {
            rcode: flags & 0xf,
            authentic_data: flags & dns_common::FLAG_AD != 0,
            authoritative: false,
            ancount,
            nscount,
            arcount,
            sections: msg[q_end..end].to_vec(),
            ttl_offsets: records[..kept]
                .iter()
                .map(|r| (r.1 - q_end) as u16)
                .collect(),
        })
    }

    /// The header bits every reply made from this answer carries besides QR, TC, RD and CD:
    /// recursion available, AD as the upstream gave it, the RCODE.
    pub fn reply_flags(&self) -> u16 {
        let ad = if self.authentic_data {
            dns_common::FLAG_AD
        } else {
            0
        };
        let aa = if self.authoritative {
            dns_common::FLAG_AA
        } else {
            0
        };
        dns_common::FLAG_RA | aa | ad | self.rcode
    }

    /// Writes `ttl` into every record of a reply whose sections start at `base`.
    pub fn patch_ttls(&self, reply: &mut [u8], base: usize, ttl: u32) {
        let ttl = ttl.to_be_bytes();
        for &off in &self.ttl_offsets {
            let at = base + off as usize;
            if let Some(field) = reply.get_mut(at..at + 4) {
                field.copy_from_slice(&ttl);
            }
        }
    }

    /// The answer as a message for `q` (for callers that edit records, e.g. to put an alias in
    /// front), with every TTL set to `ttl` when given.
    pub fn to_message(&self, q: &Question, ttl: Option<u32>) -> Option<Message> {
        let mut wire = Vec::with_capacity(12 + q.name.len() + 4 + self.sections.len());
        wire.extend_from_slice(&[0, 0, 0x80, self.rcode as u8]);
        wire.extend_from_slice(&1u16.to_be_bytes());
        wire.extend_from_slice(&self.ancount.to_be_bytes());
        wire.extend_from_slice(&self.nscount.to_be_bytes());
        wire.extend_from_slice(&self.arcount.to_be_bytes());
        wire.extend_from_slice(&q.name);
        wire.extend_from_slice(&q.qtype.to_be_bytes());
        wire.extend_from_slice(&q.qclass.to_be_bytes());
        let base = wire.len();
        wire.extend_from_slice(&self.sections);
        if let Some(ttl) = ttl {
            self.patch_ttls(&mut wire, base, ttl);
        }
        let mut m = Message::from_vec(&wire).ok()?;
        m.metadata.authentic_data = self.authentic_data;
        Some(m)
    }
}

const TYPE_TSIG: u16 = 250;

/// Could every compression pointer in `msg[q_end..end]` aim only at bytes that a client's reply
/// has too? Those are the question (the client's differs in case alone) and the kept sections
/// outside their TTL fields; the header, the TTLs (rewritten when served) and what follows
/// (the upstream's OPT) differ. Found by the `upstream_reply` fuzz target: an owner name
/// pointing into another record's TTL was served as another name. Without parsing every RDATA
/// format the pointers cannot be told from data, so every byte pair that could be one is
/// checked: a false alarm only costs a re-encoding.
fn pointers_stay(
    msg: &[u8],
    q_end: usize,
    end: usize,
    records: &[(usize, usize, u16, usize)],
) -> bool {
    let mut ttl = vec![false; end];
    for r in records {
        ttl[r.1..r.1 + 4].fill(true);
    }
    msg[q_end..end].windows(2).all(|w| {
        if w[0] & 0xc0 != 0xc0 {
            return true;
        }
        // Every byte the name at the target spans, up to its end or its next pointer (which
        // this scan checks on its own).
        let mut at = usize::from(u16::from_be_bytes([w[0], w[1]]) & 0x3fff);
        for _ in 0..128 {
            let Some(&len) = msg.get(at).filter(|_| at >= 12 && at < end) else {
                return false;
            };
            let span = match len {
                0 => return !ttl[at],
                l if l & 0xc0 == 0xc0 => 2,
                l if l & 0xc0 != 0 => return false,
                l => 1 + usize::from(l),
            };
            if at + span > end || ttl[at..at + span].iter().any(|b| *b) {
                return false;
            }
            if span == 2 && len & 0xc0 == 0xc0 {
                return true;
            }
            at += span;
        }
        false
    })
}

/// How long to cache an upstream reply, and as what; `None`: not at all.
pub fn cache_ttl(m: &Message, s: &CacheSettings) -> Option<(u32, Kind)> {
    if m.metadata.truncation {
        return None;
    }
    let rcode = m.metadata.response_code;
    let (ttl, kind) = if rcode == ResponseCode::NoError && !m.answers.is_empty() {
        let ttl = m.all_sections().map(|r| r.ttl).min()?;
        (ttl.min(s.max_ttl).max(s.min_ttl), Kind::Success)
    } else if rcode == ResponseCode::NoError || rcode == ResponseCode::NXDomain {
        // RFC 2308 §5: the SOA's TTL, capped by its MINIMUM; no SOA, no caching.
        let ttl = m.authorities.iter().find_map(|r| match &r.data {
            RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
            _ => None,
        })?;
        (ttl.min(s.negative_max_ttl).max(s.min_ttl), Kind::Denial)
    } else {
        return None;
    };
    (ttl > 0).then_some((ttl, kind))
}

/// What the cache has for a question.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Fresh: serve with `ttl`; `prefetch` asks the caller to refresh it in the background.
    Hit {
        answer: Arc<Answer>,
        ttl: u32,
        kind: Kind,
        prefetch: bool,
    },
    /// A refresh failed lately: serve this stale answer with [`STALE_TTL`], don't ask upstream.
    Stale(Arc<Answer>),
    /// Upstreams failed lately: answer with this RCODE, don't ask upstream.
    Failed(u16),
    /// Ask upstream (an expired entry may still be served stale if that fails).
    Miss,
}

/// What a failed upstream query leaves the client with.
#[derive(Debug, PartialEq, Eq)]
pub enum AfterFailure {
    /// The entry is fresh after all (a failed prefetch): serve it.
    Fresh(Arc<Answer>, u32),
    /// Serve stale data, with [`STALE_TTL`].
    Stale(Arc<Answer>),
    /// Nothing to serve: the error.
    Failed(u16),
}

struct Entry {
    answer: Option<Arc<Answer>>,
    kind: Kind,
    /// The TTL it was stored with (after the caps).
    ttl: u32,
    expires: Instant,
    /// Until when upstream is not asked, and the RCODE to answer meanwhile.
    failed: Option<(Instant, u16)>,
    hits: u32,
    last_hit: Instant,
}

/// No slot: the end of the recency list.
const NIL: usize = usize::MAX;

/// An entry in the slab, linked into the recency list.
struct Slot {
    key: Arc<Question>,
    entry: Entry,
    /// Neighbours in the recency list: `prev` was used more recently, `next` less.
    prev: usize,
    next: usize,
}

/// The entries, by question, and the order of their last use: a list threaded through a slab
/// of slots, so that a hit moves its entry to the front without allocating, and the least
/// recently used is at the back.
struct Inner {
    map: HashMap<Arc<Question>, usize>,
    slots: Vec<Slot>,
    /// Slots free for reuse.
    free: Vec<usize>,
    /// Most and least recently used.
    head: usize,
    tail: usize,
    /// Keys changed since the kernel's writer last looked (`None`: nobody follows).
    changed: Option<HashSet<Arc<Question>>>,
}

/// What the cache holds for a changed key, or nothing the kernel may serve.
pub type Change = (Question, Option<Held>);

/// An answer the cache holds, as the kernel may serve it.
#[derive(Clone, Debug)]
pub struct Held {
    pub answer: Arc<Answer>,
    pub expires: Instant,
    /// Until when the kernel answers it: its expiry, or with prefetch on, the start of the
    /// prefetch window (the last ceil(10 %) of its TTL), which the agent answers itself: there
    /// it counts the name's queries and refreshes a popular one before it expires.
    pub kernel_until: Instant,
}

/// Lets the map be asked with a borrowed question: no copy of the name per lookup.
impl<'a> Borrow<dyn QuestionKey + 'a> for Arc<Question> {
    fn borrow(&self) -> &(dyn QuestionKey + 'a) {
        &**self
    }
}

impl Hash for dyn QuestionKey + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key().hash(state)
    }
}

impl PartialEq for dyn QuestionKey + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for dyn QuestionKey + '_ {}

pub struct Cache {
    settings: CacheSettings,
    inner: Mutex<Inner>,
    counters: Arc<CacheCounters>,
    /// Woken when a key changes, while someone follows.
    changes: Arc<tokio::sync::Notify>,
}

impl Cache {
    pub fn new(settings: CacheSettings, counters: Arc<CacheCounters>) -> Self {
        Self {
            settings,
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                slots: Vec::new(),
                free: Vec::new(),
                head: NIL,
                tail: NIL,
                changed: None,
            }),
            counters,
            changes: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Starts noting changed keys for [`Cache::take_changes`]; the returned handle is woken
    /// when there are some.
    pub fn follow(&self) -> Arc<tokio::sync::Notify> {
        let mut inner = self.inner.lock().expect("cache lock");
        let keys: HashSet<Arc<Question>> = inner.map.keys().cloned().collect();
        inner.changed = Some(keys);
        self.changes.clone()
    }

    /// The keys changed since the last call, each with what the cache holds for it now.
    pub fn take_changes(&self) -> Vec<Change> {
        let mut inner = self.inner.lock().expect("cache lock");
        let Some(changed) = inner.changed.as_mut() else {
            return Vec::new();
        };
        let keys = std::mem::take(changed);
        keys.into_iter()
            .map(|q| {
                let held = inner.map.get(&q).and_then(|&slot| {
                    let e = &inner.slots[slot].entry;
                    let window = if self.settings.prefetch > 0 {
                        Duration::from_secs((e.ttl * PREFETCH_PERCENT).div_ceil(100).into())
                    } else {
                        Duration::ZERO
                    };
                    e.answer.clone().map(|answer| Held {
                        answer,
                        expires: e.expires,
                        kernel_until: e.expires.checked_sub(window).unwrap_or(e.expires),
                    })
                });
                (Question::clone(&q), held)
            })
            .collect()
    }

    fn noted(&self, inner: &Inner) {
        if inner.changed.as_ref().is_some_and(|c| !c.is_empty()) {
            self.changes.notify_one();
        }
    }

    pub fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("cache lock").map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn stale_ok(&self, e: &Entry, now: Instant) -> bool {
        e.answer.is_some() && now < e.expires + self.settings.serve_stale
    }

    pub fn lookup(&self, q: &(impl QuestionKey + ?Sized), now: Instant) -> Lookup {
        let q: &dyn QuestionKey = &q.key();
        let mut inner = self.inner.lock().expect("cache lock");
        let Some(&slot) = inner.map.get(q) else {
            return Lookup::Miss;
        };
        let e = &mut inner.slots[slot].entry;
        let result = if let Some(answer) = e.answer.as_ref().filter(|_| now < e.expires) {
            if now.saturating_duration_since(e.last_hit) > PREFETCH_GAP {
                e.hits = 1;
            } else {
                e.hits = e.hits.saturating_add(1);
            }
            e.last_hit = now;
            let ttl = e.expires.saturating_duration_since(now).as_secs() as u32;
            let threshold = (e.ttl * PREFETCH_PERCENT).div_ceil(100);
            Lookup::Hit {
                answer: answer.clone(),
                ttl,
                kind: e.kind,
                prefetch: self.settings.prefetch > 0
                    && e.hits >= self.settings.prefetch
                    && ttl <= threshold,
            }
        } else if let Some((_, rcode)) = e.failed.filter(|(until, _)| now < *until) {
            match &e.answer {
                Some(a) if self.stale_ok(e, now) => Lookup::Stale(a.clone()),
                _ => Lookup::Failed(rcode),
            }
        } else if self.stale_ok(e, now) {
            return Lookup::Miss;
        } else {
            inner.remove_slot(slot, &self.counters);
            self.noted(&inner);
            return Lookup::Miss;
        };
        inner.touch(slot);
        result
    }

    /// The answer held for `q` and its expiry, whether fresh or not; no hit is counted.
    pub fn peek(&self, q: &Question) -> Option<(Arc<Answer>, Instant)> {
        let inner = self.inner.lock().expect("cache lock");
        let e = &inner.slots[*inner.map.get(q)?].entry;
        Some((e.answer.clone()?, e.expires))
    }

    /// Stores an answer for `ttl` seconds. A refreshed entry keeps its popularity.
    pub fn insert(&self, q: &Question, answer: Arc<Answer>, ttl: u32, kind: Kind, now: Instant) {
        if self.settings.capacity == 0 {
            return;
        }
        let mut inner = self.inner.lock().expect("cache lock");
        let (hits, last_hit) = inner
            .get(q)
            .filter(|e| e.answer.is_some())
            .map_or((0, now), |e| (e.hits, e.last_hit));
        inner.put(
            q,
            Entry {
                answer: Some(answer),
                kind,
                ttl,
                expires: now + Duration::from_secs(ttl.into()),
                failed: None,
                hits,
                last_hit,
            },
            self.settings.capacity,
            &self.counters,
        );
        self.noted(&inner);
    }

    /// Upstreams failed for `q` with `rcode`: what to serve instead, remembering the failure.
    pub fn fail(&self, q: &Question, rcode: u16, now: Instant) -> AfterFailure {
        let mut inner = self.inner.lock().expect("cache lock");
        if let Some(e) = inner.get_mut(q)
            && let Some(answer) = e.answer.clone()
        {
            if now < e.expires {
                let ttl = e.expires.saturating_duration_since(now).as_secs() as u32;
                return AfterFailure::Fresh(answer, ttl);
            }
            if self.stale_ok(e, now) {
                e.failed = Some((now + STALE_RECHECK, rcode));
                return AfterFailure::Stale(answer);
            }
        }
        if self.settings.capacity > 0 && self.settings.servfail_ttl > 0 {
            let until = now + Duration::from_secs(self.settings.servfail_ttl.into());
            inner.put(
                q,
                Entry {
                    answer: None,
                    kind: Kind::Denial,
                    ttl: 0,
                    expires: now,
                    failed: Some((until, rcode)),
                    hits: 0,
                    last_hit: now,
                },
                self.settings.capacity,
                &self.counters,
            );
        } else {
            inner.remove(q, &self.counters);
        }
        self.noted(&inner);
        AfterFailure::Failed(rcode)
    }

    /// Removes what can no longer be served: expired beyond serve-stale, failures over.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut inner = self.inner.lock().expect("cache lock");
        let dead: Vec<usize> = inner
            .map
            .values()
            .copied()
            .filter(|&slot| {
                let e = &inner.slots[slot].entry;
                let fresh = e.answer.is_some() && now < e.expires;
                let failing = e.failed.is_some_and(|(until, _)| now < until);
                !fresh && !failing && !self.stale_ok(e, now)
            })
            .collect();
        for &slot in &dead {
            inner.remove_slot(slot, &self.counters);
        }
        self.noted(&inner);
        dead.len()
    }
}

impl Inner {
    fn get(&self, q: &Question) -> Option<&Entry> {
        let q: &dyn QuestionKey = q;
        self.map.get(q).map(|&slot| &self.slots[slot].entry)
    }

    fn get_mut(&mut self, q: &Question) -> Option<&mut Entry> {
        let q: &dyn QuestionKey = q;
        let slot = *self.map.get(q)?;
        Some(&mut self.slots[slot].entry)
    }

    /// Takes `slot` out of the recency list.
    fn unlink(&mut self, slot: usize) {
        let (prev, next) = (self.slots[slot].prev, self.slots[slot].next);
        match prev {
            NIL => self.head = next,
            p => self.slots[p].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slots[n].prev = prev,
        }
    }

    /// Puts `slot` at the front of the recency list (it is not in it).
    fn push_front(&mut self, slot: usize) {
        self.slots[slot].prev = NIL;
        self.slots[slot].next = self.head;
        match self.head {
            NIL => self.tail = slot,
            h => self.slots[h].prev = slot,
        }
        self.head = slot;
    }

    /// Marks `slot` the most recently used.
    fn touch(&mut self, slot: usize) {
        if self.head != slot {
            self.unlink(slot);
            self.push_front(slot);
        }
    }

    fn put(&mut self, q: &Question, entry: Entry, capacity: usize, c: &CacheCounters) {
        let existing = {
            let key: &dyn QuestionKey = q;
            self.map.get(key).copied()
        };
        if let Some(slot) = existing {
            c.entries[self.slots[slot].entry.kind as usize].fetch_sub(1, Relaxed);
            c.entries[entry.kind as usize].fetch_add(1, Relaxed);
            self.slots[slot].entry = entry;
            self.touch(slot);
            self.note(slot);
            return;
        }
        while self.map.len() >= capacity && self.tail != NIL {
            let victim = self.tail;
            let kind = self.slots[victim].entry.kind;
            self.remove_slot(victim, c);
            c.evictions[kind as usize].fetch_add(1, Relaxed);
        }
        c.entries[entry.kind as usize].fetch_add(1, Relaxed);
        let key = Arc::new(q.clone());
        let filled = Slot {
            key: key.clone(),
            entry,
            prev: NIL,
            next: NIL,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = filled;
                slot
            }
            None => {
                self.slots.push(filled);
                self.slots.len() - 1
            }
        };
        self.map.insert(key, slot);
        self.push_front(slot);
        self.note(slot);
    }

    fn note(&mut self, slot: usize) {
        if let Some(changed) = self.changed.as_mut() {
            changed.insert(self.slots[slot].key.clone());
        }
    }

    fn remove(&mut self, q: &Question, c: &CacheCounters) {
        let slot = {
            let key: &dyn QuestionKey = q;
            self.map.get(key).copied()
        };
        if let Some(slot) = slot {
            self.remove_slot(slot, c);
        }
    }

    fn remove_slot(&mut self, slot: usize, c: &CacheCounters) {
        let key = self.slots[slot].key.clone();
        self.map.remove(&key);
        self.unlink(slot);
        c.entries[self.slots[slot].entry.kind as usize].fetch_sub(1, Relaxed);
        // The slot keeps its (dead) entry until reused; drop its answer now.
        self.slots[slot].entry.answer = None;
        self.note(slot);
        self.free.push(slot);
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use hickory_proto::{
        op::{Edns, Query},
        rr::{Name, Record, RecordType, rdata::SOA},
    };

    use super::*;
    use crate::zone::name::wire_from_dotted;

    fn question(name: &str, qtype: u16, dnssec_ok: bool) -> Question {
        Question {
            name: wire_from_dotted(name),
            qtype,
            qclass: 1,
            dnssec_ok,
            checking_disabled: false,
            upstream_set: Default::default(),
        }
    }

    fn q(name: &str) -> Question {
        question(name, 1, false)
    }

    fn a(name: &str, ttl: u32) -> Record {
        Record::from_rdata(
            Name::from_str(name).unwrap(),
            ttl,
            RData::A("192.0.2.1".parse().unwrap()),
        )
    }

    fn soa(ttl: u32, minimum: u32) -> Record {
        Record::from_rdata(
            Name::from_str("example.").unwrap(),
            ttl,
            RData::SOA(SOA::new(
                Name::from_str("ns.example.").unwrap(),
                Name::from_str("host.example.").unwrap(),
                1,
                3600,
                600,
                86400,
                minimum,
            )),
        )
    }

    fn reply(rcode: ResponseCode, answers: Vec<Record>, authorities: Vec<Record>) -> Message {
        let mut m = Message::new(7, MessageType::Response, OpCode::Query);
        m.metadata.response_code = rcode;
        m.add_query(Query::query(
            Name::from_str("www.example.").unwrap(),
            RecordType::A,
        ));
        m.insert_answers(answers);
        m.insert_authorities(authorities);
        m
    }

    fn settings() -> CacheSettings {
        CacheSettings {
            capacity: 100,
            min_ttl: 0,
            max_ttl: 3600,
            negative_max_ttl: 1800,
            servfail_ttl: 5,
            prefetch: 2,
            serve_stale: Duration::from_secs(3600),
        }
    }

    fn counters() -> Arc<CacheCounters> {
        Arc::new(CacheCounters::default())
    }

    fn answer() -> Arc<Answer> {
        let m = reply(ResponseCode::NoError, vec![a("www.example.", 300)], vec![]);
        Arc::new(Answer::from_upstream(&m.to_vec().unwrap(), &m).unwrap())
    }

    #[test]
    fn positive_ttl_is_the_smallest_record_ttl_within_the_caps() {
        let s = settings();
        let m = reply(
            ResponseCode::NoError,
            vec![a("www.example.", 300), a("www.example.", 120)],
            vec![],
        );
        assert_eq!(cache_ttl(&m, &s), Some((120, Kind::Success)));
        let capped = CacheSettings {
            max_ttl: 60,
            ..settings()
        };
        assert_eq!(cache_ttl(&m, &capped), Some((60, Kind::Success)));
        let raised = CacheSettings {
            min_ttl: 600,
            max_ttl: 3600,
            ..settings()
        };
        assert_eq!(cache_ttl(&m, &raised), Some((600, Kind::Success)));
        let zero = reply(ResponseCode::NoError, vec![a("www.example.", 0)], vec![]);
        assert_eq!(
            cache_ttl(&zero, &s),
            None,
            "TTL 0 with no minimum: not cached"
        );
        let min5 = CacheSettings {
            min_ttl: 5,
            ..settings()
        };
        assert_eq!(cache_ttl(&zero, &min5), Some((5, Kind::Success)));
    }

    #[test]
    fn negative_ttl_comes_from_the_soa() {
        let s = settings();
        // RFC 2308 §5: min(SOA TTL, SOA MINIMUM).
        let nx = reply(ResponseCode::NXDomain, vec![], vec![soa(600, 30)]);
        assert_eq!(cache_ttl(&nx, &s), Some((30, Kind::Denial)));
        let nx = reply(ResponseCode::NXDomain, vec![], vec![soa(20, 300)]);
        assert_eq!(cache_ttl(&nx, &s), Some((20, Kind::Denial)));
        let nodata = reply(ResponseCode::NoError, vec![], vec![soa(600, 45)]);
        assert_eq!(cache_ttl(&nodata, &s), Some((45, Kind::Denial)));
        let capped = CacheSettings {
            negative_max_ttl: 10,
            ..settings()
        };
        assert_eq!(cache_ttl(&nodata, &capped), Some((10, Kind::Denial)));
        let no_soa = reply(ResponseCode::NXDomain, vec![], vec![]);
        assert_eq!(
            cache_ttl(&no_soa, &s),
            None,
            "RFC 2308 §5: no SOA, no cache"
        );
    }

    #[test]
    fn errors_and_truncated_answers_are_not_cached() {
        let s = settings();
        for rcode in [
            ResponseCode::ServFail,
            ResponseCode::Refused,
            ResponseCode::FormErr,
        ] {
            assert_eq!(
                cache_ttl(&reply(rcode, vec![], vec![soa(60, 60)]), &s),
                None
            );
        }
        let mut tc = reply(ResponseCode::NoError, vec![a("www.example.", 300)], vec![]);
        tc.metadata.truncation = true;
        assert_eq!(cache_ttl(&tc, &s), None);
    }

    #[test]
    fn sections_are_kept_as_sent_without_the_opt() {
        let mut m = reply(ResponseCode::NoError, vec![a("www.example.", 300)], vec![]);
        m.set_edns(Edns::new());
        let bytes = m.to_vec().unwrap();
        let ans = Answer::from_upstream(&bytes, &m).unwrap();
        assert_eq!((ans.ancount, ans.nscount, ans.arcount), (1, 0, 0));
        // The A record, compressed against the question, and no OPT.
        assert_eq!(
            ans.sections,
            [0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4, 192, 0, 2, 1]
        );
        assert_eq!(ans.ttl_offsets, vec![6]);
        let mut patched = ans.sections.clone();
        ans.patch_ttls(&mut patched, 0, 42);
        assert_eq!(&patched[6..10], &42u32.to_be_bytes());
        // And it reads back as the same records.
        let back = ans.to_message(&q("www.example"), Some(42)).unwrap();
        assert_eq!(back.answers.len(), 1);
        assert_eq!(back.answers[0].ttl, 42);
    }

    #[test]
    fn counts_that_lie_are_refused_not_trusted() {
        let mut msg = vec![0, 7, 0x81, 0x80, 0, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        msg.extend_from_slice(&wire_from_dotted("www.example"));
        msg.extend_from_slice(&[0, 1, 0, 1]);
        assert_eq!(Answer::from_wire(&msg, true), None);
    }

    #[test]
    fn a_pointer_into_a_ttl_is_re_encoded_away() {
        // Found by the upstream_reply fuzz target. Two A records; the second one's owner
        // points at the first one's TTL, whose bytes spell `x.`: served with another TTL, the
        // same bytes would name the second record otherwise.
        let qname = wire_from_dotted("www.example");
        let mut msg = vec![0, 7, 0x81, 0x80, 0, 1, 0, 2, 0, 0, 0, 0];
        msg.extend_from_slice(&qname);
        msg.extend_from_slice(&[0, 1, 0, 1]);
        let ttl_at = msg.len() + 6;
        msg.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 1, b'x', 0, 0, 0, 4, 192, 0, 2, 1]);
        msg.extend_from_slice(&(0xc000 | ttl_at as u16).to_be_bytes());
        msg.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 2]);
        let parsed = Message::from_vec(&msg).unwrap();
        assert_eq!(parsed.answers[1].name, Name::from_str("x.").unwrap());
        let ans = Answer::from_upstream(&msg, &parsed).unwrap();
        let served = ans.to_message(&q("www.example"), Some(300)).unwrap();
        assert_eq!(served.answers[1].name, Name::from_str("x.").unwrap());
        assert_eq!(served.answers[1].ttl, 300);
    }

    #[test]
    fn an_opt_in_the_middle_is_re_encoded_away() {
        // Hand-made: header, question, additional = [OPT, A].
        let qname = wire_from_dotted("www.example");
        let mut msg = vec![0, 7, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 2];
        msg.extend_from_slice(&qname);
        msg.extend_from_slice(&[0, 1, 0, 1]);
        msg.extend_from_slice(&[0, 0, 41, 4, 0xd0, 0, 0, 0, 0, 0, 0]);
        msg.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 9]);
        let parsed = Message::from_vec(&msg).unwrap();
        let ans = Answer::from_upstream(&msg, &parsed).unwrap();
        assert_eq!(ans.arcount, 1);
        assert_eq!(ans.ttl_offsets.len(), 1);
        let back = ans.to_message(&q("www.example"), None).unwrap();
        assert_eq!(back.additionals.len(), 1);
        assert_eq!(back.additionals[0].ttl, 60);
        assert!(back.edns.is_none());
    }

    #[test]
    fn ttl_counts_down_and_entries_expire() {
        let cache = Cache::new(settings(), counters());
        let t0 = Instant::now();
        cache.insert(&q("www.example"), answer(), 300, Kind::Success, t0);
        let hit = cache.lookup(&q("www.example"), t0 + Duration::from_millis(10_500));
        assert!(matches!(hit, Lookup::Hit { ttl: 289, .. }), "{hit:?}");
        // Any spelling is the same key once lowercased; another type is not.
        assert!(matches!(
            cache.lookup(&q("WWW.Example"), t0),
            Lookup::Hit { .. }
        ));
        let aaaa = question("www.example", 28, false);
        assert_eq!(cache.lookup(&aaaa, t0), Lookup::Miss);
        let do_bit = question("www.example", 1, true);
        assert_eq!(cache.lookup(&do_bit, t0), Lookup::Miss);
        assert_eq!(
            cache.lookup(&q("www.example"), t0 + Duration::from_secs(300)),
            Lookup::Miss
        );
    }

    #[test]
    fn stale_answers_are_served_after_a_failure_and_rechecked_later() {
        let cache = Cache::new(settings(), counters());
        let t0 = Instant::now();
        let key = q("www.example");
        cache.insert(&key, answer(), 10, Kind::Success, t0);
        let t1 = t0 + Duration::from_secs(20);
        assert_eq!(
            cache.lookup(&key, t1),
            Lookup::Miss,
            "expired: ask upstream first"
        );
        assert_eq!(cache.fail(&key, 2, t1), AfterFailure::Stale(answer()));
        // Within the recheck timer: stale straight away.
        assert_eq!(
            cache.lookup(&key, t1 + Duration::from_secs(29)),
            Lookup::Stale(answer())
        );
        // After it: try upstream again.
        assert_eq!(
            cache.lookup(&key, t1 + Duration::from_secs(31)),
            Lookup::Miss
        );
        // Past the serve-stale window: nothing to serve; the failure is remembered.
        let late = t0 + Duration::from_secs(10 + 3600 + 1);
        assert_eq!(cache.fail(&key, 2, late), AfterFailure::Failed(2));
        assert_eq!(
            cache.lookup(&key, late + Duration::from_secs(4)),
            Lookup::Failed(2)
        );
        assert_eq!(
            cache.lookup(&key, late + Duration::from_secs(6)),
            Lookup::Miss
        );
    }

    #[test]
    fn a_failed_prefetch_keeps_the_fresh_entry() {
        let cache = Cache::new(settings(), counters());
        let t0 = Instant::now();
        let key = q("www.example");
        cache.insert(&key, answer(), 10, Kind::Success, t0);
        assert_eq!(
            cache.fail(&key, 2, t0 + Duration::from_secs(9)),
            AfterFailure::Fresh(answer(), 1)
        );
        assert!(matches!(
            cache.lookup(&key, t0 + Duration::from_secs(9)),
            Lookup::Hit { .. }
        ));
    }

    #[test]
    fn failures_are_remembered_for_servfail_ttl_only() {
        let off = CacheSettings {
            servfail_ttl: 0,
            ..settings()
        };
        let cache = Cache::new(off, counters());
        let t0 = Instant::now();
        assert_eq!(cache.fail(&q("x.example"), 2, t0), AfterFailure::Failed(2));
        assert_eq!(cache.lookup(&q("x.example"), t0), Lookup::Miss);
        let cache = Cache::new(settings(), counters());
        cache.fail(&q("x.example"), 2, t0);
        assert_eq!(
            cache.lookup(&q("x.example"), t0 + Duration::from_secs(4)),
            Lookup::Failed(2)
        );
        assert_eq!(
            cache.lookup(&q("x.example"), t0 + Duration::from_secs(5)),
            Lookup::Miss
        );
    }

    #[test]
    fn popular_names_are_prefetched_in_the_last_tenth_of_their_ttl() {
        let cache = Cache::new(settings(), counters());
        let t0 = Instant::now();
        let key = q("www.example");
        cache.insert(&key, answer(), 100, Kind::Success, t0);
        let at = |s: u64| t0 + Duration::from_secs(s);
        let prefetch = |l: Lookup| match l {
            Lookup::Hit { prefetch, .. } => prefetch,
            other => panic!("{other:?}"),
        };
        // One hit: not popular yet, even late in the TTL.
        assert!(!prefetch(cache.lookup(&key, at(50))));
        // Second hit with 20 s left: popular, but not late enough (10 % of 100 s).
        assert!(!prefetch(cache.lookup(&key, at(80))));
        // Third hit with 9 s left: prefetch.
        assert!(prefetch(cache.lookup(&key, at(91))));
        // A refresh keeps the popularity.
        cache.insert(&key, answer(), 100, Kind::Success, at(92));
        assert!(!prefetch(cache.lookup(&key, at(150))));
        assert!(prefetch(cache.lookup(&key, at(185))));
        // Hits more than a minute apart start counting again (ceil(10 % of 5 s) is 1 s).
        cache.insert(&key, answer(), 5, Kind::Success, at(300));
        assert!(
            !prefetch(cache.lookup(&key, at(304))),
            "first hit after a 2 minute gap"
        );
        assert!(prefetch(
            cache.lookup(&key, t0 + Duration::from_millis(304_500))
        ));
    }

    #[test]
    fn the_least_recently_used_entry_is_evicted_at_capacity() {
        let c = counters();
        let small = CacheSettings {
            capacity: 2,
            ..settings()
        };
        let cache = Cache::new(small, c.clone());
        let t0 = Instant::now();
        cache.insert(&q("a.example"), answer(), 300, Kind::Success, t0);
        cache.insert(&q("b.example"), answer(), 300, Kind::Denial, t0);
        // Use a: b is now the least recently used.
        assert!(matches!(
            cache.lookup(&q("a.example"), t0),
            Lookup::Hit { .. }
        ));
        cache.insert(&q("c.example"), answer(), 300, Kind::Success, t0);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.lookup(&q("b.example"), t0), Lookup::Miss);
        assert!(matches!(
            cache.lookup(&q("a.example"), t0),
            Lookup::Hit { .. }
        ));
        assert!(matches!(
            cache.lookup(&q("c.example"), t0),
            Lookup::Hit { .. }
        ));
        assert_eq!(c.evictions[Kind::Denial as usize].load(Relaxed), 1);
        assert_eq!(c.entries[Kind::Success as usize].load(Relaxed), 2);
        assert_eq!(c.entries[Kind::Denial as usize].load(Relaxed), 0);
        // Replacing an entry evicts nothing.
        cache.insert(&q("c.example"), answer(), 300, Kind::Success, t0);
        assert_eq!(c.evictions[Kind::Success as usize].load(Relaxed), 0);
    }

    #[test]
    fn the_recency_order_survives_any_sequence_of_uses() {
        // The slab's linked list against a vector kept in order of use, most recent first.
        let c = counters();
        let cache = Cache::new(
            CacheSettings {
                capacity: 5,
                prefetch: 0,
                ..settings()
            },
            c.clone(),
        );
        let t0 = Instant::now();
        let mut model: Vec<u64> = Vec::new();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let k = next() % 9;
            let name = format!("n{k}.example");
            match next() % 4 {
                0 => {
                    cache.insert(&q(&name), answer(), 300, Kind::Success, t0);
                    model.retain(|x| *x != k);
                    model.insert(0, k);
                    model.truncate(5);
                }
                1 => {
                    cache.inner.lock().unwrap().remove(&q(&name), &c);
                    model.retain(|x| *x != k);
                }
                _ => {
                    let hit = matches!(cache.lookup(&q(&name), t0), Lookup::Hit { .. });
                    assert_eq!(hit, model.contains(&k), "{name} in {model:?}");
                    if hit {
                        model.retain(|x| *x != k);
                        model.insert(0, k);
                    }
                }
            }
            let inner = cache.inner.lock().unwrap();
            let mut order = Vec::new();
            let mut at = inner.head;
            while at != NIL {
                order.push(inner.slots[at].key.name.clone());
                at = inner.slots[at].next;
            }
            let want: Vec<Vec<u8>> = model
                .iter()
                .map(|k| wire_from_dotted(&format!("n{k}.example")))
                .collect();
            assert_eq!(order, want);
            assert_eq!(inner.map.len(), model.len());
            let mut back = Vec::new();
            let mut at = inner.tail;
            while at != NIL {
                back.push(inner.slots[at].key.name.clone());
                at = inner.slots[at].prev;
            }
            back.reverse();
            assert_eq!(back, want, "the list read backwards");
            assert_eq!(
                c.entries[Kind::Success as usize].load(Relaxed),
                model.len() as u64
            );
        }
    }

    #[test]
    fn sweep_drops_what_cannot_be_served() {
        let c = counters();
        let cache = Cache::new(settings(), c.clone());
        let t0 = Instant::now();
        cache.insert(&q("a.example"), answer(), 10, Kind::Success, t0);
        cache.insert(&q("b.example"), answer(), 7200, Kind::Success, t0);
        cache.fail(&q("c.example"), 2, t0);
        assert_eq!(
            cache.sweep(t0 + Duration::from_secs(60)),
            1,
            "c's failure is over"
        );
        assert_eq!(
            cache.sweep(t0 + Duration::from_secs(3611)),
            1,
            "a is past serve-stale"
        );
        assert_eq!(cache.len(), 1);
        assert_eq!(c.entries[Kind::Success as usize].load(Relaxed), 1);
        assert_eq!(c.entries[Kind::Denial as usize].load(Relaxed), 0);
    }

    #[test]
    fn a_zero_capacity_cache_keeps_nothing() {
        let cache = Cache::new(
            CacheSettings {
                capacity: 0,
                ..settings()
            },
            counters(),
        );
        let t0 = Instant::now();
        cache.insert(&q("a.example"), answer(), 300, Kind::Success, t0);
        cache.fail(&q("b.example"), 2, t0);
        assert!(cache.is_empty());
    }
}

/// What the cache holds in memory per entry, counted by the allocator (the figure
/// docs/forwarding.md gives). A test binary of its own would be cleaner; the counter is per
/// thread, so the other unit tests running beside it do not disturb it.
#[cfg(test)]
mod memory {
    use std::{
        alloc::{GlobalAlloc, Layout, System},
        cell::Cell,
    };

    use super::*;

    struct Counting;

    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
    }

    // SAFETY: forwards to the system allocator; the counter is a const-initialised thread
    // local, which never allocates.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            let _ = LIVE.try_with(|c| c.set(c.get() + l.size() as isize));
            // SAFETY: the caller's layout, as GlobalAlloc::alloc requires.
            unsafe { System.alloc(l) }
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            let _ = LIVE.try_with(|c| c.set(c.get() - l.size() as isize));
            // SAFETY: as above.
            unsafe { System.dealloc(p, l) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: Counting = Counting;

    fn live() -> isize {
        LIVE.with(Cell::get)
    }

    /// A cached A answer as the flood test's upstream gives it: one record, its owner a
    /// pointer to the question.
    fn upstream_answer(name: &str) -> Answer {
        use hickory_proto::{
            op::Query,
            rr::{Name, Record, RecordType},
        };
        let mut m = Message::new(7, MessageType::Response, OpCode::Query);
        let name = Name::from_ascii(name).unwrap();
        m.add_query(Query::query(name.clone(), RecordType::A));
        m.add_answer(Record::from_rdata(
            name,
            300,
            RData::A("203.0.113.1".parse().unwrap()),
        ));
        Answer::from_upstream(&m.to_vec().unwrap(), &m).unwrap()
    }

    #[test]
    fn bytes_per_entry() {
        const N: usize = 10_000;
        let cache = Cache::new(
            CacheSettings {
                capacity: N,
                min_ttl: 5,
                max_ttl: 3600,
                negative_max_ttl: 1800,
                servfail_ttl: 5,
                prefetch: 10,
                serve_stale: Duration::from_secs(3600),
            },
            Arc::new(CacheCounters::default()),
        );
        let now = Instant::now();
        let fill = |from: usize| {
            for i in from..from + N {
                let name = format!("n{i}.flood.example.");
                let q = Question {
                    name: crate::zone::name::wire_from_dotted(&name),
                    qtype: 1,
                    qclass: 1,
                    dnssec_ok: false,
                    checking_disabled: false,
                    upstream_set: Default::default(),
                };
                let a = Arc::new(upstream_answer(&name));
                cache.insert(&q, a, 300, Kind::Success, now);
            }
        };
        let before = live();
        fill(0);
        let full = live();
        // As many again: every insert evicts one; what is held stays the same.
        fill(N);
        let after = live();
        let per_entry = (full - before) as usize / N;
        eprintln!(
            "cache: {per_entry} bytes per entry (an A answer of {} bytes), {} after {N} evictions",
            upstream_answer("n1.flood.example.").sections.len(),
            (after - before) as usize / N
        );
        assert!(
            (300..=1024).contains(&per_entry),
            "{per_entry} bytes per entry: update docs/forwarding.md"
        );
        assert!(
            (after - full).unsigned_abs() < N * 64,
            "evictions free what inserts take: {full} then {after}"
        );
    }
}
