//! The zone-file source: edits apply without a restart, through the kernel path; an edit that
//! cannot be used is refused and the last good zone keeps answering.
//!
//! Needs root (`cargo xtask test` runs it).

mod support;

use std::{net::IpAddr, path::Path, time::Duration};

use hickory_proto::rr::RecordType;
use support::{
    Agent, Client, LISTEN_V4, Topology,
    wait::{Want, assert_kernel_answers, await_kernel},
};

/// The source polls the file every second.
const EDIT_DEADLINE: Duration = Duration::from_secs(10);

/// Replaces the file the way a ConfigMap update or a careful editor does: a new file renamed
/// over the old one.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("writing the zone file");
    std::fs::rename(&tmp, path).expect("renaming over the zone file");
}

fn with_service(base: &str, name: &str, ip: &str) -> String {
    format!(
        "{base}\n---\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec: {{clusterIP: {ip}, ports: [{{name: http, port: 80}}]}}\n"
    )
}

#[test]
fn edits_apply_without_a_restart() {
    let topo = Topology::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let zone = dir.path().join("zone.yaml");
    let base = std::fs::read_to_string(support::example_cluster()).expect("example cluster");
    std::fs::write(&zone, &base).expect("writing the zone file");
    let agent = Agent::start(&topo, &zone, &[]);
    let client = Client::new(&topo.pod, IpAddr::V4(LISTEN_V4));
    let pid = agent.pid();
    let name = "late.shop.svc.cluster.local.";
    assert_kernel_answers(&agent, &client, name, RecordType::A, &Want::Nxdomain);

    replace(&zone, &with_service(&base, "late", "10.96.70.1"));
    await_kernel(
        &agent,
        &client,
        name,
        RecordType::A,
        Want::Records(&["A 10.96.70.1"]),
        EDIT_DEADLINE,
    );

    // Edited in place (same size: only the contents and the time change).
    std::fs::write(&zone, with_service(&base, "late", "10.96.70.2")).expect("editing");
    await_kernel(
        &agent,
        &client,
        name,
        RecordType::A,
        Want::Records(&["A 10.96.70.2"]),
        EDIT_DEADLINE,
    );

    // A broken edit is refused; the last good zone keeps answering.
    replace(&zone, &with_service(&base, "late", "10.96.70.300"));
    support::wait::eventually("the refusal logged", EDIT_DEADLINE, || {
        agent
            .log()
            .contains("zone file changed but cannot be used")
            .then_some(())
    });
    assert_kernel_answers(
        &agent,
        &client,
        name,
        RecordType::A,
        &Want::Records(&["A 10.96.70.2"]),
    );

    // Removing the object removes its names.
    replace(&zone, &base);
    await_kernel(
        &agent,
        &client,
        name,
        RecordType::A,
        Want::Nxdomain,
        EDIT_DEADLINE,
    );
    assert_kernel_answers(
        &agent,
        &client,
        "web.shop.svc.cluster.local.",
        RecordType::A,
        &Want::Records(&["A 10.96.10.20"]),
    );
    assert_eq!(agent.pid(), pid, "the same process all along");
}
