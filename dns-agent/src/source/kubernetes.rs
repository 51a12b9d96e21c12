//! The Kubernetes API: list and watch the Services, EndpointSlices and Namespaces of every
//! namespace, and tell the zone; and the kube-dns ConfigMap, for the forwarding routes.
//!
//! The ConfigMap watch is narrow: `kube-system` only, and one object by a `metadata.name` field
//! selector, which is what lets `deploy/rbac.yaml` grant it by `resourceNames` alone. The zone
//! waits for its first list before it answers (so that the first answers already use its stub
//! domains), unless it fails (no RBAC for it yet): then a warning with the fix, and the zone
//! answers without it. Its health does not count in `xdns_api_connected`, which is about the
//! zone's watches.
//!
//! Each object is projected ([`crate::zone::objects`]) the moment it arrives and the
//! Kubernetes object dropped: a watch of every Service and EndpointSlice runs on every node, so
//! the agent keeps only what DNS needs.
//!
//! kube-runtime's `watcher` lists, watches, resumes from the last resource version and relists
//! after `410 Gone` by itself. A list (`Init` … `InitDone`) is sent to the zone as one
//! [`SourceEvent::Relist`], which replaces everything of its kind: deletions that happened while
//! the watch was down are applied then, instead of trusting individual delete events.

use std::{
    fmt::Debug,
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use futures::{Stream, StreamExt as _, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{ConfigMap, Namespace, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    client::ClientBuilder,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, mpsc};

use super::SourceEvent;
use crate::zone::objects::{self, ClusterObject, FieldError, KUBE_DNS_CONFIG_MAP, Kind, ObjectKey};

/// Where the API server and the credentials come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientSource {
    /// A kubeconfig file (its current context).
    Kubeconfig(PathBuf),
    /// The pod's service account: `KUBERNETES_SERVICE_HOST`/`_PORT` and the token and CA
    /// mounted under `/var/run/secrets/kubernetes.io/serviceaccount`.
    InCluster,
}

/// A client configuration that cannot be used, with the fix.
#[derive(Debug, thiserror::Error)]
pub enum ApiSourceError {
    #[error("--kubeconfig {}: {cause}; give the path of a kubeconfig whose current context names a cluster and a user", path.display())]
    Kubeconfig {
        path: PathBuf,
        cause: kube::config::KubeconfigError,
    },
    #[error(
        "in-cluster configuration (KUBERNETES_SERVICE_HOST is set) failed: {cause}; mount the \
         service account token (automountServiceAccountToken: true) or give --kubeconfig PATH"
    )]
    InCluster { cause: kube::config::InClusterError },
    #[error("building the Kubernetes client failed: {cause}")]
    Client { cause: kube::Error },
}

/// Builds the API client, with the middleware that reports successful responses per watched
/// resource (see [`ResponseCounts`]).
pub async fn connect(
    source: &ClientSource,
) -> Result<(Client, Arc<ResponseCounts>), ApiSourceError> {
    let config = match source {
        ClientSource::Kubeconfig(path) => {
            let fail = |cause| ApiSourceError::Kubeconfig {
                path: path.clone(),
                cause,
            };
            let kubeconfig = Kubeconfig::read_from(path).map_err(fail)?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(fail)?
        }
        ClientSource::InCluster => {
            kube::Config::incluster().map_err(|cause| ApiSourceError::InCluster { cause })?
        }
    };
    tracing::info!(server = %config.cluster_url, "Kubernetes API client configured");
    let counts = Arc::new(ResponseCounts::default());
    let client = ClientBuilder::try_from(config)
        .map_err(|cause| ApiSourceError::Client { cause })?
        .with_layer(&ObserveLayer(counts.clone()))
        .build();
    Ok((client, counts))
}

// --- connectivity -----------------------------------------------------------------------------

/// The watched resources, in the order of the per-kind arrays below.
const KINDS: [Kind; 4] = [
    Kind::Namespace,
    Kind::Service,
    Kind::EndpointSlice,
    Kind::ConfigMap,
];

