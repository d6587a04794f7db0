//! What the OTLP export is told: `--otlp-endpoint`, `--otlp-protocol`,
//! `--node-name` and the standard `OTEL_*` variables, resolved once into an
//! [`ExportConfig`]. Pure: the environment comes in as a lookup function,
//! so the rules are unit-tested without touching the process environment.
//!
//! The opentelemetry-otlp exporters read the rest of the variables
//! themselves: `OTEL_EXPORTER_OTLP_{,LOGS_,METRICS_}ENDPOINT` (when no flag
//! gives one), `..._HEADERS`, `..._TIMEOUT` and `..._COMPRESSION`. Only what
//! the SDK lacks is here, each with the reason.
//!
//! Precedence (highest first):
//! - endpoint: `--otlp-endpoint` (used for both signals, `/v1/metrics` and
//!   `/v1/logs` appended for HTTP), then the variables as the SDK reads
//!   them. No endpoint anywhere: no export (the SDK would send to localhost).
//! - protocol: `--otlp-protocol`, `OTEL_EXPORTER_OTLP_PROTOCOL`; else `grpc`
//!   when the endpoint's port is 4317, `http/protobuf` otherwise.
//! - TLS, per signal: `https://` endpoints, and for gRPC a `host:port`
//!   without a scheme unless `OTEL_EXPORTER_OTLP_[SIGNAL_]INSECURE=true` (the
//!   SDK applies that rule itself; it is mirrored here to know which
//!   connections need the files). The files, `..._CERTIFICATE`,
//!   `..._CLIENT_CERTIFICATE` and `..._CLIENT_KEY` (the signal's variable,
//!   else the generic one), are only named here; [`super::tls`] reads them.
//! - resource: detected (`host.name`, kernel release, ...), then `NODE_NAME`,
//!   then `OTEL_RESOURCE_ATTRIBUTES`, then `OTEL_SERVICE_NAME`, then `--node-name`.

use std::path::PathBuf;
use std::time::Duration;

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

impl Protocol {
    pub fn parse(s: &str) -> Result<Protocol, ConfigError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "grpc" => Ok(Protocol::Grpc),
            "http/protobuf" | "http" => Ok(Protocol::HttpProtobuf),
            "http/json" => Err(ConfigError(
                "OTLP protocol http/json is not supported: use grpc or http/protobuf".into(),
            )),
            other => Err(ConfigError(format!(
                "unknown OTLP protocol {other:?}: use grpc or http/protobuf"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        }
    }
}

/// A configuration mistake, said in one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// What the command line says about export.
#[derive(Debug, Clone, Default)]
pub struct ExportFlags {
    /// `--otlp-endpoint URL`.
    pub endpoint: Option<String>,
    /// `--otlp-protocol grpc|http/protobuf`.
    pub protocol: Option<Protocol>,
    /// `--node-name NAME` (a DaemonSet passes `spec.nodeName`).
    pub node_name: Option<String>,
}

/// Facts about the machine (or the recording) for the resource.
#[derive(Debug, Clone, Default)]
pub struct Detected {
    pub host_name: String,
    /// `uname -r`.
    pub kernel_release: Option<String>,
}

impl Detected {
    /// This machine.
    pub fn this_host() -> Detected {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        };
        Detected {
            host_name: read("/proc/sys/kernel/hostname").unwrap_or_default(),
            kernel_release: read("/proc/sys/kernel/osrelease"),
        }
    }
}

impl Detected {
    /// The machine a recording was made on (for `replay`'s back-fill): its
    /// host name and kernel, from the first file that opens.
    pub fn from_recordings(paths: &[std::path::PathBuf]) -> Option<Detected> {
        paths.iter().find_map(|p| {
            let r = crate::recording::reader::FileReader::open(p).ok()?;
            let c = r.context();
            Some(Detected {
                host_name: c.host.clone(),
                kernel_release: c.kernel.clone(),
            })
        })
    }
}

/// One exported signal, for its own `OTEL_EXPORTER_OTLP_{SIGNAL}_*` variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Metrics,
    Logs,
}

