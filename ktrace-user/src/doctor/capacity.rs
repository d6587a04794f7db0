//! Check 3: conntrack capacity.
//! - `conntrack_usage`: `nf_conntrack_count` against `nf_conntrack_max`;
//! - `conntrack_buckets`: `nf_conntrack_buckets` and entries per bucket at a
//!   full table;
//! - `conntrack_counters`: `invalid`, `drop`, `early_drop`, `insert_failed`
//!   from `/proc/net/stat/nf_conntrack`, summed over CPUs, with rates when
//!   sampled;
//! - `conntrack_insert_race`: `insert_failed` (and `clashres`) rising over
//!   the sample.
//!
//! `/proc/net/stat/nf_conntrack` has a header of column names and one row of
//! hexadecimal numbers per CPU. Columns are found by name: they changed
//! across kernels (`searched` became `clashres` in 5.10, `delete_list`
//! became `chainlength` in 6.1). `entries` is the same in every row and is
//! not summed. All of it is per network namespace, except `nf_conntrack_max`
//! and `nf_conntrack_buckets`, which are global.

use std::collections::BTreeMap;

use serde_json::json;

use super::{Check, Ctx, Fs, ReadError, Status};

/// Counters reported, in this order.
pub const COUNTERS: &[&str] = &["invalid", "drop", "early_drop", "insert_failed"];

const STAT: &str = "/proc/net/stat/nf_conntrack";

/// Usage at or above which the check warns / fails, in percent.
const USAGE_WARN: f64 = 75.0;
const USAGE_FAIL: f64 = 90.0;

/// Entries per bucket (at a full table) above which lookups slow down.
const MAX_PER_BUCKET: u64 = 8;

pub use crate::ctstat::{parse_stat, Stats};

fn read_stat(fs: &Fs) -> Result<Stats, ReadError> {
    let text = fs.read(STAT)?;
    parse_stat(&text).map_err(|what| ReadError::Malformed {
        path: fs.display(STAT),
        what,
    })
}

pub fn checks(ctx: &Ctx) -> Vec<Check> {
    vec![
        check_usage(ctx),
        check_buckets(ctx),
        check_counters(ctx),
        check_insert_race(ctx),
    ]
}

fn check_usage(ctx: &Ctx) -> Check {
    const CHECK: &str = "conntrack_usage";
    let fs = &ctx.fs;
    let (count, max) = match (
        fs.sysctl_u64("net.netfilter.nf_conntrack_count"),
        fs.sysctl_u64("net.netfilter.nf_conntrack_max"),
    ) {
        (Ok(c), Ok(m)) => (c, m),
        (Err(e), _) | (_, Err(e)) => return ctx.unreadable(CHECK, &e),
    };
    let netns_note = if ctx.initial_netns == Some(false) {
        " The count is this network namespace's; nf_conntrack_max is shared by all of them."
    } else {
        ""
    };
    let expected = format!("below {USAGE_WARN}% of nf_conntrack_max");
    if max == 0 {
        return Check::new(CHECK, Status::Ok, format!("{count} entries, no limit"))
            .expected(expected)
            .why(format!(
                "nf_conntrack_max=0 means no limit on entries.{netns_note}"
            ))
            .evidence(json!({"count": count, "max": max}));
    }
    let pct = count as f64 * 100.0 / max as f64;
    let value = format!("{count}/{max} ({pct:.1}%)");
    let evidence = json!({"count": count, "max": max, "percent": (pct * 10.0).round() / 10.0});
    let status = if pct >= USAGE_FAIL {
        Status::Fail
    } else if pct >= USAGE_WARN {
        Status::Warn
    } else {
        Status::Ok
    };
    let mut c = Check::new(CHECK, status, value)
        .expected(expected)
        .evidence(evidence);
    if status == Status::Ok {
        c = c.why(format!(
            "room for new connections: a full table drops new connections \
             (conntrack_table_full).{netns_note}"
        ));
    } else {
        c = c
            .why(format!(
                "the conntrack table is {pct:.0}% full; when full, the kernel drops the first \
                 packet of new connections (\"nf_conntrack: table full, dropping packet\") and \
                 clients see timeouts (conntrack_table_full).{netns_note}"
            ))
            .fix(format!(
                "raise net.netfilter.nf_conntrack_max (e.g. to {}) together with \
                 /sys/module/nf_conntrack/parameters/hashsize (kube-proxy: conntrack.maxPerCore), \
                 or find what opens so many connections (conntrack -L | sort)",
                max.saturating_mul(2)
            ));
    }
    c
}

