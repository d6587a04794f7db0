//! The golden recording: `tests/fixtures/replay/lab.rec` was written once by
//! ktrace 0.1.0 (commit 3cfd6ef, `ktrace watch --events --record` over the
//! integration lab: a conntrack flush with two backends, five un-NATed
//! replies making a reset storm, two refused connections; the test that
//! wrote it is `write_golden_recording` in `tests/tests/recording.rs`).
//! It holds every event kind that lab gives on a kernel without kprobes or
//! IPVS: tcp_send_reset, tcp_receive_reset, nat_mapping, nat_destroy,
//! ct_counters, and the backend_switch, unnated_reply and rst_storm findings.
//!
//! Replaying it must print, byte for byte, what 0.1.0 printed (the `.jsonl`
//! and `.txt` files next to it). The test never rewrites the fixture: when
//! the format or the output changes on purpose, the expected files are
//! updated by hand in the same commit and the change is said in its message.
//!
//! The only thing normalised is the version of the replaying binary (the
//! status line's `version` and the human header), which is not recorded.

use std::path::PathBuf;
use std::process::Command;

/// The version that wrote the expected output.
const FIXTURE_VERSION: &str = "0.1.0";

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/replay")
}

/// `ktrace replay ARGS lab.rec` in the fixture directory (so the file name
/// in the status line is the same wherever the tree is).
fn replay(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ktrace"))
        .arg("replay")
        .args(args)
        .arg("lab.rec")
        .current_dir(fixtures())
        .output()
        .expect("running ktrace replay");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "replay {args:?} failed: {stderr}");
    assert!(
        stderr.is_empty(),
        "the golden file replays silently: {stderr}"
    );
    let version = env!("CARGO_PKG_VERSION");
    String::from_utf8(out.stdout)
        .expect("UTF-8 output")
        .replacen(
            &format!("\"version\":\"{version}\""),
            &format!("\"version\":\"{FIXTURE_VERSION}\""),
            1,
        )
        .replacen(
            &format!("ktrace {version} on kernel"),
            &format!("ktrace {FIXTURE_VERSION} on kernel"),
            1,
        )
}

fn expected(name: &str) -> String {
    std::fs::read_to_string(fixtures().join(name)).expect("reading the expected output")
}

/// Compares line by line first, so a failure names the first line that differs.
fn assert_same(actual: &str, expected: &str, what: &str) {
    for (n, (a, e)) in actual.lines().zip(expected.lines()).enumerate() {
        assert_eq!(a, e, "{what}: line {} differs", n + 1);
    }
    assert_eq!(actual, expected, "{what}: the whole output");
}

#[test]
fn golden_recording_replays_to_the_same_json_with_events() {
    assert_same(
        &replay(&["--json", "--events"]),
        &expected("lab.events.jsonl"),
        "replay --json --events",
    );
}

#[test]
fn golden_recording_replays_to_the_same_json() {
    assert_same(
        &replay(&["--json"]),
        &expected("lab.jsonl"),
        "replay --json",
    );
}

#[test]
fn golden_recording_replays_to_the_same_human_output() {
    assert_same(
        &replay(&["--events"]),
        &expected("lab.events.txt"),
        "replay --events",
    );
}
