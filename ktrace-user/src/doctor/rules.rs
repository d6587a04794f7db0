//! Check 1: is the node protected from un-NATed replies?
//!
//! Conntrack marks an out-of-window TCP segment INVALID and skips its NAT.
//! Either `net.netfilter.nf_conntrack_tcp_be_liberal=1` (no window INVALID
//! verdicts) or a firewall rule that drops ctstate INVALID on the forward or
//! input path (the reply never reaches the client) protects the client from
//! answering the backend's un-NATed reply with a reset.
//!
//! Rules are read from three sources: iptables-legacy and iptables-nft (both
//! in `iptables-save` format) and the native nftables ruleset (`nft list
//! ruleset`). Where they come from (tools, or files of a dump) is described
//! in [`crate::doctor`]. A rule counts when:
//! - iptables: it matches `-m conntrack --ctstate` or `-m state --state` with
//!   `INVALID` in the list (not negated) and jumps to `DROP` or `REJECT`, in
//!   table `filter` (chains reached from `INPUT`/`FORWARD`) or `mangle`
//!   (reached from `PREROUTING`/`INPUT`/`FORWARD`);
//! - nftables: it matches `ct state` with `invalid` (single, list, anonymous
//!   set, not `!=`) and has a `drop`/`reject` verdict, or maps `invalid` to
//!   `drop` in a `ct state vmap`, in a chain of an `ip` or `inet` table reached
//!   by `jump`/`goto` from a base chain on the `forward` or `input` hook, or
//!   `prerouting` after conntrack (priority > -200).
//!
//! Rule order and other matches of the rule are not evaluated: a rule that
//! only applies to one interface still counts. IPv6-only rules (`ip6`
//! tables) are reported but do not protect IPv4 Services.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use super::{Check, Ctx, ReadError, Status};

const CHECK: &str = "unnated_reply_protection";

/// How long a ruleset tool may run.
const TOOL_TIMEOUT: Duration = Duration::from_secs(15);

/// One rule that drops ctstate INVALID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InvalidDrop {
    /// `iptables-legacy`, `iptables-nft`, `iptables` or `nftables`.
    pub source: String,
    /// Address family: `ip`, `ip6` or `inet` (iptables rules are `ip`).
    pub family: String,
    pub table: String,
    pub chain: String,
    /// The rule as printed by the tool.
    pub rule: String,
    /// Hooks (base chains) from which the rule's chain is reached; empty when
    /// nothing jumps to it.
    pub reached_from: Vec<String>,
}

impl InvalidDrop {
    /// Whether this rule protects IPv4 Service traffic.
    pub fn protects(&self) -> bool {
        !self.reached_from.is_empty() && self.family != "ip6"
    }

    fn describe(&self) -> String {
        let from = if self.reached_from.is_empty() {
            "not reached from any hook".to_string()
        } else {
            format!("from {}", self.reached_from.join("/"))
        };
        format!(
            "{} {} {}/{} ({from})",
            self.source, self.family, self.table, self.chain
        )
    }
}

/// What one ruleset source said.
#[derive(Debug, Clone)]
pub enum Source {
    /// Read; these are its INVALID-drop rules (possibly none).
    Read {
        name: String,
        rules: usize,
        drops: Vec<InvalidDrop>,
    },
    /// Cannot hold rules here (tool or table not present): counts as read.
    Absent { name: String, why: String },
    /// Could not be read.
    Unknown { name: String, why: String },
}

/// The protection check: be_liberal, or an INVALID-drop rule.
pub fn check_protection(ctx: &Ctx) -> Check {
    let liberal = ctx
        .fs
        .sysctl_u64("net.netfilter.nf_conntrack_tcp_be_liberal");
    if let Err(e) = &liberal {
        if e.is_missing() {
            if let Some(c) = ctx.conntrack.unavailable(&ctx.fs, CHECK) {
                return c;
            }
        }
    }
    let sources = if ctx.live {
        live_sources(ctx)
    } else {
        dump_sources(ctx)
    };
    judge(liberal, &sources)
}

