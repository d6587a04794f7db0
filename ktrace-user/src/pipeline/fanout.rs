//! [`Pipeline`]: one event to the engine, the renderer, the recorder and
//! the exporter, and the engine's findings to the renderer and exporter.

use std::io::Write;

use super::{Loss, PipelineError, Sink};
use crate::clock::WallClock;
use crate::engine::{Engine, Finding, FindingKind};
use crate::event::Event;
use crate::hooks::HookStatus;
use crate::output::{Renderer, StatusInfo};
use crate::recording::writer::Notice;
use crate::recording::Recorder;

/// Feeds events to the engine, the renderer and the recorder: the one
/// point every event passes through, live or replayed.
pub struct Pipeline<W: Write> {
    pub engine: Option<Engine>,
    pub out: Renderer<W>,
    pub recorder: Option<Recorder>,
    findings: Vec<Finding>,
    /// Monotonic ns range whose events, findings and lost lines are
    /// printed (replay's --since/--until); everything otherwise.
    pub print_window: (u64, u64),
    /// Live: refresh netns names at each tick.
    pub live: bool,
    /// OTLP export of events (as counters) and findings (see `export`).
    pub exporter: Option<crate::export::Exporter>,
    /// Only findings about this Service are passed on (`demo`: the hooks
    /// see the whole host, the demo speaks of its own namespaces only).
    pub only_service: Option<std::net::SocketAddr>,
    /// Findings passed on so far, by kind.
    pub emitted: std::collections::HashMap<FindingKind, u64>,
    /// A copy of what passes for another view (the dashboard).
    pub tap: Option<Box<dyn super::Tap>>,
}

impl<W: Write> Pipeline<W> {
    pub fn new(engine: Option<Engine>, out: Renderer<W>) -> Self {
        Pipeline {
            engine,
            out,
            recorder: None,
            findings: Vec::new(),
            print_window: (0, u64::MAX),
            live: false,
            exporter: None,
            only_service: None,
            emitted: Default::default(),
            tap: None,
        }
    }

    fn printed(&self, ts: u64) -> bool {
        ts >= self.print_window.0 && ts <= self.print_window.1
    }

    /// Live Kubernetes names, for the output and for the recording (its
    /// recorder is to be set first).
    pub fn name_with(&mut self, names: std::sync::Arc<crate::names::Names>) {
        if let Some(r) = &mut self.recorder {
            r.name_with(names.clone());
        }
        *self.out.names_mut() = crate::names::NameResolver::live(names);
    }

    pub fn handle(&mut self, ev: &Event) -> std::io::Result<()> {
        if let Some(e) = &mut self.engine {
            e.process(ev, &mut self.findings);
        }
        self.record_finding_names();
        if let Some(r) = &mut self.recorder {
            // With names (`Recorder::name_with`), the names of the event's
            // addresses go with it: they are those its findings and its
            // event line use, so replay prints the names `watch` printed.
            r.event(ev);
        }
        if self.printed(ev.ts_ns) {
            self.out.event(ev)?;
        }
        if let Some(x) = &self.exporter {
            x.event(ev);
        }
        if let Some(t) = &mut self.tap {
            t.event(ev);
        }
        self.emit_findings()
    }

    /// [`handle`](Self::handle) over events in a row. The engine takes them
    /// as a batch ([`Engine::process_batch`]) when nothing wants each event
    /// as it passes (a printed event line, a recorder, an exporter, a
    /// view): the findings come out in the same order either way. Otherwise
    /// one by one, their flows still loaded ahead.
    pub fn handle_batch(&mut self, events: &[Event]) -> std::io::Result<()> {
        let each = self.recorder.is_some()
            || self.exporter.is_some()
            || self.tap.is_some()
            || self.out.prints_events();
        if !each {
            if let Some(e) = &mut self.engine {
                e.process_batch(events, &mut self.findings);
            }
            return self.emit_findings();
        }
        for (i, ev) in events.iter().enumerate() {
            if let Some(e) = &self.engine {
                e.prefetch_ahead(events, i);
            }
            self.handle(ev)?;
        }
        Ok(())
    }

