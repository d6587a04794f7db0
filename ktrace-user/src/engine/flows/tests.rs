use super::*;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use proptest::prelude::*;

const DAY_NS: u64 = 86_400 * 1_000_000_000;

fn a(s: &str) -> Ep {
    Ep::new(s.parse::<SocketAddr>().unwrap())
}

fn key(client: &str) -> FlowKey {
    FlowKey {
        client: a(client),
        proto: TCP,
        netns: 1,
    }
}

fn nth(i: u32) -> FlowKey {
    FlowKey {
        client: Ep::new(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(i)), 1)),
        proto: TCP,
        netns: 1,
    }
}

#[test]
fn remap_remembers_the_previous_backend() {
    let mut t = FlowTable::new(100, u64::MAX);
    let (s, b1, b2) = (a("10.96.0.10:80"), a("10.0.1.2:80"), a("10.0.1.3:80"));
    t.map(key("10.0.0.2:1000"), s, b1, 1, true);
    t.destroyed(key("10.0.0.2:1000"), s);
    let id = t.find(a("10.0.0.2:1000"), TCP, 1).unwrap();
    assert!(t.get(id).has(flow_flags::DESTROYED));
    let (_, f) = t.map(key("10.0.0.2:1000"), s, b2, 5_000_000, true);
    assert_eq!(f.previous_backend, b1);
    assert_eq!(f.backend, b2);
    assert!(!f.has(flow_flags::DESTROYED));
    assert_eq!((f.mapped_ms, f.idle_ms), (5, 5));
    assert_eq!(size_of::<Slot>(), 48);
    // The old backend stays named while a flow remembers it.
    assert_eq!(t.endpoints(), 3);
}

#[test]
fn protocol_and_namespace_are_part_of_the_key() {
    let mut t = FlowTable::new(100, u64::MAX);
    let c = a("10.0.0.2:5353");
    let (dns, web) = (a("10.96.0.10:53"), a("10.96.0.20:80"));
    let udp = FlowKey {
        client: c,
        proto: 17,
        netns: 1,
    };
    let other_ns = FlowKey {
        client: c,
        proto: TCP,
        netns: 2,
    };
    t.map(key("10.0.0.2:5353"), web, a("10.0.1.2:80"), 1, true);
    t.map(udp, dns, a("10.0.2.2:53"), 2, true);
    t.map(other_ns, web, a("10.0.9.9:80"), 3_000_000, true);
    assert_eq!(t.stats().tracked, 3);
    let tcp1 = t.get(t.find(c, TCP, 1).unwrap());
    assert_eq!(
        tcp1.backend,
        a("10.0.1.2:80"),
        "UDP DNAT does not touch TCP"
    );
    assert_eq!(t.get(t.find(c, TCP, 2).unwrap()).backend, a("10.0.9.9:80"));
    assert_eq!(t.get(t.find(c, 17, 7).unwrap()).service, dns);
    // From a namespace that mapped nothing (a pod's own): the most recent.
    assert_eq!(t.get(t.find(c, TCP, 7).unwrap()).backend, a("10.0.9.9:80"));
    assert!(t.find(a("10.0.0.3:5353"), TCP, 1).is_none());
}

#[test]
fn table_is_bounded_and_counts_evictions() {
    let mut t = FlowTable::new(1000, 50_000_000);
    let (s, b) = (a("10.96.0.10:80"), a("10.0.1.2:80"));
    for i in 0..5000u32 {
        t.map(nth(i), s, b, i as u64 * 1_000_000, true);
    }
    assert!(t.stats().tracked <= 1000);
    assert!(t.stats().evicted_by_count >= 4000);
    t.sweep(10_000_000_000);
    assert_eq!(t.stats().tracked, 0);
    assert!(t.stats().evicted_by_age > 0);
    assert_eq!(t.endpoints(), 0, "endpoints go with their last flow");
    assert_eq!(t.slots.len(), MIN_SLOTS, "an empty table shrinks");
}

#[test]
fn the_clock_neither_wraps_nor_saturates() {
    let mut t = FlowTable::new(100, 6 * 3600 * 1_000_000_000);
    let (s, b1, b2) = (a("10.96.0.10:80"), a("10.0.1.2:80"), a("10.0.1.3:80"));
    let start = 1_000 * DAY_NS;
    for day in [0u64, 30, 49, 50, 400, 3650] {
        let ts = start + day * DAY_NS;
        t.sweep(ts);
        t.map(key("10.0.0.2:1000"), s, b1, ts, true);
        // Re-mapped 3.5 s later, after 2 s without traffic.
        let id = t.find(a("10.0.0.2:1000"), TCP, 1).unwrap();
        let now = t.ms(ts + 1_500_000_000);
        t.touch(id, now, 0);
        let (_, f) = t.map(key("10.0.0.2:1000"), s, b2, ts + 3_500_000_000, false);
        assert_eq!(f.idle_ms, 2_000, "day {day}");
        assert_eq!(f.mapped_ms - t.ms(ts), 3_500, "day {day}");
        t.map(key("10.0.0.2:1000"), s, b1, ts + 4_000_000_000, true);
    }
}

#[test]
fn bytes_per_flow_stay_bounded_at_every_size() {
    let mut t = FlowTable::new(1 << 20, u64::MAX);
    let (s, b) = (a("10.96.0.10:80"), a("10.0.1.2:80"));
    let mut worst = 0.0f64;
    for i in 0..100_000u32 {
        t.map(nth(i), s, b, 1, true);
        if i >= 1000 {
            worst = worst.max(t.bytes_per_flow());
        }
    }
    assert!(worst <= 130.0, "{worst} bytes/flow");
}

proptest! {
    /// The table finds exactly what a plain map holds, through inserts,
    /// sweeps (backward-shift deletion), evictions, growth and shrinking.
    #[test]
    fn agrees_with_a_map(ops in prop::collection::vec((0u32..400, 0u64..60), 1..600)) {
        let mut t = FlowTable::new(200, 20_000_000);
        let mut model: HashMap<u32, u64> = HashMap::new();
        let s = a("10.96.0.10:80");
        let mut now = 0u64;
        for (k, dt) in ops {
            now += dt * 1_000_000;
            if dt == 59 {
                t.sweep(now);
                let cutoff = (now / 1_000_000).saturating_sub(20);
                model.retain(|_, seen| *seen / 1_000_000 >= cutoff);
                continue;
            }
            let evicted = t.stats().evicted_by_count;
            let be = Ep::new(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(k % 7)), 80));
            t.map(nth(k), s, be, now, true);
            if t.stats().evicted_by_count > evicted {
                // Which ones went is the table's choice: follow it.
                model.retain(|k, _| t.find(nth(*k).client, TCP, 1).is_some());
            }
            model.insert(k, now);
            prop_assert_eq!(t.stats().tracked, model.len());
            for k in model.keys() {
                let id = t.find(nth(*k).client, TCP, 1);
                prop_assert!(id.is_some(), "flow {} lost", k);
                let be = Ep::new(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(k % 7)), 80));
                prop_assert_eq!(t.get(id.unwrap()).backend, be);
            }
        }
    }
}
