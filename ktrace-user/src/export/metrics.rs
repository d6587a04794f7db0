//! The metrics ktrace exports: cumulative counters updated in memory on the
//! pipeline thread (an SDK counter add: no I/O, no waiting), gauges read
//! when the exporter thread collects. Names follow the OpenTelemetry
//! semantic conventions where one exists (`system.network.conntrack.*`,
//! `server.address`, `network.type`), with a `ktrace.` prefix otherwise.
//!
//! Label cardinality is bounded: reasons are kernel enum names and
//! conntrack messages (fixed strings, truncated), services and backends are
//! the Services of the cluster; client ports never become labels. The SDK
//! also caps every metric at 2000 attribute sets (the rest fold into one
//! `otel.metric.overflow` series).

use crate::sysctl::read_u64;
use std::net::SocketAddr;
use std::sync::Arc;

use opentelemetry::metrics::{Counter, Gauge, Meter, MeterProvider as _, ObservableGauge};
use opentelemetry::{InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{ManualReader, Pipeline, SdkMeterProvider, Temporality};
use opentelemetry_sdk::Resource;

use crate::engine::Phase;
use crate::engine::{Evidence, Finding};
use crate::event::{Event, EventBody};
use crate::hooks::HookStatus;

/// Metric names, for the tests, the dashboard and docs/otlp.md.
pub mod names {
    pub const RESETS_SENT: &str = "ktrace.tcp.resets.sent";
    pub const RESETS_RECEIVED: &str = "ktrace.tcp.resets.received";
    pub const CT_INVALID: &str = "ktrace.conntrack.invalid";
    pub const CT_TABLE_FULL: &str = "ktrace.conntrack.table_full";
    pub const CT_STAT: &str = "ktrace.conntrack.stat";
    pub const KERNEL_EVENTS: &str = "ktrace.kernel.events";
    pub const FINDINGS: &str = "ktrace.findings";
    pub const EVENTS_LOST: &str = "ktrace.events.lost";
    pub const HOOK_ATTACHED: &str = "ktrace.hook.attached";
    pub const CT_COUNT: &str = "system.network.conntrack.count";
    pub const CT_MAX: &str = "system.network.conntrack.max";
    pub const LOG_RECORDS_EXPORTED: &str = "ktrace.otlp.log_records.exported";
    pub const EXPORT_FAILURES: &str = "ktrace.otlp.export.failures";
}

/// Attribute keys (metrics and log records).
pub mod keys {
    pub const RESET_REASON: &str = "ktrace.reset.reason";
    pub const CT_REASON: &str = "ktrace.conntrack.reason";
    pub const CT_COUNTER: &str = "ktrace.conntrack.counter";
    pub const NETWORK_TYPE: &str = "network.type";
    pub const EVENT_NAME: &str = "ktrace.event.name";
    pub const FINDING_KIND: &str = "ktrace.finding.kind";
    pub const SERVER_ADDRESS: &str = "server.address";
    pub const SERVER_PORT: &str = "server.port";
    pub const BACKEND_ADDRESS: &str = "ktrace.backend.address";
    pub const BACKEND_PORT: &str = "ktrace.backend.port";
    pub const CLIENT_ADDRESS: &str = "client.address";
    pub const CLIENT_PORT: &str = "client.port";
    pub const LOST_SOURCE: &str = "ktrace.lost.source";
    pub const HOOK_NAME: &str = "ktrace.hook.name";
    pub const HOOK_MECHANISM: &str = "ktrace.hook.mechanism";
    pub const SIGNAL: &str = "ktrace.otlp.signal";
    /// OpenTelemetry's Kubernetes conventions (the finding's Service).
    pub const K8S_NAMESPACE: &str = "k8s.namespace.name";
    pub const K8S_SERVICE: &str = "k8s.service.name";
    pub const K8S_SERVICE_PORT: &str = "ktrace.k8s.service.port.name";
}

/// `ktrace.lost.source` of a lost-event notice, from its free-text `what`.
pub fn lost_source(what: &str) -> &'static str {
    if what == "otlp" {
        "otlp"
    } else if what.starts_with("ring buffer") {
        "ring_buffer"
    } else if what.starts_with("ctnetlink") {
        "ctnetlink"
    } else if what.starts_with("recording") || what.starts_with("not recorded") {
        "recording"
    } else if what.starts_with("kernel read") {
        "kernel_read"
    } else if what.starts_with("undecodable") {
        "decode"
    } else if what.contains("hook down") {
        "hook_down"
    } else {
        "other"
    }
}

/// A bounded label value from kernel text.
fn label(s: Option<&str>) -> Value {
    match s.map(str::trim).filter(|s| !s.is_empty()) {
        None => Value::from("unknown"),
        Some(s) if s.len() <= 96 => Value::from(s.to_string()),
        Some(s) => {
            let mut end = 96;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            Value::from(s[..end].to_string())
        }
    }
}