fn kind_index(kind: Kind) -> usize {
    match kind {
        Kind::Namespace => 0,
        Kind::Service => 1,
        Kind::EndpointSlice => 2,
        Kind::ConfigMap => 3,
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Namespace => "namespaces",
        Kind::Service => "services",
        Kind::EndpointSlice => "endpointslices",
        Kind::ConfigMap => "configmaps",
    }
}

/// The kinds the zone is made of: the zone is loaded once each is listed, and the API counts as
/// connected while their watches are up.
fn is_zone_kind(kind: Kind) -> bool {
    kind != Kind::ConfigMap
}

/// Successful (2xx) API responses per watched resource.
///
/// The watcher resumes a broken watch silently: once the new watch request succeeds, nothing
/// is emitted until an object changes (or the server's next bookmark, about a minute later).
/// Counting responses in the client tells the source the moment the API answers again. A
/// response is counted while the watcher polls its request, i.e. before the watcher yields the
/// next item, so a count taken when an error is handled can only be passed by a later request.
#[derive(Debug)]
pub struct ResponseCounts {
    /// Request paths of the watched resources (`/api/v1/services`, ...), as kube builds them.
    paths: [String; 4],
    counts: [AtomicU64; 4],
    notify: Notify,
}

impl Default for ResponseCounts {
    fn default() -> Self {
        Self {
            paths: [
                Namespace::url_path(&(), None),
                Service::url_path(&(), None),
                EndpointSlice::url_path(&(), None),
                ConfigMap::url_path(&(), Some(KUBE_DNS_CONFIG_MAP.0)),
            ],
            counts: Default::default(),
            notify: Notify::new(),
        }
    }
}

impl ResponseCounts {
    fn get(&self, kind: Kind) -> u64 {
        self.counts[kind_index(kind)].load(Ordering::Acquire)
    }

    fn succeeded(&self, path: &str) {
        // A cluster URL with a path prefix (an API proxy) is added further down the stack;
        // the suffix is the resource.
        if let Some(i) = self.paths.iter().position(|p| path.ends_with(p.as_str())) {
            self.counts[i].fetch_add(1, Ordering::Release);
            // notify_one keeps a permit when nobody waits: a success is never missed.
            self.notify.notify_one();
        }
    }
}

struct ObserveLayer(Arc<ResponseCounts>);

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            counts: self.0.clone(),
        }
    }
}

#[derive(Clone)]
struct Observe<S> {
    inner: S,
    counts: Arc<ResponseCounts>,
}

impl<S, B> tower::Service<http::Request<kube::client::Body>> for Observe<S>
where
    S: tower::Service<http::Request<kube::client::Body>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
        let path = req.uri().path().to_string();
        let counts = self.counts.clone();
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await;
            if let Ok(r) = &response
                && r.status().is_success()
            {
                counts.succeeded(&path);
            }
            response
        })
    }
}

// --- projection -------------------------------------------------------------------------------

/// What leaves the zone when an object is deleted, or changes into something DNS cannot use.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Removal {
    Namespace(Arc<str>),
    Object(Kind, ObjectKey),
}

impl Removal {
    fn of<K: Resource>(kind: Kind, obj: &K) -> Self {
        let name = obj.meta().name.as_deref().unwrap_or_default();
        match kind {
            Kind::Namespace => Self::Namespace(name.into()),
            // The projections read a missing namespace as "default"; so must the key.
            _ => Self::Object(
                kind,
                ObjectKey::new(obj.meta().namespace.as_deref().unwrap_or("default"), name),
            ),
        }
    }

    fn event(self, seen: Instant) -> SourceEvent {
        match self {
            Self::Namespace(name) => SourceEvent::DeleteNamespace { name, seen },
            Self::Object(kind, key) => SourceEvent::Delete { kind, key, seen },
        }
    }
}

/// One watcher event, with its object projected.
#[derive(Debug)]
enum Step {
    Init,
    /// An object of the list; `None`: nothing DNS can use.
    Listed(Option<ClusterObject>),
    InitDone,
    Applied(Result<ClusterObject, Removal>),
    Deleted(Removal),
}

type Project<K> = fn(&K) -> Result<Option<ClusterObject>, FieldError>;

