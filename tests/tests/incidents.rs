//! The incidents behind ktrace, reproduced with the real kernel in network
//! namespaces, watched by `ktrace watch --json --events` in the node
//! namespace. Needs root; skipped (saying so) otherwise.
//!
//! Run serially (`--test-threads=1`): kernel hooks are global, so one
//! test's traffic would show up in another's ktrace.

use std::time::Duration;

use ktrace_tests::{
    assert_no_findings, backend, backends, between, client, hook, select, skip, vip, Lab, CLIENT_IP,
};
use serde_json::Value;

/// The status line is honest about this kernel.
fn check_status(status: &Value) {
    let send = hook(status, "tcp_send_reset");
    assert_eq!(send["attached"], true, "{status}");
    assert_eq!(hook(status, "tcp_receive_reset")["attached"], true);
    let kprobes = std::path::Path::new("/sys/bus/event_source/devices/kprobe").exists();
    let ct = hook(status, "ct_invalid");
    if !kprobes {
        assert_eq!(ct["attached"], false);
        assert!(
            ct["reason"]
                .as_str()
                .unwrap()
                .contains("kprobes not supported"),
            "{ct}"
        );
    }
    // Every hook that is off says why.
    for h in status["hooks"].as_array().unwrap() {
        if h["attached"] == false {
            assert!(h["reason"].as_str().is_some_and(|r| !r.is_empty()), "{h}");
        }
    }
    let nat = hook(status, "nat_mapping");
    assert_eq!(nat["attached"], true, "{nat}");
    assert_eq!(hook(status, "ct_counters")["mechanism"], "procfs");
}

/// Incident 2: conntrack flushed mid-connection, two backends. About half
/// of the connections are re-mapped to the other backend, which resets them.
#[test]
fn conntrack_flush_with_two_backends() {
    if skip() {
        return;
    }
    let mut lab = Lab::new("fl", 2);
    lab.start_server();
    let watch = lab.watch(&["--events"]);
    check_status(&watch.status);
    let mut c = lab.client(12);
    let reset = lab.flush_until_reset(&mut c);
    let survivors: Vec<u16> = c
        .ports
        .iter()
        .copied()
        .filter(|p| !reset.contains(p))
        .collect();
    let want = reset.len();
    assert!(
        watch.wait_count(
            Duration::from_secs(5),
            "finding",
            Some("backend_switch"),
            want
        ),
        "backend_switch findings did not arrive in time"
    );
    let lines = watch.stop();
    let server_ns = lab.inode(&lab.server);

    // One reset event per reset connection, from a backend to the client, in
    // the server's namespace, with the kernel's reason.
    let resets: Vec<&Value> = select(&lines, "event", Some("tcp_send_reset"))
        .into_iter()
        .filter(|e| e["dst"].as_str().is_some_and(|d| d.starts_with(CLIENT_IP)))
        .collect();
    for p in &reset {
        let mine: Vec<&&Value> = resets.iter().filter(|e| e["dst"] == client(*p)).collect();
        assert_eq!(mine.len(), 1, "port {p}: {mine:?}");
        let e = mine[0];
        assert!(backends().contains(e["src"].as_str().unwrap()), "{e}");
        assert_eq!(e["netns"], server_ns, "{e}");
        assert_eq!(
            e["socket"], false,
            "the backend has no socket for this flow: {e}"
        );
        assert!(e["reason"].as_str().is_some_and(|r| !r.is_empty()), "{e}");
        assert!(e["ts"].as_str().unwrap().ends_with('Z'));
    }
    for p in &survivors {
        assert!(
            !resets.iter().any(|e| e["dst"] == client(*p)),
            "survivor {p} was reset"
        );
    }

    // Diagnosis: a backend_switch per reset connection, exactly right.
    let switches = select(&lines, "finding", Some("backend_switch"));
    assert_eq!(switches.len(), reset.len(), "{switches:?}");
    for p in &reset {
        let f = switches
            .iter()
            .find(|f| f["client"] == client(*p))
            .unwrap_or_else(|| panic!("no finding for {p}"));
        let rst = resets.iter().find(|e| e["dst"] == client(*p)).unwrap();
        assert_eq!(f["service"], vip().as_str());
        assert_eq!(
            f["backend"], rst["src"],
            "the new backend is the one that reset"
        );
        let old = f["evidence"]["old_backend"].as_str().unwrap();
        assert!(
            backends().contains(old) && old != f["backend"].as_str().unwrap(),
            "{f}"
        );
        assert!(f["remedy"]
            .as_str()
            .unwrap()
            .contains("nf_conntrack_tcp_timeout_established"));
    }
    assert!(select(&lines, "finding", Some("unnated_reply")).is_empty());
    remap_comes_before_its_reset(&lines, &reset);
}

