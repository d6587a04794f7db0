//! The un-NATed packet in the other topologies of the incident, reproduced
//! with the real kernel in network namespaces: masquerade (SNAT) in the
//! path, and the request direction to a Service address the node holds
//! locally (IPVS mode's `kube-ipvs0`). Each scenario asserts the exact
//! finding per reset connection, live and in replay; each control runs the
//! same topology with ordinary traffic, refused connections and
//! application aborts (SO_LINGER 0), and must give no finding.
//!
//! Needs root; skipped (saying so) otherwise. Run serially
//! (`--test-threads=1`): kernel hooks are global.

use std::time::Duration;

use ktrace_tests::race::{self, udp_pairs};
use ktrace_tests::{
    assert_no_findings, assert_replay_matches, backends, between, hook, kube_proxy, record_skip,
    select, skip, vip, Family, Lab, Scratch, Watch, BACKENDS, IPV4, IPV6, VIP,
};
use serde_json::Value;

const SETTLE: Duration = Duration::from_millis(1000);

/// The `unnated_reply` findings, one per reset port, each naming the
/// Service, the backend and the client as it connected (in the lab's
/// IPv4 addresses), with `path`.
fn assert_one_finding_per_connection(lines: &[Value], reset: &[u16], path: &str) -> Vec<Value> {
    assert_one_finding_per_connection_in(&IPV4, lines, reset, path)
}

/// [`assert_one_finding_per_connection`] in the addresses of `family`.
fn assert_one_finding_per_connection_in(
    family: &Family,
    lines: &[Value],
    reset: &[u16],
    path: &str,
) -> Vec<Value> {
    let found = select(lines, "finding", Some("unnated_reply"));
    assert_eq!(
        found.len(),
        reset.len(),
        "one finding per connection: {found:?}"
    );
    let mut mine = Vec::new();
    for p in reset {
        let client = family.client(*p);
        let f: Vec<&&Value> = found.iter().filter(|f| f["client"] == client).collect();
        assert_eq!(f.len(), 1, "port {p}: {found:?}");
        let f = f[0];
        assert_eq!(f["service"], family.vip().as_str(), "{f}");
        assert_eq!(f["backend"], family.backend().as_str(), "{f}");
        // The client's own reset is the default path, left out of the JSON.
        let got = f["evidence"]["path"].as_str().unwrap_or("reply_to_client");
        assert_eq!(got, path, "{f}");
        mine.push((*f).clone());
    }
    for kind in [
        "backend_switch",
        "quiescent_backend",
        "conntrack_table_full",
    ] {
        assert!(select(lines, "finding", Some(kind)).is_empty(), "{kind}");
    }
    mine
}

/// Three connections to the lab's VIP, each killed by the backend's
/// out-of-window reply; waits for their three findings and stops `watch`.
/// Returns its status, its output and the reset ports (every port).
fn unnat_three_replies(lab: &Lab, watch: Watch) -> (Value, Vec<Value>, Vec<u16>) {
    let mut c = lab.client(3);
    let reset = c.unnat_all(SETTLE);
    let mut ports = c.ports.clone();
    ports.sort();
    assert_eq!(reset, ports, "every connection dies");
    let (status, lines) = stop_after_unnated(watch, 3);
    (status, lines, reset)
}

/// Waits for `n` `unnated_reply` findings, lets late output arrive, and
/// stops `watch`: its status and output.
fn stop_after_unnated(watch: Watch, n: usize) -> (Value, Vec<Value>) {
    assert!(
        watch.wait_count(Duration::from_secs(5), "finding", Some("unnated_reply"), n),
        "findings did not arrive: {:?}",
        watch.lines()
    );
    std::thread::sleep(Duration::from_millis(500));
    let status = watch.status.clone();
    (status, watch.stop())
}

/// Where the INVALID hook cannot attach, the cause cites the counter.
fn assert_cause_cites_invalid(status: &Value, f: &Value) {
    if hook(status, "ct_invalid")["attached"] == false
        && hook(status, "ct_counters")["attached"] == true
    {
        assert!(
            f["evidence"]["ct_invalid_counter_rise"]
                .as_u64()
                .unwrap_or(0)
                >= 1,
            "{f}"
        );
    } else {
        assert!(f["cause"].as_str().unwrap().contains("INVALID"), "{f}");
    }
}

