//! Compact projections of the Kubernetes objects the zone is made of.
//!
//! Every node runs a watch of every Service and EndpointSlice, so the agent keeps only what
//! DNS needs of them: names, IPs, ports, readiness. The same projections come from the API
//! watch and from a zone file, so both sources feed one model.
//!
//! One object is not zone data: the kube-dns ConfigMap (`kube-system/kube-dns`), whose
//! `stubDomains` and `upstreamNameservers` say where names outside the cluster go, as
//! NodeLocal DNSCache reads them. Its projection keeps those two values as written; the
//! forwarding routes ([`crate::server::routing`]) check them, so that a malformed ConfigMap is
//! refused there and the last good settings stay, from either source.

use std::{fmt, net::IpAddr, str::FromStr, sync::Arc};

use k8s_openapi::api::{
    core::v1::{ConfigMap, Namespace, Service},
    discovery::v1::EndpointSlice,
};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Namespace and name of the kube-dns ConfigMap (kube-dns's and NodeLocal DNSCache's).
pub const KUBE_DNS_CONFIG_MAP: (&str, &str) = ("kube-system", "kube-dns");
/// Its keys that name upstreams: a JSON object of domain to list of addresses, and a JSON list
/// of addresses.
pub const STUB_DOMAINS_KEY: &str = "stubDomains";
pub const UPSTREAM_NAMESERVERS_KEY: &str = "upstreamNameservers";

/// `namespace/name` of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The label form used in SRV names (`_tcp`).
    pub fn label(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            "SCTP" => Ok(Self::Sctp),
            other => Err(format!("{other:?} is not TCP, UDP or SCTP")),
        }
    }
}

/// A port of a Service or of an EndpointSlice. Only named ports get `_<name>._<proto>` SRV
/// names; unnamed ones still answer SRV queries for the Service name itself.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Port {
    pub name: Option<Box<str>>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceKind {
    /// ClusterIP, NodePort and LoadBalancer Services: their cluster IPs (one per family).
    ClusterIp(Vec<IpAddr>),
    /// `clusterIP: None`: the endpoints answer.
    Headless,
    /// A CNAME to this name (lowercase, no trailing dot).
    ExternalName(Box<str>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub kind: ServiceKind,
    pub ports: Vec<Port>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub addresses: Vec<IpAddr>,
    pub hostname: Option<Box<str>>,
    /// `conditions.ready`, unset counting as ready.
    pub ready: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    /// Name of the Service (same namespace) this slice belongs to.
    pub service: Arc<str>,
    pub endpoints: Vec<EndpointInfo>,
    pub ports: Vec<Port>,
}

/// The kube-dns ConfigMap's forwarding keys, as written (`None`: the key is absent).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubeDnsConfigData {
    pub stub_domains: Option<Box<str>>,
    pub upstream_nameservers: Option<Box<str>>,
}

/// One object of the cluster, projected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterObject {
    Namespace(Arc<str>),
    Service(ObjectKey, ServiceInfo),
    Slice(ObjectKey, SliceInfo),
    /// The kube-dns ConfigMap: not zone data, the forwarding routes take it.
    KubeDnsConfig(KubeDnsConfigData),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Namespace,
    Service,
    EndpointSlice,
    /// The kube-dns ConfigMap (the only ConfigMap the agent reads).
    ConfigMap,
}

/// Objects sorted into one listing per kind, in the order a full load applies them
/// (namespaces, Services, then their EndpointSlices; then the kube-dns ConfigMap).
pub fn by_kind(objects: Vec<ClusterObject>) -> [(Kind, Vec<ClusterObject>); 4] {
    let mut out = [
        (Kind::Namespace, vec![]),
        (Kind::Service, vec![]),
        (Kind::EndpointSlice, vec![]),
        (Kind::ConfigMap, vec![]),
    ];
    for o in objects {
        let i = match o {
            ClusterObject::Namespace(_) => 0,
            ClusterObject::Service(..) => 1,
            ClusterObject::Slice(..) => 2,
            ClusterObject::KubeDnsConfig(_) => 3,
        };
        out[i].1.push(o);
    }
    out
}

/// What is wrong with an object, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct FieldError {
    pub field: String,
    pub problem: String,
}

