//! The engine driven by synthetic event sequences, including out-of-order
//! and missing events.

use super::*;
use crate::event::{CtInvalid, IpvsConnNew, Source};
use serde_json::{json, Value};

/// The evidence as the JSON has it (times still monotonic ns).
fn evidence(f: &Finding) -> Value {
    serde_json::to_value(&f.evidence).unwrap()
}

const MS: u64 = 1_000_000;

fn a(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn ev(ts_ms: u64, body: EventBody) -> Event {
    Event {
        ts_ns: 1_000 * SEC + ts_ms * MS,
        netns: 1,
        source: Source::Tracepoint,
        body,
    }
}

fn map(ts: u64, client: &str, service: &str, backend: &str) -> Event {
    ev(
        ts,
        EventBody::NatMapping(Box::new(NatEntry {
            client: a(client),
            service: a(service),
            backend: a(backend),
            protocol: 6,
            snat: None,
        })),
    )
}

fn destroy(ts: u64, client: &str, service: &str, backend: &str) -> Event {
    ev(
        ts,
        EventBody::NatDestroy(Box::new(NatEntry {
            client: a(client),
            service: a(service),
            backend: a(backend),
            protocol: 6,
            snat: None,
        })),
    )
}

fn rst(ts: u64, src: &str, dst: &str, trigger: Option<u8>) -> Event {
    ev(
        ts,
        EventBody::TcpSendReset {
            src: a(src),
            dst: a(dst),
            reason: Some("NO_SOCKET".into()),
            socket: None,
            trigger_flags: trigger,
        },
    )
}

fn run(events: &[Event]) -> Vec<Finding> {
    run_with(EngineConfig::default(), events)
}

fn run_with(cfg: EngineConfig, events: &[Event]) -> Vec<Finding> {
    let mut e = Engine::new(cfg);
    let mut out = Vec::new();
    for x in events {
        e.process(x, &mut out);
    }
    e.tick(u64::MAX, &mut out);
    out
}

/// The findings of one kind.
fn of_kind(f: &[Finding], kind: FindingKind) -> Vec<&Finding> {
    f.iter().filter(|x| x.kind() == kind).collect()
}

const C: &str = "10.0.0.2:40000";
const S: &str = "10.96.0.10:2222";
const B1: &str = "10.0.1.2:2222";
const B2: &str = "10.0.1.3:2222";
const PSH_ACK: Option<u8> = Some(0x18);

#[test]
fn flush_then_new_backend_reset_is_a_backend_switch() {
    let f = run(&[
        map(0, C, S, B1),
        destroy(30_000, C, S, B1),
        map(30_010, C, S, B2),
        rst(30_011, B2, C, PSH_ACK),
    ]);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].kind(), FindingKind::BackendSwitch);
    assert_eq!(f[0].service, Some(a(S)));
    assert_eq!(f[0].backend, Some(a(B2)));
    assert_eq!(f[0].client, Some(a(C)));
    assert_eq!(evidence(&f[0])["old_backend"], json!(B1));
    assert_eq!(evidence(&f[0])["idle_s"], json!(30.01));
}

#[test]
fn reset_arriving_before_its_mapping_is_still_diagnosed() {
    // ctnetlink lags the ring buffer: the RST is seen first.
    let f = run(&[
        map(0, C, S, B1),
        rst(5_000, B2, C, PSH_ACK),
        destroy(4_990, C, S, B1),
        map(4_999, C, S, B2),
    ]);
    assert_eq!(of_kind(&f, FindingKind::BackendSwitch).len(), 1, "{f:?}");
}

#[test]
fn switch_without_destroy_event_is_still_a_switch() {
    let f = run(&[map(0, C, S, B1), map(100, C, S, B2), rst(101, B2, C, None)]);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].kind(), FindingKind::BackendSwitch);
}

#[test]
fn same_backend_after_flush_is_no_incident() {
    let f = run(&[map(0, C, S, B1), destroy(10, C, S, B1), map(20, C, S, B1)]);
    assert!(f.is_empty());
}