impl Signal {
    pub const ALL: [Signal; 2] = [Signal::Metrics, Signal::Logs];

    /// `metrics` or `logs`, as messages and the failure counter name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::Metrics => "metrics",
            Signal::Logs => "logs",
        }
    }

    /// The OTLP/HTTP path of the signal.
    pub fn http_path(self) -> &'static str {
        match self {
            Signal::Metrics => "/v1/metrics",
            Signal::Logs => "/v1/logs",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// `OTEL_EXPORTER_OTLP_{SIGNAL}_{what}`, else `OTEL_EXPORTER_OTLP_{what}`:
    /// the name that gave the value, and the value.
    fn lookup(self, var: &dyn Fn(&str) -> Option<String>, what: &str) -> Option<(String, String)> {
        let signal = format!(
            "OTEL_EXPORTER_OTLP_{}_{what}",
            self.as_str().to_ascii_uppercase()
        );
        let generic = format!("OTEL_EXPORTER_OTLP_{what}");
        [signal, generic]
            .into_iter()
            .find_map(|name| var(&name).map(|v| (name, v)))
    }
}

/// A PEM file named by a variable (the name is kept for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFile {
    pub var: String,
    pub path: PathBuf,
}

/// What a TLS connection to the collector uses; files not given are absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// `..._CERTIFICATE`: the CA the collector's certificate must chain to
    /// (absent: the Mozilla roots built in).
    pub ca: Option<TlsFile>,
    /// `..._CLIENT_CERTIFICATE` and `..._CLIENT_KEY`: ktrace's own
    /// certificate for mTLS (both or neither; [`super::tls`] says which is missing).
    pub client_cert: Option<TlsFile>,
    pub client_key: Option<TlsFile>,
}

/// How one signal travels.
#[derive(Debug, Clone, PartialEq)]
pub struct Transport {
    /// `None`: plain text (`http://`, or INSECURE for gRPC).
    pub tls: Option<TlsSettings>,
    /// `OTEL_EXPORTER_OTLP_[SIGNAL_]TIMEOUT`: given to the HTTP client ktrace
    /// builds for TLS (the SDK reads it itself otherwise).
    pub timeout: Duration,
    /// Plain text although a TLS file variable is set (say so: the data
    /// goes in clear): that variable's name.
    pub tls_file_unused: Option<String>,
}

/// Which signals are exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signals {
    pub metrics: bool,
    pub logs: bool,
}

/// Everything the exporter needs, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportConfig {
    pub protocol: Protocol,
    /// The endpoint as given (for messages).
    pub endpoint: String,
    /// Whether `--otlp-endpoint` gave it (then it wins over every variable).
    pub endpoint_from_flag: bool,
    /// How often metrics are sent (`OTEL_METRIC_EXPORT_INTERVAL`, ms).
    pub metric_interval: Duration,
    /// How long a finding waits to be batched (`OTEL_BLRP_SCHEDULE_DELAY`, ms).
    pub log_delay: Duration,
    /// Log records held while the endpoint is down (`OTEL_BLRP_MAX_QUEUE_SIZE`).
    pub max_queue: usize,
    /// Log records per request (`OTEL_BLRP_MAX_EXPORT_BATCH_SIZE`).
    pub max_batch: usize,
    /// Resource attributes, in order, keys unique.
    pub resource: Vec<(String, String)>,
    pub signals: Signals,
    /// Per [`Signal`], in [`Signal::ALL`] order.
    pub transports: [Transport; 2],
}

pub const DEFAULT_METRIC_INTERVAL: Duration = Duration::from_secs(15);
pub const DEFAULT_LOG_DELAY: Duration = Duration::from_millis(200);
pub const DEFAULT_MAX_QUEUE: usize = 2048;
pub const DEFAULT_MAX_BATCH: usize = 512;
/// The SDK's default export timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

