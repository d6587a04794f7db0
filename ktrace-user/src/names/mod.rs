//! Kubernetes names for addresses: the Service behind a VIP, the Pod behind
//! a backend or client address, the node behind a host address.
//!
//! - [`model`]: the names and a [`Layer`] of them keyed by address.
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

pub mod kube;
pub mod model;
pub mod record;
pub mod render;
pub mod rules;
pub mod status;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

pub use model::{Interner, Layer, Peer, PodName, Proto, ServiceName};
pub use record::NameRecord;
pub use status::{SourceState, SourceStatus};

use crate::engine::Finding;

/// Which source a layer comes from (also its precedence: the API first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceId {
    Api = 0,
    Rules = 1,
}

/// The live names of this process: one layer per source, swapped in whole.
pub struct Names {
    layers: [ArcSwap<Layer>; 2],
    /// The API knows every Pod of the cluster (`--kube-pods cluster`, listed):
    /// an address it does not name is `external`.
    complete: AtomicBool,
    status: Mutex<status::Board>,
}

impl Default for Names {
    fn default() -> Self {
        Names {
            layers: [
                ArcSwap::from_pointee(Layer::default()),
                ArcSwap::from_pointee(Layer::default()),
            ],
            complete: AtomicBool::new(false),
            status: Mutex::new(status::Board::default()),
        }
    }
}

impl Names {
    pub fn new() -> Arc<Names> {
        Arc::new(Names::default())
    }

    /// A source's new layer replaces its old one.
    pub fn publish(&self, src: SourceId, layer: Layer) {
        self.layers[src as usize].store(Arc::new(layer));
    }