fn check_buckets(ctx: &Ctx) -> Check {
    const CHECK: &str = "conntrack_buckets";
    let fs = &ctx.fs;
    let (buckets, max) = match (
        fs.sysctl_u64("net.netfilter.nf_conntrack_buckets"),
        fs.sysctl_u64("net.netfilter.nf_conntrack_max"),
    ) {
        (Ok(b), Ok(m)) => (b, m),
        (Err(e), _) | (_, Err(e)) => return ctx.unreadable(CHECK, &e),
    };
    if buckets == 0 {
        return Check::unknown(
            CHECK,
            format!(
                "{} says 0 buckets, which the kernel never has",
                fs.display("/proc/sys/net/netfilter/nf_conntrack_buckets")
            ),
        );
    }
    let evidence = json!({"buckets": buckets, "max": max, "max_per_bucket": max.div_ceil(buckets)});
    let expected = format!("nf_conntrack_max at most {MAX_PER_BUCKET}× nf_conntrack_buckets");
    if max == 0 {
        return Check::new(CHECK, Status::Ok, format!("{buckets} buckets, no max"))
            .expected(expected)
            .why("nf_conntrack_max=0: no limit, so the chain length follows the load")
            .evidence(evidence);
    }
    let per = max as f64 / buckets as f64;
    let value = format!("{buckets} buckets, max {max} ({per:.1} per bucket when full)");
    let (status, why, fix) = if max > buckets.saturating_mul(MAX_PER_BUCKET) {
        let why = format!(
            "a full table puts {per:.0} entries in each hash chain: every packet's lookup \
             walks them, which costs CPU in softirq and makes insert races more likely"
        );
        let fix = format!(
            "echo {} > /sys/module/nf_conntrack/parameters/hashsize (kube-proxy sets \
             hashsize = max/4)",
            max.div_ceil(4)
        );
        (Status::Warn, why, fix)
    } else {
        let why = "hash chains stay short even with a full table";
        (Status::Ok, why.to_string(), String::new())
    };
    Check::new(CHECK, status, value)
        .expected(expected)
        .why(why)
        .fix(fix)
        .evidence(evidence)
}

/// The conntrack counters read once, and again after the sample window.
pub struct CtSample {
    pub first: Result<Stats, ReadError>,
    /// The second read and the seconds between the two; `None` when not
    /// sampled (offline audit, `--sample 0`, or the first read failed).
    pub second: Option<(Result<Stats, ReadError>, f64)>,
}

impl CtSample {
    /// Reads the table, and again `window` later when there is one.
    pub fn take(fs: &Fs, window: Option<std::time::Duration>) -> CtSample {
        let first = read_stat(fs);
        let window = window.filter(|d| !d.is_zero() && first.is_ok());
        let second = window.map(|w| {
            let start = std::time::Instant::now();
            std::thread::sleep(w);
            (read_stat(fs), start.elapsed().as_secs_f64())
        });
        CtSample { first, second }
    }

    /// How much `name` rose over the sample, and in how many seconds.
    pub fn rise(&self, name: &str) -> Option<(u64, f64)> {
        let (Ok(a), Some((Ok(b), secs))) = (&self.first, &self.second) else {
            return None;
        };
        Some((b.get(name)?.saturating_sub(a.get(name)?), *secs))
    }

    /// Why the second read failed, for a check's `why`.
    fn second_note(&self) -> String {
        match &self.second {
            Some((Err(e), _)) => format!(" The second sample failed: {e}."),
            _ => String::new(),
        }
    }
}

