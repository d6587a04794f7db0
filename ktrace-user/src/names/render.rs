//! Names in the output: the finding's JSON fields beside `service`,
//! `backend` and `client`, the human sentence's labels, and the names of
//! an event's addresses.

use std::net::SocketAddr;

use serde::Serialize;
use serde_json::{json, Value};

use super::{FindingNames, NameResolver, Peer, ServiceName};
use crate::engine::finding::Role;
use crate::engine::Finding;

/// The JSON fields a finding gains: `service_name`, `backend_name`,
/// `backend_node`, `backend_service`, `client_name`, `client_node` (what
/// is known), written from the names themselves, in the contract's order
/// right after `service`, `backend` and `client` (see
/// [`Finding::json`](crate::engine::Finding::json)).
#[derive(Serialize)]
pub struct NameFields<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    service_name: Option<Shown<&'a ServiceName>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backend_name: Option<Shown<&'a Peer>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backend_node: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backend_service: Option<Shown<&'a ServiceName>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_name: Option<Shown<&'a Peer>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_node: Option<&'a str>,
}

impl<'a> From<&'a FindingNames> for NameFields<'a> {
    fn from(n: &'a FindingNames) -> Self {
        let node = |p: &'a Option<Peer>| match p {
            Some(Peer::Pod(pod)) => pod.node.as_deref(),
            _ => None,
        };
        NameFields {
            service_name: n.service.as_ref().map(|(_, s)| Shown(&**s)),
            backend_name: n.backend.as_ref().map(Shown),
            backend_node: node(&n.backend),
            backend_service: n.backend_service.as_ref().map(|(_, s)| Shown(&**s)),
            client_name: n.client.as_ref().map(Shown),
            client_node: node(&n.client),
        }
    }
}

/// A name written as a JSON string by its `Display` (no `String` made).
struct Shown<T>(T);

impl<T: std::fmt::Display> Serialize for Shown<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// The label of one of a finding's addresses in the human sentence.
pub fn human_label(role: Role, a: SocketAddr, n: Option<&FindingNames>) -> String {
    let Some(n) = n else {
        return a.to_string();
    };
    let extra = match role {
        Role::Service => n.service.as_ref().map(|(_, s)| s.to_string()),
        Role::Backend => match (&n.backend, &n.backend_service) {
            (Some(p), _) => Some(peer_words(p)),
            (None, Some((_, s))) => Some(format!("endpoint of {s}")),
            _ => None,
        },
        Role::Client => n.client.as_ref().map(peer_words),
    };
    match extra {
        Some(e) => format!("{a} ({e})"),
        None => a.to_string(),
    }
}

fn peer_words(p: &Peer) -> String {
    match p {
        Peer::Pod(pod) => match &pod.node {
            Some(node) => format!("pod {pod} on {node}"),
            None => format!("pod {pod}"),
        },
        other => other.to_string(),
    }
}

/// The human sentence of `f` with names beside its addresses.
pub fn sentence(f: &Finding, n: Option<&FindingNames>) -> String {
    match n {
        None => f.sentence(),
        Some(_) => f.sentence_with(&|r, a| human_label(r, a, n)),
    }
}