    pub fn set_complete(&self, yes: bool) {
        self.complete.store(yes, Ordering::Relaxed);
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

    fn layers(&self) -> [arc_swap::Guard<Arc<Layer>>; 2] {
        [self.layers[0].load(), self.layers[1].load()]
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

    /// The facts behind these names, to store in a recording.
    pub fn records(&self, f: &Finding) -> Vec<NameRecord> {
        let mut out = Vec::new();
        if let (Some(a), Some((p, s))) = (f.service, &self.service) {
            out.push(NameRecord::Service {
                key: (a.ip(), a.port(), *p),
                name: (**s).clone(),
            });
        }
        if let (Some(a), Some((p, s))) = (f.backend, &self.backend_service) {
            out.push(NameRecord::Endpoint {
                key: (a.ip(), a.port(), *p),
                name: (**s).clone(),
            });
        }
        for (a, peer) in [(f.backend, &self.backend), (f.client, &self.client)] {
            if let (Some(a), Some(peer)) = (a, peer) {
                out.push(NameRecord::peer(a.ip(), peer));
            }
        }
        out
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

    /// The Service port at `a` (any protocol; TCP first).
    pub fn service(&self, a: SocketAddr) -> Option<(Proto, Arc<ServiceName>)> {
        self.find(|l| {
            Proto::ALL
                .iter()
                .find_map(|p| l.service(a, Some(*p)).map(|s| (*p, s.clone())))
        })
    }

    /// The Service port whose endpoint `a` is.
    pub fn endpoint(&self, a: SocketAddr) -> Option<(Proto, Arc<ServiceName>)> {
        self.find(|l| {
            Proto::ALL
                .iter()
                .find_map(|p| l.endpoint(a, Some(*p)).map(|s| (*p, s.clone())))
        })
    }

    /// The Pod or node at `a`; `external` only when the whole cluster's
    /// Pods are known and none is there.
    pub fn peer(&self, a: SocketAddr) -> Option<Peer> {
        if let Some(p) = self.find(|l| l.peer(a.ip())) {
            return Some(p);
        }
        let complete = self
            .live
            .as_ref()
            .is_some_and(|n| n.complete.load(Ordering::Relaxed));
        (complete && self.service(a).is_none()).then_some(Peer::External)
    }

    fn find<T>(&self, f: impl Fn(&Layer) -> Option<T>) -> Option<T> {
        if let Some(n) = &self.live {
            for l in n.layers() {
                if let Some(v) = f(&l) {
                    return Some(v);
                }
            }
        }
        f(&self.recorded)
    }

    /// The names of a finding's addresses, `None` when nothing is named.
    pub fn finding(&self, f: &Finding) -> Option<FindingNames> {
        if self.is_off() {
            return None;
        }
        let backend_service = f.backend.and_then(|b| self.endpoint(b));
        let service = match f.service {
            Some(s) => self.service(s),
            None => None,
        }
        .or_else(|| backend_service.clone());
        let n = FindingNames {
            service,
            backend: f.backend.and_then(|b| self.peer(b)),
            backend_service,
            client: f.client.and_then(|c| self.peer(c)),
        };
        (!n.is_empty()).then_some(n)
    }

    /// Name records of the addresses an event carries that are not in
    /// `seen` yet (`record`, which runs no engine, stores these instead of
    /// the findings' names; `seen` is the recorder's set for the current
    /// block, so an address costs its lookups once per block).
    pub fn event_records(
        &self,
        ev: &crate::event::Event,
        seen: &mut std::collections::HashSet<SocketAddr, foldhash::fast::RandomState>,
    ) -> Vec<NameRecord> {
        let mut out = Vec::new();
        if self.is_off() {
            return out;
        }
        let proto = event_proto(&ev.body);
        for a in event_addrs(&ev.body) {
            if !seen.insert(a) {
                continue;
            }
            let found = |f: &dyn Fn(&Layer) -> Option<Arc<ServiceName>>| self.find(f);
            if let Some(s) = found(&|l| l.service(a, Some(proto)).cloned()) {
                let key = (a.ip(), a.port(), proto);
                out.push(NameRecord::Service {
                    key,
                    name: (*s).clone(),
                });
                continue;
            }
            if let Some(s) = found(&|l| l.endpoint(a, Some(proto)).cloned()) {
                let key = (a.ip(), a.port(), proto);
                out.push(NameRecord::Endpoint {
                    key,
                    name: (*s).clone(),
                });
            }
            if let Some(peer) = self.find(|l| l.peer(a.ip())) {
                out.push(NameRecord::peer(a.ip(), &peer));
            }
        }
        out
    }

    /// The name of an event's address: a Service port, else a Pod or node.
    pub fn label(&self, a: SocketAddr) -> Option<String> {
        if self.is_off() {
            return None;
        }
        if let Some((_, s)) = self.service(a) {
            return Some(s.to_string());
        }
        if let Some(p) = self.find(|l| l.peer(a.ip())) {
            return Some(p.to_string());
        }
        self.endpoint(a).map(|(_, s)| format!("endpoint of {s}"))
    }
}

/// The transport protocol of an event's addresses.
fn event_proto(b: &crate::event::EventBody) -> Proto {
    use crate::event::EventBody as B;
    let code = match b {
        B::IpvsConnNew { protocol, .. } => *protocol,
        B::NatMapping(n) | B::NatDestroy(n) => n.protocol,
        _ => 6,
    };
    Proto::from_code(code).unwrap_or(Proto::Tcp)
}

/// The addresses an event carries.
fn event_addrs(b: &crate::event::EventBody) -> Vec<SocketAddr> {
    use crate::event::EventBody as B;
    match b {
        B::TcpSendReset { src, dst, .. }
        | B::TcpReceiveReset { src, dst, .. }
        | B::CtTableFull { src, dst, .. } => vec![*src, *dst],
        B::CtInvalid {
            src,
            dst,
            orig_src,
            orig_dst,
            reply_src,
            ..
        } => [Some(*src), Some(*dst), *orig_src, *orig_dst, *reply_src]
            .into_iter()
            .flatten()
            .collect(),
        B::IpvsConnNew {
            client,
            service,
            real_server,
            ..
        } => vec![*client, *service, *real_server],
        B::NatMapping(n) | B::NatDestroy(n) | B::CtConfirmDrop(n) => {
            [Some(n.client), Some(n.service), Some(n.backend), n.snat]
                .into_iter()
                .flatten()
                .collect()
        }
        B::CtCounters { .. } => Vec::new(),
    }
}
