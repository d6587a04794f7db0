//! The network-namespace lab of ktrace's integration tests.
//!
//! Topology (all inside namespaces the test creates and deletes):
//!
//! ```text
//! client 10.0.0.2 -- 10.0.0.1 node 10.0.1.1 -- server 10.0.1.2, 10.0.1.3 (:2222)
//!                     ip_forward, DNAT 10.96.0.10:2222 -> backends
//! ```
//!
//! `ktrace watch` runs in the node namespace, as it would on a Kubernetes
//! node where kube-proxy's NAT happens. Namespaces are deleted on drop, so
//! a failing test cleans up too.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

mod ipv6;
pub mod kube_proxy;
pub mod race;

pub use ipv6::IPV6;

pub const VIP: &str = "10.96.0.10";
pub const PORT: u16 = 2222;
pub const CLIENT_IP: &str = "10.0.0.2";
pub const BACKENDS: [&str; 2] = ["10.0.1.2", "10.0.1.3"];

/// The Service address as ktrace prints it: `VIP:PORT`.
pub fn vip() -> String {
    format!("{VIP}:{PORT}")
}

/// The client's address on `port` as ktrace prints it.
pub fn client(port: u16) -> String {
    format!("{CLIENT_IP}:{port}")
}

/// The first backend's address as ktrace prints it (the only one in a
/// one-backend lab).
pub fn backend() -> String {
    format!("{}:{PORT}", BACKENDS[0])
}

/// Every backend's address as ktrace prints it.
pub fn backends() -> std::collections::BTreeSet<String> {
    BACKENDS.iter().map(|b| format!("{b}:{PORT}")).collect()
}

/// The lab's addresses in one IP family: IPv4, or the IPv6 side of a
/// dual-stack Service (`Lab::ipv6`). Same namespaces and links either way.
#[derive(Debug)]
pub struct Family {
    /// The rule tool of this family (`iptables`, `ip6tables`).
    pub iptables: &'static str,
    pub vip: &'static str,
    pub client_ip: &'static str,
    pub backends: [&'static str; 2],
    /// A second Service, DNATed to the first backend's closed port 2223.
    pub refusing_vip: &'static str,
    /// What the echo server binds.
    pub any: &'static str,
    /// The node's address on the backends' link (its masquerade address),
    /// and that link's prefix.
    pub node_server_ip: &'static str,
    pub server_net: &'static str,
    /// A single address's prefix length (32, 128).
    pub host_bits: u8,
}

impl Family {
    /// `ip` and `port` as ktrace prints them (`[ip]:port` for IPv6).
    pub fn sock(&self, ip: &str, port: u16) -> String {
        if ip.contains(':') {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        }
    }

    pub fn vip(&self) -> String {
        self.sock(self.vip, PORT)
    }

    pub fn client(&self, port: u16) -> String {
        self.sock(self.client_ip, port)
    }

    /// The first backend (the only one in a one-backend lab).
    pub fn backend(&self) -> String {
        self.sock(self.backends[0], PORT)
    }
}

pub const IPV4: Family = Family {
    iptables: "iptables",
    vip: VIP,
    client_ip: CLIENT_IP,
    backends: BACKENDS,
    refusing_vip: "10.96.0.11",
    any: "0.0.0.0",
    node_server_ip: "10.0.1.1",
    server_net: "10.0.1.0/24",
    host_bits: 32,
};

/// Why a test cannot run here (it then passes, saying so), or `None`.
pub fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces, eBPF)".into());
    }
    for tool in ["ip", "iptables", "conntrack", "python3"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map_or(true, |o| !o.status.success())
        {
            return Some(format!(
                "{tool} is not installed (scripts/setup.sh installs it)"
            ));
        }
    }
    None
}

/// Prints why the test is skipped and returns true when it must be.
pub fn skip() -> bool {
    match skip_reason() {
        Some(why) => {
            record_skip(&why);
            true
        }
        None => false,
    }
}

