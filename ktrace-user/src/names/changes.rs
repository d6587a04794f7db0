//! Which addresses' names changed since a version of the names, so that a
//! cache of looked-up names (the recorder's) forgets only those when a
//! source publishes. A busy cluster's API source publishes every half
//! second; a cache emptied that often would look every address up again
//! and again, costing more than recording the events.

use std::collections::HashMap;
use std::net::IpAddr;

use super::model::{AddrNames, Layer, Peer, PeerRef, PodName};

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Past this many addresses, a change is not listed: everything is said
/// to have changed (the first names, a resync, a change of the whole
/// cluster), which bounds what every publication copies.
const MAX_LISTED: usize = 1 << 14;

/// The version of the names at which each recently changed address
/// changed last.
#[derive(Debug, Default, Clone)]
pub struct Changes {
    at: Map<IpAddr, u64>,
    /// Any address may have changed up to this version.
    floor: u64,
}

impl Changes {
    /// Version `version` changed the names of `changed` (`None`: of any
    /// address).
    pub fn record(&mut self, version: u64, changed: Option<Vec<IpAddr>>) {
        match changed {
            Some(ips) if self.at.len() + ips.len() <= MAX_LISTED => {
                for ip in ips {
                    self.at.insert(ip, version);
                }
            }
            _ => {
                self.at.clear();
                self.floor = version;
            }
        }
    }

    /// The addresses whose names may have changed since `version` (`None`:
    /// any address's).
    pub fn since(&self, version: u64) -> Option<Vec<IpAddr>> {
        if self.floor > version {
            return None;
        }
        Some(
            self.at
                .iter()
                .filter(|(_, v)| **v > version)
                .map(|(ip, _)| *ip)
                .collect(),
        )
    }
}

/// The addresses one source names differently in `new` than in `old`
/// (`None`: too many to list, or everything is new).
pub fn between(old: &Layer, new: &Layer) -> Option<Vec<IpAddr>> {
    if old.is_empty() && !new.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    for (ip, names) in new.iter() {
        if !old.get(ip).is_some_and(|o| same(o, names)) {
            out.push(ip);
        }
    }
    for (ip, _) in old.iter() {
        if new.get(ip).is_none() {
            out.push(ip);
        }
    }
    (out.len() <= MAX_LISTED).then_some(out)
}

/// Whether two layers' entries for one address say the same (names
/// compared by value: a layer is built afresh each time).
fn same(a: AddrNames, b: AddrNames) -> bool {
    is(a) == is(b) && a.ports().eq(b.ports())
}

/// What an entry says the address is, whichever way the layer keeps it.
#[derive(PartialEq)]
enum Is<'a> {
    Pod(&'a PodName),
    Other(&'a Peer),
}

fn is(n: AddrNames<'_>) -> Option<Is<'_>> {
    n.peer().map(|p| match p {
        PeerRef::Pod(p) | PeerRef::Other(Peer::Pod(p)) => Is::Pod(p),
        PeerRef::Other(o) => Is::Other(o),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::Peer;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn changes_list_what_differs_since_a_version() {
        let layer = |nodes: &[(&str, &str)]| {
            let mut l = Layer::default();
            for (a, n) in nodes {
                l.set_peer(ip(a), Peer::Node((*n).into()));
            }
            l
        };
        let one = layer(&[("10.0.0.1", "a"), ("10.0.0.2", "b"), ("10.0.0.3", "c")]);
        let two = layer(&[("10.0.0.1", "a"), ("10.0.0.2", "B"), ("10.0.0.4", "d")]);
        assert_eq!(between(&Layer::default(), &one), None, "all new");
        let mut d = between(&one, &two).unwrap();
        d.sort();
        assert_eq!(d, [ip("10.0.0.2"), ip("10.0.0.3"), ip("10.0.0.4")]);
        assert_eq!(between(&two, &two), Some(vec![]));

        let mut c = Changes::default();
        c.record(1, None);
        assert_eq!(c.since(0), None);
        assert_eq!(c.since(1), Some(vec![]));
        c.record(2, Some(vec![ip("10.0.0.2")]));
        c.record(3, Some(vec![ip("10.0.0.3")]));
        assert_eq!(c.since(2), Some(vec![ip("10.0.0.3")]));
        let mut s = c.since(1).unwrap();
        s.sort();
        assert_eq!(s, [ip("10.0.0.2"), ip("10.0.0.3")]);
        assert_eq!(c.since(0), None, "before the floor: anything");
        // Too many to list: anything may have changed.
        let many: Vec<IpAddr> = (0..MAX_LISTED as u32 + 1)
            .map(|i| IpAddr::V4(std::net::Ipv4Addr::from(i + 1)))
            .collect();
        c.record(4, Some(many));
        assert_eq!(c.since(3), None);
        assert_eq!(c.since(4), Some(vec![]));
    }
}
