//! Upstream resolvers as operators write them, in the syntax of CoreDNS's `forward`:
//! `ADDR[:PORT]` for plain DNS (UDP, then TCP when truncated) and
//! `tls://ADDR[:PORT][#SERVERNAME]` for DNS over TLS (RFC 7858). IPv6 addresses go in brackets
//! when a port or server name follows (`tls://[2001:db8::53]:853#dns.example`).
//!
//! [`Upstream::parse`] is the one parser for every place an upstream can be given (`--upstream`,
//! `--stub-domain`, the kube-dns ConfigMap's `stubDomains` and `upstreamNameservers`). Its errors
//! say what was given and which forms are accepted; the caller puts the flag or field name in
//! front.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

use rustls::pki_types::ServerName;

/// The DNS port (RFC 1035).
pub const DNS_PORT: u16 = 53;
/// The DNS-over-TLS port (RFC 7858 §3.1).
pub const DOT_PORT: u16 = 853;

/// One upstream resolver and how to reach it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Upstream {
    /// Plain DNS: UDP, and TCP when an answer is truncated (or always, with `--force-tcp`).
    Dns(SocketAddr),
    /// DNS over TLS on long-lived, pipelined connections.
    Tls {
        addr: SocketAddr,
        /// The name the certificate must be valid for; without one, the certificate must be
        /// valid for the IP address itself (an IP address SAN).
        server_name: Option<String>,
    },
}

/// Why a string is not an upstream.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamSyntaxError {
    #[error(
        "{given:?} is not ADDR[:PORT], [IPv6]:PORT or tls://ADDR[:PORT][#SERVERNAME] \
         (ADDR is an IP address: a resolver's name would need a resolver)"
    )]
    Form { given: String },
    #[error(
        "{given:?}: the scheme {scheme}:// is not supported; use tls:// for DNS over TLS, or \
         ADDR[:PORT] (or dns://ADDR[:PORT]) for plain DNS"
    )]
    Scheme { given: String, scheme: String },
    #[error(
        "{given:?}: {name:?} after # is not a server name a certificate can be checked against \
         (a DNS name such as dns.example.com, or an IP address)"
    )]
    ServerName { given: String, name: String },
    #[error("{given:?}: a server name (#NAME) only means something over TLS; write tls://{given}")]
    NameWithoutTls { given: String },
    #[error(
        "{given:?}: port 0 cannot be sent to; give the resolver's port (53, or 853 for tls://)"
    )]
    PortZero { given: String },
}

impl Upstream {
    /// Parses `ADDR`, `ADDR:PORT`, `[IPv6]:PORT` (optionally after `dns://`), or
    /// `tls://ADDR[:PORT][#SERVERNAME]`; the port is 53 by default, 853 for `tls://`. The scheme
    /// is case-insensitive. A server name is a DNS name or an IP address.
    pub fn parse(s: &str) -> Result<Self, UpstreamSyntaxError> {
        let form = || UpstreamSyntaxError::Form {
            given: s.to_string(),
        };
        let (scheme, rest) = match s.split_once("://") {
            Some((scheme, rest)) => (Some(scheme.to_ascii_lowercase()), rest),
            None => (None, s),
        };
        let tls = match scheme.as_deref() {
            None | Some("dns") => false,
            Some("tls") => true,
            Some(other) => {
                return Err(UpstreamSyntaxError::Scheme {
                    given: s.to_string(),
                    scheme: other.to_string(),
                });
            }
        };
        let (addr, name) = match rest.split_once('#') {
            Some((addr, name)) => (addr, Some(name)),
            None => (rest, None),
        };
        let default_port = if tls { DOT_PORT } else { DNS_PORT };
        // `[IPv6]` without a port, as in a URL.
        let bare = addr
            .strip_prefix('[')
            .and_then(|a| a.strip_suffix(']'))
            .unwrap_or(addr);
        let addr = match bare.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, default_port),
            Err(_) => addr.parse::<SocketAddr>().map_err(|_| form())?,
        };
        if addr.port() == 0 {
            return Err(UpstreamSyntaxError::PortZero {
                given: s.to_string(),
            });
        }
        if !tls {
            if name.is_some() {
                return Err(UpstreamSyntaxError::NameWithoutTls {
                    given: s.to_string(),
                });
            }
            return Ok(Self::Dns(addr));
        }
        let server_name = match name {
            None => None,
            Some(name) => {
                let bad = || UpstreamSyntaxError::ServerName {
                    given: s.to_string(),
                    name: name.to_string(),
                };
                // Certificates name hosts without the root's trailing dot.
                let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
                if name.is_empty() {
                    return Err(bad());
                }
                ServerName::try_from(name.as_str()).map_err(|_| bad())?;
                Some(name)
            }
        };
        Ok(Self::Tls { addr, server_name })
    }

    pub fn addr(&self) -> SocketAddr {
        match self {
            Self::Dns(addr) | Self::Tls { addr, .. } => *addr,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls { .. })
    }

    /// The name a TLS upstream's certificate is checked against: the given server name, else
    /// the IP address. `None` for plain DNS.
    pub fn tls_server_name(&self) -> Option<ServerName<'static>> {
        match self {
            Self::Dns(_) => None,
            Self::Tls {
                server_name: Some(name),
                ..
            } => Some(
                ServerName::try_from(name.clone())
                    .expect("the server name was checked when the upstream was parsed"),
            ),
            Self::Tls {
                addr,
                server_name: None,
            } => Some(ServerName::IpAddress(addr.ip().into())),
        }
    }
}

