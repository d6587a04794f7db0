//! Writing recordings: events are encoded on the pipeline's thread into the
//! current block; sealed blocks go through a bounded queue to a writer
//! thread that compresses them, frames them and appends them to the
//! current segment, rotating and pruning segments as configured.
//!
//! Segments: `PATH` is the one being written; on rotation it becomes
//! `PATH.1`, `PATH.1` becomes `PATH.2`, ... and `PATH.<keep-1>` is deleted,
//! so at most `keep` files exist, each at most `rotate_bytes` long (plus at
//! most one block when a single block is larger).
//!
//! Never fatal after start: when a write fails (disk full, quota, I/O
//! error) the writer truncates the segment back to its last complete
//! block, says so once on stderr and in a notice, counts the events it
//! drops, retries every second, and on success first writes a `Dropped`
//! record saying how many events are missing.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::format::{
    BlockEncoder, FrameSealer, NamedAddr, RawBlock, FILE_HEADER_FIXED, FILE_MAGIC, VERSION_MAJOR,
    VERSION_MINOR,
};
use super::names::{NameCache, SegmentNames};
use super::Context;
use crate::clock::monotonic_now_ns;
use crate::engine::EngineConfig;
use crate::event::Event;
use crate::hooks::HookStatus;
use crate::names::{NameResolver, Names};
use crate::output::StatusInfo;

/// How often a paused writer tries again.
const RETRY: Duration = Duration::from_secs(1);
/// How often a paused writer reports its drop count.
const REPORT_EVERY: Duration = Duration::from_secs(10);
/// Sealed blocks waiting for the writer thread (each at most `block_bytes`).
const QUEUE_BLOCKS: usize = 64;

#[derive(Debug, Clone)]
pub struct RotationConfig {
    pub path: PathBuf,
    /// Start a new segment before one would grow past this many bytes.
    pub rotate_bytes: Option<u64>,
    /// Start a new segment when the current one is this old.
    pub rotate_time: Option<Duration>,
    /// Segments kept, the current one included (at least 1).
    pub keep: usize,
    /// zstd level of the blocks (0: uncompressed).
    pub zstd_level: i32,
    /// A block is sealed when its raw payload reaches this many bytes...
    pub block_bytes: usize,
    /// ...or, holding events, when it is this old (the pipeline ticks every
    /// 200 ms, so events reach the file within a second).
    pub flush_interval: Duration,
    /// Blocks holding only ticks are sealed when this old.
    pub idle_flush_interval: Duration,
    /// Compress and write on a thread of its own (the live default), or
    /// inline in the caller (benchmarks, tests).
    pub threaded: bool,
    /// Test hook: when nonzero, every write fails with this errno.
    #[doc(hidden)]
    pub fault: Option<Arc<AtomicI32>>,
}

impl RotationConfig {
    pub fn new(path: impl Into<PathBuf>) -> RotationConfig {
        RotationConfig {
            path: path.into(),
            rotate_bytes: None,
            rotate_time: None,
            keep: 1,
            zstd_level: 3,
            block_bytes: 64 << 10,
            flush_interval: Duration::from_millis(800),
            idle_flush_interval: Duration::from_secs(10),
            threaded: true,
            fault: None,
        }
    }

    /// `PATH.n` (n >= 1), the n-th older segment.
    pub fn segment_path(&self, n: usize) -> PathBuf {
        segment_path(&self.path, n)
    }
}

pub fn segment_path(path: &Path, n: usize) -> PathBuf {
    if n == 0 {
        return path.to_path_buf();
    }
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot record to {path}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} exists and is not a ktrace recording; refusing to overwrite it (choose another --output)")]
    NotARecording { path: String },
    #[error("cannot record to {path}: it is a directory (give a file name)")]
    IsDir { path: String },
}

