//! The agent's cache of upstream answers, mirrored in the kernel: every answer the cache holds
//! (positive, NXDOMAIN, NODATA) is written to the cache maps with its expiry, so the XDP program
//! answers names outside the cluster too, its TTLs counted down to the seconds left; what the
//! cache drops (evicted, swept, replaced by a failure) leaves the kernel. The kernel never
//! serves an entry past its expiry: prefetch and serve-stale stay the agent's.
//!
//! The bytes are the cache's own: the sections as the cache keeps them (the upstream's, or
//! hickory-proto's re-encoding), the header bits [`Answer::reply_flags`] gives every reply, so
//! the kernel's reply is [`crate::server::reply_from_answer`]'s, byte for byte.

use std::{
    collections::HashMap as StdHashMap,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData};
use dns_common::{
    ACTION_ANSWER, AnswerValue, BLOB_DATA_LEN, CACHE_AUTOPATH, CACHE_CD, CACHE_DO, CacheLongKey,
    CacheShortKey, INLINE_DATA_LEN, LONG_NAME_LEN, MAX_TTL_FIELDS, SHORT_NAME_LEN, blob_class,
    ttl_offset_at,
};

use super::maps::{
    BlobIds, BlobMaps, IdRange, WriteError, data_csum, monotonic_ns_at, next_generation,
};
use crate::{
    dns::CLASS_IN,
    metrics::Metrics,
    server::{
        autopath::Completions,
        cache::{Answer, Cache, Held},
        forward::{Question, UpstreamSetId},
    },
};

/// The cache maps and a handle on the blob maps.
pub struct CacheMaps {
    pub(super) short: HashMap<MapData, CacheShortKey, AnswerValue>,
    pub(super) long: HashMap<MapData, CacheLongKey, AnswerValue>,
    pub(super) blobs: BlobMaps,
}

enum Key {
    Short(CacheShortKey),
    Long(CacheLongKey),
}

/// The kernel's key of a cache entry (of a completed search path with `autopath`); `None` for
/// questions the kernel never answers (another class).
fn key(q: &Question, autopath: bool) -> Option<Key> {
    if q.qclass != CLASS_IN || q.name.len() > LONG_NAME_LEN {
        return None;
    }
    let mut variant = 0;
    if autopath {
        variant |= CACHE_AUTOPATH;
    }
    if q.dnssec_ok {
        variant |= CACHE_DO;
    }
    if q.checking_disabled {
        variant |= CACHE_CD;
    }
    Some(if q.name.len() <= SHORT_NAME_LEN {
        let mut k = CacheShortKey::zeroed();
        k.qtype = q.qtype;
        k.name[..q.name.len()].copy_from_slice(&q.name);
        k.variant = variant;
        Key::Short(k)
    } else {
        let mut k = CacheLongKey::zeroed();
        k.qtype = q.qtype;
        k.name[..q.name.len()].copy_from_slice(&q.name);
        k.variant = variant;
        Key::Long(k)
    })
}

/// The kernel's entry for a cached answer valid until `expires`, and the section bytes that go
/// into a blob when they do not fit inline. `None`: the kernel cannot hold it (more TTL fields
/// than it counts down, or longer than a blob), and the agent answers it. Without an expiry
/// (a completed search path that ends in the zone) the TTLs are the answer's own, and the
/// entry stays until it is removed.
///
/// The program passes its queries up from `until` on (at most `expires`; `None`: at expiry).
pub fn cached_value(
    answer: &Answer,
    expires: Option<Instant>,
    until: Option<Instant>,
) -> Option<(AnswerValue, Option<Vec<u8>>)> {
    let fields = if expires.is_some() {
        answer.ttl_offsets.len()
    } else {
        0
    };
    if fields > MAX_TTL_FIELDS || answer.sections.len() > BLOB_DATA_LEN {
        return None;
    }
    // TTL fields are zero in the bytes and their checksum: the program writes the seconds left
    // and adds them to the checksum per packet.
    let mut data = answer.sections.clone();
    if fields > 0 {
        answer.patch_ttls(&mut data, 0, 0);
    }
    let mut v = AnswerValue::zeroed();
    v.action = ACTION_ANSWER;
    v.flags = answer.reply_flags();
    v.ancount = answer.ancount;
    v.nscount = answer.nscount;
    v.arcount = answer.arcount;
    v.data_len = data.len() as u16;
    v.data_csum = data_csum(&data);
    v.ttl_count = fields as u8;
    let offsets = &answer.ttl_offsets[..fields];
    v.ttl_odd = offsets.iter().filter(|o| *o & 1 == 1).count() as u16;
    // 0 means "never expires".
    v.expires_ns = expires.map_or(0, |e| monotonic_ns_at(e).max(1));
    v.pass_from_ns = match (expires, until) {
        (Some(e), Some(u)) => monotonic_ns_at(u.min(e)).max(1),
        _ => v.expires_ns,
    };
    for (i, off) in offsets.iter().enumerate() {
        let at = ttl_offset_at(i);
        v.data[at..at + 2].copy_from_slice(&off.to_ne_bytes());
    }
    let blob = if data.len() + 2 * fields <= INLINE_DATA_LEN {
        v.data[..data.len()].copy_from_slice(&data);
        None
    } else {
        Some(data)
    };
    Some((v, blob))
}

