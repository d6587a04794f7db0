//! `ktrace demo` against the real kernel: it must name both incidents it
//! plays (with their Service, backend and client), finish within 30 s, and
//! leave no namespace, iptables rule or conntrack entry behind, also when
//! interrupted with SIGINT mid-run.
//!
//! Needs root; skipped (saying so) otherwise. Run serially: hooks are global.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ktrace_tests::{json_lines, ktrace_bin, select, skip};
use serde_json::Value;

fn output(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What the demo of process `pid` could have left on the host.
fn leftovers(pid: u32, service_ip: Option<&str>) -> Vec<String> {
    let prefix = format!("ktd-{pid}-");
    let mut left: Vec<String> = output(&["ip", "netns", "list"])
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(|l| format!("namespace {l}"))
        .collect();
    if let Some(ip) = service_ip {
        for (what, text) in [
            ("iptables rule", output(&["iptables-save"])),
            ("conntrack entry", output(&["conntrack", "-L"])),
        ] {
            left.extend(
                text.lines()
                    .filter(|l| l.contains(ip))
                    .map(|l| format!("{what}: {l}")),
            );
        }
    }
    left
}

fn start_demo() -> Child {
    Command::new(ktrace_bin())
        .args(["demo", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting ktrace demo")
}

#[test]
fn demo_names_both_incidents_and_leaves_nothing() {
    if skip() {
        return;
    }
    let start = Instant::now();
    let child = start_demo();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed: {stderr}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    let lines = json_lines(&out.stdout);
    assert_eq!(lines[0]["type"], "status", "{}", lines[0]);

    let findings = select(&lines, "finding", None);
    let of = |kind: &str| -> Vec<&Value> {
        findings
            .iter()
            .copied()
            .filter(|f| f["kind"] == kind)
            .collect()
    };
    let (unnat, switch) = (of("unnated_reply"), of("backend_switch"));
    assert_eq!(unnat.len(), 1, "{findings:?}");
    assert_eq!(switch.len(), 1, "{findings:?}");
    assert_eq!(
        findings.len(),
        2,
        "only the demo's own findings: {findings:?}"
    );

    // The demo's addresses: 10.96.B.10 for the Service, 10.B.0.2 the
    // client, 10.B.1.2 and 10.B.1.3 the backends.
    let service = unnat[0]["service"].as_str().unwrap();
    let b: u8 = service.split('.').nth(2).unwrap().parse().unwrap();
    assert_eq!(service, format!("10.96.{b}.10:2222"));
    let backends = [format!("10.{b}.1.2:2222"), format!("10.{b}.1.3:2222")];
    for f in [unnat[0], switch[0]] {
        assert_eq!(f["service"], service, "{f}");
        assert!(
            f["client"]
                .as_str()
                .is_some_and(|c| c.starts_with(&format!("10.{b}.0.2:"))),
            "{f}"
        );
        assert!(
            backends.contains(&f["backend"].as_str().unwrap().to_string()),
            "{f}"
        );
    }
    // Round-robin DNAT: the first connection goes to the first backend, the
    // second to the other, and after the flush back to the first.
    assert_eq!(unnat[0]["backend"], backends[0].as_str());
    assert_eq!(switch[0]["backend"], backends[0].as_str());
    assert_eq!(switch[0]["evidence"]["old_backend"], backends[1].as_str());
    assert_ne!(unnat[0]["client"], switch[0]["client"]);

    let ip = format!("10.96.{b}.10");
    assert_eq!(leftovers(pid, Some(&ip)), Vec::<String>::new());
}

/// Waits for a stderr line containing `marker`, then SIGINT: the demo must
/// stop, exit 130 and delete everything it made.
fn interrupt_at(marker: &str) {
    let mut child = start_demo();
    let pid = child.id();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut line = String::new();
    while Instant::now() < deadline {
        line.clear();
        if err.read_line(&mut line).unwrap() == 0 {
            break;
        }
        seen.push_str(&line);
        if line.contains(marker) {
            break;
        }
    }
    assert!(seen.contains(marker), "never saw {marker:?}: {seen}");
    let _ = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{seen}{rest}");
    assert!(rest.contains("namespaces deleted"), "{seen}{rest}");
    let ip = seen
        .split("Service ")
        .nth(1)
        .and_then(|s| s.split(':').next())
        .map(str::to_string);
    assert!(ip.is_some(), "{seen}");
    assert_eq!(leftovers(pid, ip.as_deref()), Vec::<String>::new());
}

#[test]
fn demo_interrupted_mid_run_leaves_nothing() {
    if skip() {
        return;
    }
    // Namespaces built, hooks attaching; then an incident under way.
    interrupt_at("namespaces ktd-");
    interrupt_at("incident 1");
}
