//! Source 2: kube-proxy's own rules on this node, no API needed (a
//! `kubectl debug node` shell, a node whose credentials are gone).
//!
//! - iptables mode: `iptables-save -t nat` (and `ip6tables-save`). kube-proxy
//!   comments every Service rule `namespace/name:port` (`pkg/proxy/iptables/proxier.go`):
//!   `-A KUBE-SERVICES -d VIP/32 -p tcp -m comment --comment "ns/svc:port cluster IP"
//!   -m tcp --dport P -j KUBE-SVC-...` (also `external IP`, `loadbalancer IP`)
//!   and `-A KUBE-SEP-... -p tcp -m comment --comment "ns/svc:port" -m tcp -j DNAT
//!   --to-destination IP:P`.
//! - nftables mode: `nft -j list table ip kube-proxy` (and `ip6`). The
//!   `service-ips` map sends `VIP . proto . port` to a chain named
//!   `service-HASH-ns/svc/proto/port` (`pkg/proxy/nftables/proxier.go`,
//!   `servicePortChainNameBase`); `no-endpoint-services` elements carry the
//!   name as their comment; endpoint chains `endpoint-HASH-ns/svc/proto/port__IP/P`
//!   hold `meta l4proto tcp dnat to IP:P`.
//! - IPVS mode puts no names in the kernel: the status says so.
//!
//! The rules are read again every few seconds; the layer is rebuilt only
//! when their text changed (a hash compare).

use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::model::{Interner, Key, Layer, PortRole, Proto, ServiceName};
use super::status::{SourceState, SourceStatus};
use super::{Names, SourceId};
use crate::engine::KubeProxyMode;
use crate::kube_proxy::KubeProxyRules;

pub const SOURCE: &str = "kube-proxy-rules";

/// What one read of the rules gave.
#[derive(Debug, Default)]
pub struct Parsed {
    pub layer: Layer,
    /// Rule lines or elements that looked like kube-proxy's but did not parse.
    pub skipped: u64,
    /// One shared name per Service port (its VIPs and endpoints point to it).
    shared: std::collections::HashMap<String, Arc<ServiceName>>,
}

impl Parsed {
    fn add(&mut self, map: PortRole, key: Key, name: &str, i: &mut Interner) {
        let known = self.shared.get(name).cloned();
        match known.or_else(|| ServiceName::parse(name, i).map(Arc::new)) {
            Some(n) => {
                self.shared
                    .entry(name.to_string())
                    .or_insert_with(|| n.clone());
                self.layer.add_port(map, key, n);
            }
            None => self.skipped += 1,
        }
    }
}

// ------------------------------------------------------------ iptables-save

/// Splits an `iptables-save` rule line into words, as the shell would:
/// `"..."` quoting with `\` escapes (xtables_save_string's output).
pub fn split_words(line: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => cur.push(chars.next()?),
                        c => cur.push(c),
                    }
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Some(words)
}

/// The value after `flag` in a rule's words.
fn arg<'a>(words: &'a [String], flag: &str) -> Option<&'a str> {
    words
        .iter()
        .position(|w| w == flag)
        .and_then(|i| words.get(i + 1))
        .map(String::as_str)
}

/// `10.96.0.10/32` or `fd00::10/128` (a single address).
fn host(s: &str) -> Option<IpAddr> {
    let (ip, len) = s.split_once('/').unwrap_or((s, ""));
    let ip: IpAddr = ip.parse().ok()?;
    let full = if ip.is_ipv4() { "32" } else { "128" };
    (len.is_empty() || len == full).then_some(ip)
}

/// `10.0.1.2:2222` or `[fd00::2]:2222` (`--to-destination`).
fn dnat_target(s: &str) -> Option<SocketAddr> {
    s.parse().ok()
}

/// Parses `iptables-save` output (any tables; only kube-proxy's rules count).
pub fn parse_iptables_save(text: &str, out: &mut Parsed, i: &mut Interner) {
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("-A ") else {
            continue;
        };
        let chain = rest.split_whitespace().next().unwrap_or("");
        let services = chain == "KUBE-SERVICES";
        if !(services || chain.starts_with("KUBE-SEP-")) || !rest.contains("--comment") {
            continue;
        }
        if let Err(()) = iptables_rule(line, services, out, i) {
            out.skipped += 1;
        }
    }
}

