//! Where names outside the cluster go: the forwarder's routes, made from the command line, the
//! kube-dns ConfigMap and the kube-dns Service's endpoints, and kept in step with the last two
//! as they change.
//!
//! Precedence, as NodeLocal DNSCache has it for the ConfigMap:
//! - **default upstreams** (every name no stub domain covers): `--upstream`; else the
//!   ConfigMap's `upstreamNameservers`; else, in intercept mode, the ready endpoints of the
//!   Service whose cluster IP is intercepted (kube-dns), on its `dns` UDP port; else the
//!   nameservers of `/etc/resolv.conf`.
//! - **stub domains**: the ConfigMap's `stubDomains` and `--stub-domain`; for a domain named in
//!   both, the flag's addresses. A name goes to the longest stub domain at or above it.
//!
//! A ConfigMap that cannot be used (not JSON, a bad address, a domain inside the cluster zone)
//! is refused as a whole, logged and counted; the settings of the last good one stay. Every
//! upstream, wherever it is named, passes the same checks ([`UpstreamRules`]): never the agent
//! itself, never an intercepted address.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering::Relaxed},
};

use super::{
    forward::{Forwarder, RouteSpec, SetSpec, UpstreamSetId},
    upstream::{DNS_PORT, Upstream},
};
use crate::{
    metrics::Metrics,
    zone::{
        ZoneModel,
        name::{WireName, wire_from_dotted},
        objects::{KUBE_DNS_CONFIG_MAP, KubeDnsConfigData, Port, Protocol},
    },
};

/// The name of the kube-dns Service's DNS port in its EndpointSlices (kubeadm's and every
/// CoreDNS chart's).
pub const DNS_PORT_NAME: &str = "dns";

/// Where the default upstreams come from, by the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DefaultUpstreams {
    /// `--upstream`: fixed; the ConfigMap's `upstreamNameservers` does not override them.
    Flags(Vec<Upstream>),
    /// Intercept mode without `--upstream`: the ready endpoints of the intercepted Service,
    /// followed live.
    KubeDnsEndpoints,
    /// Neither: the nameservers of `/etc/resolv.conf`, read at start.
    ResolvConf(Vec<Upstream>),
}

/// A stub domain: names at or below `domain` go to `upstreams`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StubDomain {
    /// Lowercased wire format.
    pub domain: WireName,
    /// Lowercased, dotted, without the root's dot: as logs show it.
    pub name: String,
    pub upstreams: Vec<Upstream>,
}

/// What the command line says about the routes.
#[derive(Clone, Debug)]
pub struct RouteFlags {
    pub default: DefaultUpstreams,
    /// `--stub-domain`s.
    pub stub_domains: Vec<StubDomain>,
    /// The checks every upstream passes, the kube-dns ConfigMap's too.
    pub rules: UpstreamRules,
    /// `--intercept`: the kube-dns Service's cluster IPs.
    pub intercept: Vec<IpAddr>,
}

/// The checks every upstream and stub domain passes, wherever it is named (flags or ConfigMap).
#[derive(Clone, Debug)]
pub struct UpstreamRules {
    listen: Vec<IpAddr>,
    intercept: Vec<IpAddr>,
    cluster_domain: String,
    cluster_zone: WireName,
}

impl UpstreamRules {
    /// `cluster_domain` lowercased, without the trailing dot (as the command line checks it).
    pub fn new(listen: &[IpAddr], intercept: &[IpAddr], cluster_domain: &str) -> Self {
        Self {
            listen: listen.to_vec(),
            intercept: intercept.to_vec(),
            cluster_domain: cluster_domain.to_string(),
            cluster_zone: wire_from_dotted(cluster_domain),
        }
    }

