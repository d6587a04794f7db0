//! `ktrace watch`: attach, then feed kernel events (ring buffer) and NAT
//! mappings (ctnetlink, where no kernel hook gives them) through the
//! correlation engine to the renderer, until Ctrl-C, SIGTERM or the duration.
//!
//! The event source ([`run_source`]) is shared with `ktrace record`: it
//! drives any [`Sink`]. [`Pipeline`] is the sink of `watch` (engine and
//! renderer, plus a recorder with `--record`), of `record` (recorder, status
//! and lost lines) and of `replay` (engine and renderer over a recording).

use std::io::Write;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::clock::{monotonic_now_ns, WallClock};
use crate::ctnetlink::{Ctnetlink, Received};
use crate::decode::decode;
use crate::engine::{Engine, EngineConfig, Finding};
use crate::event::Event;
use crate::hooks::{self, HookStatus, LoadOptions};
use crate::netns::NetnsNames;
use crate::output::{Renderer, StatusInfo};
use crate::recording::writer::{Notice, RecordError};
use crate::recording::{Recorder, RotationConfig};
use crate::ring::RingReader;

pub struct WatchOptions {
    pub json: bool,
    pub events: bool,
    pub duration: Option<Duration>,
    pub ring_buffer_bytes: u32,
    pub ctnetlink: bool,
    pub engine: EngineConfig,
    /// `--record PATH`: also record every event while watching.
    pub record: Option<RotationConfig>,
    /// `--otlp-endpoint`: also export metrics and findings over OTLP.
    pub export: Option<crate::export::Exporter>,
}

