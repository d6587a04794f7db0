//! A [`Layer`] of names keyed by address, built whole by one source and
//! swapped in (see [`super::Names`]); the names themselves are in
//! [`super::name`].

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

pub use super::name::{valid_label, Interner, Peer, PodName, Proto, ServiceName};
use super::table::{AddrTable, Slot};

/// An address and port of one protocol: a Service VIP or an endpoint.
pub type Key = (IpAddr, u16, Proto);

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

/// One Service port at an address, as a layer hands it out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PortRef<'a> {
    pub port: u16,
    pub proto: Proto,
    pub role: PortRole,
    pub name: &'a Arc<ServiceName>,
}

/// What an address is, as a layer hands it out: a Pod is kept in the
/// address's slot (no [`Peer`] to point to), anything else is a [`Peer`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PeerRef<'a> {
    Pod(&'a Arc<PodName>),
    Other(&'a Peer),
}

impl PeerRef<'_> {
    pub fn to_peer(self) -> Peer {
        match self {
            PeerRef::Pod(p) => Peer::Pod(p.clone()),
            PeerRef::Other(p) => p.clone(),
        }
    }

    /// The reference count of the name a clone would share (read, not changed).
    pub fn strong_count(self) -> usize {
        match self {
            PeerRef::Pod(p) | PeerRef::Other(Peer::Pod(p)) => Arc::strong_count(p),
            PeerRef::Other(Peer::Node(n)) => Arc::strong_count(n),
            PeerRef::Other(Peer::External) => 0,
        }
    }
}

/// A slot's `bits` (bit 0 is the table's): whether it holds a first
/// Service port, that port's role and protocol.
const HAS_PORT: u8 = 1 << 1;
const ENDPOINT: u8 = 1 << 2;
const PROTO_SHIFT: u8 = 3;

/// A slot's `other`: no peer besides a Pod, `external`, or `nodes[n - 2]`.
const NO_PEER: u32 = 0;
const EXTERNAL: u32 = 1;

fn port_bits(role: PortRole, proto: Proto) -> u8 {
    let role = match role {
        PortRole::Vip => 0,
        PortRole::Endpoint => ENDPOINT,
    };
    let proto = match proto {
        Proto::Tcp => 0,
        Proto::Udp => 1,
        Proto::Sctp => 2,
    };
    HAS_PORT | role | (proto << PROTO_SHIFT)
}

/// The role and protocol `bits` say.
fn decode(bits: u8) -> (PortRole, Proto) {
    let role = if bits & ENDPOINT != 0 {
        PortRole::Endpoint
    } else {
        PortRole::Vip
    };
    let proto = match (bits >> PROTO_SHIFT) & 3 {
        0 => Proto::Tcp,
        1 => Proto::Udp,
        _ => Proto::Sctp,
    };
    (role, proto)
}

/// Everything one source knows about one IP address: what it is (a Pod,
/// a node) and the Service ports at it. One lookup in the layer's table
/// finds it, which is what the event path asks; its first Service port
/// and its Pod are in the address's slot (the lookup reads no other
/// memory of the layer's).
#[derive(Debug, Clone, Copy)]
pub struct AddrNames<'a> {
    slot: &'a Slot,
    layer: &'a Layer,
}

