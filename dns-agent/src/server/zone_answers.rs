//! Zone answers encoded once: the header bits and sections the zone gives for a (name, type),
//! kept by every thread that answers queries, so that a question asked again costs a hash
//! lookup and a copy instead of a resolution and an encoding with hickory-proto. The client's
//! header, question and OPT record are spliced around them as the XDP program does, by the same
//! [`build_reply_into`](crate::dns::build_reply_into): the bytes are the ones answered before.
//!
//! Kept per thread (each UDP loop, each runtime worker): a hit takes no lock and writes no
//! shared memory. Each copy follows the zone model's generation: once the model has changed,
//! the names the change touched ([`ZoneModel::changed_since`]) are dropped before the next
//! answer is taken from it, or everything when the model no longer remembers that far back.
//! Only answers that change with their own name alone are kept
//! ([`ZoneModel::answer_follows_name`]).

use std::{cell::RefCell, collections::HashMap};

use crate::{
    dns::Body,
    zone::{Sections, ZoneModel, ZoneVersion},
};

/// Names kept per thread; beyond, an arbitrary one makes room. An entry is a few hundred
/// bytes: about a megabyte per thread at most.
pub const NAMES_PER_THREAD: usize = 4096;

/// The part of a zone answer every client asking (name, type) gets.
#[derive(Debug)]
pub struct Encoded {
    flags: u16,
    ancount: u16,
    nscount: u16,
    arcount: u16,
    data: Box<[u8]>,
}

impl Encoded {
    /// A positive answer, its sections taken as they are.
    pub fn from_sections(flags: u16, sections: Sections) -> Self {
        Self {
            flags,
            ancount: sections.ancount,
            nscount: sections.nscount,
            arcount: sections.arcount,
            data: sections.data.into_boxed_slice(),
        }
    }

    pub fn new(body: Body<'_>) -> Self {
        Self {
            flags: body.flags,
            ancount: body.ancount,
            nscount: body.nscount,
            arcount: body.arcount,
            data: body.data.into(),
        }
    }

    pub fn body(&self) -> Body<'_> {
        Body::sections(
            self.flags,
            self.ancount,
            self.nscount,
            self.arcount,
            &self.data,
        )
    }
}

#[derive(Default)]
struct PerThread {
    /// The model these answers came from ([`ZoneVersion::id`]), and its generation then.
    model: u64,
    generation: u64,
    /// Lowercased wire name → its types' answers (a name is asked for one or two types).
    names: HashMap<Box<[u8]>, Vec<(u16, Encoded)>>,
}

thread_local! {
    static ANSWERS: RefCell<PerThread> = RefCell::new(PerThread::default());
}

/// Runs `f` on this thread's answer for (`qname`, `qtype`) if it is there and the model has
/// not changed since it was kept. No lock: this is the hot path.
pub fn with_fresh<R>(
    version: &ZoneVersion,
    qname: &[u8],
    qtype: u16,
    f: impl FnOnce(&Encoded) -> R,
) -> Option<R> {
    ANSWERS.with(|cell| {
        let answers = cell.borrow();
        if answers.model != version.id() || answers.generation != version.generation() {
            return None;
        }
        lookup(&answers, qname, qtype).map(f)
    })
}

/// Under the zone's read lock: brings this thread's answers up to the model's generation, then
/// runs `f` on the answer for (`qname`, `qtype`) if one is kept.
pub fn with_current<R>(
    zone: &ZoneModel,
    qname: &[u8],
    qtype: u16,
    f: impl FnOnce(&Encoded) -> R,
) -> Option<R> {
    ANSWERS.with(|cell| {
        let mut answers = cell.borrow_mut();
        catch_up(&mut answers, zone);
        lookup(&answers, qname, qtype).map(f)
    })
}

/// Under the zone's read lock (after [`with_current`], so this thread's answers are at the
/// model's generation): keeps `encoded` as the answer for (`qname`, `qtype`).
pub fn keep(zone: &ZoneModel, qname: &[u8], qtype: u16, encoded: Encoded) {
    ANSWERS.with(|cell| {
        let mut answers = cell.borrow_mut();
        catch_up(&mut answers, zone);
        if answers.names.len() >= NAMES_PER_THREAD && !answers.names.contains_key(qname) {
            let victim = answers.names.keys().next().cloned();
            if let Some(victim) = victim {
                answers.names.remove(&victim);
            }
        }
        let types = answers.names.entry(qname.into()).or_default();
        types.retain(|(t, _)| *t != qtype);
        types.push((qtype, encoded));
    })
}

fn lookup<'a>(answers: &'a PerThread, qname: &[u8], qtype: u16) -> Option<&'a Encoded> {
    answers
        .names
        .get(qname)?
        .iter()
        .find_map(|(t, e)| (*t == qtype).then_some(e))
}

fn catch_up(answers: &mut PerThread, zone: &ZoneModel) {
    let version = zone.version();
    if answers.model == version.id() && answers.generation == version.generation() {
        return;
    }
    match (answers.model == version.id())
        .then(|| zone.changed_since(answers.generation))
        .flatten()
    {
        Some(names) => {
            for name in names {
                answers.names.remove(name);
            }
        }
        None => answers.names.clear(),
    }
    answers.model = version.id();
    answers.generation = version.generation();
}
