//! kube-proxy's rules for the lab's Services, written as kube-proxy writes
//! them, so that a lab node looks like a Kubernetes node in a given proxy
//! mode (to ktrace's names source and to `ktrace doctor`).
//!
//! nftables mode follows `pkg/proxy/nftables/proxier.go`: one `ip
//! kube-proxy` table; base chains `filter-*` at `dstnat - 10` and `nat-*`;
//! `services` dispatching through the `service-ips` verdict map to a
//! `service-HASH-ns/name/proto/port` chain, which picks an
//! `endpoint-HASH-...__IP/PORT` chain (`numgen random mod N vmap`) whose
//! last rule DNATs; Services without endpoints in `no-endpoint-services`
//! (reject). The only `ct state` matches are `ct state new` jumps: unlike
//! the iptables mode, no rule drops ctstate INVALID.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::{Lab, VIP};

/// One Service port as kube-proxy sees it.
pub struct ServicePort<'a> {
    /// `namespace/name`.
    pub name: &'a str,
    /// The port's name (`grpc`), as in `namespace/name:grpc`.
    pub port_name: &'a str,
    pub vip: &'a str,
    pub port: u16,
    /// `IP:port` of each ready endpoint; none makes the Service reject.
    pub endpoints: &'a [String],
}

impl ServicePort<'_> {
    /// `ns/name/tcp/port`, the base of kube-proxy's chain names.
    fn base(&self) -> String {
        format!("{}/tcp/{}", self.name, self.port_name)
    }

    /// `ns/name:port`, kube-proxy's ServicePortName.
    pub fn port_name(&self) -> String {
        format!("{}:{}", self.name, self.port_name)
    }
}

/// The lab Service's port as kube-proxy names it in its rules.
pub const SERVICE: &str = "payments/ledger:grpc";

/// Loads `iptables-save` output into the node's tables without flushing
/// what else is there.
pub const IPTABLES_RESTORE: &[&str] = &["iptables-restore", "--noflush"];

/// kube-proxy's iptables-mode rules for [`SERVICE`] (the lab's VIP, port
/// 2222) with one endpoint (as `iptables-save` prints what
/// `pkg/proxy/iptables/proxier.go` writes), plus a rule whose comment is
/// not a Service name (must be skipped, counted).
pub fn iptables_rules(backend: &str) -> String {
    format!(
        r#"*nat
:KUBE-SERVICES - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-LEDGER2GRPC7XQWZ - [0:0]
:KUBE-SEP-LEDGERA4BHT2KQ5M - [0:0]
:KUBE-SEP-BROKENXXXXXXXXXX - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-SERVICES -d {VIP}/32 -p tcp -m comment --comment "{SERVICE} cluster IP" -m tcp --dport 2222 -j KUBE-SVC-LEDGER2GRPC7XQWZ
-A KUBE-SVC-LEDGER2GRPC7XQWZ -m comment --comment "{SERVICE} -> {backend}:2222" -j KUBE-SEP-LEDGERA4BHT2KQ5M
-A KUBE-SEP-LEDGERA4BHT2KQ5M -s {backend}/32 -m comment --comment "{SERVICE}" -j KUBE-MARK-MASQ
-A KUBE-SEP-LEDGERA4BHT2KQ5M -p tcp -m comment --comment "{SERVICE}" -m tcp -j DNAT --to-destination {backend}:2222
-A KUBE-SEP-BROKENXXXXXXXXXX -p tcp -m comment --comment "Not A Service Name" -m tcp -j DNAT --to-destination 10.0.1.9:2222
COMMIT
"#
    )
}

/// A one-backend lab whose node namespace has kube-proxy's rules instead
/// of the lab's plain DNAT: `rules` fed to `cmd` (iptables-restore or nft).
pub fn lab_with_rules(tag: &str, cmd: &[&str], rules: &str) -> Lab {
    let lab = Lab::new(tag, 1);
    install(&lab, cmd, rules);
    lab
}

/// kube-proxy's chain-name hash prefix: eight base32 characters. The real
/// one is the start of the SHA-256 of the name; any eight such characters
/// give the same shape, which is all a reader of the rules relies on.
fn hash(name: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    (0..8)
        .map(|i| ALPHABET[((h >> (i * 5)) & 31) as usize] as char)
        .collect()
}

