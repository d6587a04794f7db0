//! Kernel timestamps (CLOCK_MONOTONIC) to wall-clock time, and RFC 3339.

use time::{format_description::FormatItem, macros::format_description, OffsetDateTime};

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// Nanoseconds of CLOCK_MONOTONIC now: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_now_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC) as u64
}

/// Maps monotonic nanoseconds to wall-clock nanoseconds since the epoch,
/// with the offset measured once at start (a recording stores it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WallClock {
    /// realtime - monotonic, in nanoseconds.
    pub offset_ns: i128,
}

impl WallClock {
    pub fn now() -> WallClock {
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        let real = clock_ns(libc::CLOCK_REALTIME);
        WallClock {
            offset_ns: real - mono,
        }
    }

    pub fn wall_ns(&self, mono_ns: u64) -> i128 {
        mono_ns as i128 + self.offset_ns
    }

    /// RFC 3339, UTC, nanoseconds: `2026-11-21T20:01:02.123456789Z`.
    pub fn rfc3339(&self, mono_ns: u64) -> String {
        rfc3339_ns(self.wall_ns(mono_ns))
    }
}

const RFC3339_NS: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:9]Z");

pub fn rfc3339_ns(epoch_ns: i128) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(epoch_ns)
        .ok()
        .and_then(|t| t.format(RFC3339_NS).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00.000000000Z".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_nanoseconds_utc() {
        assert_eq!(
            rfc3339_ns(1_700_000_000_123_456_789),
            "2023-11-14T22:13:20.123456789Z"
        );
        let c = WallClock { offset_ns: 1_000 };
        assert_eq!(c.wall_ns(5), 1_005);
    }
}
