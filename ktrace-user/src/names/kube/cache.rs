//! What ktrace keeps of the API's objects: only the addresses and names it
//! needs (no managedFields, annotations, labels or specs), converted as
//! each object arrives, and the [`Layer`] built from them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::Event;
use kube::Resource as _;

use super::lenient::Lenient;

use crate::names::model::{
    valid_label, Interner, Key, Layer, Peer, PodName, PortRole, Proto, ServiceName,
};

/// `namespace/name` of an object.
pub type ObjKey = (Box<str>, Box<str>);

/// One Service, stripped: its ports at each of its VIPs.
#[derive(Debug, Clone, PartialEq)]
pub struct SvcEntry {
    /// (VIP:port/proto, port name)
    pub ports: Vec<(Key, Box<str>)>,
}

/// One endpoint of an EndpointSlice, stripped.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceEp {
    pub key: Key,
    pub port_name: Box<str>,
    /// The Pod behind it (`targetRef`), and its node.
    pub pod: Option<Box<str>>,
    pub node: Option<Box<str>>,
}

/// One EndpointSlice, stripped: the Service it belongs to and its endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceEntry {
    pub service: Box<str>,
    pub eps: Vec<SliceEp>,
}

/// One Pod, stripped.
#[derive(Debug, Clone, PartialEq)]
pub struct PodEntry {
    pub ips: Vec<IpAddr>,
    pub node: Option<Box<str>>,
    pub host_ip: Option<IpAddr>,
    pub host_network: bool,
}

/// One Node, stripped: its own addresses (`InternalIP`, `ExternalIP`).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeEntry {
    pub ips: Vec<IpAddr>,
}

fn obj_key(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<ObjKey> {
    let ns = m.namespace.as_deref()?;
    let name = m.name.as_deref()?;
    (valid_label(ns) && valid_label(name)).then(|| (ns.into(), name.into()))
}

/// A Service as ktrace keeps it; `None` when it is malformed (counted).
pub fn service(s: &Service) -> Option<(ObjKey, SvcEntry)> {
    let key = obj_key(&s.metadata)?;
    let spec = s.spec.as_ref()?;
    let mut vips: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    vips.extend(spec.cluster_ip.as_deref());
    vips.extend(spec.external_ips.iter().flatten().map(String::as_str));
    let lb = s.status.as_ref().and_then(|st| st.load_balancer.as_ref());
    vips.extend(
        lb.and_then(|l| l.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.as_deref()),
    );
    let mut ips = Vec::new();
    for v in vips {
        if v.is_empty() || v == "None" {
            continue; // headless
        }
        let ip: IpAddr = v.parse().ok()?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        let proto = Proto::parse(p.protocol.as_deref().unwrap_or("TCP"))?;
        let port = u16::try_from(p.port).ok()?;
        let name: Box<str> = p.name.as_deref().unwrap_or("").into();
        if !(name.is_empty() || valid_label(&name)) {
            return None;
        }
        for ip in &ips {
            ports.push(((*ip, port, proto), name.clone()));
        }
    }
    Some((key, SvcEntry { ports }))
}

/// An EndpointSlice as ktrace keeps it; `None` when malformed (counted).
pub fn slice(s: &EndpointSlice) -> Option<(ObjKey, SliceEntry)> {
    let key = obj_key(&s.metadata)?;
    let service = s
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("kubernetes.io/service-name"))?;
    if !valid_label(service) {
        return None;
    }
    let mut eps = Vec::new();
    for e in &s.endpoints {
        let pod = e
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| r.name.as_deref())
            .map(Box::from);
        for a in &e.addresses {
            let ip: IpAddr = a.parse().ok()?;
            for p in s.ports.iter().flatten() {
                let proto = Proto::parse(p.protocol.as_deref().unwrap_or("TCP"))?;
                let Some(port) = p.port.and_then(|p| u16::try_from(p).ok()) else {
                    continue; // a port of no number matches nothing
                };
                eps.push(SliceEp {
                    key: (ip, port, proto),
                    port_name: p.name.as_deref().unwrap_or("").into(),
                    pod: pod.clone(),
                    node: e.node_name.as_deref().map(Box::from),
                });
            }
        }
    }
    Some((
        key,
        SliceEntry {
            service: service.as_str().into(),
            eps,
        },
    ))
}

