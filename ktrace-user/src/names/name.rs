//! What a Service port, a Pod and a node are called: the names every
//! source makes and every output prints.
//!
//! Memory matters at 100k Pods: namespaces and node names are shared
//! (`Arc<str>`, interned by [`Interner`]), a Pod keeps only its name.

use std::collections::HashSet;
use std::fmt;
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
    pub(super) const POD: u8 = 2;
    pub(super) const NODE: u8 = 1;
    pub(super) const EXTERNAL: u8 = 0;

    /// Which of two names of one address wins: a Pod over a node over `external`.
    pub(super) fn rank(&self) -> u8 {
        match self {
            Peer::Pod(_) => Peer::POD,
            Peer::Node(_) => Peer::NODE,
            Peer::External => Peer::EXTERNAL,
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
    set: HashSet<Arc<str>, foldhash::fast::RandomState>,
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
