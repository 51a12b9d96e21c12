//! Least privilege: the Linux capabilities the agent starts with, and the two it keeps.
//!
//! Starting needs CAP_BPF (maps, programs, pins), CAP_PERFMON (the verifier accepts the XDP
//! program's packet pointer arithmetic only from a process that has it), CAP_NET_ADMIN (XDP and
//! tc programs, the listen address) and CAP_NET_BIND_SERVICE (port 53); CAP_SYS_ADMIN only to
//! mount a BPF filesystem where none is. Once the programs are loaded and the sockets bound, the
//! agent keeps CAP_BPF and CAP_NET_ADMIN — it attaches to pod veths as they appear and removes its
//! listen address on exit — and drops every other capability ([`keep_for_serving`]).
//!
//! Capabilities belong to threads, not processes: capset(2) changes the calling thread's only,
//! and the runtime's threads are running by then. So every thread drops its own: each is sent a
//! signal whose handler makes the same capset call (glibc does the same for setuid(2) in a
//! threaded process), until /proc/self/task says every thread holds the reduced sets. Threads
//! started later inherit them from the thread that starts them.

use std::{
    fmt, io,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// The capabilities the agent's work needs, by their numbers in `linux/capability.h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capability {
    NetBindService = 10,
    NetAdmin = 12,
    SysAdmin = 21,
    Perfmon = 38,
    Bpf = 39,
}

impl Capability {
    pub fn bit(self) -> u64 {
        1 << self as u32
    }

    pub fn name(self) -> &'static str {
        NAMES[self as usize]
    }

    /// What the agent does with it: the reason it is in the DaemonSet.
    pub fn used_for(self) -> &'static str {
        match self {
            Self::Bpf => "creating the BPF maps, loading the programs, pinning and attaching them",
            Self::Perfmon => {
                "the verifier accepts the XDP program's packet pointer arithmetic only from a \
                 process that has it"
            }
            Self::NetAdmin => {
                "loading XDP and tc programs, attaching them to interfaces, putting the listen \
                 address on the node"
            }
            Self::NetBindService => "binding port 53",
            Self::SysAdmin => "mounting a BPF filesystem at /sys/fs/bpf",
        }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Every capability of Linux 6.x, by number.
const NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// A set of capabilities, as the kernel's 64-bit mask.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapSet(pub u64);

impl CapSet {
    pub fn of(caps: &[Capability]) -> Self {
        Self(caps.iter().fold(0, |s, c| s | c.bit()))
    }

    pub fn contains(self, cap: Capability) -> bool {
        self.0 & cap.bit() != 0
    }

    fn names(self) -> Vec<String> {
        (0..64)
            .filter(|b| self.0 & (1 << b) != 0)
            .map(|b| {
                NAMES
                    .get(b)
                    .map_or_else(|| format!("capability {b}"), |n| n.to_string())
            })
            .collect()
    }
}

impl fmt::Display for CapSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.names().join(", ") {
            s if s.is_empty() => f.write_str("none"),
            s => f.write_str(&s),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CapabilityError {
    #[error("reading this thread's capabilities (capget): {0}")]
    Get(#[source] io::Error),
    #[error("dropping capabilities (capset): {0}")]
    Set(#[source] io::Error),
    #[error("installing the capability-dropping signal handler: {0}")]
    Handler(#[source] io::Error),
    #[error(
        "threads {0:?} still hold capabilities the agent dropped, 5 s after they were told to \
         drop them"
    )]
    Straggler(Vec<i32>),
}

/// A failure the process's missing capabilities explain.
#[derive(Debug, thiserror::Error)]
#[error(
    "{what} needs {missing_list}, which this process lacks; grant it (deploy/daemonset.yaml: \
     securityContext.capabilities.add: [{add}])",
    missing_list = names_with_reasons(.missing),
    add = .missing.iter().map(|c| c.name().trim_start_matches("CAP_")).collect::<Vec<_>>().join(", ")
)]
pub struct Missing {
    pub what: String,
    pub missing: Vec<Capability>,
}

fn names_with_reasons(caps: &[Capability]) -> String {
    caps.iter()
        .map(|c| format!("{c} ({})", c.used_for()))
        .collect::<Vec<_>>()
        .join(" and ")
}

