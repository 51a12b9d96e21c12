//! Search-path completion (`--autopath`), with CoreDNS `autopath` semantics.
//!
//! A pod with the Kubernetes `resolv.conf` (`search <ns>.svc.<zone> svc.<zone> <zone>`,
//! `ndots:5`) asks `<name>.<ns>.svc.<zone>` first for almost every name. When that name does not
//! exist in the zone, and the pod asking is of namespace `<ns>` (its address is one of this
//! node's Pods), the agent walks the rest of the search list itself — `<name>.svc.<zone>`,
//! `<name>.<zone>`, then `<name>.` — and answers with the first reply that is not NXDOMAIN, a
//! CNAME from the asked name to the name that answered put in front of its answer records (as
//! CoreDNS's `cnamer` does: none when the answer section is empty). If every one is NXDOMAIN
//! (or the bare name's upstream fails), the reply is the asked name's own NXDOMAIN. One round
//! trip instead of four or five.
//!
//! The completed answer is an [`Answer`] for the asked name (hickory-proto encodes it once), so
//! userspace serves it as the cache serves an upstream answer ([`reply_from_answer`]), and the
//! kernel gets the same bytes: [`Completions`] keeps the completions the XDP program may serve
//! (in the cache maps, variant `CACHE_AUTOPATH`, served only to pods of the namespace), each
//! with what it depends on. One that ends in the zone lasts until a zone change touches a name
//! the walk looked at; one that ends upstream expires with the cached answer and leaves when
//! the cache drops or replaces that answer.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::IpAddr,
    sync::{Arc, Mutex, RwLock},
    time::Instant,
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query as HQuery},
    rr::{DNSClass, RData, Record, RecordType, rdata::CNAME},
};

use super::{
    Handler, ZoneReply, answer_from_zone, cache::Answer, external::Resolved, forward::Question,
    reply_from_answer,
};
use crate::{
    dns::{self, Query},
    source::pods::PodTable,
    zone::{
        Resolution, ZoneModel,
        name::{WireName, to_name},
    },
};

/// Search-path completion for the pods of this node.
pub struct Autopath {
    /// `svc.<zone>` and `<zone>`, wire format: the search list after the namespace's element.
    svc_zone: WireName,
    zone: WireName,
    /// `pod.<zone>`: names below it are synthesised per query, and nothing tells when their
    /// answers change, so completions through them are not kept for the kernel.
    pod_zone: WireName,
    pods: Arc<RwLock<PodTable>>,
    completions: Arc<Completions>,
}

/// Where the search list ends for a query that is completed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Walk {
    /// A name of the zone answers (or is NODATA): the reply is its reply.
    Zone {
        target: WireName,
        /// The names looked at before it, the asked one first.
        tried: Vec<WireName>,
    },
    /// The bare name, which is not the cluster's: the cache or upstream answers it.
    External {
        target: WireName,
        tried: Vec<WireName>,
    },
    /// Every name of the search list, the bare one included, does not exist in the zone.
    NotFound,
}

/// A completion waiting for an upstream.
#[derive(Debug)]
pub struct Deferred {
    walk: Walk,
    generation: u64,
}

impl Autopath {
    pub fn new(zone: &[u8], pods: Arc<RwLock<PodTable>>, completions: Arc<Completions>) -> Self {
        let with = |label: &[u8]| {
            let mut n = vec![label.len() as u8];
            n.extend_from_slice(label);
            n.extend_from_slice(zone);
            n
        };
        Self {
            svc_zone: with(b"svc"),
            zone: zone.to_vec(),
            pod_zone: with(b"pod"),
            pods,
            completions,
        }
    }

    pub fn completions(&self) -> &Arc<Completions> {
        &self.completions
    }

