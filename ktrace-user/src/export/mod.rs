//! OTLP export (issue 5): metrics and findings from every node to an
//! OpenTelemetry Collector (or Grafana Alloy), and on to Prometheus and Loki.
//!
//! - [`config`]: `--otlp-endpoint`, `--node-name` and the `OTEL_*` variables.
//! - [`metrics`]: the counters and gauges, their names and labels.
//! - [`tls`]: TLS to the collector (the standard certificate variables).
//! - [`prometheus`]: the same metrics in the Prometheus text format (`--metrics-addr`).
//! - [`logs`]: a finding as an OTLP log record.
//! - [`exporter`]: the non-blocking handle the pipeline calls, and the
//!   export thread with its bounded queue, retries and drop accounting.
//!
//! Encoding and transport are the opentelemetry crates' (opentelemetry-otlp
//! over tonic or hyper); see docs/otlp.md for names, labels and Grafana.

pub mod config;
pub mod exporter;
pub mod logs;
pub mod metrics;
pub mod prometheus;
pub mod tls;

pub use config::{ConfigError, Detected, ExportConfig, ExportFlags, Protocol, Signal, Signals};
pub use exporter::{ExportError, ExportSummary, Exporter};
