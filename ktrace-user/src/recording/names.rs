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
//!   names' epoch began. A block's addresses are named in one batch when
//!   it is sealed (not event by event): an address already sent in this
//!   epoch and version costs one probe of a 4-byte-per-address set (the
//!   block's other addresses the encoder does not list), the others are
//!   probed in batches whose cache misses overlap, and only names not sent
//!   yet travel to the writer.
//! - [`SegmentNames`] (writer thread): which names the segment holds, and
//!   so which of a block's names go in front of it. The epoch changes when
//!   a segment starts (or a block is lost on the way): a block encoded in
//!   an older epoch relied on names the new segment lacks, so the writer
//!   puts those of its addresses in front of it (from the tables of the
//!   segments before).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use smallvec::SmallVec;

use super::format::NamedAddr;
use crate::names::{NameRecord, NameResolver};

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The cache forgets everything past this many addresses (a bound on its
/// memory when a node talks to a whole cluster and beyond).
const MAX_CACHED: usize = 1 << 18;

/// One address in the cache: small (16 bytes with an IPv4 key), so the
/// probe of an address new in its block stays in the CPU's caches.
#[derive(Clone, Copy)]
struct Slot {
    /// Where its names are in [`NameCache::named`] ([`UNNAMED`]: nothing names it).
    at: u32,
    /// The generation of the cache they were looked up in (see
    /// [`NameCache::sync`]; 0: to look up again).
    gen: u32,
    /// The epoch whose blocks carry them (its low 32 bits; 0: none yet).
    sent: u32,
}

const UNNAMED: u32 = u32::MAX;

/// IPv4 addresses to [`Slot`]s: open addressing, linear probing, 16-byte
/// entries side by side, at most half full. Flat so that a block's
/// addresses can be probed in a batch whose cache misses overlap (see
/// [`NameCache::unsent`]).
#[derive(Default)]
struct V4Table {
    /// `key` is meaningful where `slot.at != FREE`.
    slots: Vec<(u32, Slot)>,
    len: usize,
    hasher: foldhash::fast::RandomState,
}

/// A free entry of [`V4Table`] (no name index is ever this large).
const FREE: u32 = u32::MAX - 1;

impl V4Table {
    /// Where the probe for `key` starts (the table is not empty).
    #[inline]
    fn home(&self, key: u32) -> usize {
        use std::hash::BuildHasher;
        self.hasher.hash_one(key) as usize & (self.slots.len() - 1)
    }

    /// Reads the entry `key`'s probe starts at, so that its cache miss is
    /// under way while the probes before it run.
    #[inline]
    fn touch(&self, key: u32) -> u32 {
        if self.slots.is_empty() {
            return 0;
        }
        self.slots[self.home(key)].0
    }

    /// The entry of `key`, if any.
    #[inline]
    fn get(&self, key: u32) -> Option<&Slot> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut i = self.home(key);
        loop {
            let (k, s) = &self.slots[i];
            if s.at == FREE {
                return None;
            }
            if *k == key {
                return Some(s);
            }
            i = (i + 1) & mask;
        }
    }

    fn get_mut(&mut self, key: u32) -> Option<&mut Slot> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut i = self.home(key);
        loop {
            let (k, s) = self.slots[i];
            if s.at == FREE {
                return None;
            }
            if k == key {
                return Some(&mut self.slots[i].1);
            }
            i = (i + 1) & mask;
        }
    }

    /// The entry of `key`, inserted (as `new`) when absent.
    #[inline]
    fn entry(&mut self, key: u32, new: impl FnOnce() -> Slot) -> &mut Slot {
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let mask = self.slots.len() - 1;
        let mut i = self.home(key);
        loop {
            let (k, s) = self.slots[i];
            if s.at == FREE {
                self.len += 1;
                self.slots[i] = (key, new());
                break;
            }
            if k == key {
                break;
            }
            i = (i + 1) & mask;
        }
        &mut self.slots[i].1
    }

    fn grow(&mut self) {
        let cap = (self.slots.len() * 2).max(1024);
        let free = Slot {
            at: FREE,
            gen: 0,
            sent: 0,
        };
        let old = std::mem::replace(&mut self.slots, vec![(0, free); cap]);
        self.len = 0;
        for (k, s) in old.into_iter().filter(|(_, s)| s.at != FREE) {
            *self.entry(k, || s) = s;
        }
    }

    fn clear(&mut self) {
        self.slots = Vec::new();
        self.len = 0;
    }
}

