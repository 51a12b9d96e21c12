//! `cargo xtask soak --duration D`: the soak test (tests/soak.rs) for as long as asked, with the
//! agent built for release. It prints its summary and where the samples and the plot went, and
//! fails on any wrong answer, unexplained unanswered query or leak.

use std::time::Duration;

use anyhow::bail;

use crate::util::{cmd, require_root, root, run};

pub struct Options {
    pub duration: Duration,
    pub qps: u64,
    pub churn: u64,
    pub replace_every: Option<Duration>,
}

pub fn soak(o: Options) -> anyhow::Result<()> {
    crate::setup::setup(crate::setup::Scope::All)?;
    require_root("the soak (it loads XDP programs and builds network namespaces)")?;
    let mut c = cmd("cargo");
    c.current_dir(root())
        .args(["test", "--release", "-p", "dns-agent", "--test", "soak"])
        .args(["--", "--nocapture", "--test-threads=1"])
        .env("XDNS_SOAK_SECONDS", o.duration.as_secs().to_string())
        .env("XDNS_SOAK_QPS", o.qps.to_string())
        .env("XDNS_SOAK_CHURN", o.churn.to_string());
    if let Some(r) = o.replace_every {
        c.env("XDNS_SOAK_REPLACE_SECONDS", r.as_secs().to_string());
    }
    run(&mut c)
}

/// `90s`, `30m`, `2h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |at| s.split_at(at));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with s, m or h (e.g. 30m)"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?}: unit must be s, m or h")),
    };
    if secs < 20 {
        return Err(format!(
            "{s:?}: at least 20s (agents are replaced, spells of trouble come every 10 s)"
        ));
    }
    Ok(Duration::from_secs(secs))
}

pub fn check(o: &Options) -> anyhow::Result<()> {
    if o.qps == 0 || o.churn == 0 {
        bail!("--qps and --churn must be above 0");
    }
    Ok(())
}