/// NodePort / LoadBalancer with `externalTrafficPolicy: Cluster`: the
/// flow is DNATed and masqueraded; the backend's out-of-window reply goes
/// to the node's SNAT address, where the node's own stack resets the
/// backend; the client is reset on its next send. The node runs
/// kube-proxy's iptables mode: the remedy is an iptables INPUT rule.
#[test]
fn masqueraded_reply_is_named_per_connection() {
    if skip() {
        return;
    }
    let mut lab = Lab::new("sn", 1);
    kube_proxy::iptables_mode(&lab);
    lab.masquerade();
    masqueraded_replies(
        &mut lab,
        "iptables -I INPUT -m conntrack --ctstate INVALID -j DROP",
    );
}

/// The same over a dual-stack Service's IPv6 side: ip6tables DNAT and
/// masquerade to the node's IPv6 address, `tcp_v6_send_reset` from it.
#[test]
fn ipv6_masqueraded_reply_is_named_per_connection() {
    if skip() {
        return;
    }
    let Some(mut lab) = ipv6_lab("s6") else {
        return;
    };
    kube_proxy::iptables_mode(&lab);
    lab.masquerade();
    masqueraded_replies(
        &mut lab,
        "ip6tables -I INPUT -m conntrack --ctstate INVALID -j DROP",
    );
}

/// Three masqueraded connections killed by out-of-window replies, in the
/// lab's family: one finding each naming the real client, resting on the
/// node's reset from its SNAT address and the NAT mapping that carries it,
/// with `remedy_rule` in its remedy; live and in replay.
fn masqueraded_replies(lab: &mut Lab, remedy_rule: &str) {
    let family = lab.family;
    lab.start_server();
    let scratch = Scratch::new("snat");
    let file = scratch.path("snat.rec");
    let watch = lab.watch(&["--events", "--record", &file]);
    assert_eq!(
        watch.status["kube_proxy_mode"], "iptables",
        "{}",
        watch.status
    );
    let (status, lines, reset) = unnat_three_replies(lab, watch);
    let node_ns = lab.inode(&lab.node);
    let snat_prefix = family.sock(family.node_server_ip, 0);
    let snat_prefix = snat_prefix.trim_end_matches('0');
    for f in assert_one_finding_per_connection_in(family, &lines, &reset, "reply_to_snat_address") {
        let snat = f["evidence"]["snat"].as_str().unwrap();
        assert!(snat.starts_with(snat_prefix), "{f}");
        assert_eq!(
            f["evidence"]["basis"][0], "node_rst_to_backend_from_snat_address",
            "{f}"
        );
        // The node's own reset of the backend, from the SNAT address.
        let rst = between(&lines, "tcp_send_reset", snat, &family.backend());
        assert_eq!(rst.len(), 1, "{f}: {rst:?}");
        assert_eq!(rst[0]["socket"], false);
        assert_eq!(rst[0]["netns"], node_ns);
        // The NAT mapping carries the SNAT address.
        assert!(
            select(&lines, "event", Some("nat_mapping"))
                .iter()
                .any(|e| e["client"] == f["client"] && e["snat"] == snat),
            "{f}"
        );
        assert_cause_cites_invalid(&status, &f);
        let remedy = f["remedy"].as_str().unwrap();
        assert!(remedy.contains(remedy_rule), "{f}");
        assert!(!remedy.contains("nft "), "{f}");
    }
    assert_replay_matches(&status, &lines, &file);
}

/// The request direction: the client's out-of-window segment is INVALID,
/// is not DNATed and reaches the VIP the node holds; the node answers with
/// an in-window reset from the VIP, which the client takes as legitimate.
#[test]
fn request_to_a_local_service_address_is_named_per_connection() {
    if skip() {
        return;
    }
    let mut lab = Lab::new("rq", 1);
    lab.local_vip();
    local_service_requests(&mut lab, "iptables");
}

/// The same over a dual-stack Service's IPv6 side: the IPv6 VIP held on
/// the node's `kube-ipvs0`, the node's `tcp_v6_send_reset` from it.
#[test]
fn ipv6_request_to_a_local_service_address_is_named_per_connection() {
    if skip() {
        return;
    }
    let Some(mut lab) = ipv6_lab("r6") else {
        return;
    };
    lab.local_vip();
    local_service_requests(&mut lab, "ip6tables");
}

