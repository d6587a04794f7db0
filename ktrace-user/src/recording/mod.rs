//! Recordings: every event the live pipeline sees, written continuously to
//! a compact, checksummed, rotated file set that `ktrace replay` reads back
//! through the same engine and renderer as `watch`. The `record` command
//! itself is [`crate::record`].
//!
//! - [`format`]: the bytes (file header, block frames, records).
//! - [`names`]: which Kubernetes names a block carries (once per segment).
//! - [`writer`]: encoding, compression, rotation, retention, disk-full handling.
//! - [`private`]: owner-only files that never follow a planted symlink.
//! - [`reader`]: reading back, tolerant of torn tails and corrupt blocks.
//! - [`batch`]: a block read back as a batch (events apart, for the engine).
//! - [`read_ahead`]: decoding the next blocks on another thread.
//!
//! `docs/recording-format.md` describes the format for other readers.

pub mod batch;
pub mod format;
pub mod names;
pub mod private;
pub mod read_ahead;
pub mod reader;
pub mod warning;
pub mod writer;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::clock::WallClock;
use crate::engine::EngineConfig;
use crate::hooks::HookStatus;
use crate::output::StatusInfo;

pub use batch::{Batch, Part};
pub use format::Item;
pub use reader::{FileReader, OpenError};
pub use warning::Warning;
pub use writer::{Recorder, RecorderSummary, RotationConfig};

/// What a file header says about the recording: enough to interpret its
/// events on another machine. Stored as JSON (self-describing; unknown keys
/// are ignored, so newer writers may add keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Context {
    /// Always "ktrace-recording".
    pub format: String,
    /// `major.minor` of the binary format (also in the fixed header).
    pub format_version: String,
    pub ktrace_version: String,
    /// `record` or `watch`.
    #[serde(default)]
    pub command: String,
    pub host: String,
    #[serde(default)]
    pub kernel: Option<String>,
    /// `/proc/sys/kernel/random/boot_id`: event timestamps are
    /// CLOCK_MONOTONIC of this boot.
    #[serde(default)]
    pub boot_id: Option<String>,
    /// CLOCK_REALTIME - CLOCK_MONOTONIC, ns, measured when the recording started.
    pub wall_offset_ns: i64,
    /// Random id shared by every segment of one recording.
    pub recording_id: String,
    /// 0 for the first file of the recording, then 1, 2, ... per rotation.
    pub segment: u64,
    /// Monotonic ns when the recording started (and this segment did).
    pub started_mono_ns: u64,
    #[serde(default)]
    pub segment_started_mono_ns: u64,
    pub ring_buffer_bytes: u32,
    #[serde(default)]
    pub netns: Option<u32>,
    /// `ip netns` names known at start (inode -> name).
    #[serde(default)]
    pub netns_names: BTreeMap<u32, String>,
    pub hooks: Vec<HookStatus>,
    /// The engine settings the recording ran with, so replay correlates
    /// with the same thresholds and quotes the same node settings.
    pub engine: EngineConfig,
}

impl Context {
    pub fn clock(&self) -> WallClock {
        WallClock {
            offset_ns: i128::from(self.wall_offset_ns),
        }
    }

    pub fn hook_status(&self) -> Vec<HookStatus> {
        self.hooks.clone()
    }
}

/// This host's name (`/proc/sys/kernel/hostname`).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

/// `ip netns` names now (what `NetnsNames` shows live), to store with the recording.
pub fn netns_names_now() -> BTreeMap<u32, String> {
    use std::os::unix::fs::MetadataExt;
    let mut m = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir("/run/netns") {
        for e in dir.flatten() {
            if let Ok(meta) = std::fs::metadata(e.path()) {
                m.insert(
                    meta.ino() as u32,
                    e.file_name().to_string_lossy().into_owned(),
                );
            }
        }
    }
    if let Ok(meta) = std::fs::metadata("/proc/1/ns/net") {
        m.entry(meta.ino() as u32)
            .or_insert_with(|| "host".to_string());
    }
    m
}

fn random_id() -> String {
    let mut b = [0u8; 8];
    let got = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_ok();
    let v = if got {
        u64::from_le_bytes(b)
    } else {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        t ^ (u64::from(std::process::id()) << 32)
    };
    format!("{v:016x}")
}

/// Builds the context of a recording that starts now.
#[allow(clippy::too_many_arguments)]
pub fn live_context(
    command: &str,
    status: &[HookStatus],
    info: &StatusInfo,
    clock: WallClock,
    engine: &EngineConfig,
    now_mono_ns: u64,
) -> Context {
    Context {
        format: "ktrace-recording".into(),
        format_version: format!("{}.{}", format::VERSION_MAJOR, format::VERSION_MINOR),
        ktrace_version: env!("CARGO_PKG_VERSION").into(),
        command: command.into(),
        host: host_name(),
        kernel: info.kernel.map(str::to_string),
        boot_id: boot_id(),
        wall_offset_ns: i64::try_from(clock.offset_ns).unwrap_or(0),
        recording_id: random_id(),
        segment: 0,
        started_mono_ns: now_mono_ns,
        segment_started_mono_ns: now_mono_ns,
        ring_buffer_bytes: info.ring_buffer_bytes,
        netns: info.netns,
        netns_names: netns_names_now(),
        hooks: status.to_vec(),
        engine: engine.clone(),
    }
}
