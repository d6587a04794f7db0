//! The `ktrace` command: a thin clap front over the ktrace library.
//! Errors end as one line on stderr and exit status 1; usage errors (any
//! flag clap or its value parsers refuse) exit 2, also on one line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

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
    /// Show a real incident: build network namespaces, break connections there, print ktrace's findings, clean up.
    Demo(DemoArgs),
    /// Attach to the kernel and print findings live until Ctrl-C or --duration.
    Watch(WatchArgs),
    /// Audit this node's conntrack / IPVS / TCP settings and the kernel's hook support.
    Doctor(DoctorArgs),
    /// Record every kernel event to a file (rotated with --rotate-size/--rotate-time) until Ctrl-C or --duration.
    Record(RecordArgs),
    /// Run the correlation over recordings and print what `watch` would have printed.
    Replay(ReplayArgs),
}

/// How findings are printed (`demo`, `watch`, `replay`).
#[derive(Args)]
struct ViewArgs {
    /// JSON Lines on stdout instead of the human view.
    #[arg(long)]
    json: bool,
    /// Print every finding with its explanation and remedy (by default, once per incident group).
    #[arg(long, conflicts_with = "json")]
    explain: bool,
}

#[derive(Args)]
struct DemoArgs {
    #[command(flatten)]
    view: ViewArgs,
}

/// How watch and replay show what they see: the stream (with the events,
/// if asked) or the dashboard.
#[derive(Args)]
struct StreamArgs {
    /// A live dashboard in the terminal (incidents by Service, rates, detail) instead of the stream; in replay, keys step through time; q quits.
    #[arg(long, conflicts_with_all = ["json", "events", "explain"])]
    tui: bool,
    /// Also print every kernel event (in replay, every recorded one).
    #[arg(long)]
    events: bool,
}

#[derive(Args)]
struct WatchArgs {
    #[command(flatten)]
    view: ViewArgs,
    #[command(flatten)]
    stream: StreamArgs,
    /// Also record every event to PATH while watching (see `ktrace record`).
    #[arg(long, value_name = "PATH")]
    record: Option<PathBuf>,
    #[command(flatten)]
    collect: CollectArgs,
    /// Serve /metrics (Prometheus text: the OTLP export's metrics) and /healthz on IP:PORT, or on loopback (127.0.0.1) given PORT alone (none without it)
    #[arg(long, value_name = "[IP:]PORT", value_parser = metrics_addr_arg)]
    metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(Args)]
struct RecordArgs {
    /// The recording; rotated segments are PATH.1 (newest) ... PATH.<keep-1>.
    #[arg(long, short = 'o', value_name = "PATH")]
    output: PathBuf,
    /// JSON Lines on stdout (status, lost events, a closing summary).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    collect: CollectArgs,
}

/// What `watch` and `record` both take: the event source, a recording's
/// rotation, the engine, the export and the names.
#[derive(Args)]
struct CollectArgs {
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    rotation: RotationArgs,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    otlp: OtlpArgs,
    #[command(flatten)]
    names: NamesArgs,
}

impl CollectArgs {
    /// The engine's settings and the name sources, from one read of
    /// kube-proxy's rules.
    fn engine_and_names(
        &self,
    ) -> (
        ktrace::engine::EngineConfig,
        Option<std::sync::Arc<ktrace::names::Names>>,
    ) {
        let rules = ktrace::kube_proxy::KubeProxyRules::read();
        let engine = self.engine.config(rules.mode());
        let names = self.names.start(self.otlp.node_name.as_deref(), &rules);
        (engine, names)
    }
}

/// Kubernetes names of addresses (docs/kubernetes-names.md).
#[derive(Args)]
struct NamesArgs {
    /// Print addresses only: no names from kube-proxy's rules nor from the Kubernetes API.
    #[arg(long)]
    no_kube_names: bool,
    /// Kubeconfig of the Kubernetes API source [default: the Pod's service account, else KUBECONFIG, else ~/.kube/config]
    #[arg(long, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    /// Pods to watch for names: this node's (node), the whole cluster's (cluster: remote clients named too), or none (off)
    #[arg(long, value_name = "WHICH", default_value = "node", value_parser = ["node", "cluster", "off"])]
    kube_pods: String,
}

