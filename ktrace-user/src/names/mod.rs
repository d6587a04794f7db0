//! Kubernetes names for addresses: the Service behind a VIP, the Pod behind
//! a backend or client address, the node behind a host address.
//!
//! - [`name`]: what a Service port, a Pod and a node are called.
//! - [`model`]: a [`Layer`] of names keyed by address.
//! - `table`: the flat table a layer keeps its addresses in (lookups
//!   that read one cache line).
//! - [`changes`]: which addresses a publication renamed (for caches).
//! - [`rules`]: source 2, kube-proxy's own rules on this node
//!   (`iptables-save`, `nft -j`), no API needed.
//! - [`kube`]: source 1, the Kubernetes API (Services, EndpointSlices, Pods).
//! - [`record`]: names as recording records, so `replay` prints them too.
//! - [`render`]: names in findings, events and status lines.
//! - [`status`]: what each source is doing, for the status lines.
//!
//! Each source builds its layer whole and swaps it in ([`Names`], arc-swap):
//! the event path only loads a pointer and never waits for a source.
//! An address nothing names is printed as an address, as before.

pub mod changes;
pub mod kube;
pub mod model;
pub mod name;
pub mod record;
pub mod render;
pub mod rules;
pub mod status;
mod table;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

pub use model::{
    AddrNames, Interner, Layer, Peer, PeerRef, PodName, PortRef, PortRole, Proto, ServiceName,
};
pub use record::NameRecord;
pub use status::{SourceState, SourceStatus};

use crate::engine::Finding;

/// Which source a layer comes from (also its precedence: the API first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceId {
    Api = 0,
    Rules = 1,
}

/// What the sources know at one moment, swapped in whole: the event path
/// loads it once per finding or event and never waits for a source.
#[derive(Default, Clone)]
struct Snapshot {
    layers: [Arc<Layer>; 2],
    /// The API knows every Pod of the cluster (`--kube-pods cluster`, listed):
    /// an address it does not name is `external`.
    complete: bool,
    /// Which addresses each recent version renamed.
    changes: Arc<changes::Changes>,
}

/// The live names of this process: one layer per source.
#[derive(Default)]
pub struct Names {
    now: ArcSwap<Snapshot>,
    /// Bumped at every change of `now` (what caches of names compare),
    /// after `now` is stored.
    version: AtomicU64,
    /// Held while a change is made (sources publish from their own threads).
    changing: Mutex<()>,
    status: Mutex<status::Board>,
}

impl Names {
    pub fn new() -> Arc<Names> {
        Arc::new(Names::default())
    }

    /// A source's new layer replaces its old one.
    pub fn publish(&self, src: SourceId, layer: Layer) {
        self.change(|s| {
            let changed = changes::between(&s.layers[src as usize], &layer);
            s.layers[src as usize] = Arc::new(layer);
            changed
        });
    }

    pub fn set_complete(&self, yes: bool) {
        if self.now.load().complete != yes {
            // `external` may now be said (or not) of any address.
            self.change(|s| {
                s.complete = yes;
                None
            });
        }
    }

    /// Makes the next version: `f` changes a copy of the snapshot and
    /// says which addresses it renamed (`None`: any).
    fn change(&self, f: impl FnOnce(&mut Snapshot) -> Option<Vec<IpAddr>>) {
        let _one = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let version = self.version.load(Ordering::Acquire) + 1;
        let mut s = Snapshot::clone(&self.now.load());
        let changed = f(&mut s);
        let mut changes = changes::Changes::clone(&s.changes);
        changes.record(version, changed);
        s.changes = Arc::new(changes);
        self.now.store(Arc::new(s));
        self.version.store(version, Ordering::Release);
    }

    /// A source says what it is doing (printed as a `names` line when it changes).
    pub fn set_status(&self, s: SourceStatus) {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).set(s);
    }

    /// The sources' states, when they changed since the last call.
    pub fn take_status_change(&self) -> Option<Vec<SourceStatus>> {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take_change()
    }

    pub fn status_now(&self) -> Vec<SourceStatus> {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).all()
    }
}

/// The names a finding's addresses have (each absent when unknown).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FindingNames {
    /// The Service port of `service` (or, without one, of the backend).
    pub service: Option<(Proto, Arc<ServiceName>)>,
    pub backend: Option<Peer>,
    /// The Service port the backend is an endpoint of.
    pub backend_service: Option<(Proto, Arc<ServiceName>)>,
    pub client: Option<Peer>,
}

impl FindingNames {
    pub fn is_empty(&self) -> bool {
        self.service.is_none()
            && self.backend.is_none()
            && self.backend_service.is_none()
            && self.client.is_none()
    }
}