/// `Service payments/ledger:grpc, backend pod payments/ledger-1 on node-a,
/// client node/node-b` (what is known), for a line of its own.
pub fn summary(n: &FindingNames) -> Option<String> {
    let mut parts = Vec::new();
    if let Some((_, s)) = &n.service {
        parts.push(format!("Service {s}"));
    }
    match (&n.backend, &n.backend_service) {
        (Some(p), _) => parts.push(format!("backend {}", peer_words(p))),
        (None, Some((_, s))) if n.service.is_none() => {
            parts.push(format!("backend: endpoint of {s}"))
        }
        _ => {}
    }
    if let Some(p) = &n.client {
        parts.push(format!("client {}", peer_words(p)));
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// Address fields of an event's JSON that can be named.
const EVENT_ADDRS: [&str; 5] = ["src", "dst", "client", "service", "backend"];

/// Adds `<field>_name` beside each named address of an event's JSON.
pub fn add_event_fields(v: &mut Value, r: &NameResolver) {
    if r.is_off() {
        return;
    }
    let Value::Object(m) = v else { return };
    let mut add = Vec::new();
    for k in EVENT_ADDRS {
        if let Some(a) = m
            .get(k)
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
        {
            if let Some(l) = r.label(a) {
                add.push((format!("{k}_name"), l));
            }
        }
    }
    for (k, l) in add {
        m.insert(k, json!(l));
    }
}

/// `  names: src=... dst=...` for a human event line (empty when none).
pub fn event_suffix(addrs: &[(&str, SocketAddr)], r: &NameResolver) -> String {
    if r.is_off() {
        return String::new();
    }
    let parts: Vec<String> = addrs
        .iter()
        .filter_map(|(k, a)| r.label(*a).map(|l| format!("{k}={l}")))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("  names: {}", parts.join(" "))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::engine::finding::{BackendSwitch, Evidence, Severity, Time};
    use crate::names::{Interner, PodName, ServiceName};
    use std::sync::Arc;

    fn finding() -> Finding {
        Finding {
            ts_ns: 1,
            severity: Severity::Error,
            service: Some("10.96.0.10:2222".parse().unwrap()),
            backend: Some("10.0.1.2:2222".parse().unwrap()),
            client: Some("10.0.0.2:40000".parse().unwrap()),
            cause: "conntrack entry flushed".into(),
            remedy: "r".into(),
            evidence: Evidence::BackendSwitch(BackendSwitch {
                old_backend: "10.0.1.3:2222".parse().unwrap(),
                idle_s: 0.0,
                rst_reason: None,
                first: Time::Mono(1),
            }),
        }
    }

    /// The names of a finding: Service `payments/ledger:grpc`, backend Pod
    /// `payments/ledger-7f9c` on `node-a`, client `node/node-b`.
    pub(crate) fn example_names() -> FindingNames {
        let mut i = Interner::default();
        let svc = Arc::new(ServiceName::parse("payments/ledger:grpc", &mut i).unwrap());
        FindingNames {
            service: Some((super::super::Proto::Tcp, svc)),
            backend: Some(Peer::Pod(Arc::new(PodName {
                namespace: i.get("payments"),
                name: "ledger-7f9c".into(),
                node: Some(i.get("node-a")),
            }))),
            backend_service: None,
            client: Some(Peer::Node(i.get("node-b"))),
        }
    }

    #[test]
    fn names_go_beside_the_addresses() {
        let n = example_names();
        let f = finding();
        let clock = crate::clock::WallClock { offset_ns: 0 };
        let json =
            |f: &Finding| serde_json::to_value(f.json(&clock, Some(NameFields::from(&n)))).unwrap();
        let v = json(&f);
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "type",
                "kind",
                "ts",
                "severity",
                "service",
                "backend",
                "client",
                "service_name",
                "backend_name",
                "backend_node",
                "client_name",
                "cause",
                "remedy",
                "evidence",
                "message"
            ]
        );
        // Without names, the object is the contract's as before.
        assert_eq!(
            serde_json::to_value(f.json(&clock, None::<NameFields>)).unwrap(),
            f.to_json(&clock)
        );
        // Addresses absent: the names follow the last one present.
        let mut no_client = f.clone();
        no_client.client = None;
        let v = json(&no_client);
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys[4..7], ["service", "backend", "service_name"]);
        assert_eq!(v["service_name"], "payments/ledger:grpc");
        assert_eq!(v["backend_name"], "payments/ledger-7f9c");
        assert_eq!(v["client_name"], "node/node-b");
        let s = sentence(&f, Some(&n));
        assert!(s.starts_with("Service 10.96.0.10:2222 (payments/ledger:grpc): connection from client 10.0.0.2:40000 (node/node-b) was re-mapped mid-stream to backend 10.0.1.2:2222 (pod payments/ledger-7f9c on node-a)"), "{s}");
        // Nothing named: the sentence is unchanged.
        assert_eq!(sentence(&f, None), f.sentence());
    }
}
