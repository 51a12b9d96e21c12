//! A scriptable upstream DNS server for tests: runs on threads inside a namespace, answers
//! with whatever the test's behaviour function says, and counts what it saw.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, UdpSocket},
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, SOA},
    },
};

use super::Netns;

/// What the upstream does with one query.
pub enum Action {
    Reply(Message),
    /// Raw bytes, sent as they are (garbage, wrong IDs, ...).
    Raw(Vec<u8>),
    /// No reply at all.
    Drop,
    /// Several messages in order (e.g. spoofs before the real answer).
    Many(Vec<Vec<u8>>),
    /// The action after a delay, without holding up other queries.
    Delayed(Duration, Box<Action>),
}

impl Action {
    /// The datagrams (or TCP messages) this action sends, after its delay.
    fn into_messages(self) -> (Duration, Vec<Vec<u8>>) {
        match self {
            Action::Reply(r) => (Duration::ZERO, vec![r.to_vec().unwrap()]),
            Action::Raw(b) => (Duration::ZERO, vec![b]),
            Action::Drop => (Duration::ZERO, vec![]),
            Action::Many(v) => (Duration::ZERO, v),
            Action::Delayed(d, a) => {
                let (more, m) = a.into_messages();
                (d + more, m)
            }
        }
    }
}

pub type Behaviour = Arc<dyn Fn(&Message) -> Action + Send + Sync>;

/// The reply skeleton to `q`: same ID and question, RA set.
pub fn reply_to(q: &Message) -> Message {
    let mut r = Message::new(q.metadata.id, MessageType::Response, q.metadata.op_code);
    r.metadata.recursion_desired = q.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    r.add_queries(q.queries.clone());
    r
}

/// A plain resolver: `A` of any name below `example.` is 203.0.113.<n> where n is the number
/// of labels; everything else NXDOMAIN.
pub fn example_zone() -> Behaviour {
    Arc::new(|q: &Message| {
        let mut r = reply_to(q);
        let question = &q.queries[0];
        let name = question.name().to_ascii().to_ascii_lowercase();
        if name.ends_with("example.") {
            if question.query_type() == RecordType::A {
                let n = question.name().num_labels();
                r.add_answer(Record::from_rdata(
                    question.name().clone(),
                    300,
                    RData::A(A::new(203, 0, 113, n)),
                ));
            }
        } else {
            r.metadata.response_code = ResponseCode::NXDomain;
        }
        Action::Reply(r)
    })
}

/// An upstream for names below `example.org`: each of `names` (`www.example.org.`, lowercase,
/// with its TTL) has the A records 192.0.2.80 and .81, and no other type (NODATA); any other
/// name is NXDOMAIN. Every negative answer carries [`example_org_soa`].
pub fn example_org(names: &'static [(&'static str, u32)]) -> Behaviour {
    Arc::new(move |q: &Message| {
        let mut r = reply_to(q);
        let question = &q.queries[0];
        let name = question.name().to_ascii().to_ascii_lowercase();
        let ttl = names.iter().find(|(n, _)| *n == name).map(|(_, ttl)| *ttl);
        match (ttl, question.query_type()) {
            (Some(ttl), RecordType::A) => {
                for last in [80, 81] {
                    r.add_answer(Record::from_rdata(
                        question.name().clone(),
                        ttl,
                        RData::A(A::new(192, 0, 2, last)),
                    ));
                }
            }
            (Some(_), _) => {
                r.add_authority(example_org_soa());
            }
            (None, _) => {
                r.metadata.response_code = ResponseCode::NXDomain;
                r.add_authority(example_org_soa());
            }
        }
        Action::Reply(r)
    })
}

/// The SOA of `example.org` (TTL 3600, MINIMUM 120: negative answers live 120 s).
pub fn example_org_soa() -> Record {
    Record::from_rdata(
        Name::from_str("example.org.").unwrap(),
        3600,
        RData::SOA(SOA::new(
            Name::from_str("ns1.example.org.").unwrap(),
            Name::from_str("hostmaster.example.org.").unwrap(),
            1,
            7200,
            900,
            1_209_600,
            120,
        )),
    )
}

