//! Recording and replay against the real kernel: the lab's incidents are
//! watched live with `ktrace watch --json --events --record FILE`, then
//! `ktrace replay --json --events FILE` must print the same findings (and
//! the same events). Also: kill -9 while recording, a disk that fills up
//! (a tiny tmpfs), and files that are not recordings.
//!
//! Needs root for everything but the last test; skipped (saying so)
//! otherwise. Run serially (`--test-threads=1`): kernel hooks are global.

use std::process::Command;
use std::time::Duration;

use ktrace_tests::{
    assert_replay_matches, findings, ktrace_output, replay, select, skip, Lab, Running, Scratch,
    BACKENDS, VIP,
};
use serde_json::Value;

/// Incident 2 (conntrack flushed, two backends), recorded while watched.
#[test]
fn replay_of_conntrack_flush_matches_live() {
    if skip() {
        return;
    }
    let scratch = Scratch::new("flush");
    let file = scratch.path("flush.rec");
    let mut lab = Lab::new("rf", 2);
    lab.start_server();
    let watch = lab.watch(&["--events", "--record", &file]);
    let mut c = lab.client(12);
    let reset = lab.flush_until_reset(&mut c);
    let want = reset.len();
    assert!(watch.wait_count(
        Duration::from_secs(5),
        "finding",
        Some("backend_switch"),
        want
    ));
    let status = watch.status.clone();
    let live = watch.stop();
    assert_eq!(select(&live, "finding", Some("backend_switch")).len(), want);
    assert_replay_matches(&status, &live, &file);
}

/// Incident 1 (un-NATed reply, conntrack INVALID), recorded while watched.
#[test]
fn replay_of_unnated_reply_matches_live() {
    if skip() {
        return;
    }
    let scratch = Scratch::new("unnated");
    let file = scratch.path("unnated.rec");
    let mut lab = Lab::new("ru", 1);
    lab.start_server();
    let watch = lab.watch(&["--events", "--record", &file]);
    let mut c = lab.client(3);
    assert_eq!(c.unnat_all(Duration::from_millis(1000)).len(), 3);
    assert!(watch.wait_count(Duration::from_secs(5), "finding", Some("unnated_reply"), 3));
    let status = watch.status.clone();
    let live = watch.stop();
    assert_eq!(select(&live, "finding", Some("unnated_reply")).len(), 3);
    assert_replay_matches(&status, &live, &file);
}

/// A burst of un-NATed replies: the storm (start and end) replays too, with
/// the recorded thresholds, in a rotated set of small segments.
#[test]
fn replay_of_reset_storm_matches_live_across_rotation() {
    if skip() {
        return;
    }
    let scratch = Scratch::new("storm");
    let file = scratch.path("storm.rec");
    let mut lab = Lab::new("rs", 1);
    lab.start_server();
    let watch = lab.watch(&[
        "--events",
        "--storm-threshold",
        "10",
        "--storm-window",
        "5",
        "--record",
        &file,
        "--rotate-size",
        "4K",
        "--rotate-time",
        "1",
        "--keep",
        "50",
    ]);
    let mut c = lab.client(30);
    assert_eq!(c.unnat_all(Duration::from_millis(1000)).len(), 30);
    assert!(watch.wait_count(Duration::from_secs(5), "finding", Some("rst_storm"), 1));
    std::thread::sleep(Duration::from_millis(500));
    let status = watch.status.clone();
    let live = watch.stop();
    assert!(
        std::path::Path::new(&format!("{file}.1")).exists(),
        "4K / 1 s segments rotate"
    );
    assert_replay_matches(&status, &live, &file);
    // Files given in any order replay the same.
    let mut parts: Vec<String> = (1..50)
        .map(|n| format!("{file}.{n}"))
        .filter(|p| std::path::Path::new(p).exists())
        .collect();
    parts.push(file.clone());
    parts.reverse();
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    let (_, lines, _) = replay(&refs);
    assert_eq!(findings(&lines), findings(&live));
    // --since after the storm: nothing printed before it; --until before
    // the first event: no findings at all.
    // Findings may be printed out of time order (an un-NATed reply waits
    // for the next conntrack counter sample): --since the earliest.
    let live_findings = findings(&live);
    let first = live_findings
        .iter()
        .map(|f| &f["ts"])
        .min_by_key(|t| t.as_str().unwrap().to_string())
        .unwrap();
    let (_, none, _) = replay(&["--until", "2000-01-01T00:00:00Z", &file]);
    assert!(findings(&none).is_empty());
    let (_, from, _) = replay(&["--since", first.as_str().unwrap(), &file]);
    assert_eq!(
        findings(&from),
        findings(&live),
        "findings at or after --since"
    );
}