/// What the writer tells the pipeline (which prints lost-style lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Writing failed; events are being dropped until it works again.
    Paused {
        path: PathBuf,
        error: String,
        dropped: u64,
        total: u64,
    },
    /// Still failing: more events dropped since the last notice.
    Dropped {
        path: PathBuf,
        count: u64,
        total: u64,
    },
    /// Writing works again; `count` events dropped since the last notice.
    Resumed {
        path: PathBuf,
        count: u64,
        total: u64,
    },
}

/// What a recording wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecorderSummary {
    pub events: u64,
    pub items: u64,
    pub blocks: u64,
    /// Bytes written (headers and frames) over all segments.
    pub bytes: u64,
    /// Events not recorded (disk full, queue full).
    pub dropped: u64,
    /// Segments of this recording still on disk, oldest first.
    pub files: Vec<PathBuf>,
    pub segments: u64,
}

struct Pause {
    last_try: Instant,
    last_report: Instant,
    reported: u64,
    dropped: u64,
}

/// Segments, rotation, retention and failures: everything that touches files.
pub struct SegmentWriter {
    cfg: RotationConfig,
    ctx: Option<Context>,
    file: Option<File>,
    /// Bytes of the segment up to the end of its last complete block.
    good_len: u64,
    /// The file position may not be `good_len` (after a failed write).
    reposition: bool,
    header_written: bool,
    seg_blocks: u64,
    seg_started: Instant,
    segment: u64,
    /// The file at `path` was created by `open` and nothing was written yet.
    created_empty: bool,
    sealer: FrameSealer,
    frame: Vec<u8>,
    /// The names this segment holds; `name_prefix`: those the block being
    /// written carries in front.
    names: SegmentNames,
    name_prefix: Vec<u8>,
    /// The names' epoch: one more at every new segment (shared with the
    /// [`Recorder`], which starts sending names afresh when it changes).
    epoch: Arc<AtomicU64>,
    /// The frame of a `Dropped` record, written before `frame`.
    aux: Vec<u8>,
    paused: Option<Pause>,
    dropped_pending: u64,
    dropped_since_ts: u64,
    dropped_reason: String,
    rotate_warned: bool,
    notices: Vec<Notice>,
    stats: RecorderSummary,
}

fn is_recording_or_empty(path: &Path) -> io::Result<bool> {
    let mut f = File::open(path)?;
    let mut head = [0u8; 8];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(head[..n] == FILE_MAGIC[..n])
}

fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

impl SegmentWriter {
    /// Checks that `cfg.path` can be written (creating it if missing),
    /// before hooks are attached; the header is written by [`start`](Self::start).
    pub fn open(cfg: RotationConfig) -> Result<SegmentWriter, RecordError> {
        let path = &cfg.path;
        let shown = path.display().to_string();
        let open_err = |source| RecordError::Open {
            path: shown.clone(),
            source,
        };
        super::private::refuse_symlink(path).map_err(open_err)?;
        if path.is_dir() {
            return Err(RecordError::IsDir { path: shown });
        }
        super::private::create_parent(path).map_err(open_err)?;
        let existed = path.exists();
        if existed && !is_recording_or_empty(path).map_err(open_err)? {
            return Err(RecordError::NotARecording { path: shown });
        }
        // Writable? (Does not truncate: a previous recording survives
        // until start() rotates it out.)
        super::private::open(path, false).map_err(open_err)?;
        Ok(SegmentWriter {
            sealer: FrameSealer::new(cfg.zstd_level),
            cfg,
            ctx: None,
            file: None,
            good_len: 0,
            reposition: false,
            header_written: false,
            seg_blocks: 0,
            seg_started: Instant::now(),
            segment: 0,
            created_empty: !existed,
            frame: Vec::with_capacity(1 << 16),
            names: SegmentNames::default(),
            name_prefix: Vec::new(),
            epoch: Arc::new(AtomicU64::new(1)),
            aux: Vec::new(),
            paused: None,
            dropped_pending: 0,
            dropped_since_ts: 0,
            dropped_reason: String::new(),
            rotate_warned: false,
            notices: Vec::new(),
            stats: RecorderSummary::default(),
        })
    }

