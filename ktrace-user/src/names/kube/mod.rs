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

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;

use crate::background;

use super::status::{SourceState, SourceStatus};
use super::{Names, SourceId};
use cache::Cache;

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
        Pods::Node => "services, endpointslices, pods of this node",
        Pods::Cluster => "services, endpointslices, pods",
        Pods::Off => "services, endpointslices",
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

/// One message of the merged watch streams (boxed: a Pod is large).
enum Msg {
    Svc(Box<watcher::Result<watcher::Event<Service>>>),
    Slice(Box<watcher::Result<watcher::Event<EndpointSlice>>>),
    Pod(Box<watcher::Result<watcher::Event<Pod>>>),
}

type Boxed = std::pin::Pin<Box<dyn Stream<Item = Msg> + Send>>;

fn watch<K>(
    api: Api<K>,
    cfg: watcher::Config,
    wrap: fn(Box<watcher::Result<watcher::Event<K>>>) -> Msg,
) -> Boxed
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher(api, cfg)
        .default_backoff()
        .map(move |r| wrap(Box::new(r)))
        .boxed()
}

async fn run(names: &Names, opts: &KubeOptions) -> Result<(), String> {
    let client = client(opts).await?;
    let mut streams: Vec<Boxed> = vec![
        watch(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
            Msg::Svc,
        ),
        watch(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
            Msg::Slice,
        ),
    ];
    match opts.pods {
        Pods::Node => {
            let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", opts.node));
            streams.push(watch(Api::<Pod>::all(client.clone()), cfg, Msg::Pod));
        }
        Pods::Cluster => streams.push(watch(Api::<Pod>::all(client), Default::default(), Msg::Pod)),
        Pods::Off => {}
    }
    let mut merged = futures::stream::select_all(streams);
    let mut cache = Cache::default();
    let mut dirty = false;
    let mut error: Option<String> = None;
    let mut nodes = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            m = merged.next() => {
                let Some(m) = m else { return Err("the watch streams ended".into()) };
                match apply(&mut cache, m) {
                    Ok(changed) => {
                        dirty |= changed;
                        error = None;
                    }
                    Err(e) => error = Some(e),
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
                let mut st = status(&cache, opts, error.as_deref());
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
    })
}

fn status(cache: &Cache, opts: &KubeOptions, error: Option<&str>) -> SourceStatus {
    let synced = cache.services.synced
        && cache.slices.synced
        && (opts.pods == Pods::Off || cache.pods.synced);
    let state = match (error, synced) {
        (Some(_), _) => SourceState::Failing,
        (None, true) => SourceState::Live,
        (None, false) => SourceState::Starting,
    };
    let mut s = SourceStatus::new(SOURCE, state);
    s.mode = resources(opts.pods);
    s.services = cache.services.map.len() as u64;
    s.endpoints = cache.endpoint_count() as u64;
    s.pods = cache.pods.map.len() as u64;
    s.memory_bytes = Some(cache.approx_bytes());
    s.skipped = cache.skipped();
    s.reason = error.map(|e| format!("{e} (retrying with backoff)"));
    s
}