/// Projects an object; one that fails is logged and treated as absent, exactly as a relist
/// (which leaves it out) would: the zone holds what it can project of the API's state.
fn project<K: Resource>(kind: Kind, obj: &K, f: Project<K>) -> Result<ClusterObject, Removal> {
    match f(obj) {
        Ok(Some(o)) => Ok(o),
        Ok(None) => {
            tracing::debug!(kind = kind_name(kind), object = %label(obj), "no DNS meaning (FQDN slice, or no service label)");
            Err(Removal::of(kind, obj))
        }
        Err(e) => {
            tracing::warn!(kind = kind_name(kind), object = %label(obj), error = %e, "object skipped: it cannot be projected into DNS records");
            Err(Removal::of(kind, obj))
        }
    }
}

fn label<K: Resource>(obj: &K) -> String {
    match obj.meta().namespace.as_deref() {
        Some(ns) => format!("{ns}/{}", obj.name_any()),
        None => obj.name_any(),
    }
}

fn project_namespace(ns: &Namespace) -> Result<Option<ClusterObject>, FieldError> {
    objects::project_namespace(ns).map(Some)
}

fn project_service(svc: &Service) -> Result<Option<ClusterObject>, FieldError> {
    objects::project_service(svc).map(Some)
}

type KindStream = BoxStream<'static, (Kind, Result<Step, watcher::Error>)>;

/// The watcher of one resource (`api`: every namespace, or one), projecting as it goes.
fn watch_kind<K>(api: Api<K>, config: watcher::Config, kind: Kind, f: Project<K>) -> KindStream
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
{
    watcher(api, config)
        // Retries with exponential backoff (0.8 s doubling to 30 s, with jitter) instead of
        // hammering an API server that is down.
        .default_backoff()
        .map(move |event| (kind, event.map(|e| step_of(kind, f, e))))
        .boxed()
}

/// A watcher event with its object projected; the Kubernetes object is dropped here.
fn step_of<K: Resource>(kind: Kind, f: Project<K>, event: watcher::Event<K>) -> Step {
    match event {
        watcher::Event::Init => Step::Init,
        watcher::Event::InitApply(o) => Step::Listed(project(kind, &o, f).ok()),
        watcher::Event::InitDone => Step::InitDone,
        watcher::Event::Apply(o) => Step::Applied(project(kind, &o, f)),
        watcher::Event::Delete(o) => Step::Deleted(Removal::of(kind, &o)),
    }
}

// --- the source -------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Health {
    /// Nothing heard yet.
    Unknown,
    Up,
    /// Failing since the response count was `responses`.
    Down {
        responses: u64,
    },
}

#[derive(Debug)]
struct KindState {
    kind: Kind,
    /// Objects of the list in progress.
    relist: Option<Vec<ClusterObject>>,
    listed: bool,
    health: Health,
}

/// The source's state: the list in progress and the health of each resource's watch.
struct Source {
    tx: mpsc::Sender<SourceEvent>,
    counts: Arc<ResponseCounts>,
    kinds: [KindState; 4],
    synced: bool,
    connected: bool,
}

/// The zone task is gone: the agent is shutting down.
struct Closed;

impl Source {
    fn new(tx: mpsc::Sender<SourceEvent>, counts: Arc<ResponseCounts>) -> Self {
        Self {
            tx,
            counts,
            kinds: KINDS.map(|kind| KindState {
                kind,
                relist: None,
                listed: false,
                health: Health::Unknown,
            }),
            synced: false,
            connected: false,
        }
    }

    async fn send(&self, event: SourceEvent) -> Result<(), Closed> {
        self.tx.send(event).await.map_err(|_| Closed)
    }

