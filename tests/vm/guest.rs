//! The stock-kernel tests: run by `cargo xtask vmtest` inside a QEMU guest
//! booted with a distribution kernel (Debian's 6.1: kprobes, module BTF,
//! IPVS), where hooks that this machine's kernel lacks can attach. They
//! skip, saying so, wherever `KTRACE_VMTEST` is unset.
//!
//! Same lab as tests/tests/incidents.rs (tests/src/lib.rs): namespaces the
//! test creates, `ktrace watch --json` in the node namespace. Run serially.

use std::collections::BTreeSet;
use std::time::Duration;

use ktrace_tests::{
    backend, backends, between, client, hook, select, vip, workspace, Lab, BACKENDS, CLIENT_IP,
    PORT, VIP,
};
use serde_json::Value;

/// True inside the vmtest guest; elsewhere prints why the test is skipped.
fn in_vm() -> bool {
    if std::env::var_os("KTRACE_VMTEST").is_none() {
        ktrace_tests::record_skip(
            "runs inside the `cargo xtask vmtest` guest (KTRACE_VMTEST unset)",
        );
        return false;
    }
    if let Some(why) = ktrace_tests::skip_reason() {
        panic!("the vmtest guest cannot run the lab: {why}");
    }
    true
}

fn has_tracepoint_field(event: &str, field: &str) -> bool {
    std::fs::read_to_string(format!("/sys/kernel/tracing/events/tcp/{event}/format"))
        .is_ok_and(|f| f.contains(&format!(" {field};")))
}

/// Every hook is live, each by the mechanism this kernel needs.
fn check_all_hooks(status: &Value) {
    let want = [
        ("tcp_send_reset", None),
        ("tcp_receive_reset", Some("tracepoint")),
        ("ct_invalid", Some("kretprobe")),
        ("ct_invalid_reason", Some("kprobe")),
        ("ct_table_full", Some("kretprobe")),
        ("nat_mapping", Some("kretprobe")),
        ("ipvs_conn_new", Some("kretprobe")),
        ("ct_insert_race", Some("kretprobe")),
    ];
    for (name, mechanism) in want {
        let h = hook(status, name);
        assert_eq!(h["attached"], true, "hook {name} is not live: {h}");
        if let Some(m) = mechanism {
            // A raw tracepoint is the cheaper way to the same tracepoint.
            let got = h["mechanism"].as_str().unwrap_or_default();
            assert!(
                got == m || (m == "tracepoint" && got == "raw_tracepoint"),
                "{h}"
            );
        }
    }
    // Before 6.10 the tracepoint has no `reason` and misses no-socket
    // resets: tcp_v4_send_reset itself must be hooked instead, by fentry
    // where BPF trampolines work (Debian's 6.1 has them), else by kprobe.
    let send = hook(status, "tcp_send_reset");
    if has_tracepoint_field("tcp_send_reset", "reason") {
        // 6.10+: the BTF-typed program, whose plain loads the verifier
        // must accept (the packet's fields, the device's namespace); the
        // probe-read fallback says why it was used.
        assert_eq!(send["mechanism"], "raw_tracepoint", "{send}");
        assert!(send["reason"].is_null(), "{send}");
    } else {
        let m = send["mechanism"].as_str().unwrap_or_default();
        assert!(m == "fentry" || m == "kprobe", "{send}");
        assert!(
            send["target"]
                .as_str()
                .unwrap()
                .contains("tcp_v4_send_reset"),
            "{send}"
        );
    }
    assert!(hook(status, "ct_invalid_reason")["target"]
        .as_str()
        .unwrap()
        .contains("log_invalid"));
    assert_eq!(hook(status, "ipvs_conn_new")["target"], "ip_vs_conn_new");
}

#[test]
fn every_hook_attaches_with_kprobes() {
    if !in_vm() {
        return;
    }
    let lab = Lab::new("hk", 1);
    let watch = lab.watch(&[]);
    check_all_hooks(&watch.status);
    let lines = watch.stop();
    assert!(select(&lines, "finding", None).is_empty(), "{lines:?}");
}

/// Incident 1 with the conntrack hooks live: the client's no-socket RST is
/// seen through the kprobe, and the finding names the INVALID verdict and
/// the window check that failed, as the kernel worded it.
#[test]
fn unnated_reply_names_the_conntrack_verdict() {
    if !in_vm() {
        return;
    }
    let mut lab = Lab::new("un", 1);
    unnated_replies_name_the_verdict(&mut lab, "tcp_v4_send_reset");
}

