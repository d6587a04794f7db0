//! Event types shared by ktrace's eBPF programs and its userspace.
//!
//! Every record the kernel side writes to the ring buffer starts with an
//! [`EventHeader`] whose first field is the [`EventKind`]. All structs are
//! `#[repr(C)]` with explicit padding so that both sides agree byte for byte;
//! the size assertions at the bottom fail the build if a field moves.
//! Userspace never casts ring-buffer bytes to these types: it decodes them
//! with length-checked copies (see `ktrace-user/src/decode.rs`).
#![no_std]

/// What a record is. Stored as `u16` in [`EventHeader::kind`].
pub mod kind {
    /// The kernel sent a TCP RST ([`super::ResetEvent`]).
    pub const TCP_SEND_RESET: u16 = 1;
    /// A socket received a TCP RST ([`super::ResetEvent`]).
    pub const TCP_RECEIVE_RESET: u16 = 2;
    /// Conntrack judged a packet INVALID ([`super::CtInvalidEvent`]).
    pub const CT_INVALID: u16 = 3;
    /// Conntrack could not create an entry (table full) ([`super::CtInvalidEvent`]).
    pub const CT_TABLE_FULL: u16 = 4;
    /// IPVS created a connection ([`super::IpvsConnEvent`]).
    pub const IPVS_CONN_NEW: u16 = 5;
    /// A DNAT mapping was set up ([`super::NatEvent`]).
    pub const NAT_MAPPING: u16 = 6;
    /// `__nf_conntrack_confirm` dropped a packet: it lost the race to
    /// insert its new entry ([`super::NatEvent`], `snat` unused).
    pub const CT_CONFIRM_DROP: u16 = 7;
}

/// Which kernel program produced a record. Stored in [`EventHeader::hook`].
pub mod hook {
    pub const TP_TCP_SEND_RESET: u8 = 1;
    pub const TP_TCP_RECEIVE_RESET: u8 = 2;
    pub const KPROBE_TCP_V4_SEND_RESET: u8 = 3;
    pub const KPROBE_TCP_V6_SEND_RESET: u8 = 4;
    pub const KRETPROBE_NF_CONNTRACK_TCP_PACKET: u8 = 5;
    pub const KRETPROBE_INIT_CONNTRACK: u8 = 6;
    pub const KRETPROBE_IP_VS_CONN_NEW: u8 = 7;
    pub const KRETPROBE_NF_NAT_SETUP_INFO: u8 = 8;
    /// Not a kernel program: userspace's ctnetlink listener.
    pub const CTNETLINK: u8 = 9;
    pub const RAW_TP_TCP_SEND_RESET: u8 = 10;
    pub const RAW_TP_TCP_RECEIVE_RESET: u8 = 11;
    pub const FENTRY_TCP_V4_SEND_RESET: u8 = 12;
    pub const FENTRY_TCP_V6_SEND_RESET: u8 = 13;
    pub const KRETPROBE_NF_CONNTRACK_CONFIRM: u8 = 14;
}

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

/// `u32::MAX` marks an offset the running kernel does not have.
pub const NO_OFFSET: u32 = u32::MAX;
/// `u16::MAX` marks a tracepoint field the running kernel does not have.
pub const NO_FIELD: u16 = u16::MAX;

/// Flags in [`ResetEvent::flags`].
pub mod reset_flags {
    /// The reset was sent (or received) by a connection's socket; clear for
    /// the "no socket" case (nothing, or only a listener, matched the
    /// segment), e.g. the client's answer to an un-NATed reply.
    pub const HAS_SOCKET: u8 = 1;
    /// `reason` holds a kernel `enum sk_rst_reason` value.
    pub const HAS_REASON: u8 = 2;
    /// `trigger_flags` holds the TCP flags of the segment the RST answers.
    pub const HAS_TRIGGER: u8 = 4;
}

