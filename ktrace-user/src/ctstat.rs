//! Conntrack counters of the current network namespace: the per-CPU table
//! `/proc/net/stat/nf_conntrack` (columns by header name: they changed across
//! kernels) summed, plus `nf_conntrack_count`/`nf_conntrack_max`. Used by
//! `doctor`, and sampled by `watch`/`record` as evidence where the conntrack
//! kprobes cannot attach.

use std::collections::BTreeMap;

use crate::event::{CounterRise, EventBody};
use crate::sysctl::read_u64;

/// `/proc/net/stat/nf_conntrack`, summed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    pub cpus: usize,
    /// Column → sum over CPUs (`entries`: the first row's value).
    pub columns: BTreeMap<String, u64>,
}

impl Stats {
    pub fn get(&self, name: &str) -> Option<u64> {
        self.columns.get(name).copied()
    }
}

/// Parses the per-CPU table; every row must have one hex number per column.
pub fn parse_stat(text: &str) -> Result<Stats, String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .ok_or("empty file")?
        .split_whitespace()
        .collect();
    if header.is_empty()
        || header
            .iter()
            .all(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err("the first line is not a header of column names".into());
    }
    let mut columns: BTreeMap<String, u64> = BTreeMap::new();
    let mut cpus = 0usize;
    for (n, line) in lines.enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() != header.len() {
            return Err(format!(
                "row {} has {} fields, the header names {}",
                n + 1,
                fields.len(),
                header.len()
            ));
        }
        for (name, field) in header.iter().zip(&fields) {
            let v = u64::from_str_radix(field, 16)
                .map_err(|_| format!("row {}: {field:?} is not hexadecimal", n + 1))?;
            let e = columns.entry(name.to_string()).or_insert(0);
            if *name == "entries" {
                if cpus == 0 {
                    *e = v;
                }
            } else {
                *e = e.saturating_add(v);
            }
        }
        cpus += 1;
    }
    if cpus == 0 {
        return Err("no per-CPU rows".into());
    }
    Ok(Stats { cpus, columns })
}

/// Counter columns ktrace follows, in [`EventBody::CtCounters`] order.
const COLUMNS: [&str; 5] = ["invalid", "drop", "early_drop", "insert_failed", "clashres"];

/// Samples the counters and reports their increases since the last sample.
#[derive(Debug, Default)]
pub struct CounterWatch {
    last: Option<[u64; 5]>,
}

impl CounterWatch {
    /// Reads /proc now; returns a `CtCounters` body when a counter rose.
    /// The first sample only sets the baseline. Unreadable (nf_conntrack not
    /// loaded) gives nothing.
    pub fn sample(&mut self) -> Option<EventBody> {
        self.read(false)
    }

    /// [`CounterWatch::sample`], also when nothing rose (all zeroes): for a
    /// finding waiting to cite the sample, "no INVALID counted" is news.
    pub fn sample_now(&mut self) -> Option<EventBody> {
        self.read(true)
    }

    fn read(&mut self, always: bool) -> Option<EventBody> {
        let text = std::fs::read_to_string("/proc/net/stat/nf_conntrack").ok()?;
        let stats = parse_stat(&text).ok()?;
        let fill = (
            read_u64("/proc/sys/net/netfilter/nf_conntrack_count"),
            read_u64("/proc/sys/net/netfilter/nf_conntrack_max"),
        );
        let had_baseline = self.last.is_some();
        match self.update(&stats, fill.0, fill.1) {
            None if always && had_baseline => Some(EventBody::CtCounters(CounterRise {
                invalid: 0,
                drop: 0,
                early_drop: 0,
                insert_failed: 0,
                clash_resolve: 0,
                count: fill.0,
                max: fill.1,
            })),
            r => r,
        }
    }

    /// Whether the last read found the counters (nf_conntrack loaded).
    pub fn readable(&self) -> bool {
        self.last.is_some()
    }

    fn update(&mut self, stats: &Stats, count: Option<u64>, max: Option<u64>) -> Option<EventBody> {
        let now = COLUMNS.map(|c| stats.get(c).unwrap_or(0));
        let prev = self.last.replace(now)?;
        let d: Vec<u64> = now
            .iter()
            .zip(prev)
            .map(|(n, p)| n.saturating_sub(p))
            .collect();
        if d.iter().all(|&x| x == 0) {
            return None;
        }
        Some(EventBody::CtCounters(CounterRise {
            invalid: d[0],
            drop: d[1],
            early_drop: d[2],
            insert_failed: d[3],
            clash_resolve: d[4],
            count,
            max,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_increases_after_the_baseline() {
        let t = |invalid: u32, drop: u32| {
            parse_stat(&format!(
                "entries  searched found new invalid ignore delete delete_list insert insert_failed drop early_drop\n\
                 00000003 0 0 0 {invalid:08x} 0 0 0 0 00000000 {drop:08x} 0\n\
                 00000003 0 0 0 00000001 0 0 0 0 00000000 00000000 0\n"
            ))
            .unwrap()
        };
        let mut w = CounterWatch::default();
        assert!(!w.readable());
        assert_eq!(w.update(&t(4, 0), None, None), None, "baseline");
        assert!(w.readable());
        assert_eq!(w.update(&t(4, 0), None, None), None, "no change");
        assert_eq!(
            w.update(&t(6, 2), Some(64), Some(64)),
            Some(EventBody::CtCounters(CounterRise {
                invalid: 2,
                drop: 2,
                early_drop: 0,
                insert_failed: 0,
                clash_resolve: 0,
                count: Some(64),
                max: Some(64)
            }))
        );
    }
}
