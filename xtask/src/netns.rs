//! Network namespaces and processes for the demo and the benchmarks, cleaned up on drop and
//! on Ctrl-C.

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Child, Command},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// What to undo, in reverse order, on exit or Ctrl-C.
enum Undo {
    Netns(String),
    Kill(u32),
    Remove(PathBuf),
}

static UNDO: Mutex<Vec<Undo>> = Mutex::new(Vec::new());

/// Installs the Ctrl-C handler that cleans up and exits.
pub fn cleanup_on_ctrl_c() {
    let _ = ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: cleaning up");
        cleanup();
        std::process::exit(130);
    });
}

/// Undoes everything registered so far.
pub fn cleanup() {
    let items: Vec<Undo> = std::mem::take(&mut *UNDO.lock().unwrap_or_else(|e| e.into_inner()));
    for item in items.into_iter().rev() {
        match item {
            Undo::Kill(pid) => {
                // SAFETY: signalling a child we started.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                let deadline = Instant::now() + Duration::from_secs(5);
                let proc = PathBuf::from(format!("/proc/{pid}"));
                while proc.exists() && Instant::now() < deadline {
                    // Reap if it is our child; otherwise just wait for it to vanish.
                    // SAFETY: non-blocking waitpid on a pid we started.
                    unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
                    std::thread::sleep(Duration::from_millis(20));
                }
                // SAFETY: as above.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            Undo::Netns(name) => {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            }
            Undo::Remove(p) => {
                let _ = std::fs::remove_dir_all(&p);
            }
        }
    }
}

pub fn remove_on_exit(p: PathBuf) {
    UNDO.lock().expect("undo list").push(Undo::Remove(p));
}

/// A namespace, deleted at cleanup.
pub struct Netns {
    pub name: String,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Netns {
    pub fn new(name: String) -> anyhow::Result<Self> {
        ip(&["netns", "add", &name])?;
        UNDO.lock()
            .expect("undo list")
            .push(Undo::Netns(name.clone()));
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        Ok(Self { name })
    }

    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// A command run inside the namespace (nsenter keeps /sys/fs/bpf visible).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        c
    }

    /// Starts a long-running process in the namespace, killed at cleanup.
    pub fn spawn(&self, c: &mut Command) -> anyhow::Result<Child> {
        let child = c.spawn().with_context(|| format!("starting {c:?}"))?;
        UNDO.lock().expect("undo list").push(Undo::Kill(child.id()));
        Ok(child)
    }

    /// Runs `f` on a thread inside the namespace; sockets it makes stay there.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        in_netns(&self.path(), f)
    }

    /// GET `path` from an HTTP server reachable inside the namespace.
    pub fn http_get(&self, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
        let path = path.to_string();
        self.enter(move || -> anyhow::Result<(u16, String)> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            let code = out
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            Ok((
                code,
                out.split_once("\r\n\r\n")
                    .map(|(_, b)| b.to_string())
                    .unwrap_or_default(),
            ))
        })?
    }
}

/// Runs `f` on a scoped thread that has joined the network namespace at `path` (sockets it
/// makes, and interface names and indexes it resolves, are the namespace's).
pub fn in_netns<T: Send>(
    path: &std::path::Path,
    f: impl FnOnce() -> T + Send,
) -> anyhow::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<T> {
            let file = File::open(path).with_context(|| path.display().to_string())?;
            // SAFETY: a namespace fd; only this thread changes namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!(
                    "setns {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                );
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {} panicked", path.display()))?
    })
}

/// A veth pair between two namespaces.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> anyhow::Result<()> {
    ip(&[
        "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
        &b.name,
    ])
}
