//! `ktrace replay`: a recording through the same [`Pipeline`] (engine and
//! renderer) as `watch`, with the recorded settings, wall-clock mapping and
//! engine ticks, so it prints the findings `watch` printed live.
//!
//! Files are read in recording order (start time, then segment number,
//! from their headers), whatever order they are given in; giving `PATH`
//! of a rotated set also reads its older segments `PATH.1`, `PATH.2`, ...
//! Each recording gets its own engine (timestamps of different boots do
//! not mix). Warnings (torn tail, corrupt block, unknown records) go to
//! stderr and do not change the exit status.

use std::collections::HashSet;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;

use crate::clock::WallClock;
use crate::engine::Engine;
use crate::event::Event;
use crate::netns::NetnsNames;
use crate::output::{Renderer, ReplaySource, StatusInfo};
use crate::pipeline::Pipeline;
use crate::recording::format::{FrameHeader, Item};
use crate::recording::read_ahead::{read_ahead, ReadAheadError};
use crate::recording::reader::{FileReader, OpenError};
use crate::recording::warning::{Warning, WarningKind};
use crate::recording::writer::segment_path;
use crate::recording::Context;
use crate::recording::{Batch, Part};

pub struct ReplayOptions {
    pub paths: Vec<PathBuf>,
    pub json: bool,
    pub events: bool,
    /// Wall-clock ns since the epoch: print nothing before / after.
    pub since: Option<i128>,
    pub until: Option<i128>,
    /// Overrides of the recorded engine settings.
    pub storm_threshold: Option<u32>,
    pub storm_window_ns: Option<u64>,
    /// The human view's colours, width and `--explain`.
    pub plain: crate::incident::plain::PlainOptions,
    /// `--tui`: also collect what the dashboard shows.
    pub timeline: Option<std::rc::Rc<std::cell::RefCell<crate::tui::Timeline>>>,
}

