//! deploy/daemonset.yaml against the agent it runs: every argument is a flag of `dns-agent run`
//! (parsed by the agent's own command line parser, then checked as the agent checks it at
//! start), the placeholder the operator fills is refused until filled, and the documented
//! listen-address variant is a configuration the agent accepts. What the schema validation of
//! `cargo xtask test` cannot see (the API server's own rules) is checked here too.
//!
//! No root needed.

use std::{net::IpAddr, path::Path};

use clap::Parser as _;
use dns_agent::config::{Cli, Command, RunArgs};

/// What the operator puts in place of the placeholder: here, a documentation address.
const CLUSTER_IP: &str = "198.51.100.10";
const PLACEHOLDER: &str = "KUBE_DNS_CLUSTER_IP";

fn daemonset_text() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml"))
        .expect("deploy/daemonset.yaml")
}

fn agent_container(text: &str) -> serde_json::Value {
    let ds: serde_json::Value = serde_saphyr::from_str(text).expect("the DaemonSet parses");
    ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == "agent")
        .expect("a container named agent")
        .clone()
}

fn args_of(container: &serde_json::Value) -> Vec<String> {
    container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arguments").to_string())
        .collect()
}

fn parse_run(args: &[String]) -> Result<RunArgs, clap::Error> {
    let argv = std::iter::once("dns-agent".to_string()).chain(args.iter().cloned());
    match Cli::try_parse_from(argv)?.command {
        Command::Run(run) => Ok(run),
        other => panic!("the DaemonSet runs `dns-agent run`, not {other:?}"),
    }
}

/// The documented step: `sed "s/KUBE_DNS_CLUSTER_IP/$ip/" deploy/daemonset.yaml`.
fn filled(text: &str) -> String {
    text.replace(PLACEHOLDER, CLUSTER_IP)
}

#[test]
fn the_daemonsets_arguments_are_flags_the_agent_takes() {
    let text = daemonset_text();
    // The steps the file documents are the ones this test applies.
    assert!(
        text.contains("kubectl -n kube-system get svc kube-dns -o jsonpath='{.spec.clusterIP}'")
            && text.contains(&format!(
                "sed \"s/{PLACEHOLDER}/$ip/\" deploy/daemonset.yaml"
            )),
        "the DaemonSet says how to find and fill in the cluster IP"
    );
    let args = args_of(&agent_container(&filled(&text)));
    assert_eq!(args[0], "run");
    let run = parse_run(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let config = run
        .validate_with(true)
        .unwrap_or_else(|e| panic!("the agent refuses the DaemonSet's {args:?}: {e}"));
    let ip: IpAddr = CLUSTER_IP.parse().unwrap();
    assert_eq!(config.args.intercept, vec![ip], "intercept mode");
    assert_eq!(
        config.args.listen,
        vec!["169.254.20.10".parse::<IpAddr>().unwrap()],
        "the agent's own steering target"
    );
    assert!(
        !config.args.interface_patterns.is_empty(),
        "attached to pod veths as they come"
    );
    assert!(
        config.args.upstreams.is_empty(),
        "no --upstream in intercept mode"
    );
}

#[test]
fn the_placeholder_left_unfilled_stops_the_agent_naming_the_flag() {
    let args = args_of(&agent_container(&daemonset_text()));
    assert_eq!(
        args.iter().filter(|a| a.contains(PLACEHOLDER)).count(),
        1,
        "one value to fill in: {args:?}"
    );
    let e = parse_run(&args).expect_err("an unfilled placeholder is no address");
    let shown = e.to_string();
    assert!(
        shown.contains("--intercept") && shown.contains(PLACEHOLDER),
        "{shown}"
    );
}

/// The README and the DaemonSet's comment: listen-address mode is the same DaemonSet without
/// --intercept, with --upstream to the cluster's DNS Service if wanted.
#[test]
fn the_listen_address_variant_is_accepted() {
    let args: Vec<String> = args_of(&agent_container(&filled(&daemonset_text())))
        .into_iter()
        .filter(|a| !a.starts_with("--intercept"))
        .chain([format!("--upstream={CLUSTER_IP}")])
        .collect();
    let config = parse_run(&args)
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
        .validate_with(true)
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(config.args.intercept.is_empty());
    assert!(
        matches!(
            &config.routes.default,
            dns_agent::server::routing::DefaultUpstreams::Flags(u) if u.len() == 1
        ),
        "{:?}",
        config.routes.default
    );
}

/// Rules the API server applies beyond the schema, which `kubernetes-validate` cannot check.
#[test]
fn the_api_servers_own_rules_hold() {
    let agent = agent_container(&filled(&daemonset_text()));
    let security = &agent["securityContext"];
    let privileged = security["privileged"] == serde_json::json!(true);
    for mount in agent["volumeMounts"].as_array().expect("volumeMounts") {
        assert!(
            privileged || mount["mountPropagation"] != "Bidirectional",
            "Bidirectional mount propagation is only allowed in privileged containers: {mount}"
        );
    }
    if security["allowPrivilegeEscalation"] == serde_json::json!(false) {
        assert!(
            !privileged,
            "allowPrivilegeEscalation false and privileged true are refused together"
        );
        let added = security["capabilities"]["add"]
            .as_array()
            .expect("capabilities.add");
        assert!(
            !added
                .iter()
                .any(|c| c == "SYS_ADMIN" || c == "CAP_SYS_ADMIN"),
            "allowPrivilegeEscalation false and CAP_SYS_ADMIN are refused together"
        );
    }
}