/// TCP header flag bits (byte 13 of the header).
pub mod tcp_flag {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

/// Whether a reset the kernel sent may be part of an incident: the one rule
/// the kernel side (which summarises the others, see [`ResetSummary`]) and
/// userspace's correlation engine (which looks into the rest) share, so
/// that a summarised reset is one the engine would have ignored.
///
/// A reset sent by a connection's own socket (`has_socket`: an abort, a
/// close with unread data) is the application's doing, and a reset that
/// answers a bare SYN (SYN without ACK) is a refused connection: neither
/// breaks a flow that NAT or conntrack mishandled. Everything else (no
/// socket, or a listener only, answering a segment of an established flow,
/// or of unknown flags) may be.
#[inline(always)]
pub const fn reset_may_be_an_incident(has_socket: bool, trigger_flags: Option<u8>) -> bool {
    if has_socket {
        return false;
    }
    match trigger_flags {
        Some(f) => !(f & tcp_flag::SYN != 0 && f & tcp_flag::ACK == 0),
        None => true,
    }
}

/// Why a summarised reset can never be an incident (the `class` of a
/// [`SummarySlot`]).
pub mod summary_class {
    /// No socket (or a listener only) answered a bare SYN: a refused connection.
    pub const REFUSED: u32 = 0;
    /// Sent by a connection's own socket.
    pub const SOCKET: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// What a summarised reset is counted under: its network namespace and
/// [`summary_class`]. Namespace 0: unknown, or no room left on its CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SummaryKey {
    pub netns: u32,
    pub class: u32,
}

/// Slots of a [`SummaryTable`]: (namespace, class) pairs one CPU can count
/// apart; more go to its `overflow` counts.
pub const SUMMARY_SLOTS: usize = 128;
/// How many slots a key may try (from its hash on) before it overflows.
pub const SUMMARY_PROBES: usize = 4;

/// One (namespace, class) a CPU counts. Once `used`, a slot keeps its key
/// and its count only grows, so userspace reads it without coordination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SummarySlot {
    pub netns: u32,
    pub class: u8,
    pub used: u8,
    pub _pad: [u8; 2],
    pub count: u64,
}

/// A CPU's whole summary state, the one value of the per-CPU array map
/// `RESET_SUMMARY_TABLE`: the program finds everything with one lookup
/// (no hash map: its lookup was a third of the hook's cost), and userspace
/// reads every CPU's table with one system call.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SummaryTable {
    /// This CPU's sampling window: when it started (event clock) and how
    /// many resets that could have been summarised it sent in full.
    pub window_start_ns: u64,
    pub window_sent: u64,
    /// By class: resets whose key found no free slot (namespace 0).
    pub overflow: [u64; summary_class::COUNT as usize],
    pub scratch: SummaryScratch,
    pub slots: [SummarySlot; SUMMARY_SLOTS],
}

/// The program's own per-CPU working state, kept in the [`SummaryTable`]
/// beside the window (one 64-byte line with it) so that a summarised
/// reset touches one map value: in a storm, each distinct cache line the
/// hook touches is a miss it pays again and again. Userspace ignores it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SummaryScratch {
    /// The tick (jiffies) at which the window was last checked: the
    /// window's clock is read once per tick, not once per reset.
    pub tick: u64,
    /// Unused: keeps the header one 64-byte line, the slots four to a line.
    pub _spare: [u64; 2],
    /// Where a BTF-typed pointer becomes a plain number (see the program).
    pub untyped: u64,
}

impl SummaryTable {
    /// Where `key`'s probe sequence starts.
    #[inline(always)]
    pub const fn home(key: SummaryKey) -> usize {
        // Fibonacci hashing: namespace inodes are often consecutive.
        let h = (key.netns ^ (key.class << 31)).wrapping_mul(0x9e37_79b9);
        (h >> 25) as usize & (SUMMARY_SLOTS - 1)
    }
}

/// How the send-reset programs treat resets that can never be an incident
/// ([`reset_may_be_an_incident`] false), set by userspace at load time.
///
/// In a reset storm (a SYN flood to a closed port, a crash-looping client)
/// almost every reset is of that kind, and the ring buffer's reserve and
/// submit are the largest part of the hook's cost. So each CPU sends the
/// first `sample_per_window` of them in each `window_ns` one by one (the
/// events and recordings still show who was refused) and counts the rest
/// in its [`SummaryTable`], which userspace reads at each tick: counts stay
/// exact, the detail is bounded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResetSummary {
    /// 0: every reset is sent one by one (`--every-reset`).
    pub enabled: u32,
    pub sample_per_window: u32,
    pub window_ns: u64,
}

