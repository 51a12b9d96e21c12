//! Highest throughput with under 0.1% loss, searched per system and query set, the search
//! repeated.
//!
//! Two generators, chosen by where the correctness check saw the answers come from: answers
//! from an XDP program (the reflectors, the xdns kernel path, knotd's AF_XDP path) are
//! measured with the bench's live-frames generator (`xdpgen`), which outruns them; answers
//! from a socket with kxdpgun (`kxdpgun`), whose queries reach a server's socket as a pod's
//! would (see there for why the live frames do not).
//!
//! A trial offers a rate for a fixed time; it passes when fewer than 0.1% of the queries sent
//! went without a reply of the expected kind (SERVFAIL counts as lost, any other wrong reply
//! fails the run). The search doubles (or halves) the rate until one trial passes and one
//! fails, then bisects (geometric midpoints) until they are within 15%, or the trial budget is
//! spent. A trial that passes but could not send what it offered is *saturated*: the sender
//! did all it could, and the answers per second it got are the figure. Who set a figure, the
//! system or the generator, is decided against the generator's own ceiling (see `xdpgen`).
//!
//! Every (system, set) is searched `repeats` times, in rotation with the other systems; the
//! repeats start from the first search's figure with finer steps. The report gives the median
//! and the spread (lowest, highest) of the searches' figures.

use std::time::Duration;

use anyhow::Context as _;

use std::path::Path;

use super::{
    kxdpgun,
    topo::{SINK_LINK, System, Topology},
    workload::QuerySet,
    xdpgen,
};

/// The load generator of a figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Generator {
    /// `xdpgen`: queries injected with `BPF_PROG_TEST_RUN` live frames.
    LiveFrames,
    Kxdpgun,
}

impl Generator {
    pub fn name(self) -> &'static str {
        match self {
            Generator::LiveFrames => "live frames",
            Generator::Kxdpgun => "kxdpgun",
        }
    }
}

pub const MAX_LOSS: f64 = 0.001;
/// A figure whose sending rate is within this fraction of the generator's own ceiling is
/// bounded by the generator ("≥").
pub const GENERATOR_BOUND: f64 = 0.8;
/// Late replies still count within this time after the last query.
const DRAIN: Duration = Duration::from_millis(200);

/// What a valid reply to the set's queries looks like (as counted in XDP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Valid {
    /// NOERROR with at least one answer record.
    Answer,
    Nxdomain,
    /// The reflector's echo: NOERROR, no answer.
    Echo,
}

