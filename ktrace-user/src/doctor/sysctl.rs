//! Sysctl checks:
//! - check 2, `sysctl_load_order`: a `net.netfilter.*` (also
//!   `net.nf_conntrack_max`, `net.ipv4.vs.*`, `net.bridge.*`) key set in the
//!   sysctl files whose live value differs. systemd-sysctl applies the files
//!   early at boot; a key of a module that is not loaded yet does not exist
//!   then, and the module comes up later with its defaults.
//! - check 4, `conntrack_timeout_established` against
//!   `net.ipv4.tcp_keepalive_time`, and `conntrack_tcp_loose`.
//!
//! Sysctl files are read in systemd-sysctl's order: `*.conf` of
//! `/etc/sysctl.d`, `/run/sysctl.d`, `/usr/local/lib/sysctl.d`,
//! `/usr/lib/sysctl.d`, `/lib/sysctl.d` sorted by file name (a name in an
//! earlier directory masks the same name in later ones), then
//! `/etc/sysctl.conf` (as `sysctl --system` does); the last assignment wins.

use std::collections::BTreeMap;

use serde_json::json;

use super::{sysctl_dotted, Check, Conntrack, Ctx, Fs, ReadError, Status};

const SYSCTL_DIRS: &[&str] = &[
    "/etc/sysctl.d",
    "/run/sysctl.d",
    "/usr/local/lib/sysctl.d",
    "/usr/lib/sysctl.d",
    "/lib/sysctl.d",
];

const MODULES_LOAD_DIRS: &[&str] = &[
    "/etc/modules-load.d",
    "/run/modules-load.d",
    "/usr/local/lib/modules-load.d",
    "/usr/lib/modules-load.d",
    "/lib/modules-load.d",
];

/// A value configured in a sysctl file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Configured {
    pub value: String,
    /// `path:line` where it was set (the last assignment).
    pub at: String,
}

/// The `*.conf` files of `dirs`, by file name, a name in an earlier
/// directory masking the same name in later ones (systemd's rule).
fn conf_files(fs: &Fs, dirs: &[&str]) -> Vec<String> {
    let mut by_name: BTreeMap<String, String> = BTreeMap::new();
    for dir in dirs {
        for name in fs
            .list_dir(dir)
            .into_iter()
            .filter(|n| n.ends_with(".conf"))
        {
            by_name
                .entry(name.clone())
                .or_insert(format!("{dir}/{name}"));
        }
    }
    by_name.into_values().collect()
}

/// The sysctl files under the root, in application order.
pub fn sysctl_files(fs: &Fs) -> Vec<String> {
    let mut files = conf_files(fs, SYSCTL_DIRS);
    if fs.exists("/etc/sysctl.conf") {
        files.push("/etc/sysctl.conf".to_string());
    }
    files
}

/// Parses one sysctl file into `key → value` (dotted keys), in order.
/// Lines: `key = value`, comments `#` or `;`, a leading `-` (ignore errors).
/// Keys with glob characters are skipped.
pub fn parse_sysctl_conf(text: &str) -> Vec<(String, String, usize)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let k = k.trim().trim_start_matches('-').trim();
        if k.is_empty() || k.contains(['*', '?', '[']) || k.contains(char::is_whitespace) {
            continue;
        }
        out.push((sysctl_dotted(k), normalize(v), i + 1));
    }
    out
}

fn normalize(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The module whose keys these are, for keys that need one.
pub fn module_of(key: &str) -> Option<&'static str> {
    if key.starts_with("net.netfilter.") || key == "net.nf_conntrack_max" {
        Some("nf_conntrack")
    } else if key.starts_with("net.ipv4.vs.") {
        Some("ip_vs")
    } else if key.starts_with("net.bridge.") {
        Some("br_netfilter")
    } else {
        None
    }
}

/// Modules named in modules-load.d files (and Debian's `/etc/modules`),
/// with the file that names them.
pub fn modules_loaded_at_boot(fs: &Fs) -> BTreeMap<String, String> {
    let mut paths = conf_files(fs, MODULES_LOAD_DIRS);
    paths.push("/etc/modules".into());
    let mut out = BTreeMap::new();
    for p in paths {
        let Ok(text) = fs.read(&p) else { continue };
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(m) = line.split_whitespace().next() {
                out.entry(m.replace('-', "_")).or_insert(p.clone());
            }
        }
    }
    out
}

/// One key whose configured value is not the live one.
#[derive(Debug, Clone, serde::Serialize)]
struct Mismatch {
    key: String,
    module: &'static str,
    configured: String,
    at: String,
    /// `None` when the key does not exist now.
    live: Option<String>,
    /// A protective setting that is not in effect.
    critical: bool,
}

