//! Format, writer and reader tests: round trips of every record, truncation
//! at every byte, flipped bytes, rotation boundaries, disk full, and a
//! property test that no input makes the reader panic.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::format::{
    tag, BlockDecoder, BlockEncoder, Cursor, Decoded, FrameHeader, Item, FILE_MAGIC,
    FRAME_HEADER_LEN,
};
use super::reader::{FileReader, OpenError};
use super::warning::{Warning, WarningKind};
use super::writer::{segment_path, Notice, Recorder, RotationConfig};
use super::Context;
use crate::engine::EngineConfig;
use crate::event::{
    CounterRise, CtInvalid, Event, EventBody, IpvsConnNew, NatEntry, ResetCounts, Source,
};

// ------------------------------------------------------------ helpers

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "ktrace-rec-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn v4(a: u8, b: u8, c: u8, d: u8, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(a, b, c, d)), port)
}

fn v6(last: u16, port: u16) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, last)),
        port,
    )
}

pub(crate) fn test_context() -> Context {
    Context {
        format: "ktrace-recording".into(),
        format_version: "1.0".into(),
        ktrace_version: env!("CARGO_PKG_VERSION").into(),
        command: "test".into(),
        host: "testhost".into(),
        kernel: Some("6.1.0-test".into()),
        boot_id: Some("00000000-0000-0000-0000-000000000000".into()),
        wall_offset_ns: 1_700_000_000_000_000_000,
        recording_id: "00000000000000aa".into(),
        segment: 0,
        started_mono_ns: 1_000,
        segment_started_mono_ns: 1_000,
        ring_buffer_bytes: 1 << 23,
        netns: Some(4026531840),
        netns_names: BTreeMap::from([(4026531840, "host".to_string())]),
        hooks: vec![crate::hooks::HookStatus {
            name: "tcp_send_reset".into(),
            mechanism: "tracepoint".into(),
            attached: true,
            target: "tcp:tcp_send_reset".into(),
            reason: None,
        }],
        engine: EngineConfig::default(),
    }
}

/// One event of every variant, with every optional field both ways.
fn every_variant(ts: u64) -> Vec<Event> {
    [
        reset_bodies(),
        conntrack_bodies(),
        ipvs_bodies(),
        nat_and_counter_bodies(),
    ]
    .into_iter()
    .flatten()
    .map(|(i, source, body)| Event {
        ts_ns: ts + i * 1000,
        netns: 4026531840 + (i % 3) as u32,
        source,
        body,
    })
    .collect()
}

/// The resets: sent (with and without a socket) and received.
fn reset_bodies() -> Vec<(u64, Source, EventBody)> {
    vec![
        (
            0,
            Source::Tracepoint,
            EventBody::TcpSendReset {
                src: v4(10, 0, 0, 2, 40000),
                dst: v4(10, 0, 1, 2, 2222),
                reason: Some("NO_SOCKET".into()),
                socket: None,
                trigger_flags: Some(0x18),
            },
        ),
        (
            1,
            Source::Kprobe,
            EventBody::TcpSendReset {
                src: v6(1, 443),
                dst: v6(2, 50000),
                reason: None,
                socket: Some(1),
                trigger_flags: None,
            },
        ),
        (
            2,
            Source::Tracepoint,
            EventBody::TcpReceiveReset {
                src: v4(10, 0, 0, 2, 40000),
                dst: v4(10, 0, 1, 2, 2222),
                sock_cookie: u64::MAX,
            },
        ),
    ]
}

/// conntrack INVALID verdicts (all tuples, none) and a full table.
fn conntrack_bodies() -> Vec<(u64, Source, EventBody)> {
    vec![
        (
            3,
            Source::Kretprobe,
            EventBody::CtInvalid(Box::new(CtInvalid {
                src: v4(10, 0, 1, 2, 2222),
                dst: v4(10, 0, 0, 2, 40000),
                orig_src: Some(v4(10, 0, 0, 2, 40000)),
                orig_dst: Some(v4(10, 96, 0, 10, 2222)),
                reply_src: Some(v4(10, 0, 1, 2, 2222)),
                reply_dir: true,
                message: Some("SEQ is over the upper bound (over sndwin)".into()),
            })),
        ),
        (
            4,
            Source::Kretprobe,
            EventBody::CtInvalid(Box::new(CtInvalid {
                src: v6(3, 1),
                dst: v6(4, 2),
                orig_src: None,
                orig_dst: None,
                reply_src: None,
                reply_dir: false,
                message: Some("x".repeat(300).into()),
            })),
        ),
        (
            5,
            Source::Kretprobe,
            EventBody::CtTableFull {
                src: v4(1, 2, 3, 4, 5),
                dst: v4(5, 6, 7, 8, 9),
                errno: -105,
            },
        ),
    ]
}

/// IPVS connections, IPv4 and IPv6, with and without a weight.
fn ipvs_bodies() -> Vec<(u64, Source, EventBody)> {
    vec![
        (
            6,
            Source::Kretprobe,
            EventBody::IpvsConnNew(Box::new(IpvsConnNew {
                client: v4(10, 0, 0, 2, 40000),
                service: v4(10, 96, 0, 10, 2222),
                real_server: v4(10, 0, 1, 3, 2222),
                protocol: 6,
                template: true,
                conn_flags: 0x1000,
                dest_flags: u32::MAX,
                weight: Some(0),
            })),
        ),
        (
            7,
            Source::Kretprobe,
            EventBody::IpvsConnNew(Box::new(IpvsConnNew {
                client: v6(5, 1),
                service: v6(6, 80),
                real_server: v6(7, 8080),
                protocol: 17,
                template: false,
                conn_flags: 0,
                dest_flags: 0,
                weight: None,
            })),
        ),
    ]
}

/// NAT mappings, counters, a summary out of order, a confirm drop.
fn nat_and_counter_bodies() -> Vec<(u64, Source, EventBody)> {
    vec![
        (
            8,
            Source::Ctnetlink,
            EventBody::NatMapping(Box::new(NatEntry {
                client: v4(10, 0, 0, 2, 40001),
                service: v4(10, 96, 0, 10, 2222),
                backend: v4(10, 0, 1, 2, 2222),
                protocol: 6,
                snat: Some(v4(10, 0, 1, 1, 61000)),
            })),
        ),
        (
            9,
            Source::Ctnetlink,
            EventBody::NatDestroy(Box::new(NatEntry {
                client: v4(10, 0, 0, 2, 40001),
                service: v4(10, 96, 0, 10, 2222),
                backend: v4(10, 0, 1, 2, 2222),
                protocol: 6,
                snat: None,
            })),
        ),
        (
            10,
            Source::Procfs,
            EventBody::CtCounters(CounterRise {
                invalid: 2,
                drop: 0,
                early_drop: 1,
                insert_failed: 0,
                clash_resolve: 7,
                count: Some(0),
                max: None,
            }),
        ),
        // A summary between two events: its timestamp is off the chain
        // (minor 5), the next event's must still decode right.
        (
            13,
            Source::RawTracepoint,
            EventBody::ResetsSummarised(ResetCounts {
                refused: 1 << 33,
                socket: 0,
            }),
        ),
        (
            11,
            Source::Kretprobe,
            EventBody::CtConfirmDrop(Box::new(NatEntry {
                client: v4(10, 0, 0, 2, 40002),
                service: v4(10, 96, 0, 10, 53),
                backend: v4(10, 0, 1, 3, 53),
                protocol: 17,
                snat: None,
            })),
        ),
    ]
}

