//! `watch --metrics-addr` with a real Prometheus (Debian's `prometheus`,
//! scripts/setup.sh installs it): ktrace serves /metrics and /healthz in
//! the lab's node namespace, Prometheus scrapes it every second there
//! while the un-NATed reply incident happens twice, then every PromQL
//! expression of deploy/grafana/ktrace-dashboard.json is run against that
//! Prometheus with `promtool query instant`: each must parse and run, and
//! the panels the incident feeds must return data. Everything listens on
//! 127.0.0.1 of the namespace the test created.
//!
//! Needs root (skipped, saying so, otherwise); Prometheus missing is a
//! failure, not a skip. Run serially (`--test-threads=1`).

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ktrace_tests::{hook, select, skip, workspace, Lab, Running, Scratch};
use serde_json::Value;

const METRICS_PORT: u16 = 9464;
const PROM_PORT: u16 = 9090;

/// `GET path` on 127.0.0.1:port inside namespace `ns`: (status, body).
fn http_get(ns: &str, port: u16, path: &str) -> (u16, String) {
    let script = "import sys, urllib.request, urllib.error\n\
        try:\n r = urllib.request.urlopen(sys.argv[1], timeout=5); code, body = r.status, r.read()\n\
        except urllib.error.HTTPError as e:\n code, body = e.code, e.read()\n\
        sys.stdout.write('%d\\n' % code); sys.stdout.write(body.decode())\n";
    let url = format!("http://127.0.0.1:{port}{path}");
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", script, &url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (code, body) = text.split_once('\n').unwrap_or(("0", ""));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Prometheus in namespace `ns`, scraping ktrace every second.
struct Prometheus {
    child: Child,
    _dir: Scratch,
}

impl Prometheus {
    fn start(ns: &str) -> Prometheus {
        let dir = Scratch::new("prom");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: ktrace\n    static_configs:\n      - targets: ['127.0.0.1:{METRICS_PORT}']\n"
        );
        std::fs::write(dir.path("prometheus.yml"), config).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "prometheus"])
            .arg(format!("--config.file={}", dir.path("prometheus.yml")))
            .arg(format!("--storage.tsdb.path={}", dir.path("data")))
            .arg(format!("--web.listen-address=127.0.0.1:{PROM_PORT}"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("prometheus is not installed (scripts/setup.sh installs Debian's prometheus)");
        Prometheus { child, _dir: dir }
    }

    fn stderr(mut self) -> String {
        let _ = self.child.kill();
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `promtool query instant` in `ns`: Ok(result vector) or Err(stderr).
fn promql(ns: &str, expr: &str) -> Result<Vec<Value>, String> {
    let out = Command::new("ip")
        .args([
            "netns", "exec", ns, "promtool", "query", "instant", "-o", "json",
        ])
        .arg(format!("http://127.0.0.1:{PROM_PORT}"))
        .arg(expr)
        .output()
        .expect("promtool is not installed (Debian's prometheus package has it)");
    if !out.status.success() {
        return Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    let v: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("promtool printed no JSON ({e})"))?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// The dashboard's Prometheus panels: (title, expr), Grafana's variables
/// replaced by what "All" and a short range give.
fn dashboard_queries() -> Vec<(String, String)> {
    let path = workspace().join("deploy/grafana/ktrace-dashboard.json");
    let d: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        let ds = p["datasource"]["type"].as_str().unwrap_or("prometheus");
        for t in p["targets"].as_array().into_iter().flatten() {
            let ds = t["datasource"]["type"].as_str().unwrap_or(ds);
            let Some(expr) = t["expr"].as_str() else {
                continue;
            };
            if ds != "prometheus" {
                continue; // the Loki panel (LogQL)
            }
            let expr = expr
                .replace("$__rate_interval", "1m")
                .replace("$__range", "5m")
                .replace("$node", ".*")
                .replace("$kind", ".*")
                .replace("$service", ".*");
            out.push((p["title"].as_str().unwrap_or("?").to_string(), expr));
        }
    }
    out
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    f()
}

/// The un-NATed reply incident on `n` fresh connections.
fn incident(lab: &Lab, n: usize) {
    let mut c = lab.client(n);
    let reset = c.unnat_all(Duration::from_millis(1000));
    assert_eq!(reset.len(), n, "every connection dies: {reset:?}");
}

#[test]
fn prometheus_scrapes_the_incident_and_every_dashboard_query_runs() {
    if skip() {
        return;
    }
    let mut lab = Lab::new("pm", 1);
    lab.start_server();
    let k = watch_with_metrics(&lab);
    healthy_once_a_tick_drained_the_ring(&lab);

    let prom = Prometheus::start(&lab.node);
    let up = wait_until(Duration::from_secs(30), || {
        promql(&lab.node, "up{job=\"ktrace\"} == 1").is_ok_and(|r| !r.is_empty())
    });
    if !up {
        panic!("Prometheus never scraped ktrace: {}", prom.stderr());
    }
    // Twice, a few scrapes apart: the counters rise between samples.
    incident(&lab, 3);
    std::thread::sleep(Duration::from_secs(3));
    incident(&lab, 3);
    assert!(k.wait_for(Duration::from_secs(5), |l, _| {
        select(l, "finding", Some("unnated_reply")).len() >= 6
    }));
    std::thread::sleep(Duration::from_secs(3));

    served_counters_are_stdouts(&lab, &k);
    let failures = dashboard_query_failures(&lab, &k);
    let (_, stderr) = k.stop();
    assert!(
        failures.is_empty(),
        "dashboard queries:\n{}",
        failures.join("\n")
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `ktrace watch --json --metrics-addr` in the node namespace, as the
/// DaemonSet runs it (NODE_NAME set, no OTEL_* variables).
fn watch_with_metrics(lab: &Lab) -> Running {
    let addr = format!("127.0.0.1:{METRICS_PORT}");
    Running::start_with(
        &lab.node,
        &["watch", "--json", "--metrics-addr", &addr],
        |c| {
            for (key, _) in std::env::vars() {
                if key.starts_with("OTEL_") || key == "NODE_NAME" {
                    c.env_remove(key);
                }
            }
            c.env("NODE_NAME", "lab-node-1");
        },
    )
}

/// `/healthz` answers 200 once a tick drained the ring; another path 404.
fn healthy_once_a_tick_drained_the_ring(lab: &Lab) {
    assert!(
        wait_until(Duration::from_secs(5), || http_get(
            &lab.node,
            METRICS_PORT,
            "/healthz"
        )
        .0 == 200),
        "/healthz: {:?}",
        http_get(&lab.node, METRICS_PORT, "/healthz")
    );
    let (code, body) = http_get(&lab.node, METRICS_PORT, "/nothing");
    assert_eq!(code, 404, "{body}");
}

/// The endpoint's counters are the ones stdout shows.
fn served_counters_are_stdouts(lab: &Lab, k: &Running) {
    let findings = select(&k.lines(), "finding", None).len();
    let (code, text) = http_get(&lab.node, METRICS_PORT, "/metrics");
    assert_eq!(code, 200);
    assert!(
        text.contains("# TYPE ktrace_findings_total counter"),
        "{text}"
    );
    let served: f64 = text
        .lines()
        .filter(|l| l.starts_with("ktrace_findings_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(served as usize, findings, "{text}");
    assert!(text.contains("k8s_node_name=\"lab-node-1\""), "{text}");
}

/// Every dashboard query parses and runs, and the incident's panels have
/// data (the panel listing the incident names its service and backend);
/// the queries that failed.
fn dashboard_query_failures(lab: &Lab, k: &Running) -> Vec<String> {
    let ct_invalid_hook = hook(&k.status, "ct_invalid")["attached"] == true;
    let queries = dashboard_queries();
    assert!(queries.len() >= 10, "{queries:?}");
    let mut failures = Vec::new();
    for (title, expr) in &queries {
        match promql(&lab.node, expr) {
            Err(e) => failures.push(format!("{title}: {expr}: {e}")),
            Ok(r) => {
                // Only the conntrack INVALID-by-reason series needs a kprobe
                // this kernel may not have (the status says).
                let needs_kprobe = expr.contains("ktrace_conntrack_invalid_total");
                eprintln!("{title}: {expr} -> {} series", r.len());
                if r.is_empty() && (!needs_kprobe || ct_invalid_hook) {
                    failures.push(format!("{title}: {expr}: no data after the incident"));
                }
            }
        }
    }
    // The panel that lists the incident names its service and backend.
    let by_backend = queries
        .iter()
        .find(|(t, _)| t == "Findings by service and backend")
        .map(|(_, e)| promql(&lab.node, e).unwrap())
        .unwrap();
    assert!(
        by_backend
            .iter()
            .any(|s| s["metric"]["server_address"] == "10.96.0.10"
                && s["metric"]["ktrace_backend_address"] == "10.0.1.2"
                && s["metric"]["ktrace_finding_kind"] == "unnated_reply"),
        "{by_backend:?}"
    );
    failures
}

#[test]
fn a_taken_metrics_address_fails_at_once_with_one_line() {
    if skip() {
        return;
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(ktrace_tests::ktrace_bin())
        .args([
            "watch",
            "--json",
            "--duration",
            "5",
            "--metrics-addr",
            &addr,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--metrics-addr") && err.contains("cannot listen"),
        "{err}"
    );
    // Nothing attached, nothing printed.
    assert!(out.stdout.is_empty());
    let out = Command::new(ktrace_tests::ktrace_bin())
        .args(["watch", "--metrics-addr", "localhost"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Without --metrics-addr nothing listens (the namespace has no TCP listener).
#[test]
fn no_endpoint_without_the_flag() {
    if skip() {
        return;
    }
    let lab = Lab::new("pn", 1);
    let k = Running::start(&lab.node, &["watch", "--json"]);
    std::thread::sleep(Duration::from_millis(500));
    let ss = Command::new("ip")
        .args(["netns", "exec", &lab.node, "ss", "-Hltn"])
        .output()
        .unwrap();
    assert!(ss.status.success());
    let listening = String::from_utf8_lossy(&ss.stdout).into_owned();
    k.stop();
    assert_eq!(listening.trim(), "", "listening sockets: {listening}");
}

/// A bare `--metrics-addr PORT` binds loopback only, and the status line
/// says what is served; with no flag it says nothing is.
#[test]
fn bare_port_serves_on_loopback_only_and_the_status_says_so() {
    if skip() {
        return;
    }
    let lab = Lab::new("lo", 1);
    let port = "19464";
    let run = Running::start(&lab.node, &["watch", "--json", "--metrics-addr", port]);
    let urls = ["metrics", "healthz"].map(|p| format!("http://127.0.0.1:{port}/{p}"));
    assert_eq!(
        run.status["exposed"],
        serde_json::json!(urls),
        "{}",
        run.status
    );
    let listening = lab.exec_ok(&lab.node, &["ss", "-ltnH", &format!("sport = :{port}")]);
    let listening = String::from_utf8_lossy(&listening.stdout).into_owned();
    assert_eq!(listening.lines().count(), 1, "{listening}");
    assert!(
        listening.contains(&format!("127.0.0.1:{port}")),
        "{listening}"
    );
    // Not reachable on the node's other addresses.
    let reach = |ip: &str| {
        lab.exec(
            &lab.node,
            &["bash", "-c", &format!("exec 3<>/dev/tcp/{ip}/{port}")],
        )
        .status
        .success()
    };
    assert!(reach("127.0.0.1"));
    assert!(!reach("10.0.0.1"), "served beyond loopback");
    run.stop();

    let quiet = Running::start(&lab.node, &["watch", "--json"]);
    assert_eq!(
        quiet.status["exposed"],
        serde_json::json!([]),
        "{}",
        quiet.status
    );
    quiet.stop();
}
