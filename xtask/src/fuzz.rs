//! `cargo xtask fuzz`: every cargo-fuzz target of `fuzz/` for a time, then the differential
//! fuzzer of the XDP program (`tests/xdp_fuzz.rs`) for a number of frames. Fails on any crash.
//! `--write-corpora` regenerates the committed seed corpora from real queries, replies and
//! cluster objects.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};
use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData, Record, RecordType, rdata},
};

use crate::util::{cmd, require_root, root, run};

/// The cargo-fuzz targets, in `fuzz/fuzz_targets/`.
pub const TARGETS: &[&str] = &[
    "query",
    "upstream_reply",
    "zone_file",
    "api_object",
    "kernel_entry",
];

pub struct Options {
    /// Seconds per cargo-fuzz target.
    pub time: u64,
    /// Frames of the XDP differential fuzzer; 0: skip it.
    pub frames: u64,
    /// Only these targets (all when empty).
    pub targets: Vec<String>,
}

/// Builds the targets with the pinned nightly (libFuzzer needs sanitizer coverage, a nightly
/// flag). No sanitizer: the code under test is safe Rust, and ASan would halve the executions.
fn cargo_fuzz(subcommand: &str) -> anyhow::Result<Command> {
    let nightly = dns_ebpf_build::Toolchain::pinned()?;
    let mut c = nightly.command("cargo");
    c.current_dir(root())
        .args(["fuzz", subcommand, "--sanitizer", "none"]);
    Ok(c)
}

pub fn fuzz(opts: Options) -> anyhow::Result<()> {
    crate::setup::setup(crate::setup::Scope::All)?;
    let targets: Vec<&str> = if opts.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in &opts.targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!("--target {t}: no such fuzz target (there are {TARGETS:?})");
            }
        }
        opts.targets.iter().map(String::as_str).collect()
    };
    if opts.time > 0 {
        run(&mut cargo_fuzz("build")?).context("building the fuzz targets")?;
        let mut summary = Vec::new();
        for target in &targets {
            summary.push(run_target(target, opts.time)?);
        }
        println!("fuzz: cargo-fuzz targets, {} s each:", opts.time);
        for s in &summary {
            println!("  {s}");
        }
    }
    if opts.frames > 0 {
        require_root("the XDP differential fuzzer (it loads the XDP program)")?;
        let started = Instant::now();
        run(cmd("cargo")
            .current_dir(root())
            .args([
                "test",
                "-p",
                "dns-agent",
                "--test",
                "xdp_fuzz",
                "--",
                "--nocapture",
            ])
            .env("XDNS_FUZZ_FRAMES", opts.frames.to_string()))
        .context("the XDP differential fuzzer failed: the frame's seed is printed above")?;
        println!(
            "fuzz: XDP differential fuzzer: {} frames passed in {:.0} s (with the build)",
            opts.frames,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Runs one target for `seconds` on a scratch corpus (new inputs land there, in target/) seeded
/// with the committed one; returns a line of figures from libFuzzer's final stats.
fn run_target(target: &str, seconds: u64) -> anyhow::Result<String> {
    let root = root();
    let scratch = root.join("target/fuzz-corpus").join(target);
    fs::create_dir_all(&scratch)?;
    let seeds = root.join("fuzz/corpus").join(target);
    let log_path = root
        .join("target/fuzz-corpus")
        .join(format!("{target}.log"));
    let mut c = cargo_fuzz("run")?;
    c.arg(target)
        .arg(&scratch)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .args(["-print_final_stats=1", "-timeout=10"])
        .stdout(Stdio::inherit())
        .stderr(fs::File::create(&log_path)?);
    eprintln!(
        "+ cargo fuzz run {target} ({seconds} s; log: {})",
        log_path.display()
    );
    let status = c.status().context("starting cargo fuzz")?;
    let log = fs::read_to_string(&log_path).unwrap_or_default();
    if !status.success() {
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "fuzz target {target} failed ({status}); the input is in fuzz/artifacts/{target}/ \
             (replay: `rustup run {} cargo fuzz run --sanitizer none {target} <file>`):\n{}",
            dns_ebpf_build::Toolchain::pinned()?,
            tail.join("\n")
        );
    }
    let stat = |key: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{key}:")))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    let corpus = fs::read_dir(&scratch).map(|d| d.count()).unwrap_or(0);
    Ok(format!(
        "{target}: {} executions ({}/s), {} new corpus entries kept in {}",
        stat("number_of_executed_units"),
        stat("average_exec_per_sec"),
        corpus,
        scratch.display()
    ))
}

// ---------------------------------------------------------------------------------------------
// Seed corpora.

fn write(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    fs::write(dir.join(name), bytes).with_context(|| format!("writing {}", dir.display()))
}

fn fresh_dir(target: &str) -> anyhow::Result<PathBuf> {
    let dir = root().join("fuzz/corpus").join(target);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Writes every target's seed corpus under `fuzz/corpus/<target>/`.
pub fn write_corpora() -> anyhow::Result<()> {
    queries(&fresh_dir("query")?)?;
    replies(&fresh_dir("upstream_reply")?)?;
    let zones = zones()?;
    for target in ["zone_file", "kernel_entry"] {
        let dir = fresh_dir(target)?;
        for (name, text) in &zones {
            write(&dir, name, text.as_bytes())?;
        }
    }
    watch_events(&fresh_dir("api_object")?)?;
    println!("fuzz: seed corpora written to fuzz/corpus/");
    Ok(())
}

fn name(s: &str) -> Name {
    Name::from_ascii(s).expect("a seed name")
}

/// A query as dig sends it.
fn query(id: u16, qname: &str, qtype: RecordType, edns: Option<(u16, bool)>) -> Message {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name(qname), qtype));
    if let Some((size, dnssec_ok)) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        e.set_dnssec_ok(dnssec_ok);
        m.set_edns(e);
    }
    m
}