/// Three connections killed by the client's out-of-window segments to a
/// VIP the node holds, in the lab's family: one finding each, resting on
/// the node's reset from the VIP; the remedy an `tool` INPUT rule (the
/// node is in IPVS mode where `kube-ipvs0` could be made); live and in
/// replay.
fn local_service_requests(lab: &mut Lab, tool: &str) {
    let family = lab.family;
    lab.start_server();
    let scratch = Scratch::new("req");
    let file = scratch.path("req.rec");
    let watch = lab.watch(&["--events", "--record", &file]);
    let mode = watch.status["kube_proxy_mode"].clone();
    let mut c = lab.client(3);
    let reset = c.unnat_requests(SETTLE);
    assert_eq!(reset.len(), 3, "every connection dies: {reset:?}");
    let (status, lines) = stop_after_unnated(watch, 3);
    let node_ns = lab.inode(&lab.node);
    let found =
        assert_one_finding_per_connection_in(family, &lines, &reset, "request_to_local_service");
    for f in found {
        assert_eq!(f["evidence"]["basis"][0], "node_rst_from_service_address");
        let cause = f["cause"].as_str().unwrap();
        assert!(cause.contains("in the client's window"), "{f}");
        // The node's reset from the VIP, answering the client's segment.
        let client = f["client"].as_str().unwrap();
        let rst = between(&lines, "tcp_send_reset", &family.vip(), client);
        assert_eq!(rst.len(), 1, "{f}: {rst:?}");
        assert_eq!(rst[0]["socket"], false);
        assert_eq!(rst[0]["netns"], node_ns);
        assert_cause_cites_invalid(&status, &f);
        let remedy = f["remedy"].as_str().unwrap();
        assert!(
            remedy.contains(&format!(
                "{tool} -I INPUT -m conntrack --ctstate INVALID -j DROP"
            )),
            "{f}"
        );
        if mode == "ipvs" {
            assert!(remedy.contains("ipvs mode"), "{f}");
        }
    }
    assert_replay_matches(&status, &lines, &file);
}

/// Ordinary traffic in a topology: echo and clean close, refused without
/// NAT, and application aborts (SO_LINGER 0); then five connections
/// refused at each of `refused` (through a VIP whose backend port is
/// closed; with a local VIP, a port of it nothing DNATs, which the node
/// itself refuses).
fn control(lab: &mut Lab, refused: &[(&str, u16)]) {
    lab.start_server();
    let watch = lab.watch(&["--events", "--storm-threshold", "5"]);
    lab.ordinary_traffic(5);
    for (host, port) in refused {
        assert_eq!(lab.refuse(host, *port, 5), 5, "{host}:{port}");
    }
    let mut aborted = lab.client(5);
    assert!(aborted.send_all().is_empty());
    aborted.abort();
    assert!(watch.wait_count(Duration::from_secs(5), "event", Some("tcp_send_reset"), 15));
    std::thread::sleep(Duration::from_millis(1500));
    let lines = watch.stop();
    assert_no_findings(&lines);
}

#[test]
fn masquerade_control_gives_no_findings() {
    if skip() {
        return;
    }
    let mut lab = Lab::new("sc", 1);
    lab.masquerade();
    lab.refusing_service();
    control(&mut lab, &[("10.96.0.11", 2223)]);
}

#[test]
fn local_service_address_control_gives_no_findings() {
    if skip() {
        return;
    }
    let mut lab = Lab::new("rc", 1);
    lab.local_vip();
    lab.refusing_service();
    control(&mut lab, &[("10.96.0.11", 2223), (VIP, 2224)]);
}

/// The IPv6 masquerade topology carrying ordinary traffic, connections
/// refused through a Service, and application aborts: no finding.
#[test]
fn ipv6_masquerade_control_gives_no_findings() {
    if skip() {
        return;
    }
    let Some(mut lab) = ipv6_lab("s6c") else {
        return;
    };
    lab.masquerade();
    lab.refusing_service();
    control(&mut lab, &[(IPV6.refusing_vip, 2223)]);
}

/// The IPv6 VIP held locally, with ordinary traffic, connections refused
/// through a Service and by the node at a port of the VIP nothing DNATs,
/// and application aborts: no finding.
#[test]
fn ipv6_local_service_address_control_gives_no_findings() {
    if skip() {
        return;
    }
    let Some(mut lab) = ipv6_lab("r6c") else {
        return;
    };
    lab.local_vip();
    lab.refusing_service();
    control(&mut lab, &[(IPV6.refusing_vip, 2223), (IPV6.vip, 2224)]);
}

