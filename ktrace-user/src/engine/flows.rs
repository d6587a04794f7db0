//! NAT flow state: which service a client connected to, which backend
//! conntrack (or IPVS) sent it to, and what it was before.
//!
//! Keyed by client endpoint, transport protocol and the network namespace
//! of the table that mapped it (UDP DNAT and TCP, or two pods with the same
//! address in different namespaces, are different flows).
//!
//! Sized for a million flows on a node under attack: an open-addressing
//! table of 48-byte slots (service and backends are interned ids), found
//! with one cache line in the common case and prefetchable ahead of use.
//! Bounded: entries idle past a TTL are swept, past `max_flows` the oldest
//! tenth is evicted (both counted), and the table shrinks when it empties,
//! so the bytes per flow stay bounded at every size.
//!
//! Times are milliseconds from a base that moves forward (every ~12 days):
//! 4 bytes per time stamp without wrapping or saturating in years.

use std::hash::BuildHasher;

use foldhash::fast::RandomState;

pub use super::endpoints::Ep;
use super::endpoints::{Endpoints, EpId};

/// IPPROTO_TCP: resets, and the flows they are checked against.
pub const TCP: u8 = 6;

/// Which flow: the client, the transport protocol, and the network
/// namespace of the conntrack (or IPVS) table that mapped it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowKey {
    pub client: Ep,
    pub proto: u8,
    pub netns: u32,
}

/// What ktrace knows of one client's NATed flow, as the engine reads it.
/// Times are the table's milliseconds ([`FlowTable::ms`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub service: Ep,
    pub backend: Ep,
    /// The backend before the latest re-mapping ([`Ep::NONE`] if none).
    pub previous_backend: Ep,
    /// When the current mapping was learned.
    pub mapped_ms: u32,
    /// Last time anything was seen of this flow.
    pub last_seen_ms: u32,
    /// How long the flow had been idle when it was re-mapped.
    pub idle_ms: u32,
    /// [`flow_flags`].
    pub flags: u8,
}

pub mod flow_flags {
    /// The conntrack entry was destroyed (flush or expiry) and not re-created yet.
    pub const DESTROYED: u8 = 1;
    /// A finding was already made for this flow (one per broken connection).
    pub const REPORTED: u8 = 2;
    /// The backend's reply to this client was seen un-NATed.
    pub const UNNATED: u8 = 4;
    /// The table slot holds a flow (internal).
    pub(super) const USED: u8 = 0x80;
}

impl Flow {
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// One table slot: key, interned endpoints, times, flags (48 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    addr: [u8; 16],
    netns: u32,
    port: [u8; 2],
    proto: u8,
    flags: u8,
    service: EpId,
    backend: EpId,
    previous_backend: EpId,
    mapped_ms: u32,
    last_seen_ms: u32,
    idle_ms: u32,
}

impl Slot {
    fn used(&self) -> bool {
        self.flags & flow_flags::USED != 0
    }

    fn is(&self, client: Ep, proto: u8) -> bool {
        self.addr == client.addr && self.port == client.port && self.proto == proto
    }
}

/// Index of a flow's slot; valid until the table is next changed by
/// [`FlowTable::map`], [`FlowTable::sweep`] or an eviction.
pub type FlowId = usize;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlowStats {
    pub tracked: usize,
    pub evicted_by_age: u64,
    pub evicted_by_count: u64,
}

const MIN_SLOTS: usize = 16;
/// The clock's base moves when the relative time reaches this (24.8 days)...
const REBASE_AT_MS: u64 = 1 << 31;
/// ...to this long before now (12.4 days), which is also the longest TTL.
const REBASE_KEEP_MS: u64 = 1 << 30;

pub struct FlowTable {
    /// Power-of-two length; at most 3/4 used (linear probing).
    slots: Vec<Slot>,
    mask: usize,
    /// 64 - log2(slots): the hash's top bits pick the home slot.
    shift: u32,
    len: usize,
    eps: Endpoints,
    hasher: RandomState,
    max_flows: usize,
    ttl_ms: u32,
    /// Absolute milliseconds (monotonic ns / 1e6) that stored times count from.
    base_ms: Option<u64>,
    evicted_by_age: u64,
    evicted_by_count: u64,
}