/// Normal traffic: nothing found live, nothing found in replay.
#[test]
fn replay_of_control_run_finds_nothing() {
    if skip() {
        return;
    }
    let scratch = Scratch::new("control");
    let file = scratch.path("control.rec");
    let mut lab = Lab::new("rc", 2);
    lab.start_server();
    let watch = lab.watch(&["--events", "--every-reset", "--record", &file]);
    let mut c = lab.client(10);
    assert!(c.send_all().is_empty());
    c.cmd("close");
    assert_eq!(lab.refuse("10.0.1.2", 2224, 10), 10);
    assert!(watch.wait_count(Duration::from_secs(5), "event", Some("tcp_send_reset"), 10));
    let status = watch.status.clone();
    let live = watch.stop();
    assert!(findings(&live).is_empty());
    assert_replay_matches(&status, &live, &file);
}

/// kill -9 while recording: every block written before is read, findings
/// included; a torn last block is a warning, exit 0.
#[test]
fn kill_9_mid_recording_then_replay() {
    if skip() {
        return;
    }
    let scratch = Scratch::new("kill9");
    let file = scratch.path("k.rec");
    let mut lab = Lab::new("rk", 1);
    lab.start_server();
    let rec = Running::start(&lab.node, &["record", "--json", "--output", &file]);
    let mut c = lab.client(3);
    assert_eq!(c.unnat_all(Duration::from_millis(1000)).len(), 3);
    // Blocks with events reach the file within a second.
    std::thread::sleep(Duration::from_millis(2000));
    rec.kill9();
    let (_, lines, stderr) = replay(&["--events", &file]);
    let unnated: Vec<&Value> = select(&lines, "finding", Some("unnated_reply"));
    assert_eq!(unnated.len(), 3, "{lines:?}\n{stderr}");
    for f in unnated {
        assert_eq!(f["service"], format!("{VIP}:2222"));
        assert_eq!(f["backend"], format!("{}:2222", BACKENDS[0]));
    }

    // Tear the last block as a crash mid-write would: exit 0, a warning,
    // and everything before the torn block.
    let bytes = std::fs::read(&file).unwrap();
    let torn = scratch.path("torn.rec");
    std::fs::write(&torn, &bytes[..bytes.len() - 7]).unwrap();
    let (_, torn_lines, torn_err) = replay(&["--events", &torn]);
    assert!(
        torn_err.contains("warning") && torn_err.contains("torn tail"),
        "{torn_err}"
    );
    assert_eq!(torn_err.lines().count(), 1, "one warning line: {torn_err}");
    let n = select(&torn_lines, "event", None).len();
    assert!(n <= select(&lines, "event", None).len());
    assert_eq!(
        select(&torn_lines, "event", None),
        select(&lines, "event", None)[..n].to_vec(),
        "the torn file replays a prefix of the whole"
    );

    // A corrupt block in the middle: skipped with a warning, the rest read.
    let mut damaged = bytes.clone();
    let header_end = 20 + u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let mid = header_end + 30;
    for b in &mut damaged[mid..mid + 16] {
        *b ^= 0x5a;
    }
    let bad = scratch.path("bad.rec");
    std::fs::write(&bad, &damaged).unwrap();
    let (_, _, bad_err) = replay(&[&bad]);
    assert!(
        bad_err.contains("skipped") && bad_err.contains("bytes"),
        "{bad_err}"
    );
}

