//! What the benchmarks share (each uses part of it).
#![allow(dead_code)]

pub mod mix;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use ktrace::engine::EngineConfig;
use ktrace::event::{Event, EventBody, Source};
use ktrace::recording::Context;

/// CPU time the calling thread has used: rates per second of it are what
/// one core gives, whatever else a shared machine runs (its cache and
/// memory traffic still counts: compare pairs, not runs far apart).
pub fn thread_cpu() -> Duration {
    cpu_clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time every thread of this process has used, those that ended too.
pub fn process_cpu() -> Duration {
    cpu_clock(libc::CLOCK_PROCESS_CPUTIME_ID)
}

fn cpu_clock(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime({clock})");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// An event of namespace 1 at `ts`, as a tracepoint reports it.
pub fn ev(ts: u64, body: EventBody) -> Event {
    Event {
        ts_ns: ts,
        netns: 1,
        source: Source::Tracepoint,
        body,
    }
}

/// The client's no-socket RST to the backend's own address: the reset of
/// an un-NATed reply (a finding).
pub fn unnated_reset(client: SocketAddr, backend: SocketAddr) -> EventBody {
    EventBody::TcpSendReset {
        src: client,
        dst: backend,
        reason: Some("NO_SOCKET".into()),
        socket: None,
        trigger_flags: Some(0x18),
    }
}

/// The context a recording made by `command` starts with.
pub fn context(command: &str) -> Context {
    Context {
        format: "ktrace-recording".into(),
        format_version: "1.0".into(),
        ktrace_version: env!("CARGO_PKG_VERSION").into(),
        command: command.into(),
        host: "bench".into(),
        kernel: None,
        boot_id: None,
        wall_offset_ns: 1_700_000_000_000_000_000,
        recording_id: "00000000000000be".into(),
        segment: 0,
        started_mono_ns: 0,
        segment_started_mono_ns: 0,
        ring_buffer_bytes: 1 << 23,
        netns: None,
        netns_names: BTreeMap::new(),
        hooks: Vec::new(),
        engine: EngineConfig::default(),
    }
}