/// IPv4 addresses with nothing to send in one epoch and generation of
/// the cache (sent already, or nothing names them), so that the addresses of
/// a busy node, which come back block after block, cost a probe of this
/// set alone. Flat, 4 bytes a slot and at most half full: a probe reads
/// one cache line, a node's addresses stay in the core's own caches, and
/// the probes of a block's addresses, independent of each other, overlap.
struct Settled {
    /// Open addressing, linear probing; 0 is a free slot (the address
    /// 0.0.0.0 is `zero`).
    slots: Vec<u32>,
    len: usize,
    /// How far a key's Fibonacci product is shifted to index `slots`.
    shift: u32,
    zero: bool,
    epoch: u32,
    gen: u32,
}

impl Default for Settled {
    fn default() -> Self {
        Settled {
            slots: Vec::new(),
            len: 0,
            shift: 32,
            zero: false,
            epoch: 0,
            gen: 0,
        }
    }
}

impl Settled {
    /// Where `key`'s probe starts (addresses handed out in order spread
    /// over the table).
    #[inline]
    fn home(&self, key: u32) -> usize {
        (u64::from(key.wrapping_mul(0x9e37_79b9)) >> self.shift) as usize
    }

    #[inline]
    fn contains(&self, key: u32) -> bool {
        if key == 0 {
            return self.zero;
        }
        if self.slots.is_empty() {
            return false;
        }
        let mask = self.slots.len() - 1;
        let mut i = self.home(key);
        loop {
            match self.slots[i] {
                0 => return false,
                k if k == key => return true,
                _ => i = (i + 1) & mask,
            }
        }
    }

    fn insert(&mut self, key: u32) {
        if key == 0 {
            self.zero = true;
            return;
        }
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let mask = self.slots.len() - 1;
        let mut i = self.home(key);
        loop {
            match self.slots[i] {
                0 => {
                    self.slots[i] = key;
                    self.len += 1;
                    return;
                }
                k if k == key => return,
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// Takes `key` out, moving the entries after it in its run back so
    /// that every probe still finds its key before a free slot.
    fn remove(&mut self, key: u32) {
        if key == 0 {
            self.zero = false;
            return;
        }
        if self.slots.is_empty() {
            return;
        }
        let mask = self.slots.len() - 1;
        let mut hole = self.home(key);
        loop {
            match self.slots[hole] {
                0 => return,
                k if k == key => break,
                _ => hole = (hole + 1) & mask,
            }
        }
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let k = self.slots[j];
            if k == 0 {
                break;
            }
            // `k` may fill the hole when the hole lies on its probe path.
            let home = self.home(k);
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.slots[hole] = k;
                hole = j;
            }
        }
        self.slots[hole] = 0;
        self.len -= 1;
    }

    fn grow(&mut self) {
        let cap = (self.slots.len() * 2).max(1024);
        let old = std::mem::replace(&mut self.slots, vec![0; cap]);
        self.shift = 32 - cap.trailing_zeros();
        self.len = 0;
        for k in old.into_iter().filter(|&k| k != 0) {
            self.insert(k);
        }
    }

    /// Empty unless it is of this epoch and generation.
    fn keep_only(&mut self, epoch: u32, gen: u32) {
        if (self.epoch, self.gen) != (epoch, gen) {
            self.clear();
            (self.epoch, self.gen) = (epoch, gen);
        }
    }

    /// Keeps the capacity: a busy node's addresses come back.
    fn clear(&mut self) {
        if self.len > 0 {
            self.slots.fill(0);
        }
        self.len = 0;
        self.zero = false;
    }
}

/// An address's names, looked up and encoded once, and again only when
/// a source renames it.
#[derive(Default)]
pub struct NameCache {
    v4: V4Table,
    v6: Map<std::net::Ipv6Addr, Slot>,
    named: Vec<Arc<NamedAddr>>,
    scratch: Scratch,
    settled: Settled,
    /// Slots of another generation are looked up again (one more when
    /// any address may have been renamed).
    gen: u32,
    /// The version of the names this generation's slots are as of.
    synced: Option<u64>,
}

/// How many probes [`NameCache::unsent`] starts before it reads them.
const BATCH: usize = 16;

impl NameCache {
    /// Into `out`: the names of those of `ips` that the blocks of `epoch`
    /// (never 0) have not carried yet (they are then counted as carried).
    /// `ips` were seen while the names were at `version`: the names of
    /// those not renamed up to then are still theirs; others are looked up
    /// now.
    ///
    /// An address [`Settled`] in this epoch and generation costs one probe
    /// of that set. The others go in batches: each batch's entries are
    /// read first, their cache misses overlapping, then used.
    pub fn unsent(
        &mut self,
        ips: &[IpAddr],
        names: &NameResolver,
        epoch: u64,
        version: u64,
        out: &mut Vec<Arc<NamedAddr>>,
    ) {
        let epoch = (epoch as u32).max(1);
        self.sync(names, version);
        self.settled.keep_only(epoch, self.gen);
        let mut batch: SmallVec<[IpAddr; BATCH]> = SmallVec::new();
        let mut ips = ips.iter();
        loop {
            batch.clear();
            for &ip in ips.by_ref() {
                if let IpAddr::V4(a) = ip {
                    if self.settled.contains(u32::from(a)) {
                        continue;
                    }
                }
                batch.push(ip);
                if batch.len() == BATCH {
                    break;
                }
            }
            if batch.is_empty() {
                return;
            }
            let mut touched = 0u32;
            for ip in &batch {
                if let IpAddr::V4(a) = ip {
                    touched ^= self.v4.touch(u32::from(*a));
                }
            }
            std::hint::black_box(touched);
            self.warm(&batch, names);
            for &ip in &batch {
                if let Some(n) = self.one(ip, names, epoch) {
                    out.push(n);
                }
                if let IpAddr::V4(a) = ip {
                    self.settled.insert(u32::from(a));
                }
            }
        }
    }