    /// An upstream the agent may forward to: not one of its own listen addresses (a loop), not
    /// an intercepted address (the agent answers that address itself).
    pub fn check_upstream(&self, u: &Upstream) -> Result<(), String> {
        let addr = u.addr();
        if !u.is_tls() && addr.port() == DNS_PORT && self.listen.contains(&addr.ip()) {
            return Err(format!(
                "{u} is one of this agent's own listen addresses: queries would loop"
            ));
        }
        if self.intercept.contains(&addr.ip()) {
            return Err(format!(
                "{u} is an intercepted address (--intercept), which this agent answers itself; \
                 name the resolvers behind it (in intercept mode the kube-dns Service's \
                 endpoints are the default upstreams already)"
            ));
        }
        Ok(())
    }

    /// A stub domain as written (trailing dot optional, any case): its wire form and its
    /// dotted name. Refused: the root and empty names (default upstreams cover every name),
    /// malformed names, and the cluster domain and everything below it, which the agent
    /// answers from the cluster's objects (in the kernel too, NXDOMAIN included), so a stub
    /// domain there would never be asked.
    pub fn stub_domain(&self, s: &str) -> Result<(WireName, String), String> {
        let name = s.trim().trim_end_matches('.').to_ascii_lowercase();
        if name.is_empty() {
            return Err(if s.trim() == "." {
                "the root domain covers every name: that is what the default upstreams are for \
                 (--upstream, or upstreamNameservers)"
                    .to_string()
            } else {
                "empty domain: give the domain whose names go to these upstreams, e.g. \
                 corp.example"
                    .to_string()
            });
        }
        let labels_ok = name.len() <= 253
            && name.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
            });
        if !labels_ok {
            return Err(format!(
                "{s:?} is not a domain name (labels of letters, digits, '-' or '_', e.g. \
                 corp.example or 10.in-addr.arpa)"
            ));
        }
        let wire = wire_from_dotted(&name);
        if wire.ends_with(&self.cluster_zone) && at_label_boundary(&wire, &self.cluster_zone) {
            return Err(format!(
                "{name} is at or below the cluster domain {}: the agent answers those names \
                 from the cluster's objects (the kernel answers their NXDOMAINs), so a stub \
                 domain there would never be asked; give a domain outside it",
                self.cluster_domain
            ));
        }
        Ok((wire, name))
    }
}

/// Is `suffix` (a suffix of `wire`) a whole number of labels of it: `local` of
/// `cluster.local`, not `al` of `cluster.local`?
fn at_label_boundary(wire: &[u8], suffix: &[u8]) -> bool {
    let start = wire.len() - suffix.len();
    let mut at = 0;
    while at < start {
        at += 1 + wire[at] as usize;
    }
    at == start
}

/// The kube-dns ConfigMap's settings, checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubeDnsConfig {
    pub stub_domains: Vec<StubDomain>,
    pub upstream_nameservers: Vec<Upstream>,
}

/// Why the kube-dns ConfigMap is refused, naming the key (and entry) at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("ConfigMap {}/{}: {field}: {problem}", KUBE_DNS_CONFIG_MAP.0, KUBE_DNS_CONFIG_MAP.1)]
pub struct KubeDnsConfigError {
    pub field: String,
    pub problem: String,
}

impl KubeDnsConfig {
    /// The two keys as kube-dns defined them: `stubDomains`, a JSON object of domain to list
    /// of addresses; `upstreamNameservers`, a JSON list of addresses. Addresses in every form
    /// [`Upstream::parse`] takes (`tls://` included). An absent or blank key is no setting.
    pub fn parse(
        data: &KubeDnsConfigData,
        rules: &UpstreamRules,
    ) -> Result<Self, KubeDnsConfigError> {
        let fail = |field: String, problem: String| KubeDnsConfigError { field, problem };
        let mut config = Self::default();
        if let Some(text) = present(&data.stub_domains) {
            let field = "data.stubDomains".to_string();
            let domains: BTreeMap<String, Vec<String>> =
                serde_json::from_str(text).map_err(|e| {
                    fail(
                        field.clone(),
                        format!(
                            "not a JSON object of domain to list of addresses, such as \
                             {{\"corp.example\": [\"192.0.2.53\"]}}: {e}"
                        ),
                    )
                })?;
            for (domain, addresses) in domains {
                let field = format!("{field}[{domain:?}]");
                let (wire, name) = rules
                    .stub_domain(&domain)
                    .map_err(|e| fail(field.clone(), e))?;
                if config.stub_domains.iter().any(|s| s.domain == wire) {
                    return Err(fail(field, format!("{name} is given twice")));
                }
                if addresses.is_empty() {
                    return Err(fail(field, "no address".to_string()));
                }
                let upstreams = upstream_list(&addresses, rules, &field)?;
                config.stub_domains.push(StubDomain {
                    domain: wire,
                    name,
                    upstreams,
                });
            }
        }
        if let Some(text) = present(&data.upstream_nameservers) {
            let field = "data.upstreamNameservers".to_string();
            let addresses: Vec<String> = serde_json::from_str(text).map_err(|e| {
                fail(
                    field.clone(),
                    format!("not a JSON list of addresses, such as [\"192.0.2.53\"]: {e}"),
                )
            })?;
            config.upstream_nameservers = upstream_list(&addresses, rules, &field)?;
        }
        Ok(config)
    }
}

