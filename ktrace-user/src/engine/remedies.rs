//! The remedies of un-NATed replies and lost entries, worded once per
//! setting rather than once per finding: in a storm every connection gets
//! its finding, and formatting these sentences each time was most of the
//! cost of making one.

use super::finding::UnnatedPath;
use super::proxy_mode::{self, Path};
use super::EngineConfig;

/// The texts, for the settings they were worded for.
#[derive(Debug, Clone)]
pub(super) struct Remedies {
    /// What keeps a connection's conntrack entry alive.
    keepalive: String,
    /// The INVALID drop on FORWARD / INPUT, for IPv4 then IPv6.
    invalid: [[String; 2]; 2],
}

impl Remedies {
    pub fn new(cfg: &EngineConfig) -> Remedies {
        let invalid = |path, ipv6| invalid_remedy(cfg, path, ipv6);
        Remedies {
            keepalive: keepalive_remedy(cfg),
            invalid: [
                [invalid(Path::Forward, false), invalid(Path::Forward, true)],
                [invalid(Path::Input, false), invalid(Path::Input, true)],
            ],
        }
    }

    pub fn keepalive(&self) -> &str {
        &self.keepalive
    }

    /// be_liberal, then the INVALID drop in the form kube-proxy's mode
    /// calls for, on the path the INVALID packet took (a lost entry's is
    /// the keepalive remedy).
    pub fn unnated(&self, path: UnnatedPath, ipv6: bool) -> &str {
        let hook = match path {
            UnnatedPath::ReplyToClient => 0,
            UnnatedPath::ReplyToSnatAddress | UnnatedPath::RequestToLocalService => 1,
            UnnatedPath::EntryLost => return &self.keepalive,
        };
        &self.invalid[hook][usize::from(ipv6)]
    }
}

fn keepalive_remedy(cfg: &EngineConfig) -> String {
    let timeout = cfg
        .ct_timeout_established_s
        .map_or("nf_conntrack_tcp_timeout_established".to_string(), |t| {
            format!("nf_conntrack_tcp_timeout_established ({t}s)")
        });
    let keepalive = cfg.keepalive_s.map_or("TCP keepalive".to_string(), |k| {
        format!("TCP keepalive (tcp_keepalive_time {k}s)")
    });
    format!(
        "keep {keepalive} shorter than {timeout} so idle connections keep their entry; do not flush conntrack on nodes with live Service traffic"
    )
}

/// An iptables rule, or an nft rule where kube-proxy runs in nftables mode.
fn invalid_remedy(cfg: &EngineConfig, hook: Path, ipv6: bool) -> String {
    let max = cfg
        .conntrack_max
        .map(|m| format!(" (nf_conntrack_max is {m})"))
        .unwrap_or_default();
    let drop = proxy_mode::invalid_drop(cfg.kube_proxy_mode, hook, ipv6);
    format!(
        "set net.netfilter.nf_conntrack_tcp_be_liberal=1 (and load nf_conntrack from /etc/modules-load.d/ so the sysctl applies at boot); \
         {drop}; if the table is near full, raise nf_conntrack_max{max}"
    )
}
