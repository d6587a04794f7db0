//! The exporter: a handle the pipeline calls without ever waiting, and a
//! thread of its own (its own current-thread tokio runtime) that talks OTLP.
//!
//! ```text
//! pipeline thread                      | exporter thread ("ktrace-otlp")
//! event()   -> SDK counter add (memory)  | every interval: collect, export metrics
//! finding() -> counter add + try_send ---+-> log record -> bounded queue -> export batches
//! tick()    <- take_lost(): "lost" line  | failures: backoff 1 s .. 30 s, queue kept
//! ```
//!
//! Nothing the pipeline calls does I/O or blocks: a full queue drops the
//! finding's log record (counted); an endpoint that is down, slow or
//! refusing only delays the exporter thread. Memory is bounded by the queue
//! (`OTEL_BLRP_MAX_QUEUE_SIZE` records) and the metric attribute sets.

use crate::names::FindingNames;
use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::logs::{Logger as _, LoggerProvider as _};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::logs::{
    LogBatch, LogExporter as _, LogProcessor, SdkLogRecord, SdkLogger, SdkLoggerProvider,
};
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter as _;
use opentelemetry_sdk::metrics::reader::MetricReader as _;
use opentelemetry_sdk::metrics::Temporality;
use opentelemetry_sdk::Resource;
use tokio::sync::mpsc;

use super::config::{ExportConfig, Protocol, Signal};
use super::logs;
use super::metrics::{lost_source, Metrics};
use super::tls::{self, LastError, Tls, TlsError};
use crate::background;
use crate::clock::WallClock;
use crate::engine::Finding;
use crate::event::Event;
use crate::hooks::HookStatus;
use crate::metrics_server::{self, Health, MetricsServer, MetricsServerError};
use crate::output::Renderer;

/// Findings in flight from the pipeline to the exporter thread.
const CHANNEL: usize = 256;
/// Backoff after a failed export: doubles from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long `close` lets the thread send what it holds.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// At most one "lost" notice per this interval.
const LOST_NOTICE_EVERY: Duration = Duration::from_secs(1);

/// A finding and the clock that dates it, on its way to the exporter thread.
type Msg = Box<(Finding, WallClock, Option<FindingNames>)>;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot set up OTLP export to {endpoint}: {message}")]
    Setup { endpoint: String, message: String },
    #[error("cannot start the OTLP export thread: {0}")]
    Thread(#[source] std::io::Error),
    /// A TLS file is missing or unusable: nothing could be sent.
    #[error("OTLP export off: {0}")]
    Tls(#[from] TlsError),
}

/// How the export ended, for the closing notice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportSummary {
    /// Log records exported.
    pub exported: u64,
    /// Log records dropped over the whole run (queue full, endpoint down at exit).
    pub dropped: u64,
    /// Of those, how many no `take_lost` reported yet.
    pub unreported: u64,
    /// Export requests that failed.
    pub failures: u64,
}

/// State shared by the handle and the thread.
struct Shared {
    /// Log records offered to the exporter: each ends exported or dropped.
    offered: AtomicU64,
    dropped: AtomicU64,
    reported: AtomicU64,
    exported: AtomicU64,
    failures: AtomicU64,
    failing: AtomicBool,
    /// Set by `shutdown`: when the thread must be done.
    deadline: Mutex<Option<Instant>>,
    last_notice: Mutex<Option<Instant>>,
    metrics: Option<Arc<Metrics>>,
}

impl Shared {
    fn new(metrics: Option<Arc<Metrics>>) -> Shared {
        Shared {
            offered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            reported: AtomicU64::new(0),
            exported: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            deadline: Mutex::new(None),
            last_notice: Mutex::new(None),
            metrics,
        }
    }

    fn drop_records(&self, n: u64) {
        if n == 0 {
            return;
        }
        self.dropped.fetch_add(n, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.lost(n, "otlp");
        }
    }
}

struct Inner {
    endpoint: String,
    tx: Mutex<Option<mpsc::Sender<Msg>>>,
    clock: Mutex<WallClock>,
    shared: Arc<Shared>,
    metrics: Option<Arc<Metrics>>,
    logs: bool,
    done: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    /// What `/healthz` reports (`--metrics-addr`), fed by the pipeline.
    health: Arc<Health>,
}

