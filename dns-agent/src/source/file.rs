//! A zone file: the Kubernetes objects of a cluster as YAML (several documents, or
//! `kind: List`), and optionally the kube-dns ConfigMap. Edits apply without a restart. Pods
//! in it count as this node's, for search-path completion (`--autopath`).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::api::{
    core::v1::{ConfigMap, Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::mpsc;

use super::{
    SourceEvent,
    pods::{self, PodAddresses, PodChange},
};
use crate::zone::objects::{self, ClusterObject};

/// What a zone file holds: the zone's objects, and Pods.
#[derive(Debug, Default)]
pub struct ZoneFile {
    pub objects: Vec<ClusterObject>,
    pub pods: Vec<PodAddresses>,
}

/// A zone file that cannot be used, with the place and field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ZoneFileError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: document {doc}: not YAML: {source}")]
    Yaml {
        path: PathBuf,
        doc: usize,
        #[source]
        // Boxed: the parser's error carries its source snippet and is large.
        source: Box<serde_saphyr::Error>,
    },
    #[error("{path}: document {doc}{item}: {problem}")]
    Object {
        path: PathBuf,
        doc: usize,
        item: String,
        problem: String,
    },
}

/// Reads and checks a zone file: the zone's objects.
pub fn load(path: &Path) -> Result<Vec<ClusterObject>, ZoneFileError> {
    Ok(load_file(path)?.objects)
}

/// Reads and checks a zone file: the zone's objects and its Pods.
pub fn load_file(path: &Path) -> Result<ZoneFile, ZoneFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ZoneFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_file(path, &text)
}

/// The zone's objects of a zone file's text.
pub fn parse(path: &Path, text: &str) -> Result<Vec<ClusterObject>, ZoneFileError> {
    Ok(parse_file(path, text)?.objects)
}

/// Documents are numbered as the YAML reader yields them: empty documents (a stray `---`) are
/// skipped and not counted.
pub fn parse_file(path: &Path, text: &str) -> Result<ZoneFile, ZoneFileError> {
    let mut out = ZoneFile::default();
    let mut reader = std::io::Cursor::new(text.as_bytes());
    // Each document as a generic tree first: the `kind` picks the Kubernetes type, and errors
    // can name the object before its schema is checked.
    for (i, doc) in serde_saphyr::read::<_, Value>(&mut reader).enumerate() {
        let doc_no = i + 1;
        let value = doc.map_err(|source| ZoneFileError::Yaml {
            path: path.to_path_buf(),
            doc: doc_no,
            source: Box::new(source),
        })?;
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        if kind == "List" {
            let items = value
                .get("items")
                .and_then(|i| i.as_array())
                .cloned()
                .unwrap_or_default();
            for (j, item) in items.into_iter().enumerate() {
                object(path, doc_no, &format!(" items[{j}]"), item, &mut out)?;
            }
        } else {
            object(path, doc_no, "", value, &mut out)?;
        }
    }
    Ok(out)
}

fn object(
    path: &Path,
    doc: usize,
    item: &str,
    value: Value,
    out: &mut ZoneFile,
) -> Result<(), ZoneFileError> {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or("")
        .to_string();
    let meta = |v: &Value, key: &str| {
        v.get("metadata")
            .and_then(|m| m.get(key))
            .and_then(|n| n.as_str())
            .map(str::to_string)
    };
    let label = match (meta(&value, "namespace"), meta(&value, "name")) {
        (Some(ns), Some(n)) => format!("{ns}/{n}"),
        (None, Some(n)) => n,
        _ => "<unnamed>".to_string(),
    };
    let fail = |problem: String| ZoneFileError::Object {
        path: path.to_path_buf(),
        doc,
        item: format!("{item} ({kind} {label})"),
        problem,
    };
    fn typed<T: DeserializeOwned>(v: Value) -> Result<T, String> {
        serde_json::from_value(v).map_err(|e| format!("does not match the Kubernetes schema: {e}"))
    }
    let projected = match kind.as_str() {
        "Namespace" => Some(objects::project_namespace(
            &typed::<Namespace>(value).map_err(&fail)?,
        )),
        "Service" => Some(objects::project_service(
            &typed::<Service>(value).map_err(&fail)?,
        )),
        "EndpointSlice" => {
            objects::project_slice(&typed::<EndpointSlice>(value).map_err(&fail)?).transpose()
        }
        "ConfigMap" => {
            objects::project_config_map(&typed::<ConfigMap>(value).map_err(&fail)?).transpose()
        }
        "Pod" => {
            let pod = typed::<Pod>(value).map_err(&fail)?;
            if let Some(p) = pods::project_pod(&pod).map_err(|e| fail(e.to_string()))? {
                out.pods.push(p);
            }
            return Ok(());
        }
        "" => return Err(fail("no `kind`".to_string())),
        other => {
            return Err(fail(format!(
                "kind {other:?} is not one a zone file holds (Namespace, Service, EndpointSlice, \
                 ConfigMap, Pod, List)"
            )));
        }
    };
    match projected {
        Some(Ok(o)) => out.objects.push(o),
        Some(Err(e)) => return Err(fail(e.to_string())),
        None => {
            tracing::debug!(%kind, %label, "object has no DNS meaning (FQDN slice, no service label, or a ConfigMap other than kube-system/kube-dns)")
        }
    }
    Ok(())
}

