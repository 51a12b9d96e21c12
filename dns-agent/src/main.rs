use std::{io::IsTerminal as _, time::Duration};

use anyhow::Context as _;
use clap::Parser as _;
use dns_agent::config::{Cli, Command, StatsArgs, TraceArgs};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match cli.command {
        Command::Run(args) => {
            let config = args.validate()?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?
                .block_on(dns_agent::app::run(config))
        }
        Command::Stats(args) => stats(args),
        Command::Trace(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?
            .block_on(trace(args)),
    }
}

/// Prints the program's decisions until Ctrl-C or SIGTERM; tracing is turned off on the way
/// out (the tracer's drop), so the program stops writing events.
async fn trace(args: TraceArgs) -> anyhow::Result<()> {
    use dns_agent::kernel::trace::{TraceFilter, Tracer, describe};
    use tokio::signal::unix::{SignalKind, signal};

    let ifindex = match &args.interface {
        None => 0,
        Some(name) => interface_index(name)
            .with_context(|| format!("--interface {name}: no such interface here"))?,
    };
    let filter = TraceFilter::new(args.name.as_deref(), ifindex);
    let mut tracer = Tracer::start(&args.pin_path, filter)?;
    let mut term = signal(SignalKind::terminate())?;
    let mut names = std::collections::HashMap::new();
    eprintln!("tracing the XDP program's decisions; Ctrl-C to stop");
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            events = tracer.next() => {
                use std::io::Write as _;
                let mut out = std::io::stdout().lock();
                for e in events? {
                    let iface = names
                        .entry(e.ifindex)
                        .or_insert_with(|| interface_name(e.ifindex));
                    writeln!(out, "{}", describe(&e, iface))?;
                }
                out.flush()?;
            }
        }
    }
    drop(tracer);
    Ok(())
}

fn interface_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid C string; the call only reads it.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

fn interface_name(index: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as the call requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("if{index}");
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn stats(args: StatsArgs) -> anyhow::Result<()> {
    let counters = dns_agent::kernel::read_pinned_counters(&args.pin_path).with_context(|| {
        format!(
            "reading the kernel counters under {} (is an agent running with this --pin-path?)",
            args.pin_path.display()
        )
    })?;
    println!("kernel (XDP) counters:");
    for (name, v) in &counters {
        println!("  {name:<20} {v}");
    }
    match fetch_metrics(&args.metrics_addr) {
        Ok(text) => {
            let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
                .context("parsing the metrics")?;
            println!("queries by path:");
            for sample in scrape
                .samples
                .iter()
                .filter(|s| s.metric == "xdns_queries_total")
            {
                let path = sample.labels.get("path").unwrap_or("?");
                if let prometheus_parse::Value::Counter(v) = sample.value {
                    println!("  {path:<20} {v}");
                }
            }
        }
        Err(e) => println!(
            "userspace counters unavailable from {}: {e}",
            args.metrics_addr
        ),
    }
    Ok(())
}

/// GET /metrics with hyper's client, on a runtime of its own: `stats` is otherwise synchronous.
fn fetch_metrics(addr: &str) -> anyhow::Result<String> {
    use http_body_util::{BodyExt as _, Empty};
    use hyper::body::Bytes;
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};

    let addr = dns_agent::metrics::parse_addr(addr).map_err(anyhow::Error::msg)?;
    let uri: hyper::Uri = format!("http://{addr}/metrics")
        .parse()
        .context("the metrics URL")?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(async {
            let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
            let fetch = async {
                let reply = client.get(uri).await?;
                let status = reply.status();
                let body = reply.into_body().collect().await?.to_bytes();
                anyhow::ensure!(status.is_success(), "HTTP {status}");
                Ok(String::from_utf8_lossy(&body).into_owned())
            };
            tokio::time::timeout(Duration::from_secs(2), fetch)
                .await
                .context("no answer within 2 s")?
        })
}