fn every_item(ts: u64) -> Vec<Item> {
    let mut items: Vec<Item> = every_variant(ts).into_iter().map(Item::Event).collect();
    items.push(Item::Tick {
        ts_ns: ts + 200_000_000,
    });
    items.push(Item::Lost {
        ts_ns: ts + 5,
        count: 3,
        total: 10,
        what: "ring buffer full".into(),
    });
    items.push(Item::Dropped {
        ts_ns: ts.saturating_sub(7),
        count: 1 << 40,
        reason: "disk full".into(),
    });
    // Out of order, and the extremes of the clock.
    items.push(Item::Tick { ts_ns: 0 });
    items.push(Item::Tick { ts_ns: u64::MAX });
    // A Kubernetes name: no timestamp of its own (the previous record's).
    items.push(Item::Name {
        ts_ns: u64::MAX,
        record: crate::names::NameRecord::Node {
            ip: "10.0.0.2".parse().unwrap(),
            name: "node-b".into(),
        },
    });
    items
}

fn decode_payload(raw: &[u8], base: u64) -> Vec<Decoded> {
    let mut d = BlockDecoder::new(raw, base);
    let mut out = Vec::new();
    while let Some(r) = d.next() {
        out.push(r.expect("framing"));
    }
    out
}

fn items_of(decoded: Vec<Decoded>) -> Vec<Item> {
    decoded
        .into_iter()
        .filter_map(|d| match d {
            Decoded::Item(i) => Some(i),
            _ => None,
        })
        .collect()
}

fn inline_config(path: &Path) -> RotationConfig {
    let mut cfg = RotationConfig::new(path);
    cfg.threaded = false;
    cfg
}

/// Rotation at 8 KiB in blocks of 2 KiB, keeping `keep` segments.
fn small_segments(path: &Path, keep: usize) -> RotationConfig {
    let mut cfg = inline_config(path);
    cfg.rotate_bytes = Some(8 << 10);
    cfg.keep = keep;
    cfg.block_bytes = 2 << 10;
    cfg
}

/// A recorder with `cfg`, started as `record` starts one.
fn started(cfg: RotationConfig) -> Recorder {
    let mut r = Recorder::create(cfg, "test", EngineConfig::default()).unwrap();
    r.start_with(test_context()).unwrap();
    r
}

/// Records `evs` with `cfg` and finishes.
fn record_all(cfg: RotationConfig, evs: &[Event]) -> super::RecorderSummary {
    let mut r = started(cfg);
    for e in evs {
        r.event(e);
    }
    r.finish()
}

/// Records `blocks` through an inline recorder, one sealed block per inner Vec.
fn write_recording(
    path: &Path,
    cfg: RotationConfig,
    blocks: &[Vec<Item>],
) -> super::RecorderSummary {
    let _ = path;
    let mut r = started(cfg);
    for b in blocks {
        for item in b {
            r.push_item_for_test(item);
        }
        r.seal();
    }
    r.finish()
}

fn read_file(path: &Path) -> (Vec<Item>, Vec<Warning>) {
    let mut warnings = Vec::new();
    let mut r = FileReader::open(path).unwrap();
    let items = r.read_all(&mut |w| warnings.push(w)).unwrap();
    (items, warnings)
}

fn read_bytes(bytes: &[u8]) -> Result<(Vec<Item>, Vec<Warning>), OpenError> {
    let mut warnings = Vec::new();
    let mut r = FileReader::new(bytes, Path::new("mem"))?;
    let items = r.read_all(&mut |w| warnings.push(w)).unwrap();
    Ok((items, warnings))
}

/// The reader's warning `w` says `text`.
fn assert_says(w: &Warning, text: &str) {
    assert!(w.message.contains(text), "{w}");
}

/// Storm-shaped events: many clients, one service, a few backends.
fn storm(n: usize, t0: u64) -> Vec<Event> {
    let svc = v4(10, 96, 0, 10, 2222);
    let mut out = Vec::with_capacity(n);
    let mut ts = t0;
    for i in 0..n {
        ts += 1_000 + (i as u64 * 7919) % 20_000;
        let client = v4(
            10,
            0,
            (i / 250 % 4) as u8,
            (i % 250) as u8 + 2,
            30000 + (i % 30000) as u16,
        );
        let backend = v4(10, 0, 1, 2 + (i % 3) as u8, 2222);
        let body = match i % 4 {
            0 => EventBody::NatMapping(Box::new(NatEntry {
                client,
                service: svc,
                backend,
                protocol: 6,
                snat: None,
            })),
            1 | 2 => EventBody::TcpSendReset {
                src: client,
                dst: backend,
                reason: Some("NO_SOCKET".into()),
                socket: None,
                trigger_flags: Some(0x18),
            },
            _ => EventBody::TcpReceiveReset {
                src: client,
                dst: backend,
                sock_cookie: 0,
            },
        };
        out.push(Event {
            ts_ns: ts,
            netns: 4026532000 + (i % 2) as u32,
            source: if i % 4 == 0 {
                Source::Ctnetlink
            } else {
                Source::Tracepoint
            },
            body,
        });
    }
    out
}

// ------------------------------------------------------------ format

#[test]
fn varints_and_zigzag_round_trip() {
    use super::format::{put_varint, unzigzag, zigzag, Cursor};
    for v in [
        0u64,
        1,
        127,
        128,
        300,
        u32::MAX as u64,
        u64::MAX - 1,
        u64::MAX,
    ] {
        let mut b = Vec::new();
        put_varint(&mut b, v);
        assert_eq!(Cursor::new(&b).varint().unwrap(), v);
    }
    for v in [0i64, 1, -1, i64::MIN, i64::MAX, -300] {
        assert_eq!(unzigzag(zigzag(v)), v);
    }
    // 11 continuation bytes, and a 10th byte that overflows.
    assert!(Cursor::new(&[0xff; 11]).varint().is_err());
    let mut over = vec![0xff; 9];
    over.push(0x02);
    assert!(Cursor::new(&over).varint().is_err());
}

#[test]
fn every_variant_round_trips_through_a_block() {
    let items = every_item(5_000_000_000);
    let mut enc = BlockEncoder::new();
    for i in &items {
        enc.push_item(i);
    }
    let raw = enc.take();
    // Names are definitions in the frame's count (no timestamp of their own).
    let counted = items
        .iter()
        .filter(|i| !matches!(i, Item::Name { .. }))
        .count();
    assert_eq!(raw.items as usize, counted);
    assert_eq!(raw.events, 13);
    assert_eq!(raw.min_ts, 0);
    assert_eq!(raw.max_ts, u64::MAX);
    assert_eq!(items_of(decode_payload(&raw.payload, raw.base_ts)), items);
    // The encoder starts afresh: dictionaries do not leak across blocks.
    enc.push_item(&items[0]);
    let raw2 = enc.take();
    assert_eq!(
        items_of(decode_payload(&raw2.payload, raw2.base_ts)),
        vec![items[0].clone()]
    );
}

