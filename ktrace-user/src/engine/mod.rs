//! The correlation engine: kernel events in, named incidents out.
//!
//! Pure and I/O-free, so `watch` (live) and `replay` (recordings) run the
//! same code and reach the same findings. Time comes only from event
//! timestamps (and `tick`), never from the clock. All state is bounded:
//! flows by count and age, storms by key count, pending resets by count.
//!
//! How each incident shows up in events:
//! - un-NATed reply: the client sends a no-socket RST *to the backend's own
//!   address* on a flow it opened to the service (and, where the hook can
//!   attach, conntrack reported the backend's reply INVALID just before);
//! - backend switch: the flow's NAT mapping changes to another backend
//!   mid-stream and that new backend answers the client with a no-socket RST;
//! - quiescent backend: IPVS schedules a (non-template) connection to a real
//!   server whose weight is 0;
//! - table full: conntrack fails to create entries.

mod endpoints;
pub mod finding;
mod flows;
mod invalid_samples;
mod pending;
pub mod proxy_mode;
mod race;
mod remedies;
mod storm;
mod unnated;

use foldhash::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::event::{CounterRise, Event, EventBody, NatEntry};
pub use finding::{Evidence, Finding, FindingKind, Severity, Time};
use finding::{UnnatedBasis, UnnatedPath};
use flows::{Ep, FlowKey, FlowTable, TCP};
use invalid_samples::InvalidSamples;
use pending::{Pending, PendingReset};
pub use proxy_mode::KubeProxyMode;
use remedies::Remedies;
pub use storm::Phase;
use storm::{StormReport, StormTracker};

const SEC: u64 = 1_000_000_000;

/// Tunables; the defaults suit a node under real traffic. A recording
/// stores them (JSON in its header); what follows from the hook status is
/// not stored but set again by [`EngineConfig::with_hooks`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EngineConfig {
    /// Resets tied to one service within `storm_window_ns` that make a storm.
    pub storm_threshold: u32,
    pub storm_window_ns: u64,
    pub max_flows: usize,
    /// Flows idle longer than this are forgotten.
    pub flow_ttl_ns: u64,
    /// How close a re-mapping or INVALID verdict must be to a reset to explain it.
    pub correlation_ns: u64,
    /// How long a reset that nothing explains yet waits for its NAT mapping
    /// (ctnetlink and the ring buffer are separate paths).
    pub reorder_ns: u64,
    /// Repeats of table-full and quiescent-backend findings are merged within this.
    pub repeat_ns: u64,
    /// Whether a conntrack INVALID hook is live (changes what a cause can say).
    pub ct_invalid_hook: bool,
    #[serde(skip)]
    /// Whether the conntrack counters of ktrace's namespace are sampled
    /// (`ct_counters` events): then, without the INVALID hook, an
    /// un-NATed-reply finding waits for the next sample to cite it.
    pub ct_counters: bool,
    #[serde(skip)]
    /// Whether `init_conntrack` failures are hooked (else table-full comes
    /// from the counters' `drop`).
    pub ct_table_full_hook: bool,
    #[serde(skip)]
    /// Whether `__nf_conntrack_confirm` drops are hooked (else insert-race
    /// drops come from the counters' `insert_failed`).
    pub ct_confirm_hook: bool,
    /// `nf_conntrack_max`, `nf_conntrack_tcp_timeout_established`,
    /// `tcp_keepalive_time`, when the caller could read them.
    #[serde(default)]
    pub conntrack_max: Option<u64>,
    #[serde(default)]
    pub ct_timeout_established_s: Option<u64>,
    #[serde(default)]
    pub keepalive_s: Option<u64>,
    /// kube-proxy's mode when ktrace started (a remedy words its INVALID
    /// drop for it); stored so that replay gives the same remedy.
    #[serde(default)]
    pub kube_proxy_mode: KubeProxyMode,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            storm_threshold: 20,
            storm_window_ns: 10 * SEC,
            max_flows: 1_000_000,
            flow_ttl_ns: 6 * 3600 * SEC,
            correlation_ns: 5 * SEC,
            reorder_ns: SEC,
            repeat_ns: 10 * SEC,
            ct_invalid_hook: false,
            ct_counters: false,
            ct_table_full_hook: false,
            ct_confirm_hook: false,
            conntrack_max: None,
            ct_timeout_established_s: None,
            keepalive_s: None,
            kube_proxy_mode: KubeProxyMode::Unknown,
        }
    }
}

