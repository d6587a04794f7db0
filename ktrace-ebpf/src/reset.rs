//! TCP resets: sent by the kernel (tracepoint on 6.10+, kprobe on
//! `tcp_v{4,6}_send_reset` where the tracepoint misses the no-socket case)
//! and received by a socket (tracepoint).

use aya_ebpf::programs::{
    BtfTracePointContext, FEntryContext, ProbeContext, RawTracePointContext, TracePointContext,
};
use ktrace_common::{
    hook, kind, reset_flags, Endpoint, ResetEvent, TpFields, AF_INET, AF_INET6, NO_FIELD,
};

use crate::kernel::{self, layout, TCP_FLAG_RST, TCP_LISTEN};
use crate::ring;
use crate::summary::{self, Outcome};

/// Field offsets of `tcp:tcp_send_reset` / `tcp:tcp_receive_reset`, parsed by
/// userspace from tracefs `format` files.
#[no_mangle]
static TP_SEND_RESET: TpFields = TpFields::ABSENT;
#[no_mangle]
static TP_RECEIVE_RESET: TpFields = TpFields::ABSENT;

macro_rules! field {
    ($tp:ident . $field:ident) => {
        unsafe { core::ptr::read_volatile(&$tp.$field) }
    };
}

#[inline(always)]
fn tp_read<T>(ctx: &TracePointContext, off: u16) -> Result<T, i64> {
    if off == NO_FIELD {
        return Err(-1);
    }
    unsafe { ctx.read_at::<T>(off as usize).map_err(|e| e as i64) }
}

/// Decodes a `__u8 addr[28]` tracepoint field: a sockaddr_in or sockaddr_in6.
#[inline(always)]
fn tp_sockaddr(ctx: &TracePointContext, off: u16, out: &mut Endpoint) -> Result<(), i64> {
    // One read of the whole sockaddr_in6-sized field.
    let sa: [u8; 28] = tp_read(ctx, off)?;
    let family = u16::from_ne_bytes([sa[0], sa[1]]);
    out.port = u16::from_be_bytes([sa[2], sa[3]]);
    if family == AF_INET6 as u16 {
        out.family = AF_INET6;
        out.addr.copy_from_slice(&sa[8..24]);
    } else {
        out.family = AF_INET;
        out.addr[..4].copy_from_slice(&sa[4..8]);
    }
    Ok(())
}

/// Decodes the pre-6.10 layout: `sport`, `dport`, `saddr[4]`, `saddr_v6[16]`, maybe `family`.
#[inline(always)]
fn tp_split_addrs(
    ctx: &TracePointContext,
    tp: &TpFields,
    local: &mut Endpoint,
    remote: &mut Endpoint,
) -> Result<(), i64> {
    local.port = tp_read(ctx, tp.sport)?;
    remote.port = tp_read(ctx, tp.dport)?;
    let v6_local: [u8; 16] = tp_read(ctx, tp.saddr_v6)?;
    let family: u16 = if tp.family != NO_FIELD {
        tp_read(ctx, tp.family)?
    } else if v6_local[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] {
        // Before `family` existed, IPv4 sockets stored v4-mapped addresses.
        AF_INET as u16
    } else {
        AF_INET6 as u16
    };
    if family == AF_INET6 as u16 {
        local.family = AF_INET6;
        remote.family = AF_INET6;
        local.addr = v6_local;
        remote.addr = tp_read(ctx, tp.daddr_v6)?;
    } else {
        local.family = AF_INET;
        remote.family = AF_INET;
        let s: [u8; 4] = tp_read(ctx, tp.saddr)?;
        let d: [u8; 4] = tp_read(ctx, tp.daddr)?;
        local.addr[..4].copy_from_slice(&s);
        remote.addr[..4].copy_from_slice(&d);
    }
    Ok(())
}

#[inline(always)]
fn copy_fields(tp: &'static TpFields) -> TpFields {
    TpFields {
        skbaddr: field!(tp.skbaddr),
        skaddr: field!(tp.skaddr),
        state: field!(tp.state),
        reason: field!(tp.reason),
        sport: field!(tp.sport),
        dport: field!(tp.dport),
        family: field!(tp.family),
        saddr: field!(tp.saddr),
        daddr: field!(tp.daddr),
        addr_size: field!(tp.addr_size),
        saddr_v6: field!(tp.saddr_v6),
        daddr_v6: field!(tp.daddr_v6),
        sock_cookie: field!(tp.sock_cookie),
        _pad: 0,
    }
}