impl ResetSummary {
    /// 32 per 100 ms per CPU: a burst of refused connections at human scale
    /// (a few clients retrying, a lab's test) shows in full, while a storm's
    /// detail is bounded to 320 events a second per CPU, 0.25 % of a
    /// 128 k/s storm, whose cost (~0.1 ms of CPU a second) is noise. The
    /// window is short so that a storm that starts, stops and starts again
    /// shows its sources again at once.
    pub const DEFAULT: ResetSummary = ResetSummary {
        enabled: 1,
        sample_per_window: 32,
        window_ns: 100_000_000,
    };
    pub const OFF: ResetSummary = ResetSummary {
        enabled: 0,
        sample_per_window: 0,
        window_ns: 0,
    };
}

/// First 16 bytes of every record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// One of [`kind`].
    pub kind: u16,
    /// One of [`hook`].
    pub hook: u8,
    pub _pad0: u8,
    /// Inode number of the network namespace (0 when unknown).
    pub netns: u32,
    /// CLOCK_MONOTONIC nanoseconds (`bpf_ktime_get_ns`). With
    /// `KernelLayout::tick_clock`, the time of this CPU's first event in the
    /// current scheduler tick: exact for an isolated event, up to one tick
    /// (1-10 ms) early within a burst, never later than the event, never
    /// decreasing on a CPU. Records of one ring are in the order written.
    pub ts_ns: u64,
}

/// An IPv4 or IPv6 address and port. IPv4 uses the first 4 bytes of `addr`.
///
/// The ring buffer's form, not userspace's: a fixed `#[repr(C)]` layout the
/// eBPF programs can fill with plain stores (`std::net::SocketAddr` is a
/// Rust enum with no stable layout, and the eBPF side has no `std`).
/// Userspace decodes it into a `SocketAddr` at once and uses nothing else.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    /// [`AF_INET`], [`AF_INET6`] or 0 when absent.
    pub family: u8,
    pub _pad: u8,
}

/// A reset sent or received ([`kind::TCP_SEND_RESET`], [`kind::TCP_RECEIVE_RESET`]).
/// `src` is the host that sent the RST, `dst` the host it is addressed to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResetEvent {
    pub header: EventHeader,
    pub src: Endpoint,
    pub dst: Endpoint,
    /// Kernel `enum sk_rst_reason` when [`reset_flags::HAS_REASON`] is set.
    pub reason: u32,
    /// TCP state of the socket (0 without one).
    pub state: u8,
    /// [`reset_flags`].
    pub flags: u8,
    /// TCP flags of the segment this RST answers (send side), when known:
    /// a SYN answered by RST is a refused connection, not a broken one.
    pub trigger_flags: u8,
    pub _pad: u8,
    /// Socket cookie (receive) or 0.
    pub sock_cookie: u64,
}

/// Classified conntrack INVALID reason, in [`CtInvalidEvent::reason`].
pub mod invalid_reason {
    pub const UNKNOWN: u8 = 0;
    /// The verdict hook fired without a log message being seen.
    pub const VERDICT_ONLY: u8 = 1;
    /// A log message was captured in [`super::CtInvalidEvent::message`].
    pub const MESSAGE: u8 = 2;
    /// `init_conntrack` failed: table full or out of memory.
    pub const TABLE_FULL: u8 = 3;
}

/// Length of the conntrack log message copied into [`CtInvalidEvent`].
pub const CT_MESSAGE_LEN: usize = 60;

/// Conntrack INVALID verdict or failed entry creation
/// ([`kind::CT_INVALID`], [`kind::CT_TABLE_FULL`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtInvalidEvent {
    pub header: EventHeader,
    /// Addresses of the packet itself.
    pub src: Endpoint,
    pub dst: Endpoint,
    /// The entry's ORIGINAL direction (client -> service) when known.
    pub orig_src: Endpoint,
    pub orig_dst: Endpoint,
    /// The entry's REPLY source (the backend after DNAT) when known.
    pub reply_src: Endpoint,
    /// One of [`invalid_reason`].
    pub reason: u8,
    /// `enum ip_conntrack_info` of the packet (>= 3 is the reply direction).
    pub ctinfo: u8,
    pub protocol: u8,
    pub _pad: u8,
    /// Verdict returned by the hook (e.g. -1 for INVALID), or the errno.
    pub verdict: i32,
    /// NUL-padded log message of the conntrack helper (e.g. "SEQ is over the upper bound").
    pub message: [u8; CT_MESSAGE_LEN],
}