/// The verdict from be_liberal and the ruleset sources.
pub fn judge(liberal: Result<u64, ReadError>, sources: &[Source]) -> Check {
    let drops: Vec<&InvalidDrop> = sources
        .iter()
        .filter_map(|s| match s {
            Source::Read { drops, .. } => Some(drops.iter()),
            _ => None,
        })
        .flatten()
        .collect();
    let protecting: Vec<&&InvalidDrop> = drops.iter().filter(|d| d.protects()).collect();
    let unread: Vec<String> = sources
        .iter()
        .filter_map(|s| match s {
            Source::Unknown { name, why } => Some(format!("{name}: {why}")),
            _ => None,
        })
        .collect();
    let read_any = sources.iter().any(|s| !matches!(s, Source::Unknown { .. }));
    let evidence = json!({
        "be_liberal": liberal.as_ref().ok(),
        "invalid_drop_rules": drops,
        "sources": sources.iter().map(|s| match s {
            Source::Read { name, rules, drops } => json!({"source": name, "state": "read", "rules": rules, "invalid_drop_rules": drops.len()}),
            Source::Absent { name, why } => json!({"source": name, "state": "absent", "why": why}),
            Source::Unknown { name, why } => json!({"source": name, "state": "unknown", "why": why}),
        }).collect::<Vec<_>>(),
    });
    let expected = "nf_conntrack_tcp_be_liberal=1, or a rule dropping ctstate INVALID on the forward/input path";
    let rule_text = if let Some(d) = protecting.first() {
        let more = protecting.len() - 1;
        if more > 0 {
            format!("INVALID dropped by {} (+{more} more)", d.describe())
        } else {
            format!("INVALID dropped by {}", d.describe())
        }
    } else if !read_any {
        "rulesets not read".to_string()
    } else {
        "no rule drops INVALID".to_string()
    };
    let unread_note = if unread.is_empty() {
        String::new()
    } else {
        format!(" Not read: {}.", unread.join("; "))
    };
    let ignored: Vec<String> = drops
        .iter()
        .filter(|d| !d.protects())
        .map(|d| d.describe())
        .collect();
    let ignored_note = if ignored.is_empty() {
        String::new()
    } else {
        format!(
            " Rules that do not count (IPv6 only, or in a chain no hook reaches): {}.",
            ignored.join("; ")
        )
    };

    let base = match &liberal {
        Ok(v) if *v >= 1 => {
            return Check::new(CHECK, Status::Ok, format!("be_liberal={v}; {rule_text}"))
                .expected(expected)
                .why(format!(
                    "conntrack accepts out-of-window TCP segments instead of marking them \
                     INVALID, so replies are always de-NATed.{ignored_note}"
                ))
                .evidence(evidence);
        }
        Ok(v) => format!("be_liberal={v}"),
        Err(e) => {
            if !protecting.is_empty() {
                return Check::new(CHECK, Status::Ok, format!("be_liberal=?; {rule_text}"))
                    .expected(expected)
                    .why(format!(
                        "a rule drops INVALID packets before they reach the client ({e})"
                    ))
                    .evidence(evidence);
            }
            return Check::new(CHECK, Status::Unknown, format!("be_liberal=?; {rule_text}"))
                .expected(expected)
                .why(format!(
                    "cannot read nf_conntrack_tcp_be_liberal: {e}.{unread_note}{ignored_note}"
                ))
                .evidence(evidence);
        }
    };

    if !protecting.is_empty() {
        return Check::new(CHECK, Status::Ok, format!("{base}; {rule_text}"))
            .expected(expected)
            .why(format!(
                "out-of-window segments are marked INVALID and dropped by the rule, so an \
                 un-NATed reply never reaches the client (the connection may stall and \
                 retransmit instead of being reset).{ignored_note}"
            ))
            .evidence(evidence);
    }
    let risk = "conntrack marks out-of-window TCP segments INVALID and skips their NAT; with \
                be_liberal=0 and no rule dropping INVALID, a backend's reply reaches the client \
                with the backend's address instead of the Service's and the client answers with \
                a RST that kills the connection (finding unnated_reply)";
    let fix = "sysctl -w net.netfilter.nf_conntrack_tcp_be_liberal=1 and persist it in \
               /etc/sysctl.d/ (with nf_conntrack in /etc/modules-load.d/), or add \
               `iptables -I FORWARD -m conntrack --ctstate INVALID -j DROP` (kube-proxy's iptables \
               mode keeps one in KUBE-FORWARD)";
    if !read_any {
        return Check::new(CHECK, Status::Unknown, format!("{base}; {rule_text}"))
            .expected(expected)
            .why(format!(
                "be_liberal=0, and no firewall ruleset could be read to look for an \
                 INVALID-drop rule.{unread_note} If none exists: {risk}"
            ))
            .fix(fix)
            .evidence(evidence);
    }
    Check::new(CHECK, Status::Fail, format!("{base}; {rule_text}"))
        .expected(expected)
        .why(format!("{risk}.{unread_note}{ignored_note}"))
        .fix(fix)
        .evidence(evidence)
}

