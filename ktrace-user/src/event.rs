//! Decoded kernel events: the one vocabulary of `watch`, `replay`, the
//! correlation engine and every sink.

use std::net::SocketAddr;

/// Which mechanism produced an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Tracepoint => "tracepoint",
            Source::RawTracepoint => "raw_tracepoint",
            Source::Fentry => "fentry",
            Source::Kprobe => "kprobe",
            Source::Kretprobe => "kretprobe",
            Source::Ctnetlink => "ctnetlink",
            Source::Procfs => "procfs",
        }
    }
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventBody {
    /// The kernel sent an RST from `src` to `dst`.
    TcpSendReset {
        src: SocketAddr,
        dst: SocketAddr,
        /// Kernel `sk_rst_reason` name (e.g. `NO_SOCKET`) when given.
        reason: Option<String>,
        /// False for the no-socket case: nothing listened at `src`.
        has_socket: bool,
        state: u8,
        /// TCP flags of the segment the RST answers, when known.
        trigger_flags: Option<u8>,
    },
    /// The socket at `dst` accepted an RST sent by `src`.
    TcpReceiveReset {
        src: SocketAddr,
        dst: SocketAddr,
        sock_cookie: u64,
    },
    /// Conntrack marked the packet `src` -> `dst` INVALID.
    CtInvalid {
        src: SocketAddr,
        dst: SocketAddr,
        /// The entry's original direction (client -> service) and reply source (backend).
        orig_src: Option<SocketAddr>,
        orig_dst: Option<SocketAddr>,
        reply_src: Option<SocketAddr>,
        /// The packet travelled in the reply direction of the entry.
        reply_dir: bool,
        /// What conntrack's log helper was told, e.g. "SEQ is over the upper bound".
        message: Option<String>,
    },
    /// Conntrack could not create an entry for `src` -> `dst` (table full).
    CtTableFull {
        src: SocketAddr,
        dst: SocketAddr,
        errno: i32,
    },
    /// IPVS scheduled `client` -> `service` to `real_server`.
    IpvsConnNew {
        client: SocketAddr,
        service: SocketAddr,
        real_server: SocketAddr,
        protocol: u8,
        template: bool,
        conn_flags: u32,
        dest_flags: u32,
        /// `None` when the connection had no destination.
        weight: Option<i32>,
    },
    /// `client` -> `service` was DNATed to `backend`.
    NatMapping {
        client: SocketAddr,
        service: SocketAddr,
        backend: SocketAddr,
        protocol: u8,
        /// Where conntrack also SNATed the flow (IPS_SRC_NAT: masquerade),
        /// the address:port the backend sees as its client (the reply
        /// tuple's destination); its replies go there.
        snat: Option<SocketAddr>,
    },
    /// Conntrack counters of ktrace's network namespace rose
    /// (`/proc/net/stat/nf_conntrack`, summed over CPUs): increases since the
    /// previous sample, with the table's fill when readable. Evidence where
    /// the conntrack kprobes cannot attach.
    CtCounters {
        invalid: u64,
        drop: u64,
        early_drop: u64,
        insert_failed: u64,
        count: Option<u64>,
        max: Option<u64>,
    },
    /// The conntrack entry of a DNATed flow went away (ctnetlink DESTROY).
    NatDestroy {
        client: SocketAddr,
        service: SocketAddr,
        backend: SocketAddr,
        protocol: u8,
        /// As for [`EventBody::NatMapping`].
        snat: Option<SocketAddr>,
    },
}

impl EventBody {
    /// The contract name of the event (`"event"` field of the JSON).
    pub fn name(&self) -> &'static str {
        match self {
            EventBody::TcpSendReset { .. } => "tcp_send_reset",
            EventBody::TcpReceiveReset { .. } => "tcp_receive_reset",
            EventBody::CtInvalid { .. } => "ct_invalid",
            EventBody::CtTableFull { .. } => "ct_table_full",
            EventBody::IpvsConnNew { .. } => "ipvs_conn_new",
            EventBody::NatMapping { .. } => "nat_mapping",
            EventBody::NatDestroy { .. } => "nat_destroy",
            EventBody::CtCounters { .. } => "ct_counters",
        }
    }
}