/// One kube-proxy rule; `Err` when it has kube-proxy's shape but not its content.
fn iptables_rule(line: &str, services: bool, out: &mut Parsed, i: &mut Interner) -> Result<(), ()> {
    let words = split_words(line).ok_or(())?;
    let comment = arg(&words, "--comment").ok_or(())?;
    let proto = arg(&words, "-p").and_then(Proto::parse);
    if services {
        // "ns/svc:port cluster IP" (or external IP, loadbalancer IP); the
        // masquerade and NodePort rules of this chain are not Service VIPs.
        let Some(name) = ["cluster IP", "external IP", "loadbalancer IP"]
            .iter()
            .find_map(|s| comment.strip_suffix(s))
            .map(str::trim_end)
        else {
            return Ok(());
        };
        let vip = arg(&words, "-d").and_then(host).ok_or(())?;
        let port: u16 = arg(&words, "--dport")
            .and_then(|p| p.parse().ok())
            .ok_or(())?;
        out.add(PortRole::Vip, (vip, port, proto.ok_or(())?), name, i);
        return Ok(());
    }
    // KUBE-SEP-*: only the DNAT rule names the endpoint (the other one marks
    // hairpin traffic for masquerade).
    if arg(&words, "-j") != Some("DNAT") {
        return Ok(());
    }
    let to = arg(&words, "--to-destination")
        .and_then(dnat_target)
        .ok_or(())?;
    out.add(
        PortRole::Endpoint,
        (to.ip(), to.port(), proto.ok_or(())?),
        comment,
        i,
    );
    Ok(())
}

// ------------------------------------------------------------ nft -j

/// Parses `nft -j list table ip|ip6 kube-proxy` output.
pub fn parse_nft_json(text: &str, out: &mut Parsed, i: &mut Interner) -> Result<(), String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("nft -j output: {e}"))?;
    let items = v["nftables"]
        .as_array()
        .ok_or("nft -j output has no \"nftables\" array")?;
    for item in items {
        if let Some(m) = item.get("map") {
            let name = m["name"].as_str().unwrap_or("");
            if name == "service-ips" || name == "no-endpoint-services" {
                for e in m["elem"].as_array().map_or(&[][..], Vec::as_slice) {
                    if nft_service_elem(e, out, i).is_err() {
                        out.skipped += 1;
                    }
                }
            }
        } else if let Some(r) = item.get("rule") {
            let chain = r["chain"].as_str().unwrap_or("");
            if let Some(base) = chain.strip_prefix("endpoint-") {
                if nft_endpoint_rule(base, r, out, i).is_err() {
                    out.skipped += 1;
                }
            }
        }
    }
    Ok(())
}

/// `HASH-ns/svc/proto/port` (a chain name's base, after its prefix) to
/// `ns/svc:port` and the protocol.
fn chain_base_name(base: &str) -> Option<(String, Proto)> {
    let (hash, rest) = base.split_once('-')?;
    if hash.len() != 8 || rest.ends_with("...") {
        return None;
    }
    let mut parts = rest.splitn(4, '/');
    let (ns, svc, proto, port) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let name = if port.is_empty() {
        format!("{ns}/{svc}")
    } else {
        format!("{ns}/{svc}:{port}")
    };
    Some((name, Proto::parse(proto)?))
}

/// An element `VIP . proto . port : goto service-...` (or with a comment).
fn nft_service_elem(e: &Value, out: &mut Parsed, i: &mut Interner) -> Result<(), ()> {
    let (key, verdict) = (e.get(0).ok_or(())?, e.get(1).ok_or(())?);
    let (concat, comment) = match key.get("elem") {
        Some(el) => (&el["val"]["concat"], el["comment"].as_str()),
        None => (&key["concat"], None),
    };
    let ip: IpAddr = concat[0].as_str().and_then(|s| s.parse().ok()).ok_or(())?;
    let proto = concat[1].as_str().and_then(Proto::parse).ok_or(())?;
    let port = concat[2]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .ok_or(())?;
    let target = verdict["goto"]["target"]
        .as_str()
        .or_else(|| verdict["jump"]["target"].as_str());
    let from_chain = target.and_then(|t| {
        ["service-", "local-", "external-"]
            .iter()
            .find_map(|p| t.strip_prefix(p))
            .and_then(chain_base_name)
            .map(|(n, _)| n)
    });
    let name = from_chain.or(comment.map(str::to_string)).ok_or(())?;
    out.add(PortRole::Vip, (ip, port, proto), &name, i);
    Ok(())
}