// ---------------------------------------------------------------- sources

/// Rulesets of the running node, from the tools, in this network namespace.
fn live_sources(ctx: &Ctx) -> Vec<Source> {
    let mut out = Vec::new();
    let have = |tool: &str| find_in_path(tool).is_some();
    let legacy_tool = have("iptables-legacy-save");
    let nft_tool = have("iptables-nft-save");

    if legacy_tool {
        // iptables-legacy-save may load ip_tables: only run it when legacy
        // tables exist (ip_tables lists them per network namespace).
        match ctx.fs.read("/proc/net/ip_tables_names") {
            Ok(names) if names.trim().is_empty() => out.push(Source::Absent {
                name: "iptables-legacy".into(),
                why: "no legacy tables (/proc/net/ip_tables_names is empty)".into(),
            }),
            Ok(_) => out.push(iptables_source(
                "iptables-legacy",
                run_tool("iptables-legacy-save", &[]),
            )),
            Err(_) => out.push(Source::Absent {
                name: "iptables-legacy".into(),
                why: "ip_tables is not loaded (no /proc/net/ip_tables_names)".into(),
            }),
        }
    }
    if nft_tool {
        out.push(iptables_source(
            "iptables-nft",
            run_tool("iptables-nft-save", &[]),
        ));
    }
    if !legacy_tool && !nft_tool {
        if have("iptables-save") {
            out.push(iptables_source("iptables", run_tool("iptables-save", &[])));
        } else {
            out.push(Source::Absent {
                name: "iptables".into(),
                why: "no iptables-save, iptables-legacy-save or iptables-nft-save installed".into(),
            });
        }
    }
    if have("nft") {
        out.push(nft_source(run_tool("nft", &["list", "ruleset"])));
    } else {
        out.push(Source::Unknown {
            name: "nftables".into(),
            why: "nft is not installed, so native nftables rules (kube-proxy's nftables mode) \
                  were not read"
                .into(),
        });
    }
    out
}

/// Rulesets captured in `<root>/ktrace-dump/`.
fn dump_sources(ctx: &Ctx) -> Vec<Source> {
    let dir = "/ktrace-dump";
    let mut out = Vec::new();
    let mut any_iptables = false;
    for (file, name) in [
        ("iptables-legacy-save.txt", "iptables-legacy"),
        ("iptables-nft-save.txt", "iptables-nft"),
        ("iptables-save.txt", "iptables"),
    ] {
        match ctx.fs.read(&format!("{dir}/{file}")) {
            Ok(text) => {
                any_iptables = true;
                out.push(iptables_source(name, Ok(text)));
            }
            Err(e) if e.is_missing() => {}
            Err(e) => {
                any_iptables = true;
                out.push(Source::Unknown {
                    name: name.into(),
                    why: e.to_string(),
                });
            }
        }
    }
    if !any_iptables {
        out.push(Source::Unknown {
            name: "iptables".into(),
            why: format!(
                "not captured (no iptables-legacy-save.txt, iptables-nft-save.txt or \
                 iptables-save.txt in {})",
                ctx.fs.display(dir)
            ),
        });
    }
    match ctx.fs.read(&format!("{dir}/nft-ruleset.txt")) {
        Ok(text) => out.push(nft_source(Ok(text))),
        Err(e) if e.is_missing() => out.push(Source::Unknown {
            name: "nftables".into(),
            why: format!("not captured ({e})"),
        }),
        Err(e) => out.push(Source::Unknown {
            name: "nftables".into(),
            why: e.to_string(),
        }),
    }
    out
}

