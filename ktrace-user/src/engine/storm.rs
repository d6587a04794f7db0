//! Reset rates per service (or per backend when the service is unknown),
//! over a sliding window of ten buckets: fixed memory per key, whatever the
//! rate. A storm is reported when it starts, at most once a window while it
//! lasts, and when it ends.

use foldhash::HashMap;

use super::flows::Ep;

const BUCKETS: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Start,
    Update,
    End,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Start => "start",
            Phase::Update => "update",
            Phase::End => "end",
        }
    }
}

/// What a storm report says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StormReport {
    pub key: Ep,
    /// The key is a service (VIP:port); otherwise a backend.
    pub is_service: bool,
    pub phase: Phase,
    /// Resets in the current window.
    pub count: u32,
    /// Resets since the storm started.
    pub total: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    /// The most recent backend and client involved.
    pub backend: Ep,
    pub client: Ep,
    /// Caller-defined bits of what kinds of resets the storm holds.
    pub kinds: u8,
}

#[derive(Debug, Clone)]
struct Storm {
    buckets: [u32; BUCKETS],
    /// Absolute index (ts / bucket_ns) of the newest bucket.
    head: u64,
    active: bool,
    is_service: bool,
    first_ns: u64,
    last_ns: u64,
    last_report_ns: u64,
    total: u64,
    backend: Ep,
    client: Ep,
    kinds: u8,
}

impl Storm {
    fn advance(&mut self, idx: u64) {
        if idx <= self.head {
            return;
        }
        let steps = (idx - self.head).min(BUCKETS as u64);
        for i in 1..=steps {
            self.buckets[((self.head + i) % BUCKETS as u64) as usize] = 0;
        }
        self.head = idx;
    }

    fn count(&self) -> u32 {
        self.buckets.iter().sum()
    }
}

pub struct StormTracker {
    threshold: u32,
    window_ns: u64,
    bucket_ns: u64,
    max_keys: usize,
    storms: HashMap<Ep, Storm>,
    /// Keys not tracked because `max_keys` was reached.
    pub dropped_keys: u64,
}

impl StormTracker {
    pub fn new(threshold: u32, window_ns: u64, max_keys: usize) -> StormTracker {
        let window_ns = window_ns.max(BUCKETS as u64);
        StormTracker {
            threshold: threshold.max(1),
            window_ns,
            bucket_ns: window_ns / BUCKETS as u64,
            max_keys,
            storms: HashMap::default(),
            dropped_keys: 0,
        }
    }

    pub fn window_ns(&self) -> u64 {
        self.window_ns
    }

    /// Counts one reset tied to `key`; returns a report when a storm starts
    /// or is due an update.
    #[cfg(test)]
    pub fn record(
        &mut self,
        key: Ep,
        is_service: bool,
        backend: Ep,
        client: Ep,
        ts: u64,
    ) -> Option<StormReport> {
        self.record_kind(key, is_service, backend, client, 0, ts)
    }

    /// Counts one reset tied to `key` and ORs `kind` into the storm's kinds;
    /// returns a report when a storm starts or is due an update.
    pub fn record_kind(
        &mut self,
        key: Ep,
        is_service: bool,
        backend: Ep,
        client: Ep,
        kind: u8,
        ts: u64,
    ) -> Option<StormReport> {
        if !self.storms.contains_key(&key) && self.storms.len() >= self.max_keys {
            self.dropped_keys += 1;
            return None;
        }
        let idx = ts / self.bucket_ns;
        let s = self.storms.entry(key).or_insert(Storm {
            buckets: [0; BUCKETS],
            head: idx,
            active: false,
            is_service,
            first_ns: ts,
            last_ns: ts,
            last_report_ns: 0,
            total: 0,
            backend,
            client,
            kinds: 0,
        });
        s.kinds |= kind;
        s.advance(idx);
        // Out-of-order events older than the window are not counted in it.
        if idx + (BUCKETS as u64) > s.head {
            let b = (idx % BUCKETS as u64) as usize;
            s.buckets[b] = s.buckets[b].saturating_add(1);
        }
        s.last_ns = s.last_ns.max(ts);
        s.backend = backend;
        s.client = client;
        if s.active {
            s.total += 1;
        }
        let count = s.count();
        let phase = if !s.active && count >= self.threshold {
            s.active = true;
            s.total = count as u64;
            s.first_ns = ts;
            Phase::Start
        } else if s.active && ts.saturating_sub(s.last_report_ns) >= self.window_ns {
            Phase::Update
        } else {
            return None;
        };
        s.last_report_ns = ts;
        Some(report(key, s, phase, count))
    }

    /// Ends storms whose rate fell below half the threshold, and forgets
    /// quiet keys.
    pub fn tick(&mut self, now: u64, out: &mut Vec<StormReport>) {
        let idx = now / self.bucket_ns;
        let half = self.threshold / 2;
        self.storms.retain(|key, s| {
            s.advance(idx);
            let count = s.count();
            if s.active && count <= half {
                s.active = false;
                out.push(report(*key, s, Phase::End, count));
            }
            s.active || count > 0
        });
    }

    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.storms.len()
    }
}

fn report(key: Ep, s: &Storm, phase: Phase, count: u32) -> StormReport {
    StormReport {
        key,
        is_service: s.is_service,
        phase,
        count,
        total: s.total,
        first_ns: s.first_ns,
        last_ns: s.last_ns,
        backend: s.backend,
        client: s.client,
        kinds: s.kinds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn one_start_updates_per_window_then_end() {
        let key = Ep::new("10.96.0.10:80".parse().unwrap());
        let mut t = StormTracker::new(20, 1000 * MS, 10);
        let mut reports = Vec::new();
        // 100 resets/s for 3 s.
        for i in 0..300u64 {
            if let Some(r) = t.record(key, true, Ep::NONE, Ep::NONE, 10_000 * MS + i * 10 * MS) {
                reports.push(r.phase);
            }
        }
        assert_eq!(reports.first(), Some(&Phase::Start));
        assert_eq!(reports.iter().filter(|p| **p == Phase::Start).count(), 1);
        let updates = reports.iter().filter(|p| **p == Phase::Update).count();
        assert!((2..=3).contains(&updates), "{reports:?}");
        let mut out = Vec::new();
        t.tick(10_000 * MS + 3_000 * MS + 500 * MS, &mut out);
        assert!(out.is_empty(), "still within the window");
        t.tick(10_000 * MS + 6_000 * MS, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].phase, Phase::End);
        assert_eq!(out[0].total, 300);
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn below_threshold_is_no_storm() {
        let key = Ep::new("10.96.0.10:80".parse().unwrap());
        let mut t = StormTracker::new(20, 1000 * MS, 10);
        for i in 0..19u64 {
            assert!(t
                .record(key, true, Ep::NONE, Ep::NONE, i * 40 * MS)
                .is_none());
        }
        // Spread over time, the same count never reaches the threshold.
        for i in 0..100u64 {
            assert!(t
                .record(key, true, Ep::NONE, Ep::NONE, 10_000 * MS + i * 200 * MS)
                .is_none());
        }
    }
}