    async fn step(&mut self, kind: Kind, step: Result<Step, watcher::Error>) -> Result<(), Closed> {
        let seen = Instant::now();
        let step = match step {
            Ok(step) => step,
            Err(e) => {
                self.failed(kind, e);
                // A ConfigMap that cannot be read must not keep the zone from loading.
                self.maybe_synced().await?;
                return self.report_connected().await;
            }
        };
        let state = &mut self.kinds[kind_index(kind)];
        if !matches!(step, Step::Init) {
            // Init comes before the list request; everything else is an answer of the API.
            if let Health::Down { .. } = state.health {
                tracing::info!(kind = kind_name(kind), "Kubernetes API watch restored");
            }
            state.health = Health::Up;
        }
        match step {
            Step::Init => state.relist = Some(Vec::new()),
            Step::Listed(o) => {
                if let (Some(list), Some(o)) = (state.relist.as_mut(), o) {
                    list.push(o);
                }
            }
            Step::InitDone => {
                let objects = state.relist.take().unwrap_or_default();
                let first = !state.listed;
                state.listed = true;
                tracing::info!(
                    kind = kind_name(kind),
                    objects = objects.len(),
                    first,
                    "listed; the list replaces what the zone holds of this kind"
                );
                self.send(SourceEvent::Relist {
                    kind,
                    objects,
                    seen,
                })
                .await?;
                self.maybe_synced().await?;
            }
            Step::Applied(Ok(object)) => self.send(SourceEvent::Upsert { object, seen }).await?,
            Step::Applied(Err(removal)) | Step::Deleted(removal) => {
                self.send(removal.event(seen)).await?
            }
        }
        self.report_connected().await
    }

    /// Tells the zone it is complete once every zone kind is listed, and the kube-dns
    /// ConfigMap too unless its watch failed.
    async fn maybe_synced(&mut self) -> Result<(), Closed> {
        let complete = self.kinds.iter().all(|k| {
            k.listed || (!is_zone_kind(k.kind) && matches!(k.health, Health::Down { .. }))
        });
        if !self.synced && complete {
            self.synced = true;
            self.send(SourceEvent::Synced).await?;
        }
        Ok(())
    }

    fn failed(&mut self, kind: Kind, e: watcher::Error) {
        // 410 Gone: the watch fell out of the server's window. Routine: the watcher relists,
        // and the relist applies whatever was missed.
        if let watcher::Error::WatchError(status) = &e
            && status.code == 410
        {
            tracing::info!(kind = kind_name(kind), reason = %status.message, "watch expired (410 Gone); relisting");
            return;
        }
        let responses = self.counts.get(kind);
        let fix = fix_for(kind, &e);
        let fix = fix.as_deref();
        let state = &mut self.kinds[kind_index(kind)];
        if matches!(state.health, Health::Down { .. }) {
            // The backoff retries every few seconds; one warning per outage is enough.
            tracing::debug!(kind = kind_name(kind), error = %e, "Kubernetes API watch still failing");
        } else if !is_zone_kind(kind) {
            tracing::warn!(
                kind = kind_name(kind),
                error = %e,
                fix,
                "watching the kube-dns ConfigMap (kube-system/kube-dns) failed; its stubDomains \
                 and upstreamNameservers stay as last read (none if never), retrying with backoff"
            );
        } else if self.synced {
            tracing::warn!(
                kind = kind_name(kind),
                error = %e,
                fix,
                "Kubernetes API watch failed; answers continue from the last known state, \
                 retrying with backoff"
            );
        } else {
            tracing::warn!(
                kind = kind_name(kind),
                error = %e,
                fix,
                "Kubernetes API list failed; the zone answers SERVFAIL until the first full \
                 list, retrying with backoff"
            );
        }
        state.health = Health::Down { responses };
    }

    /// A watched resource answered again since it failed.
    async fn responses_arrived(&mut self) -> Result<(), Closed> {
        for state in &mut self.kinds {
            if let Health::Down { responses } = state.health
                && self.counts.get(state.kind) > responses
            {
                tracing::info!(
                    kind = kind_name(state.kind),
                    "Kubernetes API answers again; watch restored"
                );
                state.health = Health::Up;
            }
        }
        self.report_connected().await
    }

    async fn report_connected(&mut self) -> Result<(), Closed> {
        let connected = self
            .kinds
            .iter()
            .filter(|k| is_zone_kind(k.kind))
            .all(|k| k.health == Health::Up);
        if connected != self.connected {
            self.connected = connected;
            self.send(SourceEvent::Connected(connected)).await?;
        }
        Ok(())
    }
}

