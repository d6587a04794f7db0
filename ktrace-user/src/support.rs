//! What the running kernel offers ktrace: BTF, kprobes, fentry, tracepoints,
//! the symbols it hooks and the modules they live in. Read from files under
//! a root directory (normally `/`), so `doctor --root` can audit a dump.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Kernel functions ktrace may probe, looked up in `/proc/kallsyms`.
pub const PROBED_SYMBOLS: &[&str] = &[
    "tcp_v4_send_reset",
    "tcp_v6_send_reset",
    "nf_conntrack_tcp_packet",
    "nf_ct_l4proto_log_invalid",
    "nf_l4proto_log_invalid",
    "init_conntrack",
    // Table-full fallback where init_conntrack was inlined or cloned.
    "__nf_conntrack_alloc",
    "nf_nat_setup_info",
    "ip_vs_conn_new",
    // The conntrack insert race (a packet losing it is dropped here).
    "__nf_conntrack_confirm",
];

/// Kernel functions ktrace looks up without hooking them: their presence
/// changes what the programs do (bpf_jiffies64, 5.5+, lets them reuse a
/// tick's time), their absence loses no hook.
pub const HELPER_SYMBOLS: &[&str] = &["bpf_jiffies64"];

/// Tracepoints ktrace may attach, as `(category, name)`.
pub const TRACEPOINTS: &[(&str, &str)] = &[("tcp", "tcp_send_reset"), ("tcp", "tcp_receive_reset")];

#[derive(Debug, Clone)]
pub struct KernelSupport {
    pub root: PathBuf,
    /// `uname -r`, when readable.
    pub release: Option<String>,
    pub btf_vmlinux: bool,
    /// The kprobe PMU or tracefs `kprobe_events` exists.
    pub kprobes: bool,
    /// BPF tracing programs (fentry/fexit) load. `None` when not probed
    /// (offline audits cannot know).
    pub fentry: Option<bool>,
    /// tracefs directory with an `events/` folder, if one is mounted.
    pub tracefs: Option<PathBuf>,
    /// Tracepoints present, as `category/name`.
    pub tracepoints: HashSet<String>,
    /// Which of [`PROBED_SYMBOLS`] and [`HELPER_SYMBOLS`] are in kallsyms.
    pub symbols: HashSet<String>,
    /// Whether kallsyms could be read at all (it is empty to non-root).
    pub kallsyms_readable: bool,
    /// Whether its first line is `ADDRESS TYPE NAME` (hex address, one
    /// letter type): a dump may hold some other file under that name.
    pub kallsyms_well_formed: bool,
    pub ip_vs_loaded: bool,
    pub ip_vs_btf: bool,
    pub nf_conntrack_loaded: bool,
}

impl KernelSupport {
    /// Reads what the kernel under `root` supports, without side effects.
    pub fn probe(root: &Path) -> KernelSupport {
        let p = |rel: &str| root.join(rel.trim_start_matches('/'));
        let release = std::fs::read_to_string(p("/proc/sys/kernel/osrelease"))
            .ok()
            .map(|s| s.trim().to_string());
        let tracefs = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .iter()
            .map(|d| p(d))
            .find(|d| d.join("events").is_dir());
        let mut tracepoints = HashSet::new();
        if let Some(dir) = &tracefs {
            for (cat, name) in TRACEPOINTS {
                if dir.join("events").join(cat).join(name).is_dir() {
                    tracepoints.insert(format!("{cat}/{name}"));
                }
            }
        }
        let kprobes = p("/sys/bus/event_source/devices/kprobe").exists()
            || tracefs
                .as_ref()
                .is_some_and(|d| d.join("kprobe_events").exists());
        let kallsyms = read_kallsyms(&p("/proc/kallsyms"));
        KernelSupport {
            root: root.to_path_buf(),
            release,
            btf_vmlinux: p("/sys/kernel/btf/vmlinux").exists(),
            kprobes,
            fentry: None,
            tracefs,
            tracepoints,
            symbols: kallsyms.symbols,
            kallsyms_readable: kallsyms.readable,
            kallsyms_well_formed: kallsyms.well_formed,
            ip_vs_loaded: p("/sys/module/ip_vs").exists(),
            ip_vs_btf: p("/sys/kernel/btf/ip_vs").exists(),
            nf_conntrack_loaded: p("/sys/module/nf_conntrack").exists(),
        }
    }

    /// [`KernelSupport::probe`] of `/`, plus a live check that BPF tracing
    /// programs (fentry) can be loaded.
    pub fn probe_live() -> KernelSupport {
        let mut s = KernelSupport::probe(Path::new("/"));
        s.fentry = Some(
            s.btf_vmlinux
                && aya::sys::is_program_supported(aya::programs::ProgramType::Tracing)
                    .unwrap_or(false),
        );
        s
    }

    pub fn has_tracepoint(&self, category: &str, name: &str) -> bool {
        self.tracepoints.contains(&format!("{category}/{name}"))
    }

    pub fn has_symbol(&self, name: &str) -> bool {
        self.symbols.contains(name)
    }

