//! Names as a recording stores them: one record per named address, written
//! before the item whose finding used it, so `replay` elsewhere prints the
//! names `watch` printed. The bytes (body of tag `DEF_NAME`, see
//! `recording::format`) are:
//!
//! ```text
//! kind:u8 family:u8(4|6) ip[4|16] then per kind
//!   1 service, 2 endpoint: port:u16be proto:u8 str(namespace) str(name) str(port name)
//!   3 pod:  str(namespace) str(name) str(node, "" when unknown)
//!   4 node: str(name)
//!   5 external: nothing
//! str := len:varint utf8[len]
//! ```

use std::net::IpAddr;
use std::sync::Arc;

use super::model::{Interner, Key, Layer, Peer, PodName, PortRole, Proto, ServiceName};
use crate::wire::{put_varint, Cursor, Malformed};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NameRecord {
    /// A VIP:port is this Service port.
    Service {
        key: Key,
        name: Arc<ServiceName>,
    },
    /// An endpoint ip:port serves this Service port.
    Endpoint {
        key: Key,
        name: Arc<ServiceName>,
    },
    Pod {
        ip: IpAddr,
        pod: Arc<PodName>,
    },
    Node {
        ip: IpAddr,
        name: Arc<str>,
    },
    External {
        ip: IpAddr,
    },
}

impl NameRecord {
    pub fn peer(ip: IpAddr, p: &Peer) -> NameRecord {
        match p {
            Peer::Pod(pod) => NameRecord::Pod {
                ip,
                pod: pod.clone(),
            },
            Peer::Node(n) => NameRecord::Node {
                ip,
                name: n.clone(),
            },
            Peer::External => NameRecord::External { ip },
        }
    }

    /// Adds this fact to `l` (the replay's layer of recorded names).
    pub fn apply(self, l: &mut Layer, i: &mut Interner) {
        match self {
            NameRecord::Service { key, name } => {
                l.add_port(PortRole::Vip, key, Arc::new(intern(&name, i)));
            }
            NameRecord::Endpoint { key, name } => {
                l.add_port(PortRole::Endpoint, key, Arc::new(intern(&name, i)));
            }
            NameRecord::Pod { ip, pod } => {
                let pod = PodName {
                    namespace: i.get(&pod.namespace),
                    node: pod.node.as_deref().map(|n| i.get(n)),
                    name: pod.name.clone(),
                };
                l.set_peer(ip, Peer::Pod(Arc::new(pod)));
            }
            NameRecord::Node { ip, name } => {
                l.set_peer(ip, Peer::Node(i.get(&name)));
            }
            NameRecord::External { ip } => l.set_peer(ip, Peer::External),
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let (kind, ip) = match self {
            NameRecord::Service { key, .. } => (1, key.0),
            NameRecord::Endpoint { key, .. } => (2, key.0),
            NameRecord::Pod { ip, .. } => (3, *ip),
            NameRecord::Node { ip, .. } => (4, *ip),
            NameRecord::External { ip } => (5, *ip),
        };
        out.push(kind);
        match ip {
            IpAddr::V4(a) => {
                out.push(4);
                out.extend_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                out.push(6);
                out.extend_from_slice(&a.octets());
            }
        }
        match self {
            NameRecord::Service { key, name } | NameRecord::Endpoint { key, name } => {
                out.extend_from_slice(&key.1.to_be_bytes());
                out.push(key.2.code());
                for s in [&*name.namespace, &*name.name, &*name.port] {
                    put_str(out, s);
                }
            }
            NameRecord::Pod { pod, .. } => {
                put_str(out, &pod.namespace);
                put_str(out, &pod.name);
                put_str(out, pod.node.as_deref().unwrap_or(""));
            }
            NameRecord::Node { name, .. } => put_str(out, name),
            NameRecord::External { .. } => {}
        }
    }

    pub fn decode(body: &[u8]) -> Result<NameRecord, Malformed> {
        let mut b = Cursor::new(body);
        let kind = b.u8()?;
        let ip = b.ip()?;
        let r = match kind {
            1 | 2 => {
                let port = b.u16_be()?;
                let proto =
                    Proto::from_code(b.u8()?).ok_or(Malformed("unknown protocol in a name"))?;
                let name = Arc::new(ServiceName {
                    namespace: get_str(&mut b)?.into(),
                    name: get_str(&mut b)?.into(),
                    port: get_str(&mut b)?.into(),
                });
                let key = (ip, port, proto);
                if kind == 1 {
                    NameRecord::Service { key, name }
                } else {
                    NameRecord::Endpoint { key, name }
                }
            }
            3 => NameRecord::Pod {
                ip,
                pod: Arc::new(PodName {
                    namespace: get_str(&mut b)?.into(),
                    name: get_str(&mut b)?.into(),
                    node: Some(get_str(&mut b)?)
                        .filter(|n| !n.is_empty())
                        .map(Into::into),
                }),
            },
            4 => NameRecord::Node {
                ip,
                name: get_str(&mut b)?.into(),
            },
            5 => NameRecord::External { ip },
            _ => return Err(Malformed("unknown kind of name record")),
        };
        Ok(r)
    }
}

fn intern(n: &ServiceName, i: &mut Interner) -> ServiceName {
    ServiceName {
        namespace: i.get(&n.namespace),
        ..n.clone()
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn get_str<'a>(b: &mut Cursor<'a>) -> Result<&'a str, Malformed> {
    let n = usize::try_from(b.varint()?).map_err(|_| Malformed("name too long"))?;
    std::str::from_utf8(b.bytes(n)?).map_err(|_| Malformed("name is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let mut i = Interner::default();
        let svc = Arc::new(ServiceName::parse("payments/ledger:grpc", &mut i).unwrap());
        let all = vec![
            NameRecord::Service {
                key: ("10.96.0.10".parse().unwrap(), 2222, Proto::Tcp),
                name: svc.clone(),
            },
            NameRecord::Endpoint {
                key: ("fd00::2".parse().unwrap(), 8080, Proto::Sctp),
                name: svc,
            },
            NameRecord::Pod {
                ip: "10.0.1.2".parse().unwrap(),
                pod: Arc::new(PodName {
                    namespace: "payments".into(),
                    name: "ledger-7f9c".into(),
                    node: Some("node-a".into()),
                }),
            },
            NameRecord::Pod {
                ip: "10.0.1.3".parse().unwrap(),
                pod: Arc::new(PodName {
                    namespace: "payments".into(),
                    name: "ledger-2".into(),
                    node: None,
                }),
            },
            NameRecord::Node {
                ip: "10.0.0.2".parse().unwrap(),
                name: "node-b".into(),
            },
            NameRecord::External {
                ip: "192.0.2.1".parse().unwrap(),
            },
        ];
        for r in all {
            let mut b = Vec::new();
            r.encode(&mut b);
            assert_eq!(NameRecord::decode(&b).unwrap(), r);
            // Every truncation is an error, never a panic.
            for n in 0..b.len() {
                assert!(NameRecord::decode(&b[..n]).is_err(), "{r:?} cut at {n}");
            }
        }
        assert!(NameRecord::decode(&[9, 4, 1, 2, 3, 4]).is_err());
    }
}