/// The events in the order they happened: each re-mapping before the new
/// backend's reset it explains. Where ctnetlink gives the mappings (a
/// path apart from the ring buffer), a reader that let the two race would
/// sometimes print (and diagnose) the reset first.
fn remap_comes_before_its_reset(lines: &[Value], reset: &[u16]) {
    let at = |want: &dyn Fn(&Value) -> bool| lines.iter().position(want);
    for p in reset {
        let rst = at(&|l| {
            l["type"] == "event" && l["event"] == "tcp_send_reset" && l["dst"] == client(*p)
        })
        .unwrap();
        let remap = at(&|l| {
            l["type"] == "event"
                && l["event"] == "nat_mapping"
                && l["client"] == client(*p)
                && l["backend"] == lines[rst]["src"]
        });
        assert!(
            remap.is_some_and(|m| m < rst),
            "port {p}: re-mapping at {remap:?}, reset at {rst}: {}",
            lines[rst]
        );
    }
}

/// Incident 1: a reply far outside the TCP window is marked INVALID by the
/// node's conntrack and leaves without reverse NAT; the client resets it.
#[test]
fn unnated_reply_out_of_window() {
    if skip() {
        return;
    }
    let mut lab = Lab::new("un", 1);
    lab.start_server();
    let watch = lab.watch(&["--events"]);
    check_status(&watch.status);
    let mut c = lab.client(3);
    let reset = c.unnat_all(Duration::from_millis(1000));
    assert_eq!(reset.len(), 3, "every connection dies: {reset:?}");
    assert!(watch.wait_count(Duration::from_secs(5), "finding", Some("unnated_reply"), 3));
    let status = watch.status.clone();
    let lines = watch.stop();
    let (client_ns, server_ns) = (lab.inode(&lab.client), lab.inode(&lab.server));
    let backend = backend();

    for p in &c.ports {
        // The client answers the backend's own address: no socket for it.
        let sent = between(&lines, "tcp_send_reset", &client(*p), &backend);
        assert_eq!(sent.len(), 1, "port {p}: {sent:?}");
        assert_eq!(sent[0]["reason"], "NO_SOCKET");
        assert_eq!(sent[0]["socket"], false);
        assert_eq!(sent[0]["netns"], client_ns);
        // The backend accepts that reset: the connection is gone.
        let got = between(&lines, "tcp_receive_reset", &client(*p), &backend)
            .into_iter()
            .filter(|e| e["netns"] == server_ns)
            .count();
        assert_eq!(got, 1, "port {p}");
        let f: Vec<&Value> = select(&lines, "finding", Some("unnated_reply"))
            .into_iter()
            .filter(|f| f["client"] == client(*p))
            .collect();
        assert_eq!(f.len(), 1, "one finding per broken connection: {f:?}");
        assert_eq!(f[0]["service"], vip().as_str());
        assert_eq!(f[0]["backend"], backend.as_str());
        assert!(f[0]["remedy"]
            .as_str()
            .unwrap()
            .contains("nf_conntrack_tcp_be_liberal=1"));
        assert!(f[0]["evidence"]["basis"]
            .as_array()
            .unwrap()
            .contains(&"client_rst_to_backend_address".into()));
        // Where the INVALID hook cannot attach, the node's INVALID counter
        // (sampled from procfs) is cited instead.
        if hook(&status, "ct_invalid")["attached"] == false
            && hook(&status, "ct_counters")["attached"] == true
        {
            let cause = f[0]["cause"].as_str().unwrap();
            assert!(
                cause.contains("counted") && cause.contains("INVALID packet(s)"),
                "{}",
                f[0]
            );
            assert!(
                f[0]["evidence"]["ct_invalid_counter_rise"]
                    .as_u64()
                    .unwrap()
                    >= 1,
                "{}",
                f[0]
            );
        }
    }
    assert!(select(&lines, "finding", Some("backend_switch")).is_empty());
}