fn net_type(a: &SocketAddr) -> KeyValue {
    KeyValue::new(
        keys::NETWORK_TYPE,
        if a.is_ipv4() { "ipv4" } else { "ipv6" },
    )
}

/// The reader the provider owns, shared with the exporter thread that collects.
#[derive(Debug, Clone)]
pub(crate) struct SharedReader(pub Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: std::sync::Weak<Pipeline>) {
        self.0.register_pipeline(pipeline)
    }
    fn collect(
        &self,
        rm: &mut opentelemetry_sdk::metrics::data::ResourceMetrics,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(
        &self,
        timeout: std::time::Duration,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: opentelemetry_sdk::metrics::InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

/// The instruments. Counters are cheap to update from any thread.
pub(crate) struct Metrics {
    /// Kept alive: dropping the provider shuts the reader down.
    _provider: SdkMeterProvider,
    pub reader: Arc<ManualReader>,
    resets_sent: Counter<u64>,
    resets_received: Counter<u64>,
    ct_invalid: Counter<u64>,
    ct_table_full: Counter<u64>,
    ct_stat: Counter<u64>,
    kernel_events: Counter<u64>,
    findings: Counter<u64>,
    lost: Counter<u64>,
    hook: Gauge<u64>,
    log_records_exported: Counter<u64>,
    export_failures: Counter<u64>,
    _conntrack: Vec<ObservableGauge<u64>>,
}

impl Metrics {
    pub fn new(resource: Resource, scope: InstrumentationScope) -> Metrics {
        let reader = Arc::new(
            ManualReader::builder()
                .with_temporality(Temporality::Cumulative)
                .build(),
        );
        let provider = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_reader(SharedReader(reader.clone()))
            .build();
        let meter: Meter = provider.meter_with_scope(scope);
        let counter = |name: &'static str, unit: &'static str, desc: &'static str| {
            meter
                .u64_counter(name)
                .with_unit(unit)
                .with_description(desc)
                .build()
        };
        let conntrack = vec![
            meter
                .u64_observable_gauge(names::CT_COUNT)
                .with_unit("{entry}")
                .with_description(
                    "Conntrack entries in use in ktrace's network namespace (where readable)",
                )
                .with_callback(|o| {
                    if let Some(v) = read_u64("/proc/sys/net/netfilter/nf_conntrack_count") {
                        o.observe(v, &[]);
                    }
                })
                .build(),
            meter
                .u64_observable_gauge(names::CT_MAX)
                .with_unit("{entry}")
                .with_description("Size of the conntrack table (nf_conntrack_max, where readable)")
                .with_callback(|o| {
                    if let Some(v) = read_u64("/proc/sys/net/netfilter/nf_conntrack_max") {
                        o.observe(v, &[]);
                    }
                })
                .build(),
        ];
        let m = Metrics {
            resets_sent: counter(names::RESETS_SENT, "{reset}", "TCP resets the kernel sent, by sk_rst_reason (summarised_refused, summarised_socket: counted in the kernel, not sent one by one)"),
            resets_received: counter(names::RESETS_RECEIVED, "{reset}", "TCP resets a socket accepted"),
            ct_invalid: counter(names::CT_INVALID, "{packet}", "Packets conntrack marked INVALID, by the reason it logged"),
            ct_table_full: counter(names::CT_TABLE_FULL, "{packet}", "New connections dropped because the conntrack table was full"),
            ct_stat: counter(
                names::CT_STAT,
                "{packet}",
                "Conntrack statistics of ktrace's network namespace (/proc/net/stat/nf_conntrack): invalid, drop, early_drop, insert_failed, since ktrace started",
            ),
            kernel_events: counter(names::KERNEL_EVENTS, "{event}", "Kernel events decoded, by event name"),
            findings: counter(
                names::FINDINGS,
                "{finding}",
                "Incidents diagnosed, by kind, service and backend (an rst_storm counts once, at its start)",
            ),
            lost: counter(names::EVENTS_LOST, "{event}", "Events lost, by where (ring_buffer, ctnetlink, recording, otlp)"),
            hook: meter
                .u64_gauge(names::HOOK_ATTACHED)
                // No unit: "1" would make it ktrace_hook_attached_ratio in Prometheus.
                .with_description("1 when the hook is attached, 0 when this kernel cannot give it")
                .build(),
            log_records_exported: counter(names::LOG_RECORDS_EXPORTED, "{record}", "Findings delivered as OTLP log records"),
            export_failures: counter(names::EXPORT_FAILURES, "{request}", "OTLP export requests that failed (after the exporter's own retries)"),
            _conntrack: conntrack,
            _provider: provider,
            reader,
        };
        // The series a dashboard expects exist from the start, at 0.
        for source in ["ring_buffer", "ctnetlink", "otlp"] {
            m.lost.add(0, &[KeyValue::new(keys::LOST_SOURCE, source)]);
        }
        for name in ["invalid", "drop", "early_drop", "insert_failed"] {
            m.ct_stat.add(0, &[KeyValue::new(keys::CT_COUNTER, name)]);
        }
        for signal in ["metrics", "logs"] {
            m.export_failures
                .add(0, &[KeyValue::new(keys::SIGNAL, signal)]);
        }
        m.log_records_exported.add(0, &[]);
        m
    }

    pub fn event(&self, ev: &Event) {
        self.kernel_events
            .add(1, &[KeyValue::new(keys::EVENT_NAME, ev.body.name())]);
        match &ev.body {
            EventBody::TcpSendReset { src, reason, .. } => self.resets_sent.add(
                1,
                &[
                    KeyValue::new(keys::RESET_REASON, label(reason.as_deref())),
                    net_type(src),
                ],
            ),
            // Counted in the kernel, not one by one: their reason is why
            // they can never be an incident, their addresses unknown.
            EventBody::ResetsSummarised(c) => {
                for (reason, n) in [
                    ("summarised_refused", c.refused),
                    ("summarised_socket", c.socket),
                ] {
                    if n > 0 {
                        self.resets_sent
                            .add(n, &[KeyValue::new(keys::RESET_REASON, reason)]);
                    }
                }
            }
            EventBody::TcpReceiveReset { src, .. } => self.resets_received.add(1, &[net_type(src)]),
            EventBody::CtInvalid(c) => self.ct_invalid.add(
                1,
                &[
                    KeyValue::new(keys::CT_REASON, label(c.message.as_deref())),
                    net_type(&c.src),
                ],
            ),
            EventBody::CtTableFull { src, .. } => self.ct_table_full.add(1, &[net_type(src)]),
            EventBody::CtCounters(c) => {
                for (name, n) in [
                    ("invalid", c.invalid),
                    ("drop", c.drop),
                    ("early_drop", c.early_drop),
                    ("insert_failed", c.insert_failed),
                    ("clash_resolve", c.clash_resolve),
                ] {
                    if n > 0 {
                        self.ct_stat
                            .add(n, &[KeyValue::new(keys::CT_COUNTER, name)]);
                    }
                }
            }
            _ => {}
        }
    }

    /// Counted by kind, Service and backend; the Service's Kubernetes name
    /// is a label too (bounded: one per Service port), the client's Pod is
    /// not (one per client would be unbounded).
    pub fn finding(&self, f: &Finding, names: Option<&crate::names::FindingNames>) {
        // A storm is one finding; its updates and end are log records only.
        if matches!(&f.evidence, Evidence::RstStorm(s) if s.phase != Phase::Start) {
            return;
        }
        let mut attrs = Vec::with_capacity(5);
        attrs.push(KeyValue::new(keys::FINDING_KIND, f.kind().as_str()));
        if let Some(s) = f.service {
            attrs.push(KeyValue::new(keys::SERVER_ADDRESS, s.ip().to_string()));
            attrs.push(KeyValue::new(keys::SERVER_PORT, i64::from(s.port())));
        }
        if let Some(b) = f.backend {
            attrs.push(KeyValue::new(keys::BACKEND_ADDRESS, b.ip().to_string()));
            attrs.push(KeyValue::new(keys::BACKEND_PORT, i64::from(b.port())));
        }
        if let Some((_, s)) = names.and_then(|n| n.service.as_ref()) {
            attrs.push(KeyValue::new(keys::K8S_NAMESPACE, s.namespace.to_string()));
            attrs.push(KeyValue::new(keys::K8S_SERVICE, s.name.to_string()));
        }
        self.findings.add(1, &attrs);
    }

    pub fn lost(&self, count: u64, source: &'static str) {
        self.lost
            .add(count, &[KeyValue::new(keys::LOST_SOURCE, source)]);
    }

    pub fn status(&self, hooks: &[HookStatus]) {
        for h in hooks {
            self.hook.record(
                u64::from(h.attached),
                &[
                    KeyValue::new(keys::HOOK_NAME, h.name.clone()),
                    KeyValue::new(keys::HOOK_MECHANISM, h.mechanism.clone()),
                ],
            );
        }
    }

    pub fn exported(&self, records: u64) {
        self.log_records_exported.add(records, &[]);
    }

    pub fn export_failed(&self, signal: &'static str) {
        self.export_failures
            .add(1, &[KeyValue::new(keys::SIGNAL, signal)]);
    }
}