impl NamesArgs {
    /// Starts the name sources (none with --no-kube-names), the rules'
    /// source from `rules` as read at start.
    fn start(
        &self,
        node_name: Option<&str>,
        rules: &ktrace::kube_proxy::KubeProxyRules,
    ) -> Option<std::sync::Arc<ktrace::names::Names>> {
        use ktrace::names::{kube, rules, Names};
        if self.no_kube_names {
            return None;
        }
        let names = Names::new();
        rules::start(names.clone(), rules, std::time::Duration::from_secs(5));
        let pods = match self.kube_pods.as_str() {
            "cluster" => kube::Pods::Cluster,
            "off" => kube::Pods::Off,
            _ => kube::Pods::Node,
        };
        let node = node_name
            .map(str::to_string)
            .or_else(|| std::env::var("NODE_NAME").ok())
            .unwrap_or_else(ktrace::recording::host_name);
        kube::start(
            names.clone(),
            kube::KubeOptions {
                kubeconfig: self.kubeconfig.clone(),
                pods,
                node,
            },
        );
        Some(names)
    }
}

/// Where `watch` and `record` take events from.
#[derive(Args)]
struct SourceArgs {
    /// Stop after this many seconds (or 90s, 10m, 1h).
    #[arg(long, value_name = "SECS", value_parser = duration_arg, allow_negative_numbers = true)]
    duration: Option<Duration>,
    /// Ring buffer size in MiB (a power of two, at most 2048).
    #[arg(long, value_name = "MIB", default_value_t = 8, value_parser = ring_mb_arg)]
    ring_buffer_mb: u32,
    /// Do not subscribe to ctnetlink for NAT mappings.
    #[arg(long)]
    no_ctnetlink: bool,
    /// Send every reset as an event. By default the kernel counts the resets
    /// that can never be an incident (refused connections, resets sent by a
    /// connection's socket) beyond the first 32 per 100 ms on each CPU, and
    /// reports them as `resets_summarised` events.
    #[arg(long)]
    every_reset: bool,
}

impl SourceArgs {
    fn options(&self) -> ktrace::pipeline::SourceOptions {
        ktrace::pipeline::SourceOptions {
            duration: self.duration,
            ring_buffer_bytes: self.ring_buffer_mb << 20,
            ctnetlink: !self.no_ctnetlink,
            every_reset: self.every_reset,
            exposed: Vec::new(),
            kube_proxy_mode: None,
        }
    }
}

/// Rotation and retention of recordings (docs/recording-format.md).
#[derive(Args)]
struct RotationArgs {
    /// Start a new segment before the current one exceeds SIZE (MiB; or 512K, 100M, 1G).
    #[arg(long, value_name = "SIZE", value_parser = rotate_size_arg)]
    rotate_size: Option<u64>,
    /// Start a new segment when the current one is this old (seconds; or 90m, 6h, 1d).
    #[arg(long, value_name = "SECS", value_parser = rotate_time_arg)]
    rotate_time: Option<Duration>,
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
    #[command(flatten)]
    view: ViewArgs,
    #[command(flatten)]
    stream: StreamArgs,
    /// Print nothing from before this time (RFC 3339, e.g. 2026-01-02T03:04:05Z).
    #[arg(long, value_name = "TIME", value_parser = ktrace::replay::parse_rfc3339)]
    since: Option<i128>,
    /// Stop at this time (RFC 3339).
    #[arg(long, value_name = "TIME", value_parser = ktrace::replay::parse_rfc3339)]
    until: Option<i128>,
    /// Override the recorded rst_storm threshold.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    storm_threshold: Option<u32>,
    /// Override the recorded rst_storm window, in seconds.
    #[arg(long, value_name = "SECS", value_parser = window_arg, allow_negative_numbers = true)]
    storm_window: Option<Duration>,
    #[command(flatten)]
    otlp: OtlpArgs,
}

