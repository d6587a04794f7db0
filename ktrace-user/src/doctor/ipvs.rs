//! Check 5: IPVS (kube-proxy's IPVS mode), when the ip_vs module is there.
//!
//! Settings from `/proc/sys/net/ipv4/vs/`: `expire_quiescent_template`,
//! `expire_nodest_conn`, `conntrack`, `conn_reuse_mode`; and real servers of
//! weight 0 that still have connections, from `/proc/net/ip_vs`:
//!
//! ```text
//! IP Virtual Server version 1.2.1 (size=4096)
//! Prot LocalAddress:Port Scheduler Flags
//!   -> RemoteAddress:Port Forward Weight ActiveConn InActConn
//! TCP  0A600001:0050 rr persistent 10800 FFFFFFFF
//!   -> 0AF40102:1F90      Masq    0      3          12
//! TCP  [fd00::1]:0050 rr
//!   -> [fd00::2]:1F90      Masq    1      0          0
//! FWM  00000001 wrr
//! ```
//!
//! IPv4 addresses and all ports are hexadecimal; IPv6 addresses are printed
//! in brackets. `persistent TIMEOUT [NETMASK]` marks a persistent service
//! (kube-proxy's `sessionAffinity: ClientIP`).
//!
//! When ip_vs is not loaded, a single `ipvs` check says so.

use std::net::Ipv4Addr;

use serde::Serialize;
use serde_json::json;

use super::{Check, Ctx, Fs, ReadError, Status};
use crate::support::kernel_version;

const VS: &str = "/proc/sys/net/ipv4/vs";
const IP_VS: &str = "/proc/net/ip_vs";

/// A virtual service of `/proc/net/ip_vs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    /// `TCP`, `UDP`, `SCTP` or `FWM`.
    pub protocol: String,
    /// `10.96.0.1:80`, `[fd00::1]:80`, or `fwmark 1`.
    pub address: String,
    pub scheduler: String,
    /// Persistence timeout in seconds, when persistent.
    pub persistent: Option<u64>,
    pub real_servers: Vec<RealServer>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RealServer {
    pub address: String,
    pub forward: String,
    pub weight: i64,
    pub active: u64,
    pub inactive: u64,
}

/// Parses `/proc/net/ip_vs`.
pub fn parse_ip_vs(text: &str) -> Result<Vec<Service>, String> {
    let mut services: Vec<Service> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty()
            || line.starts_with("IP Virtual Server")
            || line.starts_with("Prot ")
            || line.starts_with("-> RemoteAddress")
        {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"->") {
            let svc = services
                .last_mut()
                .ok_or_else(|| format!("line {n}: a real server before any service"))?;
            let [_, addr, fwd, weight, active, inactive, ..] = words.as_slice() else {
                return Err(format!("line {n}: a real server line needs 5 fields"));
            };
            svc.real_servers.push(RealServer {
                address: decode_endpoint(addr)
                    .ok_or_else(|| format!("line {n}: bad address {addr:?}"))?,
                forward: fwd.to_string(),
                weight: weight
                    .parse()
                    .map_err(|_| format!("line {n}: bad weight {weight:?}"))?,
                active: active
                    .parse()
                    .map_err(|_| format!("line {n}: bad active count {active:?}"))?,
                inactive: inactive
                    .parse()
                    .map_err(|_| format!("line {n}: bad inactive count {inactive:?}"))?,
            });
            continue;
        }
        let [proto, addr, sched, rest @ ..] = words.as_slice() else {
            return Err(format!(
                "line {n}: not a service line: {:?}",
                super::shorten(line, 60)
            ));
        };
        let address = if *proto == "FWM" {
            u32::from_str_radix(addr, 16)
                .map(|m| format!("fwmark {m}"))
                .map_err(|_| format!("line {n}: bad fwmark {addr:?}"))?
        } else if matches!(*proto, "TCP" | "UDP" | "SCTP" | "AH" | "ESP") {
            decode_endpoint(addr).ok_or_else(|| format!("line {n}: bad address {addr:?}"))?
        } else {
            return Err(format!("line {n}: unknown protocol {proto:?}"));
        };
        let persistent = match rest.iter().position(|w| *w == "persistent") {
            Some(p) => Some(
                rest.get(p + 1)
                    .and_then(|t| t.parse().ok())
                    .ok_or_else(|| format!("line {n}: bad persistence timeout"))?,
            ),
            None => None,
        };
        services.push(Service {
            protocol: proto.to_string(),
            address,
            scheduler: sched.to_string(),
            persistent,
            real_servers: Vec::new(),
        });
    }
    Ok(services)
}