/// Many un-NATed replies at once: one storm, not one line per reset.
#[test]
fn reset_burst_gives_one_storm() {
    if skip() {
        return;
    }
    let mut lab = Lab::new("st", 1);
    lab.start_server();
    let watch = lab.watch(&["--storm-threshold", "10", "--storm-window", "5"]);
    let mut c = lab.client(30);
    assert_eq!(c.unnat_all(Duration::from_millis(1000)).len(), 30);
    assert!(watch.wait_count(Duration::from_secs(5), "finding", Some("rst_storm"), 1));
    std::thread::sleep(Duration::from_millis(500));
    let lines = watch.stop();
    assert!(
        select(&lines, "event", None).is_empty(),
        "no --events, no events"
    );
    let storms = select(&lines, "finding", Some("rst_storm"));
    let starts: Vec<&&Value> = storms
        .iter()
        .filter(|f| f["evidence"]["phase"] == "start")
        .collect();
    assert_eq!(starts.len(), 1, "{storms:?}");
    assert_eq!(starts[0]["service"], vip().as_str());
    assert!(starts[0]["evidence"]["count"].as_u64().unwrap() >= 10);
    assert_eq!(starts[0]["evidence"]["window_s"], 5.0);
    assert!(
        storms.len() <= 4,
        "a storm is reported, not every reset: {storms:?}"
    );
    assert_eq!(select(&lines, "finding", Some("unnated_reply")).len(), 30);
}

/// Normal traffic and unrelated resets give no finding at all.
#[test]
fn control_run_gives_no_findings() {
    if skip() {
        return;
    }
    let mut lab = Lab::new("ct", 2);
    lab.start_server();
    // A second service whose backend port has no listener: refused connections.
    lab.refusing_service();
    // Every refused connection one by one, whatever other resets this
    // machine sends meanwhile (they share the kernel's per-CPU sample).
    let watch = lab.watch(&["--events", "--storm-threshold", "5", "--every-reset"]);
    // Echo and clean close, refused through a VIP, refused without NAT,
    // and refused on loopback.
    lab.ordinary_traffic(10);
    assert_eq!(lab.refuse("10.96.0.11", 2223, 10), 10);
    assert_eq!(lab.refuse("127.0.0.1", 9, 10), 10);
    assert!(watch.wait_count(Duration::from_secs(5), "event", Some("tcp_send_reset"), 30));
    std::thread::sleep(Duration::from_millis(1500));
    let lines = watch.stop();
    assert_no_findings(&lines);
    // On stop, the engine says what it tracked and what its bounds evicted.
    let stats = select(&lines, "stats", None);
    assert_eq!(stats.len(), 1, "{stats:?}");
    assert!(stats[0]["events"].as_u64().unwrap() >= 30, "{}", stats[0]);
    assert!(
        stats[0]["flows_tracked"].as_u64().unwrap() >= 10,
        "{}",
        stats[0]
    );
    assert_eq!(stats[0]["flows_evicted_by_count"], 0);
}

/// IPv6 resets are decoded with bracketed endpoints and the right namespace.
#[test]
fn ipv6_resets_are_decoded() {
    if skip() {
        return;
    }
    let lab = Lab::new("v6", 1);
    let watch = lab.watch(&["--events", "--every-reset"]);
    assert_eq!(lab.refuse("::1", 9, 3), 3);
    assert!(watch.wait_for(Duration::from_secs(5), |l| {
        select(l, "event", Some("tcp_send_reset"))
            .iter()
            .filter(|e| e["src"] == "[::1]:9")
            .count()
            >= 3
    }));
    let lines = watch.stop();
    let client_ns = lab.inode(&lab.client);
    let v6: Vec<&Value> = select(&lines, "event", Some("tcp_send_reset"))
        .into_iter()
        .filter(|e| e["src"] == "[::1]:9")
        .collect();
    assert_eq!(v6.len(), 3, "{v6:?}");
    for e in v6 {
        assert!(e["dst"].as_str().unwrap().starts_with("[::1]:"), "{e}");
        assert_eq!(e["netns"], client_ns);
        assert_eq!(e["answers"], "SYN");
    }
    assert!(select(&lines, "finding", None).is_empty());
}

