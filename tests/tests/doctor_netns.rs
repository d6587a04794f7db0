//! `ktrace doctor` on the real kernel, in a network namespace of its own:
//! toggling the per-namespace conntrack sysctls (and, when the tools are
//! there, an INVALID-drop rule) flips the corresponding checks.
//!
//! Needs root and iproute2's `ip`; without them it prints why and passes.
//! It runs the ktrace binary, which it does not build: run
//! `cargo build -p ktrace` first (the binary is taken from
//! `$KTRACE_BIN`, else `<workspace>/target/debug/ktrace`).
//!
//! It only touches the namespace it creates (`ktr-doc-<pid>`), deletes it
//! even when an assertion fails (the guard's Drop), and sends no traffic.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};
use ktrace_tests::kube_proxy;
use serde_json::Value;

/// A network namespace created by this test, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create(name: String) -> Result<Netns> {
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .context("running ip netns add")?;
        if !out.status.success() {
            bail!(
                "ip netns add {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Netns { name })
    }

    /// Runs a command inside the namespace.
    fn exec(&self, args: &[&str]) -> Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .with_context(|| format!("ip netns exec {} {}", self.name, args.join(" ")))
    }

    /// Runs a command inside the namespace and requires success.
    fn run(&self, args: &[&str]) -> Result<()> {
        let out = self.exec(args)?;
        if !out.status.success() {
            bail!(
                "{} failed in {}: {}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.run(&["sysctl", "-q", "-w", &format!("{key}={value}")])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "doctor_netns: could not delete {}: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("doctor_netns: could not delete {}: {e}", self.name),
        }
    }
}

/// Whether `tool` is on PATH (the commands below are run by name).
fn in_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Why this test cannot run here, if it cannot.
fn skip_reason() -> Option<String> {
    match effective_uid() {
        Some(0) => {}
        Some(uid) => return Some(format!("not root (uid {uid})")),
        None => return Some("cannot tell the uid from /proc/self/status".into()),
    }
    for tool in ["ip", "sysctl"] {
        if !in_path(tool) {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    None
}

/// `ktrace doctor --json` in the namespace: exit code and checks by name.
fn doctor(ns: &Netns, bin: &Path) -> Result<(i32, BTreeMap<String, Value>)> {
    let bin = bin.to_str().context("binary path is not UTF-8")?;
    let out = ns.exec(&[bin, "doctor", "--json"])?;
    let code = out.status.code().context("ktrace was killed")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if code != 0 && code != 1 {
        bail!("ktrace doctor exited {code}: {stderr}");
    }
    let stdout = String::from_utf8(out.stdout).context("stdout is not UTF-8")?;
    let mut checks = BTreeMap::new();
    for line in stdout.lines() {
        let v: Value = serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        let name = v["check"].as_str().unwrap_or_default().to_string();
        checks.insert(name, v);
    }
    // The exit status follows the statuses (no --warn-fails).
    let any_fail = checks.values().any(|c| c["status"] == "fail");
    assert_eq!(code == 1, any_fail, "exit {code} vs checks:\n{stdout}");
    Ok((code, checks))
}

fn status<'a>(checks: &'a BTreeMap<String, Value>, name: &str) -> &'a str {
    checks
        .get(name)
        .and_then(|c| c["status"].as_str())
        .unwrap_or_else(|| panic!("no {name} check in {checks:?}"))
}

fn describe(checks: &BTreeMap<String, Value>, name: &str) -> String {
    checks
        .get(name)
        .map(|c| format!("{} / {} / {}", c["status"], c["value"], c["why"]))
        .unwrap_or_default()
}

/// Asserts `name`'s status, showing the check when it differs.
fn expect_status(checks: &BTreeMap<String, Value>, name: &str, want: &str) {
    assert_eq!(status(checks, name), want, "{}", describe(checks, name));
}

/// Runs doctor and asserts that `unnated_reply_protection` is ok because of
/// what `protected_by` names (be_liberal, or a rule's table and chain).
fn expect_protected_by(ns: &Netns, bin: &Path, protected_by: &str) -> Result<()> {
    let (_, c) = doctor(ns, bin)?;
    expect_status(&c, "unnated_reply_protection", "ok");
    let value = c["unnated_reply_protection"]["value"]
        .as_str()
        .unwrap_or("");
    assert!(
        value.contains(protected_by),
        "{value} names no {protected_by}"
    );
    Ok(())
}

