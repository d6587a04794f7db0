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
    Node, NodeAddress, NodeStatus, ObjectReference, Pod, PodIP, PodSpec, PodStatus, Service,
    ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use ktrace_tests::{select, skip, Lab, Scratch, Watch, BACKENDS, CLIENT_IP, VIP};
use kube_api::{count, ApiServer, Res};
use serde_json::{json, Value};

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

fn node(name: &str, internal_ip: &str) -> Value {
    let n = Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        status: Some(NodeStatus {
            addresses: Some(vec![
                NodeAddress {
                    type_: "Hostname".into(),
                    address: name.into(),
                },
                NodeAddress {
                    type_: "InternalIP".into(),
                    address: internal_ip.into(),
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    };
    serde_json::to_value(n).unwrap()
}

/// The states the API source reported in `names` lines, in order.
fn api_states(l: &[Value]) -> Vec<Value> {
    select(l, "names", None)
        .into_iter()
        .flat_map(|n| n["sources"].as_array().unwrap().clone())
        .filter(|s| s["source"] == "kubernetes-api")
        .collect()
}

/// `ktrace watch` in the lab's node namespace, its names from the API
/// server (a kubeconfig in a scratch directory kept as long as the watch).
fn watch_with_api(lab: &Lab, api: &ApiServer, tag: &str) -> (Watch, Scratch) {
    let scratch = Scratch::new(tag);
    let kubeconfig = scratch.path("kubeconfig");
    api.kubeconfig(&kubeconfig);
    let watch = lab.watch(&["--kubeconfig", &kubeconfig, "--node-name", NODE]);
    (watch, scratch)
}

/// Once the names are in (the layer is swapped twice a second), the
/// un-NATed reply incident on two connections: two findings.
fn two_unnated_replies(lab: &Lab, watch: &Watch) {
    std::thread::sleep(Duration::from_millis(1000));
    let mut c = lab.client(2);
    assert_eq!(c.unnat_all(Duration::from_millis(1000)).len(), 2);
    assert!(watch.wait_count(Duration::from_secs(5), "finding", Some("unnated_reply"), 2));
}

/// Services, EndpointSlices and Pods are watched: Pods of this node only,
/// Services and EndpointSlices cluster-wide.
fn watches_pods_of_this_node_and_the_rest_cluster_wide(api: &ApiServer) {
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
    for r in api.requests() {
        if r.res == Res::Pods {
            assert!(
                r.query.contains("fieldSelector=spec.nodeName%3Dlab-node"),
                "{r:?}"
            );
        }
    }
}

/// The watches are cut, and while ktrace is away the client Pod is
/// replaced and the history compacted: resuming gets 410 Gone, and ktrace
/// lists again.
fn relists_after_410_gone(api: &ApiServer) {
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
}

/// The API source ends live, with the malformed Service skipped and
/// counted, after failing on the 410.
fn live_again_after_failing_on_410(status: &Value, lines: &[Value]) {
    let src = status["names"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["source"] == "kubernetes-api")
        .unwrap()
        .clone();
    assert_ne!(src["state"], "off", "{src}");
    let states = api_states(lines);
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

    lab.start_server();
    let (watch, _scratch) = watch_with_api(&lab, &api, "names-api");
    watches_pods_of_this_node_and_the_rest_cluster_wide(&api);

    // Over the watch: the backend Pod is replaced (same IP, new name).
    api.delete(Res::Pods, "payments", "ledger-0");
    api.apply(Res::Pods, pod("payments", "ledger-1", BACKENDS[0]));
    api.apply(Res::Slices, slice("ledger-1"));
    std::thread::sleep(Duration::from_millis(1500)); // a BOOKMARK goes by too

    relists_after_410_gone(&api);
    // The status tells the truth: failing on 410 Gone, live again once listed.
    assert!(
        watch.wait_for(Duration::from_secs(30), |l| {
            let st = api_states(l);
            st.iter().any(|s| s["state"] == "failing")
                && st.last().is_some_and(|s| s["state"] == "live")
        }),
        "the API source did not report failing then live: {:?}",
        api_states(&watch.lines())
    );
    two_unnated_replies(&lab, &watch);
    let status = watch.status.clone();
    let lines = watch.stop();

    live_again_after_failing_on_410(&status, &lines);
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

/// Over the watch: a Pod whose JSON is not a Pod's, a good Pod updated
/// into a malformed one (its name must go), then the Node whose InternalIP
/// is the client's address (it must still be applied).
fn malformed_pods_then_the_clients_node(api: &ApiServer) {
    api.apply(
        Res::Pods,
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "weird", "namespace": "shop"},
               "spec": {"containers": 7}}),
    );
    api.apply(
        Res::Pods,
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "temp-1", "namespace": "shop"},
               "status": {"podIPs": "10.9.9.9"}}),
    );
    api.apply(Res::Nodes, node("worker-2", CLIENT_IP));
}

