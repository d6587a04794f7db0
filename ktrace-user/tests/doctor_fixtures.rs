//! `ktrace doctor --root <fixture> --json` over the fixture trees in
//! `tests/fixtures/doctor/`: every check, both ways, plus malformed and
//! missing inputs (which must give `unknown`, never a crash).
//!
//! Fixtures:
//! - `healthy`: every check ok (fentry is `unknown` offline);
//! - `exposed`: every check warns or fails;
//! - `rules_*`: the INVALID-drop rule from iptables-legacy, `iptables-save`
//!   (nf_tables variant), native nftables, rules that do not count, and a
//!   dump without rulesets;
//! - `no_conntrack`: nf_conntrack not loaded, with a netfilter key in sysctl.d;
//! - `modules_listed`: a mismatch while nf_conntrack is in `/etc/modules`;
//! - `ipvs_draining`, `ipvs_old_kernel_reuse`: IPVS variants;
//! - `malformed`: every input garbled; `empty`: nothing at all.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/doctor")
        .join(name)
}

struct Run {
    code: i32,
    checks: BTreeMap<String, Value>,
    stdout: String,
}

impl Run {
    fn status(&self, check: &str) -> &str {
        self.checks
            .get(check)
            .unwrap_or_else(|| panic!("no check {check} in:\n{}", self.stdout))["status"]
            .as_str()
            .unwrap_or("?")
    }

    fn field(&self, check: &str, field: &str) -> String {
        self.checks[check][field].as_str().unwrap_or("").to_string()
    }
}

fn doctor(name: &str, extra: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_ktrace"))
        .arg("doctor")
        .arg("--root")
        .arg(fixture(name))
        .arg("--json")
        .args(extra)
        .output()
        .expect("run ktrace");
    let stdout = String::from_utf8(out.stdout).expect("stdout is UTF-8");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let code = out.status.code().expect("exited, not killed");
    assert!(
        code == 0 || code == 1,
        "{name}: exit {code}, stderr:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{name}: {stderr}");
    let mut checks = BTreeMap::new();
    for line in stdout.lines() {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{name}: not JSON ({e}): {line}"));
        assert_eq!(v["type"], "check", "{line}");
        for f in ["check", "status", "value", "expected", "why", "fix"] {
            assert!(v[f].is_string(), "{name}: {f} missing in {line}");
        }
        let status = v["status"].as_str().unwrap_or("");
        assert!(
            ["ok", "warn", "fail", "unknown"].contains(&status),
            "{line}"
        );
        if status != "ok" {
            assert!(
                !v["why"].as_str().unwrap_or("").is_empty(),
                "{name}: no why: {line}"
            );
        }
        let name = v["check"].as_str().unwrap_or("").to_string();
        assert!(
            checks.insert(name, v).is_none(),
            "duplicate check in {stdout}"
        );
    }
    Run {
        code,
        checks,
        stdout,
    }
}

fn assert_statuses(run: &Run, name: &str, want: &[(&str, &str)]) {
    let mut wrong = Vec::new();
    for (check, status) in want {
        if run.status(check) != *status {
            wrong.push(format!(
                "{check}: {} (want {status}): {} / {}",
                run.status(check),
                run.field(check, "value"),
                run.field(check, "why")
            ));
        }
    }
    assert!(wrong.is_empty(), "{name}:\n{}", wrong.join("\n"));
}

const ALL_CONNTRACK: &[&str] = &[
    "conntrack_usage",
    "conntrack_buckets",
    "conntrack_counters",
    "conntrack_timeout_established",
    "conntrack_tcp_loose",
];

