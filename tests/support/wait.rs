//! Bounded waits for answers to change, and the check that the kernel gives them.

use std::time::{Duration, Instant};

use hickory_proto::{
    op::{Message, ResponseCode},
    rr::RecordType,
};

use super::{Agent, Client, answers};

/// What a query should get.
#[derive(Debug)]
pub enum Want<'a> {
    /// NOERROR with these answer rdata (sorted, as [`answers`] prints them).
    Records(&'a [&'a str]),
    /// NOERROR, no answer: the name exists, the type does not.
    Nodata,
    Nxdomain,
}

impl Want<'_> {
    pub fn matches(&self, m: &Message) -> bool {
        match self {
            Want::Records(want) => {
                m.metadata.response_code == ResponseCode::NoError && answers(m) == *want
            }
            Want::Nodata => {
                m.metadata.response_code == ResponseCode::NoError && m.answers.is_empty()
            }
            Want::Nxdomain => m.metadata.response_code == ResponseCode::NXDomain,
        }
    }
}

/// Polls until `f` gives `Some`, at most `timeout`.
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (at most `timeout`) until `name`/`qtype` gets `want`, then asserts that the kernel
/// gives it (see [`assert_kernel_answers`]).
pub fn await_kernel(
    agent: &Agent,
    client: &Client,
    name: &str,
    qtype: RecordType,
    want: Want,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let m = client.query(name, qtype, true);
        if want.matches(&m) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{name} {qtype}: wanted {want:?} within {timeout:?}, last reply {:?} {:?}",
            m.metadata.response_code,
            answers(&m)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_kernel_answers(agent, client, name, qtype, &want);
}

/// One query that must get `want` from the XDP program: its counter moves, userspace's
/// does not.
pub fn assert_kernel_answers(
    agent: &Agent,
    client: &Client,
    name: &str,
    qtype: RecordType,
    want: &Want,
) {
    let kernel = agent.kernel_answered();
    let user = agent.userspace_answers();
    let m = client.query(name, qtype, true);
    assert!(
        want.matches(&m),
        "{name} {qtype}: {:?} {:?}, wanted {want:?}",
        m.metadata.response_code,
        answers(&m)
    );
    assert!(
        m.metadata.authoritative,
        "{name}: answers from the zone are authoritative"
    );
    assert_eq!(
        agent.kernel_answered(),
        kernel + 1,
        "{name} {qtype}: the kernel answered"
    );
    assert_eq!(
        agent.userspace_answers(),
        user,
        "{name} {qtype}: userspace did not"
    );
}
