//! The names themselves: what a Service port, a Pod and a node are called,
//! and a [`Layer`] of them keyed by address, built whole by one source and
//! swapped in (see [`super::Names`]).
//!
//! Memory matters at 100k Pods: namespaces and node names are shared
//! (`Arc<str>`, interned by [`Interner`]), a Pod keeps only its name.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Transport protocol of a Service port, as kube-proxy writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    pub const ALL: [Proto; 3] = [Proto::Tcp, Proto::Udp, Proto::Sctp];

    /// `tcp`, `TCP`, ... (iptables, nft and the API spell it differently).
    pub fn parse(s: &str) -> Option<Proto> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" | "6" => Some(Proto::Tcp),
            "udp" | "17" => Some(Proto::Udp),
            "sctp" | "132" => Some(Proto::Sctp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }

    pub fn code(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Sctp => 132,
        }
    }

    pub fn from_code(c: u8) -> Option<Proto> {
        match c {
            6 => Some(Proto::Tcp),
            17 => Some(Proto::Udp),
            132 => Some(Proto::Sctp),
            _ => None,
        }
    }
}

/// A Service port: `namespace/name:port` (`namespace/name` when the port
/// has no name), as kube-proxy's comments write it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceName {
    pub namespace: Arc<str>,
    pub name: Box<str>,
    pub port: Box<str>,
}

impl ServiceName {
    /// Parses kube-proxy's `namespace/name:port` (or `namespace/name`).
    pub fn parse(s: &str, interner: &mut Interner) -> Option<ServiceName> {
        let (ns, rest) = s.split_once('/')?;
        let (name, port) = rest.split_once(':').unwrap_or((rest, ""));
        if !valid_label(ns) || !valid_label(name) || !(port.is_empty() || valid_label(port)) {
            return None;
        }
        Some(ServiceName {
            namespace: interner.get(ns),
            name: name.into(),
            port: port.into(),
        })
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// Kubernetes names (DNS labels, port names) are lower-case letters,
/// digits, `-` and `.`; anything else is not a name this parser trusts.
pub fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// A Pod: `namespace/name`, and the node it runs on when known.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodName {
    pub namespace: Arc<str>,
    pub name: Box<str>,
    pub node: Option<Arc<str>>,
}

impl fmt::Display for PodName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What an address (a backend or a client) is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Pod(PodName),
    /// A node's own address (host network, SNAT): `node/NAME`.
    Node(Arc<str>),
    /// Not in the cluster: only said when the Pods of the whole cluster are known.
    External,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Pod(p) => p.fmt(f),
            Peer::Node(n) => write!(f, "node/{n}"),
            Peer::External => f.write_str("external"),
        }
    }
}

/// Shares equal strings (namespaces, node names) between entries.
#[derive(Default, Debug, Clone)]
pub struct Interner {
    set: HashSet<Arc<str>>,
}

impl Interner {
    pub fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.set.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.set.insert(a.clone());
        a
    }
}

/// An address and port of one protocol: a Service VIP or an endpoint.
pub type Key = (IpAddr, u16, Proto);

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Everything one source knows, keyed for lookups by address.
#[derive(Default, Debug, Clone)]
pub struct Layer {
    /// VIP (cluster IP, external IP, load-balancer IP):port -> Service port.
    pub services: Map<Key, Arc<ServiceName>>,
    /// Endpoint ip:port -> the Service port it serves.
    pub endpoints: Map<Key, Arc<ServiceName>>,
    pub pods: Map<IpAddr, PodName>,
    pub nodes: Map<IpAddr, Arc<str>>,
    /// Addresses known to be outside the cluster (from a recording).
    pub external: HashSet<IpAddr, foldhash::fast::RandomState>,
}

impl Layer {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.endpoints.is_empty()
            && self.pods.is_empty()
            && self.nodes.is_empty()
            && self.external.is_empty()
    }

    /// The Service port at `a`, whatever its protocol when `proto` is not given.
    pub fn service(&self, a: SocketAddr, proto: Option<Proto>) -> Option<&Arc<ServiceName>> {
        by_proto(&self.services, a, proto)
    }

    /// The Service whose endpoint `a` is.
    pub fn endpoint(&self, a: SocketAddr, proto: Option<Proto>) -> Option<&Arc<ServiceName>> {
        by_proto(&self.endpoints, a, proto)
    }

    /// The Pod or node at `ip`.
    pub fn peer(&self, ip: IpAddr) -> Option<Peer> {
        if let Some(p) = self.pods.get(&ip) {
            return Some(Peer::Pod(p.clone()));
        }
        if let Some(n) = self.nodes.get(&ip) {
            return Some(Peer::Node(n.clone()));
        }
        self.external.contains(&ip).then_some(Peer::External)
    }

    /// Distinct Service ports named.
    pub fn service_count(&self) -> usize {
        let all: HashSet<&ServiceName> = self
            .services
            .values()
            .chain(self.endpoints.values())
            .map(|s| &**s)
            .collect();
        all.len()
    }
}

fn by_proto(
    m: &Map<Key, Arc<ServiceName>>,
    a: SocketAddr,
    proto: Option<Proto>,
) -> Option<&Arc<ServiceName>> {
    if m.is_empty() {
        return None;
    }
    match proto {
        Some(p) => m.get(&(a.ip(), a.port(), p)),
        None => Proto::ALL
            .iter()
            .find_map(|p| m.get(&(a.ip(), a.port(), *p))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_parse_as_kube_proxy_writes_them() {
        let mut i = Interner::default();
        let s = ServiceName::parse("payments/ledger:grpc", &mut i).unwrap();
        assert_eq!(s.to_string(), "payments/ledger:grpc");
        let s = ServiceName::parse("default/web", &mut i).unwrap();
        assert_eq!((&*s.name, &*s.port), ("web", ""));
        assert_eq!(s.to_string(), "default/web");
        for bad in ["", "nons", "a/", "/b", "A/b:c", "a/b:c d", "a/b/c"] {
            assert!(ServiceName::parse(bad, &mut i).is_none(), "{bad}");
        }
    }

    #[test]
    fn lookups_fall_back_across_protocols() {
        let mut i = Interner::default();
        let mut l = Layer::default();
        let svc = Arc::new(ServiceName::parse("kube-system/kube-dns:dns", &mut i).unwrap());
        let vip: SocketAddr = "10.96.0.10:53".parse().unwrap();
        l.services.insert((vip.ip(), 53, Proto::Udp), svc.clone());
        assert_eq!(l.service(vip, None), Some(&svc));
        assert_eq!(l.service(vip, Some(Proto::Tcp)), None);
        assert_eq!(l.service("10.96.0.10:54".parse().unwrap(), None), None);
        let ip: IpAddr = "10.0.1.2".parse().unwrap();
        assert_eq!(l.peer(ip), None);
        l.nodes.insert(ip, i.get("node-a"));
        assert_eq!(l.peer(ip).unwrap().to_string(), "node/node-a");
    }
}