/// The pipeline's handle on the OTLP export. Cheap to clone; every method
/// returns at once.
#[derive(Clone)]
pub struct Exporter {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("endpoint", &self.inner.endpoint)
            .finish()
    }
}

fn resource(cfg: &ExportConfig) -> Resource {
    Resource::builder_empty()
        .with_attributes(
            cfg.resource
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        )
        .build()
}

fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("ktrace")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}

impl Exporter {
    /// Starts the export thread. Fails on a configuration the exporters
    /// refuse; an endpoint that does not answer is not an error (it is
    /// retried for as long as ktrace runs).
    pub fn start(cfg: ExportConfig) -> Result<Exporter, ExportError> {
        // Files first: a missing key is said before any thread starts.
        let tls = load_tls(&cfg)?;
        if let Some((signal, var)) = Signal::ALL.iter().find_map(|s| {
            let t = cfg.transport(*s);
            Some((s.as_str(), t.tls_file_unused.clone()?))
        }) {
            tracing::warn!(
                "{var} is set but the OTLP {signal} endpoint is not TLS: sending in clear (use https://)"
            );
        }
        let res = resource(&cfg);
        let metrics = cfg
            .signals
            .metrics
            .then(|| Arc::new(Metrics::new(res.clone(), scope())));
        let shared = Arc::new(Shared::new(metrics.clone()));
        let (tx, rx) = mpsc::channel(CHANNEL);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let endpoint = cfg.endpoint.clone();
        let logs = cfg.signals.logs;
        let thread_shared = shared.clone();
        let thread_metrics = metrics.clone();
        let failed_tx = ready_tx.clone();
        background::spawn(
            "ktrace-otlp",
            move || async move {
                // Dropped when the worker has flushed and stopped.
                let _done = done_tx;
                let worker = match Worker::new(cfg, tls, res, rx, thread_shared, thread_metrics) {
                    Ok(w) => w,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                worker.run().await;
            },
            move |why| {
                let _ = failed_tx.send(Err(why));
            },
        )
        .map_err(ExportError::Thread)?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(message)) => return Err(ExportError::Setup { endpoint, message }),
            Err(_) => {
                return Err(ExportError::Setup {
                    endpoint,
                    message: "the export thread stopped".into(),
                })
            }
        }
        Ok(Exporter {
            inner: Arc::new(Inner {
                endpoint,
                tx: Mutex::new(Some(tx)),
                clock: Mutex::new(WallClock::now()),
                shared,
                metrics,
                logs,
                done: Mutex::new(Some(done_rx)),
                health: Arc::default(),
            }),
        })
    }

    /// The metrics alone, for `--metrics-addr` without an OTLP endpoint: no
    /// export thread, no log records; `resource` becomes the labels every
    /// series carries (as the collector's conversion makes them).
    pub fn metrics_only(resource: &[(String, String)]) -> Exporter {
        let res = Resource::builder_empty()
            .with_attributes(
                resource
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
            )
            .build();
        let metrics = Some(Arc::new(Metrics::new(res, scope())));
        Exporter {
            inner: Arc::new(Inner {
                endpoint: "none (metrics endpoint only)".into(),
                tx: Mutex::new(None),
                clock: Mutex::new(WallClock::now()),
                shared: Arc::new(Shared::new(metrics.clone())),
                metrics,
                logs: false,
                done: Mutex::new(None),
                health: Arc::default(),
            }),
        }
    }

    /// Serves these metrics and the health at `addr` (`--metrics-addr`).
    pub fn serve_metrics(&self, addr: SocketAddr) -> Result<MetricsServer, MetricsServerError> {
        let metrics = self
            .inner
            .metrics
            .clone()
            .ok_or(MetricsServerError::NoMetrics)?;
        metrics_server::start(addr, metrics, self.inner.health.clone())
    }

    /// The pipeline drained the ring buffer (every tick, live): `/healthz`.
    pub fn drained(&self) {
        self.inner.health.drained();
    }

    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    /// The clock that makes findings' monotonic times wall-clock (the
    /// pipeline's, or a recording's in replay).
    pub fn set_clock(&self, clock: WallClock) {
        *self.inner.clock.lock().unwrap_or_else(|e| e.into_inner()) = clock;
    }

    /// Which hooks are live (`ktrace.hook.attached`).
    pub fn status(&self, hooks: &[HookStatus]) {
        self.inner.health.attached(hooks);
        if let Some(m) = &self.inner.metrics {
            m.status(hooks);
        }
    }

    /// A decoded kernel event: counters only.
    pub fn event(&self, ev: &Event) {
        if let Some(m) = &self.inner.metrics {
            m.event(ev);
        }
    }

    /// A finding: counted, and queued as a log record (dropped, counted,
    /// when the queue is full).
    pub fn finding(&self, f: &Finding) {
        self.finding_named(f, None);
    }

    /// [`finding`](Self::finding) with the Kubernetes names of its addresses.
    pub fn finding_named(&self, f: &Finding, names: Option<&FindingNames>) {
        if let Some(m) = &self.inner.metrics {
            m.finding(f, names);
        }
        if !self.inner.logs {
            return;
        }
        self.inner.shared.offered.fetch_add(1, Ordering::Relaxed);
        let clock = *self.inner.clock.lock().unwrap_or_else(|e| e.into_inner());
        let tx = self.inner.tx.lock().unwrap_or_else(|e| e.into_inner());
        let sent = match tx.as_ref() {
            Some(tx) => tx
                .try_send(Box::new((f.clone(), clock, names.cloned())))
                .is_ok(),
            None => false,
        };
        if !sent {
            self.inner.shared.drop_records(1);
        }
    }

    /// Events lost elsewhere (`what` as the pipeline says it).
    pub fn lost(&self, count: u64, what: &str) {
        if let Some(m) = &self.inner.metrics {
            m.lost(count, lost_source(what));
        }
    }

    /// Log records dropped since the last call, and in all: `(new, total)`,
    /// at most once a second. The pipeline prints them as a lost line with
    /// source `otlp`.
    pub fn take_lost(&self) -> Option<(u64, u64)> {
        let s = &self.inner.shared;
        let total = s.dropped.load(Ordering::Relaxed);
        if total == s.reported.load(Ordering::Relaxed) {
            return None;
        }
        let mut last = s.last_notice.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < LOST_NOTICE_EVERY) {
            return None;
        }
        *last = Some(Instant::now());
        let before = s.reported.swap(total, Ordering::Relaxed);
        (total > before).then(|| (total - before, total))
    }

    /// Prints the drops [`Exporter::take_lost`] has, as a lost line with source `otlp`.
    pub fn report_lost<W: std::io::Write>(
        &self,
        now_ns: u64,
        out: &mut Renderer<W>,
    ) -> std::io::Result<()> {
        match self.take_lost() {
            Some((count, total)) => out.lost(now_ns, count, total, "otlp"),
            None => Ok(()),
        }
    }

    /// [`Exporter::shutdown`] with [`SHUTDOWN_TIMEOUT`], then the drops not
    /// yet reported as a lost line, and a flush.
    pub fn close<W: std::io::Write>(
        &self,
        out: &mut Renderer<W>,
    ) -> std::io::Result<ExportSummary> {
        let s = self.shutdown(SHUTDOWN_TIMEOUT);
        if s.unreported > 0 {
            out.lost(
                crate::clock::monotonic_now_ns(),
                s.unreported,
                s.dropped,
                "otlp",
            )?;
        }
        out.flush()?;
        Ok(s)
    }

    /// Whether the last export request failed.
    pub fn failing(&self) -> bool {
        self.inner.shared.failing.load(Ordering::Relaxed)
    }

    /// Sends what is held (metrics once more, queued log records) for at
    /// most `timeout` (less when the endpoint is known to be down), then
    /// stops the thread. Blocks the caller for at most `timeout`.
    pub fn shutdown(&self, timeout: Duration) -> ExportSummary {
        let timeout = if self.failing() {
            timeout.min(Duration::from_millis(500))
        } else {
            timeout
        };
        let deadline = Instant::now() + timeout;
        *self
            .inner
            .shared
            .deadline
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(deadline);
        // Closing the channel tells the thread to finish.
        self.inner
            .tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(done) = self
            .inner
            .done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            if done
                .recv_timeout(timeout + Duration::from_millis(200))
                .is_err()
            {
                // The worker is late (a loaded machine): what it has not
                // exported by now never will be, and must be counted.
                let s = &self.inner.shared;
                let settled =
                    s.exported.load(Ordering::Relaxed) + s.dropped.load(Ordering::Relaxed);
                s.drop_records(s.offered.load(Ordering::Relaxed).saturating_sub(settled));
            }
        }
        let s = &self.inner.shared;
        let dropped = s.dropped.load(Ordering::Relaxed);
        let reported = s.reported.swap(dropped, Ordering::Relaxed);
        ExportSummary {
            exported: s.exported.load(Ordering::Relaxed),
            dropped,
            unreported: dropped.saturating_sub(reported),
            failures: s.failures.load(Ordering::Relaxed),
        }
    }
}

