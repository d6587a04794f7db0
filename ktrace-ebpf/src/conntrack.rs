//! Conntrack: INVALID verdicts on TCP (with the reason the log helpers were
//! given), failed entry creation (table full) and DNAT set-up.
//!
//! Each kretprobe pairs with a kprobe on the same function that stashes the
//! arguments until the return. The stash is keyed by the task and a nesting
//! depth, not by CPU: for locally generated traffic these functions run in
//! process context, which can be preempted (or migrate) between entry and
//! return while another packet passes through on the same CPU, and a
//! softirq can run the same function on top of a task that is inside it.
//! A task's calls nest last-in first-out, so (task, depth) pairs each
//! return with its own entry.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns},
    macros::map,
    maps::LruHashMap,
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

/// Which function a stash entry belongs to.
const TCP_PACKET: u32 = 0;
const INIT_CONNTRACK: u32 = 1;
const NAT_SETUP: u32 = 2;
const CONFIRM: u32 = 3;

/// One pending call: the task, the function and how many calls of it the
/// task had already open (0 for the outermost).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CallKey {
    task: u64,
    func: u32,
    depth: u32,
}

/// How many calls of a function a task has open, and since when.
#[repr(C)]
pub struct Open {
    depth: u32,
    _pad: u32,
    since_ns: u64,
}

/// Calls deeper than this are not followed (counted as read errors).
const MAX_DEPTH: u32 = 4;
/// A call open longer than this lost its return (a kretprobe can miss
/// returns when its instances run out): the task's count starts again.
const STALE_NS: u64 = 1_000_000_000;

#[map]
static STASH: LruHashMap<CallKey, Stash> = LruHashMap::with_max_entries(4096, 0);
#[map]
static OPEN: LruHashMap<CallKey, Open> = LruHashMap::with_max_entries(4096, 0);

/// The running task. The idle tasks of all CPUs share pid 0, and softirqs
/// run on top of them: there the CPU tells them apart.
#[inline(always)]
fn task() -> u64 {
    let id = bpf_get_current_pid_tgid();
    if id as u32 == 0 {
        u64::MAX - unsafe { bpf_get_smp_processor_id() } as u64
    } else {
        id
    }
}

/// Opens a call of `func` by this task: a zeroed stash for its arguments.
#[inline(always)]
fn stash_open(func: u32) -> Result<&'static mut Stash, i64> {
    let task = task();
    let open_key = CallKey { task, func, depth: 0 };
    let now = unsafe { bpf_ktime_get_ns() };
    let depth = match OPEN.get_ptr_mut(&open_key) {
        Some(o) => {
            // SAFETY: a map value; only this task's programs use its key.
            let o = unsafe { &mut *o };
            if now.wrapping_sub(o.since_ns) > STALE_NS {
                o.depth = 0;
            }
            o.depth
        }
        None => 0,
    };
    if depth >= MAX_DEPTH {
        return Err(-7);
    }
    let key = CallKey { task, func, depth };
    let fresh = Stash {
        skb: 0,
        ct: 0,
        arg: 0,
        has_message: 0,
        message: [0; CT_MESSAGE_LEN],
        _pad: 0,
    };
    STASH.insert(&key, &fresh, 0).map_err(|e| e as i64)?;
    let open = Open { depth: depth + 1, _pad: 0, since_ns: now };
    OPEN.insert(&open_key, &open, 0).map_err(|e| e as i64)?;
    let ptr = STASH.get_ptr_mut(&key).ok_or(-1i64)?;
    // SAFETY: a map value, held until this call's return removes it.
    Ok(unsafe { &mut *ptr })
}

/// The innermost open call of `func` by this task, without closing it.
#[inline(always)]
fn stash_current(func: u32) -> Option<&'static mut Stash> {
    let task = task();
    let o = OPEN.get_ptr(&CallKey { task, func, depth: 0 })?;
    let depth = unsafe { (*o).depth };
    if depth == 0 {
        return None;
    }
    let ptr = STASH.get_ptr_mut(&CallKey { task, func, depth: depth - 1 })?;
    Some(unsafe { &mut *ptr })
}

/// Closes the innermost open call of `func` by this task and returns its
/// stash (a copy: the map entry is removed).
#[inline(always)]
fn stash_close(func: u32) -> Option<Stash> {
    let task = task();
    let open_key = CallKey { task, func, depth: 0 };
    let o = OPEN.get_ptr_mut(&open_key)?;
    // SAFETY: a map value; only this task's programs use its key.
    let o = unsafe { &mut *o };
    if o.depth == 0 {
        return None;
    }
    o.depth -= 1;
    let key = CallKey { task, func, depth: o.depth };
    if o.depth == 0 {
        let _ = OPEN.remove(&open_key);
    }
    let ptr = STASH.get_ptr(&key)?;
    // SAFETY: a map value, copied before its removal.
    let s = unsafe { core::ptr::read(ptr) };
    let _ = STASH.remove(&key);
    Some(s)
}

const NF_ACCEPT: i32 = 1;
const NF_NAT_MANIP_DST: u64 = 1;
const IPS_SRC_NAT: u32 = 1 << 4;
const IPS_DST_NAT: u32 = 1 << 5;

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
    let s = stash_open(TCP_PACKET)?;
    s.ct = ctx.arg(0).unwrap_or(0);
    s.skb = ctx.arg(1).unwrap_or(0);
    s.arg = ctx.arg::<u64>(3).unwrap_or(0);
    Ok(())
}

