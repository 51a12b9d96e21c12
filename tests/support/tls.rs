//! DNS over TLS in tests: a CA made per test with rcgen and the server certificates it signs,
//! and unbound serving DNS over TLS with them (with its own statistics, to see what came in
//! over TLS and what in clear).

use std::net::Ipv4Addr;

use super::{
    Netns,
    servers::{Server, require_binary},
};

/// A CA made for one test, and the server certificates it signs. Made fresh in every run, so
/// nothing that expires is kept anywhere.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
    dir: tempfile::TempDir,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let pem = params.self_signed(&key).unwrap().pem();
        Self {
            issuer: rcgen::Issuer::new(params, key),
            pem,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// The CA certificate as a PEM file, for `--upstream-ca` or `SSL_CERT_FILE`.
    pub fn file(&self) -> String {
        let path = self.dir.path().join("ca.pem");
        std::fs::write(&path, &self.pem).unwrap();
        path.display().to_string()
    }

    /// A server certificate for `name` and its key (PEM). `expired`: valid during 2000 only.
    pub fn server_cert(&self, name: &str, expired: bool) -> (String, String) {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, date_time_ymd};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        if expired {
            params.not_before = date_time_ymd(2000, 1, 1);
            params.not_after = date_time_ymd(2001, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

impl Server {
    /// unbound serving DNS over TLS on `ip`@853 with `cert` (and plain DNS on `ip`@53, so that
    /// a query that came in clear would be answered, and counted), with unbound-control's
    /// statistics. Every name under `burst.test.` answers 192.0.2.77.
    pub fn unbound_dot(ns: &Netns, ip: Ipv4Addr, cert: &(String, String), extra: &str) -> Self {
        let extra = format!(
            "  interface: {ip}@853\n  tls-port: 853\n  tls-service-pem: \"cert.pem\"\n  \
             tls-service-key: \"key.pem\"\n  extended-statistics: yes\n  \
             local-zone: \"burst.test.\" redirect\n  \
             local-data: \"burst.test. 300 IN A 192.0.2.77\"\n{extra}"
        );
        Self::unbound_with(
            ns,
            ip,
            &[
                "www.example.test. 300 IN A 192.0.2.80",
                "mail.example.test. 300 IN A 192.0.2.81",
            ],
            &[("cert.pem", &cert.0), ("key.pem", &cert.1)],
            &extra,
            true,
        )
    }

    /// unbound's counters (`unbound-control stats_noreset`), e.g. `total.num.queries`,
    /// `num.query.tls`.
    pub fn stats(&self) -> std::collections::HashMap<String, u64> {
        let bin = require_binary("unbound-control", "unbound");
        let out = std::process::Command::new(bin)
            .arg("-c")
            .arg(self.dir.path().join("unbound.conf"))
            .arg("stats_noreset")
            .output()
            .expect("running unbound-control");
        assert!(
            out.status.success(),
            "unbound-control stats_noreset: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.trim().parse().ok()?)))
            .collect()
    }

    /// Queries unbound received, and how many of them over TLS.
    pub fn queries_and_tls(&self) -> (u64, u64) {
        let s = self.stats();
        (s["total.num.queries"], s["num.query.tls"])
    }
}
