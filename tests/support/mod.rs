//! Test harness: network namespaces and veth pairs made per test, the agent run as a real
//! process in them, DNS clients in the pod's namespace.
//!
//! Every name is unique (pid + counter), everything is removed on drop, and traffic stays in
//! namespaces the test made, on the documentation and link-local ranges.
#![allow(dead_code)]

pub mod answers;
pub mod cluster_gen;
pub mod fake_api;
pub mod frames;
pub mod kube_node;
pub mod servers;
pub mod tls;
pub mod upstream;
pub mod wait;

use std::{
    collections::HashMap,
    fs::File,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query},
    rr::{Name, RecordType},
};

pub const LISTEN_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 20, 10);
pub const LISTEN_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x20, 0, 0, 0, 0, 0x10);
/// Where the test upstream listens, on the node's loopback.
pub const UPSTREAM_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);

/// The example cluster of the README and the demo.
pub fn example_cluster() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/cluster.yaml")
}

/// Fails (never skips) when the test cannot run here, saying what is missing and how to fix it.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests load XDP programs and create network namespaces: run them as root \
         (`sudo -E cargo xtask test`)"
    );
    for tool in ["ip", "nsenter"] {
        assert!(
            Command::new(tool).arg("-V").output().is_ok()
                || Command::new(tool).arg("--version").output().is_ok(),
            "`{tool}` is missing: install iproute2 and util-linux (`cargo xtask setup` does)"
        );
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this process and call, usable as an interface name (≤ 15 bytes).
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}{}x{n}", std::process::id() % 100_000);
    assert!(name.len() <= 15, "{name} is too long for an interface name");
    name
}

pub fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace made for one test, deleted on drop.
pub struct Netns {
    pub name: String,
    owned: bool,
}

impl Netns {
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        run("ip", &["netns", "add", &name]);
        let ns = Self { name, owned: true };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// A handle to a namespace someone else owns.
    pub fn existing(name: &str) -> Self {
        Self {
            name: name.to_string(),
            owned: false,
        }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// `ip -n <ns> args…`
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full);
    }

    /// A command that runs inside the namespace. `nsenter`, not `ip netns exec`: the latter
    /// remounts /sys and hides /sys/fs/bpf.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        c
    }

    /// Runs `f` on a thread inside the namespace. Sockets it creates stay in the namespace.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // SAFETY: a valid namespace fd; only this thread moves.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "setns {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.owned {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }
}

/// A node and a pod, joined by a veth pair as a CNI would: the pod reaches the node-local DNS
/// addresses through the host side of its veth, where the XDP program is attached.
pub struct Topology {
    pub node: Netns,
    pub pod: Netns,
    /// Host side of the veth, in the node namespace.
    pub host_if: String,
    pub pod_if: String,
}

impl Topology {
    pub fn new() -> Self {
        require_root();
        let node = Netns::new("xn");
        let pod = Netns::new("xp");
        let host_if = unique("xh");
        let pod_if = unique("xq");
        run(
            "ip",
            &[
                "link", "add", &host_if, "netns", &node.name, "type", "veth", "peer", "name",
                &pod_if, "netns", &pod.name,
            ],
        );
        node.ip(&["addr", "add", &format!("{LISTEN_V4}/32"), "dev", "lo"]);
        node.ip(&["addr", "add", &format!("{LISTEN_V6}/128"), "dev", "lo"]);
        node.ip(&["addr", "add", &format!("{UPSTREAM_V4}/32"), "dev", "lo"]);
        node.ip(&["addr", "add", "192.0.2.1/24", "dev", &host_if]);
        node.ip(&[
            "-6",
            "addr",
            "add",
            "2001:db8:1::1/64",
            "dev",
            &host_if,
            "nodad",
        ]);
        node.ip(&["link", "set", &host_if, "up"]);
        pod.ip(&["addr", "add", "192.0.2.2/24", "dev", &pod_if]);
        pod.ip(&[
            "-6",
            "addr",
            "add",
            "2001:db8:1::2/64",
            "dev",
            &pod_if,
            "nodad",
        ]);
        pod.ip(&["link", "set", &pod_if, "up"]);
        pod.ip(&[
            "route",
            "add",
            &format!("{LISTEN_V4}/32"),
            "via",
            "192.0.2.1",
        ]);
        pod.ip(&[
            "-6",
            "route",
            "add",
            &format!("{LISTEN_V6}/128"),
            "via",
            "2001:db8:1::1",
        ]);
        Self {
            node,
            pod,
            host_if,
            pod_if,
        }
    }
}

