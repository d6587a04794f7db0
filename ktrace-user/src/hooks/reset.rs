//! The TCP reset hooks: `tcp_send_reset` (the best of the 6.10+ tracepoint,
//! fentry, kprobes and the older socket-only tracepoint) and
//! `tcp_receive_reset` (tracepoint); and whether the kernel summarises the
//! resets that can never be an incident (`crate::summary` reads the counts).

use aya::Ebpf;
use ktrace_common::{KernelLayout, ResetSummary, NO_FIELD, NO_OFFSET};

use super::attach::{self, kprobe_blocker};
use super::{HookStatus, Kernel, NO_BTF};

/// RST sent. The 6.10+ tracepoint (reason + sockaddr addresses) sees the
/// no-socket case; older ones fire only with a full socket.
pub(super) fn send(ebpf: &mut Ebpf, k: &Kernel) -> HookStatus {
    let tp_full = k.send_tp.reason != NO_FIELD && k.send_tp.addr_size == 28;
    if tp_full {
        let btf_err = match btf_typed_send(ebpf, k) {
            Ok(st) => return st,
            Err(e) => e,
        };
        let (mut st, raw_err) = raw_or_tracepoint(ebpf, k, "tcp_send_reset");
        st.reason = match (raw_err, st.attached) {
            (Some(e), _) => Some(format!("raw tracepoint unavailable: {e}")),
            // Live, but each reset pays for a probe read the typed
            // program avoids: say why it is not that one.
            (None, true) => Some(format!(
                "reads the packet by probe reads (BTF-typed program unavailable: {btf_err})"
            )),
            (None, false) => st.reason,
        };
        return st;
    }
    if let Some(st) = fentry(ebpf, k) {
        return st;
    }
    let kprobe_v4 = kprobe_blocker(k.support, "tcp_v4_send_reset");
    if kprobe_v4.is_none() && k.base_missing.is_empty() {
        kprobes(ebpf, k)
    } else if k.send_fmt.is_some() {
        socket_only_tracepoint(ebpf, k, kprobe_v4)
    } else {
        HookStatus::off(
            "tcp_send_reset",
            format!(
                "no tcp:tcp_send_reset tracepoint (tracefs not mounted?) and {}",
                kprobe_v4.unwrap_or_else(|| NO_BTF.to_string())
            ),
        )
    }
}

/// RST received.
pub(super) fn receive(ebpf: &mut Ebpf, k: &Kernel) -> HookStatus {
    if k.recv_fmt.is_none() {
        return HookStatus::off(
            "tcp_receive_reset",
            "no tcp:tcp_receive_reset tracepoint on this kernel",
        );
    }
    raw_or_tracepoint(ebpf, k, "tcp_receive_reset").0
}

/// The raw tracepoint `name` when BTF gives the socket and packet offsets
/// (it reads the arguments without the cost of formatting the record, what
/// a reset storm pays per packet), else the tracepoint. Also returns why the
/// raw one was not used when the tracepoint was.
fn raw_or_tracepoint(
    ebpf: &mut Ebpf,
    k: &Kernel,
    name: &'static str,
) -> (HookStatus, Option<String>) {
    let raw = if k.raw_tracepoint_ok() {
        attach::raw_tracepoint(ebpf, &format!("raw_{name}"), name)
    } else {
        Err("struct offsets missing from BTF".to_string())
    };
    match raw {
        Ok(()) => (HookStatus::live(name, "raw_tracepoint", name), None),
        Err(raw_err) => match attach::tracepoint(ebpf, name, "tcp", name) {
            Ok(()) => (
                HookStatus::live(name, "tracepoint", format!("tcp:{name}")),
                Some(raw_err),
            ),
            Err(e) => (HookStatus::off(name, e), None),
        },
    }
}

/// The raw tracepoint `tcp_send_reset` with BTF-typed arguments (tp_btf):
/// the packet's `sk_buff` fields are plain loads, not a probe read (about
/// 40 ns less per reset in a storm). Reported as a raw tracepoint: it is
/// one, attached the same way, with the same arguments.
fn btf_typed_send(ebpf: &mut Ebpf, k: &Kernel) -> Result<HookStatus, String> {
    if !k.raw_tracepoint_ok() {
        return Err("struct offsets missing from BTF".into());
    }
    let btf = aya::Btf::from_sys_fs().map_err(|e| format!("no kernel BTF: {e}"))?;
    attach::btf_tracepoint(ebpf, &btf, "btf_tcp_send_reset", "tcp_send_reset")?;
    Ok(HookStatus::live(
        "tcp_send_reset",
        "raw_tracepoint",
        "tcp_send_reset",
    ))
}

