//! The container image of `cargo xtask image` (an OCI archive, `$KTRACE_IMAGE`)
//! loaded into Debian's podman and run with runc on this machine's kernel:
//! `ktrace doctor --json` and `ktrace watch --duration 2 --json`, privileged
//! with the host network and PIDs (as `kubectl debug node` runs it), then `watch`
//! again with only the DaemonSet's capabilities (BPF, PERFMON, NET_ADMIN,
//! SYS_RESOURCE), a read-only root and the DaemonSet's mounts, answering
//! /healthz. The image has ktrace alone: no shell.
//!
//! `cargo xtask test` builds the image and sets KTRACE_IMAGE; a plain
//! `cargo test` skips, saying so. Needs root.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use ktrace_tests::{hook, json_lines, record_skip};
use serde_json::Value;

fn archive() -> Option<String> {
    if unsafe { libc::geteuid() } != 0 {
        record_skip("needs root (podman with the host network, eBPF)");
        return None;
    }
    match std::env::var("KTRACE_IMAGE") {
        Ok(p) => Some(p),
        Err(_) => {
            record_skip(
                "KTRACE_IMAGE is not set (`cargo xtask test` builds the image and sets it)",
            );
            None
        }
    }
}

/// The DaemonSet's tracefs mount.
const TRACEFS: &str = "/sys/kernel/tracing:/sys/kernel/tracing:ro";

fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(args)
        .output()
        .expect("podman is not installed (scripts/setup.sh installs podman and runc)")
}

/// `podman load`s the archive; returns the image name it holds.
fn load(archive: &str) -> String {
    let out = podman(&["load", "--quiet", "--input", archive]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "podman load {archive}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find_map(|l| {
            l.strip_prefix("Loaded image: ")
                .or(l.strip_prefix("Loaded image(s): "))
        })
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| panic!("podman load printed no image name: {text}"))
}

/// `podman run` with runc (Debian's default crun fails on this machine's
/// cgroup setup) and the limits that runc needs spelled out.
fn run(extra: &[&str], image: &str, args: &[&str]) -> Output {
    let mut a = vec![
        "--runtime",
        "runc",
        "run",
        "--rm",
        "--network",
        "host",
        "--ulimit",
        "nofile=1024:4096",
        "--ulimit",
        "nproc=1024:1024",
    ];
    a.extend_from_slice(extra);
    a.push(image);
    a.extend_from_slice(args);
    podman(&a)
}

fn check_watch(out: &Output, what: &str) -> Value {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what}: {}; stderr: {stderr}",
        out.status
    );
    let lines = json_lines(&out.stdout);
    let status = lines
        .first()
        .unwrap_or_else(|| panic!("{what}: no output; stderr: {stderr}"));
    assert_eq!(status["type"], "status", "{what}");
    // The tracepoints every kernel of this machine's kind has, live in the container.
    for h in ["tcp_send_reset", "tcp_receive_reset"] {
        assert_eq!(hook(status, h)["attached"], true, "{what}: {h}: {status}");
    }
    // ctnetlink needs CAP_NET_ADMIN in the host's network namespace.
    assert_eq!(
        hook(status, "nat_mapping")["attached"],
        true,
        "{what}: {status}"
    );
    status.clone()
}

#[test]
fn the_image_runs_doctor_and_watch_in_podman() {
    let Some(archive) = archive() else { return };
    let image = load(&archive);
    let size = podman(&["image", "inspect", "--format", "{{.Size}}", &image]);
    eprintln!(
        "image {image}: {} bytes ({} bytes as an OCI archive)",
        String::from_utf8_lossy(&size.stdout).trim(),
        std::fs::metadata(&archive).unwrap().len()
    );
    // No shell in the image: ktrace is the entrypoint and the only file.
    let shell = run(&["--entrypoint", "/bin/sh"], &image, &["-c", "true"]);
    assert!(!shell.status.success(), "the image has a shell");

    let doctor = run(
        &["--privileged", "--volume", TRACEFS],
        &image,
        &["doctor", "--json"],
    );
    let stderr = String::from_utf8_lossy(&doctor.stderr);
    // 0: all ok; 1: a check failed on this node (a verdict, not an error).
    assert!(
        matches!(doctor.status.code(), Some(0 | 1)),
        "doctor: {stderr}"
    );
    let checks = json_lines(&doctor.stdout);
    assert!(
        checks.len() > 5,
        "doctor printed {checks:?}; stderr: {stderr}"
    );
    assert!(checks.iter().all(|c| c["type"] == "check"));
    let btf = checks
        .iter()
        .find(|c| c["check"] == "hooks_btf")
        .expect("hooks_btf");
    assert_eq!(btf["status"], "ok", "{btf}");
    let tp = checks
        .iter()
        .find(|c| c["check"] == "hooks_tracepoints")
        .expect("hooks_tracepoints");
    assert_eq!(tp["status"], "ok", "{tp}");

    // As `kubectl debug node/... --profile=sysadmin` runs it: privileged,
    // the host's network and PID namespaces, nothing mounted for it.
    let watch = run(
        &["--privileged", "--pid", "host"],
        &image,
        &["watch", "--duration", "2", "--json"],
    );
    check_watch(&watch, "privileged watch");
}

#[test]
fn the_image_runs_with_the_daemonsets_capabilities_only() {
    let Some(archive) = archive() else { return };
    let image = load(&archive);
    // A port of the host network nothing else uses now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let caps = [
        "--cap-drop",
        "ALL",
        "--cap-add",
        "BPF,PERFMON,NET_ADMIN,SYS_RESOURCE",
        "--read-only",
        "--security-opt",
        "no-new-privileges",
        // As the DaemonSet: podman's default seccomp profile allows bpf()
        // only with CAP_SYS_ADMIN.
        "--security-opt",
        "seccomp=unconfined",
        "--volume",
        "/sys/kernel/btf:/sys/kernel/btf:ro",
        "--volume",
        TRACEFS,
    ];
    let child = std::thread::spawn({
        let image = image.clone();
        let addr = addr.clone();
        move || {
            run(
                &caps,
                &image,
                &[
                    "watch",
                    "--duration",
                    "10",
                    "--json",
                    "--metrics-addr",
                    &addr,
                ],
            )
        }
    });
    // /healthz answers 200 once the hooks are attached and the ring drained.
    let t = Instant::now();
    let mut health = String::new();
    while t.elapsed() < Duration::from_secs(20) && !health.starts_with("HTTP/1.1 200") {
        std::thread::sleep(Duration::from_millis(200));
        health = get(&addr, "/healthz").unwrap_or_default();
    }
    let metrics = get(&addr, "/metrics").unwrap_or_default();
    let out = child.join().unwrap();
    check_watch(
        &out,
        "watch with CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_RESOURCE",
    );
    assert!(health.starts_with("HTTP/1.1 200"), "/healthz: {health}");
    assert!(health.contains("hooks attached"), "{health}");
    assert!(metrics.contains("ktrace_hook_attached{"), "{metrics}");
}

/// A plain HTTP/1.1 GET (the whole response, headers included).
fn get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}
