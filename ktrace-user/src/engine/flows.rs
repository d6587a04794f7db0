//! NAT flow state, keyed by client endpoint: which service a client
//! connected to, which backend conntrack sent it to, and what it was before.
//! Bounded: entries idle past a TTL are swept, and past `max_flows` the
//! oldest tenth is evicted; both are counted.

use foldhash::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// A compact endpoint: 18 bytes instead of `SocketAddr`'s 32 (IPv4 stored
/// v4-mapped), to keep the per-flow state small at a million flows. All
/// zeroes means "none".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Ep {
    addr: [u8; 16],
    port: [u8; 2],
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

/// What ktrace knows of one client's NATed flow. Times are milliseconds
/// since the table's base (u32: 49 days of range, 4 bytes instead of 8).
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
    /// Last activity seen before the re-mapping (for the idle time).
    pub previous_seen_ms: u32,
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
}

impl Flow {
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlowStats {
    pub tracked: usize,
    pub evicted_by_age: u64,
    pub evicted_by_count: u64,
}

pub struct FlowTable {
    flows: HashMap<Ep, Flow>,
    max_flows: usize,
    ttl_ms: u32,
    /// Monotonic ns that `*_ms` fields count from (first event seen).
    base_ns: Option<u64>,
    evicted_by_age: u64,
    evicted_by_count: u64,
}

impl FlowTable {
    pub fn new(max_flows: usize, ttl_ns: u64) -> FlowTable {
        FlowTable {
            flows: HashMap::default(),
            max_flows: max_flows.max(16),
            ttl_ms: (ttl_ns / 1_000_000).min(u32::MAX as u64) as u32,
            base_ns: None,
            evicted_by_age: 0,
            evicted_by_count: 0,
        }
    }

    /// Monotonic ns to the table's millisecond clock.
    pub fn ms(&mut self, ts_ns: u64) -> u32 {
        let base = *self.base_ns.get_or_insert(ts_ns);
        (ts_ns.saturating_sub(base) / 1_000_000).min(u32::MAX as u64) as u32
    }

    pub fn get(&self, client: SocketAddr) -> Option<&Flow> {
        self.flows.get(&Ep::new(client))
    }

    pub fn get_mut(&mut self, client: SocketAddr) -> Option<&mut Flow> {
        self.flows.get_mut(&Ep::new(client))
    }

    /// Records that `client` -> `service` now maps to `backend`; returns the
    /// flow after the update. `new_entry`: conntrack (or IPVS) created an
    /// entry for it, so a connection reusing the client port starts afresh
    /// (one finding per broken connection, not per client port).
    pub fn map(
        &mut self,
        client: SocketAddr,
        service: SocketAddr,
        backend: SocketAddr,
        ts_ns: u64,
        new_entry: bool,
    ) -> Flow {
        let now = self.ms(ts_ns);
        let key = Ep::new(client);
        if self.flows.len() >= self.max_flows && !self.flows.contains_key(&key) {
            self.evict_oldest();
        }
        let (service, backend) = (Ep::new(service), Ep::new(backend));
        let fresh = Flow {
            service,
            backend,
            previous_backend: Ep::NONE,
            mapped_ms: now,
            last_seen_ms: now,
            previous_seen_ms: now,
            flags: 0,
        };
        let flow = self.flows.entry(key).or_insert(fresh);
        if flow.service != service {
            // The client port now talks to another service: a new flow.
            *flow = fresh;
        } else if flow.backend != backend {
            flow.previous_backend = flow.backend;
            flow.previous_seen_ms = flow.last_seen_ms;
            flow.backend = backend;
            flow.mapped_ms = now;
            flow.flags &= !flow_flags::REPORTED;
        }
        flow.flags &= !flow_flags::DESTROYED;
        if new_entry {
            flow.flags &= !(flow_flags::REPORTED | flow_flags::UNNATED);
        }
        flow.last_seen_ms = flow.last_seen_ms.max(now);
        *flow
    }