impl ReplayOptions {
    /// Findings of `paths` as human text, everything replayed, the
    /// recorded settings kept.
    pub fn new(paths: Vec<PathBuf>) -> ReplayOptions {
        ReplayOptions {
            paths,
            json: false,
            events: false,
            since: None,
            until: None,
            storm_threshold: None,
            storm_window_ns: None,
            plain: Default::default(),
            timeline: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot write output")]
    Output(#[source] io::Error),
    #[error("nothing to replay: every file given ends before its header")]
    NothingToReplay,
}

/// What a replay went through.
#[derive(Debug, Clone, Default)]
pub struct ReplayReport {
    pub files: usize,
    pub recordings: usize,
    pub items: u64,
    pub events: u64,
    pub warnings: usize,
}

/// Parses an RFC 3339 time (`2026-01-02T03:04:05Z`, offsets allowed) to
/// ns since the epoch.
pub fn parse_rfc3339(s: &str) -> Result<i128, String> {
    time::OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp_nanos())
        .map_err(|e| format!("{s:?} is not an RFC 3339 time like 2026-01-02T03:04:05Z ({e})"))
}

/// `paths`, each followed by its rotated older segments (`P.1`, `P.2`, ...
/// of the same recording), without duplicates.
fn expand(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut push = |p: PathBuf, out: &mut Vec<PathBuf>| {
        let key = std::fs::canonicalize(&p).unwrap_or_else(|_| p.clone());
        if seen.insert(key) {
            out.push(p);
        }
    };
    for p in paths {
        push(p.clone(), &mut out);
        let id = match FileReader::open(p) {
            Ok(r) => r.context().recording_id.clone(),
            Err(_) => continue,
        };
        for n in 1.. {
            let older = segment_path(p, n);
            if !older.is_file() {
                break;
            }
            match FileReader::open(&older) {
                Ok(r) if r.context().recording_id == id => push(older, &mut out),
                _ => break,
            }
        }
    }
    out
}

fn print_warning(w: &Warning) {
    eprintln!("ktrace: warning: {w}");
}

/// The files of one recording, in segment order.
struct Recording {
    readers: Vec<FileReader>,
}

pub fn run(opts: &ReplayOptions) -> Result<ReplayReport, ReplayError> {
    run_exporting(opts, None)
}

/// [`run`], also sending the findings to `export` as OTLP log records
/// with their recorded times (back-fill); closes `export` at the end.
pub fn run_exporting(
    opts: &ReplayOptions,
    export: Option<&crate::export::Exporter>,
) -> Result<ReplayReport, ReplayError> {
    let mut out = BufWriter::with_capacity(1 << 16, io::stdout());
    let r = run_inner(opts, &mut out, &mut print_warning, export);
    if let Some(x) = export {
        let mut notices = Renderer::new(
            &mut out,
            opts.json,
            false,
            WallClock::now(),
            NetnsNames::default(),
        );
        x.close(&mut notices).map_err(ReplayError::Output)?;
    }
    r
}

/// `replay --tui`: the recording's timeline, then the dashboard over it
/// (warnings first, on stderr, before the terminal is taken).
pub fn run_dashboard(opts: &ReplayOptions) -> Result<ReplayReport, ReplayError> {
    let timeline = std::rc::Rc::new(std::cell::RefCell::new(crate::tui::Timeline::default()));
    let opts = ReplayOptions {
        timeline: Some(timeline.clone()),
        json: false,
        events: false,
        paths: opts.paths.clone(),
        plain: opts.plain,
        ..*opts
    };
    let report = run_inner(&opts, &mut io::sink(), &mut print_warning, None)?;
    let host = FileReader::open(&opts.paths[0])
        .map(|r| r.context().host.clone())
        .unwrap_or_default();
    crate::tui::run_replay(&timeline.borrow(), &host).map_err(ReplayError::Output)?;
    Ok(report)
}

/// [`run`] with the output and the warnings going where the caller says.
pub fn run_to(
    opts: &ReplayOptions,
    out: &mut dyn Write,
    warn: &mut dyn FnMut(&Warning),
) -> Result<ReplayReport, ReplayError> {
    run_inner(opts, out, warn, None)
}

fn run_inner(
    opts: &ReplayOptions,
    out: &mut dyn Write,
    warn: &mut dyn FnMut(&Warning),
    export: Option<&crate::export::Exporter>,
) -> Result<ReplayReport, ReplayError> {
    let mut report = ReplayReport::default();
    let mut readers = Vec::new();
    for p in expand(&opts.paths) {
        match FileReader::open(&p) {
            Ok(r) => readers.push(r),
            Err(e @ OpenError::Torn { .. }) => {
                report.warnings += 1;
                warn(&Warning {
                    path: p.clone(),
                    offset: 0,
                    kind: WarningKind::TornTail,
                    message: format!("{e}; skipped"),
                });
            }
            Err(e) => return Err(e.into()),
        }
    }
    if readers.is_empty() {
        return Err(ReplayError::NothingToReplay);
    }
    report.files = readers.len();
    // Recording order: start time, recording, segment.
    readers.sort_by_key(|r| {
        let c = r.context();
        (
            i128::from(c.wall_offset_ns) + i128::from(c.started_mono_ns),
            c.recording_id.clone(),
            c.segment,
        )
    });
    let mut recordings: Vec<Recording> = Vec::new();
    for r in readers {
        match recordings.last_mut() {
            Some(g) if g.readers[0].context().recording_id == r.context().recording_id => {
                g.readers.push(r)
            }
            _ => recordings.push(Recording { readers: vec![r] }),
        }
    }
    report.recordings = recordings.len();
    for rec in recordings {
        replay_recording(opts, rec, &mut *out, warn, &mut report, export)?;
    }
    out.flush().map_err(ReplayError::Output)?;
    Ok(report)
}

/// Which recorded times (monotonic ns) a replay feeds to the engine and prints.
struct Window {
    since: u64,
    until: u64,
    /// Events before --since still feed the engine (flows it needs to
    /// explain later resets), as far back as it remembers flows.
    warm_from: u64,
}

impl Window {
    fn new(opts: &ReplayOptions, clock: WallClock, flow_ttl_ns: u64) -> Window {
        let to_mono =
            |wall: i128| -> u64 { (wall - clock.offset_ns).clamp(0, i128::from(u64::MAX)) as u64 };
        let since = opts.since.map_or(0, to_mono);
        Window {
            since,
            until: opts.until.map_or(u64::MAX, to_mono),
            warm_from: if opts.since.is_some() {
                since.saturating_sub(flow_ttl_ns)
            } else {
                0
            },
        }
    }

    fn feeds(&self, ts: u64) -> bool {
        ts >= self.warm_from && ts <= self.until
    }

    fn prints(&self, ts: u64) -> bool {
        ts >= self.since && ts <= self.until
    }
}

/// The engine settings of a recording, with the command line's overrides.
fn engine_config(opts: &ReplayOptions, ctx: &Context) -> crate::engine::EngineConfig {
    let mut cfg = ctx.engine.clone().bounded();
    if let Some(t) = opts.storm_threshold {
        cfg.storm_threshold = t.max(1);
    }
    if let Some(w) = opts.storm_window_ns {
        cfg.storm_window_ns = w.max(1);
    }
    cfg
}

/// One recording through its own pipeline: status, then every file's items.
fn replay_recording(
    opts: &ReplayOptions,
    mut rec: Recording,
    out: &mut dyn Write,
    warn: &mut dyn FnMut(&Warning),
    report: &mut ReplayReport,
    export: Option<&crate::export::Exporter>,
) -> Result<(), ReplayError> {
    let ctx: Context = rec.readers[0].context().clone();
    let clock = ctx.clock();
    let cfg = engine_config(opts, &ctx);
    let window = Window::new(opts, clock, cfg.flow_ttl_ns);
    let mut names = NetnsNames::default();
    for (inum, name) in &ctx.netns_names {
        names.insert(*inum, name.clone());
    }
    let mut p = Pipeline::new(
        Some(Engine::new(cfg.with_hooks(&ctx.hook_status()))),
        Renderer::new(out, opts.json, opts.events, clock, names).with_plain(opts.plain),
    );
    p.print_window = (window.since, window.until);
    if let Some(t) = &opts.timeline {
        use crate::pipeline::Tap;
        t.borrow_mut()
            .status(&ctx.hook_status(), ctx.kernel.as_deref(), clock);
        p.tap = Some(Box::new(t.clone()));
    }
    if let Some(x) = export {
        x.set_clock(clock);
        p.exporter = Some(x.clone());
    }
    print_status(&mut p.out, &ctx, &rec, opts.json).map_err(ReplayError::Output)?;

    let mut feed = Feed {
        p,
        window,
        last_ts: ctx.started_mono_ns,
        dropped_total: 0,
    };
    let mut prev_segment: Option<u64> = None;
    for r in &mut rec.readers {
        let seg = r.context().segment;
        if let Some(prev) = prev_segment.filter(|&prev| seg > prev + 1) {
            report.warnings += 1;
            warn(&Warning {
                path: r.path().to_path_buf(),
                offset: 0,
                kind: WarningKind::Corrupt,
                message: format!("segments {}..{} of this recording are missing; events between them were not replayed", prev + 1, seg - 1),
            });
        }
        prev_segment = Some(seg);
        feed.file(r, warn, report)?;
    }
    feed.p.finish(feed.last_ts).map_err(ReplayError::Output)
}

/// Recorded items into a recording's pipeline.
struct Feed<'a> {
    p: Pipeline<&'a mut dyn Write>,
    window: Window,
    /// When the replay ends: the last recorded time it went through.
    last_ts: u64,
    /// Events the recorder could not write, so far.
    dropped_total: u64,
}

impl Feed<'_> {
    /// Every block of one file the window wants, decoded on another thread.
    fn file(
        &mut self,
        r: &mut FileReader,
        warn: &mut dyn FnMut(&Warning),
        report: &mut ReplayReport,
    ) -> Result<(), ReplayError> {
        let (from, until) = (self.window.warm_from, self.window.until);
        let want = move |h: &FrameHeader| h.max_ts >= from && h.min_ts <= until;
        let path = r.path().display().to_string();
        read_ahead(r, &want, |b| self.batch(b, warn, report)).map_err(|e| match e {
            ReadAheadError::Read(source) => ReplayError::Read { path, source },
            ReadAheadError::Consume(e) => ReplayError::Output(e),
        })
    }