/// Looks names up for the renderer and the exporter: the live sources,
/// and (in replay) the names a recording stored.
#[derive(Default)]
pub struct NameResolver {
    live: Option<Arc<Names>>,
    recorded: Layer,
    interner: Interner,
}

/// The layers to ask, in precedence order, for one lookup.
struct View<'a> {
    snap: Option<arc_swap::Guard<Arc<Snapshot>>>,
    recorded: &'a Layer,
}

/// What every layer knows about one IP address (one hash lookup each).
struct At<'a> {
    found: [Option<AddrNames<'a>>; 3],
    complete: bool,
}

impl View<'_> {
    fn at(&self, ip: IpAddr) -> At<'_> {
        let mut found = [None; 3];
        if let Some(s) = &self.snap {
            found[0] = s.layers[0].get(ip);
            found[1] = s.layers[1].get(ip);
        }
        found[2] = self.recorded.get(ip);
        At {
            found,
            complete: self.snap.as_ref().is_some_and(|s| s.complete),
        }
    }
}

impl<'a> At<'a> {
    fn entries(&self) -> impl Iterator<Item = AddrNames<'a>> {
        self.found.into_iter().flatten()
    }

    /// The Service port at `port` in `role` (any protocol; TCP first).
    fn port(&self, role: PortRole, port: u16) -> Option<(Proto, Arc<ServiceName>)> {
        self.port_ref(role, port).map(|(p, s)| (p, s.clone()))
    }

    fn port_ref(&self, role: PortRole, port: u16) -> Option<(Proto, &'a Arc<ServiceName>)> {
        self.entries().find_map(|e| e.port(role, port, None))
    }

    /// The Pod or node; `external` only when the whole cluster's Pods are
    /// known and none is there (nor a Service VIP).
    fn peer(&self) -> Option<Peer> {
        self.peer_ref().map(PeerRef::to_peer)
    }

    fn peer_ref(&self) -> Option<PeerRef<'a>> {
        static EXTERNAL: Peer = Peer::External;
        if let Some(p) = self.entries().find_map(AddrNames::peer) {
            return Some(p);
        }
        (self.complete && !self.entries().any(AddrNames::is_vip))
            .then_some(PeerRef::Other(&EXTERNAL))
    }
}