/// A namespace of this test's own with conntrack loaded, and the binary;
/// `None` (the skip recorded) when the test cannot run here.
fn namespace_with_conntrack(tag: &str) -> Result<Option<(Netns, PathBuf)>> {
    if let Some(why) = skip_reason() {
        ktrace_tests::record_skip(&why);
        return Ok(None);
    }
    let bin = ktrace_tests::ktrace_bin();
    let ns = Netns::create(format!("ktr-{tag}-{}", std::process::id()))?;
    let probe = ns.exec(&["cat", "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal"])?;
    if !probe.status.success() {
        ktrace_tests::record_skip(
            "nf_conntrack is not loaded (no /proc/sys/net/netfilter in a new namespace)",
        );
        return Ok(None);
    }
    Ok(Some((ns, bin)))
}

/// Exposed to un-NATed replies, loose, long timeout: the checks say so, and
/// every check of the report is there.
fn baseline_fails_protection(ns: &Netns, bin: &Path) -> Result<()> {
    ns.sysctl(BE_LIBERAL, "0")?;
    ns.sysctl("net.netfilter.nf_conntrack_tcp_loose", "1")?;
    ns.sysctl(TIMEOUT_ESTABLISHED, "432000")?;
    ns.sysctl(KEEPALIVE, "7200")?;
    let (code, c) = doctor(ns, bin)?;
    expect_status(&c, "unnated_reply_protection", "fail");
    assert_eq!(code, 1);
    assert_eq!(status(&c, "conntrack_tcp_loose"), "ok");
    assert_eq!(status(&c, "conntrack_timeout_established"), "ok");
    expect_status(&c, "conntrack_usage", "ok");
    // The host's sysctl files do not apply to this namespace.
    assert!(
        ["ok", "unknown"].contains(&status(&c, "sysctl_load_order")),
        "{}",
        describe(&c, "sysctl_load_order")
    );
    for name in [
        "conntrack_buckets",
        "conntrack_counters",
        "hooks_btf",
        "hooks_symbols",
    ] {
        assert!(c.contains_key(name), "{name} missing");
    }
    Ok(())
}

/// tcp_loose=0 warns; an established timeout shorter than keepalive warns,
/// and a shorter keepalive (also per namespace) makes it ok again.
fn loose_and_timeouts_warn(ns: &Netns, bin: &Path) -> Result<()> {
    ns.sysctl("net.netfilter.nf_conntrack_tcp_loose", "0")?;
    let (_, c) = doctor(ns, bin)?;
    assert_eq!(status(&c, "conntrack_tcp_loose"), "warn");
    ns.sysctl("net.netfilter.nf_conntrack_tcp_loose", "1")?;

    ns.sysctl(TIMEOUT_ESTABLISHED, "3600")?;
    let (_, c) = doctor(ns, bin)?;
    expect_status(&c, "conntrack_timeout_established", "warn");
    ns.sysctl(KEEPALIVE, "600")?;
    let (_, c) = doctor(ns, bin)?;
    assert_eq!(status(&c, "conntrack_timeout_established"), "ok");
    assert_eq!(status(&c, "conntrack_tcp_loose"), "ok");
    Ok(())
}

/// With be_liberal=0, `ct state invalid drop` on an nftables forward chain
/// protects, and deleting its table fails the check again.
fn nftables_drop_protects(ns: &Netns, bin: &Path) -> Result<()> {
    if !in_path("nft") {
        ktrace_tests::record_skip("nftables part: nft is not installed");
        return Ok(());
    }
    let added = ns
        .run(&["nft", "add", "table", "inet", "ktrdoc"])
        .and_then(|_| {
            ns.run(&[
                "nft",
                "add chain inet ktrdoc ktrfwd { type filter hook forward priority 0 ; policy accept ; }",
            ])
        })
        .and_then(|_| ns.run(&["nft", "add rule inet ktrdoc ktrfwd ct state invalid drop"]));
    if let Err(e) = added {
        ktrace_tests::record_skip(&format!("nftables part: {e:#}"));
        return Ok(());
    }
    expect_protected_by(ns, bin, "nftables inet ktrdoc/ktrfwd")?;
    ns.run(&["nft", "delete", "table", "inet", "ktrdoc"])?;
    let (_, c) = doctor(ns, bin)?;
    assert_eq!(status(&c, "unnated_reply_protection"), "fail");
    println!("nftables part: `ct state invalid drop` on forward flips the check");
    Ok(())
}

/// With be_liberal=0, `--ctstate INVALID -j DROP` on FORWARD protects.
fn iptables_drop_protects(ns: &Netns, bin: &Path) -> Result<()> {
    if !in_path("iptables") {
        ktrace_tests::record_skip("iptables part: iptables is not installed");
        return Ok(());
    }
    let mut append = vec!["iptables", "-A", "FORWARD"];
    append.extend(INVALID_DROP);
    if let Err(e) = ns.run(&append) {
        ktrace_tests::record_skip(&format!("iptables part: {e:#}"));
        return Ok(());
    }
    expect_protected_by(ns, bin, "filter/FORWARD")?;
    println!("iptables part: `--ctstate INVALID -j DROP` on FORWARD flips the check");
    Ok(())
}