fn check_counters(ctx: &Ctx) -> Check {
    const CHECK: &str = "conntrack_counters";
    let first = match &ctx.ct.first {
        Ok(s) => s,
        Err(e) => return ctx.unreadable(CHECK, e),
    };
    let rates: BTreeMap<&str, f64> = COUNTERS
        .iter()
        .filter_map(|n| ctx.ct.rise(n).map(|(d, secs)| (*n, d as f64 / secs)))
        .collect();
    let sampled_secs = ctx.ct.rise("invalid").map(|(_, secs)| secs);
    let totals: BTreeMap<&str, Option<u64>> = COUNTERS.iter().map(|n| (*n, first.get(n))).collect();
    let value = COUNTERS
        .iter()
        .map(|n| {
            let total = first
                .get(n)
                .map_or_else(|| "?".to_string(), |v| v.to_string());
            match rates.get(n) {
                Some(r) => format!("{n}={total} ({r:.1}/s)"),
                None => format!("{n}={total}"),
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    let evidence = json!({
        "cpus": first.cpus,
        "totals": totals,
        "rates_per_sec": rates,
        "sample_secs": sampled_secs,
    });
    let (status, why, fix) = if sampled_secs.is_some() {
        verdict_now(&rates)
    } else {
        verdict_since_boot(first)
    };
    Check::new(CHECK, status, value)
        .expected("drop and early_drop not rising; invalid low")
        .why(format!("{why}.{}", ctx.ct.second_note()))
        .fix(fix)
        .evidence(evidence)
}

type Verdict = (Status, String, &'static str);

/// From the rates of a sample: what is happening now. (Failed inserts are
/// `conntrack_insert_race`'s.)
fn verdict_now(rates: &BTreeMap<&str, f64>) -> Verdict {
    let r = |n: &str| rates.get(n).copied().unwrap_or(0.0);
    if r("drop") > 0.0 || r("early_drop") > 0.0 {
        (
            Status::Fail,
            format!(
                "the table is full now: {:.1} new connections/s dropped, {:.1} entries/s \
                 evicted early",
                r("drop"),
                r("early_drop")
            ),
            "raise net.netfilter.nf_conntrack_max (see conntrack_usage)",
        )
    } else if r("invalid") > 0.0 {
        (
            Status::Warn,
            format!(
                "{:.1} packets/s are INVALID now; without be_liberal or an INVALID-drop rule \
                 they leave un-NATed (see unnated_reply_protection); `ktrace watch` names them",
                r("invalid")
            ),
            "run `ktrace watch` to see which flows they are",
        )
    } else {
        (
            Status::Ok,
            "no drops, early drops or INVALID verdicts during the sample".to_string(),
            "",
        )
    }
}

/// From the totals since boot (no sample): what happened.
fn verdict_since_boot(first: &Stats) -> Verdict {
    let t = |n: &str| first.get(n).unwrap_or(0);
    if t("drop") > 0 || t("early_drop") > 0 {
        (
            Status::Warn,
            format!(
                "since boot (or since this network namespace was created) the table was full: \
                 {} new connections dropped, {} entries evicted early; use --sample SECS to see \
                 whether it is happening now",
                t("drop"),
                t("early_drop")
            ),
            "raise net.netfilter.nf_conntrack_max if it recurs (see conntrack_usage)",
        )
    } else {
        (
            Status::Ok,
            format!(
                "the table was never full; {} INVALID verdicts since boot (use --sample SECS \
                 for rates)",
                t("invalid")
            ),
            "",
        )
    }
}

/// `conntrack_insert_race`: packets of new flows (UDP DNS, typically)
/// dropped because they lost the race to confirm their conntrack entry
/// (`insert_failed`), or races the kernel resolved (`clashres`, 5.10+).
pub fn check_insert_race(ctx: &Ctx) -> Check {
    const CHECK: &str = "conntrack_insert_race";
    let first = match &ctx.ct.first {
        Ok(s) => s,
        Err(e) => return ctx.unreadable(CHECK, e),
    };
    insert_race(first, &ctx.ct)
}

/// The insert-race verdict from the first read and the sample.
fn insert_race(first: &Stats, ct: &CtSample) -> Check {
    const CHECK: &str = "conntrack_insert_race";
    let failed = ct.rise("insert_failed");
    let resolved = ct.rise("clashres");
    let evidence = json!({
        "insert_failed": first.get("insert_failed"),
        "clash_resolve": first.get("clashres"),
        "insert_failed_rise": failed.map(|r| r.0),
        "clash_resolve_rise": resolved.map(|r| r.0),
        "sample_secs": failed.map(|r| r.1),
    });
    let fix = "in the pods' resolv.conf (spec.dnsConfig.options) add `single-request-reopen` \
               (glibc: A and AAAA from separate sockets) or `use-vc` (DNS over TCP); or run \
               NodeLocal DNSCache so pods do not send DNS through a Service DNAT";
    let c = match (failed, resolved) {
        (Some((f, secs)), _) if f > 0 => Check::new(CHECK, Status::Fail, format!("insert_failed +{f} in {secs:.1}s"))
            .why(
                "two packets of one new flow (a DNS client's A and AAAA queries from one socket) \
                 raced through DNAT on two CPUs and the loser was dropped now: the client waits \
                 for its timeout (5 s for DNS) before it retries (finding conntrack_insert_race)",
            )
            .fix(fix),
        (Some((_, secs)), Some((r, _))) if r > 0 => Check::new(CHECK, Status::Ok, format!("clash_resolve +{r} in {secs:.1}s, insert_failed +0"))
            .why("new flows race to confirm their conntrack entry and the kernel resolves the clashes: no packet was dropped"),
        (Some((_, secs)), _) => Check::new(CHECK, Status::Ok, format!("no failed insert in {secs:.1}s"))
            .why(format!("no packet lost the race to confirm its conntrack entry during the sample.{}", ct.second_note())),
        (None, _) => match first.get("insert_failed") {
            Some(n) if n > 0 => Check::new(CHECK, Status::Warn, format!("insert_failed={n} since boot"))
                .why(format!(
                    "{n} packets lost the race to confirm their conntrack entry since boot (or since \
                     this network namespace was created) and were dropped; sample (--sample SECS on \
                     a live node) to see whether it happens now"
                ))
                .fix(fix),
            Some(_) => Check::new(CHECK, Status::Ok, "insert_failed=0 since boot")
                .why("no packet ever lost the race to confirm its conntrack entry"),
            None => Check::unknown(CHECK, "this kernel's /proc/net/stat/nf_conntrack has no insert_failed column"),
        },
    };
    c.expected("insert_failed not rising").evidence(evidence)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_by_header_name() {
        let text = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart\n\
0000000a  00000000 00000000 00000000 00000010 00000000 00000000 00000000 00000000 00000001 00000002 00000000 00000000  00000000 00000000 00000000 00000000\n\
0000000a  00000000 00000000 00000000 000000f0 00000000 00000000 00000000 00000000 00000000 00000003 00000004 00000000  00000000 00000000 00000000 00000000\n";
        let s = parse_stat(text).unwrap();
        assert_eq!(s.cpus, 2);
        assert_eq!(s.get("entries"), Some(10));
        assert_eq!(s.get("invalid"), Some(0x100));
        assert_eq!(s.get("insert_failed"), Some(1));
        assert_eq!(s.get("drop"), Some(5));
        assert_eq!(s.get("early_drop"), Some(4));
    }

    #[test]
    fn old_layout_by_name() {
        // 5.4: `searched` and `delete_list`, in other positions.
        let text = "entries  searched found new invalid ignore delete delete_list insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart\n\
00000001  00000000 00000000 00000000 00000002 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000  00000000 00000000 00000000 00000000\n";
        let s = parse_stat(text).unwrap();
        assert_eq!(s.get("invalid"), Some(2));
        assert!(s.get("clashres").is_none());
    }

    /// Two reads of a table with `insert_failed` and `clashres` columns.
    fn sample(first: (u64, u64), second: Option<(u64, u64)>) -> (Stats, CtSample) {
        let table = |(failed, clash): (u64, u64)| {
            parse_stat(&format!(
                "entries clashres insert_failed\n1 {clash:x} {failed:x}\n"
            ))
        };
        let a = table(first).unwrap();
        let ct = CtSample {
            first: Ok(a.clone()),
            second: second.map(|b| (Ok(table(b).unwrap()), 1.0)),
        };
        (a, ct)
    }

    #[test]
    fn insert_race_verdicts() {
        let verdict = |first, second| {
            let (a, ct) = sample(first, second);
            let c = insert_race(&a, &ct);
            (c.status, c.value)
        };
        let (st, v) = verdict((3, 0), Some((5, 0)));
        assert_eq!((st, v.as_str()), (Status::Fail, "insert_failed +2 in 1.0s"));
        let (st, v) = verdict((3, 7), Some((3, 9)));
        assert_eq!(st, Status::Ok, "resolved clashes drop nothing: {v}");
        assert!(v.starts_with("clash_resolve +2"), "{v}");
        assert_eq!(verdict((3, 7), Some((3, 7))).0, Status::Ok);
        // No sample (offline): totals since boot.
        assert_eq!(verdict((3, 0), None).0, Status::Warn);
        assert_eq!(verdict((0, 0), None).0, Status::Ok);
    }

    #[test]
    fn malformed_tables() {
        assert!(parse_stat("").is_err());
        assert!(parse_stat("entries invalid\n").is_err());
        assert!(parse_stat("entries invalid\n1 2 3\n").is_err());
        assert!(parse_stat("entries invalid\nzz 01\n").is_err());
        assert!(parse_stat("0001 0002\n0001 0002\n").is_err());
        // Overflowing sums saturate instead of panicking.
        let s = parse_stat("entries drop\n1 ffffffffffffffff\n1 ffffffffffffffff\n").unwrap();
        assert_eq!(s.get("drop"), Some(u64::MAX));
    }
}
