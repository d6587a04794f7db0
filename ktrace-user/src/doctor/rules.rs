//! Check 1: is the node protected from un-NATed replies?
//!
//! Conntrack marks an out-of-window TCP segment INVALID and skips its NAT.
//! Either `net.netfilter.nf_conntrack_tcp_be_liberal=1` (no window INVALID
//! verdicts) or a firewall rule that drops ctstate INVALID on the forward or
//! input path (the reply never reaches the client) protects the client from
//! answering the backend's un-NATed reply with a reset.
//!
//! Rules are read from three sources: iptables-legacy and iptables-nft (both
//! in `iptables-save` format, and their `ip6tables` counterparts, whose
//! rules are `ip6`) and the native nftables ruleset (`nft -j list
//! ruleset`, JSON). Where they come from (tools, or files of a dump) is described
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
//! only applies to one interface still counts. IPv6-only rules (`ip6tables`,
//! `ip6` tables) are reported but do not protect IPv4 Services.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;
use serde_json::{json, Value};

use super::{Check, Ctx, ReadError, Status};
use crate::names::rules::split_words;
use crate::tool::find_in_path;

const CHECK: &str = "unnated_reply_protection";

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
        /// kube-proxy's rules are in it (see [`Parsed::kube_proxy`]).
        kube_proxy: bool,
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
    judge(liberal, &ctx.rulesets)
}

/// The ruleset sources of the audited node: the tools on a live audit, the
/// dump's files otherwise. Read once; several checks use them.
pub fn read_sources(fs: &super::Fs, live: bool) -> Vec<Source> {
    if live {
        live_sources(fs)
    } else {
        dump_sources(fs)
    }
}

/// The INVALID-drop rules of every source that was read.
pub fn all_drops(sources: &[Source]) -> impl Iterator<Item = &InvalidDrop> {
    sources
        .iter()
        .filter_map(|s| match s {
            Source::Read { drops, .. } => Some(drops.iter()),
            _ => None,
        })
        .flatten()
}

/// The rules that drop INVALID where it protects, over all sources.
pub fn protecting_drops(sources: &[Source]) -> impl Iterator<Item = &InvalidDrop> {
    all_drops(sources).filter(|d| d.protects())
}

const EXPECTED: &str =
    "nf_conntrack_tcp_be_liberal=1, or a rule dropping ctstate INVALID on the forward/input path";

/// The verdict from be_liberal and the ruleset sources.
pub fn judge(liberal: Result<u64, ReadError>, sources: &[Source]) -> Check {
    let drops: Vec<&InvalidDrop> = all_drops(sources).collect();
    let protecting: Vec<&&InvalidDrop> = drops.iter().filter(|d| d.protects()).collect();
    let read_any = sources.iter().any(|s| !matches!(s, Source::Unknown { .. }));
    let evidence = json!({
        "be_liberal": liberal.as_ref().ok(),
        "invalid_drop_rules": drops,
        "sources": sources.iter().map(|s| match s {
            Source::Read { name, rules, drops, .. } => json!({"source": name, "state": "read", "rules": rules, "invalid_drop_rules": drops.len()}),
            Source::Absent { name, why } => json!({"source": name, "state": "absent", "why": why}),
            Source::Unknown { name, why } => json!({"source": name, "state": "unknown", "why": why}),
        }).collect::<Vec<_>>(),
    });
    let rule_text = if !protecting.is_empty() {
        let rules = super::first_and_more(&protecting, |d| d.describe());
        format!("INVALID dropped by {rules}")
    } else if !read_any {
        "rulesets not read".to_string()
    } else {
        "no rule drops INVALID".to_string()
    };
    let facts = Facts {
        protected_by_rule: !protecting.is_empty(),
        read_any,
        unread_note: unread_note(sources),
        ignored_note: ignored_note(&drops),
    };
    let (status, base, why, fix) = verdict(&liberal, &facts);
    let check = Check::new(CHECK, status, format!("{base}; {rule_text}"))
        .expected(EXPECTED)
        .why(why);
    match fix {
        Some(f) => check.fix(f),
        None => check,
    }
    .evidence(evidence)
}