#[test]
fn doctor_checks_flip_with_namespace_sysctls() -> Result<()> {
    let Some((ns, bin)) = namespace_with_conntrack("doc")? else {
        return Ok(());
    };
    baseline_fails_protection(&ns, &bin)?;
    ns.sysctl(BE_LIBERAL, "1")?;
    expect_protected_by(&ns, &bin, "be_liberal=1")?;
    loose_and_timeouts_warn(&ns, &bin)?;
    ns.sysctl(BE_LIBERAL, "0")?;
    nftables_drop_protects(&ns, &bin)?;
    iptables_drop_protects(&ns, &bin)?;
    drop(ns);
    Ok(())
}

/// kube-proxy's iptables-mode rules that doctor looks for (as
/// `pkg/proxy/iptables/proxier.go` writes them): the Service portal chain
/// in `nat`, and `KUBE-FORWARD` with its ctstate INVALID drop in `filter`.
const IPTABLES_MODE: &str = r#"*filter
:KUBE-FORWARD - [0:0]
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -j ACCEPT
COMMIT
*nat
:KUBE-SERVICES - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
COMMIT
"#;

/// Runs doctor and checks `kube_proxy_mode`'s mode (`""`: none) and
/// `kube_proxy_invalid_drop`'s verdict and status; returns the checks.
fn expect_kube_proxy(
    ns: &Netns,
    bin: &Path,
    (mode, verdict, status): (&str, &str, &str),
) -> Result<BTreeMap<String, Value>> {
    let (_, c) = doctor(ns, bin)?;
    let got_mode = c["kube_proxy_mode"]["evidence"]["mode"]
        .as_str()
        .unwrap_or_default();
    let drop = &c["kube_proxy_invalid_drop"];
    assert_eq!(
        (got_mode, &drop["evidence"]["invalid_drop"], &drop["status"]),
        (mode, &Value::from(verdict), &Value::from(status)),
        "{}\n{}",
        describe(&c, "kube_proxy_mode"),
        describe(&c, "kube_proxy_invalid_drop")
    );
    Ok(c)
}

/// iptables mode: the rule in place; then gone (kube-proxy before 1.15, or
/// 1.29+ given be_liberal), exposed with be_liberal=0 and not with 1.
fn iptables_mode(ns: &Netns, bin: &Path) -> Result<()> {
    kube_proxy::feed(&ns.name, IPTABLES_RESTORE, IPTABLES_MODE);
    let c = expect_kube_proxy(ns, bin, ("iptables", "in_place", "ok"))?;
    assert_eq!(status(&c, "unnated_reply_protection"), "ok");
    let mut delete = vec!["iptables", "-D", "KUBE-FORWARD"];
    delete.extend(INVALID_DROP);
    ns.run(&delete)?;
    let c = expect_kube_proxy(ns, bin, ("iptables", "absent", "warn"))?;
    assert_eq!(status(&c, "unnated_reply_protection"), "fail");
    ns.sysctl(BE_LIBERAL, "1")?;
    expect_kube_proxy(ns, bin, ("iptables", "absent", "ok"))?;
    ns.sysctl(BE_LIBERAL, "0")?;
    for table in ["filter", "nat"] {
        ns.run(&["iptables", "-t", table, "-F"])?;
        ns.run(&["iptables", "-t", table, "-X"])?;
    }
    Ok(())
}