fn queries(dir: &Path) -> anyhow::Result<()> {
    use RecordType::*;
    let questions = [
        ("web.shop.svc.cluster.local.", A),
        ("Web.Shop.SVC.cluster.local.", AAAA),
        ("_http._tcp.web.shop.svc.cluster.local.", SRV),
        ("postgres.shop.svc.cluster.local.", A),
        ("postgres-0.postgres.shop.svc.cluster.local.", A),
        ("10-244-1-41.cache.shop.svc.cluster.local.", A),
        ("payments.shop.svc.cluster.local.", A),
        ("dns-version.cluster.local.", TXT),
        ("cluster.local.", SOA),
        ("cluster.local.", NS),
        ("10.0.96.10.in-addr.arpa.", PTR),
        (
            "4.1.a.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.0.d.f.ip6.arpa.",
            PTR,
        ),
        ("www.example.com.shop.svc.cluster.local.", A),
        ("10-1-2-3.shop.pod.cluster.local.", A),
        ("kubernetes.default.svc.cluster.local.", MX),
        ("www.example.com.", A),
        ("cluster.local.", AXFR),
        ("web.shop.svc.cluster.local.", ANY),
    ];
    for (i, (qname, qtype)) in questions.iter().enumerate() {
        let edns = match i % 3 {
            0 => None,
            1 => Some((1232, false)),
            _ => Some((4096, true)),
        };
        let m = query(0x1000 + i as u16, qname, *qtype, edns);
        write(dir, &format!("{qname}{qtype}"), &m.to_vec()?)?;
    }
    // What userspace answers with an error.
    let base = query(7, "web.shop.svc.cluster.local.", A, Some((1232, false))).to_vec()?;
    let mut notify = base.clone();
    notify[2] |= 4 << 3;
    write(dir, "error-notify", &notify)?;
    let mut version1 = base.clone();
    let n = version1.len();
    version1[n - 5] = 1;
    write(dir, "error-edns-version-1", &version1)?;
    let mut chaos = query(8, "version.bind.", TXT, None).to_vec()?;
    let n = chaos.len();
    chaos[n - 1] = 3;
    write(dir, "error-class-ch", &chaos)?;
    let mut trailing = base;
    trailing.extend_from_slice(&[0, 0]);
    write(dir, "error-trailing", &trailing)?;
    Ok(())
}

fn record(owner: &str, ttl: u32, data: RData) -> Record {
    Record::from_rdata(name(owner), ttl, data)
}

fn soa(zone: &str) -> Record {
    record(
        zone,
        900,
        RData::SOA(rdata::SOA::new(
            name(&format!("ns1.{zone}")),
            name(&format!("hostmaster.{zone}")),
            2024010101,
            7200,
            900,
            1209600,
            300,
        )),
    )
}

/// A reply to `q` as an upstream resolver sends it.
fn reply(
    q: &Message,
    rcode: ResponseCode,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
) -> Message {
    let mut m = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.metadata.recursion_available = true;
    m.metadata.response_code = rcode;
    m.add_queries(q.queries.clone());
    m.insert_answers(answers);
    m.insert_authorities(authorities);
    m.insert_additionals(additionals);
    if q.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m
}