/// `tcp:tcp_send_reset`. On 6.10+ it fires for the no-socket case too.
/// When the RST answers a segment (`skbaddr` set), its addresses are taken
/// from that segment, reversed: the tracepoint's own come from `sk`, which
/// is the listener (0.0.0.0) when a segment hits a port with no connection.
#[inline(always)]
pub fn try_tp_tcp_send_reset(ctx: &TracePointContext) -> Result<(), i64> {
    let tp = copy_fields(&TP_SEND_RESET);
    let skb: u64 = tp_read(ctx, tp.skbaddr).unwrap_or(0);
    let sk: u64 = tp_read(ctx, tp.skaddr).unwrap_or(0);
    if let Outcome::Done = summary::try_count::<false>(sk, skb)? {
        return Ok(());
    }
    let mut ev = ResetEvent::default();
    if tp.reason != NO_FIELD {
        ev.reason = tp_read(ctx, tp.reason)?;
        ev.flags |= reset_flags::HAS_REASON;
    }
    if sk != 0 {
        ev.state = tp_read::<i32>(ctx, tp.state).unwrap_or(0) as u8;
        if ev.state != TCP_LISTEN {
            ev.flags |= reset_flags::HAS_SOCKET;
        }
    }
    let mut from_skb = false;
    let mut dev = 0;
    if skb != 0 {
        if let Ok(pkt) = kernel::skb_packet::<false>(skb) {
            dev = pkt.dev;
            ev.trigger_flags = pkt.tcp_flags;
            ev.flags |= reset_flags::HAS_TRIGGER;
            ev.src = pkt.dst;
            ev.dst = pkt.src;
            from_skb = true;
        }
    }
    if !from_skb {
        if tp.addr_size == 28 {
            tp_sockaddr(ctx, tp.saddr, &mut ev.src)?;
            tp_sockaddr(ctx, tp.daddr, &mut ev.dst)?;
        } else {
            tp_split_addrs(ctx, &tp, &mut ev.src, &mut ev.dst)?;
        }
    }
    let netns = if sk != 0 {
        kernel::sock_netns(sk)
    } else {
        kernel::dev_netns(dev)
    };
    ev.header = ring::header(kind::TCP_SEND_RESET, hook::TP_TCP_SEND_RESET, netns);
    ring::emit(ev);
    Ok(())
}

/// `tcp:tcp_receive_reset`: a socket accepted an RST. The tracepoint gives
/// the socket's own addresses; the RST came from the remote end.
#[inline(always)]
pub fn try_tp_tcp_receive_reset(ctx: &TracePointContext) -> Result<(), i64> {
    let tp = copy_fields(&TP_RECEIVE_RESET);
    let sk: u64 = tp_read(ctx, tp.skaddr).unwrap_or(0);
    let mut ev = ResetEvent::default();
    tp_split_addrs(ctx, &tp, &mut ev.dst, &mut ev.src)?;
    ev.flags = reset_flags::HAS_SOCKET;
    if tp.sock_cookie != NO_FIELD {
        ev.sock_cookie = tp_read(ctx, tp.sock_cookie).unwrap_or(0);
    }
    // The socket state lives in sock_common; the tracepoint does not carry it.
    ev.header = ring::header(
        kind::TCP_RECEIVE_RESET,
        hook::TP_TCP_RECEIVE_RESET,
        kernel::sock_netns(sk),
    );
    ring::emit(ev);
    Ok(())
}

/// An RST sent by the kernel, from the function's or raw tracepoint's
/// arguments: the RST answers the segment in `skb` (its addresses are that
/// segment's, reversed); without a segment (an active reset) they are the
/// socket's own.
///
/// `TYPED`: `sk` and `skb` are BTF-typed arguments (fentry, tp_btf): the
/// packet's `sk_buff` fields are read by plain loads, and NULL is tested on
/// their [`kernel::untyped`] values (the verifier may assume a typed
/// argument is never NULL and drop a test on the argument itself).
#[inline(always)]
fn emit_send_reset<const TYPED: bool>(
    sk_arg: u64,
    skb_arg: u64,
    reason: Option<u32>,
    which: u8,
) -> Result<(), i64> {
    let (sk, skb) = match summary::try_count::<TYPED>(sk_arg, skb_arg)? {
        Outcome::Done => return Ok(()),
        Outcome::Emit { sk, skb } => (sk, skb),
    };
    let mut ev = ResetEvent::default();
    let mut has_skb = false;
    // `skb->dev` as the packet read found it (0 when `TYPED`: those
    // programs take the namespace by plain loads instead).
    let mut dev = 0;
    // The second test is for kernels that type the argument "maybe NULL"
    // (the verifier then wants the test on the argument itself).
    if skb != 0 && skb_arg != 0 {
        let pkt = kernel::skb_packet::<TYPED>(skb_arg)?;
        // The kernel never answers an RST with an RST: it returns early.
        if pkt.tcp_flags & TCP_FLAG_RST != 0 {
            return Ok(());
        }
        ev.src = pkt.dst;
        ev.dst = pkt.src;
        ev.flags = reset_flags::HAS_TRIGGER;
        ev.trigger_flags = pkt.tcp_flags;
        dev = pkt.dev;
        has_skb = true;
    } else if sk != 0 {
        kernel::sock_endpoints(sk, &mut ev.src, &mut ev.dst)?;
    } else {
        return Ok(());
    }
    if let Some(r) = reason {
        ev.reason = r;
        ev.flags |= reset_flags::HAS_REASON;
    }
    let netns = if sk != 0 {
        ev.state = kernel::read::<u8>(sk, layout!(sk_state)).unwrap_or(0);
        if ev.state != TCP_LISTEN {
            ev.flags |= reset_flags::HAS_SOCKET;
        }
        kernel::sock_netns(sk)
    } else if TYPED && has_skb && skb_arg != 0 {
        kernel::skb_netns(skb_arg)
    } else if !TYPED && has_skb {
        // Untyped, the device came with the packet: no second read of it.
        kernel::dev_netns(dev)
    } else {
        0
    };
    ev.header = ring::header(kind::TCP_SEND_RESET, which, netns);
    ring::emit(ev);
    Ok(())
}

