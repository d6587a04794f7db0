//! `ktrace record`: the same hooks and event source as `watch`, every event
//! to a recording; no engine runs, stdout gets the status and lost lines.

use std::io::Write as _;

use crate::clock::WallClock;
use crate::engine::EngineConfig;
use crate::netns::NetnsNames;
use crate::output::Renderer;
use crate::pipeline::{run_source, Pipeline, PipelineError, SourceOptions};
use crate::recording::{Recorder, RecorderSummary, RotationConfig};

/// Options of `ktrace record`.
pub struct RecordOptions {
    pub source: SourceOptions,
    pub rotation: RotationConfig,
    pub json: bool,
    pub engine: EngineConfig,
    /// `--otlp-endpoint`: also export the event counters over OTLP.
    pub export: Option<crate::export::Exporter>,
    /// Kubernetes names of the events' addresses, stored in the recording.
    pub names: Option<std::sync::Arc<crate::names::Names>>,
}

/// What `ktrace record` did, for its closing line.
#[derive(Debug, Clone, Default)]
pub struct RecordReport {
    pub summary: RecorderSummary,
}

/// `ktrace record`: the same hooks and event source as `watch`, every event
/// to the recording; stdout gets the status line and lost-event lines only.
pub fn record(opts: RecordOptions) -> Result<RecordReport, PipelineError> {
    let clock = WallClock::now();
    let recorder = Recorder::create(opts.rotation.clone(), "record", opts.engine.clone())?;
    let stdout = std::io::stdout().lock();
    let mut p = Pipeline::new(
        None,
        Renderer::new(
            std::io::BufWriter::with_capacity(1 << 16, stdout),
            opts.json,
            false,
            clock,
            NetnsNames::load(),
        ),
    );
    p.recorder = Some(recorder);
    if let Some(n) = &opts.names {
        p.name_with(n.clone());
    }
    p.exporter = opts.export.clone();
    let r = run_source(&opts.source, clock, &mut p);
    let summary = p.recorder.take().map(Recorder::finish).unwrap_or_default();
    if let Some(x) = p.exporter.take() {
        x.close(&mut p.out).map_err(PipelineError::Output)?;
    }
    p.out.flush().map_err(PipelineError::Output)?;
    drop(p);
    r?;
    if opts.json {
        let v = serde_json::json!({
            "type": "recording",
            "path": opts.rotation.path.display().to_string(),
            "events": summary.events,
            "blocks": summary.blocks,
            "bytes": summary.bytes,
            "files": summary.files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "dropped": summary.dropped,
        });
        let mut out = std::io::stdout().lock();
        writeln!(out, "{v}")
            .and_then(|_| out.flush())
            .map_err(PipelineError::Output)?;
    }
    Ok(RecordReport { summary })
}
