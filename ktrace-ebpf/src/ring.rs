//! The one ring buffer to userspace, and the per-CPU counters of what could
//! not be handed over. A failed reservation is never silent: it is counted
//! in `COUNTERS[LOST]`, which userspace reports as `"type":"lost"`.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{PerCpuArray, RingBuf},
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

#[inline(always)]
pub fn header(kind: u16, hook: u8, netns: u32) -> EventHeader {
    EventHeader {
        kind,
        hook,
        _pad0: 0,
        netns,
        ts_ns: unsafe { bpf_ktime_get_ns() },
    }
}

const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
/// Userspace is woken once this much is waiting (and polls every 50 ms for
/// the rest): a wake-up per event costs the packet path microseconds in a
/// storm, when a fast reader keeps the ring empty.
const WAKEUP_BYTES: u64 = 256 * 1024;

/// Copies `event` into the ring buffer, counting a loss if it is full.
#[inline(always)]
pub fn emit<T: 'static>(event: &T) {
    let flags = if EVENTS.query(BPF_RB_AVAIL_DATA) >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if EVENTS.output::<T>(event, flags).is_err() {
        count(counter::LOST);
    }
}