/// kprobe on `tcp_v4_send_reset(sk, skb[, reason])` / `tcp_v6_send_reset`.
#[inline(always)]
pub fn try_kprobe_send_reset(ctx: &ProbeContext, which: u8) -> Result<(), i64> {
    let sk: u64 = ctx.arg(0).unwrap_or(0);
    let skb: u64 = ctx.arg(1).ok_or(-1i64)?;
    let reason =
        (layout!(send_reset_has_reason) == 1).then(|| ctx.arg::<u64>(2).unwrap_or(0) as u32);
    emit_send_reset::<false>(sk, skb, reason, which)
}

/// fentry on `tcp_v4_send_reset(sk, skb[, reason])` / `tcp_v6_send_reset`:
/// the same arguments as the kprobe, through a BPF trampoline (cheaper).
#[inline(always)]
pub fn try_fentry_send_reset(ctx: &FEntryContext, which: u8) -> Result<(), i64> {
    let sk: u64 = ctx.arg(0);
    let skb: u64 = ctx.arg(1);
    let reason = (layout!(send_reset_has_reason) == 1).then(|| ctx.arg::<u64>(2) as u32);
    emit_send_reset::<true>(sk, skb, reason, which)
}

/// Raw tracepoint `tcp_send_reset(sk, skb[, reason])`: the tracepoint's own
/// arguments, without the cost of formatting its record.
#[inline(always)]
pub fn try_raw_tcp_send_reset(ctx: &RawTracePointContext) -> Result<(), i64> {
    let sk: u64 = ctx.arg(0);
    let skb: u64 = ctx.arg(1);
    let reason = (layout!(send_reset_tp_has_reason) == 1).then(|| ctx.arg::<u64>(2) as u32);
    emit_send_reset::<false>(sk, skb, reason, hook::RAW_TP_TCP_SEND_RESET)
}

/// The same raw tracepoint with BTF-typed arguments (tp_btf, 5.5+): the
/// packet's `sk_buff` fields by plain loads instead of a probe read.
#[inline(always)]
pub fn try_btf_tcp_send_reset(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let sk: u64 = ctx.arg(0);
    let skb: u64 = ctx.arg(1);
    let reason = (layout!(send_reset_tp_has_reason) == 1).then(|| ctx.arg::<u64>(2) as u32);
    emit_send_reset::<true>(sk, skb, reason, hook::RAW_TP_TCP_SEND_RESET)
}

/// Raw tracepoint `tcp_receive_reset(sk)`: the socket accepted an RST from
/// its peer.
#[inline(always)]
pub fn try_raw_tcp_receive_reset(ctx: &RawTracePointContext) -> Result<(), i64> {
    let sk: u64 = ctx.arg(0);
    if sk == 0 {
        return Ok(());
    }
    let mut ev = ResetEvent {
        flags: reset_flags::HAS_SOCKET,
        ..ResetEvent::default()
    };
    kernel::sock_endpoints(sk, &mut ev.dst, &mut ev.src)?;
    ev.state = kernel::read::<u8>(sk, layout!(sk_state)).unwrap_or(0);
    ev.sock_cookie = kernel::read::<u64>(sk, layout!(sk_cookie)).unwrap_or(0);
    ev.header = ring::header(
        kind::TCP_RECEIVE_RESET,
        hook::RAW_TP_TCP_RECEIVE_RESET,
        kernel::sock_netns(sk),
    );
    ring::emit(ev);
    Ok(())
}
