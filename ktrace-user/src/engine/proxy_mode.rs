//! kube-proxy's mode on the node, as known when ktrace started, and the
//! INVALID drop a remedy can offer in that mode: kube-proxy's iptables and
//! IPVS modes write iptables rules (and drop ctstate INVALID in
//! `KUBE-FORWARD`), the nftables mode writes nftables rules and installs
//! no INVALID drop, so the fix there is an nft rule of the admin's own.

use serde::{Deserialize, Serialize};

/// kube-proxy's mode (`doctor`'s `kube_proxy_mode` check finds it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KubeProxyMode {
    Iptables,
    Nftables,
    Ipvs,
    /// The rules were read and hold no kube-proxy (none runs here, or a
    /// CNI replaces it).
    None,
    /// Not known: the rules could not be read, or a recording made before
    /// ktrace detected the mode.
    #[default]
    Unknown,
}

impl KubeProxyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            KubeProxyMode::Iptables => "iptables",
            KubeProxyMode::Nftables => "nftables",
            KubeProxyMode::Ipvs => "ipvs",
            KubeProxyMode::None => "none",
            KubeProxyMode::Unknown => "unknown",
        }
    }
}

/// Where the INVALID packet goes: through the node (`forward`), or to the
/// node itself (`input`: the SNAT address, a Service address held locally).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Forward,
    Input,
}

/// The rule that drops ctstate INVALID on `path`, worded for `mode`;
/// `ipv6` picks `ip6tables` for the iptables forms (the nft form, in an
/// `inet` table, covers both families).
pub fn invalid_drop(mode: KubeProxyMode, path: Path, ipv6: bool) -> String {
    let (chain, hook) = match path {
        Path::Forward => ("FORWARD", "forward"),
        Path::Input => ("INPUT", "input"),
    };
    let tool = if ipv6 { "ip6tables" } else { "iptables" };
    let iptables = format!("{tool} -I {chain} -m conntrack --ctstate INVALID -j DROP");
    // A table of the admin's own, which kube-proxy never rewrites; its
    // chain at filter priority (0) runs after conntrack (-200) has given
    // the verdict.
    let nft = format!(
        "nft add table inet invalid-drop; \
         nft add chain inet invalid-drop {hook} '{{ type filter hook {hook} priority filter; }}'; \
         nft add rule inet invalid-drop {hook} ct state invalid drop"
    );
    match (mode, path) {
        (KubeProxyMode::Iptables | KubeProxyMode::Ipvs, Path::Forward) => format!(
            "or put back kube-proxy's INVALID drop (its {} mode drops ctstate INVALID in \
             KUBE-FORWARD, but leaves it out since Kubernetes 1.29 when be_liberal is set): {iptables}",
            mode.as_str()
        ),
        (KubeProxyMode::Iptables | KubeProxyMode::Ipvs, Path::Input) => format!(
            "the INVALID packet is addressed to the node itself, so kube-proxy's KUBE-FORWARD \
             drop ({} mode) does not catch it: drop ctstate INVALID in INPUT as well ({iptables})",
            mode.as_str()
        ),
        (KubeProxyMode::Nftables, _) => format!(
            "kube-proxy's nftables mode installs no ctstate INVALID drop (run it with \
             --conntrack-tcp-be-liberal to set be_liberal), so drop INVALID on the {hook} hook in \
             a table of your own: {nft}"
        ),
        (KubeProxyMode::None | KubeProxyMode::Unknown, _) => format!(
            "or drop ctstate INVALID on the {hook} path (kube-proxy's mode {}): {iptables}, or \
             with nftables `ct state invalid drop` in a filter chain on the {hook} hook",
            if mode == KubeProxyMode::None {
                "none found"
            } else {
                "unknown"
            }
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mode_gets_its_own_rule() {
        let ipt = invalid_drop(KubeProxyMode::Iptables, Path::Forward, false);
        assert!(ipt.contains("iptables -I FORWARD -m conntrack --ctstate INVALID -j DROP"));
        assert!(!ipt.contains("nft "), "{ipt}");
        let ipvs = invalid_drop(KubeProxyMode::Ipvs, Path::Input, false);
        assert!(ipvs.contains("iptables -I INPUT"), "{ipvs}");
        assert!(ipvs.contains("ipvs mode"), "{ipvs}");
        let nft = invalid_drop(KubeProxyMode::Nftables, Path::Input, true);
        assert!(
            nft.contains("type filter hook input priority filter"),
            "{nft}"
        );
        assert!(nft.contains("ct state invalid drop"), "{nft}");
        assert!(!nft.contains("iptables"), "{nft}");
        let v6 = invalid_drop(KubeProxyMode::Iptables, Path::Forward, true);
        assert!(v6.contains("ip6tables -I FORWARD"), "{v6}");
        for mode in [KubeProxyMode::None, KubeProxyMode::Unknown] {
            let both = invalid_drop(mode, Path::Forward, false);
            assert!(both.contains("iptables -I FORWARD"), "{both}");
            assert!(both.contains("ct state invalid drop"), "{both}");
        }
    }

    #[test]
    fn a_recording_without_the_mode_reads_as_unknown() {
        #[derive(Deserialize)]
        struct Cfg {
            #[serde(default)]
            mode: KubeProxyMode,
        }
        let c: Cfg = serde_json::from_str("{}").unwrap();
        assert_eq!(c.mode, KubeProxyMode::Unknown);
        let c: Cfg = serde_json::from_str(r#"{"mode":"nftables"}"#).unwrap();
        assert_eq!(c.mode, KubeProxyMode::Nftables);
    }
}
