//! Loading the eBPF object and attaching, for each hook, the best mechanism
//! the running kernel offers, decided from tracefs, kallsyms and BTF (never
//! from the version number). Every hook ends with a [`HookStatus`] that says
//! what is live and, for what is not, why.

use std::path::Path;

use aya::programs::{FEntry, KProbe, RawTracePoint, TracePoint};
use aya::{Ebpf, EbpfLoader};
use ktrace_common::{KernelLayout, TpFields, NO_FIELD};

use crate::decode::Names;
use crate::layout::{self, KernelBtf};
use crate::support::KernelSupport;
use crate::tracefs::Format;

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

/// Whether and how one hook is live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookStatus {
    /// Contract name: `tcp_send_reset`, `ct_invalid`, ...
    pub name: &'static str,
    /// `tracepoint`, `kprobe`, `kretprobe`, `ctnetlink` or `none`.
    pub mechanism: &'static str,
    pub attached: bool,
    /// Kernel function(s) or tracepoint used.
    pub target: String,
    /// Why it is not attached, or what it cannot see on this kernel.
    pub reason: Option<String>,
}

impl HookStatus {
    fn live(name: &'static str, mechanism: &'static str, target: impl Into<String>) -> Self {
        HookStatus {
            name,
            mechanism,
            attached: true,
            target: target.into(),
            reason: None,
        }
    }

    fn off(name: &'static str, reason: impl Into<String>) -> Self {
        HookStatus {
            name,
            mechanism: "none",
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
}

pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

pub struct LoadOptions {
    pub ring_buffer_bytes: u32,
}

fn read_format(support: &KernelSupport, cat: &str, name: &str) -> Option<Format> {
    let path = support.tracepoint_format(cat, name)?;
    std::fs::read_to_string(path)
        .ok()
        .map(|t| Format::parse(&t))
}

/// Mounts tracefs when it is not (tracepoints need it).
fn ensure_tracefs() {
    if !Path::new("/sys/kernel/tracing/events").is_dir() {
        let _ = std::process::Command::new("mount")
            .args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"])
            .status();
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

const NO_KPROBES: &str =
    "kprobes not supported by this kernel (no /sys/bus/event_source/devices/kprobe)";

/// Why a kprobe on `sym` cannot be used, if it cannot.
fn kprobe_blocker(support: &KernelSupport, sym: &str) -> Option<String> {
    if !support.kprobes {
        Some(NO_KPROBES.to_string())
    } else if !support.has_symbol(sym) {
        Some(format!(
            "{sym} is not in /proc/kallsyms (inlined, or its module is not loaded)"
        ))
    } else {
        None
    }
}

/// The program `prog` of the object, as its concrete type.
fn program<'a, T>(ebpf: &'a mut Ebpf, prog: &str) -> Result<&'a mut T, String>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(prog)
        .ok_or_else(|| format!("program {prog} missing from the object"))?
        .try_into()
        .map_err(|e| format!("{e}"))
}

fn refused(prog: &str, e: impl std::fmt::Display) -> String {
    format!("verifier refused {prog}: {e}")
}

fn attach_kprobe(ebpf: &mut Ebpf, prog: &str, func: &str) -> Result<(), String> {
    let p: &mut KProbe = program(ebpf, prog)?;
    p.load().map_err(|e| refused(prog, e))?;
    p.attach(func, 0)
        .map_err(|e| format!("attach to {func} failed: {e}"))?;
    Ok(())
}

/// fentry needs the kernel's BTF for the function's prototype.
fn attach_fentry(ebpf: &mut Ebpf, btf: &aya::Btf, prog: &str, func: &str) -> Result<(), String> {
    let p: &mut FEntry = program(ebpf, prog)?;
    p.load(func, btf).map_err(|e| refused(prog, e))?;
    p.attach()
        .map_err(|e| format!("fentry on {func} failed: {e}"))?;
    Ok(())
}

fn attach_raw_tracepoint(ebpf: &mut Ebpf, prog: &str, name: &str) -> Result<(), String> {
    let p: &mut RawTracePoint = program(ebpf, prog)?;
    p.load().map_err(|e| refused(prog, e))?;
    p.attach(name)
        .map_err(|e| format!("attach to raw tracepoint {name} failed: {e}"))?;
    Ok(())
}

fn attach_tracepoint(ebpf: &mut Ebpf, prog: &str, cat: &str, name: &str) -> Result<(), String> {
    let p: &mut TracePoint = program(ebpf, prog)?;
    p.load().map_err(|e| refused(prog, e))?;
    p.attach(cat, name)
        .map_err(|e| format!("attach to {cat}:{name} failed: {e}"))?;
    Ok(())
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
    let mut klayout = kbtf
        .as_ref()
        .map_or(KernelLayout::UNKNOWN, layout::kernel_layout);
    let send_fmt = read_format(support, "tcp", "tcp_send_reset");
    // The tracepoint carries `reason` (6.10+) exactly when its TP_PROTO does.
    klayout.send_reset_tp_has_reason = u32::from(
        send_fmt
            .as_ref()
            .is_some_and(|f| f.fields.contains_key("reason")),
    );
    // One precise clock read per tick and CPU (see ktrace-ebpf's ring.rs).
    klayout.tick_clock = u32::from(support.has_symbol("bpf_jiffies64"));
    let recv_fmt = read_format(support, "tcp", "tcp_receive_reset");
    let send_tp = send_fmt
        .as_ref()
        .map_or(TpFields::ABSENT, Format::tp_fields);
    let recv_tp = recv_fmt
        .as_ref()
        .map_or(TpFields::ABSENT, Format::tp_fields);

    let mut names = Names::default();
    if let Some(t) = send_fmt.as_ref().and_then(|f| f.symbols.get("reason")) {
        names.reset_reasons = t.clone();
    } else if let Some(b) = &kbtf {
        for (v, n) in layout::enum_names(&b.vmlinux, "sk_rst_reason") {
            let short = n.strip_prefix("SK_RST_REASON_").unwrap_or(&n).to_string();
            names.reset_reasons.insert(v, short);
        }
    }

    let mut ebpf = EbpfLoader::new()
        .override_global("LAYOUT", &klayout, true)
        .override_global("TP_SEND_RESET", &send_tp, true)
        .override_global("TP_RECEIVE_RESET", &recv_tp, true)
        .map_max_entries("EVENTS", opts.ring_buffer_bytes)
        .load(EBPF_OBJECT)
        .map_err(|e| {
            let text = e.to_string();
            if text.contains("Operation not permitted") || text.contains("EPERM") {
                HookError::NotRoot
            } else {
                HookError::Load(e)
            }
        })?;
    // Kernel-side warnings (aya-log) go to ktrace's log on stderr. Started
    // before any program loads, and kept alive with the object.
    let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::debug!("no kernel-side log: {e}");
            None
        }
    };

