//! deploy/kubernetes renders (`kubectl kustomize`, offline) and every
//! object it renders is valid against the Kubernetes API types of
//! k8s-openapi, strictly: an unknown or misspelled field fails, as a wrong
//! type does. k8s-openapi's deserializers ignore unknown fields, so each
//! object is also serialised back and compared with what was rendered:
//! anything the types dropped or changed is reported with its path.
//! Then what the DaemonSet must hold (issue 14) is checked on the typed
//! objects of the base and of each overlay.

use std::collections::BTreeMap;
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, Namespace, PodSpec, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use ktrace_tests::workspace;
use serde::de::DeserializeOwned;
use serde::{Deserialize as _, Serialize};
use serde_json::Value;

const BASE: &str = "deploy/kubernetes";
const OVERLAYS: [&str; 4] = [
    "deploy/kubernetes/overlays/recording",
    "deploy/kubernetes/overlays/privileged",
    "deploy/kubernetes/overlays/otlp-tls",
    "deploy/kubernetes/overlays/otlp-mtls",
];

/// `kubectl kustomize DIR` (the machine image ships kubectl with kustomize).
fn render(dir: &str) -> String {
    let out = Command::new("kubectl")
        .args(["kustomize", dir])
        .current_dir(workspace())
        .output()
        .expect("kubectl is not installed: it renders deploy/kubernetes (kubectl kustomize)");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

/// Every field of `input` must come back from the typed object unchanged.
fn diff(path: &str, input: &Value, back: &Value, out: &mut Vec<String>) {
    match (input, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(w) => diff(&p, v, w, out),
                    None if v.is_null() => {}
                    None => out.push(format!("{p}: unknown field (not in the Kubernetes schema)")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                diff(&format!("{path}[{i}]"), v, w, out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {a} became {b}")),
    }
}

/// Deserialises `v` as `T` (type errors with their path), then the strict check.
fn strict<T: DeserializeOwned + Serialize>(v: &Value) -> Result<T, String> {
    let typed: T = serde_path_to_error::deserialize(v.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).unwrap();
    let mut errs = Vec::new();
    diff("", v, &back, &mut errs);
    if errs.is_empty() {
        Ok(typed)
    } else {
        Err(errs.join("; "))
    }
}

#[derive(Default)]
struct Objects {
    daemonset: Option<DaemonSet>,
    cluster_role: Option<ClusterRole>,
    binding: Option<ClusterRoleBinding>,
    kinds: Vec<String>,
}

/// Validates every rendered object; panics listing every invalid one.
fn validate(dir: &str) -> Objects {
    let mut o = Objects::default();
    let mut errors = Vec::new();
    for doc in documents(&render(dir)) {
        let kind = doc["kind"].as_str().unwrap_or("?").to_string();
        let name = doc["metadata"]["name"].as_str().unwrap_or("?").to_string();
        let r = match kind.as_str() {
            "Namespace" => strict::<Namespace>(&doc).map(drop),
            "ServiceAccount" => strict::<ServiceAccount>(&doc).map(drop),
            "Service" => strict::<Service>(&doc).map(drop),
            "ClusterRole" => strict(&doc).map(|c| o.cluster_role = Some(c)),
            "ClusterRoleBinding" => strict(&doc).map(|b| o.binding = Some(b)),
            "DaemonSet" => strict(&doc).map(|d| o.daemonset = Some(d)),
            other => Err(format!("kind {other} is not expected here")),
        };
        if let Err(e) = r {
            errors.push(format!("{dir}: {kind}/{name}: {e}"));
        }
        o.kinds.push(kind);
    }
    assert!(errors.is_empty(), "invalid objects:\n{}", errors.join("\n"));
    o
}

#[test]
fn a_misspelled_or_mistyped_field_fails_the_check() {
    let good = serde_json::json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "x", "namespace": "y"}
    });
    strict::<ServiceAccount>(&good).unwrap();
    let mut typo = good.clone();
    typo["metadata"]["namspace"] = "y".into();
    let e = strict::<ServiceAccount>(&typo).unwrap_err();
    assert!(e.contains(".metadata.namspace: unknown field"), "{e}");
    let mut ds = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "x"},
        "spec": {"selector": {}, "template": {"spec": {"hostNetwork": true, "containers": []}}}
    });
    strict::<DaemonSet>(&ds).unwrap();
    ds["spec"]["template"]["spec"]["hostNetwork"] = "yes".into();
    let e = strict::<DaemonSet>(&ds).unwrap_err();
    assert!(e.contains("spec.template.spec.hostNetwork"), "{e}");
}