/// Records that the running test cannot run here, and why. libtest can only
/// report such a test as "ok", so the skip is also appended to
/// `$KTRACE_SKIP_LOG` (set by `cargo xtask test`), which counts it as skipped,
/// by name and reason, in its closing line instead of as passed.
pub fn record_skip(why: &str) {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|stem| {
            stem.rsplit_once('-')
                .map_or(stem.clone(), |(b, _)| b.to_string())
        })
        .unwrap_or_default();
    let test = std::thread::current().name().unwrap_or("?").to_string();
    eprintln!("SKIPPED {binary}::{test}: {why}");
    if let Some(path) = std::env::var_os("KTRACE_SKIP_LOG") {
        let line = format!("{binary}::{test}\t{}\n", why.replace(['\n', '\t'], " "));
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = appended {
            panic!("cannot record the skip in {}: {e}", path.to_string_lossy());
        }
    }
}

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The `ktrace` binary under test: `$KTRACE_BIN`, or the workspace's debug
/// build (`cargo build -p ktrace` first; the README's test command does).
pub fn ktrace_bin() -> PathBuf {
    if let Ok(p) = std::env::var("KTRACE_BIN") {
        return PathBuf::from(p);
    }
    let p = workspace().join("target/debug/ktrace");
    assert!(
        p.exists(),
        "{} missing: run `cargo build -p ktrace` first",
        p.display()
    );
    p
}

fn run(args: &[&str]) -> std::process::Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The three namespaces and the processes running in them.
pub struct Lab {
    pub client: String,
    pub node: String,
    pub server: String,
    /// The addresses the helpers use: IPv4 unless `ipv6` switched them.
    pub family: &'static Family,
    children: Vec<Child>,
}

