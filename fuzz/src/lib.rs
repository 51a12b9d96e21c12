//! What the fuzz targets share: the example cluster as a loaded zone, and a model of what the
//! XDP program serves from a kernel entry (the program itself is fuzzed through
//! BPF_PROG_TEST_RUN by `tests/xdp_fuzz.rs`; this model lets the encoder be fuzzed without
//! root, at libFuzzer speed).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use dns_agent::zone::{
    ZoneModel, ZoneSettings,
    objects::{ClusterObject, by_kind},
};
use dns_common::{
    ACTION_ANSWER, ACTION_NODATA, ACTION_PASS, AnswerValue, BLOB_CLASS_M, BLOB_CLASS_S,
    BLOB_DATA_LEN, BLOB_M_LEN, BLOB_S_LEN, FLAG_CD, FLAG_QR, FLAG_RD, INLINE_DATA_LEN,
    SOA_PTR_OFFSETS, blob_class, csum,
};

/// The example cluster of the README, the demo and the tests.
pub const EXAMPLE_CLUSTER: &str = include_str!("../../deploy/examples/cluster.yaml");

pub fn example_objects() -> Vec<ClusterObject> {
    dns_agent::source::file::parse(Path::new("cluster.yaml"), EXAMPLE_CLUSTER)
        .expect("the example cluster loads")
}

/// The settings the tests use: `cluster.local`, the test listen addresses.
pub fn zone_settings() -> ZoneSettings {
    ZoneSettings {
        domain: "cluster.local".into(),
        ttl: 30,
        negative_ttl: 5,
        ns_addrs: vec![
            IpAddr::V4(Ipv4Addr::new(169, 254, 20, 10)),
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x20, 0, 0, 0, 0, 0x10)),
        ],
        serial: 1234,
    }
}

/// A zone holding `objects`, loaded as a first full list is (one relist per kind), synced.
pub fn zone_from(objects: Vec<ClusterObject>) -> ZoneModel {
    let mut zone = ZoneModel::new(zone_settings());
    for (kind, objects) in by_kind(objects) {
        let changes = zone.diff_relist(kind, objects);
        zone.apply(changes);
    }
    zone.set_synced();
    zone
}

/// A query as a stub resolver sends it: `question` is name (wire format, any case), type and
/// class; `edns` adds an OPT with that UDP size and DO.
pub fn query_bytes(id: u16, flags: u16, question: &[u8], edns: Option<(u16, bool)>) -> Vec<u8> {
    let mut m = Vec::with_capacity(12 + question.len() + 11);
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, edns.is_some() as u8]);
    m.extend_from_slice(question);
    if let Some((size, dnssec_ok)) = edns {
        m.extend_from_slice(&[0, 0, 41]);
        m.extend_from_slice(&size.to_be_bytes());
        m.extend_from_slice(&[0, 0, if dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
    }
    m
}

/// What the XDP program does with a query, per the contract in `dns-common`.
#[derive(Debug, PartialEq, Eq)]
pub enum KernelVerdict {
    /// Passed up to userspace.
    Pass,
    /// Answered with these DNS bytes.
    Reply(Vec<u8>),
}

/// The zone as the kernel sees it: the config fields the program reads.
pub struct KernelZone<'a> {
    pub zone: &'a [u8],
    pub soa_template: &'a [u8; dns_common::SOA_RECORD_LEN],
    pub nodata_flags: u16,
    pub nxdomain_flags: u16,
    /// `CONFIG_NXDOMAIN`: every existing name of the zone is in the maps.
    pub nxdomain: bool,
}

/// Is the zone at a label boundary at the end of `name` (both lowercased wire format)? `Some`
/// with whether the label before it is `pod`, as the program's `zone_suffix`.
pub fn zone_suffix(name: &[u8], zone: &[u8]) -> Option<bool> {
    if zone.len() > name.len() {
        return None;
    }
    let start = name.len() - zone.len();
    let mut i = 0;
    let mut starts = Vec::new();
    while i < name.len() && name[i] != 0 {
        starts.push(i);
        i += 1 + name[i] as usize;
    }
    starts.push(i);
    if !starts.contains(&start) || &name[start..] != zone {
        return None;
    }
    Some(start > 4 && starts.contains(&(start - 4)) && &name[start - 4..start] == b"\x03pod")
}