    /// The conntrack entry of `client`'s flow went away; the mapping is kept
    /// so that a re-mapping to another backend can be recognised.
    pub fn destroyed(&mut self, client: SocketAddr, service: SocketAddr) {
        if let Some(f) = self.flows.get_mut(&Ep::new(client)) {
            if f.service == Ep::new(service) {
                f.flags |= flow_flags::DESTROYED;
            }
        }
    }

    /// Drops flows idle longer than the TTL.
    pub fn sweep(&mut self, now_ns: u64) {
        let cutoff = self.ms(now_ns).saturating_sub(self.ttl_ms);
        let before = self.flows.len();
        self.flows.retain(|_, f| f.last_seen_ms >= cutoff);
        self.evicted_by_age += (before - self.flows.len()) as u64;
    }

    /// Evicts about the oldest tenth of the table (by last activity), found
    /// from a sample so the cost stays linear and rare.
    fn evict_oldest(&mut self) {
        let mut sample: Vec<u32> = self
            .flows
            .values()
            .step_by((self.flows.len() / 1024).max(1))
            .map(|f| f.last_seen_ms)
            .collect();
        sample.sort_unstable();
        let cutoff = sample.get(sample.len() / 10).copied().unwrap_or(0);
        let before = self.flows.len();
        self.flows.retain(|_, f| f.last_seen_ms > cutoff);
        if self.flows.len() == before {
            // All equally old: drop arbitrary entries to make room.
            let drop: Vec<Ep> = self.flows.keys().take(before / 10 + 1).copied().collect();
            for k in drop {
                self.flows.remove(&k);
            }
        }
        self.evicted_by_count += (before - self.flows.len()) as u64;
    }

    pub fn stats(&self) -> FlowStats {
        FlowStats {
            tracked: self.flows.len(),
            evicted_by_age: self.evicted_by_age,
            evicted_by_count: self.evicted_by_count,
        }
    }

    /// Heap bytes per tracked flow: the table's allocation (buckets of
    /// key + value + one control byte) over the flows in it.
    pub fn bytes_per_flow(&self) -> f64 {
        let buckets = (self.flows.capacity() * 8 / 7).next_power_of_two().max(1);
        let entry = size_of::<(Ep, Flow)>() + 1;
        (buckets * entry) as f64 / self.flows.len().max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn remap_remembers_the_previous_backend() {
        let mut t = FlowTable::new(100, u64::MAX);
        t.map(
            a("10.0.0.2:1000"),
            a("10.96.0.10:80"),
            a("10.0.1.2:80"),
            1,
            true,
        );
        t.destroyed(a("10.0.0.2:1000"), a("10.96.0.10:80"));
        assert!(t
            .get(a("10.0.0.2:1000"))
            .unwrap()
            .has(flow_flags::DESTROYED));
        let f = t.map(
            a("10.0.0.2:1000"),
            a("10.96.0.10:80"),
            a("10.0.1.3:80"),
            5_000_000,
            true,
        );
        assert_eq!(f.previous_backend.opt(), Some(a("10.0.1.2:80")));
        assert_eq!(f.backend.get(), a("10.0.1.3:80"));
        assert!(!f.has(flow_flags::DESTROYED));
        assert_eq!(f.mapped_ms, 4);
        assert_eq!(Ep::new(a("[fd00::1]:443")).get(), a("[fd00::1]:443"));
        assert_eq!(Ep::new(a("10.1.2.3:9")).get(), a("10.1.2.3:9"));
        assert!(size_of::<(Ep, Flow)>() <= 92);
    }

    #[test]
    fn table_is_bounded_and_counts_evictions() {
        let mut t = FlowTable::new(1000, 50_000_000);
        for i in 0..5000u32 {
            let c = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(i)), 1);
            t.map(
                c,
                a("10.96.0.10:80"),
                a("10.0.1.2:80"),
                i as u64 * 1_000_000,
                true,
            );
        }
        assert!(t.stats().tracked <= 1000);
        assert!(t.stats().evicted_by_count >= 4000);
        t.sweep(10_000_000_000);
        assert_eq!(t.stats().tracked, 0);
        assert!(t.stats().evicted_by_age > 0);
    }
}