    /// The walk for `q` from `peer`, when it is completed: `peer` is a pod of this node, the
    /// name is under its namespace's first search element and does not exist in the zone.
    pub fn walk(&self, zone: &ZoneModel, q: &Query<'_>, peer: IpAddr) -> Option<Walk> {
        if q.qclass != dns::CLASS_IN || q.edns.is_some_and(|e| e.version > 0) {
            return None;
        }
        let ns = self.pods.read().expect("pods lock").namespace_of(peer)?;
        let base = base_name(&q.qname, &ns, &self.svc_zone)?;
        if zone.resolve(&q.qname, q.qtype) != Resolution::Nxdomain {
            // The name exists (CoreDNS's first try answers it) or the zone is not loaded.
            return None;
        }
        let mut tried = vec![q.qname.clone()];
        for suffix in [&self.svc_zone, &self.zone] {
            let target = [base, suffix.as_slice()].concat();
            match zone.resolve(&target, q.qtype) {
                Resolution::Nxdomain => tried.push(target),
                Resolution::NotReady => return None,
                _ => return Some(Walk::Zone { target, tried }),
            }
        }
        let target = [base, &[0]].concat();
        match zone.resolve(&target, q.qtype) {
            Resolution::Forward => Some(Walk::External { target, tried }),
            Resolution::Nxdomain => Some(Walk::NotFound),
            Resolution::NotReady => None,
            _ => Some(Walk::Zone { target, tried }),
        }
    }

    fn under_pod_zone(&self, name: &[u8]) -> bool {
        name.len() > self.pod_zone.len() && name.ends_with(&self.pod_zone)
    }
}

/// `<name>` (labels, no root) of `<name>.<ns>.svc.<zone>`; `None` when `qname` is not below the
/// namespace's search element, or is the element itself.
fn base_name<'a>(qname: &'a [u8], ns: &str, svc_zone: &[u8]) -> Option<&'a [u8]> {
    let mut element = vec![ns.len() as u8];
    element.extend(ns.bytes().map(|b| b.to_ascii_lowercase()));
    element.extend_from_slice(svc_zone);
    // At a label boundary, with at least one label before it.
    let mut i = 0;
    while let Some(&len) = qname.get(i) {
        if len == 0 {
            return None;
        }
        i += 1 + len as usize;
        if qname.get(i..) == Some(element.as_slice()) {
            return Some(&qname[..i]);
        }
    }
    None
}

/// The query for `target` a completion asks (of the zone, the cache or upstream), as `q` asks
/// it: same type, class, DO and CD; no EDNS in the bytes, so no OPT in the reply.
fn question_bytes(target: &[u8], q: &Query<'_>) -> Vec<u8> {
    let mut b = target.to_vec();
    b.extend_from_slice(&q.qtype.to_be_bytes());
    b.extend_from_slice(&q.qclass.to_be_bytes());
    b
}

/// The completed answer to `q`: `reply` (the reply for the name the search list ended at) with
/// the question `q` asked and a CNAME from the asked name to the first answer record's owner
/// that is not the asked name (CoreDNS's `cnamer`; none when there is no answer record), its TTL
/// that record's.
pub fn complete(q: &Query<'_>, reply: &Message) -> Option<Answer> {
    let asked = to_name(&q.qname);
    let mut m = Message::new(0, MessageType::Response, OpCode::Query);
    m.metadata.recursion_available = reply.metadata.recursion_available;
    m.metadata.authoritative = reply.metadata.authoritative;
    m.metadata.authentic_data = reply.metadata.authentic_data;
    m.metadata.response_code = reply.metadata.response_code;
    let mut query = HQuery::query(asked.clone(), RecordType::from(q.qtype));
    query.set_query_class(DNSClass::from(q.qclass));
    m.add_query(query);
    let mut answers = reply.answers.clone();
    if let Some(first) = answers.iter().find(|r| r.name != asked) {
        let cname = Record::from_rdata(
            asked.clone(),
            first.ttl,
            RData::CNAME(CNAME(first.name.clone())),
        );
        answers.insert(0, cname);
    }
    m.insert_answers(answers);
    m.insert_authorities(reply.authorities.clone());
    m.insert_additionals(reply.additionals.clone());
    let bytes = m.to_vec().ok()?;
    let mut answer = Answer::from_upstream(&bytes, &m).ok()?;
    answer.authoritative = reply.metadata.authoritative;
    Some(answer)
}

