//! `dns-agent run`: wires sources → zone → kernel and server, and shuts down cleanly.

use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use tokio::{
    net::{TcpListener, UdpSocket},
    sync::mpsc,
    task::JoinSet,
};

use crate::{
    config::RunConfig,
    kernel::{Capacity, Kernel, sync::KernelSync},
    metrics::Metrics,
    server::{
        Handler,
        forward::{Forwarder, Timeouts},
        tcp, udp,
    },
    source::{self, SourceEvent},
    zone::{Change, ZoneModel, ZoneSettings},
};

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    let args = &config.args;
    let initial = match &args.zone_file {
        Some(path) => source::file::load(path).context("the zone file is refused")?,
        None => bail!("no zone source"),
    };

    let serial = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(1);
    let model = ZoneModel::new(ZoneSettings {
        domain: config.cluster_domain.clone(),
        ttl: args.ttl,
        negative_ttl: args.negative_ttl,
        ns_addrs: args.listen.clone(),
        serial,
    });
    let metrics = Arc::new(Metrics::default());

    // Sockets first: a listen address that is not on this node is a configuration error, and
    // should stop us before anything touches the kernel.
    let mut udp_sockets = Vec::new();
    let mut tcp_listeners = Vec::new();
    for ip in &args.listen {
        let addr = SocketAddr::new(*ip, 53);
        let hint = || {
            format!(
                "binding {addr} failed: is {ip} assigned to an interface of this node? \
                 (e.g. `ip addr add {ip}/{} dev lo`)",
                if ip.is_ipv4() { 32 } else { 128 }
            )
        };
        udp_sockets.push(Arc::new(UdpSocket::bind(addr).await.with_context(hint)?));
        tcp_listeners.push(TcpListener::bind(addr).await.with_context(hint)?);
    }
    let metrics_listener = TcpListener::bind(config.metrics_addr)
        .await
        .with_context(|| format!("--metrics-addr {}: cannot listen", config.metrics_addr))?;

    // The kernel path.
    let mut kernel = None;
    let mut sync = None;
    if !args.no_kernel {
        let capacity = Capacity {
            short: args.kernel_capacity,
            long: (args.kernel_capacity / 4).max(1024),
            blobs: (args.kernel_capacity / 8).max(1024),
        };
        let (mut k, maps) = Kernel::load(capacity, &args.pin_path)?;
        let mut s = KernelSync::new(maps);
        let (v4, v6) = crate::kernel::split_listen(&args.listen);
        s.maps_mut().set_listen(&v4, &v6)?;
        s.write_config(&model)?;
        for iface in &args.interfaces {
            k.attach(iface, args.attach_mode)?;
            tracing::info!(interface = %iface, mode = %args.attach_mode, "XDP program attached");
        }
        metrics.set_kernel_pin_path(args.pin_path.clone());
        kernel = Some(k);
        sync = Some(s);
    }

    let model = Arc::new(RwLock::new(model));
    let handler = Arc::new(Handler {
        zone: model.clone(),
        forwarder: Forwarder::new(config.upstreams.clone(), Timeouts::default()),
        metrics: metrics.clone(),
    });

    let mut tasks = JoinSet::new();
    let (tx, rx) = mpsc::channel(1024);
    if let Some(path) = args.zone_file.clone() {
        tasks.spawn(async move {
            source::file::run(path, initial, tx, Duration::from_secs(1)).await;
            Ok(())
        });
    }
    {
        let model = model.clone();
        let metrics = metrics.clone();
        tasks.spawn(async move {
            zone_task(rx, model, sync, metrics).await;
            Ok(())
        });
    }
    for s in udp_sockets {
        tasks.spawn(udp::serve(s, handler.clone()));
    }
    for l in tcp_listeners {
        tasks.spawn(tcp::serve(l, handler.clone()));
    }
    tasks.spawn(crate::metrics::serve(metrics_listener, metrics.clone()));
    tracing::info!(
        listen = ?args.listen,
        upstreams = ?config.upstreams,
        kernel = kernel.is_some(),
        "serving"
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let outcome = tokio::select! {
        _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: shutting down"); Ok(()) }
        _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); Ok(()) }
        Some(res) = tasks.join_next() => match res {
            Ok(Ok(())) => Err(anyhow::anyhow!("a task ended unexpectedly")),
            Ok(Err(e)) => Err(anyhow::Error::from(e).context("serving failed")),
            Err(e) => Err(anyhow::Error::from(e).context("a task panicked")),
        },
    };
    tasks.abort_all();
    if let Some(mut k) = kernel {
        k.detach_all();
    }
    outcome
}

/// Applies source events to the model and the kernel maps, in order.
async fn zone_task(
    mut rx: mpsc::Receiver<SourceEvent>,
    model: Arc<RwLock<ZoneModel>>,
    mut sync: Option<KernelSync>,
    metrics: Arc<Metrics>,
) {
    while let Some(event) = rx.recv().await {
        let (changes, seen) = match event {
            SourceEvent::Relist {
                kind,
                objects,
                seen,
            } => (
                model.read().expect("zone lock").diff_relist(kind, objects),
                Some(seen),
            ),
            SourceEvent::Upsert { object, seen } => (vec![Change::Upsert(object)], Some(seen)),
            SourceEvent::Delete { kind, key, seen } => {
                (vec![Change::Delete(kind, key)], Some(seen))
            }
            SourceEvent::DeleteNamespace { name, seen } => {
                (vec![Change::DeleteNamespace(name)], Some(seen))
            }
            SourceEvent::Synced => {
                let started = Instant::now();
                let m = model.read().expect("zone lock");
                if !m.is_synced() {
                    drop(m);
                    model.write().expect("zone lock").set_synced();
                    if let Some(s) = sync.as_mut()
                        && let Err(e) = s.set_synced() {
                            tracing::error!(error = %e, "marking the kernel zone synced failed; the kernel keeps passing queries up");
                        }
                    metrics.set_synced(true);
                    let m = model.read().expect("zone lock");
                    tracing::info!(
                        services = m.service_count(),
                        endpoints = m.endpoint_count(),
                        kernel_entries = sync.as_ref().map(|s| s.entries()),
                        took = ?started.elapsed(),
                        "zone loaded; answering"
                    );
                }
                continue;
            }
            SourceEvent::Connected(up) => {
                metrics.set_api_connected(up);
                continue;
            }
        };
        if changes.is_empty() {
            continue;
        }
        let (before, after) = {
            let mut m = model.write().expect("zone lock");
            let names = m.touched(&changes);
            let before = sync
                .as_ref()
                .map(|_| crate::kernel::sync::entries_of(&m, &names));
            m.apply(changes);
            let after = sync
                .as_ref()
                .map(|_| crate::kernel::sync::entries_of(&m, &names));
            metrics.zone_services.store(
                m.service_count() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            metrics.zone_endpoints.store(
                m.endpoint_count() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            (before, after)
        };
        if let (Some(s), Some(before), Some(after)) = (sync.as_mut(), before, after) {
            let stats = s.apply(before, after);
            metrics.kernel_writes.fetch_add(
                (stats.written + stats.removed) as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            metrics
                .kernel_write_failures
                .fetch_add(stats.failed as u64, std::sync::atomic::Ordering::Relaxed);
            metrics
                .kernel_entries
                .store(s.entries() as u64, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(?stats, "kernel maps updated");
        }
        if let Some(seen) = seen
            && model.read().expect("zone lock").is_synced() {
                metrics.programming_latency.observe(seen.elapsed());
            }
    }
}
