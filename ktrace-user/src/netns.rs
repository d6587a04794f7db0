//! Names for network namespace inodes: `ip netns` names under /run/netns,
//! "host" for PID 1's namespace, "self" for ktrace's own when unnamed.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;

#[derive(Debug, Default, Clone)]
pub struct NetnsNames {
    names: HashMap<u32, String>,
}

impl NetnsNames {
    /// Reads /run/netns now; call [`NetnsNames::refresh`] to pick up new ones.
    pub fn load() -> NetnsNames {
        let mut n = NetnsNames::default();
        n.refresh();
        n
    }

    pub fn refresh(&mut self) {
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
        self.names.get(&inum).map(String::as_str)
    }

    /// Inode of the namespace this process runs in.
    pub fn current() -> Option<u32> {
        std::fs::metadata("/proc/self/ns/net")
            .ok()
            .map(|m| m.ino() as u32)
    }
}