/// Plugs another pod's veth into the node, as a CNI does when a pod starts: `host` on the node
/// (203.0.113.1/24), `guest` in `pod` (203.0.113.2/24) with a route to the listen address.
pub fn plug_pod(node: &Netns, pod: &Netns, host: &str, guest: &str) {
    run(
        "ip",
        &[
            "link", "add", host, "netns", &node.name, "type", "veth", "peer", "name", guest,
            "netns", &pod.name,
        ],
    );
    node.ip(&["addr", "add", "203.0.113.1/24", "dev", host]);
    node.ip(&["link", "set", host, "up"]);
    pod.ip(&["addr", "add", "203.0.113.2/24", "dev", guest]);
    pod.ip(&["link", "set", guest, "up"]);
    pod.ip(&[
        "route",
        "add",
        &format!("{LISTEN_V4}/32"),
        "via",
        "203.0.113.1",
    ]);
}

/// The agent, running as a process in the node namespace. Stopped with SIGTERM on drop; its
/// log is printed when the test failed.
pub struct Agent {
    child: Option<Child>,
    pub pin_path: PathBuf,
    pub metrics_port: u16,
    node: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dns-agent"))
}

impl Agent {
    /// Starts the agent on `zone_file` with the XDP program on the topology's host veth, and
    /// waits until it is ready (zone loaded).
    pub fn start(topo: &Topology, zone_file: &Path, extra: &[&str]) -> Self {
        Self::start_with(topo, Self::args(topo, "--zone-file", zone_file, extra))
    }

    /// Starts the agent watching the API server named in `kubeconfig`, and waits until it is
    /// ready (first full list done).
    pub fn start_api(topo: &Topology, kubeconfig: &Path, extra: &[&str]) -> Self {
        Self::start_with(topo, Self::args(topo, "--kubeconfig", kubeconfig, extra))
    }

    /// [`Agent::start_api`] without waiting for ready.
    pub fn spawn_api(topo: &Topology, kubeconfig: &Path, extra: &[&str]) -> Self {
        Self::spawn_with(topo, Self::args(topo, "--kubeconfig", kubeconfig, extra))
    }

