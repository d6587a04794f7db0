//! The pipeline every event passes through, live or replayed.
//!
//! - [`source`]: the live event source: attaches the hooks, then feeds
//!   kernel events (ring buffer), NAT mappings (ctnetlink, where no kernel
//!   hook gives them) and conntrack counters to a [`Sink`] until Ctrl-C,
//!   SIGTERM or the duration.
//! - [`fanout`]: [`Pipeline`], the sink of `watch` (engine and renderer,
//!   plus a recorder with `--record`), of `record` (recorder, status and
//!   lost lines) and of `replay` (engine and renderer over a recording).
//!
//! The commands (`watch`, `record`, `replay`) assemble these; the recording
//! format, the engine and the renderer know nothing of them.

pub mod fanout;
pub mod source;

pub use fanout::Pipeline;
pub use source::{run_source, SourceOptions};

use crate::clock::WallClock;
use crate::event::Event;
use crate::hooks::{self, HookStatus};
use crate::output::StatusInfo;
use crate::recording::writer::RecordError;
pub use crate::ring::Loss;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
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

/// A copy of what passes through a [`Pipeline`] for another view (the
/// dashboard): called on the event path, so it must not block.
pub trait Tap {
    fn status(&mut self, _hooks: &[HookStatus], _kernel: Option<&str>, _clock: WallClock) {}
    fn event(&mut self, _ev: &Event) {}
    /// A finding, with the names of its addresses when any are known.
    fn finding(
        &mut self,
        _f: &crate::engine::Finding,
        _names: Option<&crate::names::FindingNames>,
    ) {
    }
    /// What the Kubernetes name sources are doing (at start, then at
    /// each change).
    fn names(&mut self, _sources: &[crate::names::SourceStatus]) {}
    fn lost(&mut self, _now_ns: u64, _count: u64) {}
    fn tick(&mut self, _now_ns: u64) {}
    /// True stops the source (the view was closed).
    fn done(&self) -> bool {
        false
    }
}

/// What the event source feeds: the status once, then events, lost-event
/// counts and clock ticks (every 200 ms) until it stops, then `finish`.
pub trait Sink {
    fn start(
        &mut self,
        status: &[HookStatus],
        info: &StatusInfo,
        clock: WallClock,
    ) -> Result<(), PipelineError>;
    fn event(&mut self, ev: &Event) -> Result<(), PipelineError>;
    /// Events in a row (a drain of the ring buffer), as `event` each.
    fn events(&mut self, evs: &[Event]) -> Result<(), PipelineError> {
        evs.iter().try_for_each(|ev| self.event(ev))
    }
    fn lost(&mut self, now_ns: u64, loss: &Loss) -> Result<(), PipelineError>;
    /// A source stopped mid-run: `hook` is its status now (not attached,
    /// the reason why).
    fn hook_down(&mut self, now_ns: u64, hook: &HookStatus) -> Result<(), PipelineError>;
    fn tick(&mut self, now_ns: u64) -> Result<(), PipelineError>;
    fn flush(&mut self) -> Result<(), PipelineError>;
    /// The source stopped at `now_ns`.
    fn finish(&mut self, now_ns: u64) -> Result<(), PipelineError>;
    /// Checked at every tick: true stops the source as a signal would.
    fn done(&mut self) -> bool {
        false
    }
    /// Something waits for a conntrack counter sample (a finding that will
    /// cite it): the source takes one now rather than at the next tick.
    fn wants_counters(&self) -> bool {
        false
    }
}
