//! The Pods of this node, for search-path completion (`--autopath`): which namespace each pod
//! address belongs to. From the API, a watch of the Pods whose `spec.nodeName` is this node
//! (`kubernetes::watch_pods`); from a zone file, every `kind: Pod` object.
//!
//! Like CoreDNS's `pods verified`, an address counts only while one namespace claims it: a
//! host-network pod shares the node's address with pods of every namespace, so it is left out,
//! and so are pods that have finished (their address may already be another pod's). An address
//! two pods of different namespaces claim (a reuse the API has not caught up with) belongs to
//! neither until one goes.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::api::core::v1::Pod;

use crate::zone::objects::{FieldError, ObjectKey, is_dns1123_label};

fn field_error(field: &str, problem: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        problem: problem.into(),
    }
}

/// What DNS needs of a Pod: its name, namespace and addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodAddresses {
    pub key: ObjectKey,
    pub ips: Vec<IpAddr>,
}

/// A change to the Pods of the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodChange {
    /// Every Pod of the node, as listed now: what is not here is gone.
    Relist(Vec<PodAddresses>),
    Upsert(PodAddresses),
    Delete(ObjectKey),
}

/// The projection of a Pod; `None` for pods whose address says nothing about their namespace
/// (host network, finished, no address yet).
pub fn project_pod(pod: &Pod) -> Result<Option<PodAddresses>, FieldError> {
    let namespace = pod
        .metadata
        .namespace
        .as_deref()
        .ok_or_else(|| field_error("metadata.namespace", "missing"))?;
    if !is_dns1123_label(namespace) {
        return Err(field_error(
            "metadata.namespace",
            format!("{namespace:?} is not a DNS-1123 label"),
        ));
    }
    let name = pod
        .metadata
        .name
        .as_deref()
        .ok_or_else(|| field_error("metadata.name", "missing"))?;
    let key = ObjectKey::new(namespace, name);
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
    {
        return Ok(None);
    }
    let Some(status) = &pod.status else {
        return Ok(None);
    };
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return Ok(None);
    }
    let mut ips = Vec::new();
    let listed = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
    for (i, text) in listed.chain(status.pod_ip.as_deref()).enumerate() {
        let ip: IpAddr = text.parse().map_err(|_| {
            field_error(
                if i < status.pod_ips.as_ref().map_or(0, Vec::len) {
                    "status.podIPs"
                } else {
                    "status.podIP"
                },
                format!("{text:?} is not an IP address"),
            )
        })?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    if ips.is_empty() {
        return Ok(None);
    }
    Ok(Some(PodAddresses { key, ips }))
}

/// The namespace of every pod address of the node.
#[derive(Debug, Default)]
pub struct PodTable {
    by_key: HashMap<ObjectKey, Vec<IpAddr>>,
    by_ip: HashMap<IpAddr, Vec<ObjectKey>>,
}

