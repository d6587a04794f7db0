//! Soak: the correlation engine through 400 simulated days of event time.
//!
//! Each day (sparse: one busy burst, not 24 hours of events) brings
//! connection churn from new clients to backends that change as pods come
//! and go, UDP DNS beside TCP, conntrack flushes, and the same lab incidents.
//! Memory must stay within its bound every day, and the incidents of day
//! 399 (past the 49.7 days where a 32-bit millisecond clock wraps) must be
//! named exactly as on day 1.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ktrace::engine::{Engine, EngineConfig, Finding};
use ktrace::event::{Event, EventBody, IpvsConnNew, NatEntry, Source};

const SEC: u64 = 1_000_000_000;
const DAY: u64 = 86_400 * SEC;
const MAX_FLOWS: usize = 4_000;
/// Connections opened per simulated day (more than the table holds).
const CHURN: u32 = 6_000;
/// Where NAT happens (the node) and where clients reset (a pod).
const NODE_NS: u32 = 4026531840;
const POD_NS: u32 = 4026532100;
const PSH_ACK: u8 = 0x18;

fn ep(a: u8, b: u8, c: u8, d: u8, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(a, b, c, d)), port)
}

struct Day {
    ts: u64,
    events: Vec<Event>,
}

impl Day {
    fn at(&mut self, dt_ms: u64, netns: u32, body: EventBody) {
        self.ts += dt_ms * 1_000_000;
        self.events.push(Event {
            ts_ns: self.ts,
            netns,
            source: Source::Tracepoint,
            body,
        });
    }

    fn map(&mut self, dt_ms: u64, client: SocketAddr, service: SocketAddr, backend: SocketAddr) {
        self.map_proto(dt_ms, client, service, backend, 6);
    }

    fn map_proto(
        &mut self,
        dt_ms: u64,
        client: SocketAddr,
        service: SocketAddr,
        backend: SocketAddr,
        protocol: u8,
    ) {
        let body = EventBody::NatMapping(Box::new(NatEntry {
            client,
            service,
            backend,
            protocol,
            snat: None,
        }));
        self.at(dt_ms, NODE_NS, body);
    }

    fn rst(&mut self, dt_ms: u64, src: SocketAddr, dst: SocketAddr) {
        let body = EventBody::TcpSendReset {
            src,
            dst,
            reason: Some("NO_SOCKET".into()),
            socket: None,
            trigger_flags: Some(PSH_ACK),
        };
        self.at(dt_ms, POD_NS, body);
    }
}

/// A day's churn: connections from clients never seen before to 50
/// services whose backends are pods of the day; some flushed and re-mapped.
fn churn(day: &mut Day, n: u64) {
    for i in 0..CHURN {
        let x = (n as u32).wrapping_mul(CHURN).wrapping_add(i);
        let client = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::from(0x0a80_0000 | (x >> 8) & 0x7f_ffff)),
            20_000 + (x & 0xff) as u16,
        );
        let svc = ep(10, 96, 1, (i % 50) as u8, 80);
        let pod = |k: u32| {
            ep(
                10,
                200 + (n % 50) as u8,
                (k % 200) as u8,
                1 + (i % 7) as u8,
                8080,
            )
        };
        day.map(0, client, svc, pod(i));
        if i % 10 == 0 {
            // A flush re-maps it to another pod, which is fine traffic.
            day.map(1, client, svc, pod(i + 1));
        }
    }
}