/// The same over a dual-stack Service's IPv6 side (ip6tables DNAT): the
/// client's reset through `tcp_v6_send_reset`, conntrack's verdict on the
/// IPv6 reply, one finding per connection in IPv6 addresses.
#[test]
fn ipv6_unnated_reply_names_the_conntrack_verdict() {
    if !in_vm() {
        return;
    }
    let mut lab = Lab::new("u6", 1);
    if let Err(why) = lab.ipv6(1) {
        ktrace_tests::record_skip(&why);
        return;
    }
    unnated_replies_name_the_verdict(&mut lab, "tcp_v6_send_reset");
}

/// Three connections in the lab's family killed by the backend's
/// out-of-window reply: each reset seen through `send_reset` (the kernel
/// function, where the 6.1 tracepoint misses no-socket resets), each
/// reply's INVALID verdict with the kernel's reason, one finding each.
fn unnated_replies_name_the_verdict(lab: &mut Lab, send_reset: &str) {
    let family = lab.family;
    lab.start_server();
    let watch = lab.watch(&["--events"]);
    check_all_hooks(&watch.status);
    let legacy_tracepoint = !has_tracepoint_field("tcp_send_reset", "reason");
    if legacy_tracepoint {
        let target = hook(&watch.status, "tcp_send_reset")["target"].clone();
        assert!(target.as_str().unwrap().contains(send_reset), "{target}");
    }
    let mut c = lab.client(3);
    // Emulated CPUs are slow: a longer wait than on the host.
    let reset = c.unnat_all(Duration::from_millis(2500));
    assert_eq!(reset.len(), 3, "every connection dies: {reset:?}");
    assert!(
        watch.wait_count(Duration::from_secs(15), "finding", Some("unnated_reply"), 3),
        "unnated_reply findings did not arrive: {:?}",
        watch.lines()
    );
    let lines = watch.stop();
    let (client_ns, node_ns) = (lab.inode(&lab.client), lab.inode(&lab.node));
    let (backend, vip) = (family.backend(), family.vip());
    assert_eq!(
        select(&lines, "finding", Some("unnated_reply")).len(),
        3,
        "one finding per broken connection"
    );

    for p in &c.ports {
        let client = family.client(*p);
        // The no-socket RST, through fentry or a kprobe on the kernel
        // function where the tracepoint misses it.
        let sent = between(&lines, "tcp_send_reset", &client, &backend);
        assert_eq!(sent.len(), 1, "port {p}: {sent:?}");
        assert_eq!(sent[0]["socket"], false, "{}", sent[0]);
        assert_eq!(sent[0]["netns"], client_ns, "{}", sent[0]);
        if legacy_tracepoint {
            let src = sent[0]["source"].as_str().unwrap_or_default();
            assert!(src == "fentry" || src == "kprobe", "{}", sent[0]);
        }
        // Conntrack's verdict on the backend's reply, in the node namespace.
        let invalid: Vec<&Value> = select(&lines, "event", Some("ct_invalid"))
            .into_iter()
            .filter(|e| e["client"] == client && e["direction"] == "reply")
            .collect();
        assert!(!invalid.is_empty(), "port {p}: no ct_invalid event");
        let e = invalid[0];
        assert_eq!(e["netns"], node_ns, "{e}");
        assert_eq!(e["src"], backend.as_str(), "{e}");
        assert_eq!(e["service"], vip.as_str(), "{e}");
        assert_eq!(e["backend"], backend.as_str(), "{e}");
        let why = e["reason"]
            .as_str()
            .unwrap_or_else(|| panic!("no reason read from the kernel: {e}"));
        assert!(
            why.contains("SEQ is over") && why.contains("upper bound"),
            "{e}"
        );

        let f: Vec<&Value> = select(&lines, "finding", Some("unnated_reply"))
            .into_iter()
            .filter(|f| f["client"] == client)
            .collect();
        assert_eq!(f.len(), 1, "one finding per broken connection: {f:?}");
        let f = f[0];
        eprintln!("finding: {f}");
        assert_eq!(f["service"], vip.as_str());
        assert_eq!(f["backend"], backend.as_str());
        let cause = f["cause"].as_str().unwrap();
        assert!(cause.contains("conntrack INVALID"), "{f}");
        assert!(
            cause.contains("SEQ is over") && cause.contains("upper bound"),
            "{f}"
        );
        assert_eq!(f["evidence"]["ct_verdict"], "INVALID", "{f}");
        let basis = f["evidence"]["basis"].as_array().unwrap();
        assert!(
            basis.contains(&"ct_invalid".into())
                && basis.contains(&"client_rst_to_backend_address".into()),
            "{f}"
        );
    }
    assert!(select(&lines, "finding", Some("backend_switch")).is_empty());
}