impl<'a> AddrNames<'a> {
    /// The Pod or node (`external` when a source said so).
    #[inline]
    pub fn peer(self) -> Option<PeerRef<'a>> {
        if let Some(p) = &self.slot.pod {
            return Some(PeerRef::Pod(p));
        }
        static EXTERNAL_PEER: Peer = Peer::External;
        match self.slot.other {
            NO_PEER => None,
            EXTERNAL => Some(PeerRef::Other(&EXTERNAL_PEER)),
            n => self.layer.nodes.get(n as usize - 2).map(PeerRef::Other),
        }
    }

    /// The Service ports at the address: few (those of the Services at a
    /// VIP, or those an endpoint serves).
    pub fn ports(self) -> impl Iterator<Item = PortRef<'a>> {
        let s = self.slot;
        let first = s.name.as_ref().filter(|_| s.bits & HAS_PORT != 0);
        let first = first.map(|name| {
            let (role, proto) = decode(s.bits);
            PortRef {
                port: s.port,
                proto,
                role,
                name,
            }
        });
        let more = match s.more {
            0 => &[][..],
            n => &self.layer.more[n as usize - 1][..],
        };
        first.into_iter().chain(more.iter().map(|p| PortRef {
            port: p.port,
            proto: p.proto,
            role: p.role,
            name: &p.name,
        }))
    }

    /// The Service port at `port` in `role`; of any protocol (TCP first)
    /// when `proto` is not given.
    #[inline]
    pub fn port(
        self,
        role: PortRole,
        port: u16,
        proto: Option<Proto>,
    ) -> Option<(Proto, &'a Arc<ServiceName>)> {
        let s = self.slot;
        // The common case, one port, answered from the slot alone.
        if s.more == 0 {
            let name = s.name.as_ref().filter(|_| s.bits & HAS_PORT != 0)?;
            let (r, p) = decode(s.bits);
            return (s.port == port && r == role && proto.is_none_or(|x| x == p))
                .then_some((p, name));
        }
        self.port_slow(role, port, proto)
    }

    fn port_slow(
        self,
        role: PortRole,
        port: u16,
        proto: Option<Proto>,
    ) -> Option<(Proto, &'a Arc<ServiceName>)> {
        self.ports()
            .filter(|p| p.role == role && p.port == port && proto.is_none_or(|x| x == p.proto))
            .min_by_key(|p| p.proto)
            .map(|p| (p.proto, p.name))
    }

    pub fn is_vip(self) -> bool {
        self.ports().any(|p| p.role == PortRole::Vip)
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
    table: AddrTable,
    /// The nodes that name addresses (few: a slot holds an index).
    nodes: Vec<Peer>,
    /// The Service ports of addresses that have more than one, past the
    /// first (which is in the slot).
    more: Vec<Vec<PortName>>,
}

impl Layer {
    /// An empty layer with room for about `addrs` addresses (a source that
    /// knows how many it will name saves the table's growing).
    pub fn with_capacity(addrs: usize) -> Layer {
        Layer {
            table: AddrTable::with_capacity(addrs),
            ..Layer::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// All that is known about `ip`.
    #[inline]
    pub fn get(&self, ip: IpAddr) -> Option<AddrNames<'_>> {
        if self.table.is_empty() {
            return None;
        }
        let slot = self.table.get(ip)?;
        Some(AddrNames { slot, layer: self })
    }

    /// Every address named, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (IpAddr, AddrNames<'_>)> {
        self.table
            .iter()
            .map(move |(ip, slot)| (ip, AddrNames { slot, layer: self }))
    }

    /// `key` is this Service port, as a VIP or as an endpoint (replacing
    /// what the same key named before).
    pub fn add_port(&mut self, role: PortRole, key: Key, name: Arc<ServiceName>) {
        let (ip, port, proto) = key;
        let s = self.table.entry(ip);
        let bits = port_bits(role, proto);
        if s.bits & HAS_PORT == 0 || (s.port == port && s.bits & !1 == bits) {
            s.port = port;
            s.bits = (s.bits & 1) | bits;
            s.name = Some(name);
            return;
        }
        if s.more == 0 {
            self.more.push(Vec::new());
            s.more = u32::try_from(self.more.len()).expect("fewer than 2^32 addresses");
        }
        let ports = &mut self.more[s.more as usize - 1];
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
        let s = self.table.entry(ip);
        let now = match (&s.pod, s.other) {
            (Some(_), _) => Some(Peer::POD),
            (None, NO_PEER) => None,
            (None, EXTERNAL) => Some(Peer::EXTERNAL),
            (None, _) => Some(Peer::NODE),
        };
        if now.is_some_and(|r| r > peer.rank()) {
            return;
        }
        match peer {
            Peer::Pod(p) => {
                s.pod = Some(p);
                s.other = NO_PEER;
            }
            Peer::Node(_) => {
                // Already so named (a node's Pods share its address), or
                // the node just added (its addresses come one after another).
                if s.other >= 2 && self.nodes[s.other as usize - 2] == peer {
                    return;
                }
                if self.nodes.last() != Some(&peer) {
                    self.nodes.push(peer);
                }
                s.other = u32::try_from(self.nodes.len() + 1).expect("fewer than 2^32 nodes");
            }
            Peer::External => s.other = EXTERNAL,
        }
    }

