//! Kubernetes names in findings (issue 15), from kube-proxy's own rules:
//! the lab's Service installed in the node namespace as kube-proxy installs
//! it (iptables mode: KUBE-SERVICES / KUBE-SVC / KUBE-SEP chains with their
//! comments; nftables mode: the `kube-proxy` table), the un-NATed reply
//! incident run through it, and the findings, live and replayed, checked
//! for the names. Needs root; skipped (saying so) otherwise.

use std::time::Duration;

use ktrace_tests::kube_proxy::{self, iptables_rules, lab_with_rules, IPTABLES_RESTORE, SERVICE};
use ktrace_tests::{
    json_lines, ktrace_output, record_skip, select, skip, Lab, Scratch, BACKENDS, CLIENT_IP, VIP,
};
use serde_json::Value;

/// kube-proxy's nftables-mode table for the same Service.
fn nft_rules(backend: &str) -> String {
    kube_proxy::nftables_ruleset(&[kube_proxy::ServicePort {
        name: "payments/ledger",
        port_name: "grpc",
        vip: VIP,
        port: 2222,
        endpoints: &[format!("{backend}:2222")],
    }])
}

/// Runs the un-NATed reply incident (3 connections) under `watch`, with a
/// recording; returns the live output and the replayed one.
fn incident(lab: &mut Lab, scratch: &Scratch) -> (Value, Vec<Value>, Vec<Value>) {
    lab.start_server();
    let rec = scratch.path("names.ktr");
    let watch = lab.watch(&["--record", &rec]);
    let mut c = lab.client(3);
    let reset = c.unnat_all(Duration::from_millis(1000));
    assert_eq!(reset.len(), 3, "every connection dies: {reset:?}");
    assert!(
        watch.wait_count(Duration::from_secs(5), "finding", Some("unnated_reply"), 3),
        "unnated_reply findings did not arrive in time"
    );
    let status = watch.status.clone();
    let lines = watch.stop();
    let out = ktrace_output(&["replay", &rec, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (status, lines, json_lines(&out.stdout))
}

fn names_source<'a>(status: &'a Value, source: &str) -> &'a Value {
    status["names"]
        .as_array()
        .unwrap_or_else(|| panic!("no names in {status}"))
        .iter()
        .find(|s| s["source"] == source)
        .unwrap_or_else(|| panic!("no {source} in {status}"))
}

/// Every finding names the Service and its endpoint; the client, which
/// nothing names, stays an address.
fn check_findings(lines: &[Value], what: &str) {
    let f = select(lines, "finding", Some("unnated_reply"));
    assert_eq!(f.len(), 3, "{what}: {lines:?}");
    for f in f {
        assert_eq!(f["service"], format!("{VIP}:2222"), "{what}: {f}");
        assert_eq!(f["service_name"], SERVICE, "{what}: {f}");
        assert_eq!(f["backend"], format!("{}:2222", BACKENDS[0]), "{what}: {f}");
        assert_eq!(f["backend_service"], SERVICE, "{what}: {f}");
        assert!(f["client"].as_str().unwrap().starts_with(CLIENT_IP), "{f}");
        assert!(
            f.get("client_name").is_none(),
            "{what}: unnamed client named: {f}"
        );
        // The names sit right after the addresses, before cause.
        let keys: Vec<&String> = f.as_object().unwrap().keys().collect();
        let at = |k: &str| keys.iter().position(|x| *x == k).unwrap();
        assert!(
            at("client") < at("service_name") && at("backend_service") < at("cause"),
            "{f}"
        );
    }
}

#[test]
fn kube_proxy_iptables_rules_name_the_incident() {
    if skip() {
        return;
    }
    let mut lab = lab_with_rules("ni", IPTABLES_RESTORE, &iptables_rules(BACKENDS[0]));
    let scratch = Scratch::new("names-ipt");
    let (status, live, replayed) = incident(&mut lab, &scratch);

    let rules = names_source(&status, "kube-proxy-rules");
    assert_eq!(rules["state"], "live", "{rules}");
    assert_eq!(rules["mode"], "iptables", "{rules}");
    assert_eq!(rules["services"], 1, "{rules}");
    assert_eq!(rules["endpoints"], 1, "{rules}");
    assert_eq!(
        rules["skipped"], 1,
        "the malformed rule is counted: {rules}"
    );
    let api = names_source(&status, "kubernetes-api");
    assert_eq!(api["state"], "off", "{api}");
    assert!(
        api["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{api}"
    );

    check_findings(&live, "live");
    check_findings(&replayed, "replayed");
}

#[test]
fn kube_proxy_nftables_rules_name_the_incident() {
    if skip() {
        return;
    }
    if !kube_proxy::have_nft() {
        record_skip("nft is not installed: the nftables mode of kube-proxy cannot be set up");
        return;
    }
    let mut lab = lab_with_rules("nn", &["nft", "-f", "-"], &nft_rules(BACKENDS[0]));
    let scratch = Scratch::new("names-nft");
    let (status, live, replayed) = incident(&mut lab, &scratch);

    let rules = names_source(&status, "kube-proxy-rules");
    assert_eq!(rules["state"], "live", "{rules}");
    assert_eq!(rules["mode"], "nftables", "{rules}");
    assert_eq!(rules["services"], 1, "{rules}");
    assert_eq!(rules["endpoints"], 1, "{rules}");
    check_findings(&live, "live");
    check_findings(&replayed, "replayed");
}

/// `--no-kube-names`: the same rules, findings with addresses only.
#[test]
fn no_kube_names_prints_addresses_only() {
    if skip() {
        return;
    }
    let mut lab = lab_with_rules("nx", IPTABLES_RESTORE, &iptables_rules(BACKENDS[0]));
    lab.start_server();
    let watch = lab.watch(&["--no-kube-names"]);
    assert!(watch.status.get("names").is_none(), "{}", watch.status);
    let mut c = lab.client(1);
    assert_eq!(c.unnat_all(Duration::from_millis(1000)).len(), 1);
    assert!(watch.wait_count(Duration::from_secs(5), "finding", None, 1));
    let lines = watch.stop();
    for f in select(&lines, "finding", None) {
        assert!(
            f.get("service_name").is_none() && f.get("backend_service").is_none(),
            "{f}"
        );
    }
}

/// `record` runs no engine: it stores the names of its events' addresses,
/// and `replay` of its recording elsewhere names the findings.
#[test]
fn record_stores_names_for_replay() {
    if skip() {
        return;
    }
    let mut lab = lab_with_rules("nr", IPTABLES_RESTORE, &iptables_rules(BACKENDS[0]));
    lab.start_server();
    let scratch = Scratch::new("names-rec");
    let file = scratch.path("rec.ktr");
    let rec = ktrace_tests::Running::start(&lab.node, &["record", "--json", "--output", &file]);
    let mut c = lab.client(2);
    assert_eq!(c.unnat_all(Duration::from_millis(1000)).len(), 2);
    std::thread::sleep(Duration::from_millis(1000));
    rec.stop();
    let out = ktrace_output(&["replay", &file, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = json_lines(&out.stdout);
    let f = select(&lines, "finding", Some("unnated_reply"));
    assert_eq!(f.len(), 2, "{lines:?}");
    for f in f {
        assert_eq!(f["service_name"], SERVICE, "{f}");
        assert_eq!(f["backend_service"], SERVICE, "{f}");
    }
}