fn field_error(field: impl Into<String>, problem: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Is `s` a DNS-1123 label (what Kubernetes requires of namespaces, Service names,
/// hostnames)?
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A port name as Kubernetes allows it (IANA service name: lowercase letters, digits and
/// dashes, at most 15 characters, at least one letter).
fn is_port_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 15
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.iter().any(|c| c.is_ascii_lowercase())
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A DNS name as an ExternalName target: dot-separated labels of letters, digits,
/// dashes and underscores, at most 253 characters.
fn parse_external_name(s: &str) -> Option<Box<str>> {
    let s = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        });
    ok.then(|| s.into_boxed_str())
}

fn object_name(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<&str, FieldError> {
    let name = meta
        .name
        .as_deref()
        .ok_or_else(|| field_error("metadata.name", "missing"))?;
    Ok(name)
}

fn object_namespace(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<&str, FieldError> {
    let ns = meta.namespace.as_deref().unwrap_or("default");
    if !is_dns1123_label(ns) {
        return Err(field_error(
            "metadata.namespace",
            format!("{ns:?} is not a DNS-1123 label"),
        ));
    }
    Ok(ns)
}

fn parse_ports<'a>(
    ports: impl Iterator<Item = (Option<&'a str>, Option<i32>, Option<&'a str>)>,
    field: &str,
) -> Result<Vec<Port>, FieldError> {
    let mut out = Vec::new();
    for (i, (name, port, protocol)) in ports.enumerate() {
        let Some(port) = port else { continue };
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                field_error(
                    format!("{field}[{i}].port"),
                    format!("{port} is not a port number"),
                )
            })?;
        let protocol = protocol
            .unwrap_or("TCP")
            .parse()
            .map_err(|e| field_error(format!("{field}[{i}].protocol"), e))?;
        let name = match name {
            None | Some("") => None,
            Some(n) if is_port_name(n) => Some(n.into()),
            Some(n) => {
                return Err(field_error(
                    format!("{field}[{i}].name"),
                    format!(
                        "{n:?} is not a valid port name (lowercase letters, digits, '-', at most 15)"
                    ),
                ));
            }
        };
        out.push(Port {
            name,
            port,
            protocol,
        });
    }
    out.sort();
    out.dedup();
    Ok(out)
}

pub fn project_namespace(ns: &Namespace) -> Result<ClusterObject, FieldError> {
    let name = object_name(&ns.metadata)?;
    if !is_dns1123_label(name) {
        return Err(field_error(
            "metadata.name",
            format!("{name:?} is not a DNS-1123 label"),
        ));
    }
    Ok(ClusterObject::Namespace(name.into()))
}

pub fn project_service(svc: &Service) -> Result<ClusterObject, FieldError> {
    let name = object_name(&svc.metadata)?;
    if !is_dns1123_label(name) {
        return Err(field_error(
            "metadata.name",
            format!("{name:?} is not a DNS-1123 label"),
        ));
    }
    let namespace = object_namespace(&svc.metadata)?;
    let spec = svc
        .spec
        .as_ref()
        .ok_or_else(|| field_error("spec", "missing"))?;
    let ports = parse_ports(
        spec.ports
            .iter()
            .flatten()
            .map(|p| (p.name.as_deref(), Some(p.port), p.protocol.as_deref())),
        "spec.ports",
    )?;
    let kind = if spec.type_.as_deref() == Some("ExternalName") {
        let target = spec
            .external_name
            .as_deref()
            .ok_or_else(|| field_error("spec.externalName", "required for type ExternalName"))?;
        let target = parse_external_name(target).ok_or_else(|| {
            field_error("spec.externalName", format!("{target:?} is not a DNS name"))
        })?;
        ServiceKind::ExternalName(target)
    } else if spec.cluster_ip.as_deref() == Some("None") {
        ServiceKind::Headless
    } else {
        let mut ips = Vec::new();
        let listed: Vec<(String, &str)> = match &spec.cluster_ips {
            Some(list) if !list.is_empty() => list
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("spec.clusterIPs[{i}]"), s.as_str()))
                .collect(),
            _ => spec
                .cluster_ip
                .iter()
                .map(|s| ("spec.clusterIP".to_string(), s.as_str()))
                .collect(),
        };
        for (field, text) in listed {
            if text == "None" {
                continue;
            }
            let ip: IpAddr = text
                .parse()
                .map_err(|_| field_error(field, format!("{text:?} is not an IP address")))?;
            ips.push(ip);
        }
        if ips.is_empty() {
            return Err(field_error(
                "spec.clusterIP",
                "missing: a Service needs its allocated cluster IP (or \"None\" for a headless Service)",
            ));
        }
        ServiceKind::ClusterIp(ips)
    };
    Ok(ClusterObject::Service(
        ObjectKey::new(namespace, name),
        ServiceInfo { kind, ports },
    ))
}