/// Restores `nf_conntrack_max` (global on 6.1: only the initial
/// namespace may write it) when dropped.
struct ConntrackMax(String);

const CT_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

impl ConntrackMax {
    fn set(n: u32) -> ConntrackMax {
        let old = std::fs::read_to_string(CT_MAX).expect("reading nf_conntrack_max");
        std::fs::write(CT_MAX, n.to_string()).expect("writing nf_conntrack_max");
        ConntrackMax(old.trim().to_string())
    }
}

impl Drop for ConntrackMax {
    fn drop(&mut self) {
        let _ = std::fs::write(CT_MAX, &self.0);
    }
}

fn vmlab(lab: &Lab, ns: &str, args: &[&str]) -> Value {
    let script = workspace().join("tests/vm/vmlab.py").display().to_string();
    let mut argv = vec!["python3", script.as_str()];
    argv.extend(args);
    let out = lab.exec_ok(ns, &argv);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "vmlab.py {args:?} said {:?}: {e}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Conntrack table full: established (assured) connections fill a small
/// table, so new ones cannot get an entry and their SYNs are dropped.
#[test]
fn conntrack_table_full() {
    if !in_vm() {
        return;
    }
    const MAX: u32 = 8;
    let mut lab = Lab::new("tf", 1);
    lab.start_server();
    // Before ktrace starts: it quotes the limit it read at start.
    let _max = ConntrackMax::set(MAX);
    let watch = lab.watch(&["--events"]);
    assert_eq!(
        hook(&watch.status, "ct_table_full")["attached"],
        true,
        "{}",
        watch.status
    );
    let mut held = lab.client(MAX as usize);
    let tried = vmlab(
        &lab,
        &lab.client,
        &["attempt", VIP, &PORT.to_string(), "2", "1.5"],
    );
    assert_eq!(tried["connected"], 0, "the table should be full: {tried}");
    assert!(
        watch.wait_count(
            Duration::from_secs(10),
            "finding",
            Some("conntrack_table_full"),
            1
        ),
        "no conntrack_table_full finding: {:?}",
        watch.lines()
    );
    held.cmd("close");
    let lines = watch.stop();
    let node_ns = lab.inode(&lab.node);
    let full = select(&lines, "event", Some("ct_table_full"));
    assert!(!full.is_empty());
    for e in &full {
        assert_eq!(e["netns"], node_ns, "{e}");
        assert!(
            e["src"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{CLIENT_IP}:")),
            "{e}"
        );
        assert_eq!(e["dst"], vip().as_str(), "{e}");
    }
    let f = select(&lines, "finding", Some("conntrack_table_full"));
    assert_eq!(f.len(), 1, "repeats are merged: {f:?}");
    eprintln!("finding: {}", f[0]);
    assert!(f[0]["evidence"]["count"].as_u64().unwrap() >= 1, "{}", f[0]);
    assert_eq!(f[0]["evidence"]["nf_conntrack_max"], MAX, "{}", f[0]);
    assert!(
        f[0]["cause"].as_str().unwrap().contains("conntrack entry"),
        "{}",
        f[0]
    );
}

/// An IPVS virtual service with persistence, two masqueraded real servers
/// (kube-proxy's IPVS mode: the VIP on a dummy device of the node).
fn ipvs_lab(tag: &str, expire_quiescent_template: bool) -> Lab {
    let lab = Lab::new(tag, 0);
    let n = lab.node.clone();
    let svc = vip();
    let expire = format!(
        "net.ipv4.vs.expire_quiescent_template={}",
        u8::from(expire_quiescent_template)
    );
    let steps: Vec<Vec<&str>> = vec![
        vec!["ip", "link", "add", "kube-ipvs0", "type", "dummy"],
        vec!["ip", "addr", "add", "10.96.0.10/32", "dev", "kube-ipvs0"],
        vec!["sysctl", "-qw", "net.ipv4.vs.conntrack=1"],
        vec!["sysctl", "-qw", &expire],
        vec!["ipvsadm", "-A", "-t", &svc, "-s", "rr", "-p", "300"],
    ];
    for s in &steps {
        lab.exec_ok(&n, s);
    }
    for b in backends() {
        lab.exec_ok(
            &n,
            &["ipvsadm", "-a", "-t", &svc, "-r", &b, "-m", "-w", "1"],
        );
    }
    lab
}

/// IPVS connections in the node namespace: (client, real server) of each
/// entry of `ipvsadm -Lcn` (templates have client port 0).
fn ipvs_conns(lab: &Lab) -> Vec<(String, String)> {
    let out = lab.exec_ok(&lab.node, &["ipvsadm", "-L", "-c", "-n"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() >= 6 && w[0] == "TCP").then(|| (w[3].to_string(), w[5].to_string()))
        })
        .collect()
}

/// One client connects, its real server's weight goes to 0 (as kube-proxy
/// does while a pod terminates), the client connects again: returns the
/// watch output, the drained real server and where the second connection went.
fn drain_and_reconnect(lab: &mut Lab) -> (Vec<Value>, String, String, u16) {
    lab.start_server();
    let watch = lab.watch(&["--events"]);
    check_all_hooks(&watch.status);
    let first = lab.client(1);
    let template = ipvs_conns(lab)
        .into_iter()
        .find(|(c, _)| c == &format!("{CLIENT_IP}:0"))
        .map(|(_, rs)| rs)
        .expect("a persistence template for the client");
    assert!(backends().contains(&template), "{template}");
    lab.exec_ok(
        &lab.node,
        &[
            "ipvsadm",
            "-e",
            "-t",
            &vip(),
            "-r",
            &template,
            "-m",
            "-w",
            "0",
        ],
    );
    let second = lab.client(1);
    let port = second.ports[0];
    let went = ipvs_conns(lab)
        .into_iter()
        .find(|(c, _)| c == &client(port))
        .map(|(_, rs)| rs)
        .expect("an IPVS connection for the second client connection");
    // Events for both connections (and the template) must have arrived.
    watch.wait_for(Duration::from_secs(10), |l| {
        select(l, "event", Some("ipvs_conn_new"))
            .iter()
            .any(|e| e["client"] == client(port))
            && (went != template || !select(l, "finding", Some("quiescent_backend")).is_empty())
    });
    std::thread::sleep(Duration::from_millis(1000));
    drop((first, second));
    (watch.stop(), template, went, port)
}

#[test]
fn ipvs_persistence_to_weight_zero_gives_quiescent_backend() {
    if !in_vm() {
        return;
    }
    let mut lab = ipvs_lab("iq", false);
    let (lines, drained, went, port) = drain_and_reconnect(&mut lab);
    assert_eq!(
        went, drained,
        "with expire_quiescent_template=0 the template keeps the client on the drained server"
    );
    let node_ns = lab.inode(&lab.node);
    let conns: Vec<&Value> = select(&lines, "event", Some("ipvs_conn_new"));
    let mine = conns
        .iter()
        .find(|e| e["client"] == client(port) && e["template"] == false)
        .unwrap_or_else(|| panic!("no ipvs_conn_new for port {port}: {conns:?}"));
    assert_eq!(mine["netns"], node_ns, "{mine}");
    assert_eq!(mine["service"], vip().as_str(), "{mine}");
    assert_eq!(mine["backend"], drained.as_str(), "{mine}");
    assert_eq!(mine["weight"], 0, "{mine}");
    assert!(
        conns.iter().any(|e| e["template"] == true
            && e["client"] == format!("{CLIENT_IP}:0")
            && e["backend"] == drained.as_str()),
        "the persistence template was seen: {conns:?}"
    );
    let f = select(&lines, "finding", Some("quiescent_backend"));
    assert_eq!(f.len(), 1, "{f:?}");
    let f = f[0];
    eprintln!("finding: {f}");
    assert_eq!(f["service"], vip().as_str(), "{f}");
    assert_eq!(f["backend"], drained.as_str(), "{f}");
    assert_eq!(f["client"], client(port), "{f}");
    assert_eq!(f["evidence"]["weight"], 0, "{f}");
    assert_eq!(f["evidence"]["persistence_template"], true, "{f}");
    assert!(
        f["remedy"]
            .as_str()
            .unwrap()
            .contains("expire_quiescent_template=1"),
        "{f}"
    );
}

#[test]
fn ipvs_expire_quiescent_template_gives_no_finding() {
    if !in_vm() {
        return;
    }
    let mut lab = ipvs_lab("ie", true);
    let (lines, drained, went, port) = drain_and_reconnect(&mut lab);
    assert_ne!(
        went, drained,
        "with expire_quiescent_template=1 the client moves to the other server"
    );
    let mine: Vec<&Value> = select(&lines, "event", Some("ipvs_conn_new"))
        .into_iter()
        .filter(|e| e["client"] == client(port))
        .collect();
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert_eq!(mine[0]["backend"], went.as_str());
    assert_eq!(mine[0]["weight"], 1, "{}", mine[0]);
    let findings = select(&lines, "finding", None);
    assert!(findings.is_empty(), "{findings:?}");
}

/// Locally generated traffic runs conntrack and NAT in process context,
/// where a task can be preempted between a function's entry and return
/// while another packet (another task's, or a softirq's) goes through the
/// same function on that CPU. Tasks in the node namespace open connections
/// to the VIP (DNAT in OUTPUT) all at once, while the client's forwarded
/// connections go through the same hooks in softirq: every DNAT the kernel
/// hooks report must pair a call's entry with its own return, so each
/// local connection's mapping names its own source port, exactly once.
#[test]
fn local_traffic_pairs_each_call_with_its_own_return() {
    if !in_vm() {
        return;
    }
    const TASKS: usize = 8;
    const PER_TASK: usize = 6;
    let mut lab = Lab::new("lo", 1);
    lab.start_server();
    let node = lab.node.clone();
    // A route for the VIP, so that local sockets pick a source address
    // before OUTPUT's DNAT sends them to the backend.
    lab.exec_ok(
        &node,
        &["ip", "route", "add", &format!("{VIP}/32"), "dev", "veth-ns"],
    );
    lab.exec_ok(
        &node,
        &[
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-d",
            VIP,
            "-p",
            "tcp",
            "--dport",
            "2222",
            "-j",
            "DNAT",
            "--to-destination",
            &backend(),
        ],
    );
    let watch = lab.watch(&["--events"]);
    assert_eq!(hook(&watch.status, "nat_mapping")["attached"], true);
    // Forwarded traffic (softirq) at the same time as the local tasks.
    let forwarded = lab.client(4);
    let script = format!(
        "import socket, threading\n\
         ports, lock = [], threading.Lock()\n\
         def task():\n\
         \x20   for _ in range({PER_TASK}):\n\
         \x20       s = socket.create_connection(('{VIP}', {PORT}), timeout=20)\n\
         \x20       with lock: ports.append(s.getsockname()[1])\n\
         \x20       s.close()\n\
         ts = [threading.Thread(target=task) for _ in range({TASKS})]\n\
         [t.start() for t in ts]; [t.join() for t in ts]\n\
         print(' '.join(map(str, ports)))\n"
    );
    let out = lab.exec_ok(&node, &["python3", "-c", &script]);
    let local: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|p| format!("10.0.1.1:{p}"))
        .collect();
    assert_eq!(
        local.len(),
        TASKS * PER_TASK,
        "every local connection opened"
    );
    let node_ns = lab.inode(&node);
    let done = |l: &[Value]| {
        select(l, "event", Some("nat_mapping"))
            .iter()
            .filter(|e| e["netns"] == node_ns && local.contains(e["client"].as_str().unwrap_or("")))
            .count()
            >= local.len()
    };
    let complete = watch.wait_for(Duration::from_secs(30), done);
    let lines = watch.stop();
    drop(forwarded);
    let mut seen = BTreeSet::new();
    for e in select(&lines, "event", Some("nat_mapping")) {
        let c = e["client"].as_str().unwrap_or_default().to_string();
        if !c.starts_with("10.0.1.1:") {
            continue;
        }
        assert!(local.contains(&c), "a mapping for no local connection: {e}");
        assert_eq!(e["service"], vip().as_str(), "{e}");
        assert_eq!(e["backend"], backend().as_str(), "{e}");
        assert!(seen.insert(c), "two mappings for one connection: {e}");
    }
    assert!(
        complete,
        "missing mappings: {:?}",
        local.difference(&seen).collect::<Vec<_>>()
    );
    assert_eq!(seen, local);
}

