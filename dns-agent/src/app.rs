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
        sync::KernelSync,
    },
    metrics::Metrics,
    server::{
        Handler, cache::Cache, external::ExternalResolver, forward::Forwarder, handover, heartbeat,
        listen_address::ListenAddresses, sockets::Sockets,
    },
    source::{self, SourceEvent},
    zone::{Change, ZoneModel, ZoneSettings},
};

type Tasks = JoinSet<std::io::Result<()>>;

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    let source = Source::open(&config).await?;
    let model = ZoneModel::new(zone_settings(&config));
    let metrics = Arc::new(Metrics::default());
    let addresses = ListenAddresses::ensure(&config.args.listen)
        .await
        .context("putting the listen addresses on the node")?;
    let mut sockets = Sockets::bind(&config.args.listen, config.metrics_addr, config.udp_loops)?;
    check_interfaces(&config.args.interfaces)?;
    let (attachments, sync) = load_kernel(&config, &model, &metrics)?.unzip();

    let model = Arc::new(RwLock::new(model));
    let forwarder = Arc::new(Forwarder::new(
        config.upstreams.clone(),
        config.forward.clone(),
        metrics.clone(),
    ));
    let handler = userspace_server(&config, &model, &forwarder, &metrics);

    let mut tasks = Tasks::new();
    let heartbeat = sync.as_ref().map(|s| s.maps().heartbeat());
    if let Some(beat) = &heartbeat {
        tasks.spawn(heartbeat::run(
            beat.clone(),
            config.args.listen[0],
            handler.probe.clone(),
            sockets.loops(),
        ));
    }
    let zone_loaded = source.spawn(&mut tasks, model, sync, metrics.clone());
    sockets
        .serve(&mut tasks, &handler)
        .context("starting the receive loops")?;
    let metrics_listener = sockets.metrics.take().expect("bound once");
    tasks.spawn(crate::metrics::serve(metrics_listener, metrics.clone()));
    tasks.spawn(handler.external.clone().sweep());
    tracing::info!(
        listen = ?config.args.listen,
        upstreams = ?config.upstreams,
        policy = %config.forward.policy,
        cache_size = config.cache.capacity,
        kernel = attachments.is_some(),
        udp_loops = sockets.loops(),
        "serving"
    );

    let outcome = serve(&mut tasks, zone_loaded, &sockets, &forwarder, attachments).await;
    drain(&handler).await;
    tasks.shutdown().await;
    drop(sockets);
    // Another agent bound beside this one (a handover) keeps serving on the addresses.
    addresses
        .release(|ip| handover::bound_before(SocketAddr::new(ip, 53), false) > 0)
        .await;
    outcome
}