/// The conntrack insert race: 1,000 pairs of datagrams, each pair from one
/// socket on two CPUs at once, to a UDP Service DNATed to two backends.
/// The node's counters say whether the kernel resolved the clashes or
/// dropped the losers; the finding must say the same, and replay too.
#[test]
fn udp_insert_race_is_named() {
    if skip() {
        return;
    }
    let lab = Lab::new("ur", 2);
    lab.udp_service();
    let scratch = Scratch::new("race");
    let file = scratch.path("race.rec");
    let watch = lab.watch(&["--events", "--record", &file]);
    let (clash0, failed0) = (lab.ct_stat("clashres"), lab.ct_stat("insert_failed"));
    let to = format!("{VIP}:53").parse().unwrap();
    let mut rounds = 0;
    // The race is won by chance: more rounds until a counter moves.
    while lab.ct_stat("clashres") == clash0 && lab.ct_stat("insert_failed") == failed0 {
        assert!(rounds < 10, "no clash in {rounds}000 pairs");
        assert_eq!(udp_pairs(&lab.client, to, 1000, true), 2000);
        rounds += 1;
    }
    let clashes = lab.ct_stat("clashres") - clash0;
    let failed = lab.ct_stat("insert_failed") - failed0;
    eprintln!("{rounds}000 pairs: clash_resolve +{clashes}, insert_failed +{failed}");
    let race = |l: &[Value]| select(l, "finding", Some("conntrack_insert_race")).len();
    assert!(watch.wait_for(Duration::from_secs(5), |l| race(l) >= 1));
    std::thread::sleep(Duration::from_millis(500));
    let status = watch.status.clone();
    let lines = watch.stop();
    // What ktrace sampled is what the node counted.
    let sampled: u64 = select(&lines, "event", Some("ct_counters"))
        .iter()
        .map(|e| e["clash_resolve"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(sampled, clashes);
    let found = select(&lines, "finding", Some("conntrack_insert_race"));
    let outcomes: Vec<&str> = found
        .iter()
        .map(|f| f["evidence"]["outcome"].as_str().unwrap())
        .collect();
    let mut want = Vec::new();
    if clashes > 0 {
        want.push("resolved");
    }
    let confirm_hooked = status["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h["name"] == "ct_insert_race" && h["attached"] == true);
    if failed > 0 && !confirm_hooked {
        want.push("dropped");
    }
    let mut got = outcomes.clone();
    got.sort();
    got.dedup();
    assert_eq!(got, want, "{found:?}");
    for f in &found {
        let e = &f["evidence"];
        assert!(e["count"].as_u64().unwrap() >= 1, "{f}");
        if e["outcome"] == "resolved" {
            assert_eq!(f["severity"], "warning");
            assert!(e["count"].as_u64().unwrap() <= clashes, "{f}");
        }
    }
    assert_eq!(select(&lines, "finding", None).len(), found.len());
    assert_replay_matches(&status, &lines, &file);
}

/// The insert race that the kernel cannot resolve: the same TCP SYN sent
/// twice at once on two CPUs to VIP:2222 (two backends at random). The
/// second SYN loses `__nf_conntrack_confirm` and is dropped (TCP clashes
/// are never resolved): one `dropped` finding per dropped packet, naming
/// its client, the Service and the backend DNAT chose, live and in replay.
/// Without the confirm hook the counter alone speaks (no endpoints).
#[test]
fn tcp_insert_race_drop_is_named_per_packet() {
    if skip() {
        return;
    }
    let lab = Lab::new("tr", 2);
    let scratch = Scratch::new("tcprace");
    let file = scratch.path("tcprace.rec");
    let watch = lab.watch(&["--events", "--record", &file]);
    let raced = race::tcp_race_until_dropped(&lab, 100, 50);
    eprintln!("{raced:?}");
    assert!(raced.insert_failed > 0, "no SYN was dropped: {raced:?}");
    let race = |l: &[Value]| select(l, "finding", Some("conntrack_insert_race")).len();
    assert!(watch.wait_for(Duration::from_secs(5), |l| race(l) >= 1));
    std::thread::sleep(Duration::from_millis(1500));
    let status = watch.status.clone();
    let lines = watch.stop();
    if hook(&status, "ct_insert_race")["attached"] == true {
        let found =
            race::assert_one_finding_per_drop(&lines, raced.insert_failed, &vip(), &backends());
        for f in &found {
            assert!(f["cause"].as_str().unwrap().contains("TCP"), "{f}");
        }
        // Nothing else: the refused SYNs and resolved clashes aside.
        let others: Vec<&Value> = select(&lines, "finding", None)
            .into_iter()
            .filter(|f| f["evidence"]["basis"] != "clash_resolve_counter")
            .collect();
        assert_eq!(others.len(), found.len(), "{others:?}");
    } else {
        let dropped = select(&lines, "finding", Some("conntrack_insert_race"))
            .into_iter()
            .filter(|f| f["evidence"]["outcome"] == "dropped")
            .map(|f| f["evidence"]["count"].as_u64().unwrap())
            .sum::<u64>();
        assert_eq!(dropped, raced.insert_failed);
    }
    assert_replay_matches(&status, &lines, &file);
}

/// The same UDP Service, each pair's datagrams one after the other: the
/// second finds the entry confirmed, no race, no finding.
#[test]
fn udp_without_a_race_gives_no_finding() {
    if skip() {
        return;
    }
    let lab = Lab::new("uc", 2);
    lab.udp_service();
    let watch = lab.watch(&["--events"]);
    let clash0 = lab.ct_stat("clashres");
    let to = format!("{VIP}:53").parse().unwrap();
    assert_eq!(udp_pairs(&lab.client, to, 1000, false), 2000);
    std::thread::sleep(Duration::from_millis(1000));
    let lines = watch.stop();
    assert_eq!(lab.ct_stat("clashres"), clash0);
    let findings = select(&lines, "finding", None);
    assert!(findings.is_empty(), "{findings:?}");
}

/// The lab's Service in kube-proxy's nftables mode: `payments/ledger:grpc`
/// at VIP:2222 on one backend, a Service DNATed to a backend port where
/// nothing listens (10.96.0.11:2223), and one without endpoints
/// (10.96.0.12:2224, rejected by kube-proxy's `reject-chain`). False when
/// `nft` is missing (the skip is recorded).
fn nftables_mode(lab: &Lab) -> bool {
    if !kube_proxy::have_nft() {
        record_skip("nft is not installed (scripts/setup.sh installs nftables)");
        return false;
    }
    let ledger = [format!("{}:2222", BACKENDS[0])];
    let refusing = [format!("{}:2223", BACKENDS[0])];
    let rules = kube_proxy::nftables_ruleset(&[
        kube_proxy::ServicePort {
            name: "payments/ledger",
            port_name: "grpc",
            vip: VIP,
            port: 2222,
            endpoints: &ledger,
        },
        kube_proxy::ServicePort {
            name: "payments/refusing",
            port_name: "http",
            vip: "10.96.0.11",
            port: 2223,
            endpoints: &refusing,
        },
        kube_proxy::ServicePort {
            name: "payments/empty",
            port_name: "http",
            vip: "10.96.0.12",
            port: 2224,
            endpoints: &[],
        },
    ]);
    kube_proxy::install(lab, &["nft", "-f", "-"], &rules);
    true
}

/// kube-proxy's nftables mode installs no ctstate INVALID drop: with
/// be_liberal=0 the backend's out-of-window reply leaves un-NATed and the
/// client resets, as in the iptables mode without its KUBE-FORWARD rule.
/// One finding per reset connection, named from the `kube-proxy` table,
/// live and in replay.
#[test]
fn nftables_mode_reply_is_named_per_connection() {
    if skip() {
        return;
    }
    let mut lab = Lab::new("nf", 1);
    if !nftables_mode(&lab) {
        return;
    }
    // doctor on this node: nftables mode, no INVALID drop, be_liberal=0.
    let bin = ktrace_tests::ktrace_bin();
    let out = lab.exec(&lab.node, &[bin.to_str().unwrap(), "doctor", "--json"]);
    let checks = ktrace_tests::json_lines(&out.stdout);
    let check = |name: &str| checks.iter().find(|c| c["check"] == name).unwrap().clone();
    let drop = check("kube_proxy_invalid_drop");
    assert_eq!(drop["evidence"]["mode"], "nftables", "{drop}");
    assert_eq!(drop["evidence"]["invalid_drop"], "none_by_design", "{drop}");
    assert_eq!(drop["evidence"]["be_liberal"], 0, "{drop}");
    assert_eq!(check("unnated_reply_protection")["status"], "fail");
    lab.start_server();
    let scratch = Scratch::new("nftm");
    let file = scratch.path("nft.rec");
    let watch = lab.watch(&["--events", "--record", &file]);
    let names = &watch.status["names"];
    let rules = names
        .as_array()
        .and_then(|a| a.iter().find(|s| s["source"] == "kube-proxy-rules"))
        .unwrap_or_else(|| panic!("no kube-proxy-rules names source: {names}"));
    assert_eq!(rules["mode"], "nftables", "{rules}");
    assert_eq!(rules["services"], 3, "{rules}");
    assert_eq!(
        watch.status["kube_proxy_mode"], "nftables",
        "{}",
        watch.status
    );
    let (status, lines, reset) = unnat_three_replies(&lab, watch);
    for f in assert_one_finding_per_connection(&lines, &reset, "reply_to_client") {
        assert_eq!(f["service_name"], "payments/ledger:grpc", "{f}");
        assert_eq!(f["backend_service"], "payments/ledger:grpc", "{f}");
        assert_eq!(
            f["evidence"]["basis"][0], "client_rst_to_backend_address",
            "{f}"
        );
        assert_cause_cites_invalid(&status, &f);
        // kube-proxy installs no INVALID drop in this mode, and the node
        // may have no iptables at all: an nft rule of the admin's own.
        let remedy = f["remedy"].as_str().unwrap();
        assert!(
            remedy.contains("nftables mode installs no ctstate INVALID drop"),
            "{f}"
        );
        assert!(
            remedy.contains("type filter hook forward priority filter"),
            "{f}"
        );
        assert!(remedy.contains("ct state invalid drop"), "{f}");
        assert!(!remedy.contains("iptables"), "{f}");
    }
    assert_replay_matches(&status, &lines, &file);
}

/// The nftables-mode node carrying ordinary traffic, connections refused
/// through a Service and without NAT, and application aborts: no finding.
#[test]
fn nftables_mode_control_gives_no_findings() {
    if skip() {
        return;
    }
    let mut lab = Lab::new("nc", 1);
    if !nftables_mode(&lab) {
        return;
    }
    control(&mut lab, &[("10.96.0.11", 2223)]);
}

/// The lab with the IPv6 side of a dual-stack Service as its family, or
/// `None` (the skip recorded) when the kernel has no IPv6 NAT.
fn ipv6_lab(tag: &str) -> Option<Lab> {
    let mut lab = Lab::new(tag, 1);
    match lab.ipv6(1) {
        Ok(()) => Some(lab),
        Err(why) => {
            record_skip(&why);
            None
        }
    }
}

/// A dual-stack Service's IPv6 side: ip6tables DNAT from the IPv6 VIP to
/// the backend. The backend's out-of-window reply is INVALID, leaves
/// un-NATed from the backend's own address, and the client resets it
/// (`tcp_v6_send_reset`, no socket); the client is reset on its next send.
/// One finding per reset connection, in IPv6 addresses, live and in replay.
#[test]
fn ipv6_reply_is_named_per_connection() {
    if skip() {
        return;
    }
    let Some(mut lab) = ipv6_lab("v6") else {
        return;
    };
    lab.start_server();
    let scratch = Scratch::new("ipv6");
    let file = scratch.path("ipv6.rec");
    let watch = lab.watch(&["--events", "--record", &file]);
    let (status, lines, reset) = unnat_three_replies(&lab, watch);
    let found = assert_one_finding_per_connection_in(&IPV6, &lines, &reset, "reply_to_client");
    for f in found {
        assert_eq!(
            f["evidence"]["basis"][0], "client_rst_to_backend_address",
            "{f}"
        );
        let client = f["client"].as_str().unwrap();
        // The client's own reset of the backend's IPv6 address, no socket.
        let rst = between(&lines, "tcp_send_reset", client, &IPV6.backend());
        assert_eq!(rst.len(), 1, "{f}: {rst:?}");
        assert_eq!(rst[0]["socket"], false, "{rst:?}");
        // The IPv6 NAT mapping the finding rests on.
        let mapped = select(&lines, "event", Some("nat_mapping"))
            .into_iter()
            .filter(|e| e["client"] == client && e["service"] == IPV6.vip().as_str())
            .filter(|e| e["backend"] == IPV6.backend().as_str())
            .count();
        assert_eq!(mapped, 1, "{f}");
        assert_cause_cites_invalid(&status, &f);
    }
    assert_replay_matches(&status, &lines, &file);
}

/// The IPv6 side carrying ordinary traffic, connections refused through a
/// Service and without NAT, and application aborts: no finding.
#[test]
fn ipv6_control_gives_no_findings() {
    if skip() {
        return;
    }
    let Some(mut lab) = ipv6_lab("v6c") else {
        return;
    };
    lab.refusing_service();
    control(&mut lab, &[(IPV6.refusing_vip, 2223)]);
}
