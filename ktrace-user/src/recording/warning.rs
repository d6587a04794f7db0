//! What a reader says about the parts of a recording it could not read
//! (a torn tail, corrupt bytes, unknown or bad records): shared by the
//! reader that finds them and the batches that carry them to replay.

use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarningKind {
    /// The file ends inside a block (a crash while writing it).
    TornTail,
    /// Bytes that are not a valid block, skipped.
    Corrupt,
    /// Records of a type this ktrace does not know, skipped.
    UnknownRecord,
    /// Known records that did not decode, skipped.
    BadRecord,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub path: PathBuf,
    pub offset: u64,
    pub kind: WarningKind,
    pub message: String,
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.message)
    }
}