    /// The names of the addresses of the findings about to be emitted go
    /// into the recording's current block (before the event or tick that
    /// completes them), as they are now.
    fn record_finding_names(&mut self) {
        let Some(r) = &mut self.recorder else {
            return;
        };
        for f in &self.findings {
            for a in [f.service, f.backend, f.client].into_iter().flatten() {
                r.name_addr(a.ip());
            }
        }
    }

    /// Time passes (every 200 ms live; at the recorded ticks in replay).
    pub fn tick(&mut self, now_ns: u64) -> std::io::Result<()> {
        if let Some(e) = &mut self.engine {
            e.tick(now_ns, &mut self.findings);
        }
        self.record_finding_names();
        if let Some(r) = &mut self.recorder {
            r.tick(now_ns);
        }
        self.recorder_notices(now_ns)?;
        if self.live {
            let change = self
                .out
                .names()
                .names()
                .and_then(|n| n.take_status_change());
            if let Some(sources) = change {
                if let Some(t) = &mut self.tap {
                    t.names(&sources);
                }
                self.out.names_status(now_ns, &sources)?;
            }
        }
        if let Some(x) = &self.exporter {
            if self.live {
                // Live ticks follow a drain of the ring: /healthz.
                x.drained();
            }
            x.report_lost(now_ns, &mut self.out)?;
        }
        self.emit_findings()?;
        if let Some(t) = &mut self.tap {
            t.tick(now_ns);
        }
        self.out.tick(now_ns)
    }

    /// Events the kernel could not hand over.
    pub fn lost(&mut self, now_ns: u64, count: u64, total: u64, what: &str) -> std::io::Result<()> {
        if let Some(r) = &mut self.recorder {
            r.lost(now_ns, count, total, what);
        }
        if let Some(x) = &self.exporter {
            x.lost(count, what);
        }
        if let Some(t) = &mut self.tap {
            t.lost(now_ns, count);
        }
        self.out.lost(now_ns, count, total, what)
    }

    /// The end (at `now_ns`): storms still open are closed (as at the end of `watch`).
    pub fn finish(&mut self, now_ns: u64) -> std::io::Result<()> {
        if let Some(e) = &mut self.engine {
            e.tick(u64::MAX, &mut self.findings);
        }
        self.record_finding_names();
        self.emit_findings()?;
        self.out.close_groups(now_ns)?;
        self.recorder_notices(now_ns)?;
        // What the engine did and what its bounds evicted, on stop.
        if let Some(e) = &self.engine {
            self.out.engine_stats(&e.stats())?;
        }
        self.out.flush()
    }

    fn recorder_notices(&mut self, now_ns: u64) -> std::io::Result<()> {
        let Some(r) = &mut self.recorder else {
            return Ok(());
        };
        for n in r.take_notices() {
            // Events the recorder dropped count as lost in the metrics too.
            if let Some(x) = &self.exporter {
                let c = match &n {
                    Notice::Paused { dropped, .. } => *dropped,
                    Notice::Dropped { count, .. } | Notice::Resumed { count, .. } => *count,
                };
                x.lost(c, "recording");
            }
            match n {
                Notice::Paused {
                    path,
                    error,
                    dropped,
                    total,
                } => self.out.lost(
                    now_ns,
                    dropped,
                    total,
                    &format!("recording to {} paused ({error}): events are not recorded until it can write", path.display()),
                ),
                Notice::Dropped { path, count, total } => self.out.lost(
                    now_ns,
                    count,
                    total,
                    &format!("recording to {} still paused: events not recorded", path.display()),
                ),
                Notice::Resumed { path, count, total } => self.out.lost(
                    now_ns,
                    count,
                    total,
                    &format!("recording to {} resumed: events not recorded while it could not write", path.display()),
                ),
            }?;
        }
        Ok(())
    }