    /// The tracepoint's `format` file, when tracefs is mounted.
    pub fn tracepoint_format(&self, category: &str, name: &str) -> Option<PathBuf> {
        self.tracefs
            .as_ref()
            .map(|d| d.join("events").join(category).join(name).join("format"))
    }
}

/// What one read of kallsyms says, for [`KernelSupport`].
#[derive(Default)]
struct Kallsyms {
    /// Which of [`PROBED_SYMBOLS`] and [`HELPER_SYMBOLS`] it lists
    /// (functions only, `t`/`T`).
    symbols: HashSet<String>,
    /// Whether it had any readable (non-zero) address at all.
    readable: bool,
    /// Whether its first line is `ADDRESS TYPE NAME`.
    well_formed: bool,
}

/// Reads kallsyms once for everything [`KernelSupport`] keeps of it.
/// Not `aya::util::kernel_symbols`: it reads only the live `/proc/kallsyms`
/// (doctor --root audits dumps), keys by address (all 0 to non-root, so one
/// entry survives), ignores the symbol type and keeps `\t[module]` in names.
fn read_kallsyms(path: &Path) -> Kallsyms {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Kallsyms::default();
    };
    let mut found = HashSet::new();
    let mut readable = false;
    for line in text.lines() {
        let mut parts = line.split_ascii_whitespace();
        let (Some(addr), Some(ty), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if !readable && addr.bytes().any(|b| b != b'0') {
            readable = true;
        }
        if matches!(ty, "t" | "T") {
            // Compiler clones (e.g. `init_conntrack.constprop.0`) are not the
            // function's entry point: only exact names count.
            let wanted = PROBED_SYMBOLS.iter().chain(HELPER_SYMBOLS);
            if let Some(sym) = wanted.into_iter().find(|s| **s == name) {
                found.insert(sym.to_string());
            }
        }
    }
    Kallsyms {
        readable: readable || !found.is_empty(),
        well_formed: text.lines().next().is_some_and(is_kallsyms_line),
        symbols: found,
    }
}

/// Whether `line` is `ADDRESS TYPE NAME` (hex address, one letter type).
fn is_kallsyms_line(line: &str) -> bool {
    let mut w = line.split_whitespace();
    matches!(
        (w.next(), w.next(), w.next()),
        (Some(a), Some(t), Some(_))
            if !a.is_empty() && a.bytes().all(|b| b.is_ascii_hexdigit()) && t.len() == 1
    )
}

/// `major.minor` of a kernel release string (`6.1.0-18-amd64` → (6, 1)).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_distribution_releases() {
        assert_eq!(kernel_version("5.10.0-28-amd64"), Some((5, 10)));
        assert_eq!(kernel_version("6.18.44-fc-v769"), Some((6, 18)));
        assert_eq!(kernel_version("4.18.0-553.el8_10.x86_64"), Some((4, 18)));
        assert_eq!(kernel_version("garbage"), None);
    }

    #[test]
    fn probe_reads_a_fixture_root() {
        let dir = std::env::temp_dir().join(format!("ktrace-support-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("proc/sys/kernel")).unwrap();
        std::fs::create_dir_all(dir.join("sys/kernel/tracing/events/tcp/tcp_send_reset")).unwrap();
        std::fs::create_dir_all(dir.join("sys/bus/event_source/devices/kprobe")).unwrap();
        std::fs::create_dir_all(dir.join("sys/module/ip_vs")).unwrap();
        std::fs::write(dir.join("proc/sys/kernel/osrelease"), "6.1.0-56-amd64\n").unwrap();
        std::fs::write(
            dir.join("proc/kallsyms"),
            "ffffffff81000000 t tcp_v4_send_reset\nffffffff81000010 t init_conntrack.constprop.0\nffffffffc0000000 t ip_vs_conn_new\t[ip_vs]\n",
        )
        .unwrap();
        let s = KernelSupport::probe(&dir);
        assert_eq!(s.release.as_deref(), Some("6.1.0-56-amd64"));
        assert!(s.kprobes);
        assert!(s.has_tracepoint("tcp", "tcp_send_reset"));
        assert!(!s.has_tracepoint("tcp", "tcp_receive_reset"));
        assert!(s.has_symbol("tcp_v4_send_reset"));
        assert!(s.has_symbol("ip_vs_conn_new"));
        assert!(
            !s.has_symbol("init_conntrack"),
            "a .constprop clone is not the symbol"
        );
        assert!(s.ip_vs_loaded && !s.ip_vs_btf && !s.btf_vmlinux);
        assert!(s.kallsyms_readable && s.kallsyms_well_formed);
        // Some other file saved under that name: readable, not kallsyms.
        std::fs::write(
            dir.join("proc/kallsyms"),
            "symbols of the node\nffffffff81000000 t tcp_v4_send_reset\n",
        )
        .unwrap();
        let s = KernelSupport::probe(&dir);
        assert!(s.kallsyms_readable && !s.kallsyms_well_formed);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