#[test]
fn client_reset_to_backend_address_is_an_unnated_reply() {
    let f = run(&[
        map(0, C, S, B1),
        rst(1_000, C, B1, PSH_ACK),
        rst(1_001, B1, C, PSH_ACK),
    ]);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].kind(), FindingKind::UnnatedReply);
    assert_eq!(
        (f[0].service, f[0].backend, f[0].client),
        (Some(a(S)), Some(a(B1)), Some(a(C)))
    );
    assert!(f[0].cause.contains("cannot be observed"), "{}", f[0].cause);
    assert!(f[0].remedy.contains("nf_conntrack_tcp_be_liberal=1"));
}

#[test]
fn unnated_reply_names_the_conntrack_reason_when_seen() {
    let invalid = ev(
        999,
        EventBody::CtInvalid(Box::new(CtInvalid {
            src: a(B1),
            dst: a(C),
            orig_src: Some(a(C)),
            orig_dst: Some(a(S)),
            reply_src: Some(a(B1)),
            reply_dir: true,
            message: Some("SEQ is over the upper bound".into()),
        })),
    );
    let cfg = EngineConfig {
        ct_invalid_hook: true,
        ..EngineConfig::default()
    };
    // No NAT mapping event at all: the INVALID verdict carries the tuples.
    let f = run_with(cfg, &[invalid, rst(1_000, C, B1, PSH_ACK)]);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].cause, "conntrack INVALID: SEQ is over the upper bound");
    // The contract's keys, in the order 0.1.0 wrote them.
    assert_eq!(
        evidence(&f[0]).to_string(),
        r#"{"basis":["client_rst_to_backend_address","ct_invalid"],"rst_reason":"NO_SOCKET","ct_verdict":"INVALID","ct_invalid_count":1,"ct_reason":"SEQ is over the upper bound","first":1001000000000,"count":1}"#
    );
    assert_eq!(f[0].service, Some(a(S)));
}

#[test]
fn refused_connections_and_unrelated_resets_are_not_incidents() {
    let f = run(&[
        // Backend refuses a new connection through the VIP.
        map(0, C, S, B1),
        rst(1, B1, C, Some(0x02)),
        // A reset of a connection that never used NAT.
        rst(10, "10.0.1.2:2222", "10.0.0.9:5555", PSH_ACK),
        // RST to a closed local port.
        rst(20, "127.0.0.1:9", "127.0.0.1:40000", Some(0x02)),
        // A reset with a socket (application abort).
        ev(
            30,
            EventBody::TcpSendReset {
                src: a(C),
                dst: a(B1),
                reason: None,
                socket: Some(1),
                trigger_flags: None,
            },
        ),
    ]);
    assert!(f.is_empty(), "{f:?}");
}

#[test]
fn many_broken_connections_make_one_storm_start() {
    let mut evs = Vec::new();
    for i in 0..200u64 {
        let c = format!("10.0.0.2:{}", 30000 + i);
        evs.push(map(i, &c, S, B1));
        evs.push(rst(5_000 + i * 5, &c, B1, PSH_ACK));
    }
    let f = run(&evs);
    let storms = of_kind(&f, FindingKind::RstStorm);
    let starts = storms
        .iter()
        .filter(|x| evidence(x)["phase"] == json!("start"))
        .count();
    let ends = storms
        .iter()
        .filter(|x| evidence(x)["phase"] == json!("end"))
        .count();
    assert_eq!((starts, ends), (1, 1), "{storms:?}");
    assert_eq!(storms[0].service, Some(a(S)));
    assert_eq!(of_kind(&f, FindingKind::UnnatedReply).len(), 200);
}

#[test]
fn quiescent_backend_via_template() {
    let ipvs = |ts, template, weight: Option<i32>| {
        ev(
            ts,
            EventBody::IpvsConnNew(Box::new(IpvsConnNew {
                client: a(if template {
                    "10.0.0.2:0"
                } else {
                    "10.0.0.2:41000"
                }),
                service: a("10.96.0.20:80"),
                real_server: a("10.0.1.3:8080"),
                protocol: 6,
                template,
                conn_flags: if template { 0x1000 } else { 0 },
                dest_flags: 1,
                weight,
            })),
        )
    };
    let f = run(&[ipvs(0, true, Some(1)), ipvs(1, false, Some(1))]);
    assert!(f.is_empty());
    let f = run(&[
        ipvs(0, true, Some(1)),
        ipvs(10, false, Some(0)),
        ipvs(20, false, Some(0)),
    ]);
    assert_eq!(f.len(), 1, "repeats are merged: {f:?}");
    assert_eq!(f[0].kind(), FindingKind::QuiescentBackend);
    assert_eq!(f[0].backend, Some(a("10.0.1.3:8080")));
    assert_eq!(evidence(&f[0])["persistence_template"], json!(true));
}

