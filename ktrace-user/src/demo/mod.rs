//! `ktrace demo`: a real incident in namespaces of its own, diagnosed by the
//! real `watch` pipeline, so a first run shows what a finding looks like.
//!
//! - [`lab`]: the namespaces (client, node with the Service DNAT, server
//!   with two backends), deleted on drop, also on panic.
//! - [`traffic`]: the two incidents, with std sockets and one raw socket.
//!
//! The pipeline runs on this thread inside the node namespace (where the
//! NAT happens, as `watch` would on a Kubernetes node); the incidents are
//! played on another thread once the hooks are attached. Ctrl-C, SIGTERM
//! and SIGHUP stop it at any step; the namespaces are deleted either way.

pub mod lab;
pub mod traffic;

use std::io::{BufWriter, StdoutLock};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::clock::WallClock;
use crate::engine::{Engine, EngineConfig, FindingKind};
use crate::event::Event;
use crate::hooks::HookStatus;
use crate::netns::NetnsNames;
use crate::output::{Renderer, StatusInfo};
use crate::pipeline::{run_source, Loss, Pipeline, PipelineError, Sink, SourceOptions};

/// Longest the pipeline waits for the findings once the hooks are attached.
const FINDINGS_TIMEOUT: Duration = Duration::from_secs(20);
/// After the incidents: how long the findings may still take to arrive.
const SETTLE: Duration = Duration::from_secs(3);
const EXPECTED: [FindingKind; 2] = [FindingKind::UnnatedReply, FindingKind::BackendSwitch];

pub struct DemoOptions {
    pub json: bool,
    /// `--explain`: every finding with its explanation and remedy.
    pub explain: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("the demo needs root (it makes network namespaces and loads eBPF programs)")]
    NotRoot,
    #[error("{0} is not installed (scripts/setup.sh installs it)")]
    Missing(&'static str),
    #[error("{0}")]
    Tool(String),
    #[error("demo traffic: {0}")]
    Traffic(String),
    #[error("cannot enter the demo's node namespace: {0}")]
    Netns(#[source] std::io::Error),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("no {0} finding: the hooks this kernel offers may not see it (see the status)")]
    NoFinding(&'static str),
}

/// How the demo ended.
pub enum Outcome {
    /// Both findings printed.
    Complete,
    /// Ctrl-C or SIGTERM: stopped and cleaned up.
    Interrupted,
}

/// Builds the namespaces, plays the incidents under the pipeline, prints
/// the findings, and deletes everything it made.
pub fn run(opts: DemoOptions) -> Result<Outcome, DemoError> {
    preflight()?;
    let stop = Arc::new(AtomicBool::new(false));
    watch_signals(&stop)?;
    let lab = lab::Lab::build()?;
    eprintln!(
        "ktrace demo: namespaces {}, {}, {}: client {} -> Service {} (DNAT on the node) -> backends {} and {}",
        lab.client,
        lab.node,
        lab.server,
        lab.client_ip(),
        lab.service(),
        lab.backends()[0],
        lab.backends()[1]
    );
    let result = diagnose(&lab, &opts, &stop);
    if stop.load(Ordering::Relaxed) {
        eprintln!("ktrace demo: interrupted");
    }
    drop(lab);
    eprintln!(
        "ktrace demo: namespaces deleted (their conntrack entries and iptables rules with them)"
    );
    let emitted = result?;
    if stop.load(Ordering::Relaxed) {
        return Ok(Outcome::Interrupted);
    }
    for kind in EXPECTED {
        if emitted.get(&kind).copied().unwrap_or(0) == 0 {
            return Err(DemoError::NoFinding(kind.as_str()));
        }
    }
    Ok(Outcome::Complete)
}

fn preflight() -> Result<(), DemoError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(DemoError::NotRoot);
    }
    for tool in ["ip", "iptables", "conntrack"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
        if !found {
            return Err(DemoError::Missing(tool));
        }
    }
    Ok(())
}

/// Ctrl-C, SIGTERM and SIGHUP set `stop` instead of killing the process,
/// so every step can wind down and the namespaces are deleted.
fn watch_signals(stop: &Arc<AtomicBool>) -> Result<(), DemoError> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| DemoError::Tool(format!("cannot handle signal {sig}: {e}")))?;
    }
    Ok(())
}