impl Valid {
    /// What `system` validly replies to `set`'s queries: the reflectors echo them.
    pub fn of(system: &System, set: &QuerySet) -> Self {
        if system.is_reflector() {
            Valid::Echo
        } else if set.rcode() == 3 {
            Valid::Nxdomain
        } else {
            Valid::Answer
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Trial {
    pub offered: u64,
    pub sent: u64,
    pub replies: u64,
    /// Replies of the expected kind.
    pub valid: u64,
    pub servfail: u64,
    /// Replies of another kind than SERVFAIL or the expected one.
    pub wrong: u64,
    pub secs: f64,
    /// Queries lost before the server: the host side's receive ring was full.
    pub ring_drops: u64,
    /// Queries the node's UDP sockets dropped, their receive buffer full.
    pub socket_drops: u64,
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
    /// The sender could not send what was offered.
    pub fn short(&self) -> bool {
        self.sent_pps() < 0.95 * self.offered as f64
    }
}

/// One trial: `rate` queries/s of the set for `secs` to `system`, through its link. For the
/// live-frames generator the caller has loaded the set's frames; kxdpgun reads `query_file`.
pub fn trial(
    topo: &mut Topology,
    system: &System,
    generator: Generator,
    valid: Valid,
    query_file: &Path,
    rate: u64,
    secs: f64,
) -> anyhow::Result<Trial> {
    let socket0 = xdpgen::socket_drops(&topo.node)?;
    let mut t = match generator {
        Generator::LiveFrames => live_frames_trial(topo, system, valid, rate, secs)?,
        Generator::Kxdpgun => kxdpgun::trial(
            topo,
            system.link,
            system.listen,
            query_file,
            valid,
            rate,
            secs.ceil().max(1.0) as u32,
        )?,
    };
    t.socket_drops = xdpgen::socket_drops(&topo.node)? - socket0;
    Ok(t)
}

fn live_frames_trial(
    topo: &mut Topology,
    system: &System,
    valid: Valid,
    rate: u64,
    secs: f64,
) -> anyhow::Result<Trial> {
    let link = &topo.links[system.link];
    let (pod_if, pod) = (link.pod_if.clone(), topo.pod.path());
    let counter = xdpgen::attach_counter(&mut topo.programs, &pod, &pod_if, system.driver_link())?;
    let ring0 = xdpgen::ring_drops(&topo.pod, &pod_if)?;
    let sent = xdpgen::offer(
        &topo.programs,
        &topo.generator,
        &pod,
        &pod_if,
        rate,
        Duration::from_secs_f64(secs),
        DRAIN,
    );
    xdpgen::detach_counter(&mut topo.programs, &pod, counter)?;
    let sent = sent.with_context(|| format!("offering {rate}/s to {}", system.id))?;
    let ring_drops = xdpgen::ring_drops(&topo.pod, &pod_if)? - ring0;
    let c = sent.counts;
    let good = match valid {
        Valid::Answer => c.noerror_answer,
        Valid::Nxdomain => c.nxdomain,
        Valid::Echo => c.noerror_empty,
    };
    let replies = c.replies();
    Ok(Trial {
        offered: rate,
        sent: c.sent,
        replies,
        valid: good,
        servfail: c.servfail,
        wrong: replies.saturating_sub(good + c.servfail),
        secs: sent.secs,
        ring_drops,
        socket_drops: 0,
    })
}

/// What a generator sends on its own: the queries into the link whose host side drops them
/// in XDP, offered far above what it can do.
pub fn generator_ceiling(
    topo: &mut Topology,
    generator: Generator,
    names: &[&str],
    query_file: &Path,
    secs: f64,
) -> anyhow::Result<f64> {
    if generator == Generator::Kxdpgun {
        return kxdpgun::ceiling(topo, query_file, secs.ceil().max(1.0) as u32);
    }
    let link = &topo.links[SINK_LINK];
    let frames = xdpgen::query_frames(link, link.host_ip, names)?;
    let pod_if = link.pod_if.clone();
    topo.generator.load(&frames)?;
    let sent = xdpgen::offer(
        &topo.programs,
        &topo.generator,
        &topo.pod.path(),
        &pod_if,
        100_000_000,
        Duration::from_secs_f64(secs),
        Duration::ZERO,
    )?;
    Ok(sent.counts.sent as f64 / sent.secs)
}

/// The search state of one (system, query set).
#[derive(Clone, Debug)]
pub struct Search {
    pub next: u64,
    pub best: Option<Trial>,
    pub lowest_fail: Option<u64>,
    pub trials: Vec<Trial>,
    /// The best trial could not send what it offered.
    pub saturated: bool,
    pub done: bool,
    max_trials: usize,
    /// Step while no bracket is known (2: double or halve).
    step: f64,
    /// Bisect until the bracket is this narrow.
    close: f64,
}

impl Search {
    /// A first search.
    pub fn new(start: u64, max_trials: usize) -> Self {
        Self::with_steps(start, max_trials, 2.0, 1.15)
    }

    /// A repeat, starting from a known figure.
    pub fn repeat(start: u64, max_trials: usize) -> Self {
        Self::with_steps(start, max_trials, 1.25, 1.1)
    }

    fn with_steps(start: u64, max_trials: usize, step: f64, close: f64) -> Self {
        Self {
            next: start.max(1000),
            best: None,
            lowest_fail: None,
            trials: Vec::new(),
            saturated: false,
            done: false,
            max_trials,
            step,
            close,
        }
    }

    pub fn record(&mut self, t: Trial) {
        let rate = t.offered;
        if t.passed() {
            if self
                .best
                .as_ref()
                .is_none_or(|b| t.valid_pps() > b.valid_pps())
            {
                self.saturated = t.short();
                self.best = Some(t.clone());
            }
            if t.short() {
                // The sender gave all it had: offering more changes nothing.
                self.done = true;
            }
        } else {
            self.lowest_fail = Some(self.lowest_fail.map_or(rate, |f| f.min(rate)));
        }
        self.trials.push(t);
        let lo = self.best.as_ref().map(|b| b.offered);
        self.next = match (lo, self.lowest_fail) {
            (Some(lo), None) => (lo as f64 * self.step) as u64,
            (None, Some(hi)) => (hi as f64 / self.step) as u64,
            (Some(lo), Some(hi)) => {
                if hi as f64 / lo as f64 <= self.close {
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

/// The searches of one (system, set), and the figure they make.
#[derive(Clone, Debug)]
pub struct Figure {
    pub generator: Generator,
    pub searches: Vec<Search>,
}

impl Figure {
    fn results(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self.searches.iter().filter_map(Search::result).collect();
        v.sort_by(f64::total_cmp);
        v
    }

    /// Median of the searches' figures (of those that found one).
    pub fn median(&self) -> Option<f64> {
        let v = self.results();
        match v.len() {
            0 => None,
            n if n % 2 == 1 => Some(v[n / 2]),
            n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
        }
    }

    /// (lowest, highest) of the searches' figures.
    pub fn spread(&self) -> Option<(f64, f64)> {
        let v = self.results();
        Some((*v.first()?, *v.last()?))
    }

    /// How many searches found a passing rate, of how many.
    pub fn found(&self) -> (usize, usize) {
        (self.results().len(), self.searches.len())
    }

    /// The generator, not the system, set the figure: the median search's sending rate was
    /// within `GENERATOR_BOUND` of what the generator sends on its own (`ceiling`).
    pub fn generator_bound(&self, ceiling: f64) -> bool {
        let Some(m) = self.median() else {
            return false;
        };
        self.searches
            .iter()
            .filter_map(|s| s.best.as_ref())
            .min_by(|a, b| {
                (a.valid_pps() - m)
                    .abs()
                    .total_cmp(&(b.valid_pps() - m).abs())
            })
            .is_some_and(|t| t.sent_pps() >= GENERATOR_BOUND * ceiling)
    }

    /// The most answers per second of any trial.
    pub fn peak(&self) -> Option<f64> {
        self.searches
            .iter()
            .filter_map(Search::peak)
            .reduce(f64::max)
    }

    pub fn trials(&self) -> impl Iterator<Item = (usize, &Trial)> {
        self.searches
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.trials.iter().map(move |t| (i, t)))
    }
}
