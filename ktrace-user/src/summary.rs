//! Resets the kernel counts instead of sending them one by one (see
//! `ktrace_common::ResetSummary`; the hooks choose its setting): the reader
//! that turns the kernel's per-CPU counts into `resets_summarised` events
//! at each tick, so that events and summaries add up to every reset sent.

use std::collections::{BTreeMap, HashMap};

use aya::maps::{MapData, PerCpuArray};
use aya::Ebpf;
use ktrace_common::{summary_class, SummaryTable, SUMMARY_SLOTS};

use crate::event::{Event, EventBody, ResetCounts, Source};

/// Name of the kernel map (`ktrace-ebpf/src/summary.rs`).
const MAP: &str = "RESET_SUMMARY_TABLE";

/// Reads the kernel's counts and hands on what rose since the last read.
pub struct SummaryReader {
    map: PerCpuArray<MapData, SummaryTable>,
    rises: Rises,
    /// The send-reset hook's mechanism, the events' source.
    source: Source,
}

impl SummaryReader {
    /// `None` when the object has no such map.
    pub fn new(ebpf: &mut Ebpf, source: Source) -> Option<SummaryReader> {
        let map = PerCpuArray::try_from(ebpf.take_map(MAP)?).ok()?;
        Some(SummaryReader {
            map,
            rises: Rises::default(),
            source,
        })
    }

    /// One `resets_summarised` event per network namespace whose counts
    /// rose since the last call, stamped `now_ns`.
    pub fn take(&mut self, now_ns: u64) -> Vec<Event> {
        let Ok(tables) = self.map.get(&0, 0) else {
            return Vec::new();
        };
        let rises = self.rises.update(tables.iter());
        rises
            .into_iter()
            .map(|(netns, counts)| Event {
                ts_ns: now_ns,
                netns,
                source: self.source,
                body: EventBody::ResetsSummarised(counts),
            })
            .collect()
    }
}

/// The event source of the send-reset hook's mechanism (status name).
pub fn source_of(mechanism: &str) -> Source {
    match mechanism {
        "fentry" => Source::Fentry,
        "kprobe" => Source::Kprobe,
        "tracepoint" => Source::Tracepoint,
        _ => Source::RawTracepoint,
    }
}

/// Counts already handed on, per CPU and counter (slot, then overflow by
/// class). A slot's count only grows; its rise goes to the key it holds
/// when read, so a key read while being claimed can misplace a count in
/// time but never count it twice.
#[derive(Debug, Default)]
struct Rises {
    seen: HashMap<(usize, usize), u64>,
}

impl Rises {
    /// The rise of every counter of every CPU's table since the last
    /// call, summed per namespace.
    fn update<'a>(
        &mut self,
        tables: impl Iterator<Item = &'a SummaryTable>,
    ) -> BTreeMap<u32, ResetCounts> {
        let mut out: BTreeMap<u32, ResetCounts> = BTreeMap::new();
        for (cpu, t) in tables.enumerate() {
            let slots = t
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.used != 0)
                .map(|(i, s)| (i, u32::from(s.class), s.netns, s.count));
            let overflow = t
                .overflow
                .iter()
                .enumerate()
                .map(|(class, n)| (SUMMARY_SLOTS + class, class as u32, 0, *n));
            for (at, class, netns, count) in slots.chain(overflow) {
                let seen = self.seen.entry((cpu, at)).or_insert(0);
                let rise = count.saturating_sub(*seen);
                *seen = (*seen).max(count);
                if rise == 0 {
                    continue;
                }
                let c = out.entry(netns).or_default();
                if class == summary_class::SOCKET {
                    c.socket += rise;
                } else {
                    c.refused += rise;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ktrace_common::{SummaryScratch, SummarySlot};

    fn table(slots: &[(usize, u32, u32, u64)], overflow: [u64; 2]) -> SummaryTable {
        let mut t = SummaryTable {
            window_start_ns: 0,
            window_sent: 0,
            overflow,
            scratch: SummaryScratch::default(),
            slots: [SummarySlot::default(); SUMMARY_SLOTS],
        };
        for &(i, netns, class, count) in slots {
            t.slots[i] = SummarySlot {
                netns,
                class: class as u8,
                used: 1,
                _pad: [0; 2],
                count,
            };
        }
        t
    }

    const R: u32 = summary_class::REFUSED;
    const S: u32 = summary_class::SOCKET;

    #[test]
    fn rises_are_handed_on_once_per_namespace() {
        let mut r = Rises::default();
        // Two CPUs; namespace 7 on both, in different slots.
        let cpu0 = table(&[(3, 7, R, 60), (9, 7, S, 3)], [0, 0]);
        let cpu1 = table(&[(5, 7, R, 40), (6, 9, R, 5)], [2, 0]);
        let first = r.update([cpu0, cpu1].iter());
        assert_eq!(first.len(), 3, "{first:?}");
        assert_eq!(
            first[&7],
            ResetCounts {
                refused: 100,
                socket: 3
            }
        );
        assert_eq!(first[&7].total(), 103);
        assert_eq!(
            first[&9],
            ResetCounts {
                refused: 5,
                socket: 0
            }
        );
        assert_eq!(
            first[&0],
            ResetCounts {
                refused: 2,
                socket: 0
            },
            "overflow"
        );
        // Only what rose since, and nothing for counters that did not.
        let cpu0 = table(&[(3, 7, R, 110), (9, 7, S, 3)], [0, 0]);
        let cpu1 = table(&[(5, 7, R, 40), (6, 9, R, 5)], [2, 0]);
        let second = r.update([cpu0, cpu1].iter());
        assert_eq!(second.len(), 1);
        assert_eq!(
            second[&7],
            ResetCounts {
                refused: 50,
                socket: 0
            }
        );
        assert!(r.update([cpu0, cpu1].iter()).is_empty());
    }

    #[test]
    fn the_summed_rises_equal_the_kernel_totals() {
        // However the reads fall, what is handed on adds up to the counts,
        // even when a slot's key was read before it was written.
        let mut r = Rises::default();
        let mut handed = 0;
        for (netns, t) in [(0u32, 1u64), (3, 7), (3, 7), (3, 40), (3, 41), (3, 1000)] {
            handed += r
                .update([table(&[(1, netns, R, t)], [0, 0])].iter())
                .values()
                .map(ResetCounts::total)
                .sum::<u64>();
            assert_eq!(handed, t);
        }
    }
}