    let base_missing = layout::missing_base_fields(&klayout);
    let ct_missing = layout::missing_conntrack_fields(&klayout);
    let no_btf = "no BTF at /sys/kernel/btf/vmlinux: kernel struct offsets unknown";
    let mut status = Vec::new();

    // --- RST sent. The 6.10+ tracepoint (reason + sockaddr addresses) sees
    // the no-socket case; older ones fire only with a full socket.
    let tp_full = send_tp.reason != NO_FIELD && send_tp.addr_size == 28;
    let kprobe_v4 = kprobe_blocker(support, "tcp_v4_send_reset");
    // The raw tracepoint reads the tracepoint's arguments without the cost
    // of formatting its record (what a reset storm pays per packet); it needs
    // the socket and packet offsets from BTF.
    let raw_ok = base_missing.is_empty() && klayout.sk_family != ktrace_common::NO_OFFSET;
    if tp_full {
        let raw = if raw_ok {
            attach_raw_tracepoint(&mut ebpf, "raw_tcp_send_reset", "tcp_send_reset")
        } else {
            Err("struct offsets missing from BTF".to_string())
        };
        status.push(match raw {
            Ok(()) => HookStatus::live("tcp_send_reset", "raw_tracepoint", "tcp_send_reset"),
            Err(raw_err) => {
                match attach_tracepoint(&mut ebpf, "tcp_send_reset", "tcp", "tcp_send_reset") {
                    Ok(()) => {
                        let mut st =
                            HookStatus::live("tcp_send_reset", "tracepoint", "tcp:tcp_send_reset");
                        st.reason = Some(format!("raw tracepoint unavailable: {raw_err}"));
                        st
                    }
                    Err(e) => HookStatus::off("tcp_send_reset", e),
                }
            }
        });
    } else if let Some(st) = (support.fentry == Some(true) && base_missing.is_empty())
        .then(aya::Btf::from_sys_fs)
        .and_then(Result::ok)
        .and_then(|btf| {
            // fentry: a BPF trampoline, cheaper than a kprobe, same arguments.
            attach_fentry(
                &mut ebpf,
                &btf,
                "fentry_tcp_v4_send_reset",
                "tcp_v4_send_reset",
            )
            .ok()?;
            let mut st = HookStatus::live("tcp_send_reset", "fentry", "tcp_v4_send_reset");
            match attach_fentry(
                &mut ebpf,
                &btf,
                "fentry_tcp_v6_send_reset",
                "tcp_v6_send_reset",
            ) {
                Ok(()) => st.target.push_str(",tcp_v6_send_reset"),
                Err(e) => st.reason = Some(format!("IPv6 resets not seen: {e}")),
            }
            Some(st)
        })
    {
        status.push(st);
    } else if kprobe_v4.is_none() && base_missing.is_empty() {
        let mut st = match attach_kprobe(&mut ebpf, "tcp_v4_send_reset", "tcp_v4_send_reset") {
            Ok(()) => HookStatus::live("tcp_send_reset", "kprobe", "tcp_v4_send_reset"),
            Err(e) => HookStatus::off("tcp_send_reset", e),
        };
        if st.attached && support.has_symbol("tcp_v6_send_reset") {
            match attach_kprobe(&mut ebpf, "tcp_v6_send_reset", "tcp_v6_send_reset") {
                Ok(()) => st.target.push_str(",tcp_v6_send_reset"),
                Err(e) => st.reason = Some(format!("IPv6 resets not seen: {e}")),
            }
        }
        status.push(st);
    } else if send_fmt.is_some() {
        let mut st = match attach_tracepoint(&mut ebpf, "tcp_send_reset", "tcp", "tcp_send_reset") {
            Ok(()) => HookStatus::live("tcp_send_reset", "tracepoint", "tcp:tcp_send_reset"),
            Err(e) => HookStatus::off("tcp_send_reset", e),
        };
        if st.attached {
            st.reason = Some(format!(
                "this kernel's tcp_send_reset tracepoint fires only with a full socket: \
                 no-socket resets (answers to un-NATed replies) are not seen; kprobe fallback: {}",
                kprobe_v4.unwrap_or_else(|| format!(
                    "struct offsets missing: {}",
                    base_missing.join(", ")
                ))
            ));
        }
        status.push(st);
    } else {
        status.push(HookStatus::off(
            "tcp_send_reset",
            format!(
                "no tcp:tcp_send_reset tracepoint (tracefs not mounted?) and {}",
                kprobe_v4.unwrap_or_else(|| no_btf.to_string())
            ),
        ));
    }