    pub fn take_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.notices)
    }

    /// Writes the first segment's header: the previous recording at `path`
    /// (if any) is rotated out, or replaced when `keep` is 1.
    pub fn start(&mut self, ctx: Context) -> io::Result<()> {
        self.ctx = Some(ctx);
        self.prune_beyond_keep();
        let old_has_data =
            !self.created_empty && self.cfg.path.metadata().is_ok_and(|m| m.len() > 0);
        if old_has_data && self.cfg.keep > 1 {
            shift_segments(&self.cfg.path, self.cfg.keep)?;
        }
        self.created_empty = false;
        let f = super::private::open(&self.cfg.path, true)?;
        self.file = Some(f);
        self.seg_started = Instant::now();
        self.stats.segments = 1;
        if let Err(e) = self.write_header() {
            self.fail(e, 0, 0);
        }
        Ok(())
    }

    /// Deletes `PATH.k` for `k >= keep` left by an earlier run with a larger
    /// `--keep` (only files that are ktrace recordings).
    fn prune_beyond_keep(&mut self) {
        let (Some(dir), Some(base)) = (self.cfg.path.parent(), self.cfg.path.file_name()) else {
            return;
        };
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let base = base.to_string_lossy().into_owned();
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(n) = name.strip_prefix(&base).and_then(|r| r.strip_prefix('.')) else {
                continue;
            };
            if let Ok(k) = n.parse::<usize>() {
                if k >= self.cfg.keep.max(1) && is_recording_or_empty(&e.path()).unwrap_or(false) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    fn write_header(&mut self) -> io::Result<()> {
        let Some(ctx) = &mut self.ctx else {
            return Err(io::Error::other("recording context missing"));
        };
        ctx.segment = self.segment;
        ctx.segment_started_mono_ns = monotonic_now_ns();
        let json = serde_json::to_vec(ctx).map_err(io::Error::other)?;
        let mut h = Vec::with_capacity(FILE_HEADER_FIXED + json.len());
        h.extend_from_slice(&FILE_MAGIC);
        h.extend_from_slice(&VERSION_MAJOR.to_le_bytes());
        h.extend_from_slice(&VERSION_MINOR.to_le_bytes());
        h.extend_from_slice(&(json.len() as u32).to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&h);
        crc.update(&json);
        h.extend_from_slice(&crc.finalize().to_le_bytes());
        h.extend_from_slice(&json);
        self.write_bytes_of(Which::Header(h))?;
        self.header_written = true;
        Ok(())
    }

    /// Appends `bytes` at `good_len`; on failure truncates back to it.
    fn write_bytes_of(&mut self, which: Which) -> io::Result<()> {
        let bytes: &[u8] = match &which {
            Which::Header(h) => h,
            Which::Frame => &self.frame,
            Which::Aux => &self.aux,
        };
        if self.file.is_none() {
            let f = super::private::open(&self.cfg.path, false)?;
            self.file = Some(f);
            self.reposition = true;
        }
        let f = self.file.as_mut().expect("file opened above");
        if self.reposition {
            let _ = f.set_len(self.good_len);
            f.seek(SeekFrom::Start(self.good_len))?;
            self.reposition = false;
        }
        let injected = self
            .cfg
            .fault
            .as_ref()
            .map_or(0, |e| e.load(Ordering::Relaxed));
        let r = if injected != 0 {
            Err(io::Error::from_raw_os_error(injected))
        } else {
            f.write_all(bytes)
        };
        match r {
            Ok(()) => {
                self.good_len += bytes.len() as u64;
                self.stats.bytes += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Give back what the torn write took; retried later anyway.
                let _ = f.set_len(self.good_len);
                self.reposition = true;
                Err(e)
            }
        }
    }

    /// Seals and writes one block (or counts it dropped while paused).
    pub fn write_block(&mut self, raw: &RawBlock) {
        let now = Instant::now();
        if let Some(p) = &mut self.paused {
            if now.duration_since(p.last_try) < RETRY {
                self.drop_block(raw.events, raw.min_ts);
                self.names.lost(raw);
                return;
            }
            p.last_try = now;
        }
        match self.try_write(Some(raw)) {
            Ok(()) => self.resumed(),
            Err(e) => {
                self.names.lost(raw);
                self.fail(e, raw.events, raw.min_ts)
            }
        }
    }

    /// Events the pipeline could not queue (the writer fell behind).
    pub fn queue_dropped(&mut self, count: u64, since_ts: u64) {
        if count == 0 {
            return;
        }
        if self.dropped_pending == 0 {
            self.dropped_since_ts = since_ts;
        }
        self.dropped_pending += count;
        self.stats.dropped += count;
        self.dropped_reason = "recorder queue full (the disk is too slow)".into();
    }

    /// Called when idle: retries a paused writer, rotates by time.
    pub fn poll(&mut self) {
        let now = Instant::now();
        if let Some(p) = &mut self.paused {
            if now.duration_since(p.last_try) < RETRY {
                return;
            }
            p.last_try = now;
            match self.try_write(None) {
                Ok(()) => self.resumed(),
                Err(e) => self.fail(e, 0, 0),
            }
        } else if self.cfg.rotate_time.is_some() && self.seg_blocks > 0 {
            if let Err(e) = self.try_write(None) {
                self.fail(e, 0, 0);
            }
        }
    }

    fn try_write(&mut self, raw: Option<&RawBlock>) -> io::Result<()> {
        if self.ctx.is_none() {
            return Err(io::Error::other("recording not started"));
        }
        // Seal first: rotation decides on the real frame sizes.
        let block = raw.filter(|r| r.items > 0);
        if let Some(raw) = block {
            self.seal(raw);
        }
        if self.dropped_pending > 0 {
            let mut enc = BlockEncoder::new();
            enc.push_dropped(
                self.dropped_since_ts,
                self.dropped_pending,
                &self.dropped_reason,
            );
            self.sealer.seal(&enc.take(), &mut self.aux);
        }
        let next_len = block.map_or(0, |_| self.frame.len())
            + if self.dropped_pending > 0 {
                self.aux.len()
            } else {
                0
            };
        if self.maybe_rotate(next_len as u64)? {
            // The new segment holds none of the names yet.
            if let Some(raw) = block {
                self.seal(raw);
            }
        }
        if !self.header_written {
            self.write_header()?;
        }
        if self.dropped_pending > 0 {
            self.write_bytes_of(Which::Aux)?;
            self.seg_blocks += 1;
            self.stats.blocks += 1;
            self.dropped_pending = 0;
        }
        if let Some(raw) = block {
            self.write_bytes_of(Which::Frame)?;
            self.names.commit();
            self.seg_blocks += 1;
            self.stats.blocks += 1;
            self.stats.events += u64::from(raw.events);
            self.stats.items += u64::from(raw.items);
        }
        Ok(())
    }

    /// The frame of `raw`, with the names its segment lacks in front.
    fn seal(&mut self, raw: &RawBlock) {
        let epoch = self.epoch.load(Ordering::Acquire);
        self.names.prefix(raw, epoch, &mut self.name_prefix);
        self.sealer
            .seal_with(&self.name_prefix, raw, &mut self.frame);
    }

    /// Starts a new segment when the current one is full or old enough;
    /// true when it did.
    fn maybe_rotate(&mut self, next_len: u64) -> io::Result<bool> {
        if self.seg_blocks == 0 || !self.header_written {
            return Ok(false);
        }
        let by_size = self
            .cfg
            .rotate_bytes
            .is_some_and(|max| self.good_len + next_len > max);
        let by_time = self
            .cfg
            .rotate_time
            .is_some_and(|t| self.seg_started.elapsed() >= t);
        if !(by_size || by_time) {
            return Ok(false);
        }
        if let Some(f) = &self.file {
            let _ = f.sync_data();
        }
        if let Err(e) = shift_segments(&self.cfg.path, self.cfg.keep) {
            // Keep writing the current segment; try again at the next block.
            if !self.rotate_warned {
                self.rotate_warned = true;
                eprintln!(
                    "ktrace: cannot rotate {}: {e}; the current segment keeps growing until rotation works",
                    self.cfg.path.display()
                );
            }
            return Ok(false);
        }
        // The open file is now PATH.1 (or unlinked): start a new PATH.
        self.file = None;
        self.good_len = 0;
        self.reposition = false;
        self.header_written = false;
        self.seg_blocks = 0;
        self.seg_started = Instant::now();
        self.segment += 1;
        self.stats.segments += 1;
        self.names.new_segment();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let f = super::private::open(&self.cfg.path, true)?;
        self.file = Some(f);
        self.write_header()?;
        Ok(true)
    }

    fn drop_block(&mut self, events: u32, min_ts: u64) {
        if events == 0 {
            return;
        }
        if self.dropped_pending == 0 {
            self.dropped_since_ts = min_ts;
        }
        self.dropped_pending += u64::from(events);
        self.stats.dropped += u64::from(events);
        if let Some(p) = &mut self.paused {
            p.dropped += u64::from(events);
            if p.last_report.elapsed() >= REPORT_EVERY && p.dropped > p.reported {
                self.notices.push(Notice::Dropped {
                    path: self.cfg.path.clone(),
                    count: p.dropped - p.reported,
                    total: self.stats.dropped,
                });
                p.reported = p.dropped;
                p.last_report = Instant::now();
            }
        }
    }

    fn fail(&mut self, e: io::Error, events: u32, min_ts: u64) {
        let first = self.paused.is_none();
        if first {
            let now = Instant::now();
            self.paused = Some(Pause {
                last_try: now,
                last_report: now,
                reported: 0,
                dropped: 0,
            });
        }
        if is_disk_full(&e) {
            self.dropped_reason = "disk full".into();
        } else {
            self.dropped_reason = format!("write error: {e}");
        }
        self.drop_block(events, min_ts);
        if first {
            let p = self.paused.as_mut().expect("set above");
            p.reported = p.dropped;
            let what = if is_disk_full(&e) {
                "disk full"
            } else {
                "cannot write"
            };
            eprintln!(
                "ktrace: {what} writing {} ({e}): recording paused; events are counted and dropped until it can write again (retrying every second)",
                self.cfg.path.display()
            );
            self.notices.push(Notice::Paused {
                path: self.cfg.path.clone(),
                error: format!("{what}: {e}"),
                dropped: p.dropped,
                total: self.stats.dropped,
            });
        }
    }

    fn resumed(&mut self) {
        if let Some(p) = self.paused.take() {
            eprintln!(
                "ktrace: recording to {} resumed; {} events were not recorded while it could not write",
                self.cfg.path.display(),
                p.dropped
            );
            self.notices.push(Notice::Resumed {
                path: self.cfg.path.clone(),
                count: p.dropped - p.reported,
                total: self.stats.dropped,
            });
        }
    }

    pub fn is_paused(&self) -> bool {
        self.paused.is_some()
    }

    pub fn stats(&self) -> &RecorderSummary {
        &self.stats
    }

    /// Last attempt to write what is pending, then fsync. Removes the file
    /// if the recording never started.
    pub fn finish(mut self) -> RecorderSummary {
        if self.ctx.is_none() {
            if self.created_empty {
                let _ = std::fs::remove_file(&self.cfg.path);
            }
            return self.stats;
        }
        if self.paused.is_some() || self.dropped_pending > 0 {
            if let Some(p) = &mut self.paused {
                p.last_try = Instant::now() - RETRY;
            }
            match self.try_write(None) {
                Ok(()) => self.resumed(),
                Err(e) => self.fail(e, 0, 0),
            }
        }
        if let Some(f) = &self.file {
            let _ = f.sync_data();
        }
        let kept = (self.stats.segments as usize).min(self.cfg.keep.max(1));
        self.stats.files = (0..kept)
            .rev()
            .map(|n| self.cfg.segment_path(n))
            .filter(|p| p.exists())
            .collect();
        self.stats
    }
}

enum Which {
    Header(Vec<u8>),
    Frame,
    Aux,
}

/// `PATH.(keep-2)` -> `PATH.(keep-1)`, ..., `PATH` -> `PATH.1` (the oldest
/// beyond `keep` deleted); with `keep` 1, `PATH` is deleted.
pub fn shift_segments(path: &Path, keep: usize) -> io::Result<()> {
    let ignore_missing = |r: io::Result<()>| match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    };
    if keep <= 1 {
        return ignore_missing(std::fs::remove_file(path));
    }
    ignore_missing(std::fs::remove_file(segment_path(path, keep - 1)))?;
    for k in (1..keep - 1).rev() {
        ignore_missing(std::fs::rename(
            segment_path(path, k),
            segment_path(path, k + 1),
        ))?;
    }
    // PATH itself may be gone (deleted by hand): then there is nothing to keep.
    ignore_missing(std::fs::rename(path, segment_path(path, 1)))
}