/// What an operator can do about a watch error, when the API server says.
fn fix_for(kind: Kind, e: &watcher::Error) -> Option<String> {
    let status = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s))
        | watcher::Error::WatchError(s) => s,
        _ => return None,
    };
    match status.code {
        401 => Some(
            "the API server refused the credentials: check the service account token, or the \
             user of --kubeconfig"
                .to_string(),
        ),
        403 if kind == Kind::ConfigMap => Some(
            "the agent may not read the kube-dns ConfigMap: apply deploy/rbac.yaml (its Role \
             in kube-system grants get, list and watch of that one ConfigMap)"
                .to_string(),
        ),
        403 => Some(format!(
            "the agent may not list and watch {}: apply deploy/rbac.yaml and run the agent \
             with its service account (serviceAccountName: xdns)",
            kind_name(kind)
        )),
        _ => None,
    }
}

/// Watches the four resources until the zone task goes away.
pub async fn run(client: Client, counts: Arc<ResponseCounts>, tx: mpsc::Sender<SourceEvent>) {
    let all = watcher::Config::default();
    let (namespace, name) = KUBE_DNS_CONFIG_MAP;
    let streams = [
        watch_kind(
            Api::<Namespace>::all(client.clone()),
            all.clone(),
            Kind::Namespace,
            project_namespace,
        ),
        watch_kind(
            Api::<Service>::all(client.clone()),
            all.clone(),
            Kind::Service,
            project_service,
        ),
        watch_kind(
            Api::<EndpointSlice>::all(client.clone()),
            all,
            Kind::EndpointSlice,
            objects::project_slice,
        ),
        watch_kind(
            Api::<ConfigMap>::namespaced(client, namespace),
            watcher::Config::default().fields(&format!("metadata.name={name}")),
            Kind::ConfigMap,
            objects::project_config_map,
        ),
    ];
    drive(futures::stream::select_all(streams), counts, tx).await;
}

/// Watches the Pods of the node `node` (field selector `spec.nodeName`), for search-path
/// completion, until the zone task goes away: a list is one relist of the node's pods, then
/// changes one at a time. The zone does not wait for it, and a failure costs only completions
/// (an address of no known pod is answered as without autopath): errors are retried with
/// backoff and reported once per outage.
pub async fn watch_pods(client: Client, node: String, tx: mpsc::Sender<SourceEvent>) {
    use k8s_openapi::api::core::v1::Pod;

    use super::pods::{PodAddresses, PodChange, project_pod};

    let key = |pod: &Pod| {
        ObjectKey::new(
            pod.metadata.namespace.as_deref().unwrap_or_default(),
            pod.metadata.name.as_deref().unwrap_or_default(),
        )
    };
    let project = |pod: &Pod| match project_pod(pod) {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(pod = %key(pod), error = %e, "pod skipped");
            None
        }
    };
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = watcher(Api::<Pod>::all(client), config)
        .default_backoff()
        .boxed();
    let mut listing: Option<Vec<PodAddresses>> = None;
    let mut failing = false;
    while let Some(event) = events.next().await {
        let change = match event {
            Ok(watcher::Event::Init) => {
                listing = Some(Vec::new());
                continue;
            }
            Ok(watcher::Event::InitApply(pod)) => {
                if let (Some(l), Some(p)) = (listing.as_mut(), project(&pod)) {
                    l.push(p);
                }
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                let pods = listing.take().unwrap_or_default();
                tracing::info!(node, pods = pods.len(), "listed this node's pods");
                PodChange::Relist(pods)
            }
            Ok(watcher::Event::Apply(pod)) => match project(&pod) {
                Some(p) => PodChange::Upsert(p),
                None => PodChange::Delete(key(&pod)),
            },
            Ok(watcher::Event::Delete(pod)) => PodChange::Delete(key(&pod)),
            Err(e) => {
                if !failing {
                    failing = true;
                    tracing::warn!(
                        error = %e,
                        fix = fix_for_pods(&e),
                        "watching this node's pods failed; search paths of pods not known yet are \
                         not completed; retrying with backoff"
                    );
                }
                continue;
            }
        };
        failing = false;
        if tx.send(SourceEvent::Pods(change)).await.is_err() {
            return;
        }
    }
}

