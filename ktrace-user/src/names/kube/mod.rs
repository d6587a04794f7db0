//! Source 1: the Kubernetes API, through kube's watcher: Services and
//! EndpointSlices of the whole cluster, Pods of this node
//! (`spec.nodeName=NODE`) or of the cluster (`--kube-pods`).
//!
//! It runs on a thread and runtime of its own, so the event path never
//! waits for it. The watcher lists, then watches; on `410 Gone` (the
//! resource version expired) it lists again, and on errors it backs off
//! (kube's default backoff). Objects are stripped to what names need as
//! they arrive ([`cache`]); the layer is rebuilt and swapped in at most
//! twice a second, when something changed.

pub mod cache;
pub mod lenient;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;

use crate::background;

use super::status::{SourceState, SourceStatus};
use super::{Names, SourceId};
use cache::Cache;
use lenient::Lenient;

pub const SOURCE: &str = "kubernetes-api";

/// Which Pods to watch (`--kube-pods`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pods {
    Node,
    Cluster,
    Off,
}

#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// `--kubeconfig`; else in-cluster, `KUBECONFIG`, `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    pub pods: Pods,
    /// This node's name (the Pods' field selector).
    pub node: String,
}

/// Where a client configuration could come from, if anywhere.
fn config_available(opts: &KubeOptions) -> bool {
    opts.kubeconfig.is_some()
        || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        || std::env::var_os("KUBECONFIG").is_some()
        || std::env::var_os("HOME")
            .is_some_and(|h| std::path::Path::new(&h).join(".kube/config").is_file())
}

/// Starts the API source on its own thread (or says why it is off).
pub fn start(names: Arc<Names>, opts: KubeOptions) {
    if !config_available(&opts) {
        names.set_status(SourceStatus::off(
            SOURCE,
            "no API credentials: not in a Pod (no KUBERNETES_SERVICE_HOST), no --kubeconfig, KUBECONFIG or ~/.kube/config",
        ));
        return;
    }
    let mut st = SourceStatus::new(SOURCE, SourceState::Starting);
    st.mode = resources(opts.pods);
    names.set_status(st);
    let n = names.clone();
    let failed = names.clone();
    let spawned = background::spawn(
        "ktrace-names-api",
        move || async move {
            if let Err(why) = run(&n, &opts).await {
                n.set_status(SourceStatus::off(SOURCE, why));
            }
        },
        move |why| failed.set_status(SourceStatus::off(SOURCE, why)),
    );
    if let Err(e) = spawned {
        names.set_status(SourceStatus::off(SOURCE, format!("cannot start: {e}")));
    }
}

fn resources(pods: Pods) -> String {
    match pods {
        Pods::Node => "services, endpointslices, pods of this node, nodes",
        Pods::Cluster => "services, endpointslices, pods, nodes",
        Pods::Off => "services, endpointslices, nodes",
    }
    .into()
}

async fn client(opts: &KubeOptions) -> Result<kube::Client, String> {
    let config = match &opts.kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| format!("{}: {e}", p.display()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| format!("no usable API configuration: {e}"))?,
    };
    kube::Client::try_from(config).map_err(|e| format!("cannot build an API client: {e}"))
}

/// A watcher's item: an event about objects that may be malformed.
type Item<K> = Box<watcher::Result<watcher::Event<Lenient<K>>>>;

/// One message of the merged watch streams (boxed: a Pod is large).
enum Msg {
    Svc(Item<Service>),
    Slice(Item<EndpointSlice>),
    Pod(Item<Pod>),
    Node(Item<Node>),
}

impl Msg {
    /// Which resource (an index into the per-resource errors).
    fn resource(&self) -> usize {
        match self {
            Msg::Svc(_) => 0,
            Msg::Slice(_) => 1,
            Msg::Pod(_) => 2,
            Msg::Node(_) => NODES,
        }
    }
}

/// The resource names of [`Msg::resource`]; Nodes are optional (without
/// them, node names come from the Pods' host IPs).
const RESOURCES: [&str; 4] = ["services", "endpointslices", "pods", "nodes"];
const NODES: usize = 3;