#[test]
fn table_full_is_one_finding_with_count_updates() {
    let mut evs = Vec::new();
    for i in 0..100u64 {
        evs.push(ev(
            i * 10,
            EventBody::CtTableFull {
                src: a("10.0.0.2:1000"),
                dst: a(S),
                errno: 12,
            },
        ));
    }
    let cfg = EngineConfig {
        conntrack_max: Some(64),
        ..EngineConfig::default()
    };
    let f = run_with(cfg, &evs);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].kind(), FindingKind::ConntrackTableFull);
    assert!(f[0].cause.contains("nf_conntrack_max 64"));
    assert_eq!(
        evidence(&f[0]).to_string(),
        r#"{"count":1,"first":1000000000000,"last":1000000000000,"basis":"init_conntrack failed","example_src":"10.0.0.2:1000","example_dst":"10.96.0.10:2222","nf_conntrack_max":64}"#
    );
}

#[test]
fn memory_stays_bounded_under_churn() {
    let cfg = EngineConfig {
        max_flows: 1_000,
        ..EngineConfig::default()
    };
    let mut e = Engine::new(cfg);
    let mut out = Vec::new();
    for i in 0..20_000u64 {
        let c = SocketAddr::new(IpAddr::V4((0x0a00_0000u32 + i as u32).into()), 1234);
        e.process(&map(i, &c.to_string(), S, B1), &mut out);
        e.process(&rst(i, "10.9.9.9:1", &c.to_string(), PSH_ACK), &mut out);
    }
    let s = e.stats();
    assert!(s.flows_tracked <= 1_000);
    assert!(s.flows_evicted_by_count >= 19_000);
}

#[test]
fn unnated_reply_cites_the_invalid_counter_where_no_hook_can() {
    let cfg = EngineConfig {
        ct_counters: true,
        ..EngineConfig::default()
    };
    let counters = |ts, invalid, drop| {
        ev(
            ts,
            EventBody::CtCounters(CounterRise {
                invalid,
                drop,
                count: Some(3),
                max: Some(262144),
                ..CounterRise::default()
            }),
        )
    };
    let mut e = Engine::new(cfg.clone());
    let mut out = Vec::new();
    e.process(&map(0, C, S, B1), &mut out);
    e.process(&rst(1_000, C, B1, PSH_ACK), &mut out);
    assert!(out.is_empty(), "held for the next counter sample");
    e.process(&counters(1_150, 1, 0), &mut out);
    assert_eq!(out.len(), 1);
    assert!(
        out[0].cause.contains("counted 1 INVALID"),
        "{}",
        out[0].cause
    );
    assert_eq!(evidence(&out[0])["ct_invalid_counter_rise"], json!(1));
    // Without a counter rise, the finding still comes, by the deadline.
    let f = run_with(
        cfg,
        &[
            map(0, C, S, B1),
            rst(1_000, C, B1, PSH_ACK),
            ev(
                2_000,
                EventBody::TcpReceiveReset {
                    src: a(C),
                    dst: a(B1),
                    sock_cookie: 0,
                },
            ),
        ],
    );
    assert_eq!(f.len(), 1);
    assert!(f[0].cause.contains("no INVALID"), "{}", f[0].cause);
}

/// A sample taken between a connection's INVALID packet and its reset has
/// already counted the packet: the next sample shows none, and the rise
/// just before still belongs to that connection; an older rise does not.
#[test]
fn a_counter_rise_just_before_the_reset_is_cited() {
    let (c2, c3) = ("10.0.0.2:40001", "10.0.0.2:40002");
    let mut e = Engine::new(EngineConfig {
        ct_counters: true,
        ..EngineConfig::default()
    });
    let mut out = Vec::new();
    for c in [C, c2, c3] {
        e.process(&map(900, c, S, B1), &mut out);
    }
    e.process(&invalid_counters(1_000, 0), &mut out);
    e.process(&rst(1_100, C, B1, PSH_ACK), &mut out);
    e.process(&invalid_counters(1_150, 2), &mut out);
    e.process(&rst(1_152, c2, B1, PSH_ACK), &mut out);
    e.process(&invalid_counters(1_160, 0), &mut out);
    e.process(&rst(1_300, c3, B1, PSH_ACK), &mut out);
    e.process(&invalid_counters(1_310, 0), &mut out);
    assert_eq!(out.len(), 3, "{out:?}");
    assert_eq!(evidence(&out[0])["ct_invalid_counter_rise"], json!(2));
    assert_eq!(evidence(&out[1])["ct_invalid_counter_rise"], json!(2));
    assert!(out[2].cause.contains("no INVALID"), "{}", out[2].cause);
}

