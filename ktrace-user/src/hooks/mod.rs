//! Loading the eBPF object and attaching, for each hook, the best mechanism
//! the running kernel offers, decided from tracefs, kallsyms and BTF (never
//! from the version number). Every hook ends with a [`HookStatus`] that says
//! what is live and, for what is not, why.

use std::borrow::Cow;
use std::path::Path;

use aya::{Ebpf, EbpfLoader};
use ktrace_common::{KernelLayout, TpFields};

use crate::decode::Names;
use crate::layout::{self, KernelBtf};
use crate::support::KernelSupport;
use crate::tracefs::Format;

mod attach;
mod conntrack;
mod ipvs;
mod reset;

/// The eBPF object built by `build.rs` (empty when the eBPF toolchain was missing).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ktrace.bpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error(
        "this ktrace was built without its eBPF object (the eBPF toolchain was missing); \
         run scripts/setup.sh, then cargo build --release"
    )]
    NoObject,
    #[error("ktrace must run as root (it needs CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN): run it with sudo")]
    NotRoot,
    #[error("the kernel refused the eBPF object: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("no hook could attach on this kernel ({0})")]
    NothingAttached(String),
}

/// Whether and how one hook is live. A recording stores it as is (JSON in
/// its header); names are borrowed live and owned when read back.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HookStatus {
    /// Contract name: `tcp_send_reset`, `ct_invalid`, ...
    pub name: Cow<'static, str>,
    /// `tracepoint`, `kprobe`, `kretprobe`, `ctnetlink` or `none`.
    pub mechanism: Cow<'static, str>,
    pub attached: bool,
    /// Kernel function(s) or tracepoint used.
    #[serde(default)]
    pub target: String,
    /// Why it is not attached, or what it cannot see on this kernel.
    #[serde(default)]
    pub reason: Option<String>,
}

impl HookStatus {
    fn live(name: &'static str, mechanism: &'static str, target: impl Into<String>) -> Self {
        HookStatus {
            name: name.into(),
            mechanism: mechanism.into(),
            attached: true,
            target: target.into(),
            reason: None,
        }
    }

    pub fn off(name: &'static str, reason: impl Into<String>) -> Self {
        HookStatus {
            name: name.into(),
            mechanism: "none".into(),
            attached: false,
            target: String::new(),
            reason: Some(reason.into()),
        }
    }
}

/// The loaded object and what is attached. Dropping it detaches everything.
pub struct Attached {
    pub ebpf: Ebpf,
    pub status: Vec<HookStatus>,
    pub names: Names,
    /// Whether a kernel hook feeds NAT mappings (otherwise ctnetlink must).
    pub nat_from_kernel: bool,
    pub support: KernelSupport,
    /// The kernel side's log; must outlive the programs and be drained.
    pub logger: Option<KernelLogger>,
    /// What was done about RLIMIT_MEMLOCK (see [`crate::memlock`]).
    pub memlock: String,
}

pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

pub struct LoadOptions {
    pub ring_buffer_bytes: u32,
    /// No reset is summarised in the kernel (see [`ktrace_common::ResetSummary`]).
    pub every_reset: bool,
}

fn read_format(support: &KernelSupport, cat: &str, name: &str) -> Option<Format> {
    let path = support.tracepoint_format(cat, name)?;
    std::fs::read_to_string(path)
        .ok()
        .map(|t| Format::parse(&t))
}