impl ExportConfig {
    /// Resolves the flags and the environment (`env` looks a variable up).
    /// `Ok(None)`: export is not asked for (no endpoint anywhere, or
    /// `OTEL_SDK_DISABLED=true`).
    pub fn resolve(
        flags: &ExportFlags,
        env: &dyn Fn(&str) -> Option<String>,
        detected: &Detected,
        signals: Signals,
    ) -> Result<Option<ExportConfig>, ConfigError> {
        let var = |k: &str| {
            env(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let flag_endpoint = flags
            .endpoint
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty());
        let (endpoint, from) = match (flag_endpoint, var("OTEL_EXPORTER_OTLP_ENDPOINT")) {
            (Some(e), _) => (e.to_string(), "--otlp-endpoint"),
            (None, Some(e)) => (e, "OTEL_EXPORTER_OTLP_ENDPOINT"),
            (None, None) => return Ok(None),
        };
        let (port, _) = check_url(&endpoint, from)?;
        // The SDK picks a transport from OTEL_EXPORTER_OTLP_PROTOCOL only when
        // built by `build()`, silently falls back on a bad value, and has no
        // default from the port: decided here.
        let protocol = match (flags.protocol, var("OTEL_EXPORTER_OTLP_PROTOCOL")) {
            (Some(p), _) => p,
            (None, Some(p)) => Protocol::parse(&p)
                .map_err(|e| ConfigError(format!("OTEL_EXPORTER_OTLP_PROTOCOL: {e}")))?,
            (None, None) if port == 4317 => Protocol::Grpc,
            (None, None) => Protocol::HttpProtobuf,
        };
        // The batching variables: the SDK's BatchConfig keeps them private and
        // its BatchLogProcessor drops a batch that fails, where ktrace keeps
        // findings queued and retries (exporter.rs); so they are read here.
        let ms = |name: &str, default: Duration| -> Result<Duration, ConfigError> {
            match var(name) {
                None => Ok(default),
                Some(v) => v
                    .parse::<u64>()
                    .ok()
                    .filter(|&n| n > 0)
                    .map(Duration::from_millis)
                    .ok_or_else(|| {
                        ConfigError(format!(
                            "{name}: {v:?} is not a positive number of milliseconds"
                        ))
                    }),
            }
        };
        let count = |name: &str, default: usize| -> Result<usize, ConfigError> {
            match var(name) {
                None => Ok(default),
                Some(v) => v
                    .parse::<usize>()
                    .ok()
                    .filter(|&n| (1..=1_000_000).contains(&n))
                    .ok_or_else(|| {
                        ConfigError(format!(
                            "{name}: {v:?} is not a count between 1 and 1000000"
                        ))
                    }),
            }
        };
        let transports = Signal::ALL.map(|signal| {
            // The URL this signal goes to, as the SDK picks it.
            let (url, from) = match flag_endpoint {
                Some(e) => (e.to_string(), "--otlp-endpoint".to_string()),
                None => match signal.lookup(&var, "ENDPOINT") {
                    Some((name, url)) => (url, name),
                    None => (endpoint.clone(), from.to_string()),
                },
            };
            transport(signal, &url, &from, protocol, &var, &ms)
        });
        let [metrics_transport, logs_transport] = transports;
        let transports = [metrics_transport?, logs_transport?];
        let max_queue = count("OTEL_BLRP_MAX_QUEUE_SIZE", DEFAULT_MAX_QUEUE)?;
        let max_batch = count("OTEL_BLRP_MAX_EXPORT_BATCH_SIZE", DEFAULT_MAX_BATCH)?.min(max_queue);

        Ok(Some(ExportConfig {
            protocol,
            endpoint,
            endpoint_from_flag: flag_endpoint.is_some(),
            metric_interval: ms("OTEL_METRIC_EXPORT_INTERVAL", DEFAULT_METRIC_INTERVAL)?,
            log_delay: ms("OTEL_BLRP_SCHEDULE_DELAY", DEFAULT_LOG_DELAY)?,
            max_queue,
            max_batch,
            resource: resource_attributes(flags, &var, detected)?,
            signals,
            transports,
        }))
    }

    /// The URL to give the SDK's exporter for one signal (`path` is
    /// `/v1/metrics` or `/v1/logs`): the flag's, or `None` to let the SDK
    /// read the variables.
    pub fn signal_endpoint(&self, path: &str) -> Option<String> {
        if !self.endpoint_from_flag {
            return None;
        }
        Some(match self.protocol {
            Protocol::Grpc => self.endpoint.clone(),
            Protocol::HttpProtobuf => format!("{}{path}", self.endpoint.trim_end_matches('/')),
        })
    }

    /// How `signal` travels.
    pub fn transport(&self, signal: Signal) -> &Transport {
        &self.transports[signal.index()]
    }

    pub fn resource_value(&self, key: &str) -> Option<&str> {
        self.resource
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// An endpoint's scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Http,
    Https,
    /// `host:port`: TLS unless INSECURE (gRPC only).
    None,
}

/// Checks an endpoint URL: `http[s]://host[:port][/path]` or `host:port`;
/// returns its port and scheme. (The SDK would only fail at the first export.)
fn check_url(url: &str, from: &str) -> Result<(u16, Scheme), ConfigError> {
    let bad = |why: &str| ConfigError(format!("{from}: {url:?} {why}"));
    let like = "is not a URL like http://collector:4317 or https://collector:4317";
    let uri: http::Uri = url.parse().map_err(|_| bad(like))?;
    let scheme = match uri.scheme_str() {
        Some("http") => Scheme::Http,
        Some("https") => Scheme::Https,
        None if uri.path_and_query().is_none_or(|p| p.as_str().is_empty()) => Scheme::None,
        _ => return Err(bad(like)),
    };
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or("");
    if uri.host().is_none_or(str::is_empty) || authority.contains('@') {
        return Err(bad("has no host"));
    }
    let port = match uri.port() {
        Some(p) => p
            .as_str()
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| bad("has a malformed port"))?,
        // A port that is not a u16 leaves more than the host in the authority.
        None if Some(authority) != uri.host() => return Err(bad("has a malformed port")),
        None if scheme == Scheme::None => return Err(bad(like)),
        None if scheme == Scheme::Https => 443,
        None => 80,
    };
    Ok((port, scheme))
}

/// How `signal` travels to `url` (named by `from`): TLS or not, which
/// files, which timeout.
fn transport(
    signal: Signal,
    url: &str,
    from: &str,
    protocol: Protocol,
    var: &dyn Fn(&str) -> Option<String>,
    ms: &dyn Fn(&str, Duration) -> Result<Duration, ConfigError>,
) -> Result<Transport, ConfigError> {
    let (_, scheme) = check_url(url, from)?;
    let insecure = || {
        signal
            .lookup(var, "INSECURE")
            .is_some_and(|(_, v)| v.eq_ignore_ascii_case("true"))
    };
    let tls = match scheme {
        Scheme::Http => false,
        Scheme::Https => true,
        Scheme::None if protocol == Protocol::Grpc => !insecure(),
        Scheme::None => {
            return Err(ConfigError(format!(
                "{from}: {url:?} has no scheme: OTLP/HTTP needs http:// or https://"
            )))
        }
    };
    let file = |what: &str| {
        signal.lookup(var, what).map(|(var, path)| TlsFile {
            var,
            path: PathBuf::from(path),
        })
    };
    let timeout = match signal.lookup(var, "TIMEOUT") {
        Some((name, _)) => ms(&name, DEFAULT_TIMEOUT)?,
        None => DEFAULT_TIMEOUT,
    };
    let settings = TlsSettings {
        ca: file("CERTIFICATE"),
        client_cert: file("CLIENT_CERTIFICATE"),
        client_key: file("CLIENT_KEY"),
    };
    let tls_file_unused = match tls {
        true => None,
        false => [&settings.ca, &settings.client_cert, &settings.client_key]
            .into_iter()
            .flatten()
            .map(|f| f.var.clone())
            .next(),
    };
    Ok(Transport {
        tls: tls.then_some(settings),
        timeout,
        tls_file_unused,
    })
}

/// `key1=value1,key2=value2` (W3C baggage-like, values percent-encoded), as
/// `OTEL_RESOURCE_ATTRIBUTES` uses it. Not the SDK's EnvResourceDetector:
/// it does not percent-decode, and cannot be put below OTEL_SERVICE_NAME and
/// --node-name in precedence without also taking its `unknown_service`.
/// Empty members are skipped; a member without `=` or with an empty key is an error.
pub fn parse_key_values(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for member in s.split(',') {
        let member = member.trim();
        if member.is_empty() {
            continue;
        }
        let (k, v) = member
            .split_once('=')
            .ok_or_else(|| format!("{member:?} is not key=value"))?;
        let k = percent_decode(k.trim()).map_err(|e| format!("{member:?}: {e}"))?;
        let v = percent_decode(v.trim()).map_err(|e| format!("{member:?}: {e}"))?;
        if k.is_empty() {
            return Err(format!("{member:?} has an empty key"));
        }
        match out.iter_mut().find(|(ek, _)| *ek == k) {
            Some(e) => e.1 = v,
            None => out.push((k, v)),
        }
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding at byte {i}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent-encoding is not UTF-8".to_string())
}

/// `host.arch` per the semantic conventions.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "x86",
        "powerpc64" => "ppc64",
        "s390x" => "s390x",
        "arm" => "arm32",
        other => other,
    }
}

