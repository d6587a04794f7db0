//! The conntrack and NAT hooks: kprobes only (the log helpers are variadic,
//! which fentry cannot take), with struct offsets from BTF.

use aya::Ebpf;

use super::attach::{self, kprobe_blocker};
use super::{HookStatus, Kernel, NO_BTF};

/// `ct_invalid`, `ct_invalid_reason`, `ct_table_full`, `nat_mapping` and
/// `ct_insert_race`, in that order.
pub(super) fn attach(ebpf: &mut Ebpf, k: &Kernel) -> Vec<HookStatus> {
    let invalid = kretprobe_pair(ebpf, k, "ct_invalid", "nf_conntrack_tcp_packet");
    let reason = invalid_reason(ebpf, k, invalid.attached);
    let full = table_full(ebpf, k);
    let nat = kretprobe_pair(ebpf, k, "nat_mapping", "nf_nat_setup_info");
    // A packet that loses the race to insert its entry: NF_DROP from
    // __nf_conntrack_confirm (global; the counters cover the rest).
    let race = match blocker(k, "__nf_conntrack_confirm") {
        Some(r) => HookStatus::off("ct_insert_race", r),
        None => pair(
            ebpf,
            "ct_insert_race",
            "ct_confirm",
            "__nf_conntrack_confirm",
        ),
    };
    vec![invalid, reason, full, nat, race]
}

/// Why the conntrack kprobe on `sym` cannot be used, if it cannot.
fn blocker(k: &Kernel, sym: &str) -> Option<String> {
    kprobe_blocker(k.support, sym).or_else(|| {
        if !k.has_btf {
            Some(NO_BTF.to_string())
        } else if !k.ct_missing.is_empty() || !k.base_missing.is_empty() {
            Some(format!(
                "struct offsets missing from BTF: {}",
                [&k.base_missing[..], &k.ct_missing[..]].concat().join(", ")
            ))
        } else {
            None
        }
    })
}

/// The entry and return programs `func` and `func_ret` on `func`, when the
/// kernel allows them.
fn kretprobe_pair(ebpf: &mut Ebpf, k: &Kernel, name: &'static str, func: &str) -> HookStatus {
    match blocker(k, func) {
        Some(r) => HookStatus::off(name, r),
        None => pair(ebpf, name, func, func),
    }
}

/// Programs `prog` and `prog_ret` on the kernel function `func`.
fn pair(ebpf: &mut Ebpf, name: &'static str, prog: &str, func: &str) -> HookStatus {
    let ret = format!("{prog}_ret");
    match attach::kprobe(ebpf, prog, func).and_then(|_| attach::kprobe(ebpf, &ret, func)) {
        Ok(()) => HookStatus::live(name, "kretprobe", func),
        Err(e) => HookStatus::off(name, e),
    }
}

/// The reason text, from whichever log helper exists.
fn invalid_reason(ebpf: &mut Ebpf, k: &Kernel, ct_live: bool) -> HookStatus {
    if !ct_live {
        return HookStatus::off("ct_invalid_reason", "needs the ct_invalid hook");
    }
    let mut attached = Vec::new();
    let mut errors = Vec::new();
    for f in ["nf_ct_l4proto_log_invalid", "nf_l4proto_log_invalid"] {
        match kprobe_blocker(k.support, f).map_or_else(|| attach::kprobe(ebpf, f, f), Err) {
            Ok(()) => attached.push(f),
            Err(e) => errors.push(e),
        }
    }
    if attached.is_empty() {
        HookStatus::off("ct_invalid_reason", errors.join("; "))
    } else {
        HookStatus::live("ct_invalid_reason", "kprobe", attached.join(","))
    }
}

/// init_conntrack is static: where the compiler inlined or cloned it
/// (Debian's 6.1 has only `init_conntrack.constprop.0`, whose arguments
/// may differ), probe its allocator __nf_conntrack_alloc instead, which
/// fails with the same ERR_PTR and takes net and the tuple at the same
/// positions (see ktrace-ebpf/src/conntrack.rs). The attach itself tells
/// whether that symbol exists.
fn table_full(ebpf: &mut Ebpf, k: &Kernel) -> HookStatus {
    let Some(r) = blocker(k, "init_conntrack") else {
        return pair(ebpf, "ct_table_full", "init_conntrack", "init_conntrack");
    };
    if blocker(k, "nf_conntrack_tcp_packet").is_some() {
        return HookStatus::off("ct_table_full", r);
    }
    let alloc = "__nf_conntrack_alloc";
    let st = pair(ebpf, "ct_table_full", "init_conntrack", alloc);
    if st.attached {
        st
    } else {
        let why = st.reason.unwrap_or_default();
        HookStatus::off("ct_table_full", format!("{r}; fallback {alloc}: {why}"))
    }
}