impl Lab {
    /// Builds the topology with DNAT of VIP:2222 to `backends` (1 or 2).
    pub fn new(tag: &str, backends: usize) -> Lab {
        let id = format!("{tag}{}", std::process::id() % 100_000);
        let lab = Lab {
            client: format!("ktr-{id}-c"),
            node: format!("ktr-{id}-n"),
            server: format!("ktr-{id}-s"),
            family: &IPV4,
            children: Vec::new(),
        };
        for ns in [&lab.client, &lab.node, &lab.server] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            run(&["ip", "netns", "add", ns]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let (c, n, s) = (&lab.client, &lab.node, &lab.server);
        run(&[
            "ip", "link", "add", "veth-c", "netns", c, "type", "veth", "peer", "name", "veth-nc",
            "netns", n,
        ]);
        run(&[
            "ip", "link", "add", "veth-s", "netns", s, "type", "veth", "peer", "name", "veth-ns",
            "netns", n,
        ]);
        run(&["ip", "-n", c, "addr", "add", "10.0.0.2/24", "dev", "veth-c"]);
        run(&["ip", "-n", c, "link", "set", "veth-c", "up"]);
        run(&["ip", "-n", c, "route", "add", "default", "via", "10.0.0.1"]);
        run(&[
            "ip",
            "-n",
            n,
            "addr",
            "add",
            "10.0.0.1/24",
            "dev",
            "veth-nc",
        ]);
        run(&[
            "ip",
            "-n",
            n,
            "addr",
            "add",
            "10.0.1.1/24",
            "dev",
            "veth-ns",
        ]);
        run(&["ip", "-n", n, "link", "set", "veth-nc", "up"]);
        run(&["ip", "-n", n, "link", "set", "veth-ns", "up"]);
        for b in BACKENDS {
            run(&[
                "ip",
                "-n",
                s,
                "addr",
                "add",
                &format!("{b}/24"),
                "dev",
                "veth-s",
            ]);
        }
        run(&["ip", "-n", s, "link", "set", "veth-s", "up"]);
        run(&["ip", "-n", s, "route", "add", "default", "via", "10.0.1.1"]);
        lab.exec_ok(n, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        lab.set_backends(backends);
        lab
    }

    /// Appends `rule` (words split on spaces) to the node's `nat` table.
    pub fn nat(&self, rule: &str) {
        let mut args = vec![self.family.iptables, "-t", "nat"];
        args.extend(rule.split_whitespace());
        self.exec_ok(&self.node, &args);
    }

    /// Replaces the DNAT rules: VIP:2222 spread over the first `n` backends.
    pub fn set_backends(&self, n: usize) {
        self.nat("-F PREROUTING");
        self.dnat_spread("tcp", PORT, n);
    }

    /// DNAT of VIP:`port` at random over the first `n` backends' `port`
    /// (kube-proxy's iptables mode: rule i takes 1/(n-i) of what is left).
    fn dnat_spread(&self, proto: &str, port: u16, n: usize) {
        let f = self.family;
        for (i, b) in f.backends.iter().take(n).enumerate() {
            let left = n - i;
            let random = if left > 1 {
                format!(
                    "-m statistic --mode random --probability {:.4}",
                    1.0 / left as f64
                )
            } else {
                String::new()
            };
            self.nat(&format!(
                "-A PREROUTING -d {} -p {proto} --dport {port} {random} -j DNAT --to-destination {}",
                f.vip,
                f.sock(b, port)
            ));
        }
    }

    /// kube-proxy's masquerade (NodePort or LoadBalancer traffic with
    /// `externalTrafficPolicy: Cluster`, or masquerade-all) in miniature:
    /// Service traffic leaves for the backends SNATed to the node's address.
    /// In the lab's current family (`ipv6` first for the IPv6 side).
    pub fn masquerade(&self) {
        self.nat(&format!(
            "-A POSTROUTING -o veth-ns -d {} -j MASQUERADE",
            self.family.server_net
        ));
    }

    /// IPVS mode's `kube-ipvs0` in miniature: the node holds the Service
    /// VIP on a local dummy interface (the DNAT rules stay in front of it).
    /// Kernels without the dummy driver get the VIP on `lo`: as local.
    /// In the lab's current family (`ipv6` first for the IPv6 side).
    pub fn local_vip(&self) {
        let node = self.node.clone();
        let dev = if self
            .exec(&node, &["ip", "link", "add", "kube-ipvs0", "type", "dummy"])
            .status
            .success()
        {
            self.exec_ok(&node, &["ip", "link", "set", "kube-ipvs0", "up"]);
            "kube-ipvs0"
        } else {
            "lo"
        };
        let f = self.family;
        let addr = format!("{}/{}", f.vip, f.host_bits);
        let mut args = vec!["ip", "addr", "add", &addr, "dev", dev];
        if f.host_bits == 128 {
            // Usable at once, not after duplicate address detection.
            args.push("nodad");
        }
        self.exec_ok(&node, &args);
    }

    /// A second Service, 10.96.0.11:2223, DNATed to a backend port where
    /// nothing listens: connections to it are refused through NAT.
    pub fn refusing_service(&self) {
        let f = self.family;
        self.nat(&format!(
            "-A PREROUTING -d {} -p tcp --dport 2223 -j DNAT --to-destination {}",
            f.refusing_vip,
            f.sock(f.backends[0], 2223)
        ));
    }

    /// A UDP Service, VIP:53, DNATed at random to both backends' :53 (a
    /// cluster DNS Service in miniature).
    pub fn udp_service(&self) {
        self.dnat_spread("udp", 53, BACKENDS.len());
    }

    /// The node namespace's conntrack counter `column`, summed over CPUs.
    pub fn ct_stat(&self, column: &str) -> u64 {
        let out = self.exec_ok(&self.node, &["cat", "/proc/net/stat/nf_conntrack"]);
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
        let Some(i) = header.iter().position(|c| *c == column) else {
            return 0;
        };
        lines
            .filter_map(|l| l.split_whitespace().nth(i))
            .filter_map(|v| u64::from_str_radix(v, 16).ok())
            .sum()
    }

    pub fn exec(&self, ns: &str, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("ip netns exec {ns} {args:?}: {e}"))
    }

    pub fn exec_ok(&self, ns: &str, args: &[&str]) -> std::process::Output {
        let out = self.exec(ns, args);
        assert!(
            out.status.success(),
            "in {ns}: {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Inode of a namespace, as ktrace reports it in `"netns"`.
    pub fn inode(&self, ns: &str) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/run/netns/{ns}")).unwrap().ino()
    }

    fn lab_script() -> String {
        workspace().join("tests/lab/lab.py").display().to_string()
    }

    /// Starts the echo server on :2222 (of the lab's family) in the server namespace.
    pub fn start_server(&mut self) {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.server,
                "python3",
                &Self::lab_script(),
                "server",
                "2222",
                self.family.any,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the lab server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "listening");
        self.children.push(child);
    }

    /// Opens `n` connections from the client to the family's VIP:2222 (each echoes once).
    pub fn client(&self, n: usize) -> Client {
        self.client_to(self.family.vip, PORT, n)
    }

    pub fn client_to(&self, host: &str, port: u16, n: usize) -> Client {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.client,
                "python3",
                &Self::lab_script(),
                "client",
                host,
                &port.to_string(),
                &n.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the lab client");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let v: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("client said {line:?}: {e}"));
        let ports = v["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_u64().unwrap() as u16)
            .collect();
        Client {
            child,
            stdin,
            stdout,
            ports,
        }
    }

    /// Incident 2's trigger: flushes the node's conntrack table, then sends
    /// on every connection of `c`; returns the ports whose send was reset.
    /// With two backends each connection survives a flush with probability
    /// 1/2, so a few connections may all survive: up to three flushes.
    pub fn flush_until_reset(&self, c: &mut Client) -> Vec<u16> {
        for _ in 0..3 {
            self.exec_ok(&self.node, &["conntrack", "-F"]);
            let reset = c.send_all();
            if !reset.is_empty() {
                return reset;
            }
        }
        panic!("no connection was reset by three conntrack flushes");
    }

    /// Traffic that must give no finding: `n` connections to the VIP echo
    /// and close cleanly, and `n` are refused by a backend port where
    /// nothing listens (no NAT on the way).
    pub fn ordinary_traffic(&self, n: usize) {
        let mut c = self.client(n);
        assert!(c.send_all().is_empty());
        c.cmd("close");
        assert_eq!(self.refuse(self.family.backends[0], 2224, n), n as u64);
    }

    /// Runs `lab.py refuse` in the client namespace: `n` refused connections.
    pub fn refuse(&self, host: &str, port: u16, n: usize) -> u64 {
        let out = self.exec_ok(
            &self.client,
            &[
                "python3",
                &Self::lab_script(),
                "refuse",
                host,
                &port.to_string(),
                &n.to_string(),
            ],
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["refused"].as_u64().unwrap()
    }

    /// Starts `ktrace watch --json` in the node namespace with `args`, and
    /// waits for its status line.
    pub fn watch(&self, args: &[&str]) -> Watch {
        Watch::start(&self.node, args)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.client, &self.node, &self.server] {
            // Kill whatever still runs in the namespace, then delete it.
            let _ = Command::new("ip")
                .args(["netns", "pids", ns])
                .output()
                .map(|o| {
                    for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                        let _ = Command::new("kill").args(["-9", pid]).output();
                    }
                });
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// The lab client process: connections held open, driven by commands.
pub struct Client {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub ports: Vec<u16>,
}

impl Client {
    pub fn cmd(&mut self, c: &str) -> Value {
        writeln!(self.stdin, "{c}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("client said {line:?} to {c}: {e}"))
    }

    /// The un-NATed-reply incident on every connection: the server sends an
    /// out-of-window segment on each (0.3 s after its "ok"); after `settle`,
    /// a send on every connection. Returns the ports whose send was reset.
    pub fn unnat_all(&mut self, settle: Duration) -> Vec<u16> {
        self.cmd("oow");
        std::thread::sleep(settle);
        self.send_all()
    }

    /// The request-direction incident on every connection: the client
    /// sends a segment far outside the window; after `settle`, a send on
    /// every connection. Returns the ports whose send was reset.
    pub fn unnat_requests(&mut self, settle: Duration) -> Vec<u16> {
        self.cmd("oowc");
        std::thread::sleep(settle);
        self.send_all()
    }

    /// Closes every connection with SO_LINGER 0 (an application's abort).
    pub fn abort(&mut self) {
        self.cmd("abort");
    }

    /// Sends on every connection; returns the ports whose send was reset.
    pub fn send_all(&mut self) -> Vec<u16> {
        let v = self.cmd("send");
        let mut reset: Vec<u16> = v["results"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, r)| r.as_str() == Some("reset"))
            .map(|(p, _)| p.parse().unwrap())
            .collect();
        reset.sort();
        reset
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `ktrace watch --json`, its output collected line by line.
pub struct Watch {
    run: Running,
    pub status: Value,
}

impl Watch {
    pub fn start(ns: &str, args: &[&str]) -> Watch {
        let mut full = vec!["watch", "--json"];
        full.extend_from_slice(args);
        let run = Running::start(ns, &full);
        let status = run.status.clone();
        Watch { run, status }
    }

    /// Output so far.
    pub fn lines(&self) -> Vec<Value> {
        self.run.lines()
    }

    /// Waits until `pred` holds for the output, up to `timeout`.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&[Value]) -> bool) -> bool {
        self.run.wait_for(timeout, |lines, _| pred(lines))
    }

    /// What it wrote to stderr so far (warnings).
    pub fn stderr(&self) -> String {
        self.run.stderr()
    }

    /// Waits until at least `n` lines of `"type": ty` (named `name` when
    /// given, as in [`select`]) arrived, up to `timeout`.
    pub fn wait_count(&self, timeout: Duration, ty: &str, name: Option<&str>, n: usize) -> bool {
        self.wait_for(timeout, |l| select(l, ty, name).len() >= n)
    }

    /// Stops ktrace with SIGINT (as Ctrl-C would) and returns all its output.
    pub fn stop(self) -> Vec<Value> {
        self.run.stop().0
    }
}

/// Objects of `"type": ty` (and `"event": ev` / `"kind": ev` when given).
pub fn select<'a>(lines: &'a [Value], ty: &str, name: Option<&str>) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|v| v["type"] == ty)
        .filter(|v| name.is_none_or(|n| v["event"] == n || v["kind"] == n))
        .collect()
}

/// The events named `event` from `src` to `dst`.
pub fn between<'a>(lines: &'a [Value], event: &str, src: &str, dst: &str) -> Vec<&'a Value> {
    select(lines, "event", Some(event))
        .into_iter()
        .filter(|e| e["src"] == src && e["dst"] == dst)
        .collect()
}