impl Missing {
    /// Those of `needed` that this thread's effective set lacks, if any, for a failure of `what`
    /// that the kernel refused (`EPERM`, `EACCES`).
    pub fn explain(needed: &[Capability], what: impl Into<String>) -> Option<Self> {
        let effective = effective().ok()?;
        let missing: Vec<Capability> = needed
            .iter()
            .copied()
            .filter(|c| !effective.contains(*c))
            .collect();
        (!missing.is_empty()).then(|| Self {
            what: what.into(),
            missing,
        })
    }
}

/// Did the kernel refuse this for want of privilege? Looks through the error's causes for
/// `EPERM` or `EACCES`.
pub fn refused(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(err);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES))
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// What the agent keeps once its programs are loaded and its sockets bound: CAP_NET_ADMIN to
/// remove its listen address on exit (and, with the kernel path, to attach to new interfaces),
/// CAP_BPF with the kernel path (attaching, pinning links, writing maps).
pub fn serving_set(kernel: bool) -> CapSet {
    if kernel {
        CapSet::of(&[Capability::Bpf, Capability::NetAdmin])
    } else {
        CapSet::of(&[Capability::NetAdmin])
    }
}

/// Drops, in every thread, every capability but those of [`serving_set`]. Returns what was
/// kept and what was dropped.
pub fn keep_for_serving(kernel: bool) -> Result<(CapSet, CapSet), CapabilityError> {
    let before = thread_sets().map_err(CapabilityError::Get)?;
    let kept = keep_only(serving_set(kernel))?;
    let dropped = CapSet(before.permitted.0 & !kept.0);
    tracing::info!(kept = %kept, dropped = %dropped, "capabilities dropped in every thread");
    Ok((kept, dropped))
}

/// This thread's effective set.
pub fn effective() -> io::Result<CapSet> {
    thread_sets().map(|s| s.effective)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sets {
    effective: CapSet,
    permitted: CapSet,
    inheritable: CapSet,
}

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct Header {
    version: u32,
    /// 0: the calling thread.
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn thread_sets() -> io::Result<Sets> {
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: a version-3 header and room for its two data words, as capget(2) requires.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |lo: u32, hi: u32| CapSet(u64::from(lo) | (u64::from(hi) << 32));
    Ok(Sets {
        effective: join(data[0].effective, data[1].effective),
        permitted: join(data[0].permitted, data[1].permitted),
        inheritable: join(data[0].inheritable, data[1].inheritable),
    })
}

/// The sets every thread is to hold, for the signal handler (which may not allocate or lock).
static TARGET: AtomicU64 = AtomicU64::new(0);

/// Sets this thread's effective and permitted sets to `TARGET` and empties its inheritable set
/// (which clears the ambient set with it). Async-signal-safe: one system call, errno kept.
fn set_thread_to_target() -> libc::c_long {
    let target = TARGET.load(Ordering::SeqCst);
    let (lo, hi) = (target as u32, (target >> 32) as u32);
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [
        Data {
            effective: lo,
            permitted: lo,
            inheritable: 0,
        },
        Data {
            effective: hi,
            permitted: hi,
            inheritable: 0,
        },
    ];
    // SAFETY: a version-3 header and its two data words; capset only reads them.
    unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) }
}