/// Hands the SDK's log records to the worker (same thread): the logger
/// builds records, this collects them.
#[derive(Debug, Default)]
struct Collect(Arc<Mutex<Vec<SdkLogRecord>>>);

impl LogProcessor for Collect {
    fn emit(&self, data: &mut SdkLogRecord, _scope: &InstrumentationScope) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(data.clone());
    }
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }
    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// A log export in flight: gives its batch back with the result.
type LogExport = Pin<Box<dyn Future<Output = (Vec<SdkLogRecord>, OTelSdkResult)>>>;
type MetricExport = Pin<Box<dyn Future<Output = OTelSdkResult>>>;

/// Exponential backoff with a little jitter.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            next: BACKOFF_FIRST,
        }
    }
    fn reset(&mut self) {
        self.next = BACKOFF_FIRST;
    }
    fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.subsec_nanos());
        // Up to +10 %: exporters of a whole cluster do not retry in step.
        d + d.mul_f64(f64::from(nanos % 1000) / 10_000.0)
    }
}

struct Worker {
    cfg: ExportConfig,
    rx: mpsc::Receiver<Msg>,
    shared: Arc<Shared>,
    metrics: Option<Arc<Metrics>>,
    log_exporter: Option<Arc<opentelemetry_otlp::LogExporter>>,
    metric_exporter: Option<Arc<opentelemetry_otlp::MetricExporter>>,
    _logger_provider: SdkLoggerProvider,
    logger: SdkLogger,
    collected: Arc<Mutex<Vec<SdkLogRecord>>>,
    scope: Arc<InstrumentationScope>,
    /// Log records waiting for export (the in-flight batch is apart).
    pending: VecDeque<SdkLogRecord>,
    in_flight: usize,
    log_backoff: Backoff,
    metric_backoff: Backoff,
    /// Where the HTTP clients leave the cause of a failure, per signal.
    last_errors: [LastError; 2],
    /// The reasons said on stderr per signal (metrics, logs) since the
    /// export last worked: each once per outage, even when failures
    /// alternate between two (a TLS alert, then the broken pipe it leaves).
    said: [Vec<String>; 2],
    /// Shutting down: nothing is retried any more.
    closing: bool,
}