fn iptables_source(name: &str, text: Result<String, String>) -> Source {
    let text = match text {
        Ok(t) => t,
        Err(why) => {
            return Source::Unknown {
                name: name.into(),
                why,
            }
        }
    };
    // `iptables-save` says which backend it is in its header.
    let name = if name == "iptables" {
        if text.contains("(nf_tables)") {
            "iptables-nft"
        } else if text.contains("(legacy)") {
            "iptables-legacy"
        } else {
            "iptables"
        }
    } else {
        name
    };
    match parse_iptables_save(&text, name) {
        Ok(p) => Source::Read {
            name: name.into(),
            rules: p.rules,
            drops: p.drops,
        },
        Err(why) => Source::Unknown {
            name: name.into(),
            why,
        },
    }
}

fn nft_source(text: Result<String, String>) -> Source {
    match text.and_then(|t| parse_nft_ruleset(&t)) {
        Ok(p) => Source::Read {
            name: "nftables".into(),
            rules: p.rules,
            drops: p.drops,
        },
        Err(why) => Source::Unknown {
            name: "nftables".into(),
            why,
        },
    }
}

fn find_in_path(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(Into::into))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Runs a ruleset tool and returns its stdout, or why it could not.
fn run_tool(tool: &str, args: &[&str]) -> Result<String, String> {
    let Some(path) = find_in_path(tool) else {
        return Err(format!("{tool} is not installed"));
    };
    let shown = format!("{tool} {}", args.join(" "));
    let shown = shown.trim();
    let mut child = Command::new(&path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    let start = Instant::now();
    // Read the pipes on threads so a large ruleset cannot block the child.
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(o) = stdout.as_mut() {
            let _ = std::io::Read::read_to_end(o, &mut s);
        }
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(o) = stderr.as_mut() {
            let _ = std::io::Read::read_to_end(o, &mut s);
        }
        s
    });
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if start.elapsed() > TOOL_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{shown} did not finish in {}s",
                    TOOL_TIMEOUT.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for {shown}: {e}")),
        }
    };
    let out = out_t.join().unwrap_or_default();
    let err = err_t.join().unwrap_or_default();
    if !status.success() {
        let msg = String::from_utf8_lossy(&err);
        let line = msg
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim();
        return Err(format!(
            "{shown} failed ({status}): {}",
            super::shorten(line, 160)
        ));
    }
    String::from_utf8(out).map_err(|_| format!("{shown} printed non-UTF-8 output"))
}

// ---------------------------------------------------------------- parsing

/// INVALID-drop rules found in one ruleset, and how many rules it has.
#[derive(Debug, Clone, Default)]
pub struct Parsed {
    pub rules: usize,
    pub drops: Vec<InvalidDrop>,
}

/// Built-in chains from which an INVALID drop protects, per table.
fn iptables_hooks(table: &str) -> &'static [&'static str] {
    match table {
        "filter" => &["INPUT", "FORWARD"],
        "mangle" => &["PREROUTING", "INPUT", "FORWARD"],
        _ => &[],
    }
}

