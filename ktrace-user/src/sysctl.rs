//! Reading the node's conntrack and TCP settings that findings quote.

/// A number from a /proc file (this network namespace's view), if readable.
pub fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `nf_conntrack_max`: the conntrack table's size.
pub fn conntrack_max() -> Option<u64> {
    read_u64("/proc/sys/net/netfilter/nf_conntrack_max")
}

/// How long an idle established TCP connection keeps its conntrack entry.
pub fn ct_timeout_established_s() -> Option<u64> {
    read_u64("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established")
}

/// When TCP keepalive starts probing an idle connection.
pub fn keepalive_s() -> Option<u64> {
    read_u64("/proc/sys/net/ipv4/tcp_keepalive_time")
}