/// `0A600001:0050` → `10.96.0.1:80`; `[fd00::1]:0050` → `[fd00::1]:80`.
fn decode_endpoint(s: &str) -> Option<String> {
    let (addr, port) = s.rsplit_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    if addr.starts_with('[') && addr.ends_with(']') && addr.len() > 2 {
        let inner = &addr[1..addr.len() - 1];
        let ip: std::net::Ipv6Addr = inner.parse().ok()?;
        return Some(format!("[{ip}]:{port}"));
    }
    if addr.len() != 8 {
        return None;
    }
    let ip = Ipv4Addr::from(u32::from_str_radix(addr, 16).ok()?);
    Some(format!("{ip}:{port}"))
}

struct Settings {
    quiescent: Result<u64, ReadError>,
    nodest: Result<u64, ReadError>,
    conntrack: Result<u64, ReadError>,
    reuse: Result<u64, ReadError>,
}

fn vs_key(fs: &Fs, name: &str) -> Result<u64, ReadError> {
    fs.sysctl_u64(&format!("net.ipv4.vs.{name}"))
}

pub fn checks(ctx: &Ctx) -> Vec<Check> {
    let fs = &ctx.fs;
    let present = fs.is_dir(VS) || fs.exists(IP_VS);
    if !present {
        return vec![if fs.is_dir("/proc/sys/net") || fs.is_dir("/proc/net") {
            Check::new("ipvs", Status::Ok, "ip_vs not loaded")
                .expected("nothing to check without IPVS")
                .why(format!(
                    "no {} and no {}: kube-proxy is not in IPVS mode on this node",
                    fs.display(VS),
                    fs.display(IP_VS)
                ))
        } else {
            Check::unknown(
                "ipvs",
                format!(
                    "{} does not exist: the root has no /proc (incomplete dump?)",
                    fs.display("/proc/net")
                ),
            )
        }];
    }
    let s = Settings {
        quiescent: vs_key(fs, "expire_quiescent_template"),
        nodest: vs_key(fs, "expire_nodest_conn"),
        conntrack: vs_key(fs, "conntrack"),
        reuse: vs_key(fs, "conn_reuse_mode"),
    };
    vec![
        check_quiescent(&s),
        check_nodest(&s),
        check_conntrack(&s),
        check_reuse(ctx, &s),
        check_weight0(ctx, &s),
    ]
}

/// A setting that protects when it is 1: ok with `on`'s why, else a
/// warning with `off`'s why and the fix.
fn check_enabled(
    check: &str,
    setting: &Result<u64, ReadError>,
    on: &str,
    (off, fix): (&str, &str),
) -> Check {
    let (v, status, why, fix) = match setting {
        Err(e) => return Check::unknown(check, e.to_string()),
        Ok(v) if *v >= 1 => (v, Status::Ok, on, ""),
        Ok(v) => (v, Status::Warn, off, fix),
    };
    Check::new(check, status, v.to_string())
        .expected("1")
        .why(why)
        .fix(fix)
}

fn check_quiescent(s: &Settings) -> Check {
    check_enabled(
        "ipvs_expire_quiescent_template",
        &s.quiescent,
        "a persistence template whose real server has weight 0 is expired, so new connections go to servers in rotation",
        (
            "with 0, a persistent service (sessionAffinity: ClientIP) keeps sending a client's new connections to a real server of weight 0 (terminating pod) until the template times out; they are reset when it goes (finding quiescent_backend)",
            "sysctl -w net.ipv4.vs.expire_quiescent_template=1 (kube-proxy's IPVS mode sets it; something reset it)",
        ),
    )
}