/// Parses `iptables-save` output (either backend).
pub fn parse_iptables_save(text: &str, source: &str) -> Result<Parsed, String> {
    struct Table {
        name: String,
        // chain -> chains it jumps to
        edges: HashMap<String, BTreeSet<String>>,
        candidates: Vec<(String, String)>, // (chain, rule text)
    }
    let mut tables: Vec<Table> = Vec::new();
    let mut rules = 0usize;
    let mut recognised = 0usize;
    let mut strange = 0usize;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            tables.push(Table {
                name: name.trim().to_string(),
                edges: HashMap::new(),
                candidates: Vec::new(),
            });
            recognised += 1;
        } else if line == "COMMIT" {
            recognised += 1;
        } else if let Some(decl) = line.strip_prefix(':') {
            recognised += 1;
            if let (Some(t), Some(chain)) = (tables.last_mut(), decl.split_whitespace().next()) {
                t.edges.entry(chain.to_string()).or_default();
            }
        } else if line.starts_with("-A ") || line.starts_with("-I ") {
            recognised += 1;
            rules += 1;
            let Some(t) = tables.last_mut() else {
                strange += 1;
                continue;
            };
            let words = shell_words(line);
            let Some(chain) = words.get(1).cloned() else {
                strange += 1;
                continue;
            };
            let target = option_value(&words, &["-j", "--jump", "-g", "--goto"]);
            if let Some(tg) = &target {
                if !is_builtin_target(tg) {
                    t.edges.entry(chain.clone()).or_default().insert(tg.clone());
                }
            }
            let drops = matches!(target.as_deref(), Some("DROP") | Some("REJECT"));
            if drops && matches_invalid_iptables(&words) {
                t.candidates.push((chain, line.to_string()));
            }
        } else {
            strange += 1;
        }
    }
    if recognised == 0 && strange > 0 {
        return Err(format!(
            "not iptables-save output ({strange} unrecognised lines)"
        ));
    }
    let mut drops = Vec::new();
    for t in &tables {
        let hooks = iptables_hooks(&t.name);
        let reached = reachability(
            &t.edges,
            hooks.iter().map(|h| (h.to_string(), h.to_string())),
        );
        for (chain, rule) in &t.candidates {
            drops.push(InvalidDrop {
                source: source.to_string(),
                family: "ip".into(),
                table: t.name.clone(),
                chain: chain.clone(),
                rule: rule.clone(),
                reached_from: reached
                    .get(chain)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default(),
            });
        }
    }
    Ok(Parsed { rules, drops })
}

fn is_builtin_target(t: &str) -> bool {
    matches!(
        t,
        "ACCEPT"
            | "DROP"
            | "REJECT"
            | "RETURN"
            | "LOG"
            | "MARK"
            | "CONNMARK"
            | "MASQUERADE"
            | "SNAT"
            | "DNAT"
            | "REDIRECT"
            | "NOTRACK"
            | "CT"
            | "TCPMSS"
            | "NFLOG"
            | "NFQUEUE"
            | "CHECKSUM"
            | "TPROXY"
            | "TRACE"
            | "AUDIT"
            | "SET"
            | "CLASSIFY"
            | "DSCP"
            | "TOS"
            | "TTL"
            | "HL"
            | "NETMAP"
            | "ULOG"
    )
}

/// The word after the first of `opts`.
fn option_value(words: &[String], opts: &[&str]) -> Option<String> {
    words
        .iter()
        .position(|w| opts.contains(&w.as_str()))
        .and_then(|i| words.get(i + 1))
        .cloned()
}

/// `--ctstate`/`--state` lists with INVALID, not negated.
fn matches_invalid_iptables(words: &[String]) -> bool {
    words.iter().enumerate().any(|(i, w)| {
        (w == "--ctstate" || w == "--state")
            && !(i > 0 && words.get(i - 1).is_some_and(|p| p == "!"))
            && words
                .get(i + 1)
                .is_some_and(|l| l.split(',').any(|s| s.eq_ignore_ascii_case("INVALID")))
    })
}

/// Splits a line into words, honouring double quotes and backslashes.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                in_word = true;
            }
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

/// For each chain, the hooks it is reached from, following jumps from the
/// given `(chain, hook)` starting points.
fn reachability(
    edges: &HashMap<String, BTreeSet<String>>,
    starts: impl Iterator<Item = (String, String)>,
) -> HashMap<String, BTreeSet<String>> {
    let mut reached: HashMap<String, BTreeSet<String>> = HashMap::new();
    for (chain, hook) in starts {
        let mut stack = vec![chain];
        while let Some(c) = stack.pop() {
            if !reached.entry(c.clone()).or_default().insert(hook.clone()) {
                continue;
            }
            if let Some(next) = edges.get(&c) {
                stack.extend(next.iter().cloned());
            }
        }
    }
    reached
}