/// The lab's incidents, with the same addresses every day.
fn incidents(day: &mut Day) {
    let svc = ep(10, 96, 0, 10, 2222);
    let (b1, b2) = (ep(10, 0, 1, 2, 2222), ep(10, 0, 1, 3, 2222));
    let dns = ep(10, 96, 0, 53, 53);
    // Un-NATed reply; the same client port also resolves a name over UDP.
    let c1 = ep(10, 0, 0, 2, 40_000);
    day.map(1_000, c1, svc, b1);
    day.map_proto(5, c1, dns, ep(10, 0, 2, 2, 53), 17);
    day.rst(100, c1, b1);
    // Flush, re-mapping to another backend, which resets the client.
    let c2 = ep(10, 0, 0, 3, 40_001);
    day.map(1_000, c2, svc, b1);
    let body = EventBody::NatDestroy(Box::new(NatEntry {
        client: c2,
        service: svc,
        backend: b1,
        protocol: 6,
        snat: None,
    }));
    day.at(2_500, NODE_NS, body);
    day.map(10, c2, svc, b2);
    day.rst(10, b2, c2);
    // A storm: 40 connections whose replies go un-NATed within a second.
    for k in 0..40u16 {
        let c = ep(10, 0, 3, 1 + (k % 4) as u8, 41_000 + k);
        day.map(5, c, svc, b2);
        day.rst(5, c, b2);
    }
    // IPVS sends a new connection to a drained real server.
    let body = EventBody::IpvsConnNew(Box::new(IpvsConnNew {
        client: ep(10, 0, 0, 4, 40_002),
        service: ep(10, 96, 0, 20, 80),
        real_server: ep(10, 0, 1, 9, 80),
        protocol: 6,
        template: false,
        conn_flags: 0,
        dest_flags: 0,
        weight: Some(0),
    }));
    day.at(100, NODE_NS, body);
    let body = EventBody::CtTableFull {
        src: ep(10, 0, 0, 5, 40_003),
        dst: svc,
        errno: -12,
    };
    day.at(100, NODE_NS, body);
}

/// What a finding names, without its time.
fn named(f: &Finding) -> String {
    format!(
        "{} {:?} {:?} {:?} {:?} {}",
        f.kind().as_str(),
        f.severity,
        f.service,
        f.backend,
        f.client,
        f.cause
    )
}

#[test]
fn four_hundred_days_of_churn_keep_memory_bounded_and_findings_named() {
    let mut engine = Engine::new(EngineConfig {
        max_flows: MAX_FLOWS,
        ..EngineConfig::default()
    });
    let mut out = Vec::new();
    let mut by_day: Vec<Vec<String>> = Vec::new();
    // CLOCK_MONOTONIC on a node already up a while.
    let boot = 3 * DAY + 12_345 * SEC;
    for n in 0..400u64 {
        let mut day = Day {
            ts: boot + n * DAY,
            events: Vec::new(),
        };
        churn(&mut day, n);
        incidents(&mut day);
        engine.process_batch(&day.events, &mut out);
        // The storm ends, held findings come due.
        engine.tick(day.ts + 60 * SEC, &mut out);
        let mut names: Vec<String> = out.drain(..).map(|f| named(&f)).collect();
        names.sort();
        by_day.push(names);

        let s = engine.stats();
        assert!(s.flows_tracked <= MAX_FLOWS, "day {n}: {s:?}");
        let bytes = engine.bytes_per_flow() * s.flows_tracked as f64;
        assert!(
            bytes <= (MAX_FLOWS * 200) as f64,
            "day {n}: {bytes} bytes of flow state"
        );
        assert!(
            engine.bytes_per_flow() <= 200.0,
            "day {n}: {} bytes/flow",
            engine.bytes_per_flow()
        );
    }
    let s = engine.stats();
    assert!(s.flows_evicted_by_count > 0, "the bound was reached: {s:?}");
    assert!(s.flows_evicted_by_age > 0, "flows aged out: {s:?}");
    let first = &by_day[1];
    for kind in [
        "unnated_reply",
        "backend_switch",
        "rst_storm",
        "quiescent_backend",
    ] {
        assert!(
            first.iter().any(|f| f.starts_with(kind)),
            "day 1 names a {kind}: {first:#?}"
        );
    }
    assert!(first.iter().any(|f| f.starts_with("conntrack_table_full")));
    for n in [49, 50, 100, 200, 399] {
        assert_eq!(&by_day[n], first, "day {n} against day 1");
    }
}
