//! Names outside the cluster: the cache first, then one upstream query per question however
//! many clients ask it at once (single-flight), prefetch of popular names, and stale answers
//! when every upstream fails.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use tokio::sync::watch;

use super::{
    cache::{AfterFailure, Answer, Cache, Kind, Lookup, STALE_TTL, cache_ttl},
    forward::{ForwardError, Forwarder, Question, QuestionKey},
};
use crate::{dns, metrics::Metrics};

/// What a client gets for a name outside the cluster.
#[derive(Clone, Debug)]
pub enum Resolved {
    /// Serve this answer; with `Some(ttl)` every record carries that TTL, with `None` the TTLs
    /// the upstream gave (an answer that was not cached).
    Answer {
        answer: Arc<Answer>,
        ttl: Option<u32>,
    },
    /// No answer: reply with this RCODE (SERVFAIL, or REFUSED from upstream or over the
    /// concurrency limit).
    Error(u16),
}

/// The end of one upstream query, shared by every client waiting for it.
#[derive(Clone, Debug)]
enum Outcome {
    Answer(Arc<Answer>, Option<u32>),
    Stale(Arc<Answer>),
    Error(u16),
    /// Over `--max-concurrent`: REFUSED, and nothing remembered.
    Overloaded,
}

type Flight = watch::Receiver<Option<Outcome>>;

pub struct ExternalResolver {
    forwarder: Arc<Forwarder>,
    cache: Cache,
    inflight: Mutex<HashMap<Question, Flight>>,
    metrics: Arc<Metrics>,
}

/// How often entries that can no longer be served are dropped.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

impl ExternalResolver {
    pub fn new(forwarder: Arc<Forwarder>, cache: Cache, metrics: Arc<Metrics>) -> Self {
        Self {
            forwarder,
            cache,
            inflight: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    pub fn forwarder(&self) -> &Arc<Forwarder> {
        &self.forwarder
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// What the cache can serve for `q` right now; `None`: ask upstream ([`Self::resolve`]).
    /// Starts a prefetch when the entry is popular and about to expire.
    pub fn cached(self: &Arc<Self>, q: &(impl QuestionKey + ?Sized)) -> Option<Resolved> {
        let c = &self.metrics.cache;
        match self.cache.lookup(q, Instant::now()) {
            Lookup::Hit {
                answer,
                ttl,
                kind,
                prefetch,
            } => {
                c.hits[kind as usize].fetch_add(1, Relaxed);
                if prefetch && self.start(&q.key().to_question()).1 {
                    c.prefetch.fetch_add(1, Relaxed);
                }
                Some(Resolved::Answer {
                    answer,
                    ttl: Some(ttl),
                })
            }
            Lookup::Stale(answer) => {
                c.served_stale.fetch_add(1, Relaxed);
                Some(Resolved::Answer {
                    answer,
                    ttl: Some(STALE_TTL),
                })
            }
            Lookup::Failed(rcode) => {
                c.hits[Kind::Denial as usize].fetch_add(1, Relaxed);
                Some(Resolved::Error(rcode))
            }
            Lookup::Miss => None,
        }
    }

    /// The cache's answer, or the outcome of the upstream query for `q` (shared with every
    /// client asking the same question meanwhile).
    pub async fn resolve(self: &Arc<Self>, q: &Question) -> Resolved {
        if let Some(r) = self.cached(q) {
            return r;
        }
        let c = &self.metrics.cache;
        c.misses.fetch_add(1, Relaxed);
        let (mut flight, _) = self.start(q);
        let outcome = match flight.wait_for(Option::is_some).await {
            Ok(o) => o.clone(),
            // The flight's task is gone without an outcome (it panicked).
            Err(_) => None,
        };
        match outcome {
            Some(Outcome::Answer(answer, ttl)) => Resolved::Answer { answer, ttl },
            Some(Outcome::Stale(answer)) => {
                c.served_stale.fetch_add(1, Relaxed);
                Resolved::Answer {
                    answer,
                    ttl: Some(STALE_TTL),
                }
            }
            Some(Outcome::Error(rcode)) => Resolved::Error(rcode),
            Some(Outcome::Overloaded) => Resolved::Error(dns::RCODE_REFUSED),
            None => Resolved::Error(dns::RCODE_SERVFAIL),
        }
    }

    /// The flight for `q`: the one in progress, or a new one (then `.1` is true). The upstream
    /// query runs in its own task, so it completes (and fills the cache) even if every client
    /// waiting for it goes away.
    fn start(self: &Arc<Self>, q: &Question) -> (Flight, bool) {
        let mut inflight = self.inflight.lock().expect("inflight lock");
        if let Some(f) = inflight.get(q) {
            return (f.clone(), false);
        }
        let (tx, rx) = watch::channel(None);
        inflight.insert(q.clone(), rx.clone());
        drop(inflight);
        let this = self.clone();
        let q = q.clone();
        tokio::spawn(async move {
            // Leaves the in-flight table however the task ends (a panic included), so that a
            // question can never be stuck behind a dead flight.
            let _done = Landing {
                resolver: &this,
                q: &q,
            };
            let outcome = this.fetch(&q).await;
            // The cache has the answer by now; new clients find it there. Waiting clients get
            // it here.
            drop(_done);
            let _ = tx.send(Some(outcome));
        });
        (rx, true)
    }

    async fn fetch(&self, q: &Question) -> Outcome {
        let e = match self.forwarder.resolve(q).await {
            Ok(x) => match Answer::from_upstream(&x.bytes, &x.message) {
                Ok(answer) => {
                    let answer = Arc::new(answer);
                    return match cache_ttl(&x.message, self.cache.settings()) {
                        Some((ttl, kind)) => {
                            self.cache
                                .insert(q, answer.clone(), ttl, kind, Instant::now());
                            Outcome::Answer(answer, Some(ttl))
                        }
                        None => Outcome::Answer(answer, None),
                    };
                }
                Err(e) => {
                    tracing::warn!(error = %e, "an upstream answer could not be kept");
                    ForwardError::Failed {
                        rcode: dns::RCODE_SERVFAIL,
                        detail: e.to_string(),
                    }
                }
            },
            Err(e @ ForwardError::Overloaded(_)) => {
                tracing::debug!(error = %e, "upstream query refused");
                return Outcome::Overloaded;
            }
            Err(e) => e,
        };
        tracing::debug!(error = %e, "forwarding failed");
        match self.cache.fail(q, e.rcode(), Instant::now()) {
            AfterFailure::Fresh(answer, ttl) => Outcome::Answer(answer, Some(ttl)),
            AfterFailure::Stale(answer) => Outcome::Stale(answer),
            AfterFailure::Failed(rcode) => Outcome::Error(rcode),
        }
    }

    /// Drops cache entries that can no longer be served, forever.
    pub async fn sweep(self: Arc<Self>) -> std::io::Result<()> {
        loop {
            tokio::time::sleep(SWEEP_INTERVAL).await;
            let n = self.cache.sweep(Instant::now());
            if n > 0 {
                tracing::debug!(removed = n, "cache swept");
            }
        }
    }
}

/// Removes a question from the in-flight table when dropped.
struct Landing<'a> {
    resolver: &'a ExternalResolver,
    q: &'a Question,
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        if let Ok(mut inflight) = self.resolver.inflight.lock() {
            inflight.remove(self.q);
        }
    }
}
