//! `dns-agent run`: wires sources → zone → kernel and server, and shuts down cleanly.
//!
//! The order of the steps is the point: everything that can refuse the configuration (the
//! source, the sockets, the interfaces) runs before anything touches the kernel; the kernel
//! maps are filled before the program is attached; queries move to this agent only once its
//! zone is loaded.

use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinSet,
};

use crate::{
    config::{ObjectSource, RunConfig},
    kernel::{
        Capacity, Kernel,
        attach::{Attachments, check_interfaces},
        cache_sync::KernelCache,
        sync::KernelSync,
    },
    metrics::Metrics,
    server::{
        Handler,
        autopath::{Autopath, Completions},
        cache::Cache,
        external::ExternalResolver,
        forward::Forwarder,
        handover, heartbeat,
        limits::{self, Limits},
        listen_address::ListenAddresses,
        routing::Routing,
        sockets::Sockets,
    },
    source::{self, SourceEvent, pods::PodTable},
    zone::{
        Change, ZoneModel, ZoneSettings,
        objects::{ClusterObject, KUBE_DNS_CONFIG_MAP, Kind, KubeDnsConfigData},
    },
};

type Tasks = JoinSet<std::io::Result<()>>;

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    // First: a SIGTERM from here on is a clean shutdown, even one that comes the moment /ready
    // says 200 (the default action would kill the agent before it cleans up).
    let signals = Signals::install()?;
    raise_open_files();
    let source = Source::open(&config).await?;
    let model = ZoneModel::new(zone_settings(&config));
    let metrics = Arc::new(Metrics::default());
    let (forwarder, routing) = forwarding(&config, &source, &metrics)?;
    let addresses = ListenAddresses::ensure(&config.args.listen)
        .await
        .context("putting the listen addresses on the node")?;
    let mut sockets = Sockets::bind(&config.args.listen, config.metrics_addr, config.udp_loops)?;
    check_interfaces(&config.args.interfaces)?;
    let (attachments, mut sync) = load_kernel(&config, &model, &metrics)?.unzip();
    // Loaded and bound: from here on the agent attaches, writes maps and, on exit, removes its
    // listen address. CAP_PERFMON, CAP_NET_BIND_SERVICE, CAP_SYS_ADMIN and the rest go now.
    crate::capabilities::keep_for_serving(attachments.is_some())
        .context("dropping the capabilities serving does not need")?;
    let kernel_cache = kernel_cache(&config, sync.as_mut());
    let (search, autopath) = search_paths(&config, &model, kernel_cache.is_some());

    let model = Arc::new(RwLock::new(model));
    let handler = userspace_server(&config, &model, &forwarder, &metrics, autopath);

    let mut tasks = Tasks::new();
    if let Some(beat) = sync.as_ref().map(|s| s.maps().heartbeat()) {
        tasks.spawn(heartbeat::run(
            beat,
            config.args.listen[0],
            handler.probe.clone(),
            sockets.loops(),
        ));
    }
    if let Some(kernel_cache) = kernel_cache {
        tasks.spawn(crate::kernel::cache_sync::follow(
            handler.external.clone(),
            search.completions.clone(),
            kernel_cache,
            metrics.clone(),
        ));
    }
    let zone_loaded = source.spawn(&mut tasks, model, sync, routing, metrics.clone(), search);
    sockets
        .serve(&mut tasks, &handler)
        .context("starting the receive loops")?;
    let metrics_listener = sockets.metrics.take().expect("bound once");
    tasks.spawn(crate::metrics::serve(metrics_listener, metrics.clone()));
    tasks.spawn(handler.external.clone().sweep());
    tracing::info!(
        listen = ?config.args.listen,
        upstreams = ?forwarder.upstreams(),
        policy = %config.forward.policy,
        cache_size = config.cache.capacity,
        kernel_cache = config.args.kernel_cache(),
        autopath = config.args.autopath,
        kernel = attachments.is_some(),
        udp_loops = sockets.loops(),
        "serving"
    );

    let outcome = serve(
        &mut tasks,
        signals,
        zone_loaded,
        &sockets,
        &forwarder,
        attachments,
        &metrics,
    )
    .await;
    shut_down(&handler, tasks, sockets, addresses).await;
    outcome
}