/// A running upstream. Stops when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    pub queries: Arc<AtomicU64>,
    pub seen: Arc<Mutex<Vec<Message>>>,
    /// Queries that came over TCP (also counted in `queries` and `seen`).
    pub tcp_queries: Arc<AtomicU64>,
    pub seen_tcp: Arc<Mutex<Vec<Message>>>,
    stop: Arc<AtomicBool>,
}

impl Upstream {
    pub fn start(ns: &Netns, addr: SocketAddr, behaviour: Behaviour) -> Self {
        Self::start_with_tcp(ns, addr, behaviour.clone(), behaviour)
    }

    /// An upstream that behaves one way over UDP and another over TCP (e.g. truncating UDP
    /// answers).
    pub fn start_with_tcp(
        ns: &Netns,
        addr: SocketAddr,
        behaviour: Behaviour,
        tcp_behaviour: Behaviour,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let queries = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tcp_queries = Arc::new(AtomicU64::new(0));
        let seen_tcp = Arc::new(Mutex::new(Vec::new()));
        let (udp, tcp) = ns.enter(move || {
            let udp = UdpSocket::bind(addr).expect("upstream UDP bind");
            let tcp = TcpListener::bind(addr).expect("upstream TCP bind");
            (udp, tcp)
        });
        udp.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        tcp.set_nonblocking(true).unwrap();
        {
            let (stop, queries, seen, behaviour) = (
                stop.clone(),
                queries.clone(),
                seen.clone(),
                behaviour.clone(),
            );
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65535];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, peer)) = udp.recv_from(&mut buf) else {
                        continue;
                    };
                    queries.fetch_add(1, Ordering::Relaxed);
                    let Ok(q) = Message::from_vec(&buf[..n]) else {
                        continue;
                    };
                    seen.lock().unwrap().push(q.clone());
                    let (delay, messages) = behaviour(&q).into_messages();
                    if delay.is_zero() {
                        for m in messages {
                            let _ = udp.send_to(&m, peer);
                        }
                    } else {
                        let udp = udp.try_clone().unwrap();
                        std::thread::spawn(move || {
                            std::thread::sleep(delay);
                            for m in messages {
                                let _ = udp.send_to(&m, peer);
                            }
                        });
                    }
                }
            });
        }
        {
            let (stop, queries, seen, tcp_queries, seen_tcp, behaviour) = (
                stop.clone(),
                queries.clone(),
                seen.clone(),
                tcp_queries.clone(),
                seen_tcp.clone(),
                tcp_behaviour,
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut s, _)) = tcp.accept() else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    let mut len = [0u8; 2];
                    if s.read_exact(&mut len).is_err() {
                        continue;
                    }
                    let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
                    if s.read_exact(&mut msg).is_err() {
                        continue;
                    }
                    queries.fetch_add(1, Ordering::Relaxed);
                    tcp_queries.fetch_add(1, Ordering::Relaxed);
                    let Ok(q) = Message::from_vec(&msg) else {
                        continue;
                    };
                    seen.lock().unwrap().push(q.clone());
                    seen_tcp.lock().unwrap().push(q.clone());
                    let (delay, messages) = behaviour(&q).into_messages();
                    std::thread::sleep(delay);
                    for bytes in messages {
                        let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
                        framed.extend_from_slice(&bytes);
                        let _ = s.write_all(&framed);
                    }
                }
            });
        }
        Self {
            addr,
            queries,
            seen,
            tcp_queries,
            seen_tcp,
            stop,
        }
    }

    pub fn query_count(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    /// Queries for `name` (any type, case-insensitive, trailing dot optional), over UDP and TCP.
    /// Unlike [`Self::query_count`], this leaves out the agent's own health checks and loop
    /// probes.
    pub fn queries_for(&self, name: &str) -> usize {
        count_name(&self.seen.lock().unwrap(), name)
    }

    /// The same over TCP only.
    pub fn tcp_queries_for(&self, name: &str) -> usize {
        count_name(&self.seen_tcp.lock().unwrap(), name)
    }
}

fn count_name(seen: &[Message], name: &str) -> usize {
    let want = name.trim_end_matches('.').to_ascii_lowercase();
    seen.iter()
        .filter(|m| {
            m.queries.first().is_some_and(|q| {
                q.name()
                    .to_ascii()
                    .trim_end_matches('.')
                    .to_ascii_lowercase()
                    == want
            })
        })
        .count()
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
