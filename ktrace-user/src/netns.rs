//! Names for network namespace inodes: `ip netns` names under /run/netns,
//! "host" for PID 1's namespace, "self" for ktrace's own when unnamed.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;

#[derive(Debug, Default, Clone)]
pub struct NetnsNames {
    names: HashMap<u32, String>,
    /// A lookup found no name since the last refresh (a new namespace?).
    missed: std::cell::Cell<bool>,
    last_refresh: Option<std::time::Instant>,
}

impl NetnsNames {
    /// Reads /run/netns now; call [`NetnsNames::refresh`] to pick up new ones.
    pub fn load() -> NetnsNames {
        let mut n = NetnsNames::default();
        n.refresh();
        n
    }

    /// Re-reads the names when a lookup missed, at most once a second: a
    /// node with many namespaces should not be scanned five times a second.
    pub fn refresh_if_missed(&mut self) {
        let due = self
            .last_refresh
            .is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1));
        if self.missed.get() && due {
            self.refresh();
        }
    }

    /// Reads the names anew (namespaces deleted since are forgotten).
    pub fn refresh(&mut self) {
        self.missed.set(false);
        self.last_refresh = Some(std::time::Instant::now());
        self.names.clear();
        if let Ok(dir) = std::fs::read_dir("/run/netns") {
            for entry in dir.flatten() {
                if let Ok(meta) = std::fs::metadata(entry.path()) {
                    self.names.insert(
                        meta.ino() as u32,
                        entry.file_name().to_string_lossy().into_owned(),
                    );
                }
            }
        }
        // PID 1's namespace is the host's (when this process may look at it);
        // otherwise name ktrace's own namespace.
        if let Ok(meta) = std::fs::metadata("/proc/1/ns/net") {
            self.names
                .entry(meta.ino() as u32)
                .or_insert_with(|| "host".to_string());
        } else if let Some(me) = Self::current() {
            self.names.entry(me).or_insert_with(|| "self".to_string());
        }
    }

    /// Adds a name (replay restores the names a recording kept).
    pub fn insert(&mut self, inum: u32, name: String) {
        self.names.insert(inum, name);
    }

    pub fn name(&self, inum: u32) -> Option<&str> {
        let n = self.names.get(&inum).map(String::as_str);
        if n.is_none() {
            self.missed.set(true);
        }
        n
    }

    /// Inode of the namespace this process runs in.
    pub fn current() -> Option<u32> {
        std::fs::metadata("/proc/self/ns/net")
            .ok()
            .map(|m| m.ino() as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_reread_only_after_a_miss_and_stale_ones_go() {
        let mut n = NetnsNames::default();
        n.insert(u32::MAX - 1, "stale".into());
        assert_eq!(n.name(u32::MAX - 1), Some("stale"));
        n.refresh_if_missed();
        assert_eq!(n.name(u32::MAX - 1), Some("stale"), "no miss, no re-read");
        assert_eq!(n.name(u32::MAX - 2), None);
        n.refresh_if_missed();
        assert_eq!(
            n.name(u32::MAX - 1),
            None,
            "re-read after a miss forgets stale names"
        );
    }
}