/// OTLP export to an OpenTelemetry Collector or Grafana Alloy (docs/otlp.md).
#[derive(Args)]
struct OtlpArgs {
    /// Export metrics and findings over OTLP to URL: http[s]://HOST:4317 (gRPC) or http[s]://HOST:4318 (HTTP); TLS files from OTEL_EXPORTER_OTLP_CERTIFICATE etc. [env: OTEL_EXPORTER_OTLP_ENDPOINT]
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// grpc or http/protobuf [default: grpc for port 4317, else http/protobuf; env: OTEL_EXPORTER_OTLP_PROTOCOL]
    #[arg(long, value_name = "PROTOCOL", value_parser = ktrace::export::Protocol::parse)]
    otlp_protocol: Option<ktrace::export::Protocol>,
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
            protocol: self.otlp_protocol,
            node_name: self.node_name.clone(),
        };
        let detected = detected.unwrap_or_else(Detected::this_host);
        let cfg = ExportConfig::resolve(&flags, &|k| std::env::var(k).ok(), &detected, signals)?;
        match cfg.map(Exporter::start).transpose() {
            // A TLS file missing or unusable: said once; the command itself
            // goes on (a DaemonSet keeps watching while the Secret is fixed).
            Err(e @ ktrace::export::ExportError::Tls(_)) => {
                eprintln!("ktrace: {e}; going on without OTLP export");
                Ok(None)
            }
            r => Ok(r?),
        }
    }

    /// The resource attributes an export would carry (`--node-name`,
    /// `NODE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, ...), for the metrics
    /// endpoint when no OTLP endpoint is given.
    fn resource(&self) -> anyhow::Result<Vec<(String, String)>> {
        let flags = ktrace::export::ExportFlags {
            endpoint: None,
            protocol: None,
            node_name: self.node_name.clone(),
        };
        let var = |k: &str| {
            std::env::var(k)
                .ok()
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        Ok(ktrace::export::config::resource_attributes(
            &flags,
            &var,
            &ktrace::export::Detected::this_host(),
        )?)
    }
}

/// Tunables of the correlation engine.
#[derive(Args)]
struct EngineArgs {
    /// Resets tied to one service within --storm-window that make an rst_storm.
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    storm_threshold: u32,
    /// Window of the rst_storm rate, in seconds.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = window_arg, allow_negative_numbers = true)]
    storm_window: Duration,
    /// Flows tracked at most (the oldest are evicted beyond).
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    max_flows: usize,
}

impl EngineArgs {
    /// The engine's settings, with kube-proxy's mode as read at start.
    fn config(
        &self,
        kube_proxy_mode: ktrace::engine::KubeProxyMode,
    ) -> ktrace::engine::EngineConfig {
        use ktrace::sysctl;
        ktrace::engine::EngineConfig {
            storm_threshold: self.storm_threshold,
            storm_window_ns: duration_ns(self.storm_window),
            max_flows: self.max_flows.max(16),
            // The node's settings a remedy quotes.
            conntrack_max: sysctl::conntrack_max(),
            ct_timeout_established_s: sysctl::ct_timeout_established_s(),
            keepalive_s: sysctl::keepalive_s(),
            // A remedy's INVALID drop takes its form.
            kube_proxy_mode,
            ..Default::default()
        }
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
    /// Sample the conntrack counters over this many seconds to give rates
    /// (a live audit samples 1 s unless told; 0: totals since boot only).
    #[arg(long, value_name = "SECS", value_parser = sample_arg, allow_negative_numbers = true)]
    sample: Option<Duration>,
    /// Exit 1 on warnings too, not only on failures.
    #[arg(long)]
    warn_fails: bool,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    ktrace::memory::configure();
    init_tracing();
    let result = match cli.command {
        Command::Demo(a) => run_demo(a),
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
                // Errors that quote their source in their own text already said it.
                let cause = cause.to_string();
                if !line.contains(&cause) {
                    line.push_str(&format!(": {cause}"));
                }
            }
            eprintln!("{line}");
            ExitCode::from(1)
        }
    }
}

/// `--help` and `--version` as clap prints them; any other flag error as
/// one line on stderr, exit 2.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
    }
    eprintln!("ktrace: {}", one_line(&e.to_string()));
    ExitCode::from(2)
}

/// clap's message without its "error: " prefix, usage and help hint, on one line.
fn one_line(text: &str) -> String {
    text.lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
        .trim_start_matches("error: ")
        .to_string()
}

