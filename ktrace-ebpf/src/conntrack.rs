//! Conntrack: INVALID verdicts on TCP (with the reason the log helpers were
//! given), failed entry creation (table full) and DNAT set-up.
//!
//! Each kretprobe pairs with a kprobe on the same function that stashes the
//! arguments in a per-CPU slot: these functions run in softirq context, so
//! entry and return happen on one CPU with nothing else in between on it.

use aya_ebpf::{
    macros::map,
    maps::PerCpuArray,
    programs::{ProbeContext, RetProbeContext},
};
use ktrace_common::{
    hook, invalid_reason, kind, CtInvalidEvent, Endpoint, NatEvent, AF_INET, AF_INET6,
    CT_MESSAGE_LEN,
};

use crate::kernel::{self, layout};
use crate::ring;

/// Arguments of the function being probed, from entry to return.
#[repr(C)]
pub struct Stash {
    skb: u64,
    /// The `struct nf_conn *`, or for the table-full hook the tuple.
    ct: u64,
    /// ctinfo, maniptype or the `struct net *`, depending on the hook.
    arg: u64,
    has_message: u64,
    message: [u8; CT_MESSAGE_LEN],
    _pad: u32,
}

#[map]
static TCP_PACKET_STASH: PerCpuArray<Stash> = PerCpuArray::with_max_entries(1, 0);
#[map]
static INIT_CONNTRACK_STASH: PerCpuArray<Stash> = PerCpuArray::with_max_entries(1, 0);
#[map]
static NAT_SETUP_STASH: PerCpuArray<Stash> = PerCpuArray::with_max_entries(1, 0);

const NF_ACCEPT: i32 = 1;
const NF_NAT_MANIP_DST: u64 = 1;
const IPS_DST_NAT: u32 = 1 << 5;

#[inline(always)]
fn stash(map: &PerCpuArray<Stash>) -> Result<&mut Stash, i64> {
    let ptr = map.get_ptr_mut(0).ok_or(-1i64)?;
    Ok(unsafe { &mut *ptr })
}

/// Reads `ct->tuplehash[dir].tuple` source or destination as an endpoint.
#[inline(always)]
fn ct_endpoint(ct: u64, dir: u32, dst: bool) -> Result<Endpoint, i64> {
    let tuple = ct + layout!(ct_tuplehash) as u64 + dir as u64 * layout!(ct_tuplehash_size) as u64;
    tuple_endpoint(tuple, dst)
}

/// Reads the source or destination of a `struct nf_conntrack_tuple *`.
#[inline(always)]
fn tuple_endpoint(tuple: u64, dst: bool) -> Result<Endpoint, i64> {
    let l3num: u16 = kernel::read(tuple, layout!(tuple_src_l3num))?;
    let (addr_off, port_off) = if dst {
        (layout!(tuple_dst_u3), layout!(tuple_dst_port))
    } else {
        (layout!(tuple_src_u3), layout!(tuple_src_port))
    };
    let family = if l3num == AF_INET6 as u16 {
        AF_INET6
    } else {
        AF_INET
    };
    let mut ep = Endpoint::default();
    kernel::read_addr(tuple + addr_off as u64, family, &mut ep)?;
    let port: [u8; 2] = kernel::read(tuple, port_off)?;
    ep.port = u16::from_be_bytes(port);
    Ok(ep)
}

#[inline(always)]
fn ct_netns(ct: u64) -> u32 {
    match kernel::read::<u64>(ct, layout!(ct_net)) {
        Ok(net) => kernel::net_inum(net),
        Err(_) => 0,
    }
}

/// kprobe `nf_conntrack_tcp_packet(ct, skb, dataoff, ctinfo, state)`.
#[inline(always)]
pub fn try_tcp_packet_entry(ctx: &ProbeContext) -> Result<(), i64> {
    let s = stash(&TCP_PACKET_STASH)?;
    s.ct = ctx.arg(0).unwrap_or(0);
    s.skb = ctx.arg(1).unwrap_or(0);
    s.arg = ctx.arg::<u64>(3).unwrap_or(0);
    s.has_message = 0;
    Ok(())
}

/// kprobe on `nf_ct_l4proto_log_invalid` / `nf_l4proto_log_invalid`: the
/// reason conntrack is about to give. Kept only for the packet that
/// `nf_conntrack_tcp_packet` is judging on this CPU.
#[inline(always)]
pub fn try_log_invalid(ctx: &ProbeContext, fmt_arg: u32) -> Result<(), i64> {
    let s = stash(&TCP_PACKET_STASH)?;
    let skb: u64 = ctx.arg(0).unwrap_or(0);
    if s.skb == 0 || skb != s.skb || s.has_message != 0 {
        return Ok(());
    }
    // The index comes from LAYOUT: read through kernel::arg_at, not ctx.arg
    // (a variable ctx offset is refused by the verifier).
    let fmt: u64 = kernel::arg_at(ctx, fmt_arg).ok_or(-1i64)?;
    let mut head = [0u8; 4];
    kernel::read_bytes(fmt, &mut head)?;
    // "%pV": the next argument is a struct va_format whose first member is
    // the template; "%s": the next argument is the message itself.
    let next: u64 = kernel::arg_at(ctx, fmt_arg + 1).unwrap_or(0);
    let text = if head[0] == b'%' && head[1] == b'p' && head[2] == b'V' {
        kernel::read::<u64>(next, 0).unwrap_or(0)
    } else if head[0] == b'%' && head[1] == b's' && head[2] == 0 {
        next
    } else {
        fmt
    };
    kernel::read_str(text, &mut s.message);
    s.has_message = 1;
    Ok(())
}