/// A control run's verdict: no finding at all.
pub fn assert_no_findings(lines: &[Value]) {
    let findings = select(lines, "finding", None);
    assert!(
        findings.is_empty(),
        "control traffic gave findings: {findings:?}"
    );
}

/// The hook entry named `name` of a status line.
pub fn hook<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == name)
        .unwrap_or_else(|| panic!("no hook {name} in {status}"))
}

// ---------------------------------------------------------------------------
// Recording and replay helpers (tests/tests/recording.rs).

/// A scratch directory under the system temp dir, removed on drop.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("ktrace-it-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch { dir }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `ktrace ARGS` run to completion outside the lab's namespaces.
pub fn ktrace_output(args: &[&str]) -> std::process::Output {
    Command::new(ktrace_bin())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running ktrace {args:?}: {e}"))
}

/// The JSON objects of JSON Lines output (panics on a non-JSON line).
pub fn json_lines(out: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

/// `(kind, service, backend, client)` of every finding, in order.
pub fn finding_keys(lines: &[Value]) -> Vec<(String, String, String, String)> {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    select(lines, "finding", None)
        .into_iter()
        .map(|f| {
            (
                s(&f["kind"]),
                s(&f["service"]),
                s(&f["backend"]),
                s(&f["client"]),
            )
        })
        .collect()
}

/// `ktrace replay ARGS`: must succeed; returns (status line, the rest, stderr).
pub fn replay(args: &[&str]) -> (Value, Vec<Value>, String) {
    let out = ktrace_output(&[&["replay", "--json"][..], args].concat());
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "replay {args:?} failed ({}): {stderr}",
        out.status
    );
    let mut lines = json_lines(&out.stdout);
    assert!(!lines.is_empty(), "replay printed nothing");
    let status = lines.remove(0);
    assert_eq!(status["type"], "status", "{status}");
    (status, lines, stderr)
}

