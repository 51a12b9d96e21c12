//! The cluster zone: Kubernetes objects in, DNS answers out.
//!
//! One model feeds both sinks: [`ZoneModel::kernel_entries`] gives what the XDP program serves
//! for a name, [`ZoneModel::resolve`] what the userspace server answers for a query. Both come
//! from the same records and the same encoder, so the kernel never says anything userspace
//! would not. Semantics follow the Kubernetes DNS specification 1.1.0 and, where it is
//! silent, CoreDNS's `kubernetes` plugin (see README.md for the record set and the few places
//! where xdns deliberately differs).

pub mod encode;
pub mod name;
pub mod objects;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use dns_common::{BLOB_DATA_LEN, FLAG_AA, FLAG_RA, QTYPE_OTHER, RCODE_NXDOMAIN, SOA_RECORD_LEN};
use hickory_proto::rr::{
    RData, Record, RecordType,
    rdata::{A, AAAA, CNAME, NS, PTR, SOA, SRV, TXT},
};

pub use self::encode::Sections;
use self::{
    encode::{encode_sections, soa_record, soa_template},
    name::{
        QueryName, WireName, ZoneName, classify, reverse_name, to_name, wire_from_dotted,
        wire_from_labels,
    },
    objects::{
        ClusterObject, EndpointInfo, Kind, ObjectKey, ServiceInfo, ServiceKind, SliceInfo,
        endpoint_label,
    },
};

/// Hands out [`ZoneVersion::id`]s.
static NEXT_MODEL_ID: AtomicU64 = AtomicU64::new(1);

/// The Kubernetes DNS schema version served at `dns-version.<zone>`.
pub const SCHEMA_VERSION: &str = "1.1.0";

const T_A: u16 = 1;
const T_NS: u16 = 2;
const T_CNAME: u16 = 5;
const T_SOA: u16 = 6;
const T_PTR: u16 = 12;
const T_TXT: u16 = 16;
const T_AAAA: u16 = 28;
const T_SRV: u16 = 33;
const T_IXFR: u16 = 251;
const T_AXFR: u16 = 252;
const T_ANY: u16 = 255;

/// Settings of the zone, from the command line.
#[derive(Clone, Debug)]
pub struct ZoneSettings {
    /// The cluster domain, lowercased (`cluster.local`).
    pub domain: String,
    /// TTL of positive answers.
    pub ttl: u32,
    /// TTL of negative answers (and the SOA's minimum).
    pub negative_ttl: u32,
    /// Addresses of `ns.dns.<zone>`, the name server of the apex NS record: where pods
    /// reach this agent.
    pub ns_addrs: Vec<IpAddr>,
    /// The SOA serial.
    pub serial: u32,
}

/// A change to the model.
#[derive(Clone, Debug)]
pub enum Change {
    Upsert(ClusterObject),
    DeleteNamespace(Arc<str>),
    Delete(Kind, ObjectKey),
}

/// What a query gets from the zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Positive answer: header bits (AA, RA) and the encoded sections.
    Answer { flags: u16, sections: Sections },
    /// The name exists, the type does not: NOERROR, empty answer, the zone SOA.
    Nodata,
    /// The name does not exist: NXDOMAIN with the zone SOA.
    Nxdomain,
    /// The name is an alias: the CNAME record, and its target to chase for the query type.
    Cname {
        cname: Box<Record>,
        target: WireName,
    },
    /// Not the cluster's to answer: forward upstream.
    Forward,
    /// The zone has not been loaded yet: SERVFAIL.
    NotReady,
    /// Zone transfers are not served.
    Refused,
}

/// What the kernel holds for one `(name, qtype)` key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelAnswer {
    Answer { flags: u16, sections: Sections },
    Nodata,
    Pass,
}

/// Header bits of every answer from the zone: authoritative, and recursion offered (the agent
/// forwards what is not the cluster's).
pub const ZONE_FLAGS: u16 = FLAG_AA | FLAG_RA;
pub const NXDOMAIN_FLAGS: u16 = ZONE_FLAGS | RCODE_NXDOMAIN;

/// The records at a name.
#[derive(Clone, Debug, Default)]
struct RecordSets {
    addrs: BTreeSet<IpAddr>,
    srv: BTreeMap<(u16, WireName), BTreeSet<IpAddr>>,
    ptr: BTreeSet<WireName>,
    txt: Option<&'static str>,
    soa: bool,
    ns: bool,
}

impl RecordSets {
    fn types(&self) -> Vec<u16> {
        let mut t = Vec::new();
        if self.addrs.iter().any(IpAddr::is_ipv4) {
            t.push(T_A);
        }
        if self.addrs.iter().any(IpAddr::is_ipv6) {
            t.push(T_AAAA);
        }
        if !self.srv.is_empty() {
            t.push(T_SRV);
        }
        if !self.ptr.is_empty() {
            t.push(T_PTR);
        }
        if self.txt.is_some() {
            t.push(T_TXT);
        }
        if self.soa {
            t.push(T_SOA);
        }
        if self.ns {
            t.push(T_NS);
        }
        t
    }
}