impl Default for CtInvalidEvent {
    fn default() -> Self {
        Self {
            header: EventHeader::default(),
            src: Endpoint::default(),
            dst: Endpoint::default(),
            orig_src: Endpoint::default(),
            orig_dst: Endpoint::default(),
            reply_src: Endpoint::default(),
            reason: 0,
            ctinfo: 0,
            protocol: 0,
            _pad: 0,
            verdict: 0,
            message: [0; CT_MESSAGE_LEN],
        }
    }
}

/// IPVS scheduled a connection ([`kind::IPVS_CONN_NEW`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpvsConnEvent {
    pub header: EventHeader,
    pub client: Endpoint,
    pub virtual_service: Endpoint,
    pub real_server: Endpoint,
    /// `cp->flags` (`IP_VS_CONN_F_TEMPLATE` is 0x1000).
    pub conn_flags: u32,
    /// `cp->dest->flags` (`IP_VS_DEST_F_AVAILABLE` 0x1, `OVERLOAD` 0x2).
    pub dest_flags: u32,
    /// `cp->dest->weight`; -1 when the connection has no dest.
    pub weight: i32,
    pub protocol: u8,
    pub _pad: [u8; 7],
}

/// A DNAT mapping: `client` -> `service` was sent to `backend` ([`kind::NAT_MAPPING`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatEvent {
    pub header: EventHeader,
    pub client: Endpoint,
    pub service: Endpoint,
    pub backend: Endpoint,
    /// When the flow was SNATed too (masquerade): the reply tuple's
    /// destination, where the backend's replies go; family 0 otherwise.
    pub snat: Endpoint,
    pub protocol: u8,
    pub _pad: [u8; 7],
}

/// Offsets of tracepoint fields, read by userspace from tracefs `format`
/// files and handed to the programs as a global. [`NO_FIELD`] = absent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TpFields {
    pub skbaddr: u16,
    pub skaddr: u16,
    pub state: u16,
    pub reason: u16,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    /// `saddr`/`daddr`: 4 bytes (IPv4) or 28 (a sockaddr_in6-sized sockaddr, 6.10+).
    pub saddr: u16,
    pub daddr: u16,
    pub addr_size: u16,
    pub saddr_v6: u16,
    pub daddr_v6: u16,
    pub sock_cookie: u16,
    pub _pad: u16,
}

impl TpFields {
    pub const ABSENT: TpFields = TpFields {
        skbaddr: NO_FIELD,
        skaddr: NO_FIELD,
        state: NO_FIELD,
        reason: NO_FIELD,
        sport: NO_FIELD,
        dport: NO_FIELD,
        family: NO_FIELD,
        saddr: NO_FIELD,
        daddr: NO_FIELD,
        addr_size: 0,
        saddr_v6: NO_FIELD,
        daddr_v6: NO_FIELD,
        sock_cookie: NO_FIELD,
        _pad: 0,
    };
}

