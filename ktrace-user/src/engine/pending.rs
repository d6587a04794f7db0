//! Resets nothing explains yet, waiting (up to the reorder window) for the
//! NAT mapping that may explain them: ctnetlink and the ring buffer are
//! separate paths, so a backend's reset can arrive before the re-mapping.
//!
//! A fixed array indexed by the hash of the reset's destination: no
//! allocation per reset and constant memory, whatever the reset rate. A
//! reset that lands on a slot still holding a live one replaces it; that
//! loss is counted.

use std::hash::BuildHasher;

use foldhash::fast::RandomState;

use super::flows::Ep;

#[derive(Debug, Clone, Copy, Default)]
pub struct PendingReset {
    /// 0: the slot is empty.
    pub ts: u64,
    pub netns: u32,
    pub src: Ep,
    pub dst: Ep,
}

pub struct Pending {
    slots: Box<[PendingReset]>,
    hasher: RandomState,
    window_ns: u64,
    /// Live resets replaced by another before their window ended.
    pub dropped: u64,
}

impl Pending {
    /// `slots` is rounded up to a power of two.
    pub fn new(slots: usize, window_ns: u64) -> Pending {
        // Zeroed memory straight from the kernel: pages become resident
        // only as resets land in them (3 MB for the default size if all
        // were written up front, on an idle node too).
        let zeroed = Box::<[PendingReset]>::new_zeroed_slice(slots.next_power_of_two());
        Pending {
            // SAFETY: PendingReset is integers and byte arrays only; all
            // zeros is its Default (an empty slot).
            slots: unsafe { zeroed.assume_init() },
            hasher: RandomState::default(),
            window_ns,
            dropped: 0,
        }
    }

    fn index(&self, dst: Ep) -> usize {
        self.hasher.hash_one(dst) as usize & (self.slots.len() - 1)
    }

    /// Starts loading the slot a reset to `dst` would be kept in (ahead of
    /// use: the array is megabytes, read at random).
    pub fn prefetch(&self, dst: Ep) {
        let p: *const i8 = (&self.slots[self.index(dst)] as *const PendingReset).cast();
        super::flows::prefetch_read(p);
    }

    /// Keeps a reset, by its destination (the client, if a backend switch
    /// explains it later).
    pub fn defer(&mut self, r: PendingReset) {
        let i = self.index(r.dst);
        let old = self.slots[i];
        if old.ts != 0 && old.dst != r.dst && r.ts.saturating_sub(old.ts) <= self.window_ns {
            self.dropped += 1;
        }
        self.slots[i] = PendingReset {
            ts: r.ts.max(1),
            ..r
        };
    }

    /// Takes the reset waiting for `dst` at `now` if `is_it` accepts it
    /// and its window has not passed.
    pub fn take(
        &mut self,
        dst: Ep,
        now: u64,
        is_it: impl FnOnce(&PendingReset) -> bool,
    ) -> Option<PendingReset> {
        let i = self.index(dst);
        let p = self.slots[i];
        let live = p.ts != 0 && p.dst == dst && now.saturating_sub(p.ts) <= self.window_ns;
        if !live || !is_it(&p) {
            return None;
        }
        self.slots[i].ts = 0;
        Some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(s: &str) -> Ep {
        Ep::new(s.parse().unwrap())
    }

    #[test]
    fn a_reset_waits_for_its_window_only() {
        let mut p = Pending::new(16, 1_000);
        let r = PendingReset {
            ts: 5_000,
            netns: 1,
            src: ep("10.0.1.3:80"),
            dst: ep("10.0.0.2:4000"),
        };
        p.defer(r);
        assert!(p
            .take(r.dst, 5_500, |x| x.src == ep("10.0.1.9:80"))
            .is_none());
        assert!(p.take(ep("10.0.0.9:4000"), 5_500, |_| true).is_none());
        assert_eq!(p.take(r.dst, 5_500, |_| true).map(|x| x.src), Some(r.src));
        assert!(p.take(r.dst, 5_500, |_| true).is_none(), "taken once");
        p.defer(r);
        assert!(p.take(r.dst, 6_001, |_| true).is_none(), "window passed");
    }

    #[test]
    fn a_full_array_counts_what_it_loses() {
        let mut p = Pending::new(4, 1_000_000);
        for port in 0..100u16 {
            p.defer(PendingReset {
                ts: 10 + port as u64,
                netns: 1,
                src: ep("10.0.1.3:80"),
                dst: Ep::new(std::net::SocketAddr::new([10, 0, 0, 2].into(), port)),
            });
        }
        assert!(p.dropped >= 96, "{}", p.dropped);
    }
}