type Exporters = (
    Option<opentelemetry_otlp::LogExporter>,
    Option<opentelemetry_otlp::MetricExporter>,
);

/// The checked TLS material of each exported signal that uses TLS, in
/// [`Signal::ALL`] order.
type SignalTls = [Option<Tls>; 2];

fn load_tls(cfg: &ExportConfig) -> Result<SignalTls, TlsError> {
    let wanted = |s: Signal| match s {
        Signal::Metrics => cfg.signals.metrics,
        Signal::Logs => cfg.signals.logs,
    };
    let mut out: SignalTls = [None, None];
    for (i, s) in Signal::ALL.into_iter().enumerate() {
        if let (true, Some(settings)) = (wanted(s), &cfg.transport(s).tls) {
            out[i] = Some(Tls::load(settings)?);
        }
    }
    Ok(out)
}

/// The transport and, when a flag gave it, the endpoint; headers, timeouts
/// and the endpoint variables are left to the SDK, which reads them itself.
fn transport<B: WithExportConfig>(b: B, cfg: &ExportConfig, signal: Signal) -> B {
    let b = b.with_protocol(match cfg.protocol {
        Protocol::Grpc => opentelemetry_otlp::Protocol::Grpc,
        Protocol::HttpProtobuf => opentelemetry_otlp::Protocol::HttpBinary,
    });
    match cfg.signal_endpoint(signal.http_path()) {
        Some(url) => b.with_endpoint(url),
        None => b,
    }
}