/// kretprobe `nf_conntrack_tcp_packet`: -NF_ACCEPT (-1) means INVALID.
#[inline(always)]
pub fn try_tcp_packet_return(ctx: &RetProbeContext) -> Result<(), i64> {
    let s = stash(&TCP_PACKET_STASH)?;
    let verdict = ctx.ret::<i64>() as i32;
    let (ct, skb) = (s.ct, s.skb);
    s.skb = 0;
    if verdict != -NF_ACCEPT || ct == 0 {
        return Ok(());
    }
    let Some(mut slot) = ring::Slot::<CtInvalidEvent>::reserve() else {
        return Ok(());
    };
    let ev = slot.get();
    ev.verdict = verdict;
    ev.ctinfo = s.arg as u8;
    ev.protocol = 6;
    if let Ok(pkt) = kernel::skb_packet(skb) {
        ev.src = pkt.src;
        ev.dst = pkt.dst;
    }
    ev.orig_src = ct_endpoint(ct, 0, false).unwrap_or_default();
    ev.orig_dst = ct_endpoint(ct, 0, true).unwrap_or_default();
    ev.reply_src = ct_endpoint(ct, 1, false).unwrap_or_default();
    if s.has_message != 0 {
        ev.reason = invalid_reason::MESSAGE;
        ev.message = s.message;
    } else {
        ev.reason = invalid_reason::VERDICT_ONLY;
    }
    ev.header = ring::header(
        kind::CT_INVALID,
        hook::KRETPROBE_NF_CONNTRACK_TCP_PACKET,
        ct_netns(ct),
    );
    slot.submit();
    Ok(())
}

/// kprobe `init_conntrack(net, tmpl, tuple, skb, dataoff, hash)`, or, where
/// the compiler inlined or cloned that static function (Debian's 6.1 has
/// only `init_conntrack.constprop.0`), its allocator
/// `__nf_conntrack_alloc(net, zone, orig, repl, gfp, hash)`: the same
/// ERR_PTR on a full table, with `net` and the packet's tuple at the same
/// argument positions. The tuple, not the skb (which the allocator does not
/// get), gives the addresses.
#[inline(always)]
pub fn try_init_conntrack_entry(ctx: &ProbeContext) -> Result<(), i64> {
    let s = stash(&INIT_CONNTRACK_STASH)?;
    s.arg = ctx.arg(0).unwrap_or(0);
    s.ct = ctx.arg(2).unwrap_or(0);
    Ok(())
}

/// kretprobe `init_conntrack` / `__nf_conntrack_alloc`: an ERR_PTR means no
/// entry could be created; with a full table the packet is then dropped.
#[inline(always)]
pub fn try_init_conntrack_return(ctx: &RetProbeContext) -> Result<(), i64> {
    let s = stash(&INIT_CONNTRACK_STASH)?;
    let ret: u64 = ctx.ret();
    let (net, tuple) = (s.arg, s.ct);
    s.ct = 0;
    // IS_ERR: the top 4095 values of the address space are errnos.
    if ret < (-4095i64) as u64 || tuple == 0 {
        return Ok(());
    }
    let mut ev = CtInvalidEvent {
        verdict: ret as i64 as i32,
        reason: invalid_reason::TABLE_FULL,
        src: tuple_endpoint(tuple, false)?,
        dst: tuple_endpoint(tuple, true)?,
        protocol: kernel::read(tuple, layout!(tuple_dst_protonum)).unwrap_or(0),
        ..CtInvalidEvent::default()
    };
    ev.header = ring::header(
        kind::CT_TABLE_FULL,
        hook::KRETPROBE_INIT_CONNTRACK,
        kernel::net_inum(net),
    );
    ring::emit(ev);
    Ok(())
}

/// kprobe `nf_nat_setup_info(ct, range, maniptype)`.
#[inline(always)]
pub fn try_nat_setup_entry(ctx: &ProbeContext) -> Result<(), i64> {
    let s = stash(&NAT_SETUP_STASH)?;
    s.ct = ctx.arg(0).unwrap_or(0);
    s.arg = ctx.arg(2).unwrap_or(0);
    Ok(())
}

/// kretprobe `nf_nat_setup_info`: a DNAT binding was made when the status
/// has IPS_DST_NAT (null bindings pass through here too).
#[inline(always)]
pub fn try_nat_setup_return(ctx: &RetProbeContext) -> Result<(), i64> {
    let s = stash(&NAT_SETUP_STASH)?;
    let verdict = ctx.ret::<i64>() as i32;
    let (ct, manip) = (s.ct, s.arg);
    s.ct = 0;
    if verdict != NF_ACCEPT || manip != NF_NAT_MANIP_DST || ct == 0 {
        return Ok(());
    }
    let status: u64 = kernel::read(ct, layout!(ct_status))?;
    if status as u32 & IPS_DST_NAT == 0 {
        return Ok(());
    }
    let mut ev = NatEvent {
        client: ct_endpoint(ct, 0, false)?,
        service: ct_endpoint(ct, 0, true)?,
        backend: ct_endpoint(ct, 1, false)?,
        ..NatEvent::default()
    };
    let tuple = ct + layout!(ct_tuplehash) as u64;
    ev.protocol = kernel::read(tuple, layout!(tuple_dst_protonum)).unwrap_or(0);
    ev.header = ring::header(
        kind::NAT_MAPPING,
        hook::KRETPROBE_NF_NAT_SETUP_INFO,
        ct_netns(ct),
    );
    ring::emit(ev);
    Ok(())
}
