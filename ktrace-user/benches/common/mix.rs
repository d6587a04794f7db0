//! The engine benchmark's realistic mix over 1 M flows (the recording
//! benchmark replays it too): [`stream`] maps the flows and breaks a
//! quarter of them each way, [`storm`] resets 20 000 of them again and
//! again among unrelated resets, with the 1 M flows tracked.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ktrace::engine::EngineConfig;
use ktrace::event::{Event, EventBody, NatEntry};

use super::ev;

pub const FLOWS: u32 = 1_000_000;
pub const SEC: u64 = 1_000_000_000;

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

fn rst(ts: u64, src: SocketAddr, dst: SocketAddr, trigger: u8) -> Event {
    ev(
        ts,
        EventBody::TcpSendReset {
            src,
            dst,
            reason: None,
            socket: None,
            trigger_flags: Some(trigger),
        },
    )
}

/// The stream: 1 M flows mapped, then per flow one of: an un-NATed reply
/// reset (client -> backend), a flush re-mapping answered by the new
/// backend's reset, a refused connection, or an unrelated reset.
pub fn stream() -> Vec<Event> {
    let mut v = Vec::with_capacity(FLOWS as usize * 4);
    let mut ts = 1_000 * SEC;
    for i in 0..FLOWS {
        ts += 1_000; // 1 M mappings/s
        v.push(ev(
            ts,
            EventBody::NatMapping(Box::new(NatEntry {
                client: client(i),
                service: service(i),
                backend: backend(i, 0),
                protocol: 6,
                snat: None,
            })),
        ));
    }
    for i in 0..FLOWS {
        ts += 500;
        match i % 4 {
            0 => v.push(rst(ts, client(i), backend(i, 0), 0x18)),
            1 => {
                v.push(ev(
                    ts,
                    EventBody::NatDestroy(Box::new(NatEntry {
                        client: client(i),
                        service: service(i),
                        backend: backend(i, 0),
                        protocol: 6,
                        snat: None,
                    })),
                ));
                v.push(ev(
                    ts + 10,
                    EventBody::NatMapping(Box::new(NatEntry {
                        client: client(i),
                        service: service(i),
                        backend: backend(i, 1),
                        protocol: 6,
                        snat: None,
                    })),
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
pub fn storm() -> Vec<Event> {
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

/// The engine's settings for the mix: room for every flow.
pub fn config() -> EngineConfig {
    EngineConfig {
        max_flows: FLOWS as usize + 16,
        storm_threshold: 1_000,
        ..EngineConfig::default()
    }
}