/// What the writer reads back from a payload when a block needs names
/// its new segment lacks: every address the block defined, once, in order.
#[test]
fn a_blocks_addresses_are_read_back_from_its_payload() {
    let items = every_item(5_000_000_000);
    let mut enc = BlockEncoder::new();
    enc.list_ips();
    for i in &items {
        enc.push_item(i);
    }
    let listed = enc.block_ips().to_vec();
    let raw = enc.take();
    let mut ips = Vec::new();
    super::format::defined_ips(&raw.payload, &mut ips);
    assert!(ips.len() >= 4, "{ips:?}");
    assert!(ips.iter().any(IpAddr::is_ipv6));
    assert_eq!(ips, listed);
    let unique: std::collections::HashSet<_> = ips.iter().collect();
    assert_eq!(unique.len(), ips.len());
    // The list starts afresh with the next block.
    assert!(enc.block_ips().is_empty());
}

/// A reader of minor version 4 skips the summary record by its length;
/// the records after it must keep their timestamps.
#[test]
fn skipping_a_summary_keeps_the_timestamp_chain() {
    let ev = |ts, body| Event {
        ts_ns: ts,
        netns: 1,
        source: Source::RawTracepoint,
        body,
    };
    let reset = |port| EventBody::TcpReceiveReset {
        src: v4(10, 0, 0, 1, 80),
        dst: v4(10, 0, 0, 2, port),
        sock_cookie: 0,
    };
    let summary = EventBody::ResetsSummarised(ResetCounts {
        refused: 5,
        socket: 1,
    });
    let (a, s, b) = (ev(1_000, reset(1)), ev(9_000, summary), ev(2_000, reset(2)));
    let mut enc = BlockEncoder::new();
    for e in [&a, &s, &b] {
        enc.push_event(e);
    }
    let raw = enc.take();
    assert_eq!(
        items_of(decode_payload(&raw.payload, raw.base_ts)),
        vec![
            Item::Event(a.clone()),
            Item::Event(s),
            Item::Event(b.clone())
        ]
    );
    // What an older reader sees: the same payload without the new tag.
    let mut cur = Cursor::new(&raw.payload);
    let mut old = Vec::new();
    while !cur.is_empty() {
        let start = raw.payload.len() - cur.b.len();
        let t = cur.varint().unwrap();
        let len = cur.varint().unwrap() as usize;
        cur.bytes(len).unwrap();
        if t != tag::RESETS_SUMMARISED {
            old.extend_from_slice(&raw.payload[start..raw.payload.len() - cur.b.len()]);
        }
    }
    assert_eq!(
        items_of(decode_payload(&old, raw.base_ts)),
        vec![Item::Event(a), Item::Event(b)]
    );
}

#[test]
fn every_variant_round_trips_through_a_file() {
    let dir = TempDir::new("rt");
    let path = dir.path("rec");
    let blocks = vec![every_item(1_000), every_item(9_000_000_000), vec![]];
    let s = write_recording(&path, inline_config(&path), &blocks);
    assert_eq!(s.events, 26);
    assert_eq!(s.files, vec![path.clone()]);
    let (items, warnings) = read_file(&path);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(items, blocks.concat());
    let r = FileReader::open(&path).unwrap();
    assert_eq!(r.context().host, "testhost");
    assert_eq!(r.context().hooks[0].name, "tcp_send_reset");
    assert_eq!(r.version(), (1, 5));
}

#[test]
fn uncompressed_blocks_read_too() {
    let dir = TempDir::new("raw");
    let path = dir.path("rec");
    let mut cfg = inline_config(&path);
    cfg.zstd_level = 0;
    let blocks = vec![every_item(1_000)];
    write_recording(&path, cfg, &blocks);
    assert_eq!(read_file(&path).0, blocks.concat());
}

#[test]
fn unknown_record_tags_are_skipped_with_a_warning() {
    let dir = TempDir::new("unk");
    let path = dir.path("rec");
    let mut r = started(inline_config(&path));
    let evs = every_variant(1_000);
    r.event(&evs[0]);
    // A future event variant and a future dictionary kind.
    r.raw_for_test(0x3e, &[1, 2, 3, 4, 5, 6, 7]);
    r.raw_for_test(0x70, &[9; 200]);
    r.event(&evs[1]);
    r.finish();
    let (items, warnings) = read_file(&path);
    assert_eq!(
        items,
        vec![Item::Event(evs[0].clone()), Item::Event(evs[1].clone())]
    );
    let unknown: Vec<&Warning> = warnings
        .iter()
        .filter(|w| w.kind == WarningKind::UnknownRecord)
        .collect();
    assert_eq!(unknown.len(), 2, "{warnings:?}");
    assert_says(unknown[0], "unknown type 0x3e");
}

#[test]
fn trailing_fields_of_a_newer_minor_version_are_ignored() {
    // A TICK whose body carries an extra field after the timestamp.
    let mut b = Vec::new();
    super::format::put_varint(&mut b, tag::TICK);
    b.extend_from_slice(&[3, 0, 0xAA, 0xBB]);
    assert_eq!(
        items_of(decode_payload(&b, 42)),
        vec![Item::Tick { ts_ns: 42 }]
    );
}

#[test]
fn storm_encodes_compactly() {
    let dir = TempDir::new("size");
    let path = dir.path("rec");
    let evs = storm(200_000, 1_000_000_000);
    let s = record_all(inline_config(&path), &evs);
    let per_event = s.bytes as f64 / evs.len() as f64;
    assert!(per_event <= 24.0, "{per_event:.1} bytes/event");
    let (items, warnings) = read_file(&path);
    assert!(warnings.is_empty());
    assert_eq!(items.len(), evs.len());
    assert!(items
        .iter()
        .zip(&evs)
        .all(|(i, e)| *i == Item::Event(e.clone())));
}

// ------------------------------------------------------------ damage

/// A small recording of several blocks, and each block's items and extent.
/// Each block's byte range in the file, and its items.
type Extents = Vec<(std::ops::Range<usize>, Vec<Item>)>;

fn small_recording(dir: &TempDir) -> (Vec<u8>, Extents, usize) {
    let path = dir.path("small");
    let blocks: Vec<Vec<Item>> = (0..4)
        .map(|i| every_item(1_000_000 * (i + 1))[..6 + i as usize].to_vec())
        .collect();
    write_recording(&path, inline_config(&path), &blocks);
    let bytes = std::fs::read(&path).unwrap();
    // Find the frame boundaries by walking the headers.
    let json_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let mut at = 20 + json_len;
    let header_end = at;
    let mut extents = Vec::new();
    for b in &blocks {
        let h = FrameHeader::decode(&bytes[at..]).unwrap();
        let end = at + FRAME_HEADER_LEN + h.stored_len as usize;
        extents.push((at..end, b.clone()));
        at = end;
    }
    assert_eq!(at, bytes.len());
    (bytes, extents, header_end)
}

