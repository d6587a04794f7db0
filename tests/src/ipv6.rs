//! The IPv6 side of a dual-stack Service in the lab: the same namespaces
//! and links, with ULA addresses and ip6tables DNAT.
//!
//! ```text
//! client fd00::2 -- fd00::1 node fd00:1::1 -- server fd00:1::2, fd00:1::3 (:2222)
//!                   forwarding, DNAT [fd00:96::10]:2222 -> backends
//! ```

use crate::{Family, Lab};

pub const IPV6: Family = Family {
    iptables: "ip6tables",
    vip: "fd00:96::10",
    client_ip: "fd00::2",
    backends: ["fd00:1::2", "fd00:1::3"],
    refusing_vip: "fd00:96::11",
    any: "::",
    node_server_ip: "fd00:1::1",
    server_net: "fd00:1::/64",
    host_bits: 128,
};

impl Lab {
    /// Adds IPv6 to the lab, DNATs the IPv6 VIP:2222 to the first
    /// `backends` IPv6 backends, and makes IPv6 the family the helpers use
    /// from here on. `Err(why)` when the kernel has no IPv6 NAT.
    pub fn ipv6(&mut self, backends: usize) -> Result<(), String> {
        let (c, n, s) = (self.client.clone(), self.node.clone(), self.server.clone());
        let probe = self.exec(&n, &["ip6tables", "-t", "nat", "-S"]);
        if !probe.status.success() {
            return Err(format!(
                "this kernel has no IPv6 NAT (ip6tables -t nat: {})",
                String::from_utf8_lossy(&probe.stderr).trim()
            ));
        }
        let addrs = [
            (&c, "fd00::2/64", "veth-c"),
            (&n, "fd00::1/64", "veth-nc"),
            (&n, "fd00:1::1/64", "veth-ns"),
            (&s, "fd00:1::2/64", "veth-s"),
            (&s, "fd00:1::3/64", "veth-s"),
        ];
        for (ns, addr, dev) in addrs {
            // nodad: usable at once, not after duplicate address detection.
            self.exec_ok(ns, &["ip", "-6", "addr", "add", addr, "dev", dev, "nodad"]);
        }
        self.exec_ok(
            &c,
            &["ip", "-6", "route", "add", "default", "via", "fd00::1"],
        );
        self.exec_ok(
            &s,
            &["ip", "-6", "route", "add", "default", "via", "fd00:1::1"],
        );
        self.exec_ok(&n, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
        self.family = &IPV6;
        self.set_backends(backends);
        Ok(())
    }
}