/// The sample that counted the INVALID packet was read after the reset but
/// reached the engine first (the ring was drained after the counters were
/// read): it is that connection's, and the finding comes at once; a later
/// connection with no INVALID packet does not take it.
#[test]
fn a_counter_rise_read_just_after_the_reset_is_cited() {
    let c2 = "10.0.0.2:40001";
    let mut e = Engine::new(EngineConfig {
        ct_counters: true,
        ..EngineConfig::default()
    });
    let mut out = Vec::new();
    e.process(&map(900, C, S, B1), &mut out);
    e.process(&map(900, c2, S, B1), &mut out);
    e.process(&invalid_counters(1_000, 0), &mut out);
    e.process(&invalid_counters(1_200, 2), &mut out);
    e.process(&rst(1_150, C, B1, PSH_ACK), &mut out);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(evidence(&out[0])["ct_invalid_counter_rise"], json!(2));
    assert!(!e.wants_counter_sample());
    e.process(&rst(1_500, c2, B1, PSH_ACK), &mut out);
    e.process(&invalid_counters(1_600, 0), &mut out);
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(out[1].cause.contains("no INVALID"), "{}", out[1].cause);
}

fn invalid_counters(ts: u64, invalid: u64) -> Event {
    ev(
        ts,
        EventBody::CtCounters(CounterRise {
            invalid,
            count: Some(3),
            max: Some(262144),
            ..CounterRise::default()
        }),
    )
}

#[test]
fn drop_counter_with_a_full_table_is_table_full() {
    let counters = |ts, drop, count| {
        ev(
            ts,
            EventBody::CtCounters(CounterRise {
                drop,
                count: Some(count),
                max: Some(64),
                ..CounterRise::default()
            }),
        )
    };
    let f = run(&[counters(0, 5, 20)]);
    assert!(f.is_empty(), "drops with room left are not a full table");
    let f = run(&[counters(0, 5, 64), counters(200, 7, 64)]);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].kind(), FindingKind::ConntrackTableFull);
    assert!(f[0].cause.contains("64 of 64"), "{}", f[0].cause);
}

#[test]
fn a_connection_reusing_the_client_port_gets_its_own_finding() {
    let f = run(&[
        map(0, C, S, B1),
        rst(1_000, C, B1, PSH_ACK),
        destroy(11_000, C, S, B1),
        // A new connection from the same client port, to the same backend.
        map(20_000, C, S, B1),
        rst(21_000, C, B1, PSH_ACK),
    ]);
    let unnated = of_kind(&f, FindingKind::UnnatedReply);
    assert_eq!(unnated.len(), 2, "{f:?}");
}

#[test]
fn a_reused_port_without_a_new_conntrack_entry_is_reported_again() {
    let f = run(&[
        map(0, C, S, B1),
        rst(1_000, C, B1, PSH_ACK),
        rst(1_200, C, B1, PSH_ACK),
        // Same port, revived conntrack entry (no NEW event), 2 s later.
        rst(3_200, C, B1, PSH_ACK),
    ]);
    let unnated = of_kind(&f, FindingKind::UnnatedReply);
    assert_eq!(unnated.len(), 2, "{f:?}");
}

fn map_snat(ts: u64, client: &str, service: &str, backend: &str, snat: &str) -> Event {
    ev(
        ts,
        EventBody::NatMapping(Box::new(NatEntry {
            client: a(client),
            service: a(service),
            backend: a(backend),
            protocol: 6,
            snat: Some(a(snat)),
        })),
    )
}

fn kinds(f: &[Finding]) -> Vec<FindingKind> {
    f.iter().map(Finding::kind).collect()
}

