//! The `ktrace` command: a thin clap front over the ktrace library.
//! Errors end as one line on stderr and exit status 1; usage errors exit 2.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ktrace",
    version,
    about = "Names the incidents behind Kubernetes Service connection resets, from the kernel"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach to the kernel and print findings live until Ctrl-C or --duration.
    Watch(WatchArgs),
    /// Audit this node's conntrack / IPVS / TCP settings and the kernel's hook support.
    Doctor(DoctorArgs),
    /// Record every kernel event to a file (rotated with --rotate-size/--rotate-time) until Ctrl-C or --duration.
    Record(RecordArgs),
    /// Run the correlation over recordings and print what `watch` would have printed.
    Replay(ReplayArgs),
}

#[derive(Args)]
struct WatchArgs {
    /// JSON Lines on stdout instead of the human view.
    #[arg(long)]
    json: bool,
    /// Also print every decoded kernel event.
    #[arg(long)]
    events: bool,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Ring buffer size in MiB (a power of two).
    #[arg(long, value_name = "MIB", default_value_t = 8)]
    ring_buffer_mb: u32,
    /// Do not subscribe to ctnetlink for NAT mappings.
    #[arg(long)]
    no_ctnetlink: bool,
    /// Also record every event to PATH while watching (see `ktrace record`).
    #[arg(long, value_name = "PATH")]
    record: Option<PathBuf>,
    #[command(flatten)]
    rotation: RotationArgs,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    otlp: OtlpArgs,
}

#[derive(Args)]
struct RecordArgs {
    /// The recording; rotated segments are PATH.1 (newest) ... PATH.<keep-1>.
    #[arg(long, short = 'o', value_name = "PATH")]
    output: PathBuf,
    /// JSON Lines on stdout (status, lost events, a closing summary).
    #[arg(long)]
    json: bool,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Ring buffer size in MiB (a power of two).
    #[arg(long, value_name = "MIB", default_value_t = 8)]
    ring_buffer_mb: u32,
    /// Do not subscribe to ctnetlink for NAT mappings.
    #[arg(long)]
    no_ctnetlink: bool,
    #[command(flatten)]
    rotation: RotationArgs,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    otlp: OtlpArgs,
}

/// Rotation and retention of recordings (docs/recording-format.md).
#[derive(Args)]
struct RotationArgs {
    /// Start a new segment before the current one exceeds SIZE (MiB; or 512K, 100M, 1G).
    #[arg(long, value_name = "SIZE", value_parser = ktrace::recording::parse_size)]
    rotate_size: Option<u64>,
    /// Start a new segment when the current one is this old (seconds; or 90m, 6h, 1d).
    #[arg(long, value_name = "SECS", value_parser = ktrace::recording::parse_duration)]
    rotate_time: Option<std::time::Duration>,
    /// Files kept, the current one included [default: 8 with rotation, else 1].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    keep: Option<u32>,
    /// zstd level of the blocks (0 stores them uncompressed).
    #[arg(long, value_name = "LEVEL", default_value_t = 3, value_parser = clap::value_parser!(i32).range(0..=19))]
    zstd_level: i32,
}

impl RotationArgs {
    fn given(&self) -> bool {
        self.rotate_size.is_some() || self.rotate_time.is_some() || self.keep.is_some()
    }

    fn config(&self, path: PathBuf) -> ktrace::recording::RotationConfig {
        let mut cfg = ktrace::recording::RotationConfig::new(path);
        cfg.rotate_bytes = self.rotate_size;
        cfg.rotate_time = self.rotate_time;
        let rotates = self.rotate_size.is_some() || self.rotate_time.is_some();
        cfg.keep = self
            .keep
            .map_or(if rotates { 8 } else { 1 }, |k| k as usize);
        cfg.zstd_level = self.zstd_level;
        cfg
    }
}

#[derive(Args)]
struct ReplayArgs {
    /// Recordings, in any order; PATH of a rotated set brings its PATH.1, PATH.2, ... too.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// JSON Lines on stdout instead of the human view.
    #[arg(long)]
    json: bool,
    /// Also print every recorded event.
    #[arg(long)]
    events: bool,
    /// Print nothing from before this time (RFC 3339, e.g. 2026-01-02T03:04:05Z).
    #[arg(long, value_name = "TIME", value_parser = ktrace::replay::parse_rfc3339)]
    since: Option<i128>,
    /// Stop at this time (RFC 3339).
    #[arg(long, value_name = "TIME", value_parser = ktrace::replay::parse_rfc3339)]
    until: Option<i128>,
    /// Override the recorded rst_storm threshold.
    #[arg(long, value_name = "N")]
    storm_threshold: Option<u32>,
    /// Override the recorded rst_storm window, in seconds.
    #[arg(long, value_name = "SECS")]
    storm_window: Option<f64>,
    #[command(flatten)]
    otlp: OtlpArgs,
}