/// Every TCP connection and upstream query holds a file descriptor; the configuration was
/// checked against the hard limit. Failing to raise the soft one is not fatal: `accept`
/// survives running out (see `accept`).
fn raise_open_files() {
    match limits::raise_fd_limit() {
        Ok(files) => tracing::debug!(files, "open files allowed"),
        Err(e) => tracing::warn!(
            error = %e,
            "raising the soft limit of open files to the hard one failed; TCP connections \
             may run out of file descriptors before --tcp-max-connections"
        ),
    }
}

/// The writer of the kernel's copy of the cache of upstream answers, unless
/// `--no-kernel-cache` or no kernel path.
fn kernel_cache(config: &RunConfig, sync: Option<&mut KernelSync>) -> Option<KernelCache> {
    sync.filter(|_| config.args.kernel_cache())
        .and_then(|s| s.maps_mut().take_cache())
        .map(KernelCache::new)
}

/// After serving: the queries in flight answered, the tasks stopped, the sockets closed, and
/// the listen addresses removed unless another agent bound beside this one (a handover) keeps
/// serving on them.
async fn shut_down(
    handler: &Handler,
    mut tasks: Tasks,
    sockets: Sockets,
    addresses: ListenAddresses,
) {
    drain(handler).await;
    tasks.shutdown().await;
    drop(sockets);
    addresses
        .release(|ip| handover::bound_before(SocketAddr::new(ip, 53), false) > 0)
        .await;
}

/// Serves until a signal or a failed task. On the way: once the zone is loaded, takes the
/// queries over from a previous agent, probes the upstreams for loops and attaches the program;
/// attaches to matching interfaces as they appear. At the end, hands the kernel path over to
/// the next agent (or detaches).
async fn serve(
    tasks: &mut Tasks,
    mut signals: Signals,
    mut zone_loaded: oneshot::Receiver<()>,
    sockets: &Sockets,
    forwarder: &Arc<Forwarder>,
    mut attachments: Option<Attachments>,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    let (link_tx, mut links) = mpsc::channel(256);
    if attachments.as_ref().is_some_and(Attachments::follows_links) {
        tasks.spawn(crate::kernel::links::watch(link_tx));
    }
    let mut loading = true;
    // Once serving: has the agent before this one left its sockets' places in the reuseport
    // groups?
    let mut settle = tokio::time::interval(Duration::from_secs(1));
    let outcome = loop {
        tokio::select! {
            _ = signals.interrupt.recv() => { tracing::info!("SIGINT: shutting down"); break Ok(()) }
            _ = signals.terminate.recv() => { tracing::info!("SIGTERM: shutting down"); break Ok(()) }
            Some(res) = tasks.join_next() => break Err(match res {
                Ok(Ok(())) => anyhow::anyhow!("a task ended unexpectedly"),
                Ok(Err(e)) => anyhow::Error::from(e).context("serving failed"),
                Err(e) => anyhow::Error::from(e).context("a task panicked"),
            }),
            loaded = &mut zone_loaded, if loading => {
                loading = false;
                if loaded.is_ok() && let Err(e) = take_over(tasks, sockets, forwarder, attachments.as_mut(), metrics) {
                    break Err(e);
                }
            }
            _ = settle.tick(), if !loading => {
                if let Err(e) = sockets.settle() {
                    tracing::warn!(error = %e, "steering queries by this agent's new socket places failed; queries still reach it");
                }
            }
            Some(event) = links.recv() => {
                if let Some(a) = attachments.as_mut() {
                    a.link(event);
                }
            }
        }
    };
    if let Some(a) = attachments {
        a.release();
    }
    outcome
}

