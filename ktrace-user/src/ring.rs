//! Draining the ring buffer, and the kernel's counters of what it could not
//! hand over (ring full) or could not read.

use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::Ebpf;
use ktrace_common::counter;
use tokio::io::unix::AsyncFd;
use tokio::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map {0}: {1}")]
    Map(&'static str, #[source] aya::maps::MapError),
    #[error("cannot poll the ring buffer: {0}")]
    Poll(#[source] std::io::Error),
}

/// Shortest time between two drains. The kernel wakes the reader only for
/// the first record after it caught up, so one drain re-arms at most one
/// wake-up: spacing drains bounds the wake-ups the packet path pays for to
/// 1000 a second, however much is waiting, and a stalled reader costs none.
/// It is also the longest an event waits once the reader is awake.
pub const MIN_DRAIN_GAP: Duration = Duration::from_millis(1);

/// A safety net only: every record after a drain wakes the reader, so the
/// ring is normally read within [`MIN_DRAIN_GAP`] of an event.
const FALLBACK_POLL: Duration = Duration::from_millis(100);

pub struct RingReader {
    ring: AsyncFd<RingBuf<MapData>>,
    counters: PerCpuArray<MapData, u64>,
    logger: Option<AsyncFd<crate::hooks::KernelLogger>>,
    /// When the next drain may start ([`MIN_DRAIN_GAP`] after the last).
    next_drain: Instant,
    /// Totals of each kernel counter already reported.
    reported: [u64; counter::COUNT as usize],
}

/// A rise in one of the kernel side's loss counters, for a `lost` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loss {
    pub count: u64,
    pub total: u64,
    pub what: String,
}

/// The kernel's per-CPU counters, and what a rise in each means.
const LOSS_COUNTERS: [(u32, &str); 2] = [
    (counter::LOST, "ring buffer full"),
    (counter::READ_ERRORS, "kernel read failed (event skipped)"),
];

impl RingReader {
    pub fn new(
        ebpf: &mut Ebpf,
        logger: Option<crate::hooks::KernelLogger>,
    ) -> Result<RingReader, RingError> {
        let ring = ebpf
            .take_map("EVENTS")
            .ok_or(RingError::MissingMap("EVENTS"))?;
        let ring = RingBuf::try_from(ring).map_err(|e| RingError::Map("EVENTS", e))?;
        let counters = ebpf
            .take_map("COUNTERS")
            .ok_or(RingError::MissingMap("COUNTERS"))?;
        let counters =
            PerCpuArray::try_from(counters).map_err(|e| RingError::Map("COUNTERS", e))?;
        // The AsyncFd owns the RingBuf that owns the fd, so the fd outlives
        // its registration (the I/O-safety concern behind the deprecation).
        #[allow(deprecated)]
        let ring = AsyncFd::new(ring).map_err(RingError::Poll)?;
        // Same ownership argument as for the ring.
        #[allow(deprecated)]
        let logger = logger.and_then(|l| AsyncFd::new(l).ok());
        Ok(RingReader {
            ring,
            counters,
            logger,
            next_drain: Instant::now(),
            reported: [0; counter::COUNT as usize],
        })
    }

    /// Waits until the ring should be drained: not before [`MIN_DRAIN_GAP`]
    /// since the last drain, then until the kernel's wake-up (or the
    /// [`FALLBACK_POLL`]). Cancel-safe: the gap is kept in `self`.
    pub async fn readable(&mut self) -> Result<(), RingError> {
        tokio::time::sleep_until(self.next_drain).await;
        let Some(logger) = self.logger.as_mut() else {
            if let Ok(guard) = tokio::time::timeout(FALLBACK_POLL, self.ring.readable_mut()).await {
                guard.map_err(RingError::Poll)?.clear_ready();
            }
            return Ok(());
        };
        tokio::select! {
            r = tokio::time::timeout(FALLBACK_POLL, self.ring.readable_mut()) => {
                if let Ok(guard) = r {
                    guard.map_err(RingError::Poll)?.clear_ready();
                }
            }
            g = logger.readable_mut() => {
                let mut g = g.map_err(RingError::Poll)?;
                g.get_inner_mut().flush();
                g.clear_ready();
            }
        }
        Ok(())
    }

    /// Hands every record now in the ring to `f`; returns how many.
    pub fn drain(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        self.next_drain = Instant::now() + MIN_DRAIN_GAP;
        let ring = self.ring.get_mut();
        let mut n = 0;
        while let Some(item) = ring.next() {
            f(&item);
            n += 1;
        }
        n
    }

    fn per_cpu(&self, index: u32) -> Vec<u64> {
        self.counters
            .get(&index, 0)
            .map(|per_cpu| per_cpu.iter().copied().collect())
            .unwrap_or_default()
    }

    /// What the kernel could not hand over (ring full) or could not read
    /// since the last call, each with its total and the CPUs it happened
    /// on (cumulative per-CPU counts: a storm is usually one CPU's).
    pub fn new_losses(&mut self) -> Vec<Loss> {
        let mut out = Vec::new();
        for (index, what) in LOSS_COUNTERS {
            let per_cpu = self.per_cpu(index);
            let total: u64 = per_cpu.iter().sum();
            let seen = &mut self.reported[index as usize];
            if total > *seen {
                out.push(Loss {
                    count: total - *seen,
                    total,
                    what: format!("{what} ({})", by_cpu(&per_cpu)),
                });
                *seen = total;
            }
        }
        out
    }
}

/// "cpu0 12, cpu3 4": the CPUs with a non-zero count.
fn by_cpu(per_cpu: &[u64]) -> String {
    let parts: Vec<String> = per_cpu
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(cpu, n)| format!("cpu{cpu} {n}"))
        .collect();
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn per_cpu_counts_name_only_the_cpus_that_lost() {
        assert_eq!(super::by_cpu(&[0, 12, 0, 4]), "cpu1 12, cpu3 4");
    }
}