/// `Ok(None)`: a slice DNS has no use for (FQDN address type, or no Service label).
pub fn project_slice(slice: &EndpointSlice) -> Result<Option<ClusterObject>, FieldError> {
    let name = object_name(&slice.metadata)?;
    let namespace = object_namespace(&slice.metadata)?;
    let family_v6 = match slice.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        "FQDN" => return Ok(None),
        other => {
            return Err(field_error(
                "addressType",
                format!("{other:?} is not IPv4, IPv6 or FQDN"),
            ));
        }
    };
    let Some(service) = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
    else {
        return Ok(None);
    };
    if !is_dns1123_label(service) {
        return Err(field_error(
            format!("metadata.labels[{SERVICE_NAME_LABEL:?}]"),
            format!("{service:?} is not a Service name"),
        ));
    }
    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    for (i, ep) in slice.endpoints.iter().enumerate() {
        let mut addresses = Vec::with_capacity(ep.addresses.len());
        for (j, a) in ep.addresses.iter().enumerate() {
            let field = format!("endpoints[{i}].addresses[{j}]");
            let ip: IpAddr = a
                .parse()
                .map_err(|_| field_error(&field, format!("{a:?} is not an IP address")))?;
            if ip.is_ipv6() != family_v6 {
                return Err(field_error(
                    field,
                    format!("{a} does not match addressType {}", slice.address_type),
                ));
            }
            addresses.push(ip);
        }
        let hostname = match ep.hostname.as_deref() {
            None | Some("") => None,
            Some(h) if is_dns1123_label(h) => Some(h.into()),
            Some(h) => {
                return Err(field_error(
                    format!("endpoints[{i}].hostname"),
                    format!("{h:?} is not a DNS-1123 label"),
                ));
            }
        };
        let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
        endpoints.push(EndpointInfo {
            addresses,
            hostname,
            ready,
        });
    }
    let ports = parse_ports(
        slice
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.as_deref(), p.port, p.protocol.as_deref())),
        "ports",
    )?;
    Ok(Some(ClusterObject::Slice(
        ObjectKey::new(namespace, name),
        SliceInfo {
            service: service.as_str().into(),
            endpoints,
            ports,
        },
    )))
}

/// `Ok(None)`: a ConfigMap other than kube-system/kube-dns (the agent reads no other). Its two
/// forwarding keys are kept as written; every other key is dropped.
pub fn project_config_map(cm: &ConfigMap) -> Result<Option<ClusterObject>, FieldError> {
    let name = object_name(&cm.metadata)?;
    let namespace = cm.metadata.namespace.as_deref().unwrap_or("default");
    if (namespace, name) != KUBE_DNS_CONFIG_MAP {
        return Ok(None);
    }
    let value = |key: &str| {
        cm.data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|v| v.as_str().into())
    };
    Ok(Some(ClusterObject::KubeDnsConfig(KubeDnsConfigData {
        stub_domains: value(STUB_DOMAINS_KEY),
        upstream_nameservers: value(UPSTREAM_NAMESERVERS_KEY),
    })))
}