    /// The names are now as of `version`: forgets what a source renamed
    /// since the last call, everything when it cannot say what.
    fn sync(&mut self, names: &NameResolver, version: u64) {
        if self.synced == Some(version) {
            return;
        }
        match self.synced.and_then(|v| names.changed_since(v)) {
            None => {
                self.gen = self.gen.wrapping_add(1).max(1);
                self.settled.clear();
            }
            Some(renamed) => {
                for ip in renamed {
                    let slot = match ip {
                        IpAddr::V4(a) => {
                            self.settled.remove(u32::from(a));
                            self.v4.get_mut(u32::from(a))
                        }
                        IpAddr::V6(a) => self.v6.get_mut(&a),
                    };
                    if let Some(s) = slot {
                        s.gen = 0;
                    }
                }
            }
        }
        self.synced = Some(version);
    }

    /// Starts the cache misses of the name lookups `batch` needs (the
    /// addresses not looked up in this generation) side by side.
    fn warm(&self, batch: &[IpAddr], names: &NameResolver) {
        let stale: SmallVec<[IpAddr; BATCH]> = batch
            .iter()
            .filter(|ip| {
                let slot = match ip {
                    IpAddr::V4(a) => self.v4.get(u32::from(*a)),
                    IpAddr::V6(a) => self.v6.get(a),
                };
                slot.is_none_or(|s| s.gen != self.gen)
            })
            .copied()
            .collect();
        if !stale.is_empty() {
            std::hint::black_box(names.warm(&stale));
        }
    }