/// What the kernel holds for one question.
struct Written {
    answer: Arc<Answer>,
    expires: Option<Instant>,
    until: Option<Instant>,
    blob: Option<u32>,
    /// The upstreams the answer came from: the kernel's key has no room for them, so it holds
    /// the answer of one set per question, the set the name routes to now.
    set: UpstreamSetId,
}

/// Writes the cache's entries into the kernel's cache maps; see the module documentation.
pub struct KernelCache {
    maps: CacheMaps,
    ids: BlobIds,
    /// By question (without its upstream set, as the kernel's key), and whether it is a
    /// completed search path.
    written: StdHashMap<(Question, bool), Written>,
}

/// The slot of `q` in [`KernelCache::written`].
fn slot(q: &Question, autopath: bool) -> (Question, bool) {
    let mut q = q.clone();
    q.upstream_set = UpstreamSetId::default();
    (q, autopath)
}

impl KernelCache {
    pub fn new(maps: CacheMaps) -> Self {
        Self {
            maps,
            ids: BlobIds::new(IdRange::Cache),
            written: StdHashMap::new(),
        }
    }

    /// Entries the kernel holds.
    pub fn len(&self) -> usize {
        self.written.len()
    }

    pub fn is_empty(&self) -> bool {
        self.written.is_empty()
    }

    /// Makes the kernel hold `answer` for `q` until `expires`, or nothing for `q` (`None`). An
    /// answer the kernel cannot hold, or whose write fails, leaves nothing for `q`: the agent
    /// answers it.
    pub fn set(
        &mut self,
        q: &Question,
        entry: Option<(Arc<Answer>, Instant)>,
    ) -> Result<(), WriteError> {
        self.write(q, false, entry.map(|(a, e)| (a, Some(e))), None)
    }

    /// [`Self::set`] of what the cache holds: the kernel answers it until
    /// [`Held::kernel_until`], and passes its queries up from then on.
    pub fn set_held(&mut self, q: &Question, held: Option<Held>) -> Result<(), WriteError> {
        match held {
            Some(h) => self.write(
                q,
                false,
                Some((h.answer, Some(h.expires))),
                Some(h.kernel_until),
            ),
            None => self.write(q, false, None, None),
        }
    }

    /// Makes the kernel hold `answer` as the completed search path of `q` (the name a pod
    /// asked), until `expires` if given, or nothing (`None`).
    pub fn set_completion(
        &mut self,
        q: &Question,
        entry: Option<(Arc<Answer>, Option<Instant>)>,
    ) -> Result<(), WriteError> {
        self.write(q, true, entry, None)
    }

    fn write(
        &mut self,
        q: &Question,
        autopath: bool,
        entry: Option<(Arc<Answer>, Option<Instant>)>,
        until: Option<Instant>,
    ) -> Result<(), WriteError> {
        let slot = slot(q, autopath);
        let held = self.written.get(&slot);
        if let (Some((answer, expires)), Some(w)) = (&entry, held)
            && Arc::ptr_eq(answer, &w.answer)
            && *expires == w.expires
            && until == w.until
        {
            return Ok(());
        }
        // The end of an answer from other upstreams than the one the kernel holds.
        if entry.is_none() && held.is_some_and(|w| w.set != q.upstream_set) {
            return Ok(());
        }
        let Some(key) = key(q, autopath) else {
            return Ok(());
        };
        let value = entry
            .as_ref()
            .and_then(|(answer, expires)| cached_value(answer, *expires, until));
        let Some((mut v, blob_data)) = value else {
            self.remove(&slot, &key);
            return Ok(());
        };
        v.generation = next_generation();
        let mut new_blob = None;
        if let Some(data) = blob_data {
            let id = self.ids.allocate(blob_class(data.len()));
            if let Err(source) = self.maps.blobs.insert(id, &data) {
                self.ids.release_now(&mut self.maps.blobs, id);
                self.remove(&slot, &key);
                return Err(WriteError::new(format!("blob {id}"), source));
            }
            v.blob = id;
            new_blob = Some(id);
        }
        let res = match &key {
            Key::Short(k) => self.maps.short.insert(k, v, 0),
            Key::Long(k) => self.maps.long.insert(k, v, 0),
        };
        if let Err(source) = res {
            if let Some(id) = new_blob {
                self.ids.release_now(&mut self.maps.blobs, id);
            }
            // The old answer must not outlive the failed write.
            self.remove(&slot, &key);
            return Err(WriteError::new(
                format!(
                    "cached {} type {}",
                    crate::zone::name::to_text(&q.name),
                    q.qtype
                ),
                source,
            ));
        }
        let (answer, expires) = entry.expect("a value was made from it");
        let old = self.written.insert(
            slot,
            Written {
                answer,
                expires,
                until,
                blob: new_blob,
                set: q.upstream_set,
            },
        );
        if let Some(id) = old.and_then(|w| w.blob) {
            self.ids.retire(id);
        }
        Ok(())
    }

