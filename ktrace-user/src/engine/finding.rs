//! A diagnosed incident: what an operator reads at 3 a.m.

use std::net::SocketAddr;

use serde_json::{json, Map, Value};

use crate::clock::WallClock;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FindingKind {
    UnnatedReply,
    RstStorm,
    BackendSwitch,
    QuiescentBackend,
    ConntrackTableFull,
}

impl FindingKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::UnnatedReply => "unnated_reply",
            FindingKind::RstStorm => "rst_storm",
            FindingKind::BackendSwitch => "backend_switch",
            FindingKind::QuiescentBackend => "quiescent_backend",
            FindingKind::ConntrackTableFull => "conntrack_table_full",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub kind: FindingKind,
    /// CLOCK_MONOTONIC ns of the event that completed the finding.
    pub ts_ns: u64,
    pub severity: Severity,
    pub service: Option<SocketAddr>,
    pub backend: Option<SocketAddr>,
    pub client: Option<SocketAddr>,
    pub cause: String,
    pub remedy: String,
    /// Counts, first/last times (ns), verdicts and reasons seen.
    pub evidence: Map<String, Value>,
}

impl Finding {
    /// The contract's JSON object (`"type":"finding"`); absent fields are omitted.
    pub fn to_json(&self, clock: &WallClock) -> Value {
        let mut m = Map::new();
        m.insert("type".into(), json!("finding"));
        m.insert("kind".into(), json!(self.kind.as_str()));
        m.insert("ts".into(), json!(clock.rfc3339(self.ts_ns)));
        m.insert("severity".into(), json!(self.severity.as_str()));
        for (k, v) in [
            ("service", self.service),
            ("backend", self.backend),
            ("client", self.client),
        ] {
            if let Some(a) = v {
                m.insert(k.into(), json!(a.to_string()));
            }
        }
        m.insert("cause".into(), json!(self.cause));
        m.insert("remedy".into(), json!(self.remedy));
        let mut ev = self.evidence.clone();
        // Times in evidence are monotonic ns; render them as wall-clock time.
        for key in ["first", "last", "since"] {
            if let Some(ns) = ev.get(key).and_then(Value::as_u64) {
                ev.insert(key.into(), json!(clock.rfc3339(ns)));
            }
        }
        m.insert("evidence".into(), Value::Object(ev));
        m.insert("message".into(), json!(self.sentence()));
        Value::Object(m)
    }

    /// One human sentence: who, what, why, and the fix.
    pub fn sentence(&self) -> String {
        let svc = self.service.map_or("?".to_string(), |s| s.to_string());
        let be = self.backend.map_or("?".to_string(), |s| s.to_string());
        let cl = self.client.map_or("?".to_string(), |s| s.to_string());
        let what = match self.kind {
            FindingKind::UnnatedReply => format!(
                "Service {svc}: reply from backend {be} to client {cl} was not reverse-NATed ({}); the client reset it.",
                self.cause
            ),
            FindingKind::BackendSwitch => format!(
                "Service {svc}: connection from client {cl} was re-mapped mid-stream to backend {be} (was {}), which reset it ({}).",
                self.evidence
                    .get("old_backend")
                    .and_then(Value::as_str)
                    .unwrap_or("?"),
                self.cause
            ),
            FindingKind::RstStorm => {
                let target = match (self.service, self.backend) {
                    (Some(s), _) => format!("Service {s}"),
                    (None, Some(b)) => format!("backend {b}"),
                    _ => "?".into(),
                };
                format!(
                    "{target}: reset storm {} ({} resets in the last {}s; {}).",
                    self.evidence
                        .get("phase")
                        .and_then(Value::as_str)
                        .unwrap_or(""),
                    self.evidence.get("count").cloned().unwrap_or(json!(0)),
                    self.evidence.get("window_s").cloned().unwrap_or(json!(0)),
                    self.cause
                )
            }
            FindingKind::QuiescentBackend => format!(
                "Service {svc}: IPVS sent a new connection from client {cl} to backend {be}, whose weight is 0 ({}).",
                self.cause
            ),
            FindingKind::ConntrackTableFull => format!(
                "Conntrack table full: new connections are being dropped ({}).",
                self.cause
            ),
        };
        format!("{what} Fix: {}", self.remedy)
    }
}