#[test]
fn the_base_renders_and_validates_with_least_privilege() {
    let o = validate(BASE);
    let mut kinds = o.kinds.clone();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "Namespace",
            "Service",
            "ServiceAccount"
        ]
    );
    rbac_reads_names_only(o.cluster_role.unwrap(), o.binding.unwrap());
    let pod = daemonset_runs_on_every_node(o.daemonset.unwrap());
    let c = &pod.containers[0];
    container_has_only_its_capabilities(c);
    container_knows_its_node_and_collector(c);
    container_watches_with_metrics_mounts_and_limits(c);
}

/// RBAC: get/list/watch on Services, EndpointSlices, Pods and Nodes, nothing
/// more, bound to ktrace's service account.
fn rbac_reads_names_only(role: ClusterRole, binding: ClusterRoleBinding) {
    let rules = role.rules.unwrap_or_default();
    let mut granted = BTreeMap::new();
    for r in &rules {
        assert_eq!(r.verbs, ["get", "list", "watch"], "{r:?}");
        assert!(r.non_resource_urls.is_none() && r.resource_names.is_none());
        for g in r.api_groups.as_deref().unwrap_or_default() {
            for res in r.resources.as_deref().unwrap_or_default() {
                granted.insert(format!("{g}/{res}"), ());
            }
        }
    }
    assert_eq!(
        granted.into_keys().collect::<Vec<_>>(),
        [
            "/nodes",
            "/pods",
            "/services",
            "discovery.k8s.io/endpointslices"
        ]
    );
    assert_eq!(binding.role_ref.name, "ktrace");
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(
        (subject.kind.as_str(), subject.namespace.as_deref()),
        ("ServiceAccount", Some("ktrace"))
    );
}

/// The DaemonSet's pod: in the ktrace namespace, host network, tolerating
/// every taint.
fn daemonset_runs_on_every_node(ds: DaemonSet) -> PodSpec {
    assert_eq!(ds.metadata.namespace.as_deref(), Some("ktrace"));
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("ktrace"));
    let tolerations = pod.tolerations.as_deref().unwrap();
    assert!(tolerations
        .iter()
        .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()));
    pod
}

/// Not privileged: every capability dropped but the four eBPF needs.
fn container_has_only_its_capabilities(c: &Container) {
    let sc = c.security_context.as_ref().unwrap();
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert_eq!(
        caps.add.as_deref().unwrap(),
        ["BPF", "PERFMON", "NET_ADMIN", "SYS_RESOURCE"]
    );
}

/// NODE_NAME from the downward API, and the collector of
/// deploy/otel-collector.yaml as the OTLP endpoint.
fn container_knows_its_node_and_collector(c: &Container) {
    let env = c.env.as_deref().unwrap();
    let node = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    let field = node
        .value_from
        .as_ref()
        .unwrap()
        .field_ref
        .as_ref()
        .unwrap();
    assert_eq!(field.field_path, "spec.nodeName");
    let otlp = env
        .iter()
        .find(|e| e.name == "OTEL_EXPORTER_OTLP_ENDPOINT")
        .unwrap();
    // The collector of deploy/otel-collector.yaml, on its gRPC port.
    let collector =
        std::fs::read_to_string(workspace().join("deploy/otel-collector.yaml")).unwrap();
    let url = otlp.value.as_deref().unwrap();
    assert!(
        collector.contains(&format!("OTEL_EXPORTER_OTLP_ENDPOINT={url}")),
        "{url}"
    );
}

/// `watch` with a metrics address, the kernel and netns mounts, memory
/// requests and limits, and the liveness probe and metrics port.
fn container_watches_with_metrics_mounts_and_limits(c: &Container) {
    let args = c.args.as_deref().unwrap();
    assert_eq!(args[0], "watch");
    assert!(
        args.iter().any(|a| a.starts_with("--metrics-addr=")),
        "{args:?}"
    );
    let mounts: Vec<_> = c
        .volume_mounts
        .as_deref()
        .unwrap()
        .iter()
        .map(|m| m.mount_path.as_str())
        .collect();
    for m in ["/sys/kernel/tracing", "/sys/kernel/btf", "/run/netns"] {
        assert!(mounts.contains(&m), "{m} not mounted: {mounts:?}");
    }
    let res = c.resources.as_ref().unwrap();
    assert!(res.requests.as_ref().unwrap().contains_key("memory"));
    assert!(res.limits.as_ref().unwrap().contains_key("memory"));
    let probe = c
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(probe.path.as_deref(), Some("/healthz"));
    let port = c
        .ports
        .as_deref()
        .unwrap()
        .iter()
        .find(|p| p.name.as_deref() == Some("metrics"));
    assert_eq!(port.unwrap().container_port, 9464);
}

