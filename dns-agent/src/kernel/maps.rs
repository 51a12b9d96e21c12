//! Typed access to the XDP program's maps: answers, blobs, listen addresses, zone config,
//! counters.

use std::collections::HashMap as StdHashMap;

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray};
use dns_common::{
    ACTION_ANSWER, ACTION_NODATA, ACTION_PASS, AnswerBlob, AnswerValue, BLOB_DATA_LEN,
    INLINE_DATA_LEN, LONG_NAME_LEN, LongKey, SHORT_NAME_LEN, SOA_RECORD_LEN, ShortKey, ZoneConfig,
    counter, csum,
};

use super::KernelError;
use crate::zone::{KernelAnswer, name::WireName};

/// The maps, taken out of the loaded object.
pub struct KernelMaps {
    pub(super) short: HashMap<MapData, ShortKey, AnswerValue>,
    pub(super) long: HashMap<MapData, LongKey, AnswerValue>,
    pub(super) blobs: HashMap<MapData, u32, AnswerBlob>,
    pub(super) listen_v4: HashMap<MapData, u32, u32>,
    pub(super) listen_v6: HashMap<MapData, [u8; 16], u32>,
    pub(super) config: Array<MapData, ZoneConfig>,
    pub(super) counters: PerCpuArray<MapData, u64>,
}

/// A map write that failed; the entry is not in the kernel.
#[derive(Debug, thiserror::Error)]
#[error("writing {what}: {source}")]
pub struct WriteError {
    what: String,
    #[source]
    source: MapError,
}

impl WriteError {
    /// The map is full (E2BIG from the kernel).
    pub fn is_full(&self) -> bool {
        matches!(&self.source, MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::E2BIG))
    }
}

enum Key {
    Short(ShortKey),
    Long(LongKey),
}

fn key(name: &[u8], qtype: u16) -> Key {
    if name.len() <= SHORT_NAME_LEN {
        let mut k = ShortKey::zeroed();
        k.qtype = qtype;
        k.name[..name.len()].copy_from_slice(name);
        Key::Short(k)
    } else {
        let mut k = LongKey::zeroed();
        k.qtype = qtype;
        k.name[..name.len().min(LONG_NAME_LEN)]
            .copy_from_slice(&name[..name.len().min(LONG_NAME_LEN)]);
        Key::Long(k)
    }
}

/// Partial checksum of section bytes from an even offset, as the kernel expects it.
pub fn data_csum(data: &[u8]) -> u16 {
    csum::fold(csum::add_bytes(0, data))
}

/// Blob ids: never reused while in use, and handed out in a cycle of 2^32, so an id freed
/// now is not reused for a very long time (a reader that looked up the old id either finds
/// the old blob or nothing, never another answer's bytes).
#[derive(Default)]
pub struct BlobIds {
    next: u32,
    live: StdHashMap<(WireName, u16), u32>,
    used: std::collections::HashSet<u32>,
}

impl BlobIds {
    fn allocate(&mut self) -> u32 {
        loop {
            self.next = self.next.wrapping_add(1);
            if self.next != 0 && !self.used.contains(&self.next) {
                self.used.insert(self.next);
                return self.next;
            }
        }
    }

    fn release(&mut self, id: u32) {
        self.used.remove(&id);
    }

    pub fn live_count(&self) -> usize {
        self.live.len()
    }
}