    fn remove(&mut self, slot: &(Question, bool), key: &Key) {
        let Some(old) = self.written.remove(slot) else {
            return;
        };
        let _ = match key {
            Key::Short(k) => self.maps.short.remove(k),
            Key::Long(k) => self.maps.long.remove(k),
        };
        if let Some(id) = old.blob {
            self.ids.retire(id);
        }
    }

    /// Removes the cached answers whose names `route` sends elsewhere now (a stub domain or the
    /// kube-dns ConfigMap changed): the agent asks the new upstreams when a pod asks again.
    /// Returns how many left.
    pub fn drop_rerouted(&mut self, route: &dyn Fn(&[u8]) -> UpstreamSetId) -> usize {
        let gone: Vec<(Question, bool)> = self
            .written
            .iter()
            .filter(|((q, autopath), w)| !autopath && w.set != route(&q.name))
            .map(|(slot, _)| slot.clone())
            .collect();
        for s in &gone {
            if let Some(key) = key(&s.0, false) {
                self.remove(s, &key);
            }
        }
        gone.len()
    }

    /// Deletes the blobs retired long enough ago.
    pub fn reap(&mut self) -> usize {
        self.ids.reap(&mut self.maps.blobs)
    }
}

/// Keeps the kernel's cache maps equal to what `cache` holds, and to the completed search paths
/// of `completions`, forever: woken by every change, and once a second to delete retired blobs.
pub async fn follow(
    cache: Arc<crate::server::external::ExternalResolver>,
    completions: Arc<Completions>,
    mut kernel: KernelCache,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    let changed = cache.cache().follow();
    let completed = completions.changed();
    let forwarder = cache.forwarder().clone();
    let route = |name: &[u8]| forwarder.upstream_set_of(name);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut warned = false;
    loop {
        tokio::select! {
            _ = changed.notified() => {}
            _ = completed.notified() => {}
            _ = forwarder.rerouted().notified() => {
                let gone = kernel.drop_rerouted(&route);
                metrics.kernel_writes.fetch_add(gone as u64, Relaxed);
            }
            _ = tick.tick() => {}
        }
        let (written, failed) = kernel.apply(cache.cache(), &completions, &route);
        if failed > 0 && !warned {
            warned = true;
            tracing::warn!(
                failed,
                "cached answers did not fit in the kernel maps; the agent answers them (raise \
                 --cache-size, which sizes the kernel's room too)"
            );
        }
        metrics.kernel_writes.fetch_add(written as u64, Relaxed);
        metrics
            .kernel_write_failures
            .fetch_add(failed as u64, Relaxed);
        metrics
            .kernel_cache_entries
            .store(kernel.len() as u64, Relaxed);
        kernel.reap();
    }
}

impl KernelCache {
    /// Brings the kernel up to date with every change `cache` and `completions` noted;
    /// (entries written or removed, writes that failed). A completion made from a cached
    /// answer the cache no longer holds goes with it. `route` gives the upstream set each name
    /// goes to now: an answer from another set (fetched before the routes changed) stays the
    /// agent's.
    pub fn apply(
        &mut self,
        cache: &Cache,
        completions: &Completions,
        route: &dyn Fn(&[u8]) -> UpstreamSetId,
    ) -> (usize, usize) {
        let mut written = 0;
        let mut failed = 0;
        let mut count = |r: Result<(), WriteError>| match r {
            Ok(()) => written += 1,
            Err(e) => {
                tracing::debug!(error = %e, "a cached answer was not written to the kernel");
                failed += 1;
            }
        };
        for (q, held) in cache.take_changes() {
            completions.cache_changed(&q, held.as_ref().map(|h| &h.answer));
            let held = held.filter(|_| route(&q.name) == q.upstream_set);
            count(self.set_held(&q, held));
        }
        for (q, held) in completions.take_changes() {
            count(self.set_completion(&q, held));
        }
        (written, failed)
    }
}
