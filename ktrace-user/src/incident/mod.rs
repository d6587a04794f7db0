//! Findings grouped into incidents, for a person: repeats of one kind for
//! one Service while the incident lasts are one [`Group`] (connections,
//! clients affected, backends, first and last time) instead of one finding
//! per connection. `--json` is not grouped: it keeps one finding per
//! connection.
//!
//! - [`line`]: the compact one-line form of a finding or a group, and the
//!   explanation (cause and remedy) printed once per group.
//! - [`plain`]: the human stream of `watch` and `replay` (what is printed
//!   when, with a periodic summary line per group).
//!
//! The dashboard (`crate::tui`) reads the same groups.

pub mod line;
pub mod plain;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};

use crate::engine::Phase;
use crate::engine::{Evidence, Finding, FindingKind, Severity};

/// A group ends when it has had no finding for this long: the next finding
/// of its kind and Service opens a new group (and prints its remedy again).
pub const GROUP_IDLE_NS: u64 = 60_000_000_000;
/// Distinct clients and backends remembered per group (memory is bounded
/// whatever the storm; beyond, the counts say "at least").
const MAX_CLIENTS: usize = 4096;
const MAX_BACKENDS: usize = 64;
/// The rate column: findings over the last this many seconds.
pub const RATE_WINDOW_S: u64 = 10;

/// What a group is about: one kind of finding on one Service (or, for a
/// reset storm with no known Service, one backend; none for a node-wide
/// table-full).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GroupKey {
    pub kind: FindingKind,
    pub target: Option<SocketAddr>,
}

impl GroupKey {
    pub fn of(f: &Finding) -> GroupKey {
        GroupKey {
            kind: f.kind(),
            target: f.service.or(match f.evidence {
                Evidence::RstStorm(_) => f.backend,
                _ => None,
            }),
        }
    }
}

/// One incident: the findings of one kind on one Service while it lasts.
#[derive(Debug, Clone)]
pub struct Group {
    pub key: GroupKey,
    /// The worst severity seen in the group.
    pub severity: Severity,
    pub first_ns: u64,
    pub last_ns: u64,
    /// Findings in the group (one per connection, except storms).
    pub findings: u64,
    /// Connections reset: one per finding, a storm's running total of resets.
    pub connections: u64,
    /// Distinct client IPs (at most [`MAX_CLIENTS`]).
    clients: HashSet<IpAddr>,
    /// More distinct clients than remembered.
    pub clients_capped: bool,
    /// Backends named, most recent last (at most [`MAX_BACKENDS`]).
    pub backends: Vec<SocketAddr>,
    /// The most recent finding: the detail pane's cause, evidence and remedy.
    pub latest: Finding,
    /// Findings per second over the last [`RATE_WINDOW_S`] seconds
    /// (second since boot, count).
    recent: VecDeque<(u64, u32)>,
    /// A reset storm that reported its end.
    pub ended: bool,
}

impl Group {
    fn new(f: &Finding) -> Group {
        Group {
            key: GroupKey::of(f),
            severity: f.severity,
            first_ns: f.ts_ns,
            last_ns: f.ts_ns,
            findings: 0,
            connections: 0,
            clients: HashSet::new(),
            clients_capped: false,
            backends: Vec::new(),
            latest: f.clone(),
            recent: VecDeque::new(),
            ended: false,
        }
    }

    fn add(&mut self, f: &Finding) {
        self.findings += 1;
        if rank(f.severity) > rank(self.severity) {
            self.severity = f.severity;
        }
        self.first_ns = self.first_ns.min(f.ts_ns);
        self.last_ns = self.last_ns.max(f.ts_ns);
        match &f.evidence {
            Evidence::RstStorm(s) => {
                self.connections = self.connections.max(s.total);
                self.ended = s.phase == Phase::End;
            }
            Evidence::ConntrackTableFull(t) => self.connections += t.count,
            Evidence::ConntrackInsertRace(r) => self.connections += r.count,
            _ => self.connections += 1,
        }
        if let Some(c) = f.client {
            if self.clients.len() < MAX_CLIENTS {
                self.clients.insert(c.ip());
            } else if !self.clients.contains(&c.ip()) {
                self.clients_capped = true;
            }
        }
        if let Some(b) = f.backend {
            self.backends.retain(|x| *x != b);
            if self.backends.len() == MAX_BACKENDS {
                self.backends.remove(0);
            }
            self.backends.push(b);
        }
        let sec = f.ts_ns / 1_000_000_000;
        match self.recent.iter_mut().find(|(s, _)| *s == sec) {
            Some((_, n)) => *n += 1,
            None => self.recent.push_back((sec, 1)),
        }
        while self
            .recent
            .front()
            .is_some_and(|(s, _)| *s + RATE_WINDOW_S <= sec)
        {
            self.recent.pop_front();
        }
        self.latest = f.clone();
    }