/// Sends the file's objects as one relist per kind, then `Synced`; afterwards polls the file
/// and sends a relist whenever its contents change. A broken edit is reported and skipped:
/// the zone keeps the last good contents.
pub async fn run(path: PathBuf, initial: ZoneFile, tx: mpsc::Sender<SourceEvent>, poll: Duration) {
    let mut last = fingerprint(&path);
    if send_relists(&tx, initial).await.is_err() || tx.send(SourceEvent::Synced).await.is_err() {
        return;
    }
    loop {
        tokio::time::sleep(poll).await;
        let now = fingerprint(&path);
        if now == last {
            continue;
        }
        last = now;
        match load_file(&path) {
            Ok(file) => {
                tracing::info!(path = %path.display(), objects = file.objects.len(), pods = file.pods.len(), "zone file changed; applying");
                if send_relists(&tx, file).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "zone file changed but cannot be used; keeping the last good zone")
            }
        }
    }
}

async fn send_relists(tx: &mpsc::Sender<SourceEvent>, file: ZoneFile) -> Result<(), ()> {
    let seen = Instant::now();
    tx.send(SourceEvent::Pods(PodChange::Relist(file.pods)))
        .await
        .map_err(|_| ())?;
    let by_kind = objects::by_kind(file.objects);
    for (kind, objects) in by_kind {
        tx.send(SourceEvent::Relist {
            kind,
            objects,
            seen,
        })
        .await
        .map_err(|_| ())?;
    }
    Ok(())
}

/// Size, modification time and contents hash: a ConfigMap update swaps a symlink, an editor
/// may keep the size; any of them changing means a reload.
fn fingerprint(path: &Path) -> Option<(u64, SystemTime, u64)> {
    use std::hash::{Hash, Hasher};
    let meta = std::fs::metadata(path).ok()?;
    let bytes = std::fs::read(path).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    Some((meta.len(), meta.modified().ok()?, h.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_and_lists() {
        let text = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: shop}
  spec: {clusterIP: 10.96.1.1, ports: [{name: http, port: 80}]}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
  addressType: IPv4
  endpoints: [{addresses: [10.1.0.1]}]
---
";
        let objects = parse(Path::new("z.yaml"), text).unwrap();
        assert_eq!(objects.len(), 3);
    }

    #[test]
    fn the_kube_dns_config_map_is_read_and_other_config_maps_are_not() {
        let text = "\
kind: ConfigMap
metadata: {name: kube-dns, namespace: kube-system}
data:
  upstreamNameservers: '[\"192.0.2.53\"]'
---
kind: ConfigMap
metadata: {name: coredns, namespace: kube-system}
data: {Corefile: '.:53 {}'}
";
        let objects = parse(Path::new("z.yaml"), text).unwrap();
        assert_eq!(
            objects,
            [ClusterObject::KubeDnsConfig(objects::KubeDnsConfigData {
                stub_domains: None,
                upstream_nameservers: Some("[\"192.0.2.53\"]".into()),
            })]
        );
    }

    #[test]
    fn errors_name_document_object_and_field() {
        let text = "\
kind: Namespace
metadata: {name: shop}
---
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.1.300}
";
        let err = parse(Path::new("z.yaml"), text).unwrap_err().to_string();
        assert_eq!(
            err,
            "z.yaml: document 2 (Service shop/web): spec.clusterIP: \"10.96.1.300\" is not an IP address"
        );
        let err = parse(
            Path::new("z.yaml"),
            "kind: Deployment\nmetadata: {name: p}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("kind \"Deployment\" is not one a zone file holds"),
            "{err}"
        );
        let err = parse(
            Path::new("z.yaml"),
            "kind: Service\nmetadata: {name: x}\nspec: {ports: 7}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("does not match the Kubernetes schema"),
            "{err}"
        );
    }
}
