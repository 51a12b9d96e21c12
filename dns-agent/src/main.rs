use std::{io::IsTerminal as _, time::Duration};

use anyhow::Context as _;
use clap::Parser as _;
use dns_agent::config::{Cli, Command, StatsArgs};
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
    }
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
            println!("queries by path:");
            for line in text.lines().filter(|l| l.starts_with("xdns_queries_total")) {
                let (labels, v) = line.rsplit_once(' ').unwrap_or((line, ""));
                let path = labels.split('"').nth(1).unwrap_or(labels);
                println!("  {path:<20} {v}");
            }
        }
        Err(e) => println!(
            "userspace counters unavailable from {}: {e}",
            args.metrics_addr
        ),
    }
    Ok(())
}

/// GET /metrics with a plain blocking socket: `stats` needs no runtime.
fn fetch_metrics(addr: &str) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let addr = dns_agent::metrics::parse_addr(addr).map_err(anyhow::Error::msg)?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}
