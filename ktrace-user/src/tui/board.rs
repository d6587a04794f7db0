//! What the dashboard shows, fed by updates: the node's header, the
//! incident groups, and resets and INVALID verdicts per second.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

use crate::clock::WallClock;
use crate::engine::{Finding, FindingKind};
use crate::event::{Event, EventBody};
use crate::hooks::HookStatus;
use crate::incident::{Group, GroupKey, Groups};
use crate::names::{FindingNames, SourceStatus};

/// Seconds of history in the sparklines.
pub const HISTORY_S: usize = 120;

/// One update from the pipeline (sent over a channel live, replayed in
/// `replay --tui`).
#[derive(Debug, Clone)]
pub enum Update {
    Status {
        hooks: Vec<(String, bool)>,
        kernel: String,
        clock: WallClock,
        /// Whether INVALID verdicts come one by one from a kernel hook (else
        /// from the conntrack counter).
        invalid_hook: bool,
    },
    /// A finding, and the Kubernetes names of its addresses when known.
    Finding(Box<Finding>, Option<Box<FindingNames>>),
    /// Resets and INVALID verdicts counted since the previous update, at `now_ns`.
    Counts {
        now_ns: u64,
        resets: u64,
        invalid: u64,
    },
    Lost(u64),
    /// What the Kubernetes name sources are doing.
    Names(Vec<SourceStatus>),
}

impl Update {
    pub fn finding(f: &Finding, names: Option<&FindingNames>) -> Update {
        Update::Finding(Box::new(f.clone()), names.cloned().map(Box::new))
    }

    pub fn status(hooks: &[HookStatus], kernel: Option<&str>, clock: WallClock) -> Update {
        Update::Status {
            hooks: hooks
                .iter()
                .map(|h| (h.name.to_string(), h.attached))
                .collect(),
            kernel: kernel.unwrap_or("?").to_string(),
            clock,
            invalid_hook: hooks.iter().any(|h| h.name == "ct_invalid" && h.attached),
        }
    }
}

/// Counts resets and INVALID verdicts of events between two `Counts` updates.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counter {
    pub resets: u64,
    pub invalid: u64,
    /// INVALID verdicts come from the `ct_invalid` hook (else the counter).
    pub invalid_hook: bool,
}

impl Counter {
    pub fn event(&mut self, ev: &Event) {
        match &ev.body {
            EventBody::TcpSendReset { .. } | EventBody::ResetsSummarised(_) => {
                self.resets += ev.body.resets_sent()
            }
            EventBody::CtInvalid(_) if self.invalid_hook => self.invalid += 1,
            EventBody::CtCounters(c) if !self.invalid_hook => self.invalid += c.invalid,
            _ => {}
        }
    }

    /// The counts so far, reset to zero.
    pub fn take(&mut self, now_ns: u64) -> Update {
        let u = Update::Counts {
            now_ns,
            resets: self.resets,
            invalid: self.invalid,
        };
        self.resets = 0;
        self.invalid = 0;
        u
    }
}

/// The dashboard's data.
#[derive(Debug, Clone)]
pub struct Board {
    pub node: String,
    pub kernel: String,
    pub hooks: Vec<(String, bool)>,
    pub clock: WallClock,
    pub lost: u64,
    /// Updates the dashboard missed because it was behind the pipeline
    /// (live only; counted by the tap, never hidden).
    pub behind: u64,
    pub groups: Groups,
    /// The names of each group's latest finding (its Service, backend
    /// and client), where known.
    pub names: HashMap<GroupKey, FindingNames>,
    /// What the name sources said last (`None`: no source runs, or a
    /// replay, whose names are the recording's).
    pub name_sources: Option<Vec<SourceStatus>>,
    /// The latest time seen (monotonic ns).
    pub now_ns: u64,
    /// Per second, oldest first, the last [`HISTORY_S`]: resets, INVALID.
    pub resets: VecDeque<u64>,
    pub invalid: VecDeque<u64>,
    /// The second (since boot) of the last entry of the series.
    second: u64,
}

impl Board {
    pub fn new(node: String) -> Board {
        Board {
            node,
            kernel: "?".into(),
            hooks: Vec::new(),
            clock: WallClock { offset_ns: 0 },
            lost: 0,
            behind: 0,
            groups: Groups::default(),
            names: HashMap::new(),
            name_sources: None,
            now_ns: 0,
            resets: VecDeque::new(),
            invalid: VecDeque::new(),
            second: 0,
        }
    }

    pub fn apply(&mut self, u: Update) {
        match u {
            Update::Status {
                hooks,
                kernel,
                clock,
                ..
            } => {
                self.hooks = hooks;
                self.kernel = kernel;
                self.clock = clock;
            }
            Update::Finding(f, names) => {
                self.now_ns = self.now_ns.max(f.ts_ns);
                self.groups.add(&f);
                let key = GroupKey::of(&f);
                match names {
                    Some(n) => self.names.insert(key, *n),
                    None => self.names.remove(&key),
                };
            }
            Update::Counts {
                now_ns,
                resets,
                invalid,
            } => {
                self.advance(now_ns);
                if let Some(r) = self.resets.back_mut() {
                    *r += resets;
                }
                if let Some(i) = self.invalid.back_mut() {
                    *i += invalid;
                }
                for g in self.groups.expire(now_ns) {
                    self.names.remove(&g.key);
                }
            }
            Update::Lost(n) => self.lost += n,
            Update::Names(s) => self.name_sources = Some(s),
        }
    }

    /// Moves the series to the second of `now_ns` (zeros for the seconds
    /// without an update).
    fn advance(&mut self, now_ns: u64) {
        self.now_ns = self.now_ns.max(now_ns);
        let sec = now_ns / 1_000_000_000;
        if self.resets.is_empty() {
            self.second = sec;
            self.resets.push_back(0);
            self.invalid.push_back(0);
        }
        while self.second < sec {
            self.second += 1;
            self.resets.push_back(0);
            self.invalid.push_back(0);
            if self.resets.len() > HISTORY_S {
                self.resets.pop_front();
                self.invalid.pop_front();
            }
        }
    }

    /// The groups shown: filtered, worst first.
    pub fn rows(&self, filter: &Filter) -> Vec<&Group> {
        self.groups
            .sorted(self.now_ns)
            .into_iter()
            .filter(|g| filter.kind.is_none_or(|k| g.key.kind == k))
            .filter(|g| filter.service.is_none_or(|s| g.key.target == Some(s)))
            .collect()
    }
}

/// What the table is narrowed to (`k` and `s` cycle through what is shown).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Filter {
    pub kind: Option<FindingKind>,
    pub service: Option<SocketAddr>,
}

/// This node's name: `NODE_NAME` (as the DaemonSet sets it), else the hostname.
pub fn node_name() -> String {
    std::env::var("NODE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}