/// Byte offsets inside kernel structs, read by userspace from BTF (vmlinux
/// and module BTF) and handed to the programs as a global: the CO-RE of ktrace.
/// [`NO_OFFSET`] marks what the running kernel lacks.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelLayout {
    // struct sk_buff
    pub skb_head: u32,
    pub skb_network_header: u32,
    // struct net_device / struct net
    pub dev_nd_net: u32,
    pub net_ns_inum: u32,
    // struct sock_common
    pub sk_net: u32,
    pub sk_family: u32,
    /// `skc_addrpair`: daddr then rcv_saddr (IPv4), 8 bytes.
    pub sk_addrpair: u32,
    /// `skc_portpair`: dport (big endian) then num (host order), 4 bytes.
    pub sk_portpair: u32,
    pub sk_v6_daddr: u32,
    pub sk_v6_rcv_saddr: u32,
    pub sk_cookie: u32,
    // struct nf_conn
    pub ct_tuplehash: u32,
    /// sizeof(struct nf_conntrack_tuple_hash): tuplehash[1] is at ct_tuplehash + this.
    pub ct_tuplehash_size: u32,
    pub ct_status: u32,
    pub ct_net: u32,
    // struct nf_conntrack_tuple (relative to the tuple)
    pub tuple_src_u3: u32,
    pub tuple_src_port: u32,
    pub tuple_src_l3num: u32,
    pub tuple_dst_u3: u32,
    pub tuple_dst_port: u32,
    pub tuple_dst_protonum: u32,
    // struct ip_vs_conn (module BTF)
    pub ipvs_caddr: u32,
    pub ipvs_vaddr: u32,
    pub ipvs_daddr: u32,
    pub ipvs_cport: u32,
    pub ipvs_vport: u32,
    pub ipvs_dport: u32,
    pub ipvs_af: u32,
    pub ipvs_daf: u32,
    pub ipvs_protocol: u32,
    pub ipvs_flags: u32,
    pub ipvs_dest: u32,
    /// `cp->ipvs` then `ipvs->net`: the connection's network namespace.
    pub ipvs_ipvs: u32,
    pub netns_ipvs_net: u32,
    // struct ip_vs_dest
    pub ipvs_dest_flags: u32,
    pub ipvs_dest_weight: u32,
    /// Index (0-based) of the `fmt` argument of `nf_ct_l4proto_log_invalid`
    /// (2 before 5.14, 3 after).
    pub log_invalid_fmt_arg: u32,
    /// Index of the `fmt` argument of `nf_l4proto_log_invalid` (4 before 5.14, 3 after).
    pub l4_log_invalid_fmt_arg: u32,
    /// 1 when `tcp_v{4,6}_send_reset` takes a third `reason` argument (6.10+).
    pub send_reset_has_reason: u32,
    // Read by every reset the kernel sends: kept together at the end, next
    // to the `RESET_SUMMARY` setting that follows this struct in the
    // object, so that a summarised reset's reads of its settings share a
    // cache line (each line it touches is a miss a storm pays again).
    pub skb_dev: u32,
    pub sk_state: u32,
    /// 1 when the `tcp_send_reset` tracepoint passes `reason` as its third
    /// argument (6.10+), for the raw tracepoint.
    pub send_reset_tp_has_reason: u32,
    /// 1 (where `bpf_jiffies64` exists, 5.5+): a CPU reads the precise
    /// clock once per scheduler tick and stamps its later events of that
    /// tick with the same time; 0: every event reads it. See
    /// `EventHeader::ts_ns`.
    pub tick_clock: u32,
    /// `sk_buff._nfct`: the conntrack entry and ctinfo (`& 7`).
    pub skb_nfct: u32,
    /// `sk_buff.cb` + `tcp_skb_cb.tcp_flags`: the TCP flags of a received
    /// segment, which TCP's receive path copies into the control block
    /// (`tcp_v{4,6}_fill_cb`) before any reset answers it. A plain load of
    /// the `sk_buff` instead of a read of the packet's headers.
    pub skb_tcp_flags: u32,
}