/// Parses `nft list ruleset` output.
pub fn parse_nft_ruleset(text: &str) -> Result<Parsed, String> {
    #[derive(Default)]
    struct Table {
        family: String,
        name: String,
        edges: HashMap<String, BTreeSet<String>>,
        // base chain -> hook label
        bases: BTreeMap<String, String>,
        candidates: Vec<(String, String)>,
    }
    let mut tables: Vec<Table> = Vec::new();
    let mut depth: i64 = 0;
    let mut in_table = false;
    let mut chain: Option<String> = None;
    let mut rules = 0usize;
    let mut strange = 0usize;
    let mut recognised = 0usize;
    for raw in text.lines() {
        let line = strip_quoted(raw.trim());
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let opens = line.matches('{').count() as i64;
        let closes = line.matches('}').count() as i64;
        if depth == 0 {
            if let Some(rest) = line.strip_prefix("table ") {
                let mut w = rest.split_whitespace().filter(|w| *w != "{");
                let (family, name) = match (w.next(), w.next()) {
                    (Some(f), Some(n)) => (f.to_string(), n.to_string()),
                    // `table NAME {` means family ip.
                    (Some(n), None) => ("ip".to_string(), n.to_string()),
                    _ => {
                        strange += 1;
                        (String::new(), String::new())
                    }
                };
                tables.push(Table {
                    family,
                    name,
                    ..Default::default()
                });
                in_table = true;
                recognised += 1;
            } else if line != "}" {
                strange += 1;
            }
        } else if depth == 1 && in_table {
            if let Some(rest) = line.strip_prefix("chain ") {
                chain = rest
                    .split_whitespace()
                    .next()
                    .filter(|n| *n != "{")
                    .map(str::to_string);
                recognised += 1;
            }
        } else if depth == 2 && in_table {
            if let (Some(c), Some(t)) = (&chain, tables.last_mut()) {
                if line.starts_with("type ") {
                    if let Some(hook) = nft_base_hook(line) {
                        t.bases.insert(c.clone(), hook);
                    }
                } else if !line.starts_with("policy ")
                    && !line.starts_with("comment ")
                    && !line.starts_with('}')
                {
                    rules += 1;
                    let words = nft_words(line);
                    for target in nft_jumps(&words) {
                        t.edges.entry(c.clone()).or_default().insert(target);
                    }
                    if nft_drops_invalid(&words) {
                        t.candidates.push((c.clone(), raw.trim().to_string()));
                    }
                }
            }
        }
        depth += opens - closes;
        if depth < 0 {
            depth = 0;
        }
        if depth <= 1 {
            chain = None;
        }
        if depth == 0 {
            in_table = false;
        }
    }
    if recognised == 0 && strange > 0 {
        return Err(format!(
            "not `nft list ruleset` output ({strange} unrecognised lines)"
        ));
    }
    let mut drops = Vec::new();
    for t in &tables {
        if !matches!(t.family.as_str(), "ip" | "ip6" | "inet") {
            continue;
        }
        let reached = reachability(
            &t.edges,
            t.bases.iter().map(|(c, h)| (c.clone(), h.clone())),
        );
        for (chain, rule) in &t.candidates {
            drops.push(InvalidDrop {
                source: "nftables".into(),
                family: t.family.clone(),
                table: t.name.clone(),
                chain: chain.clone(),
                rule: rule.clone(),
                reached_from: reached
                    .get(chain)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default(),
            });
        }
    }
    Ok(Parsed { rules, drops })
}

/// The line with `"..."` strings blanked (comments may hold braces).
fn strip_quoted(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut quoted = false;
    let mut escaped = false;
    for c in line.chars() {
        if quoted {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                quoted = false;
                out.push('"');
            }
            continue;
        }
        if c == '"' {
            quoted = true;
        }
        out.push(c);
    }
    out
}

/// Words of an nft rule, with `{ } , : ;` as words of their own.
fn nft_words(line: &str) -> Vec<String> {
    let mut spaced = String::with_capacity(line.len() + 16);
    for c in line.chars() {
        if matches!(c, '{' | '}' | ',' | ':' | ';') {
            spaced.push(' ');
            spaced.push(c);
            spaced.push(' ');
        } else {
            spaced.push(c);
        }
    }
    spaced.split_whitespace().map(str::to_string).collect()
}

