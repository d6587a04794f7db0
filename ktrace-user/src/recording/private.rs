//! Owner-only recording files. A recording holds every client and backend
//! address of the node, so it is created 0600 (its directory, when ktrace
//! makes it, 0700), and it is never written through a symbolic link or into
//! a file someone else owns: in a shared directory such as /tmp another
//! user could plant `PATH` as a link to a file of root's, or pre-create it
//! to read what is recorded.

use std::fs::{File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates the directory of `path` (and its parents) owner-only, if missing.
pub fn create_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.exists() => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir),
        _ => Ok(()),
    }
}

/// Refuses `path` when it is a symbolic link (checked before anything is
/// read or renamed; [`open`] refuses one planted later).
pub fn refuse_symlink(path: &Path) -> io::Result<()> {
    match path.symlink_metadata() {
        Ok(m) if m.file_type().is_symlink() => Err(symlink_error(path)),
        _ => Ok(()),
    }
}

fn symlink_error(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{} is a symbolic link: a recording is never written through one (in a shared directory it could point anywhere); give the real path",
            path.display()
        ),
    )
}

/// Opens `path` for writing, creating it 0600; never follows a symbolic
/// link, refuses a file of another user or with other hard links, and
/// takes group/other permissions off a file of ours. `truncate` empties it
/// only after these checks.
pub fn open(path: &Path, truncate: bool) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => symlink_error(path),
            _ => e,
        })?;
    let meta = file.metadata()?;
    let refuse = |why: String| {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{}: {why}; refusing to record into it", path.display()),
        ))
    };
    if !meta.file_type().is_file() {
        return refuse("not a regular file".into());
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return refuse(format!(
            "owned by uid {}, not by this user (uid {me}), who could read it",
            meta.uid()
        ));
    }
    if meta.nlink() > 1 {
        return refuse(format!(
            "it has {} hard links (one may be planted)",
            meta.nlink()
        ));
    }
    if meta.mode() & 0o077 != 0 {
        file.set_permissions(Permissions::from_mode(0o600))?;
    }
    if truncate {
        file.set_len(0)?;
    }
    Ok(file)
}