fn upstream_list(
    addresses: &[String],
    rules: &UpstreamRules,
    field: &str,
) -> Result<Vec<Upstream>, KubeDnsConfigError> {
    addresses
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let fail = |problem: String| KubeDnsConfigError {
                field: format!("{field}[{i}]"),
                problem,
            };
            let u = Upstream::parse(a).map_err(|e| fail(e.to_string()))?;
            rules.check_upstream(&u).map_err(fail)?;
            Ok(u)
        })
        .collect()
}

/// A key's value, unless absent or blank.
fn present(v: &Option<Box<str>>) -> Option<&str> {
    v.as_deref().filter(|t| !t.trim().is_empty())
}

/// The set of the kube-dns Service's endpoints: one set however its pods roll.
const KUBE_DNS_SET: &str = "kube-dns endpoints";

/// The forwarder's routes and what they are made of; fed by the zone task with ConfigMap
/// versions and zone changes.
pub struct Routing {
    forwarder: Arc<Forwarder>,
    metrics: Arc<Metrics>,
    flags: RouteFlags,
    /// The ConfigMap as last seen (`None`: absent), so that an unchanged one costs nothing.
    seen: Option<KubeDnsConfigData>,
    /// The settings of the last ConfigMap that could be used (empty: none).
    config: KubeDnsConfig,
    /// The kube-dns Service's ready endpoints, on its DNS port.
    kube_dns: Vec<SocketAddr>,
    /// The zone has been loaded once (before, a missing endpoint may only be late).
    zone_loaded: bool,
    /// "No ready endpoint" has been logged, and no endpoint has come since.
    said_empty: bool,
    in_force: Option<RouteSpec>,
}