/// gRPC: tonic's TLS when the signal uses it.
fn grpc<B: WithExportConfig + WithTonicConfig>(
    b: B,
    cfg: &ExportConfig,
    signal: Signal,
    tls: Option<&Tls>,
) -> B {
    let b = transport(b, cfg, signal);
    match tls {
        Some(t) => b.with_tls_config(t.tonic()),
        None => b,
    }
}

/// HTTP: ktrace's client (TLS, or the SDK's plain one), keeping the cause
/// of failures in `last_error`.
fn http<B: WithExportConfig + WithHttpConfig>(
    b: B,
    cfg: &ExportConfig,
    signal: Signal,
    tls: Option<&Tls>,
    last_error: LastError,
) -> B {
    let b = transport(b, cfg, signal);
    let timeout = cfg.transport(signal).timeout;
    match tls {
        Some(t) => b.with_http_client(t.http_client(timeout, last_error)),
        None => b.with_http_client(tls::Explained {
            inner: opentelemetry_http::hyper::HyperClient::with_default_connector(timeout, None),
            last_error,
        }),
    }
}

/// Builds the OTLP exporters (inside the thread's runtime: gRPC channels
/// are created lazily on it).
fn build_exporters(
    cfg: &ExportConfig,
    tls: &SignalTls,
    last_errors: &[LastError; 2],
) -> Result<Exporters, String> {
    use opentelemetry_otlp::{LogExporter, MetricExporter};
    let (m, l) = (Signal::Metrics as usize, Signal::Logs as usize);
    let logs = if cfg.signals.logs {
        let b = LogExporter::builder();
        let (tls, last) = (tls[l].as_ref(), last_errors[l].clone());
        let built = match cfg.protocol {
            Protocol::Grpc => grpc(b.with_tonic(), cfg, Signal::Logs, tls).build(),
            Protocol::HttpProtobuf => http(b.with_http(), cfg, Signal::Logs, tls, last).build(),
        };
        Some(built.map_err(|e| format!("log exporter: {e}"))?)
    } else {
        None
    };
    let metrics = if cfg.signals.metrics {
        let b = MetricExporter::builder().with_temporality(Temporality::Cumulative);
        let (tls, last) = (tls[m].as_ref(), last_errors[m].clone());
        let built = match cfg.protocol {
            Protocol::Grpc => grpc(b.with_tonic(), cfg, Signal::Metrics, tls).build(),
            Protocol::HttpProtobuf => http(b.with_http(), cfg, Signal::Metrics, tls, last).build(),
        };
        Some(built.map_err(|e| format!("metric exporter: {e}"))?)
    } else {
        None
    };
    Ok((logs, metrics))
}

fn signal_index(signal: &str) -> usize {
    usize::from(signal == "logs")
}

/// A short, one-line reason from an export error: TLS failures in plain
/// words (from the HTTP client's own cause when it kept one), else the
/// SDK's text.
fn reason(e: &OTelSdkError, http_cause: Option<String>) -> String {
    let s = e.to_string();
    if let Some(plain) = tls::explain(&s).or_else(|| http_cause.as_deref().and_then(tls::explain)) {
        return plain;
    }
    let s = match http_cause {
        Some(cause) if s.contains("network error") => format!("{s}: {cause}"),
        _ => s,
    };
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.len() > 300 {
        let mut end = 300;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s
    }
}