fn fix_for_pods(e: &watcher::Error) -> Option<&'static str> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s))
        | watcher::Error::WatchError(s)
            if s.code == 403 =>
        {
            Some(
                "the agent may not list and watch pods: apply deploy/rbac.yaml (pods: get, list, \
                 watch) or run without --autopath",
            )
        }
        _ => None,
    }
}

/// The source's loop, over any stream of watcher steps (the tests feed it scripted ones).
async fn drive(
    mut steps: impl Stream<Item = (Kind, Result<Step, watcher::Error>)> + Unpin,
    counts: Arc<ResponseCounts>,
    tx: mpsc::Sender<SourceEvent>,
) {
    let mut source = Source::new(tx, counts.clone());
    loop {
        let outcome = tokio::select! {
            next = steps.next() => match next {
                Some((kind, step)) => source.step(kind, step).await,
                // Watchers never end; if they did, the agent must not pretend to watch.
                None => return,
            },
            () = counts.notify.notified() => source.responses_arrived().await,
        };
        if outcome.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kube::core::response::Status;

    use super::*;

    fn service(ns: &str, name: &str, ip: &str) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]},
        }))
        .expect("test object")
    }

    fn svc_step(ev: watcher::Event<Service>) -> (Kind, Result<Step, watcher::Error>) {
        (
            Kind::Service,
            Ok(step_of(Kind::Service, project_service, ev)),
        )
    }

    fn done(kind: Kind) -> Vec<(Kind, Result<Step, watcher::Error>)> {
        vec![(kind, Ok(Step::Init)), (kind, Ok(Step::InitDone))]
    }

    fn gone() -> watcher::Error {
        watcher::Error::WatchError(Box::new(
            Status::failure("too old", "Expired").with_code(410),
        ))
    }

    fn down() -> watcher::Error {
        watcher::Error::NoResourceVersion
    }

    /// Runs the source over scripted steps; returns what it sent.
    async fn script(steps: Vec<(Kind, Result<Step, watcher::Error>)>) -> Vec<SourceEvent> {
        let (tx, mut rx) = mpsc::channel(64);
        let counts = Arc::new(ResponseCounts::default());
        drive(futures::stream::iter(steps), counts, tx).await;
        let mut out = Vec::new();
        while let Ok(e) = rx.try_recv() {
            out.push(e);
        }
        out
    }

    fn summary(events: &[SourceEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                SourceEvent::Relist { kind, objects, .. } => {
                    format!("relist {} {}", kind_name(*kind), objects.len())
                }
                SourceEvent::Upsert { object, .. } => match object {
                    ClusterObject::Service(k, _) => format!("upsert {k}"),
                    other => format!("upsert {other:?}"),
                },
                SourceEvent::Delete { key, .. } => format!("delete {key}"),
                SourceEvent::DeleteNamespace { name, .. } => format!("delete ns {name}"),
                SourceEvent::Synced => "synced".into(),
                SourceEvent::Connected(c) => format!("connected {c}"),
                SourceEvent::Pods(change) => format!("pods {change:?}"),
            })
            .collect()
    }

    #[tokio::test]
    async fn lists_become_relists_and_synced_follows_the_last_kind() {
        let mut steps = done(Kind::Namespace);
        steps.extend([
            svc_step(watcher::Event::Init),
            svc_step(watcher::Event::InitApply(service("a", "web", "10.96.0.1"))),
            // Invalid: skipped, never a crash, and absent from the relist.
            svc_step(watcher::Event::InitApply(service(
                "a",
                "bad",
                "10.96.0.300",
            ))),
            svc_step(watcher::Event::InitDone),
        ]);
        steps.extend(done(Kind::EndpointSlice));
        steps.extend(done(Kind::ConfigMap));
        steps.push(svc_step(watcher::Event::Apply(service(
            "a",
            "new",
            "10.96.0.2",
        ))));
        // A change into something unusable leaves the zone, as a relist would have it.
        steps.push(svc_step(watcher::Event::Apply(service("a", "web", "nope"))));
        steps.push(svc_step(watcher::Event::Delete(service(
            "a",
            "new",
            "10.96.0.2",
        ))));
        let events = script(steps).await;
        assert_eq!(
            summary(&events),
            [
                "relist namespaces 0",
                "relist services 1",
                "relist endpointslices 0",
                // The zone's watches are up; the zone waits for the ConfigMap's list.
                "connected true",
                "relist configmaps 0",
                "synced",
                "upsert a/new",
                "delete a/web",
                "delete a/new",
            ]
        );
    }

    #[tokio::test]
    async fn errors_disconnect_and_answers_reconnect_but_410_is_routine() {
        let mut steps = done(Kind::Namespace);
        steps.extend(done(Kind::Service));
        steps.extend(done(Kind::EndpointSlice));
        steps.extend(done(Kind::ConfigMap));
        steps.push((Kind::Service, Err(gone())));
        steps.push((Kind::Service, Err(down())));
        steps.push((Kind::Service, Err(down())));
        // Init alone proves nothing: it comes before the list request.
        steps.push((Kind::Service, Ok(Step::Init)));
        steps.push((Kind::Service, Ok(Step::InitDone)));
        let events = script(steps).await;
        assert_eq!(
            summary(&events),
            [
                "relist namespaces 0",
                "relist services 0",
                "relist endpointslices 0",
                "connected true",
                "relist configmaps 0",
                "synced",
                "connected false",
                "relist services 0",
                "connected true",
            ]
        );
    }

    #[tokio::test]
    async fn a_config_map_that_cannot_be_read_holds_up_neither_the_zone_nor_connected() {
        let forbidden = || {
            watcher::Error::InitialListFailed(kube::Error::Api(Box::new(
                Status::failure("configmaps \"kube-dns\" is forbidden", "Forbidden").with_code(403),
            )))
        };
        let mut steps = done(Kind::Namespace);
        steps.extend(done(Kind::Service));
        steps.push((Kind::ConfigMap, Err(forbidden())));
        steps.push((Kind::ConfigMap, Err(forbidden())));
        steps.extend(done(Kind::EndpointSlice));
        // Readable again later: its list is sent, nothing else changes.
        let cm = || -> ConfigMap {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "kube-dns", "namespace": "kube-system"},
                "data": {"upstreamNameservers": "[\"192.0.2.53\"]"},
            }))
            .expect("test object")
        };
        steps.push((Kind::ConfigMap, Ok(Step::Init)));
        steps.push((
            Kind::ConfigMap,
            Ok(step_of(
                Kind::ConfigMap,
                objects::project_config_map,
                watcher::Event::InitApply(cm()),
            )),
        ));
        steps.push((Kind::ConfigMap, Ok(Step::InitDone)));
        let events = script(steps).await;
        assert_eq!(
            summary(&events),
            [
                "relist namespaces 0",
                "relist services 0",
                "relist endpointslices 0",
                "synced",
                "connected true",
                "relist configmaps 1",
            ]
        );
        assert_eq!(
            fix_for(Kind::ConfigMap, &forbidden()).as_deref(),
            Some(
                "the agent may not read the kube-dns ConfigMap: apply deploy/rbac.yaml (its Role \
                 in kube-system grants get, list and watch of that one ConfigMap)"
            )
        );
    }

    #[tokio::test]
    async fn a_successful_response_reconnects_without_any_event() {
        let (tx, mut rx) = mpsc::channel(64);
        let counts = Arc::new(ResponseCounts::default());
        let (step_tx, step_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(drive(tokio_stream_from(step_rx), counts.clone(), tx));
        for kind in KINDS {
            for s in done(kind) {
                step_tx.send(s).expect("source runs");
            }
        }
        step_tx
            .send((Kind::EndpointSlice, Err(down())))
            .expect("source runs");
        let mut seen = Vec::new();
        async fn recv(rx: &mut mpsc::Receiver<SourceEvent>) -> SourceEvent {
            tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("an event within 5 s")
                .expect("source runs")
        }
        while seen.last().map(String::as_str) != Some("connected false") {
            seen.extend(summary(&[recv(&mut rx).await]));
        }
        // A response for another resource does not count.
        counts.succeeded("/api/v1/services");
        // The resumed watch of endpointslices is accepted: connected, with no event at all.
        counts.succeeded("/apis/discovery.k8s.io/v1/endpointslices");
        assert_eq!(summary(&[recv(&mut rx).await]), ["connected true"]);
        drop(step_tx);
        task.await.expect("source ends when its input ends");
    }

    /// deploy/rbac.yaml grants exactly what the watchers use: list and watch (and get) of
    /// the zone's three resources in every namespace, and of the one kube-dns ConfigMap in
    /// kube-system (a Role, by resourceNames: the watch names it with a field selector);
    /// nothing more, bound to the agent's service account.
    #[test]
    fn rbac_grants_what_the_watch_needs_and_no_more() {
        use std::collections::BTreeSet;

        use k8s_openapi::Resource as _;
        let text = include_str!("../../../deploy/rbac.yaml");
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(text).expect("YAML");
        let of_kind = |k: &str| {
            let found: Vec<&serde_json::Value> = docs
                .iter()
                .filter(|d| d["kind"].as_str() == Some(k))
                .collect();
            assert_eq!(found.len(), 1, "one {k} in deploy/rbac.yaml");
            found[0]
        };
        // (namespace of the grant, group, resource, resource name, verb)
        let mut granted = BTreeSet::new();
        for (role, namespace) in [
            (of_kind("ClusterRole"), None),
            (
                of_kind("Role"),
                of_kind("Role")["metadata"]["namespace"].as_str(),
            ),
        ] {
            for rule in role["rules"].as_array().expect("rules") {
                let list = |k: &str| -> Vec<String> {
                    rule[k]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|v| v.as_str().expect("a string").to_string())
                                .collect()
                        })
                        .unwrap_or_default()
                };
                let names = list("resourceNames");
                let names = if names.is_empty() {
                    vec![String::new()]
                } else {
                    names
                };
                for group in list("apiGroups") {
                    for resource in list("resources") {
                        for name in &names {
                            for verb in list("verbs") {
                                granted.insert((
                                    namespace.map(str::to_string),
                                    group.clone(),
                                    resource.clone(),
                                    name.clone(),
                                    verb,
                                ));
                            }
                        }
                    }
                }
            }
        }
        let mut wanted = BTreeSet::new();
        let (cm_namespace, cm_name) = KUBE_DNS_CONFIG_MAP;
        for (namespace, group, resource, name) in [
            (None, Namespace::GROUP, Namespace::URL_PATH_SEGMENT, ""),
            (None, Service::GROUP, Service::URL_PATH_SEGMENT, ""),
            (
                None,
                EndpointSlice::GROUP,
                EndpointSlice::URL_PATH_SEGMENT,
                "",
            ),
            (
                Some(cm_namespace),
                ConfigMap::GROUP,
                ConfigMap::URL_PATH_SEGMENT,
                cm_name,
            ),
        ] {
            for verb in ["get", "list", "watch"] {
                wanted.insert((
                    namespace.map(str::to_string),
                    group.to_string(),
                    resource.to_string(),
                    name.to_string(),
                    verb.to_string(),
                ));
            }
        }
        assert_eq!(granted, wanted);

        let sa = of_kind("ServiceAccount");
        for (binding, role) in [
            ("ClusterRoleBinding", "ClusterRole"),
            ("RoleBinding", "Role"),
        ] {
            let binding = of_kind(binding);
            assert_eq!(binding["roleRef"]["kind"].as_str(), Some(role));
            assert_eq!(
                binding["roleRef"]["name"],
                of_kind(role)["metadata"]["name"]
            );
            if role == "Role" {
                assert_eq!(
                    binding["metadata"]["namespace"],
                    of_kind(role)["metadata"]["namespace"]
                );
            }
            let subject = &binding["subjects"][0];
            assert_eq!(subject["kind"].as_str(), Some("ServiceAccount"));
            assert_eq!(subject["name"], sa["metadata"]["name"]);
            assert_eq!(subject["namespace"], sa["metadata"]["namespace"]);
        }
    }

    fn tokio_stream_from<T: Send + 'static>(
        mut rx: mpsc::UnboundedReceiver<T>,
    ) -> impl Stream<Item = T> + Unpin {
        Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }
}
