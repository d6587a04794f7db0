//! Correlation engine benchmark: a synthetic stream shaped like incidents at
//! scale, through `Engine::process` on one core.
//!
//! Reports events/s (best, median and worst of several runs, by wall clock
//! and by the thread's CPU time, which a busy machine disturbs less), the
//! time from an event's arrival to the finding it completes (p50/p99/p99.9,
//! hdrhistogram), and bytes of state per tracked flow: at 1 M flows and the
//! worst case at any size from 1 000 flows up (just after a resize).
//! Run: `cargo bench -p ktrace --bench engine` (`KTRACE_BENCH_RUNS` runs).
//!
//! Events are fed in batches, as a ring drain or a recording block hands
//! them over (`Engine::process_batch`, which prefetches flows ahead).

mod common;

use std::time::Instant;

use common::mix::{storm, stream, FLOWS};
use common::thread_cpu;
use hdrhistogram::Histogram;
use ktrace::engine::Engine;
use ktrace::event::Event;

/// Events per batch: a ring drain or a recording block.
const BATCH: usize = 512;

/// Rates (M events/s) of the runs: wall clock and CPU time.
#[derive(Default)]
struct Rates {
    wall: Vec<f64>,
    cpu: Vec<f64>,
}

impl Rates {
    /// Runs `f` (which processes `n` events) and notes its rates.
    fn time(&mut self, n: usize, f: impl FnOnce()) {
        let (w, c) = (Instant::now(), thread_cpu());
        f();
        let (w, c) = (w.elapsed(), thread_cpu() - c);
        self.wall.push(n as f64 / w.as_secs_f64() / 1e6);
        self.cpu.push(n as f64 / c.as_secs_f64() / 1e6);
    }

    fn show(&mut self, what: &str) {
        let spread = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            format!(
                "{:.2} M/s (median {:.2}, worst {:.2})",
                v[v.len() - 1],
                v[v.len() / 2],
                v[0]
            )
        };
        println!("  {what}: best {} wall clock", spread(&mut self.wall));
        println!(
            "  {}  best {} per CPU second",
            " ".repeat(what.len()),
            spread(&mut self.cpu)
        );
    }
}

fn feed(engine: &mut Engine, events: &[Event], out: &mut Vec<ktrace::engine::Finding>) -> u64 {
    let mut findings = 0;
    for chunk in events.chunks(BATCH) {
        engine.process_batch(chunk, out);
        findings += out.len() as u64;
        out.clear();
    }
    findings
}

fn main() {
    let runs: usize = std::env::var("KTRACE_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
        .max(1);
    // Phase 1: every event on a different, cold flow (the worst case).
    let events = stream();
    let mut out = Vec::with_capacity(1024);
    let mut cold = Rates::default();
    let mut findings = 0;
    for _ in 0..runs {
        let mut engine = Engine::new(common::mix::config());
        cold.time(events.len(), || {
            findings = feed(&mut engine, &events, &mut out)
        });
    }
    println!(
        "engine benchmark: {} events over {FLOWS} flows, {findings} findings, 1 core, batches of {BATCH}",
        events.len()
    );
    cold.show("cold (every event on another flow)");

    // State: the worst bytes/flow at any size from 1 000 flows up.
    let mut engine = Engine::new(common::mix::config());
    let (mut worst, mut worst_at) = (0.0f64, 0);
    for chunk in events.chunks(64) {
        engine.process_batch(chunk, &mut out);
        out.clear();
        let n = engine.stats().flows_tracked;
        if n >= 1_000 && engine.bytes_per_flow() > worst {
            (worst, worst_at) = (engine.bytes_per_flow(), n);
        }
    }
    println!(
        "  state: {:.1} bytes/flow at {} flows; worst {worst:.1} bytes/flow (at {worst_at} flows) from 1 000 flows up",
        engine.bytes_per_flow(),
        engine.stats().flows_tracked,
    );

    // Latency: arrival to finding, the processing of the completing event.
    let mut engine = Engine::new(common::mix::config());
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).unwrap();
    for e in &events {
        let t0 = Instant::now();
        engine.process(e, &mut out);
        if !out.is_empty() {
            hist.record(t0.elapsed().as_nanos().max(1) as u64).unwrap();
            out.clear();
        }
    }
    println!(
        "  event-to-finding (in the engine): p50 {} ns, p99 {} ns, p99.9 {} ns, max {} ns",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max()
    );

    // Phase 2: a storm over 1 M tracked flows (each run on its own copy
    // of the state, so every run sees the same table).
    let storm_events = storm();
    let mut storm_rates = Rates::default();
    let mut findings = 0;
    for _ in 0..runs {
        let mut engine = Engine::new(common::mix::config());
        feed(&mut engine, &events, &mut out);
        storm_rates.time(storm_events.len(), || {
            findings = feed(&mut engine, &storm_events, &mut out)
        });
    }
    println!(
        "storm: {} events over {FLOWS} tracked flows, {findings} findings",
        storm_events.len()
    );
    storm_rates.show("storm");
}
