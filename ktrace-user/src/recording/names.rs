//! Kubernetes names in a recording: which names a block carries.
//!
//! A name is written once per segment, in front of the first block whose
//! events hold its address (and again when the name changes), not once per
//! block: a busy node's block holds thousands of addresses, and naming them
//! all in every block cost three times the bytes of the events themselves.
//! Such a block's frame has [`FLAG_NAMES`](super::format::FLAG_NAMES) and
//! its name records come first; a reader that skips blocks (`replay
//! --since`) still reads the names of the flagged ones, so a name written
//! once serves its whole segment. Rotation starts the table afresh: every
//! segment stays self-contained.
//!
//! - [`NameCache`] (pipeline thread): the encoded name records of an
//!   address, kept until the names change, so the event path asks the name
//!   sources only for an address new in its block, and then only once.
//! - [`SegmentNames`] (writer thread): which names the segment holds, and
//!   so which of a block's names must go in front of it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::format::{put_varint, tag};
use crate::names::{NameRecord, NameResolver};

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The cache forgets everything past this many addresses (a bound on its
/// memory when a node talks to a whole cluster and beyond).
const MAX_CACHED: usize = 1 << 18;

/// The names of one address, as a recording stores them.
#[derive(Debug, PartialEq, Eq)]
pub struct NamedAddr {
    pub ip: IpAddr,
    /// Complete `DEF_NAME` records (tag, length, body), ready for a payload.
    pub records: Box<[u8]>,
}

impl NamedAddr {
    pub fn encode(ip: IpAddr, records: &[NameRecord]) -> NamedAddr {
        let mut out = Vec::with_capacity(64 * records.len());
        let mut body = Vec::with_capacity(64);
        for r in records {
            body.clear();
            r.encode(&mut body);
            put_varint(&mut out, tag::DEF_NAME);
            put_varint(&mut out, body.len() as u64);
            out.extend_from_slice(&body);
        }
        NamedAddr {
            ip,
            records: out.into_boxed_slice(),
        }
    }
}

/// An address's names, looked up and encoded once per version of the names.
#[derive(Default)]
pub struct NameCache {
    version: Option<u64>,
    map: Map<IpAddr, Option<Arc<NamedAddr>>>,
    scratch: Vec<NameRecord>,
}

impl NameCache {
    /// The names of `ip` (`None`: nothing names it).
    pub fn get(&mut self, ip: IpAddr, names: &NameResolver) -> Option<Arc<NamedAddr>> {
        let v = names.version();
        if self.version != Some(v) || self.map.len() >= MAX_CACHED {
            self.map.clear();
            self.version = Some(v);
        }
        if let Some(e) = self.map.get(&ip) {
            return e.clone();
        }
        self.scratch.clear();
        names.addr_records(ip, &mut self.scratch);
        let e = (!self.scratch.is_empty()).then(|| Arc::new(NamedAddr::encode(ip, &self.scratch)));
        self.map.insert(ip, e.clone());
        e
    }
}

/// The names the segment being written holds.
#[derive(Default)]
pub struct SegmentNames {
    written: Map<IpAddr, Arc<NamedAddr>>,
    /// What the last [`prefix`](Self::prefix) changed in `written` (the
    /// entry before), undone unless its block was written.
    undo: Vec<(IpAddr, Option<Arc<NamedAddr>>)>,
}

impl SegmentNames {
    /// Into `out` (cleared first): the records of the names among `names`
    /// (a block's) that the segment does not hold yet, or holds differently.
    /// Until [`commit`](Self::commit), the next call forgets them again.
    pub fn prefix(&mut self, names: &[Arc<NamedAddr>], out: &mut Vec<u8>) {
        out.clear();
        for (ip, before) in self.undo.drain(..).rev() {
            match before {
                Some(b) => self.written.insert(ip, b),
                None => self.written.remove(&ip),
            };
        }
        for n in names {
            let before = match self.written.get_mut(&n.ip) {
                Some(w) if Arc::ptr_eq(w, n) => continue,
                Some(w) if w.records == n.records => {
                    // The same names looked up again: keep the newer
                    // pointer so the next block compares pointers only.
                    *w = n.clone();
                    continue;
                }
                Some(w) => Some(std::mem::replace(w, n.clone())),
                None => {
                    self.written.insert(n.ip, n.clone());
                    None
                }
            };
            out.extend_from_slice(&n.records);
            self.undo.push((n.ip, before));
        }
    }

    /// The block [`prefix`](Self::prefix) was made for is written.
    pub fn commit(&mut self) {
        self.undo.clear();
    }

    /// A new segment holds no names yet.
    pub fn new_segment(&mut self) {
        self.written.clear();
        self.undo.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::Peer;

    fn named(ip: &str, node: &str) -> Arc<NamedAddr> {
        let ip: IpAddr = ip.parse().unwrap();
        let r = NameRecord::peer(ip, &Peer::Node(node.into()));
        Arc::new(NamedAddr::encode(ip, &[r]))
    }

    #[test]
    fn a_segment_carries_each_name_once_until_it_changes() {
        let mut s = SegmentNames::default();
        let mut out = Vec::new();
        let (a, b) = (named("10.0.0.1", "n1"), named("10.0.0.2", "n2"));
        // A name twice in one block (an event's, then a finding's) goes once.
        s.prefix(&[a.clone(), b.clone(), a.clone()], &mut out);
        assert_eq!(out, [&*a.records, &*b.records].concat());
        // Not written (a failed write): the next block carries them again.
        s.prefix(std::slice::from_ref(&a), &mut out);
        assert_eq!(out, &*a.records);
        s.commit();
        s.prefix(&[a.clone(), b.clone()], &mut out);
        assert_eq!(out, &*b.records);
        s.commit();
        // Looked up again, same names: nothing; renamed: the new name.
        s.prefix(&[named("10.0.0.1", "n1")], &mut out);
        assert!(out.is_empty());
        let a2 = named("10.0.0.1", "n9");
        s.prefix(std::slice::from_ref(&a2), &mut out);
        assert_eq!(out, &*a2.records);
        s.commit();
        s.new_segment();
        s.prefix(&[a2.clone(), b.clone()], &mut out);
        assert_eq!(out, [&*a2.records, &*b.records].concat());
    }
}