    /// `ip` is this Pod unless a Pod is named there already.
    pub fn set_pod_if_unknown(&mut self, ip: IpAddr, pod: impl FnOnce() -> PodName) {
        let s = self.table.entry(ip);
        if s.pod.is_none() {
            s.pod = Some(Arc::new(pod()));
            s.other = NO_PEER;
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
    pub fn peer(&self, ip: IpAddr) -> Option<Peer> {
        self.get(ip)?.peer().map(PeerRef::to_peer)
    }

    /// VIP ports, endpoints, Pod IPs and node IPs named (a walk over the
    /// layer: for status lines, not for the event path).
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for (_, e) in self.iter() {
            for p in e.ports() {
                match p.role {
                    PortRole::Vip => c.vips += 1,
                    PortRole::Endpoint => c.endpoints += 1,
                }
            }
            match e.peer() {
                Some(PeerRef::Pod(_) | PeerRef::Other(Peer::Pod(_))) => c.pods += 1,
                Some(PeerRef::Other(Peer::Node(_))) => c.nodes += 1,
                _ => {}
            }
        }
        c
    }

    /// Distinct Service ports named.
    pub fn service_count(&self) -> usize {
        let all: HashSet<&ServiceName> = self
            .iter()
            .flat_map(|(_, e)| e.ports().map(|p| &**p.name))
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

    #[test]
    fn an_address_keeps_every_port_and_peer_it_is_given() {
        let mut i = Interner::default();
        let mut l = Layer::default();
        let svc = |s: &str, i: &mut Interner| Arc::new(ServiceName::parse(s, i).unwrap());
        let dns = svc("kube-system/kube-dns:dns", &mut i);
        let tcp = svc("kube-system/kube-dns:dns-tcp", &mut i);
        let metrics = svc("kube-system/kube-dns:metrics", &mut i);
        for ip in ["10.244.0.5", "fd00::5"] {
            let ip: IpAddr = ip.parse().unwrap();
            let at = |p| SocketAddr::new(ip, p);
            l.add_port(PortRole::Endpoint, (ip, 53, Proto::Udp), metrics.clone());
            l.add_port(PortRole::Endpoint, (ip, 9153, Proto::Tcp), metrics.clone());
            l.add_port(PortRole::Endpoint, (ip, 53, Proto::Tcp), tcp.clone());
            // The same key again: its name is replaced, not added.
            l.add_port(PortRole::Endpoint, (ip, 53, Proto::Udp), dns.clone());
            assert_eq!(l.endpoint(at(53), None), Some(&tcp));
            assert_eq!(l.endpoint(at(53), Some(Proto::Udp)), Some(&dns));
            assert_eq!(l.endpoint(at(9153), None), Some(&metrics));
            assert_eq!(l.endpoint(at(9153), Some(Proto::Udp)), None);
            assert_eq!(l.service(at(53), None), None);
            assert_eq!(l.get(ip).unwrap().ports().count(), 3);
            assert!(!l.get(ip).unwrap().is_vip());
            // `external`, then a node, then `external` again: the node stays.
            l.set_peer(ip, Peer::External);
            assert_eq!(l.peer(ip), Some(Peer::External));
            l.set_peer(ip, Peer::Node(i.get("node-a")));
            l.set_peer(ip, Peer::External);
            assert_eq!(l.peer(ip), Some(Peer::Node(i.get("node-a"))));
            // The later of two nodes wins.
            l.set_peer(ip, Peer::Node(i.get("node-b")));
            assert_eq!(l.peer(ip), Some(Peer::Node(i.get("node-b"))));
        }
        let c = l.counts();
        assert_eq!((c.vips, c.endpoints, c.pods, c.nodes), (0, 6, 0, 2));
        assert_eq!(l.service_count(), 3);
    }
}