/// Mounts tracefs when it is not (tracepoints need it). By the syscall,
/// not mount(8): the container image holds no other binary than ktrace.
fn ensure_tracefs() {
    if !Path::new("/sys/kernel/tracing/events").is_dir() {
        // SAFETY: NUL-terminated constant strings and no data argument.
        let r = unsafe {
            libc::mount(
                c"tracefs".as_ptr(),
                c"/sys/kernel/tracing".as_ptr(),
                c"tracefs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if r != 0 {
            tracing::debug!(
                "mounting tracefs at /sys/kernel/tracing: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Root, or the capabilities eBPF tracing needs (a DaemonSet may grant
/// CAP_BPF + CAP_PERFMON + CAP_NET_ADMIN without running as uid 0).
fn has_bpf_privileges() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        // SAFETY: geteuid has no preconditions.
        return unsafe { libc::geteuid() } == 0;
    };
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |c: u32| eff & (1u64 << c) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

/// Loads the object with this kernel's layouts and attaches every hook it can.
pub fn load_and_attach(opts: &LoadOptions) -> Result<Attached, HookError> {
    if EBPF_OBJECT.is_empty() {
        return Err(HookError::NoObject);
    }
    if !has_bpf_privileges() {
        return Err(HookError::NotRoot);
    }
    ensure_tracefs();
    let support = &KernelSupport::probe_live();
    let kbtf = KernelBtf::load(Path::new("/")).ok();
    let kernel = Kernel::read(support, kbtf.as_ref());
    let names = reset_reason_names(&kernel, kbtf.as_ref());
    // The parsed BTF (tens of MB) is not needed past this point: free it
    // before aya parses its own copy to load the object.
    drop(kbtf);
    crate::memory::release_freed();
    let memlock = crate::memlock::prepare(support.release.as_deref());
    let (summary, summary_status) = reset::summary_setting(opts.every_reset, &kernel.layout);
    let mut ebpf = load_object(&kernel, opts, &summary)?;
    // Kernel-side warnings (aya-log) go to ktrace's log on stderr. Started
    // before any program loads, and kept alive with the object.
    let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::debug!("no kernel-side log: {e}");
            None
        }
    };

    let mut status = vec![
        reset::send(&mut ebpf, &kernel),
        summary_status,
        reset::receive(&mut ebpf, &kernel),
    ];
    status.extend(conntrack::attach(&mut ebpf, &kernel));
    status.push(ipvs::conn_new(&mut ebpf, &kernel));

    if !status.iter().any(|s| s.attached) {
        let why: Vec<String> = status
            .iter()
            .map(|s| format!("{}: {}", s.name, s.reason.clone().unwrap_or_default()))
            .collect();
        return Err(HookError::NothingAttached(why.join("; ")));
    }
    let nat_from_kernel = status.iter().any(|s| s.name == "nat_mapping" && s.attached);
    Ok(Attached {
        ebpf,
        status,
        names,
        nat_from_kernel,
        support: support.clone(),
        logger,
        memlock,
    })
}

const NO_BTF: &str = "no BTF at /sys/kernel/btf/vmlinux: kernel struct offsets unknown";

/// What the hook families need to know of the running kernel.
struct Kernel<'a> {
    support: &'a KernelSupport,
    layout: KernelLayout,
    has_btf: bool,
    /// Socket and packet offsets missing from BTF (every hook needs them).
    base_missing: Vec<&'static str>,
    /// Conntrack offsets missing from BTF.
    ct_missing: Vec<&'static str>,
    send_fmt: Option<Format>,
    recv_fmt: Option<Format>,
    send_tp: TpFields,
    recv_tp: TpFields,
}

impl<'a> Kernel<'a> {
    fn read(support: &'a KernelSupport, kbtf: Option<&KernelBtf>) -> Kernel<'a> {
        let mut layout = kbtf.map_or(KernelLayout::UNKNOWN, layout::kernel_layout);
        let send_fmt = read_format(support, "tcp", "tcp_send_reset");
        // The tracepoint carries `reason` (6.10+) exactly when its TP_PROTO does.
        layout.send_reset_tp_has_reason = u32::from(
            send_fmt
                .as_ref()
                .is_some_and(|f| f.fields.contains_key("reason")),
        );
        // One precise clock read per tick and CPU (see ktrace-ebpf's ring.rs).
        layout.tick_clock = u32::from(support.has_symbol("bpf_jiffies64"));
        let recv_fmt = read_format(support, "tcp", "tcp_receive_reset");
        let tp_fields = |f: &Option<Format>| f.as_ref().map_or(TpFields::ABSENT, Format::tp_fields);
        Kernel {
            support,
            has_btf: kbtf.is_some(),
            base_missing: layout::missing_base_fields(&layout),
            ct_missing: layout::missing_conntrack_fields(&layout),
            send_tp: tp_fields(&send_fmt),
            recv_tp: tp_fields(&recv_fmt),
            layout,
            send_fmt,
            recv_fmt,
        }
    }

    /// The raw tracepoints read the socket and packet through BTF offsets.
    fn raw_tracepoint_ok(&self) -> bool {
        self.base_missing.is_empty() && self.layout.sk_family != ktrace_common::NO_OFFSET
    }
}

/// Reset reason names, from the tracepoint's format or else from BTF.
fn reset_reason_names(k: &Kernel, kbtf: Option<&KernelBtf>) -> Names {
    let mut names = Names::default();
    if let Some(t) = k.send_fmt.as_ref().and_then(|f| f.symbols.get("reason")) {
        names.reset_reasons = t.iter().map(|(&v, n)| (v, n.as_str().into())).collect();
    } else if let Some(b) = kbtf {
        for (v, n) in layout::enum_names(&b.vmlinux, "sk_rst_reason") {
            let short = n.strip_prefix("SK_RST_REASON_").unwrap_or(&n).into();
            names.reset_reasons.insert(v, short);
        }
    }
    names
}

/// Loads the object with this kernel's layouts patched into its globals.
fn load_object(
    k: &Kernel,
    opts: &LoadOptions,
    summary: &ktrace_common::ResetSummary,
) -> Result<Ebpf, HookError> {
    EbpfLoader::new()
        .override_global("LAYOUT", &k.layout, true)
        .override_global("RESET_SUMMARY", summary, true)
        .override_global("TP_SEND_RESET", &k.send_tp, true)
        .override_global("TP_RECEIVE_RESET", &k.recv_tp, true)
        .map_max_entries("EVENTS", opts.ring_buffer_bytes)
        .load(EBPF_OBJECT)
        .map_err(|e| {
            let text = e.to_string();
            if text.contains("Operation not permitted") || text.contains("EPERM") {
                HookError::NotRoot
            } else {
                HookError::Load(e)
            }
        })
}