/// The pipeline in the node namespace, the incidents on another thread.
fn diagnose(
    lab: &lab::Lab,
    opts: &DemoOptions,
    stop: &AtomicBool,
) -> Result<std::collections::HashMap<FindingKind, u64>, DemoError> {
    let played = &AtomicBool::new(false);
    let (go_tx, go_rx) = mpsc::channel::<()>();
    std::thread::scope(|s| {
        let player = s.spawn(move || {
            // Wait for the hooks; a pipeline that failed drops the sender.
            if go_rx.recv().is_err() {
                return Ok(());
            }
            let r = traffic::play(lab, stop);
            played.store(true, Ordering::Relaxed);
            r
        });
        let emitted = watch_in_node(lab, opts, stop, played, go_tx);
        if emitted.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        let played = player
            .join()
            .unwrap_or_else(|_| Err(DemoError::Traffic("the traffic thread panicked".into())));
        let emitted = emitted?;
        played?;
        Ok(emitted)
    })
}

fn watch_in_node(
    lab: &lab::Lab,
    opts: &DemoOptions,
    stop: &AtomicBool,
    played: &AtomicBool,
    go: mpsc::Sender<()>,
) -> Result<std::collections::HashMap<FindingKind, u64>, DemoError> {
    // This thread is the process's first: /proc/self/net (the conntrack
    // counters) and the threads the pipeline starts follow its namespace.
    let _inside = lab::Entered::new(&lab.node).map_err(DemoError::Netns)?;
    let engine = EngineConfig {
        conntrack_max: crate::sysctl::conntrack_max(),
        ct_timeout_established_s: crate::sysctl::ct_timeout_established_s(),
        keepalive_s: crate::sysctl::keepalive_s(),
        ..Default::default()
    };
    let clock = WallClock::now();
    let mut pipeline = Pipeline::new(
        Some(Engine::new(engine)),
        Renderer::new(
            BufWriter::new(std::io::stdout().lock()),
            opts.json,
            false,
            clock,
            NetnsNames::load(),
        )
        .with_plain(crate::incident::plain::PlainOptions::for_stdout(
            opts.explain,
        )),
    );
    pipeline.live = true;
    pipeline.only_service = Some(lab.service_addr());
    let mut sink = DemoSink {
        pipeline,
        go: Some(go),
        stop,
        played,
        played_at: None,
        deadline: Instant::now() + FINDINGS_TIMEOUT,
    };
    let source = SourceOptions {
        duration: Some(FINDINGS_TIMEOUT + SETTLE),
        ring_buffer_bytes: 8 << 20,
        ctnetlink: true,
        every_reset: false,
        exposed: Vec::new(),
        kube_proxy_mode: None,
    };
    run_source(&source, clock, &mut sink)?;
    Ok(std::mem::take(&mut sink.pipeline.emitted))
}

/// `watch`'s pipeline, plus when to stop: both findings seen, the
/// incidents over and settled, a signal, or the timeout.
struct DemoSink<'a> {
    pipeline: Pipeline<BufWriter<StdoutLock<'static>>>,
    go: Option<mpsc::Sender<()>>,
    stop: &'a AtomicBool,
    played: &'a AtomicBool,
    played_at: Option<Instant>,
    deadline: Instant,
}

impl Sink for DemoSink<'_> {
    fn start(
        &mut self,
        status: &[HookStatus],
        info: &StatusInfo,
        clock: WallClock,
    ) -> Result<(), PipelineError> {
        self.pipeline.start(status, info, clock)?;
        if let Some(go) = self.go.take() {
            let _ = go.send(());
        }
        Ok(())
    }

    fn event(&mut self, ev: &Event) -> Result<(), PipelineError> {
        self.pipeline.event(ev)
    }

    fn lost(&mut self, now_ns: u64, loss: &Loss) -> Result<(), PipelineError> {
        Sink::lost(&mut self.pipeline, now_ns, loss)
    }

    fn hook_down(&mut self, now_ns: u64, hook: &HookStatus) -> Result<(), PipelineError> {
        Sink::hook_down(&mut self.pipeline, now_ns, hook)
    }

    fn tick(&mut self, now_ns: u64) -> Result<(), PipelineError> {
        Sink::tick(&mut self.pipeline, now_ns)
    }

    fn flush(&mut self) -> Result<(), PipelineError> {
        Sink::flush(&mut self.pipeline)
    }

    fn finish(&mut self, now_ns: u64) -> Result<(), PipelineError> {
        Sink::finish(&mut self.pipeline, now_ns)
    }

    fn wants_counters(&self) -> bool {
        Sink::wants_counters(&self.pipeline)
    }

    fn done(&mut self) -> bool {
        if self.stop.load(Ordering::Relaxed) || Instant::now() >= self.deadline {
            return true;
        }
        if !self.played.load(Ordering::Relaxed) {
            return false;
        }
        let all = EXPECTED
            .iter()
            .all(|k| self.pipeline.emitted.get(k).copied().unwrap_or(0) > 0);
        let since = *self.played_at.get_or_insert_with(Instant::now);
        all || since.elapsed() >= SETTLE
    }
}