#[test]
fn truncation_at_every_byte_reads_every_complete_block() {
    let dir = TempDir::new("trunc");
    let (bytes, extents, header_end) = small_recording(&dir);
    for cut in 0..=bytes.len() {
        let prefix = &bytes[..cut];
        match read_bytes(prefix) {
            Err(OpenError::Torn { .. }) => assert!(cut < header_end, "cut {cut}"),
            Err(e) => panic!("cut {cut}: {e}"),
            Ok((items, warnings)) => {
                assert!(cut >= header_end, "cut {cut}");
                let complete: Vec<Item> = extents
                    .iter()
                    .filter(|(r, _)| r.end <= cut)
                    .flat_map(|(_, i)| i.clone())
                    .collect();
                assert_eq!(items, complete, "cut {cut}");
                let at_boundary = cut == header_end || extents.iter().any(|(r, _)| r.end == cut);
                if at_boundary {
                    assert!(warnings.is_empty(), "cut {cut}: {warnings:?}");
                } else {
                    assert_eq!(warnings.len(), 1, "cut {cut}: {warnings:?}");
                    assert_eq!(warnings[0].kind, WarningKind::TornTail, "cut {cut}");
                    assert_says(&warnings[0], "torn tail");
                }
            }
        }
    }
}

#[test]
fn a_flipped_byte_costs_at_most_its_block() {
    let dir = TempDir::new("flip");
    let (bytes, extents, header_end) = small_recording(&dir);
    for pos in 0..bytes.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut b = bytes.clone();
            b[pos] ^= mask;
            match read_bytes(&b) {
                Err(
                    OpenError::BadHeader { .. }
                    | OpenError::NotRecording { .. }
                    | OpenError::Newer { .. }
                    | OpenError::Torn { .. },
                ) => {
                    assert!(
                        pos < header_end,
                        "pos {pos}: a block flip must not fail the file"
                    );
                }
                Err(e) => panic!("pos {pos}: {e}"),
                Ok((items, warnings)) => {
                    assert!(
                        pos >= header_end,
                        "pos {pos}: header damage must be detected"
                    );
                    let hit = extents.iter().position(|(r, _)| r.contains(&pos)).unwrap();
                    let expect: Vec<Item> = extents
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| *i != hit)
                        .flat_map(|(_, (_, it))| it.clone())
                        .collect();
                    assert_eq!(items, expect, "pos {pos} mask {mask:#x}");
                    assert_eq!(warnings.len(), 1, "pos {pos}: {warnings:?}");
                    let w = &warnings[0];
                    assert_says(w, "skipped");
                    // The last block's damage may read as a torn tail.
                    if hit + 1 < extents.len() {
                        assert_eq!(w.kind, WarningKind::Corrupt, "pos {pos}: {w}");
                        let len = extents[hit].0.len();
                        assert!(
                            w.message.contains(&format!("{len} bytes")),
                            "pos {pos}: {w} (block of {len})"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn corrupt_middle_block_is_skipped_and_named() {
    let dir = TempDir::new("mid");
    let (mut bytes, extents, _) = small_recording(&dir);
    let (r, _) = &extents[1];
    for b in &mut bytes[r.start + 10..r.start + 30] {
        *b = 0;
    }
    let (items, warnings) = read_bytes(&bytes).unwrap();
    assert_eq!(
        items.len(),
        extents[0].1.len() + extents[2].1.len() + extents[3].1.len()
    );
    assert_eq!(warnings.len(), 1);
    assert_says(&warnings[0], &format!("skipped {} bytes", r.len()));
    assert_eq!(warnings[0].offset, r.start as u64);
}

#[test]
fn garbage_between_blocks_is_skipped() {
    let dir = TempDir::new("garbage");
    let (bytes, extents, _) = small_recording(&dir);
    let cut = extents[1].0.end;
    let mut b = bytes[..cut].to_vec();
    b.extend_from_slice(b"KTBK this is not a block KTBK");
    b.extend_from_slice(&[0u8; 100]);
    b.extend_from_slice(&bytes[cut..]);
    let (items, warnings) = read_bytes(&b).unwrap();
    let all: Vec<Item> = extents.iter().flat_map(|(_, i)| i.clone()).collect();
    assert_eq!(items, all);
    assert_eq!(warnings.len(), 1);
    assert_says(&warnings[0], "skipped 129 bytes");
}

#[test]
fn non_recordings_and_newer_versions_are_refused() {
    assert!(matches!(
        read_bytes(b"hello world, this is not a recording"),
        Err(OpenError::NotRecording { .. })
    ));
    assert!(matches!(
        read_bytes(b"{\"type\":\"status\"}\n"),
        Err(OpenError::NotRecording { .. })
    ));
    assert!(matches!(
        read_bytes(b""),
        Err(OpenError::Torn { len: 0, .. })
    ));
    assert!(matches!(
        read_bytes(&FILE_MAGIC[..5]),
        Err(OpenError::Torn { .. })
    ));
    let dir = TempDir::new("ver");
    let (mut bytes, _, _) = small_recording(&dir);
    bytes[8] = 2;
    let e = read_bytes(&bytes).unwrap_err();
    assert!(matches!(e, OpenError::Newer { major: 2, .. }), "{e}");
    assert!(e.to_string().contains("newer ktrace"), "{e}");
    // A newer minor version reads.
    let (mut bytes, _, _) = small_recording(&dir);
    bytes[10] = 7;
    // (the header CRC covers the version: recompute it)
    let json_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let mut h = crc32fast::Hasher::new();
    h.update(&bytes[..16]);
    h.update(&bytes[20..20 + json_len]);
    let crc = h.finalize().to_le_bytes();
    bytes[16..20].copy_from_slice(&crc);
    assert!(read_bytes(&bytes).is_ok());
}

// ------------------------------------------------------------ rotation

#[test]
fn rotation_keeps_a_bounded_set_and_loses_nothing_at_boundaries() {
    let dir = TempDir::new("rot");
    let path = dir.path("rec");
    let cfg = small_segments(&path, 100);
    let evs = storm(20_000, 1_000);
    let s = record_all(cfg.clone(), &evs);
    assert!(s.segments >= 5, "{s:?}");
    assert_eq!(s.files.len() as u64, s.segments);
    // Oldest first; every file within the budget; segments numbered in order.
    let mut all = Vec::new();
    for (i, f) in s.files.iter().enumerate() {
        let len = std::fs::metadata(f).unwrap().len();
        assert!(len <= 8 << 10, "{} is {len} bytes", f.display());
        let (items, w) = read_file(f);
        assert!(w.is_empty());
        let rd = FileReader::open(f).unwrap();
        assert_eq!(rd.context().segment, i as u64);
        assert_eq!(rd.context().recording_id, "00000000000000aa");
        all.extend(items);
    }
    assert_eq!(all.len(), evs.len());
    assert!(
        all.iter()
            .zip(&evs)
            .all(|(i, e)| *i == Item::Event(e.clone())),
        "events lost or reordered at a boundary"
    );
}

#[test]
fn retention_deletes_the_oldest_segments() {
    let dir = TempDir::new("keep");
    let path = dir.path("rec");
    let cfg = small_segments(&path, 3);
    // A stale segment beyond --keep from an earlier run goes too.
    std::fs::write(segment_path(&path, 7), FILE_MAGIC).unwrap();
    let evs = storm(20_000, 1_000);
    let s = record_all(cfg, &evs);
    assert_eq!(
        s.files,
        vec![segment_path(&path, 2), segment_path(&path, 1), path.clone()]
    );
    assert!(!segment_path(&path, 3).exists());
    assert!(!segment_path(&path, 7).exists());
    // What is kept is the most recent events, contiguous to the last one.
    let all: Vec<Item> = s.files.iter().flat_map(|f| read_file(f).0).collect();
    let tail = &evs[evs.len() - all.len()..];
    assert!(all
        .iter()
        .zip(tail)
        .all(|(i, e)| *i == Item::Event(e.clone())));
    let total: u64 = s
        .files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    assert!(total <= 3 * (8 << 10));
}

#[test]
fn restart_rotates_the_previous_recording_out() {
    let dir = TempDir::new("restart");
    let path = dir.path("rec");
    let mut cfg = inline_config(&path);
    cfg.keep = 2;
    write_recording(&path, cfg.clone(), &[every_item(1_000)]);
    write_recording(&path, cfg.clone(), &[every_item(2_000)]);
    assert_eq!(read_file(&segment_path(&path, 1)).0, every_item(1_000));
    assert_eq!(read_file(&path).0, every_item(2_000));
    // keep 1: replaced.
    cfg.keep = 1;
    write_recording(&path, cfg, &[every_item(3_000)]);
    assert_eq!(read_file(&path).0, every_item(3_000));
}

#[test]
fn refuses_to_overwrite_other_files() {
    let dir = TempDir::new("refuse");
    let path = dir.path("notes.txt");
    std::fs::write(&path, "precious").unwrap();
    let e = Recorder::create(inline_config(&path), "test", EngineConfig::default())
        .err()
        .unwrap();
    assert!(e.to_string().contains("not a ktrace recording"), "{e}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    let e = Recorder::create(inline_config(&dir.0), "test", EngineConfig::default())
        .err()
        .unwrap();
    assert!(e.to_string().contains("directory"), "{e}");
}

#[test]
fn a_recording_that_never_started_leaves_no_file() {
    let dir = TempDir::new("nostart");
    let path = dir.path("rec");
    let r = Recorder::create(inline_config(&path), "test", EngineConfig::default()).unwrap();
    drop(r);
    assert!(!path.exists());
}

// ------------------------------------------------------------ disk full

#[test]
fn disk_full_pauses_counts_and_resumes() {
    let dir = TempDir::new("enospc");
    let path = dir.path("rec");
    let fault = Arc::new(AtomicI32::new(0));
    let mut cfg = inline_config(&path);
    cfg.fault = Some(fault.clone());
    let mut r = started(cfg);
    let evs = storm(300, 1_000);
    for e in &evs[..100] {
        r.event(e);
    }
    r.seal();
    fault.store(libc::ENOSPC, Ordering::Relaxed);
    for e in &evs[100..150] {
        r.event(e);
    }
    r.seal();
    let n = r.take_notices();
    assert!(
        matches!(&n[..], [Notice::Paused { dropped: 50, total: 50, error, .. }] if error.contains("disk full")),
        "{n:?}"
    );
    // Still failing: counted, not retried more than once a second, no new notice.
    for e in &evs[150..200] {
        r.event(e);
    }
    r.seal();
    assert!(r.take_notices().is_empty());
    // Space returns: after the retry interval the next block goes through.
    fault.store(0, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(1100));
    for e in &evs[200..] {
        r.event(e);
    }
    r.seal();
    let n = r.take_notices();
    assert!(
        matches!(
            &n[..],
            [Notice::Resumed {
                count: 50,
                total: 100,
                ..
            }]
        ),
        "{n:?}"
    );
    let s = r.finish();
    assert_eq!(s.dropped, 100);
    assert_eq!(s.events, 200);
    let (items, warnings) = read_file(&path);
    assert!(
        warnings.is_empty(),
        "the file holds no torn block: {warnings:?}"
    );
    let events: Vec<&Item> = items
        .iter()
        .filter(|i| matches!(i, Item::Event(_)))
        .collect();
    assert_eq!(events.len(), 200);
    let dropped: Vec<&Item> = items
        .iter()
        .filter(|i| matches!(i, Item::Dropped { .. }))
        .collect();
    assert!(
        matches!(dropped[..], [Item::Dropped { count: 100, ts_ns, reason }] if *ts_ns == evs[100].ts_ns && reason == "disk full"),
        "{dropped:?}"
    );
}

#[test]
fn disk_full_at_the_header_recovers_too() {
    let dir = TempDir::new("enospc-hdr");
    let path = dir.path("rec");
    let fault = Arc::new(AtomicI32::new(libc::ENOSPC));
    let mut cfg = inline_config(&path);
    cfg.fault = Some(fault.clone());
    let mut r = started(cfg);
    let evs = storm(10, 1_000);
    r.event(&evs[0]);
    r.seal();
    fault.store(0, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(1100));
    r.event(&evs[1]);
    r.seal();
    let s = r.finish();
    assert_eq!((s.events, s.dropped), (1, 1));
    let (items, w) = read_file(&path);
    assert!(w.is_empty());
    assert_eq!(items.len(), 2, "{items:?}");
}

#[test]
fn threaded_recorder_writes_everything_on_finish() {
    let dir = TempDir::new("thread");
    let path = dir.path("rec");
    let mut cfg = RotationConfig::new(&path);
    cfg.block_bytes = 4 << 10;
    let evs = storm(50_000, 1_000);
    let mut r = started(cfg);
    for (i, e) in evs.iter().enumerate() {
        r.event(e);
        if i % 5_000 == 0 {
            r.tick(e.ts_ns);
        }
    }
    let s = r.finish();
    assert_eq!(s.events + s.dropped, evs.len() as u64);
    let (items, w) = read_file(&path);
    assert!(w.is_empty());
    let n = items.iter().filter(|i| matches!(i, Item::Event(_))).count() as u64;
    assert_eq!(n, s.events);
}

// ------------------------------------------------------------ replay

fn unnated_and_switch_events(t0: u64) -> Vec<Event> {
    let svc = v4(10, 96, 0, 10, 2222);
    let (b1, b2) = (v4(10, 0, 1, 2, 2222), v4(10, 0, 1, 3, 2222));
    let mut evs = Vec::new();
    let mut ts = t0;
    let mut push = |evs: &mut Vec<Event>, dt: u64, body| {
        ts += dt;
        evs.push(Event {
            ts_ns: ts,
            netns: 1,
            source: Source::Tracepoint,
            body,
        });
    };
    for i in 0..30u16 {
        let c = v4(10, 0, 0, 2, 40000 + i);
        push(
            &mut evs,
            1_000_000,
            EventBody::NatMapping(Box::new(NatEntry {
                client: c,
                service: svc,
                backend: b1,
                protocol: 6,
                snat: None,
            })),
        );
    }
    for i in 0..30u16 {
        let c = v4(10, 0, 0, 2, 40000 + i);
        if i % 2 == 0 {
            // Un-NATed reply: the client resets the backend's own address.
            push(
                &mut evs,
                2_000_000,
                EventBody::TcpSendReset {
                    src: c,
                    dst: b1,
                    reason: Some("NO_SOCKET".into()),
                    socket: None,
                    trigger_flags: Some(0x18),
                },
            );
        } else {
            // Conntrack flushed: re-mapped to b2, which resets the client.
            push(
                &mut evs,
                2_000_000,
                EventBody::NatMapping(Box::new(NatEntry {
                    client: c,
                    service: svc,
                    backend: b2,
                    protocol: 6,
                    snat: None,
                })),
            );
            push(
                &mut evs,
                100_000,
                EventBody::TcpSendReset {
                    src: b2,
                    dst: c,
                    reason: Some("NO_SOCKET".into()),
                    socket: None,
                    trigger_flags: Some(0x10),
                },
            );
        }
    }
    evs
}

/// A writer the test reads back from after the pipeline is done with it.
struct Tap(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Tap {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs the live pipeline over [`unnated_and_switch_events`], recording to
/// a rotated set at `path`; returns what it printed.
fn live_and_recorded(engine: &EngineConfig, ctx: &Context, path: &Path, json: bool) -> String {
    use crate::engine::Engine;
    use crate::netns::NetnsNames;
    use crate::output::Renderer;
    use crate::pipeline::Pipeline;

    let mut cfg = inline_config(path);
    cfg.rotate_bytes = Some(1500);
    cfg.block_bytes = 200;
    cfg.keep = 50;
    let captured = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut live = Pipeline::new(
        Some(Engine::new(engine.clone())),
        Renderer::new(
            Tap(captured.clone()),
            json,
            true,
            ctx.clock(),
            NetnsNames::default(),
        ),
    );
    let mut rec = Recorder::create(cfg, "test", engine.clone()).unwrap();
    rec.start_with(ctx.clone()).unwrap();
    live.recorder = Some(rec);
    let evs = unnated_and_switch_events(10_000_000_000);
    let mut next_tick = evs[0].ts_ns;
    for e in &evs {
        while next_tick < e.ts_ns {
            live.tick(next_tick).unwrap();
            next_tick += 7_000_000;
        }
        live.handle(e).unwrap();
    }
    // Quiet time: the storm ends by ticks alone.
    for i in 1..200 {
        live.tick(next_tick + i * 200_000_000).unwrap();
    }
    live.lost(next_tick, 4, 4, "ring buffer full").unwrap();
    live.finish(next_tick).unwrap();
    live.recorder.take().unwrap().finish();
    let printed = captured.lock().unwrap().clone();
    String::from_utf8(printed).unwrap()
}

/// Replays the recording at `path`; returns what it printed after the
/// status (and, in human mode, the replay banner).
fn replayed_after_status(path: &Path, json: bool) -> Vec<String> {
    use crate::replay::{run_to, ReplayOptions};

    let mut replay_buf = Vec::new();
    let mut warnings = Vec::new();
    let report = run_to(
        &ReplayOptions {
            json,
            events: true,
            ..ReplayOptions::new(vec![path.to_path_buf()])
        },
        &mut replay_buf,
        &mut |w| warnings.push(w.clone()),
    )
    .unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert!(report.files >= 3, "a rotated set: {report:?}");
    let replay_text = String::from_utf8(replay_buf).unwrap();
    let lines: Vec<&str> = replay_text.lines().collect();
    let start = if json {
        1
    } else {
        lines
            .iter()
            .position(|l| l.starts_with("replaying "))
            .unwrap()
            + 1
    };
    lines[start..].iter().map(|l| l.to_string()).collect()
}

#[test]
fn replay_prints_what_the_live_pipeline_printed() {
    let engine = EngineConfig {
        storm_threshold: 5,
        ..Default::default()
    };
    let ctx = Context {
        engine: engine.clone(),
        ..test_context()
    };
    for json in [true, false] {
        let dir = TempDir::new("replay");
        let path = dir.path("rec");
        let live_text = live_and_recorded(&engine, &ctx, &path, json);
        assert!(
            live_text.contains("unnated_reply")
                && live_text.contains("backend_switch")
                && live_text.contains("rst_storm"),
            "{live_text}"
        );
        // Lost lines too: both carry the time they were found lost.
        let live_lines: Vec<&str> = live_text.lines().collect();
        assert_eq!(replayed_after_status(&path, json), live_lines);
    }
}

// ------------------------------------------------------------ fuzzing

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any bytes at all: an error or warnings, never a panic.
    #[test]
    fn reader_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = read_bytes(&bytes);
        let mut with_magic = FILE_MAGIC.to_vec();
        with_magic.extend_from_slice(&bytes);
        let _ = read_bytes(&with_magic);
    }

    /// A valid file with random damage: never a panic, and whatever is
    /// read is items that were written.
    #[test]
    fn reader_never_panics_on_damaged_recordings(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let bytes = fixture();
        let mut b = bytes.clone();
        for (i, v) in edits {
            let at = i.index(b.len());
            b[at] = v;
        }
        if truncate {
            b.truncate(cut.index(b.len() + 1));
        }
        if let Ok((items, _)) = read_bytes(&b) {
            let written = every_fixture_item();
            for it in items {
                prop_assert!(written.contains(&it), "{:?} was never written", it);
            }
        }
    }

    /// Random payload bytes behind a valid frame header (the CRC fixed up):
    /// exercises the record decoder itself.
    #[test]
    fn block_decoder_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..2048), base in any::<u64>()) {
        let mut d = BlockDecoder::new(&payload, base);
        let mut n = 0;
        while let Some(r) = d.next() {
            n += 1;
            if r.is_err() || n > 10_000 { break; }
        }
    }

    #[test]
    fn arbitrary_events_round_trip(evs in proptest::collection::vec(arb_event(), 1..64)) {
        let mut enc = BlockEncoder::new();
        for e in &evs {
            enc.push_event(e);
        }
        let raw = enc.take();
        let items = items_of(decode_payload(&raw.payload, raw.base_ts));
        let expect: Vec<Item> = evs.into_iter().map(Item::Event).collect();
        prop_assert_eq!(items, expect);
    }
}

fn every_fixture_item() -> Vec<Item> {
    (0..3).flat_map(|i| every_item(1_000 * (i + 1))).collect()
}

fn fixture() -> Vec<u8> {
    use std::sync::OnceLock;
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES
        .get_or_init(|| {
            let dir = TempDir::new("fixture");
            let path = dir.path("rec");
            let blocks: Vec<Vec<Item>> = (0..3).map(|i| every_item(1_000 * (i + 1))).collect();
            write_recording(&path, inline_config(&path), &blocks);
            std::fs::read(&path).unwrap()
        })
        .clone()
}

fn arb_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(o, p)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(o)), p)),
        (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(o, p)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), p)),
    ]
}

