//! What each name source is doing: live or not, what it knows, why it is
//! off. Printed in the status line at start and as a `names` line each
//! time a source changes state (the API source syncs well after start).

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceState {
    /// Names are being served from this source.
    Live,
    /// Connecting or listing; names come as soon as it is done.
    Starting,
    /// Not used (not asked for, or not possible here): `reason` says why.
    Off,
    /// Was live or starting, failed; retried (`reason` says what failed).
    Failing,
}

/// One source's state, as the status line prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceStatus {
    /// `kubernetes-api` or `kube-proxy-rules`.
    pub source: &'static str,
    pub state: SourceState,
    /// What it reads: `iptables`, `nftables`, `ipvs`, or the API's resources.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub mode: String,
    pub services: u64,
    pub endpoints: u64,
    pub pods: u64,
    pub nodes: u64,
    /// Bytes of the source's cache (estimated), when it keeps one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Malformed rule lines or API objects skipped so far.
    pub skipped: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl SourceStatus {
    pub fn new(source: &'static str, state: SourceState) -> SourceStatus {
        SourceStatus {
            source,
            state,
            mode: String::new(),
            services: 0,
            endpoints: 0,
            pods: 0,
            nodes: 0,
            memory_bytes: None,
            skipped: 0,
            reason: None,
        }
    }

    pub fn off(source: &'static str, why: impl Into<String>) -> SourceStatus {
        let mut s = SourceStatus::new(source, SourceState::Off);
        s.reason = Some(why.into());
        s
    }

    /// A few words, for a header: `kube-proxy-rules live (iptables): 3
    /// services`, `kubernetes-api off -- why`.
    pub fn short(&self) -> String {
        let mut s = self.head(0);
        if self.state != SourceState::Off {
            s.push_str(&format!(": {} services", self.services));
        }
        if let Some(r) = &self.reason {
            s.push_str(&format!(" -- {r}"));
        }
        s
    }

    /// `source state (mode)`, the source's name padded to `width`.
    fn head(&self, width: usize) -> String {
        let state = match self.state {
            SourceState::Live => "live",
            SourceState::Starting => "starting",
            SourceState::Off => "off",
            SourceState::Failing => "failing",
        };
        let mut s = format!("{:<width$} {state}", self.source);
        if !self.mode.is_empty() {
            s.push_str(&format!(" ({})", self.mode));
        }
        s
    }

    /// One human line: `kube-proxy-rules live (iptables): 3 services, 5 endpoints`.
    pub fn human(&self) -> String {
        let mut s = self.head(18);
        if self.state != SourceState::Off {
            s.push_str(&format!(
                ": {} services, {} endpoints, {} pods, {} nodes",
                self.services, self.endpoints, self.pods, self.nodes
            ));
            if let Some(m) = self.memory_bytes {
                s.push_str(&format!(", {:.1} MiB", m as f64 / (1 << 20) as f64));
            }
            if self.skipped > 0 {
                s.push_str(&format!(", {} malformed skipped", self.skipped));
            }
        }
        if let Some(r) = &self.reason {
            s.push_str(&format!("  -- {r}"));
        }
        s
    }
}

/// The sources' current states, and whether they changed since last read.
#[derive(Debug, Default)]
pub struct Board {
    all: Vec<SourceStatus>,
    changed: bool,
}

impl Board {
    pub fn set(&mut self, s: SourceStatus) {
        match self.all.iter_mut().find(|x| x.source == s.source) {
            Some(x) if *x == s => {}
            Some(x) => {
                // Counts alone moving is not news; a state change is, and
                // so is a malformed rule or object skipped (a warning).
                if x.state != s.state
                    || x.reason != s.reason
                    || x.mode != s.mode
                    || x.skipped != s.skipped
                {
                    self.changed = true;
                }
                *x = s;
            }
            None => {
                self.all.push(s);
                self.changed = true;
            }
        }
    }

    pub fn take_change(&mut self) -> Option<Vec<SourceStatus>> {
        std::mem::take(&mut self.changed).then(|| self.all.clone())
    }

    pub fn all(&self) -> Vec<SourceStatus> {
        self.all.clone()
    }
}