/// What the verdict depends on besides be_liberal.
struct Facts {
    /// A rule that counts drops INVALID.
    protected_by_rule: bool,
    /// At least one ruleset source was read.
    read_any: bool,
    unread_note: String,
    ignored_note: String,
}

/// ` What: a; b.`, or nothing when there are no items.
fn note(what: &str, items: Vec<String>) -> String {
    if items.is_empty() {
        return String::new();
    }
    format!(" {what}: {}.", items.join("; "))
}

fn unread_note(sources: &[Source]) -> String {
    let unread = sources.iter().filter_map(|s| match s {
        Source::Unknown { name, why } => Some(format!("{name}: {why}")),
        _ => None,
    });
    note("Not read", unread.collect())
}

fn ignored_note(drops: &[&InvalidDrop]) -> String {
    let ignored = drops.iter().filter(|d| !d.protects()).map(|d| d.describe());
    let what = "Rules that do not count (IPv6 only, or in a chain no hook reaches)";
    note(what, ignored.collect())
}

/// Status, the be_liberal part of the value, why, and the fix.
fn verdict(
    liberal: &Result<u64, ReadError>,
    f: &Facts,
) -> (Status, String, String, Option<&'static str>) {
    let (unread_note, ignored_note) = (&f.unread_note, &f.ignored_note);
    let base = match liberal {
        Ok(v) if *v >= 1 => {
            let why = format!(
                "conntrack accepts out-of-window TCP segments instead of marking them \
                 INVALID, so replies are always de-NATed.{ignored_note}"
            );
            return (Status::Ok, format!("be_liberal={v}"), why, None);
        }
        Ok(v) => format!("be_liberal={v}"),
        Err(e) if f.protected_by_rule => {
            let why = format!("a rule drops INVALID packets before they reach the client ({e})");
            return (Status::Ok, "be_liberal=?".into(), why, None);
        }
        Err(e) => {
            let why =
                format!("cannot read nf_conntrack_tcp_be_liberal: {e}.{unread_note}{ignored_note}");
            return (Status::Unknown, "be_liberal=?".into(), why, None);
        }
    };
    if f.protected_by_rule {
        let why = format!(
            "out-of-window segments are marked INVALID and dropped by the rule, so an \
             un-NATed reply never reaches the client (the connection may stall and \
             retransmit instead of being reset).{ignored_note}"
        );
        return (Status::Ok, base, why, None);
    }
    let risk = "conntrack marks out-of-window TCP segments INVALID and skips their NAT; with \
                be_liberal=0 and no rule dropping INVALID, a backend's reply reaches the client \
                with the backend's address instead of the Service's and the client answers with \
                a RST that kills the connection (finding unnated_reply)";
    let fix = "sysctl -w net.netfilter.nf_conntrack_tcp_be_liberal=1 and persist it in \
               /etc/sysctl.d/ (with nf_conntrack in /etc/modules-load.d/), or add \
               `iptables -I FORWARD -m conntrack --ctstate INVALID -j DROP` (kube-proxy's iptables \
               mode keeps one in KUBE-FORWARD)";
    if !f.read_any {
        let why = format!(
            "be_liberal=0, and no firewall ruleset could be read to look for an \
             INVALID-drop rule.{unread_note} If none exists: {risk}"
        );
        return (Status::Unknown, base, why, Some(fix));
    }
    let why = format!("{risk}.{unread_note}{ignored_note}");
    (Status::Fail, base, why, Some(fix))
}

// ---------------------------------------------------------------- sources

