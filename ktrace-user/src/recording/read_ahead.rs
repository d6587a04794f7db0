//! Reading a recording ahead, on another thread: one thread decompresses
//! and decodes the next blocks while the caller's handles the last, so a
//! replay takes the longer of the two rather than their sum. Batches go
//! over a bounded channel, in order, and come back to be reused.

use std::io::{self, Read};
use std::sync::mpsc;

use super::batch::Batch;
use super::format::FrameHeader;
use super::reader::FileReader;

/// Blocks decoded ahead of the one being handled, at most.
pub const DEPTH: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum ReadAheadError<E> {
    #[error(transparent)]
    Read(io::Error),
    /// What the consumer returned.
    #[error("{0}")]
    Consume(E),
}

/// Hands every block of `reader` that `want` accepts to `consume`, in
/// order, decoding on another thread (blocks `want` rejects give only
/// their names, as [`FileReader::next_batch`] says). The last batch may
/// hold only warnings (those of the file's end). Stops at the first error
/// of either side; everything before it was handed over.
pub fn read_ahead<R, E>(
    reader: &mut FileReader<R>,
    want: &(dyn Fn(&FrameHeader) -> bool + Sync),
    mut consume: impl FnMut(&Batch) -> Result<(), E>,
) -> Result<(), ReadAheadError<E>>
where
    R: Read + Send,
{
    std::thread::scope(|s| {
        let (full_tx, full_rx) = mpsc::sync_channel::<Batch>(DEPTH);
        let (free_tx, free_rx) = mpsc::channel::<Batch>();
        let decoder = s.spawn(move || -> io::Result<()> {
            loop {
                let mut b = free_rx.try_recv().unwrap_or_default();
                let more = reader.next_batch(&mut b, want)?;
                if !more && b.warnings.is_empty() {
                    return Ok(());
                }
                // A closed channel: the consumer stopped (its error wins).
                if full_tx.send(b).is_err() || !more {
                    return Ok(());
                }
            }
        });
        let mut consumed = Ok(());
        for b in full_rx.iter() {
            if let Err(e) = consume(&b) {
                consumed = Err(ReadAheadError::Consume(e));
                break;
            }
            // The decoder may have finished: then nothing to reuse it for.
            let _ = free_tx.send(b);
        }
        // Unblocks a decoder waiting to send, if the consumer stopped early.
        drop(full_rx);
        let read = match decoder.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        consumed?;
        read.map_err(ReadAheadError::Read)
    })
}