impl Worker {
    fn new(
        cfg: ExportConfig,
        tls: SignalTls,
        res: Resource,
        rx: mpsc::Receiver<Msg>,
        shared: Arc<Shared>,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Worker, String> {
        let last_errors: [LastError; 2] = Default::default();
        let (log_exporter, metric_exporter) = build_exporters(&cfg, &tls, &last_errors)?;
        let log_exporter = log_exporter.map(|mut x| {
            x.set_resource(&res);
            Arc::new(x)
        });
        let collected = Arc::new(Mutex::new(Vec::new()));
        let provider = SdkLoggerProvider::builder()
            .with_resource(res)
            .with_log_processor(Collect(collected.clone()))
            .build();
        let scope = scope();
        let logger = provider.logger_with_scope(scope.clone());
        Ok(Worker {
            rx,
            shared,
            metrics,
            log_exporter,
            metric_exporter: metric_exporter.map(Arc::new),
            _logger_provider: provider,
            logger,
            collected,
            scope: Arc::new(scope),
            pending: VecDeque::new(),
            in_flight: 0,
            log_backoff: Backoff::new(),
            metric_backoff: Backoff::new(),
            said: Default::default(),
            last_errors,
            closing: false,
            cfg,
        })
    }

    /// A finding from the pipeline: a log record in the queue, or dropped.
    fn accept(&mut self, msg: Msg) {
        let (f, clock, names) = *msg;
        if self.pending.len() + self.in_flight >= self.cfg.max_queue {
            self.shared.drop_records(1);
            return;
        }
        let mut r = self.logger.create_log_record();
        logs::fill(&mut r, &f, &clock);
        if let Some(n) = &names {
            logs::names(&mut r, n);
        }
        self.logger.emit(r);
        let mut c = self.collected.lock().unwrap_or_else(|e| e.into_inner());
        self.pending.extend(c.drain(..));
    }

    fn start_logs(&mut self) -> Option<LogExport> {
        let exporter = self.log_exporter.clone()?;
        let n = self.pending.len().min(self.cfg.max_batch);
        if n == 0 {
            return None;
        }
        let batch: Vec<SdkLogRecord> = self.pending.drain(..n).collect();
        self.in_flight = n;
        let scope = self.scope.clone();
        Some(Box::pin(async move {
            let refs: Vec<(&SdkLogRecord, &InstrumentationScope)> =
                batch.iter().map(|r| (r, &*scope)).collect();
            let r = exporter.export(LogBatch::new(&refs)).await;
            drop(refs);
            (batch, r)
        }))
    }

    fn start_metrics(&mut self) -> Option<MetricExport> {
        let exporter = self.metric_exporter.clone()?;
        let m = self.metrics.clone()?;
        let mut rm = ResourceMetrics::default();
        if let Err(e) = m.reader.collect(&mut rm) {
            tracing::debug!("collecting metrics: {e}");
            return None;
        }
        Some(Box::pin(async move { exporter.export(&rm).await }))
    }

    fn failed(&mut self, signal: &'static str, e: &OTelSdkError, retry_in: Duration) {
        self.shared.failures.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.export_failed(signal);
        }
        let i = signal_index(signal);
        let http_cause = self.last_errors[i]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let why = reason(e, http_cause);
        self.shared.failing.store(true, Ordering::Relaxed);
        // Both signals usually fail for the same reason: said once.
        let already = self.said.iter().flatten().any(|s| *s == why);
        if already {
            // (Said for the other signal: this one is failing too.)
        } else if self.closing {
            tracing::warn!(
                "OTLP export to {} failed as ktrace stops ({signal}: {why})",
                self.cfg.endpoint
            );
        } else {
            tracing::warn!(
                "OTLP export to {} failing ({signal}: {why}); watching goes on, findings are queued (up to {}) and retried in {:.0?}",
                self.cfg.endpoint,
                self.cfg.max_queue,
                retry_in
            );
        }
        // Bounded: a few distinct reasons per outage at most.
        if !self.said[i].contains(&why) && self.said[i].len() < 8 {
            self.said[i].push(why);
        }
    }