enum ToWriter {
    Start(Box<Context>),
    Block {
        raw: RawBlock,
        /// Events dropped before this block because the queue was full.
        queue_dropped: u64,
        queue_dropped_since: u64,
    },
    Finish,
}

enum Backend {
    Inline(Box<SegmentWriter>),
    Thread {
        tx: SyncSender<ToWriter>,
        notices: Receiver<Notice>,
        handle: JoinHandle<RecorderSummary>,
    },
    Done,
}

/// The recording end of the pipeline: `event`, `lost`, `tick` from the live
/// loop; blocks sealed by size or age.
pub struct Recorder {
    enc: BlockEncoder,
    backend: Backend,
    cfg: RotationConfig,
    command: &'static str,
    engine: EngineConfig,
    last_seal: Instant,
    queue_dropped: u64,
    queue_dropped_since: u64,
    /// The names each event's addresses get ([`name_with`](Self::name_with)).
    names: Option<NameResolver>,
    /// The names of addresses, looked up once per version of the names.
    name_cache: NameCache,
    /// The names the current block sends. Its addresses (those the
    /// encoder lists, then those findings named) are named in a batch when
    /// the block is sealed or the names change: how many of each list are
    /// named already.
    block_names: Vec<Arc<NamedAddr>>,
    named_upto: usize,
    finding_ips: Vec<IpAddr>,
    findings_named_upto: usize,
    /// The version of the names the addresses not named yet were seen in.
    pending_version: u64,
    /// The writer's epoch as last seen, and this side's: one more at each
    /// change of the writer's, or when a block is lost on the way (its
    /// names are then sent again).
    writer_epoch: Arc<AtomicU64>,
    seen_epoch: u64,
    name_epoch: u64,
}