/// The human view names the incident on one compact line (service,
/// backend, client, short cause) within a second of the reset, with its
/// remedy once.
#[test]
fn human_view_names_the_incident() {
    if skip() {
        return;
    }
    let mut lab = Lab::new("hu", 1);
    lab.start_server();
    let out = std::env::temp_dir().join(format!("ktrace-human-{}.txt", std::process::id()));
    let file = std::fs::File::create(&out).unwrap();
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.node])
        .arg(ktrace_tests::ktrace_bin())
        .args(["watch", "--duration", "8"])
        .stdout(file)
        .spawn()
        .unwrap();
    // Wait for the status block before making traffic.
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&out)
        .unwrap_or_default()
        .contains("ipvs_conn_new")
    {
        assert!(start.elapsed() < Duration::from_secs(10), "no status block");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut c = lab.client(1);
    c.cmd("oow");
    std::thread::sleep(Duration::from_millis(1000));
    let port = c.ports[0];
    let reset_at = std::time::Instant::now();
    assert_eq!(c.send_all(), vec![port]);
    let want = client(port);
    let mut text = String::new();
    while reset_at.elapsed() < Duration::from_secs(1) {
        text = std::fs::read_to_string(&out).unwrap();
        if text.contains(&want) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.contains("unnated_reply"))
        .unwrap_or_else(|| panic!("no unnated_reply line within a second:\n{text}"));
    // One compact line: time, severity, kind, Service, backend, client, cause.
    let line = lines[at];
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cols[1], "ERR", "{line}");
    assert_eq!(cols[2], "unnated_reply", "{line}");
    assert_eq!(cols[3], vip(), "{line}");
    assert_eq!(cols[4], backend(), "{line}");
    assert_eq!(cols[5], client(port), "{line}");
    assert!(cols[6].starts_with("INVALID"), "the short cause: {line}");
    assert!(line.chars().count() <= 120, "fits 120 columns: {line}");
    // The group's first finding: its explanation and remedy follow, once.
    let why = lines[at + 1].trim_start();
    assert!(
        why.starts_with(&format!("why: Service {}: reply from backend", vip())),
        "{text}"
    );
    let fix: Vec<&&str> = lines
        .iter()
        .filter(|l| l.trim_start().starts_with("fix: "))
        .collect();
    assert_eq!(fix.len(), 1, "one remedy: {text}");
    assert!(fix[0].contains("nf_conntrack_tcp_be_liberal"), "{text}");
    let header = lines.iter().position(|l| l.starts_with("TIME ")).unwrap();
    assert!(header < at, "a column header above the findings: {text}");
    assert!(
        lines[header..].iter().all(|l| l.chars().count() <= 120),
        "{text}"
    );
    assert!(!text.contains('\x1b'), "no colour into a file: {text:?}");
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success(), "SIGTERM is a clean stop");
    let _ = std::fs::remove_file(&out);
}

/// Connections that reuse a client port each get their own finding.
#[test]
fn reused_client_ports_get_a_finding_per_connection() {
    if skip() {
        return;
    }
    let mut lab = Lab::new("pr", 1);
    lab.start_server();
    lab.exec_ok(
        &lab.client,
        &["sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40009"],
    );
    let watch = lab.watch(&["--events"]);
    let mut ports = Vec::new();
    for _round in 0..2 {
        let mut c = lab.client(5);
        assert_eq!(c.unnat_all(Duration::from_millis(1000)).len(), 5);
        ports.extend(c.ports.clone());
        drop(c);
        std::thread::sleep(Duration::from_millis(300));
    }
    ports.sort();
    ports.dedup();
    assert!(
        ports.len() < 10,
        "the second round reused ports of the first: {ports:?}"
    );
    watch.wait_for(Duration::from_secs(3), |l| {
        select(l, "finding", Some("unnated_reply")).len() >= 10
    });
    let lines = watch.stop();
    let clients: Vec<&Value> = select(&lines, "finding", Some("unnated_reply"))
        .iter()
        .map(|f| &f["client"])
        .collect();
    assert_eq!(
        clients.len(),
        10,
        "ports {ports:?}, findings for {clients:?}"
    );
}