/// Rulesets of the running node, from the tools, in this network namespace:
/// both address families (an IPv6-only node has kube-proxy's rules in
/// `ip6tables` alone), then the native nftables ruleset.
fn live_sources(fs: &super::Fs) -> Vec<Source> {
    let mut out = iptables_live_sources(fs, "iptables", "/proc/net/ip_tables_names");
    out.extend(iptables_live_sources(
        fs,
        "ip6tables",
        "/proc/net/ip6_tables_names",
    ));
    if find_in_path("nft").is_some() {
        out.push(nft_source(run_tool("nft", &["-j", "list", "ruleset"])));
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

/// The rulesets of one `iptables` tool family (`iptables` or `ip6tables`):
/// each backend whose tool is installed, else the plain tool;
/// `tables_names` lists the family's legacy tables.
fn iptables_live_sources(fs: &super::Fs, tool: &str, tables_names: &str) -> Vec<Source> {
    let mut out = Vec::new();
    let (legacy, nft) = (format!("{tool}-legacy"), format!("{tool}-nft"));
    let module = tables_names
        .trim_start_matches("/proc/net/")
        .trim_end_matches("_names");
    let legacy_tool = find_in_path(&format!("{legacy}-save")).is_some();
    let nft_tool = find_in_path(&format!("{nft}-save")).is_some();
    if legacy_tool {
        // The legacy tool may load ip_tables (ip6_tables): only run it when
        // legacy tables exist (the kernel lists them per network namespace).
        match fs.read(tables_names) {
            Ok(names) if names.trim().is_empty() => out.push(Source::Absent {
                name: legacy.clone(),
                why: format!("no legacy tables ({tables_names} is empty)"),
            }),
            Ok(_) => out.push(iptables_source(
                &legacy,
                run_tool(&format!("{legacy}-save"), &[]),
            )),
            Err(_) => out.push(Source::Absent {
                name: legacy.clone(),
                why: format!("{module} is not loaded (no {tables_names})"),
            }),
        }
    }
    if nft_tool {
        out.push(iptables_source(&nft, run_tool(&format!("{nft}-save"), &[])));
    }
    if !legacy_tool && !nft_tool {
        let save = format!("{tool}-save");
        if find_in_path(&save).is_some() {
            out.push(iptables_source(tool, run_tool(&save, &[])));
        } else {
            out.push(Source::Absent {
                name: tool.into(),
                why: format!("no {save}, {legacy}-save or {nft}-save installed"),
            });
        }
    }
    out
}

/// Runs a ruleset tool: its output, or why not in a line short enough for
/// a check's `why`.
fn run_tool(tool: &str, args: &[&str]) -> Result<String, String> {
    crate::tool::run_tool(tool, args).map_err(|e| super::shorten(&e, 240))
}

/// Rulesets captured in `<root>/ktrace-dump/`.
fn dump_sources(fs: &super::Fs) -> Vec<Source> {
    let dir = "/ktrace-dump";
    let mut out = Vec::new();
    let mut any_iptables = false;
    for (file, name) in [
        ("iptables-legacy-save.txt", "iptables-legacy"),
        ("iptables-nft-save.txt", "iptables-nft"),
        ("iptables-save.txt", "iptables"),
    ] {
        match fs.read(&format!("{dir}/{file}")) {
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
                fs.display(dir)
            ),
        });
    }
    match fs.read(&format!("{dir}/nft-ruleset.json")) {
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
    let name = match name {
        "iptables" | "ip6tables" if text.contains("(nf_tables)") => format!("{name}-nft"),
        "iptables" | "ip6tables" if text.contains("(legacy)") => format!("{name}-legacy"),
        _ => name.to_string(),
    };
    parsed_source(&name, parse_iptables_save(&text, &name))
}

fn nft_source(text: Result<String, String>) -> Source {
    parsed_source("nftables", text.and_then(|t| parse_nft_json(&t)))
}

/// Source `name` as read, or why it could not be.
fn parsed_source(name: &str, parsed: Result<Parsed, String>) -> Source {
    match parsed {
        Ok(p) => Source::Read {
            name: name.into(),
            rules: p.rules,
            drops: p.drops,
            kube_proxy: p.kube_proxy,
        },
        Err(why) => Source::Unknown {
            name: name.into(),
            why,
        },
    }
}

// ---------------------------------------------------------------- parsing

/// INVALID-drop rules found in one ruleset, and how many rules it has.
#[derive(Debug, Clone, Default)]
pub struct Parsed {
    pub rules: usize,
    pub drops: Vec<InvalidDrop>,
    /// kube-proxy's rules are there: a `KUBE-SERVICES` chain in the `nat`
    /// table (iptables and IPVS modes), or an `ip`/`ip6` table named
    /// `kube-proxy` (nftables mode).
    pub kube_proxy: bool,
}

/// Built-in chains from which an INVALID drop protects, per table.
fn iptables_hooks(table: &str) -> &'static [&'static str] {
    match table {
        "filter" => &["INPUT", "FORWARD"],
        "mangle" => &["PREROUTING", "INPUT", "FORWARD"],
        _ => &[],
    }
}

