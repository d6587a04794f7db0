//! Check 6: what ktrace can attach on the audited kernel, from
//! [`KernelSupport`]: vmlinux BTF, kprobes, fentry (live audits only), the
//! tracepoints and kernel functions it hooks, and the ip_vs module's BTF.
//! Missing support is a warning at most: it limits what `ktrace watch` sees,
//! it does not expose the node.

use serde_json::json;

use super::{Check, Ctx, Status};
use crate::support::kernel_version;
use crate::support::{KernelSupport, PROBED_SYMBOLS, TRACEPOINTS};

pub fn checks(ctx: &Ctx) -> Vec<Check> {
    let s = &ctx.support;
    if !ctx.live && !ctx.fs.is_dir("/sys/kernel") {
        // A dump without /sys: only kallsyms and tracefs can say anything.
        let why = format!(
            "{} does not exist: the dump did not capture /sys",
            ctx.fs.display("/sys/kernel")
        );
        return vec![
            Check::unknown("hooks_btf", why.clone()),
            Check::unknown("hooks_kprobes", why.clone()),
            Check::unknown("hooks_fentry", why.clone()),
            check_tracepoints(ctx, s),
            check_symbols(ctx, s),
            Check::unknown("hooks_ip_vs_btf", why),
        ];
    }
    vec![
        check_btf(s),
        check_kprobes(s),
        check_fentry(s),
        check_tracepoints(ctx, s),
        check_symbols(ctx, s),
        check_ip_vs_btf(ctx, s),
    ]
}

fn check_btf(s: &KernelSupport) -> Check {
    const CHECK: &str = "hooks_btf";
    let path = s.root.join("sys/kernel/btf/vmlinux");
    let (status, value, why, fix) = if s.btf_vmlinux {
        let why = "ktrace reads kernel struct layouts from BTF (CO-RE), and fentry/tp_btf programs can load";
        (Status::Ok, "vmlinux BTF present", why.to_string(), "")
    } else {
        let why = format!(
            "{} is absent (kernel built without CONFIG_DEBUG_INFO_BTF, e.g. Ubuntu 20.04's 5.4): \
             no fentry, and struct offsets must come from elsewhere",
            path.display()
        );
        let fix = "use a kernel with CONFIG_DEBUG_INFO_BTF=y (5.5+; most distributions since 2021)";
        (Status::Warn, "no vmlinux BTF", why, fix)
    };
    Check::new(CHECK, status, value)
        .expected("/sys/kernel/btf/vmlinux")
        .why(why)
        .fix(fix)
}

fn check_kprobes(s: &KernelSupport) -> Check {
    const CHECK: &str = "hooks_kprobes";
    let (status, value, why, fix) = if s.kprobes {
        let why = "kprobes reach the conntrack INVALID-logging helpers (variadic, so fentry cannot) and init_conntrack's table-full path";
        (Status::Ok, "available", why.to_string(), "")
    } else {
        let why = format!(
            "neither {} nor tracefs kprobe_events exists (kernel without CONFIG_KPROBES, or \
             tracefs not mounted): ktrace cannot hook the INVALID-logging helpers, whose \
             reason text only kprobes reach, nor init_conntrack (table full)",
            s.root.join("sys/bus/event_source/devices/kprobe").display()
        );
        let fix = "use a kernel with CONFIG_KPROBES=y; without kprobes ktrace uses tracepoints, ctnetlink and the conntrack counters (no INVALID reasons, no table-full hook)";
        (Status::Warn, "not available", why, fix)
    };
    Check::new(CHECK, status, value)
        .expected("kprobe PMU or tracefs kprobe_events")
        .why(why)
        .fix(fix)
}

/// Informational: ktrace attaches kprobes and tracepoints, not fentry.
fn check_fentry(s: &KernelSupport) -> Check {
    let (status, value, why) = match s.fentry {
        None if s.btf_vmlinux => (
            Status::Unknown,
            "not probed",
            "an offline audit cannot load a program; vmlinux BTF is there, so fentry is likely",
        ),
        Some(true) => (Status::Ok, "available", "BPF tracing programs load"),
        _ => (
            Status::Ok,
            "not available",
            "BPF tracing programs do not load (no BTF, kernel before 5.5, or lockdown)",
        ),
    };
    Check::new("hooks_fentry", status, value)
        .expected("informational: ktrace does not need fentry")
        .why(why)
}