/// A name's place in the zone.
#[derive(Clone, Debug)]
enum Node {
    Missing,
    Forward,
    Cname(WireName),
    /// Exists; types it lacks get NODATA.
    Data(RecordSets),
    /// A reverse name of a cluster address: PTR here, every other type forwarded.
    Reverse(RecordSets),
}

/// Who owns an address, for its PTR records. Almost always one owner: small sorted vectors,
/// not trees (a B-tree node would cost hundreds of bytes for every pod address).
#[derive(Debug, Default)]
struct ReverseOwners {
    /// Services with this cluster IP, sorted.
    services: Vec<ObjectKey>,
    /// Ready endpoints with this address, sorted: (service, endpoint label, how many slices
    /// list it).
    endpoints: Vec<(ObjectKey, Box<str>, u32)>,
}

impl ReverseOwners {
    fn is_empty(&self) -> bool {
        self.services.is_empty() && self.endpoints.is_empty()
    }

    fn add_service(&mut self, key: &ObjectKey) {
        if let Err(at) = self.services.binary_search(key) {
            self.services.insert(at, key.clone());
        }
    }

    fn remove_service(&mut self, key: &ObjectKey) {
        if let Ok(at) = self.services.binary_search(key) {
            self.services.remove(at);
        }
    }

    fn add_endpoint(&mut self, service: &ObjectKey, label: Box<str>) {
        match self
            .endpoints
            .binary_search_by(|(s, l, _)| (s, &**l).cmp(&(service, &*label)))
        {
            Ok(at) => self.endpoints[at].2 += 1,
            Err(at) => self.endpoints.insert(at, (service.clone(), label, 1)),
        }
    }

    fn remove_endpoint(&mut self, service: &ObjectKey, label: &str) {
        if let Ok(at) = self
            .endpoints
            .binary_search_by(|(s, l, _)| (s, &**l).cmp(&(service, label)))
        {
            self.endpoints[at].2 -= 1;
            if self.endpoints[at].2 == 0 {
                self.endpoints.remove(at);
            }
        }
    }
}

/// Which model, and how far it has changed: readable without the model's lock, so that copies
/// of its answers kept elsewhere (the userspace server keeps encoded answers per thread) can
/// tell at once whether they are still the model's. The model is changed in place behind its
/// lock, never replaced, so one `ZoneVersion` follows it for good.
#[derive(Debug)]
pub struct ZoneVersion {
    id: u64,
    generation: AtomicU64,
}

impl ZoneVersion {
    /// Tells models apart (one per [`ZoneModel::new`] in this process).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Moves on with every change of the model's answers.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// Names whose answers the recent changes touched, kept so that copies of answers can drop just
/// those. Bounded: a copy further behind than the log reaches starts over.
#[derive(Debug, Default)]
struct ChangeLog {
    /// (generation the change made, the names it touched), oldest first.
    recent: VecDeque<(u64, Vec<WireName>)>,
    names: usize,
    /// Copies at this generation or later can catch up with `recent`; older ones cannot.
    floor: u64,
}

/// Names the change log holds at most (about 40 bytes each).
const CHANGE_LOG_NAMES: usize = 16_384;

/// The cluster zone.
#[derive(Debug)]
pub struct ZoneModel {
    settings: ZoneSettings,
    zone: WireName,
    soa_template: [u8; SOA_RECORD_LEN],
    synced: bool,
    namespaces: HashSet<Arc<str>>,
    services_in_ns: HashMap<Arc<str>, usize>,
    services: HashMap<ObjectKey, ServiceInfo>,
    slices: HashMap<ObjectKey, SliceInfo>,
    /// Service → names of its slices.
    slices_of: HashMap<ObjectKey, Vec<Arc<str>>>,
    reverse: HashMap<IpAddr, ReverseOwners>,
    /// Endpoints of all slices, kept as slices come and go (metrics read it per change).
    endpoints: usize,
    version: Arc<ZoneVersion>,
    changes: ChangeLog,
}

impl ZoneModel {
    pub fn new(settings: ZoneSettings) -> Self {
        let zone = wire_from_dotted(&settings.domain.to_ascii_lowercase());
        let soa_template = soa_template(settings.negative_ttl, settings.serial);
        Self {
            settings,
            zone,
            soa_template,
            synced: false,
            namespaces: HashSet::new(),
            services_in_ns: HashMap::new(),
            services: HashMap::new(),
            slices: HashMap::new(),
            slices_of: HashMap::new(),
            reverse: HashMap::new(),
            endpoints: 0,
            version: Arc::new(ZoneVersion {
                id: NEXT_MODEL_ID.fetch_add(1, Ordering::Relaxed),
                generation: AtomicU64::new(0),
            }),
            changes: ChangeLog::default(),
        }
    }

    pub fn settings(&self) -> &ZoneSettings {
        &self.settings
    }

    /// The zone's name, lowercased wire format.
    pub fn zone_wire(&self) -> &[u8] {
        &self.zone
    }

    pub fn soa_template(&self) -> &[u8; SOA_RECORD_LEN] {
        &self.soa_template
    }

    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Marks the first full load done: from now on the zone answers.
    pub fn set_synced(&mut self) {
        self.synced = true;
        self.record_change(None);
    }