const LOAD_ORDER: &str = "sysctl_load_order";
const LOAD_ORDER_EXPECTED: &str = "every net.netfilter.* / net.ipv4.vs.* / net.bridge.* value in the sysctl files is the live value";

/// Check 2: the module-load-order trap.
pub fn check_load_order(ctx: &Ctx) -> Check {
    let fs = &ctx.fs;
    let files = sysctl_files(fs);
    if files.is_empty() {
        return Check::unknown(
            LOAD_ORDER,
            format!(
                "no sysctl configuration under {} (no /etc/sysctl.conf, no */sysctl.d/*.conf)",
                fs.root().display()
            ),
        );
    }
    let (configured, unreadable) = module_keys_configured(fs, &files);
    let unreadable_note = if unreadable.is_empty() {
        String::new()
    } else {
        format!(" Unreadable: {}.", unreadable.join("; "))
    };
    if configured.is_empty() {
        let (status, value) = if unreadable.is_empty() {
            (Status::Ok, "no module-dependent keys configured")
        } else {
            (Status::Unknown, "sysctl files unreadable")
        };
        return Check::new(LOAD_ORDER, status, value)
            .expected(LOAD_ORDER_EXPECTED)
            .why(format!(
                "the sysctl files ({}) set no net.netfilter.*, net.nf_conntrack_max, \
                 net.ipv4.vs.* or net.bridge.* key.{unreadable_note}",
                files.len()
            ))
            .evidence(json!({"files": files}));
    }
    if ctx.initial_netns == Some(false) {
        return Check::new(LOAD_ORDER, Status::Unknown, "not the initial network namespace")
            .expected(LOAD_ORDER_EXPECTED)
            .why(
                "ktrace runs in a network namespace other than the host's: the sysctl files \
                 were applied to the initial namespace, so per-namespace keys here are not \
                 expected to match them",
            )
            .fix("run ktrace doctor in the host's network namespace (hostNetwork: true)")
            .evidence(json!({"configured": configured.iter().map(|(k, c)| json!({"key": k, "value": c.value, "at": c.at})).collect::<Vec<_>>()}));
    }

    let boot_modules = modules_loaded_at_boot(fs);
    let cmp = compare_live(fs, &configured);
    let evidence = json!({
        "files": files,
        "configured": configured.len(),
        "matching": cmp.matching,
        "mismatches": cmp.mismatches,
        "modules_load_d": boot_modules,
        "errors": cmp.errors,
    });
    if cmp.mismatches.is_empty() {
        let status = if cmp.errors.is_empty() && unreadable.is_empty() {
            Status::Ok
        } else {
            Status::Unknown
        };
        let err_note = if cmp.errors.is_empty() {
            String::new()
        } else {
            format!(" Could not compare: {}.", cmp.errors.join("; "))
        };
        return Check::new(
            LOAD_ORDER,
            status,
            format!("{} configured key(s) in effect", cmp.matching),
        )
        .expected(LOAD_ORDER_EXPECTED)
        .why(format!(
            "every module-dependent key set in the sysctl files has its configured value \
             live.{err_note}{unreadable_note}"
        ))
        .evidence(evidence);
    }
    mismatch_check(ctx, &cmp.mismatches, &boot_modules, &unreadable_note).evidence(evidence)
}

/// The module-dependent keys the sysctl files set (last assignment wins),
/// and the files that could not be read.
fn module_keys_configured(
    fs: &Fs,
    files: &[String],
) -> (BTreeMap<String, Configured>, Vec<String>) {
    let mut configured = BTreeMap::new();
    let mut unreadable = Vec::new();
    for f in files {
        match fs.read(f) {
            Ok(text) => {
                for (k, v, line) in parse_sysctl_conf(&text) {
                    if module_of(&k).is_some() {
                        let at = format!("{f}:{line}");
                        configured.insert(k, Configured { value: v, at });
                    }
                }
            }
            Err(e) => unreadable.push(e.to_string()),
        }
    }
    (configured, unreadable)
}

/// Configured against live values.
struct Comparison {
    matching: usize,
    mismatches: Vec<Mismatch>,
    /// Keys whose live value could not be read.
    errors: Vec<String>,
}

fn compare_live(fs: &Fs, configured: &BTreeMap<String, Configured>) -> Comparison {
    let mut cmp = Comparison {
        matching: 0,
        mismatches: Vec::new(),
        errors: Vec::new(),
    };
    for (key, conf) in configured {
        let Some(module) = module_of(key) else {
            continue;
        };
        let live = match fs.sysctl(key) {
            Ok(v) => Some(normalize(&v)),
            Err(ReadError::Missing { .. }) => None,
            Err(e) => {
                cmp.errors.push(format!("{key}: {e}"));
                continue;
            }
        };
        if live.as_deref() == Some(conf.value.as_str()) {
            cmp.matching += 1;
            continue;
        }
        let critical = match key.as_str() {
            "net.netfilter.nf_conntrack_tcp_be_liberal" => {
                conf.value != "0" && live.as_deref().is_none_or(|l| l == "0")
            }
            "net.bridge.bridge-nf-call-iptables" | "net.bridge.bridge-nf-call-ip6tables" => {
                conf.value == "1" && live.as_deref() != Some("1")
            }
            _ => false,
        };
        cmp.mismatches.push(Mismatch {
            key: key.clone(),
            module,
            configured: conf.value.clone(),
            at: conf.at.clone(),
            live,
            critical,
        });
    }
    cmp
}