/// The reply the XDP program builds for a query with no EDNS issues: `qflags` of the query,
/// `question` as received (name in the client's case, type, class), `qname` lowercased, and
/// the value the lookup found (`None`: no entry under either key). Mirrors `answer()` in
/// dns-ebpf/src/main.rs after its parse checks; the blob, if any, holds `blob`.
#[allow(clippy::too_many_arguments)]
pub fn kernel_reply(
    id: u16,
    qflags: u16,
    question: &[u8],
    qname: &[u8],
    value: Option<(&AnswerValue, Option<&[u8]>)>,
    zone: &KernelZone<'_>,
    edns: Option<bool>,
    client_limit: usize,
) -> KernelVerdict {
    let name_len = qname.len();
    let suffix = zone_suffix(qname, zone.zone);
    let (flags, an, ns, ar, data): (u16, u16, u16, u16, Vec<u8>) = match value {
        Some((v, blob)) => match v.action {
            ACTION_ANSWER => {
                let len = v.data_len as usize;
                let data = if v.blob == 0 {
                    assert!(len <= INLINE_DATA_LEN, "inline data of {len} bytes");
                    v.data[..len].to_vec()
                } else {
                    let class_len = match v.blob >> dns_common::BLOB_CLASS_SHIFT {
                        BLOB_CLASS_S => BLOB_S_LEN,
                        BLOB_CLASS_M => BLOB_M_LEN,
                        _ => BLOB_DATA_LEN,
                    };
                    let blob = blob.expect("a blob for a blob id");
                    // The program refuses (and drops, mid-rewrite) a length beyond its class.
                    assert!(len <= class_len, "{len} bytes in a blob of {class_len}");
                    assert_eq!(blob.len(), len, "blob length");
                    blob.to_vec()
                };
                assert_eq!(
                    v.data_csum,
                    csum::fold(csum::add_bytes(0, &data)),
                    "the value's checksum is its bytes'"
                );
                (v.flags, v.ancount, v.nscount, v.arcount, data)
            }
            ACTION_NODATA => {
                if suffix.is_none() {
                    return KernelVerdict::Pass;
                }
                (zone.nodata_flags, 0, 1, 0, soa(zone, name_len))
            }
            ACTION_PASS => return KernelVerdict::Pass,
            other => panic!("unknown action {other}"),
        },
        None => {
            if !zone.nxdomain || suffix != Some(false) {
                return KernelVerdict::Pass;
            }
            (zone.nxdomain_flags, 0, 1, 0, soa(zone, name_len))
        }
    };
    let mut r = Vec::with_capacity(12 + question.len() + data.len() + 11);
    r.extend_from_slice(&id.to_be_bytes());
    r.extend_from_slice(&(FLAG_QR | (qflags & (FLAG_RD | FLAG_CD)) | flags).to_be_bytes());
    r.extend_from_slice(&1u16.to_be_bytes());
    r.extend_from_slice(&an.to_be_bytes());
    r.extend_from_slice(&ns.to_be_bytes());
    r.extend_from_slice(&(ar + edns.is_some() as u16).to_be_bytes());
    r.extend_from_slice(question);
    r.extend_from_slice(&data);
    if let Some(dnssec_ok) = edns {
        r.extend_from_slice(&dns_agent::dns::opt_record(0, dnssec_ok));
    }
    if r.len() > client_limit {
        return KernelVerdict::Pass;
    }
    KernelVerdict::Reply(r)
}

/// The SOA of negative answers as the program fills the template: its three pointers at the
/// zone's offset in the question.
fn soa(zone: &KernelZone<'_>, name_len: usize) -> Vec<u8> {
    let mut r = zone.soa_template.to_vec();
    let ptr = (0xc000u16 | (12 + name_len - zone.zone.len()) as u16).to_be_bytes();
    for off in SOA_PTR_OFFSETS {
        r[off..off + 2].copy_from_slice(&ptr);
    }
    r
}

/// The blob class the agent gives `len` bytes, and that class's size.
pub fn blob_class_len(len: usize) -> (u32, usize) {
    let class = blob_class(len);
    let size = match class {
        BLOB_CLASS_S => BLOB_S_LEN,
        BLOB_CLASS_M => BLOB_M_LEN,
        _ => BLOB_DATA_LEN,
    };
    (class, size)
}