fn arb_source() -> impl Strategy<Value = Source> {
    prop_oneof![
        Just(Source::Tracepoint),
        Just(Source::Kprobe),
        Just(Source::Kretprobe),
        Just(Source::Ctnetlink)
    ]
}

/// Any event body, every variant as likely as the others.
fn arb_body() -> impl Strategy<Value = EventBody> {
    prop_oneof![
        3 => arb_reset_body(),
        2 => arb_conntrack_body(),
        1 => arb_ipvs_body(),
        1 => arb_nat_body(),
    ]
}

/// Resets sent, received and summarised.
fn arb_reset_body() -> impl Strategy<Value = EventBody> {
    let a = arb_addr;
    prop_oneof![
        (
            a(),
            a(),
            proptest::option::of("[A-Z_]{0,12}"),
            proptest::option::of(any::<u8>()),
            proptest::option::of(any::<u8>())
        )
            .prop_map(|(src, dst, reason, socket, trigger_flags)| {
                EventBody::TcpSendReset {
                    src,
                    dst,
                    reason: reason.map(Into::into),
                    trigger_flags,
                    socket,
                }
            }),
        (a(), a(), any::<u64>()).prop_map(|(src, dst, sock_cookie)| EventBody::TcpReceiveReset {
            src,
            dst,
            sock_cookie
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(refused, socket)| {
            EventBody::ResetsSummarised(ResetCounts { refused, socket })
        })
    ]
}

/// conntrack INVALID verdicts and full tables.
fn arb_conntrack_body() -> impl Strategy<Value = EventBody> {
    let a = arb_addr;
    prop_oneof![
        (
            a(),
            a(),
            proptest::option::of(a()),
            proptest::option::of(a()),
            proptest::option::of(a()),
            any::<bool>(),
            proptest::option::of(".{0,200}")
        )
            .prop_map(
                |(src, dst, orig_src, orig_dst, reply_src, reply_dir, message)| {
                    EventBody::CtInvalid(Box::new(CtInvalid {
                        src,
                        dst,
                        orig_src,
                        orig_dst,
                        reply_src,
                        reply_dir,
                        message: message.map(Into::into),
                    }))
                }
            ),
        (a(), a(), any::<i32>()).prop_map(|(src, dst, errno)| EventBody::CtTableFull {
            src,
            dst,
            errno
        })
    ]
}

/// A connection's client, service and backend, its protocol, and a flag.
fn arb_conn() -> impl Strategy<Value = (SocketAddr, SocketAddr, SocketAddr, u8, bool)> {
    (
        arb_addr(),
        arb_addr(),
        arb_addr(),
        any::<u8>(),
        any::<bool>(),
    )
}

/// IPVS connections (the flag: a template).
fn arb_ipvs_body() -> impl Strategy<Value = EventBody> {
    let flags = (
        any::<u32>(),
        any::<u32>(),
        proptest::option::of(any::<i32>()),
    );
    (arb_conn(), flags).prop_map(
        |((client, service, real_server, protocol, template), (conn_flags, dest_flags, weight))| {
            EventBody::IpvsConnNew(Box::new(IpvsConnNew {
                client,
                service,
                real_server,
                protocol,
                template,
                conn_flags,
                dest_flags,
                weight,
            }))
        },
    )
}

/// NAT mappings and their ends (the flag: an end).
fn arb_nat_body() -> impl Strategy<Value = EventBody> {
    (arb_conn(), proptest::option::of(arb_addr())).prop_map(
        |((client, service, backend, protocol, destroy), snat)| {
            let nat = NatEntry {
                client,
                service,
                backend,
                protocol,
                snat,
            };
            if destroy {
                EventBody::NatDestroy(Box::new(nat))
            } else {
                EventBody::NatMapping(Box::new(nat))
            }
        },
    )
}

fn arb_event() -> impl Strategy<Value = Event> {
    (any::<u64>(), any::<u32>(), arb_source(), arb_body()).prop_map(
        |(ts_ns, netns, source, body)| Event {
            ts_ns,
            netns,
            source,
            body,
        },
    )
}

// ------------------------------------------------------------ regressions

/// Inputs the property tests found or that once misbehaved, kept as tests.
#[test]
fn regression_inputs() {
    let cases: Vec<Vec<u8>> = vec![
        // A frame header claiming a 16 MiB payload, then nothing.
        {
            let mut b = fixture()
                [..20 + u32::from_le_bytes(fixture()[12..16].try_into().unwrap()) as usize]
                .to_vec();
            let h = FrameHeader {
                kind: 1,
                codec: 1,
                flags: 0,
                stored_len: 16 << 20,
                raw_len: 16 << 20,
                items: 1,
                events: 1,
                base_ts: 0,
                min_ts: 0,
                max_ts: 0,
                payload_crc: 0,
            };
            b.extend_from_slice(&h.encode());
            b
        },
        // Only the magic and a version.
        {
            let mut b = FILE_MAGIC.to_vec();
            b.extend_from_slice(&[1, 0, 0, 0]);
            b
        },
        // A context length beyond the limit.
        {
            let mut b = FILE_MAGIC.to_vec();
            b.extend_from_slice(&[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
            b
        },
    ];
    for c in cases {
        let _ = read_bytes(&c);
    }
    // A record whose length runs past its block; a definition of an
    // unknown family; references outside the dictionaries.
    for payload in [
        vec![0x01, 0x7f, 0x00],
        vec![0x60, 0x02, 0x09, 0x00],
        vec![0x01, 0x06, 0x00, 0x00, 0x00, 0x05, 0x00, 0x00],
        vec![0x62, 0x01, 0x00, 0x01, 0x04, 0x00, 0x00, 0x00, 0x09],
        vec![0x41, 0x04, 0x00, 0x01, 0x01, 0x05],
    ] {
        let mut d = BlockDecoder::new(&payload, 0);
        while let Some(r) = d.next() {
            if r.is_err() {
                break;
            }
        }
    }
}

// ------------------------------------------------------------ exposure

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn recordings_and_their_directory_are_owner_only() {
    let dir = TempDir::new("private");
    let path = dir.path("node-a/ktrace/rec");
    let mut cfg = RotationConfig::new(&path);
    cfg.threaded = false;
    cfg.keep = 3;
    write_recording(&path, cfg.clone(), &[every_item(1_000)]);
    write_recording(&path, cfg, &[every_item(2_000)]);
    assert_eq!(mode(&dir.path("node-a")), 0o700);
    assert_eq!(mode(&dir.path("node-a/ktrace")), 0o700);
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&dir.path("node-a/ktrace/rec.1")), 0o600);

    // A recording left readable by an older version is closed up.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    write_recording(&path, inline_config(&path), &[every_item(3_000)]);
    assert_eq!(mode(&path), 0o600);
}

#[test]
fn never_writes_through_a_planted_symlink() {
    let dir = TempDir::new("symlink");
    let victim = dir.path("victim");
    std::fs::write(&victim, "precious").unwrap();
    // A link to an existing file, and a dangling one (which would create it).
    for (name, target) in [("rec", victim.clone()), ("dangling", dir.path("made"))] {
        let link = dir.path(name);
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = Recorder::create(inline_config(&link), "test", EngineConfig::default())
            .err()
            .unwrap();
        let text = format!("{e}: {}", std::error::Error::source(&e).unwrap());
        assert!(text.contains("symbolic link"), "{text}");
        // Planted after the checks (between rotation steps): refused too.
        let e = super::private::open(&link, true).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
    }
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert!(!dir.path("made").exists());
}

#[test]
fn never_writes_into_a_planted_hard_link() {
    let dir = TempDir::new("hardlink");
    let victim = dir.path("victim");
    std::fs::write(&victim, "").unwrap();
    let link = dir.path("rec");
    std::fs::hard_link(&victim, &link).unwrap();
    let e = Recorder::create(inline_config(&link), "test", EngineConfig::default())
        .err()
        .unwrap();
    let text = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(text.contains("hard links"), "{text}");
}

// ------------------------------------------------------------ names

mod names {
    use super::*;
    use crate::names::{
        Interner, Layer, NameResolver, Names, Peer, PodName, PortRole, Proto, ServiceName, SourceId,
    };

    /// The storm's addresses named as a source would: the VIP, the three
    /// backends (Pods, and endpoints of the Service), and the clients of
    /// 10.0.0.0/24 (Pods); the other clients are not named. `backend0`
    /// names the first backend's Pod.
    fn layer(backend0: &str) -> Layer {
        let mut i = Interner::default();
        let mut l = Layer::default();
        let svc = Arc::new(ServiceName::parse("shop/web:http", &mut i).unwrap());
        let vip = v4(10, 96, 0, 10, 2222);
        l.add_port(PortRole::Vip, (vip.ip(), 2222, Proto::Tcp), svc.clone());
        let pod = |name: &str| {
            Peer::Pod(Arc::new(PodName {
                namespace: "shop".into(),
                name: name.into(),
                node: Some("node-a".into()),
            }))
        };
        for b in 0..3u8 {
            let ip = v4(10, 0, 1, 2 + b, 0).ip();
            l.add_port(PortRole::Endpoint, (ip, 2222, Proto::Tcp), svc.clone());
            let name = if b == 0 {
                backend0.to_string()
            } else {
                format!("web-{b}")
            };
            l.set_peer(ip, pod(&name));
        }
        for c in 2..252u8 {
            l.set_peer(v4(10, 0, 0, c, 0).ip(), pod(&format!("client-{c}")));
        }
        l
    }

    fn addrs(e: &Event) -> Vec<SocketAddr> {
        match &e.body {
            EventBody::NatMapping(n) => vec![n.client, n.service, n.backend],
            EventBody::TcpSendReset { src, dst, .. }
            | EventBody::TcpReceiveReset { src, dst, .. } => vec![*src, *dst],
            _ => Vec::new(),
        }
    }

    /// What a replay of `items` names `a` (a Service port, else a Pod).
    fn name(r: &NameResolver, a: SocketAddr) -> Option<String> {
        r.label(a)
    }

    /// The items of `path`, reading only the blocks `want` accepts.
    fn read_some(path: &Path, want: &dyn Fn(&FrameHeader) -> bool) -> Vec<Item> {
        let mut r = FileReader::open(path).unwrap();
        let (mut all, mut block) = (Vec::new(), Vec::new());
        while r
            .next_block(&mut block, &mut |w| panic!("{w}"), want)
            .unwrap()
        {
            all.append(&mut block);
        }
        all
    }

    /// Checks that every address of every event in `items` that the live
    /// names named is named the same by the names `items` carry, and
    /// returns how many name records each address got.
    fn check_named(
        items: &[Item],
        live: &NameResolver,
        renamed_from: u64,
    ) -> BTreeMap<IpAddr, usize> {
        let mut replayed = NameResolver::default();
        let mut records = BTreeMap::new();
        for item in items {
            match item {
                Item::Name { record, .. } => {
                    let ip = match record {
                        crate::names::NameRecord::Service { key, .. }
                        | crate::names::NameRecord::Endpoint { key, .. } => key.0,
                        crate::names::NameRecord::Pod { ip, .. }
                        | crate::names::NameRecord::Node { ip, .. }
                        | crate::names::NameRecord::External { ip } => *ip,
                    };
                    *records.entry(ip).or_insert(0) += 1;
                    replayed.apply(record.clone());
                }
                Item::Event(e) => {
                    for a in addrs(e) {
                        let want = name(live, a);
                        let got = name(&replayed, a);
                        if a.ip() == v4(10, 0, 1, 2, 0).ip() {
                            // Renamed: the old name before, and after it for
                            // the rest of the block that held the address.
                            let old = Some("shop/web-old");
                            if e.ts_ns < renamed_from || got.as_deref() == old {
                                assert_eq!(got.as_deref(), old, "{a} at {}", e.ts_ns);
                                continue;
                            }
                        }
                        assert_eq!(got, want, "{a} at {}", e.ts_ns);
                    }
                }
                _ => {}
            }
        }
        records
    }

    #[test]
    fn names_go_once_per_segment_and_survive_rotation_and_skipped_blocks() {
        names_round_trip(false);
    }

    /// The same with the writer on its own thread: blocks still queued
    /// when a segment starts carry the names the new segment lacks, and
    /// blocks dropped on a full queue lose no name later blocks need.
    #[test]
    fn names_survive_rotation_with_blocks_in_flight() {
        names_round_trip(true);
    }

    fn names_round_trip(threaded: bool) {
        let dir = TempDir::new("names");
        let path = dir.path("rec");
        let names = Names::new();
        names.publish(SourceId::Api, layer("web-old"));
        let live = NameResolver::live(names.clone());
        let evs = storm(20_000, 1_000);
        let renamed_from = evs[12_000].ts_ns;
        let mut cfg = small_segments(&path, 100);
        cfg.threaded = threaded;
        let mut r = started(cfg);
        r.name_with(names.clone());
        for (i, e) in evs.iter().enumerate() {
            if i == 12_000 {
                names.publish(SourceId::Api, layer("web-new"));
            }
            r.event(e);
        }
        let s = r.finish();
        assert!(s.segments >= 5, "{s:?}");
        let (mut total, mut checked_rename) = (0, 0);
        for f in &s.files {
            // Each segment alone names its events as they were named live,
            // with one record per name (two for the renamed Pod's address
            // in the segment where it was renamed).
            let items = read_some(f, &|_| true);
            let records = check_named(&items, &live, renamed_from);
            // The segment that holds the rename ends with the new name.
            let last = items.iter().rev().find_map(|i| match i {
                Item::Event(e) => Some(e.ts_ns),
                _ => None,
            });
            if last.is_some_and(|t| t > renamed_from + 10_000_000) {
                checked_rename += 1;
                let mut replayed = NameResolver::default();
                for i in &items {
                    if let Item::Name { record, .. } = i {
                        replayed.apply(record.clone());
                    }
                }
                let b0 = v4(10, 0, 1, 2, 2222);
                assert_eq!(replayed.label(b0).as_deref(), Some("shop/web-new"));
            }
            let backend0 = v4(10, 0, 1, 2, 0).ip();
            for (ip, n) in &records {
                // The backends carry a Pod and an endpoint record.
                let per_name = if ip.to_string().starts_with("10.0.1.") {
                    2
                } else {
                    1
                };
                assert!(
                    *n == per_name || (*ip == backend0 && *n == 2 * per_name),
                    "{ip}: {n} records in {}",
                    f.display()
                );
            }
            total += records.values().sum::<usize>();
            // Skipping the first half of the segment's blocks of events
            // loses none of the names the rest uses. (The block that says
            // blocks were dropped on a full queue holds no event, and may
            // be a segment's last: it is not counted.)
            let blocks = std::cell::RefCell::new(Vec::new());
            read_some(f, &|h| {
                if h.events > 0 {
                    blocks.borrow_mut().push(h.min_ts);
                }
                false
            });
            let blocks = blocks.into_inner();
            if blocks.len() >= 2 {
                let mid = blocks[blocks.len() / 2];
                let items = read_some(f, &|h| h.min_ts >= mid);
                assert!(items.iter().any(|i| matches!(i, Item::Event(_))));
                check_named(&items, &live, renamed_from);
            }
        }
        // (On its own thread, the writer falls behind and whole blocks are
        // dropped, the rename's among them: what is left is checked above.)
        assert!(threaded || checked_rename >= 1, "{s:?}");
        // Once per segment, not once per block: far fewer records than blocks x names.
        assert!(
            total < 260 * 2 * s.segments as usize,
            "{total} name records"
        );
    }
}
