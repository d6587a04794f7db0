//! The demo's network: three namespaces of its own, built with iproute2 and
//! iptables and deleted on drop (conntrack entries and iptables rules live
//! in them and go with them).
//!
//! ```text
//! client 10.B.0.2 -- 10.B.0.1 node 10.B.1.1 -- server 10.B.1.2, 10.B.1.3 (:2222)
//!                    ip_forward, DNAT 10.96.B.10:2222 -> the two backends
//! ```
//!
//! `B` comes from the process id (100..199), so the addresses differ from
//! the integration tests' lab and the findings can be told apart from those
//! of anything else the hooks see on this host.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::process::Command;

use super::DemoError;

pub const PORT: u16 = 2222;

/// The namespaces and addresses of one demo run.
pub struct Lab {
    pub client: String,
    pub node: String,
    pub server: String,
    octet: u8,
}

impl Lab {
    /// Names unique to this run: the pid and a few random bits (a demo
    /// killed with SIGKILL leaves its namespaces; a new one never reuses them).
    pub fn names() -> (String, String, String) {
        let pid = std::process::id();
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() % 10_000);
        let id = format!("ktd-{pid}-{nonce}");
        (format!("{id}-c"), format!("{id}-n"), format!("{id}-s"))
    }

    /// Builds the topology. On any failure the namespaces made so far are
    /// deleted (by the drop of the half-built lab).
    pub fn build() -> Result<Lab, DemoError> {
        let (client, node, server) = Lab::names();
        let lab = Lab {
            client,
            node,
            server,
            octet: 100 + (std::process::id() % 100) as u8,
        };
        for ns in [&lab.client, &lab.node, &lab.server] {
            run(&["ip", "netns", "add", ns])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        let (c, n, s) = (&lab.client, &lab.node, &lab.server);
        let b = lab.octet;
        run(&[
            "ip", "link", "add", "veth-c", "netns", c, "type", "veth", "peer", "name", "veth-nc",
            "netns", n,
        ])?;
        run(&[
            "ip", "link", "add", "veth-s", "netns", s, "type", "veth", "peer", "name", "veth-ns",
            "netns", n,
        ])?;
        let addr =
            |ns: &str, a: String, dev: &str| run(&["ip", "-n", ns, "addr", "add", &a, "dev", dev]);
        addr(c, format!("10.{b}.0.2/24"), "veth-c")?;
        addr(n, format!("10.{b}.0.1/24"), "veth-nc")?;
        addr(n, format!("10.{b}.1.1/24"), "veth-ns")?;
        for backend in lab.backends() {
            addr(s, format!("{}/24", backend.ip()), "veth-s")?;
        }
        for (ns, dev) in [(c, "veth-c"), (n, "veth-nc"), (n, "veth-ns"), (s, "veth-s")] {
            run(&["ip", "-n", ns, "link", "set", dev, "up"])?;
        }
        // The client's subnet is 10.B.0.0/24, the backends' 10.B.1.0/24.
        for (ns, subnet) in [(c, 0), (s, 1)] {
            let gateway = format!("10.{b}.{subnet}.1");
            run(&["ip", "-n", ns, "route", "add", "default", "via", &gateway])?;
        }
        lab.in_node(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        lab.dnat()?;
        Ok(lab)
    }

    /// kube-proxy's iptables mode in miniature: the Service VIP DNATed to
    /// two backends. `nth` instead of kube-proxy's `random` makes every new
    /// mapping alternate, so the flush re-maps the demo's connection to the
    /// other backend on every run (random would half the time keep it).
    fn dnat(&self) -> Result<(), DemoError> {
        let vip = self.service();
        let [first, second] = self.backends();
        let rule = |extra: &[&str], to: SocketAddrV4| {
            let mut args = vec!["iptables", "-t", "nat", "-A", "PREROUTING", "-d"];
            let vip_ip = vip.ip().to_string();
            let port = PORT.to_string();
            let to = to.to_string();
            args.extend_from_slice(&[&vip_ip, "-p", "tcp", "--dport", &port]);
            args.extend_from_slice(extra);
            args.extend_from_slice(&["-j", "DNAT", "--to-destination", &to]);
            self.in_node(&args)
        };
        rule(
            &[
                "-m",
                "statistic",
                "--mode",
                "nth",
                "--every",
                "2",
                "--packet",
                "0",
            ],
            first,
        )?;
        rule(&[], second)
    }

    pub fn service(&self) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 96, self.octet, 10), PORT)
    }

    pub fn backends(&self) -> [SocketAddrV4; 2] {
        [2, 3].map(|h| SocketAddrV4::new(Ipv4Addr::new(10, self.octet, 1, h), PORT))
    }

    pub fn client_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octet, 0, 2)
    }

    pub fn service_addr(&self) -> SocketAddr {
        SocketAddr::V4(self.service())
    }

    /// `ip netns exec NODE ARGS...`
    pub fn in_node(&self, args: &[&str]) -> Result<(), DemoError> {
        let mut full = vec!["ip", "netns", "exec", &self.node];
        full.extend_from_slice(args);
        run(&full)
    }

    fn delete(&self) {
        for ns in [&self.client, &self.node, &self.server] {
            if std::path::Path::new("/run/netns").join(ns).exists() {
                if let Err(e) = run(&["ip", "netns", "del", ns]) {
                    eprintln!("ktrace demo: could not delete namespace {ns}: {e}");
                }
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Nothing of the demo runs in them any more (its sockets are closed
        // and its own threads left them), so deleting them frees everything.
        self.delete();
    }
}

fn run(args: &[&str]) -> Result<(), DemoError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| DemoError::Tool(format!("{}: {e}", args.join(" "))))?;
    if !out.status.success() {
        return Err(DemoError::Tool(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Moves the calling thread into the named namespace (`/run/netns/NAME`).
/// Sockets made afterwards belong to it for their whole life.
pub fn enter(name: &str) -> std::io::Result<()> {
    enter_file(&File::open(std::path::Path::new("/run/netns").join(name))?)
}

fn enter_file(ns: &File) -> std::io::Result<()> {
    // SAFETY: setns on a namespace file descriptor we own; it changes only
    // the calling thread's network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread in another namespace until dropped, then back where
/// it was (also on panic).
pub struct Entered {
    home: File,
}

impl Entered {
    pub fn new(name: &str) -> std::io::Result<Entered> {
        let home = File::open("/proc/thread-self/ns/net")?;
        enter(name)?;
        Ok(Entered { home })
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        if let Err(e) = enter_file(&self.home) {
            eprintln!("ktrace demo: cannot return to the host's network namespace: {e}");
        }
    }
}

/// Runs `f` on a short-lived thread inside namespace `ns` (sockets made by
/// `f` stay in it; the caller's thread does not move).
pub fn in_netns<T: Send>(
    ns: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send,
) -> std::io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(ns)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("thread panicked")))
    })
}