extern "C" fn on_drop_signal(_: libc::c_int) {
    // SAFETY: errno of this thread, saved and restored around the call that may set it.
    let errno = unsafe { *libc::__errno_location() };
    // Nothing to report from a handler: the caller reads the outcome from /proc.
    let _ = set_thread_to_target();
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// The signal that makes a thread drop its capabilities: the first real-time signal glibc leaves
/// to applications. Real-time signals are queued, never merged, and nothing else here uses it.
fn drop_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

/// Reduces every thread's effective and permitted sets to their intersection with `keep`, and
/// empties the inheritable and ambient sets. Returns the set every thread holds now.
fn keep_only(keep: CapSet) -> Result<CapSet, CapabilityError> {
    let current = thread_sets().map_err(CapabilityError::Get)?;
    let target = CapSet(current.permitted.0 & keep.0);
    TARGET.store(target.0, Ordering::SeqCst);
    install_handler().map_err(CapabilityError::Handler)?;
    if set_thread_to_target() != 0 {
        return Err(CapabilityError::Set(io::Error::last_os_error()));
    }

    // SAFETY: no preconditions.
    let pid = unsafe { libc::getpid() };
    // SAFETY: no preconditions.
    let me = unsafe { libc::gettid() };
    let mut signalled: std::collections::HashMap<i32, Instant> = Default::default();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let behind: Vec<i32> = threads()
            .into_iter()
            .filter(|&tid| tid != me)
            .filter(|&tid| thread_status(tid).is_some_and(|s| !s.holds_only(target)))
            .collect();
        if behind.is_empty() {
            return Ok(target);
        }
        if Instant::now() > deadline {
            return Err(CapabilityError::Straggler(behind));
        }
        for tid in behind {
            // A thread that has not run its handler yet is asked again only after a while:
            // every signal sent is queued for it.
            if signalled
                .get(&tid)
                .is_none_or(|at| at.elapsed() > Duration::from_millis(200))
            {
                // SAFETY: a thread of this process; the handler is installed.
                unsafe { libc::tgkill(pid, tid, drop_signal()) };
                signalled.insert(tid, Instant::now());
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn install_handler() -> io::Result<()> {
    // SAFETY: a zeroed sigaction with an empty mask and a handler that only makes one system
    // call. SA_RESTART: system calls the signal interrupts carry on. The handler stays: a
    // signal still queued when it was removed would kill the process (a real-time signal's
    // default action), and running it again changes nothing.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_drop_signal as *const () as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(drop_signal(), &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn threads() -> Vec<i32> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A thread's sets as /proc shows them; `None` if it has exited.
fn thread_status(tid: i32) -> Option<ProcSets> {
    ProcSets::parse(&std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?)
}

/// The capability lines of /proc/<pid>/status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcSets {
    pub inheritable: CapSet,
    pub permitted: CapSet,
    pub effective: CapSet,
    pub ambient: CapSet,
}

impl ProcSets {
    pub fn parse(status: &str) -> Option<Self> {
        let field = |name: &str| {
            status.lines().find_map(|l| {
                let hex = l.strip_prefix(name)?.trim();
                u64::from_str_radix(hex, 16).ok().map(CapSet)
            })
        };
        Some(Self {
            inheritable: field("CapInh:")?,
            permitted: field("CapPrm:")?,
            effective: field("CapEff:")?,
            ambient: field("CapAmb:")?,
        })
    }

    fn holds_only(&self, target: CapSet) -> bool {
        self.permitted == target
            && self.effective == target
            && self.inheritable.0 == 0
            && self.ambient.0 == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_kernel_numbers() {
        assert_eq!(Capability::Bpf.bit(), 1 << 39);
        assert_eq!(Capability::Bpf.name(), "CAP_BPF");
        assert_eq!(Capability::Perfmon.name(), "CAP_PERFMON");
        assert_eq!(Capability::NetAdmin.name(), "CAP_NET_ADMIN");
        assert_eq!(Capability::NetBindService.name(), "CAP_NET_BIND_SERVICE");
        assert_eq!(Capability::SysAdmin.name(), "CAP_SYS_ADMIN");
        assert_eq!(
            CapSet::of(&[Capability::Bpf, Capability::NetAdmin]).to_string(),
            "CAP_NET_ADMIN, CAP_BPF"
        );
        assert_eq!(CapSet(1 << 45).to_string(), "capability 45");
        assert_eq!(CapSet(0).to_string(), "none");
    }

    #[test]
    fn proc_status_lines() {
        let status = "Name:\tdns-agent\nCapInh:\t0000000000000000\nCapPrm:\t0000008000001000\n\
                      CapEff:\t0000008000001000\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n";
        let s = ProcSets::parse(status).unwrap();
        assert_eq!(
            s.effective,
            CapSet::of(&[Capability::Bpf, Capability::NetAdmin])
        );
        assert!(s.holds_only(serving_set(true)));
        assert!(!s.holds_only(serving_set(false)));
        assert!(ProcSets::parse("Name:\tx\n").is_none());
    }

    #[test]
    fn a_missing_capability_is_named_with_its_reason() {
        let m = Missing {
            what: "loading the XDP program".into(),
            missing: vec![Capability::Perfmon],
        };
        assert_eq!(
            m.to_string(),
            "loading the XDP program needs CAP_PERFMON (the verifier accepts the XDP program's \
             packet pointer arithmetic only from a process that has it), which this process \
             lacks; grant it (deploy/daemonset.yaml: securityContext.capabilities.add: [PERFMON])"
        );
        let eperm = io::Error::from_raw_os_error(libc::EPERM);
        assert!(refused(&eperm));
        assert!(!refused(&io::Error::from_raw_os_error(libc::ENOENT)));
    }
}