    // --- RST received.
    status.push(if recv_fmt.is_some() {
        let raw = if raw_ok {
            attach_raw_tracepoint(&mut ebpf, "raw_tcp_receive_reset", "tcp_receive_reset")
        } else {
            Err(String::new())
        };
        match raw {
            Ok(()) => HookStatus::live("tcp_receive_reset", "raw_tracepoint", "tcp_receive_reset"),
            Err(_) => {
                match attach_tracepoint(&mut ebpf, "tcp_receive_reset", "tcp", "tcp_receive_reset")
                {
                    Ok(()) => {
                        HookStatus::live("tcp_receive_reset", "tracepoint", "tcp:tcp_receive_reset")
                    }
                    Err(e) => HookStatus::off("tcp_receive_reset", e),
                }
            }
        }
    } else {
        HookStatus::off(
            "tcp_receive_reset",
            "no tcp:tcp_receive_reset tracepoint on this kernel",
        )
    });

    // --- Conntrack hooks: kprobes only (the log helpers are variadic, which
    // fentry cannot take), and struct offsets from BTF.
    let ct_blocker = |sym: &str| -> Option<String> {
        kprobe_blocker(support, sym).or_else(|| {
            if kbtf.is_none() {
                Some(no_btf.to_string())
            } else if !ct_missing.is_empty() || !base_missing.is_empty() {
                Some(format!(
                    "struct offsets missing from BTF: {}",
                    [&base_missing[..], &ct_missing[..]].concat().join(", ")
                ))
            } else {
                None
            }
        })
    };
    let pair = |ebpf: &mut Ebpf, name: &'static str, entry: &str, ret: &str, func: &str| {
        match attach_kprobe(ebpf, entry, func).and_then(|_| attach_kprobe(ebpf, ret, func)) {
            Ok(()) => HookStatus::live(name, "kretprobe", func),
            Err(e) => HookStatus::off(name, e),
        }
    };
    let ct_invalid = match ct_blocker("nf_conntrack_tcp_packet") {
        Some(r) => HookStatus::off("ct_invalid", r),
        None => pair(
            &mut ebpf,
            "ct_invalid",
            "nf_conntrack_tcp_packet",
            "nf_conntrack_tcp_packet_ret",
            "nf_conntrack_tcp_packet",
        ),
    };
    let ct_live = ct_invalid.attached;
    status.push(ct_invalid);
    // The reason text, from whichever log helper exists.
    status.push(if !ct_live {
        HookStatus::off("ct_invalid_reason", "needs the ct_invalid hook")
    } else {
        let mut attached = Vec::new();
        let mut errors = Vec::new();
        for f in ["nf_ct_l4proto_log_invalid", "nf_l4proto_log_invalid"] {
            match kprobe_blocker(support, f).map_or_else(|| attach_kprobe(&mut ebpf, f, f), Err) {
                Ok(()) => attached.push(f),
                Err(e) => errors.push(e),
            }
        }
        if attached.is_empty() {
            HookStatus::off("ct_invalid_reason", errors.join("; "))
        } else {
            HookStatus::live("ct_invalid_reason", "kprobe", attached.join(","))
        }
    });
    // init_conntrack is static: where the compiler inlined or cloned it
    // (Debian's 6.1 has only `init_conntrack.constprop.0`, whose arguments
    // may differ), probe its allocator __nf_conntrack_alloc instead, which
    // fails with the same ERR_PTR and takes net and the tuple at the same
    // positions (see ktrace-ebpf/src/conntrack.rs). That symbol is not in
    // support's kallsyms list, so the attach itself tells whether it exists.
    status.push(match ct_blocker("init_conntrack") {
        None => pair(
            &mut ebpf,
            "ct_table_full",
            "init_conntrack",
            "init_conntrack_ret",
            "init_conntrack",
        ),
        Some(r) if ct_blocker("nf_conntrack_tcp_packet").is_some() => {
            HookStatus::off("ct_table_full", r)
        }
        Some(r) => {
            let alloc = "__nf_conntrack_alloc";
            let st = pair(
                &mut ebpf,
                "ct_table_full",
                "init_conntrack",
                "init_conntrack_ret",
                alloc,
            );
            if st.attached {
                st
            } else {
                let why = st.reason.unwrap_or_default();
                HookStatus::off("ct_table_full", format!("{r}; fallback {alloc}: {why}"))
            }
        }
    });
    let nat = match ct_blocker("nf_nat_setup_info") {
        Some(r) => HookStatus::off("nat_mapping", r),
        None => pair(
            &mut ebpf,
            "nat_mapping",
            "nf_nat_setup_info",
            "nf_nat_setup_info_ret",
            "nf_nat_setup_info",
        ),
    };
    let nat_from_kernel = nat.attached;
    status.push(nat);

    // --- IPVS: module BTF gives the ip_vs_conn layout.
    status.push(if !support.ip_vs_loaded {
        HookStatus::off("ipvs_conn_new", "ip_vs module not loaded")
    } else if let Some(r) = kprobe_blocker(support, "ip_vs_conn_new") {
        HookStatus::off("ipvs_conn_new", r)
    } else if klayout.ipvs_caddr == ktrace_common::NO_OFFSET {
        HookStatus::off(
            "ipvs_conn_new",
            "no BTF for the ip_vs module (/sys/kernel/btf/ip_vs; module BTF needs 5.11+)",
        )
    } else {
        match attach_kprobe(&mut ebpf, "ip_vs_conn_new_ret", "ip_vs_conn_new") {
            Ok(()) => HookStatus::live("ipvs_conn_new", "kretprobe", "ip_vs_conn_new"),
            Err(e) => HookStatus::off("ipvs_conn_new", e),
        }
    });

    if !status.iter().any(|s| s.attached) {
        let why: Vec<String> = status
            .iter()
            .map(|s| format!("{}: {}", s.name, s.reason.clone().unwrap_or_default()))
            .collect();
        return Err(HookError::NothingAttached(why.join("; ")));
    }
    Ok(Attached {
        ebpf,
        status,
        names,
        nat_from_kernel,
        support: support.clone(),
        logger,
    })
}