type Boxed = std::pin::Pin<Box<dyn Stream<Item = Msg> + Send>>;

fn watch<K>(api: Api<Lenient<K>>, cfg: watcher::Config, wrap: fn(Item<K>) -> Msg) -> Boxed
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Clone + Default + Send + Sync,
{
    watcher(api, cfg)
        .default_backoff()
        .map(move |r| wrap(Box::new(r)))
        .boxed()
}

async fn run(names: &Names, opts: &KubeOptions) -> Result<(), String> {
    let client = client(opts).await?;
    let mut streams: Vec<Boxed> = vec![
        watch(Api::all(client.clone()), Default::default(), Msg::Svc),
        watch(Api::all(client.clone()), Default::default(), Msg::Slice),
        watch(Api::all(client.clone()), Default::default(), Msg::Node),
    ];
    match opts.pods {
        Pods::Node => {
            let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", opts.node));
            streams.push(watch(Api::all(client), cfg, Msg::Pod));
        }
        Pods::Cluster => streams.push(watch(Api::all(client), Default::default(), Msg::Pod)),
        Pods::Off => {}
    }
    let mut merged = futures::stream::select_all(streams);
    let mut cache = Cache::default();
    let mut dirty = false;
    // The last error of each resource's watch, until it delivers again.
    let mut errors: [Option<String>; 4] = Default::default();
    let mut nodes = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            m = merged.next() => {
                let Some(m) = m else { return Err("the watch streams ended".into()) };
                let r = m.resource();
                match apply(&mut cache, m) {
                    Ok(changed) => {
                        dirty |= changed;
                        errors[r] = None;
                    }
                    Err(e) => errors[r] = Some(e),
                }
            }
            _ = tick.tick() => {
                if dirty {
                    dirty = false;
                    let layer = cache.layer();
                    nodes = layer.counts().nodes as u64;
                    names.publish(SourceId::Api, layer);
                    names.set_complete(opts.pods == Pods::Cluster && cache.pods.synced);
                }
                let mut st = status(&cache, opts, &errors);
                st.nodes = nodes;
                names.set_status(st);
            }
        }
    }
}

/// Applies one watch message; `Err` says what failed (the watcher retries).
fn apply(cache: &mut Cache, m: Msg) -> Result<bool, String> {
    let what = |e: watcher::Error| e.to_string();
    Ok(match m {
        Msg::Svc(r) => cache.services.apply((*r).map_err(what)?, cache::service),
        Msg::Slice(r) => cache.slices.apply((*r).map_err(what)?, cache::slice),
        Msg::Pod(r) => cache.pods.apply((*r).map_err(what)?, cache::pod),
        Msg::Node(r) => cache.nodes.apply((*r).map_err(what)?, cache::node),
    })
}

/// The source's state: failing while a needed resource's watch fails
/// (Nodes are not needed: without them, the reason says so).
fn status(cache: &Cache, opts: &KubeOptions, errors: &[Option<String>; 4]) -> SourceStatus {
    let synced = cache.services.synced
        && cache.slices.synced
        && (opts.pods == Pods::Off || cache.pods.synced);
    let failing: Vec<String> = errors
        .iter()
        .zip(RESOURCES)
        .filter_map(|(e, r)| e.as_ref().map(|e| format!("{r}: {e}")))
        .collect();
    let needed_fails = errors[..NODES].iter().any(Option::is_some);
    let state = match (needed_fails, synced) {
        (true, _) => SourceState::Failing,
        (false, true) => SourceState::Live,
        (false, false) => SourceState::Starting,
    };
    let mut s = SourceStatus::new(SOURCE, state);
    s.mode = resources(opts.pods);
    s.services = cache.services.map.len() as u64;
    s.endpoints = cache.endpoint_count() as u64;
    s.pods = cache.pods.map.len() as u64;
    s.memory_bytes = Some(cache.approx_bytes());
    s.skipped = cache.skipped();
    s.reason = (!failing.is_empty()).then(|| {
        let mut r = format!("{} (retrying with backoff)", failing.join("; "));
        if errors[NODES].is_some() {
            r.push_str("; without Nodes, node names come from the Pods' host IPs only");
        }
        r
    });
    s
}