/// Where events come from, for [`run_source`].
#[derive(Debug, Clone)]
pub struct SourceOptions {
    pub duration: Option<Duration>,
    pub ring_buffer_bytes: u32,
    pub ctnetlink: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Hooks(#[from] hooks::HookError),
    #[error(transparent)]
    Ring(#[from] crate::ring::RingError),
    #[error("cannot start the event loop: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot write output: {0}")]
    Output(#[source] std::io::Error),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("cannot start the recording")]
    RecordStart(#[source] std::io::Error),
}

/// Messages from the ctnetlink thread.
enum CtMsg {
    Events(Vec<Event>),
    Overrun,
}

/// What the event source feeds: the status once, then events, lost-event
/// counts and clock ticks (every 200 ms) until it stops, then `finish`.
pub trait Sink {
    fn start(
        &mut self,
        status: &[HookStatus],
        info: &StatusInfo,
        clock: WallClock,
    ) -> Result<(), WatchError>;
    fn event(&mut self, ev: &Event) -> Result<(), WatchError>;
    fn lost(&mut self, now_ns: u64, count: u64, total: u64, what: &str) -> Result<(), WatchError>;
    fn tick(&mut self, now_ns: u64) -> Result<(), WatchError>;
    fn flush(&mut self) -> Result<(), WatchError>;
    fn finish(&mut self) -> Result<(), WatchError>;
}

fn check_ring_size(bytes: u32) -> Result<(), WatchError> {
    if !bytes.is_power_of_two() || bytes < 4096 {
        return Err(WatchError::Output(std::io::Error::other(
            "--ring-buffer-mb must be a power of two",
        )));
    }
    Ok(())
}

pub fn run(opts: WatchOptions) -> Result<(), WatchError> {
    check_ring_size(opts.ring_buffer_bytes)?;
    // Checked before attaching: a bad --record path fails fast.
    let recorder = match &opts.record {
        Some(cfg) => Some(Recorder::create(cfg.clone(), "watch", opts.engine.clone())?),
        None => None,
    };
    let clock = WallClock::now();
    let stdout = std::io::stdout().lock();
    let mut p = Pipeline::new(
        Some(Engine::new(opts.engine.clone())),
        Renderer::new(
            std::io::BufWriter::with_capacity(1 << 16, stdout),
            opts.json,
            opts.events,
            clock,
            NetnsNames::load(),
        ),
    );
    p.live = true;
    p.recorder = recorder;
    p.exporter = opts.export.clone();
    let source = SourceOptions {
        duration: opts.duration,
        ring_buffer_bytes: opts.ring_buffer_bytes,
        ctnetlink: opts.ctnetlink,
    };
    let r = run_source(&source, clock, &mut p);
    if let Some(rec) = p.recorder.take() {
        rec.finish();
    }
    let closed = p.exporter.take().map(|x| x.close(&mut p.out));
    r?;
    closed.transpose().map(drop).map_err(WatchError::Output)
}

/// Attaches the hooks and feeds `sink` until SIGINT, SIGTERM or the
/// duration; then drains what the kernel still holds and calls `finish`.
pub fn run_source(
    opts: &SourceOptions,
    clock: WallClock,
    sink: &mut dyn Sink,
) -> Result<(), WatchError> {
    check_ring_size(opts.ring_buffer_bytes)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(WatchError::Runtime)?;
    rt.block_on(source_loop(opts, clock, sink))
}

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
        }
    }

    fn printed(&self, ts: u64) -> bool {
        ts >= self.print_window.0 && ts <= self.print_window.1
    }

    pub fn handle(&mut self, ev: &Event) -> std::io::Result<()> {
        if let Some(r) = &mut self.recorder {
            r.event(ev);
        }
        if self.printed(ev.ts_ns) {
            self.out.event(ev)?;
        }
        if let Some(x) = &self.exporter {
            x.event(ev);
        }
        if let Some(e) = &mut self.engine {
            e.process(ev, &mut self.findings);
        }
        self.emit_findings()
    }

    /// Time passes (every 200 ms live; at the recorded ticks in replay).
    pub fn tick(&mut self, now_ns: u64) -> std::io::Result<()> {
        if let Some(r) = &mut self.recorder {
            r.tick(now_ns);
        }
        self.recorder_notices()?;
        if let Some(e) = &mut self.engine {
            e.tick(now_ns, &mut self.findings);
        }
        if let Some(x) = &self.exporter {
            if self.live {
                x.drained();
            }
            x.report_lost(&mut self.out)?;
        }
        self.emit_findings()
    }

    /// Events the kernel could not hand over.
    pub fn lost(&mut self, now_ns: u64, count: u64, total: u64, what: &str) -> std::io::Result<()> {
        if let Some(r) = &mut self.recorder {
            r.lost(now_ns, count, total, what);
        }
        if let Some(x) = &self.exporter {
            x.lost(count, what);
        }
        self.out.lost(count, total, what)
    }

    /// The end: storms still open are closed (as at the end of `watch`).
    pub fn finish(&mut self) -> std::io::Result<()> {
        if let Some(e) = &mut self.engine {
            e.tick(u64::MAX, &mut self.findings);
        }
        self.emit_findings()?;
        self.recorder_notices()?;
        // What the engine did and what its bounds evicted, on stop.
        if let Some(e) = &self.engine {
            self.out.engine_stats(&e.stats())?;
        }
        self.out.flush()
    }

    fn recorder_notices(&mut self) -> std::io::Result<()> {
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
                    dropped,
                    total,
                    &format!("recording to {} paused ({error}): events are not recorded until it can write", path.display()),
                ),
                Notice::Dropped { path, count, total } => self.out.lost(
                    count,
                    total,
                    &format!("recording to {} still paused: events not recorded", path.display()),
                ),
                Notice::Resumed { path, count, total } => self.out.lost(
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
            if f.ts_ns >= self.print_window.0 && f.ts_ns <= self.print_window.1 {
                if let Some(x) = &self.exporter {
                    x.finding(&f);
                }
                self.out.finding(&f)?;
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
    ) -> Result<(), WatchError> {
        if let Some(e) = &mut self.engine {
            e.set_hooks(status);
        }
        if let Some(x) = &self.exporter {
            x.set_clock(clock);
            x.status(status);
        }
        if let Some(r) = &mut self.recorder {
            r.start(status, info, clock)
                .map_err(WatchError::RecordStart)?;
        }
        self.out
            .status(status, info)
            .and_then(|_| self.out.flush())
            .map_err(WatchError::Output)
    }

    fn event(&mut self, ev: &Event) -> Result<(), WatchError> {
        self.handle(ev).map_err(WatchError::Output)
    }

    fn lost(&mut self, now_ns: u64, count: u64, total: u64, what: &str) -> Result<(), WatchError> {
        Pipeline::lost(self, now_ns, count, total, what).map_err(WatchError::Output)
    }

    fn tick(&mut self, now_ns: u64) -> Result<(), WatchError> {
        if self.live {
            self.out.netns_names_mut().refresh_if_missed();
        }
        Pipeline::tick(self, now_ns).map_err(WatchError::Output)
    }

    fn flush(&mut self) -> Result<(), WatchError> {
        self.out.flush().map_err(WatchError::Output)
    }

    fn finish(&mut self) -> Result<(), WatchError> {
        Pipeline::finish(self).map_err(WatchError::Output)
    }
}

/// Ring-buffer records to events, counting the ones that do not decode.
struct Decoder {
    names: crate::decode::Names,
    errors: u64,
}

impl Decoder {
    fn feed(&mut self, rec: &[u8], sink: &mut dyn Sink) -> Result<(), WatchError> {
        match decode(rec, &self.names) {
            Ok(ev) => sink.event(&ev),
            Err(e) => {
                self.errors += 1;
                if self.errors <= 3 {
                    tracing::warn!("undecodable ring-buffer record: {e}");
                }
                Ok(())
            }
        }
    }

    /// Feeds `sink` everything now in the ring buffer.
    fn drain(&mut self, ring: &mut RingReader, sink: &mut dyn Sink) -> Result<(), WatchError> {
        let mut err = Ok(());
        ring.drain(|rec| {
            if err.is_ok() {
                err = self.feed(rec, sink);
            }
        });
        err
    }
}

async fn source_loop(
    opts: &SourceOptions,
    clock: WallClock,
    sink: &mut dyn Sink,
) -> Result<(), WatchError> {
    let mut attached = hooks::load_and_attach(&LoadOptions {
        ring_buffer_bytes: opts.ring_buffer_bytes,
    })?;
    let mut ring = RingReader::new(&mut attached.ebpf, attached.logger.take())?;
    let my_netns = NetnsNames::current();
    let mut counters = crate::ctstat::CounterWatch::default();
    counters.sample();

    // NAT mappings from ctnetlink where no kernel hook gives them.
    let (ct_tx, mut ct_rx) = mpsc::channel::<CtMsg>(4096);
    let mut status = attached.status.clone();
    if !attached.nat_from_kernel {
        let nat = status.iter_mut().find(|s| s.name == "nat_mapping");
        let kernel_reason = nat
            .as_ref()
            .and_then(|s| s.reason.clone())
            .unwrap_or_default();
        let new = if !opts.ctnetlink {
            HookStatus {
                name: "nat_mapping",
                mechanism: "none",
                attached: false,
                target: String::new(),
                reason: Some(format!("--no-ctnetlink; kprobe: {kernel_reason}")),
            }
        } else {
            match Ctnetlink::subscribe(my_netns.unwrap_or(0)) {
                Ok(ct) => {
                    spawn_ctnetlink(ct, ct_tx.clone());
                    HookStatus {
                        name: "nat_mapping",
                        mechanism: "ctnetlink",
                        attached: true,
                        target: "conntrack NEW/DESTROY events of this network namespace".into(),
                        reason: Some(format!("kprobe unavailable: {kernel_reason}")),
                    }
                }
                Err(e) => HookStatus {
                    name: "nat_mapping",
                    mechanism: "none",
                    attached: false,
                    target: String::new(),
                    reason: Some(format!("{e}; kprobe: {kernel_reason}")),
                },
            }
        };
        match nat {
            Some(s) => *s = new,
            None => status.push(new),
        }
    }
    drop(ct_tx);
    // Conntrack counters of this namespace, sampled every tick.
    let counters_readable = counters.readable();
    status.push(HookStatus {
        name: "ct_counters",
        mechanism: "procfs",
        attached: counters_readable,
        target: if counters_readable {
            "/proc/net/stat/nf_conntrack of this network namespace, every 200 ms".into()
        } else {
            String::new()
        },
        reason: (!counters_readable)
            .then(|| "nf_conntrack is not loaded (no /proc/net/stat/nf_conntrack)".to_string()),
    });

    let mut dec = Decoder {
        names: attached.names.clone(),
        errors: 0,
    };
    sink.start(
        &status,
        &StatusInfo {
            kernel: attached.support.release.as_deref(),
            ring_buffer_bytes: opts.ring_buffer_bytes,
            netns: my_netns,
        },
        clock,
    )?;

    let mut sigint = signal(SignalKind::interrupt()).map_err(WatchError::Runtime)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(WatchError::Runtime)?;
    let deadline = async {
        match opts.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut lost_seen = 0u64;
    let mut ct_open = true;
    let mut ct_overruns = 0u64;

    loop {
        tokio::select! {
            r = ring.readable() => {
                r?;
                dec.drain(&mut ring, sink)?;
                sink.flush()?;
            }
            msg = ct_rx.recv(), if ct_open => match msg {
                Some(CtMsg::Events(evs)) => {
                    for ev in &evs {
                        sink.event(ev)?;
                    }
                    sink.flush()?;
                }
                Some(CtMsg::Overrun) => {
                    ct_overruns += 1;
                    sink.lost(monotonic_now_ns(), 1, ct_overruns, "ctnetlink socket overrun (one or more NAT events)")?;
                }
                None => ct_open = false,
            },
            _ = tick.tick() => {
                // The ring is read lazily (every 50 ms, or 256 KiB): what it
                // holds goes first, so the counter sample below comes after
                // the events it may explain, in time and in order.
                dec.drain(&mut ring, sink)?;
                let now = monotonic_now_ns();
                let lost = ring.lost_total();
                if lost > lost_seen {
                    sink.lost(now, lost - lost_seen, lost, "ring buffer full")?;
                    lost_seen = lost;
                }
                // Conntrack counters of this namespace: evidence of INVALID
                // verdicts and table-full drops where no kprobe can see them.
                if let Some(body) = counters.sample() {
                    sink.event(&Event {
                        ts_ns: now,
                        netns: my_netns.unwrap_or(0),
                        source: crate::event::Source::Procfs,
                        body,
                    })?;
                }
                sink.tick(now)?;
                sink.flush()?;
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = &mut deadline => break,
        }
    }
    // Flush what the kernel still holds before leaving.
    dec.drain(&mut ring, sink)?;
    while let Ok(CtMsg::Events(evs)) = ct_rx.try_recv() {
        for ev in &evs {
            sink.event(ev)?;
        }
    }
    let lost = ring.lost_total();
    if lost > lost_seen {
        sink.lost(
            monotonic_now_ns(),
            lost - lost_seen,
            lost,
            "ring buffer full",
        )?;
    }
    sink.finish()
}

/// Reads ctnetlink on its own thread (the socket blocks) and forwards events.
fn spawn_ctnetlink(mut ct: Ctnetlink, tx: mpsc::Sender<CtMsg>) {
    std::thread::Builder::new()
        .name("ctnetlink".into())
        .spawn(move || loop {
            let msg = match ct.recv() {
                Ok(Received::Events(evs)) if evs.is_empty() => continue,
                Ok(Received::Events(evs)) => CtMsg::Events(evs),
                Ok(Received::Overrun) => CtMsg::Overrun,
                Err(e) => {
                    tracing::warn!("ctnetlink: {e}");
                    return;
                }
            };
            if tx.blocking_send(msg).is_err() {
                return;
            }
        })
        .expect("spawning a thread");
}
