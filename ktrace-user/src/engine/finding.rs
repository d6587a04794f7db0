//! A diagnosed incident: what an operator reads at 3 a.m.
//!
//! The evidence of each kind is its own struct; the contract's JSON (serde)
//! and the human sentence both come from these types. Field order is the
//! JSON's key order (part of the contract's byte-for-byte output).

use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;

use super::storm::Phase;
use crate::clock::WallClock;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    UnnatedReply,
    RstStorm,
    BackendSwitch,
    QuiescentBackend,
    ConntrackTableFull,
    ConntrackInsertRace,
}

impl FindingKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::UnnatedReply => "unnated_reply",
            FindingKind::RstStorm => "rst_storm",
            FindingKind::BackendSwitch => "backend_switch",
            FindingKind::QuiescentBackend => "quiescent_backend",
            FindingKind::ConntrackTableFull => "conntrack_table_full",
            FindingKind::ConntrackInsertRace => "conntrack_insert_race",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Warning,
    Error,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
            Severity::Critical => "critical",
        }
    }
}

/// A time in evidence: CLOCK_MONOTONIC ns as the engine knows it (it has no
/// wall clock), made RFC 3339 text by [`Evidence::at_wall_clock`] for output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Time {
    Mono(u64),
    Wall(String),
}

impl Time {
    fn make_wall(&mut self, clock: &WallClock) {
        if let Time::Mono(ns) = *self {
            *self = Time::Wall(clock.rfc3339(ns));
        }
    }
}

/// Why an un-NATed reply is believed (`basis` of the JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnnatedBasis {
    /// The client's no-socket RST went to the backend's own address.
    ClientRstToBackendAddress,
    /// The conntrack kprobe saw the reply marked INVALID.
    CtInvalid,
    /// The conntrack INVALID counter rose around it.
    CtInvalidCounter,
    /// The node's own stack reset the backend from the address conntrack
    /// masqueraded the client to (an SNAT mapping ties it to the client).
    NodeRstToBackendFromSnatAddress,
    /// The node's own stack reset the client from the Service address,
    /// which it holds locally: the client's segment was not DNATed.
    NodeRstFromServiceAddress,
    /// The flow's conntrack entry had been destroyed (flush, expiry).
    CtEntryDestroyed,
}

/// Which way the un-NATed packet went (`path` of the JSON; absent for the
/// original topology, the backend's reply reaching the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnnatedPath {
    /// The backend's reply reached the client with the backend's address.
    ReplyToClient,
    /// The backend's reply went to the node's SNAT (masquerade) address.
    ReplyToSnatAddress,
    /// The client's segment reached the Service address held by the node.
    RequestToLocalService,
    /// The reply found no conntrack entry at all (flushed or expired).
    EntryLost,
}

impl UnnatedPath {
    fn is_default(&self) -> bool {
        *self == UnnatedPath::ReplyToClient
    }
}

/// Conntrack's INVALID verdict on the reply, as the kprobe saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CtVerdict {
    /// Always `"INVALID"`.
    pub ct_verdict: &'static str,
    /// INVALID verdicts on the flow within the correlation window.
    pub ct_invalid_count: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ct_reason: Option<Arc<str>>,
}

/// Evidence of `unnated_reply`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UnnatedReply {
    pub basis: Vec<UnnatedBasis>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rst_reason: Option<String>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<CtVerdict>,
    pub first: Time,
    /// Always 1: one finding per connection.
    pub count: u32,
    /// Set when the finding waited for the conntrack counter sample.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ct_invalid_counter_rise: Option<u64>,
    #[serde(skip_serializing_if = "UnnatedPath::is_default")]
    pub path: UnnatedPath,
    /// The node's masquerade address:port the backend replied to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snat: Option<SocketAddr>,
}

/// Evidence of `backend_switch`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackendSwitch {
    pub old_backend: SocketAddr,
    /// Seconds the flow was idle before the re-mapping (rounded to ms).
    pub idle_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rst_reason: Option<String>,
    pub first: Time,
}