impl Recorder {
    /// Opens (validates) the output; call [`start`](Self::start) once the
    /// hook status is known.
    pub fn create(
        cfg: RotationConfig,
        command: &'static str,
        engine: EngineConfig,
    ) -> Result<Recorder, RecordError> {
        let mut cfg = cfg;
        cfg.keep = cfg.keep.max(1);
        let sw = SegmentWriter::open(cfg.clone())?;
        let writer_epoch = sw.epoch.clone();
        let backend = if cfg.threaded {
            let (tx, rx) = mpsc::sync_channel::<ToWriter>(QUEUE_BLOCKS);
            let (ntx, nrx) = mpsc::channel::<Notice>();
            let handle = std::thread::Builder::new()
                .name("ktrace-recorder".into())
                .spawn(move || writer_thread(sw, rx, ntx))
                .map_err(|source| RecordError::Open {
                    path: cfg.path.display().to_string(),
                    source,
                })?;
            Backend::Thread {
                tx,
                notices: nrx,
                handle,
            }
        } else {
            Backend::Inline(Box::new(sw))
        };
        Ok(Recorder {
            enc: BlockEncoder::new(),
            backend,
            cfg,
            command,
            engine,
            last_seal: Instant::now(),
            queue_dropped: 0,
            queue_dropped_since: 0,
            names: None,
            name_cache: NameCache::default(),
            block_names: Vec::new(),
            named_upto: 0,
            finding_ips: Vec::new(),
            findings_named_upto: 0,
            pending_version: 0,
            seen_epoch: writer_epoch.load(Ordering::Acquire),
            writer_epoch,
            name_epoch: 1,
        })
    }

