//! Decoded kernel events: the one vocabulary of `watch`, `replay`, the
//! correlation engine and every sink.
//!
//! The serde attributes here are the event's JSON fields (`--events
//! --json`, per the contract): the renderer adds only the line's header
//! (`type`, `event`, `ts`, `netns`, `source`) and [`EventBody::endpoints`]
//! as `src`/`dst`.

use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Serialize, Serializer};

/// Which mechanism produced an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Tracepoint,
    RawTracepoint,
    Fentry,
    Kprobe,
    Kretprobe,
    Ctnetlink,
    /// Counters read from /proc by userspace.
    Procfs,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// CLOCK_MONOTONIC nanoseconds (the kernel's `bpf_ktime_get_ns`).
    pub ts_ns: u64,
    /// Network namespace inode (0 when unknown).
    pub netns: u32,
    pub source: Source,
    pub body: EventBody,
}

/// What happened. Field order is JSON order; `src`/`dst` come from
/// [`EventBody::endpoints`], so the variants' own are not serialised.
///
/// Variants of three addresses or more are boxed: an event is copied and
/// streamed through the engine by the million, and the resets that make
/// up a storm should not pay for the size of a NAT entry (104 bytes an
/// event instead of 200).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum EventBody {
    /// The kernel sent an RST from `src` to `dst`.
    TcpSendReset {
        #[serde(skip)]
        src: SocketAddr,
        #[serde(skip)]
        dst: SocketAddr,
        /// Kernel `sk_rst_reason` name (e.g. `NO_SOCKET`) when given.
        /// Shared, not owned: a handful of names repeated by every event.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<Arc<str>>,
        /// TCP flags of the segment the RST answers, when known.
        #[serde(
            rename = "answers",
            skip_serializing_if = "Option::is_none",
            serialize_with = "answers_json"
        )]
        trigger_flags: Option<u8>,
        /// The TCP state of the connection socket that sent it (0 when
        /// unknown); `None` for the no-socket case: nothing listened at
        /// `src`, or only a listener did.
        #[serde(flatten, serialize_with = "socket_json")]
        socket: Option<u8>,
    },
    /// The socket at `dst` accepted an RST sent by `src`.
    TcpReceiveReset {
        #[serde(skip)]
        src: SocketAddr,
        #[serde(skip)]
        dst: SocketAddr,
        #[serde(skip_serializing_if = "is_zero")]
        sock_cookie: u64,
    },
    /// Conntrack marked the packet `src` -> `dst` INVALID.
    CtInvalid(Box<CtInvalid>),
    /// Conntrack could not create an entry for `src` -> `dst` (table full).
    CtTableFull {
        #[serde(skip)]
        src: SocketAddr,
        #[serde(skip)]
        dst: SocketAddr,
        errno: i32,
    },
    /// IPVS scheduled `client` -> `service` to `real_server`.
    IpvsConnNew(Box<IpvsConnNew>),
    /// `client` -> `service` was DNATed to `backend`.
    NatMapping(Box<NatEntry>),
    /// Conntrack counters of ktrace's network namespace rose
    /// (`/proc/net/stat/nf_conntrack`, summed over CPUs): increases since the
    /// previous sample, with the table's fill when readable. Evidence where
    /// the conntrack kprobes cannot attach.
    CtCounters(CounterRise),
    /// The conntrack entry of a DNATed flow went away (ctnetlink DESTROY).
    NatDestroy(Box<NatEntry>),
    /// `__nf_conntrack_confirm` dropped a packet of this flow: it lost the
    /// race to insert its new entry (`snat` is never set).
    CtConfirmDrop(Box<NatEntry>),
    /// Resets the kernel sent in the event's network namespace that were
    /// counted, not sent one by one, since the previous summary: ones that
    /// can never be an incident (`ktrace_common::reset_may_be_an_incident`),
    /// beyond each CPU's sample. With the `tcp_send_reset` events they add
    /// up to every reset the kernel sent.
    ResetsSummarised(ResetCounts),
}

/// Conntrack marked the packet `src` -> `dst` INVALID ([`EventBody::CtInvalid`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CtInvalid {
    #[serde(skip)]
    pub src: SocketAddr,
    #[serde(skip)]
    pub dst: SocketAddr,
    /// The entry's original direction (client -> service) and reply source (backend).
    #[serde(rename = "client", skip_serializing_if = "Option::is_none")]
    pub orig_src: Option<SocketAddr>,
    #[serde(rename = "service", skip_serializing_if = "Option::is_none")]
    pub orig_dst: Option<SocketAddr>,
    #[serde(rename = "backend", skip_serializing_if = "Option::is_none")]
    pub reply_src: Option<SocketAddr>,
    /// The packet travelled in the reply direction of the entry.
    #[serde(rename = "direction", serialize_with = "direction_json")]
    pub reply_dir: bool,
    /// What conntrack's log helper was told, e.g. "SEQ is over the upper bound".
    #[serde(rename = "reason", skip_serializing_if = "Option::is_none")]
    pub message: Option<Arc<str>>,
}