    /// One block: its warnings, then its items in recorded order.
    fn batch(
        &mut self,
        b: &Batch,
        warn: &mut dyn FnMut(&Warning),
        report: &mut ReplayReport,
    ) -> io::Result<()> {
        for w in &b.warnings {
            report.warnings += 1;
            warn(w);
        }
        for part in b.parts() {
            match part {
                Part::Events(evs) => self.events(evs, report)?,
                Part::Item(item) => {
                    report.items += 1;
                    self.item(item)?;
                }
            }
        }
        Ok(())
    }

    /// Events in a row: those the window feeds, in runs, to the pipeline.
    fn events(&mut self, mut evs: &[Event], report: &mut ReplayReport) -> io::Result<()> {
        report.items += evs.len() as u64;
        while !evs.is_empty() {
            let skip = evs.iter().take_while(|e| !self.window.feeds(e.ts_ns));
            evs = &evs[skip.count()..];
            let n = evs
                .iter()
                .take_while(|e| self.window.feeds(e.ts_ns))
                .count();
            let (run, rest) = evs.split_at(n);
            if let Some(last) = run.iter().map(|e| e.ts_ns).max() {
                self.last_ts = self.last_ts.max(last);
            }
            report.events += n as u64;
            self.p.handle_batch(run)?;
            evs = rest;
        }
        Ok(())
    }