    #[inline]
    fn one(&mut self, ip: IpAddr, names: &NameResolver, epoch: u32) -> Option<Arc<NamedAddr>> {
        if self.v4.len + self.v6.len() >= MAX_CACHED || self.named.len() >= MAX_CACHED {
            self.v4.clear();
            self.v6.clear();
            self.named.clear();
            self.settled.clear();
        }
        let NameCache {
            v4,
            v6,
            named,
            scratch,
            gen,
            ..
        } = self;
        let new = || Slot {
            at: UNNAMED,
            gen: 0,
            sent: 0,
        };
        let slot = match ip {
            IpAddr::V4(a) => v4.entry(u32::from(a), new),
            IpAddr::V6(a) => v6.entry(a).or_insert_with(new),
        };
        if slot.gen != *gen {
            // Renamed since it was looked up (or never looked up): now.
            refresh(slot, *gen, named, ip, lookup(scratch, ip, names));
        }
        if slot.at == UNNAMED || slot.sent == epoch {
            return None;
        }
        slot.sent = epoch;
        Some(named[slot.at as usize].clone())
    }
}

/// `s` now names what `now` says, the records of `ip` as looked up in
/// generation `gen` (empty: nothing names it): unless that is what it
/// named already, it is to be sent again. Names that did not change cost
/// no allocation.
fn refresh(s: &mut Slot, gen: u32, named: &mut Vec<Arc<NamedAddr>>, ip: IpAddr, now: &[u8]) {
    s.gen = gen;
    let old: &[u8] = if s.at == UNNAMED {
        &[]
    } else {
        &named[s.at as usize].records
    };
    if old == now {
        return;
    }
    s.sent = 0;
    let new = || {
        Arc::new(NamedAddr {
            ip,
            records: now.into(),
        })
    };
    match now.is_empty() {
        true => s.at = UNNAMED,
        false if s.at == UNNAMED => {
            s.at = named.len() as u32;
            named.push(new());
        }
        false => named[s.at as usize] = new(),
    }
}

/// Scratch space for looking an address's names up and encoding them.
#[derive(Default)]
struct Scratch {
    records: Vec<NameRecord>,
    bytes: Vec<u8>,
}

/// The encoded name records of `ip` (empty when nothing names it).
fn lookup<'a>(scratch: &'a mut Scratch, ip: IpAddr, names: &NameResolver) -> &'a [u8] {
    scratch.records.clear();
    scratch.bytes.clear();
    names.addr_records(ip, &mut scratch.records);
    NamedAddr::encode_into(&scratch.records, &mut scratch.bytes);
    &scratch.bytes
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
            // Rare (a block in flight when the segment changed): its
            // addresses are read back from its payload.
            let mut ips = raw.ips.clone();
            super::format::defined_ips(&raw.payload, &mut ips);
            for ip in &ips {
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
        // Its addresses, as the writer reads them back from its payload.
        let mut enc = crate::recording::format::BlockEncoder::new();
        let at = |ip| std::net::SocketAddr::new(ip, 80);
        enc.push_event(&crate::event::Event {
            ts_ns: 1,
            netns: 0,
            source: crate::event::Source::RawTracepoint,
            body: crate::event::EventBody::TcpReceiveReset {
                src: at(a2.ip),
                dst: at(b.ip),
                sock_cookie: 0,
            },
        });
        old.payload = enc.take().payload;
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
    fn a_rename_costs_a_lookup_of_the_renamed_addresses_only() {
        use crate::names::{Layer, Names, SourceId};
        let ips: Vec<IpAddr> = (1..=4u32)
            .map(|i| IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)))
            .chain(["fd00::9".parse().unwrap()])
            .collect();
        let layer = |renamed: Option<IpAddr>| {
            let mut l = Layer::default();
            for ip in &ips {
                let node = if Some(*ip) == renamed { "new" } else { "old" };
                l.set_peer(*ip, Peer::Node(node.into()));
            }
            l
        };
        let names = Names::new();
        names.publish(SourceId::Api, layer(None));
        let r = NameResolver::live(names.clone());
        let mut c = NameCache::default();
        let mut out = Vec::new();
        c.unsent(&ips, &r, 1, r.version(), &mut out);
        assert_eq!(out.len(), 5);
        let gen = c.gen;
        // The second layer renames the fifth and names the third as before.
        for (renamed, changed) in [(ips[2], vec![ips[2]]), (ips[4], vec![ips[2], ips[4]])] {
            names.publish(SourceId::Api, layer(Some(renamed)));
            out.clear();
            c.unsent(&ips, &r, 1, r.version(), &mut out);
            assert_eq!(out.iter().map(|n| n.ip).collect::<Vec<_>>(), changed);
            // The others were neither forgotten nor looked up again.
            assert_eq!(c.gen, gen);
            for ip in ips.iter().filter(|ip| !changed.contains(ip)) {
                if let IpAddr::V4(a) = ip {
                    assert!(c.settled.contains(u32::from(*a)), "{ip}");
                }
            }
        }
        // A change nobody can list (the whole cluster's Pods now known):
        // everything is looked up again, and sent only where it changed.
        names.set_complete(true);
        out.clear();
        c.unsent(&ips, &r, 1, r.version(), &mut out);
        assert_ne!(c.gen, gen);
        assert!(out.is_empty());
    }

    #[test]
    fn the_settled_set_holds_what_it_was_given_until_cleared() {
        let mut s = Settled::default();
        assert!(!s.contains(7) && !s.contains(0));
        let keys: Vec<u32> = (0..5000u32).map(|i| 0x0a00_0000 + i * 7).collect();
        for k in keys.iter().step_by(2) {
            s.insert(*k);
        }
        s.insert(0);
        s.insert(keys[0]);
        assert_eq!(s.len, 2500);
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(s.contains(*k), i % 2 == 0, "{k}");
        }
        assert!(s.contains(0));
        s.keep_only(1, 1);
        assert!(!s.contains(keys[0]) && !s.contains(0));
        s.insert(keys[1]);
        s.keep_only(1, 1);
        assert!(s.contains(keys[1]), "same epoch and generation: kept");
        // Taking keys out keeps every other one findable (runs shift back).
        let mut s = Settled::default();
        for k in &keys {
            s.insert(*k);
        }
        for k in keys.iter().step_by(3) {
            s.remove(*k);
        }
        s.remove(12345);
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(s.contains(*k), i % 3 != 0, "{k}");
        }
        assert_eq!(s.len, keys.len() - keys.len().div_ceil(3));
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
        let unsent = |c: &mut NameCache, ip: IpAddr, epoch: u64| {
            let mut out = Vec::new();
            c.unsent(&[ip], &r, epoch, r.version(), &mut out);
            assert!(out.len() <= 1);
            out.pop()
        };
        for ip in ["10.0.0.1", "fd00::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            let first = unsent(&mut c, ip, 1).expect("named");
            assert_eq!(first.ip, ip);
            assert!(unsent(&mut c, ip, 1).is_none(), "sent in this epoch");
            assert!(unsent(&mut c, ip, 2).is_some(), "a new epoch sends again");
            // The names change version but not for this address: not again.
            names.publish(SourceId::Rules, Layer::default());
            assert!(unsent(&mut c, ip, 2).is_none());
            let before = r.version();
            names.publish(SourceId::Api, layer("n2"));
            // Seen before the change: named as it was then (sent already).
            let mut out = Vec::new();
            c.unsent(&[ip], &r, 2, before, &mut out);
            assert!(out.is_empty());
            let again = unsent(&mut c, ip, 2).expect("renamed");
            assert_ne!(again.records, first.records);
            names.publish(SourceId::Api, layer("n1"));
        }
        // Many addresses in one batch (the table grows under them), each
        // once; those nothing names give nothing.
        let mut l = layer("n1");
        let many: Vec<IpAddr> = (0..5000u32)
            .map(|i| IpAddr::V4(std::net::Ipv4Addr::from(0x0a01_0000 + i)))
            .collect();
        for ip in many.iter().step_by(2) {
            l.set_peer(*ip, Peer::Node("n3".into()));
        }
        names.publish(SourceId::Api, l);
        let mut out = Vec::new();
        c.unsent(&many, &r, 3, r.version(), &mut out);
        assert_eq!(out.len(), 2500);
        assert!(out
            .iter()
            .zip(many.iter().step_by(2))
            .all(|(n, ip)| n.ip == *ip));
        out.clear();
        c.unsent(&many, &r, 3, r.version(), &mut out);
        assert!(out.is_empty());
        assert!(unsent(&mut c, "10.9.9.9".parse().unwrap(), 1).is_none());
    }
}