/// The conntrack insert race with `__nf_conntrack_confirm` hooked: pairs of
/// datagrams from one socket on the guest's two CPUs to a UDP Service with
/// two backends. A packet that loses the race is a `dropped` finding of its
/// own (client, Service, backend), as many as `insert_failed` rose; clashes
/// the kernel resolved are one `resolved` finding from the counters.
///
/// On 6.1 and 6.12 no datagram is dropped: since 5.6 the kernel resolves a
/// UDP clash even when DNAT sent the two packets to different backends
/// (the loser's entry is inserted for its reply direction only, as
/// `IPS_NAT_CLASH`, and `clash_resolve` counts it; the kernel's own
/// conntrack_clash selftest expects this). So here the counters rise as
/// `clash_resolve`, the finding is `resolved`, and `insert_failed` stays 0;
/// the drop path is exercised by the TCP race below, which no kernel resolves.
#[test]
fn conntrack_insert_race_per_dropped_packet() {
    if !in_vm() {
        return;
    }
    let lab = Lab::new("ur", 2);
    lab.udp_service();
    let watch = lab.watch(&["--events"]);
    check_all_hooks(&watch.status);
    let (clash0, failed0) = (lab.ct_stat("clashres"), lab.ct_stat("insert_failed"));
    let to = format!("{VIP}:53").parse().unwrap();
    let mut rounds = 0;
    while lab.ct_stat("clashres") == clash0 && lab.ct_stat("insert_failed") == failed0 {
        assert!(rounds < 10, "no race in {rounds}00 pairs");
        ktrace_tests::race::udp_pairs(&lab.client, to, 100, true);
        rounds += 1;
    }
    let clashes = lab.ct_stat("clashres") - clash0;
    let failed = lab.ct_stat("insert_failed") - failed0;
    eprintln!("{rounds}00 pairs: clash_resolve +{clashes}, insert_failed +{failed}");
    let race = |l: &[Value]| select(l, "finding", Some("conntrack_insert_race")).len();
    assert!(
        watch.wait_for(Duration::from_secs(15), |l| race(l) >= 1),
        "no conntrack_insert_race finding: {:?}",
        watch.lines()
    );
    std::thread::sleep(Duration::from_secs(1));
    let lines = watch.stop();
    let backends: BTreeSet<String> = BACKENDS.iter().map(|b| format!("{b}:53")).collect();
    let service = format!("{VIP}:53");
    ktrace_tests::race::assert_one_finding_per_drop(&lines, failed, &service, &backends);
    let found = select(&lines, "finding", Some("conntrack_insert_race"));
    let resolved = found
        .iter()
        .filter(|f| f["evidence"]["outcome"] == "resolved")
        .count();
    assert_eq!(resolved > 0, clashes > 0, "{found:?}");
}