impl Routing {
    /// The routes of the command line, and of the kube-dns ConfigMap in the source's first
    /// load (a zone file's), put in force. A malformed ConfigMap there is refused with the
    /// file: at start there are no older settings to keep.
    pub fn start(
        flags: RouteFlags,
        initial: Option<&KubeDnsConfigData>,
        forwarder: Arc<Forwarder>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, KubeDnsConfigError> {
        let config = initial
            .map(|d| KubeDnsConfig::parse(d, &flags.rules))
            .transpose()?
            .unwrap_or_default();
        let mut routing = Self {
            forwarder,
            metrics,
            flags,
            seen: initial.cloned(),
            config,
            kube_dns: Vec::new(),
            zone_loaded: false,
            said_empty: false,
            in_force: None,
        };
        routing.log_overrides();
        routing.apply();
        Ok(routing)
    }

    /// A version of the kube-dns ConfigMap (`None`: there is none, or it was deleted).
    pub fn config_map(&mut self, data: Option<KubeDnsConfigData>) {
        if data == self.seen {
            return;
        }
        let counters = &self.metrics.forward.routing;
        match &data {
            None => {
                tracing::info!(
                    "no kube-dns ConfigMap (kube-system/kube-dns): no stubDomains or \
                     upstreamNameservers from it"
                );
                self.config = KubeDnsConfig::default();
                counters.config_refused_now.store(false, Relaxed);
            }
            Some(d) => match KubeDnsConfig::parse(d, &self.flags.rules) {
                Ok(config) => {
                    tracing::info!(
                        stub_domains = %StubList(&config.stub_domains),
                        upstream_nameservers = ?config.upstream_nameservers,
                        "kube-dns ConfigMap applied"
                    );
                    self.config = config;
                    counters.config_refused_now.store(false, Relaxed);
                    self.log_overrides();
                }
                Err(e) => {
                    counters.config_refused.fetch_add(1, Relaxed);
                    counters.config_refused_now.store(true, Relaxed);
                    tracing::error!(
                        "{e}; this version is refused, the last good settings stay \
                         (stubDomains {}, upstreamNameservers {:?})",
                        StubList(&self.config.stub_domains),
                        self.config.upstream_nameservers
                    );
                }
            },
        }
        self.seen = data;
        self.apply();
        self.report_kube_dns();
    }

    /// The zone changed: in intercept mode, follow the kube-dns Service's ready endpoints.
    pub fn zone_changed(&mut self, zone: &ZoneModel) {
        if self.flags.default != DefaultUpstreams::KubeDnsEndpoints {
            return;
        }
        let mut endpoints = Vec::new();
        let mut refused = Vec::new();
        for ip in &self.flags.intercept {
            for (addr, ports) in zone.ready_endpoints_at(*ip) {
                let a = SocketAddr::new(addr, dns_port(ports));
                match self.flags.rules.check_upstream(&Upstream::Dns(a)) {
                    Ok(()) => endpoints.push(a),
                    Err(e) => refused.push(e),
                }
            }
        }
        endpoints.sort();
        endpoints.dedup();
        if endpoints != self.kube_dns {
            for e in refused {
                tracing::warn!("a kube-dns endpoint is not forwarded to: {e}");
            }
            self.metrics
                .forward
                .routing
                .kube_dns_endpoints
                .store(endpoints.len() as u64, Relaxed);
            self.kube_dns = endpoints;
            self.apply();
        }
        self.zone_loaded = zone.is_synced();
        self.report_kube_dns();
    }

    /// Says once per stretch without a ready kube-dns endpoint that names outside the cluster
    /// get SERVFAIL, and once when endpoints are back. Not during the first load, when the
    /// Service may arrive before its EndpointSlices.
    fn report_kube_dns(&mut self) {
        let empty = self.kube_dns.is_empty();
        if self.zone_loaded && empty && self.uses_kube_dns() && !self.said_empty {
            tracing::warn!(
                intercept = ?self.flags.intercept,
                "the kube-dns Service (the Service whose cluster IP is intercepted) has no \
                 ready endpoint: names outside the cluster get SERVFAIL until one is ready \
                 (said once)"
            );
            self.said_empty = true;
        } else if !empty && self.said_empty {
            tracing::info!(endpoints = ?self.kube_dns, "the kube-dns Service has ready endpoints again: forwarding to them");
            self.said_empty = false;
        }
    }

    /// Are names without a stub domain going to the kube-dns endpoints now?
    fn uses_kube_dns(&self) -> bool {
        self.flags.default == DefaultUpstreams::KubeDnsEndpoints
            && self.config.upstream_nameservers.is_empty()
    }

    fn log_overrides(&self) {
        if matches!(self.flags.default, DefaultUpstreams::Flags(_))
            && !self.config.upstream_nameservers.is_empty()
        {
            tracing::info!(
                upstream_nameservers = ?self.config.upstream_nameservers,
                "the kube-dns ConfigMap's upstreamNameservers are not used: --upstream overrides them"
            );
        }
        for s in &self.config.stub_domains {
            if self.flags.stub_domains.iter().any(|f| f.domain == s.domain) {
                tracing::info!(
                    domain = %s.name,
                    "the kube-dns ConfigMap's stub domain {} is not used: --stub-domain {} overrides it",
                    s.name,
                    s.name
                );
            }
        }
    }

    /// What the routes should be now, by the precedence above.
    pub fn spec(&self) -> RouteSpec {
        let set = |origin: String, upstreams: &[Upstream]| SetSpec {
            id: UpstreamSetId::of(upstreams),
            origin,
            upstreams: upstreams.to_vec(),
        };
        let (ns, name) = KUBE_DNS_CONFIG_MAP;
        let default = match &self.flags.default {
            DefaultUpstreams::Flags(u) => set("--upstream".to_string(), u),
            _ if !self.config.upstream_nameservers.is_empty() => set(
                format!("upstreamNameservers of ConfigMap {ns}/{name}"),
                &self.config.upstream_nameservers,
            ),
            DefaultUpstreams::KubeDnsEndpoints => SetSpec {
                id: UpstreamSetId::named(KUBE_DNS_SET),
                origin: "the ready endpoints of the kube-dns Service".to_string(),
                upstreams: self.kube_dns.iter().map(|a| Upstream::Dns(*a)).collect(),
            },
            DefaultUpstreams::ResolvConf(u) => set("/etc/resolv.conf".to_string(), u),
        };
        let mut stubs = BTreeMap::new();
        for s in &self.config.stub_domains {
            stubs.insert(
                s.domain.clone(),
                set(
                    format!("stubDomains {} of ConfigMap {ns}/{name}", s.name),
                    &s.upstreams,
                ),
            );
        }
        for s in &self.flags.stub_domains {
            stubs.insert(
                s.domain.clone(),
                set(format!("--stub-domain {}", s.name), &s.upstreams),
            );
        }
        RouteSpec {
            default,
            stubs: stubs.into_iter().collect(),
        }
    }

    /// Puts the routes in force if they changed.
    fn apply(&mut self) {
        let spec = self.spec();
        if self.in_force.as_ref() == Some(&spec) {
            return;
        }
        let membership = self.forwarder.set_routes(spec.clone());
        let stubs = if spec.stubs.is_empty() {
            "none".to_string()
        } else {
            spec.stubs
                .iter()
                .map(|(_, s)| format!("{} {:?}", s.origin, s.upstreams))
                .collect::<Vec<_>>()
                .join("; ")
        };
        tracing::info!(
            default = %format!("{} {:?}", spec.default.origin, spec.default.upstreams),
            stub_domains = %stubs,
            joined = ?membership.joined,
            left = ?membership.left,
            "forwarding routes"
        );
        self.in_force = Some(spec);
    }
}

/// The port of a kube-dns endpoint: its slice's UDP port named `dns`, else 53.
pub fn dns_port(ports: &[Port]) -> u16 {
    ports
        .iter()
        .find(|p| p.protocol == Protocol::Udp && p.name.as_deref() == Some(DNS_PORT_NAME))
        .map_or(DNS_PORT, |p| p.port)
}

/// Stub domains as logs show them.
struct StubList<'a>(&'a [StubDomain]);