    /// This model's identity and generation, for copies of its answers.
    pub fn version(&self) -> &Arc<ZoneVersion> {
        &self.version
    }

    /// The names whose answers changed since `generation` of this model; `None` when the model
    /// no longer remembers that far back (then any answer may have changed).
    pub fn changed_since(&self, generation: u64) -> Option<impl Iterator<Item = &[u8]>> {
        (generation >= self.changes.floor).then(|| {
            self.changes
                .recent
                .iter()
                .filter(move |(g, _)| *g > generation)
                .flat_map(|(_, names)| names.iter().map(Vec::as_slice))
        })
    }

    /// Does the answer for `qname` change only when a change touches `qname` itself
    /// ([`Self::touched`])? True of every name the kernel may hold, since the kernel maps are
    /// kept up to date the same way. Not of pod names (`a-b-c-d.<ns>.pod.<zone>`): they exist
    /// with their namespace, whose changes touch `<ns>.pod.<zone>` alone.
    pub fn answer_follows_name(&self, qname: &[u8]) -> bool {
        !matches!(
            classify(qname, &self.zone),
            QueryName::Zone(ZoneName::Pod { .. })
        )
    }

    /// A new generation: the names `touched` changed, or with `None`, possibly everything.
    fn record_change(&mut self, touched: Option<BTreeSet<WireName>>) {
        let generation = self.version.generation.load(Ordering::Relaxed) + 1;
        let log = &mut self.changes;
        match touched {
            Some(names) => {
                log.names += names.len();
                log.recent
                    .push_back((generation, names.into_iter().collect()));
                while log.names > CHANGE_LOG_NAMES {
                    let Some((g, names)) = log.recent.pop_front() else {
                        break;
                    };
                    log.names -= names.len();
                    log.floor = g;
                }
            }
            None => {
                log.recent.clear();
                log.names = 0;
                log.floor = generation;
            }
        }
        self.version.generation.store(generation, Ordering::Release);
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn slice_count(&self) -> usize {
        self.slices.len()
    }

    pub fn endpoint_count(&self) -> usize {
        self.endpoints
    }

    /// The SOA record of a negative answer for `qname` (which is in the zone).
    pub fn negative_soa(&self, qname: &[u8]) -> [u8; SOA_RECORD_LEN] {
        soa_record(&self.soa_template, qname.len() - self.zone.len())
    }

    // --- changes ------------------------------------------------------------------------------

    /// Every name whose answers `changes` may change, judged against the current state: call
    /// before [`ZoneModel::apply`], so that the old answers can be read first.
    pub fn touched(&self, changes: &[Change]) -> BTreeSet<WireName> {
        let mut touched = BTreeSet::new();
        for change in changes {
            self.touched_by(change, &mut touched);
        }
        touched
    }

    /// Applies changes in order.
    pub fn apply(&mut self, changes: impl IntoIterator<Item = Change>) {
        let changes: Vec<Change> = changes.into_iter().collect();
        // Before the first full load nothing is answered, so nothing was copied: no need to
        // say which names changed.
        let touched = self.synced.then(|| self.touched(&changes));
        for change in changes {
            self.apply_one(change);
        }
        self.record_change(touched);
    }

    /// Replaces every object of `kind` by `objects` (a relist is the new truth: what it lacks
    /// is gone). Returns the changes that make it so; unchanged objects yield none.
    pub fn diff_relist(&self, kind: Kind, objects: Vec<ClusterObject>) -> Vec<Change> {
        let mut changes = Vec::new();
        match kind {
            Kind::Namespace => {
                let mut seen = HashSet::new();
                for o in objects {
                    if let ClusterObject::Namespace(ns) = o {
                        if !self.namespaces.contains(&ns) {
                            changes.push(Change::Upsert(ClusterObject::Namespace(ns.clone())));
                        }
                        seen.insert(ns);
                    }
                }
                for ns in &self.namespaces {
                    if !seen.contains(ns) {
                        changes.push(Change::DeleteNamespace(ns.clone()));
                    }
                }
            }
            Kind::Service => {
                let mut seen = HashSet::new();
                for o in objects {
                    if let ClusterObject::Service(key, info) = o {
                        if self.services.get(&key) != Some(&info) {
                            changes.push(Change::Upsert(ClusterObject::Service(key.clone(), info)));
                        }
                        seen.insert(key);
                    }
                }
                for key in self.services.keys() {
                    if !seen.contains(key) {
                        changes.push(Change::Delete(Kind::Service, key.clone()));
                    }
                }
            }
            Kind::EndpointSlice => {
                let mut seen = HashSet::new();
                for o in objects {
                    if let ClusterObject::Slice(key, info) = o {
                        if self.slices.get(&key) != Some(&info) {
                            changes.push(Change::Upsert(ClusterObject::Slice(key.clone(), info)));
                        }
                        seen.insert(key);
                    }
                }
                for key in self.slices.keys() {
                    if !seen.contains(key) {
                        changes.push(Change::Delete(Kind::EndpointSlice, key.clone()));
                    }
                }
            }
            // Not zone data: the forwarding routes take it (`app.rs`).
            Kind::ConfigMap => {}
        }
        changes
    }

    fn touched_by(&self, change: &Change, out: &mut BTreeSet<WireName>) {
        match change {
            Change::Upsert(ClusterObject::Namespace(ns)) | Change::DeleteNamespace(ns) => {
                self.namespace_names(ns, out);
            }
            Change::Upsert(ClusterObject::Service(key, info)) => {
                if let Some(old) = self.services.get(key) {
                    self.service_names(key, old, out);
                }
                self.service_names(key, info, out);
            }
            Change::Delete(Kind::Service, key) => {
                if let Some(old) = self.services.get(key) {
                    self.service_names(key, old, out);
                }
            }
            Change::Upsert(ClusterObject::Slice(key, info)) => {
                if let Some(old) = self.slices.get(key) {
                    self.slice_names(&key.namespace, old, out);
                }
                self.slice_names(&key.namespace, info, out);
            }
            Change::Delete(Kind::EndpointSlice, key) => {
                if let Some(old) = self.slices.get(key) {
                    self.slice_names(&key.namespace, old, out);
                }
            }
            Change::Delete(Kind::Namespace, key) => self.namespace_names(&key.name, out),
            Change::Upsert(ClusterObject::KubeDnsConfig(_))
            | Change::Delete(Kind::ConfigMap, _) => {}
        }
    }

    fn apply_one(&mut self, change: Change) {
        match change {
            Change::Upsert(ClusterObject::Namespace(ns)) => {
                self.namespaces.insert(ns);
            }
            Change::DeleteNamespace(ns) => {
                self.namespaces.remove(&ns);
            }
            Change::Delete(Kind::Namespace, key) => {
                self.namespaces.remove(&key.name);
            }
            Change::Upsert(ClusterObject::Service(key, info)) => {
                if let Some(old) = self.services.remove(&key) {
                    self.index_service(&key, &old, false);
                }
                self.index_service(&key, &info, true);
                self.services.insert(key, info);
            }
            Change::Delete(Kind::Service, key) => {
                if let Some(old) = self.services.remove(&key) {
                    self.index_service(&key, &old, false);
                }
            }
            Change::Upsert(ClusterObject::Slice(key, info)) => {
                if let Some(old) = self.slices.remove(&key) {
                    self.index_slice(&key, &old, false);
                }
                self.index_slice(&key, &info, true);
                self.slices.insert(key, info);
            }
            Change::Delete(Kind::EndpointSlice, key) => {
                if let Some(old) = self.slices.remove(&key) {
                    self.index_slice(&key, &old, false);
                }
            }
            // Names no record: the forwarding routes take it (`app.rs`).
            Change::Upsert(ClusterObject::KubeDnsConfig(_))
            | Change::Delete(Kind::ConfigMap, _) => {}
        }
    }

    fn index_service(&mut self, key: &ObjectKey, info: &ServiceInfo, add: bool) {
        let count = self
            .services_in_ns
            .entry(key.namespace.clone())
            .or_default();
        if add {
            *count += 1;
        } else {
            *count -= 1;
            if *count == 0 {
                self.services_in_ns.remove(&key.namespace);
            }
        }
        if let ServiceKind::ClusterIp(ips) = &info.kind {
            for ip in ips {
                let owners = self.reverse.entry(*ip).or_default();
                if add {
                    owners.add_service(key);
                } else {
                    owners.remove_service(key);
                    if owners.is_empty() {
                        self.reverse.remove(ip);
                    }
                }
            }
        }
    }

    fn index_slice(&mut self, key: &ObjectKey, info: &SliceInfo, add: bool) {
        if add {
            self.endpoints += info.endpoints.len();
        } else {
            self.endpoints -= info.endpoints.len();
        }
        let service = ObjectKey {
            namespace: key.namespace.clone(),
            name: info.service.clone(),
        };
        if add {
            let names = self.slices_of.entry(service.clone()).or_default();
            if let Err(at) = names.binary_search(&key.name) {
                names.insert(at, key.name.clone());
            }
        } else if let Some(names) = self.slices_of.get_mut(&service) {
            if let Ok(at) = names.binary_search(&key.name) {
                names.remove(at);
            }
            if names.is_empty() {
                self.slices_of.remove(&service);
            }
        }
        for ep in info.endpoints.iter().filter(|e| e.ready) {
            for ip in &ep.addresses {
                let label: Box<str> = endpoint_label(ep.hostname.as_deref(), *ip).into();
                let owners = self.reverse.entry(*ip).or_default();
                if add {
                    owners.add_endpoint(&service, label);
                } else {
                    owners.remove_endpoint(&service, &label);
                    if owners.is_empty() {
                        self.reverse.remove(ip);
                    }
                }
            }
        }
    }

    // --- names --------------------------------------------------------------------------------

    fn zone_name(&self, rel: &[&str]) -> WireName {
        let mut labels: Vec<&[u8]> = rel.iter().map(|s| s.as_bytes()).collect();
        let zone_labels = name::labels(&self.zone).expect("zone is well-formed");
        labels.extend(zone_labels);
        wire_from_labels(&labels)
    }

    fn namespace_names(&self, ns: &str, out: &mut BTreeSet<WireName>) {
        out.insert(self.zone_name(&[ns, "svc"]));
        out.insert(self.zone_name(&[ns, "pod"]));
    }

    fn service_names(&self, key: &ObjectKey, info: &ServiceInfo, out: &mut BTreeSet<WireName>) {
        let (ns, svc) = (&*key.namespace, &*key.name);
        out.insert(self.zone_name(&[svc, ns, "svc"]));
        self.namespace_names(ns, out);
        for p in &info.ports {
            if let Some(name) = &p.name {
                out.insert(self.port_name(name, p.protocol.label(), svc, ns));
            }
        }
        if let ServiceKind::ClusterIp(ips) = &info.kind {
            out.extend(ips.iter().map(|ip| reverse_name(*ip)));
        }
        for slice in self.slices_of.get(key).into_iter().flatten() {
            let skey = ObjectKey {
                namespace: key.namespace.clone(),
                name: slice.clone(),
            };
            if let Some(s) = self.slices.get(&skey) {
                self.slice_names(ns, s, out);
            }
        }
    }

    fn slice_names(&self, ns: &str, info: &SliceInfo, out: &mut BTreeSet<WireName>) {
        let svc = &*info.service;
        out.insert(self.zone_name(&[svc, ns, "svc"]));
        for p in &info.ports {
            if let Some(name) = &p.name {
                out.insert(self.port_name(name, p.protocol.label(), svc, ns));
            }
        }
        for ep in &info.endpoints {
            for ip in &ep.addresses {
                let label = endpoint_label(ep.hostname.as_deref(), *ip);
                out.insert(self.zone_name(&[&label, svc, ns, "svc"]));
                out.insert(reverse_name(*ip));
            }
        }
    }

    fn port_name(&self, port: &str, proto: &str, svc: &str, ns: &str) -> WireName {
        self.zone_name(&[&format!("_{port}"), &format!("_{proto}"), svc, ns, "svc"])
    }

    /// The names every zone has, whatever the cluster holds: the apex, `svc`, `pod`,
    /// `dns-version`, `ns.dns`. No object change touches them: they are written once, at
    /// start.
    pub fn fixed_names(&self) -> BTreeSet<WireName> {
        [
            &[][..],
            &["svc"],
            &["pod"],
            &["dns-version"],
            &["ns", "dns"],
        ]
        .into_iter()
        .map(|rel| self.zone_name(rel))
        .collect()
    }

    /// Every name the kernel should hold, for a full load.
    pub fn all_names(&self) -> BTreeSet<WireName> {
        let mut out = self.fixed_names();
        for ns in &self.namespaces {
            self.namespace_names(ns, &mut out);
        }
        for (key, info) in &self.services {
            self.service_names(key, info, &mut out);
        }
        for (key, info) in &self.slices {
            self.slice_names(&key.namespace, info, &mut out);
        }
        out.extend(self.reverse.keys().map(|ip| reverse_name(*ip)));
        out
    }

    // --- lookups ------------------------------------------------------------------------------

    fn namespace_exists(&self, ns: &str) -> bool {
        self.namespaces.contains(ns) || self.services_in_ns.contains_key(ns)
    }

    fn service(&self, ns: &str, svc: &str) -> Option<(ObjectKey, &ServiceInfo)> {
        let key = ObjectKey::new(ns, svc);
        let info = self.services.get(&key)?;
        Some((key, info))
    }

    /// The ready endpoints of the Services whose cluster IP is `cluster_ip` (in practice one:
    /// the kube-dns Service for an intercepted address), each address with the ports of its
    /// EndpointSlice.
    pub fn ready_endpoints_at(&self, cluster_ip: IpAddr) -> Vec<(IpAddr, &[objects::Port])> {
        let Some(owners) = self.reverse.get(&cluster_ip) else {
            return Vec::new();
        };
        owners
            .services
            .iter()
            .flat_map(|key| self.ready_endpoints(key))
            .flat_map(|(ep, slice)| ep.addresses.iter().map(|a| (*a, &slice.ports[..])))
            .collect()
    }

    /// Ready endpoints of a service with their slices' ports.
    fn ready_endpoints<'a>(
        &'a self,
        key: &ObjectKey,
    ) -> impl Iterator<Item = (&'a EndpointInfo, &'a SliceInfo)> + 'a {
        let slices: Vec<&'a SliceInfo> = self
            .slices_of
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|name| {
                self.slices.get(&ObjectKey {
                    namespace: key.namespace.clone(),
                    name: name.clone(),
                })
            })
            .collect();
        slices
            .into_iter()
            .flat_map(|s| s.endpoints.iter().filter(|e| e.ready).map(move |e| (e, s)))
    }

    fn node(&self, qname: &[u8]) -> Node {
        match classify(qname, &self.zone) {
            QueryName::Outside | QueryName::Reverse(None) => Node::Forward,
            QueryName::Reverse(Some(ip)) => {
                let ptr = self.ptr_targets(ip);
                if ptr.is_empty() {
                    Node::Forward
                } else {
                    Node::Reverse(RecordSets {
                        ptr,
                        ..Default::default()
                    })
                }
            }
            QueryName::Zone(z) => self.zone_node(z),
        }
    }

    fn ptr_targets(&self, ip: IpAddr) -> BTreeSet<WireName> {
        let Some(owners) = self.reverse.get(&ip) else {
            return BTreeSet::new();
        };
        // A cluster IP names its Service; otherwise every ready endpoint with the address
        // names itself (CoreDNS does the same).
        if let Some(svc) = owners.services.first() {
            return BTreeSet::from([self.zone_name(&[&svc.name, &svc.namespace, "svc"])]);
        }
        owners
            .endpoints
            .iter()
            .map(|(svc, label, _)| self.zone_name(&[label, &svc.name, &svc.namespace, "svc"]))
            .collect()
    }

    fn zone_node(&self, z: ZoneName<'_>) -> Node {
        let exists = |rr: RecordSets| Node::Data(rr);
        match z {
            ZoneName::Apex => exists(RecordSets {
                soa: true,
                ns: true,
                ..Default::default()
            }),
            ZoneName::SvcApex | ZoneName::PodApex => exists(RecordSets::default()),
            ZoneName::DnsVersion => exists(RecordSets {
                txt: Some(SCHEMA_VERSION),
                ..Default::default()
            }),
            ZoneName::NsDns => exists(RecordSets {
                addrs: self.settings.ns_addrs.iter().copied().collect(),
                ..Default::default()
            }),
            ZoneName::SvcNamespace(ns) | ZoneName::PodNamespace(ns) => {
                if self.namespace_exists(ns) {
                    exists(RecordSets::default())
                } else {
                    Node::Missing
                }
            }
            ZoneName::Pod { ns, ip } => {
                if self.namespace_exists(ns) {
                    exists(RecordSets {
                        addrs: BTreeSet::from([ip]),
                        ..Default::default()
                    })
                } else {
                    Node::Missing
                }
            }
            ZoneName::Service { ns, svc } => self.service_node(ns, svc),
            ZoneName::Endpoint { ns, svc, endpoint } => self.endpoint_node(ns, svc, endpoint),
            ZoneName::PortProto {
                ns,
                svc,
                port,
                proto,
            } => self.port_node(ns, svc, port, proto),
            ZoneName::Invalid => Node::Missing,
        }
    }

    fn service_node(&self, ns: &str, svc: &str) -> Node {
        let Some((key, info)) = self.service(ns, svc) else {
            return Node::Missing;
        };
        let own = self.zone_name(&[svc, ns, "svc"]);
        match &info.kind {
            ServiceKind::ExternalName(target) => Node::Cname(wire_from_dotted(target)),
            ServiceKind::ClusterIp(ips) => {
                let addrs: BTreeSet<IpAddr> = ips.iter().copied().collect();
                let mut rr = RecordSets {
                    addrs: addrs.clone(),
                    ..Default::default()
                };
                for p in &info.ports {
                    rr.srv.insert((p.port, own.clone()), addrs.clone());
                }
                Node::Data(rr)
            }
            ServiceKind::Headless => {
                let mut rr = RecordSets::default();
                for (ep, slice) in self.ready_endpoints(&key) {
                    for ip in &ep.addresses {
                        rr.addrs.insert(*ip);
                        let target = self.zone_name(&[
                            &endpoint_label(ep.hostname.as_deref(), *ip),
                            svc,
                            ns,
                            "svc",
                        ]);
                        for p in &slice.ports {
                            rr.srv
                                .entry((p.port, target.clone()))
                                .or_default()
                                .insert(*ip);
                        }
                    }
                }
                if rr.addrs.is_empty() {
                    Node::Missing
                } else {
                    Node::Data(rr)
                }
            }
        }
    }

    fn endpoint_node(&self, ns: &str, svc: &str, endpoint: &str) -> Node {
        let Some((key, info)) = self.service(ns, svc) else {
            return Node::Missing;
        };
        if matches!(info.kind, ServiceKind::ExternalName(_)) {
            return Node::Missing;
        }
        let own = self.zone_name(&[endpoint, svc, ns, "svc"]);
        let mut rr = RecordSets::default();
        for (ep, slice) in self.ready_endpoints(&key) {
            for ip in &ep.addresses {
                if endpoint_label(ep.hostname.as_deref(), *ip) == endpoint {
                    rr.addrs.insert(*ip);
                    for p in &slice.ports {
                        rr.srv.entry((p.port, own.clone())).or_default().insert(*ip);
                    }
                }
            }
        }
        if rr.addrs.is_empty() {
            Node::Missing
        } else {
            Node::Data(rr)
        }
    }

    fn port_node(&self, ns: &str, svc: &str, port: &str, proto: &str) -> Node {
        let Some((key, info)) = self.service(ns, svc) else {
            return Node::Missing;
        };
        let matches =
            |p: &objects::Port| p.name.as_deref() == Some(port) && p.protocol.label() == proto;
        let mut rr = RecordSets::default();
        match &info.kind {
            ServiceKind::ExternalName(_) => return Node::Missing,
            ServiceKind::ClusterIp(ips) => {
                let own = self.zone_name(&[svc, ns, "svc"]);
                for p in info.ports.iter().filter(|p| matches(p)) {
                    rr.addrs.extend(ips.iter().copied());
                    rr.srv
                        .insert((p.port, own.clone()), ips.iter().copied().collect());
                }
            }
            ServiceKind::Headless => {
                for (ep, slice) in self.ready_endpoints(&key) {
                    for p in slice.ports.iter().filter(|p| matches(p)) {
                        for ip in &ep.addresses {
                            let target = self.zone_name(&[
                                &endpoint_label(ep.hostname.as_deref(), *ip),
                                svc,
                                ns,
                                "svc",
                            ]);
                            rr.addrs.insert(*ip);
                            rr.srv.entry((p.port, target)).or_default().insert(*ip);
                        }
                    }
                }
            }
        }
        if rr.srv.is_empty() {
            Node::Missing
        } else {
            Node::Data(rr)
        }
    }

    // --- records ------------------------------------------------------------------------------

    fn soa_rdata(&self) -> RData {
        RData::SOA(SOA::new(
            to_name(&self.zone_name(&["ns", "dns"])),
            to_name(&self.zone_name(&["hostmaster"])),
            self.settings.serial,
            7200,
            1800,
            86400,
            self.settings.negative_ttl,
        ))
    }

    /// Answer and additional records of type `qtype` at `qname`, from its record sets.
    fn records(&self, qname: &[u8], qtype: u16, rr: &RecordSets) -> (Vec<Record>, Vec<Record>) {
        let owner = to_name(qname);
        let ttl = self.settings.ttl;
        let rec = |data: RData| Record::from_rdata(owner.clone(), ttl, data);
        let mut answers = Vec::new();
        let mut additionals = Vec::new();
        match qtype {
            T_A => answers.extend(rr.addrs.iter().filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(rec(RData::A(A(*v4)))),
                IpAddr::V6(_) => None,
            })),
            T_AAAA => answers.extend(rr.addrs.iter().filter_map(|ip| match ip {
                IpAddr::V6(v6) => Some(rec(RData::AAAA(AAAA(*v6)))),
                IpAddr::V4(_) => None,
            })),
            T_SRV => {
                // CoreDNS: priority 0, the weight of 100 shared evenly.
                let weight = (100 / rr.srv.len().max(1)).max(1) as u16;
                let mut extra: BTreeMap<WireName, BTreeSet<IpAddr>> = BTreeMap::new();
                for ((port, target), addrs) in &rr.srv {
                    answers.push(rec(RData::SRV(SRV::new(0, weight, *port, to_name(target)))));
                    extra
                        .entry(target.clone())
                        .or_default()
                        .extend(addrs.iter().copied());
                }
                for (target, addrs) in extra {
                    let name = to_name(&target);
                    for ip in addrs {
                        additionals.push(Record::from_rdata(name.clone(), ttl, address_rdata(ip)));
                    }
                }
            }
            T_PTR => answers.extend(rr.ptr.iter().map(|t| rec(RData::PTR(PTR(to_name(t)))))),
            T_TXT => {
                if let Some(t) = rr.txt {
                    answers.push(rec(RData::TXT(TXT::new(vec![t.to_string()]))));
                }
            }
            T_SOA if rr.soa => {
                answers.push(Record::from_rdata(
                    owner.clone(),
                    self.settings.negative_ttl,
                    self.soa_rdata(),
                ));
            }
            T_NS if rr.ns => {
                let ns = self.zone_name(&["ns", "dns"]);
                answers.push(rec(RData::NS(NS(to_name(&ns)))));
                let name = to_name(&ns);
                for ip in &self.settings.ns_addrs {
                    additionals.push(Record::from_rdata(name.clone(), ttl, address_rdata(*ip)));
                }
            }
            _ => {}
        }
        (answers, additionals)
    }

    fn cname_record(&self, qname: &[u8], target: &[u8]) -> Record {
        Record::from_rdata(
            to_name(qname),
            self.settings.ttl,
            RData::CNAME(CNAME(to_name(target))),
        )
    }

    /// Is `name` `<endpoint>.<svc>.<ns>.svc.<zone>` of a Service that is not headless?
    fn is_cluster_ip_endpoint_name(&self, name: &[u8]) -> bool {
        match classify(name, &self.zone) {
            QueryName::Zone(ZoneName::Endpoint { ns, svc, .. }) => self
                .service(ns, svc)
                .is_some_and(|(_, info)| matches!(info.kind, ServiceKind::ClusterIp(_))),
            _ => false,
        }
    }

    /// The answer records for `(qname, qtype)` when the name has data of that type: used to
    /// chase a CNAME whose target is in the zone. `Err` carries the negative outcome.
    pub fn answer_records(&self, qname: &[u8], qtype: u16) -> Result<Vec<Record>, Resolution> {
        match self.resolve_inner(qname, qtype) {
            (Resolution::Answer { .. }, Some(rr)) => Ok(self.records(qname, qtype, &rr).0),
            (other, _) => Err(other),
        }
    }

    /// The answer to a query for `qname` (lowercased wire format) and `qtype`.
    pub fn resolve(&self, qname: &[u8], qtype: u16) -> Resolution {
        self.resolve_inner(qname, qtype).0
    }

    fn resolve_inner(&self, qname: &[u8], qtype: u16) -> (Resolution, Option<RecordSets>) {
        if qtype == T_AXFR || qtype == T_IXFR {
            return (Resolution::Refused, None);
        }
        let node = self.node(qname);
        if !self.synced && !matches!(node, Node::Forward) {
            // Reverse names of unknown addresses are forwarded even now; nothing in the zone
            // is answered before the first full load (never a wrong NXDOMAIN).
            return (Resolution::NotReady, None);
        }
        match node {
            Node::Missing => (Resolution::Nxdomain, None),
            Node::Forward => (Resolution::Forward, None),
            Node::Cname(target) => {
                let cname = self.cname_record(qname, &target);
                if qtype == T_CNAME {
                    let sections = encode_sections(qname, qtype, vec![cname], vec![], vec![]);
                    (
                        Resolution::Answer {
                            flags: ZONE_FLAGS,
                            sections,
                        },
                        None,
                    )
                } else {
                    (
                        Resolution::Cname {
                            cname: Box::new(cname),
                            target,
                        },
                        None,
                    )
                }
            }
            Node::Reverse(rr) => {
                if qtype == T_PTR {
                    let (answers, _) = self.records(qname, qtype, &rr);
                    let sections = encode_sections(qname, qtype, answers, vec![], vec![]);
                    (
                        Resolution::Answer {
                            flags: ZONE_FLAGS,
                            sections,
                        },
                        Some(rr),
                    )
                } else {
                    (Resolution::Forward, None)
                }
            }
            Node::Data(rr) => {
                // CoreDNS answers ANY with NODATA too.
                if qtype == T_ANY || !rr.types().contains(&qtype) {
                    return (Resolution::Nodata, None);
                }
                let (answers, additionals) = self.records(qname, qtype, &rr);
                let sections = encode_sections(qname, qtype, answers, vec![], additionals);
                (
                    Resolution::Answer {
                        flags: ZONE_FLAGS,
                        sections,
                    },
                    Some(rr),
                )
            }
        }
    }

    /// Everything the kernel holds for `name`: one entry per type with data, plus the
    /// [`QTYPE_OTHER`] entry for every other type. Empty for names the kernel must not
    /// answer (they are not in the zone, or the kernel's NXDOMAIN rule covers them).
    pub fn kernel_entries(&self, name: &[u8]) -> Vec<(u16, KernelAnswer)> {
        let fits = |sections: Sections, flags: u16| {
            if sections.data.len() <= BLOB_DATA_LEN {
                KernelAnswer::Answer { flags, sections }
            } else {
                KernelAnswer::Pass
            }
        };
        let node = self.node(name);
        if matches!(node, Node::Data(_)) && self.is_cluster_ip_endpoint_name(name) {
            // Per-endpoint names of ClusterIP Services exist (CoreDNS answers them), but
            // clients hardly ever ask: one marker keeps the kernel's NXDOMAIN rule right, and
            // userspace answers them, instead of three entries and a blob per endpoint.
            return vec![(QTYPE_OTHER, KernelAnswer::Pass)];
        }
        match node {
            Node::Missing | Node::Forward => Vec::new(),
            Node::Cname(target) => {
                let cname = self.cname_record(name, &target);
                let sections = encode_sections(name, T_CNAME, vec![cname], vec![], vec![]);
                vec![
                    (T_CNAME, fits(sections, ZONE_FLAGS)),
                    (QTYPE_OTHER, KernelAnswer::Pass),
                ]
            }
            Node::Reverse(rr) => {
                let (answers, _) = self.records(name, T_PTR, &rr);
                let sections = encode_sections(name, T_PTR, answers, vec![], vec![]);
                vec![(T_PTR, fits(sections, ZONE_FLAGS))]
            }
            Node::Data(rr) => {
                let mut out: Vec<(u16, KernelAnswer)> = rr
                    .types()
                    .into_iter()
                    .map(|t| {
                        let (answers, additionals) = self.records(name, t, &rr);
                        let sections = encode_sections(name, t, answers, vec![], additionals);
                        (t, fits(sections, ZONE_FLAGS))
                    })
                    .collect();
                out.push((QTYPE_OTHER, KernelAnswer::Nodata));
                out
            }
        }
    }
}

fn address_rdata(ip: IpAddr) -> RData {
    match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    }
}

/// Is (`qname`, `qtype`) forwarded whatever the zone `zone` (wire format) holds? True for names
/// neither at or below the zone nor under `arpa` (reverse names may be the cluster's), except
/// zone transfers, which are refused. A suffix comparison, without the model: the serving path
/// asks it first. A name it misses only costs the full resolution.
pub fn surely_forwarded(zone: &[u8], qname: &[u8], qtype: u16) -> bool {
    qtype != T_AXFR
        && qtype != T_IXFR
        && !qname.ends_with(zone)
        && !qname.ends_with(b"\x04arpa\x00")
}

/// Record type of a query type, for logs.
pub fn type_name(qtype: u16) -> String {
    RecordType::from(qtype).to_string()
}

#[cfg(test)]
mod tests;
