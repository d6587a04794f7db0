//! One OTLP log record per finding (and per storm update): the severity
//! mapped, the body the finding's sentence, the attributes its fields, so
//! Loki can filter by service, backend or kind.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::logs::{AnyValue, Severity as OtelSeverity};
use opentelemetry::Key;
use serde_json::Value;

use super::metrics::keys;
use crate::clock::WallClock;
use crate::engine::{Finding, Severity};

/// `event.name` of every finding record.
pub const EVENT_NAME: &str = "ktrace.finding";

/// Severity number and text: warning -> WARN (13), error -> ERROR (17),
/// critical -> FATAL (21), the text keeping ktrace's word.
pub fn severity(s: Severity) -> (OtelSeverity, &'static str) {
    match s {
        Severity::Warning => (OtelSeverity::Warn, "WARNING"),
        Severity::Error => (OtelSeverity::Error, "ERROR"),
        Severity::Critical => (OtelSeverity::Fatal, "CRITICAL"),
    }
}

fn wall_time(clock: &WallClock, mono_ns: u64) -> SystemTime {
    let ns = clock.wall_ns(mono_ns).clamp(0, i128::from(u64::MAX)) as u64;
    UNIX_EPOCH + Duration::from_nanos(ns)
}

fn any(v: &Value) -> AnyValue {
    match v {
        Value::Bool(b) => AnyValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AnyValue::Int(i),
            // Beyond i64: kept exact, as text.
            None if n.is_u64() => AnyValue::String(n.to_string().into()),
            None => AnyValue::Double(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => AnyValue::String(s.clone().into()),
        Value::Array(a) => AnyValue::ListAny(Box::new(a.iter().map(any).collect())),
        Value::Object(m) => AnyValue::Map(Box::new(
            m.iter()
                .map(|(k, v)| (Key::from(k.clone()), any(v)))
                .collect::<HashMap<_, _>>(),
        )),
        Value::Null => AnyValue::String("".into()),
    }
}

fn endpoint<R: opentelemetry::logs::LogRecord>(
    r: &mut R,
    addr_key: &'static str,
    port_key: &'static str,
    a: Option<SocketAddr>,
) {
    if let Some(a) = a {
        r.add_attribute(addr_key, a.ip().to_string());
        r.add_attribute(port_key, i64::from(a.port()));
    }
}

/// Fills `r` with the finding `f` (its monotonic times made wall-clock by `clock`).
pub fn fill<R: opentelemetry::logs::LogRecord>(r: &mut R, f: &Finding, clock: &WallClock) {
    let (number, text) = severity(f.severity);
    r.set_event_name(EVENT_NAME);
    r.set_timestamp(wall_time(clock, f.ts_ns));
    r.set_observed_timestamp(SystemTime::now());
    r.set_severity_number(number);
    r.set_severity_text(text);
    r.set_body(AnyValue::String(f.sentence().into()));
    r.add_attribute(keys::FINDING_KIND, f.kind().as_str());
    r.add_attribute("ktrace.finding.severity", f.severity.as_str());
    endpoint(r, keys::SERVER_ADDRESS, keys::SERVER_PORT, f.service);
    endpoint(r, keys::BACKEND_ADDRESS, keys::BACKEND_PORT, f.backend);
    endpoint(r, keys::CLIENT_ADDRESS, keys::CLIENT_PORT, f.client);
    // The endpoints as ktrace prints them, for a one-field filter in Loki.
    for (k, a) in [
        ("ktrace.service", f.service),
        ("ktrace.backend", f.backend),
        ("ktrace.client", f.client),
    ] {
        if let Some(a) = a {
            r.add_attribute(k, a.to_string());
        }
    }
    r.add_attribute("ktrace.finding.cause", f.cause.clone());
    r.add_attribute("ktrace.finding.remedy", f.remedy.clone());
    // The evidence as in the JSON (times wall-clock RFC 3339), one attribute a key.
    if let Ok(Value::Object(ev)) = serde_json::to_value(f.evidence.at_wall_clock(clock)) {
        for (k, v) in &ev {
            r.add_attribute(Key::from(format!("ktrace.evidence.{k}")), any(v));
        }
    }
}

/// The Kubernetes names of a finding's addresses, as OpenTelemetry's
/// semantic conventions name them: the Service as `k8s.namespace.name` and
/// `k8s.service.name` (the finding is about it), the backend and the client
/// under `ktrace.backend.` and `ktrace.client.` (`k8s.pod.name`,
/// `k8s.namespace.name`, `k8s.node.name`; the resource's own
/// `k8s.node.name` is the node ktrace runs on).
pub fn names<R: opentelemetry::logs::LogRecord>(r: &mut R, n: &crate::names::FindingNames) {
    use crate::names::Peer;
    if let Some((_, s)) = n.service.as_ref().or(n.backend_service.as_ref()) {
        r.add_attribute(keys::K8S_NAMESPACE, s.namespace.to_string());
        r.add_attribute(keys::K8S_SERVICE, s.name.to_string());
        if !s.port.is_empty() {
            r.add_attribute(keys::K8S_SERVICE_PORT, s.port.to_string());
        }
    }
    for (prefix, peer) in [
        ("ktrace.backend.", &n.backend),
        ("ktrace.client.", &n.client),
    ] {
        match peer {
            Some(Peer::Pod(p)) => {
                r.add_attribute(
                    format!("{prefix}k8s.namespace.name"),
                    p.namespace.to_string(),
                );
                r.add_attribute(format!("{prefix}k8s.pod.name"), p.name.to_string());
                if let Some(node) = &p.node {
                    r.add_attribute(format!("{prefix}k8s.node.name"), node.to_string());
                }
            }
            Some(Peer::Node(node)) => {
                r.add_attribute(format!("{prefix}k8s.node.name"), node.to_string());
            }
            Some(Peer::External) => r.add_attribute(format!("{prefix}name"), "external"),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::finding::{Evidence, Time, UnnatedBasis, UnnatedPath, UnnatedReply};
    use opentelemetry::logs::{Logger as _, LoggerProvider as _};
    use opentelemetry_sdk::logs::SdkLoggerProvider;

    #[test]
    fn a_finding_becomes_a_record() {
        let provider = SdkLoggerProvider::builder().build();
        let logger = provider.logger("t");
        let mut r = logger.create_log_record();
        let evidence = Evidence::UnnatedReply(UnnatedReply {
            basis: vec![UnnatedBasis::ClientRstToBackendAddress],
            rst_reason: None,
            verdict: None,
            first: Time::Mono(1_000_000_000),
            count: 1,
            ct_invalid_counter_rise: Some(2),
            path: UnnatedPath::ReplyToClient,
            snat: None,
        });
        let f = Finding {
            ts_ns: 2_000_000_000,
            severity: Severity::Error,
            service: Some("10.96.0.10:2222".parse().unwrap()),
            backend: Some("10.0.1.2:2222".parse().unwrap()),
            client: Some("10.0.0.2:40000".parse().unwrap()),
            cause: "INVALID".into(),
            remedy: "set nf_conntrack_tcp_be_liberal=1".into(),
            evidence,
        };
        let clock = WallClock {
            offset_ns: 1_700_000_000_000_000_000,
        };
        fill(&mut r, &f, &clock);
        assert_eq!(r.severity_number(), Some(OtelSeverity::Error));
        assert_eq!(r.severity_text(), Some("ERROR"));
        assert_eq!(r.event_name(), Some(EVENT_NAME));
        assert_eq!(r.body(), Some(&AnyValue::String(f.sentence().into())));
        assert_eq!(
            r.timestamp(),
            Some(UNIX_EPOCH + Duration::from_nanos(1_700_000_002_000_000_000))
        );
        let attrs: HashMap<String, AnyValue> = r
            .attributes_iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let s = |k: &str| {
            attrs
                .get(k)
                .cloned()
                .unwrap_or_else(|| panic!("no {k}: {attrs:?}"))
        };
        assert_eq!(s("server.address"), AnyValue::String("10.96.0.10".into()));
        assert_eq!(s("server.port"), AnyValue::Int(2222));
        assert_eq!(
            s("ktrace.backend.address"),
            AnyValue::String("10.0.1.2".into())
        );
        assert_eq!(s("client.port"), AnyValue::Int(40000));
        assert_eq!(
            s("ktrace.service"),
            AnyValue::String("10.96.0.10:2222".into())
        );
        assert_eq!(
            s("ktrace.finding.kind"),
            AnyValue::String("unnated_reply".into())
        );
        assert_eq!(s("ktrace.evidence.count"), AnyValue::Int(1));
        assert_eq!(
            s("ktrace.evidence.ct_invalid_counter_rise"),
            AnyValue::Int(2)
        );
        assert!(
            !attrs.contains_key("ktrace.evidence.rst_reason"),
            "absent, not empty"
        );
        assert_eq!(
            s("ktrace.evidence.first"),
            AnyValue::String(clock.rfc3339(1_000_000_000).into())
        );
        assert_eq!(
            s("ktrace.evidence.basis"),
            AnyValue::ListAny(Box::new(vec![AnyValue::String(
                "client_rst_to_backend_address".into()
            )]))
        );
    }
}