/// `type filter hook forward priority filter;` → the hook, when an INVALID
/// drop in this base chain protects (forward, input, or prerouting after
/// conntrack).
fn nft_base_hook(line: &str) -> Option<String> {
    let words = nft_words(line);
    let hook = words
        .iter()
        .position(|w| w == "hook")
        .and_then(|i| words.get(i + 1))?
        .clone();
    match hook.as_str() {
        "forward" | "input" => Some(hook),
        "prerouting" => {
            let prio = words
                .iter()
                .position(|w| w == "priority")
                .map(|i| nft_priority(&words[i + 1..]))
                .unwrap_or(Some(0));
            // Conntrack runs at -200: before it, `ct state` means nothing.
            match prio {
                Some(p) if p > -200 => Some(hook),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Evaluates `filter`, `mangle - 5`, `-150`, ... up to `;`.
fn nft_priority(words: &[String]) -> Option<i64> {
    let mut it = words.iter().take_while(|w| *w != ";");
    let first = it.next()?;
    let mut value = match first.as_str() {
        "raw" => -300,
        "mangle" => -150,
        "dstnat" => -100,
        "filter" => 0,
        "security" => 50,
        "srcnat" => 100,
        n => n.parse().ok()?,
    };
    while let (Some(op), Some(n)) = (it.next(), it.next()) {
        let n: i64 = n.parse().ok()?;
        match op.as_str() {
            "+" => value += n,
            "-" => value -= n,
            _ => return None,
        }
    }
    Some(value)
}

/// Chains a rule jumps or goes to (also inside verdict maps).
fn nft_jumps(words: &[String]) -> Vec<String> {
    words
        .windows(2)
        .filter(|w| w[0] == "jump" || w[0] == "goto")
        .map(|w| w[1].clone())
        .collect()
}

/// `ct state [==] invalid|a,b|{ a, b } ... drop|reject`, or
/// `ct state vmap { invalid : drop, ... }`.
fn nft_drops_invalid(words: &[String]) -> bool {
    let Some(i) = words
        .windows(2)
        .position(|w| w[0] == "ct" && w[1] == "state")
    else {
        return false;
    };
    let mut j = i + 2;
    match words.get(j).map(String::as_str) {
        Some("vmap") => {
            // { key : verdict , ... }
            let body: Vec<&String> = words[j + 1..]
                .iter()
                .skip_while(|w| *w == "{")
                .take_while(|w| *w != "}")
                .collect();
            return body.split(|w| *w == ",").any(|entry| {
                let mut parts = entry.split(|w| *w == ":");
                let keys = parts.next().unwrap_or(&[]);
                let verdict = parts.next().unwrap_or(&[]);
                keys.iter().any(|k| *k == "invalid")
                    && verdict.iter().any(|v| *v == "drop" || *v == "reject")
            });
        }
        Some("!=") => return false,
        Some("==") => j += 1,
        _ => {}
    }
    let mut states = Vec::new();
    let mut rest_start = j;
    if words.get(j).is_some_and(|w| w == "{") {
        for (k, w) in words.iter().enumerate().skip(j + 1) {
            if w == "}" {
                rest_start = k + 1;
                break;
            }
            states.push(w.clone());
            rest_start = k + 1;
        }
    } else {
        // `invalid` or `invalid , untracked` (nft prints flag lists with commas).
        let mut k = j;
        while let Some(w) = words.get(k) {
            states.push(w.clone());
            if words.get(k + 1).is_some_and(|n| n == ",") {
                k += 2;
            } else {
                k += 1;
                break;
            }
        }
        rest_start = k;
    }
    states.iter().any(|s| s == "invalid")
        && words
            .get(rest_start..)
            .is_some_and(|rest| rest.iter().any(|w| w == "drop" || w == "reject"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBE: &str = "# Generated by iptables-nft-save v1.8.9 (nf_tables) on Mon\n\
*filter\n\
:INPUT ACCEPT [0:0]\n\
:FORWARD ACCEPT [0:0]\n\
:OUTPUT ACCEPT [0:0]\n\
:KUBE-FORWARD - [0:0]\n\
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -j ACCEPT\n\
COMMIT\n";

    #[test]
    fn kube_proxy_rule_is_found_and_reached() {
        let p = parse_iptables_save(KUBE, "iptables-nft").unwrap();
        assert_eq!(p.rules, 3);
        assert_eq!(p.drops.len(), 1);
        assert_eq!(p.drops[0].chain, "KUBE-FORWARD");
        assert_eq!(p.drops[0].reached_from, vec!["FORWARD".to_string()]);
        assert!(p.drops[0].protects());
    }

    #[test]
    fn negated_unreached_and_raw_rules_do_not_protect() {
        let text = "*filter\n:INPUT ACCEPT [0:0]\n:ORPHAN - [0:0]\n\
-A INPUT -m conntrack ! --ctstate INVALID -j DROP\n\
-A ORPHAN -m state --state NEW,INVALID -j DROP\n\
-A OUTPUT -m conntrack --ctstate INVALID -j DROP\nCOMMIT\n\
*raw\n-A PREROUTING -m conntrack --ctstate INVALID -j DROP\nCOMMIT\n";
        let p = parse_iptables_save(text, "iptables-legacy").unwrap();
        assert_eq!(p.drops.len(), 3, "{:?}", p.drops);
        assert!(p.drops.iter().all(|d| !d.protects()), "{:?}", p.drops);
    }

    #[test]
    fn garbage_is_not_iptables_output() {
        assert!(parse_iptables_save("hello world\n\u{0}\u{1}", "x").is_err());
        assert_eq!(parse_iptables_save("", "x").unwrap().rules, 0);
        // A rule before any table, and truncated rules, do not panic.
        let p = parse_iptables_save("-A\n-A FORWARD -j\n*filter\n-A X --ctstate\n", "x").unwrap();
        assert!(p.drops.is_empty());
    }

    #[test]
    fn nft_forms() {
        let text = r#"table inet filter {
	set blocked {
		type ipv4_addr
		elements = { 10.0.0.1, 10.0.0.2 }
	}
	chain input {
		type filter hook input priority filter; policy accept;
		ct state vmap { invalid : drop, established : accept, related : accept }
	}
	chain forward {
		type filter hook forward priority filter + 10; policy drop;
		jump kube
	}
	chain kube {
		ct state { invalid, untracked } counter packets 0 bytes 0 drop comment "x { y"
	}
	chain orphan {
		ct state invalid drop
	}
	chain neg {
		ct state != invalid drop
	}
	chain early {
		type filter hook prerouting priority raw; policy accept;
		ct state invalid drop
	}
}
table ip6 f6 {
	chain fwd {
		type filter hook forward priority 0; policy accept;
		ct state invalid,untracked drop
	}
}
table netdev nd {
	chain ingress {
		type filter hook ingress device "eth0" priority 0;
		ct state invalid drop
	}
}
"#;
        let p = parse_nft_ruleset(text).unwrap();
        let by_chain: HashMap<_, _> = p.drops.iter().map(|d| (d.chain.as_str(), d)).collect();
        assert!(by_chain["input"].protects());
        assert!(by_chain["kube"].protects());
        assert_eq!(by_chain["kube"].reached_from, vec!["forward".to_string()]);
        assert!(!by_chain["orphan"].protects());
        assert!(!by_chain.contains_key("neg"));
        assert!(
            !by_chain["early"].protects(),
            "raw priority is before conntrack"
        );
        assert!(!by_chain["fwd"].protects(), "ip6 only");
        assert!(by_chain["fwd"].reached_from == vec!["forward".to_string()]);
        assert!(!by_chain.contains_key("ingress"));
    }

    #[test]
    fn nft_garbage_and_empty() {
        assert!(parse_nft_ruleset("}}}} {{ nonsense\n").is_err());
        assert_eq!(parse_nft_ruleset("").unwrap().rules, 0);
        let p = parse_nft_ruleset("table ip t {\nchain c {\nct state\nct state vmap {\n").unwrap();
        assert!(p.drops.is_empty());
    }

    #[test]
    fn judgement() {
        let none = vec![Source::Read {
            name: "iptables-nft".into(),
            rules: 0,
            drops: vec![],
        }];
        assert_eq!(judge(Ok(0), &none).status, Status::Fail);
        assert_eq!(judge(Ok(1), &none).status, Status::Ok);
        let unread = vec![Source::Unknown {
            name: "nftables".into(),
            why: "not captured".into(),
        }];
        assert_eq!(judge(Ok(0), &unread).status, Status::Unknown);
        let p = parse_iptables_save(KUBE, "iptables-nft").unwrap();
        let with = vec![Source::Read {
            name: "iptables-nft".into(),
            rules: p.rules,
            drops: p.drops,
        }];
        assert_eq!(judge(Ok(0), &with).status, Status::Ok);
        let missing = Err(ReadError::Missing { path: "x".into() });
        assert_eq!(judge(missing, &with).status, Status::Ok);
    }
}
