//! Endpoints: a compact, hashable form of `SocketAddr` ([`Ep`]), and a
//! reference-counted interner that lets a million flows name their service
//! and backends with 4-byte ids (services and backends are few, clients many).
//!
//! Outside the engine an address and port is a `std::net::SocketAddr`
//! (events, findings, output, names, recordings). Two other forms exist,
//! each for a reason:
//! - `ktrace_common::Endpoint`, the `#[repr(C)]` layout the eBPF programs
//!   write into the ring buffer (no Rust enum crosses it); only `decode`
//!   reads it, into `SocketAddr`.
//! - [`Ep`], private to the engine: its flow keys. 18 bytes with no
//!   padding instead of 32, cheap to hash, and IPv4 stored v4-mapped, so a
//!   dual-stack socket's `::ffff:10.0.0.2` and conntrack's `10.0.0.2` are
//!   one flow. It never leaves the engine: [`Ep::get`] gives findings a
//!   `SocketAddr` back, IPv4 in its plain form (as the JSON has always
//!   printed it).

use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use foldhash::fast::RandomState;
use hashbrown::HashTable;

/// A compact endpoint: 18 bytes instead of `SocketAddr`'s 32 (IPv4 stored
/// v4-mapped). All zeroes means "none".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Ep {
    pub(super) addr: [u8; 16],
    pub(super) port: [u8; 2],
}

impl Ep {
    pub const NONE: Ep = Ep {
        addr: [0; 16],
        port: [0; 2],
    };

    pub fn new(a: SocketAddr) -> Ep {
        let addr = match a.ip() {
            IpAddr::V4(v) => v.to_ipv6_mapped().octets(),
            IpAddr::V6(v) => v.octets(),
        };
        Ep {
            addr,
            port: a.port().to_ne_bytes(),
        }
    }

    pub fn get(self) -> SocketAddr {
        let v6 = Ipv6Addr::from(self.addr);
        let ip = match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        };
        SocketAddr::new(ip, u16::from_ne_bytes(self.port))
    }

    pub fn is_none(self) -> bool {
        self == Ep::NONE
    }

    pub fn opt(self) -> Option<SocketAddr> {
        (!self.is_none()).then(|| self.get())
    }
}

/// Id of an interned endpoint; 0 is [`Ep::NONE`].
pub type EpId = u32;

/// Interned endpoints with reference counts: an id is freed (and reused)
/// when the last flow naming it goes, so churn of pods and services over
/// months cannot grow it. The index holds only ids (5 bytes an entry).
pub struct Endpoints {
    ids: HashTable<EpId>,
    hasher: RandomState,
    eps: Vec<Ep>,
    refs: Vec<u32>,
    free: Vec<EpId>,
}

impl Default for Endpoints {
    fn default() -> Self {
        Endpoints {
            ids: HashTable::new(),
            hasher: RandomState::default(),
            eps: vec![Ep::NONE],
            refs: vec![0],
            free: Vec::new(),
        }
    }
}

impl Endpoints {
    /// The id of `ep` if interned (0 for none or unknown: compare with care).
    pub fn lookup(&self, ep: Ep) -> Option<EpId> {
        if ep.is_none() {
            return Some(0);
        }
        let h = self.hasher.hash_one(ep);
        self.ids.find(h, |&id| self.eps[id as usize] == ep).copied()
    }

    /// Takes a reference to `ep`, interning it if new.
    pub fn acquire(&mut self, ep: Ep) -> EpId {
        if ep.is_none() {
            return 0;
        }
        let h = self.hasher.hash_one(ep);
        let id = match self.ids.find(h, |&id| self.eps[id as usize] == ep) {
            Some(&id) => id,
            None => {
                let id = match self.free.pop() {
                    Some(id) => {
                        self.eps[id as usize] = ep;
                        id
                    }
                    None => {
                        if self.eps.len() == self.eps.capacity() {
                            // Grow by a quarter: less slack than doubling.
                            let more = self.eps.len() / 4 + 16;
                            self.eps.reserve_exact(more);
                            self.refs.reserve_exact(more);
                        }
                        self.eps.push(ep);
                        self.refs.push(0);
                        (self.eps.len() - 1) as EpId
                    }
                };
                let (eps, hasher) = (&self.eps, &self.hasher);
                self.ids
                    .insert_unique(h, id, |&i| hasher.hash_one(eps[i as usize]));
                id
            }
        };
        self.refs[id as usize] += 1;
        id
    }

    /// Drops a reference taken by [`Endpoints::acquire`].
    pub fn release(&mut self, id: EpId) {
        if id == 0 {
            return;
        }
        let r = &mut self.refs[id as usize];
        *r -= 1;
        if *r == 0 {
            let h = self.hasher.hash_one(self.eps[id as usize]);
            if let Ok(e) = self.ids.find_entry(h, |&i| i == id) {
                e.remove();
            }
            self.free.push(id);
        }
    }

    pub fn get(&self, id: EpId) -> Ep {
        self.eps[id as usize]
    }

    /// Endpoints currently named by some flow.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Heap bytes held (map buckets, id arrays, free list).
    pub fn heap_bytes(&self) -> usize {
        let map = self.ids.capacity() * 8 / 7 * (size_of::<EpId>() + 1);
        map + self.eps.capacity() * size_of::<Ep>()
            + self.refs.capacity() * 4
            + self.free.capacity() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_counted_and_reused() {
        let a = Ep::new("10.0.1.2:80".parse().unwrap());
        let b = Ep::new("[fd00::1]:443".parse().unwrap());
        assert_eq!(b.get(), "[fd00::1]:443".parse().unwrap());
        assert_eq!(a.get(), "10.0.1.2:80".parse().unwrap());
        let mut t = Endpoints::default();
        let ia = t.acquire(a);
        assert_eq!(t.acquire(a), ia);
        let ib = t.acquire(b);
        assert_ne!(ia, ib);
        assert_eq!(t.acquire(Ep::NONE), 0);
        t.release(ia);
        assert_eq!(t.lookup(a), Some(ia), "one reference left");
        t.release(ia);
        assert_eq!(t.lookup(a), None);
        assert_eq!(t.len(), 1);
        // The freed id is reused: the arrays do not grow with churn.
        let c = Ep::new("10.0.1.3:80".parse().unwrap());
        assert_eq!(t.acquire(c), ia);
        assert_eq!(t.get(ia), c);
    }
}