fn check_tracepoints(ctx: &Ctx, s: &KernelSupport) -> Check {
    const CHECK: &str = "hooks_tracepoints";
    let all: Vec<String> = TRACEPOINTS
        .iter()
        .map(|(c, n)| format!("{c}/{n}"))
        .collect();
    let expected = all.join(", ");
    let Some(dir) = &s.tracefs else {
        let why = format!(
            "tracefs is not mounted at {} or {}, so tracepoints cannot be listed{}",
            s.root.join("sys/kernel/tracing").display(),
            s.root.join("sys/kernel/debug/tracing").display(),
            if ctx.live {
                " (inside `ip netns exec`, /sys is a fresh mount without tracefs)"
            } else {
                " (not captured in the dump)"
            }
        );
        return Check::new(CHECK, Status::Unknown, "tracefs not mounted")
            .expected(expected)
            .why(why)
            .fix("mount -t tracefs nodev /sys/kernel/tracing");
    };
    let present: Vec<&String> = all.iter().filter(|t| s.tracepoints.contains(*t)).collect();
    let missing: Vec<&String> = all.iter().filter(|t| !s.tracepoints.contains(*t)).collect();
    // Does tcp_send_reset fire without a socket (6.10+ layout with `reason`)?
    let send_reset_note = match s
        .tracepoint_format("tcp", "tcp_send_reset")
        .filter(|_| s.has_tracepoint("tcp", "tcp_send_reset"))
        .and_then(|p| std::fs::read_to_string(p).ok())
    {
        Some(f) if f.contains("reason") => {
            " tcp_send_reset has the 6.10+ layout: it also fires for resets sent without a socket (the client answering an un-NATed reply)."
        }
        Some(_) => {
            " tcp_send_reset has the pre-6.10 layout: it fires only with a full socket, so the no-socket reset (answer to an un-NATed reply) needs the tcp_v4_send_reset kprobe or fentry."
        }
        None => "",
    };
    let evidence = json!({
        "tracefs": dir.display().to_string(),
        "present": present,
        "missing": missing,
    });
    let (status, value, why) = if missing.is_empty() {
        let why = "the reset tracepoints are there";
        (Status::Ok, "all present".to_string(), why)
    } else {
        let names: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
        let why = "ktrace sees fewer resets: missing tracepoints (old kernel, or \
                   CONFIG_TRACEPOINTS off) are replaced by kprobes where possible";
        (Status::Warn, format!("missing {}", names.join(", ")), why)
    };
    Check::new(CHECK, status, value)
        .expected(expected)
        .why(format!("{why}.{send_reset_note}"))
        .evidence(evidence)
}