    fn emit_findings(&mut self) -> std::io::Result<()> {
        for f in self.findings.drain(..) {
            if self.only_service.is_some() && f.service != self.only_service {
                continue;
            }
            if f.ts_ns >= self.print_window.0 && f.ts_ns <= self.print_window.1 {
                *self.emitted.entry(f.kind()).or_default() += 1;
                // Names are looked up for a finding that is printed or
                // exported, not for one the human view only counts.
                let shown = self.out.admit(&f);
                let names = (shown.print || self.exporter.is_some() || self.tap.is_some())
                    .then(|| self.out.names().finding(&f))
                    .flatten();
                if let Some(x) = &self.exporter {
                    x.finding_named(&f, names.as_ref());
                }
                if let Some(t) = &mut self.tap {
                    t.finding(&f, names.as_ref());
                }
                self.out.finding_admitted(&f, shown, names.as_ref())?;
            }
        }
        Ok(())
    }
}

impl<W: Write> Sink for Pipeline<W> {
    fn start(
        &mut self,
        status: &[HookStatus],
        info: &StatusInfo,
        clock: WallClock,
    ) -> Result<(), PipelineError> {
        if let Some(e) = &mut self.engine {
            e.set_hooks(status);
        }
        if let Some(x) = &self.exporter {
            x.set_clock(clock);
            x.status(status);
        }
        if let Some(r) = &mut self.recorder {
            r.start(status, info, clock)
                .map_err(PipelineError::RecordStart)?;
        }
        if let Some(t) = &mut self.tap {
            t.status(status, info.kernel, clock);
            if let Some(n) = self.out.names().names() {
                t.names(&n.status_now());
            }
        }
        self.out
            .status(crate::clock::monotonic_now_ns(), status, info)
            .and_then(|_| self.out.flush())
            .map_err(PipelineError::Output)
    }

    fn event(&mut self, ev: &Event) -> Result<(), PipelineError> {
        self.handle(ev).map_err(PipelineError::Output)
    }

    fn events(&mut self, evs: &[Event]) -> Result<(), PipelineError> {
        self.handle_batch(evs).map_err(PipelineError::Output)
    }

    fn lost(&mut self, now_ns: u64, l: &Loss) -> Result<(), PipelineError> {
        Pipeline::lost(self, now_ns, l.count, l.total, &l.what).map_err(PipelineError::Output)
    }

    /// The hook metric drops to 0 and a lost line (count 0) says what
    /// stopped and why: what the source would have seen is lost from now on.
    fn hook_down(&mut self, now_ns: u64, hook: &HookStatus) -> Result<(), PipelineError> {
        if let Some(x) = &self.exporter {
            x.status(std::slice::from_ref(hook));
        }
        let why = hook.reason.as_deref().unwrap_or("stopped");
        let what = format!("{} hook down ({}): {why}", hook.name, hook.mechanism);
        Pipeline::lost(self, now_ns, 0, 0, &what).map_err(PipelineError::Output)
    }

    fn tick(&mut self, now_ns: u64) -> Result<(), PipelineError> {
        if self.live {
            self.out.netns_names_mut().refresh_if_missed();
        }
        Pipeline::tick(self, now_ns).map_err(PipelineError::Output)
    }

    fn flush(&mut self) -> Result<(), PipelineError> {
        self.out.flush().map_err(PipelineError::Output)
    }

    fn finish(&mut self, now_ns: u64) -> Result<(), PipelineError> {
        Pipeline::finish(self, now_ns).map_err(PipelineError::Output)
    }

    fn done(&mut self) -> bool {
        self.tap.as_ref().is_some_and(|t| t.done())
    }

    fn wants_counters(&self) -> bool {
        self.engine
            .as_ref()
            .is_some_and(Engine::wants_counter_sample)
    }
}