impl Handler {
    /// `q` from `peer`, if it is a search-path expansion to complete: the reply when it needs
    /// no upstream, or the walk to finish in [`Handler::finish`].
    pub(super) fn complete_now(
        &self,
        zone: &ZoneModel,
        q: &Query<'_>,
        peer: IpAddr,
        limit: Option<usize>,
    ) -> Option<ZoneReply> {
        let autopath = self.autopath.as_ref()?;
        let generation = autopath.completions.generation();
        let walk = autopath.walk(zone, q, peer)?;
        Some(match walk {
            Walk::Zone { target, tried } => {
                let question = question_bytes(&target, q);
                let tq = Query {
                    question: &question,
                    qname: target.clone(),
                    edns: None,
                    ..q.clone()
                };
                match answer_from_zone(zone, &tq, None) {
                    ZoneReply::Reply(bytes) => {
                        let Some(answer) =
                            Message::from_vec(&bytes).ok().and_then(|m| complete(q, &m))
                        else {
                            return Some(ZoneReply::Reply(self.not_completed(zone, q, limit)));
                        };
                        let answer = Arc::new(answer);
                        let mut deps = tried;
                        deps.push(target);
                        if !deps.iter().any(|n| autopath.under_pod_zone(n)) {
                            autopath.completions.record(
                                self.question_of(q, q.qname.clone()),
                                Completion {
                                    answer: answer.clone(),
                                    expires: None,
                                    zone_names: deps,
                                    cached: None,
                                },
                                generation,
                            );
                        }
                        ZoneReply::Reply(reply_from_answer(q, &answer, None, limit))
                    }
                    // An ExternalName: its target is chased upstream first.
                    _ => ZoneReply::Complete(Box::new(Deferred {
                        walk: Walk::Zone { target, tried },
                        generation,
                    })),
                }
            }
            Walk::External { target, tried } => {
                let question = self.question_of(q, target.clone());
                match self.external.cached(&question) {
                    Some(resolved) => ZoneReply::Reply(
                        self.complete_external(q, &question, resolved, tried, generation, limit),
                    ),
                    None => ZoneReply::Complete(Box::new(Deferred {
                        walk: Walk::External { target, tried },
                        generation,
                    })),
                }
            }
            Walk::NotFound => ZoneReply::Reply(self.not_completed(zone, q, limit)),
        })
    }

    /// Finishes a completion that waited for an upstream.
    pub(super) async fn complete_later(
        &self,
        q: &Query<'_>,
        deferred: Deferred,
        limit: Option<usize>,
    ) -> Vec<u8> {
        match deferred.walk {
            Walk::External { target, tried } => {
                let question = self.question_of(q, target);
                let resolved = self.external.resolve(&question).await;
                self.complete_external(q, &question, resolved, tried, deferred.generation, limit)
            }
            Walk::Zone { target, .. } => {
                // An ExternalName in the search list: the zone's CNAME and its chased target,
                // completed; not kept for the kernel (it depends on an upstream answer too).
                let question = question_bytes(&target, q);
                let tq = Query {
                    question: &question,
                    qname: target.clone(),
                    edns: None,
                    ..q.clone()
                };
                let chased = {
                    let zone = self.zone.read().expect("zone lock poisoned");
                    answer_from_zone(&zone, &tq, None)
                };
                let bytes = match chased {
                    ZoneReply::Chase { cname, target } => {
                        self.chase_upstream(&tq, *cname, &target, None).await
                    }
                    ZoneReply::Reply(bytes) => bytes,
                    _ => dns::build_reply(&tq, dns::Body::empty(dns_common::FLAG_RA), None),
                };
                match Message::from_vec(&bytes).ok().and_then(|m| complete(q, &m)) {
                    Some(answer) => reply_from_answer(q, &answer, None, limit),
                    None => self.error_reply(q, dns::RCODE_SERVFAIL, limit),
                }
            }
            Walk::NotFound => {
                let zone = self.zone.read().expect("zone lock poisoned");
                self.not_completed(&zone, q, limit)
            }
        }
    }

