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

use smallvec::SmallVec;

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

/// What an address (a backend or a client) is. Cheap to clone (the event
/// path hands these out per finding).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Peer {
    Pod(Arc<PodName>),
    /// A node's own address (host network, SNAT): `node/NAME`.
    Node(Arc<str>),
    /// Not in the cluster: only said when the Pods of the whole cluster are known.
    External,
}

impl Peer {
    /// Which of two names of one address wins: a Pod over a node over `external`.
    fn rank(&self) -> u8 {
        match self {
            Peer::Pod(_) => 2,
            Peer::Node(_) => 1,
            Peer::External => 0,
        }
    }
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

/// What a Service port is to an address: served at it (a VIP: cluster IP,
/// external IP, load-balancer IP) or behind it (an endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortRole {
    Vip,
    Endpoint,
}

/// One Service port at an address.
#[derive(Debug, Clone, PartialEq)]
pub struct PortName {
    pub port: u16,
    pub proto: Proto,
    pub role: PortRole,
    pub name: Arc<ServiceName>,
}

/// Everything one source knows about one IP address: what it is (a Pod,
/// a node) and the Service ports at it. One hash lookup answers every
/// question about an address, which is what the event path asks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AddrNames {
    pub peer: Option<Peer>,
    /// Few: the ports of the Services at a VIP, or those an endpoint
    /// serves; the first kept inline (the lookup reads no other memory).
    pub ports: SmallVec<[PortName; 1]>,
}

impl AddrNames {
    /// The Service port at `port` in `role`; of any protocol (TCP first)
    /// when `proto` is not given.
    pub fn port(
        &self,
        role: PortRole,
        port: u16,
        proto: Option<Proto>,
    ) -> Option<(Proto, &Arc<ServiceName>)> {
        self.ports
            .iter()
            .filter(|p| p.role == role && p.port == port && proto.is_none_or(|x| x == p.proto))
            .min_by_key(|p| p.proto)
            .map(|p| (p.proto, &p.name))
    }

    pub fn is_vip(&self) -> bool {
        self.ports.iter().any(|p| p.role == PortRole::Vip)
    }
}

/// How many names a layer holds, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub vips: usize,
    pub endpoints: usize,
    pub pods: usize,
    pub nodes: usize,
}

/// Everything one source knows, keyed by IP address for the event path.
#[derive(Default, Debug, Clone)]
pub struct Layer {
    addrs: Map<IpAddr, AddrNames>,
}

impl Layer {
    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    /// All that is known about `ip`.
    #[inline]
    pub fn get(&self, ip: IpAddr) -> Option<&AddrNames> {
        if self.addrs.is_empty() {
            return None;
        }
        self.addrs.get(&ip)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&IpAddr, &AddrNames)> {
        self.addrs.iter()
    }

    /// `key` is this Service port, as a VIP or as an endpoint (replacing
    /// what the same key named before).
    pub fn add_port(&mut self, role: PortRole, key: Key, name: Arc<ServiceName>) {
        let (ip, port, proto) = key;
        let ports = &mut self.addrs.entry(ip).or_default().ports;
        let new = PortName {
            port,
            proto,
            role,
            name,
        };
        match ports
            .iter_mut()
            .find(|p| p.role == role && p.port == port && p.proto == proto)
        {
            Some(p) => *p = new,
            None => ports.push(new),
        }
    }

    /// `ip` is `peer`, unless something ranked higher names it already
    /// (a Pod over a node over `external`; the later of equals wins).
    pub fn set_peer(&mut self, ip: IpAddr, peer: Peer) {
        let e = self.addrs.entry(ip).or_default();
        if e.peer.as_ref().is_none_or(|p| p.rank() <= peer.rank()) {
            e.peer = Some(peer);
        }
    }

    /// `ip` is this Pod unless a Pod is named there already.
    pub fn set_pod_if_unknown(&mut self, ip: IpAddr, pod: impl FnOnce() -> PodName) {
        let e = self.addrs.entry(ip).or_default();
        if !matches!(e.peer, Some(Peer::Pod(_))) {
            e.peer = Some(Peer::Pod(Arc::new(pod())));
        }
    }

    /// The Service port at `a`, whatever its protocol when `proto` is not given.
    pub fn service(&self, a: SocketAddr, proto: Option<Proto>) -> Option<&Arc<ServiceName>> {
        self.get(a.ip())?
            .port(PortRole::Vip, a.port(), proto)
            .map(|p| p.1)
    }

    /// The Service whose endpoint `a` is.
    pub fn endpoint(&self, a: SocketAddr, proto: Option<Proto>) -> Option<&Arc<ServiceName>> {
        self.get(a.ip())?
            .port(PortRole::Endpoint, a.port(), proto)
            .map(|p| p.1)
    }

    /// The Pod or node at `ip`.
    pub fn peer(&self, ip: IpAddr) -> Option<&Peer> {
        self.get(ip)?.peer.as_ref()
    }

    /// VIP ports, endpoints, Pod IPs and node IPs named (a walk over the
    /// layer: for status lines, not for the event path).
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for e in self.addrs.values() {
            for p in &e.ports {
                match p.role {
                    PortRole::Vip => c.vips += 1,
                    PortRole::Endpoint => c.endpoints += 1,
                }
            }
            match e.peer {
                Some(Peer::Pod(_)) => c.pods += 1,
                Some(Peer::Node(_)) => c.nodes += 1,
                _ => {}
            }
        }
        c
    }

    /// Distinct Service ports named.
    pub fn service_count(&self) -> usize {
        let all: HashSet<&ServiceName> = self
            .addrs
            .values()
            .flat_map(|e| e.ports.iter().map(|p| &*p.name))
            .collect();
        all.len()
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
        l.add_port(PortRole::Vip, (vip.ip(), 53, Proto::Udp), svc.clone());
        assert_eq!(l.service(vip, None), Some(&svc));
        assert_eq!(l.service(vip, Some(Proto::Tcp)), None);
        assert_eq!(l.endpoint(vip, None), None);
        assert_eq!(l.service("10.96.0.10:54".parse().unwrap(), None), None);
        // TCP first when the protocol is not known.
        let tcp = Arc::new(ServiceName::parse("kube-system/kube-dns:dns-tcp", &mut i).unwrap());
        l.add_port(PortRole::Vip, (vip.ip(), 53, Proto::Tcp), tcp.clone());
        assert_eq!(l.service(vip, None), Some(&tcp));
        let ip: IpAddr = "10.0.1.2".parse().unwrap();
        assert_eq!(l.peer(ip), None);
        l.set_peer(ip, Peer::Node(i.get("node-a")));
        assert_eq!(l.peer(ip).unwrap().to_string(), "node/node-a");
        // A Pod outranks a node at the same address, and stays.
        let pod = |n: &str| PodName {
            namespace: "shop".into(),
            name: n.into(),
            node: None,
        };
        l.set_pod_if_unknown(ip, || pod("a"));
        l.set_pod_if_unknown(ip, || pod("b"));
        l.set_peer(ip, Peer::Node("node-b".into()));
        assert_eq!(l.peer(ip).unwrap().to_string(), "shop/a");
        let c = l.counts();
        assert_eq!((c.vips, c.pods, c.nodes), (2, 1, 0));
        assert_eq!(l.service_count(), 2);
    }
}
