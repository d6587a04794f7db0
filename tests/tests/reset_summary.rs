//! Resets that can never be an incident are counted in the kernel beyond a
//! per-CPU sample (`resets_summarised`), with the real kernel in network
//! namespaces: the totals stay exact against the kernel's own TcpOutRsts,
//! the detail stays bounded, and an incident is still found while a storm
//! of refused connections is being summarised. Needs root; skipped
//! (saying so) otherwise. Run serially (`--test-threads=1`).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ktrace_tests::{backend, between, client, hook, record_skip, select, skip, Lab, BACKENDS};
use serde_json::Value;

/// Sample of each CPU per window (`ktrace_common::ResetSummary::DEFAULT`).
const SAMPLE: u64 = 32;
const WINDOW_MS: u64 = 100;

/// `TcpOutRsts` of namespace `ns` (`/proc/net/snmp`: a header line, then values).
fn out_rsts(lab: &Lab, ns: &str) -> u64 {
    let out = lab.exec_ok(ns, &["cat", "/proc/net/snmp"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let tcp: Vec<&str> = text.lines().filter(|l| l.starts_with("Tcp:")).collect();
    let names: Vec<&str> = tcp[0].split_whitespace().collect();
    let values: Vec<&str> = tcp[1].split_whitespace().collect();
    let at = names.iter().position(|n| *n == "OutRsts").unwrap();
    values[at].parse().unwrap()
}

/// Resets ktrace reported in namespace `inode`: one by one, and counted.
fn reported(lines: &[Value], inode: u64) -> (u64, u64) {
    let detailed = select(lines, "event", Some("tcp_send_reset"))
        .iter()
        .filter(|e| e["netns"] == inode)
        .count() as u64;
    let summarised = select(lines, "event", Some("resets_summarised"))
        .iter()
        .filter(|e| e["netns"] == inode)
        .map(|e| {
            assert_eq!(
                e["count"].as_u64().unwrap(),
                e["refused"].as_u64().unwrap() + e["socket"].as_u64().unwrap(),
                "{e}"
            );
            e["count"].as_u64().unwrap()
        })
        .sum();
    (detailed, summarised)
}

fn ring_losses(lines: &[Value]) -> u64 {
    select(lines, "lost", None)
        .iter()
        .map(|l| l["count"].as_u64().unwrap_or(0))
        .sum()
}

/// A burst of refused connections: every reset the backend's namespace
/// sent is either an event or in a summary, exactly, and the events are
/// no more than the sample allows over the burst's duration.
#[test]
fn refused_burst_is_counted_exactly_with_bounded_detail() {
    if skip() {
        return;
    }
    let lab = Lab::new("sb", 1);
    let watch = lab.watch(&["--events"]);
    let summary = hook(&watch.status, "reset_summary");
    assert_eq!(summary["attached"], true, "{summary}");
    assert_eq!(summary["mechanism"], "bpf_map");
    let server_ns = lab.inode(&lab.server);
    let before = out_rsts(&lab, &lab.server);
    let start = Instant::now();
    // Nothing listens on this port of the backend: every attempt is refused
    // by the server namespace's kernel, answering a bare SYN.
    let refused = lab.refuse(BACKENDS[0], 2224, 3000);
    let elapsed = start.elapsed();
    assert_eq!(refused, 3000);
    let sent = out_rsts(&lab, &lab.server) - before;
    assert!(sent >= 3000, "the kernel sent {sent} resets");
    // The summary comes at the next tick (200 ms) and at exit.
    std::thread::sleep(Duration::from_millis(500));
    let lines = watch.stop();
    assert_eq!(ring_losses(&lines), 0, "{:?}", select(&lines, "lost", None));

    let (detailed, summarised) = reported(&lines, server_ns);
    assert_eq!(
        detailed + summarised,
        sent,
        "events ({detailed}) + summarised ({summarised}) = the kernel's TcpOutRsts"
    );
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let windows = elapsed.as_millis() as u64 / WINDOW_MS + 2;
    assert!(
        detailed <= SAMPLE * cpus * windows,
        "{detailed} events in {elapsed:?} on {cpus} CPUs: more than the sample"
    );
    assert!(
        summarised > 0,
        "3000 refusals in {elapsed:?} and nothing summarised"
    );
    // Every one of them a refusal: nothing with a socket.
    for e in select(&lines, "event", Some("resets_summarised")) {
        if e["netns"] == server_ns {
            assert_eq!(e["socket"], 0, "{e}");
        }
    }
    // The sample still shows who was refused.
    let sample = select(&lines, "event", Some("tcp_send_reset"))
        .into_iter()
        .filter(|e| e["netns"] == server_ns)
        .collect::<Vec<_>>();
    assert!(!sample.is_empty());
    for e in sample {
        assert_eq!(e["src"], format!("{}:2224", BACKENDS[0]), "{e}");
        assert_eq!(e["answers"], "SYN", "{e}");
    }
    assert!(select(&lines, "finding", None).is_empty());
}

/// `--every-reset`: nothing summarised, every reset an event, and the
/// status line says so.
#[test]
fn every_reset_sends_them_all() {
    if skip() {
        return;
    }
    let lab = Lab::new("se", 1);
    let watch = lab.watch(&["--events", "--every-reset"]);
    let summary = hook(&watch.status, "reset_summary");
    assert_eq!(summary["attached"], false, "{summary}");
    assert!(summary["reason"]
        .as_str()
        .unwrap()
        .contains("--every-reset"));
    let server_ns = lab.inode(&lab.server);
    let before = out_rsts(&lab, &lab.server);
    assert_eq!(lab.refuse(BACKENDS[0], 2224, 1000), 1000);
    let sent = out_rsts(&lab, &lab.server) - before;
    std::thread::sleep(Duration::from_millis(500));
    let lines = watch.stop();
    assert_eq!(ring_losses(&lines), 0);
    assert_eq!(reported(&lines, server_ns), (sent, 0));
}

/// A SYN flood to a closed port on the client's loopback, while the
/// backend's replies go out un-NATed: each broken connection's reset (no
/// socket, answering an ACK) is still sent in full and found, while the
/// flood's refusals on the same CPUs are summarised.
#[test]
fn unnated_reply_is_found_during_a_refusal_storm() {
    if skip() {
        return;
    }
    if Command::new("hping3").arg("--version").output().is_err() {
        record_skip("hping3 is not installed (scripts/setup.sh installs it)");
        return;
    }
    let mut lab = Lab::new("ss", 1);
    lab.start_server();
    let watch = lab.watch(&["--events"]);
    let client_ns = lab.inode(&lab.client);
    let mut c = lab.client(3);
    let mut flood = Flood::start(&lab.client);
    std::thread::sleep(Duration::from_millis(500));
    let reset = c.unnat_all(Duration::from_millis(1000));
    assert_eq!(reset.len(), 3, "every connection dies: {reset:?}");
    let found = watch.wait_count(Duration::from_secs(5), "finding", Some("unnated_reply"), 3);
    flood.stop();
    std::thread::sleep(Duration::from_millis(500));
    let lines = watch.stop();
    assert!(found, "{:?}", select(&lines, "finding", None));

    let storm: u64 = select(&lines, "event", Some("resets_summarised"))
        .iter()
        .filter(|e| e["netns"] == client_ns)
        .map(|e| e["refused"].as_u64().unwrap())
        .sum();
    assert!(storm > 1000, "the flood was summarised: {storm}");
    for p in &c.ports {
        let sent = between(&lines, "tcp_send_reset", &client(*p), &backend());
        assert_eq!(sent.len(), 1, "port {p}: {sent:?}");
        assert_eq!(sent[0]["socket"], false);
        let f: Vec<&Value> = select(&lines, "finding", Some("unnated_reply"))
            .into_iter()
            .filter(|f| f["client"] == client(*p))
            .collect();
        assert_eq!(f.len(), 1, "one finding per broken connection: {f:?}");
        assert_eq!(f[0]["backend"], backend().as_str());
    }
}

/// A refused connection's reset (no socket) belongs to the namespace of
/// the device the refused segment arrived on, read at each reset. Pods
/// come and go: a device moved to another namespace keeps its address
/// (`ip link set ... netns`, how CNI plugins place a pod's end of a veth
/// pair), and a deleted pod's device is freed and its memory reused for
/// the next pod's. A program remembering a namespace by device pointer
/// attributes the moved device's resets to the namespace it left: the
/// first move below is deterministic for that (same device, new
/// namespace). The second round frees the device and makes a new one in
/// a third namespace, which reuses the freed memory when the allocator
/// hands it back (likely, not certain: the address is not visible here).
/// Every round's resets, sampled and summarised, must count in their own
/// namespace, exactly.
#[test]
fn resets_follow_their_device_across_namespaces() {
    if skip() {
        return;
    }
    let lab = Lab::new("sn", 1);
    let moved = Namespaces::new(&["m1", "m2"]);
    let watch = lab.watch(&["--events"]);
    let mut sent = Vec::new();
    let mut round = |ns: &str| {
        let before = out_rsts(&lab, ns);
        assert_eq!(lab.refuse(BACKENDS[0], 2224, 1000), 1000, "refused in {ns}");
        sent.push((lab.inode(ns), out_rsts(&lab, ns) - before));
    };
    round(&lab.server);
    // The same device, moved: its addresses and routes stay behind.
    lab.exec_ok(
        &lab.server,
        &["ip", "link", "set", "veth-s", "netns", &moved.0[0]],
    );
    serve_backend(&lab, &moved.0[0]);
    round(&moved.0[0]);
    // A new pair, its backend end in a new namespace, created right after
    // the old pair is freed (the first namespace stays, so its inode
    // cannot be handed to the second).
    lab.exec_ok(&lab.node, &["ip", "link", "del", "veth-ns"]);
    let peer = ["peer", "name", "veth-s", "netns", &moved.0[1]];
    let mut add = vec!["ip", "link", "add", "veth-ns", "type", "veth"];
    add.extend(peer);
    lab.exec_ok(&lab.node, &add);
    lab.exec_ok(
        &lab.node,
        &["ip", "addr", "add", "10.0.1.1/24", "dev", "veth-ns"],
    );
    lab.exec_ok(&lab.node, &["ip", "link", "set", "veth-ns", "up"]);
    serve_backend(&lab, &moved.0[1]);
    round(&moved.0[1]);
    std::thread::sleep(Duration::from_millis(500));
    let lines = watch.stop();
    assert_eq!(ring_losses(&lines), 0);
    for (inode, n) in sent {
        let (detailed, summarised) = reported(&lines, inode);
        assert!(n >= 1000, "namespace {inode} sent {n} resets");
        assert_eq!(
            (detailed + summarised, detailed > 0),
            (n, true),
            "namespace {inode}: events ({detailed}) + summarised ({summarised}) against its \
             TcpOutRsts ({n})"
        );
    }
}

/// Gives `veth-s`, now in `ns`, the first backend's address and route.
fn serve_backend(lab: &Lab, ns: &str) {
    let addr = format!("{}/24", BACKENDS[0]);
    lab.exec_ok(ns, &["ip", "link", "set", "lo", "up"]);
    lab.exec_ok(ns, &["ip", "addr", "add", &addr, "dev", "veth-s"]);
    lab.exec_ok(ns, &["ip", "link", "set", "veth-s", "up"]);
    lab.exec_ok(ns, &["ip", "route", "add", "default", "via", "10.0.1.1"]);
}

/// Extra network namespaces, named per process, deleted on drop.
struct Namespaces(Vec<String>);

impl Namespaces {
    fn new(tags: &[&str]) -> Namespaces {
        let names: Vec<String> = tags
            .iter()
            .map(|t| format!("ktr-{t}{}", std::process::id() % 100_000))
            .collect();
        for ns in &names {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            let ok = Command::new("ip").args(["netns", "add", ns]).status();
            assert!(ok.is_ok_and(|s| s.success()), "ip netns add {ns}");
        }
        Namespaces(names)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// hping3 SYNs at 20 k/s to a port nothing listens on, on the loopback of
/// namespace `ns`: the kernel of that namespace refuses each.
struct Flood(Child);

impl Flood {
    fn start(ns: &str) -> Flood {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "hping3", "-q", "-S", "-p", "9"])
            .args(["-i", "u50", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting hping3");
        Flood(child)
    }

    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop();
    }
}
