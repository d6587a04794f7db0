//! Detection latency, end to end, during a lab incident: from the kernel's
//! timestamp of the event that completes a finding (the finding's `ts`) to
//! the moment its line is read from `ktrace watch --json`'s stdout.
//!
//! The un-NATed reply of the lab (the server's out-of-window segment is not
//! reverse-NATed; the client resets the backend's own address), repeated
//! in rounds. On kernels where the conntrack INVALID verdict cannot be
//! hooked, each finding also waits for a conntrack counter sample: the
//! path whose latency matters most. Percentiles come from hdrhistogram.
//!
//! Run as root: `cargo bench -p ktrace-tests --bench latency`
//! (`KTRACE_LATENCY_ROUNDS`, default 30, of `KTRACE_LATENCY_CONNS`, default 8).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use hdrhistogram::Histogram;
use ktrace_tests::{ktrace_bin, skip_reason, Lab};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn realtime_ns() -> i128 {
    OffsetDateTime::now_utc().unix_timestamp_nanos()
}

fn main() {
    if let Some(why) = skip_reason() {
        println!("latency benchmark skipped: {why}");
        return;
    }
    let rounds = env("KTRACE_LATENCY_ROUNDS", 30);
    let conns = env("KTRACE_LATENCY_CONNS", 8);
    let mut lab = Lab::new("lat", 1);
    lab.start_server();
    let (mut child, rx) = watch(&lab);
    let (_, status) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("ktrace printed its status line");
    let counters_only = status["hooks"].as_array().is_some_and(|h| {
        h.iter()
            .any(|h| h["name"] == "ct_invalid" && h["attached"] == false)
    });

    let mut hist = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3).unwrap();
    let mut held = 0u64;
    for _ in 0..rounds {
        let mut c = lab.client(conns);
        c.unnat_all(Duration::from_millis(400));
        held += record_findings(&rx, conns, &mut hist);
    }
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let _ = child.wait();
    report(&hist, rounds, held, counters_only);
    assert!(
        hist.len() as usize >= rounds * conns / 2,
        "too few findings to measure ({} of {})",
        hist.len(),
        rounds * conns
    );
}

/// `ktrace watch --json` in the node namespace, and its lines with the time
/// each was read, stamped as soon as it arrives.
fn watch(lab: &Lab) -> (Child, mpsc::Receiver<(i128, Value)>) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &lab.node])
        .arg(ktrace_bin())
        .args(["watch", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting ktrace watch");
    let (tx, rx) = mpsc::channel::<(i128, Value)>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let at = realtime_ns();
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if tx.send((at, v)).is_err() {
                    break;
                }
            }
        }
    });
    (child, rx)
}

/// Records the latency of this round's `conns` findings (each within a few
/// seconds at worst); how many of them waited for a counter sample.
fn record_findings(
    rx: &mpsc::Receiver<(i128, Value)>,
    conns: usize,
    hist: &mut Histogram<u64>,
) -> u64 {
    let (mut got, mut held) = (0, 0);
    while got < conns {
        let Ok((at, v)) = rx.recv_timeout(Duration::from_secs(5)) else {
            break;
        };
        if v["type"] != "finding" || v["kind"] != "unnated_reply" {
            continue;
        }
        let ts = v["ts"].as_str().unwrap_or_default();
        let Ok(t) = OffsetDateTime::parse(ts, &Rfc3339) else {
            continue;
        };
        let lat = (at - t.unix_timestamp_nanos()).max(1) as u64;
        hist.record(lat.min(60_000_000_000)).unwrap();
        if v["evidence"]["basis"]
            .as_array()
            .is_some_and(|b| b.iter().any(|x| x == "ct_invalid_counter"))
        {
            held += 1;
        }
        got += 1;
    }
    held
}

fn report(hist: &Histogram<u64>, rounds: usize, held: u64, counters_only: bool) {
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1e6;
    println!(
        "detection latency (kernel event -> finding line on stdout), lab un-NATed reply: {} findings over {rounds} rounds",
        hist.len()
    );
    println!(
        "  {} of them cited a conntrack counter sample{}",
        held,
        if counters_only {
            " (this kernel: no INVALID hook, counters only)"
        } else {
            ""
        }
    );
    println!(
        "  p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms   [target p99 <= 10 ms]",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        hist.max() as f64 / 1e6
    );
}