/// fentry: a BPF trampoline, cheaper than a kprobe, same arguments. `None`
/// when it is not available or the IPv4 one does not attach.
fn fentry(ebpf: &mut Ebpf, k: &Kernel) -> Option<HookStatus> {
    if k.support.fentry != Some(true) || !k.base_missing.is_empty() {
        return None;
    }
    let btf = aya::Btf::from_sys_fs().ok()?;
    attach::fentry(ebpf, &btf, "fentry_tcp_v4_send_reset", "tcp_v4_send_reset").ok()?;
    let mut st = HookStatus::live("tcp_send_reset", "fentry", "tcp_v4_send_reset");
    let v6 = attach::fentry(ebpf, &btf, "fentry_tcp_v6_send_reset", "tcp_v6_send_reset");
    add_v6(&mut st, v6);
    Some(st)
}

fn kprobes(ebpf: &mut Ebpf, k: &Kernel) -> HookStatus {
    let mut st = match attach::kprobe(ebpf, "tcp_v4_send_reset", "tcp_v4_send_reset") {
        Ok(()) => HookStatus::live("tcp_send_reset", "kprobe", "tcp_v4_send_reset"),
        Err(e) => HookStatus::off("tcp_send_reset", e),
    };
    if st.attached && k.support.has_symbol("tcp_v6_send_reset") {
        let v6 = attach::kprobe(ebpf, "tcp_v6_send_reset", "tcp_v6_send_reset");
        add_v6(&mut st, v6);
    }
    st
}

fn add_v6(st: &mut HookStatus, v6: Result<(), String>) {
    match v6 {
        Ok(()) => st.target.push_str(",tcp_v6_send_reset"),
        Err(e) => st.reason = Some(format!("IPv6 resets not seen: {e}")),
    }
}

/// The pre-6.10 tracepoint, which needs a full socket: the last resort,
/// saying what it misses and why the kprobe could not be used.
fn socket_only_tracepoint(ebpf: &mut Ebpf, k: &Kernel, kprobe_v4: Option<String>) -> HookStatus {
    let mut st = match attach::tracepoint(ebpf, "tcp_send_reset", "tcp", "tcp_send_reset") {
        Ok(()) => HookStatus::live("tcp_send_reset", "tracepoint", "tcp:tcp_send_reset"),
        Err(e) => HookStatus::off("tcp_send_reset", e),
    };
    if st.attached {
        st.reason = Some(format!(
            "this kernel's tcp_send_reset tracepoint fires only with a full socket: \
             no-socket resets (answers to un-NATed replies) are not seen; kprobe fallback: {}",
            kprobe_v4.unwrap_or_else(|| format!(
                "struct offsets missing: {}",
                k.base_missing.join(", ")
            ))
        ));
    }
    st
}

/// The setting for the kernel side, and the status line's entry saying
/// which mode is live (`reset_summary`).
pub(super) fn summary_setting(
    every_reset: bool,
    layout: &KernelLayout,
) -> (ResetSummary, HookStatus) {
    let off = |why: &str| {
        let mut st = HookStatus::off(
            "reset_summary",
            format!("every reset is sent one by one: {why}"),
        );
        st.mechanism = "bpf_map".into();
        (ResetSummary::OFF, st)
    };
    if every_reset {
        return off("--every-reset");
    }
    if layout.skb_tcp_flags == NO_OFFSET {
        return off("no sk_buff.cb or tcp_skb_cb.tcp_flags in BTF (the flags of the segment a reset answers)");
    }
    let s = ResetSummary::DEFAULT;
    let st = HookStatus {
        name: "reset_summary".into(),
        mechanism: "bpf_map".into(),
        attached: true,
        target: format!(
            "resets that can never be an incident (refused, or sent by a connection's socket): \
             the first {} per {} ms per CPU as events, the rest counted (resets_summarised)",
            s.sample_per_window,
            s.window_ns / 1_000_000
        ),
        reason: None,
    };
    (s, st)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setting_says_which_mode_is_live() {
        let mut layout = KernelLayout::UNKNOWN;
        let (s, st) = summary_setting(false, &layout);
        assert_eq!((s, st.attached), (ResetSummary::OFF, false));
        assert!(st.reason.unwrap().contains("tcp_flags"));
        layout.skb_tcp_flags = 52;
        let (s, st) = summary_setting(false, &layout);
        assert_eq!((s, st.attached), (ResetSummary::DEFAULT, true));
        assert!(st.target.contains("first 32 per 100 ms"), "{}", st.target);
        let (s, st) = summary_setting(true, &layout);
        assert_eq!((s, st.attached), (ResetSummary::OFF, false));
        assert!(st.reason.unwrap().contains("--every-reset"));
    }
}