/// OTLP export to an OpenTelemetry Collector or Grafana Alloy (docs/otlp.md).
#[derive(Args)]
struct OtlpArgs {
    /// Export metrics and findings over OTLP to URL: http://HOST:4317 (gRPC) or http://HOST:4318 (HTTP) [env: OTEL_EXPORTER_OTLP_ENDPOINT]
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// grpc or http/protobuf [default: grpc for port 4317, else http/protobuf; env: OTEL_EXPORTER_OTLP_PROTOCOL]
    #[arg(long, value_name = "PROTOCOL")]
    otlp_protocol: Option<String>,
    /// This node's name, exported as k8s.node.name [env: NODE_NAME]
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
}

impl OtlpArgs {
    /// The exporter, when an endpoint is given (flag or environment).
    fn start(
        &self,
        signals: ktrace::export::Signals,
        detected: Option<ktrace::export::Detected>,
    ) -> anyhow::Result<Option<ktrace::export::Exporter>> {
        use ktrace::export::{Detected, ExportConfig, ExportFlags, Exporter};
        let flags = ExportFlags {
            endpoint: self.otlp_endpoint.clone(),
            protocol: self.otlp_protocol.clone(),
            node_name: self.node_name.clone(),
        };
        let detected = detected.unwrap_or_else(Detected::this_host);
        let cfg = ExportConfig::resolve(&flags, &|k| std::env::var(k).ok(), &detected, signals)?;
        Ok(cfg.map(Exporter::start).transpose()?)
    }
}

/// Tunables of the correlation engine.
#[derive(Args)]
struct EngineArgs {
    /// Resets tied to one service within --storm-window that make an rst_storm.
    #[arg(long, value_name = "N", default_value_t = 20)]
    storm_threshold: u32,
    /// Window of the rst_storm rate, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    storm_window: f64,
    /// Flows tracked at most (the oldest are evicted beyond).
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    max_flows: usize,
}

impl EngineArgs {
    fn config(&self) -> anyhow::Result<ktrace::engine::EngineConfig> {
        if !(self.storm_window > 0.0 && self.storm_window.is_finite()) {
            anyhow::bail!("--storm-window must be a positive number of seconds");
        }
        use ktrace::sysctl;
        Ok(ktrace::engine::EngineConfig {
            storm_threshold: self.storm_threshold.max(1),
            storm_window_ns: (self.storm_window * 1e9) as u64,
            max_flows: self.max_flows.max(16),
            // The node's settings a remedy quotes.
            conntrack_max: sysctl::conntrack_max(),
            ct_timeout_established_s: sysctl::ct_timeout_established_s(),
            keepalive_s: sysctl::keepalive_s(),
            ..Default::default()
        })
    }
}

