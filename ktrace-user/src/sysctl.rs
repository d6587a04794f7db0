//! Reading the node's conntrack and TCP settings that findings quote.

use crate::engine::EngineConfig;

/// A number from a /proc file (this network namespace's view), if readable.
pub fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Fills the settings a remedy quotes, from this network namespace's /proc.
pub fn fill_engine_config(cfg: &mut EngineConfig) {
    cfg.conntrack_max = read_u64("/proc/sys/net/netfilter/nf_conntrack_max");
    cfg.ct_timeout_established_s =
        read_u64("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established");
    cfg.keepalive_s = read_u64("/proc/sys/net/ipv4/tcp_keepalive_time");
}
