//! Keeps the kernel's answer maps equal to what the zone model says, writing only what
//! changed.

use std::collections::BTreeMap;

use dns_common::{CONFIG_NXDOMAIN, CONFIG_SYNCED, SOA_RECORD_LEN};

use super::{
    KernelError,
    maps::{BlobIds, KernelMaps},
};
use crate::zone::{KernelAnswer, NXDOMAIN_FLAGS, ZONE_FLAGS, ZoneModel, name::WireName};

/// The kernel entries of some names, before or after a change.
pub type NameEntries = Vec<(WireName, Vec<(u16, KernelAnswer)>)>;

/// Reads the kernel entries of `names` from the model.
pub fn entries_of<'a>(
    model: &ZoneModel,
    names: impl IntoIterator<Item = &'a WireName>,
) -> NameEntries {
    names
        .into_iter()
        .map(|n| (n.clone(), model.kernel_entries(n)))
        .collect()
}

/// What one sync wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub written: usize,
    pub removed: usize,
    pub unchanged: usize,
    pub failed: usize,
}

pub struct KernelSync {
    maps: KernelMaps,
    blobs: BlobIds,
    /// Every existing name of the zone made it into the maps: the kernel may answer NXDOMAIN.
    complete: bool,
    synced: bool,
    entries: usize,
    /// Zone name and SOA template, once written.
    zone: Option<(WireName, [u8; SOA_RECORD_LEN])>,
}

impl KernelSync {
    pub fn new(maps: KernelMaps) -> Self {
        Self {
            maps,
            blobs: BlobIds::default(),
            complete: true,
            synced: false,
            entries: 0,
            zone: None,
        }
    }

    pub fn maps(&self) -> &KernelMaps {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut KernelMaps {
        &mut self.maps
    }

    /// Entries this agent has in the answer maps.
    pub fn entries(&self) -> usize {
        self.entries
    }

    pub fn blob_count(&self) -> usize {
        self.blobs.live_count()
    }

    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Writes the difference between `before` and `after` (same names, same order).
    pub fn apply(&mut self, before: NameEntries, after: NameEntries) -> SyncStats {
        let mut stats = SyncStats::default();
        let mut before: BTreeMap<WireName, Vec<(u16, KernelAnswer)>> = before.into_iter().collect();
        for (name, new) in after {
            let old = before.remove(&name).unwrap_or_default();
            for (qtype, answer) in &new {
                if old.iter().any(|(q, a)| q == qtype && a == answer) {
                    stats.unchanged += 1;
                    continue;
                }
                let existed = old.iter().any(|(q, _)| q == qtype);
                match self.maps.write(&mut self.blobs, &name, *qtype, answer) {
                    Ok(()) => {
                        stats.written += 1;
                        if !existed {
                            self.entries += 1;
                        }
                    }
                    Err(e) => {
                        stats.failed += 1;
                        if existed {
                            // The old answer must not outlive the failed write.
                            self.maps.remove(&mut self.blobs, &name, *qtype);
                            self.entries -= 1;
                        }
                        if self.complete {
                            tracing::warn!(
                                error = %e,
                                full = e.is_full(),
                                "a zone entry did not fit in the kernel maps: the kernel stops \
                                 answering NXDOMAIN, userspace answers what the maps lack \
                                 (raise --kernel-capacity)"
                            );
                        }
                        self.complete = false;
                    }
                }
            }
            for (qtype, _) in &old {
                if !new.iter().any(|(q, _)| q == qtype) {
                    self.maps.remove(&mut self.blobs, &name, *qtype);
                    self.entries -= 1;
                    stats.removed += 1;
                }
            }
        }
        if stats.failed > 0 && self.synced {
            let _ = self.write_flags();
        }
        stats
    }

    /// Marks the zone loaded: the kernel starts answering.
    pub fn set_synced(&mut self) -> Result<(), KernelError> {
        self.synced = true;
        self.write_flags()
    }

    /// Writes the zone configuration (call once the model exists; again when flags change).
    pub fn write_config(&mut self, model: &ZoneModel) -> Result<(), KernelError> {
        self.maps.write_config(
            model.zone_wire(),
            model.soa_template(),
            self.flags(),
            ZONE_FLAGS,
            NXDOMAIN_FLAGS,
        )?;
        self.zone = Some((model.zone_wire().to_vec(), *model.soa_template()));
        Ok(())
    }

    fn flags(&self) -> u32 {
        let mut f = 0;
        if self.synced {
            f |= CONFIG_SYNCED;
            if self.complete {
                f |= CONFIG_NXDOMAIN;
            }
        }
        f
    }

    fn write_flags(&mut self) -> Result<(), KernelError> {
        let Some((zone, soa)) = self.zone.clone() else {
            return Ok(());
        };
        self.maps
            .write_config(&zone, &soa, self.flags(), ZONE_FLAGS, NXDOMAIN_FLAGS)
    }
}