/// The value of the container's variable `name`.
fn env_value<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env
        .as_deref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .as_deref()
}

/// The file the variable `var` names, as (Secret, key in it, file mode):
/// its directory must be a read-only mount of a Secret volume.
fn secret_file(pod: &PodSpec, c: &Container, var: &str) -> (String, String, i32) {
    let path = env_value(c, var).unwrap_or_else(|| panic!("{var} is not set"));
    let (dir, file) = path.rsplit_once('/').unwrap();
    let mount = c
        .volume_mounts
        .as_deref()
        .unwrap()
        .iter()
        .find(|m| m.mount_path == dir)
        .unwrap_or_else(|| panic!("{var}={path}: {dir} is not mounted"));
    assert_eq!(mount.read_only, Some(true), "{dir}");
    let vol = pod
        .volumes
        .as_deref()
        .unwrap()
        .iter()
        .find(|v| v.name == mount.name)
        .unwrap();
    let secret = vol
        .secret
        .as_ref()
        .unwrap_or_else(|| panic!("{var}: volume {} is not a Secret", vol.name));
    assert_ne!(
        secret.optional,
        Some(true),
        "{var}: the Secret must be there"
    );
    (
        secret.secret_name.clone().unwrap(),
        file.to_string(),
        secret.default_mode.unwrap_or(0o644),
    )
}

/// overlays/otlp-tls and otlp-mtls: an https:// endpoint, the CA (and for
/// mTLS the client certificate and key) mounted from Secrets, the base's
/// other variables kept.
fn check_otlp_tls(pod: &PodSpec, mtls: bool) {
    let c = &pod.containers[0];
    let url = env_value(c, "OTEL_EXPORTER_OTLP_ENDPOINT").unwrap();
    assert!(url.starts_with("https://"), "{url}");
    assert!(env_value(c, "OTEL_RESOURCE_ATTRIBUTES").is_some());
    assert!(c
        .env
        .as_deref()
        .unwrap()
        .iter()
        .any(|e| e.name == "NODE_NAME"));
    // The names a cert-manager Certificate's Secret uses.
    let (secret, key, _) = secret_file(pod, c, "OTEL_EXPORTER_OTLP_CERTIFICATE");
    assert_eq!(
        (secret.as_str(), key.as_str()),
        ("ktrace-otlp-ca", "ca.crt")
    );
    let client = [
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_CLIENT_KEY",
    ];
    if !mtls {
        for var in client {
            assert_eq!(env_value(c, var), None, "{var}");
        }
        return;
    }
    let (secret, key, _) = secret_file(pod, c, client[0]);
    assert_eq!(
        (secret.as_str(), key.as_str()),
        ("ktrace-otlp-client", "tls.crt")
    );
    let (secret, key, mode) = secret_file(pod, c, client[1]);
    assert_eq!(
        (secret.as_str(), key.as_str()),
        ("ktrace-otlp-client", "tls.key")
    );
    assert_eq!(mode & 0o077, 0, "the key is the owner's only: {mode:o}");
}

#[test]
fn the_overlays_render_and_validate() {
    for dir in OVERLAYS {
        let o = validate(dir);
        let pod = o.daemonset.unwrap().spec.unwrap().template.spec.unwrap();
        let c = &pod.containers[0];
        if dir.ends_with("otlp-tls") || dir.ends_with("otlp-mtls") {
            check_otlp_tls(&pod, dir.ends_with("otlp-mtls"));
        } else if dir.ends_with("recording") {
            let args = c.args.as_deref().unwrap();
            assert!(
                args.iter()
                    .any(|a| a.starts_with("--record=/var/lib/ktrace/")),
                "{args:?}"
            );
            assert!(
                args.iter().any(|a| a.starts_with("--rotate-size=")),
                "{args:?}"
            );
            assert!(args.iter().any(|a| a.starts_with("--keep=")), "{args:?}");
            let vols = pod.volumes.unwrap();
            let rec = vols.iter().find(|v| v.name == "recordings").unwrap();
            assert_eq!(rec.host_path.as_ref().unwrap().path, "/var/lib/ktrace");
        } else {
            assert_eq!(c.security_context.as_ref().unwrap().privileged, Some(true));
        }
    }
}