    fn succeeded(&mut self, signal: &'static str) {
        if !std::mem::take(&mut self.said[signal_index(signal)]).is_empty() {
            let dropped = self.shared.dropped.load(Ordering::Relaxed);
            tracing::warn!(
                "OTLP export to {} recovered ({signal}){}",
                self.cfg.endpoint,
                if dropped > 0 {
                    format!("; {dropped} finding log record(s) dropped since start")
                } else {
                    String::new()
                }
            );
        }
        if self.said.iter().all(Vec::is_empty) {
            self.shared.failing.store(false, Ordering::Relaxed);
        }
    }

    /// Handles a finished log export (a failed batch goes back to the head
    /// of the queue); returns when the next may start.
    fn logs_finished(&mut self, (batch, r): (Vec<SdkLogRecord>, OTelSdkResult)) -> Instant {
        self.in_flight = 0;
        match r {
            Ok(()) => {
                let n = batch.len();
                self.shared.exported.fetch_add(n as u64, Ordering::Relaxed);
                if let Some(m) = &self.metrics {
                    m.exported(n as u64);
                }
                self.log_backoff.reset();
                self.succeeded("logs");
                Instant::now()
            }
            Err(e) => {
                for r in batch.into_iter().rev() {
                    self.pending.push_front(r);
                }
                let wait = self.log_backoff.step();
                self.failed("logs", &e, wait);
                Instant::now() + wait
            }
        }
    }

