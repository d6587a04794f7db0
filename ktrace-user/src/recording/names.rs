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
//! - [`NameCache`] (pipeline thread): the encoded names of an address,
//!   kept until the names change, and whether they were sent since the
//!   names' epoch began: an address new in its block costs one hash probe,
//!   and only names not sent yet travel to the writer.
//! - [`SegmentNames`] (writer thread): which names the segment holds, and
//!   so which of a block's names go in front of it. The epoch changes when
//!   a segment starts (or a block is lost on the way): a block encoded in
//!   an older epoch relied on names the new segment lacks, so the writer
//!   puts those of its addresses in front of it (from the tables of the
//!   segments before).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::format::NamedAddr;
use crate::names::{NameRecord, NameResolver};

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The cache forgets everything past this many addresses (a bound on its
/// memory when a node talks to a whole cluster and beyond).
const MAX_CACHED: usize = 1 << 18;

/// One address in the cache: small (12 bytes, an IPv4 key 4 more), so
/// the probe an address new in its block costs stays in the CPU's caches.
#[derive(Clone, Copy)]
struct Slot {
    /// Where its names are in [`NameCache::named`] ([`UNNAMED`]: nothing names it).
    at: u32,
    /// The version of the names they were looked up in (its low 32 bits).
    version: u32,
    /// The epoch whose blocks carry them (its low 32 bits; 0: none yet).
    sent: u32,
}

const UNNAMED: u32 = u32::MAX;

/// An address's names, looked up and encoded once per version of the names.
#[derive(Default)]
pub struct NameCache {
    v4: Map<u32, Slot>,
    v6: Map<std::net::Ipv6Addr, Slot>,
    named: Vec<Arc<NamedAddr>>,
    scratch: Vec<NameRecord>,
}

impl NameCache {
    /// The names of `ip` when the blocks of `epoch` (never 0) have not
    /// carried them yet (they are then counted as carried); `None` when
    /// they have, or when nothing names `ip`.
    #[inline]
    pub fn unsent(
        &mut self,
        ip: IpAddr,
        names: &NameResolver,
        epoch: u64,
    ) -> Option<Arc<NamedAddr>> {
        let version = names.version() as u32;
        let epoch = (epoch as u32).max(1);
        let NameCache {
            v4,
            v6,
            named,
            scratch,
        } = self;
        let found = match ip {
            IpAddr::V4(a) => v4.get_mut(&u32::from(a)),
            IpAddr::V6(a) => v6.get_mut(&a),
        };
        let slot = match found {
            Some(s) => {
                if s.version != version {
                    refresh(s, version, named, lookup(scratch, ip, names));
                }
                s
            }
            None => {
                if v4.len() + v6.len() >= MAX_CACHED || named.len() >= MAX_CACHED {
                    v4.clear();
                    v6.clear();
                    named.clear();
                }
                let mut s = Slot {
                    at: UNNAMED,
                    version,
                    sent: 0,
                };
                refresh(&mut s, version, named, lookup(scratch, ip, names));
                match ip {
                    IpAddr::V4(a) => v4.entry(u32::from(a)).or_insert(s),
                    IpAddr::V6(a) => v6.entry(a).or_insert(s),
                }
            }
        };
        if slot.at == UNNAMED || slot.sent == epoch {
            return None;
        }
        slot.sent = epoch;
        Some(named[slot.at as usize].clone())
    }
}

/// `s` now names what `now` says (looked up in `version`): unless that is
/// what it named already, it is to be sent again.
fn refresh(s: &mut Slot, version: u32, named: &mut Vec<Arc<NamedAddr>>, now: Option<NamedAddr>) {
    s.version = version;
    let old = (s.at != UNNAMED).then(|| &named[s.at as usize].records);
    if old == now.as_ref().map(|n| &n.records) {
        return;
    }
    s.sent = 0;
    match now {
        None => s.at = UNNAMED,
        Some(n) if s.at == UNNAMED => {
            s.at = named.len() as u32;
            named.push(Arc::new(n));
        }
        Some(n) => named[s.at as usize] = Arc::new(n),
    }
}

fn lookup(scratch: &mut Vec<NameRecord>, ip: IpAddr, names: &NameResolver) -> Option<NamedAddr> {
    scratch.clear();
    names.addr_records(ip, scratch);
    (!scratch.is_empty()).then(|| NamedAddr::encode(ip, scratch))
}

/// The names the segment being written holds.
#[derive(Default)]
pub struct SegmentNames {
    written: Map<IpAddr, Arc<NamedAddr>>,
    /// What the segments before held, while blocks of their epochs may
    /// still come.
    before: Map<IpAddr, Arc<NamedAddr>>,
    /// What the last [`prefix`](Self::prefix) changed in `written` (the
    /// entry before), undone unless its block was written.
    undo: Vec<(IpAddr, Option<Arc<NamedAddr>>)>,
    /// Names of blocks that were not written, for the next one to carry.
    carry: Vec<Arc<NamedAddr>>,
}

impl SegmentNames {
    /// Into `out` (cleared first): the records the block `raw`, encoded in
    /// epoch `raw.epoch` while the segment's is `epoch`, must carry in
    /// front: its names the segment does not hold yet (or holds
    /// differently), and those of lost blocks. Until [`commit`](Self::commit),
    /// the next call forgets them again.
    pub fn prefix(&mut self, raw: &super::format::RawBlock, epoch: u64, out: &mut Vec<u8>) {
        out.clear();
        for (ip, before) in self.undo.drain(..).rev() {
            match before {
                Some(b) => self.written.insert(ip, b),
                None => self.written.remove(&ip),
            };
        }
        let carry = std::mem::take(&mut self.carry);
        for n in carry.iter().chain(&raw.names) {
            self.add(n, out);
        }
        self.carry = carry;
        if raw.epoch == epoch {
            // No block of an older epoch comes after this one.
            self.before.clear();
        } else {
            for ip in &raw.ips {
                if !self.written.contains_key(ip) {
                    if let Some(n) = self.before.get(ip).cloned() {
                        self.add(&n, out);
                    }
                }
            }
        }
    }

    fn add(&mut self, n: &Arc<NamedAddr>, out: &mut Vec<u8>) {
        let before = match self.written.get_mut(&n.ip) {
            Some(w) if Arc::ptr_eq(w, n) => return,
            Some(w) if w.records == n.records => {
                // The same names looked up again: keep the newer pointer
                // so the next comparison is of pointers only.
                *w = n.clone();
                return;
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

    /// The block [`prefix`](Self::prefix) was made for is written.
    pub fn commit(&mut self) {
        self.undo.clear();
        self.carry.clear();
    }

    /// The block `raw` was not written: the next one carries its names.
    pub fn lost(&mut self, raw: &super::format::RawBlock) {
        self.carry.extend(raw.names.iter().cloned());
    }

    /// A new segment holds no names yet.
    pub fn new_segment(&mut self) {
        for (ip, before) in self.undo.drain(..).rev() {
            match before {
                Some(b) => self.written.insert(ip, b),
                None => self.written.remove(&ip),
            };
        }
        self.before.extend(self.written.drain());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::Peer;
    use crate::recording::format::RawBlock;

    fn named(ip: &str, node: &str) -> Arc<NamedAddr> {
        let ip: IpAddr = ip.parse().unwrap();
        let r = NameRecord::peer(ip, &Peer::Node(node.into()));
        Arc::new(NamedAddr::encode(ip, &[r]))
    }

    fn block(epoch: u64, names: &[&Arc<NamedAddr>]) -> RawBlock {
        RawBlock {
            names: names.iter().map(|n| Arc::clone(n)).collect(),
            ips: names.iter().map(|n| n.ip).collect(),
            epoch,
            ..Default::default()
        }
    }

    #[test]
    fn a_segment_carries_each_name_once_until_it_changes() {
        let mut s = SegmentNames::default();
        let mut out = Vec::new();
        let (a, b) = (named("10.0.0.1", "n1"), named("10.0.0.2", "n2"));
        // A name twice in one block (an event's, then a finding's) goes once.
        s.prefix(&block(1, &[&a, &b, &a]), 1, &mut out);
        assert_eq!(out, [&*a.records, &*b.records].concat());
        // Not written (a failed write): the next block carries them again.
        s.prefix(&block(1, &[&a]), 1, &mut out);
        assert_eq!(out, &*a.records);
        s.commit();
        s.prefix(&block(1, &[&a, &b]), 1, &mut out);
        assert_eq!(out, &*b.records);
        // Lost on the way (disk full): the next block written carries it.
        s.lost(&block(1, &[&b]));
        s.prefix(&block(1, &[]), 1, &mut out);
        assert_eq!(out, &*b.records);
        s.commit();
        // Looked up again, same names: nothing; renamed: the new name.
        s.prefix(&block(1, &[&named("10.0.0.1", "n1")]), 1, &mut out);
        assert!(out.is_empty());
        let a2 = named("10.0.0.1", "n9");
        s.prefix(&block(1, &[&a2]), 1, &mut out);
        assert_eq!(out, &*a2.records);
        s.commit();
        // A new segment (epoch 2): a block of epoch 1 did not send what
        // it relied on, so it gets the names of its addresses from the
        // segment before; a block of epoch 2 sends its own.
        s.new_segment();
        let mut old = block(1, &[]);
        old.ips = vec![a2.ip, b.ip];
        s.prefix(&old, 2, &mut out);
        assert_eq!(out.len(), a2.records.len() + b.records.len());
        s.commit();
        s.prefix(&block(2, &[&b]), 2, &mut out);
        assert!(out.is_empty(), "already in this segment");
        s.new_segment();
        s.prefix(&block(3, &[&b]), 3, &mut out);
        assert_eq!(out, &*b.records);
    }

    #[test]
    fn the_cache_sends_names_once_per_epoch_and_again_when_they_change() {
        use crate::names::{Layer, Names, SourceId};
        let layer = |node: &str| {
            let mut l = Layer::default();
            l.set_peer("10.0.0.1".parse().unwrap(), Peer::Node(node.into()));
            l.set_peer("fd00::1".parse().unwrap(), Peer::Node(node.into()));
            l
        };
        let names = Names::new();
        names.publish(SourceId::Api, layer("n1"));
        let r = NameResolver::live(names.clone());
        let mut c = NameCache::default();
        for ip in ["10.0.0.1", "fd00::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            let first = c.unsent(ip, &r, 1).expect("named");
            assert_eq!(first.ip, ip);
            assert!(c.unsent(ip, &r, 1).is_none(), "sent in this epoch");
            assert!(c.unsent(ip, &r, 2).is_some(), "a new epoch sends again");
            // The names change version but not for this address: not again.
            names.publish(SourceId::Rules, Layer::default());
            assert!(c.unsent(ip, &r, 2).is_none());
            names.publish(SourceId::Api, layer("n2"));
            let again = c.unsent(ip, &r, 2).expect("renamed");
            assert_ne!(again.records, first.records);
            names.publish(SourceId::Api, layer("n1"));
        }
        assert!(c.unsent("10.9.9.9".parse().unwrap(), &r, 1).is_none());
    }
}
