//! A scriptable upstream DNS server for tests: runs on threads inside a namespace, answers
//! with whatever the test's behaviour function says, and counts what it saw.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{RData, Record, RecordType, rdata::A},
};

use super::Netns;

/// What the upstream does with one query.
pub enum Action {
    Reply(Message),
    /// Raw bytes, sent as they are (garbage, wrong IDs, ...).
    Raw(Vec<u8>),
    /// No reply at all.
    Drop,
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

/// A running upstream. Stops when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    pub queries: Arc<AtomicU64>,
    pub seen: Arc<Mutex<Vec<Message>>>,
    stop: Arc<AtomicBool>,
}

impl Upstream {
    pub fn start(ns: &Netns, addr: SocketAddr, behaviour: Behaviour) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let queries = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
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
                    match behaviour(&q) {
                        Action::Reply(r) => {
                            let _ = udp.send_to(&r.to_vec().unwrap(), peer);
                        }
                        Action::Raw(b) => {
                            let _ = udp.send_to(&b, peer);
                        }
                        Action::Drop => {}
                    }
                }
            });
        }
        {
            let (stop, queries, seen) = (stop.clone(), queries.clone(), seen.clone());
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
                    let Ok(q) = Message::from_vec(&msg) else {
                        continue;
                    };
                    seen.lock().unwrap().push(q.clone());
                    let bytes = match behaviour(&q) {
                        Action::Reply(r) => r.to_vec().unwrap(),
                        Action::Raw(b) => b,
                        Action::Drop => continue,
                    };
                    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&bytes);
                    let _ = s.write_all(&framed);
                }
            });
        }
        Self {
            addr,
            queries,
            seen,
            stop,
        }
    }

    pub fn query_count(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
