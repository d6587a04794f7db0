//! `ktrace watch`: the live [`Pipeline`] with the engine and the renderer
//! (plus a recorder with `--record`, an exporter with `--otlp-endpoint`),
//! fed by the live event source until Ctrl-C, SIGTERM or the duration.

use crate::clock::WallClock;
use crate::engine::{Engine, EngineConfig};
use crate::incident::plain::PlainOptions;
use crate::netns::NetnsNames;
use crate::output::Renderer;
use crate::pipeline::{run_source, Pipeline, PipelineError, SourceOptions};
use crate::recording::{Recorder, RotationConfig};

pub struct WatchOptions {
    /// Where events come from (the same options as `record`).
    pub source: SourceOptions,
    pub json: bool,
    pub events: bool,
    pub engine: EngineConfig,
    /// `--record PATH`: also record every event while watching.
    pub record: Option<RotationConfig>,
    /// `--otlp-endpoint`: also export metrics and findings over OTLP.
    pub export: Option<crate::export::Exporter>,
    /// `--explain`: every finding with its explanation and remedy.
    pub explain: bool,
    /// `--tui`: the live dashboard instead of the stream.
    pub tui: bool,
    /// Kubernetes names of addresses (`None`: `--no-kube-names`).
    pub names: Option<std::sync::Arc<crate::names::Names>>,
}

pub fn run(opts: WatchOptions) -> Result<(), PipelineError> {
    // Checked before attaching: a bad --record path fails fast.
    let recorder = match &opts.record {
        Some(cfg) => Some(Recorder::create(cfg.clone(), "watch", opts.engine.clone())?),
        None => None,
    };
    let clock = WallClock::now();
    if opts.tui {
        // The dashboard draws; the renderer writes nowhere.
        let (tap, live) = crate::tui::start_live();
        let out = Renderer::new(std::io::sink(), false, false, clock, NetnsNames::load());
        let r = run_pipeline(&opts, recorder, clock, out, Some(Box::new(tap)));
        let drawn = live
            .thread
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the dashboard panicked")));
        r?;
        return drawn.map_err(PipelineError::Output);
    }
    let out = Renderer::new(
        std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock()),
        opts.json,
        opts.events,
        clock,
        NetnsNames::load(),
    )
    .with_plain(PlainOptions::for_stdout(opts.explain));
    run_pipeline(&opts, recorder, clock, out, None)
}

/// The live pipeline into `out` (and `tap`) until the source stops.
fn run_pipeline<W: std::io::Write>(
    opts: &WatchOptions,
    recorder: Option<Recorder>,
    clock: WallClock,
    out: Renderer<W>,
    tap: Option<Box<dyn crate::pipeline::Tap>>,
) -> Result<(), PipelineError> {
    let mut p = Pipeline::new(Some(Engine::new(opts.engine.clone())), out);
    p.live = true;
    p.recorder = recorder;
    if let Some(n) = &opts.names {
        p.name_with(n.clone());
    }
    p.exporter = opts.export.clone();
    p.tap = tap;
    let r = run_source(&opts.source, clock, &mut p);
    if let Some(rec) = p.recorder.take() {
        rec.finish();
    }
    let closed = p.exporter.take().map(|x| x.close(&mut p.out));
    r?;
    closed.transpose().map(drop).map_err(PipelineError::Output)
}