    async fn run(mut self) {
        let mut log_fut: Option<LogExport> = None;
        let mut metric_fut: Option<MetricExport> = None;
        let mut next_logs = Instant::now();
        let mut next_metrics = Instant::now() + self.cfg.metric_interval;
        loop {
            let now = Instant::now();
            if log_fut.is_none() && !self.pending.is_empty() && now >= next_logs {
                log_fut = self.start_logs();
            }
            if metric_fut.is_none() && self.metric_exporter.is_some() && now >= next_metrics {
                metric_fut = self.start_metrics();
                next_metrics = now + self.cfg.metric_interval;
            }
            let mut wake = next_metrics;
            if log_fut.is_none() && !self.pending.is_empty() {
                wake = wake.min(next_logs);
            }
            tokio::select! {
                msg = self.rx.recv() => match msg {
                    Some(m) => {
                        let was_empty = self.pending.is_empty();
                        self.accept(m);
                        if was_empty && next_logs <= Instant::now() {
                            // Batch what comes within the delay.
                            next_logs = Instant::now() + self.cfg.log_delay;
                        }
                        if self.pending.len() >= self.cfg.max_batch && !self.shared.failing.load(Ordering::Relaxed) {
                            next_logs = next_logs.min(Instant::now());
                        }
                    }
                    None => break,
                },
                r = async { log_fut.as_mut().expect("guarded").await }, if log_fut.is_some() => {
                    log_fut = None;
                    let ok = r.1.is_ok();
                    next_logs = self.logs_finished(r);
                    if ok && self.metric_exporter.is_some() && self.metric_backoff.next > BACKOFF_FIRST {
                        // The endpoint is back: send the metrics now too.
                        next_metrics = Instant::now();
                    }
                }
                r = async { metric_fut.as_mut().expect("guarded").await }, if metric_fut.is_some() => {
                    metric_fut = None;
                    match r {
                        Ok(()) => {
                            self.metric_backoff.reset();
                            self.succeeded("metrics");
                            if !self.pending.is_empty() && log_fut.is_none() {
                                next_logs = next_logs.min(Instant::now());
                            }
                        }
                        Err(e) => {
                            let wait = self.metric_backoff.step().min(self.cfg.metric_interval);
                            self.failed("metrics", &e, wait);
                            next_metrics = Instant::now() + wait;
                        }
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
        self.finish(log_fut, metric_fut).await;
    }

    /// The channel closed (shutdown): last metrics, queued records, until the deadline.
    async fn finish(mut self, log_fut: Option<LogExport>, metric_fut: Option<MetricExport>) {
        self.closing = true;
        let deadline = self
            .shared
            .deadline
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3));
        let work = async {
            if let Some(f) = metric_fut {
                let _ = f.await;
            }
            if let Some(f) = log_fut {
                let r = f.await;
                let _ = self.logs_finished(r);
            }
            while let Some(f) = self.start_logs() {
                let r = f.await;
                let ok = r.1.is_ok();
                let _ = self.logs_finished(r);
                if !ok {
                    break;
                }
            }
            // Last, so that the final counters include the records above.
            if !self.pending.is_empty() {
                self.shared.drop_records(self.pending.len() as u64);
                self.pending.clear();
            }
            if let Some(f) = self.start_metrics() {
                match f.await {
                    Ok(()) => self.succeeded("metrics"),
                    Err(e) => self.failed("metrics", &e, Duration::ZERO),
                }
            }
        };
        let _ = tokio::time::timeout_at(deadline.into(), work).await;
        // What could not be sent now never will be.
        let left = self.pending.len() + self.in_flight;
        self.shared.drop_records(left as u64);
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::finding::{Evidence, Time, UnnatedBasis, UnnatedPath, UnnatedReply};
    use crate::engine::Severity;
    use crate::event::{EventBody, Source};
    use crate::export::{Detected, ExportFlags, Signals};

    /// An endpoint nobody listens on (127.0.0.1, a port just freed).
    fn dead_endpoint() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    }

    #[test]
    fn a_dead_endpoint_never_blocks_and_every_drop_is_counted() {
        let flags = ExportFlags {
            endpoint: Some(dead_endpoint()),
            protocol: Some(crate::export::Protocol::Grpc),
            node_name: None,
        };
        let env = |k: &str| match k {
            "OTEL_BLRP_MAX_QUEUE_SIZE" => Some("2".to_string()),
            "OTEL_BLRP_SCHEDULE_DELAY" => Some("10".to_string()),
            "OTEL_METRIC_EXPORT_INTERVAL" => Some("100".to_string()),
            _ => None,
        };
        let signals = Signals {
            metrics: true,
            logs: true,
        };
        let cfg = ExportConfig::resolve(&flags, &env, &Detected::default(), signals)
            .unwrap()
            .unwrap();
        let x = Exporter::start(cfg).unwrap();
        let f = Finding {
            ts_ns: 1,
            severity: Severity::Error,
            service: Some("10.96.0.10:2222".parse().unwrap()),
            backend: Some("10.0.1.2:2222".parse().unwrap()),
            client: Some("10.0.0.2:40000".parse().unwrap()),
            cause: "INVALID".into(),
            remedy: "r".into(),
            evidence: Evidence::UnnatedReply(UnnatedReply {
                basis: vec![UnnatedBasis::ClientRstToBackendAddress],
                rst_reason: None,
                verdict: None,
                first: Time::Mono(1),
                count: 1,
                ct_invalid_counter_rise: None,
                path: UnnatedPath::ReplyToClient,
                snat: None,
            }),
        };
        let ev = Event {
            ts_ns: 1,
            netns: 0,
            source: Source::Tracepoint,
            body: EventBody::TcpSendReset {
                src: "10.0.0.2:40000".parse().unwrap(),
                dst: "10.0.1.2:2222".parse().unwrap(),
                reason: Some("NO_SOCKET".into()),
                socket: None,
                trigger_flags: None,
            },
        };
        let t = Instant::now();
        for _ in 0..1000 {
            x.event(&ev);
            x.finding(&f);
        }
        // Debug build, shared machine: still far below any network timeout.
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        let start = Instant::now();
        let lost = loop {
            if let Some(l) = x.take_lost() {
                break l;
            }
            assert!(start.elapsed() < Duration::from_secs(5), "no drop reported");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(
            lost.0 >= 998 - CHANNEL as u64 && lost.0 == lost.1,
            "{lost:?}"
        );
        let start = Instant::now();
        while !x.failing() {
            assert!(start.elapsed() < Duration::from_secs(5), "never failed");
            std::thread::sleep(Duration::from_millis(10));
        }
        let t = Instant::now();
        let s = x.shutdown(Duration::from_secs(5));
        // Known down: half a second, not five.
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!(s.exported, 0);
        assert_eq!(s.dropped, 1000, "{s:?}");
        assert_eq!(s.unreported, 1000 - lost.1);
        assert!(s.failures >= 1);
    }
}
