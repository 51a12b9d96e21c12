//! `dns-agent run`: wires sources → zone → kernel and server, and shuts down cleanly.

use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use tokio::{
    net::{TcpListener, UdpSocket},
    sync::mpsc,
    task::JoinSet,
};

use crate::{
    config::{ObjectSource, RunConfig},
    kernel::{Capacity, Kernel, links::LinkEvent, sync::KernelSync},
    metrics::Metrics,
    server::{
        Handler, cache::Cache, external::ExternalResolver, forward::Forwarder, handover, tcp, udp,
    },
    source::{self, SourceEvent},
    zone::{Change, ZoneModel, ZoneSettings},
};

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    let args = &config.args;
    // The source first: a zone file that cannot be used, or a client that cannot be
    // configured, stops the agent before it touches the kernel.
    let source = match &config.source {
        ObjectSource::ZoneFile(path) => Source::File(
            path.clone(),
            source::file::load(path).context("the zone file is refused")?,
        ),
        ObjectSource::Api(client) => {
            let (client, counts) = source::kubernetes::connect(client).await?;
            Source::Api(client, counts)
        }
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
    let mut steering = Vec::new();
    for ip in &args.listen {
        let addr = SocketAddr::new(*ip, 53);
        let hint = || {
            format!(
                "binding {addr} failed: is {ip} assigned to an interface of this node? \
                 (e.g. `ip addr add {ip}/{} dev lo`)",
                if ip.is_ipv4() { 32 } else { 128 }
            )
        };
        // An agent being replaced may hold these already (SO_REUSEPORT): everything stays
        // with it until this one has loaded the zone (see server::handover).
        let (udp_index, tcp_index) = (
            handover::bound_before(addr, false),
            handover::bound_before(addr, true),
        );
        let udp = Arc::new(bind_udp(addr).with_context(hint)?);
        let tcp = bind_tcp(addr).with_context(hint)?;
        handover::steer_to(&*udp, 0).context("steering the UDP reuseport group")?;
        handover::steer_to(&tcp, 0).context("steering the TCP reuseport group")?;
        steering.push((udp.clone(), udp_index as u32, tcp_index as u32));
        udp_sockets.push(udp);
        tcp_listeners.push(tcp);
        if udp_index > 0 {
            tracing::info!(%addr, "another agent serves {addr}: taking over once the zone is loaded");
        }
    }
    for iface in &args.interfaces {
        let c = std::ffi::CString::new(iface.as_str()).context("interface name")?;
        // SAFETY: a valid C string.
        if unsafe { libc::if_nametoindex(c.as_ptr()) } == 0 {
            anyhow::bail!("--interface {iface}: no such interface in this network namespace");
        }
    }
    // The metrics port is shared too during an upgrade, and steered to the newest agent at
    // once: kubelet's readiness probe must see the new agent's /ready (503 until its zone is
    // loaded), not the old agent's.
    let metrics_index = handover::bound_before(config.metrics_addr, true);
    let metrics_listener = bind_tcp(config.metrics_addr)
        .with_context(|| format!("--metrics-addr {}: cannot listen", config.metrics_addr))?;
    handover::steer_to(&metrics_listener, metrics_index as u32)
        .context("steering the metrics port")?;

    // The kernel path.
    let mut kernel = None;
    let mut sync = None;
    if !args.no_kernel {
        let capacity = Capacity::scaled(args.kernel_capacity);
        let (k, maps) = Kernel::load(capacity, &args.pin_path)?;
        let mut s = KernelSync::new(maps);
        let (v4, v6) = crate::kernel::split_listen(&args.listen);
        s.maps_mut().set_listen(&v4, &v6)?;
        s.write_config(&model)?;
        let fixed = model.fixed_names();
        s.apply(Vec::new(), crate::kernel::sync::entries_of(&model, &fixed));
        metrics.set_kernel_pin_path(args.pin_path.clone());
        kernel = Some(k);
        sync = Some(s);
    }

    let model = Arc::new(RwLock::new(model));
    let forwarder = Arc::new(Forwarder::new(
        config.upstreams.clone(),
        config.forward.clone(),
        metrics.clone(),
    ));
    let external = Arc::new(ExternalResolver::new(
        forwarder.clone(),
        Cache::new(config.cache.clone(), metrics.cache.clone()),
        metrics.clone(),
    ));
    let handler = Arc::new(Handler {
        zone: model.clone(),
        external: external.clone(),
        metrics: metrics.clone(),
        in_flight: Default::default(),
    });

    let mut tasks = JoinSet::new();
    let (tx, rx) = mpsc::channel(1024);
    let (synced_tx, synced_rx) = tokio::sync::oneshot::channel();
    match source {
        Source::File(path, initial) => {
            tasks.spawn(async move {
                source::file::run(path, initial, tx, Duration::from_secs(1)).await;
                Ok(())
            });
        }
        Source::Api(client, counts) => {
            tasks.spawn(async move {
                source::kubernetes::run(client, counts, tx).await;
                Ok(())
            });
        }
    }
    {
        let model = model.clone();
        let metrics = metrics.clone();
        tasks.spawn(async move {
            zone_task(rx, model, sync, metrics, synced_tx).await;
            Ok(())
        });
    }
    for s in udp_sockets {
        tasks.spawn(udp::serve(s, handler.clone()));
    }
    let mut tcp_steering = Vec::new();
    for l in tcp_listeners {
        let l = Arc::new(l);
        tcp_steering.push(l.clone());
        tasks.spawn(tcp::serve(l, handler.clone()));
    }
    tasks.spawn(crate::metrics::serve(metrics_listener, metrics.clone()));
    tasks.spawn(external.sweep());
    tracing::info!(
        listen = ?args.listen,
        upstreams = ?config.upstreams,
        policy = %config.forward.policy,
        cache_size = config.cache.capacity,
        kernel = kernel.is_some(),
        "serving"
    );

    // Interfaces matching --interface-pattern, as they come and go.
    let (link_tx, mut link_rx) = mpsc::channel(256);
    if kernel.is_some() && !config.interface_patterns.is_empty() {
        tasks.spawn(crate::kernel::links::watch(link_tx));
    } else {
        drop(link_tx);
    }
    // Matching interfaces seen before the zone was loaded: attached once it is.
    let mut pending_links: Vec<String> = Vec::new();
    let patterns = &config.interface_patterns;

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut synced_rx = Some(synced_rx);
    let outcome = 'serve: loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: shutting down"); break Ok(()) }
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break Ok(()) }
            Some(res) = tasks.join_next() => break match res {
                Ok(Ok(())) => Err(anyhow::anyhow!("a task ended unexpectedly")),
                Ok(Err(e)) => Err(anyhow::Error::from(e).context("serving failed")),
                Err(e) => Err(anyhow::Error::from(e).context("a task panicked")),
            },
            // Attach once the maps hold the whole zone: a previous agent's program keeps
            // answering until then, and the swap is atomic.
            Ok(()) = async { synced_rx.as_mut().expect("guarded").await }, if synced_rx.is_some() => {
                synced_rx = None;
                // Queries to this agent from now on.
                for ((udp, udp_index, tcp_index), tcp) in steering.iter().zip(&tcp_steering) {
                    if let Err(e) = handover::steer_to(&**udp, *udp_index).and_then(|()| handover::steer_to(&**tcp, *tcp_index)) {
                        break 'serve Err(anyhow::Error::from(e).context("steering queries to this agent"));
                    }
                }
                // Only now would a probe that comes back reach this agent's listeners.
                tasks.spawn(detect_loops(forwarder.clone()));
                if let Some(k) = kernel.as_mut() {
                    for iface in &args.interfaces {
                        match k.attach(iface, args.attach_mode) {
                            Ok(how) => tracing::info!(interface = %iface, mode = %args.attach_mode, ?how, "XDP program attached"),
                            Err(e) => break 'serve Err(e.into()),
                        }
                    }
                    for iface in pending_links.drain(..) {
                        attach_matching(k, &iface, args.attach_mode);
                    }
                }
            }
            Some(event) = link_rx.recv() => {
                let Some(k) = kernel.as_mut() else { continue };
                match event {
                    LinkEvent::Up(iface) if patterns.iter().any(|p| p.matches(&iface)) => {
                        if synced_rx.is_some() {
                            if !pending_links.contains(&iface) {
                                pending_links.push(iface);
                            }
                        } else {
                            attach_matching(k, &iface, args.attach_mode);
                        }
                    }
                    LinkEvent::Gone(iface) => {
                        pending_links.retain(|p| *p != iface);
                        if k.is_attached(&iface) {
                            k.forget(&iface);
                            tracing::info!(interface = %iface, "interface gone; its XDP attachment with it");
                        }
                    }
                    LinkEvent::Up(_) => {}
                }
            }
        }
    };
    // Hand the kernel path over (or detach), then let queries already queued or in flight
    // finish before the sockets close.
    if let Some(mut k) = kernel {
        k.detach_all();
    }
    let drain_until = Instant::now() + Duration::from_secs(2);
    tokio::time::sleep(Duration::from_millis(100)).await;
    while handler.in_flight() > 0 && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tasks.abort_all();
    outcome
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