    /// An item other than an event.
    fn item(&mut self, item: &Item) -> io::Result<()> {
        match item {
            Item::Tick { ts_ns } if self.window.feeds(*ts_ns) => {
                self.last_ts = self.last_ts.max(*ts_ns);
                self.p.tick(*ts_ns)
            }
            Item::Lost {
                ts_ns,
                count,
                total,
                what,
            } if self.window.prints(*ts_ns) => self.p.out.lost(*ts_ns, *count, *total, what),
            Item::Dropped {
                ts_ns,
                count,
                reason,
            } => {
                self.dropped_total += count;
                if !self.window.prints(*ts_ns) {
                    return Ok(());
                }
                let what = format!("not recorded ({reason})");
                self.p.out.lost(*ts_ns, *count, self.dropped_total, &what)
            }
            Item::Name { record, .. } => {
                self.p.out.names_mut().apply(record.clone());
                Ok(())
            }
            Item::Event(_) | Item::Tick { .. } | Item::Lost { .. } => Ok(()),
        }
    }
}

/// The recorded status line, stamped when the recording started, naming
/// the recording; in human mode, a line saying what is replayed.
fn print_status<W: Write>(
    out: &mut Renderer<W>,
    ctx: &Context,
    rec: &Recording,
    json: bool,
) -> io::Result<()> {
    let clock = ctx.clock();
    let source = ReplaySource {
        files: rec
            .readers
            .iter()
            .map(|r| r.path().display().to_string())
            .collect(),
        recording_id: ctx.recording_id.clone(),
        host: ctx.host.clone(),
        recorded_by: ctx.ktrace_version.clone(),
        command: ctx.command.clone(),
        format_version: ctx.format_version.clone(),
        boot_id: ctx.boot_id.clone(),
        started: clock.rfc3339(ctx.started_mono_ns),
        segments: rec.readers.iter().map(|r| r.context().segment).collect(),
    };
    let info = StatusInfo {
        kernel: ctx.kernel.as_deref(),
        ring_buffer_bytes: ctx.ring_buffer_bytes,
        netns: ctx.netns,
        memlock: None,
        exposed: None,
        replay: Some(&source),
        kube_proxy_mode: Some(ctx.engine.kube_proxy_mode),
    };
    out.status(ctx.started_mono_ns, &ctx.hook_status(), &info)?;
    if !json {
        out.note(&format!(
            "replaying {} file(s) recorded by ktrace {} on {} from {}",
            source.files.len(),
            ctx.ktrace_version,
            if ctx.host.is_empty() { "?" } else { &ctx.host },
            source.started
        ))?;
    }
    Ok(())
}