    /// The completion from the bare name's answer (cached or fresh). NXDOMAIN, or no answer at
    /// all, ends the search list: the asked name's own NXDOMAIN.
    fn complete_external(
        &self,
        q: &Query<'_>,
        question: &Question,
        resolved: Resolved,
        tried: Vec<WireName>,
        generation: u64,
        limit: Option<usize>,
    ) -> Vec<u8> {
        let not_found = || {
            let zone = self.zone.read().expect("zone lock poisoned");
            self.not_completed(&zone, q, limit)
        };
        let Resolved::Answer { answer, ttl } = resolved else {
            return not_found();
        };
        if answer.rcode == dns::RCODE_NXDOMAIN {
            return not_found();
        }
        let Some(completed) = answer
            .to_message(question, ttl)
            .and_then(|m| complete(q, &m))
        else {
            return self.error_reply(q, dns::RCODE_SERVFAIL, limit);
        };
        let completed = Arc::new(completed);
        // Kept for the kernel while the cache holds this very answer: it expires with it.
        if let (Some(autopath), Some(_)) = (&self.autopath, ttl)
            && let Some((held, expires)) = self.external.cache().peek(question)
            && Arc::ptr_eq(&held, &answer)
        {
            autopath.completions.record(
                self.question_of(q, q.qname.clone()),
                Completion {
                    answer: completed.clone(),
                    expires: Some(expires),
                    zone_names: tried,
                    cached: Some((question.clone(), held)),
                },
                generation,
            );
        }
        reply_from_answer(q, &completed, ttl, limit)
    }

