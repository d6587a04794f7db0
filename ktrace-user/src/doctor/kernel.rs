//! `kernel_conntrack`: the audited kernel against the conntrack changes
//! that decide how often the incidents happen (distribution kernels
//! backport, so a version is a hint, not proof):
//! - 6.1: TCP segments below the window's lower bound (late
//!   retransmissions, overly delayed ACKs) are let through instead of being
//!   marked INVALID ("ignore overly delayed tcp packets"); before, they were
//!   INVALID too, and un-NATed like out-of-window replies;
//! - about 5.6: the loser of a UDP insert race whose NAT result differs is
//!   inserted as a clash entry instead of being dropped (the DNS 5 s
//!   timeout); 5.10 counts resolved clashes (`clashres`);
//! - 5.13: the oldest kernel kube-proxy's nftables mode runs on.

use serde_json::json;

use super::{Check, Ctx, Status};
use crate::support::kernel_version;

const CHECK: &str = "kernel_conntrack";

pub fn check(ctx: &Ctx) -> Check {
    let Some(release) = ctx.support.release.as_deref() else {
        return Check::unknown(
            CHECK,
            format!(
                "{} is unreadable: the kernel release is unknown",
                ctx.fs.display("/proc/sys/kernel/osrelease")
            ),
        );
    };
    against_changes(release)
}

/// The verdict for kernel `release`.
fn against_changes(release: &str) -> Check {
    let Some(v) = kernel_version(release) else {
        return Check::unknown(CHECK, format!("{release:?} is not a kernel release"));
    };
    let window_fix = v >= (6, 1);
    let udp_clash = v >= (5, 6);
    let evidence = json!({
        "release": release,
        "ignores_delayed_tcp": window_fix,
        "inserts_udp_clashes": udp_clash,
        "counts_clash_resolve": v >= (5, 10),
        "kube_proxy_nftables_mode": v >= (5, 13),
    });
    let mut gaps = Vec::new();
    if !window_fix {
        gaps.push(
            "before 6.1, conntrack also marks segments below the window (late retransmissions, \
             delayed ACKs) INVALID: more replies leave un-NATed and more clients reset",
        );
    }
    if !udp_clash {
        gaps.push(
            "before about 5.6, the loser of a UDP insert race (A and AAAA from one socket) is \
             dropped instead of inserted: DNS lookups wait 5 s",
        );
    }
    if v < (5, 13) {
        gaps.push("kube-proxy's nftables mode needs 5.13 or later");
    }
    let expected = "6.1 or later (delayed TCP segments not INVALID; UDP clashes inserted)";
    if gaps.is_empty() {
        return Check::new(
            CHECK,
            Status::Ok,
            format!("{release}: has the 6.1 and 5.6 conntrack changes"),
        )
        .expected(expected)
        .why(
            "conntrack lets overly delayed TCP segments through instead of marking them \
                 INVALID, and inserts clashing UDP entries instead of dropping the packet; only \
                 segments beyond the window's upper bound remain INVALID",
        )
        .evidence(evidence);
    }
    Check::new(
        CHECK,
        Status::Warn,
        format!("{release}: {} change(s) missing", gaps.len()),
    )
    .expected(expected)
    .why(format!(
        "{} (distribution kernels may have backported the fixes).",
        gaps.join("; ")
    ))
    .fix(
        "upgrade to a 6.1+ kernel; until then set net.netfilter.nf_conntrack_tcp_be_liberal=1 \
             and, for DNS, single-request-reopen or NodeLocal DNSCache",
    )
    .evidence(evidence)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_against_the_changes() {
        let c = against_changes("6.1.0-18-amd64");
        assert_eq!(c.status, Status::Ok, "{}", c.value);
        let c = against_changes("5.10.0-28-amd64");
        assert_eq!(c.status, Status::Warn);
        assert!(c.value.contains("2 change"), "6.1, 5.13: {}", c.value);
        let c = against_changes("5.4.0-150-generic");
        assert!(c.value.contains("3 change"), "{}", c.value);
        assert!(c.why.contains("5 s") && c.why.contains("5.13"), "{}", c.why);
        assert_eq!(against_changes("garbage").status, Status::Unknown);
    }
}
