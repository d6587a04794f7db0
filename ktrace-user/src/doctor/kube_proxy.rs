//! kube-proxy's mode on this node, and whether that mode's INVALID drop is
//! in place:
//! - `kube_proxy_mode`: IPVS (the `kube-ipvs0` interface, or virtual
//!   services in `/proc/net/ip_vs`), nftables (an `ip`/`ip6` table named
//!   `kube-proxy`), or iptables (a `KUBE-SERVICES` chain in the `nat`
//!   table), in that order: IPVS mode also writes `KUBE-SERVICES`;
//! - `kube_proxy_invalid_drop`: the iptables and IPVS modes drop ctstate
//!   INVALID in `KUBE-FORWARD` (since Kubernetes 1.15; left out since 1.29
//!   when `nf_conntrack_tcp_be_liberal` is set); the nftables mode installs
//!   no such rule by design, so there `be_liberal` (or a rule of the
//!   admin's) is all that keeps un-NATed replies from clients.

use serde_json::json;

use super::rules::{all_drops, protecting_drops, InvalidDrop, Source};
use super::{ipvs, Check, Ctx, Fs, Status};
use crate::engine::KubeProxyMode;

/// What the node shows of kube-proxy.
struct Signs {
    /// In precedence order; the first is the mode.
    modes: Vec<(KubeProxyMode, String)>,
    /// At least one ruleset source was read (or is known to hold no rules).
    read_any: bool,
}

/// IPVS mode's sign: `kube-ipvs0`, or virtual services in `/proc/net/ip_vs`.
fn ipvs_sign(fs: &Fs) -> Option<(KubeProxyMode, String)> {
    if fs.exists("/sys/class/net/kube-ipvs0") {
        return Some((KubeProxyMode::Ipvs, "interface kube-ipvs0".to_string()));
    }
    let services = fs
        .read("/proc/net/ip_vs")
        .map(|t| ipvs::parse_ip_vs(&t).unwrap_or_default())
        .ok()?;
    let n = services.len();
    (n > 0).then(|| (KubeProxyMode::Ipvs, format!("{n} IPVS virtual services")))
}

fn signs(fs: &Fs, rulesets: &[Source]) -> Signs {
    let mut modes: Vec<(KubeProxyMode, String)> = ipvs_sign(fs).into_iter().collect();
    for s in rulesets {
        match s {
            Source::Read {
                name,
                kube_proxy: true,
                ..
            } if name == "nftables" => {
                modes.push((KubeProxyMode::Nftables, "nftables table kube-proxy".into()));
            }
            Source::Read {
                name,
                kube_proxy: true,
                ..
            } => modes.push((KubeProxyMode::Iptables, format!("{name} nat/KUBE-SERVICES"))),
            _ => {}
        }
    }
    // IPVS mode also writes KUBE-SERVICES.
    let order = [KubeProxyMode::Ipvs, KubeProxyMode::Nftables];
    modes.sort_by_key(|(m, _)| order.iter().position(|o| o == m).unwrap_or(order.len()));
    let read_any = rulesets
        .iter()
        .any(|s| !matches!(s, Source::Unknown { .. }));
    Signs { modes, read_any }
}

pub fn checks(ctx: &Ctx) -> Vec<Check> {
    let s = signs(&ctx.fs, &ctx.rulesets);
    let mode = s.modes.first().map(|(m, _)| *m);
    vec![check_mode(&s), check_invalid_drop(ctx, mode, &s)]
}

fn check_mode(s: &Signs) -> Check {
    const CHECK: &str = "kube_proxy_mode";
    let seen: Vec<&str> = s.modes.iter().map(|(_, w)| w.as_str()).collect();
    let evidence = json!({"mode": s.modes.first().map(|(m, _)| m.as_str()), "signs": seen});
    let Some((mode, _)) = s.modes.first() else {
        if !s.read_any {
            let why = "no ruleset could be read (see unnated_reply_protection)";
            return Check::unknown(CHECK, why).evidence(evidence);
        }
        return Check::new(CHECK, Status::Ok, "none found")
            .expected("informational")
            .why(
                "no kube-ipvs0, no IPVS services, no nftables table kube-proxy, no KUBE-SERVICES \
                 chain in this network namespace: kube-proxy does not run here (or a CNI \
                 replaces it, e.g. Cilium or Calico eBPF)",
            )
            .evidence(evidence);
    };
    let why = match mode {
        KubeProxyMode::Ipvs => {
            "kube-proxy's IPVS mode (deprecated in Kubernetes 1.35): every Service \
                       address is local to the node on kube-ipvs0, so an INVALID client segment \
                       is answered by the node itself (the request-direction un-NATed reset)"
        }
        KubeProxyMode::Nftables => {
            "kube-proxy's nftables mode (GA in Kubernetes 1.33, kernel 5.13+): it \
                           installs no ctstate INVALID drop, so nf_conntrack_tcp_be_liberal alone \
                           decides whether out-of-window replies leave un-NATed"
        }
        // The signs hold no other mode than these three.
        _ => {
            "kube-proxy's iptables mode: Services are DNATed by KUBE-SERVICES chains, \
             and kube-proxy drops ctstate INVALID in KUBE-FORWARD (kube_proxy_invalid_drop \
             says whether the rule is there)"
        }
    };
    Check::new(
        CHECK,
        Status::Ok,
        format!("{} ({})", mode.as_str(), seen.join(", ")),
    )
    .expected("informational")
    .why(why)
    .evidence(evidence)
}