#[test]
fn doctor_healthy_node_is_all_ok() {
    let r = doctor("healthy", &[]);
    assert_statuses(
        &r,
        "healthy",
        &[
            ("unnated_reply_protection", "ok"),
            ("kube_proxy_mode", "ok"),
            ("kube_proxy_invalid_drop", "ok"),
            ("kernel_conntrack", "ok"),
            ("sysctl_load_order", "ok"),
            ("conntrack_usage", "ok"),
            ("conntrack_buckets", "ok"),
            ("conntrack_counters", "ok"),
            ("conntrack_insert_race", "ok"),
            ("conntrack_timeout_established", "ok"),
            ("conntrack_tcp_loose", "ok"),
            ("ipvs_expire_quiescent_template", "ok"),
            ("ipvs_expire_nodest_conn", "ok"),
            ("ipvs_conntrack", "ok"),
            ("ipvs_conn_reuse_mode", "ok"),
            ("ipvs_weight0_backends", "ok"),
            ("hooks_btf", "ok"),
            ("hooks_kprobes", "ok"),
            ("hooks_fentry", "unknown"),
            ("hooks_tracepoints", "ok"),
            ("hooks_symbols", "ok"),
            ("hooks_ip_vs_btf", "ok"),
        ],
    );
    assert_eq!(r.checks.len(), 22, "{}", r.stdout);
    assert!(!r.checks.contains_key("ipvs"));
    // IPVS virtual services beside KUBE-SERVICES: the IPVS mode, whose
    // KUBE-FORWARD drops INVALID.
    assert!(r.field("kube_proxy_mode", "value").starts_with("ipvs"));
    assert!(r
        .field("kube_proxy_invalid_drop", "value")
        .starts_with("in place"));
    assert_eq!(r.code, 0);
    // The /etc file masks the /usr/lib one of the same name.
    assert!(r
        .field("sysctl_load_order", "value")
        .contains("4 configured"));
    assert!(r.field("hooks_tracepoints", "why").contains("6.10+ layout"));
    assert_eq!(
        r.checks["conntrack_counters"]["evidence"]["totals"]["invalid"],
        5
    );
    assert_eq!(r.checks["conntrack_counters"]["evidence"]["cpus"], 2);
    // --warn-fails changes nothing when nothing warns.
    assert_eq!(doctor("healthy", &["--warn-fails"]).code, 0);
}

#[test]
fn doctor_exposed_node_warns_and_fails_everywhere() {
    let r = doctor("exposed", &[]);
    assert_statuses(
        &r,
        "exposed",
        &[
            ("unnated_reply_protection", "fail"),
            ("sysctl_load_order", "fail"),
            ("conntrack_usage", "fail"),
            ("conntrack_buckets", "warn"),
            ("conntrack_counters", "warn"),
            ("conntrack_timeout_established", "warn"),
            ("conntrack_tcp_loose", "warn"),
            ("ipvs_expire_quiescent_template", "warn"),
            ("ipvs_expire_nodest_conn", "warn"),
            ("ipvs_conntrack", "warn"),
            ("ipvs_conn_reuse_mode", "warn"),
            ("ipvs_weight0_backends", "fail"),
            ("hooks_btf", "warn"),
            ("hooks_kprobes", "warn"),
            ("hooks_fentry", "ok"),
            ("hooks_tracepoints", "warn"),
            ("hooks_symbols", "warn"),
            ("hooks_ip_vs_btf", "warn"),
        ],
    );
    assert_eq!(r.code, 1);
    let why = r.field("sysctl_load_order", "why");
    assert!(
        why.contains("nf_conntrack loaded after systemd-sysctl"),
        "{why}"
    );
    assert!(r
        .field("sysctl_load_order", "fix")
        .contains("/etc/modules-load.d/"));
    assert!(r
        .field("ipvs_weight0_backends", "value")
        .contains("10.244.1.2:8080"));
    assert!(r
        .field("ipvs_weight0_backends", "value")
        .contains("persistent"));
    assert!(r.field("hooks_tracepoints", "why").contains("pre-6.10"));
    assert!(r
        .field("hooks_symbols", "why")
        .contains("nf_conntrack_tcp_packet"));
    // The orphan nft rule is reported but does not protect.
    assert!(r
        .field("unnated_reply_protection", "why")
        .contains("orphan"));
    let ev = &r.checks["conntrack_counters"]["evidence"]["totals"];
    assert_eq!(
        (ev["drop"].as_u64(), ev["invalid"].as_u64()),
        (Some(7), Some(42))
    );
}