fn replies(dir: &Path) -> anyhow::Result<()> {
    use RecordType::*;
    let a = |owner: &str, ip: [u8; 4]| {
        record(owner, 300, RData::A(rdata::A(std::net::Ipv4Addr::from(ip))))
    };
    let q = |qname: &str, qtype| query(0x2345, qname, qtype, Some((1232, false)));
    let cases: Vec<(&str, Message)> = vec![
        (
            "a",
            reply(
                &q("www.example.com.", A),
                ResponseCode::NoError,
                vec![
                    a("www.example.com.", [192, 0, 2, 1]),
                    a("www.example.com.", [192, 0, 2, 2]),
                ],
                vec![],
                vec![],
            ),
        ),
        (
            "aaaa",
            reply(
                &q("www.example.com.", AAAA),
                ResponseCode::NoError,
                vec![record(
                    "www.example.com.",
                    60,
                    RData::AAAA(rdata::AAAA(std::net::Ipv6Addr::new(
                        0x2001, 0xdb8, 0, 0, 0, 0, 0, 1,
                    ))),
                )],
                vec![],
                vec![],
            ),
        ),
        (
            "cname-chain",
            reply(
                &q("www.example.net.", A),
                ResponseCode::NoError,
                vec![
                    record(
                        "www.example.net.",
                        3600,
                        RData::CNAME(rdata::CNAME(name("edge.example.net."))),
                    ),
                    record(
                        "edge.example.net.",
                        20,
                        RData::CNAME(rdata::CNAME(name("edge.cdn.example.org."))),
                    ),
                    a("edge.cdn.example.org.", [198, 51, 100, 7]),
                ],
                vec![],
                vec![],
            ),
        ),
        (
            "nxdomain",
            reply(
                &q("nope.example.com.", A),
                ResponseCode::NXDomain,
                vec![],
                vec![soa("example.com.")],
                vec![],
            ),
        ),
        (
            "nodata",
            reply(
                &q("www.example.com.", MX),
                ResponseCode::NoError,
                vec![],
                vec![soa("example.com.")],
                vec![],
            ),
        ),
        (
            "servfail",
            reply(
                &q("broken.example.", A),
                ResponseCode::ServFail,
                vec![],
                vec![],
                vec![],
            ),
        ),
        (
            "mx-with-glue",
            reply(
                &q("example.com.", MX),
                ResponseCode::NoError,
                vec![record(
                    "example.com.",
                    3600,
                    RData::MX(rdata::MX::new(10, name("mail.example.com."))),
                )],
                vec![record(
                    "example.com.",
                    3600,
                    RData::NS(rdata::NS(name("ns1.example.com."))),
                )],
                vec![
                    a("mail.example.com.", [192, 0, 2, 25]),
                    a("ns1.example.com.", [192, 0, 2, 53]),
                ],
            ),
        ),
        (
            "txt",
            reply(
                &q("example.com.", TXT),
                ResponseCode::NoError,
                vec![record(
                    "example.com.",
                    300,
                    RData::TXT(rdata::TXT::new(vec!["v=spf1 -all".into(), "x".repeat(200)])),
                )],
                vec![],
                vec![],
            ),
        ),
        (
            "srv",
            reply(
                &q("_sip._udp.example.com.", SRV),
                ResponseCode::NoError,
                vec![record(
                    "_sip._udp.example.com.",
                    300,
                    RData::SRV(rdata::SRV::new(10, 60, 5060, name("sip.example.com."))),
                )],
                vec![],
                vec![a("sip.example.com.", [192, 0, 2, 60])],
            ),
        ),
        (
            "ptr",
            reply(
                &q("1.2.0.192.in-addr.arpa.", PTR),
                ResponseCode::NoError,
                vec![record(
                    "1.2.0.192.in-addr.arpa.",
                    86400,
                    RData::PTR(rdata::PTR(name("host.example.com."))),
                )],
                vec![],
                vec![],
            ),
        ),
        (
            "many-a",
            reply(
                &q("pool.example.com.", A),
                ResponseCode::NoError,
                (0..60)
                    .map(|i| a("pool.example.com.", [203, 0, 113, i]))
                    .collect(),
                vec![],
                vec![],
            ),
        ),
    ];
    for (label, m) in cases {
        write(dir, label, &m.to_vec()?)?;
        if label == "a" {
            let mut tc = m.clone();
            tc.metadata.truncation = true;
            tc.answers.clear();
            write(dir, "truncated", &tc.to_vec()?)?;
        }
    }
    // Hand-made: an OPT before the last additional record, which the cache re-encodes away.
    let mut msg = vec![0x23, 0x45, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 2];
    msg.extend_from_slice(b"\x03www\x07example\x00\x00\x01\x00\x01");
    msg.extend_from_slice(&[0, 0, 41, 4, 0xd0, 0, 0, 0, 0, 0, 0]);
    msg.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 9]);
    write(dir, "opt-in-the-middle", &msg)?;
    Ok(())
}