#[derive(Args)]
struct DoctorArgs {
    /// JSON Lines: one object per check.
    #[arg(long)]
    json: bool,
    /// Read /proc, /sys and /etc under this directory (a dump of another node).
    #[arg(long, value_name = "DIR", default_value = "/")]
    root: PathBuf,
    /// Sample the conntrack counters over this many seconds to give rates.
    #[arg(long, value_name = "SECS", value_parser = parse_sample_secs)]
    sample: Option<std::time::Duration>,
    /// Exit 1 on warnings too, not only on failures.
    #[arg(long)]
    warn_fails: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let result = match cli.command {
        Command::Watch(a) => run_watch(a),
        Command::Doctor(a) => run_doctor(a),
        Command::Record(a) => run_record(a),
        Command::Replay(a) => run_replay(a),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            // One line: the error and its causes, then what to do.
            let mut line = format!("ktrace: {err}");
            for cause in err.chain().skip(1) {
                line.push_str(&format!(": {cause}"));
            }
            eprintln!("{line}");
            ExitCode::from(1)
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KTRACE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

const ALL_SIGNALS: ktrace::export::Signals = ktrace::export::Signals {
    metrics: true,
    logs: true,
};

fn run_watch(a: WatchArgs) -> anyhow::Result<ExitCode> {
    if let Some(d) = a.duration {
        if !(d >= 0.0 && d.is_finite()) {
            anyhow::bail!("--duration must be a non-negative number of seconds");
        }
    }
    let mut opts = ktrace::watch::WatchOptions {
        engine: a.engine.config()?,
        json: a.json,
        events: a.events,
        duration: a.duration.map(std::time::Duration::from_secs_f64),
        ring_buffer_bytes: a.ring_buffer_mb.saturating_mul(1 << 20),
        ctnetlink: !a.no_ctnetlink,
        record: a.record.clone().map(|p| a.rotation.config(p)),
        export: None,
    };
    if a.record.is_none() && (a.rotation.given() || a.rotation.zstd_level != 3) {
        use clap::CommandFactory as _;
        Cli::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "--rotate-size, --rotate-time, --keep and --zstd-level need --record PATH",
            )
            .exit();
    }
    opts.export = a.otlp.start(ALL_SIGNALS, None)?;
    ktrace::watch::run(opts)?;
    Ok(ExitCode::SUCCESS)
}

fn run_record(a: RecordArgs) -> anyhow::Result<ExitCode> {
    if let Some(d) = a.duration {
        if !(d >= 0.0 && d.is_finite()) {
            anyhow::bail!("--duration must be a non-negative number of seconds");
        }
    }
    let report = ktrace::record::record(ktrace::record::RecordOptions {
        source: ktrace::pipeline::SourceOptions {
            duration: a.duration.map(std::time::Duration::from_secs_f64),
            ring_buffer_bytes: a.ring_buffer_mb.saturating_mul(1 << 20),
            ctnetlink: !a.no_ctnetlink,
        },
        rotation: a.rotation.config(a.output.clone()),
        json: a.json,
        engine: a.engine.config()?,
        // No engine runs while recording: the event counters only.
        export: a.otlp.start(
            ktrace::export::Signals {
                metrics: true,
                logs: false,
            },
            None,
        )?,
    })?;
    if !a.json {
        let s = &report.summary;
        eprintln!(
            "ktrace: recorded {} events in {} blocks ({} bytes) to {}{}",
            s.events,
            s.blocks,
            s.bytes,
            s.files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            if s.dropped > 0 {
                format!(
                    "; {} events not recorded (disk full or too slow)",
                    s.dropped
                )
            } else {
                String::new()
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn run_replay(a: ReplayArgs) -> anyhow::Result<ExitCode> {
    if let Some(w) = a.storm_window {
        if !(w > 0.0 && w.is_finite()) {
            anyhow::bail!("--storm-window must be a positive number of seconds");
        }
    }
    if let (Some(s), Some(u)) = (a.since, a.until) {
        if s > u {
            anyhow::bail!("--since is after --until: nothing to replay");
        }
    }
    // Back-fill: findings as log records with their recorded times, from
    // the recorded host; no metrics (cumulative counters cannot be dated).
    let export = a.otlp.start(
        ktrace::export::Signals {
            metrics: false,
            logs: true,
        },
        ktrace::export::Detected::from_recordings(&a.paths),
    )?;
    let opts = ktrace::replay::ReplayOptions {
        paths: a.paths,
        json: a.json,
        events: a.events,
        since: a.since,
        until: a.until,
        storm_threshold: a.storm_threshold,
        storm_window_ns: a.storm_window.map(|w| (w * 1e9) as u64),
    };
    match ktrace::replay::run_exporting(&opts, export.as_ref()) {
        Ok(_) => Ok(ExitCode::SUCCESS),
        // A closed pipe (`ktrace replay ... | head`) is not an error of ours.
        Err(ktrace::replay::ReplayError::Output(e))
            if e.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(e.into()),
    }
}

fn run_doctor(a: DoctorArgs) -> anyhow::Result<ExitCode> {
    use anyhow::Context as _;
    if !a.root.is_dir() {
        anyhow::bail!(
            "--root {}: not a directory; give / or a dump captured as docs/doctor.md describes",
            a.root.display()
        );
    }
    let report = ktrace::doctor::run(&ktrace::doctor::Options {
        root: a.root,
        sample: a.sample,
    });
    let mut out = std::io::stdout().lock();
    let written = if a.json {
        ktrace::doctor::render::json_lines(&report, &mut out)
    } else {
        ktrace::doctor::render::human(&report, &mut out)
    };
    match written {
        Ok(()) => {}
        // A closed pipe (`ktrace doctor | head`) is not an error of ours.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(e) => return Err(e).context("writing the report"),
    }
    Ok(if report.failed(a.warn_fails) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `--sample SECS`: a non-negative, finite number of seconds (at most a day).
fn parse_sample_secs(s: &str) -> Result<std::time::Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(0.0..=86400.0).contains(&secs) {
        return Err("must be between 0 and 86400 seconds".into());
    }
    std::time::Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}