fn check_nodest(s: &Settings) -> Check {
    check_enabled(
        "ipvs_expire_nodest_conn",
        &s.nodest,
        "connections whose real server was deleted are expired at their next packet, so clients reconnect",
        (
            "with 0, packets of connections whose real server was deleted are dropped silently until the connection times out: clients hang instead of reconnecting",
            "sysctl -w net.ipv4.vs.expire_nodest_conn=1 (kube-proxy's IPVS mode sets it)",
        ),
    )
}

fn check_conntrack(s: &Settings) -> Check {
    check_enabled(
        "ipvs_conntrack",
        &s.conntrack,
        "IPVS connections are tracked by conntrack, which kube-proxy's masquerade (SNAT) rules and the INVALID-drop rule rely on",
        (
            "with 0, conntrack does not follow IPVS connections: kube-proxy's iptables masquerade rules for NodePorts and hairpin traffic do not apply, and replies leave un-NATed",
            "sysctl -w net.ipv4.vs.conntrack=1 (kube-proxy's IPVS mode sets it)",
        ),
    )
}

fn check_reuse(ctx: &Ctx, s: &Settings) -> Check {
    const CHECK: &str = "ipvs_conn_reuse_mode";
    let v = match &s.reuse {
        Err(e) => return Check::unknown(CHECK, e.to_string()),
        Ok(v) => *v,
    };
    let version = ctx.support.release.as_deref().and_then(kernel_version);
    let old_kernel = version.is_some_and(|v| v < (5, 9));
    let conntrack_on = s.conntrack.as_ref().is_ok_and(|c| *c >= 1);
    if v == 0 {
        Check::new(CHECK, Status::Warn, "0")
            .expected(if old_kernel { "1 (0 trades this for a 1 s delay on kernels before 5.9)" } else { "1" })
            .why("with 0, a new connection that reuses a client port still in IPVS's table goes to the previous connection's real server, even one of weight 0 or being removed: during rolling updates clients are sent to terminating pods and reset")
            .fix(if old_kernel {
                "upgrade to kernel 5.9+ and set net.ipv4.vs.conn_reuse_mode=1 (before 5.9, 1 with conntrack=1 delays reused connections by 1 s)"
            } else {
                "sysctl -w net.ipv4.vs.conn_reuse_mode=1 (kube-proxy sets 0 only on kernels before 5.9)"
            })
    } else if old_kernel && conntrack_on {
        Check::new(CHECK, Status::Warn, v.to_string())
            .expected("1 on kernel 5.9+")
            .why("before kernel 5.9, rescheduling a reused port with net.ipv4.vs.conntrack=1 drops the first SYN: such connections take 1 s more to open")
            .fix("upgrade to kernel 5.9+, or accept the delay (0 sends reused ports to old real servers)")
    } else {
        Check::new(CHECK, Status::Ok, v.to_string())
            .expected("1")
            .why("a new connection reusing a client port is scheduled afresh when the old one is in TIME_WAIT")
    }
}

