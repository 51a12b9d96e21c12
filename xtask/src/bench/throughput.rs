//! Highest throughput with under 0.1% loss: trials with kxdpgun (AF_XDP, one thread on a
//! veth) from the pod's namespace, searched per system.
//!
//! A trial offers a rate for a fixed time; it passes when fewer than 0.1% of the queries sent
//! went without a reply of the expected rcode. The search doubles (or halves) the rate until
//! one trial passes and one fails, then bisects (geometric midpoints) until they are within
//! 15%, or the trial budget is spent. When kxdpgun itself cannot send as fast as asked, the
//! system answered everything the generator could offer: the figure is a lower bound ("≥").

use std::{
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::topo::{Link, Topology};

pub const MAX_LOSS: f64 = 0.001;

#[derive(Clone, Debug, Default)]
pub struct Trial {
    pub offered: u64,
    pub sent: u64,
    pub replies: u64,
    /// Replies with the expected rcode.
    pub valid: u64,
    /// Replies with another rcode than SERVFAIL or the expected one.
    pub wrong: u64,
    pub secs: f64,
}

impl Trial {
    pub fn loss(&self) -> f64 {
        if self.sent == 0 {
            return 1.0;
        }
        1.0 - self.valid as f64 / self.sent as f64
    }
    pub fn passed(&self) -> bool {
        self.sent > 0 && self.loss() < MAX_LOSS
    }
    pub fn sent_pps(&self) -> f64 {
        self.sent as f64 / self.secs
    }
    pub fn valid_pps(&self) -> f64 {
        self.valid as f64 / self.secs
    }
    /// kxdpgun sent clearly less than it was asked to.
    pub fn generator_limited(&self) -> bool {
        self.sent_pps() < 0.95 * self.offered as f64
    }
}

fn number_after(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.trim_start().strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// One kxdpgun run, tried up to three times when kxdpgun itself fails (it can fail to set
/// up its AF_XDP socket while the kernel is still tearing down the previous one).
#[allow(clippy::too_many_arguments)]
pub fn trial(
    topo: &Topology,
    link: &Link,
    link_index: usize,
    server: std::net::Ipv4Addr,
    query_file: &Path,
    expect_rcode: &str,
    qps: u64,
    secs: u32,
) -> anyhow::Result<Trial> {
    let mut last = None;
    for _ in 0..3 {
        match trial_once(
            topo,
            link,
            link_index,
            server,
            query_file,
            expect_rcode,
            qps,
            secs,
        ) {
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

/// One kxdpgun run. Removes the XDP program kxdpgun leaves on the interface.
#[allow(clippy::too_many_arguments)]
fn trial_once(
    topo: &Topology,
    link: &Link,
    link_index: usize,
    server: std::net::Ipv4Addr,
    query_file: &Path,
    expect_rcode: &str,
    qps: u64,
    secs: u32,
) -> anyhow::Result<Trial> {
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
            let _ = topo.clear_pod_xdp(link_index);
            bail!("kxdpgun did not finish within {} s", secs + 20);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output()?;
    let _ = topo.clear_pod_xdp(link_index);
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
    let valid = number_after(&text, &format!("responded {expect_rcode}:")).unwrap_or(0);
    let servfail = if expect_rcode == "SERVFAIL" {
        0
    } else {
        number_after(&text, "responded SERVFAIL:").unwrap_or(0)
    };
    let duration = number_after(&text, "duration:")
        .unwrap_or(secs as u64)
        .max(1);
    Ok(Trial {
        offered: qps,
        sent,
        replies,
        valid,
        wrong: replies.saturating_sub(valid + servfail),
        secs: duration as f64,
    })
}

/// The search state of one (system, query set).
#[derive(Clone, Debug)]
pub struct Search {
    pub next: u64,
    pub best: Option<Trial>,
    pub lowest_fail: Option<u64>,
    pub trials: Vec<Trial>,
    pub generator_limited: bool,
    pub done: bool,
    max_trials: usize,
}

impl Search {
    pub fn new(start: u64, max_trials: usize) -> Self {
        Self {
            next: start,
            best: None,
            lowest_fail: None,
            trials: Vec::new(),
            generator_limited: false,
            done: false,
            max_trials,
        }
    }

    pub fn record(&mut self, t: Trial) {
        let rate = t.offered;
        if t.passed() {
            if t.generator_limited() {
                self.generator_limited = true;
                self.done = true;
            }
            if self
                .best
                .as_ref()
                .is_none_or(|b| t.valid_pps() > b.valid_pps())
            {
                self.best = Some(t.clone());
            }
        } else {
            self.lowest_fail = Some(self.lowest_fail.map_or(rate, |f| f.min(rate)));
        }
        self.trials.push(t);
        let lo = self.best.as_ref().map(|b| b.offered);
        self.next = match (lo, self.lowest_fail) {
            (Some(lo), None) => lo * 2,
            (None, Some(hi)) => hi / 2,
            (Some(lo), Some(hi)) => {
                if hi as f64 / lo as f64 <= 1.15 {
                    self.done = true;
                }
                ((lo as f64 * hi as f64).sqrt()) as u64
            }
            (None, None) => self.next,
        };
        if self.trials.len() >= self.max_trials || self.next < 1000 {
            self.done = true;
        }
    }

    /// Answered queries per second at the best passing trial.
    pub fn result(&self) -> Option<f64> {
        self.best.as_ref().map(Trial::valid_pps)
    }

    /// The most valid answers per second of any trial, whatever its loss.
    pub fn peak(&self) -> Option<f64> {
        self.trials.iter().map(Trial::valid_pps).reduce(f64::max)
    }
}