fn check_symbols(ctx: &Ctx, s: &KernelSupport) -> Check {
    const CHECK: &str = "hooks_symbols";
    let expected = "the probed kernel functions are in kallsyms".to_string();
    if !s.kallsyms_readable {
        let path = s.root.join("proc/kallsyms");
        let why = if path.exists() {
            format!(
                "{} hides addresses (not root, or kernel.kptr_restrict): symbols cannot be checked",
                path.display()
            )
        } else {
            format!("{} does not exist", path.display())
        };
        return Check::unknown(CHECK, why).expected(expected);
    }
    if !s.kallsyms_well_formed {
        return Check::unknown(
            CHECK,
            format!(
                "{} does not look like kallsyms (`ADDRESS TYPE NAME` lines)",
                s.root.join("proc/kallsyms").display()
            ),
        )
        .expected(expected);
    }
    let ip_vs = s.ip_vs_loaded || ctx.fs.exists("/proc/net/ip_vs");
    let missing: Vec<&str> = PROBED_SYMBOLS
        .iter()
        .copied()
        .filter(|n| !s.has_symbol(n))
        .collect();
    // Functions that matter here: IPv6 and ip_vs only when relevant, and
    // either of the two INVALID loggers (the name depends on the release).
    let important: Vec<&str> = missing
        .iter()
        .copied()
        .filter(|n| match *n {
            "ip_vs_conn_new" => ip_vs,
            "tcp_v6_send_reset" => false,
            "nf_ct_l4proto_log_invalid" | "nf_l4proto_log_invalid" => {
                !s.has_symbol("nf_ct_l4proto_log_invalid")
                    && !s.has_symbol("nf_l4proto_log_invalid")
            }
            // Either gives the table-full hook (hooks.rs falls back).
            "init_conntrack" | "__nf_conntrack_alloc" => {
                !s.has_symbol("init_conntrack")
                    && !s.has_symbol("__nf_conntrack_alloc")
                    && (s.nf_conntrack_loaded
                        || ctx.fs.exists("/proc/sys/net/netfilter/nf_conntrack_max"))
            }
            "nf_conntrack_tcp_packet" | "nf_nat_setup_info" | "__nf_conntrack_confirm" => {
                s.nf_conntrack_loaded || ctx.fs.exists("/proc/sys/net/netfilter/nf_conntrack_max")
            }
            _ => true,
        })
        .collect();
    let evidence = json!({
        "present": PROBED_SYMBOLS.iter().filter(|n| s.has_symbol(n)).collect::<Vec<_>>(),
        "missing": missing,
    });
    let value = if missing.is_empty() {
        format!("all {} present", PROBED_SYMBOLS.len())
    } else {
        format!("missing {}", missing.join(", "))
    };
    let (status, why) = if important.is_empty() {
        let note = if missing.is_empty() {
            ""
        } else {
            " Missing ones are not needed here (IPv6 resets, ip_vs not loaded, or the other INVALID logger of this release)."
        };
        let why = format!("the functions ktrace hooks exist as symbols.{note}");
        (Status::Ok, why)
    } else {
        let why = format!(
            "{} not in kallsyms as a plain function (inlined, renamed by the compiler, e.g. \
             init_conntrack.isra.0, or module not loaded): ktrace cannot hook them by name \
             and loses what they report",
            important.join(", ")
        );
        (Status::Warn, why)
    };
    Check::new(CHECK, status, value)
        .expected(expected)
        .why(why)
        .evidence(evidence)
}

fn check_ip_vs_btf(ctx: &Ctx, s: &KernelSupport) -> Check {
    const CHECK: &str = "hooks_ip_vs_btf";
    let expected = "/sys/kernel/btf/ip_vs when ip_vs is loaded";
    let proc_ipvs = ctx.fs.exists("/proc/net/ip_vs");
    if !s.ip_vs_loaded && !proc_ipvs {
        return Check::new(CHECK, Status::Ok, "ip_vs not loaded")
            .expected(expected)
            .why("nothing to hook: IPVS scheduling (quiescent_backend) only matters in kube-proxy's IPVS mode");
    }
    if s.ip_vs_btf {
        return Check::new(CHECK, Status::Ok, "ip_vs module BTF present")
            .expected(expected)
            .why("ip_vs_conn and ip_vs_dest layouts come from the module's BTF");
    }
    if !s.ip_vs_loaded && proc_ipvs {
        // Built in: its types are in vmlinux.
        let status = if s.btf_vmlinux {
            Status::Ok
        } else {
            Status::Warn
        };
        return Check::new(CHECK, status, "ip_vs built in")
            .expected(expected)
            .why(if s.btf_vmlinux {
                "ip_vs is built into the kernel: its types are in vmlinux BTF"
            } else {
                "ip_vs is built in but the kernel has no BTF: ip_vs_conn layout unknown"
            });
    }
    let old = s
        .release
        .as_deref()
        .and_then(kernel_version)
        .is_some_and(|v| v < (5, 11));
    Check::new(CHECK, Status::Warn, "ip_vs loaded, no module BTF")
        .expected(expected)
        .why(if old {
            "module BTF needs kernel 5.11+: ktrace cannot read ip_vs_conn/ip_vs_dest, so weight-0 scheduling (quiescent_backend) is not seen"
        } else {
            "the kernel was built without CONFIG_DEBUG_INFO_BTF_MODULES: ktrace cannot read ip_vs_conn/ip_vs_dest, so weight-0 scheduling (quiescent_backend) is not seen"
        })
        .fix("use a 5.11+ kernel with CONFIG_DEBUG_INFO_BTF_MODULES=y")
}