fn live_text(m: &Mismatch) -> String {
    match &m.live {
        Some(v) => format!("live {v}"),
        None => "absent live".to_string(),
    }
}

/// The warning (or failure, when a protective setting is off) for keys
/// whose live value is not the configured one, with a cause per module.
fn mismatch_check(
    ctx: &Ctx,
    mismatches: &[Mismatch],
    boot_modules: &BTreeMap<String, String>,
    unreadable_note: &str,
) -> Check {
    let value = super::first_and_more(mismatches, |m| {
        format!("{} = {} in {}, {}", m.key, m.configured, m.at, live_text(m))
    });
    let mut modules: Vec<&'static str> = mismatches.iter().map(|m| m.module).collect();
    modules.sort();
    modules.dedup();
    let (causes, fixes): (Vec<String>, Vec<String>) = modules
        .iter()
        .map(|m| module_cause(ctx, m, mismatches, boot_modules))
        .unzip();
    let critical = mismatches.iter().any(|m| m.critical);
    let status = if critical { Status::Fail } else { Status::Warn };
    let critical_note = if critical {
        " A protective setting (be_liberal or bridge-nf-call-iptables) that the files ask for \
         is not in effect."
    } else {
        ""
    };
    Check::new(LOAD_ORDER, status, value)
        .expected(LOAD_ORDER_EXPECTED)
        .why(format!(
            "{}.{critical_note}{unreadable_note}",
            causes.join(". ")
        ))
        .fix(fixes.join("; "))
}

/// Why module `m`'s keys are not in effect, and the fix.
fn module_cause(
    ctx: &Ctx,
    m: &str,
    mismatches: &[Mismatch],
    boot_modules: &BTreeMap<String, String>,
) -> (String, String) {
    let keys: Vec<String> = mismatches
        .iter()
        .filter(|x| x.module == m)
        .map(|x| format!("{} = {} ({}, {})", x.key, x.configured, x.at, live_text(x)))
        .collect();
    if let Some(file) = boot_modules.get(m) {
        return (
            format!(
                "{}: {m} is listed in {file}, so it loads before systemd-sysctl and load order \
                 is not the cause; something changed the value after boot (kube-proxy sets \
                 nf_conntrack_max and the TCP timeouts itself), or the module was reloaded",
                keys.join(", ")
            ),
            format!(
                "find what sets {m}'s keys at run time (kube-proxy's conntrack settings) and \
                 make the sysctl files agree with it"
            ),
        );
    }
    let absent = mismatches.iter().any(|x| x.module == m && x.live.is_none());
    let state = if !absent {
        "systemd-sysctl applied the files before the module existed, and it came up \
         later with its defaults"
            .to_string()
    } else if module_loaded(ctx, m) {
        format!("{m} is loaded but the key does not exist on this kernel")
    } else {
        format!(
            "{m} is not loaded now, so the setting has nowhere to go; when it \
             loads it starts with its defaults"
        )
    };
    (
        format!(
            "{}: likely cause: {m} loaded after systemd-sysctl ({state})",
            keys.join(", ")
        ),
        format!(
            "add an /etc/modules-load.d/ entry: `echo {m} > /etc/modules-load.d/{m}.conf` \
             so it loads before systemd-sysctl at boot, then apply now with `sysctl --system`"
        ),
    )
}

/// Whether a module is loaded now, from what it registers (modules that
/// are built in have no `/sys/module` entry unless they take parameters).
fn module_loaded(ctx: &Ctx, module: &str) -> bool {
    let fs = &ctx.fs;
    match module {
        "nf_conntrack" => ctx.conntrack == Conntrack::Loaded,
        "ip_vs" => fs.is_dir("/proc/sys/net/ipv4/vs") || fs.exists("/proc/net/ip_vs"),
        "br_netfilter" => fs.is_dir("/proc/sys/net/bridge"),
        m => fs.exists(&format!("/sys/module/{m}")),
    }
}