    /// The command line the `start*` functions use.
    pub fn args(topo: &Topology, source_flag: &str, source: &Path, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "run".into(),
            source_flag.into(),
            source.display().to_string(),
            "--listen".into(),
            LISTEN_V4.to_string(),
            "--listen".into(),
            LISTEN_V6.to_string(),
            "--upstream".into(),
            UPSTREAM_V4.to_string(),
        ];
        if !extra.contains(&"--no-kernel") {
            args.extend(["--interface".into(), topo.host_if.clone()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    pub fn start_with(topo: &Topology, args: Vec<String>) -> Self {
        let mut agent = Self::spawn_with(topo, args);
        agent.wait_ready(Duration::from_secs(20));
        agent
    }

    /// Starts the agent process; does not wait for anything.
    pub fn spawn_with(topo: &Topology, args: Vec<String>) -> Self {
        Self::spawn_with_env(topo, args, &[])
    }

    /// [`Agent::start_with`] with more environment variables.
    pub fn start_with_env(topo: &Topology, args: Vec<String>, env: &[(&str, &str)]) -> Self {
        let mut agent = Self::spawn_with_env(topo, args, env);
        agent.wait_ready(Duration::from_secs(20));
        agent
    }

    fn spawn_with_env(topo: &Topology, args: Vec<String>, env: &[(&str, &str)]) -> Self {
        Self::spawn_at(
            &topo.node,
            args,
            PathBuf::from("/sys/fs/bpf").join(unique("xdns-t")),
            9253,
            env,
        )
    }

    /// [`Agent::start_with`] with a given pin path and metrics port: two agents side by side,
    /// as during an upgrade.
    pub fn start_at(
        topo: &Topology,
        args: Vec<String>,
        pin_path: PathBuf,
        metrics_port: u16,
    ) -> Self {
        let mut agent = Self::spawn_at(&topo.node, args, pin_path, metrics_port, &[]);
        agent.wait_ready(Duration::from_secs(20));
        agent
    }

    /// Starts the agent in the `node` namespace with exactly `args` (plus the pin path and
    /// metrics port) and waits until it is ready.
    pub fn start_in(node: &Netns, args: Vec<String>, pin_path: PathBuf, metrics_port: u16) -> Self {
        let mut agent = Self::spawn_at(node, args, pin_path, metrics_port, &[]);
        agent.wait_ready(Duration::from_secs(20));
        agent
    }

    /// Starts the agent in the `node` namespace under `wrapper` (a command that execs the rest of
    /// its command line, such as `setpriv ... --`, so that the child's pid stays the agent's),
    /// with exactly `args` (plus the pin path and metrics port); does not wait for anything.
    pub fn spawn_wrapped(
        node: &Netns,
        wrapper: &[String],
        args: Vec<String>,
        pin_path: PathBuf,
        metrics_port: u16,
    ) -> Self {
        Self::spawn_under(node, wrapper, args, pin_path, metrics_port, &[])
    }

    fn spawn_at(
        node: &Netns,
        args: Vec<String>,
        pin_path: PathBuf,
        metrics_port: u16,
        env: &[(&str, &str)],
    ) -> Self {
        Self::spawn_under(node, &[], args, pin_path, metrics_port, env)
    }

    fn spawn_under(
        node: &Netns,
        wrapper: &[String],
        mut args: Vec<String>,
        pin_path: PathBuf,
        metrics_port: u16,
        env: &[(&str, &str)],
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        args.extend([
            "--pin-path".into(),
            pin_path.display().to_string(),
            "--metrics-addr".into(),
            format!("127.0.0.1:{metrics_port}"),
        ]);
        let log = dir.path().join("agent.log");
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = node.command(program);
                c.args(rest).arg(agent_bin());
                c
            }
            None => node.command(agent_bin()),
        };
        let child = command
            .args(&args)
            .env("RUST_LOG", "info,dns_agent=debug")
            .env("RUST_BACKTRACE", "0")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("log file"))
            .spawn()
            .expect("spawning dns-agent");
        Self {
            child: Some(child),
            pin_path,
            metrics_port,
            node: node.name.clone(),
            log,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends `signal` (SIGSTOP, SIGCONT, ...).
    pub fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// SIGKILL, as an OOM kill or a node's watchdog would: no clean-up at all.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    fn node_ns(&self) -> Netns {
        Netns::existing(&self.node)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until /ready answers 200 (the zone is loaded); panics with the log if the agent
    /// exits or `timeout` passes.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("dns-agent exited early ({status}):\n{}", self.log());
            }
            if self.http_get("/ready").is_some_and(|(code, _)| code == 200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "dns-agent not ready after {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// GET a path of the metrics endpoint: (status, body).
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        let port = self.metrics_port;
        let path = path.to_string();
        let ns = self.node_ns();

        ns.enter(move || -> Option<(u16, String)> {
            let mut s = TcpStream::connect_timeout(
                &SocketAddr::from(([127, 0, 0, 1], port)),
                Duration::from_secs(1),
            )
            .ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            )
            .ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            let code = out.split_whitespace().nth(1)?.parse().ok()?;
            Some((
                code,
                out.split_once("\r\n\r\n")
                    .map(|(_, b)| b.to_string())
                    .unwrap_or_default(),
            ))
        })
    }

    /// One sample of a Prometheus metric (name with labels, as printed).
    pub fn metric(&self, series: &str) -> f64 {
        let (_, body) = self.http_get("/metrics").expect("metrics endpoint");
        body.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .unwrap_or_else(|| panic!("no series {series} in:\n{body}"))
            .trim()
            .parse()
            .expect("a number")
    }