    pub fn path(&self) -> &Path {
        &self.cfg.path
    }

    /// Writes the header: what is live, on which kernel, with which settings.
    pub fn start(
        &mut self,
        status: &[HookStatus],
        info: &StatusInfo,
        clock: crate::clock::WallClock,
    ) -> io::Result<()> {
        let ctx = super::live_context(
            self.command,
            status,
            info,
            clock,
            &self.engine,
            monotonic_now_ns(),
        );
        self.start_with(ctx)
    }

    /// Like [`start`](Self::start) with a given context (tests, conversions).
    pub fn start_with(&mut self, ctx: Context) -> io::Result<()> {
        self.last_seal = Instant::now();
        match &mut self.backend {
            Backend::Inline(sw) => sw.start(ctx),
            Backend::Thread { tx, .. } => tx
                .send(ToWriter::Start(Box::new(ctx)))
                .map_err(|_| io::Error::other("the recorder thread stopped")),
            Backend::Done => Ok(()),
        }
    }

    /// From now on, the Kubernetes names of each event's addresses go
    /// with it, so `replay` prints the names `watch` printed (on its events
    /// and on the findings they lead to). Their names reach the file once
    /// per segment (see [`super::names`]).
    pub fn name_with(&mut self, names: Arc<Names>) {
        let names = NameResolver::live(names);
        self.pending_version = names.version();
        self.names = Some(names);
        self.enc.list_ips();
    }