/// The flush re-maps the connection; the old backend's next segment (its
/// FIN, say) then reaches the client un-NATed and is reset too: still the
/// one connection, and the one backend_switch naming the flush.
#[test]
fn old_backend_reset_after_a_switch_is_the_same_connection() {
    let f = run(&[
        map(0, C, S, B1),
        destroy(30_000, C, S, B1),
        map(30_010, C, S, B2),
        rst(30_011, B2, C, PSH_ACK),
        // 2 s later: past the reused-port quiet time, still no new finding.
        rst(32_100, C, B1, Some(0x11)),
    ]);
    assert_eq!(kinds(&f), vec![FindingKind::BackendSwitch], "{f:?}");
}

/// The old backend speaks first after the flush (no entry: un-NATed), the
/// client resets it, then the client's own send is re-mapped and reset:
/// one finding, naming the lost entry, not INVALID.
#[test]
fn flushed_entry_then_remap_is_one_finding_naming_the_flush() {
    let f = run(&[
        map(0, C, S, B1),
        destroy(30_000, C, S, B1),
        rst(30_005, C, B1, PSH_ACK),
        map(30_010, C, S, B2),
        rst(30_011, B2, C, PSH_ACK),
    ]);
    assert_eq!(kinds(&f), vec![FindingKind::UnnatedReply], "{f:?}");
    assert!(f[0].cause.contains("flushed"), "{}", f[0].cause);
    assert!(
        f[0].remedy.contains("do not flush conntrack"),
        "{}",
        f[0].remedy
    );
    let e = evidence(&f[0]);
    assert_eq!(e["path"], "entry_lost");
    assert_eq!(
        e["basis"],
        json!(["client_rst_to_backend_address", "ct_entry_destroyed"])
    );
}

/// Same, when the DESTROY event lags the reset and the finding waits for
/// the counter sample: no INVALID counted, the entry was destroyed.
#[test]
fn a_held_finding_whose_entry_was_destroyed_names_the_flush() {
    let cfg = EngineConfig {
        ct_counters: true,
        ..EngineConfig::default()
    };
    let counters = |ts| ev(ts, EventBody::CtCounters(CounterRise::default()));
    let f = run_with(
        cfg,
        &[
            map(0, C, S, B1),
            rst(30_000, C, B1, PSH_ACK),
            destroy(30_001, C, S, B1),
            counters(30_100),
        ],
    );
    assert_eq!(kinds(&f), vec![FindingKind::UnnatedReply], "{f:?}");
    assert!(f[0].cause.contains("flushed"), "{}", f[0].cause);
}

const SNAT: &str = "10.0.1.1:61000";

/// Masquerade: the node resets the backend from its SNAT address; later
/// the backend resets the SNAT address (the client's next send). One
/// finding, naming the real client.
#[test]
fn masqueraded_reply_reset_by_the_node_names_the_real_client() {
    let f = run(&[
        map_snat(0, C, S, B1, SNAT),
        rst(1_000, SNAT, B1, PSH_ACK),
        rst(2_000, B1, SNAT, PSH_ACK),
    ]);
    assert_eq!(kinds(&f), vec![FindingKind::UnnatedReply], "{f:?}");
    assert_eq!(
        (f[0].service, f[0].backend, f[0].client),
        (Some(a(S)), Some(a(B1)), Some(a(C)))
    );
    let e = evidence(&f[0]);
    assert_eq!(e["path"], "reply_to_snat_address");
    assert_eq!(e["snat"], SNAT);
    assert_eq!(e["basis"], json!(["node_rst_to_backend_from_snat_address"]));
    assert!(f[0].cause.contains("masquerade address 10.0.1.1:61000"));
    assert!(f[0].remedy.contains("INPUT"), "{}", f[0].remedy);
}

/// Masqueraded flows still give backend switches, with the real client.
#[test]
fn masqueraded_flush_is_a_switch_of_the_real_client() {
    let f = run(&[
        map_snat(0, C, S, B1, SNAT),
        destroy(30_000, C, S, B1),
        map_snat(30_010, C, S, B2, "10.0.1.1:61001"),
        rst(30_011, B2, "10.0.1.1:61001", PSH_ACK),
    ]);
    assert_eq!(kinds(&f), vec![FindingKind::BackendSwitch], "{f:?}");
    assert_eq!(f[0].client, Some(a(C)));
}