/// Check 4a: conntrack's established timeout must outlast TCP keepalive.
pub fn check_timeout_established(ctx: &Ctx) -> Check {
    const CHECK: &str = "conntrack_timeout_established";
    let fs = &ctx.fs;
    let timeout = fs.sysctl_u64("net.netfilter.nf_conntrack_tcp_timeout_established");
    let timeout = match timeout {
        Ok(t) => t,
        Err(e) => return ctx.unreadable(CHECK, &e),
    };
    let keepalive = match fs.sysctl_u64("net.ipv4.tcp_keepalive_time") {
        Ok(k) => k,
        Err(e) => {
            return Check::new(CHECK, Status::Unknown, format!("{timeout}s, keepalive ?"))
                .why(format!("cannot compare with tcp_keepalive_time: {e}"))
                .evidence(json!({"timeout_established": timeout}));
        }
    };
    let evidence = json!({"timeout_established": timeout, "tcp_keepalive_time": keepalive});
    let value = format!("{timeout}s (tcp_keepalive_time {keepalive}s)");
    let (status, why, fix) = if timeout > keepalive {
        let why = "an idle connection that relies on the kernel's default keepalive sends a \
                   probe before its conntrack entry expires (applications that set their own \
                   TCP_KEEPIDLE above this timeout are still exposed)";
        (Status::Ok, why.to_string(), String::new())
    } else {
        let why = format!(
            "an idle connection loses its conntrack entry after {timeout}s, before its first \
             keepalive at {keepalive}s; the next segment is picked up mid-stream (tcp_loose=1: \
             DNAT may choose another backend, which resets it: backend_switch) or is INVALID \
             (tcp_loose=0)"
        );
        let fix = format!(
            "sysctl -w net.netfilter.nf_conntrack_tcp_timeout_established={} (persist in \
             /etc/sysctl.d/, or kube-proxy's conntrack.tcpEstablishedTimeout), or lower \
             net.ipv4.tcp_keepalive_time below {timeout}",
            keepalive.saturating_mul(2).max(86400)
        );
        (Status::Warn, why, fix)
    };
    Check::new(CHECK, status, value)
        .expected("longer than net.ipv4.tcp_keepalive_time")
        .why(why)
        .fix(fix)
        .evidence(evidence)
}

/// Check 4b: `nf_conntrack_tcp_loose`.
pub fn check_tcp_loose(ctx: &Ctx) -> Check {
    const CHECK: &str = "conntrack_tcp_loose";
    let fs = &ctx.fs;
    let loose = match fs.sysctl_u64("net.netfilter.nf_conntrack_tcp_loose") {
        Ok(v) => v,
        Err(e) => return ctx.unreadable(CHECK, &e),
    };
    let (status, why, fix) = if loose >= 1 {
        let why = "a segment of a connection whose entry expired or was flushed creates a new \
                   entry mid-stream; through a Service, DNAT then chooses a backend afresh, which \
                   may differ (backend_switch) — keep entries from expiring (timeout_established)";
        (Status::Ok, why, "")
    } else {
        let why = "with tcp_loose=0, every segment of a connection whose conntrack entry expired \
                   or was flushed (conntrack -F, kube-proxy restarts, table full) is INVALID: \
                   dropped by an INVALID-drop rule (the connection hangs) or passed un-NATed (the \
                   client resets it)";
        let fix =
            "sysctl -w net.netfilter.nf_conntrack_tcp_loose=1 (and persist it in /etc/sysctl.d/)";
        (Status::Warn, why, fix)
    };
    Check::new(CHECK, status, loose.to_string())
        .expected("1 (the default)")
        .why(why)
        .fix(fix)
        .evidence(json!({"tcp_loose": loose}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sysctl_files() {
        let text = "# comment\n; other\n net.netfilter.nf_conntrack_max = 1048576 \n\
-net/netfilter/nf_conntrack_tcp_be_liberal=1\nnet.ipv4.tcp_rmem = 4096\t87380   6291456\n\
net.ipv4.conf.*.rp_filter = 0\nno equals sign\n= 3\n";
        let p = parse_sysctl_conf(text);
        assert_eq!(
            p,
            vec![
                ("net.netfilter.nf_conntrack_max".into(), "1048576".into(), 3),
                (
                    "net.netfilter.nf_conntrack_tcp_be_liberal".into(),
                    "1".into(),
                    4
                ),
                ("net.ipv4.tcp_rmem".into(), "4096 87380 6291456".into(), 5),
            ]
        );
        assert_eq!(module_of("net.netfilter.x"), Some("nf_conntrack"));
        assert_eq!(module_of("net.nf_conntrack_max"), Some("nf_conntrack"));
        assert_eq!(module_of("net.ipv4.vs.conntrack"), Some("ip_vs"));
        assert_eq!(
            module_of("net.bridge.bridge-nf-call-iptables"),
            Some("br_netfilter")
        );
        assert_eq!(module_of("net.ipv4.ip_forward"), None);
    }
}