/// A Pod as ktrace keeps it; `None` when malformed (counted).
pub fn pod(p: &Pod) -> Option<(ObjKey, PodEntry)> {
    let key = obj_key(&p.metadata)?;
    let spec = p.spec.as_ref();
    let st = p.status.as_ref();
    let mut ips = Vec::new();
    let listed = st
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .map(|i| i.ip.as_str());
    for a in listed.chain(st.and_then(|s| s.pod_ip.as_deref())) {
        let ip: IpAddr = a.parse().ok()?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let host_ip = match st.and_then(|s| s.host_ip.as_deref()) {
        Some(h) => Some(h.parse().ok()?),
        None => None,
    };
    Some((
        key,
        PodEntry {
            ips,
            node: spec.and_then(|s| s.node_name.as_deref()).map(Box::from),
            host_ip,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        },
    ))
}

/// A Node as ktrace keeps it (key `("", name)`: Nodes have no
/// namespace); `None` when malformed (counted).
pub fn node(n: &Node) -> Option<(ObjKey, NodeEntry)> {
    let name = n.metadata.name.as_deref().filter(|n| valid_label(n))?;
    let mut ips = Vec::new();
    let addrs = n.status.as_ref().and_then(|s| s.addresses.as_ref());
    for a in addrs.into_iter().flatten() {
        if a.type_ == "InternalIP" || a.type_ == "ExternalIP" {
            let ip: IpAddr = a.address.parse().ok()?;
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
    }
    Some((("".into(), name.into()), NodeEntry { ips }))
}

/// The key of an object the watcher sent, from its metadata alone (a
/// Node's namespace is none: `""`).
fn meta_key(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<ObjKey> {
    let ns = m.namespace.as_deref().unwrap_or("");
    Some((ns.into(), m.name.as_deref()?.into()))
}

/// The objects of one resource, kept through the watcher's relists: a
/// relist (`Init` .. `InitDone`) builds a new map that replaces the old
/// one whole, so objects deleted while the watch was down disappear.
#[derive(Debug)]
pub struct Store<V> {
    pub map: HashMap<ObjKey, V>,
    relist: Option<HashMap<ObjKey, V>>,
    /// Listed at least once.
    pub synced: bool,
    /// Objects skipped as malformed.
    pub skipped: u64,
}

impl<V> Default for Store<V> {
    fn default() -> Self {
        Store {
            map: HashMap::new(),
            relist: None,
            synced: false,
            skipped: 0,
        }
    }
}

impl<V> Store<V> {
    /// Applies a watcher event; true when what is named changed. An object
    /// that is malformed (its JSON not its kind's, or its content not what
    /// names need) is skipped, counted, and its old name dropped.
    pub fn apply<K>(
        &mut self,
        ev: Event<Lenient<K>>,
        convert: impl Fn(&K) -> Option<(ObjKey, V)>,
    ) -> bool
    where
        K: kube::Resource<DynamicType = ()>,
    {
        match ev {
            Event::Init => {
                self.relist = Some(HashMap::new());
                false
            }
            Event::InitApply(o) => {
                if let Some((k, v)) = self.convert(&o, &convert) {
                    match &mut self.relist {
                        Some(r) => r.insert(k, v),
                        None => self.map.insert(k, v),
                    };
                }
                false
            }
            Event::InitDone => {
                if let Some(r) = self.relist.take() {
                    self.map = r;
                }
                self.synced = true;
                true
            }
            Event::Apply(o) => {
                match self.convert(&o, &convert) {
                    Some((k, v)) => self.map.insert(k, v),
                    // A malformed update must not leave a stale name behind.
                    None => meta_key(o.meta()).and_then(|k| self.map.remove(&k)),
                };
                true
            }
            Event::Delete(o) => {
                if let Some(k) = meta_key(o.meta()) {
                    self.map.remove(&k);
                }
                true
            }
        }
    }

    /// The entry of `o`, or `None` (counted, with a warning) when malformed.
    fn convert<K: kube::Resource<DynamicType = ()>>(
        &mut self,
        o: &Lenient<K>,
        convert: impl Fn(&K) -> Option<(ObjKey, V)>,
    ) -> Option<(ObjKey, V)> {
        let why = match o {
            Lenient::Ok(k) => match convert(k) {
                Some(kv) => return Some(kv),
                None => "an address, port or name is not valid".to_string(),
            },
            Lenient::Malformed { error, .. } => format!("its JSON is not a valid object: {error}"),
        };
        self.skipped += 1;
        let m = o.meta();
        tracing::warn!(
            "Kubernetes names: {} {}/{} skipped: {why}",
            K::kind(&()),
            m.namespace.as_deref().unwrap_or(""),
            m.name.as_deref().unwrap_or("?"),
        );
        None
    }
}

/// One shared name per Service port (its VIPs and endpoints point to it).
type SvcNames<'a> =
    HashMap<(&'a str, &'a str, &'a str), Arc<ServiceName>, foldhash::fast::RandomState>;

fn svc_name<'a>(
    names: &mut SvcNames<'a>,
    i: &mut Interner,
    ns: &'a str,
    svc: &'a str,
    port: &'a str,
) -> Arc<ServiceName> {
    names
        .entry((ns, svc, port))
        .or_insert_with(|| {
            Arc::new(ServiceName {
                namespace: i.get(ns),
                name: svc.into(),
                port: port.into(),
            })
        })
        .clone()
}

/// Everything the API source keeps.
#[derive(Debug, Default)]
pub struct Cache {
    pub services: Store<SvcEntry>,
    pub slices: Store<SliceEntry>,
    pub pods: Store<PodEntry>,
    pub nodes: Store<NodeEntry>,
}

impl Cache {
    /// The layer these objects name. A Pod's own object names its address
    /// over the endpoints that point to it: the Pods come first, and an
    /// endpoint's Pod is made only for an address they did not name.
    pub fn layer(&self) -> Layer {
        let mut i = Interner::default();
        let mut l = Layer::with_capacity(self.addr_estimate());
        let mut svc_names = SvcNames::default();
        for ((ns, name), e) in &self.services.map {
            for (key, port) in &e.ports {
                let n = svc_name(&mut svc_names, &mut i, ns, name, port);
                l.add_port(PortRole::Vip, *key, n);
            }
        }
        for ((_, name), n) in &self.nodes.map {
            let name = i.get(name);
            for ip in &n.ips {
                l.set_peer(*ip, Peer::Node(name.clone()));
            }
        }
        for ((ns, name), p) in &self.pods.map {
            let node = p.node.as_deref().map(|n| i.get(n));
            if let (Some(h), Some(n)) = (p.host_ip, &node) {
                l.set_peer(h, Peer::Node(n.clone()));
            }
            for ip in &p.ips {
                if p.host_network {
                    if let Some(n) = &node {
                        l.set_peer(*ip, Peer::Node(n.clone()));
                    }
                    continue;
                }
                let pod = PodName {
                    namespace: i.get(ns),
                    name: name.clone(),
                    node: node.clone(),
                };
                l.set_peer(*ip, Peer::Pod(Arc::new(pod)));
            }
        }
        for ((ns, _), e) in &self.slices.map {
            for ep in &e.eps {
                let n = svc_name(&mut svc_names, &mut i, ns, &e.service, &ep.port_name);
                l.add_port(PortRole::Endpoint, ep.key, n);
                // The Pod the endpoint points to, unless the Pods named it.
                if let Some(pod) = &ep.pod {
                    l.set_pod_if_unknown(ep.key.0, || PodName {
                        namespace: i.get(ns),
                        name: pod.clone(),
                        node: ep.node.as_deref().map(|n| i.get(n)),
                    });
                }
            }
        }
        l
    }

    /// About how many addresses [`layer`](Self::layer) names: VIPs, nodes,
    /// and Pods or endpoints, whichever are more (an endpoint is mostly a
    /// Pod's address).
    fn addr_estimate(&self) -> usize {
        let vips: usize = (self.services.map.values())
            .map(|e| {
                usize::from(!e.ports.is_empty())
                    + e.ports
                        .windows(2)
                        .filter(|w| w[0].0 .0 != w[1].0 .0)
                        .count()
            })
            .sum();
        let pods: usize = self.pods.map.values().map(|p| p.ips.len()).sum();
        let nodes: usize = self.nodes.map.values().map(|n| n.ips.len()).sum();
        vips + nodes + pods.max(self.endpoint_count())
    }

    pub fn skipped(&self) -> u64 {
        self.services.skipped + self.slices.skipped + self.pods.skipped + self.nodes.skipped
    }

    pub fn endpoint_count(&self) -> usize {
        self.slices.map.values().map(|s| s.eps.len()).sum()
    }
}

impl Cache {
    /// An estimate of the bytes the cache holds (entries, their strings and
    /// vectors, and the maps' slots), for the status line.
    pub fn approx_bytes(&self) -> u64 {
        use std::mem::size_of;
        fn key(k: &ObjKey) -> usize {
            k.0.len() + k.1.len()
        }
        let slot = |v: usize| size_of::<ObjKey>() + v + 1;
        let mut n = 0usize;
        for (k, e) in &self.services.map {
            n += slot(size_of::<SvcEntry>()) + key(k);
            n += e
                .ports
                .iter()
                .map(|(_, p)| size_of::<(Key, Box<str>)>() + p.len())
                .sum::<usize>();
        }
        for (k, e) in &self.slices.map {
            n += slot(size_of::<SliceEntry>()) + key(k) + e.service.len();
            n += e
                .eps
                .iter()
                .map(|ep| {
                    size_of::<SliceEp>()
                        + ep.port_name.len()
                        + ep.pod.as_ref().map_or(0, |p| p.len())
                        + ep.node.as_ref().map_or(0, |p| p.len())
                })
                .sum::<usize>();
        }
        for (k, p) in &self.pods.map {
            n += slot(size_of::<PodEntry>()) + key(k) + p.ips.len() * size_of::<IpAddr>();
            n += p.node.as_ref().map_or(0, |s| s.len());
        }
        for (k, e) in &self.nodes.map {
            n += slot(size_of::<NodeEntry>()) + key(k) + e.ips.len() * size_of::<IpAddr>();
        }
        n as u64
    }
}