impl FlowTable {
    pub fn new(max_flows: usize, ttl_ns: u64) -> FlowTable {
        FlowTable {
            slots: blank_slots(MIN_SLOTS),
            mask: MIN_SLOTS - 1,
            shift: 64 - MIN_SLOTS.trailing_zeros(),
            len: 0,
            eps: Endpoints::default(),
            hasher: RandomState::default(),
            max_flows: max_flows.max(16),
            ttl_ms: (ttl_ns / 1_000_000).min(REBASE_KEEP_MS - 1) as u32,
            base_ms: None,
            evicted_by_age: 0,
            evicted_by_count: 0,
        }
    }

    /// Monotonic ns to the table's millisecond clock. When the clock nears
    /// the top of its 32 bits, the base moves forward and every stored time
    /// with it (once every 12 days, linear in the flows).
    pub fn ms(&mut self, ts_ns: u64) -> u32 {
        let abs = ts_ns / 1_000_000;
        let base = *self.base_ms.get_or_insert(abs);
        let rel = abs.saturating_sub(base);
        if rel < REBASE_AT_MS {
            return rel as u32;
        }
        self.rebase(abs - REBASE_KEEP_MS);
        REBASE_KEEP_MS as u32
    }

    fn rebase(&mut self, new_base: u64) {
        let shift = new_base - self.base_ms.unwrap_or(new_base);
        let by = shift.min(u32::MAX as u64) as u32;
        for s in self.slots.iter_mut().filter(|s| s.used()) {
            s.mapped_ms = s.mapped_ms.saturating_sub(by);
            s.last_seen_ms = s.last_seen_ms.saturating_sub(by);
        }
        self.base_ms = Some(new_base);
    }

    fn home(&self, client: Ep, proto: u8) -> usize {
        let h = self
            .hasher
            .hash_one((u128::from_ne_bytes(client.addr), client.port, proto));
        (h >> self.shift) as usize
    }

    /// Starts loading the slot `client` would be found at (ahead of use).
    pub fn prefetch(&self, client: Ep, proto: u8) {
        let p = self.slots.as_ptr().wrapping_add(self.home(client, proto)) as *const i8;
        prefetch_read(p);
    }

    /// The flow of `client` over `proto`: the one mapped in `netns` if any,
    /// else the most recently active one mapped in another namespace (a
    /// pod's reset is seen in its own namespace, its NAT in the node's).
    pub fn find(&self, client: Ep, proto: u8, netns: u32) -> Option<FlowId> {
        let mut i = self.home(client, proto);
        let mut best: Option<FlowId> = None;
        loop {
            let s = &self.slots[i];
            if !s.used() {
                return best;
            }
            if s.is(client, proto) {
                if s.netns == netns {
                    return Some(i);
                }
                if best.is_none_or(|b| self.slots[b].last_seen_ms < s.last_seen_ms) {
                    best = Some(i);
                }
            }
            i = (i + 1) & self.mask;
        }
    }

    /// The slot of exactly `key`, or the empty slot where it would go.
    fn find_exact(&self, key: FlowKey) -> Result<FlowId, usize> {
        let mut i = self.home(key.client, key.proto);
        loop {
            let s = &self.slots[i];
            if !s.used() {
                return Err(i);
            }
            if s.is(key.client, key.proto) && s.netns == key.netns {
                return Ok(i);
            }
            i = (i + 1) & self.mask;
        }
    }

    pub fn get(&self, id: FlowId) -> Flow {
        let s = &self.slots[id];
        Flow {
            service: self.eps.get(s.service),
            backend: self.eps.get(s.backend),
            previous_backend: self.eps.get(s.previous_backend),
            mapped_ms: s.mapped_ms,
            last_seen_ms: s.last_seen_ms,
            idle_ms: s.idle_ms,
            flags: s.flags,
        }
    }

    /// Sets `flags` on the flow and notes activity at `now_ms`.
    pub fn touch(&mut self, id: FlowId, now_ms: u32, flags: u8) {
        let s = &mut self.slots[id];
        s.last_seen_ms = s.last_seen_ms.max(now_ms);
        s.flags |= flags;
    }

    pub fn set_flags(&mut self, id: FlowId, flags: u8) {
        self.slots[id].flags |= flags;
    }

