//! Resets that can never be an incident, counted instead of sent one by
//! one (see `ktrace_common::ResetSummary`): in a reset storm the ring
//! buffer's reserve and submit, and the reads of the packet's headers, are
//! most of what the hook costs, and the engine ignores these resets anyway.
//!
//! The decision reads two bytes the kernel already holds in structs the
//! program gets: the state of the socket (when there is one) and the TCP
//! flags of the segment the reset answers, from the segment's control
//! block (`TCP_SKB_CB(skb)->tcp_flags`), not from its headers.

use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_ns},
    macros::map,
    maps::PerCpuArray,
};
use ktrace_common::{
    reset_may_be_an_incident, summary_class, tcp_flag, ResetSummary, SummaryKey, SummaryTable,
    NO_OFFSET, SUMMARY_PROBES, SUMMARY_SLOTS,
};

use crate::kernel::{self, layout};

/// Set by userspace at load time (`--every-reset` turns it off).
#[no_mangle]
static RESET_SUMMARY: ResetSummary = ResetSummary::DEFAULT;

/// Each CPU's sampling window and counts; read (never written) by userspace.
#[map]
static RESET_SUMMARY_TABLE: PerCpuArray<SummaryTable> = PerCpuArray::with_max_entries(1, 0);

/// What the send-reset program does with a reset.
pub enum Outcome {
    /// Send it as an event; `sk` and `skb` are the arguments as plain
    /// numbers (see [`kernel::untyped`]), for NULL tests.
    Emit { sk: u64, skb: u64 },
    /// Nothing more: it was counted, or no reset leaves (the segment is
    /// itself an RST, which the kernel never answers).
    Done,
}

/// Counts the reset that `sk` sends in answer to `skb` when it can never
/// be an incident and this CPU's window has sent its sample in full.
/// `sk_arg`/`skb_arg` are the program's arguments, BTF-typed when `TYPED`
/// (then read by plain loads).
///
/// A summarised reset touches this CPU's table and little else: the
/// window, the clock's tick and the count sit in the table's first line
/// and the key's slot (each distinct line a reset touches is a cache miss
/// a storm pays again and again).
#[inline(always)]
pub fn try_count<const TYPED: bool>(sk_arg: u64, skb_arg: u64) -> Result<Outcome, i64> {
    let Some(table) = RESET_SUMMARY_TABLE.get_ptr_mut(0) else {
        let (sk, skb) = if TYPED {
            (kernel::untyped(sk_arg), kernel::untyped(skb_arg))
        } else {
            (sk_arg, skb_arg)
        };
        return Ok(Outcome::Emit { sk, skb });
    };
    // SAFETY: this CPU's table, used by one program run at a time.
    let table = unsafe { &mut *table };
    let (sk, skb) = if TYPED {
        (untyped(table, sk_arg), untyped(table, skb_arg))
    } else {
        (sk_arg, skb_arg)
    };
    let enabled = unsafe { core::ptr::read_volatile(&RESET_SUMMARY.enabled) };
    let flags_off = layout!(skb_tcp_flags);
    if enabled == 0 || flags_off == NO_OFFSET {
        return Ok(Outcome::Emit { sk, skb });
    }
    // Untyped, the device comes with the flags (one probe read for both).
    let (trigger, dev) = if skb != 0 && skb_arg != 0 {
        let (f, dev) = if TYPED {
            (kernel::field::<true, u8>(skb_arg, flags_off)?, 0)
        } else {
            kernel::skb_flags_dev(skb_arg, flags_off)?
        };
        if f & tcp_flag::RST != 0 {
            return Ok(Outcome::Done);
        }
        (Some(f), dev)
    } else {
        (None, 0)
    };
    // Each NULL test also on the argument: kernels that type it "maybe
    // NULL" refuse arithmetic on it without one.
    let has_socket = sk != 0 && sk_arg != 0 && {
        let state: u8 = kernel::field::<TYPED, u8>(sk_arg, layout!(sk_state)).unwrap_or(0);
        state != kernel::TCP_LISTEN
    };
    if reset_may_be_an_incident(has_socket, trigger) || in_sample(table) {
        return Ok(Outcome::Emit { sk, skb });
    }
    let netns = if sk != 0 {
        kernel::sock_netns(sk)
    } else if TYPED && skb != 0 && skb_arg != 0 {
        kernel::skb_netns(skb_arg)
    } else if !TYPED {
        kernel::dev_netns(dev)
    } else {
        0
    };
    let class = if has_socket {
        summary_class::SOCKET
    } else {
        summary_class::REFUSED
    };
    add(table, SummaryKey { netns, class });
    Ok(Outcome::Done)
}

/// [`kernel::untyped`] through this CPU's table, whose line the program
/// touches anyway.
#[inline(always)]
fn untyped(t: &mut SummaryTable, v: u64) -> u64 {
    // SAFETY: volatile so that the compiler keeps the round trip.
    unsafe {
        core::ptr::write_volatile(&mut t.scratch.untyped, v);
        core::ptr::read_volatile(&t.scratch.untyped)
    }
}

/// Whether this reset is one of the first `sample_per_window` of this
/// CPU's window (a new window starts when the last is `window_ns` old).
/// The window is checked when the tick (jiffies) changes: the precise
/// clock costs tens of nanoseconds on virtualised hosts, and a window of
/// 100 ms is many ticks long.
#[inline(always)]
fn in_sample(t: &mut SummaryTable) -> bool {
    let per = unsafe { core::ptr::read_volatile(&RESET_SUMMARY.sample_per_window) } as u64;
    let span = unsafe { core::ptr::read_volatile(&RESET_SUMMARY.window_ns) };
    let new_tick = layout!(tick_clock) != 1 || {
        let j = unsafe { bpf_jiffies64() };
        let changed = j != t.scratch.tick;
        t.scratch.tick = j;
        changed
    };
    if new_tick {
        let now = unsafe { bpf_ktime_get_ns() };
        if now.wrapping_sub(t.window_start_ns) >= span {
            t.window_start_ns = now;
            t.window_sent = 0;
        }
    }
    if t.window_sent < per {
        t.window_sent += 1;
        return true;
    }
    false
}

/// One more for `key`: in its slot (claimed on first use, probing a few
/// from its hash on), else in the overflow count of its class.
#[inline(always)]
fn add(t: &mut SummaryTable, key: SummaryKey) {
    let home = SummaryTable::home(key);
    for i in 0..SUMMARY_PROBES {
        let slot = &mut t.slots[(home + i) & (SUMMARY_SLOTS - 1)];
        if slot.used == 0 {
            slot.netns = key.netns;
            slot.class = key.class as u8;
            slot.count = 1;
            // Claimed last: userspace takes a slot's key only once used.
            unsafe { core::ptr::write_volatile(&mut slot.used, 1) };
            return;
        }
        if slot.netns == key.netns && slot.class as u32 == key.class {
            slot.count += 1;
            return;
        }
    }
    let class = (key.class as usize) & (summary_class::COUNT as usize - 1);
    t.overflow[class] += 1;
}