/// Serves until a signal or a failed task. On the way: once the zone is loaded, takes the
/// queries over from a previous agent, probes the upstreams for loops and attaches the program;
/// attaches to matching interfaces as they appear. At the end, hands the kernel path over to
/// the next agent (or detaches).
async fn serve(
    tasks: &mut Tasks,
    mut zone_loaded: oneshot::Receiver<()>,
    sockets: &Sockets,
    forwarder: &Arc<Forwarder>,
    mut attachments: Option<Attachments>,
) -> anyhow::Result<()> {
    let (link_tx, mut links) = mpsc::channel(256);
    if attachments.as_ref().is_some_and(Attachments::follows_links) {
        tasks.spawn(crate::kernel::links::watch(link_tx));
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut loading = true;
    // Once serving: has the agent before this one left its sockets' places in the reuseport
    // groups?
    let mut settle = tokio::time::interval(Duration::from_secs(1));
    let outcome = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: shutting down"); break Ok(()) }
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break Ok(()) }
            Some(res) = tasks.join_next() => break Err(match res {
                Ok(Ok(())) => anyhow::anyhow!("a task ended unexpectedly"),
                Ok(Err(e)) => anyhow::Error::from(e).context("serving failed"),
                Err(e) => anyhow::Error::from(e).context("a task panicked"),
            }),
            loaded = &mut zone_loaded, if loading => {
                loading = false;
                if loaded.is_ok() && let Err(e) = take_over(tasks, sockets, forwarder, attachments.as_mut()) {
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
) -> anyhow::Result<()> {
    sockets
        .steer_to_self()
        .context("steering queries to this agent")?;
    // Only now would a probe that comes back reach this agent's listeners.
    tasks.spawn(detect_loops(forwarder.clone()));
    if let Some(a) = attachments {
        a.zone_loaded()?;
    }
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

/// A source of cluster objects, opened: a zone file that cannot be used, or a client that
/// cannot be configured, stops the agent before it touches the kernel.
enum Source {
    File(std::path::PathBuf, Vec<crate::zone::objects::ClusterObject>),
    Api(kube::Client, Arc<source::kubernetes::ResponseCounts>),
}

impl Source {
    async fn open(config: &RunConfig) -> anyhow::Result<Self> {
        Ok(match &config.source {
            ObjectSource::ZoneFile(path) => Self::File(
                path.clone(),
                source::file::load(path).context("the zone file is refused")?,
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
        metrics: Arc<Metrics>,
    ) -> oneshot::Receiver<()> {
        let (tx, rx) = mpsc::channel(1024);
        match self {
            Self::File(path, initial) => tasks.spawn(async move {
                source::file::run(path, initial, tx, Duration::from_secs(1)).await;
                Ok(())
            }),
            Self::Api(client, counts) => tasks.spawn(async move {
                source::kubernetes::run(client, counts, tx).await;
                Ok(())
            }),
        };
        let (loaded_tx, loaded_rx) = oneshot::channel();
        tasks.spawn(async move {
            zone_task(rx, model, sync, metrics, loaded_tx).await;
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
    let (kernel, maps) = Kernel::load(
        Capacity::scaled(args.kernel_capacity),
        &args.pin_path,
        !args.intercept.is_empty(),
    )?;
    let mut sync = KernelSync::new(maps);
    let (v4, v6) = crate::kernel::split_listen(&args.listen);
    sync.maps_mut().set_listen(&v4, &v6)?;
    let (v4, v6) = crate::kernel::split_listen(&args.intercept);
    sync.maps_mut().set_intercept(&v4, &v6)?;
    sync.maps_mut().set_grace(args.kernel_grace);
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
) -> Arc<Handler> {
    let external = Arc::new(ExternalResolver::new(
        forwarder.clone(),
        Cache::new(config.cache.clone(), metrics.cache.clone()),
        metrics.clone(),
    ));
    Arc::new(Handler::new(
        model.clone(),
        external,
        metrics.clone(),
        heartbeat::Probe::new(&config.cluster_domain),
    ))
}

/// Probes every upstream for a forwarding loop (a probe that comes back to our own listeners).
/// Runs once this agent's sockets receive its queries; then waits forever, unless every
/// upstream loops: then it fails, and the agent stops with the reason.
async fn detect_loops(forwarder: Arc<Forwarder>) -> std::io::Result<()> {
    forwarder.detect_loops().await.map_err(|e| {
        std::io::Error::other(format!(
            "{e}: --upstream {} (see the forwarding loop errors above); point those \
             resolvers elsewhere or give another --upstream",
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

/// Applies source events to the model and the kernel maps, in order.
async fn zone_task(
    mut rx: mpsc::Receiver<SourceEvent>,
    model: Arc<RwLock<ZoneModel>>,
    sync: Option<KernelSync>,
    metrics: Arc<Metrics>,
    loaded: oneshot::Sender<()>,
) {
    let mut zone = ZoneSink {
        model,
        sync,
        metrics,
        loaded: Some(loaded),
    };
    while let Some(event) = rx.recv().await {
        let (changes, seen) = match event {
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
        };
        zone.apply(changes, seen);
    }
}

/// The zone model and the kernel maps that mirror it.
struct ZoneSink {
    model: Arc<RwLock<ZoneModel>>,
    sync: Option<KernelSync>,
    metrics: Arc<Metrics>,
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
        let (before, after) = {
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
            (before, after)
        };
        if let (Some(s), Some(before), Some(after)) = (self.sync.as_mut(), before, after) {
            let stats = s.apply(before, after);
            self.metrics
                .kernel_synced(stats.written + stats.removed, stats.failed, s.entries());
            tracing::debug!(?stats, "kernel maps updated");
        }
        if self.model.read().expect("zone lock").is_synced() {
            self.metrics.programming_latency.observe(seen.elapsed());
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