/// A usage error found after parsing (flags that only make sense together).
fn usage_conflict(msg: &str) -> ! {
    eprintln!("ktrace: {msg}");
    std::process::exit(2)
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KTRACE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours on a terminal only: not as escape codes in `kubectl logs`.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

const ALL_SIGNALS: ktrace::export::Signals = ktrace::export::Signals {
    metrics: true,
    logs: true,
};

fn run_watch(a: WatchArgs) -> anyhow::Result<ExitCode> {
    if a.record.is_none() && (a.collect.rotation.given() || a.collect.rotation.zstd_level != 3) {
        usage_conflict("--rotate-size, --rotate-time, --keep and --zstd-level need --record PATH");
    }
    let (engine, names) = a.collect.engine_and_names();
    let mut opts = ktrace::watch::WatchOptions {
        source: ktrace::pipeline::SourceOptions {
            kube_proxy_mode: Some(engine.kube_proxy_mode),
            ..a.collect.source.options()
        },
        engine,
        json: a.view.json,
        events: a.stream.events,
        record: a.record.clone().map(|p| a.collect.rotation.config(p)),
        export: None,
        names,
        explain: a.view.explain,
        tui: a.stream.tui,
    };
    opts.export = a.collect.otlp.start(ALL_SIGNALS, None)?;
    if let Some(addr) = a.metrics_addr {
        let x = match opts.export.take() {
            Some(x) => x,
            None => ktrace::export::Exporter::metrics_only(&a.collect.otlp.resource()?),
        };
        let ep = x.serve_metrics(addr)?;
        opts.source.exposed = ["metrics", "healthz"]
            .map(|p| format!("http://{}/{p}", ep.local_addr))
            .to_vec();
        opts.export = Some(x);
    }
    ktrace::watch::run(opts)?;
    Ok(ExitCode::SUCCESS)
}

fn run_demo(a: DemoArgs) -> anyhow::Result<ExitCode> {
    use ktrace::demo::{DemoOptions, Outcome};
    Ok(
        match ktrace::demo::run(DemoOptions {
            json: a.view.json,
            explain: a.view.explain,
        })? {
            Outcome::Complete => ExitCode::SUCCESS,
            // As a shell reports a command stopped by SIGINT.
            Outcome::Interrupted => ExitCode::from(130),
        },
    )
}

fn run_record(a: RecordArgs) -> anyhow::Result<ExitCode> {
    let (engine, names) = a.collect.engine_and_names();
    let report = ktrace::record::record(ktrace::record::RecordOptions {
        source: ktrace::pipeline::SourceOptions {
            kube_proxy_mode: Some(engine.kube_proxy_mode),
            ..a.collect.source.options()
        },
        rotation: a.collect.rotation.config(a.output.clone()),
        json: a.json,
        engine,
        names,
        // No engine runs while recording: the event counters only.
        export: a.collect.otlp.start(
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
    if let (Some(s), Some(u)) = (a.since, a.until) {
        if s > u {
            usage_conflict("--since is after --until: nothing to replay");
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
        json: a.view.json,
        events: a.stream.events,
        since: a.since,
        until: a.until,
        storm_threshold: a.storm_threshold,
        storm_window_ns: a.storm_window.map(duration_ns),
        plain: ktrace::incident::plain::PlainOptions::for_stdout(a.view.explain),
        timeline: None,
    };
    if a.stream.tui {
        if export.is_some() {
            usage_conflict("--tui shows the recording; export it without --tui");
        }
        ktrace::replay::run_dashboard(&opts)?;
        return Ok(ExitCode::SUCCESS);
    }
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

// Flag values: checked by clap, so a bad one is a usage error (exit 2).

/// `--metrics-addr`: `IP:PORT` (`[v6]:PORT`) as given; `PORT` or `:PORT`
/// alone on loopback, so nothing is reachable from the network unless an
/// address says so.
fn metrics_addr_arg(s: &str) -> Result<std::net::SocketAddr, String> {
    let t = s.trim();
    let port = t.strip_prefix(':').unwrap_or(t);
    if let Ok(port) = port.parse::<u16>() {
        return Ok((std::net::Ipv4Addr::LOCALHOST, port).into());
    }
    t.parse().map_err(|_| {
        format!("{s:?} is not IP:PORT or PORT (e.g. 9464 for loopback, 0.0.0.0:9464 for every interface)")
    })
}

/// `--ring-buffer-mb`: the kernel wants a power-of-two ring; 2048 MiB is
/// the largest that fits its u32 size.
fn ring_mb_arg(s: &str) -> Result<u32, String> {
    let mb: u32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of MiB"))?;
    if !mb.is_power_of_two() || mb > 2048 {
        return Err("must be a power of two from 1 to 2048".into());
    }
    Ok(mb)
}

/// `--rotate-size`: MiB without a unit, else K, M, G (powers of 1024; KiB, MB, ... too).
fn rotate_size_arg(s: &str) -> Result<u64, String> {
    const MIN: u64 = 4 << 10;
    const MAX: u64 = 1 << 50;
    let bytes = parse_size::Config::new()
        .with_binary()
        .with_default_factor(1 << 20)
        .parse_size(s.trim())
        .map_err(|e| format!("{s:?} is not a size ({e}; e.g. 100, 100M, 512K, 1G)"))?;
    if !(MIN..=MAX).contains(&bytes) {
        return Err("must be between 4K and 1P".into());
    }
    Ok(bytes)
}

/// A number of seconds (fractions allowed) or a humantime duration
/// (`90s`, `10m`, `6h`, `1d`, `1h 30m`), within `min..=max` seconds.
fn seconds_in(s: &str, min: f64, max: f64, what: &str) -> Result<Duration, String> {
    let t = s.trim();
    let d = match t.parse::<f64>() {
        Ok(secs) if (min..=max).contains(&secs) => Duration::from_secs_f64(secs),
        Ok(_) => return Err(format!("must be {what}")),
        Err(_) => humantime::parse_duration(t)
            .map_err(|e| format!("{s:?} is not a duration ({e}; e.g. 30, 90s, 10m, 1h)"))?,
    };
    if !(min..=max).contains(&d.as_secs_f64()) {
        return Err(format!("must be {what}"));
    }
    Ok(d)
}

/// `--duration`: how long to run; 0 attaches, prints the status and stops.
fn duration_arg(s: &str) -> Result<Duration, String> {
    seconds_in(s, 0.0, 1e9, "between 0 and 1e9 seconds")
}

fn window_arg(s: &str) -> Result<Duration, String> {
    seconds_in(s, 1e-3, 86400.0, "between 0.001 and 86400 seconds")
}

fn rotate_time_arg(s: &str) -> Result<Duration, String> {
    seconds_in(s, 1.0, 1e9, "between 1 and 1e9 seconds")
}

fn sample_arg(s: &str) -> Result<Duration, String> {
    seconds_in(s, 0.0, 86400.0, "between 0 and 86400 seconds")
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_keep_the_documented_forms() {
        assert_eq!(rotate_size_arg("100"), Ok(100 << 20));
        assert_eq!(rotate_size_arg("512K"), Ok(512 << 10));
        assert_eq!(rotate_size_arg("4K"), Ok(4096));
        assert_eq!(rotate_size_arg("100M"), Ok(100 << 20));
        assert_eq!(rotate_size_arg("1G"), Ok(1 << 30));
        assert_eq!(rotate_size_arg("1.5g"), Ok(3 << 29));
        assert!(rotate_size_arg("1K")
            .unwrap_err()
            .contains("between 4K and 1P"));
        assert!(rotate_size_arg("2E")
            .unwrap_err()
            .contains("between 4K and 1P"));
        assert!(rotate_size_arg("10X").unwrap_err().contains("not a size"));
    }

    #[test]
    fn durations_take_seconds_or_units() {
        assert_eq!(rotate_time_arg("3600"), Ok(Duration::from_secs(3600)));
        assert_eq!(rotate_time_arg("90m"), Ok(Duration::from_secs(5400)));
        assert_eq!(rotate_time_arg("6h"), Ok(Duration::from_secs(21600)));
        assert_eq!(rotate_time_arg("1d"), Ok(Duration::from_secs(86400)));
        assert_eq!(duration_arg("0"), Ok(Duration::ZERO));
        assert_eq!(sample_arg("0.2"), Ok(Duration::from_millis(200)));
        assert_eq!(window_arg("5"), Ok(Duration::from_secs(5)));
        for bad in ["-1", "nan", "inf", "soon", ""] {
            assert!(duration_arg(bad).is_err(), "{bad}");
        }
        assert!(rotate_time_arg("0.5").is_err());
        assert!(window_arg("0").is_err());
        assert!(sample_arg("2d").is_err());
    }

    #[test]
    fn metrics_addr_defaults_to_loopback() {
        let a = |s: &str| metrics_addr_arg(s).map(|a| a.to_string());
        assert_eq!(a("9464").unwrap(), "127.0.0.1:9464");
        assert_eq!(a(":9464").unwrap(), "127.0.0.1:9464");
        assert_eq!(a("0.0.0.0:9464").unwrap(), "0.0.0.0:9464");
        assert_eq!(a("10.1.2.3:80").unwrap(), "10.1.2.3:80");
        assert_eq!(a("[::1]:9464").unwrap(), "[::1]:9464");
        for bad in ["", "x", "70000", "1.2.3.4", "host:80"] {
            assert!(a(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ring_sizes_are_powers_of_two() {
        assert_eq!(ring_mb_arg("8"), Ok(8));
        assert_eq!(ring_mb_arg("2048"), Ok(2048));
        for bad in ["0", "3", "4096", "-8", "x"] {
            assert!(ring_mb_arg(bad).is_err(), "{bad}");
        }
    }
}