/// IPVS scheduled `client` -> `service` to `real_server` ([`EventBody::IpvsConnNew`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IpvsConnNew {
    pub client: SocketAddr,
    pub service: SocketAddr,
    #[serde(rename = "backend")]
    pub real_server: SocketAddr,
    pub protocol: u8,
    pub template: bool,
    pub conn_flags: u32,
    pub dest_flags: u32,
    /// `None` when the connection had no destination.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<i32>,
}

/// Resets counted by the kernel instead of sent one by one, by why they
/// can never be an incident.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResetCounts {
    /// No socket (or a listener only) answered a bare SYN: refused connections.
    pub refused: u64,
    /// Sent by a connection's own socket.
    pub socket: u64,
}

impl ResetCounts {
    pub fn total(&self) -> u64 {
        self.refused.saturating_add(self.socket)
    }
}

/// `"count"` (the total), then `"refused"` and `"socket"`.
impl Serialize for ResetCounts {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(3))?;
        m.serialize_entry("count", &self.total())?;
        m.serialize_entry("refused", &self.refused)?;
        m.serialize_entry("socket", &self.socket)?;
        m.end()
    }
}

/// A DNAT conntrack entry: `client` -> `service` goes to `backend`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NatEntry {
    pub client: SocketAddr,
    pub service: SocketAddr,
    pub backend: SocketAddr,
    pub protocol: u8,
    /// Where conntrack also SNATed the flow (IPS_SRC_NAT: masquerade),
    /// the address:port the backend sees as its client (the reply
    /// tuple's destination); its replies go there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snat: Option<SocketAddr>,
}

/// Increases of the conntrack counters since the previous sample, with
/// the table's fill when readable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CounterRise {
    pub invalid: u64,
    pub drop: u64,
    pub early_drop: u64,
    pub insert_failed: u64,
    /// Races to confirm an entry that the kernel resolved (5.10+:
    /// the `clashres` column) instead of dropping the packet.
    #[serde(skip_serializing_if = "is_zero")]
    pub clash_resolve: u64,
    #[serde(rename = "entries", skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<u64>,
}

impl EventBody {
    /// The contract name of the event (`"event"` field of the JSON).
    pub fn name(&self) -> &'static str {
        match self {
            EventBody::TcpSendReset { .. } => "tcp_send_reset",
            EventBody::TcpReceiveReset { .. } => "tcp_receive_reset",
            EventBody::CtInvalid(_) => "ct_invalid",
            EventBody::CtTableFull { .. } => "ct_table_full",
            EventBody::IpvsConnNew(_) => "ipvs_conn_new",
            EventBody::NatMapping(_) => "nat_mapping",
            EventBody::NatDestroy(_) => "nat_destroy",
            EventBody::CtConfirmDrop(_) => "ct_confirm_drop",
            EventBody::CtCounters(_) => "ct_counters",
            EventBody::ResetsSummarised(_) => "resets_summarised",
        }
    }

    /// The event's two ends as the contract's `src` and `dst`: the packet's
    /// addresses, or client and service for a new connection or NAT entry;
    /// `None` for counters.
    pub fn endpoints(&self) -> Option<(SocketAddr, SocketAddr)> {
        match self {
            EventBody::TcpSendReset { src, dst, .. }
            | EventBody::TcpReceiveReset { src, dst, .. }
            | EventBody::CtTableFull { src, dst, .. } => Some((*src, *dst)),
            EventBody::CtInvalid(c) => Some((c.src, c.dst)),
            EventBody::IpvsConnNew(c) => Some((c.client, c.service)),
            EventBody::NatMapping(n) | EventBody::NatDestroy(n) | EventBody::CtConfirmDrop(n) => {
                Some((n.client, n.service))
            }
            EventBody::CtCounters(_) | EventBody::ResetsSummarised(_) => None,
        }
    }

    /// Resets the kernel sent that this event stands for: 1 for a
    /// `tcp_send_reset`, the count of a summary, else 0.
    pub fn resets_sent(&self) -> u64 {
        match self {
            EventBody::TcpSendReset { .. } => 1,
            EventBody::ResetsSummarised(c) => c.total(),
            _ => 0,
        }
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn answers_json<S: Serializer>(flags: &Option<u8>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&tcp_flags(flags.unwrap_or(0)))
}

fn direction_json<S: Serializer>(reply: &bool, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(if *reply { "reply" } else { "original" })
}

/// `"socket": bool`, then the socket's `"state"` when it has a known one.
fn socket_json<S: Serializer>(socket: &Option<u8>, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(None)?;
    m.serialize_entry("socket", &socket.is_some())?;
    if let Some(state) = socket.filter(|&st| st != 0) {
        m.serialize_entry("state", tcp_state(state))?;
    }
    m.end()
}

/// `"SYN"`, `"ACK|PSH"`, ... for the flags of a TCP segment.
pub fn tcp_flags(f: u8) -> String {
    const NAMES: [&str; 8] = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];
    let v: Vec<&str> = (0..8)
        .filter(|i| f & (1 << i) != 0)
        .map(|i| NAMES[i])
        .collect();
    v.join("|")
}

fn tcp_state(s: u8) -> &'static str {
    match s {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW_SYN_RECV",
        _ => "UNKNOWN",
    }
}