/// The zone is loaded: queries to this agent from now on, and the program attached (the swap
/// from a previous agent's program is atomic).
fn take_over(
    tasks: &mut Tasks,
    sockets: &Sockets,
    forwarder: &Arc<Forwarder>,
    attachments: Option<&mut Attachments>,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    sockets
        .steer_to_self()
        .context("steering queries to this agent")?;
    // Only now would a probe that comes back reach this agent's listeners.
    tasks.spawn(detect_loops(forwarder.clone()));
    if let Some(a) = attachments {
        a.zone_loaded()?;
    }
    metrics.set_serving();
    Ok(())
}

/// Lets queries already queued or in flight finish before the sockets close.
async fn drain(handler: &Handler) {
    let until = Instant::now() + Duration::from_secs(2);
    tokio::time::sleep(Duration::from_millis(100)).await;
    while handler.in_flight() > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The signals that stop the agent cleanly, caught from the start.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }
}

/// A source of cluster objects, opened: a zone file that cannot be used, or a client that
/// cannot be configured, stops the agent before it touches the kernel.
enum Source {
    File(std::path::PathBuf, source::file::ZoneFile),
    Api(kube::Client, Arc<source::kubernetes::ResponseCounts>),
}

/// Search-path completion's state: the Pods of this node, and the completions the kernel may
/// serve; `node_name` when the API's Pods are watched.
struct SearchPaths {
    pods: Arc<RwLock<PodTable>>,
    completions: Arc<Completions>,
    node_name: Option<String>,
}

/// Search-path completion (`--autopath`): the state the zone task fills and the completer the
/// server asks. Completions go to the kernel beside the cache's answers, in the same room.
fn search_paths(
    config: &RunConfig,
    model: &ZoneModel,
    kernel_cache: bool,
) -> (SearchPaths, Option<Autopath>) {
    let search = SearchPaths {
        pods: Arc::default(),
        completions: Arc::new(Completions::new(if kernel_cache {
            config.cache.capacity
        } else {
            0
        })),
        node_name: config
            .args
            .node_name
            .clone()
            .filter(|_| config.args.autopath),
    };
    let autopath = config.args.autopath.then(|| {
        Autopath::new(
            model.zone_wire(),
            search.pods.clone(),
            search.completions.clone(),
        )
    });
    (search, autopath)
}

impl Source {
    /// The kube-dns ConfigMap a zone file holds (the API's comes with its watch).
    fn kube_dns_config(&self) -> Option<&KubeDnsConfigData> {
        match self {
            Self::File(_, file) => file.objects.iter().find_map(|o| match o {
                ClusterObject::KubeDnsConfig(data) => Some(data),
                _ => None,
            }),
            Self::Api(..) => None,
        }
    }

    async fn open(config: &RunConfig) -> anyhow::Result<Self> {
        Ok(match &config.source {
            ObjectSource::ZoneFile(path) => Self::File(
                path.clone(),
                source::file::load_file(path).context("the zone file is refused")?,
            ),
            ObjectSource::Api(client) => {
                let (client, counts) = source::kubernetes::connect(client).await?;
                Self::Api(client, counts)
            }
        })
    }

    /// Runs the source and the zone task it feeds; the receiver fires once the zone is loaded.
    fn spawn(
        self,
        tasks: &mut Tasks,
        model: Arc<RwLock<ZoneModel>>,
        sync: Option<KernelSync>,
        routing: Routing,
        metrics: Arc<Metrics>,
        search: SearchPaths,
    ) -> oneshot::Receiver<()> {
        let (tx, rx) = mpsc::channel(1024);
        match self {
            Self::File(path, initial) => tasks.spawn(async move {
                source::file::run(path, initial, tx, Duration::from_secs(1)).await;
                Ok(())
            }),
            Self::Api(client, counts) => {
                if let Some(node) = search.node_name.clone() {
                    let (client, tx) = (client.clone(), tx.clone());
                    tasks.spawn(async move {
                        source::kubernetes::watch_pods(client, node, tx).await;
                        Ok(())
                    });
                }
                tasks.spawn(async move {
                    source::kubernetes::run(client, counts, tx).await;
                    Ok(())
                })
            }
        };
        let (loaded_tx, loaded_rx) = oneshot::channel();
        tasks.spawn(async move {
            zone_task(rx, model, sync, routing, metrics, search, loaded_tx).await;
            Ok(())
        });
        loaded_rx
    }
}