    /// Queries userspace answered from the zone.
    pub fn userspace_answers(&self) -> u64 {
        self.metric("xdns_queries_total{path=\"userspace\"}") as u64
    }

    pub fn forwarded(&self) -> u64 {
        self.metric("xdns_queries_total{path=\"forwarded\"}") as u64
    }

    /// The XDP program's counters, read from the pinned map.
    pub fn kernel_counters(&self) -> HashMap<String, u64> {
        dns_agent::kernel::read_pinned_counters(&self.pin_path)
            .expect("reading pinned counters")
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }

    /// One of the XDP program's counters (`answered_cached`, `steered`, ...).
    pub fn kernel_counter(&self, name: &str) -> u64 {
        self.kernel_counters()[name]
    }

    pub fn kernel_answered(&self) -> u64 {
        let c = self.kernel_counters();
        c["answered"] + c["answered_nodata"] + c["answered_nxdomain"]
    }

    /// Waits for the agent to exit by itself: its status, or `None` if it still runs after
    /// `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = child.try_wait().expect("wait") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "dns-agent did not exit within 10 s of SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.stop()));
        }
        if std::thread::panicking() {
            // Not eprintln!: with stderr closed (a piped run cut short) it would abort the
            // process mid-cleanup and leave namespaces behind.
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "---- dns-agent log ----\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.pin_path);
    }
}

/// A DNS client inside a namespace (the pod's).
pub struct Client {
    sock: UdpSocket,
    server: SocketAddr,
    ns: String,
}

impl Client {
    pub fn new(ns: &Netns, server: IpAddr) -> Self {
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let sock = ns.enter(move || UdpSocket::bind(bind).expect("bind"));
        sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        Self::from_socket(sock, server, ns)
    }

    /// A client that gives up on a reply after `timeout`.
    pub fn with_timeout(ns: &Netns, server: IpAddr, timeout: Duration) -> Self {
        let c = Self::new(ns, server);
        c.sock.set_read_timeout(Some(timeout)).unwrap();
        c
    }

    fn from_socket(sock: UdpSocket, server: IpAddr, ns: &Netns) -> Self {
        Self {
            sock,
            server: SocketAddr::new(server, 53),
            ns: ns.name.clone(),
        }
    }