/// Evidence of `rst_storm`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RstStorm {
    pub phase: Phase,
    /// Resets in the current window.
    pub count: u32,
    /// Resets since the storm started.
    pub total: u64,
    pub window_s: f64,
    pub threshold: u32,
    pub first: Time,
    pub last: Time,
}

/// Evidence of `conntrack_table_full`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TableFull {
    pub count: u64,
    pub first: Time,
    pub last: Time,
    /// What showed it (the hook, or the counters that rose).
    pub basis: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub example_src: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub example_dst: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nf_conntrack_max: Option<u64>,
}

/// Evidence of `conntrack_insert_race`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InsertRace {
    /// `dropped` (the packet lost the race and was dropped) or `resolved`
    /// (the kernel resolved the clash: nothing was lost).
    pub outcome: &'static str,
    /// What showed it: `confirm_drop` (the packet's own drop, hooked),
    /// `insert_failed_counter` or `clash_resolve_counter`.
    pub basis: &'static str,
    /// Packets in this episode (one for a hooked drop).
    pub count: u64,
    pub first: Time,
    pub last: Time,
}

/// Evidence of `quiescent_backend`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuiescentBackend {
    /// Always 0: the real server's weight.
    pub weight: i32,
    pub persistence_template: bool,
    pub connections: u64,
    pub first: Time,
}

/// What a finding rests on: one shape per kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Evidence {
    UnnatedReply(UnnatedReply),
    RstStorm(RstStorm),
    BackendSwitch(BackendSwitch),
    QuiescentBackend(QuiescentBackend),
    ConntrackTableFull(TableFull),
    ConntrackInsertRace(InsertRace),
}

impl Evidence {
    pub fn kind(&self) -> FindingKind {
        match self {
            Evidence::UnnatedReply(_) => FindingKind::UnnatedReply,
            Evidence::RstStorm(_) => FindingKind::RstStorm,
            Evidence::BackendSwitch(_) => FindingKind::BackendSwitch,
            Evidence::QuiescentBackend(_) => FindingKind::QuiescentBackend,
            Evidence::ConntrackTableFull(_) => FindingKind::ConntrackTableFull,
            Evidence::ConntrackInsertRace(_) => FindingKind::ConntrackInsertRace,
        }
    }

    /// The same evidence with its times as wall-clock text.
    pub fn at_wall_clock(&self, clock: &WallClock) -> Evidence {
        let mut e = self.clone();
        let times: Vec<&mut Time> = match &mut e {
            Evidence::UnnatedReply(x) => vec![&mut x.first],
            Evidence::RstStorm(x) => vec![&mut x.first, &mut x.last],
            Evidence::BackendSwitch(x) => vec![&mut x.first],
            Evidence::QuiescentBackend(x) => vec![&mut x.first],
            Evidence::ConntrackTableFull(x) => vec![&mut x.first, &mut x.last],
            Evidence::ConntrackInsertRace(x) => vec![&mut x.first, &mut x.last],
        };
        for t in times {
            t.make_wall(clock);
        }
        e
    }
}

/// Which of a finding's addresses a label is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Service,
    Backend,
    Client,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// CLOCK_MONOTONIC ns of the event that completed the finding.
    pub ts_ns: u64,
    pub severity: Severity,
    pub service: Option<SocketAddr>,
    pub backend: Option<SocketAddr>,
    pub client: Option<SocketAddr>,
    pub cause: String,
    pub remedy: String,
    /// Counts, first/last times, verdicts and reasons seen; its shape names the kind.
    pub evidence: Evidence,
}

/// The contract's JSON object of a finding (`"type":"finding"`).
#[derive(Serialize)]
pub struct FindingJson<'a, N> {
    #[serde(rename = "type")]
    ty: &'static str,
    kind: FindingKind,
    ts: String,
    severity: Severity,
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backend: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<SocketAddr>,
    /// Fields of the names of those addresses, right after them.
    #[serde(flatten)]
    names: Option<N>,
    cause: &'a str,
    remedy: &'a str,
    evidence: Evidence,
    message: String,
}