/// The DNS label of an endpoint: its hostname, else its address with dashes
/// (`10-1-2-3`, `2001-db8--1`), as CoreDNS names them.
pub fn endpoint_label(hostname: Option<&str>, ip: IpAddr) -> String {
    match hostname {
        Some(h) => h.to_string(),
        None => match ip {
            IpAddr::V4(v4) => v4.to_string().replace('.', "-"),
            IpAddr::V6(v6) => v6.to_string().replace(':', "-"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service_yaml(y: &str) -> Service {
        serde_saphyr::from_str(y).expect("test YAML")
    }

    #[test]
    fn dual_stack_cluster_ip_service() {
        let svc = service_yaml(
            "metadata: {name: web, namespace: shop}\n\
             spec:\n  clusterIP: 10.96.0.20\n  clusterIPs: [10.96.0.20, 'fd00:96::20']\n  \
             ports: [{name: http, port: 80}, {port: 9090, protocol: UDP}]\n",
        );
        let ClusterObject::Service(key, info) = project_service(&svc).unwrap() else {
            panic!()
        };
        assert_eq!(key.to_string(), "shop/web");
        assert_eq!(
            info.kind,
            ServiceKind::ClusterIp(vec![
                "10.96.0.20".parse().unwrap(),
                "fd00:96::20".parse().unwrap()
            ])
        );
        assert_eq!(info.ports.len(), 2);
        assert_eq!(info.ports[0].name.as_deref(), None);
        assert_eq!(info.ports[0].protocol, Protocol::Udp);
        assert_eq!(info.ports[1].name.as_deref(), Some("http"));
    }

    #[test]
    fn bad_fields_are_named() {
        let svc = service_yaml("metadata: {name: web}\nspec: {clusterIP: 10.96.0.300}\n");
        let err = project_service(&svc).unwrap_err();
        assert_eq!(err.field, "spec.clusterIP");
        assert!(err.problem.contains("10.96.0.300"), "{err}");

        let svc = service_yaml("metadata: {name: Web}\nspec: {clusterIP: 10.96.0.3}\n");
        assert_eq!(project_service(&svc).unwrap_err().field, "metadata.name");

        let svc = service_yaml("metadata: {name: ext}\nspec: {type: ExternalName}\n");
        assert_eq!(
            project_service(&svc).unwrap_err().field,
            "spec.externalName"
        );

        let svc = service_yaml(
            "metadata: {name: web}\nspec: {clusterIP: 10.96.0.3, ports: [{name: HTTP, port: 80}]}\n",
        );
        assert_eq!(
            project_service(&svc).unwrap_err().field,
            "spec.ports[0].name"
        );
    }

    #[test]
    fn slices_keep_readiness_and_check_families() {
        let slice: EndpointSlice = serde_saphyr::from_str(
            "metadata: {name: web-abc, namespace: shop, labels: {kubernetes.io/service-name: web}}\n\
             addressType: IPv4\n\
             endpoints:\n- addresses: [10.1.0.5]\n  hostname: web-0\n- addresses: [10.1.0.6]\n  \
             conditions: {ready: false}\n\
             ports: [{name: http, port: 8080, protocol: TCP}]\n",
        )
        .unwrap();
        let Some(ClusterObject::Slice(_, info)) = project_slice(&slice).unwrap() else {
            panic!()
        };
        assert_eq!(&*info.service, "web");
        assert!(info.endpoints[0].ready && !info.endpoints[1].ready);
        assert_eq!(info.endpoints[0].hostname.as_deref(), Some("web-0"));

        let bad: EndpointSlice = serde_saphyr::from_str(
            "metadata: {name: x, labels: {kubernetes.io/service-name: web}}\naddressType: IPv6\n\
             endpoints: [{addresses: [10.0.0.1]}]\n",
        )
        .unwrap();
        assert_eq!(
            project_slice(&bad).unwrap_err().field,
            "endpoints[0].addresses[0]"
        );
    }

    #[test]
    fn only_the_kube_dns_config_map_is_kept_with_its_two_keys() {
        let cm: ConfigMap = serde_saphyr::from_str(
            "metadata: {name: kube-dns, namespace: kube-system}\n\
             data:\n  stubDomains: '{\"corp.example\": [\"192.0.2.53\"]}'\n  \
             federations: 'ignored'\n",
        )
        .unwrap();
        assert_eq!(
            project_config_map(&cm).unwrap(),
            Some(ClusterObject::KubeDnsConfig(KubeDnsConfigData {
                stub_domains: Some("{\"corp.example\": [\"192.0.2.53\"]}".into()),
                upstream_nameservers: None,
            }))
        );
        let other: ConfigMap =
            serde_saphyr::from_str("metadata: {name: coredns, namespace: kube-system}\n").unwrap();
        assert_eq!(project_config_map(&other).unwrap(), None);
        let elsewhere: ConfigMap =
            serde_saphyr::from_str("metadata: {name: kube-dns, namespace: default}\n").unwrap();
        assert_eq!(project_config_map(&elsewhere).unwrap(), None);
    }

    #[test]
    fn endpoint_labels_follow_coredns() {
        assert_eq!(
            endpoint_label(None, "10.1.2.3".parse().unwrap()),
            "10-1-2-3"
        );
        assert_eq!(
            endpoint_label(None, "2001:db8::1".parse().unwrap()),
            "2001-db8--1"
        );
        assert_eq!(
            endpoint_label(Some("web-0"), "10.1.2.3".parse().unwrap()),
            "web-0"
        );
    }
}