    /// Records that `key` -> `service` now maps to `backend`; returns the
    /// flow after the update. `new_entry`: conntrack (or IPVS) created an
    /// entry for it, so a connection reusing the client port starts afresh
    /// (one finding per broken connection, not per client port).
    pub fn map(
        &mut self,
        key: FlowKey,
        service: Ep,
        backend: Ep,
        ts_ns: u64,
        new_entry: bool,
    ) -> (FlowId, Flow) {
        let now = self.ms(ts_ns);
        let (i, inserted) = match self.find_exact(key) {
            Ok(i) => (i, false),
            Err(_) => (self.insert(key, now), true),
        };
        let s = self.slots[i];
        // A reported connection whose entry was destroyed and is now picked
        // up again mid-stream: the same connection, still reported.
        let lost = flow_flags::DESTROYED | flow_flags::REPORTED;
        let continues = !inserted && s.flags & lost == lost;
        if inserted || self.eps.lookup(service) != Some(s.service) {
            // New, or the client port now talks to another service: a new flow.
            let ids = (self.eps.acquire(service), self.eps.acquire(backend));
            self.release(s.service, s.backend, s.previous_backend);
            let s = &mut self.slots[i];
            (s.service, s.backend, s.previous_backend) = (ids.0, ids.1, 0);
            (s.mapped_ms, s.last_seen_ms, s.idle_ms) = (now, now, 0);
            s.flags = flow_flags::USED;
        } else if self.eps.lookup(backend) != Some(s.backend) {
            let b = self.eps.acquire(backend);
            self.eps.release(s.previous_backend);
            let s = &mut self.slots[i];
            s.previous_backend = s.backend;
            s.backend = b;
            s.idle_ms = now.saturating_sub(s.last_seen_ms);
            s.mapped_ms = now;
            if !continues {
                s.flags &= !flow_flags::REPORTED;
            }
        }
        let s = &mut self.slots[i];
        s.flags &= !flow_flags::DESTROYED;
        if new_entry && !continues {
            s.flags &= !(flow_flags::REPORTED | flow_flags::UNNATED);
        }
        s.last_seen_ms = s.last_seen_ms.max(now);
        (i, self.get(i))
    }

