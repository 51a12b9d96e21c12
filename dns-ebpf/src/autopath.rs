//! Search-path completion (CoreDNS `autopath`). A pod with the Kubernetes `resolv.conf` asks
//! `<name>.<ns>.svc.<zone>` first, `<ns>` being its own namespace; when that name does not
//! exist, the answer is what the rest of the search path (`svc.<zone>`, `<zone>`, the bare
//! name) completes it to, with a CNAME from the asked name in front. The agent completes such a
//! name when it first sees it and keeps the completed answer in the cache maps under the asked
//! name (variant `CACHE_AUTOPATH`); `lookup.rs` serves it from there. This module answers the
//! question before that: is this query's name under the first search element of the asking
//! pod's namespace? The pod's namespace comes from its address (`XDNS_PODS`, the Pods of this
//! node); a query from an address of no known pod is answered as without autopath.

use aya_ebpf::programs::XdpContext;
use dns_common::{PodKey, ZoneConfig};

use crate::{
    maps::{PODS, Scratch},
    packet::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPV4_HLEN, at, bounded, ptr_at, read_be16},
};

/// `svc` as a label: its length byte and letters.
const SVC_LABEL: [u8; 4] = [3, b's', b'v', b'c'];

/// Is the query's name (in the key buffer, `name_len` bytes, ending with the zone) under
/// `<ns>.svc.<zone>` with at least one label before, `<ns>` the asking pod's namespace?
#[inline(always)]
pub fn asked_under_own_namespace(
    ctx: &XdpContext,
    scratch: &mut Scratch,
    config: &ZoneConfig,
    name_len: usize,
) -> bool {
    let zone_len = config.zone_len as usize;
    // The caller checked that the name ends with the zone, at a label start.
    let zone_start = bounded(name_len.wrapping_sub(zone_len), 0xff);
    if zone_start < SVC_LABEL.len() + 3 {
        return false;
    }
    let svc = zone_start - SVC_LABEL.len();
    let name_at = |s: &Scratch, i: usize| at(&s.key.name, i);
    if !label_starts_at(scratch, svc)
        || name_at(scratch, svc) != SVC_LABEL[0]
        || name_at(scratch, svc + 1) != SVC_LABEL[1]
        || name_at(scratch, svc + 2) != SVC_LABEL[2]
        || name_at(scratch, svc + 3) != SVC_LABEL[3]
    {
        return false;
    }
    if !pod_namespace(ctx, scratch) {
        return false;
    }
    let ns_len = scratch.pod_ns[0] as usize;
    // At least one label before the namespace: a length byte and one letter.
    if ns_len == 0 || ns_len > 63 || svc < ns_len + 1 + 2 {
        return false;
    }
    let ns_start = bounded(svc - ns_len - 1, 0xff);
    if !label_starts_at(scratch, ns_start) || name_at(scratch, ns_start) as usize != ns_len {
        return false;
    }
    let mut j = 1;
    while j < 64 {
        if j > ns_len {
            break;
        }
        if name_at(scratch, ns_start + j) != at(&scratch.pod_ns, j) {
            return false;
        }
        j += 1;
    }
    true
}

#[inline(always)]
fn label_starts_at(scratch: &Scratch, off: usize) -> bool {
    let word = at(&scratch.label_starts, off >> 6);
    word & (1u64 << (off & 63)) != 0
}

/// Copies the namespace of the pod that sent the query into `Scratch::pod_ns`; false when its
/// address is no known pod's. The element is looked up again after the copy: one handed to
/// another pod meanwhile (a deleted element's memory goes to the next insert) does not count.
#[inline(always)]
// The key stays in the scratch map: by value it would be one more copy on the BPF stack.
#[allow(clippy::needless_borrows_for_generic_args)]
fn pod_namespace(ctx: &XdpContext, scratch: &mut Scratch) -> bool {
    scratch.pod_key = PodKey {
        addr: [0; 16],
        family: 0,
        _pad: [0; 3],
    };
    match read_be16(ctx, 12) {
        Some(ETH_P_IP) => {
            let Some(ip) = ptr_at::<[u8; IPV4_HLEN]>(ctx, ETH_HLEN) else {
                return false;
            };
            // SAFETY: bounds checked by ptr_at.
            let ip = unsafe { &*ip };
            scratch.pod_key.addr[..4].copy_from_slice(&ip[12..16]);
            scratch.pod_key.family = 4;
        }
        Some(ETH_P_IPV6) => {
            let Some(ip) = ptr_at::<[u8; 40]>(ctx, ETH_HLEN) else {
                return false;
            };
            // SAFETY: bounds checked by ptr_at.
            let ip = unsafe { &*ip };
            scratch.pod_key.addr.copy_from_slice(&ip[8..24]);
            scratch.pod_key.family = 6;
        }
        _ => return false,
    }
    let Some(p) = PODS.get_ptr(&scratch.pod_key) else {
        return false;
    };
    // SAFETY: a value of this run's lookup, 64 bytes; volatile word copies (see `lookup.rs`).
    unsafe {
        let from = p.cast::<u64>();
        let to = scratch.pod_ns.as_mut_ptr().cast::<u64>();
        let mut w = 0;
        while w < 8 {
            to.add(w).write_volatile(from.add(w).read_volatile());
            w += 1;
        }
    }
    PODS.get_ptr(&scratch.pod_key) == Some(p)
}
