//! What the benchmarks share.

use ktrace::event::{Event, EventBody, Source};

/// An event of namespace 1 at `ts`, as a tracepoint reports it.
pub fn ev(ts: u64, body: EventBody) -> Event {
    Event {
        ts_ns: ts,
        netns: 1,
        source: Source::Tracepoint,
        body,
    }
}
