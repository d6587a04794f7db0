//! The recent conntrack counter samples, each with the interval it covers,
//! so that a reset cites the INVALID packets counted around it whatever
//! the order in which the reset and the samples reach the engine.
//!
//! The live source drains the ring buffer and reads the counters on its
//! own schedule: a sample can count a connection's INVALID packet and be
//! read before or after that connection's reset, and the reset can reach
//! the engine before or after the sample. Only the samples' times decide.

use std::collections::VecDeque;

/// How far before a reset its INVALID packet may have been counted: the
/// packet and the reset it causes are one softirq apart (microseconds);
/// the margin absorbs scheduling and the time between a sample's stamp and
/// its read of /proc.
pub const SLACK_NS: u64 = 20_000_000;
/// Samples kept: on-demand samples are at least 1 ms apart, so this spans
/// well over a held finding's wait.
const KEEP: usize = 2_048;

#[derive(Debug, Clone, Copy)]
struct Sample {
    /// The previous sample's time: this one counts what came after it.
    from: u64,
    to: u64,
    invalid: u64,
}

#[derive(Debug, Default)]
pub struct InvalidSamples {
    samples: VecDeque<Sample>,
    last: Option<u64>,
}

impl InvalidSamples {
    /// A sample taken at `ts` counted `invalid` INVALID packets since the
    /// previous one.
    pub fn record(&mut self, ts: u64, invalid: u64) {
        let from = self.last.unwrap_or(0).min(ts);
        self.last = Some(ts.max(self.last.unwrap_or(0)));
        if self.samples.len() == KEEP {
            self.samples.pop_front();
        }
        self.samples.push_back(Sample {
            from,
            to: ts,
            invalid,
        });
    }

    /// A sample taken at or after `reset_ts` has been seen: what it counted
    /// is known, and a finding need not wait for the next one.
    pub fn covers(&self, reset_ts: u64) -> bool {
        self.last.is_some_and(|l| l >= reset_ts)
    }

    /// The INVALID packets that explain a reset at `reset_ts`: those of the
    /// sample whose interval holds the reset or, if it counted none, of the
    /// sample that ended just before it (it counted the packet, and the
    /// reset came after it was read). 0 when neither counted any.
    pub fn around(&self, reset_ts: u64) -> u64 {
        let holding = self
            .samples
            .iter()
            .position(|s| s.from < reset_ts && reset_ts <= s.to);
        if let Some(i) = holding {
            if self.samples[i].invalid > 0 {
                return self.samples[i].invalid;
            }
        }
        // The last sample that ended before the reset, if close enough.
        let before = match holding {
            Some(i) => i.checked_sub(1).map(|j| self.samples[j]),
            None => self.samples.iter().rev().find(|s| s.to < reset_ts).copied(),
        };
        before
            .filter(|s| s.to.saturating_add(SLACK_NS) >= reset_ts)
            .map_or(0, |s| s.invalid)
    }

    /// Forgets samples older than `cutoff`.
    pub fn forget_before(&mut self, cutoff: u64) {
        while self.samples.front().is_some_and(|s| s.to < cutoff) {
            self.samples.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn the_sample_holding_the_reset_is_cited_even_if_it_came_first() {
        let mut s = InvalidSamples::default();
        s.record(100 * MS, 0);
        s.record(300 * MS, 2);
        s.record(500 * MS, 0);
        assert_eq!(s.around(250 * MS), 2);
        assert!(s.covers(250 * MS));
        assert!(!s.covers(501 * MS));
    }

    #[test]
    fn a_sample_read_between_the_packet_and_the_reset_is_cited() {
        let mut s = InvalidSamples::default();
        s.record(100 * MS, 3);
        s.record(300 * MS, 0);
        assert_eq!(s.around(100 * MS + 5 * MS), 3);
        assert_eq!(s.around(100 * MS + 50 * MS), 0, "too long after");
        // Not yet followed by any sample: the last one, if just before.
        let mut s = InvalidSamples::default();
        s.record(100 * MS, 3);
        assert_eq!(s.around(101 * MS), 3);
        assert_eq!(s.around(200 * MS), 0);
    }

    #[test]
    fn an_earlier_incident_is_not_cited() {
        let mut s = InvalidSamples::default();
        s.record(100 * MS, 0);
        s.record(300 * MS, 5);
        s.record(500 * MS, 0);
        s.record(700 * MS, 0);
        assert_eq!(s.around(600 * MS), 0);
        assert_eq!(s.around(900 * MS), 0);
        s.forget_before(400 * MS);
        assert_eq!(s.around(250 * MS), 0, "forgotten");
    }
}