impl PodTable {
    /// The namespace of the pod at `ip`, if one namespace claims it.
    pub fn namespace_of(&self, ip: IpAddr) -> Option<Arc<str>> {
        let keys = self.by_ip.get(&ip)?;
        let first = &keys.first()?.namespace;
        keys.iter()
            .all(|k| k.namespace == *first)
            .then(|| first.clone())
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Applies a change; returns the addresses whose namespace may have changed.
    pub fn apply(&mut self, change: PodChange) -> HashSet<IpAddr> {
        let mut touched = HashSet::new();
        match change {
            PodChange::Relist(pods) => {
                let listed: HashSet<ObjectKey> = pods.iter().map(|p| p.key.clone()).collect();
                let gone: Vec<ObjectKey> = self
                    .by_key
                    .keys()
                    .filter(|k| !listed.contains(*k))
                    .cloned()
                    .collect();
                for key in gone {
                    self.remove(&key, &mut touched);
                }
                for pod in pods {
                    self.upsert(pod, &mut touched);
                }
            }
            PodChange::Upsert(pod) => self.upsert(pod, &mut touched),
            PodChange::Delete(key) => self.remove(&key, &mut touched),
        }
        touched
    }

    fn upsert(&mut self, pod: PodAddresses, touched: &mut HashSet<IpAddr>) {
        if self.by_key.get(&pod.key) == Some(&pod.ips) {
            return;
        }
        self.remove(&pod.key, touched);
        for ip in &pod.ips {
            self.by_ip.entry(*ip).or_default().push(pod.key.clone());
            touched.insert(*ip);
        }
        self.by_key.insert(pod.key, pod.ips);
    }

    fn remove(&mut self, key: &ObjectKey, touched: &mut HashSet<IpAddr>) {
        let Some(ips) = self.by_key.remove(key) else {
            return;
        };
        for ip in ips {
            if let Some(keys) = self.by_ip.get_mut(&ip) {
                keys.retain(|k| k != key);
                if keys.is_empty() {
                    self.by_ip.remove(&ip);
                }
            }
            touched.insert(ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, ips: &[&str], extra: serde_json::Value) -> Pod {
        let mut v = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"namespace": ns, "name": name},
            "spec": {"containers": [], "nodeName": "node-1"},
            "status": {
                "phase": "Running",
                "podIP": ips.first(),
                "podIPs": ips.iter().map(|ip| serde_json::json!({"ip": ip})).collect::<Vec<_>>(),
            },
        });
        merge(&mut v, extra);
        serde_json::from_value(v).unwrap()
    }

    fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_pod_projects_to_its_addresses_unless_they_say_nothing() {
        let p = project_pod(&pod(
            "shop",
            "web-0",
            &["10.244.1.7", "fd00::1:7"],
            serde_json::json!({}),
        ))
        .unwrap()
        .unwrap();
        assert_eq!(p.key, ObjectKey::new("shop", "web-0"));
        assert_eq!(p.ips, vec![ip("10.244.1.7"), ip("fd00::1:7")]);
        let host = pod(
            "shop",
            "agent",
            &["192.0.2.10"],
            serde_json::json!({"spec": {"hostNetwork": true}}),
        );
        assert_eq!(project_pod(&host).unwrap(), None, "host network");
        let done = pod(
            "shop",
            "job",
            &["10.244.1.8"],
            serde_json::json!({"status": {"phase": "Succeeded"}}),
        );
        assert_eq!(project_pod(&done).unwrap(), None, "finished");
        let pending = pod("shop", "new", &[], serde_json::json!({}));
        assert_eq!(project_pod(&pending).unwrap(), None, "no address yet");
        let bad = pod("shop", "bad", &["10.244.1.300"], serde_json::json!({}));
        let e = project_pod(&bad).unwrap_err();
        assert!(e.to_string().contains("status.podIPs"), "{e}");
    }

    #[test]
    fn an_address_belongs_to_one_namespace_or_none() {
        let mut t = PodTable::default();
        let a = PodAddresses {
            key: ObjectKey::new("shop", "a"),
            ips: vec![ip("10.244.1.7")],
        };
        let touched = t.apply(PodChange::Relist(vec![a.clone()]));
        assert_eq!(touched, HashSet::from([ip("10.244.1.7")]));
        assert_eq!(t.namespace_of(ip("10.244.1.7")).as_deref(), Some("shop"));
        assert_eq!(t.namespace_of(ip("10.244.1.8")), None);
        // The address reused by a pod of another namespace before the old one's delete.
        let b = PodAddresses {
            key: ObjectKey::new("batch", "b"),
            ips: vec![ip("10.244.1.7")],
        };
        t.apply(PodChange::Upsert(b.clone()));
        assert_eq!(t.namespace_of(ip("10.244.1.7")), None, "claimed twice");
        t.apply(PodChange::Delete(a.key.clone()));
        assert_eq!(t.namespace_of(ip("10.244.1.7")).as_deref(), Some("batch"));
        // A relist is the new truth.
        let touched = t.apply(PodChange::Relist(vec![]));
        assert_eq!(touched, HashSet::from([ip("10.244.1.7")]));
        assert!(t.is_empty());
        assert_eq!(t.namespace_of(ip("10.244.1.7")), None);
    }
}