/// The table's skeleton (`setupNFTables`): base chains, jump chains,
/// masquerading, the no-endpoint, firewall and dispatch maps.
fn skeleton() -> String {
    let mut s = String::from("add table ip kube-proxy { comment \"rules for kube-proxy\" ; }\n");
    // kube-proxy says `dstnat - 10`, `dstnat` and `srcnat`; nft before 1.0.7
    // takes those names on the prerouting/postrouting hooks only, so the
    // same priorities are given as numbers (dstnat = -100, srcnat = 100).
    for (name, kind, hook, prio) in [
        ("filter-prerouting", "filter", "prerouting", "-110"),
        ("filter-input", "filter", "input", "-110"),
        ("filter-forward", "filter", "forward", "-110"),
        ("filter-output", "filter", "output", "-110"),
        ("nat-prerouting", "nat", "prerouting", "-100"),
        ("nat-output", "nat", "output", "-100"),
        ("nat-postrouting", "nat", "postrouting", "100"),
    ] {
        let _ = writeln!(
            s,
            "add chain ip kube-proxy {name} {{ type {kind} hook {hook} priority {prio} ; }}"
        );
    }
    for (dst, src, extra) in [
        ("endpoints-check", "filter-input", "ct state new "),
        ("endpoints-check", "filter-forward", "ct state new "),
        ("endpoints-check", "filter-output", "ct state new "),
        ("firewall-check", "filter-prerouting", "ct state new "),
        ("firewall-check", "filter-output", "ct state new "),
        ("services", "nat-output", ""),
        ("services", "nat-prerouting", ""),
        ("masquerading", "nat-postrouting", ""),
    ] {
        let _ = writeln!(s, "add chain ip kube-proxy {dst}");
        let _ = writeln!(s, "add rule ip kube-proxy {src} {extra}jump {dst}");
    }
    s.push_str(
        "add chain ip kube-proxy mark-for-masquerade
add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000
add rule ip kube-proxy masquerading mark and 0x4000 == 0 return
add rule ip kube-proxy masquerading mark set mark xor 0x4000
add rule ip kube-proxy masquerading masquerade fully-random
add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }
add map ip kube-proxy no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }
add chain ip kube-proxy reject-chain { comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }
add rule ip kube-proxy reject-chain reject
add rule ip kube-proxy endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
add rule ip kube-proxy endpoints-check fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports
add map ip kube-proxy firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }
add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }
add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports
",
    );
    s
}

/// One Service port's chains and map elements (`syncProxyRules`).
fn service(s: &mut String, svc: &ServicePort) {
    let key = format!("{} . tcp . {}", svc.vip, svc.port);
    if svc.endpoints.is_empty() {
        let _ = writeln!(
            s,
            "add element ip kube-proxy no-endpoint-services {{ {key} comment \"{}\" : goto reject-chain }}",
            svc.port_name()
        );
        return;
    }
    let base = svc.base();
    let chain = format!("service-{}-{base}", hash(&base));
    let _ = writeln!(s, "add chain ip kube-proxy {chain}");
    let mut vmap = Vec::new();
    for (i, ep) in svc.endpoints.iter().enumerate() {
        let (ip, port) = ep.rsplit_once(':').expect("endpoint is IP:port");
        let ep_base = format!("{base}__{ip}/{port}");
        let ep_chain = format!("endpoint-{}-{ep_base}", hash(&ep_base));
        let _ = writeln!(s, "add chain ip kube-proxy {ep_chain}");
        let _ = writeln!(
            s,
            "add rule ip kube-proxy {ep_chain} ip saddr {ip} jump mark-for-masquerade"
        );
        let _ = writeln!(
            s,
            "add rule ip kube-proxy {ep_chain} meta l4proto tcp dnat to {ep}"
        );
        vmap.push(format!("{i} : goto {ep_chain}"));
    }
    let _ = writeln!(
        s,
        "add rule ip kube-proxy {chain} numgen random mod {} vmap {{ {} }}",
        vmap.len(),
        vmap.join(", ")
    );
    let _ = writeln!(
        s,
        "add element ip kube-proxy service-ips {{ {key} : goto {chain} }}"
    );
}

/// The whole `ip kube-proxy` table for these Service ports, as `nft -f`
/// input.
pub fn nftables_ruleset(services: &[ServicePort]) -> String {
    let mut s = skeleton();
    for svc in services {
        service(&mut s, svc);
    }
    s
}

/// Replaces the lab's plain DNAT in the node namespace with `rules`, fed
/// to `cmd` on stdin (`nft -f -`, `iptables-restore --noflush`).
pub fn install(lab: &Lab, cmd: &[&str], rules: &str) {
    lab.exec_ok(&lab.node, &["iptables", "-t", "nat", "-F", "PREROUTING"]);
    feed(&lab.node, cmd, rules);
}

/// Runs `cmd` in network namespace `ns` with `rules` on its stdin; panics
/// when it fails.
pub fn feed(ns: &str, cmd: &[&str], rules: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "{cmd:?} failed in {ns}");
}

/// Whether `nft` runs here (kube-proxy's nftables mode cannot be set up
/// without it; `scripts/setup.sh` installs it).
pub fn have_nft() -> bool {
    Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// kube-proxy's iptables mode as ktrace (and `doctor`) tell it: a
/// `KUBE-SERVICES` chain in the node's IPv4 `nat` table, jumped to from
/// `PREROUTING`. It holds no rule: the lab's own DNAT stays in front.
pub fn iptables_mode(lab: &Lab) {
    for rule in [
        &["-N", "KUBE-SERVICES"][..],
        &["-A", "PREROUTING", "-j", "KUBE-SERVICES"],
    ] {
        let mut args = vec!["iptables", "-t", "nat"];
        args.extend_from_slice(rule);
        lab.exec_ok(&lab.node, &args);
    }
}
