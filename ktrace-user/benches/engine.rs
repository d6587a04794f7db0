//! Correlation engine benchmark: a synthetic stream shaped like incidents at
//! scale, through `Engine::process` on one core.
//!
//! Reports events/s, the latency from an event's arrival to the finding it
//! completes (p50/p99/p99.9, hdrhistogram), and bytes of state per tracked
//! flow at 1 M flows. Run: `cargo bench -p ktrace --bench engine`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use hdrhistogram::Histogram;
use ktrace::engine::{Engine, EngineConfig};
use ktrace::event::{Event, EventBody, Source};

const FLOWS: u32 = 1_000_000;
const SEC: u64 = 1_000_000_000;

fn client(i: u32) -> SocketAddr {
    // 10.0.0.0/8 clients, 50 000 ports each.
    let ip = Ipv4Addr::from(0x0a00_0000u32 + i / 50_000);
    SocketAddr::new(IpAddr::V4(ip), 10_000 + (i % 50_000) as u16)
}

fn service(i: u32) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, (i % 200) as u8)), 443)
}

fn backend(i: u32, gen: u32) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(
            10,
            244,
            ((i + gen) % 50) as u8,
            ((i / 7 + gen) % 250) as u8 + 1,
        )),
        8443,
    )
}

fn ev(ts: u64, body: EventBody) -> Event {
    Event {
        ts_ns: ts,
        netns: 1,
        source: Source::Tracepoint,
        body,
    }
}

fn rst(ts: u64, src: SocketAddr, dst: SocketAddr, trigger: u8) -> Event {
    ev(
        ts,
        EventBody::TcpSendReset {
            src,
            dst,
            reason: None,
            has_socket: false,
            state: 0,
            trigger_flags: Some(trigger),
        },
    )
}

/// The stream: 1 M flows mapped, then per flow one of: an un-NATed reply
/// reset (client -> backend), a flush re-mapping answered by the new
/// backend's reset, a refused connection, or an unrelated reset.
fn stream() -> Vec<Event> {
    let mut v = Vec::with_capacity(FLOWS as usize * 4);
    let mut ts = 1_000 * SEC;
    for i in 0..FLOWS {
        ts += 1_000; // 1 M mappings/s
        v.push(ev(
            ts,
            EventBody::NatMapping {
                client: client(i),
                service: service(i),
                backend: backend(i, 0),
                protocol: 6,
            },
        ));
    }
    for i in 0..FLOWS {
        ts += 500;
        match i % 4 {
            0 => v.push(rst(ts, client(i), backend(i, 0), 0x18)),
            1 => {
                v.push(ev(
                    ts,
                    EventBody::NatDestroy {
                        client: client(i),
                        service: service(i),
                        backend: backend(i, 0),
                        protocol: 6,
                    },
                ));
                v.push(ev(
                    ts + 10,
                    EventBody::NatMapping {
                        client: client(i),
                        service: service(i),
                        backend: backend(i, 1),
                        protocol: 6,
                    },
                ));
                v.push(rst(ts + 20, backend(i, 1), client(i), 0x18));
            }
            2 => v.push(rst(ts, backend(i, 0), client(i), 0x02)),
            _ => v.push(rst(
                ts,
                SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1)), 80),
                SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::new(192, 168, 0, 2)),
                    (i % 60000) as u16,
                ),
                0x10,
            )),
        }
    }
    v
}

/// A reset storm on a node that tracks 1 M flows: 20 000 connections whose
/// replies go un-NATed are reset again and again (clients' no-socket RSTs,
/// the backend's follow-up resets), amid refused connections, received
/// resets and resets unrelated to any Service.
fn storm() -> Vec<Event> {
    let mut v = Vec::with_capacity(10_000_000);
    let mut ts = 2_000 * SEC;
    let mut x: u32 = 0x9e37_79b9;
    for n in 0..10_000_000u32 {
        ts += 300; // ~3 M events/s of kernel time
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let i = (x % 20_000) * 50; // 20 000 broken flows spread over the table
        v.push(match n % 10 {
            0..=3 => rst(ts, client(i), backend(i, 0), 0x18),
            4 | 5 => rst(ts, backend(i, 0), client(i), 0x18),
            6 | 7 => rst(ts, backend(i, 0), client(x % FLOWS), 0x02),
            8 => ev(
                ts,
                EventBody::TcpReceiveReset {
                    src: client(i),
                    dst: backend(i, 0),
                    sock_cookie: n as u64,
                },
            ),
            _ => rst(
                ts,
                SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0xc0a8_0000 + (x & 0xffff))), 80),
                SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::new(192, 168, 255, 2)),
                    (x >> 16) as u16,
                ),
                0x10,
            ),
        });
    }
    v
}