    /// Puts a blank flow for `key` in the table, making room first.
    fn insert(&mut self, key: FlowKey, now: u32) -> FlowId {
        if self.len >= self.max_flows {
            self.evict_oldest();
        }
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            self.resize(self.slots.len() * 2);
        }
        let i = self
            .find_exact(key)
            .expect_err("the key is not in the table");
        self.slots[i] = Slot {
            addr: key.client.addr,
            port: key.client.port,
            proto: key.proto,
            netns: key.netns,
            flags: flow_flags::USED,
            mapped_ms: now,
            last_seen_ms: now,
            ..Slot::default()
        };
        self.len += 1;
        i
    }

    fn release(&mut self, a: EpId, b: EpId, c: EpId) {
        self.eps.release(a);
        self.eps.release(b);
        self.eps.release(c);
    }

    /// The conntrack entry of `key`'s flow went away; the mapping is kept
    /// so that a re-mapping to another backend can be recognised.
    pub fn destroyed(&mut self, key: FlowKey, service: Ep) {
        if let Ok(i) = self.find_exact(key) {
            if self.eps.lookup(service) == Some(self.slots[i].service) {
                self.slots[i].flags |= flow_flags::DESTROYED;
            }
        }
    }

    /// Drops flows idle longer than the TTL.
    pub fn sweep(&mut self, now_ns: u64) {
        let cutoff = self.ms(now_ns).saturating_sub(self.ttl_ms);
        self.evicted_by_age += self.retain(|s| s.last_seen_ms >= cutoff) as u64;
        self.shrink_to_fit();
    }

    /// Evicts about the oldest tenth of the table (by last activity), found
    /// from a sample so the cost stays linear and rare.
    fn evict_oldest(&mut self) {
        let step = (self.slots.len() / 1024).max(1);
        let mut sample: Vec<u32> = (0..self.slots.len())
            .step_by(step)
            .filter(|&i| self.slots[i].used())
            .map(|i| self.slots[i].last_seen_ms)
            .collect();
        sample.sort_unstable();
        let cutoff = sample.get(sample.len() / 10).copied().unwrap_or(0);
        let mut removed = self.retain(|s| s.last_seen_ms > cutoff);
        if removed == 0 {
            // All equally old: drop arbitrary entries to make room.
            let mut n = self.len / 10 + 1;
            removed = self.retain(|_| {
                let drop = n > 0;
                n = n.saturating_sub(1);
                !drop
            });
        }
        self.evicted_by_count += removed as u64;
    }

    /// Removes the flows `keep` refuses, in place (backward-shift deletion:
    /// no tombstones, probe runs stay short); returns how many.
    fn retain(&mut self, mut keep: impl FnMut(&Slot) -> bool) -> usize {
        // Start after an empty slot: no probe run wraps past the start.
        let Some(start) = self.slots.iter().position(|s| !s.used()) else {
            return 0;
        };
        let mut removed = 0;
        let mut k = 1;
        while k < self.slots.len() {
            let i = (start + k) & self.mask;
            let s = self.slots[i];
            if s.used() && !keep(&s) {
                self.release(s.service, s.backend, s.previous_backend);
                self.delete_at(i);
                removed += 1;
                // A later entry may have moved into `i`: look at it again.
                continue;
            }
            k += 1;
        }
        self.len -= removed;
        removed
    }

    /// Empties slot `i`, moving later entries of its probe run back.
    fn delete_at(&mut self, i: usize) {
        let mut hole = i;
        let mut j = i;
        loop {
            j = (j + 1) & self.mask;
            let s = self.slots[j];
            if !s.used() {
                break;
            }
            let home = self.home(
                Ep {
                    addr: s.addr,
                    port: s.port,
                },
                s.proto,
            );
            // `s` may fill the hole unless its home lies after the hole.
            if (j.wrapping_sub(home) & self.mask) >= (j.wrapping_sub(hole) & self.mask) {
                self.slots[hole] = s;
                hole = j;
            }
        }
        self.slots[hole] = Slot::default();
    }

    /// Halves the table (or more) when it is under 30 % full.
    fn shrink_to_fit(&mut self) {
        if self.slots.len() > MIN_SLOTS && self.len * 10 < self.slots.len() * 3 {
            let want = (self.len * 4 / 3 + 1).next_power_of_two().max(MIN_SLOTS);
            self.resize(want);
        }
    }

    fn resize(&mut self, slots: usize) {
        let old = std::mem::replace(&mut self.slots, blank_slots(slots));
        self.mask = slots - 1;
        self.shift = 64 - slots.trailing_zeros();
        for s in old.into_iter().filter(Slot::used) {
            let mut i = self.home(
                Ep {
                    addr: s.addr,
                    port: s.port,
                },
                s.proto,
            );
            while self.slots[i].used() {
                i = (i + 1) & self.mask;
            }
            self.slots[i] = s;
        }
    }

    pub fn stats(&self) -> FlowStats {
        FlowStats {
            tracked: self.len,
            evicted_by_age: self.evicted_by_age,
            evicted_by_count: self.evicted_by_count,
        }
    }

    /// Service and backend endpoints the flows name (interned once each).
    #[cfg(test)]
    pub fn endpoints(&self) -> usize {
        self.eps.len()
    }

    /// Heap bytes per tracked flow: the slots and the endpoint interner
    /// over the flows in the table.
    pub fn bytes_per_flow(&self) -> f64 {
        let bytes = self.slots.capacity() * size_of::<Slot>() + self.eps.heap_bytes();
        bytes as f64 / self.len.max(1) as f64
    }
}

/// `n` empty slots, on huge pages where the kernel gives them: lookups land
/// anywhere in the table, and at a million flows (96 MB) with 4 KiB pages
/// nearly every one would also miss the TLB.
fn blank_slots(n: usize) -> Vec<Slot> {
    let mut v = Vec::<Slot>::with_capacity(n);
    crate::memory::advise_huge_pages(v.as_ptr().cast(), n * size_of::<Slot>());
    v.resize(n, Slot::default());
    v
}

/// Starts loading the cache line at `p` (a hint: any address will do).
#[inline(always)]
pub(super) fn prefetch_read(p: *const i8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it never faults, whatever the address.
    #[allow(unused_unsafe)]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(test)]
mod tests;
