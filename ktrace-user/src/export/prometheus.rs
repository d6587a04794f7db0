//! The metrics of [`super::metrics`] in the Prometheus text exposition
//! format (version 0.0.4), named as the OpenTelemetry Collector's
//! `prometheus` exporter names them with `resource_to_telemetry_conversion`
//! (deploy/otel-collector.yaml): dots become underscores, monotonic sums
//! get `_total`, `{annotation}` units add no suffix, and the resource
//! attributes (`k8s.node.name`, ...) are labels of every series. So the one
//! dashboard (deploy/grafana) reads ktrace scraped directly or through the
//! collector alike.

use std::fmt::Write as _;

use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, Metric, MetricData, ResourceMetrics};

/// The content type of what [`encode`] writes.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A Prometheus metric name from an OpenTelemetry name and unit.
pub fn metric_name(name: &str, unit: &str, monotonic_sum: bool) -> String {
    let mut out = sanitize(name, true);
    let suffix = unit_suffix(unit);
    if let Some(s) = suffix {
        if !out.ends_with(&format!("_{s}")) {
            out.push('_');
            out.push_str(s);
        }
    }
    if monotonic_sum && !out.ends_with("_total") {
        out.push_str("_total");
    }
    out
}

/// The suffix a unit adds (the collector's table, for the units one may use
/// here); `{packet}`-style annotations and dimensionless `1` on a counter add none.
fn unit_suffix(unit: &str) -> Option<&'static str> {
    match unit {
        "s" => Some("seconds"),
        "ms" => Some("milliseconds"),
        "By" => Some("bytes"),
        "KiBy" => Some("kibibytes"),
        "MiBy" => Some("mebibytes"),
        "1" => Some("ratio"),
        _ => None,
    }
}

/// Metric names keep `[a-zA-Z0-9_:]`, label names `[a-zA-Z0-9_]`; anything
/// else becomes `_`, and a leading digit gets a `key_` prefix (as the
/// collector does).
pub fn sanitize(name: &str, metric: bool) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || (metric && c == ':') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert_str(0, "key_");
    }
    out
}

fn escape_label_value(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.as_str().to_string(),
        other => other.to_string(),
    }
}

/// `{a="1",b="2"}` from a data point's attributes, then the resource's
/// (a name the data point already has is not repeated).
fn labels<'a>(
    point: impl Iterator<Item = &'a KeyValue>,
    resource: &[(String, String)],
    out: &mut String,
) {
    let mut seen: Vec<String> = Vec::new();
    let mut pairs: Vec<(String, String)> = Vec::new();
    for kv in point {
        let k = sanitize(kv.key.as_str(), false);
        if !seen.contains(&k) {
            seen.push(k.clone());
            pairs.push((k, value_text(&kv.value)));
        }
    }
    for (k, v) in resource {
        if !seen.contains(k) {
            pairs.push((k.clone(), v.clone()));
        }
    }
    if pairs.is_empty() {
        return;
    }
    out.push('{');
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push_str("=\"");
        escape_label_value(v, out);
        out.push('"');
    }
    out.push('}');
}

/// A sample value as Prometheus writes it.
trait Sample: Copy {
    fn text(self) -> String;
}
impl Sample for u64 {
    fn text(self) -> String {
        self.to_string()
    }
}
impl Sample for i64 {
    fn text(self) -> String {
        self.to_string()
    }
}
impl Sample for f64 {
    fn text(self) -> String {
        if self.is_nan() {
            "NaN".into()
        } else if self.is_infinite() {
            if self > 0.0 { "+Inf" } else { "-Inf" }.into()
        } else {
            self.to_string()
        }
    }
}

/// Writes one metric (gauges and sums: the kinds ktrace has).
fn write_metric<T: Sample>(
    m: &Metric,
    data: &MetricData<T>,
    resource: &[(String, String)],
    out: &mut String,
) {
    let (kind, monotonic) = match data {
        MetricData::Sum(s) if s.is_monotonic() => ("counter", true),
        MetricData::Sum(_) | MetricData::Gauge(_) => ("gauge", false),
        // ktrace records no histograms; these are never produced.
        MetricData::Histogram(_) | MetricData::ExponentialHistogram(_) => return,
    };
    let name = metric_name(m.name(), m.unit(), monotonic);
    if !m.description().is_empty() {
        let _ = writeln!(out, "# HELP {name} {}", escape_help(m.description()));
    }
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let mut line = |attrs: &mut dyn Iterator<Item = &KeyValue>, v: T| {
        out.push_str(&name);
        labels(attrs, resource, out);
        out.push(' ');
        out.push_str(&v.text());
        out.push('\n');
    };
    match data {
        MetricData::Sum(s) => s
            .data_points()
            .for_each(|p| line(&mut p.attributes(), p.value())),
        MetricData::Gauge(g) => g
            .data_points()
            .for_each(|p| line(&mut p.attributes(), p.value())),
        _ => {}
    }
}

/// The whole exposition: `target_info` (the resource, as the collector
/// writes it), then every metric.
pub fn encode(rm: &ResourceMetrics) -> String {
    let resource: Vec<(String, String)> = rm
        .resource()
        .iter()
        .map(|(k, v)| (sanitize(k.as_str(), false), value_text(v)))
        .collect();
    let mut out = String::with_capacity(8 << 10);
    out.push_str("# HELP target_info Target metadata\n# TYPE target_info gauge\ntarget_info");
    labels(std::iter::empty(), &resource, &mut out);
    out.push_str(" 1\n");
    for sm in rm.scope_metrics() {
        for m in sm.metrics() {
            match m.data() {
                AggregatedMetrics::U64(d) => write_metric(m, d, &resource, &mut out),
                AggregatedMetrics::I64(d) => write_metric(m, d, &resource, &mut out),
                AggregatedMetrics::F64(d) => write_metric(m, d, &resource, &mut out),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_collector() {
        assert_eq!(
            metric_name("ktrace.tcp.resets.sent", "{reset}", true),
            "ktrace_tcp_resets_sent_total"
        );
        assert_eq!(
            metric_name("system.network.conntrack.count", "{entry}", false),
            "system_network_conntrack_count"
        );
        assert_eq!(
            metric_name("ktrace.hook.attached", "", false),
            "ktrace_hook_attached"
        );
        assert_eq!(metric_name("x.latency", "s", false), "x_latency_seconds");
        assert_eq!(sanitize("k8s.node.name", false), "k8s_node_name");
        assert_eq!(sanitize("1a:b", false), "key_1a_b");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        let kv = [KeyValue::new("msg", "a \"b\"\\\nc")];
        labels(
            kv.iter(),
            &[("k8s_node_name".into(), "n1".into())],
            &mut out,
        );
        assert_eq!(out, r#"{msg="a \"b\"\\\nc",k8s_node_name="n1"}"#);
    }
}