impl fmt::Display for StubList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}: {:?}", s.name, s.upstreams)?;
        }
        f.write_str("}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        server::forward::tests::settings,
        zone::{ZoneSettings, objects::ClusterObject},
    };

    const KUBE_DNS: &str = "198.51.100.10";

    fn rules() -> UpstreamRules {
        UpstreamRules::new(
            &["169.254.20.10".parse().unwrap()],
            &[KUBE_DNS.parse().unwrap()],
            "cluster.local",
        )
    }

    fn up(s: &str) -> Upstream {
        Upstream::parse(s).unwrap()
    }

    fn data(stub_domains: Option<&str>, upstream_nameservers: Option<&str>) -> KubeDnsConfigData {
        KubeDnsConfigData {
            stub_domains: stub_domains.map(Into::into),
            upstream_nameservers: upstream_nameservers.map(Into::into),
        }
    }

    fn parse(
        stub_domains: Option<&str>,
        upstream_nameservers: Option<&str>,
    ) -> Result<KubeDnsConfig, String> {
        KubeDnsConfig::parse(&data(stub_domains, upstream_nameservers), &rules())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_config_map_keys_as_kube_dns_wrote_them() {
        let c = parse(
            Some(r#"{"Corp.Example.": ["192.0.2.1", "192.0.2.2:5353"], "tls.example": ["tls://192.0.2.3#dns.example"]}"#),
            Some(r#"["192.0.2.53", "[2001:db8::53]"]"#),
        )
        .unwrap();
        let shown: Vec<(String, Vec<Upstream>)> = c
            .stub_domains
            .iter()
            .map(|s| (s.name.clone(), s.upstreams.clone()))
            .collect();
        assert_eq!(
            shown,
            [
                (
                    "corp.example".to_string(),
                    vec![up("192.0.2.1"), up("192.0.2.2:5353")]
                ),
                (
                    "tls.example".to_string(),
                    vec![up("tls://192.0.2.3#dns.example")]
                ),
            ]
        );
        assert_eq!(
            c.upstream_nameservers,
            [up("192.0.2.53"), up("[2001:db8::53]:53")]
        );
        assert_eq!(parse(None, None).unwrap(), KubeDnsConfig::default());
        assert_eq!(
            parse(Some(" \n"), Some("")).unwrap(),
            KubeDnsConfig::default()
        );
        assert_eq!(
            parse(Some("{}"), Some("[]")).unwrap(),
            KubeDnsConfig::default()
        );
    }

    #[test]
    fn a_malformed_config_map_is_refused_naming_the_key() {
        let cases: [(Option<&str>, Option<&str>, &str); 11] = [
            (
                Some("{not json"),
                None,
                "data.stubDomains: not a JSON object of domain to list of addresses",
            ),
            (
                Some(r#"["192.0.2.1"]"#),
                None,
                "data.stubDomains: not a JSON object",
            ),
            (
                Some(r#"{"corp.example": "192.0.2.1"}"#),
                None,
                "data.stubDomains: not a JSON object",
            ),
            (
                Some(r#"{"corp.example": ["nope"]}"#),
                None,
                r#"data.stubDomains["corp.example"][0]: "nope" is not ADDR[:PORT]"#,
            ),
            (
                Some(r#"{"corp.example": []}"#),
                None,
                r#"data.stubDomains["corp.example"]: no address"#,
            ),
            (
                Some(r#"{"svc.cluster.local": ["192.0.2.1"]}"#),
                None,
                "is at or below the cluster domain cluster.local",
            ),
            (Some(r#"{"": ["192.0.2.1"]}"#), None, "empty domain"),
            (
                Some(r#"{"a": ["192.0.2.1"], "A.": ["192.0.2.2"]}"#),
                None,
                "a is given twice",
            ),
            (
                None,
                Some(r#""192.0.2.53""#),
                "data.upstreamNameservers: not a JSON list of addresses",
            ),
            (
                None,
                Some(r#"["169.254.20.10"]"#),
                "data.upstreamNameservers[0]: 169.254.20.10:53 is one of this agent's own listen addresses",
            ),
            (
                None,
                Some(r#"["192.0.2.53", "198.51.100.10"]"#),
                "data.upstreamNameservers[1]: 198.51.100.10:53 is an intercepted address",
            ),
        ];
        for (stub, upstreams, wanted) in cases {
            let e = parse(stub, upstreams).unwrap_err();
            assert!(
                e.starts_with("ConfigMap kube-system/kube-dns: ") && e.contains(wanted),
                "{stub:?} {upstreams:?}: {e}"
            );
        }
    }

    fn routing(default: DefaultUpstreams, flag_stubs: &[(&str, &str)]) -> (Routing, Arc<Metrics>) {
        let rules = rules();
        let stub_domains = flag_stubs
            .iter()
            .map(|(d, a)| {
                let (domain, name) = rules.stub_domain(d).unwrap();
                StubDomain {
                    domain,
                    name,
                    upstreams: vec![up(a)],
                }
            })
            .collect();
        let metrics = Arc::new(Metrics::default());
        let forwarder = Arc::new(Forwarder::new(Vec::new(), settings(), metrics.clone()));
        let flags = RouteFlags {
            default,
            stub_domains,
            rules,
            intercept: vec![KUBE_DNS.parse().unwrap()],
        };
        let r = Routing::start(flags, None, forwarder, metrics.clone()).unwrap();
        (r, metrics)
    }

    /// Where a name goes now, as the forwarder routes it.
    fn to(r: &Routing, name: &str) -> Vec<String> {
        r.forwarder
            .route_of(&wire_from_dotted(name))
            .1
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn flags_override_the_config_map_and_the_config_map_the_defaults() {
        let cm = data(
            Some(r#"{"corp.example": ["192.0.2.1"], "flag.example": ["192.0.2.1"]}"#),
            Some(r#"["192.0.2.53"]"#),
        );
        // --upstream beats upstreamNameservers; --stub-domain beats the same stub domain.
        let (mut r, _) = routing(
            DefaultUpstreams::Flags(vec![up("203.0.113.1")]),
            &[("flag.example", "203.0.113.2")],
        );
        r.config_map(Some(cm.clone()));
        assert_eq!(to(&r, "www.example.org"), ["203.0.113.1:53"]);
        assert_eq!(to(&r, "www.corp.example"), ["192.0.2.1:53"]);
        assert_eq!(to(&r, "www.flag.example"), ["203.0.113.2:53"]);

        // upstreamNameservers beat /etc/resolv.conf, and the kube-dns endpoints.
        for default in [
            DefaultUpstreams::ResolvConf(vec![up("203.0.113.9")]),
            DefaultUpstreams::KubeDnsEndpoints,
        ] {
            let (mut r, _) = routing(default.clone(), &[]);
            r.config_map(Some(cm.clone()));
            assert_eq!(to(&r, "www.example.org"), ["192.0.2.53:53"], "{default:?}");
            // Deleted: back to the command line's.
            r.config_map(None);
            let back: Vec<String> = match &default {
                DefaultUpstreams::ResolvConf(_) => vec!["203.0.113.9:53".to_string()],
                _ => vec![],
            };
            assert_eq!(to(&r, "www.example.org"), back, "{default:?}");
            assert_eq!(to(&r, "www.corp.example"), back, "{default:?}");
        }
    }

    #[test]
    fn a_refused_version_keeps_the_last_good_settings() {
        let (mut r, metrics) = routing(DefaultUpstreams::ResolvConf(vec![up("203.0.113.9")]), &[]);
        let counters = &metrics.forward.routing;
        r.config_map(Some(data(Some(r#"{"corp.example": ["192.0.2.1"]}"#), None)));
        let id = r
            .forwarder
            .upstream_set_of(&wire_from_dotted("www.corp.example"));
        r.config_map(Some(data(
            Some(r#"{"corp.example": ["192.0.2.1"], "#),
            None,
        )));
        assert_eq!(to(&r, "www.corp.example"), ["192.0.2.1:53"]);
        assert_eq!(counters.config_refused.load(Relaxed), 1);
        assert!(counters.config_refused_now.load(Relaxed));
        // The same broken version again (a zone file re-read) is not counted twice.
        r.config_map(Some(data(
            Some(r#"{"corp.example": ["192.0.2.1"], "#),
            None,
        )));
        assert_eq!(counters.config_refused.load(Relaxed), 1);
        r.config_map(Some(data(Some(r#"{"corp.example": ["192.0.2.2"]}"#), None)));
        assert_eq!(to(&r, "www.corp.example"), ["192.0.2.2:53"]);
        assert!(!counters.config_refused_now.load(Relaxed));
        assert_ne!(
            r.forwarder
                .upstream_set_of(&wire_from_dotted("www.corp.example")),
            id,
            "answers of the old stub upstreams are not served for it"
        );
    }

    fn zone(slices: &str) -> ZoneModel {
        let text = format!(
            "kind: Service\nmetadata: {{name: kube-dns, namespace: kube-system}}\n\
             spec: {{clusterIP: {KUBE_DNS}, ports: [{{name: dns, port: 53, protocol: UDP}}]}}\n{slices}"
        );
        let objects = crate::source::file::parse(std::path::Path::new("z.yaml"), &text).unwrap();
        let mut zone = ZoneModel::new(ZoneSettings {
            domain: "cluster.local".into(),
            ttl: 30,
            negative_ttl: 5,
            ns_addrs: vec![],
            serial: 1,
        });
        for (kind, objects) in crate::zone::objects::by_kind(objects) {
            let changes = zone.diff_relist(kind, objects);
            zone.apply(changes);
        }
        zone.set_synced();
        zone
    }

    fn slice(name: &str, port: &str, endpoints: &[(&str, bool)]) -> String {
        let endpoints: String = endpoints
            .iter()
            .map(|(a, ready)| format!("- addresses: [{a}]\n  conditions: {{ready: {ready}}}\n"))
            .collect();
        format!(
            "---\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: kube-system, \
             labels: {{kubernetes.io/service-name: kube-dns}}}}\naddressType: IPv4\n\
             ports: [{port}]\nendpoints:\n{endpoints}"
        )
    }

    #[test]
    fn the_kube_dns_endpoints_are_followed_on_their_dns_port() {
        let (mut r, metrics) = routing(DefaultUpstreams::KubeDnsEndpoints, &[]);
        assert_eq!(to(&r, "www.example.org"), Vec::<String>::new());
        let dns = "{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}";
        r.zone_changed(&zone(&slice(
            "a",
            dns,
            &[
                ("203.0.113.11", true),
                ("203.0.113.12", true),
                ("203.0.113.13", false),
            ],
        )));
        let id = r
            .forwarder
            .upstream_set_of(&wire_from_dotted("www.example.org"));
        assert_eq!(
            to(&r, "www.example.org"),
            ["203.0.113.11:53", "203.0.113.12:53"]
        );
        assert_eq!(metrics.forward.routing.kube_dns_endpoints.load(Relaxed), 2);
        // A roll: .11 goes, .13 is ready, and a second slice serves on another port; an
        // endpoint at the intercepted address itself is never forwarded to.
        let more = slice(
            "b",
            "{name: dns, port: 5353, protocol: UDP}, {name: metrics, port: 9153, protocol: TCP}",
            &[("203.0.113.14", true), (KUBE_DNS, true)],
        );
        r.zone_changed(&zone(&format!(
            "{}{more}",
            slice("a", dns, &[("203.0.113.12", true), ("203.0.113.13", true)])
        )));
        assert_eq!(
            to(&r, "www.example.org"),
            ["203.0.113.12:53", "203.0.113.13:53", "203.0.113.14:5353"]
        );
        assert_eq!(
            r.forwarder
                .upstream_set_of(&wire_from_dotted("www.example.org")),
            id,
            "one set however its pods roll: the cache stays"
        );
        // No UDP port named dns: 53.
        r.zone_changed(&zone(&slice(
            "a",
            "{name: dns-tcp, port: 5300, protocol: TCP}",
            &[("203.0.113.15", true)],
        )));
        assert_eq!(to(&r, "www.example.org"), ["203.0.113.15:53"]);
        // With --upstream, the endpoints are not followed.
        let (mut r, _) = routing(DefaultUpstreams::Flags(vec![up("192.0.2.53")]), &[]);
        r.zone_changed(&zone(&slice("a", dns, &[("203.0.113.11", true)])));
        assert_eq!(to(&r, "www.example.org"), ["192.0.2.53:53"]);
    }

    #[test]
    fn only_the_kube_dns_config_map_is_projected() {
        let cm: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "kube-dns", "namespace": "kube-system"},
            "data": {"upstreamNameservers": "[\"192.0.2.53\"]"},
        }))
        .unwrap();
        let Some(ClusterObject::KubeDnsConfig(d)) =
            crate::zone::objects::project_config_map(&cm).unwrap()
        else {
            panic!("projected")
        };
        assert_eq!(
            KubeDnsConfig::parse(&d, &rules())
                .unwrap()
                .upstream_nameservers,
            [up("192.0.2.53")]
        );
    }
}
