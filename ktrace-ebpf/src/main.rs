//! ktrace's kernel side. Each program is a thin wrapper around a `try_*`
//! function in the module of its concern; errors end the program quietly
//! (a failed read of one packet must never disturb the packet path) and are
//! counted in `COUNTERS[READ_ERRORS]`.
#![no_std]
#![no_main]

mod conntrack;
mod ipvs;
mod kernel;
mod reset;
mod ring;
mod summary;

use aya_ebpf::{
    macros::{btf_tracepoint, fentry, kprobe, kretprobe, raw_tracepoint, tracepoint},
    programs::{
        BtfTracePointContext, FEntryContext, ProbeContext, RawTracePointContext, RetProbeContext,
        TracePointContext,
    },
    EbpfContext,
};
use ktrace_common::{counter, hook};

use kernel::layout;

/// Ends a program: an error (a kernel read that failed) is counted, and
/// the first one on each CPU is also logged through aya-log, so a layout
/// problem on an unusual kernel shows up in ktrace's log, once.
#[inline(always)]
fn done<C: EbpfContext>(ctx: &C, result: Result<(), i64>) -> u32 {
    if let Err(e) = result {
        if ring::count_and_get(counter::READ_ERRORS) == 1 {
            aya_log_ebpf::warn!(
                ctx,
                "a ktrace hook could not read kernel memory (error {}); later errors are only counted",
                e
            );
        }
    }
    0
}

#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    done(&ctx, reset::try_tp_tcp_send_reset(&ctx))
}

#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    done(&ctx, reset::try_tp_tcp_receive_reset(&ctx))
}

#[raw_tracepoint(tracepoint = "tcp_send_reset")]
pub fn raw_tcp_send_reset(ctx: RawTracePointContext) -> u32 {
    done(&ctx, reset::try_raw_tcp_send_reset(&ctx))
}

#[btf_tracepoint(function = "tcp_send_reset")]
pub fn btf_tcp_send_reset(ctx: BtfTracePointContext) -> u32 {
    done(&ctx, reset::try_btf_tcp_send_reset(&ctx))
}

#[raw_tracepoint(tracepoint = "tcp_receive_reset")]
pub fn raw_tcp_receive_reset(ctx: RawTracePointContext) -> u32 {
    done(&ctx, reset::try_raw_tcp_receive_reset(&ctx))
}

#[fentry(function = "tcp_v4_send_reset")]
pub fn fentry_tcp_v4_send_reset(ctx: FEntryContext) -> u32 {
    done(
        &ctx,
        reset::try_fentry_send_reset(&ctx, hook::FENTRY_TCP_V4_SEND_RESET),
    )
}

#[fentry(function = "tcp_v6_send_reset")]
pub fn fentry_tcp_v6_send_reset(ctx: FEntryContext) -> u32 {
    done(
        &ctx,
        reset::try_fentry_send_reset(&ctx, hook::FENTRY_TCP_V6_SEND_RESET),
    )
}

#[kprobe]
pub fn tcp_v4_send_reset(ctx: ProbeContext) -> u32 {
    done(&ctx, reset::try_kprobe_send_reset(&ctx, hook::KPROBE_TCP_V4_SEND_RESET))
}

#[kprobe]
pub fn tcp_v6_send_reset(ctx: ProbeContext) -> u32 {
    done(&ctx, reset::try_kprobe_send_reset(&ctx, hook::KPROBE_TCP_V6_SEND_RESET))
}

#[kprobe]
pub fn nf_conntrack_tcp_packet(ctx: ProbeContext) -> u32 {
    done(&ctx, conntrack::try_tcp_packet_entry(&ctx))
}

#[kretprobe]
pub fn nf_conntrack_tcp_packet_ret(ctx: RetProbeContext) -> u32 {
    done(&ctx, conntrack::try_tcp_packet_return(&ctx))
}

#[kprobe]
pub fn nf_ct_l4proto_log_invalid(ctx: ProbeContext) -> u32 {
    done(&ctx, conntrack::try_log_invalid(&ctx, layout!(log_invalid_fmt_arg)))
}

#[kprobe]
pub fn nf_l4proto_log_invalid(ctx: ProbeContext) -> u32 {
    done(&ctx, conntrack::try_log_invalid(&ctx, layout!(l4_log_invalid_fmt_arg)))
}

#[kprobe]
pub fn init_conntrack(ctx: ProbeContext) -> u32 {
    done(&ctx, conntrack::try_init_conntrack_entry(&ctx))
}

#[kretprobe]
pub fn init_conntrack_ret(ctx: RetProbeContext) -> u32 {
    done(&ctx, conntrack::try_init_conntrack_return(&ctx))
}

#[kprobe]
pub fn nf_nat_setup_info(ctx: ProbeContext) -> u32 {
    done(&ctx, conntrack::try_nat_setup_entry(&ctx))
}

#[kretprobe]
pub fn nf_nat_setup_info_ret(ctx: RetProbeContext) -> u32 {
    done(&ctx, conntrack::try_nat_setup_return(&ctx))
}

#[kprobe]
pub fn ct_confirm(ctx: ProbeContext) -> u32 {
    done(&ctx, conntrack::try_confirm_entry(&ctx))
}

#[kretprobe]
pub fn ct_confirm_ret(ctx: RetProbeContext) -> u32 {
    done(&ctx, conntrack::try_confirm_return(&ctx))
}

#[kretprobe]
pub fn ip_vs_conn_new_ret(ctx: RetProbeContext) -> u32 {
    done(&ctx, ipvs::try_ip_vs_conn_new_return(&ctx))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
