//! Which interfaces get the XDP program, and when: the `--interface`s once the zone is loaded,
//! and every interface matching an `--interface-pattern`, now and as it appears.

use std::sync::Arc;

use super::{
    AttachMode, Kernel, KernelError,
    links::{LinkEvent, Pattern},
    maps::Heartbeat,
};

/// The loaded program and the interfaces it is for.
pub struct Attachments {
    kernel: Kernel,
    interfaces: Vec<String>,
    patterns: Vec<Pattern>,
    mode: AttachMode,
    /// The zone is loaded: attach at once. Before, a previous agent's program keeps answering
    /// and matching interfaces wait in `pending`.
    loaded: bool,
    pending: Vec<String>,
    heartbeat: Arc<Heartbeat>,
}

impl Attachments {
    pub fn new(
        kernel: Kernel,
        interfaces: Vec<String>,
        patterns: Vec<Pattern>,
        mode: AttachMode,
        heartbeat: Arc<Heartbeat>,
    ) -> Self {
        Self {
            kernel,
            interfaces,
            patterns,
            mode,
            loaded: false,
            pending: Vec::new(),
            heartbeat,
        }
    }

    /// Are link notifications needed?
    pub fn follows_links(&self) -> bool {
        !self.patterns.is_empty()
    }

    /// The maps hold the whole zone: attach everywhere (the swap from a previous agent's
    /// program is atomic). An `--interface` that cannot be attached stops the agent.
    pub fn zone_loaded(&mut self) -> Result<(), KernelError> {
        self.loaded = true;
        // This agent answers: the program must not find its heartbeat missing the moment it is
        // attached (the heartbeat task's first beat may still be to come).
        self.heartbeat.beat();
        for iface in &self.interfaces {
            let how = self.kernel.attach(iface, self.mode)?;
            tracing::info!(interface = %iface, mode = %self.mode, ?how, "XDP program attached");
        }
        for iface in std::mem::take(&mut self.pending) {
            self.attach_matching(&iface);
        }
        // Those the link watcher has not reported yet, too: the agent says it is ready when
        // this returns, and a pod already running must be served by then.
        if !self.patterns.is_empty() {
            for iface in interface_names() {
                if self.patterns.iter().any(|p| p.matches(&iface)) {
                    self.attach_matching(&iface);
                }
            }
        }
        Ok(())
    }

    /// An interface appeared or went away.
    pub fn link(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::Up(iface) if self.patterns.iter().any(|p| p.matches(&iface)) => {
                if !self.loaded {
                    if !self.pending.contains(&iface) {
                        self.pending.push(iface);
                    }
                } else {
                    self.attach_matching(&iface);
                }
            }
            LinkEvent::Gone(iface) => {
                self.pending.retain(|p| *p != iface);
                if self.kernel.is_attached(&iface) {
                    self.kernel.forget(&iface);
                    tracing::info!(interface = %iface, "interface gone; its XDP attachment with it");
                }
            }
            LinkEvent::Up(_) => {}
        }
    }

    /// Hands every attachment to the next agent, or detaches.
    pub fn release(mut self) {
        self.kernel.detach_all();
    }

    /// Attaches to an interface that matched a pattern (once). A pod's veth may vanish between
    /// its notification and the attach: that is logged, not fatal.
    fn attach_matching(&mut self, iface: &str) {
        if self.kernel.is_attached(iface) {
            return;
        }
        match self.kernel.attach(iface, self.mode) {
            Ok(how) => {
                tracing::info!(interface = %iface, mode = %self.mode, ?how, "XDP program attached (interface pattern)")
            }
            Err(e) => {
                tracing::warn!(interface = %iface, error = %e, "attaching to a matching interface failed")
            }
        }
    }
}

/// The names of this network namespace's interfaces.
fn interface_names() -> Vec<String> {
    let mut names = Vec::new();
    // SAFETY: if_nameindex returns an array ended by a zeroed entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return names;
        }
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            names.push(
                std::ffi::CStr::from_ptr((*p).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    names
}

/// Refuses an `--interface` that does not exist in this network namespace.
pub fn check_interfaces(interfaces: &[String]) -> Result<(), KernelError> {
    for iface in interfaces {
        let known = std::ffi::CString::new(iface.as_str())
            // SAFETY: a valid C string.
            .map(|c| unsafe { libc::if_nametoindex(c.as_ptr()) } != 0)
            .unwrap_or(false);
        if !known {
            return Err(KernelError::NoInterface(iface.clone()));
        }
    }
    Ok(())
}