impl KernelMaps {
    /// Writes one entry. A changed blob answer gets a new blob, written before the entry
    /// points at it; the old one is deleted after.
    pub fn write(
        &mut self,
        blobs: &mut BlobIds,
        name: &[u8],
        qtype: u16,
        answer: &KernelAnswer,
    ) -> Result<(), WriteError> {
        let mut v = AnswerValue::zeroed();
        let mut new_blob = None;
        match answer {
            KernelAnswer::Answer { flags, sections } => {
                v.action = ACTION_ANSWER;
                v.flags = *flags;
                v.ancount = sections.ancount;
                v.nscount = sections.nscount;
                v.arcount = sections.arcount;
                v.data_len = sections.data.len() as u16;
                v.data_csum = data_csum(&sections.data);
                if sections.data.len() <= INLINE_DATA_LEN {
                    v.data[..sections.data.len()].copy_from_slice(&sections.data);
                } else {
                    assert!(
                        sections.data.len() <= BLOB_DATA_LEN,
                        "the zone passes bigger answers"
                    );
                    let id = blobs.allocate();
                    let mut blob = AnswerBlob {
                        data: [0; BLOB_DATA_LEN],
                    };
                    blob.data[..sections.data.len()].copy_from_slice(&sections.data);
                    if let Err(source) = self.blobs.insert(id, blob, 0) {
                        blobs.release(id);
                        return Err(WriteError {
                            what: format!("blob {id}"),
                            source,
                        });
                    }
                    v.blob = id;
                    new_blob = Some(id);
                }
            }
            KernelAnswer::Nodata => v.action = ACTION_NODATA,
            KernelAnswer::Pass => v.action = ACTION_PASS,
        }
        let res = match key(name, qtype) {
            Key::Short(k) => self.short.insert(k, v, 0),
            Key::Long(k) => self.long.insert(k, v, 0),
        };
        if let Err(source) = res {
            if let Some(id) = new_blob {
                let _ = self.blobs.remove(&id);
                blobs.release(id);
            }
            return Err(WriteError {
                what: format!("{} type {qtype}", crate::zone::name::to_text(name)),
                source,
            });
        }
        let slot = (name.to_vec(), qtype);
        let old = match new_blob {
            Some(id) => blobs.live.insert(slot, id),
            None => blobs.live.remove(&slot),
        };
        if let Some(old) = old {
            let _ = self.blobs.remove(&old);
            blobs.release(old);
        }
        Ok(())
    }

    /// Removes one entry (and its blob).
    pub fn remove(&mut self, blobs: &mut BlobIds, name: &[u8], qtype: u16) {
        let _ = match key(name, qtype) {
            Key::Short(k) => self.short.remove(&k),
            Key::Long(k) => self.long.remove(&k),
        };
        if let Some(old) = blobs.live.remove(&(name.to_vec(), qtype)) {
            let _ = self.blobs.remove(&old);
            blobs.release(old);
        }
    }

    /// Writes the zone configuration the program reads per packet.
    pub fn write_config(
        &mut self,
        zone: &[u8],
        soa_template: &[u8; SOA_RECORD_LEN],
        flags: u32,
        nodata_flags: u16,
        nxdomain_flags: u16,
    ) -> Result<(), KernelError> {
        let mut c = ZoneConfig::zeroed();
        c.flags = flags;
        c.zone_len = zone.len() as u16;
        c.zone[..zone.len()].copy_from_slice(zone);
        c.soa = *soa_template;
        c.soa_csum = data_csum(soa_template);
        c.nodata_flags = nodata_flags;
        c.nxdomain_flags = nxdomain_flags;
        self.config.set(0, c, 0).map_err(|source| KernelError::Map {
            name: dns_common::MAP_CONFIG,
            source,
        })
    }

    /// The program answers queries to these addresses only.
    pub fn set_listen(&mut self, v4: &[[u8; 4]], v6: &[[u8; 16]]) -> Result<(), KernelError> {
        for a in v4 {
            self.listen_v4
                .insert(u32::from_ne_bytes(*a), 1, 0)
                .map_err(|source| KernelError::Map {
                    name: dns_common::MAP_LISTEN_V4,
                    source,
                })?;
        }
        for a in v6 {
            self.listen_v6
                .insert(*a, 1, 0)
                .map_err(|source| KernelError::Map {
                    name: dns_common::MAP_LISTEN_V6,
                    source,
                })?;
        }
        Ok(())
    }

    /// The kernel counters, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(&'static str, u64)>, KernelError> {
        sum_counters(&self.counters)
    }

    /// Entries in the answer maps (walks the maps: for tests and benchmarks, not hot paths).
    pub fn entry_counts(&self) -> (usize, usize, usize) {
        (
            self.short.keys().count(),
            self.long.keys().count(),
            self.blobs.keys().count(),
        )
    }
}

pub(super) fn sum_counters(
    map: &PerCpuArray<MapData, u64>,
) -> Result<Vec<(&'static str, u64)>, KernelError> {
    (0..counter::COUNT)
        .map(|i| {
            let values = map.get(&i, 0).map_err(|source| KernelError::Map {
                name: dns_common::MAP_COUNTERS,
                source,
            })?;
            Ok((counter::NAMES[i as usize], values.iter().sum()))
        })
        .collect()
}