/// An IPv6-only node: kube-proxy's iptables-mode rules in ip6tables alone
/// name the mode, and their KUBE-FORWARD drop counts as in place.
fn ip6tables_mode(ns: &Netns, bin: &Path) -> Result<()> {
    let mut feed = Command::new("ip")
        .args(["netns", "exec", &ns.name, "ip6tables-restore", "--noflush"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    feed.stdin
        .take()
        .context("no stdin")?
        .write_all(IPTABLES_MODE.as_bytes())?;
    let out = feed.wait_with_output()?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        ktrace_tests::record_skip(&format!(
            "ip6tables mode part: ip6tables-restore failed (no IPv6 NAT in this kernel?): {}",
            why.trim()
        ));
        return Ok(());
    }
    let c = expect_kube_proxy(ns, bin, ("iptables", "in_place", "ok"))?;
    let signs = &c["kube_proxy_mode"]["evidence"]["signs"];
    assert!(
        signs.to_string().contains("ip6tables"),
        "the sign is ip6tables' KUBE-SERVICES: {signs}"
    );
    for table in ["filter", "nat"] {
        ns.run(&["ip6tables", "-t", table, "-F"])?;
        ns.run(&["ip6tables", "-t", table, "-X"])?;
    }
    Ok(())
}

/// nftables mode: no INVALID drop by design, so be_liberal decides.
fn nftables_mode(ns: &Netns, bin: &Path) -> Result<()> {
    let endpoints = ["10.0.1.2:2222".to_string()];
    let rules = kube_proxy::nftables_ruleset(&[kube_proxy::ServicePort {
        name: "payments/ledger",
        port_name: "grpc",
        vip: "10.96.0.10",
        port: 2222,
        endpoints: &endpoints,
    }]);
    kube_proxy::feed(&ns.name, &["nft", "-f", "-"], &rules);
    let c = expect_kube_proxy(ns, bin, ("nftables", "none_by_design", "warn"))?;
    let fix = c["kube_proxy_invalid_drop"]["fix"].as_str().unwrap_or("");
    assert!(fix.contains("be_liberal=1"), "{fix}");
    assert_eq!(status(&c, "unnated_reply_protection"), "fail");
    ns.sysctl(BE_LIBERAL, "1")?;
    let c = expect_kube_proxy(ns, bin, ("nftables", "none_by_design", "ok"))?;
    assert_eq!(status(&c, "unnated_reply_protection"), "ok");
    ns.sysctl(BE_LIBERAL, "0")?;
    ns.run(&["nft", "delete", "table", "ip", "kube-proxy"])
}

/// IPVS mode: the Service addresses on kube-ipvs0, the Service portal
/// chain and KUBE-FORWARD beside it. This kernel may lack the dummy driver
/// (and ip_vs, so no /proc/net/ip_vs): a veth named kube-ipvs0 stands in,
/// since doctor goes by the interface's name.
fn ipvs_mode(ns: &Netns, bin: &Path) -> Result<()> {
    if ns
        .run(&["ip", "link", "add", "kube-ipvs0", "type", "dummy"])
        .is_err()
    {
        let veth = "type veth peer name kipvs-peer";
        let mut args = vec!["ip", "link", "add", "kube-ipvs0"];
        args.extend(veth.split(' '));
        ns.run(&args)?;
    }
    kube_proxy::feed(&ns.name, IPTABLES_RESTORE, IPTABLES_MODE);
    expect_kube_proxy(ns, bin, ("ipvs", "in_place", "ok")).map(drop)
}

const BE_LIBERAL: &str = "net.netfilter.nf_conntrack_tcp_be_liberal";
const TIMEOUT_ESTABLISHED: &str = "net.netfilter.nf_conntrack_tcp_timeout_established";
const KEEPALIVE: &str = "net.ipv4.tcp_keepalive_time";
/// The iptables match and verdict of an INVALID drop.
const INVALID_DROP: [&str; 6] = ["-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"];
const IPTABLES_RESTORE: &[&str] = &["iptables-restore", "--noflush"];

/// `ktrace doctor` in a namespace set up as each of kube-proxy's modes
/// reports that mode and the mode's INVALID-drop verdict; the kernel and
/// insert-race checks are there, and sampled.
#[test]
fn doctor_names_the_kube_proxy_mode() -> Result<()> {
    let Some((ns, bin)) = namespace_with_conntrack("dkp")? else {
        return Ok(());
    };
    ns.sysctl(BE_LIBERAL, "0")?;
    let c = expect_kube_proxy(&ns, &bin, ("", "no_kube_proxy", "ok"))?;
    assert_eq!(status(&c, "kube_proxy_mode"), "ok");
    expect_status(&c, "kernel_conntrack", "ok");
    let race = &c["conntrack_insert_race"];
    assert_eq!(race["status"], "ok", "{race}");
    let secs = race["evidence"]["sample_secs"].as_f64().unwrap_or(0.0);
    assert!(secs >= 0.9, "a live audit samples for a second: {race}");

    if !in_path("iptables-restore") {
        ktrace_tests::record_skip(
            "iptables and IPVS mode parts: iptables-restore is not installed",
        );
    } else {
        iptables_mode(&ns, &bin)?;
    }
    if in_path("ip6tables-restore") {
        ip6tables_mode(&ns, &bin)?;
    } else {
        ktrace_tests::record_skip("ip6tables mode part: ip6tables-restore is not installed");
    }
    if kube_proxy::have_nft() {
        nftables_mode(&ns, &bin)?;
    } else {
        ktrace_tests::record_skip("nftables mode part: nft is not installed");
    }
    if in_path("iptables-restore") {
        ipvs_mode(&ns, &bin)?;
    }
    drop(ns);
    Ok(())
}
