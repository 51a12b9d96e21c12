//! The userspace query path: any bytes in, a well-formed reply or nothing out, never a panic.
//! The handler is the agent's own, on the example cluster, with no upstream (names outside the
//! cluster end in SERVFAIL through the forwarder, the cache and its failure memory).
#![no_main]

use std::sync::{Arc, OnceLock, RwLock};

use dns_agent::{
    dns::{self, Reject},
    metrics::Metrics,
    server::{
        Handler, Transport,
        cache::{Cache, CacheSettings},
        external::ExternalResolver,
        forward::{ForwardSettings, Forwarder, Policy, Timeouts},
        limits::{LimitSettings, Limits},
    },
};
use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;

/// The pod every message comes from.
const CLIENT: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

struct Agent {
    handler: Handler,
    runtime: tokio::runtime::Runtime,
}

fn agent() -> &'static Agent {
    static AGENT: OnceLock<Agent> = OnceLock::new();
    AGENT.get_or_init(|| {
        let metrics = Arc::new(Metrics::default());
        let settings = ForwardSettings {
            policy: Policy::Random,
            timeouts: Timeouts {
                attempt: std::time::Duration::from_secs(1),
                total: std::time::Duration::from_millis(1900),
            },
            force_tcp: false,
            max_concurrent: 1000,
            health_check: std::time::Duration::from_millis(500),
            max_fails: 2,
            tls: None,
        };
        let forwarder = Arc::new(Forwarder::new(Vec::new(), settings, metrics.clone()));
        let cache = Cache::new(
            CacheSettings {
                capacity: 1000,
                min_ttl: 5,
                max_ttl: 3600,
                negative_max_ttl: 1800,
                servfail_ttl: 5,
                prefetch: 10,
                serve_stale: std::time::Duration::from_secs(3600),
            },
            metrics.cache.clone(),
        );
        let external = Arc::new(ExternalResolver::new(forwarder, cache, metrics.clone()));
        let limits = Arc::new(Limits::new(
            LimitSettings::default(),
            metrics.limits.clone(),
        ));
        Agent {
            handler: Handler::new(
                Arc::new(RwLock::new(xdns_fuzz::zone_from(
                    xdns_fuzz::example_objects(),
                ))),
                external,
                metrics,
                dns_agent::server::heartbeat::Probe::new("cluster.local"),
            )
            .with_limits(limits),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime"),
        }
    })
}

fuzz_target!(|msg: &[u8]| {
    let agent = agent();
    let parsed = dns::parse_query(msg);
    for transport in [Transport::Udp, Transport::Tcp] {
        let reply = match agent.handler.handle_now(msg, transport, CLIENT) {
            Ok(r) => r,
            Err(pending) => Some(agent.runtime.block_on(agent.handler.finish(pending))),
        };
        let reply = match (&parsed, reply) {
            (Err(Reject::Drop), None) => continue,
            (Err(Reject::Drop), Some(r)) => panic!("a dropped message got a reply: {r:02x?}"),
            (_, None) => panic!("no reply to a message that deserves one"),
            (_, Some(r)) => r,
        };
        assert!(reply.len() >= 12, "reply shorter than a header");
        assert_eq!(reply[..2], msg[..2], "reply ID");
        assert!(reply[2] & 0x80 != 0, "QR set");
        let m = Message::from_vec(&reply)
            .unwrap_or_else(|e| panic!("the reply does not parse ({e}): {reply:02x?}"));
        if let Ok(q) = &parsed {
            if transport == Transport::Udp {
                assert!(
                    reply.len() <= q.udp_limit(),
                    "{} bytes over UDP to a client taking {}",
                    reply.len(),
                    q.udp_limit()
                );
            }
            assert_eq!(m.queries.len(), 1, "the question is echoed");
            assert_eq!(
                &reply[12..12 + q.question.len()],
                q.question,
                "question bytes"
            );
            assert_eq!(
                m.edns.is_some(),
                q.edns.is_some(),
                "an OPT exactly when the query had one"
            );
            assert_eq!(reply[2] & 0x01, msg[2] & 0x01, "RD copied from the query");
        }
    }
});