/// `ADDR:PORT` for plain DNS (as before TLS existed, so existing dashboards keep their series),
/// `tls://ADDR:PORT[#SERVERNAME]` for DNS over TLS. This is the `to` label of the forward
/// metrics and the name in logs; it parses back to the same upstream.
impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dns(addr) => write!(f, "{addr}"),
            Self::Tls {
                addr,
                server_name: None,
            } => write!(f, "tls://{addr}"),
            Self::Tls {
                addr,
                server_name: Some(name),
            } => write!(f, "tls://{addr}#{name}"),
        }
    }
}

/// As displayed: logs that print a list of upstreams read as the operator wrote them.
impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Upstream {
    type Err = UpstreamSyntaxError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Upstream {
        Upstream::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn plain_forms() {
        assert_eq!(ok("192.0.2.1").to_string(), "192.0.2.1:53");
        assert_eq!(ok("192.0.2.1:5353").to_string(), "192.0.2.1:5353");
        assert_eq!(ok("[2001:db8::1]:53").to_string(), "[2001:db8::1]:53");
        assert_eq!(ok("2001:db8::1").to_string(), "[2001:db8::1]:53");
        assert_eq!(ok("[2001:db8::1]").to_string(), "[2001:db8::1]:53");
        assert_eq!(ok("dns://192.0.2.1"), ok("192.0.2.1"));
        assert_eq!(ok("DNS://192.0.2.1:54").to_string(), "192.0.2.1:54");
        assert!(!ok("192.0.2.1").is_tls());
        assert_eq!(ok("192.0.2.1").tls_server_name(), None);
    }

    #[test]
    fn tls_forms() {
        let u = ok("tls://192.0.2.1");
        assert_eq!(
            u,
            Upstream::Tls {
                addr: "192.0.2.1:853".parse().unwrap(),
                server_name: None
            }
        );
        assert_eq!(u.to_string(), "tls://192.0.2.1:853");
        assert_eq!(
            u.tls_server_name(),
            Some(ServerName::IpAddress(
                "192.0.2.1".parse::<IpAddr>().unwrap().into()
            ))
        );
        let u = ok("tls://192.0.2.1:8853#DNS.Example.COM.");
        assert_eq!(u.to_string(), "tls://192.0.2.1:8853#dns.example.com");
        assert_eq!(
            u.tls_server_name(),
            Some(ServerName::try_from("dns.example.com").unwrap())
        );
        assert_eq!(
            ok("TLS://[2001:db8::53]#dns.example.com").to_string(),
            "tls://[2001:db8::53]:853#dns.example.com"
        );
        assert_eq!(
            ok("tls://2001:db8::53#dns.example.com").addr(),
            "[2001:db8::53]:853".parse().unwrap()
        );
        // An IP address as the name: the certificate must hold that address.
        assert_eq!(
            ok("tls://192.0.2.1#192.0.2.9").tls_server_name(),
            Some(ServerName::IpAddress(
                "192.0.2.9".parse::<IpAddr>().unwrap().into()
            ))
        );
        // Display parses back to the same upstream.
        for s in [
            "tls://192.0.2.1",
            "tls://192.0.2.1:8853#dns.example.com",
            "192.0.2.1:53",
        ] {
            assert_eq!(ok(&ok(s).to_string()), ok(s));
        }
    }

    #[test]
    fn refused_forms_say_what_is_accepted() {
        let err = |s: &str| Upstream::parse(s).unwrap_err();
        for bad in [
            "",
            "nope",
            "dns.google",
            "tls://",
            "tls://dns.google",
            "192.0.2.1:",
            "192.0.2.1:99999",
            "tls://192.0.2.1:x",
            "[192.0.2.1]:53:53",
        ] {
            assert!(
                matches!(err(bad), UpstreamSyntaxError::Form { .. }),
                "{bad}: {}",
                err(bad)
            );
        }
        assert_eq!(
            err("nope").to_string(),
            "\"nope\" is not ADDR[:PORT], [IPv6]:PORT or tls://ADDR[:PORT][#SERVERNAME] (ADDR \
             is an IP address: a resolver's name would need a resolver)"
        );
        assert!(matches!(
            err("https://192.0.2.1"),
            UpstreamSyntaxError::Scheme { .. }
        ));
        assert!(err("quic://192.0.2.1").to_string().contains("use tls://"));
        for bad in [
            "tls://192.0.2.1#",
            "tls://192.0.2.1#bad name",
            "tls://192.0.2.1#a..b",
        ] {
            assert!(
                matches!(err(bad), UpstreamSyntaxError::ServerName { .. }),
                "{bad}: {}",
                err(bad)
            );
        }
        assert_eq!(
            err("192.0.2.1#dns.example.com").to_string(),
            "\"192.0.2.1#dns.example.com\": a server name (#NAME) only means something over TLS; \
             write tls://192.0.2.1#dns.example.com"
        );
        assert!(matches!(
            err("192.0.2.1:0"),
            UpstreamSyntaxError::PortZero { .. }
        ));
        assert!(matches!(
            err("tls://192.0.2.1:0"),
            UpstreamSyntaxError::PortZero { .. }
        ));
    }
}