impl EngineConfig {
    /// Within the bounds the engine needs (a recording's header may say anything).
    pub fn bounded(mut self) -> EngineConfig {
        self.storm_threshold = self.storm_threshold.max(1);
        self.storm_window_ns = self.storm_window_ns.max(1);
        self.max_flows = self.max_flows.max(16);
        self
    }

    /// Settings that follow from which hooks are live (the same status
    /// line live and in a recording, so replay reasons alike).
    pub fn with_hooks(mut self, status: &[crate::hooks::HookStatus]) -> EngineConfig {
        let live = |n: &str| status.iter().any(|h| h.name == n && h.attached);
        self.ct_invalid_hook = live("ct_invalid");
        self.ct_table_full_hook = live("ct_table_full");
        self.ct_confirm_hook = live("ct_insert_race");
        self.ct_counters = live("ct_counters");
        self
    }
}

/// Counters of what the engine did, for status and metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EngineStats {
    pub events: u64,
    pub findings: u64,
    pub flows_tracked: usize,
    pub flows_evicted_by_age: u64,
    pub flows_evicted_by_count: u64,
    pub pending_dropped: u64,
}

#[derive(Debug, Clone)]
struct InvalidSeen {
    ts: u64,
    count: u32,
    message: Option<Arc<str>>,
}

#[derive(Debug, Clone, Copy)]
struct Repeat {
    first: u64,
    last: u64,
    last_report: u64,
    count: u64,
}

impl Repeat {
    fn new(ts: u64) -> Repeat {
        Repeat {
            first: ts,
            last: ts,
            last_report: 0,
            count: 0,
        }
    }

    /// Counts `n` more at `ts`; true when a report is due (the first, then
    /// at most one per `repeat_ns`).
    fn note(&mut self, ts: u64, n: u64, repeat_ns: u64) -> bool {
        self.count += n;
        self.last = self.last.max(ts);
        if self.last_report != 0 && ts.saturating_sub(self.last_report) < repeat_ns {
            return false;
        }
        self.last_report = ts.max(1);
        true
    }
}

const MAX_PENDING: usize = 65_536;
/// A reported flow quiet this long (ms) gets a new finding on its next reset.
const REPORT_AGAIN_MS: u32 = 1_000;
/// How long an un-NATed-reply finding waits for a counter sample.
const HOLD_NS: u64 = 450_000_000;
const MAX_HELD: usize = 4_096;
const NO_INVALID_COUNTED: &str = "conntrack counted no INVALID packet in ktrace's namespace around it: the reply bypassed reverse NAT some other way (or conntrack judged it in another namespace)";
const MAX_INVALID: usize = 65_536;
const MAX_REPEAT_KEYS: usize = 16_384;
const STORM_KEYS: usize = 4_096;
const STORM_UNNATED: u8 = 1;
const STORM_SWITCH: u8 = 2;
/// SNAT addresses remembered (cleared when full, like the other maps).
const MAX_SNAT: usize = 262_144;

pub struct Engine {
    cfg: EngineConfig,
    flows: FlowTable,
    storms: StormTracker,
    /// Kinds of resets in each storm, by key (1 = un-NATed, 2 = switch).
    invalid: HashMap<Ep, InvalidSeen>,
    /// Unexplained resets by the endpoint that may be a client (both ends),
    /// with a FIFO of keys for expiry.
    pending: Pending,
    table_full: Option<Repeat>,
    /// Insert-race episodes from the counters: dropped, resolved.
    races: [Option<Repeat>; 2],
    quiescent: HashMap<(Ep, Ep), Repeat>,
    /// Latest persistence template per (client IP, service): real server.
    templates: HashMap<(Ep, Ep), Ep>,
    /// Masquerade: the node's SNAT address:port of a DNATed flow -> its
    /// real client (the backend knows the client only by the former).
    snat: HashMap<Ep, Ep>,
    messages: HashMap<String, Arc<str>>,
    /// Un-NATed-reply findings waiting (until the deadline) for the next
    /// conntrack counter sample to cite.
    held: Vec<(u64, Finding)>,
    /// The recent counter samples' INVALID counts, by the time they cover.
    invalid_samples: InvalidSamples,
    last_tick: u64,
    last_sweep: u64,
    stats: EngineStats,
    /// The remedies' texts for these settings.
    remedies: Remedies,
}