/// Zone files: the example cluster, parts of it, and shapes it lacks (many endpoints,
/// dual-stack slices, long names, the List form), plus a few the parser must refuse.
fn zones() -> anyhow::Result<Vec<(String, String)>> {
    let example = fs::read_to_string(root().join("deploy/examples/cluster.yaml"))?;
    let mut out = vec![("example-cluster.yaml".to_string(), example.clone())];
    for (i, doc) in example.split("\n---\n").enumerate() {
        out.push((format!("example-doc-{i:02}.yaml"), doc.to_string()));
    }
    let endpoints: String = (0..40)
        .map(|i| format!("- addresses: [10.250.0.{}]\n", i + 1))
        .collect();
    out.push((
        "headless-40.yaml".into(),
        format!(
            "kind: Service\nmetadata: {{name: bulk, namespace: shop}}\nspec: {{clusterIP: None}}\n---\n\
             kind: EndpointSlice\nmetadata: {{name: bulk-1, namespace: shop, labels: {{kubernetes.io/service-name: bulk}}}}\n\
             addressType: IPv4\nports: [{{name: db, port: 5432}}]\nendpoints:\n{endpoints}"
        ),
    ));
    let long = "a".repeat(63);
    out.push((
        "long-names.yaml".into(),
        format!(
            "kind: Service\nmetadata: {{name: {long}, namespace: {long}}}\nspec: {{clusterIP: 10.96.0.99, ports: [{{name: abcdefghijklmno, port: 1, protocol: SCTP}}]}}\n---\n\
             kind: EndpointSlice\nmetadata: {{name: s, namespace: {long}, labels: {{kubernetes.io/service-name: {long}}}}}\n\
             addressType: IPv6\nports: [{{name: abcdefghijklmno, port: 1, protocol: SCTP}}]\n\
             endpoints:\n- addresses: [\"fd00::1\"]\n  hostname: {long}\n"
        ),
    ));
    out.push((
        "list.yaml".into(),
        "kind: List\nitems:\n- kind: Namespace\n  metadata: {name: team}\n- kind: Service\n  metadata: {name: api, namespace: team}\n  spec: {clusterIP: 10.96.5.5, clusterIPs: [10.96.5.5, \"fd00:96::5\"], ports: [{port: 443}]}\n".into(),
    ));
    out.push((
        "external-chain.yaml".into(),
        "kind: Service\nmetadata: {name: a, namespace: x}\nspec: {type: ExternalName, externalName: b.x.svc.cluster.local}\n---\n\
         kind: Service\nmetadata: {name: b, namespace: x}\nspec: {type: ExternalName, externalName: a.x.svc.cluster.local.}\n---\n\
         kind: Service\nmetadata: {name: c, namespace: x}\nspec: {type: ExternalName, externalName: web.shop.svc.cluster.local}\n".into(),
    ));
    out.push((
        "invalid-ip.yaml".into(),
        "kind: Service\nmetadata: {name: bad, namespace: x}\nspec: {clusterIP: 10.96.0.300}\n"
            .into(),
    ));
    out.push((
        "invalid-kind.yaml".into(),
        "kind: Pod\nmetadata: {name: p}\n".into(),
    ));
    Ok(out)
}

/// Watch events as the API server streams them (`{"type": ..., "object": ...}`), made from the
/// example cluster's objects.
fn watch_events(dir: &Path) -> anyhow::Result<()> {
    let example = fs::read_to_string(root().join("deploy/examples/cluster.yaml"))?;
    let objects: Vec<serde_json::Value> =
        serde_saphyr::from_multiple::<serde_json::Value>(&example)?
            .into_iter()
            .filter(|v| !v.is_null())
            .collect();
    let event = |t: &str, o: &serde_json::Value| serde_json::json!({"type": t, "object": o});
    for (i, o) in objects.iter().enumerate() {
        let kind = o["kind"].as_str().unwrap_or("object").to_lowercase();
        let events = serde_json::json!([event("ADDED", o), event("DELETED", o)]);
        write(
            dir,
            &format!("{i:02}-{kind}"),
            &serde_json::to_vec(&events)?,
        )?;
        // A change of the object: a Service moves, a slice's first endpoint turns unready.
        let mut changed = o.clone();
        if kind == "service" && changed["spec"]["clusterIP"].is_string() {
            changed["spec"]["clusterIP"] = "10.96.77.77".into();
            changed["spec"]["clusterIPs"] = serde_json::json!(["10.96.77.77"]);
        } else if kind == "endpointslice" {
            changed["endpoints"][0]["conditions"] = serde_json::json!({"ready": false});
        } else {
            continue;
        }
        let events = serde_json::json!([event("MODIFIED", &changed)]);
        write(
            dir,
            &format!("{i:02}-{kind}-modified"),
            &serde_json::to_vec(&events)?,
        )?;
    }
    Ok(())
}