fn check_invalid_drop(ctx: &Ctx, mode: Option<KubeProxyMode>, s: &Signs) -> Check {
    const CHECK: &str = "kube_proxy_invalid_drop";
    let liberal = ctx
        .fs
        .sysctl_u64("net.netfilter.nf_conntrack_tcp_be_liberal")
        .ok();
    let drops: Vec<_> = protecting_drops(&ctx.rulesets).collect();
    let kube_forward = |d: &&InvalidDrop| d.chain == "KUBE-FORWARD" && !d.reached_from.is_empty();
    // An IPv6-only node holds kube-proxy's rules, and its drop, in
    // ip6tables alone.
    let ipv4_kube = ctx.rulesets.iter().any(|s| {
        matches!(s, Source::Read { name, kube_proxy: true, .. } if name.starts_with("iptables"))
    });
    let kube = match drops
        .iter()
        .copied()
        .find(|d| kube_forward(d) && d.source.starts_with("iptables"))
    {
        Some(d) => Some(d),
        None if !ipv4_kube => {
            all_drops(&ctx.rulesets).find(|d| kube_forward(d) && d.source.starts_with("ip6tables"))
        }
        None => None,
    };
    let other = drops
        .first()
        .map(|d| format!("{} {}/{}", d.source, d.table, d.chain));
    let verdict = match (mode, kube) {
        (None, _) => "no_kube_proxy",
        (Some(KubeProxyMode::Nftables), _) => "none_by_design",
        (Some(_), Some(_)) => "in_place",
        (Some(_), None) => "absent",
    };
    let evidence = json!({"mode": mode.map(KubeProxyMode::as_str), "invalid_drop": verdict, "be_liberal": liberal, "dropped_by": other});
    let expected = "the mode's INVALID drop, or nf_conntrack_tcp_be_liberal=1";
    let Some(mode) = mode else {
        let c = if !s.read_any {
            Check::unknown(CHECK, "no ruleset could be read")
        } else {
            Check::new(CHECK, Status::Ok, "no kube-proxy").why(
                "no kube-proxy rules here; unnated_reply_protection covers this node's own rules",
            )
        };
        return c.expected(expected).evidence(evidence);
    };
    let value = match (verdict, mode) {
        ("in_place", _) => "in place: KUBE-FORWARD drops ctstate INVALID".to_string(),
        ("none_by_design", _) => "none: the nftables mode installs no INVALID drop".to_string(),
        _ => format!(
            "absent: the {} mode's KUBE-FORWARD drops no INVALID",
            mode.as_str()
        ),
    };
    let protected = match (verdict, liberal, &other) {
        ("in_place", _, _) => Some(
            "out-of-window packets are dropped before they reach the client \
                                    (the connection stalls and retransmits instead of being reset)"
                .to_string(),
        ),
        (_, Some(l), _) if l >= 1 => Some(format!(
            "be_liberal={l}: conntrack marks no out-of-window TCP segment INVALID, so every reply \
             is de-NATed{}",
            if mode == KubeProxyMode::Nftables {
                ""
            } else {
                " (kube-proxy 1.29+ leaves the rule out when be_liberal is set)"
            }
        )),
        (_, _, Some(o)) => Some(format!("a rule of this node's own drops INVALID: {o}")),
        _ => None,
    };
    let liberal_text = liberal.map_or("?".to_string(), |l| l.to_string());
    match protected {
        Some(why) => Check::new(CHECK, Status::Ok, format!("{value}; be_liberal={liberal_text}")).why(why),
        None => Check::new(CHECK, Status::Warn, format!("{value}; be_liberal={liberal_text}"))
            .why(format!(
                "with be_liberal={liberal_text} and no rule dropping INVALID, a backend's out-of-window reply \
                 leaves un-NATed and the client resets the connection (finding unnated_reply; \
                 unnated_reply_protection fails for the same reason)"
            ))
            .fix(
                "sysctl -w net.netfilter.nf_conntrack_tcp_be_liberal=1 and persist it in /etc/sysctl.d/ \
                 (with nf_conntrack in /etc/modules-load.d/), or run kube-proxy with \
                 --conntrack-tcp-be-liberal, which sets it",
            ),
    }
    .expected(expected)
    .evidence(evidence)
}