    #[inline]
    pub fn event(&mut self, ev: &Event) {
        self.check_version();
        self.enc.push_event(ev);
        if self.enc.len() >= self.cfg.block_bytes {
            self.seal();
        }
    }

    /// When the names changed, the block's addresses seen before are named
    /// first, as of the version they were seen in. The others wait in the
    /// encoder's list until the block is sealed (then only those new in
    /// the block cost a probe of [`NameCache`]).
    #[inline]
    fn check_version(&mut self) {
        let Some(names) = &self.names else {
            return;
        };
        let version = names.version();
        if version != self.pending_version {
            self.name_pending();
            self.pending_version = version;
        }
    }

    /// The names of an address a finding names, as they are now (the
    /// event that carried it may have been recorded before they were known).
    pub fn name_addr(&mut self, ip: IpAddr) {
        if self.names.is_some() {
            self.check_version();
            self.finding_ips.push(ip);
        }
    }

    /// Names the block's addresses not named yet.
    fn name_pending(&mut self) {
        let Some(names) = &self.names else {
            return;
        };
        let (epoch, version) = (self.name_epoch, self.pending_version);
        let out = &mut self.block_names;
        let listed = &self.enc.block_ips()[self.named_upto..];
        self.name_cache.unsent(listed, names, epoch, version, out);
        self.named_upto += listed.len();
        let found = &self.finding_ips[self.findings_named_upto..];
        self.name_cache.unsent(found, names, epoch, version, out);
        self.findings_named_upto = self.finding_ips.len();
    }

    pub fn lost(&mut self, ts_ns: u64, count: u64, total: u64, what: &str) {
        self.enc.push_lost(ts_ns, count, total, what);
    }

    /// The pipeline's clock advanced to `now_ns`; seals the block when due.
    pub fn tick(&mut self, now_ns: u64) {
        self.enc.push_tick(now_ns);
        let age = self.last_seal.elapsed();
        if (self.enc.events() > 0 && age >= self.cfg.flush_interval)
            || age >= self.cfg.idle_flush_interval
        {
            self.seal();
        }
        if let Backend::Inline(sw) = &mut self.backend {
            sw.poll();
        }
    }