impl Finding {
    pub fn kind(&self) -> FindingKind {
        self.evidence.kind()
    }

    /// The contract's JSON object; absent fields are omitted, times are
    /// wall-clock RFC 3339 by `clock`.
    pub fn to_json(&self, clock: &WallClock) -> serde_json::Value {
        serde_json::to_value(self.json(clock, None::<()>)).expect("a finding serialises")
    }

    /// The contract's JSON object, to serialise as it is (no
    /// `serde_json::Value` in between), with `names`' fields (the
    /// Kubernetes names of its addresses) right after the addresses.
    pub fn json<N: Serialize>(&self, clock: &WallClock, names: Option<N>) -> FindingJson<'_, N> {
        FindingJson {
            ty: "finding",
            kind: self.kind(),
            ts: clock.rfc3339(self.ts_ns),
            severity: self.severity,
            service: self.service,
            backend: self.backend,
            client: self.client,
            names,
            cause: &self.cause,
            remedy: &self.remedy,
            evidence: self.evidence.at_wall_clock(clock),
            message: self.sentence(),
        }
    }

    /// One human sentence: who, what, why, and the fix.
    pub fn sentence(&self) -> String {
        self.sentence_with(&|_, a| a.to_string())
    }

    /// [`sentence`](Self::sentence) with each address written by `label`
    /// (the human view adds Kubernetes names to them).
    pub fn sentence_with(&self, label: &dyn Fn(Role, SocketAddr) -> String) -> String {
        let addr = |r: Role, a: Option<SocketAddr>| a.map_or("?".to_string(), |s| label(r, s));
        let (svc, be, cl) = (
            addr(Role::Service, self.service),
            addr(Role::Backend, self.backend),
            addr(Role::Client, self.client),
        );
        let cause = &self.cause;
        let what = match &self.evidence {
            Evidence::UnnatedReply(e) => match e.path {
                UnnatedPath::ReplyToClient | UnnatedPath::EntryLost => format!(
                    "Service {svc}: reply from backend {be} to client {cl} was not reverse-NATed ({cause}); the client reset it."
                ),
                UnnatedPath::ReplyToSnatAddress => format!(
                    "Service {svc}: reply from backend {be} to client {cl} (masqueraded as {}) was not reverse-NATed ({cause}); the node reset the backend.",
                    e.snat.map_or("?".to_string(), |s| s.to_string())
                ),
                UnnatedPath::RequestToLocalService => format!(
                    "Service {svc}: a segment from client {cl} was not DNATed to backend {be} ({cause}); the node reset the client from the Service address."
                ),
            },
            Evidence::BackendSwitch(e) => format!(
                "Service {svc}: connection from client {cl} was re-mapped mid-stream to backend {be} (was {}), which reset it ({cause}).",
                e.old_backend
            ),
            Evidence::RstStorm(e) => {
                let target = match (self.service, self.backend) {
                    (Some(_), _) => format!("Service {svc}"),
                    (None, Some(_)) => format!("backend {be}"),
                    _ => "?".into(),
                };
                // The window as the JSON writes it (`5.0`, not `5`).
                format!(
                    "{target}: reset storm {} ({} resets in the last {}s; {cause}).",
                    e.phase.as_str(),
                    e.count,
                    serde_json::Value::from(e.window_s),
                )
            }
            Evidence::QuiescentBackend(_) => format!(
                "Service {svc}: IPVS sent a new connection from client {cl} to backend {be}, whose weight is 0 ({cause})."
            ),
            Evidence::ConntrackTableFull(_) => {
                format!("Conntrack table full: new connections are being dropped ({cause}).")
            }
            Evidence::ConntrackInsertRace(e) => match self.client {
                Some(_) => format!(
                    "Service {svc}: a packet from client {cl} to backend {be} was dropped: it lost the race to confirm its conntrack entry ({cause})."
                ),
                None => format!("Conntrack insert race, {} ({cause}).", e.outcome),
            },
        };
        format!("{what} Fix: {}", self.remedy)
    }
}
