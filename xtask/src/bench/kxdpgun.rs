//! Throughput trials with kxdpgun (Knot DNS's XDP load generator, knot-dnsutils), for the
//! systems whose answers come from a socket.
//!
//! kxdpgun sends from an AF_XDP socket on the pod side; on a veth that is copy mode, so every
//! query arrives at the host as a small socket buffer, as a pod's own query would. The
//! live-frames generator (`xdpgen`) hands the host page-sized frames instead, and a server's
//! default socket buffer (208 KiB) holds only about 45 of those: it measured unbound losing
//! queries to `RcvbufErrors` at 17k/s, where kxdpgun's queries took it past 40k/s on the same
//! busy machine.
//! So kxdpgun stays for the socket servers; it runs one thread on a veth (knotd's and
//! kxdpgun's queue count comes from combined channels, which a veth does not have).

use std::{
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    throughput::{Trial, Valid},
    topo::{Link, SINK_LINK, Topology},
};

fn number_after(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.trim_start().strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// One kxdpgun run, tried up to three times when kxdpgun itself fails (it can fail to set
/// up its AF_XDP socket while the kernel is still tearing down the previous one).
pub fn trial(
    topo: &Topology,
    link_index: usize,
    server: std::net::Ipv4Addr,
    query_file: &Path,
    valid: Valid,
    qps: u64,
    secs: u32,
) -> anyhow::Result<Trial> {
    let mut last = None;
    for _ in 0..3 {
        match trial_once(topo, link_index, server, query_file, valid, qps, secs) {
            Ok(t) => return Ok(t),
            Err(e) => {
                eprintln!("  kxdpgun failed, retrying: {e:#}");
                last = Some(e);
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
    Err(last.expect("three attempts"))
}

/// What kxdpgun sends on its own: queries into the link whose host side drops them in XDP.
pub fn ceiling(topo: &Topology, query_file: &Path, secs: u32) -> anyhow::Result<f64> {
    let link = &topo.links[SINK_LINK];
    let t = trial(
        topo,
        SINK_LINK,
        link.host_ip,
        query_file,
        Valid::Answer,
        100_000_000,
        secs,
    )?;
    Ok(t.sent_pps())
}

fn clear_pod_xdp(topo: &Topology, link: &Link) {
    // kxdpgun leaves its XDP program on the interface.
    let _ = topo
        .pod
        .ip(&["link", "set", "dev", &link.pod_if, "xdp", "off"]);
}

/// One kxdpgun run. Removes the XDP program kxdpgun leaves on the interface.
fn trial_once(
    topo: &Topology,
    link_index: usize,
    server: std::net::Ipv4Addr,
    query_file: &Path,
    valid: Valid,
    qps: u64,
    secs: u32,
) -> anyhow::Result<Trial> {
    let link = &topo.links[link_index];
    let mut child = topo
        .pod
        .command("kxdpgun")
        .args(["-t", &secs.to_string(), "-Q", &qps.to_string()])
        .args(["-I", &link.pod_if, "-l", &format!("{}/32", link.pod_ip)])
        .args(["-L", &link.pod_mac, "-R", &link.host_mac])
        .arg("-i")
        .arg(query_file)
        .arg(server.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting kxdpgun (`cargo xtask setup` installs knot-dnsutils)")?;
    let deadline = Instant::now() + Duration::from_secs(secs as u64 + 20);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            clear_pod_xdp(topo, link);
            bail!("kxdpgun did not finish within {} s", secs + 20);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output()?;
    clear_pod_xdp(topo, link);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !status.success() {
        bail!(
            "kxdpgun failed ({status}): {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let sent = number_after(&text, "total queries:").with_context(|| {
        format!(
            "kxdpgun printed no `total queries`: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let replies = number_after(&text, "total replies:").unwrap_or(0);
    // kxdpgun counts replies by rcode only: NOERROR stands for an answer (the exact records
    // are checked before and after the load, and by the latency runs).
    let rcode = match valid {
        Valid::Nxdomain => "NXDOMAIN",
        Valid::Answer | Valid::Echo => "NOERROR",
    };
    let good = number_after(&text, &format!("responded {rcode}:")).unwrap_or(0);
    let servfail = number_after(&text, "responded SERVFAIL:").unwrap_or(0);
    let duration = number_after(&text, "duration:")
        .unwrap_or(secs as u64)
        .max(1);
    Ok(Trial {
        offered: qps,
        sent,
        replies,
        valid: good,
        servfail,
        wrong: replies.saturating_sub(good + servfail),
        secs: duration as f64,
        ring_drops: 0,
        socket_drops: 0,
    })
}