    /// The asked name's own reply (NXDOMAIN): no name of the search list answered.
    fn not_completed(&self, zone: &ZoneModel, q: &Query<'_>, limit: Option<usize>) -> Vec<u8> {
        match answer_from_zone(zone, q, limit) {
            ZoneReply::Reply(r) => r,
            _ => dns::build_reply(
                q,
                dns::Body::empty(dns_common::FLAG_RA | dns::RCODE_SERVFAIL),
                limit,
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What the kernel may serve.

/// A completed search path the kernel may serve, and what it depends on.
#[derive(Clone, Debug)]
pub struct Completion {
    pub answer: Arc<Answer>,
    /// `None`: it ends in the zone, and stays until a zone change touches `zone_names`.
    pub expires: Option<Instant>,
    /// The zone's names the walk looked at: a change to any of them may change it.
    pub zone_names: Vec<WireName>,
    /// The cached answer it ends with: when the cache drops or replaces it, so does this.
    pub cached: Option<(Question, Arc<Answer>)>,
}

/// What a completion's key holds now: the answer and its expiry, or nothing.
pub type CompletionChange = (Question, Option<(Arc<Answer>, Option<Instant>)>);

/// The completions the kernel may serve, at most `capacity` (the oldest go first), and the keys
/// changed since the kernel's writer last looked.
pub struct Completions {
    inner: Mutex<CompletionsInner>,
    changed: Arc<tokio::sync::Notify>,
}

#[derive(Default)]
struct CompletionsInner {
    capacity: usize,
    entries: HashMap<Question, Completion>,
    /// Oldest first; may name keys already gone or recorded again (checked when evicting).
    order: VecDeque<Question>,
    by_zone_name: HashMap<WireName, HashSet<Question>>,
    by_cached: HashMap<Question, HashSet<Question>>,
    changed: HashSet<Question>,
    /// Bumped by every zone change: a completion worked out before one is not recorded after it.
    generation: u64,
}

impl Completions {
    /// `capacity` 0: none are kept (no kernel cache).
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(CompletionsInner {
                capacity,
                ..CompletionsInner::default()
            }),
            changed: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Woken when a key changes.
    pub fn changed(&self) -> Arc<tokio::sync::Notify> {
        self.changed.clone()
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("completions lock").entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The zone's generation now: take it before reading the zone for a completion.
    pub fn generation(&self) -> u64 {
        self.inner.lock().expect("completions lock").generation
    }

    /// Keeps `completion` for the key `n` (the asked name's question), unless the zone changed
    /// since `generation` was taken.
    pub fn record(&self, n: Question, completion: Completion, generation: u64) {
        let mut inner = self.inner.lock().expect("completions lock");
        if inner.capacity == 0 || inner.generation != generation {
            return;
        }
        if let Some(old) = inner.entries.get(&n)
            && Arc::ptr_eq(&old.answer, &completion.answer)
            && old.expires == completion.expires
        {
            return;
        }
        inner.remove(&n);
        while inner.entries.len() >= inner.capacity {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            inner.remove(&oldest);
        }
        for name in &completion.zone_names {
            inner
                .by_zone_name
                .entry(name.clone())
                .or_default()
                .insert(n.clone());
        }
        if let Some((cached, _)) = &completion.cached {
            inner
                .by_cached
                .entry(cached.clone())
                .or_default()
                .insert(n.clone());
        }
        inner.order.push_back(n.clone());
        inner.changed.insert(n.clone());
        inner.entries.insert(n, completion);
        drop(inner);
        self.changed.notify_one();
    }

    /// The zone changed `names`: completions that looked at any of them go.
    pub fn zone_changed<'a>(&self, names: impl IntoIterator<Item = &'a WireName>) {
        let mut inner = self.inner.lock().expect("completions lock");
        inner.generation += 1;
        let mut gone = HashSet::new();
        for name in names {
            if let Some(keys) = inner.by_zone_name.get(name) {
                gone.extend(keys.iter().cloned());
            }
        }
        let any = !gone.is_empty();
        for n in gone {
            inner.remove(&n);
        }
        drop(inner);
        if any {
            self.changed.notify_one();
        }
    }

    /// The cache holds `held` for `question` now: completions made from another answer go.
    pub fn cache_changed(&self, question: &Question, held: Option<&Arc<Answer>>) {
        let mut inner = self.inner.lock().expect("completions lock");
        let Some(keys) = inner.by_cached.get(question) else {
            return;
        };
        let gone: Vec<Question> = keys
            .iter()
            .filter(|n| {
                inner.entries.get(*n).is_none_or(|c| {
                    c.cached
                        .as_ref()
                        .is_none_or(|(_, a)| held.is_none_or(|h| !Arc::ptr_eq(a, h)))
                })
            })
            .cloned()
            .collect();
        let any = !gone.is_empty();
        for n in gone {
            inner.remove(&n);
        }
        drop(inner);
        if any {
            self.changed.notify_one();
        }
    }

    /// The keys changed since the last call, with what each holds now.
    pub fn take_changes(&self) -> Vec<CompletionChange> {
        let mut inner = self.inner.lock().expect("completions lock");
        let keys = std::mem::take(&mut inner.changed);
        keys.into_iter()
            .map(|n| {
                let held = inner.entries.get(&n).map(|c| (c.answer.clone(), c.expires));
                (n, held)
            })
            .collect()
    }
}

impl CompletionsInner {
    fn remove(&mut self, n: &Question) {
        let Some(c) = self.entries.remove(n) else {
            return;
        };
        for name in &c.zone_names {
            if let Some(keys) = self.by_zone_name.get_mut(name) {
                keys.remove(n);
                if keys.is_empty() {
                    self.by_zone_name.remove(name);
                }
            }
        }
        if let Some((cached, _)) = &c.cached
            && let Some(keys) = self.by_cached.get_mut(cached)
        {
            keys.remove(n);
            if keys.is_empty() {
                self.by_cached.remove(cached);
            }
        }
        self.changed.insert(n.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zone::name::wire_from_dotted;

    #[test]
    fn the_base_name_is_what_comes_before_the_namespaces_element() {
        let svc_zone = wire_from_dotted("svc.cluster.local");
        let q = wire_from_dotted("www.example.org.shop.svc.cluster.local");
        assert_eq!(
            base_name(&q, "shop", &svc_zone),
            Some(&wire_from_dotted("www.example.org")[..16])
        );
        // Another namespace's element, the element itself, a name merely ending the same.
        assert_eq!(base_name(&q, "batch", &svc_zone), None);
        let element = wire_from_dotted("shop.svc.cluster.local");
        assert_eq!(base_name(&element, "shop", &svc_zone), None);
        let lookalike = wire_from_dotted("x.workshop.svc.cluster.local");
        assert_eq!(base_name(&lookalike, "shop", &svc_zone), None);
    }
}