#[test]
fn doctor_invalid_drop_rule_protects_from_each_source() {
    for (name, source) in [
        ("rules_legacy", "iptables-legacy"),
        ("rules_iptables_save_nft", "iptables-nft"),
        ("rules_nft", "nftables"),
    ] {
        let r = doctor(name, &[]);
        assert_statuses(&r, name, &[("unnated_reply_protection", "ok")]);
        let value = r.field("unnated_reply_protection", "value");
        assert!(value.contains("be_liberal=0"), "{name}: {value}");
        assert!(value.contains(source), "{name}: {value}");
        let rules = &r.checks["unnated_reply_protection"]["evidence"]["invalid_drop_rules"];
        assert!(
            rules.as_array().is_some_and(|a| !a.is_empty()),
            "{name}: {rules}"
        );
    }
}

#[test]
fn doctor_rules_that_do_not_protect_are_not_counted() {
    let r = doctor("rules_unreachable", &[]);
    assert_statuses(
        &r,
        "rules_unreachable",
        &[("unnated_reply_protection", "fail")],
    );
    assert_eq!(r.code, 1);
    let rules = r.checks["unnated_reply_protection"]["evidence"]["invalid_drop_rules"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    // OUTPUT, UNUSED, raw PREROUTING, ip6 forward and the raw-priority nft chain.
    assert_eq!(rules.len(), 5, "{rules:?}");
    assert!(rules.iter().all(|d| {
        d["family"] == "ip6" || d["reached_from"].as_array().is_some_and(|a| a.is_empty())
    }));
}

#[test]
fn doctor_rulesets_not_captured_is_unknown() {
    let r = doctor("rules_not_captured", &[]);
    assert_statuses(
        &r,
        "rules_not_captured",
        &[("unnated_reply_protection", "unknown")],
    );
    assert!(r
        .field("unnated_reply_protection", "why")
        .contains("not captured"));
    assert_eq!(r.code, 0);
}

#[test]
fn doctor_without_nf_conntrack_explains_instead_of_failing() {
    let r = doctor("no_conntrack", &[]);
    let mut want: Vec<(&str, &str)> = ALL_CONNTRACK.iter().map(|c| (*c, "unknown")).collect();
    want.push(("unnated_reply_protection", "unknown"));
    want.push(("ipvs", "ok"));
    // be_liberal=1 configured but the key does not exist: the trap itself.
    want.push(("sysctl_load_order", "fail"));
    assert_statuses(&r, "no_conntrack", &want);
    for c in ALL_CONNTRACK {
        assert_eq!(r.field(c, "value"), "nf_conntrack not loaded");
        assert!(r.field(c, "why").contains("not loaded"));
    }
    assert!(r
        .field("sysctl_load_order", "value")
        .contains("absent live"));
    assert!(r
        .field("sysctl_load_order", "why")
        .contains("is not loaded now"));
}

#[test]
fn doctor_mismatch_with_module_listed_blames_a_runtime_change() {
    let r = doctor("modules_listed", &[]);
    assert_statuses(
        &r,
        "modules_listed",
        &[("sysctl_load_order", "warn"), ("ipvs", "ok")],
    );
    assert!(r.field("sysctl_load_order", "why").contains("/etc/modules"));
    assert!(r
        .field("sysctl_load_order", "why")
        .contains("not the cause"));
    assert_eq!(r.code, 0, "warnings alone exit 0");
    assert_eq!(doctor("modules_listed", &["--warn-fails"]).code, 1);
}

#[test]
fn doctor_ipvs_variants() {
    let r = doctor("ipvs_draining", &[]);
    assert_statuses(
        &r,
        "ipvs_draining",
        &[
            ("ipvs_weight0_backends", "warn"),
            ("ipvs_expire_quiescent_template", "ok"),
            ("hooks_ip_vs_btf", "warn"),
        ],
    );
    let drained = r.checks["ipvs_weight0_backends"]["evidence"]["weight0_with_connections"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(drained.len(), 2);
    assert_eq!(drained[1]["real_server"], "[fd00::2]:53");

    let r = doctor("ipvs_old_kernel_reuse", &[]);
    assert_statuses(
        &r,
        "ipvs_old_kernel_reuse",
        &[
            ("ipvs_conn_reuse_mode", "warn"),
            ("ipvs_weight0_backends", "ok"),
        ],
    );
    assert!(r.field("ipvs_conn_reuse_mode", "why").contains("5.9"));
}

#[test]
fn doctor_malformed_inputs_are_unknown() {
    let r = doctor("malformed", &[]);
    let mut want: Vec<(&str, &str)> = ALL_CONNTRACK.iter().map(|c| (*c, "unknown")).collect();
    want.extend([
        ("unnated_reply_protection", "unknown"),
        ("sysctl_load_order", "unknown"),
        ("ipvs_expire_quiescent_template", "unknown"),
        ("ipvs_expire_nodest_conn", "unknown"),
        ("ipvs_conntrack", "unknown"),
        ("ipvs_conn_reuse_mode", "unknown"),
        ("ipvs_weight0_backends", "unknown"),
        ("hooks_symbols", "unknown"),
    ]);
    assert_statuses(&r, "malformed", &want);
    assert_eq!(r.code, 0);
    assert!(r.field("conntrack_tcp_loose", "why").contains("not UTF-8"));
    assert!(r
        .field("conntrack_timeout_established", "why")
        .contains("cannot read"));
    assert!(r.field("conntrack_counters", "why").contains("fields"));
    // The human view survives it too (control characters included).
    let out = Command::new(env!("CARGO_BIN_EXE_ktrace"))
        .args(["doctor", "--root"])
        .arg(fixture("malformed"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(!out.stdout.contains(&0u8));
}

#[test]
fn doctor_empty_dump_is_unknown_not_a_crash() {
    let r = doctor("empty", &[]);
    let unknown: Vec<(&str, &str)> = r.checks.keys().map(|k| (k.as_str(), "unknown")).collect();
    assert_statuses(&r, "empty", &unknown);
    assert_eq!(r.checks.len(), 18, "{}", r.stdout);
    assert_eq!(r.code, 0);
    assert_eq!(doctor("empty", &["--warn-fails"]).code, 0);
}

#[test]
fn doctor_sample_gives_rates() {
    let r = doctor("healthy", &["--sample", "0.2"]);
    assert_statuses(&r, "healthy+sample", &[("conntrack_counters", "ok")]);
    let ev = &r.checks["conntrack_counters"]["evidence"];
    assert!(ev["sample_secs"].as_f64().is_some_and(|s| s >= 0.2), "{ev}");
    assert_eq!(ev["rates_per_sec"]["drop"], 0.0);
    assert!(r.field("conntrack_counters", "value").contains("/s)"));
    // The same two reads decide the insert race: nothing rose.
    let race = &r.checks["conntrack_insert_race"];
    assert_eq!(race["status"], "ok", "{race}");
    assert_eq!(race["evidence"]["insert_failed_rise"], 0, "{race}");
}

#[test]
fn doctor_usage_errors() {
    let bin = env!("CARGO_BIN_EXE_ktrace");
    let out = Command::new(bin)
        .args(["doctor", "--root", "/nonexistent/ktrace-dump-root"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("not a directory"), "{err}");
    for bad in ["-1", "nan", "soon", "1e9"] {
        let out = Command::new(bin)
            .args(["doctor", "--sample", bad])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "--sample {bad}");
    }
}
