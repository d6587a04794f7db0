//! The one ring buffer to userspace, and the per-CPU counters of what could
//! not be handed over. A failed reservation is never silent: it is counted
//! in `COUNTERS[LOST]`, which userspace reports as `"type":"lost"`.

use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_ns},
    macros::map,
    maps::{ring_buf::RingBufEntry, PerCpuArray, RingBuf},
};
use ktrace_common::{counter, EventHeader};

/// 8 MiB by default; userspace may resize it with `--ring-buffer-mb`.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other CPU writes it, so a plain add is safe.
        unsafe { *slot += 1 };
    }
}

/// Counts one and returns this CPU's new total.
#[inline(always)]
pub fn count_and_get(index: u32) -> u64 {
    match COUNTERS.get_ptr_mut(index) {
        Some(slot) => unsafe {
            *slot += 1;
            *slot
        },
        None => 0,
    }
}

/// This CPU's current tick (jiffies) and the precise time of its first
/// event in that tick.
#[repr(C)]
pub struct TickClock {
    jiffies: u64,
    ns: u64,
}

#[map]
static CLOCK: PerCpuArray<TickClock> = PerCpuArray::with_max_entries(1, 0);

/// The event clock. The precise clock reads the TSC behind a serialising
/// fence: 40-50 ns on virtualised hosts, half the reset hook's budget in a
/// storm. `bpf_ktime_get_coarse_ns` is refused to tracing programs (not
/// NMI-safe), and jiffies alone would make every timestamp up to a tick
/// late-or-early. So a CPU reads the precise clock once per tick: an
/// isolated event (what a finding's latency is measured on) gets its exact
/// time, and events of a burst share their tick's first time, never later
/// than themselves and never going back.
#[inline(always)]
pub fn now_ns() -> u64 {
    if crate::kernel::layout!(tick_clock) == 1 {
        if let Some(c) = CLOCK.get_ptr_mut(0) {
            // SAFETY: a per-CPU slot, used by one program run at a time.
            let c = unsafe { &mut *c };
            let j = unsafe { bpf_jiffies64() };
            if c.jiffies != j || c.ns == 0 {
                c.jiffies = j;
                c.ns = unsafe { bpf_ktime_get_ns() };
            }
            return c.ns;
        }
    }
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
pub fn header(kind: u16, hook: u8, netns: u32) -> EventHeader {
    EventHeader {
        kind,
        hook,
        _pad0: 0,
        netns,
        ts_ns: now_ns(),
    }
}

/// Writes `event` straight into the ring (reserve, fill, submit: no copy
/// through a helper, no query of the ring's fill level), counting a loss in
/// this CPU's `COUNTERS[LOST]` when the ring is full.
///
/// Submitted with the kernel's default wake-up policy: the reader is woken
/// only when this record is the first one it has not consumed, i.e. when it
/// had caught up. A stalled reader is therefore never woken again (the ring
/// fills, then each event costs a failed reservation and a counter add), and
/// a reader that keeps up is woken at most once per drain; userspace spaces
/// its drains (`ring::MIN_DRAIN_GAP`), which bounds the wake-ups per second
/// whatever the backlog.
#[inline(always)]
pub fn emit<T: 'static>(event: T) {
    match EVENTS.reserve::<T>(0) {
        Some(mut slot) => {
            slot.write(event);
            slot.submit(0);
        }
        None => count(counter::LOST),
    }
}

/// A record being written in place, for events too large to build on the
/// 512-byte BPF stack first. Zeroed, so that no byte of an older record
/// leaks through padding or unset fields; `submit` hands it over.
pub struct Slot<T: 'static>(RingBufEntry<T>);

impl<T: 'static> Slot<T> {
    /// Reserves and zeroes room for a `T`; a full ring is counted as lost.
    #[inline(always)]
    pub fn reserve() -> Option<Slot<T>> {
        match EVENTS.reserve::<T>(0) {
            Some(mut entry) => {
                // SAFETY: the reservation holds exactly one T; all-zero is a
                // valid value of the plain-old-data event types.
                unsafe { core::ptr::write_bytes(entry.as_mut_ptr(), 0, 1) };
                Some(Slot(entry))
            }
            None => {
                count(counter::LOST);
                None
            }
        }
    }

    #[inline(always)]
    pub fn get(&mut self) -> &mut T {
        // SAFETY: zeroed in `reserve`, a valid T.
        unsafe { self.0.assume_init_mut() }
    }

    /// Hands the record to userspace (default wake-up policy, as [`emit`]).
    #[inline(always)]
    pub fn submit(self) {
        self.0.submit(0);
    }
}
