//! The table a [`Layer`](super::Layer) keeps its addresses in, built for
//! the event path's lookups: IPv4 addresses (nearly all of a cluster's) in
//! one flat open-addressing array whose 32-byte slots hold the address and
//! its names side by side, so a lookup reads one cache line (two when it
//! probes past the end of one), where a general hash map reads its control
//! bytes, then a bucket that may span two lines. At most half full (linear
//! probing then stays short); IPv6 addresses in a hash map beside it.
//!
//! The table only places slots; what a slot's fields mean is the layer's.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use super::name::{PodName, ServiceName};

/// What a layer knows about one address, in one half of a cache line.
#[derive(Debug, Clone, Default)]
#[repr(C, align(32))]
pub struct Slot {
    /// The Pod at the address (a Pod outranks any other peer).
    pub pod: Option<Arc<PodName>>,
    /// The name of the first Service port at the address.
    pub name: Option<Arc<ServiceName>>,
    key: u32,
    /// The first Service port's number (when `bits` says there is one).
    pub port: u16,
    /// Bit 0: the slot is taken; the others are the layer's (see `model`).
    pub bits: u8,
    _pad: u8,
    /// Any other peer, as the layer encodes it (0: none).
    pub other: u32,
    /// The address's further Service ports, as the layer encodes them (0: none).
    pub more: u32,
}

const TAKEN: u8 = 1;

impl Slot {
    fn taken(&self) -> bool {
        self.bits & TAKEN != 0
    }
}

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Addresses and their slots.
#[derive(Debug, Clone, Default)]
pub struct AddrTable {
    /// A power of two long (or empty), at most half taken.
    v4: Box<[Slot]>,
    /// `64 - log2(v4.len())`: a key's first slot is its hash's top bits.
    shift: u32,
    v4_len: usize,
    v6: Map<Ipv6Addr, Slot>,
}

/// Fibonacci hashing: the top bits of the key times 2^64/φ (neighbouring
/// addresses, as Pod CIDRs hand them out, land far apart).
fn home(key: u32, shift: u32) -> usize {
    (u64::from(key).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> shift) as usize
}

impl AddrTable {
    /// Room for `n` IPv4 addresses without growing.
    pub fn with_capacity(n: usize) -> AddrTable {
        let mut t = AddrTable::default();
        if n > 0 {
            t.resize((2 * n).next_power_of_two());
        }
        t
    }

    pub fn is_empty(&self) -> bool {
        self.v4_len == 0 && self.v6.is_empty()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.v4_len + self.v6.len()
    }

    #[inline]
    pub fn get(&self, ip: IpAddr) -> Option<&Slot> {
        match ip {
            IpAddr::V4(a) => self.get4(a.to_bits()),
            IpAddr::V6(a) => self.v6.get(&a),
        }
    }

    #[inline]
    fn get4(&self, key: u32) -> Option<&Slot> {
        if self.v4_len == 0 {
            return None;
        }
        let mask = self.v4.len() - 1;
        let mut i = home(key, self.shift);
        loop {
            let s = &self.v4[i];
            if !s.taken() {
                return None;
            }
            if s.key == key {
                return Some(s);
            }
            i = (i + 1) & mask;
        }
    }

    /// The slot of `ip`, an empty one taken for it when it has none.
    pub fn entry(&mut self, ip: IpAddr) -> &mut Slot {
        match ip {
            IpAddr::V4(a) => self.entry4(a.to_bits()),
            IpAddr::V6(a) => {
                let s = self.v6.entry(a).or_default();
                s.bits |= TAKEN;
                s
            }
        }
    }

    fn entry4(&mut self, key: u32) -> &mut Slot {
        if (self.v4_len + 1) * 2 > self.v4.len() {
            self.grow();
        }
        let mask = self.v4.len() - 1;
        let mut i = home(key, self.shift);
        while self.v4[i].taken() && self.v4[i].key != key {
            i = (i + 1) & mask;
        }
        let s = &mut self.v4[i];
        if !s.taken() {
            s.bits = TAKEN;
            s.key = key;
            self.v4_len += 1;
        }
        s
    }

    /// Twice the slots, every taken one placed again.
    fn grow(&mut self) {
        self.resize((self.v4.len() * 2).max(64));
    }

    /// `len` slots (a power of two), every taken one placed again.
    fn resize(&mut self, len: usize) {
        let old = std::mem::replace(
            &mut self.v4,
            std::iter::repeat_with(Slot::default).take(len).collect(),
        );
        self.shift = 64 - len.trailing_zeros();
        let mask = len - 1;
        for s in old.into_vec().into_iter().filter(Slot::taken) {
            let mut i = home(s.key, self.shift);
            while self.v4[i].taken() {
                i = (i + 1) & mask;
            }
            self.v4[i] = s;
        }
    }

    /// Every address and its slot, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (IpAddr, &Slot)> {
        let v4 = self
            .v4
            .iter()
            .filter(|s| s.taken())
            .map(|s| (IpAddr::V4(Ipv4Addr::from_bits(s.key)), s));
        v4.chain(self.v6.iter().map(|(a, s)| (IpAddr::V6(*a), s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_half_a_cache_line() {
        assert_eq!(std::mem::size_of::<Slot>(), 32);
        assert_eq!(std::mem::align_of::<Slot>(), 32);
    }

    #[test]
    fn every_address_is_found_after_growing() {
        let mut t = AddrTable::default();
        let ips: Vec<IpAddr> = (0..5000u32)
            .map(|i| IpAddr::V4(Ipv4Addr::from_bits(0x0af4_0000 + i * 3)))
            .chain((0..50u16).map(|i| IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i))))
            .chain([IpAddr::V4(Ipv4Addr::UNSPECIFIED)])
            .collect();
        for (n, ip) in ips.iter().enumerate() {
            t.entry(*ip).port = n as u16;
        }
        assert_eq!(t.len(), ips.len());
        assert!(t.v4.len() >= 2 * t.v4_len);
        for (n, ip) in ips.iter().enumerate() {
            assert_eq!(t.get(*ip).map(|s| s.port), Some(n as u16), "{ip}");
            // Taking a slot again finds the same one.
            assert_eq!(t.entry(*ip).port, n as u16);
        }
        assert_eq!(t.len(), ips.len());
        assert!(t.get("10.244.0.1".parse().unwrap()).is_none());
        assert!(t.get("fd00::ffff".parse().unwrap()).is_none());
        let mut seen: Vec<IpAddr> = t.iter().map(|(ip, _)| ip).collect();
        seen.sort();
        let mut want = ips.clone();
        want.sort();
        assert_eq!(seen, want);
    }
}