impl KernelLayout {
    pub const UNKNOWN: KernelLayout = KernelLayout {
        skb_head: NO_OFFSET,
        skb_network_header: NO_OFFSET,
        skb_dev: NO_OFFSET,
        dev_nd_net: NO_OFFSET,
        net_ns_inum: NO_OFFSET,
        sk_net: NO_OFFSET,
        sk_state: NO_OFFSET,
        sk_family: NO_OFFSET,
        sk_addrpair: NO_OFFSET,
        sk_portpair: NO_OFFSET,
        sk_v6_daddr: NO_OFFSET,
        sk_v6_rcv_saddr: NO_OFFSET,
        sk_cookie: NO_OFFSET,
        ct_tuplehash: NO_OFFSET,
        ct_tuplehash_size: NO_OFFSET,
        ct_status: NO_OFFSET,
        ct_net: NO_OFFSET,
        tuple_src_u3: NO_OFFSET,
        tuple_src_port: NO_OFFSET,
        tuple_src_l3num: NO_OFFSET,
        tuple_dst_u3: NO_OFFSET,
        tuple_dst_port: NO_OFFSET,
        tuple_dst_protonum: NO_OFFSET,
        ipvs_caddr: NO_OFFSET,
        ipvs_vaddr: NO_OFFSET,
        ipvs_daddr: NO_OFFSET,
        ipvs_cport: NO_OFFSET,
        ipvs_vport: NO_OFFSET,
        ipvs_dport: NO_OFFSET,
        ipvs_af: NO_OFFSET,
        ipvs_daf: NO_OFFSET,
        ipvs_protocol: NO_OFFSET,
        ipvs_flags: NO_OFFSET,
        ipvs_dest: NO_OFFSET,
        ipvs_ipvs: NO_OFFSET,
        netns_ipvs_net: NO_OFFSET,
        ipvs_dest_flags: NO_OFFSET,
        ipvs_dest_weight: NO_OFFSET,
        log_invalid_fmt_arg: 3,
        l4_log_invalid_fmt_arg: 3,
        send_reset_has_reason: 0,
        send_reset_tp_has_reason: 0,
        tick_clock: 0,
        skb_nfct: NO_OFFSET,
        skb_tcp_flags: NO_OFFSET,
    };
}

/// Indices of the per-CPU `COUNTERS` array map.
pub mod counter {
    /// Ring-buffer reservations that failed: events lost.
    pub const LOST: u32 = 0;
    /// Kernel reads (bpf_probe_read) that failed: events dropped as unreadable.
    pub const READ_ERRORS: u32 = 1;
    pub const COUNT: u32 = 2;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data structs with explicit padding and no pointers.
    unsafe impl aya::Pod for super::TpFields {}
    unsafe impl aya::Pod for super::KernelLayout {}
    unsafe impl aya::Pod for super::ResetSummary {}
    unsafe impl aya::Pod for super::SummaryTable {}
}

// Layout guards: a change here changes the ring-buffer format.
const _: () = {
    assert!(core::mem::size_of::<EventHeader>() == 16);
    assert!(core::mem::size_of::<Endpoint>() == 20);
    assert!(core::mem::size_of::<ResetEvent>() == 72);
    assert!(core::mem::size_of::<CtInvalidEvent>() == 184);
    assert!(core::mem::size_of::<IpvsConnEvent>() == 96);
    assert!(core::mem::size_of::<NatEvent>() == 104);
    assert!(core::mem::size_of::<TpFields>() == 28);
    assert!(core::mem::size_of::<ResetSummary>() == 16);
    assert!(core::mem::size_of::<SummarySlot>() == 16);
    assert!(core::mem::size_of::<SummaryScratch>() == 32);
    assert!(core::mem::size_of::<SummaryTable>() == 64 + 16 * SUMMARY_SLOTS);
    assert!(SUMMARY_SLOTS.is_power_of_two() && SUMMARY_SLOTS == 1 << 7);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_incident_rule_ignores_refusals_and_socket_resets() {
        use tcp_flag::{ACK, FIN, PSH, SYN};
        // A connection's own socket: never.
        assert!(!reset_may_be_an_incident(true, Some(ACK)));
        assert!(!reset_may_be_an_incident(true, None));
        // No socket answering a bare SYN: a refused connection.
        assert!(!reset_may_be_an_incident(false, Some(SYN)));
        // No socket answering a flow's segment (or unknown flags): maybe.
        for f in [ACK, ACK | PSH, FIN | ACK, SYN | ACK, 0] {
            assert!(reset_may_be_an_incident(false, Some(f)), "{f:#x}");
        }
        assert!(reset_may_be_an_incident(false, None));
    }

    #[test]
    fn keys_spread_over_the_table() {
        let home = |netns| SummaryTable::home(SummaryKey { netns, class: 0 });
        let mut seen = [false; SUMMARY_SLOTS];
        for n in 4026531840..4026531840 + 64 {
            seen[home(n)] = true;
        }
        // 64 consecutive inodes land on well over half as many slots.
        assert!(seen.iter().filter(|s| **s).count() > 40);
        assert_ne!(
            SummaryTable::home(SummaryKey { netns: 7, class: 0 }),
            SummaryTable::home(SummaryKey { netns: 7, class: 1 })
        );
    }
}
