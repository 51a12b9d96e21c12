//! Kubernetes watch events (JSON, as the API server sends them) projected and applied to the
//! example cluster's zone, one at a time, as the agent's zone task does. Besides never
//! panicking: every name whose kernel entries a change alters must be among the names the
//! change says it touches, or the kernel keeps a stale answer (the agent rewrites only those).
#![no_main]

use std::collections::BTreeSet;

use dns_agent::zone::{
    Change, ZoneModel,
    name::WireName,
    objects::{self, Kind, ObjectKey},
};
use k8s_openapi::api::{
    core::v1::{Namespace, Service},
    discovery::v1::EndpointSlice,
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// The change a watch event makes, as `source/kubernetes.rs` maps it: an object that does not
/// project is treated as deleted.
fn change_of(event: &Value) -> Option<Change> {
    let deleted = event.get("type")?.as_str()? == "DELETED";
    let object = event.get("object")?;
    let meta = |key: &str| {
        object
            .get("metadata")
            .and_then(|m| m.get(key))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let removal = |kind: Kind, name: Option<String>, ns: Option<String>| match kind {
        Kind::Namespace => Change::DeleteNamespace(name.unwrap_or_default().into()),
        _ => Change::Delete(
            kind,
            ObjectKey::new(
                ns.as_deref().unwrap_or("default"),
                &name.unwrap_or_default(),
            ),
        ),
    };
    let (kind, projected) = match object.get("kind")?.as_str()? {
        "Namespace" => {
            let o: Namespace = serde_json::from_value(object.clone()).ok()?;
            (Kind::Namespace, objects::project_namespace(&o).map(Some))
        }
        "Service" => {
            let o: Service = serde_json::from_value(object.clone()).ok()?;
            (Kind::Service, objects::project_service(&o).map(Some))
        }
        "EndpointSlice" => {
            let o: EndpointSlice = serde_json::from_value(object.clone()).ok()?;
            (Kind::EndpointSlice, objects::project_slice(&o))
        }
        _ => return None,
    };
    let (name, ns) = (meta("name"), meta("namespace"));
    Some(match projected {
        Ok(Some(o)) if !deleted => Change::Upsert(o),
        _ => removal(kind, name, ns),
    })
}

/// What the kernel holds when it was loaded with every name of `zone`.
fn held(zone: &ZoneModel, name: &WireName, all: &BTreeSet<WireName>) -> Vec<(u16, String)> {
    if !all.contains(name) {
        return Vec::new();
    }
    let mut e: Vec<(u16, String)> = zone
        .kernel_entries(name)
        .into_iter()
        .map(|(t, a)| (t, format!("{a:?}")))
        .collect();
    e.sort();
    e
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let events = match input {
        Value::Array(events) => events,
        event => vec![event],
    };
    let changes: Vec<Change> = events.iter().take(16).filter_map(change_of).collect();
    if changes.is_empty() {
        return;
    }
    // Two copies of the zone: `before` stays one change behind `after`.
    let mut before = xdns_fuzz::zone_from(xdns_fuzz::example_objects());
    let mut after = xdns_fuzz::zone_from(xdns_fuzz::example_objects());
    for change in changes {
        let touched = before.touched(std::slice::from_ref(&change));
        after.apply([change.clone()]);
        let all_before = before.all_names();
        let all_after = after.all_names();
        for name in all_before.union(&all_after) {
            let old = held(&before, name, &all_before);
            let new = held(&after, name, &all_after);
            assert!(
                old == new || touched.contains(name),
                "{change:?} changes {} ({old:?} -> {new:?}) without touching it",
                dns_agent::zone::name::to_text(name)
            );
        }
        // The sync writes every touched name's entries: they must be what a full load of the
        // new state would write.
        for name in &touched {
            let mut written = held(&after, name, &BTreeSet::from([name.clone()]));
            written.sort();
            assert_eq!(
                written,
                held(&after, name, &all_after),
                "{change:?}: {} is written, but a full load would not hold it so",
                dns_agent::zone::name::to_text(name)
            );
        }
        before.apply([change]);
    }
});