/// The `dnat to IP:P` rule of an endpoint chain.
fn nft_endpoint_rule(base: &str, r: &Value, out: &mut Parsed, i: &mut Interner) -> Result<(), ()> {
    let exprs = r["expr"].as_array().ok_or(())?;
    let Some(dnat) = exprs.iter().find_map(|x| x.get("dnat")) else {
        return Ok(()); // the masquerade-mark rule
    };
    let svc_part = base.split_once("__").map_or(base, |(s, _)| s);
    let (name, proto) = chain_base_name(svc_part).ok_or(())?;
    let ip: IpAddr = dnat["addr"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or(())?;
    let port = dnat["port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .ok_or(())?;
    out.add(PortRole::Endpoint, (ip, port, proto), &name, i);
    Ok(())
}

// ------------------------------------------------------------ polling

/// Parses one read of the rules: the layer, and the status to print.
pub fn parse(rules: &KubeProxyRules, i: &mut Interner) -> (Parsed, SourceStatus) {
    let mut p = Parsed::default();
    parse_iptables_save(&rules.iptables, &mut p, i);
    let ipt_found = !p.layer.is_empty();
    let mut nft_error = None;
    for doc in rules.nft.iter().filter(|d| !d.trim().is_empty()) {
        if let Err(e) = parse_nft_json(doc, &mut p, i) {
            nft_error = Some(e);
        }
    }
    // The mode whose rules name Services here (IPVS mode names none).
    let mode = match (ipt_found, p.layer.is_empty(), rules.ipvs_services) {
        (true, _, _) => Some(KubeProxyMode::Iptables),
        (false, false, _) => Some(KubeProxyMode::Nftables),
        (false, true, true) => Some(KubeProxyMode::Ipvs),
        _ => None,
    };
    let status = status_of(&p, mode, nft_error);
    (p, status)
}

fn status_of(p: &Parsed, mode: Option<KubeProxyMode>, nft_error: Option<String>) -> SourceStatus {
    let mut s = match mode {
        Some(KubeProxyMode::Ipvs) => SourceStatus::off(
            SOURCE,
            "kube-proxy runs in IPVS mode, which puts no Service names in the kernel: use the Kubernetes API source",
        ),
        None => SourceStatus::off(
            SOURCE,
            match nft_error {
                Some(e) => format!("no kube-proxy rules found ({e})"),
                None => "no kube-proxy rules in this network namespace (no KUBE-SERVICES chain, no kube-proxy nftables table); read again every few seconds".into(),
            },
        ),
        Some(m) => {
            let mut s = SourceStatus::new(SOURCE, SourceState::Live);
            s.mode = m.as_str().into();
            s
        }
    };
    if mode == Some(KubeProxyMode::Ipvs) {
        s.mode = "ipvs".into();
    }
    s.services = p.layer.service_count() as u64;
    s.endpoints = p.layer.counts().endpoints as u64;
    s.skipped = p.skipped;
    s
}

/// Publishes the rules read at start (so the first status line knows),
/// then reads them again every `every` in a thread of its own, publishing
/// a new layer when they changed.
pub fn start(names: Arc<Names>, first: &KubeProxyRules, every: Duration) {
    let mut i = Interner::default();
    let (p, st) = parse(first, &mut i);
    let mut last = fingerprint(&p.layer, p.skipped);
    names.publish(SourceId::Rules, p.layer);
    names.set_status(st);
    let spawned = std::thread::Builder::new()
        .name("ktrace-names-rules".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            let mut i = Interner::default();
            let (p, st) = parse(&KubeProxyRules::read(), &mut i);
            let f = fingerprint(&p.layer, p.skipped);
            if f != last {
                last = f;
                names.publish(SourceId::Rules, p.layer);
            }
            names.set_status(st);
        });
    if let Err(e) = spawned {
        tracing::warn!("kube-proxy rules are not re-read: {e}");
    }
}

/// A hash of what the rules name (the layer is swapped only when it moves).
fn fingerprint(l: &Layer, skipped: u64) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    let mut keys: Vec<(Key, String, bool)> = l
        .iter()
        .flat_map(|(ip, e)| e.ports().map(move |p| ((ip, p.port, p.proto), p)))
        .map(|(k, p)| (k, p.name.to_string(), p.role == PortRole::Vip))
        .collect();
    keys.sort();
    keys.hash(&mut h);
    skipped.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As `iptables-save -t nat` prints what kube-proxy (iptables mode) wrote.
    const SAVE: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables)