    /// Seals the current block and hands it to the writer.
    pub fn seal(&mut self) {
        self.last_seal = Instant::now();
        if self.enc.is_empty() {
            return;
        }
        if self.names.is_some() {
            self.check_version();
            self.name_pending();
        }
        let mut raw = self.enc.take();
        raw.names = std::mem::take(&mut self.block_names);
        raw.ips.append(&mut self.finding_ips);
        (self.named_upto, self.findings_named_upto) = (0, 0);
        raw.epoch = self.seen_epoch;
        let sent_names = !raw.names.is_empty();
        match &mut self.backend {
            Backend::Inline(sw) => sw.write_block(&raw),
            Backend::Thread { tx, .. } => {
                let (events, min_ts) = (u64::from(raw.events), raw.min_ts);
                let msg = ToWriter::Block {
                    raw,
                    queue_dropped: self.queue_dropped,
                    queue_dropped_since: self.queue_dropped_since,
                };
                match tx.try_send(msg) {
                    Ok(()) => self.queue_dropped = 0,
                    Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                        if self.queue_dropped == 0 {
                            self.queue_dropped_since = min_ts;
                        }
                        self.queue_dropped += events;
                        if sent_names {
                            // Its names are lost with it: send them again.
                            self.name_epoch += 1;
                        }
                    }
                }
            }
            Backend::Done => {}
        }
        // A new segment holds none of the names sent so far.
        let w = self.writer_epoch.load(Ordering::Acquire);
        if w != self.seen_epoch {
            self.seen_epoch = w;
            self.name_epoch += 1;
        }
    }

    #[cfg(test)]
    pub(crate) fn push_item_for_test(&mut self, item: &super::format::Item) {
        self.enc.push_item(item);
    }

    #[cfg(test)]
    pub(crate) fn raw_for_test(&mut self, tag: u64, body: &[u8]) {
        self.enc.push_raw(tag, body);
    }

    /// What the writer has to say since the last call.
    pub fn take_notices(&mut self) -> Vec<Notice> {
        match &mut self.backend {
            Backend::Inline(sw) => sw.take_notices(),
            Backend::Thread { notices, .. } => notices.try_iter().collect(),
            Backend::Done => Vec::new(),
        }
    }

    /// Seals and writes everything, waits for the writer, fsyncs.
    pub fn finish(mut self) -> RecorderSummary {
        self.finish_inner()
    }

    fn finish_inner(&mut self) -> RecorderSummary {
        self.seal();
        match std::mem::replace(&mut self.backend, Backend::Done) {
            Backend::Inline(mut sw) => {
                sw.queue_dropped(self.queue_dropped, self.queue_dropped_since);
                sw.finish()
            }
            Backend::Thread { tx, handle, .. } => {
                if self.queue_dropped > 0 {
                    let _ = tx.send(ToWriter::Block {
                        raw: RawBlock::default(),
                        queue_dropped: self.queue_dropped,
                        queue_dropped_since: self.queue_dropped_since,
                    });
                }
                let _ = tx.send(ToWriter::Finish);
                drop(tx);
                handle.join().unwrap_or_default()
            }
            Backend::Done => RecorderSummary::default(),
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if !matches!(self.backend, Backend::Done) {
            self.finish_inner();
        }
    }
}

fn writer_thread(
    mut sw: SegmentWriter,
    rx: Receiver<ToWriter>,
    notices: mpsc::Sender<Notice>,
) -> RecorderSummary {
    loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(ToWriter::Start(ctx)) => {
                if let Err(e) = sw.start(*ctx) {
                    eprintln!("ktrace: cannot start the recording: {e}");
                }
            }
            Ok(ToWriter::Block {
                raw,
                queue_dropped,
                queue_dropped_since,
            }) => {
                sw.queue_dropped(queue_dropped, queue_dropped_since);
                sw.write_block(&raw);
            }
            Ok(ToWriter::Finish) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => sw.poll(),
        }
        for n in sw.take_notices() {
            let _ = notices.send(n);
        }
    }
    sw.finish()
}
