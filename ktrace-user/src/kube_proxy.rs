//! kube-proxy's rules on the running node, in the current network
//! namespace, read by the same tools kube-proxy writes them with: once at
//! start for both the engine (the mode, which words a remedy's INVALID
//! drop) and the names source (its first layer), then by the names source
//! alone every few seconds.
//!
//! Both address families are read: a node with IPv6 Services only has its
//! `KUBE-SERVICES` chain in `ip6tables`' nat table, or an `ip6` table.
//! `doctor` reads whole rulesets instead (it also audits dumps of other
//! nodes); its `kube_proxy_mode` check names the mode the same way.

use crate::engine::KubeProxyMode;

/// The text of kube-proxy's rules, as read once.
#[derive(Debug, Default)]
pub struct KubeProxyRules {
    /// `iptables-save -t nat` then `ip6tables-save -t nat`.
    pub iptables: String,
    /// `nft -j list table ip|ip6 kube-proxy`, one JSON document each table.
    pub nft: Vec<String>,
    /// IPVS virtual services are listed in `/proc/net/ip_vs`.
    pub ipvs_services: bool,
    /// IPVS mode's dummy interface, which holds every Service address.
    pub kube_ipvs0: bool,
    /// At least one tool answered (an absent nftables table counts), so an
    /// empty result means no kube-proxy rather than unknown.
    pub read_any: bool,
}

/// How a tool answered.
enum Ran {
    Printed(String),
    /// It ran and refused (an nftables table that does not exist).
    Absent,
    /// Not installed, no permission, or any other failure.
    Failed,
}

fn run(tool: &str, args: &[&str]) -> Ran {
    match crate::tool::run_tool(tool, args) {
        Ok(text) => Ran::Printed(text),
        Err(why) if why.contains("No such file or directory") => Ran::Absent,
        Err(_) => Ran::Failed,
    }
}

impl KubeProxyRules {
    /// Reads the rules now.
    pub fn read() -> KubeProxyRules {
        let mut r = KubeProxyRules::default();
        for tool in ["iptables-save", "ip6tables-save"] {
            match run(tool, &["-t", "nat"]) {
                Ran::Printed(text) => {
                    r.read_any = true;
                    r.iptables.push_str(&text);
                }
                Ran::Absent | Ran::Failed => {}
            }
        }
        for family in ["ip", "ip6"] {
            match run("nft", &["-j", "list", "table", family, "kube-proxy"]) {
                Ran::Printed(doc) => {
                    r.read_any = true;
                    r.nft.push(doc);
                }
                Ran::Absent => r.read_any = true,
                Ran::Failed => {}
            }
        }
        r.ipvs_services =
            std::fs::read_to_string("/proc/net/ip_vs").is_ok_and(|s| s.lines().count() > 3);
        r.kube_ipvs0 = std::path::Path::new("/sys/class/net/kube-ipvs0").exists();
        r
    }

    /// kube-proxy's mode, as doctor's `kube_proxy_mode` names it: IPVS,
    /// nftables, then iptables (IPVS mode also writes `KUBE-SERVICES`).
    pub fn mode(&self) -> KubeProxyMode {
        if self.kube_ipvs0 || self.ipvs_services {
            KubeProxyMode::Ipvs
        } else if !self.nft.is_empty() {
            KubeProxyMode::Nftables
        } else if self
            .iptables
            .lines()
            .any(|l| l.starts_with(":KUBE-SERVICES "))
        {
            KubeProxyMode::Iptables
        } else if self.read_any {
            KubeProxyMode::None
        } else {
            KubeProxyMode::Unknown
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mode_goes_by_precedence_and_either_family() {
        let v6_nat = "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\nCOMMIT\n";
        let mut r = KubeProxyRules {
            read_any: true,
            ..Default::default()
        };
        assert_eq!(r.mode(), KubeProxyMode::None);
        // `ip6tables-save` alone shows it on an IPv6-only node.
        r.iptables = v6_nat.into();
        assert_eq!(r.mode(), KubeProxyMode::Iptables);
        r.nft.push("{\"nftables\": []}".into());
        assert_eq!(r.mode(), KubeProxyMode::Nftables);
        r.kube_ipvs0 = true;
        assert_eq!(r.mode(), KubeProxyMode::Ipvs);
        assert_eq!(KubeProxyRules::default().mode(), KubeProxyMode::Unknown);
    }
}
