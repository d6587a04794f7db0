//! Reading recordings back, block by block. Every complete block before a
//! crash is read; a torn tail, a corrupt block or an unknown record is a
//! [`Warning`], never an error and never a panic. Only a file that is not a
//! recording, or one from a newer major format, is refused ([`OpenError`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::batch::{Batch, Items};
use super::format::{
    open_payload, BlockDecoder, Decoded, FrameHeader, Item, Malformed, BLOCK_KIND_RECORDS,
    BLOCK_MAGIC, FILE_HEADER_FIXED, FILE_MAGIC, FLAG_NAMES, FRAME_HEADER_LEN, MAX_CONTEXT_BYTES,
    VERSION_MAJOR,
};
use super::warning::{Warning, WarningKind};
use super::Context;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot read {path}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a ktrace recording (no ktrace signature at its start)")]
    NotRecording { path: String },
    #[error("{path} was recorded in format version {major}.{minor}, newer than this ktrace reads ({VERSION_MAJOR}.x): replay it with a newer ktrace")]
    Newer {
        path: String,
        major: u16,
        minor: u16,
    },
    #[error("{path}: the recording header is corrupt ({what}); its events cannot be interpreted")]
    BadHeader { path: String, what: String },
    /// The file ends inside its header: written by a recorder killed as it
    /// created the file. Nothing to read; a warning, not an error.
    #[error("{path} ends before its header is complete ({len} bytes): the recorder stopped as it created it")]
    Torn { path: String, len: u64 },
}

/// What a reader got through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadStats {
    pub blocks: u64,
    pub items: u64,
    pub events: u64,
    pub corrupt_blocks: u64,
    pub skipped_bytes: u64,
    pub torn_tail_bytes: u64,
    pub unknown_records: u64,
    pub bad_records: u64,
}

/// A window over a reader, refilled on demand.
struct Bytes<R> {
    r: R,
    buf: Vec<u8>,
    pos: usize,
    eof: bool,
    /// File offset of `buf[pos]`.
    offset: u64,
}

impl<R: Read> Bytes<R> {
    /// Tries to have `n` bytes available (fewer only at end of file).
    fn fill(&mut self, n: usize) -> io::Result<()> {
        if self.buf.len() - self.pos >= n || self.eof {
            return Ok(());
        }
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        while self.buf.len() < n && !self.eof {
            let want = (n - self.buf.len()).max(256 << 10) as u64;
            let got = (&mut self.r).take(want).read_to_end(&mut self.buf)?;
            if (got as u64) < want {
                self.eof = true;
            }
        }
        Ok(())
    }

