//! Draining the ring buffer, and the kernel's counters of what it could not
//! hand over (ring full) or could not read.

use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::Ebpf;
use ktrace_common::counter;
use tokio::io::unix::AsyncFd;

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map {0}: {1}")]
    Map(&'static str, #[source] aya::maps::MapError),
    #[error("cannot poll the ring buffer: {0}")]
    Poll(#[source] std::io::Error),
}

/// Longest time an event waits in the ring before userspace reads it.
pub const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

pub struct RingReader {
    ring: AsyncFd<RingBuf<MapData>>,
    counters: PerCpuArray<MapData, u64>,
    logger: Option<AsyncFd<crate::hooks::KernelLogger>>,
}

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
        })
    }

    /// Waits until the ring should be drained: the kernel wakes the reader
    /// only once `WAKEUP_BYTES` (256 KiB) are waiting, so this also returns
    /// every [`POLL_INTERVAL`] to pick up the rest.
    pub async fn readable(&mut self) -> Result<(), RingError> {
        let Some(logger) = self.logger.as_mut() else {
            if let Ok(guard) = tokio::time::timeout(POLL_INTERVAL, self.ring.readable_mut()).await {
                guard.map_err(RingError::Poll)?.clear_ready();
            }
            return Ok(());
        };
        tokio::select! {
            r = tokio::time::timeout(POLL_INTERVAL, self.ring.readable_mut()) => {
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
        let ring = self.ring.get_mut();
        let mut n = 0;
        while let Some(item) = ring.next() {
            f(&item);
            n += 1;
        }
        n
    }

    fn counter(&self, index: u32) -> u64 {
        self.counters
            .get(&index, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }

    /// Events the kernel dropped because the ring was full, since load.
    pub fn lost_total(&self) -> u64 {
        self.counter(counter::LOST)
    }

    /// Kernel reads that failed (an event skipped), since load.
    pub fn read_errors_total(&self) -> u64 {
        self.counter(counter::READ_ERRORS)
    }
}
