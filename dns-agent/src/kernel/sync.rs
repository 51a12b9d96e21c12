//! Keeps the kernel's answer maps equal to what the zone model says, writing only what
//! changed.

use std::collections::BTreeMap;

use dns_common::{CONFIG_NXDOMAIN, CONFIG_SYNCED, QTYPE_OTHER, SOA_RECORD_LEN};

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
    synced: bool,
    /// Keys this agent has in the answer maps (stand-ins included).
    entries: usize,
    /// Keys whose answer the maps do not hold as the model says, because a write failed (a
    /// full map, no memory). While any is pending the kernel answers no NXDOMAIN, and
    /// [`KernelSync::retry`] writes them again.
    pending: BTreeMap<(WireName, u16), Pending>,
    /// Zone name and SOA template, once written.
    zone: Option<(WireName, [u8; SOA_RECORD_LEN])>,
}

/// A key the model has and the maps do not hold as it says.
#[derive(Debug)]
struct Pending {
    /// What the model says the key answers.
    answer: KernelAnswer,
    /// A PASS entry stands in for it (userspace answers the key); otherwise the key is absent.
    held: bool,
}

impl KernelSync {
    pub fn new(maps: KernelMaps) -> Self {
        Self {
            maps,
            blobs: BlobIds::default(),
            synced: false,
            entries: 0,
            pending: BTreeMap::new(),
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

    /// Every key of the zone is in the maps as the model says: the kernel may answer NXDOMAIN.
    pub fn is_complete(&self) -> bool {
        self.pending.is_empty()
    }

    /// Keys waiting for a write to succeed.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Writes the difference between `before` and `after` (same names, same order).
    ///
    /// Per name, removals come first, the catch-all ([`QTYPE_OTHER`]) first of them, and
    /// writes after, the catch-all last of them: a name's catch-all never stands without the
    /// typed entries the model gives it, or it would answer NODATA for a type the name has.
    pub fn apply(&mut self, before: NameEntries, after: NameEntries) -> SyncStats {
        let was_complete = self.is_complete();
        let mut stats = SyncStats::default();
        let mut before: BTreeMap<WireName, Vec<(u16, KernelAnswer)>> = before.into_iter().collect();
        for (name, new) in after {
            let old = before.remove(&name).unwrap_or_default();
            let mut gone: Vec<u16> = old
                .iter()
                .map(|(q, _)| *q)
                .filter(|q| !new.iter().any(|(n, _)| n == q))
                .collect();
            gone.sort_by_key(|q| *q != QTYPE_OTHER);
            for qtype in gone {
                self.remove_key(&name, qtype);
                stats.removed += 1;
            }
            let mut writes: Vec<&(u16, KernelAnswer)> = new.iter().collect();
            writes.sort_by_key(|(q, _)| *q == QTYPE_OTHER);
            for (qtype, answer) in writes {
                let key = (name.clone(), *qtype);
                let held = match self.pending.get(&key) {
                    Some(p) => p.held,
                    None if old.iter().any(|(q, a)| q == qtype && a == answer) => {
                        stats.unchanged += 1;
                        continue;
                    }
                    None => old.iter().any(|(q, _)| q == qtype),
                };
                if self.write_key(key, answer, held) {
                    stats.written += 1;
                } else {
                    stats.failed += 1;
                }
            }
            self.guard_catch_all(&name, &new);
        }
        self.after_writes(was_complete);
        stats
    }

    /// Writes the pending keys again (typed entries first: a catch-all waits for them); call
    /// now and then. Also deletes the blobs retired long enough ago.
    pub fn retry(&mut self) -> SyncStats {
        let mut stats = SyncStats::default();
        self.maps.reap(&mut self.blobs);
        if self.pending.is_empty() {
            return stats;
        }
        let was_complete = self.is_complete();
        let mut keys: Vec<(WireName, u16)> = self.pending.keys().cloned().collect();
        keys.sort_by_key(|(_, q)| *q == QTYPE_OTHER);
        for key in keys {
            let Some(p) = self.pending.get(&key) else {
                continue;
            };
            if key.1 == QTYPE_OTHER && self.blocked(&key.0) {
                continue;
            }
            let (answer, held) = (p.answer.clone(), p.held);
            if self.write_key(key, &answer, held) {
                stats.written += 1;
            } else {
                stats.failed += 1;
            }
        }
        self.after_writes(was_complete);
        stats
    }

    /// Writes one key as the model says; false if that failed (the key is then pending).
    /// `held`: the maps hold the key now (with any answer).
    fn write_key(&mut self, key: (WireName, u16), answer: &KernelAnswer, held: bool) -> bool {
        let (name, qtype) = (&key.0, key.1);
        // A catch-all whose name lacks a typed entry would answer NODATA for that type: a
        // stand-in until the typed entry is there.
        let stand_in = qtype == QTYPE_OTHER && self.blocked(name);
        let write = if stand_in {
            &KernelAnswer::Pass
        } else {
            answer
        };
        match self.maps.write(&mut self.blobs, name, qtype, write) {
            Ok(()) => {
                if !held {
                    self.entries += 1;
                }
                if stand_in {
                    // Written; it waits for its name's typed entries, not for room.
                    self.pending.insert(
                        key,
                        Pending {
                            answer: answer.clone(),
                            held: true,
                        },
                    );
                } else {
                    self.pending.remove(&key);
                }
                true
            }
            Err(e) => {
                if self.pending.is_empty() {
                    tracing::warn!(
                        error = %e,
                        full = e.is_full(),
                        "a zone entry did not fit in the kernel maps: userspace answers it, and \
                         the kernel answers no NXDOMAIN until every entry is written (raise \
                         --kernel-capacity)"
                    );
                }
                // Userspace answers the key until a retry succeeds: a PASS entry needs no
                // blob, and replacing a key the map holds needs no new room.
                let stand_in = self
                    .maps
                    .write(&mut self.blobs, name, qtype, &KernelAnswer::Pass);
                let now_held = match stand_in {
                    Ok(()) => {
                        if !held {
                            self.entries += 1;
                        }
                        true
                    }
                    Err(_) => {
                        if held {
                            // The old answer must not outlive the failed write.
                            self.maps.remove(&mut self.blobs, name, qtype);
                            self.entries -= 1;
                        }
                        false
                    }
                };
                self.pending.insert(
                    key,
                    Pending {
                        answer: answer.clone(),
                        held: now_held,
                    },
                );
                false
            }
        }
    }

    /// Removes one key the model no longer has (if the maps hold it).
    fn remove_key(&mut self, name: &WireName, qtype: u16) {
        let held = self
            .pending
            .remove(&(name.clone(), qtype))
            .is_none_or(|p| p.held);
        if held {
            self.maps.remove(&mut self.blobs, name, qtype);
            self.entries -= 1;
        }
    }

    /// A typed entry of `name` is missing from the maps (neither its answer nor a stand-in).
    fn blocked(&self, name: &WireName) -> bool {
        self.pending
            .range((name.clone(), 1)..=(name.clone(), u16::MAX))
            .any(|(_, p)| !p.held)
    }

    /// After `name`'s writes: if a typed entry of it is missing and the maps hold the model's
    /// catch-all (written earlier), a stand-in replaces the catch-all.
    fn guard_catch_all(&mut self, name: &WireName, new: &[(u16, KernelAnswer)]) {
        let key = (name.clone(), QTYPE_OTHER);
        if !self.blocked(name) || self.pending.contains_key(&key) {
            return;
        }
        let Some((_, answer)) = new.iter().find(|(q, _)| *q == QTYPE_OTHER) else {
            return;
        };
        if *answer == KernelAnswer::Pass {
            return;
        }
        let held = match self
            .maps
            .write(&mut self.blobs, name, QTYPE_OTHER, &KernelAnswer::Pass)
        {
            Ok(()) => true,
            Err(_) => {
                self.maps.remove(&mut self.blobs, name, QTYPE_OTHER);
                self.entries -= 1;
                false
            }
        };
        self.pending.insert(
            key,
            Pending {
                answer: answer.clone(),
                held,
            },
        );
    }

    /// The NXDOMAIN rule holds only while nothing is pending: tell the kernel when that changed.
    fn after_writes(&mut self, was_complete: bool) {
        if self.is_complete() != was_complete && self.synced {
            if self.is_complete() {
                tracing::info!("every zone entry is in the kernel maps again");
            }
            let _ = self.write_flags();
        }
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
            if self.is_complete() {
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