/// Request direction: the node, holding the VIP, resets the client from it.
#[test]
fn node_reset_from_the_service_address_is_the_request_direction() {
    let f = run(&[
        map(0, C, S, B1),
        rst(1_000, S, C, PSH_ACK),
        // A refused new connection to the VIP is not an incident.
        map(2_000, "10.0.0.2:40001", S, B1),
        rst(2_001, S, "10.0.0.2:40001", Some(0x02)),
    ]);
    assert_eq!(kinds(&f), vec![FindingKind::UnnatedReply], "{f:?}");
    assert_eq!(
        (f[0].service, f[0].backend, f[0].client),
        (Some(a(S)), Some(a(B1)), Some(a(C)))
    );
    let e = evidence(&f[0]);
    assert_eq!(e["path"], "request_to_local_service");
    assert_eq!(e["basis"], json!(["node_rst_from_service_address"]));
    assert!(
        f[0].cause.contains("in the client's window"),
        "{}",
        f[0].cause
    );
}

/// Without a NAT mapping (or with the SNAT address of nobody), resets near
/// the node's addresses are not incidents.
#[test]
fn node_resets_without_a_mapping_are_not_incidents() {
    let f = run(&[
        rst(1_000, SNAT, B1, PSH_ACK),
        rst(1_001, B1, SNAT, PSH_ACK),
        rst(1_002, S, C, PSH_ACK),
        map_snat(2_000, C, S, B1, SNAT),
        // The node resets some other peer from the SNAT address.
        rst(2_500, SNAT, "10.0.1.9:2222", PSH_ACK),
    ]);
    assert!(f.is_empty(), "{f:?}");
}

fn race_counters(ts: u64, insert_failed: u64, clash_resolve: u64) -> Event {
    ev(
        ts,
        EventBody::CtCounters(CounterRise {
            insert_failed,
            clash_resolve,
            ..CounterRise::default()
        }),
    )
}

/// The counters say which of the two happened: a resolved clash is a
/// warning, a drop an error; repeats within the window are merged.
#[test]
fn insert_race_counters_say_resolved_or_dropped() {
    let f = run(&[
        race_counters(0, 0, 3),
        race_counters(200, 0, 4),
        race_counters(400, 2, 0),
    ]);
    assert_eq!(
        kinds(&f),
        vec![
            FindingKind::ConntrackInsertRace,
            FindingKind::ConntrackInsertRace
        ],
        "{f:?}"
    );
    let (resolved, dropped) = (evidence(&f[0]), evidence(&f[1]));
    assert_eq!(resolved["outcome"], "resolved");
    assert_eq!(resolved["basis"], "clash_resolve_counter");
    assert_eq!(f[0].severity, Severity::Warning);
    assert_eq!(dropped["outcome"], "dropped");
    assert_eq!(dropped["count"], 2);
    assert_eq!(f[1].severity, Severity::Error);
    assert!(f[1].remedy.contains("single-request-reopen"));
    // With the confirm hook live, drops come per packet, not from the counter.
    let cfg = EngineConfig {
        ct_confirm_hook: true,
        ..EngineConfig::default()
    };
    assert!(run_with(cfg, &[race_counters(0, 2, 0)]).is_empty());
}

fn confirm_drop(ts: u64, client: &str, service: &str, backend: &str, protocol: u8) -> Event {
    ev(
        ts,
        EventBody::CtConfirmDrop(Box::new(NatEntry {
            client: a(client),
            service: a(service),
            backend: a(backend),
            protocol,
            snat: None,
        })),
    )
}

/// Each hooked drop is its own finding naming the flow; the cause and
/// remedy fit the protocol (a DNS query, or a TCP segment, which no kernel
/// resolves).
#[test]
fn each_confirm_drop_is_a_finding_of_its_flow() {
    let f = run(&[
        confirm_drop(0, "10.0.0.2:40000", "10.96.0.10:53", "10.0.1.2:53", 17),
        confirm_drop(
            1,
            "[fd00::2]:40001",
            "[fd00:96::10]:2222",
            "[fd00:1::3]:2222",
            6,
        ),
    ]);
    assert_eq!(f.len(), 2, "{f:?}");
    for x in &f {
        assert_eq!(x.kind(), FindingKind::ConntrackInsertRace);
        assert_eq!(evidence(x)["outcome"], "dropped");
        assert_eq!(evidence(x)["basis"], "confirm_drop");
        assert_eq!(x.severity, Severity::Error);
    }
    assert_eq!(f[0].client, Some(a("10.0.0.2:40000")));
    assert_eq!(f[0].backend, Some(a("10.0.1.2:53")));
    assert!(
        f[0].remedy.contains("single-request-reopen"),
        "{}",
        f[0].remedy
    );
    assert_eq!(f[1].service, Some(a("[fd00:96::10]:2222")));
    assert!(
        f[1].cause.contains("never resolves a TCP clash"),
        "{}",
        f[1].cause
    );
    assert!(!f[1].remedy.contains("resolv.conf"), "{}", f[1].remedy);
}

