//! NAT mappings from ctnetlink events, for kernels where no kprobe can reach
//! `nf_nat_setup_info`. A NEW event is sent when an entry is confirmed and
//! already carries the NATed reply tuple; DESTROY when it goes (expiry,
//! flush). Events are per network namespace: ktrace sees the namespace it
//! runs in, which is where kube-proxy's NAT happens.

use std::net::{IpAddr, SocketAddr};

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Status, Tuple,
};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};

use crate::clock::monotonic_now_ns;
use crate::event::{Event, EventBody, NatEntry, Source};

const NFNLGRP_CONNTRACK_NEW: u32 = 1;
const NFNLGRP_CONNTRACK_DESTROY: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum CtnetlinkError {
    #[error("cannot open a ctnetlink socket: {0}")]
    Open(std::io::Error),
    #[error("cannot subscribe to conntrack events (is nf_conntrack_netlink available?): {0}")]
    Subscribe(std::io::Error),
}

/// A subscribed ctnetlink socket.
pub struct Ctnetlink {
    socket: Socket,
    buf: Vec<u8>,
    netns: u32,
    /// The socket's drop count already reported (see [`Ctnetlink::drops`]).
    drops_seen: u64,
}

/// One read of the socket: events, or how many were lost to a full socket buffer.
pub enum Received {
    Events(Vec<Event>),
    /// ENOBUFS: the kernel dropped events for this socket; how many since
    /// the last overrun (at least 1: the count is unknown where
    /// `/proc/net/netlink` cannot be read).
    Overrun(u64),
}

impl Ctnetlink {
    /// Subscribes to NEW and DESTROY events. Subscribe before the traffic
    /// starts: since 5.19, entries created while nobody listened carry no
    /// event data (`nf_conntrack_events=2`).
    pub fn subscribe(netns: u32) -> Result<Ctnetlink, CtnetlinkError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(CtnetlinkError::Open)?;
        socket.bind_auto().map_err(CtnetlinkError::Open)?;
        // A storm of connections must not overflow the socket: ask for 8 MiB.
        let _ = socket.set_rx_buf_sz(8 << 20);
        socket
            .set_non_blocking(true)
            .map_err(CtnetlinkError::Open)?;
        for g in [NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_DESTROY] {
            socket
                .add_membership(g)
                .map_err(CtnetlinkError::Subscribe)?;
        }
        Ok(Ctnetlink {
            socket,
            buf: vec![0; 1 << 16],
            netns,
            drops_seen: 0,
        })
    }

    /// Messages the kernel dropped for this socket, from the `Drops`
    /// column of `/proc/self/net/netlink` (one per event: each ctnetlink
    /// event is its own message), found by the socket's inode.
    fn drops(&self) -> Option<u64> {
        use std::os::fd::AsRawFd;
        // SAFETY: fstat on the socket's own open fd into a zeroed struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(self.socket.as_raw_fd(), &mut st) } != 0 {
            return None;
        }
        let table = std::fs::read_to_string("/proc/self/net/netlink").ok()?;
        netlink_drops(&table, st.st_ino)
    }

    /// Events lost since the last overrun.
    fn overrun(&mut self) -> u64 {
        match self.drops() {
            Some(total) if total > self.drops_seen => {
                let new = total - self.drops_seen;
                self.drops_seen = total;
                new
            }
            _ => 1,
        }
    }

    /// The next datagram's NAT mappings, or `None` when the socket holds
    /// nothing now (it never blocks: the pipeline reads it between ring
    /// batches, see `pipeline::source`).
    pub fn try_recv(&mut self) -> std::io::Result<Option<Received>> {
        self.buf.clear();
        self.buf.reserve(1 << 16);
        match self.socket.recv(&mut self.buf, libc::MSG_DONTWAIT) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                return Ok(Some(Received::Overrun(self.overrun())))
            }
            Err(e) => return Err(e),
        }
        let ts = monotonic_now_ns();
        Ok(Some(Received::Events(parse_datagram(
            &self.buf, ts, self.netns,
        ))))
    }
}

impl std::os::fd::AsRawFd for Ctnetlink {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.socket.as_raw_fd()
    }
}

/// The `Drops` of the socket with inode `inode` in a `/proc/net/netlink` table.
fn netlink_drops(table: &str, inode: u64) -> Option<u64> {
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next()?.split_whitespace().collect();
    let drops = header.iter().position(|c| *c == "Drops")?;
    let ino = header.iter().position(|c| *c == "Inode")?;
    lines
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(ino).and_then(|v| v.parse::<u64>().ok()) == Some(inode))
        .and_then(|f| f.get(drops)?.parse().ok())
}