    fn avail(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    fn consume(&mut self, n: usize) {
        let n = n.min(self.buf.len() - self.pos);
        self.pos += n;
        self.offset += n as u64;
    }
}

/// Reads one recording file (any `Read`; a `File` by default).
pub struct FileReader<R: Read = File> {
    path: PathBuf,
    src: Bytes<R>,
    context: Context,
    version: (u16, u16),
    dec: Option<zstd::bulk::Decompressor<'static>>,
    raw: Vec<u8>,
    unknown: BTreeMap<u64, u64>,
    bad: Option<(u64, u64, Malformed)>,
    stats: ReadStats,
    done: bool,
}

impl FileReader<File> {
    /// Opens `path` and reads its header.
    pub fn open(path: &Path) -> Result<FileReader<File>, OpenError> {
        let f = File::open(path).map_err(|source| OpenError::Io {
            path: path.display().to_string(),
            source,
        })?;
        FileReader::new(f, path)
    }
}

impl<R: Read> FileReader<R> {
    /// Reads the header from `r`; `path` names it in messages.
    pub fn new(r: R, path: &Path) -> Result<FileReader<R>, OpenError> {
        let shown = path.display().to_string();
        let io_err = |source| OpenError::Io {
            path: shown.clone(),
            source,
        };
        let mut src = Bytes {
            r,
            buf: Vec::new(),
            pos: 0,
            eof: false,
            offset: 0,
        };
        src.fill(FILE_HEADER_FIXED).map_err(io_err)?;
        let a = src.avail();
        let n = a.len().min(FILE_MAGIC.len());
        if a[..n] != FILE_MAGIC[..n] {
            return Err(OpenError::NotRecording { path: shown });
        }
        if a.len() < FILE_HEADER_FIXED {
            return Err(OpenError::Torn {
                path: shown,
                len: a.len() as u64,
            });
        }
        let major = u16::from_le_bytes([a[8], a[9]]);
        let minor = u16::from_le_bytes([a[10], a[11]]);
        let json_len = u32::from_le_bytes([a[12], a[13], a[14], a[15]]) as usize;
        let crc = u32::from_le_bytes([a[16], a[17], a[18], a[19]]);
        if major > VERSION_MAJOR {
            return Err(OpenError::Newer {
                path: shown,
                major,
                minor,
            });
        }
        if major == 0 {
            return Err(OpenError::BadHeader {
                path: shown,
                what: "format version 0".into(),
            });
        }
        if json_len > MAX_CONTEXT_BYTES {
            return Err(OpenError::BadHeader {
                path: shown,
                what: format!("context of {json_len} bytes"),
            });
        }
        src.fill(FILE_HEADER_FIXED + json_len).map_err(io_err)?;
        let a = src.avail();
        if a.len() < FILE_HEADER_FIXED + json_len {
            return Err(OpenError::Torn {
                path: shown,
                len: a.len() as u64,
            });
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&a[..16]);
        let json = &a[FILE_HEADER_FIXED..FILE_HEADER_FIXED + json_len];
        h.update(json);
        if h.finalize() != crc {
            return Err(OpenError::BadHeader {
                path: shown,
                what: "checksum mismatch".into(),
            });
        }
        let context: Context = serde_json::from_slice(json).map_err(|e| OpenError::BadHeader {
            path: shown.clone(),
            what: format!("context: {e}"),
        })?;
        src.consume(FILE_HEADER_FIXED + json_len);
        Ok(FileReader {
            path: path.to_path_buf(),
            src,
            context,
            version: (major, minor),
            dec: None,
            raw: Vec::new(),
            unknown: BTreeMap::new(),
            bad: None,
            stats: ReadStats::default(),
            done: false,
        })
    }

    pub fn context(&self) -> &Context {
        &self.context
    }

