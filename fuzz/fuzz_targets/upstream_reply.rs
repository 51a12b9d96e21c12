//! Upstream replies, as the forwarder handles them: parse and match against the query sent
//! (RFC 5452), keep as a cache entry, cache, and serve to a client that asked the same question
//! in another case. What the client gets must hold the upstream's records, TTLs aside.
#![no_main]

use std::{sync::Arc, time::Instant};

use dns_agent::{
    dns,
    metrics::CacheCounters,
    server::{
        cache::{Answer, Cache, CacheSettings, Lookup, cache_ttl},
        forward::{Question, matches, query_message},
        reply_from_answer, reply_from_upstream,
    },
    zone::name::wire_from_labels,
};
use hickory_proto::{
    op::Message,
    rr::{Record, RecordType},
};
use libfuzzer_sys::fuzz_target;

fn settings() -> CacheSettings {
    CacheSettings {
        capacity: 4,
        min_ttl: 5,
        max_ttl: 3600,
        negative_max_ttl: 1800,
        servfail_ttl: 5,
        prefetch: 10,
        serve_stale: std::time::Duration::from_secs(3600),
    }
}

/// Records with their TTLs set to `ttl` (when given): what the client is served.
fn served(records: &[Record], ttl: Option<u32>) -> Vec<Record> {
    records
        .iter()
        .map(|r| {
            let mut r = r.clone();
            if let Some(t) = ttl {
                r.ttl = t;
            }
            r
        })
        .collect()
}

fn same_sections(what: &str, got: &Message, upstream: &Message, ttl: Option<u32>) {
    assert_eq!(
        got.answers,
        served(&upstream.answers, ttl),
        "{what}: answer section"
    );
    assert_eq!(
        got.authorities,
        served(&upstream.authorities, ttl),
        "{what}: authority section"
    );
    // A TSIG signs the upstream's message, not the data (RFC 8945): the cache drops it where it
    // ends the section, and no client is served it.
    let mut additionals = upstream.additionals.as_slice();
    while let [rest @ .., last] = additionals
        && last.record_type() == RecordType::TSIG
    {
        additionals = rest;
    }
    assert_eq!(
        got.additionals,
        served(additionals, ttl),
        "{what}: additional section"
    );
}

fuzz_target!(|data: &[u8]| {
    // What the UDP exchange does with a datagram: ignore what does not parse or match.
    let Ok(upstream) = Message::from_vec(data) else {
        return;
    };
    let Some(asked) = upstream.queries.first() else {
        return;
    };
    let labels: Vec<&[u8]> = asked.name().iter().collect();
    let question = Question {
        name: wire_from_labels(&labels),
        qtype: u16::from(asked.query_type()),
        qclass: u16::from(asked.query_class()),
        dnssec_ok: data.len() % 2 == 0,
        checking_disabled: upstream.metadata.checking_disabled,
        upstream_set: Default::default(),
    };
    if matches!(
        RecordType::from(question.qtype),
        RecordType::OPT | RecordType::AXFR | RecordType::IXFR | RecordType::ANY
    ) {
        return;
    }
    let mut sent = query_message(&question);
    sent.metadata.id = upstream.metadata.id;
    if !matches(&sent, &upstream) {
        return;
    }
    // What the flight keeps (a failure here is a SERVFAIL to the client).
    let Ok(answer) = Answer::from_upstream(data, &upstream) else {
        return;
    };
    assert_eq!(
        answer.ttl_offsets.len(),
        (answer.ancount + answer.nscount + answer.arcount) as usize,
        "a TTL offset per record kept"
    );
    let answer = Arc::new(answer);
    let ttl = cache_ttl(&upstream, &settings());
    if let Some((ttl, kind)) = ttl {
        let cache = Cache::new(settings(), Arc::new(CacheCounters::default()));
        let now = Instant::now();
        cache.insert(&question, answer.clone(), ttl, kind, now);
        match cache.lookup(&question, now) {
            Lookup::Hit { answer: hit, .. } => assert_eq!(hit, answer),
            other => panic!("just cached, then {other:?}"),
        }
    }
    let ttl = ttl.map(|(t, _)| t);

    // The client asked the same question in capitals, with EDNS when DO is asked.
    let mut qwire = Vec::new();
    for l in &labels {
        qwire.push(l.len() as u8);
        qwire.extend(l.iter().map(u8::to_ascii_uppercase));
    }
    qwire.push(0);
    qwire.extend_from_slice(&question.qtype.to_be_bytes());
    qwire.extend_from_slice(&question.qclass.to_be_bytes());
    let edns = question.dnssec_ok.then_some((4096, true));
    let client = xdns_fuzz::query_bytes(0x4242, 0x0100, &qwire, edns);
    let Ok(q) = dns::parse_query(&client) else {
        // Names the client could not have sent (hickory takes labels a query cannot carry).
        return;
    };
    for limit in [Some(q.udp_limit()), None] {
        let reply = reply_from_answer(&q, &answer, ttl, limit);
        let m = Message::from_vec(&reply).unwrap_or_else(|e| {
            panic!("the client's reply does not parse ({e}); upstream {data:02x?}")
        });
        assert_eq!(m.metadata.id, 0x4242);
        assert_eq!(&reply[12..12 + q.question.len()], q.question, "question");
        if let Some(l) = limit {
            assert!(
                reply.len() <= l,
                "{} bytes over a limit of {l}",
                reply.len()
            );
        }
        if !m.metadata.truncation {
            same_sections("client reply", &m, &upstream, ttl);
        }
    }
    // An answer that is an alias target's: rebuilt as a message, then re-encoded.
    let rebuilt = answer
        .to_message(&question, ttl)
        .unwrap_or_else(|| panic!("a kept answer does not rebuild; upstream {data:02x?}"));
    same_sections("rebuilt", &rebuilt, &upstream, ttl);
    let reply = reply_from_upstream(&q, &rebuilt, Vec::new(), None);
    Message::from_vec(&reply).expect("an alias answer parses");
});