/// kprobe on `nf_ct_l4proto_log_invalid` / `nf_l4proto_log_invalid`: the
/// reason conntrack is about to give. Kept only for the packet that
/// `nf_conntrack_tcp_packet` is judging in this task.
#[inline(always)]
pub fn try_log_invalid(ctx: &ProbeContext, fmt_arg: u32) -> Result<(), i64> {
    let Some(s) = stash_current(TCP_PACKET) else {
        return Ok(());
    };
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
    let Some(s) = stash_close(TCP_PACKET) else {
        return Ok(());
    };
    let verdict = ctx.ret::<i64>() as i32;
    let (ct, skb) = (s.ct, s.skb);
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
    if let Ok(pkt) = kernel::skb_packet::<false>(skb) {
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
    let s = stash_open(INIT_CONNTRACK)?;
    s.arg = ctx.arg(0).unwrap_or(0);
    s.ct = ctx.arg(2).unwrap_or(0);
    Ok(())
}

/// kretprobe `init_conntrack` / `__nf_conntrack_alloc`: an ERR_PTR means no
/// entry could be created; with a full table the packet is then dropped.
#[inline(always)]
pub fn try_init_conntrack_return(ctx: &RetProbeContext) -> Result<(), i64> {
    let Some(s) = stash_close(INIT_CONNTRACK) else {
        return Ok(());
    };
    let ret: u64 = ctx.ret();
    let (net, tuple) = (s.arg, s.ct);
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

/// The flow of entry `ct`: client, service (original destination),
/// backend (reply source) and protocol; the header is the caller's.
#[inline(always)]
fn flow_event(ct: u64) -> Result<NatEvent, i64> {
    let tuple = ct + layout!(ct_tuplehash) as u64;
    Ok(NatEvent {
        client: ct_endpoint(ct, 0, false)?,
        service: ct_endpoint(ct, 0, true)?,
        backend: ct_endpoint(ct, 1, false)?,
        protocol: kernel::read(tuple, layout!(tuple_dst_protonum)).unwrap_or(0),
        ..NatEvent::default()
    })
}

/// kprobe `nf_nat_setup_info(ct, range, maniptype)`.
#[inline(always)]
pub fn try_nat_setup_entry(ctx: &ProbeContext) -> Result<(), i64> {
    let s = stash_open(NAT_SETUP)?;
    s.ct = ctx.arg(0).unwrap_or(0);
    s.arg = ctx.arg(2).unwrap_or(0);
    Ok(())
}

/// kretprobe `nf_nat_setup_info`: a DNAT binding was made when the status
/// has IPS_DST_NAT (null bindings pass through here too).
#[inline(always)]
pub fn try_nat_setup_return(ctx: &RetProbeContext) -> Result<(), i64> {
    let Some(s) = stash_close(NAT_SETUP) else {
        return Ok(());
    };
    let verdict = ctx.ret::<i64>() as i32;
    let (ct, manip) = (s.ct, s.arg);
    if verdict != NF_ACCEPT || ct == 0 {
        return Ok(());
    }
    let status = kernel::read::<u64>(ct, layout!(ct_status))? as u32;
    // DNAT (PREROUTING/OUTPUT) maps the flow; a later SNAT of a DNATed flow
    // (POSTROUTING masquerade) says where the backend's replies now go.
    let snat = manip != NF_NAT_MANIP_DST;
    if status & IPS_DST_NAT == 0 || (snat && status & IPS_SRC_NAT == 0) {
        return Ok(());
    }
    let mut ev = flow_event(ct)?;
    if snat {
        ev.snat = ct_endpoint(ct, 1, true)?;
    }
    ev.header = ring::header(
        kind::NAT_MAPPING,
        hook::KRETPROBE_NF_NAT_SETUP_INFO,
        ct_netns(ct),
    );
    ring::emit(ev);
    Ok(())
}

/// NF_DROP, what `__nf_conntrack_confirm` returns for a packet that lost
/// the race to insert its entry.
const NF_DROP: i32 = 0;

/// kprobe `__nf_conntrack_confirm(skb)`: the entry hangs off `skb->_nfct`.
#[inline(always)]
pub fn try_confirm_entry(ctx: &ProbeContext) -> Result<(), i64> {
    let s = stash_open(CONFIRM)?;
    s.skb = ctx.arg(0).unwrap_or(0);
    s.ct = 0;
    if s.skb != 0 {
        let nfct: u64 = kernel::read(s.skb, layout!(skb_nfct)).unwrap_or(0);
        s.ct = nfct & !7;
    }
    Ok(())
}

/// kretprobe `__nf_conntrack_confirm`: NF_DROP is the insert race lost
/// (the entry is still referenced by the skb, freed after this returns).
#[inline(always)]
pub fn try_confirm_return(ctx: &RetProbeContext) -> Result<(), i64> {
    let Some(s) = stash_close(CONFIRM) else {
        return Ok(());
    };
    if ctx.ret::<i64>() as i32 != NF_DROP || s.ct == 0 {
        return Ok(());
    }
    let ct = s.ct;
    let mut ev = flow_event(ct)?;
    ev.header = ring::header(
        kind::CT_CONFIRM_DROP,
        hook::KRETPROBE_NF_CONNTRACK_CONFIRM,
        ct_netns(ct),
    );
    ring::emit(ev);
    Ok(())
}
