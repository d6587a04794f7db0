//! Kubernetes names from the API (issue 15): `ktrace watch --kubeconfig`
//! against a server that speaks the API's wire format (tests/src/kube_api.rs:
//! list + watch, real k8s-openapi JSON, ADDED/MODIFIED/DELETED/BOOKMARK,
//! 410 Gone, cut connections). The objects change while ktrace watches,
//! its watches are cut, the history is compacted so it must list again;
//! then the lab's un-NATed reply incident must carry the names as they are
//! at the end. Needs root; skipped (saying so) otherwise.

#[path = "../src/kube_api.rs"]
mod kube_api;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    ObjectReference, Pod, PodIP, PodSpec, PodStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use ktrace_tests::{select, skip, Lab, Scratch, BACKENDS, CLIENT_IP, VIP};
use kube_api::{count, ApiServer, Res};
use serde_json::Value;

const NODE: &str = "lab-node";

fn meta(ns: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(ns.into()),
        name: Some(name.into()),
        ..Default::default()
    }
}

fn service(ns: &str, name: &str, vip: &str) -> Value {
    let s = Service {
        metadata: meta(ns, name),
        spec: Some(ServiceSpec {
            cluster_ip: Some(vip.into()),
            cluster_ips: Some(vec![vip.into()]),
            ports: Some(vec![ServicePort {
                name: Some("grpc".into()),
                port: 2222,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    serde_json::to_value(s).unwrap()
}

fn slice(pod: &str) -> Value {
    let mut m = meta("payments", "ledger-abcde");
    m.labels = Some(BTreeMap::from([(
        "kubernetes.io/service-name".to_string(),
        "ledger".to_string(),
    )]));
    let s = EndpointSlice {
        metadata: m,
        address_type: "IPv4".into(),
        endpoints: vec![Endpoint {
            addresses: vec![BACKENDS[0].into()],
            node_name: Some(NODE.into()),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".into()),
                namespace: Some("payments".into()),
                name: Some(pod.into()),
                ..Default::default()
            }),
            ..Default::default()
        }],
        ports: Some(vec![EndpointPort {
            name: Some("grpc".into()),
            port: Some(2222),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    };
    serde_json::to_value(s).unwrap()
}

fn pod(ns: &str, name: &str, ip: &str) -> Value {
    let p = Pod {
        metadata: meta(ns, name),
        spec: Some(PodSpec {
            node_name: Some(NODE.into()),
            containers: Vec::new(),
            ..Default::default()
        }),
        status: Some(PodStatus {
            pod_ip: Some(ip.into()),
            pod_ips: Some(vec![PodIP { ip: ip.into() }]),
            host_ip: Some("10.0.0.1".into()),
            ..Default::default()
        }),
    };
    serde_json::to_value(p).unwrap()
}

#[test]
fn api_names_survive_watch_events_cuts_and_410() {
    if skip() {
        return;
    }
    let mut lab = Lab::new("na", 1);
    let api = ApiServer::start(&lab.node);
    // What the cluster holds when ktrace starts (one malformed Service).
    api.apply(Res::Services, service("payments", "ledger", VIP));
    api.apply(Res::Services, service("payments", "broken", "not-an-ip"));
    api.apply(Res::Slices, slice("ledger-0"));
    api.apply(Res::Pods, pod("payments", "ledger-0", BACKENDS[0]));
    api.apply(Res::Pods, pod("shop", "checkout-1", CLIENT_IP));

    let scratch = Scratch::new("names-api");
    let kubeconfig = scratch.path("kubeconfig");
    api.kubeconfig(&kubeconfig);
    lab.start_server();
    let watch = lab.watch(&["--kubeconfig", &kubeconfig, "--node-name", NODE]);
    assert!(
        api.wait_for(Duration::from_secs(20), |r| [
            Res::Services,
            Res::Slices,
            Res::Pods
        ]
        .iter()
        .all(|res| count(r, *res, true) >= 1)),
        "ktrace did not watch the three resources: {:?}",
        api.requests()
    );
    // Pods of this node only; Services and EndpointSlices cluster-wide.
    for r in api.requests() {
        if r.res == Res::Pods {
            assert!(
                r.query.contains("fieldSelector=spec.nodeName%3Dlab-node"),
                "{r:?}"
            );
        }
    }

    // Over the watch: the backend Pod is replaced (same IP, new name).
    api.delete(Res::Pods, "payments", "ledger-0");
    api.apply(Res::Pods, pod("payments", "ledger-1", BACKENDS[0]));
    api.apply(Res::Slices, slice("ledger-1"));
    std::thread::sleep(Duration::from_millis(1500)); // a BOOKMARK goes by too

    // The watches are cut, and while ktrace is away the client Pod is
    // replaced and the history compacted: resuming gets 410 Gone.
    let lists_before = count(&api.requests(), Res::Pods, false);
    api.cut_watches();
    api.delete(Res::Pods, "shop", "checkout-1");
    api.apply(Res::Pods, pod("shop", "checkout-2", CLIENT_IP));
    api.compact();
    assert!(
        api.wait_for(Duration::from_secs(30), |r| count(r, Res::Pods, false)
            > lists_before),
        "ktrace did not list again after 410 Gone: {:?}",
        api.requests()
    );
    // The status tells the truth: failing on 410 Gone, live again once listed.
    let api_states = |l: &[Value]| -> Vec<Value> {
        select(l, "names", None)
            .into_iter()
            .flat_map(|n| n["sources"].as_array().unwrap().clone())
            .filter(|s| s["source"] == "kubernetes-api")
            .collect()
    };
    assert!(
        watch.wait_for(Duration::from_secs(30), |l| {
            let st = api_states(l);
            st.iter().any(|s| s["state"] == "failing")
                && st.last().is_some_and(|s| s["state"] == "live")
        }),
        "the API source did not report failing then live: {:?}",
        api_states(&watch.lines())
    );
    std::thread::sleep(Duration::from_millis(1000)); // the layer is swapped twice a second

    let mut c = lab.client(2);
    assert_eq!(c.unnat_all(Duration::from_millis(1000)).len(), 2);
    assert!(watch.wait_count(Duration::from_secs(5), "finding", Some("unnated_reply"), 2));
    let status = watch.status.clone();
    let lines = watch.stop();

    let src = status["names"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["source"] == "kubernetes-api")
        .unwrap()
        .clone();
    assert_ne!(src["state"], "off", "{src}");
    // Live, with the malformed Service skipped and counted.
    let states = api_states(&lines);
    let live = states.last().unwrap();
    assert_eq!(live["state"], "live", "{states:?}");
    // Seen at the first list and again at the relist: counted each time.
    assert!(live["skipped"].as_u64() >= Some(1), "{live}");
    assert_eq!(live["nodes"], 1, "the host IP names the node: {live}");
    assert_eq!(live["services"], 1, "{live}");
    assert_eq!(live["pods"], 2, "{live}");
    let failing = states.iter().find(|s| s["state"] == "failing").unwrap();
    assert!(
        failing["reason"]
            .as_str()
            .unwrap()
            .contains("too old resource version"),
        "{failing}"
    );

    let f = select(&lines, "finding", Some("unnated_reply"));
    assert_eq!(f.len(), 2);
    for f in f {
        assert_eq!(f["service_name"], "payments/ledger:grpc", "{f}");
        assert_eq!(f["backend_name"], "payments/ledger-1", "{f}");
        assert_eq!(f["backend_node"], NODE, "{f}");
        assert_eq!(f["client_name"], "shop/checkout-2", "{f}");
        assert_eq!(f["client_node"], NODE, "{f}");
    }
}
