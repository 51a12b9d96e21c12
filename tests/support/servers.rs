//! Real DNS servers (unbound, dnsmasq) as upstreams or as a cluster's own DNS pods, in a
//! namespace the test made, with local data only: nothing leaves the namespace.

use std::{
    fs::File,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use super::Netns;

/// A DNS server process (unbound or dnsmasq) in a namespace the test made, with local data
/// only; stopped on drop, its log printed when the test failed.
pub struct Server {
    what: &'static str,
    child: Option<Child>,
    log: PathBuf,
    pub dir: tempfile::TempDir,
}

/// The path of `binary`, or a failure that says how to install it.
pub fn require_binary(binary: &str, package: &str) -> PathBuf {
    for dir in [
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
        "/usr/local/sbin",
        "/usr/local/bin",
    ] {
        let p = PathBuf::from(dir).join(binary);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "`{binary}` is not installed; these tests run it as a real upstream: \
         `apt-get install {package}`"
    );
}

impl Server {
    pub fn unbound(ns: &Netns, ip: Ipv4Addr, local_data: &[&str]) -> Self {
        Self::unbound_with(ns, ip, local_data, &[], "", false)
    }

    /// unbound with `files` written to its directory first, `extra` lines in its `server:`
    /// section, and `unbound-control` on a socket in its directory when `control` is set.
    pub fn unbound_with(
        ns: &Netns,
        ip: Ipv4Addr,
        local_data: &[&str],
        files: &[(&str, &str)],
        extra: &str,
        control: bool,
    ) -> Self {
        let bin = require_binary("unbound", "unbound");
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content).expect("unbound file");
        }
        let d = dir.path().display();
        let control = if control {
            format!("  control-enable: yes\n  control-interface: \"{d}/control.sock\"\n")
        } else {
            "  control-enable: no\n".to_string()
        };
        let data: String = local_data
            .iter()
            .map(|l| format!("  local-data: \"{l}\"\n"))
            .collect();
        // `local-zone: "." static`: every name without local data is answered here, so unbound
        // never recurses (nothing leaves the namespace).
        let conf = format!(
            "server:\n  interface: {ip}\n  port: 53\n  do-daemonize: no\n  username: \"\"\n  \
             chroot: \"\"\n  directory: \"{d}\"\n  pidfile: \"{d}/unbound.pid\"\n  \
             use-syslog: no\n  logfile: \"{d}/server.log\"\n  verbosity: 1\n  log-queries: yes\n  \
             do-ip6: no\n  num-threads: 1\n  access-control: 0.0.0.0/0 allow\n  \
             module-config: \"iterator\"\n  local-zone: \".\" static\n  \
             local-zone: \"example.test.\" static\n  \
             local-data: \"example.test. 300 IN SOA ns.example.test. hostmaster.example.test. 1 3600 600 86400 60\"\n\
             {data}{extra}remote-control:\n{control}"
        );
        let path = dir.path().join("unbound.conf");
        std::fs::write(&path, conf).expect("unbound.conf");
        let mut cmd = ns.command(bin);
        cmd.arg("-d").arg("-c").arg(&path);
        Self::spawn("unbound", cmd, dir, "start of service")
    }

    pub fn dnsmasq(ns: &Netns, ip: Ipv4Addr, extra: &[&str]) -> Self {
        let bin = require_binary("dnsmasq", "dnsmasq-base");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = ns.command(bin);
        cmd.args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &format!("--listen-address={ip}"),
            "--port=53",
            "--user=root",
            "--pid-file=",
            "--log-queries",
            &format!("--log-facility={}", dir.path().join("server.log").display()),
        ])
        .args(extra);
        Self::spawn("dnsmasq", cmd, dir, "started, version")
    }

    pub fn spawn(
        what: &'static str,
        mut cmd: std::process::Command,
        dir: tempfile::TempDir,
        ready: &str,
    ) -> Self {
        let out = File::create(dir.path().join("stderr")).expect("stderr file");
        let child = cmd
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
        let mut s = Self {
            what,
            child: Some(child),
            log: dir.path().join("server.log"),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !s.log().contains(ready) {
            if let Some(status) = s.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("{what} exited ({status}):\n{}\n{}", s.log(), s.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "{what} not ready after 10 s:\n{}\n{}",
                s.log(),
                s.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// Log lines containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// Waits until `needle` is logged: lines before it are in the log too.
    pub fn wait_logged(&self, needle: &str) {
        super::wait::eventually(
            &format!("{} logs {needle:?}", self.what),
            Duration::from_secs(5),
            || (self.count(needle) > 0).then_some(()),
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "---- {} log ----\n{}\n{}",
                self.what,
                self.log(),
                self.stderr()
            );
        }
    }
}