/// Reads the reference counts of the names a finding is about to clone:
/// plain loads, whose cache misses overlap, where the clones' locked
/// increments would take them one after the other (on x86 no load starts
/// before a locked instruction ahead of it is done).
fn touch(peers: [Option<PeerRef<'_>>; 2], services: [Option<&Arc<ServiceName>>; 2]) {
    let mut n = 0usize;
    for p in peers.into_iter().flatten() {
        n ^= p.strong_count();
    }
    for s in services.into_iter().flatten() {
        n ^= Arc::strong_count(s);
    }
    std::hint::black_box(n);
}

impl NameResolver {
    pub fn live(names: Arc<Names>) -> NameResolver {
        NameResolver {
            live: Some(names),
            ..Default::default()
        }
    }

    pub fn names(&self) -> Option<&Arc<Names>> {
        self.live.as_ref()
    }

    /// True when no source can name anything (nothing to look up).
    pub fn is_off(&self) -> bool {
        self.live.is_none() && self.recorded.is_empty()
    }

    /// A name a recording stored (replay).
    pub fn apply(&mut self, r: NameRecord) {
        r.apply(&mut self.recorded, &mut self.interner);
    }

    fn view(&self) -> View<'_> {
        View {
            snap: self.live.as_ref().map(|n| n.now.load()),
            recorded: &self.recorded,
        }
    }

    /// The Service port at `a` (any protocol; TCP first).
    pub fn service(&self, a: SocketAddr) -> Option<(Proto, Arc<ServiceName>)> {
        self.view().at(a.ip()).port(PortRole::Vip, a.port())
    }

    /// The Service port whose endpoint `a` is.
    pub fn endpoint(&self, a: SocketAddr) -> Option<(Proto, Arc<ServiceName>)> {
        self.view().at(a.ip()).port(PortRole::Endpoint, a.port())
    }

    /// The Pod or node at `a`; `external` only when the whole cluster's
    /// Pods are known and none is there.
    pub fn peer(&self, a: SocketAddr) -> Option<Peer> {
        self.view().at(a.ip()).peer()
    }

    /// The names of a finding's addresses, `None` when nothing is named:
    /// one snapshot load and one hash lookup per address and layer.
    ///
    /// Every lookup is done, and every name read, before any is cloned
    /// (see [`touch`]): the addresses of a busy cluster's findings are
    /// seldom in the CPU's caches, and their misses then overlap.
    pub fn finding(&self, f: &Finding) -> Option<FindingNames> {
        if self.is_off() {
            return None;
        }
        let v = self.view();
        let backend_at = f.backend.map(|b| v.at(b.ip()));
        let service_at = f.service.map(|s| v.at(s.ip()));
        let client_at = f.client.map(|c| v.at(c.ip()));
        let backend = backend_at.as_ref().and_then(At::peer_ref);
        let backend_service = backend_at
            .as_ref()
            .zip(f.backend)
            .and_then(|(at, b)| at.port_ref(PortRole::Endpoint, b.port()));
        let service = service_at
            .as_ref()
            .zip(f.service)
            .and_then(|(at, s)| at.port_ref(PortRole::Vip, s.port()))
            .or(backend_service);
        let client = client_at.as_ref().and_then(At::peer_ref);
        touch(
            [backend, client],
            [service.map(|s| s.1), backend_service.map(|s| s.1)],
        );
        let owned = |s: Option<(Proto, &Arc<ServiceName>)>| s.map(|(p, s)| (p, s.clone()));
        let n = FindingNames {
            service: owned(service),
            backend: backend.map(PeerRef::to_peer),
            backend_service: owned(backend_service),
            client: client.map(PeerRef::to_peer),
        };
        (!n.is_empty()).then_some(n)
    }

    /// The addresses whose names may have changed since `version` (`None`:
    /// any address's): what a cache of looked-up names made at `version`
    /// has to look up again.
    pub fn changed_since(&self, version: u64) -> Option<Vec<IpAddr>> {
        match &self.live {
            Some(n) => n.now.load().changes.since(version),
            None => Some(Vec::new()),
        }
    }

    /// Changes whenever what the live sources know may have changed (a
    /// cache of looked-up names is good while this stays the same).
    #[inline]
    pub fn version(&self) -> u64 {
        self.live
            .as_ref()
            .map_or(0, |n| n.version.load(Ordering::Acquire))
    }

    /// The records of all that is known about `ip` (for a recording): its
    /// Pod or node (`external` as [`peer`](Self::peer) says it), and each
    /// Service port at it, from the layer of highest precedence naming it.
    pub fn addr_records(&self, ip: IpAddr, out: &mut Vec<NameRecord>) {
        if self.is_off() {
            return;
        }
        let v = self.view();
        let at = v.at(ip);
        let first = out.len();
        for e in at.entries() {
            for p in e.ports() {
                let key = (ip, p.port, p.proto);
                // A lower layer's name for a key already written is not the name.
                let written = |o: &NameRecord| match o {
                    NameRecord::Service { key: k, .. } => p.role == PortRole::Vip && *k == key,
                    NameRecord::Endpoint { key: k, .. } => {
                        p.role == PortRole::Endpoint && *k == key
                    }
                    _ => false,
                };
                if out[first..].iter().any(written) {
                    continue;
                }
                let name = p.name.clone();
                out.push(match p.role {
                    PortRole::Vip => NameRecord::Service { key, name },
                    PortRole::Endpoint => NameRecord::Endpoint { key, name },
                });
            }
        }
        match at.peer_ref() {
            Some(PeerRef::Pod(pod)) => out.push(NameRecord::Pod {
                ip,
                pod: pod.clone(),
            }),
            Some(PeerRef::Other(p)) => out.push(NameRecord::peer(ip, p)),
            None => {}
        }
    }

    /// Reads what is known about each of `ips` (the entries and the names
    /// they point to) and nothing more: their cache misses overlap, so the
    /// [`addr_records`](Self::addr_records) of a batch of addresses that
    /// follow find them in the CPU's caches. Returns a value made of what
    /// it read (for `black_box`).
    pub fn warm(&self, ips: &[IpAddr]) -> usize {
        if self.is_off() {
            return 0;
        }
        let v = self.view();
        let mut seen = 0usize;
        for ip in ips {
            for e in v.at(*ip).entries() {
                if let Some(PeerRef::Pod(p)) = e.peer() {
                    seen ^= usize::from(p.name.as_bytes().first().copied().unwrap_or(0));
                }
                if let Some(p) = e.ports().next() {
                    seen ^= usize::from(p.name.name.as_bytes().first().copied().unwrap_or(0));
                }
            }
        }
        seen
    }

    /// The name of an event's address: a Service port, else a Pod or node.
    pub fn label(&self, a: SocketAddr) -> Option<String> {
        if self.is_off() {
            return None;
        }
        let v = self.view();
        let at = v.at(a.ip());
        if let Some((_, s)) = at.port(PortRole::Vip, a.port()) {
            return Some(s.to_string());
        }
        if let Some(p) = at.peer().filter(|p| *p != Peer::External) {
            return Some(p.to_string());
        }
        at.port(PortRole::Endpoint, a.port())
            .map(|(_, s)| format!("endpoint of {s}"))
    }
}