/// Decodes every netlink message of a datagram; undecodable ones are skipped.
pub fn parse_datagram(mut data: &[u8], ts_ns: u64, netns: u32) -> Vec<Event> {
    let mut out = Vec::new();
    while data.len() >= 16 {
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if len < 16 || len > data.len() {
            break;
        }
        if let Ok(msg) = NetlinkMessage::<NetfilterMessage>::deserialize(&data[..len]) {
            if let NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::Conntrack(ct),
                ..
            }) = msg.payload
            {
                if let Some(body) = nat_event(&ct) {
                    out.push(Event {
                        ts_ns,
                        netns,
                        source: Source::Ctnetlink,
                        body,
                    });
                }
            }
        }
        // Messages are 4-byte aligned.
        let step = (len + 3) & !3;
        if step >= data.len() {
            break;
        }
        data = &data[step..];
    }
    out
}

#[derive(Default)]
struct Flow {
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    sport: Option<u16>,
    dport: Option<u16>,
    proto: u8,
}

fn flow(tuples: &[Tuple]) -> Flow {
    let mut f = Flow::default();
    for t in tuples {
        match t {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => f.src = Some(*a),
                        IPTuple::DestinationAddress(a) => f.dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(ps) => {
                for p in ps {
                    match p {
                        ProtoTuple::SourcePort(v) => f.sport = Some(*v),
                        ProtoTuple::DestinationPort(v) => f.dport = Some(*v),
                        ProtoTuple::Protocol(Protocol::Tcp) => f.proto = 6,
                        ProtoTuple::Protocol(Protocol::Udp) => f.proto = 17,
                        ProtoTuple::Protocol(Protocol::Other(v)) => f.proto = *v,
                        ProtoTuple::Protocol(_) => {}
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    f
}

/// A NEW or DESTROY of a DNATed entry, as a NAT event.
fn nat_event(msg: &ConntrackMessage) -> Option<EventBody> {
    let (attrs, destroy) = match msg {
        ConntrackMessage::New(a) => (a, false),
        ConntrackMessage::Delete(a) => (a, true),
        _ => return None,
    };
    let mut orig = None;
    let mut reply = None;
    let mut status = None;
    for a in attrs {
        match a {
            ConntrackAttribute::CtaTupleOrig(t) => orig = Some(flow(t)),
            ConntrackAttribute::CtaTupleReply(t) => reply = Some(flow(t)),
            ConntrackAttribute::CtaStatus(s) => status = Some(*s),
            _ => {}
        }
    }
    let (orig, reply) = (orig?, reply?);
    let client = SocketAddr::new(orig.src?, orig.sport?);
    let service = SocketAddr::new(orig.dst?, orig.dport?);
    let backend = SocketAddr::new(reply.src?, reply.sport?);
    // Only DNATed entries are NAT mappings; the status says so when present.
    let dnat = status.map_or(backend != service, |s| s.contains(Status::DstNat));
    if !dnat || backend == service {
        return None;
    }
    // Masqueraded too: the backend's replies go to the reply tuple's
    // destination, which only conntrack maps back to the client.
    let reply_dst = reply
        .dst
        .zip(reply.dport)
        .map(|(ip, port)| SocketAddr::new(ip, port));
    let snat =
        reply_dst.filter(|d| *d != client && status.is_none_or(|s| s.contains(Status::SrcNat)));
    let nat = NatEntry {
        client,
        service,
        backend,
        protocol: orig.proto,
        snat,
    };
    Some(if destroy {
        EventBody::NatDestroy(Box::new(nat))
    } else {
        EventBody::NatMapping(Box::new(nat))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{NetlinkHeader, NLM_F_CREATE};
    use netlink_packet_netfilter::{NetfilterHeader, NetfilterProtoFamily};

    #[test]
    fn drops_are_read_by_the_sockets_inode() {
        let table = "sk               Eth Pid        Groups   Rmem     Wmem     Dump  Locks    Drops    Inode\n\
                     000000008fb07a0e 0   0          00000000 0        0        0     2        0        4\n\
                     0000000037b1b214 12  1234       0000000e 0        0        0     2        17       99812\n";
        assert_eq!(netlink_drops(table, 99812), Some(17));
        assert_eq!(netlink_drops(table, 4), Some(0));
        assert_eq!(netlink_drops(table, 5), None);
    }

    /// The live socket is found in this kernel's table (root only).
    #[test]
    fn a_live_socket_has_a_drop_count() {
        match Ctnetlink::subscribe(0) {
            Ok(ct) => assert_eq!(ct.drops(), Some(0)),
            Err(e) => eprintln!("SKIPPED: cannot subscribe to ctnetlink here ({e})"),
        }
    }

    fn tuple(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<Tuple> {
        vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress(src.parse().unwrap()),
                IPTuple::DestinationAddress(dst.parse().unwrap()),
            ]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(Protocol::Tcp),
                ProtoTuple::SourcePort(sport),
                ProtoTuple::DestinationPort(dport),
            ]),
        ]
    }

    /// The mapping of the tests' flow: 10.0.0.2:40000 -> 10.96.0.10:2222
    /// DNATed to 10.0.1.3:2222, SNATed to `snat` when given.
    fn mapping(snat: Option<&str>) -> EventBody {
        EventBody::NatMapping(Box::new(NatEntry {
            client: "10.0.0.2:40000".parse().unwrap(),
            service: "10.96.0.10:2222".parse().unwrap(),
            backend: "10.0.1.3:2222".parse().unwrap(),
            protocol: 6,
            snat: snat.map(|s| s.parse().unwrap()),
        }))
    }

    fn datagram(msg: ConntrackMessage) -> Vec<u8> {
        let nf = NetfilterMessage::new(NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0), msg);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_CREATE;
        let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(nf));
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        buf
    }

    #[test]
    fn a_dnat_entry_is_a_nat_mapping_and_plain_entries_are_not() {
        let dnat = ConntrackMessage::New(vec![
            ConntrackAttribute::CtaTupleOrig(tuple("10.0.0.2", "10.96.0.10", 40000, 2222)),
            ConntrackAttribute::CtaTupleReply(tuple("10.0.1.3", "10.0.0.2", 2222, 40000)),
            ConntrackAttribute::CtaStatus(Status::DstNat | Status::Confirmed),
        ]);
        let plain = ConntrackMessage::Delete(vec![
            ConntrackAttribute::CtaTupleOrig(tuple("10.0.0.2", "10.0.1.2", 40001, 2222)),
            ConntrackAttribute::CtaTupleReply(tuple("10.0.1.2", "10.0.0.2", 2222, 40001)),
            ConntrackAttribute::CtaStatus(Status::Confirmed),
        ]);
        let mut data = datagram(dnat);
        data.extend(datagram(plain));
        let evs = parse_datagram(&data, 5, 77);
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].netns, 77);
        assert_eq!(evs[0].body, mapping(None));
    }

    #[test]
    fn a_masqueraded_entry_carries_its_snat_address() {
        let both = ConntrackMessage::New(vec![
            ConntrackAttribute::CtaTupleOrig(tuple("10.0.0.2", "10.96.0.10", 40000, 2222)),
            ConntrackAttribute::CtaTupleReply(tuple("10.0.1.3", "10.0.1.1", 2222, 61000)),
            ConntrackAttribute::CtaStatus(Status::DstNat | Status::SrcNat | Status::Confirmed),
        ]);
        // SNAT without DNAT (a pod's egress) is no Service mapping.
        let snat_only = ConntrackMessage::New(vec![
            ConntrackAttribute::CtaTupleOrig(tuple("10.0.0.2", "10.0.1.3", 40001, 2222)),
            ConntrackAttribute::CtaTupleReply(tuple("10.0.1.3", "10.0.1.1", 2222, 61001)),
            ConntrackAttribute::CtaStatus(Status::SrcNat | Status::Confirmed),
        ]);
        let mut data = datagram(both);
        data.extend(datagram(snat_only));
        let evs = parse_datagram(&data, 5, 77);
        assert_eq!(evs.len(), 1, "{evs:?}");
        assert_eq!(evs[0].body, mapping(Some("10.0.1.1:61000")));
    }

    #[test]
    fn truncated_datagrams_do_not_panic() {
        let data = datagram(ConntrackMessage::New(vec![
            ConntrackAttribute::CtaTupleOrig(tuple("10.0.0.2", "10.96.0.10", 40000, 2222)),
            ConntrackAttribute::CtaTupleReply(tuple("10.0.1.3", "10.0.0.2", 2222, 40000)),
        ]));
        for n in 0..data.len() {
            let _ = parse_datagram(&data[..n], 0, 0);
        }
        assert_eq!(parse_datagram(&data, 0, 0).len(), 1);
    }
}
