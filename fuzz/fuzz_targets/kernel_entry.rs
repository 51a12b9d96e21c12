//! The kernel-entry encoder: a zone (zone-file YAML) → the map values the agent writes →
//! decoded as the XDP program serves them. For every name of the zone, its parent and a child,
//! asked with several types with and without EDNS, what the kernel would answer must be byte
//! for byte what userspace answers, and its records what hickory-proto makes of the zone's
//! records. This also holds the NXDOMAIN rule to account: the kernel answers NXDOMAIN for a
//! name of the zone it has no entry for, so no existing name may lack one.
#![no_main]

use std::{collections::BTreeSet, collections::HashMap, path::Path};

use dns_agent::{
    dns,
    kernel::maps::answer_value,
    server::{ZoneReply, answer_from_zone},
    zone::{NXDOMAIN_FLAGS, ZONE_FLAGS, name::to_text},
};
use dns_common::{AnswerValue, BLOB_CLASS_SHIFT, QTYPE_OTHER};
use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;
use xdns_fuzz::{KernelVerdict, KernelZone, blob_class_len, kernel_reply, query_bytes};

/// Types the program looks up (it passes 0, OPT and the meta types up).
const QTYPES: [u16; 9] = [1, 2, 5, 6, 12, 15, 16, 28, 33];
const MAX_PROBES: usize = 400;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(objects) = dns_agent::source::file::parse(Path::new("zone.yaml"), text) else {
        return;
    };
    let zone = xdns_fuzz::zone_from(objects);
    let names = zone.all_names();
    // The maps after a full load.
    let mut maps: HashMap<(Vec<u8>, u16), (AnswerValue, Option<Vec<u8>>)> = HashMap::new();
    for name in &names {
        for (qtype, answer) in zone.kernel_entries(name) {
            let (mut value, blob) = answer_value(&answer);
            if let Some(bytes) = blob {
                let (class, size) = blob_class_len(bytes.len());
                assert!(
                    bytes.len() <= size,
                    "{} bytes for a blob of {size}",
                    bytes.len()
                );
                value.blob = (class << BLOB_CLASS_SHIFT) | 1;
            }
            maps.insert((name.clone(), qtype), (value, blob.map(<[u8]>::to_vec)));
        }
    }
    let kernel_zone = KernelZone {
        zone: zone.zone_wire(),
        soa_template: zone.soa_template(),
        nodata_flags: ZONE_FLAGS,
        nxdomain_flags: NXDOMAIN_FLAGS,
        nxdomain: true,
    };
    // Every name, its parent, and a child that does not exist.
    let mut probes = BTreeSet::new();
    for name in names.iter().take(MAX_PROBES / 3) {
        probes.insert(name.clone());
        if name.len() > 1 {
            probes.insert(name[1 + name[0] as usize..].to_vec());
        }
        if name.len() + 2 <= dns_common::MAX_NAME_LEN {
            let mut child = vec![1, b'x'];
            child.extend_from_slice(name);
            probes.insert(child);
        }
    }
    for name in &probes {
        // The client's spelling: capitals, which the reply must echo.
        let mut question: Vec<u8> = name.iter().map(u8::to_ascii_uppercase).collect();
        let qlen = question.len();
        for qtype in QTYPES {
            question.truncate(qlen);
            question.extend_from_slice(&qtype.to_be_bytes());
            question.extend_from_slice(&1u16.to_be_bytes());
            let value = maps
                .get(&(name.clone(), qtype))
                .or_else(|| maps.get(&(name.clone(), QTYPE_OTHER)))
                .map(|(v, b)| (v, b.as_deref()));
            for (edns, limit) in [(None, 512), (Some(true), 1232)] {
                let KernelVerdict::Reply(kernel) =
                    kernel_reply(7, 0x0100, &question, name, value, &kernel_zone, edns, limit)
                else {
                    continue;
                };
                let query = query_bytes(7, 0x0100, &question, edns.map(|d| (1232, d)));
                let q = dns::parse_query(&query).expect("a query for a zone name parses");
                let ZoneReply::Reply(user) = answer_from_zone(&zone, &q, Some(q.udp_limit()))
                else {
                    panic!(
                        "the kernel answers {} type {qtype}, userspace forwards it",
                        to_text(name)
                    );
                };
                assert_eq!(
                    kernel,
                    user,
                    "kernel and userspace answers differ for {} type {qtype}",
                    to_text(name)
                );
                let m = Message::from_vec(&kernel).unwrap_or_else(|e| {
                    panic!(
                        "the kernel's answer for {} does not parse: {e}",
                        to_text(name)
                    )
                });
                if let Ok(records) = zone.answer_records(name, qtype) {
                    assert_eq!(m.answers, records, "answer records of {}", to_text(name));
                }
            }
        }
    }
});