fn main() {
    // Phase 1: every event on a different, cold flow (the worst case).
    let events = stream();
    let mut engine = Engine::new(EngineConfig {
        max_flows: FLOWS as usize + 16,
        storm_threshold: 1_000,
        ..EngineConfig::default()
    });
    let mut out = Vec::with_capacity(64);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).unwrap();
    let mut findings = 0u64;
    let start = Instant::now();
    for e in &events {
        let t0 = Instant::now();
        engine.process(e, &mut out);
        if !out.is_empty() {
            // Arrival to finding: the processing of the completing event.
            hist.record(t0.elapsed().as_nanos().max(1) as u64).unwrap();
            findings += out.len() as u64;
            out.clear();
        }
    }
    let elapsed = start.elapsed();
    let stats = engine.stats();
    println!(
        "engine benchmark: {} events, {} findings, 1 core",
        events.len(),
        findings
    );
    println!(
        "  throughput: {:.2} M events/s ({:.1} ns/event, including the latency probes)",
        events.len() as f64 / elapsed.as_secs_f64() / 1e6,
        elapsed.as_nanos() as f64 / events.len() as f64
    );
    println!(
        "  event-to-finding latency: p50 {} ns, p99 {} ns, p99.9 {} ns, max {} ns",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max()
    );
    println!(
        "  state: {} flows tracked, {:.1} bytes/flow (table allocation / flows)",
        stats.flows_tracked,
        engine.bytes_per_flow()
    );
    // Throughput without per-event timing.
    let mut engine = Engine::new(EngineConfig {
        max_flows: FLOWS as usize + 16,
        storm_threshold: 1_000,
        ..EngineConfig::default()
    });
    let start = Instant::now();
    for e in &events {
        engine.process(e, &mut out);
        out.clear();
    }
    let elapsed = start.elapsed();
    println!(
        "  throughput (no probes): {:.2} M events/s",
        events.len() as f64 / elapsed.as_secs_f64() / 1e6
    );

    // Phase 2: a storm over the same 1 M-flow state (engine from phase 1,
    // which already holds all flows): throughput without probes.
    let storm_events = storm();
    let mut findings = 0u64;
    let start = Instant::now();
    for e in &storm_events {
        engine.process(e, &mut out);
        findings += out.len() as u64;
        out.clear();
    }
    let elapsed = start.elapsed();
    println!(
        "storm: {} events over {} tracked flows, {} findings: {:.2} M events/s ({:.0} ns/event)",
        storm_events.len(),
        engine.stats().flows_tracked,
        findings,
        storm_events.len() as f64 / elapsed.as_secs_f64() / 1e6,
        elapsed.as_nanos() as f64 / storm_events.len() as f64
    );
    // The same storm on a fresh 1 M-flow engine, timing each event.
    let mut engine = Engine::new(EngineConfig {
        max_flows: FLOWS as usize + 16,
        storm_threshold: 1_000,
        ..EngineConfig::default()
    });
    for e in &events {
        engine.process(e, &mut out);
        out.clear();
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).unwrap();
    for e in &storm_events {
        let t0 = Instant::now();
        engine.process(e, &mut out);
        if !out.is_empty() {
            hist.record(t0.elapsed().as_nanos().max(1) as u64).unwrap();
            out.clear();
        }
    }
    println!(
        "  storm event-to-finding latency: p50 {} ns, p99 {} ns, p99.9 {} ns ({} finding events)",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.len()
    );
}