/// A client address that is a node's (`node/NAME`, from the Node's
/// InternalIP, known from a watch event), and objects whose JSON is not
/// their kind's (a field of the wrong type) in the first list and over the
/// watch: each skipped and counted in the `names` status, with a warning,
/// and the watches go on (the names that come after them are used).
#[test]
fn api_names_nodes_and_malformed_objects() {
    if skip() {
        return;
    }
    let mut lab = Lab::new("nm", 1);
    let api = ApiServer::start(&lab.node);
    api.apply(Res::Services, service("payments", "ledger", VIP));
    // JSON that is not a Service, nor a Node: the list must still be read.
    api.apply(
        Res::Services,
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "garbled", "namespace": "payments"},
               "spec": {"clusterIP": VIP, "ports": "not-a-list"}}),
    );
    api.apply(
        Res::Nodes,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "bad-node"},
               "status": {"addresses": 42}}),
    );
    api.apply(Res::Nodes, node(NODE, "10.0.0.1"));
    api.apply(Res::Slices, slice("ledger-0"));
    api.apply(Res::Pods, pod("payments", "ledger-0", BACKENDS[0]));
    api.apply(Res::Pods, pod("shop", "temp-1", "10.9.9.9"));

    lab.start_server();
    let (watch, _scratch) = watch_with_api(&lab, &api, "names-api-nodes");
    // The source may be live by the time the status line is printed (then
    // no `names` line follows until something changes).
    let at_start: Vec<Value> = watch.status["names"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["source"] == "kubernetes-api")
        .cloned()
        .collect();
    let states = |l: &[Value]| [at_start.clone(), api_states(l)].concat();
    assert!(
        watch.wait_for(Duration::from_secs(30), |l| states(l)
            .last()
            .is_some_and(|s| s["state"] == "live")),
        "the API source did not go live: {:?}",
        states(&watch.lines())
    );
    assert!(
        count(&api.requests(), Res::Nodes, true) >= 1,
        "Nodes not watched"
    );
    malformed_pods_then_the_clients_node(&api);
    assert!(
        watch.wait_for(Duration::from_secs(10), |l| api_states(l)
            .last()
            .is_some_and(|s| s["skipped"].as_u64() >= Some(4))),
        "the malformed objects were not all counted: {:?}",
        api_states(&watch.lines())
    );
    two_unnated_replies(&lab, &watch);
    let stderr = watch.stderr();
    let lines = watch.stop();

    let states = states(&lines);
    assert!(
        states.iter().all(|s| s["state"] != "failing"),
        "a malformed object failed the watch: {states:?}"
    );
    let last = states.last().unwrap();
    assert_eq!(last["state"], "live", "{last}");
    assert_eq!(last["services"], 1, "{last}");
    // ledger-0 only: `weird` never parsed, `temp-1` dropped by its bad update.
    assert_eq!(last["pods"], 1, "{last}");
    assert_eq!(last["skipped"], 4, "{last}");
    for what in [
        "Service payments/garbled",
        "Node /bad-node",
        "Pod shop/weird",
        "Pod shop/temp-1",
    ] {
        assert!(stderr.contains(what), "no warning for {what}: {stderr}");
    }
    let f = select(&lines, "finding", Some("unnated_reply"));
    assert_eq!(f.len(), 2);
    for f in f {
        assert_eq!(f["service_name"], "payments/ledger:grpc", "{f}");
        assert_eq!(f["backend_name"], "payments/ledger-0", "{f}");
        assert_eq!(f["client_name"], "node/worker-2", "{f}");
    }
}