fn zone_settings(config: &RunConfig) -> ZoneSettings {
    let serial = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(1);
    ZoneSettings {
        domain: config.cluster_domain.clone(),
        ttl: config.args.ttl,
        negative_ttl: config.args.negative_ttl,
        ns_addrs: config.args.listen.clone(),
        serial,
    }
}

/// The forwarder, and the routes that tell it where names go: from the command line, the
/// kube-dns ConfigMap (in a zone file: a malformed one refuses the file) and, in intercept mode,
/// the kube-dns Service's endpoints. The zone task keeps the routes in step with the cluster.
fn forwarding(
    config: &RunConfig,
    source: &Source,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<(Arc<Forwarder>, Routing)> {
    let forwarder = Arc::new(Forwarder::new(
        Vec::new(),
        config.forward.clone(),
        metrics.clone(),
    ));
    let routing = Routing::start(
        config.routes.clone(),
        source.kube_dns_config(),
        forwarder.clone(),
        metrics.clone(),
    )
    .context("the zone file is refused")?;
    Ok((forwarder, routing))
}

/// Loads the XDP program and fills its maps with what the zone holds before any object
/// arrives (the apex, `svc` and `pod` names); `None` with `--no-kernel`.
fn load_kernel(
    config: &RunConfig,
    model: &ZoneModel,
    metrics: &Metrics,
) -> anyhow::Result<Option<(Attachments, KernelSync)>> {
    let args = &config.args;
    if args.no_kernel {
        return Ok(None);
    }
    let cache = if args.kernel_cache() {
        // Checked against MAX_KERNEL_CACHE at start. Completed search paths take as much room
        // again at most (`Completions` holds no more than --cache-size).
        args.cache_size as u32 * if args.autopath { 2 } else { 1 }
    } else {
        0
    };
    let (kernel, maps) = Kernel::load(
        Capacity::scaled(args.kernel_capacity).with_cache(cache),
        &args.pin_path,
        !args.intercept.is_empty(),
    )?;
    let mut sync = KernelSync::new(maps);
    let (v4, v6) = crate::kernel::split_listen(&args.listen);
    sync.maps_mut().set_listen(&v4, &v6)?;
    let (v4, v6) = crate::kernel::split_listen(&args.intercept);
    sync.maps_mut().set_intercept(&v4, &v6)?;
    sync.maps_mut().set_grace(args.kernel_grace);
    sync.maps_mut().set_autopath(args.autopath);
    sync.write_config(model)?;
    sync.apply(
        Vec::new(),
        crate::kernel::sync::entries_of(model, &model.fixed_names()),
    );
    metrics.set_kernel_pin_path(args.pin_path.clone());
    let attachments = Attachments::new(
        kernel,
        args.interfaces.clone(),
        config.interface_patterns.clone(),
        args.attach_mode,
        sync.maps().heartbeat(),
    );
    Ok(Some((attachments, sync)))
}

/// The userspace server: the zone, then the cache, then the upstreams.
fn userspace_server(
    config: &RunConfig,
    model: &Arc<RwLock<ZoneModel>>,
    forwarder: &Arc<Forwarder>,
    metrics: &Arc<Metrics>,
    autopath: Option<Autopath>,
) -> Arc<Handler> {
    let external = Arc::new(ExternalResolver::new(
        forwarder.clone(),
        Cache::new(config.cache.clone(), metrics.cache.clone()),
        metrics.clone(),
    ));
    Arc::new(
        Handler::new(
            model.clone(),
            external,
            metrics.clone(),
            heartbeat::Probe::new(&config.cluster_domain),
        )
        .with_limits(Arc::new(Limits::new(
            config.limits.clone(),
            metrics.limits.clone(),
        )))
        .with_autopath(autopath),
    )
}

/// Probes every upstream for a forwarding loop (a probe that comes back to our own listeners).
/// Runs once this agent's sockets receive its queries; then waits forever, unless every
/// upstream loops: then it fails, and the agent stops with the reason.
async fn detect_loops(forwarder: Arc<Forwarder>) -> std::io::Result<()> {
    forwarder.detect_loops().await.map_err(|e| {
        std::io::Error::other(format!(
            "{e}: {} (see the forwarding loop errors above); point those resolvers elsewhere, \
             or name others (--upstream, --stub-domain, the kube-dns ConfigMap)",
            forwarder
                .upstreams()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    std::future::pending::<std::io::Result<()>>().await
}

/// Applies source events to the model and the kernel maps, in order; hands the kube-dns
/// ConfigMap to the forwarding routes, and tells them when the zone changed.
async fn zone_task(
    mut rx: mpsc::Receiver<SourceEvent>,
    model: Arc<RwLock<ZoneModel>>,
    sync: Option<KernelSync>,
    routing: Routing,
    metrics: Arc<Metrics>,
    search: SearchPaths,
    loaded: oneshot::Sender<()>,
) {
    let mut zone = ZoneSink {
        model,
        sync,
        routing,
        metrics,
        search,
        loaded: Some(loaded),
    };
    // Now and then: pending kernel writes retried, retired blobs deleted.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let event = tokio::select! {
            event = rx.recv() => match event {
                Some(e) => e,
                None => break,
            },
            _ = tick.tick() => {
                zone.retry();
                continue;
            }
        };
        let (changes, seen) = match event {
            SourceEvent::Relist {
                kind: Kind::ConfigMap,
                objects,
                ..
            } => {
                zone.routing
                    .config_map(objects.into_iter().find_map(|o| match o {
                        ClusterObject::KubeDnsConfig(data) => Some(data),
                        _ => None,
                    }));
                continue;
            }
            SourceEvent::Upsert {
                object: ClusterObject::KubeDnsConfig(data),
                ..
            } => {
                zone.routing.config_map(Some(data));
                continue;
            }
            SourceEvent::Delete {
                kind: Kind::ConfigMap,
                key,
                ..
            } => {
                if (&*key.namespace, &*key.name) == KUBE_DNS_CONFIG_MAP {
                    zone.routing.config_map(None);
                }
                continue;
            }
            SourceEvent::Relist {
                kind,
                objects,
                seen,
            } => (
                zone.model
                    .read()
                    .expect("zone lock")
                    .diff_relist(kind, objects),
                seen,
            ),
            SourceEvent::Upsert { object, seen } => (vec![Change::Upsert(object)], seen),
            SourceEvent::Delete { kind, key, seen } => (vec![Change::Delete(kind, key)], seen),
            SourceEvent::DeleteNamespace { name, seen } => {
                (vec![Change::DeleteNamespace(name)], seen)
            }
            SourceEvent::Synced => {
                zone.first_load_done().await;
                continue;
            }
            SourceEvent::Connected(up) => {
                zone.metrics.set_api_connected(up);
                continue;
            }
            SourceEvent::Pods(change) => {
                zone.pods(change);
                continue;
            }
        };
        zone.apply(changes, seen);
    }
}

/// The zone model and the kernel maps that mirror it; and the forwarding routes, which follow
/// the kube-dns Service's endpoints in it.
struct ZoneSink {
    model: Arc<RwLock<ZoneModel>>,
    sync: Option<KernelSync>,
    routing: Routing,
    metrics: Arc<Metrics>,
    search: SearchPaths,
    /// Told once the first full load is done.
    loaded: Option<oneshot::Sender<()>>,
}

impl ZoneSink {
    /// Applies changes to the model and writes the kernel entries they change: the names a
    /// change touches are read before and after it, and only the difference is written.
    fn apply(&mut self, changes: Vec<Change>, seen: Instant) {
        if changes.is_empty() {
            return;
        }
        let (before, after, names) = {
            let mut m = self.model.write().expect("zone lock");
            let names = m.touched(&changes);
            let entries = |m: &ZoneModel| {
                self.sync
                    .as_ref()
                    .map(|_| crate::kernel::sync::entries_of(m, &names))
            };
            let before = entries(&m);
            m.apply(changes);
            let after = entries(&m);
            self.metrics
                .set_zone_size(m.service_count(), m.endpoint_count());
            (before, after, names)
        };
        // Completions that looked at a changed name are no longer the zone's answer.
        self.search.completions.zone_changed(&names);
        if let (Some(s), Some(before), Some(after)) = (self.sync.as_mut(), before, after) {
            let stats = s.apply(before, after);
            self.metrics
                .kernel_synced(stats.written + stats.removed, stats.failed, s.entries());
            tracing::debug!(?stats, "kernel maps updated");
        }
        let model = self.model.read().expect("zone lock");
        if model.is_synced() {
            self.metrics.programming_latency.observe(seen.elapsed());
        }
        self.routing.zone_changed(&model);
    }

    /// The Pods of the node changed: the namespaces of their addresses, for the kernel too.
    fn pods(&mut self, change: source::pods::PodChange) {
        let mut pods = self.search.pods.write().expect("pods lock");
        let touched = pods.apply(change);
        let Some(s) = self.sync.as_mut() else {
            return;
        };
        for ip in touched {
            let ns = pods.namespace_of(ip);
            if let Err(e) = s.maps_mut().set_pod(ip, ns.as_deref()) {
                tracing::warn!(error = %e, "a pod's namespace did not fit in the kernel map; its search paths are completed by userspace");
            }
        }
    }

    /// Writes what the kernel maps still lack (a write failed), and deletes retired blobs.
    fn retry(&mut self) {
        if let Some(s) = self.sync.as_mut() {
            let stats = s.retry();
            if stats.written + stats.failed > 0 {
                self.metrics
                    .kernel_synced(stats.written, stats.failed, s.entries());
                tracing::debug!(?stats, pending = s.pending(), "kernel writes retried");
            }
        }
    }

    /// The source has listed everything once: the zone answers, the kernel too.
    async fn first_load_done(&mut self) {
        if self.model.read().expect("zone lock").is_synced() {
            return;
        }
        let started = Instant::now();
        // The first load allocates and frees a lot (objects, encodings); glibc keeps the freed
        // memory and consolidates it at the next big allocation (a stall of a hundred
        // milliseconds at 100,000 endpoints, on the query path). Give it back now, before
        // answering: it halves the agent's resident memory.
        let _ = tokio::task::spawn_blocking(|| {
            // SAFETY: malloc_trim only releases free heap memory.
            unsafe { libc::malloc_trim(0) };
        })
        .await;
        self.model.write().expect("zone lock").set_synced();
        if let Some(s) = self.sync.as_mut()
            && let Err(e) = s.set_synced()
        {
            tracing::error!(error = %e, "marking the kernel zone synced failed; the kernel keeps passing queries up");
        }
        self.metrics.set_synced(true);
        let m = self.model.read().expect("zone lock");
        self.routing.zone_changed(&m);
        tracing::info!(
            services = m.service_count(),
            endpoints = m.endpoint_count(),
            kernel_entries = self.sync.as_ref().map(|s| s.entries()),
            took = ?started.elapsed(),
            "zone loaded; answering"
        );
        if let Some(tx) = self.loaded.take() {
            let _ = tx.send(());
        }
    }
}