/// The resource attributes, in order, keys unique (`var` looks a trimmed,
/// non-empty variable up). Public for the metrics endpoint without OTLP.
pub fn resource_attributes(
    flags: &ExportFlags,
    var: &dyn Fn(&str) -> Option<String>,
    detected: &Detected,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut attrs: Vec<(String, String)> = Vec::new();
    let set = |attrs: &mut Vec<(String, String)>, k: &str, v: String| match attrs
        .iter_mut()
        .find(|(ek, _)| ek == k)
    {
        Some(e) => e.1 = v,
        None => attrs.push((k.to_string(), v)),
    };
    set(&mut attrs, "service.name", "ktrace".into());
    set(
        &mut attrs,
        "service.version",
        env!("CARGO_PKG_VERSION").into(),
    );
    if !detected.host_name.is_empty() {
        set(&mut attrs, "host.name", detected.host_name.clone());
    }
    set(&mut attrs, "host.arch", host_arch().into());
    set(&mut attrs, "os.type", "linux".into());
    if let Some(k) = &detected.kernel_release {
        set(&mut attrs, "os.version", k.clone());
    }
    if let Some(n) = var("NODE_NAME") {
        set(&mut attrs, "k8s.node.name", n);
    }
    if let Some(r) = var("OTEL_RESOURCE_ATTRIBUTES") {
        for (k, v) in parse_key_values(&r)
            .map_err(|e| ConfigError(format!("OTEL_RESOURCE_ATTRIBUTES: {e}")))?
        {
            set(&mut attrs, &k, v);
        }
    }
    if let Some(s) = var("OTEL_SERVICE_NAME") {
        set(&mut attrs, "service.name", s);
    }
    if let Some(n) = flags
        .node_name
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty())
    {
        set(&mut attrs, "k8s.node.name", n.to_string());
    }
    // One series per node: Prometheus makes `instance` of service.instance.id.
    if !attrs.iter().any(|(k, _)| k == "service.instance.id") {
        let id = attrs
            .iter()
            .find(|(k, _)| k == "k8s.node.name")
            .or_else(|| attrs.iter().find(|(k, _)| k == "host.name"))
            .map(|(_, v)| v.clone());
        if let Some(id) = id {
            set(&mut attrs, "service.instance.id", id);
        }
    }
    Ok(attrs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const BOTH: Signals = Signals {
        metrics: true,
        logs: true,
    };

    fn host() -> Detected {
        Detected {
            host_name: "node-a".into(),
            kernel_release: Some("6.18.0-1-amd64".into()),
        }
    }

    fn resolve(
        flags: &ExportFlags,
        env: &[(&str, &str)],
    ) -> Result<Option<ExportConfig>, ConfigError> {
        let m: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ExportConfig::resolve(flags, &|k| m.get(k).cloned(), &host(), BOTH)
    }

    fn flag(endpoint: &str) -> ExportFlags {
        ExportFlags {
            endpoint: Some(endpoint.into()),
            ..Default::default()
        }
    }

    #[test]
    fn no_endpoint_no_export() {
        assert_eq!(resolve(&ExportFlags::default(), &[]).unwrap(), None);
        assert_eq!(
            resolve(
                &ExportFlags::default(),
                &[("OTEL_EXPORTER_OTLP_HEADERS", "a=b")]
            )
            .unwrap(),
            None
        );
        let disabled = resolve(&flag("http://c:4317"), &[("OTEL_SDK_DISABLED", "TRUE")]).unwrap();
        assert_eq!(disabled, None);
    }

    #[test]
    fn grpc_from_port_4317_http_otherwise() {
        let c = resolve(&flag("http://collector:4317"), &[])
            .unwrap()
            .unwrap();
        assert_eq!(c.protocol, Protocol::Grpc);
        assert_eq!(
            c.signal_endpoint("/v1/metrics").as_deref(),
            Some("http://collector:4317")
        );
        let c = resolve(&flag("http://collector:4318/"), &[])
            .unwrap()
            .unwrap();
        assert_eq!(c.protocol, Protocol::HttpProtobuf);
        assert_eq!(
            c.signal_endpoint("/v1/metrics").as_deref(),
            Some("http://collector:4318/v1/metrics")
        );
        let c = resolve(&flag("http://[::1]:9000/otlp"), &[])
            .unwrap()
            .unwrap();
        assert_eq!(c.protocol, Protocol::HttpProtobuf);
        assert_eq!(
            c.signal_endpoint("/v1/logs").as_deref(),
            Some("http://[::1]:9000/otlp/v1/logs")
        );
    }

    #[test]
    fn env_endpoint_and_protocol() {
        let c = resolve(
            &ExportFlags::default(),
            &[
                (
                    "OTEL_EXPORTER_OTLP_ENDPOINT",
                    "http://alloy.monitoring:4318",
                ),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.protocol, Protocol::Grpc);
        assert_eq!(c.endpoint, "http://alloy.monitoring:4318");
        // The flag wins over the variable, and the flag's protocol too.
        let c = resolve(
            &ExportFlags {
                endpoint: Some("http://127.0.0.1:5555".into()),
                protocol: Some(Protocol::HttpProtobuf),
                node_name: None,
            },
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://elsewhere:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "http://logs-only:1/x"),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.protocol, Protocol::HttpProtobuf);
        assert_eq!(
            c.signal_endpoint("/v1/logs").as_deref(),
            Some("http://127.0.0.1:5555/v1/logs")
        );
        // Without a flag, the SDK reads the endpoint variables itself.
        let c = resolve(
            &ExportFlags::default(),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                (
                    "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
                    "http://loki:3100/otlp/v1/logs",
                ),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.signal_endpoint("/v1/logs"), None);
        assert_eq!(c.endpoint, "http://c:4318");
        let e = resolve(
            &ExportFlags::default(),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "ftp://m:4318"),
            ],
        )
        .unwrap_err();
        assert!(
            e.0.starts_with("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"),
            "{e}"
        );
    }

    #[test]
    fn bad_protocols_and_urls_are_one_line_errors() {
        let e = resolve(
            &flag("http://c:4318"),
            &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")],
        )
        .unwrap_err();
        assert!(e.0.contains("http/json is not supported"), "{e}");
        for bad in [
            "collector:4318",
            "collector",
            "ftp://c:4317",
            "http://",
            "http://c:99999",
            "http://c:x/",
        ] {
            let e = resolve(&flag(bad), &[]).unwrap_err();
            assert!(e.0.starts_with("--otlp-endpoint"), "{bad}: {e}");
        }
        let e = resolve(
            &ExportFlags::default(),
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://x")],
        )
        .unwrap_err();
        assert!(e.0.starts_with("OTEL_EXPORTER_OTLP_ENDPOINT"), "{e}");
    }

    #[test]
    fn tls_per_signal_from_scheme_and_variables() {
        let tls = |c: &ExportConfig, s: Signal| c.transport(s).tls.clone();
        // http:// is plain text even with a CA given.
        let c = resolve(
            &flag("http://c:4317"),
            &[("OTEL_EXPORTER_OTLP_CERTIFICATE", "/ca.pem")],
        )
        .unwrap()
        .unwrap();
        assert_eq!(tls(&c, Signal::Metrics), None);
        assert_eq!(tls(&c, Signal::Logs), None);
        assert_eq!(
            c.transport(Signal::Logs).tls_file_unused.as_deref(),
            Some("OTEL_EXPORTER_OTLP_CERTIFICATE")
        );
        // https://: the signal's variable wins over the generic one.
        let env = [
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/ca.pem"),
            ("OTEL_EXPORTER_OTLP_LOGS_CERTIFICATE", "/logs-ca.pem"),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/me.pem"),
            ("OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY", "/me.key"),
            ("OTEL_EXPORTER_OTLP_LOGS_TIMEOUT", "2500"),
        ];
        let c = resolve(&flag("https://c:4318"), &env).unwrap().unwrap();
        assert_eq!(c.protocol, Protocol::HttpProtobuf);
        let file = |var: &str, path: &str| {
            Some(TlsFile {
                var: var.into(),
                path: path.into(),
            })
        };
        let m = tls(&c, Signal::Metrics).unwrap();
        assert_eq!(m.ca, file("OTEL_EXPORTER_OTLP_CERTIFICATE", "/ca.pem"));
        assert_eq!(
            m.client_cert,
            file("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/me.pem")
        );
        assert_eq!(
            m.client_key,
            file("OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY", "/me.key")
        );
        let l = tls(&c, Signal::Logs).unwrap();
        assert_eq!(
            l.ca,
            file("OTEL_EXPORTER_OTLP_LOGS_CERTIFICATE", "/logs-ca.pem")
        );
        // The logs key is missing: said when the files are read (tls.rs).
        assert_eq!(l.client_key, None);
        assert_eq!(
            c.transport(Signal::Logs).timeout,
            Duration::from_millis(2500)
        );
        assert_eq!(c.transport(Signal::Metrics).timeout, DEFAULT_TIMEOUT);
        // Per-signal endpoints (no flag): each its own scheme.
        let c = resolve(
            &ExportFlags::default(),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                (
                    "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
                    "https://loki:443/otlp/v1/logs",
                ),
            ],
        )
        .unwrap()
        .unwrap();
        assert!(tls(&c, Signal::Metrics).is_none());
        assert!(tls(&c, Signal::Logs).is_some());
        // gRPC host:port without a scheme: TLS unless INSECURE (per signal too).
        let c = resolve(&flag("collector:4317"), &[]).unwrap().unwrap();
        assert_eq!(c.protocol, Protocol::Grpc);
        assert!(tls(&c, Signal::Metrics).is_some());
        let c = resolve(
            &flag("collector:4317"),
            &[
                ("OTEL_EXPORTER_OTLP_INSECURE", "true"),
                ("OTEL_EXPORTER_OTLP_LOGS_INSECURE", "false"),
            ],
        )
        .unwrap()
        .unwrap();
        assert!(tls(&c, Signal::Metrics).is_none());
        assert!(tls(&c, Signal::Logs).is_some());
        // INSECURE does not turn an https:// endpoint into plain text.
        let c = resolve(
            &flag("https://collector:4317"),
            &[("OTEL_EXPORTER_OTLP_INSECURE", "true")],
        )
        .unwrap()
        .unwrap();
        assert!(tls(&c, Signal::Metrics).is_some());
        let e = resolve(
            &flag("https://c:4318"),
            &[("OTEL_EXPORTER_OTLP_TIMEOUT", "10s")],
        )
        .unwrap_err();
        assert!(e.0.starts_with("OTEL_EXPORTER_OTLP_TIMEOUT"), "{e}");
    }

    #[test]
    fn resource_precedence() {
        let c = resolve(&flag("http://c:4317"), &[]).unwrap().unwrap();
        assert_eq!(c.resource_value("service.name"), Some("ktrace"));
        assert_eq!(
            c.resource_value("service.version"),
            Some(env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(c.resource_value("host.name"), Some("node-a"));
        assert_eq!(c.resource_value("os.type"), Some("linux"));
        assert_eq!(c.resource_value("os.version"), Some("6.18.0-1-amd64"));
        assert_eq!(c.resource_value("k8s.node.name"), None);
        assert_eq!(c.resource_value("service.instance.id"), Some("node-a"));

        let env = [
            ("NODE_NAME", "worker-7"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment.name=prod,k8s.cluster.name=eu%2C1,host.name=h",
            ),
            ("OTEL_SERVICE_NAME", "ktrace-eu"),
        ];
        let c = resolve(&flag("http://c:4317"), &env).unwrap().unwrap();
        assert_eq!(c.resource_value("service.name"), Some("ktrace-eu"));
        assert_eq!(c.resource_value("k8s.node.name"), Some("worker-7"));
        assert_eq!(c.resource_value("k8s.cluster.name"), Some("eu,1"));
        assert_eq!(c.resource_value("host.name"), Some("h"));
        assert_eq!(
            c.resource_value("deployment.environment.name"),
            Some("prod")
        );
        assert_eq!(c.resource_value("service.instance.id"), Some("worker-7"));

        // --node-name beats NODE_NAME and OTEL_RESOURCE_ATTRIBUTES.
        let env = [
            ("NODE_NAME", "worker-7"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "k8s.node.name=x,service.instance.id=i-1",
            ),
        ];
        let c = resolve(
            &ExportFlags {
                node_name: Some("worker-9".into()),
                ..flag("http://c:4317")
            },
            &env,
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.resource_value("k8s.node.name"), Some("worker-9"));
        assert_eq!(c.resource_value("service.instance.id"), Some("i-1"));
        let keys: Vec<&str> = c.resource.iter().map(|(k, _)| k.as_str()).collect();
        let mut dedup = keys.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(keys.len(), dedup.len(), "{keys:?}");

        let e = resolve(&flag("http://c:4317"), &[("OTEL_RESOURCE_ATTRIBUTES", "a")]).unwrap_err();
        assert!(e.0.starts_with("OTEL_RESOURCE_ATTRIBUTES"), "{e}");
    }

    #[test]
    fn timings_and_queue_sizes() {
        let c = resolve(&flag("http://c:4317"), &[]).unwrap().unwrap();
        assert_eq!(c.metric_interval, DEFAULT_METRIC_INTERVAL);
        assert_eq!(
            (c.max_queue, c.max_batch),
            (DEFAULT_MAX_QUEUE, DEFAULT_MAX_BATCH)
        );
        let c = resolve(
            &flag("http://c:4317"),
            &[
                ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
                ("OTEL_BLRP_SCHEDULE_DELAY", "50"),
                ("OTEL_BLRP_MAX_QUEUE_SIZE", "100"),
                ("OTEL_BLRP_MAX_EXPORT_BATCH_SIZE", "1000"),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.metric_interval, Duration::from_millis(500));
        assert_eq!(c.log_delay, Duration::from_millis(50));
        assert_eq!((c.max_queue, c.max_batch), (100, 100));
        let e = resolve(
            &flag("http://c:4317"),
            &[("OTEL_BLRP_SCHEDULE_DELAY", "1s")],
        )
        .unwrap_err();
        assert!(e.0.starts_with("OTEL_BLRP_SCHEDULE_DELAY"), "{e}");
        let e = resolve(&flag("http://c:4317"), &[("OTEL_BLRP_MAX_QUEUE_SIZE", "0")]).unwrap_err();
        assert!(e.0.starts_with("OTEL_BLRP_MAX_QUEUE_SIZE"), "{e}");
    }
}
