//! Recording benchmark: `cargo bench -p ktrace --bench recording`.
//!
//! A synthetic reset storm shaped like the lab's (many clients, one
//! service, three backends: a NAT mapping, the client's no-socket RST to
//! the backend's address and the backend accepting it, per connection) is
//! recorded on one core (encode + zstd + write, no writer thread), then
//! read back. Prints events/s recorded, bytes/event on disk, events/s
//! decoded and events/s replayed through the engine and renderer.
//!
//! Targets (issue 4): >= 2 M events/s recorded, <= 24 B/event, >= 5 M
//! events/s replayed. Set `KTRACE_BENCH_EVENTS` to change the count.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Instant;

use common::context;
use ktrace::engine::{Engine, EngineConfig};
use ktrace::event::{Event, EventBody, NatEntry, Source};
use ktrace::netns::NetnsNames;
use ktrace::output::Renderer;
use ktrace::pipeline::Pipeline;
use ktrace::recording::format::Item;
use ktrace::recording::{FileReader, Recorder, RotationConfig};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn ep(a: u8, b: u8, c: u8, d: u8, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(a, b, c, d)), port)
}

/// About `n` events of a reset storm at ~2 M events/s of kernel time.
fn storm(n: usize) -> Vec<Event> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let service = ep(10, 96, 0, 10, 2222);
    let backends = [
        ep(10, 0, 1, 2, 2222),
        ep(10, 0, 1, 3, 2222),
        ep(10, 0, 1, 4, 2222),
    ];
    let (client_ns, server_ns, node_ns) = (4026532301u32, 4026532302u32, 4026532303u32);
    let mut ts = 3_600_000_000_000u64;
    let mut out = Vec::with_capacity(n + 4);
    let push = |out: &mut Vec<Event>, ts: &mut u64, dt: u64, netns, source, body| {
        *ts += dt;
        out.push(Event {
            ts_ns: *ts,
            netns,
            source,
            body,
        });
    };
    while out.len() < n {
        let r = rng.next();
        // 4096 client hosts, ephemeral ports.
        let client = ep(
            10,
            1,
            (r >> 8) as u8 & 0x0f,
            r as u8,
            32768 + (r >> 16) as u16 % 28000,
        );
        let backend = backends[(r >> 40) as usize % 3];
        let jitter = |x: u64| 200 + (x % 600);
        push(
            &mut out,
            &mut ts,
            jitter(r >> 3),
            node_ns,
            Source::Ctnetlink,
            EventBody::NatMapping(NatEntry {
                client,
                service,
                backend,
                protocol: 6,
                snat: None,
            }),
        );
        push(
            &mut out,
            &mut ts,
            jitter(r >> 7),
            client_ns,
            Source::Tracepoint,
            common::unnated_reset(client, backend),
        );
        push(
            &mut out,
            &mut ts,
            jitter(r >> 11),
            server_ns,
            Source::Tracepoint,
            EventBody::TcpReceiveReset {
                src: client,
                dst: backend,
                sock_cookie: r >> 20,
            },
        );
    }
    out
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let n: usize = std::env::var("KTRACE_BENCH_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3_000_000);
    let events = storm(n);
    let n = events.len();
    let dir = std::env::temp_dir().join(format!("ktrace-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path: PathBuf = dir.join("storm.rec");

    let (best_rec, bytes) = best_of(3, || record(&path, &events));
    let (best_dec, count) = best_of(3, || {
        let mut count = 0usize;
        each_item(&path, |i| count += usize::from(matches!(i, Item::Event(_))));
        count
    });
    assert_eq!(count, n);
    let (best_engine, findings) = best_of(2, || correlate(&path));
    let (best_replay, findings_bytes) = best_of(2, || replay(&path));
    let _ = std::fs::remove_dir_all(&dir);

    let per_event = bytes as f64 / n as f64;
    println!("recording benchmark: {n} events of a reset storm (4096 client hosts, 1 service, 3 backends)");
    println!(
        "  record (encode+zstd+write, one core): {:>6.2} M events/s   [target >= 2]",
        n as f64 / best_rec / 1e6
    );
    println!("  size on disk:                         {per_event:>6.2} bytes/event [target <= 24]  ({bytes} bytes)");
    println!(
        "  read back (decode only):              {:>6.2} M events/s   [target >= 5]",
        n as f64 / best_dec / 1e6
    );
    println!(
        "  replay (decode+engine):               {:>6.2} M events/s   ({findings} findings)",
        n as f64 / best_engine / 1e6
    );
    println!(
        "  replay (decode+engine+JSON renderer): {:>6.2} M events/s   ({findings_bytes} bytes of JSON findings)",
        n as f64 / best_replay / 1e6
    );
}

/// The fastest of `runs` runs of `f`, in seconds, and what the last returned.
fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::MAX;
    let mut last = None;
    for _ in 0..runs {
        let start = Instant::now();
        last = Some(f());
        best = best.min(start.elapsed().as_secs_f64());
    }
    (best, last.expect("at least one run"))
}

/// Records `events` on one core (encode, compress, write, inline); the
/// file's size.
fn record(path: &Path, events: &[Event]) -> u64 {
    let _ = std::fs::remove_file(path);
    let mut cfg = RotationConfig::new(path);
    cfg.threaded = false;
    let mut r = Recorder::create(cfg, "bench", EngineConfig::default()).unwrap();
    r.start_with(context("bench")).unwrap();
    for (i, e) in events.iter().enumerate() {
        r.event(e);
        // The live pipeline ticks every 200 ms; at 2 M events/s that
        // is one tick per 400 k events.
        if i % 400_000 == 0 {
            r.tick(e.ts_ns);
        }
    }
    let s = r.finish();
    assert_eq!(s.events as usize, events.len());
    std::fs::metadata(path).unwrap().len()
}

/// Decodes every item of the recording at `path` into `f`.
fn each_item(path: &Path, mut f: impl FnMut(Item)) {
    let mut rd = FileReader::open(path).unwrap();
    let mut block = Vec::new();
    while rd
        .next_block(&mut block, &mut |w| panic!("{w}"), &|_| true)
        .unwrap()
    {
        block.drain(..).for_each(&mut f);
    }
}

/// Decode and correlate (findings made, not rendered); the findings.
fn correlate(path: &Path) -> usize {
    let engine = FileReader::open(path).unwrap().context().engine.clone();
    let mut engine = Engine::new(engine.bounded());
    let mut out = Vec::new();
    let mut findings = 0;
    each_item(path, |item| {
        match item {
            Item::Event(e) => engine.process(&e, &mut out),
            Item::Tick { ts_ns } => engine.tick(ts_ns, &mut out),
            _ => {}
        }
        findings += out.len();
        out.clear();
    });
    engine.tick(u64::MAX, &mut out);
    findings + out.len()
}

/// Replay: decode, engine, renderer (JSON findings to a counting sink);
/// the bytes of JSON.
fn replay(path: &Path) -> u64 {
    let ctx = FileReader::open(path).unwrap().context().clone();
    let counter = CountingSink::default();
    let mut p = Pipeline::new(
        Some(Engine::new(ctx.engine.clone().bounded())),
        Renderer::new(
            counter.clone(),
            true,
            false,
            ctx.clock(),
            NetnsNames::default(),
        ),
    );
    each_item(path, |item| match item {
        Item::Event(e) => p.handle(&e).unwrap(),
        Item::Tick { ts_ns } => p.tick(ts_ns).unwrap(),
        _ => {}
    });
    p.finish(u64::MAX).unwrap();
    counter.0.get()
}

/// Counts what the renderer writes.
#[derive(Default, Clone)]
struct CountingSink(std::rc::Rc<std::cell::Cell<u64>>);

impl std::io::Write for CountingSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.set(self.0.get() + b.len() as u64);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