/// The un-NATed reply's remedy in each of kube-proxy's modes: iptables
/// rules where kube-proxy writes iptables (its INVALID drop in FORWARD, or
/// INPUT where the packet is addressed to the node), an nft rule of the
/// admin's own in nftables mode (kube-proxy installs no INVALID drop).
#[test]
fn the_remedy_fits_kube_proxy_mode() {
    let remedy = |mode: KubeProxyMode, events: &[Event]| {
        let cfg = EngineConfig {
            kube_proxy_mode: mode,
            ..Default::default()
        };
        let f = run_with(cfg, events);
        assert_eq!(kinds(&f), vec![FindingKind::UnnatedReply], "{f:?}");
        f[0].remedy.clone()
    };
    let reply = [map(0, C, S, B1), rst(1_000, C, B1, PSH_ACK)];
    let snat = [map_snat(0, C, S, B1, SNAT), rst(1_000, SNAT, B1, PSH_ACK)];
    let request = [map(0, C, S, B1), rst(1_000, S, C, PSH_ACK)];

    let r = remedy(KubeProxyMode::Iptables, &reply);
    assert!(
        r.contains("iptables -I FORWARD -m conntrack --ctstate INVALID -j DROP"),
        "{r}"
    );
    assert!(r.contains("KUBE-FORWARD") && !r.contains("nft "), "{r}");
    let r = remedy(KubeProxyMode::Iptables, &snat);
    assert!(
        r.contains("iptables -I INPUT -m conntrack --ctstate INVALID -j DROP"),
        "{r}"
    );

    for events in [&reply[..], &snat[..], &request[..]] {
        let r = remedy(KubeProxyMode::Nftables, events);
        assert!(
            r.contains("nftables mode installs no ctstate INVALID drop"),
            "{r}"
        );
        assert!(r.contains("ct state invalid drop"), "{r}");
        assert!(!r.contains("iptables"), "{r}");
        assert!(r.contains("nf_conntrack_tcp_be_liberal=1"), "{r}");
    }
    let r = remedy(KubeProxyMode::Nftables, &reply);
    assert!(
        r.contains("type filter hook forward priority filter"),
        "{r}"
    );
    let r = remedy(KubeProxyMode::Nftables, &request);
    assert!(r.contains("type filter hook input priority filter"), "{r}");

    let r = remedy(KubeProxyMode::Ipvs, &request);
    assert!(
        r.contains("iptables -I INPUT") && r.contains("ipvs mode"),
        "{r}"
    );

    for mode in [KubeProxyMode::Unknown, KubeProxyMode::None] {
        let r = remedy(mode, &reply);
        assert!(r.contains("iptables -I FORWARD"), "{r}");
        assert!(r.contains("ct state invalid drop"), "{r}");
        assert!(
            r.contains(&format!(
                "mode {}",
                if mode == KubeProxyMode::None {
                    "none found"
                } else {
                    "unknown"
                }
            )),
            "{r}"
        );
    }
}

/// An IPv6 Service's remedy names ip6tables.
#[test]
fn an_ipv6_services_remedy_names_ip6tables() {
    let cfg = EngineConfig {
        kube_proxy_mode: KubeProxyMode::Iptables,
        ..Default::default()
    };
    let f = run_with(
        cfg,
        &[
            map(
                0,
                "[fd00::2]:40000",
                "[fd00:96::10]:2222",
                "[fd00:1::2]:2222",
            ),
            rst(1_000, "[fd00::2]:40000", "[fd00:1::2]:2222", PSH_ACK),
        ],
    );
    assert_eq!(kinds(&f), vec![FindingKind::UnnatedReply], "{f:?}");
    assert!(
        f[0].remedy.contains("ip6tables -I FORWARD"),
        "{}",
        f[0].remedy
    );
}