/// A UDP socket on `addr` with SO_REUSEPORT: a new agent binds next to the old one during an
/// upgrade, and the kernel shares queries between them until the old one leaves.
fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    sock.set_reuse_port(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    UdpSocket::from_std(sock.into())
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_reuse_port(true)?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    TcpListener::from_std(sock.into())
}

/// A source, ready to run.
enum Source {
    File(std::path::PathBuf, Vec<crate::zone::objects::ClusterObject>),
    Api(kube::Client, Arc<source::kubernetes::ResponseCounts>),
}

/// Attaches to an interface that matched `--interface-pattern` (once). A pod's veth may vanish
/// between its notification and the attach: that is logged, not fatal.
fn attach_matching(kernel: &mut Kernel, iface: &str, mode: crate::kernel::AttachMode) {
    if kernel.is_attached(iface) {
        return;
    }
    match kernel.attach(iface, mode) {
        Ok(how) => {
            tracing::info!(interface = %iface, %mode, ?how, "XDP program attached (interface pattern)")
        }
        Err(e) => {
            tracing::warn!(interface = %iface, error = %e, "attaching to a matching interface failed")
        }
    }
}

/// Applies source events to the model and the kernel maps, in order.
async fn zone_task(
    mut rx: mpsc::Receiver<SourceEvent>,
    model: Arc<RwLock<ZoneModel>>,
    mut sync: Option<KernelSync>,
    metrics: Arc<Metrics>,
    synced_tx: tokio::sync::oneshot::Sender<()>,
) {
    let mut synced_tx = Some(synced_tx);
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
                let synced = model.read().expect("zone lock").is_synced();
                if !synced {
                    // The first load allocates and frees a lot (objects, encodings); glibc keeps
                    // the freed memory and consolidates it at the next big allocation (a stall
                    // of a hundred milliseconds at 100,000 endpoints, on the query path). Give
                    // it back now, before answering: it halves the agent's resident memory.
                    let _ = tokio::task::spawn_blocking(|| {
                        // SAFETY: malloc_trim only releases free heap memory.
                        unsafe { libc::malloc_trim(0) };
                    })
                    .await;
                    model.write().expect("zone lock").set_synced();
                    if let Some(s) = sync.as_mut()
                        && let Err(e) = s.set_synced()
                    {
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
                    if let Some(tx) = synced_tx.take() {
                        let _ = tx.send(());
                    }
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
            && model.read().expect("zone lock").is_synced()
        {
            metrics.programming_latency.observe(seen.elapsed());
        }
    }
}