    /// Sends raw bytes, returns the raw reply (None on timeout).
    pub fn exchange_raw(&self, msg: &[u8]) -> Option<Vec<u8>> {
        self.sock.send_to(msg, self.server).expect("send");
        let mut buf = vec![0u8; 65535];
        loop {
            match self.sock.recv_from(&mut buf) {
                Ok((n, from)) if from == self.server => return Some(buf[..n].to_vec()),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Sends without waiting for a reply: many queries in flight at once.
    pub fn send_raw(&self, msg: &[u8]) {
        self.sock.send_to(msg, self.server).expect("send");
    }

    /// The next reply from the server, whatever query it answers (None on timeout).
    pub fn recv_raw(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65535];
        loop {
            match self.sock.recv_from(&mut buf) {
                Ok((n, from)) if from == self.server => return Some(buf[..n].to_vec()),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// A query with a random ID; asserts the reply's ID.
    pub fn query(&self, name: &str, qtype: RecordType, edns: bool) -> Message {
        let q = query_message(name, qtype, edns);
        let bytes = q.to_vec().unwrap();
        let reply = self
            .exchange_raw(&bytes)
            .unwrap_or_else(|| panic!("no reply to {name} {qtype}"));
        let m = Message::from_vec(&reply)
            .unwrap_or_else(|e| panic!("reply to {name} {qtype} does not parse: {e}"));
        assert_eq!(m.metadata.id, q.metadata.id, "reply ID");
        m
    }

    /// The same over TCP.
    pub fn query_tcp(&self, msg: &[u8]) -> Vec<u8> {
        let server = self.server;
        let ns = Netns::existing(&self.ns);
        let msg = msg.to_vec();

        ns.enter(move || {
            let mut s =
                TcpStream::connect_timeout(&server, Duration::from_secs(3)).expect("tcp connect");
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut framed = (msg.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&msg);
            s.write_all(&framed).unwrap();
            let mut len = [0u8; 2];
            s.read_exact(&mut len).unwrap();
            let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
            s.read_exact(&mut buf).unwrap();
            buf
        })
    }
}

pub fn query_message(name: &str, qtype: RecordType, edns: bool) -> Message {
    let mut m = Message::new(rand::random(), MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(
        Name::from_ascii(name).expect("test name"),
        qtype,
    ));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m
}

/// Rdata of the answer section, as text, sorted.
pub fn answers(m: &Message) -> Vec<String> {
    let mut v: Vec<String> = m
        .answers
        .iter()
        .map(|r| format!("{} {}", r.record_type(), r.data))
        .collect();
    v.sort();
    v
}

/// A zone model holding `objects`, loaded and synced, with the test listen addresses.
pub fn zone_from(
    objects: Vec<dns_agent::zone::objects::ClusterObject>,
) -> dns_agent::zone::ZoneModel {
    use dns_agent::zone::{ZoneModel, ZoneSettings};
    let mut zone = ZoneModel::new(ZoneSettings {
        domain: "cluster.local".into(),
        ttl: 30,
        negative_ttl: 5,
        ns_addrs: vec![IpAddr::V4(LISTEN_V4), IpAddr::V6(LISTEN_V6)],
        serial: 1234,
    });
    for (kind, objects) in dns_agent::zone::objects::by_kind(objects) {
        let changes = zone.diff_relist(kind, objects);
        zone.apply(changes);
    }
    zone.set_synced();
    zone
}

/// Namespaces of [`services`].
pub const SERVICE_NAMESPACES: usize = 50;

/// `n` ClusterIP Services with one named port (`http`/80), as most Services are: `svc-<i>` in
/// namespace `ns-<i % 50>`, cluster IP 10.96.0.1 + i; and their namespaces.
pub fn services(n: usize) -> Vec<dns_agent::zone::objects::ClusterObject> {
    use dns_agent::zone::objects::{
        ClusterObject, ObjectKey, Port, Protocol, ServiceInfo, ServiceKind,
    };
    let mut objects: Vec<ClusterObject> = (0..SERVICE_NAMESPACES)
        .map(|ns| ClusterObject::Namespace(format!("ns-{ns}").into()))
        .collect();
    objects.extend((0..n).map(|i| {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i as u32);
        ClusterObject::Service(
            ObjectKey::new(
                &format!("ns-{}", i % SERVICE_NAMESPACES),
                &format!("svc-{i}"),
            ),
            ServiceInfo {
                kind: ServiceKind::ClusterIp(vec![IpAddr::V4(ip)]),
                ports: vec![Port {
                    name: Some("http".into()),
                    port: 80,
                    protocol: Protocol::Tcp,
                }],
            },
        )
    }));
    objects
}

/// The example cluster's objects.
pub fn example_objects() -> Vec<dns_agent::zone::objects::ClusterObject> {
    dns_agent::source::file::load(&example_cluster()).expect("example cluster loads")
}

/// A headless Service `bulk-<n>` in namespace `shop` with `n` ready endpoints
/// 10.250.<i/250>.<i%250>, port `db`/5432.
pub fn headless_with(n: usize) -> Vec<dns_agent::zone::objects::ClusterObject> {
    dns_agent::source::file::parse(Path::new("generated.yaml"), &headless_yaml(n))
        .expect("generated objects")
}

/// [`headless_with`] as zone-file YAML (starting with a document separator).
pub fn headless_yaml(n: usize) -> String {
    format!(
        "\n---\nkind: Service\nmetadata: {{name: bulk-{n}, namespace: shop}}\nspec: {{clusterIP: None}}\n---\n\
         kind: EndpointSlice\nmetadata: {{name: bulk-{n}-1, namespace: shop, labels: {{kubernetes.io/service-name: bulk-{n}}}}}\n\
         addressType: IPv4\nports: [{{name: db, port: 5432}}]\nendpoints:\n{}",
        (0..n)
            .map(|i| format!("- addresses: [10.250.{}.{}]\n", i / 250, i % 250 + 1))
            .collect::<String>()
    )
}