/// The insert race no kernel resolves: the same TCP SYN twice at once from
/// the guest's two CPUs to VIP:2222 (two backends at random). The loser is
/// dropped by `__nf_conntrack_confirm` (TCP clashes are never resolved);
/// the kretprobe makes each drop its own finding, naming the client, the
/// Service and the backend, as many as `insert_failed` rose.
#[test]
fn tcp_insert_race_drop_is_named_per_packet() {
    if !in_vm() {
        return;
    }
    let lab = Lab::new("tr", 2);
    let watch = lab.watch(&["--events"]);
    check_all_hooks(&watch.status);
    let raced = ktrace_tests::race::tcp_race_until_dropped(&lab, 100, 20);
    eprintln!("{raced:?}");
    assert!(raced.insert_failed > 0, "no SYN was dropped: {raced:?}");
    let dropped = |l: &[Value]| {
        select(l, "finding", Some("conntrack_insert_race"))
            .iter()
            .filter(|f| f["evidence"]["outcome"] == "dropped")
            .count() as u64
    };
    assert!(
        watch.wait_for(Duration::from_secs(20), |l| dropped(l)
            >= raced.insert_failed),
        "findings did not arrive: {raced:?}"
    );
    std::thread::sleep(Duration::from_secs(1));
    let lines = watch.stop();
    ktrace_tests::race::assert_one_finding_per_drop(
        &lines,
        raced.insert_failed,
        &vip(),
        &backends(),
    );
}
