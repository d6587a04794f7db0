//! The TCP reset hooks: `tcp_send_reset` (the best of the 6.10+ tracepoint,
//! fentry, kprobes and the older socket-only tracepoint) and
//! `tcp_receive_reset` (tracepoint).

use aya::Ebpf;
use ktrace_common::NO_FIELD;

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