fn ip_key(ip: IpAddr) -> Ep {
    Ep::new(SocketAddr::new(ip, 0))
}

fn flow_key(client: SocketAddr, proto: u8, netns: u32) -> FlowKey {
    FlowKey {
        client: Ep::new(client),
        proto,
        netns,
    }
}

/// A reset the engine looks into: sent with no socket, and not the answer
/// to a SYN (a refused connection is not an incident). The rule is
/// [`ktrace_common::reset_may_be_an_incident`], which the kernel side also
/// applies to count the others instead of sending them one by one
/// (`resets_summarised` events, which the engine has no use for).
fn may_be_an_incident(body: &EventBody) -> bool {
    let EventBody::TcpSendReset {
        socket,
        trigger_flags,
        ..
    } = body
    else {
        return false;
    };
    ktrace_common::reset_may_be_an_incident(socket.is_some(), *trigger_flags)
}

impl Engine {
    pub fn new(cfg: EngineConfig) -> Engine {
        Engine {
            flows: FlowTable::new(cfg.max_flows, cfg.flow_ttl_ns),
            storms: StormTracker::new(cfg.storm_threshold, cfg.storm_window_ns, STORM_KEYS),
            invalid: HashMap::default(),
            pending: Pending::new(MAX_PENDING, cfg.reorder_ns),
            table_full: None,
            races: [None, None],
            quiescent: HashMap::default(),
            templates: HashMap::default(),
            snat: HashMap::default(),
            messages: HashMap::default(),
            held: Vec::new(),
            invalid_samples: InvalidSamples::default(),
            last_tick: 0,
            last_sweep: 0,
            stats: EngineStats::default(),
            remedies: Remedies::new(&cfg),
            cfg,
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Applies [`EngineConfig::with_hooks`] once the hook status is known.
    pub fn set_hooks(&mut self, status: &[crate::hooks::HookStatus]) {
        self.cfg = self.cfg.clone().with_hooks(status);
        self.remedies = Remedies::new(&self.cfg);
    }

    pub fn stats(&self) -> EngineStats {
        let f = self.flows.stats();
        EngineStats {
            flows_tracked: f.tracked,
            flows_evicted_by_age: f.evicted_by_age,
            flows_evicted_by_count: f.evicted_by_count,
            pending_dropped: self.pending.dropped,
            ..self.stats.clone()
        }
    }

    /// Heap bytes per tracked flow (for the benchmark).
    pub fn bytes_per_flow(&self) -> f64 {
        self.flows.bytes_per_flow()
    }

    /// Feeds one event; findings it completes are appended to `out`.
    pub fn process(&mut self, ev: &Event, out: &mut Vec<Finding>) {
        self.stats.events += 1;
        let before = out.len();
        // Time-driven work follows event time, so replay matches live.
        if ev.ts_ns > self.last_tick.saturating_add(SEC / 5) {
            self.tick(ev.ts_ns, out);
        }
        match &ev.body {
            EventBody::NatMapping(nat) => self.on_nat_mapping(ev.ts_ns, ev.netns, nat, out),
            EventBody::CtConfirmDrop(nat) => self.on_confirm_drop(ev.ts_ns, nat, out),
            EventBody::NatDestroy(nat) => self.flows.destroyed(
                flow_key(nat.client, nat.protocol, ev.netns),
                Ep::new(nat.service),
            ),
            EventBody::TcpSendReset {
                src, dst, reason, ..
            } => {
                if may_be_an_incident(&ev.body) {
                    let (ts, netns) = (ev.ts_ns, ev.netns);
                    self.on_no_socket_reset(ts, netns, *src, *dst, reason.as_deref(), out);
                }
            }
            EventBody::TcpReceiveReset { .. } | EventBody::ResetsSummarised(_) => {}
            EventBody::CtInvalid(c) => {
                if let (Some(client), Some(service), Some(backend)) =
                    (c.orig_src, c.orig_dst, c.reply_src)
                {
                    let tuple = (client, service, backend);
                    self.on_invalid(ev.ts_ns, ev.netns, tuple, c.reply_dir, c.message.as_deref());
                }
            }
            EventBody::CtTableFull { src, dst, .. } => self.on_table_full(
                ev.ts_ns,
                Some((*src, *dst)),
                1,
                "init_conntrack failed",
                out,
            ),
            EventBody::CtCounters(rise) => self.on_counter_rise(ev.ts_ns, rise, out),
            EventBody::IpvsConnNew(c) => self.on_ipvs(
                ev.ts_ns,
                flow_key(c.client, c.protocol, ev.netns),
                c.service,
                c.real_server,
                c.template,
                c.weight,
                out,
            ),
        }
        self.stats.findings += (out.len() - before) as u64;
    }

    /// A DNAT mapping from the kernel or ctnetlink; with SNAT too, the
    /// node's address it masquerades the client as (to recognise the
    /// node's own resets of the backend, sent from that address).
    fn on_nat_mapping(&mut self, ts: u64, netns: u32, nat: &NatEntry, out: &mut Vec<Finding>) {
        let key = flow_key(nat.client, nat.protocol, netns);
        if let Some(n) = nat.snat {
            if self.snat.len() >= MAX_SNAT {
                self.snat.clear();
            }
            self.snat.insert(Ep::new(n), key.client);
        }
        self.on_mapping(ts, key, nat.service, nat.backend, out)
    }

    /// A packet conntrack judged INVALID, of the flow `(client, service,
    /// backend)`. A reply (or, for a Service held locally, a request)
    /// judged INVALID explains a reset of this client's flow: the flow is
    /// learned from it when no mapping was seen, and the verdict is kept
    /// for the reset to cite.
    fn on_invalid(
        &mut self,
        ts: u64,
        netns: u32,
        (client, service, backend): (SocketAddr, SocketAddr, SocketAddr),
        reply_dir: bool,
        message: Option<&str>,
    ) {
        if reply_dir && self.flows.find(Ep::new(client), TCP, netns).is_none() && backend != service
        {
            let key = flow_key(client, TCP, netns);
            let (service, backend) = (Ep::new(service), Ep::new(backend));
            self.flows.map(key, service, backend, ts, false);
        }
        let message = message.map(|m| self.intern(m));
        if self.invalid.len() >= MAX_INVALID {
            self.invalid.clear();
        }
        let seen = self.invalid.entry(Ep::new(client)).or_insert(InvalidSeen {
            ts,
            count: 0,
            message: None,
        });
        seen.ts = ts;
        seen.count += 1;
        if message.is_some() {
            seen.message = message;
        }
    }

    /// A rise of the node's conntrack counters: insert races (counted
    /// drops only where the per-packet hook is off), then INVALID, drops
    /// and the table's fill.
    fn on_counter_rise(&mut self, ts: u64, rise: &CounterRise, out: &mut Vec<Finding>) {
        if rise.insert_failed > 0 && !self.cfg.ct_confirm_hook {
            self.on_race_counter(ts, race::Outcome::Dropped, rise.insert_failed, out);
        }
        if rise.clash_resolve > 0 {
            self.on_race_counter(ts, race::Outcome::Resolved, rise.clash_resolve, out);
        }
        self.on_counters(ts, rise.invalid, rise.drop, rise.count, rise.max, out)
    }

    /// [`Engine::process`] over a batch, loading each event's flows from
    /// memory a few events ahead: at a million flows a lookup is a cache
    /// miss, and misses overlapped cost a fraction of misses in a row.
    pub fn process_batch(&mut self, events: &[Event], out: &mut Vec<Finding>) {
        for (i, ev) in events.iter().enumerate() {
            self.prefetch_ahead(events, i);
            self.process(ev, out);
        }
    }

    /// Before the `i`th of `events` is processed: starts loading the flows
    /// of those a few places ahead (of the first ones too, at 0), and the
    /// events themselves further ahead. For a caller that processes the
    /// events one by one between other work ([`Engine::process_batch`] is
    /// this and [`Engine::process`]).
    #[inline]
    pub fn prefetch_ahead(&self, events: &[Event], i: usize) {
        const AHEAD: usize = 8;
        if i == 0 {
            events.iter().take(AHEAD).for_each(|ev| self.prefetch(ev));
        }
        if let Some(later) = events.get(i + 2 * AHEAD) {
            // The event itself, before its flows are looked for.
            let p: *const i8 = (later as *const Event).cast();
            flows::prefetch_read(p);
            flows::prefetch_read(p.wrapping_add(64));
        }
        if let Some(next) = events.get(i + AHEAD) {
            self.prefetch(next);
        }
    }

    /// Starts loading the flows `ev` will look up.
    pub fn prefetch(&self, ev: &Event) {
        match &ev.body {
            EventBody::NatMapping(nat) | EventBody::NatDestroy(nat) => {
                self.flows.prefetch(Ep::new(nat.client), nat.protocol)
            }
            EventBody::TcpSendReset { src, dst, .. } if may_be_an_incident(&ev.body) => {
                let (src, dst) = (Ep::new(*src), Ep::new(*dst));
                self.flows.prefetch(src, TCP);
                self.flows.prefetch(dst, TCP);
                // Where neither end is a known flow's client, it waits there.
                self.pending.prefetch(dst);
            }
            _ => {}
        }
    }

    /// A finding waits for the next conntrack counter sample to cite it.
    pub fn wants_counter_sample(&self) -> bool {
        !self.held.is_empty()
    }

    /// Time passes: pending resets expire, storms end, idle flows go.
    pub fn tick(&mut self, now: u64, out: &mut Vec<Finding>) {
        self.last_tick = self.last_tick.max(now.min(u64::MAX - SEC));
        if !self.held.is_empty() {
            // Past their deadline with no counter sample citing them.
            let (due, keep): (Vec<_>, Vec<_>) = self
                .held
                .drain(..)
                .partition(|(deadline, _)| *deadline <= now);
            self.held = keep;
            for (_, mut f) in due {
                self.settle_held(&mut f);
                out.push(f);
            }
        }
        let mut reports = Vec::new();
        self.storms.tick(now, &mut reports);
        for r in reports {
            out.push(self.storm_finding(&r, now));
        }
        if now >= self.last_sweep.saturating_add(10 * SEC) {
            self.last_sweep = now;
            if now != u64::MAX {
                self.flows.sweep(now);
            }
            self.invalid_samples
                .forget_before(now.saturating_sub(HOLD_NS + 10 * SEC));
            let cutoff = now.saturating_sub(self.cfg.correlation_ns);
            self.invalid.retain(|_, v| v.ts >= cutoff);
            let repeat_cutoff = now.saturating_sub(self.cfg.repeat_ns);
            self.quiescent.retain(|_, r| r.last >= repeat_cutoff);
        }
    }

    fn intern(&mut self, m: &str) -> Arc<str> {
        if let Some(a) = self.messages.get(m) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(m);
        if self.messages.len() < 256 {
            self.messages.insert(m.to_string(), a.clone());
        }
        a
    }

    fn on_mapping(
        &mut self,
        ts: u64,
        key: FlowKey,
        service: SocketAddr,
        backend: SocketAddr,
        out: &mut Vec<Finding>,
    ) {
        let (_, flow) = self
            .flows
            .map(key, Ep::new(service), Ep::new(backend), ts, true);
        if flow.previous_backend.is_none() || key.proto != TCP {
            return;
        }
        // A re-mapping: a reset from the new backend may already be waiting.
        let backend = Ep::new(backend);
        if let Some(p) = self.pending.take(key.client, ts, |p| p.src == backend) {
            let (src, dst) = (p.src.get(), p.dst.get());
            self.on_no_socket_reset(p.ts, p.netns, src, dst, None, out);
        }
    }

    /// Keeps a reset nothing explains yet, keyed by its destination (the
    /// client, if a backend switch explains it later).
    fn defer(&mut self, ts: u64, netns: u32, src: SocketAddr, dst: SocketAddr) {
        self.pending.defer(PendingReset {
            ts,
            netns,
            src: Ep::new(src),
            dst: Ep::new(dst),
        });
    }

    fn count_storm(
        &mut self,
        service: Ep,
        backend: Ep,
        client: Ep,
        kind: u8,
        ts: u64,
        out: &mut Vec<Finding>,
    ) {
        if let Some(r) = self
            .storms
            .record_kind(service, true, backend, client, kind, ts)
        {
            out.push(self.storm_finding(&r, ts));
        }
    }

    fn switch_finding(
        &self,
        ts: u64,
        client: SocketAddr,
        flow: &flows::Flow,
        reason: Option<&str>,
    ) -> Finding {
        let idle_s = flow.idle_ms as f64 / 1000.0;
        let evidence = Evidence::BackendSwitch(finding::BackendSwitch {
            old_backend: flow.previous_backend.get(),
            idle_s: (idle_s * 1000.0).round() / 1000.0,
            rst_reason: reason.map(str::to_string),
            first: Time::Mono(ts),
        });
        Finding {
            ts_ns: ts,
            severity: Severity::Error,
            service: Some(flow.service.get()),
            backend: Some(flow.backend.get()),
            client: Some(client),
            cause: format!(
                "the conntrack entry was lost mid-connection (flushed, or expired after {idle_s:.1}s idle) and DNAT sent the next segment to another backend"
            ),
            remedy: self.remedies.keepalive().to_string(),
            evidence,
        }
    }

    fn storm_finding(&self, r: &StormReport, ts: u64) -> Finding {
        let kinds = r.kinds;
        let what = match kinds {
            STORM_UNNATED => "un-NATed replies reset by their clients",
            STORM_SWITCH => "connections re-mapped to backends that reset them",
            _ => "un-NATed replies and re-mapped connections",
        };
        let evidence = Evidence::RstStorm(finding::RstStorm {
            phase: r.phase,
            count: r.count,
            total: r.total,
            window_s: self.storms.window_ns() as f64 / 1e9,
            threshold: self.cfg.storm_threshold,
            first: Time::Mono(r.first_ns),
            last: Time::Mono(r.last_ns),
        });
        Finding {
            ts_ns: ts.min(r.last_ns.max(r.first_ns)).max(r.first_ns),
            severity: if r.phase == Phase::End {
                Severity::Warning
            } else {
                Severity::Critical
            },
            service: r.is_service.then(|| r.key.get()),
            backend: r.backend.opt(),
            client: None,
            cause: what.to_string(),
            remedy: match kinds {
                STORM_SWITCH => "find what flushes or expires conntrack entries; keep TCP keepalive shorter than nf_conntrack_tcp_timeout_established".into(),
                _ => "set net.netfilter.nf_conntrack_tcp_be_liberal=1 or drop ctstate INVALID; see the unnated_reply findings".into(),
            },
            evidence,
        }
    }

    /// Held un-NATed-reply findings cite the counter sample that followed
    /// them; a `drop` rise with a (nearly) full table is a table-full finding
    /// where `init_conntrack` cannot be hooked.
    fn on_counters(
        &mut self,
        ts: u64,
        invalid: u64,
        drop: u64,
        count: Option<u64>,
        max: Option<u64>,
        out: &mut Vec<Finding>,
    ) {
        self.invalid_samples.record(ts, invalid);
        if !self.held.is_empty() {
            let (ready, keep): (Vec<_>, Vec<_>) =
                self.held.drain(..).partition(|(_, f)| f.ts_ns <= ts);
            self.held = keep;
            for (_, mut f) in ready {
                self.settle_held(&mut f);
                out.push(f);
            }
        }
        if self.held.len() > MAX_HELD {
            let extra: Vec<_> = self.held.drain(..self.held.len() - MAX_HELD).collect();
            out.extend(extra.into_iter().map(|(_, f)| f));
        }
        if let Some(m) = max.filter(|&m| self.cfg.conntrack_max != Some(m)) {
            self.cfg.conntrack_max = Some(m);
            self.remedies = Remedies::new(&self.cfg);
        }
        if let (Some(m), Some(c)) = (max, count) {
            // Drops with room left are not the table being full.
            if c.saturating_mul(10) < m.saturating_mul(9) {
                return;
            }
        }
        if drop > 0 && !self.cfg.ct_table_full_hook {
            let what = match (count, max) {
                (Some(c), Some(m)) => format!(
                    "the conntrack drop counter rose by {drop} with {c} of {m} entries in use"
                ),
                _ => format!("the conntrack drop counter rose by {drop}"),
            };
            self.on_table_full(ts, None, drop, &what, out);
        }
    }

    fn on_table_full(
        &mut self,
        ts: u64,
        example: Option<(SocketAddr, SocketAddr)>,
        n: u64,
        basis: &str,
        out: &mut Vec<Finding>,
    ) {
        let r = self.table_full.get_or_insert(Repeat::new(ts));
        if ts.saturating_sub(r.last) > self.cfg.repeat_ns {
            // Quiet for a while: a new episode.
            *r = Repeat::new(ts);
        }
        if !r.note(ts, n, self.cfg.repeat_ns) {
            return;
        }
        let r = *r;
        let evidence = Evidence::ConntrackTableFull(finding::TableFull {
            count: r.count,
            first: Time::Mono(r.first),
            last: Time::Mono(r.last),
            basis: basis.to_string(),
            example_src: example.map(|(src, _)| src),
            example_dst: example.map(|(_, dst)| dst),
            nf_conntrack_max: self.cfg.conntrack_max,
        });
        out.push(Finding {
            ts_ns: ts,
            severity: Severity::Critical,
            service: None,
            backend: None,
            client: None,
            cause: format!(
                "{} new connection(s) could not get a conntrack entry{} ({basis})",
                r.count,
                self.cfg
                    .conntrack_max
                    .map(|m| format!(" (nf_conntrack_max {m})"))
                    .unwrap_or_default()
            ),
            remedy: "raise net.netfilter.nf_conntrack_max (and nf_conntrack_buckets), or shorten conntrack timeouts for short-lived flows".into(),
            evidence,
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn on_ipvs(
        &mut self,
        ts: u64,
        key: FlowKey,
        service: SocketAddr,
        real: SocketAddr,
        template: bool,
        weight: Option<i32>,
        out: &mut Vec<Finding>,
    ) {
        let client = key.client.get();
        let tkey = (ip_key(client.ip()), Ep::new(service));
        if template {
            if self.templates.len() >= MAX_REPEAT_KEYS {
                self.templates.clear();
            }
            self.templates.insert(tkey, Ep::new(real));
            return;
        }
        self.flows
            .map(key, Ep::new(service), Ep::new(real), ts, true);
        if weight != Some(0) {
            return;
        }
        let via_template = self.templates.get(&tkey) == Some(&Ep::new(real));
        let key = (ip_key(client.ip()), Ep::new(real));
        if self.quiescent.len() >= MAX_REPEAT_KEYS {
            self.quiescent.clear();
        }
        let r = self.quiescent.entry(key).or_insert(Repeat::new(ts));
        if !r.note(ts, 1, self.cfg.repeat_ns) {
            return;
        }
        let r = *r;
        let evidence = Evidence::QuiescentBackend(finding::QuiescentBackend {
            weight: 0,
            persistence_template: via_template,
            connections: r.count,
            first: Time::Mono(r.first),
        });
        out.push(Finding {
            ts_ns: ts,
            severity: Severity::Warning,
            service: Some(service),
            backend: Some(real),
            client: Some(client),
            cause: if via_template {
                "a persistence template still points the client at a real server with weight 0 (being drained)".into()
            } else {
                "IPVS scheduled a new connection to a real server with weight 0 (persistence template)".into()
            },
            remedy: "set net.ipv4.vs.expire_quiescent_template=1 so templates to weight-0 servers expire (and net.ipv4.vs.expire_nodest_conn=1 to drop connections to removed servers)".into(),
            evidence,
        });
    }
}

#[cfg(test)]
mod tests;
