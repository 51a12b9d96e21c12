//! Where the cluster's objects come from: the Kubernetes API, or a zone file of the same
//! objects. Both send the same events to the zone.

pub mod file;
pub mod kubernetes;
pub mod pods;

use std::{sync::Arc, time::Instant};

use crate::zone::objects::{ClusterObject, Kind, ObjectKey};

/// What a source tells the zone.
#[derive(Debug)]
pub enum SourceEvent {
    /// Every object of a kind, as listed now: what is not here is gone.
    Relist {
        kind: Kind,
        objects: Vec<ClusterObject>,
        seen: Instant,
    },
    /// One object added or changed.
    Upsert {
        object: ClusterObject,
        seen: Instant,
    },
    /// One object deleted.
    Delete {
        kind: Kind,
        key: ObjectKey,
        seen: Instant,
    },
    DeleteNamespace {
        name: Arc<str>,
        seen: Instant,
    },
    /// The Pods of this node changed (search-path completion).
    Pods(pods::PodChange),
    /// Every kind has been listed: the zone is complete and may answer.
    Synced,
    /// The source lost (false) or regained (true) its connection.
    Connected(bool),
}