/// Parses `iptables-save` or `ip6tables-save` output (either backend).
pub fn parse_iptables_save(text: &str, source: &str) -> Result<Parsed, String> {
    let family = if source.starts_with("ip6") {
        "ip6"
    } else {
        "ip"
    };
    struct Table {
        name: String,
        graph: ChainGraph,
    }
    let mut tables: Vec<Table> = Vec::new();
    let mut rules = 0usize;
    let mut recognised = 0usize;
    let mut strange = 0usize;
    let mut kube_proxy = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            tables.push(Table {
                name: name.trim().to_string(),
                graph: ChainGraph::default(),
            });
            recognised += 1;
        } else if line == "COMMIT" {
            recognised += 1;
        } else if let Some(decl) = line.strip_prefix(':') {
            recognised += 1;
            if let (Some(t), Some(chain)) = (tables.last_mut(), decl.split_whitespace().next()) {
                kube_proxy |= t.name == "nat" && chain == "KUBE-SERVICES";
                t.graph.edges.entry(chain.to_string()).or_default();
            }
        } else if line.starts_with("-A ") || line.starts_with("-I ") {
            recognised += 1;
            rules += 1;
            let Some(t) = tables.last_mut() else {
                strange += 1;
                continue;
            };
            let words = split_words(line).unwrap_or_default();
            let Some(chain) = words.get(1).cloned() else {
                strange += 1;
                continue;
            };
            let target = option_value(&words, &["-j", "--jump", "-g", "--goto"]);
            // Built-in targets (DROP, DNAT...) become chains nothing leaves.
            if let Some(tg) = &target {
                t.graph
                    .edges
                    .entry(chain.clone())
                    .or_default()
                    .insert(tg.clone());
            }
            let drops = matches!(target.as_deref(), Some("DROP") | Some("REJECT"));
            if drops && matches_invalid_iptables(&words) {
                t.graph.candidates.push((chain, line.to_string()));
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
    let drops = tables
        .iter()
        .flat_map(|t| {
            let hooks = iptables_hooks(&t.name).iter();
            let starts = hooks.map(|h| (h.to_string(), h.to_string()));
            t.graph.drops((source, family, &t.name), starts)
        })
        .collect();
    Ok(Parsed {
        rules,
        drops,
        kube_proxy,
    })
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

/// One table's chains, in either syntax: where each jumps, and its rules
/// that drop INVALID.
#[derive(Default)]
struct ChainGraph {
    /// Chain -> the chains it jumps or goes to.
    edges: HashMap<String, BTreeSet<String>>,
    /// `(chain, rule text)` of the INVALID-drop rules.
    candidates: Vec<(String, String)>,
}

impl ChainGraph {
    /// The INVALID-drop rules, each with the hooks that reach its chain by
    /// jumps from the given `(chain, hook)` starting points.
    fn drops(
        &self,
        (source, family, table): (&str, &str, &str),
        starts: impl Iterator<Item = (String, String)>,
    ) -> Vec<InvalidDrop> {
        let reached = self.reachability(starts);
        let drop = |(chain, rule): &(String, String)| InvalidDrop {
            source: source.to_string(),
            family: family.to_string(),
            table: table.to_string(),
            chain: chain.clone(),
            rule: rule.clone(),
            reached_from: reached
                .get(chain)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default(),
        };
        self.candidates.iter().map(drop).collect()
    }

    /// For each chain, the hooks it is reached from.
    fn reachability(
        &self,
        starts: impl Iterator<Item = (String, String)>,
    ) -> HashMap<String, BTreeSet<String>> {
        let mut reached: HashMap<String, BTreeSet<String>> = HashMap::new();
        for (chain, hook) in starts {
            let mut stack = vec![chain];
            while let Some(c) = stack.pop() {
                if !reached.entry(c.clone()).or_default().insert(hook.clone()) {
                    continue;
                }
                if let Some(next) = self.edges.get(&c) {
                    stack.extend(next.iter().cloned());
                }
            }
        }
        reached
    }
}

/// Parses `nft -j list ruleset` output (libnftables' JSON schema).
pub fn parse_nft_json(text: &str) -> Result<Parsed, String> {
    #[derive(Default)]
    struct Table {
        graph: ChainGraph,
        /// Base chain -> hook, for the base chains whose INVALID drops protect.
        bases: BTreeMap<String, String>,
    }
    let doc: Value = serde_json::from_str(text)
        .map_err(|e| format!("not `nft -j list ruleset` output ({e})"))?;
    let items = doc
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or("not `nft -j list ruleset` output (no \"nftables\" array)")?;
    let mut tables: BTreeMap<(String, String), Table> = BTreeMap::new();
    let mut rules = 0usize;
    let str_of = |o: &Value, k: &str| o.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let mut kube_proxy = false;
    for item in items {
        if let Some(t) = item.get("table") {
            kube_proxy |= str_of(t, "name") == "kube-proxy"
                && matches!(str_of(t, "family").as_str(), "ip" | "ip6");
        } else if let Some(c) = item.get("chain") {
            let t = tables
                .entry((str_of(c, "family"), str_of(c, "table")))
                .or_default();
            if let Some(hook) = protecting_hook(c) {
                t.bases.insert(str_of(c, "name"), hook);
            }
        } else if let Some(r) = item.get("rule") {
            rules += 1;
            let t = tables
                .entry((str_of(r, "family"), str_of(r, "table")))
                .or_default();
            let chain = str_of(r, "chain");
            let expr = r.get("expr").cloned().unwrap_or(Value::Null);
            let mut targets = Vec::new();
            jump_targets(&expr, &mut targets);
            t.graph
                .edges
                .entry(chain.clone())
                .or_default()
                .extend(targets);
            if drops_invalid(&expr) {
                t.graph.candidates.push((chain, expr.to_string()));
            }
        }
    }
    let drops = tables
        .iter()
        .filter(|((family, _), _)| matches!(family.as_str(), "ip" | "ip6" | "inet"))
        .flat_map(|((family, table), t)| {
            let starts = t.bases.iter().map(|(c, h)| (c.clone(), h.clone()));
            t.graph.drops(("nftables", family, table), starts)
        })
        .collect();
    Ok(Parsed {
        rules,
        drops,
        kube_proxy,
    })
}

/// The hook of a base chain whose INVALID drops protect: forward, input,
/// or prerouting after conntrack (which runs at priority -200; before it
/// `ct state` means nothing).
fn protecting_hook(chain: &Value) -> Option<String> {
    let hook = chain.get("hook")?.as_str()?;
    let prio = chain.get("prio").and_then(Value::as_i64).unwrap_or(0);
    match hook {
        "forward" | "input" => Some(hook.to_string()),
        "prerouting" if prio > -200 => Some(hook.to_string()),
        _ => None,
    }
}

/// Chains a rule jumps or goes to, anywhere in it (verdict maps too).
fn jump_targets(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                match (k.as_str(), x.get("target").and_then(Value::as_str)) {
                    ("jump" | "goto", Some(t)) => out.push(t.to_string()),
                    _ => jump_targets(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| jump_targets(x, out)),
        _ => {}
    }
}

fn is_ct_state(v: &Value) -> bool {
    v.pointer("/ct/key").and_then(Value::as_str) == Some("state")
}

/// `"invalid"`, `["invalid", ...]` or `{"set": ["invalid", ...]}`.
fn has_invalid(v: &Value) -> bool {
    match v {
        Value::String(s) => s == "invalid",
        Value::Array(a) => a.iter().any(has_invalid),
        Value::Object(o) => o.get("set").is_some_and(has_invalid),
        _ => false,
    }
}

fn is_drop(v: &Value) -> bool {
    v.get("drop").is_some() || v.get("reject").is_some()
}

/// `ct state invalid ... drop|reject` (not `!=`), or a `ct state` verdict
/// map sending `invalid` to drop or reject.
fn drops_invalid(expr: &Value) -> bool {
    let Some(stmts) = expr.as_array() else {
        return false;
    };
    let matched = stmts.iter().any(|s| {
        s.get("match")
            .is_some_and(|m| is_ct_state(&m["left"]) && m["op"] != "!=" && has_invalid(&m["right"]))
    });
    let vmap = stmts.iter().any(|s| {
        s.get("vmap").is_some_and(|m| {
            is_ct_state(&m["key"])
                && m.pointer("/data/set")
                    .and_then(Value::as_array)
                    .is_some_and(|entries| {
                        entries.iter().any(|e| has_invalid(&e[0]) && is_drop(&e[1]))
                    })
        })
    });
    vmap || (matched && stmts.iter().any(is_drop))
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
    fn kube_proxy_rules_are_recognised() {
        let nat = "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\nCOMMIT\n";
        assert!(parse_iptables_save(nat, "iptables-nft").unwrap().kube_proxy);
        let filter_only = parse_iptables_save(KUBE, "iptables-nft").unwrap();
        assert!(
            !filter_only.kube_proxy,
            "KUBE-FORWARD alone is not the Service rules"
        );
        let nft =
            r#"{"nftables": [{"table": {"family": "ip", "name": "kube-proxy", "handle": 1}}]}"#;
        assert!(parse_nft_json(nft).unwrap().kube_proxy);
        let inet = nft.replace("\"ip\"", "\"inet\"");
        assert!(!parse_nft_json(&inet).unwrap().kube_proxy);
        assert!(
            !parse_nft_json(include_str!("nft-forms.json"))
                .unwrap()
                .kube_proxy
        );
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
        // `nft -j list ruleset` of a ruleset with each form (nftables 1.0.6).
        let p = parse_nft_json(include_str!("nft-forms.json")).unwrap();
        let by_chain: HashMap<_, _> = p.drops.iter().map(|d| (d.chain.as_str(), d)).collect();
        assert!(by_chain["input"].protects(), "verdict map");
        assert!(
            by_chain["kube"].protects(),
            "anonymous set, reached by jump"
        );
        assert_eq!(by_chain["kube"].reached_from, vec!["forward".to_string()]);
        assert!(
            by_chain["late"].protects(),
            "list, reject, mangle prerouting"
        );
        assert!(!by_chain["orphan"].protects());
        assert!(!by_chain.contains_key("neg"));
        assert!(
            !by_chain["early"].protects(),
            "raw priority is before conntrack"
        );
        assert!(!by_chain["fwd6"].protects(), "ip6 only");
        assert_eq!(by_chain["fwd6"].reached_from, vec!["forward".to_string()]);
        assert_eq!(p.drops.len(), 6, "{:?}", p.drops);
        assert_eq!(p.rules, 10);
    }

    #[test]
    fn nft_garbage_and_empty() {
        assert!(parse_nft_json("}}}} {{ nonsense\n").is_err());
        assert!(parse_nft_json("{\"tables\": []}").is_err());
        let empty = r#"{"nftables": [{"metainfo": {"json_schema_version": 1}}]}"#;
        assert_eq!(parse_nft_json(empty).unwrap().rules, 0);
        let odd = r#"{"nftables": [{"rule": {"expr": 3}}, {"rule": {}}, {"chain": 1}]}"#;
        assert!(parse_nft_json(odd).unwrap().drops.is_empty());
    }

    #[test]
    fn judgement() {
        let none = vec![Source::Read {
            name: "iptables-nft".into(),
            rules: 0,
            drops: vec![],
            kube_proxy: false,
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
            kube_proxy: p.kube_proxy,
        }];
        assert_eq!(judge(Ok(0), &with).status, Status::Ok);
        let missing = Err(ReadError::Missing { path: "x".into() });
        assert_eq!(judge(missing, &with).status, Status::Ok);
    }
}