    /// Distinct client IPs affected (at least this many when capped).
    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    /// Findings per second over the last [`RATE_WINDOW_S`] seconds up to `now_ns`.
    pub fn rate(&self, now_ns: u64) -> f64 {
        let now = now_ns / 1_000_000_000;
        let n: u32 = self
            .recent
            .iter()
            .filter(|(s, _)| s + RATE_WINDOW_S > now)
            .map(|(_, n)| n)
            .sum();
        f64::from(n) / RATE_WINDOW_S as f64
    }

    /// Still going at `now_ns`: a storm that has not ended, anything else
    /// with a finding within the idle time.
    pub fn active(&self, now_ns: u64) -> bool {
        !self.ended && now_ns.saturating_sub(self.last_ns) < GROUP_IDLE_NS
    }
}

/// Severities in order, worst highest.
pub fn rank(s: Severity) -> u8 {
    match s {
        Severity::Warning => 0,
        Severity::Error => 1,
        Severity::Critical => 2,
    }
}

/// The open groups, by key.
#[derive(Debug, Default, Clone)]
pub struct Groups {
    open: HashMap<GroupKey, Group>,
}

impl Groups {
    /// Adds `f` to its group; true when that group is new (its first finding).
    pub fn add(&mut self, f: &Finding) -> bool {
        let key = GroupKey::of(f);
        let mut new = false;
        let g = self.open.entry(key).or_insert_with(|| {
            new = true;
            Group::new(f)
        });
        g.add(f);
        new
    }

    pub fn get(&self, key: &GroupKey) -> Option<&Group> {
        self.open.get(key)
    }

    /// Removes and returns the groups idle for [`GROUP_IDLE_NS`] at `now_ns`.
    pub fn expire(&mut self, now_ns: u64) -> Vec<Group> {
        let idle: Vec<GroupKey> = self
            .open
            .values()
            .filter(|g| now_ns.saturating_sub(g.last_ns) >= GROUP_IDLE_NS)
            .map(|g| g.key)
            .collect();
        idle.iter().filter_map(|k| self.open.remove(k)).collect()
    }

    /// The groups, worst first: active before ended, then severity, then
    /// the most recent.
    pub fn sorted(&self, now_ns: u64) -> Vec<&Group> {
        let mut v: Vec<&Group> = self.open.values().collect();
        let order = |g: &Group| {
            (
                std::cmp::Reverse((g.active(now_ns), rank(g.severity), g.last_ns)),
                g.key.kind.as_str(),
                g.key.target,
            )
        };
        v.sort_by_key(|g| order(g));
        v
    }

    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::engine::finding::{Time, UnnatedBasis, UnnatedReply};

    pub fn unnated(ts_ns: u64, client_port: u16) -> Finding {
        Finding {
            ts_ns,
            severity: Severity::Error,
            service: Some("10.96.0.10:2222".parse().unwrap()),
            backend: Some("10.0.1.2:2222".parse().unwrap()),
            client: Some(format!("10.0.0.2:{client_port}").parse().unwrap()),
            cause: "conntrack INVALID".into(),
            remedy: "set nf_conntrack_tcp_be_liberal=1".into(),
            evidence: Evidence::UnnatedReply(UnnatedReply {
                basis: vec![UnnatedBasis::CtInvalidCounter],
                rst_reason: None,
                verdict: None,
                first: Time::Mono(ts_ns),
                count: 1,
                ct_invalid_counter_rise: Some(8),
                path: crate::engine::finding::UnnatedPath::ReplyToClient,
                snat: None,
            }),
        }
    }

    #[test]
    fn repeats_of_a_kind_on_a_service_are_one_group() {
        let mut g = Groups::default();
        assert!(g.add(&unnated(1_000_000_000, 1)));
        assert!(!g.add(&unnated(2_000_000_000, 2)));
        assert!(!g.add(&unnated(3_000_000_000, 3)));
        assert_eq!(g.len(), 1);
        let grp = g.sorted(3_000_000_000)[0];
        assert_eq!(grp.connections, 3);
        assert_eq!(grp.clients(), 1, "one client IP, three ports");
        assert_eq!(grp.first_ns, 1_000_000_000);
        assert_eq!(grp.last_ns, 3_000_000_000);
        assert_eq!(grp.backends, vec!["10.0.1.2:2222".parse().unwrap()]);
        assert!((grp.rate(3_000_000_000) - 0.3).abs() < 1e-9);
    }

    #[test]
    fn an_idle_group_ends_and_the_next_finding_opens_a_new_one() {
        let mut g = Groups::default();
        assert!(g.add(&unnated(1, 1)));
        assert!(
            g.expire(GROUP_IDLE_NS).is_empty(),
            "not idle long enough yet"
        );
        assert_eq!(g.expire(GROUP_IDLE_NS + 1).len(), 1);
        assert!(g.is_empty());
        assert!(g.add(&unnated(GROUP_IDLE_NS + 5, 2)));
    }
}