    pub fn version(&self) -> (u16, u16) {
        self.version
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn stats(&self) -> &ReadStats {
        &self.stats
    }

    fn warn(&self, warn: &mut dyn FnMut(Warning), offset: u64, kind: WarningKind, message: String) {
        warn(Warning {
            path: self.path.clone(),
            offset,
            kind,
            message,
        });
    }

    /// The bytes left are an incomplete write (the recorder stopped while
    /// writing them): counted, skipped and said.
    fn torn_tail(&mut self, warn: &mut dyn FnMut(Warning), offset: u64, message: String) {
        let n = self.src.avail().len();
        self.stats.torn_tail_bytes += n as u64;
        self.src.consume(n);
        self.warn(warn, offset, WarningKind::TornTail, message);
    }

    /// Reads the items of the next block into `out` (cleared first),
    /// skipping blocks `want` rejects: only their names are read (a block
    /// with [`FLAG_NAMES`]), the others not even decompressed. `Ok(false)` at
    /// the end of the file. Errors are I/O errors only.
    pub fn next_block(
        &mut self,
        out: &mut Vec<Item>,
        warn: &mut dyn FnMut(Warning),
        want: &dyn Fn(&FrameHeader) -> bool,
    ) -> io::Result<bool> {
        out.clear();
        self.next_into(out, warn, want)
    }

    /// [`next_block`](Self::next_block) into a [`Batch`] (cleared first):
    /// the events apart, ready for the engine, and the block's warnings
    /// with them.
    pub fn next_batch(
        &mut self,
        batch: &mut Batch,
        want: &dyn Fn(&FrameHeader) -> bool,
    ) -> io::Result<bool> {
        batch.clear();
        let mut warnings = std::mem::take(&mut batch.warnings);
        let more = self.next_into(batch, &mut |w| warnings.push(w), want);
        batch.warnings = warnings;
        more
    }

    fn next_into<O: Items>(
        &mut self,
        out: &mut O,
        warn: &mut dyn FnMut(Warning),
        want: &dyn Fn(&FrameHeader) -> bool,
    ) -> io::Result<bool> {
        loop {
            if self.done {
                return Ok(false);
            }
            let Some((h, offset, names_only)) = self.next_payload(warn, want)? else {
                continue;
            };
            if names_only {
                self.decode_names(&h, out);
                return Ok(true);
            }
            self.stats.blocks += 1;
            self.decode_block(&h, offset, out, warn);
            return Ok(true);
        }
    }

    /// The next block's payload into `self.raw`: its header, offset and
    /// whether only its names are wanted. `None` when a block was skipped
    /// (or the end reached: `self.done`).
    fn next_payload(
        &mut self,
        warn: &mut dyn FnMut(Warning),
        want: &dyn Fn(&FrameHeader) -> bool,
    ) -> io::Result<Option<(FrameHeader, u64, bool)>> {
        self.src.fill(FRAME_HEADER_LEN)?;
        let offset = self.src.offset;
        let a = self.src.avail();
        if a.is_empty() {
            self.end_of_file(warn);
            return Ok(None);
        }
        if a.len() < FRAME_HEADER_LEN {
            let n = a.len();
            self.torn_tail(warn, offset, format!("torn tail: the last {n} bytes (offset {offset}) are an incomplete block header (the recorder stopped while writing); everything before was read"));
            return Ok(None);
        }
        let h = match FrameHeader::decode(&a[..FRAME_HEADER_LEN]) {
            Ok(h) => h,
            Err(why) => {
                self.resync(offset, why, warn)?;
                return Ok(None);
            }
        };
        let total = FRAME_HEADER_LEN + h.stored_len as usize;
        self.src.fill(total)?;
        let a = self.src.avail();
        if a.len() < total {
            let n = a.len();
            self.torn_tail(
                warn,
                offset,
                format!(
                    "torn tail: the last block (offset {offset}, {n} of {total} bytes, {} events) is incomplete (the recorder stopped while writing it); everything before was read",
                    h.events
                ),
            );
            return Ok(None);
        }
        if h.kind != BLOCK_KIND_RECORDS {
            self.src.consume(total);
            self.stats.unknown_records += u64::from(h.items);
            self.warn(
                warn,
                offset,
                WarningKind::UnknownRecord,
                format!("skipped a block of unknown kind {} at offset {offset} ({total} bytes; written by a newer ktrace?)", h.kind),
            );
            return Ok(None);
        }
        // A block the caller skips is still read for the names in
        // front of it: later blocks of the segment rely on them.
        let names_only = !want(&h);
        if names_only && h.flags & FLAG_NAMES == 0 {
            self.src.consume(total);
            return Ok(None);
        }
        let stored = &a[FRAME_HEADER_LEN..total];
        let opened = open_payload(&h, stored, &mut self.dec, &mut self.raw);
        self.src.consume(total);
        if let Err(why) = opened {
            self.stats.corrupt_blocks += 1;
            self.stats.skipped_bytes += total as u64;
            self.warn(
                warn,
                offset,
                WarningKind::Corrupt,
                format!(
                    "corrupt block at offset {offset} ({why}): skipped {total} bytes holding {} events; reading on",
                    h.events
                ),
            );
            return Ok(None);
        }
        Ok(Some((h, offset, names_only)))
    }

    fn decode_block<O: Items>(
        &mut self,
        h: &FrameHeader,
        offset: u64,
        out: &mut O,
        warn: &mut dyn FnMut(Warning),
    ) {
        let mut d = BlockDecoder::new(&self.raw, h.base_ts);
        let mut broken = None;
        let mut decoded = 0u64;
        while let Some(r) = d.next() {
            match r {
                Ok(Decoded::Item(item)) => {
                    decoded += 1;
                    if matches!(item, Item::Event(_)) {
                        self.stats.events += 1;
                    }
                    out.push_item(item);
                }
                Ok(Decoded::Definition) => {}
                Ok(Decoded::Unknown(t)) => {
                    self.stats.unknown_records += 1;
                    *self.unknown.entry(t).or_insert(0) += 1;
                }
                Ok(Decoded::Bad(t, why)) => {
                    self.stats.bad_records += 1;
                    match &mut self.bad {
                        Some((_, n, _)) => *n += 1,
                        None => self.bad = Some((t, 1, why)),
                    }
                }
                Err(why) => {
                    broken = Some(why);
                    break;
                }
            }
        }
        self.stats.items += decoded;
        if let Some(why) = broken {
            self.stats.corrupt_blocks += 1;
            let left = u64::from(h.items).saturating_sub(decoded);
            self.warn(
                warn,
                offset,
                WarningKind::Corrupt,
                format!(
                    "block at offset {offset} breaks off ({why}): its last {left} records skipped"
                ),
            );
        }
    }

    /// The name records in front of a skipped block (see
    /// `recording::names`): the writer puts them first, so the first other
    /// record ends them.
    fn decode_names<O: Items>(&mut self, h: &FrameHeader, out: &mut O) {
        let mut d = BlockDecoder::new(&self.raw, h.base_ts);
        while let Some(Ok(Decoded::Item(item @ Item::Name { .. }))) = d.next() {
            self.stats.items += 1;
            out.push_item(item);
        }
    }

    /// Skips bytes up to the next valid block header.
    fn resync(
        &mut self,
        offset: u64,
        why: Malformed,
        warn: &mut dyn FnMut(Warning),
    ) -> io::Result<()> {
        let mut skipped = 0u64;
        self.src.consume(1);
        skipped += 1;
        loop {
            self.src.fill(FRAME_HEADER_LEN)?;
            let a = self.src.avail();
            if a.len() < FRAME_HEADER_LEN {
                let n = a.len();
                self.src.consume(n);
                skipped += n as u64;
                self.stats.skipped_bytes += skipped;
                self.stats.torn_tail_bytes += skipped;
                self.warn(
                    warn,
                    offset,
                    WarningKind::TornTail,
                    format!("unreadable tail: skipped the last {skipped} bytes from offset {offset} ({why}, and no valid block after)"),
                );
                return Ok(());
            }
            // Next candidate: a magic within what is buffered.
            let limit = a.len() - FRAME_HEADER_LEN + 1;
            match a[..limit + BLOCK_MAGIC.len() - 1]
                .windows(BLOCK_MAGIC.len())
                .position(|w| w == BLOCK_MAGIC)
            {
                Some(p) if FrameHeader::decode(&a[p..p + FRAME_HEADER_LEN]).is_ok() => {
                    self.src.consume(p);
                    skipped += p as u64;
                    self.stats.skipped_bytes += skipped;
                    self.stats.corrupt_blocks += 1;
                    self.warn(
                        warn,
                        offset,
                        WarningKind::Corrupt,
                        format!("corrupt data at offset {offset} ({why}): skipped {skipped} bytes to the next valid block; reading on"),
                    );
                    return Ok(());
                }
                Some(p) => {
                    self.src.consume(p + 1);
                    skipped += p as u64 + 1;
                }
                None => {
                    self.src.consume(limit);
                    skipped += limit as u64;
                }
            }
        }
    }

    fn end_of_file(&mut self, warn: &mut dyn FnMut(Warning)) {
        self.done = true;
        let unknown = std::mem::take(&mut self.unknown);
        for (t, n) in unknown {
            self.warn(
                warn,
                self.src.offset,
                WarningKind::UnknownRecord,
                format!("skipped {n} records of unknown type {t:#x} (written by a newer ktrace?)"),
            );
        }
        if let Some((t, n, why)) = self.bad.take() {
            self.warn(
                warn,
                self.src.offset,
                WarningKind::BadRecord,
                format!("skipped {n} records that did not decode (first: type {t:#x}, {why})"),
            );
        }
    }

    /// Reads every remaining item (tests, small files).
    pub fn read_all(&mut self, warn: &mut dyn FnMut(Warning)) -> io::Result<Vec<Item>> {
        let mut all = Vec::new();
        let mut block = Vec::new();
        while self.next_block(&mut block, warn, &|_| true)? {
            all.append(&mut block);
        }
        Ok(all)
    }
}
