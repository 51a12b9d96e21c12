//! `dns-agent trace` through the real path: a running agent with its XDP program on a pod's
//! veth, a tracer process beside it, real queries from the pod. The tracer must show a query
//! the kernel answered and one it passed up, each with its reason, honour its filters, and
//! turn tracing off when it is stopped.
//!
//! Needs root (`cargo xtask test` runs it).

mod support;

use std::{
    io::{BufRead as _, BufReader},
    net::IpAddr,
    process::{Child, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use aya::maps::{Array, Map, MapData};
use dns_common::{MAP_TRACE_CONTROL, TRACE_OFF, TraceControl};
use hickory_proto::rr::RecordType;
use support::{Agent, Client, LISTEN_V4, Topology, agent_bin, answers};

/// A `dns-agent trace` process and the lines it prints.
struct Trace {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Trace {
    fn start(topo: &Topology, agent: &Agent, extra: &[&str]) -> Self {
        let mut child = topo
            .node
            .command(agent_bin())
            .arg("trace")
            .arg("--pin-path")
            .arg(&agent.pin_path)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning dns-agent trace");
        let (tx, lines) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let t = Self { child, lines };
        t.wait_for(|l| l.starts_with("tracing"), "the tracer to start");
        t
    }

    /// The first line `want` accepts, within 10 s (panics with every line seen otherwise).
    fn wait_for(&self, want: impl Fn(&str) -> bool, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) if want(&l) => return l,
                Ok(l) => seen.push(l),
                Err(_) => break,
            }
        }
        panic!(
            "no line for {what}; the tracer printed:\n{}",
            seen.join("\n")
        );
    }

    /// Every line printed within `d`.
    fn lines_for(&self, d: Duration) -> Vec<String> {
        let deadline = Instant::now() + d;
        let mut out = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) => out.push(l),
                Err(_) => break,
            }
        }
        out
    }

    /// Ctrl-C, as an operator stops it; it must exit cleanly.
    fn interrupt(mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "trace exited with {status}");
                return;
            }
            assert!(Instant::now() < deadline, "trace did not stop on SIGINT");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tracing_flag(agent: &Agent) -> TraceControl {
    let path = dns_agent::kernel::pin_dir(&agent.pin_path).join(MAP_TRACE_CONTROL);
    let data = MapData::from_pin(&path).expect("pinned trace control map");
    let map = Array::<MapData, TraceControl>::try_from(Map::Array(data)).expect("an array");
    map.get(&0, 0).expect("entry 0")
}

#[test]
fn trace_shows_answered_and_passed_queries_with_their_reasons() {
    let topo = Topology::new();
    let agent = Agent::start(&topo, &support::example_cluster(), &[]);
    assert_eq!(
        tracing_flag(&agent).enabled,
        TRACE_OFF,
        "off until a tracer runs"
    );
    let trace = Trace::start(&topo, &agent, &["--interface", &topo.host_if]);
    assert_ne!(tracing_flag(&agent).enabled, TRACE_OFF, "on while it runs");

    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));
    let kernel_before = agent.kernel_answered();
    // Mixed case: the event carries the lowercased lookup key.
    let m = client.query("Web.Shop.svc.cluster.local.", RecordType::A, true);
    assert_eq!(answers(&m), vec!["A 10.96.10.20"]);
    assert_eq!(
        agent.kernel_answered(),
        kernel_before + 1,
        "the kernel answered"
    );
    let line = trace.wait_for(|l| l.contains("web.shop.svc.cluster.local."), "the answer");
    assert!(
        line.starts_with(&format!("{} 192.0.2.2:", topo.host_if)),
        "interface and client first: {line}"
    );
    assert!(
        line.contains(&format!("-> {LISTEN_V4}:53 web.shop.svc.cluster.local. A:")),
        "{line}"
    );
    assert!(
        line.ends_with("answered in the kernel from the zone [answered]"),
        "{line}"
    );

    let nx = client.query("nope.shop.svc.cluster.local.", RecordType::A, true);
    assert_eq!(nx.metadata.response_code.to_string(), "Non-Existent Domain");
    let line = trace.wait_for(|l| l.contains("nope.shop.svc.cluster.local."), "NXDOMAIN");
    assert!(line.ends_with("[answered_nxdomain]"), "{line}");

    // Pod names are synthesised by userspace: the kernel passes them up.
    let before = agent.userspace_answers();
    client.query("1-2-3-4.shop.pod.cluster.local.", RecordType::A, true);
    assert_eq!(agent.userspace_answers(), before + 1, "userspace answered");
    let line = trace.wait_for(
        |l| l.contains("1-2-3-4.shop.pod.cluster.local."),
        "the pass",
    );
    assert!(
        line.ends_with(
            "passed up: not in the kernel maps (userspace answers or forwards) [pass_miss]"
        ),
        "{line}"
    );

    trace.interrupt();
    assert_eq!(
        tracing_flag(&agent).enabled,
        TRACE_OFF,
        "a stopped tracer turns tracing off"
    );
}

#[test]
fn trace_filters_by_name() {
    let topo = Topology::new();
    let agent = Agent::start(&topo, &support::example_cluster(), &[]);
    let trace = Trace::start(&topo, &agent, &["--name", "WEB.shop.svc.cluster.local"]);
    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));
    client.query("kubernetes.default.svc.cluster.local.", RecordType::A, true);
    client.query("web.shop.svc.cluster.local.", RecordType::AAAA, true);
    let line = trace.wait_for(|l| l.contains("web.shop"), "the wanted name");
    assert!(line.contains("web.shop.svc.cluster.local. AAAA:"), "{line}");
    let rest = trace.lines_for(Duration::from_millis(500));
    assert!(
        rest.iter().all(|l| !l.contains("kubernetes.default")),
        "other names are filtered out: {rest:?}"
    );
    trace.interrupt();
}

#[test]
fn one_tracer_at_a_time() {
    let topo = Topology::new();
    let agent = Agent::start(&topo, &support::example_cluster(), &[]);
    let first = Trace::start(&topo, &agent, &[]);
    let second = topo
        .node
        .command(agent_bin())
        .arg("trace")
        .arg("--pin-path")
        .arg(&agent.pin_path)
        .output()
        .expect("running a second tracer");
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("another `dns-agent trace` is running"),
        "{err}"
    );
    first.interrupt();
}
