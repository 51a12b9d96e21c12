//! The zone-file parser: any text in, objects or an error naming the place out, never a
//! panic; what it accepts loads into a zone that answers every name it has.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

/// Query types every name is asked: the ones the zone has, and some it never has.
const QTYPES: [u16; 10] = [1, 2, 5, 6, 12, 15, 16, 28, 33, 255];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let objects = match dns_agent::source::file::parse(Path::new("zone.yaml"), text) {
        Ok(o) => o,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let zone = xdns_fuzz::zone_from(objects);
    for name in zone.all_names() {
        let _ = zone.kernel_entries(&name);
        for qtype in QTYPES {
            let _ = zone.resolve(&name, qtype);
        }
    }
});