*nat
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ERIFXISQEP7F7OF4 - [0:0]
:KUBE-SEP-IT2ZTR26TO4XFPTO - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "kube-system/kube-dns:dns-tcp cluster IP" -m tcp --dport 53 -j KUBE-SVC-ERIFXISQEP7F7OF4
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment "default/kubernetes:https cluster IP" -m tcp --dport 443 -j KUBE-SVC-NPX46M4PTMTKRN6Y
-A KUBE-SERVICES -d 203.0.113.7/32 -p tcp -m comment --comment "web/front loadbalancer IP" -m tcp --dport 80 -j KUBE-EXT-AAAA
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-ERIFXISQEP7F7OF4 -m comment --comment "kube-system/kube-dns:dns-tcp -> 10.244.0.2:53" -j KUBE-SEP-IT2ZTR26TO4XFPTO
-A KUBE-SEP-IT2ZTR26TO4XFPTO -s 10.244.0.2/32 -m comment --comment "kube-system/kube-dns:dns-tcp" -j KUBE-MARK-MASQ
-A KUBE-SEP-IT2ZTR26TO4XFPTO -p tcp -m comment --comment "kube-system/kube-dns:dns-tcp" -m tcp -j DNAT --to-destination 10.244.0.2:53
-A KUBE-SEP-BROKEN -p tcp -m comment --comment "kube-system/kube-dns:dns-tcp" -m tcp -j DNAT --to-destination nonsense
-A KUBE-SERVICES -d 10.96.0.11/32 -p tcp -m comment --comment "Bad Name cluster IP" -m tcp --dport 53 -j KUBE-SVC-X
-A KUBE-SEP-QUOTE -p tcp -m comment --comment "unterminated
COMMIT
"#;

    #[test]
    fn iptables_save_names_vips_and_endpoints() {
        let mut p = Parsed::default();
        parse_iptables_save(SAVE, &mut p, &mut Interner::default());
        let l = &p.layer;
        let name = |a: &str| l.service(a.parse().unwrap(), None).map(|s| s.to_string());
        assert_eq!(
            name("10.96.0.10:53").as_deref(),
            Some("kube-system/kube-dns:dns-tcp")
        );
        assert_eq!(
            name("10.96.0.1:443").as_deref(),
            Some("default/kubernetes:https")
        );
        assert_eq!(name("203.0.113.7:80").as_deref(), Some("web/front"));
        assert_eq!(name("10.96.0.11:53"), None);
        let ep = l.endpoint("10.244.0.2:53".parse().unwrap(), Some(Proto::Tcp));
        assert_eq!(ep.unwrap().to_string(), "kube-system/kube-dns:dns-tcp");
        assert_eq!(l.counts().endpoints, 1);
        // The bad target, the bad name, the unterminated quote: counted.
        assert_eq!(p.skipped, 3);
    }

    #[test]
    fn words_split_as_the_shell_would() {
        let w = split_words(r#"-A X --comment "a \"b\" c" -j Y"#).unwrap();
        assert_eq!(w, ["-A", "X", "--comment", "a \"b\" c", "-j", "Y"]);
        assert!(split_words(r#"--comment "open"#).is_none());
    }

    #[test]
    fn nft_json_names_vips_and_endpoints() {
        let doc = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
 {"table": {"family": "ip", "name": "kube-proxy", "handle": 1}},
 {"map": {"family": "ip", "name": "service-ips", "table": "kube-proxy", "type": ["ipv4_addr", "inet_proto", "inet_service"], "handle": 3, "map": "verdict",
   "elem": [[{"concat": ["172.30.0.41", "tcp", 80]}, {"goto": {"target": "service-ULMVA6XW-ns1/svc1/tcp/p80"}}],
            [{"concat": ["172.30.0.43", "udp", 53]}, {"goto": {"target": "local-ABCDEFGH-ns1/dns/udp/"}}],
            [{"concat": ["nonsense", "tcp", 80]}, {"goto": {"target": "service-ULMVA6XW-ns1/svc1/tcp/p80"}}]]}},
 {"map": {"family": "ip", "name": "no-endpoint-services", "table": "kube-proxy", "type": ["ipv4_addr", "inet_proto", "inet_service"], "handle": 4, "map": "verdict",
   "elem": [[{"elem": {"val": {"concat": ["172.30.0.42", "tcp", 80]}, "comment": "ns2/svc2:p80"}}, {"goto": {"target": "reject-chain"}}]]}},
 {"rule": {"family": "ip", "table": "kube-proxy", "chain": "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80", "handle": 6,
   "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "10.180.0.1"}}, {"jump": {"target": "mark-for-masquerade"}}]}},
 {"rule": {"family": "ip", "table": "kube-proxy", "chain": "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80", "handle": 7,
   "expr": [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}, {"dnat": {"addr": "10.180.0.1", "port": 80}}]}}]}"#;
        let mut p = Parsed::default();
        parse_nft_json(doc, &mut p, &mut Interner::default()).unwrap();
        let l = &p.layer;
        let name = |a: &str| l.service(a.parse().unwrap(), None).unwrap().to_string();
        assert_eq!(name("172.30.0.41:80"), "ns1/svc1:p80");
        assert_eq!(name("172.30.0.43:53"), "ns1/dns");
        assert_eq!(name("172.30.0.42:80"), "ns2/svc2:p80");
        let ep = l.endpoint("10.180.0.1:80".parse().unwrap(), Some(Proto::Tcp));
        assert_eq!(ep.unwrap().to_string(), "ns1/svc1:p80");
        assert_eq!(p.skipped, 1);
        assert!(parse_nft_json("not json", &mut p, &mut Interner::default()).is_err());
    }
}