fn check_weight0(ctx: &Ctx, s: &Settings) -> Check {
    const CHECK: &str = "ipvs_weight0_backends";
    let fs = &ctx.fs;
    let services = match fs
        .read(IP_VS)
        .map_err(|e| e.to_string())
        .and_then(|t| parse_ip_vs(&t).map_err(|w| format!("{}: {w}", fs.display(IP_VS))))
    {
        Ok(s) => s,
        Err(e) => return Check::unknown(CHECK, e),
    };
    #[derive(Serialize)]
    struct Drained<'a> {
        service: &'a str,
        protocol: &'a str,
        persistent: Option<u64>,
        real_server: &'a str,
        weight: i64,
        active: u64,
        inactive: u64,
    }
    let drained: Vec<Drained> = services
        .iter()
        .flat_map(|svc| {
            svc.real_servers
                .iter()
                .filter(|rs| rs.weight <= 0 && rs.active.saturating_add(rs.inactive) > 0)
                .map(move |rs| Drained {
                    service: &svc.address,
                    protocol: &svc.protocol,
                    persistent: svc.persistent,
                    real_server: &rs.address,
                    weight: rs.weight,
                    active: rs.active,
                    inactive: rs.inactive,
                })
        })
        .collect();
    let real_servers: usize = services.iter().map(|s| s.real_servers.len()).sum();
    let evidence = json!({
        "services": services.len(),
        "real_servers": real_servers,
        "weight0_with_connections": drained,
    });
    let expected = "no weight-0 real server still receiving connections";
    if drained.is_empty() {
        return Check::new(
            CHECK,
            Status::Ok,
            format!(
                "none ({} services, {real_servers} real servers)",
                services.len()
            ),
        )
        .expected(expected)
        .why("no real server of weight 0 holds connections")
        .evidence(evidence);
    }
    let quiescent_on = s.quiescent.as_ref().is_ok_and(|v| *v >= 1);
    let value = super::first_and_more(&drained, |d| {
        let persistent = if d.persistent.is_some() {
            ", persistent"
        } else {
            ""
        };
        format!(
            "{} of {} weight {}: {} active, {} inactive{persistent}",
            d.real_server, d.service, d.weight, d.active, d.inactive
        )
    });
    let persistent_exposed = drained.iter().any(|d| d.persistent.is_some()) && !quiescent_on;
    if persistent_exposed {
        Check::new(CHECK, Status::Fail, value)
            .expected(expected)
            .why("a persistent service keeps a weight-0 real server in its clients' templates and expire_quiescent_template is not 1: new connections keep going to the terminating backend and are reset when it exits (finding quiescent_backend)")
            .fix("sysctl -w net.ipv4.vs.expire_quiescent_template=1; `ktrace watch` shows which clients are affected")
            .evidence(evidence)
    } else {
        Check::new(CHECK, Status::Warn, value)
            .expected(expected)
            .why("weight-0 real servers are draining (graceful termination): their existing connections are reset if the pod exits before they close; new connections do not go there unless a client port is reused with conn_reuse_mode=0")
            .fix("let them drain (kube-proxy removes the real server when its connections are gone); check terminationGracePeriodSeconds covers the longest connections")
            .evidence(evidence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "IP Virtual Server version 1.2.1 (size=4096)\n\
Prot LocalAddress:Port Scheduler Flags\n\
  -> RemoteAddress:Port Forward Weight ActiveConn InActConn\n\
TCP  0A600001:0050 rr persistent 10800 FFFFFFFF\n\
  -> 0AF40102:1F90      Masq    0      3          12        \n\
  -> 0AF40103:1F90      Masq    1      7          1         \n\
UDP  [fd00::a]:0035 rr \n\
  -> [fd00::2]:0035      Masq    1      0          0         \n\
FWM  00000001 wrr \n";

    #[test]
    fn parses_services() {
        let s = parse_ip_vs(SAMPLE).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].address, "10.96.0.1:80");
        assert_eq!(s[0].persistent, Some(10800));
        assert_eq!(s[0].real_servers[0].address, "10.244.1.2:8080");
        assert_eq!(s[0].real_servers[0].weight, 0);
        assert_eq!(s[0].real_servers[0].inactive, 12);
        assert_eq!(s[1].address, "[fd00::a]:53");
        assert_eq!(s[1].persistent, None);
        assert_eq!(s[2].address, "fwmark 1");
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_ip_vs("  -> 0AF40102:1F90 Masq 0 3 12\n").is_err());
        assert!(parse_ip_vs("TCP  zz:0050 rr\n").is_err());
        assert!(parse_ip_vs("TCP  0A600001:0050 rr\n  -> 0AF40102:1F90 Masq x 3 12\n").is_err());
        assert!(parse_ip_vs("TCP  0A600001:0050 rr persistent\n").is_err());
        assert!(parse_ip_vs("TCP  [::1 rr\n").is_err());
        assert!(parse_ip_vs("\u{1}\u{2}\n").is_err());
        assert_eq!(parse_ip_vs("").unwrap(), vec![]);
    }
}