/// Mounts a 2 MiB tmpfs on the scratch directory and fills it but for
/// 12 KiB: room for a recording's header and a few blocks. Returns the
/// filler, whose removal gives the space back.
fn nearly_full_tmpfs(scratch: &Scratch) -> String {
    use std::io::Write;
    let dir = scratch.dir.display().to_string();
    let mount = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs", &dir])
        .status()
        .unwrap();
    assert!(mount.success(), "mounting a tmpfs on {dir}");
    let filler = scratch.path("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0xa5u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.flush();
    let len = std::fs::metadata(&filler).unwrap().len();
    f.set_len(len.saturating_sub(12 << 10)).unwrap();
    filler
}

/// Refused connections to `port`, `count` at a time, until the recorder
/// prints a lost line whose source says `word` (at most `bursts` times).
fn refuse_until_lost_says(
    lab: &Lab,
    rec: &Running,
    (port, count, bursts): (u16, usize, usize),
    word: &str,
) -> bool {
    (0..bursts).any(|_| {
        lab.refuse(BACKENDS[0], port, count);
        rec.wait_for(Duration::from_secs(2), |l, _| {
            select(l, "lost", None)
                .iter()
                .any(|v| v["source"].as_str().unwrap_or("").contains(word))
        })
    })
}

/// Disk full: recording keeps running, says so once on stderr and in a
/// lost line, counts what it drops, and resumes when space returns.
#[test]
fn disk_full_pauses_and_resumes() {
    if skip() {
        return;
    }
    let scratch = Scratch::new("enospc");
    let filler = nearly_full_tmpfs(&scratch);
    let file = scratch.path("full.rec");
    let mut lab = Lab::new("rd", 1);
    lab.start_server();
    // Plenty of events: refused connections, every one recorded (none
    // summarised in the kernel), in bursts until the disk is full.
    let rec = Running::start(
        &lab.node,
        &["record", "--json", "--every-reset", "--output", &file],
    );
    let paused = refuse_until_lost_says(&lab, &rec, (2224, 300, 20), "paused");
    assert!(
        paused,
        "the disk never filled: {:?}\n{}",
        rec.lines(),
        rec.stderr()
    );
    // Still running, still counting.
    lab.refuse(BACKENDS[0], 2224, 100);
    std::fs::remove_file(&filler).unwrap();
    // Space is back: the next blocks go through.
    let resumed = refuse_until_lost_says(&lab, &rec, (2225, 20, 10), "resumed");
    assert!(
        resumed,
        "never resumed: {:?}\n{}",
        rec.lines(),
        rec.stderr()
    );
    lab.refuse(BACKENDS[0], 2226, 5);
    std::thread::sleep(Duration::from_millis(1500));
    let (lines, stderr) = rec.stop();
    assert_eq!(
        stderr.matches("disk full writing").count(),
        1,
        "said once: {stderr}"
    );
    let summary = select(&lines, "recording", None);
    let dropped = summary[0]["dropped"].as_u64().unwrap();
    assert!(dropped > 0, "{summary:?}");
    replay_says_what_disk_full_dropped(&file, dropped);
}

/// The recording of [`disk_full_pauses_and_resumes`] replays without torn
/// data, counts the `dropped` events as lost, and holds the events after
/// space returned.
fn replay_says_what_disk_full_dropped(file: &str, dropped: u64) {
    let (_, replayed, warnings) = replay(&["--events", file]);
    assert!(
        !warnings.contains("warning"),
        "the file holds no torn data: {warnings}"
    );
    let not_recorded: u64 = select(&replayed, "lost", None)
        .iter()
        .filter(|v| v["source"].as_str().unwrap_or("").contains("disk full"))
        .map(|v| v["count"].as_u64().unwrap())
        .sum();
    assert_eq!(
        not_recorded, dropped,
        "the recording says how much is missing"
    );
    let after = select(&replayed, "event", None)
        .into_iter()
        .filter(|e| e["event"] == "tcp_send_reset" && e["src"] == format!("{}:2226", BACKENDS[0]))
        .count();
    assert_eq!(after, 5, "events after space returned are recorded");
}

/// Not a recording, or a newer format: one clear line, exit 1. No root needed.
#[test]
fn replay_refuses_what_it_cannot_read() {
    let scratch = Scratch::new("refuse");
    let text = scratch.path("notes.txt");
    std::fs::write(&text, "hello\n").unwrap();
    let out = ktrace_output(&["replay", &text]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is not a ktrace recording") && err.lines().count() == 1,
        "{err}"
    );

    let newer = scratch.path("newer.rec");
    let mut b = b"\x89KTR\r\n\x1a\n".to_vec();
    b.extend_from_slice(&[9, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
    b.extend_from_slice(b"{}");
    std::fs::write(&newer, &b).unwrap();
    let out = ktrace_output(&["replay", &newer]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("newer ktrace"), "{err}");

    let out = ktrace_output(&["replay", &scratch.path("missing.rec")]);
    assert_eq!(out.status.code(), Some(1));
    let out = ktrace_output(&["replay"]);
    assert_eq!(out.status.code(), Some(2), "usage error");
}

/// Writes the golden recording `ktrace-user/tests/fixtures/replay/` holds
/// (`KTRACE_GOLDEN_DIR=dir`, root, `--ignored`): every incident of the lab
/// in one small file, recorded by `watch`. Never run by the test suite: the
/// fixture is written once by a released version so that the reader of a
/// later one is checked against it (`ktrace-user/tests/golden_replay.rs`).
#[test]
#[ignore]
fn write_golden_recording() {
    let Ok(dir) = std::env::var("KTRACE_GOLDEN_DIR") else {
        eprintln!("SKIPPED: KTRACE_GOLDEN_DIR is not set");
        return;
    };
    if skip() {
        return;
    }
    let file = format!("{dir}/lab.rec");
    let _ = std::fs::remove_file(&file);
    let mut lab = Lab::new("gd", 2);
    lab.start_server();
    let watch = lab.watch(&[
        "--events",
        "--storm-threshold",
        "4",
        "--storm-window",
        "5",
        "--record",
        &file,
    ]);
    // Incident 2: conntrack flushed, connections re-mapped and reset.
    lab.flush_until_reset(&mut lab.client(4));
    // Incident 1 (and a storm of it): un-NATed replies.
    lab.set_backends(1);
    let mut c = lab.client(5);
    c.unnat_all(Duration::from_millis(1000));
    // Unrelated resets: nothing listens.
    lab.refuse(BACKENDS[0], 2224, 2);
    std::thread::sleep(Duration::from_millis(1500));
    let lines = watch.stop();
    for kind in ["backend_switch", "unnated_reply", "rst_storm"] {
        assert!(
            !select(&lines, "finding", Some(kind)).is_empty(),
            "no {kind} finding: {lines:?}"
        );
    }
}