/// Events as replay prints them: live ones also carry `netns_name` (the
/// names of this host's namespaces), which a recording does not restore.
pub fn events(lines: &[Value]) -> Vec<Value> {
    select(lines, "event", None)
        .into_iter()
        .map(|e| {
            let mut e = e.clone();
            e.as_object_mut().unwrap().remove("netns_name");
            e
        })
        .collect()
}

pub fn findings(lines: &[Value]) -> Vec<Value> {
    select(lines, "finding", None)
        .into_iter()
        .cloned()
        .collect()
}

/// The replay of `file` prints exactly what watch printed live.
pub fn assert_replay_matches(live_status: &Value, live: &[Value], file: &str) {
    let (status, lines, stderr) = replay(&["--events", file]);
    assert!(
        !stderr.contains("warning"),
        "a clean recording replays without warnings: {stderr}"
    );
    assert_eq!(
        status["hooks"], live_status["hooks"],
        "the recorded hook status is replayed"
    );
    assert_eq!(status["kernel"], live_status["kernel"]);
    assert_eq!(
        status["kube_proxy_mode"], live_status["kube_proxy_mode"],
        "the recorded kube-proxy mode is replayed (and with it the remedies)"
    );
    assert_eq!(status["replay"]["command"], "watch");
    assert_eq!(
        finding_keys(&lines),
        finding_keys(live),
        "(kind, service, backend, client) of every finding"
    );
    assert_eq!(
        findings(&lines),
        findings(live),
        "the findings, field for field"
    );
    assert_eq!(events(&lines), events(live), "the events");
    // Without --events: the same findings and nothing else.
    let (_, quiet, _) = replay(&[file]);
    assert!(select(&quiet, "event", None).is_empty());
    assert_eq!(findings(&quiet), findings(live));
}

