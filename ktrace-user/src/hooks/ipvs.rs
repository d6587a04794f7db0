//! The IPVS hook: a kretprobe on `ip_vs_conn_new`, whose `ip_vs_conn`
//! layout comes from the module's BTF.

use aya::Ebpf;

use super::attach::{self, kprobe_blocker};
use super::{HookStatus, Kernel};

pub(super) fn conn_new(ebpf: &mut Ebpf, k: &Kernel) -> HookStatus {
    if !k.support.ip_vs_loaded {
        HookStatus::off("ipvs_conn_new", "ip_vs module not loaded")
    } else if let Some(r) = kprobe_blocker(k.support, "ip_vs_conn_new") {
        HookStatus::off("ipvs_conn_new", r)
    } else if k.layout.ipvs_caddr == ktrace_common::NO_OFFSET {
        HookStatus::off(
            "ipvs_conn_new",
            "no BTF for the ip_vs module (/sys/kernel/btf/ip_vs; module BTF needs 5.11+)",
        )
    } else {
        match attach::kprobe(ebpf, "ip_vs_conn_new_ret", "ip_vs_conn_new") {
            Ok(()) => HookStatus::live("ipvs_conn_new", "kretprobe", "ip_vs_conn_new"),
            Err(e) => HookStatus::off("ipvs_conn_new", e),
        }
    }
}
