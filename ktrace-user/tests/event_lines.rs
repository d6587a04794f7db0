//! Every event kind, with and without its optional fields, as `--events`
//! prints it (JSON Lines and the human view). The golden recording covers
//! only the kinds its lab gives; this covers the rest (ct_invalid,
//! ct_table_full, ipvs_conn_new, ct_confirm_drop, resets_summarised, IPv6,
//! absent fields) byte for byte.
//!
//! The expected files were written by the renderer before event JSON was
//! derived by serde; when the output changes on purpose they are updated
//! by hand in the same commit.

use std::net::SocketAddr;
use std::path::PathBuf;

use ktrace::clock::WallClock;
use ktrace::event::{
    CounterRise, CtInvalid, Event, EventBody, IpvsConnNew, NatEntry, ResetCounts, Source,
};
use ktrace::netns::NetnsNames;
use ktrace::output::Renderer;

fn a(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Every kind, with and without its optional fields, in the order of the
/// expected files.
fn bodies() -> Vec<EventBody> {
    [reset_bodies(), conntrack_bodies(), nat_and_counter_bodies()].concat()
}

/// Resets sent (with a reason, a socket, neither) and received.
fn reset_bodies() -> Vec<EventBody> {
    vec![
        EventBody::TcpSendReset {
            src: a("10.0.0.2:8080"),
            dst: a("10.0.0.1:40000"),
            reason: Some("NO_SOCKET".into()),
            socket: None,
            trigger_flags: Some(0x02),
        },
        EventBody::TcpSendReset {
            src: a("[fd00::2]:443"),
            dst: a("[fd00::1]:50000"),
            reason: None,
            socket: Some(1),
            trigger_flags: Some(0x18),
        },
        EventBody::TcpSendReset {
            src: a("10.0.0.2:8080"),
            dst: a("10.0.0.1:40001"),
            reason: None,
            socket: Some(0),
            trigger_flags: None,
        },
        EventBody::TcpReceiveReset {
            src: a("10.0.0.2:8080"),
            dst: a("10.0.0.1:40000"),
            sock_cookie: 77,
        },
        EventBody::TcpReceiveReset {
            src: a("10.0.0.2:8080"),
            dst: a("10.0.0.1:40000"),
            sock_cookie: 0,
        },
    ]
}

/// conntrack INVALID verdicts, a full table, IPVS connections.
fn conntrack_bodies() -> Vec<EventBody> {
    vec![
        EventBody::CtInvalid(Box::new(CtInvalid {
            src: a("10.0.1.5:8080"),
            dst: a("10.0.0.1:40000"),
            orig_src: Some(a("10.0.0.1:40000")),
            orig_dst: Some(a("10.96.0.10:80")),
            reply_src: Some(a("10.0.1.5:8080")),
            reply_dir: true,
            message: Some("SEQ is over upper bound".into()),
        })),
        EventBody::CtInvalid(Box::new(CtInvalid {
            src: a("10.0.0.1:40000"),
            dst: a("10.96.0.10:80"),
            orig_src: None,
            orig_dst: None,
            reply_src: None,
            reply_dir: false,
            message: None,
        })),
        EventBody::CtTableFull {
            src: a("10.0.0.1:40000"),
            dst: a("10.96.0.10:80"),
            errno: -12,
        },
        EventBody::IpvsConnNew(Box::new(IpvsConnNew {
            client: a("10.0.0.1:40000"),
            service: a("10.96.0.10:80"),
            real_server: a("10.0.1.5:8080"),
            protocol: 6,
            template: true,
            conn_flags: 0x1100,
            dest_flags: 1,
            weight: Some(0),
        })),
        EventBody::IpvsConnNew(Box::new(IpvsConnNew {
            client: a("10.0.0.1:40000"),
            service: a("10.96.0.10:80"),
            real_server: a("10.0.1.5:8080"),
            protocol: 17,
            template: false,
            conn_flags: 0,
            dest_flags: 0,
            weight: None,
        })),
    ]
}

/// NAT mappings, counters, confirm drops, a summary.
fn nat_and_counter_bodies() -> Vec<EventBody> {
    vec![
        EventBody::NatMapping(Box::new(NatEntry {
            client: a("10.0.0.1:40000"),
            service: a("10.96.0.10:80"),
            backend: a("10.0.1.5:8080"),
            protocol: 6,
            snat: None,
        })),
        EventBody::NatDestroy(Box::new(NatEntry {
            client: a("[fd00::1]:40000"),
            service: a("[fd00::10]:80"),
            backend: a("[fd00::5]:8080"),
            protocol: 17,
            snat: None,
        })),
        EventBody::CtCounters(CounterRise {
            invalid: 3,
            drop: 0,
            early_drop: 1,
            insert_failed: 2,
            clash_resolve: 0,
            count: Some(100),
            max: Some(65536),
        }),
        EventBody::CtCounters(CounterRise {
            invalid: 0,
            drop: 0,
            early_drop: 0,
            insert_failed: 0,
            clash_resolve: 0,
            count: None,
            max: None,
        }),
        EventBody::CtConfirmDrop(Box::new(NatEntry {
            client: a("10.0.0.1:40002"),
            service: a("10.96.0.10:53"),
            backend: a("10.0.1.6:53"),
            protocol: 17,
            snat: None,
        })),
        EventBody::CtConfirmDrop(Box::new(NatEntry {
            client: a("[fd00::1]:40003"),
            service: a("[fd00::10]:53"),
            backend: a("[fd00::6]:53"),
            protocol: 17,
            snat: None,
        })),
        EventBody::ResetsSummarised(ResetCounts {
            refused: 127_000,
            socket: 3,
        }),
    ]
}

fn events() -> Vec<Event> {
    let sources = [
        Source::Tracepoint,
        Source::RawTracepoint,
        Source::Fentry,
        Source::Kprobe,
        Source::Kretprobe,
        Source::Ctnetlink,
        Source::Procfs,
    ];
    bodies()
        .into_iter()
        .enumerate()
        .map(|(i, body)| Event {
            ts_ns: 1_000_000_000 + i as u64 * 1_234_567,
            // Every other event in the named namespace.
            netns: if i % 2 == 0 { 4026531840 } else { 4026532999 },
            source: sources[i % sources.len()],
            body,
        })
        .collect()
}

fn render(json: bool) -> String {
    let mut names = NetnsNames::default();
    names.insert(4026531840, "host".into());
    let clock = WallClock {
        offset_ns: 1_764_460_800_000_000_000,
    };
    let mut out = Vec::new();
    let mut r = Renderer::new(&mut out, json, true, clock, names);
    for ev in events() {
        r.event(&ev).unwrap();
    }
    r.flush().unwrap();
    drop(r);
    String::from_utf8(out).unwrap()
}

fn expected(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/events")
        .join(name);
    std::fs::read_to_string(path).expect("reading the expected output")
}

fn assert_same(actual: &str, expected: &str, what: &str) {
    for (n, (a, e)) in actual.lines().zip(expected.lines()).enumerate() {
        assert_eq!(a, e, "{what}: line {} differs", n + 1);
    }
    assert_eq!(actual, expected, "{what}: the whole output");
}

#[test]
fn every_event_kind_prints_the_same_json() {
    assert_same(&render(true), &expected("all.jsonl"), "--events --json");
}

#[test]
fn every_event_kind_prints_the_same_human_line() {
    assert_same(&render(false), &expected("all.txt"), "--events");
}