/// Any ktrace subcommand running in a namespace, stdout parsed as JSON
/// Lines (the first one, the status, kept apart) and stderr collected.
pub struct Running {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    pub status: Value,
}

impl Running {
    /// `ip netns exec NS ktrace ARGS` (ARGS must ask for --json); waits for the status line.
    pub fn start(ns: &str, args: &[&str]) -> Running {
        Running::start_with(ns, args, |_| {})
    }

    /// [`Running::start`], with `configure` adding flags or environment to
    /// the command first.
    pub fn start_with(ns: &str, args: &[&str], configure: impl FnOnce(&mut Command)) -> Running {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(ktrace_bin()).args(args);
        configure(&mut cmd);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting ktrace");
        let stderr = Arc::new(Mutex::new(String::new()));
        let err_sink = stderr.clone();
        let err = BufReader::new(child.stderr.take().unwrap());
        let err_reader = std::thread::spawn(move || {
            for line in err.lines() {
                let Ok(line) = line else { break };
                eprintln!("[ktrace stderr] {line}");
                let mut s = err_sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        let status: Value = serde_json::from_str(&first).unwrap_or_else(|e| {
            panic!(
                "ktrace's first line {first:?} is not JSON ({e}); stderr: {}",
                stderr.lock().unwrap()
            )
        });
        assert_eq!(
            status["type"], "status",
            "first line must be the status: {first}"
        );
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let out_reader = std::thread::spawn(move || {
            for line in out.lines() {
                let Ok(line) = line else { break };
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("ktrace printed a non-JSON line {line:?}: {e}"));
                sink.lock().unwrap().push(v);
            }
        });
        Running {
            child,
            lines,
            stderr,
            readers: vec![out_reader, err_reader],
            status,
        }
    }

    pub fn lines(&self) -> Vec<Value> {
        self.lines.lock().unwrap().clone()
    }

    /// Process id of the `ip netns exec` that became ktrace.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&[Value], &str) -> bool) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if pred(&self.lines(), &self.stderr()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        pred(&self.lines(), &self.stderr())
    }

    fn join(&mut self) {
        for r in self.readers.drain(..) {
            r.join().unwrap();
        }
    }

    /// SIGINT, then all of stdout (after the status) and stderr.
    pub fn stop(mut self) -> (Vec<Value>, String) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let status = self.child.wait().unwrap();
        self.join();
        assert!(
            status.success(),
            "ktrace exited with {status}; stderr: {}",
            self.stderr()
        );
        (self.lines(), self.stderr())
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        self.join();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
