//! A Kubernetes API server for the tests, speaking the real wire format
//! (no API server can run on these machines): list and watch over HTTP/1.1
//! for Services, EndpointSlices, Pods and Nodes, the objects serialised from the
//! real k8s-openapi types, watch events ADDED / MODIFIED / DELETED /
//! BOOKMARK as chunked JSON lines, `410 Gone` (an `ERROR` event with a
//! `Status` of code 410, as the API server sends) for a resource version
//! older than the last compaction, and watch connections it can cut.
//!
//! It listens on 127.0.0.1 of a network namespace the test created (where
//! `ktrace watch` runs), like the OTLP receiver of the OTLP tests.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The resources ktrace watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Res {
    Services,
    Slices,
    Pods,
    Nodes,
}

impl Res {
    fn from_path(p: &str) -> Option<Res> {
        match p {
            "/api/v1/services" => Some(Res::Services),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Res::Slices),
            "/api/v1/pods" => Some(Res::Pods),
            "/api/v1/nodes" => Some(Res::Nodes),
            _ => None,
        }
    }

    fn list_kind(self) -> (&'static str, &'static str) {
        match self {
            Res::Services => ("v1", "ServiceList"),
            Res::Slices => ("discovery.k8s.io/v1", "EndpointSliceList"),
            Res::Pods => ("v1", "PodList"),
            Res::Nodes => ("v1", "NodeList"),
        }
    }

    fn kind(self) -> (&'static str, &'static str) {
        match self {
            Res::Services => ("v1", "Service"),
            Res::Slices => ("discovery.k8s.io/v1", "EndpointSlice"),
            Res::Pods => ("v1", "Pod"),
            Res::Nodes => ("v1", "Node"),
        }
    }
}

/// A request the server answered: resource, watch or list, its query.
#[derive(Debug, Clone)]
pub struct Request {
    pub res: Res,
    pub watch: bool,
    pub query: String,
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Res, BTreeMap<String, Value>>,
    /// (resource version, event type, object) per resource.
    log: BTreeMap<Res, Vec<(u64, &'static str, Value)>>,
    /// Watches from before this resource version get 410 Gone (its events are gone).
    compacted: u64,
    /// Bumped to cut every open watch connection.
    cut: u64,
    requests: Vec<Request>,
}

type Shared = Arc<(Mutex<State>, Condvar)>;

pub struct ApiServer {
    pub addr: SocketAddr,
    shared: Shared,
}

fn key(v: &Value) -> String {
    format!(
        "{}/{}",
        v["metadata"]["namespace"].as_str().unwrap_or(""),
        v["metadata"]["name"].as_str().unwrap_or("")
    )
}

impl ApiServer {
    /// Starts on 127.0.0.1 (any port) of network namespace `netns`.
    pub fn start(netns: &str) -> ApiServer {
        let shared: Shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let (s, ns) = (shared.clone(), netns.to_string());
        std::thread::spawn(move || {
            let l = bind_in(&ns).expect("binding the API server");
            tx.send(l.local_addr().unwrap()).unwrap();
            for conn in l.incoming() {
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                std::thread::spawn(move || serve(conn, s));
            }
        });
        ApiServer {
            addr: rx.recv().unwrap(),
            shared,
        }
    }

    /// A kubeconfig pointing at this server, written to `path`.
    pub fn kubeconfig(&self, path: &str) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: http://{}\nusers:\n- name: lab\n  user:\n    token: lab-token\ncontexts:\n- name: lab\n  context:\n    cluster: lab\n    user: lab\ncurrent-context: lab\n",
            self.addr
        );
        std::fs::write(path, text).unwrap();
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let (m, cv) = &*self.shared;
        let r = f(&mut m.lock().unwrap());
        cv.notify_all();
        r
    }

    /// Adds or replaces an object (an ADDED or MODIFIED event), given as the
    /// JSON of a k8s-openapi object (or, to test what ktrace does with a
    /// malformed object, any JSON with a `metadata` name).
    pub fn apply(&self, res: Res, obj: Value) {
        self.with(|s| {
            s.rv += 1;
            let mut obj = obj;
            obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            let objs = s.objects.entry(res).or_default();
            let ty = if objs.contains_key(&key(&obj)) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            objs.insert(key(&obj), obj.clone());
            s.log.entry(res).or_default().push((s.rv, ty, obj));
        })
    }

    /// Deletes an object (a DELETED event).
    pub fn delete(&self, res: Res, ns: &str, name: &str) {
        self.with(|s| {
            s.rv += 1;
            if let Some(mut obj) = s
                .objects
                .entry(res)
                .or_default()
                .remove(&format!("{ns}/{name}"))
            {
                obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
                s.log.entry(res).or_default().push((s.rv, "DELETED", obj));
            }
        })
    }

    /// Forgets the event history: a watch resumed from an older resource
    /// version gets `410 Gone` and must list again.
    pub fn compact(&self) {
        self.with(|s| {
            s.compacted = s.rv;
            s.log.clear();
        })
    }

    /// Cuts every open watch connection (no closing chunk: a dropped connection).
    pub fn cut_watches(&self) {
        self.with(|s| s.cut += 1)
    }

    pub fn requests(&self) -> Vec<Request> {
        self.with(|s| s.requests.clone())
    }

    /// Waits until `pred` holds for the requests seen, up to `timeout`.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&[Request]) -> bool) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if pred(&self.requests()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

/// Counts requests of `res` (watches or lists).
pub fn count(reqs: &[Request], res: Res, watch: bool) -> usize {
    reqs.iter()
        .filter(|r| r.res == res && r.watch == watch)
        .count()
}

fn bind_in(ns: &str) -> std::io::Result<TcpListener> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
    // SAFETY: setns on a valid namespace fd; it affects this thread only.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    TcpListener::bind(("127.0.0.1", 0))
}

fn param<'a>(query: &'a str, k: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
}

/// One connection: requests until the client closes it (keep-alive).
fn serve(conn: TcpStream, s: Shared) {
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut w = conn;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                break;
            }
        }
        let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let Some(res) = Res::from_path(path) else {
            let _ = write!(w, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
            continue;
        };
        let watch = param(query, "watch") == Some("true");
        s.0.lock().unwrap().requests.push(Request {
            res,
            watch,
            query: query.to_string(),
        });
        if !watch {
            if list(&mut w, res, &s).is_err() {
                return;
            }
            continue;
        }
        let from: u64 = param(query, "resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        stream(&mut w, res, from, &s);
        return;
    }
}

fn list(w: &mut TcpStream, res: Res, s: &Shared) -> std::io::Result<()> {
    let st = s.0.lock().unwrap();
    let (api, kind) = res.list_kind();
    let items: Vec<&Value> = st
        .objects
        .get(&res)
        .map(|m| m.values().collect())
        .unwrap_or_default();
    let body = json!({
        "apiVersion": api,
        "kind": kind,
        "metadata": {"resourceVersion": st.rv.to_string()},
        "items": items,
    })
    .to_string();
    drop(st);
    write!(
        w,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn chunk(w: &mut TcpStream, v: &Value) -> std::io::Result<()> {
    let line = format!("{v}\n");
    write!(w, "{:x}\r\n{line}\r\n", line.len())?;
    w.flush()
}

/// A watch: the events after `from`, then new ones as they come, a
/// BOOKMARK every second, until the connection is cut.
fn stream(w: &mut TcpStream, res: Res, from: u64, s: &Shared) {
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if w.write_all(head.as_bytes()).is_err() {
        return;
    }
    let (m, cv) = &**s;
    let mut st = m.lock().unwrap();
    if from < st.compacted {
        let gone = json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: {from} ({})", st.compacted),
            "reason": "Expired", "code": 410}});
        drop(st);
        let _ = chunk(w, &gone).and_then(|_| w.write_all(b"0\r\n\r\n"));
        return;
    }
    let cut = st.cut;
    let mut sent = from;
    let mut last_bookmark = Instant::now();
    loop {
        let new: Vec<(u64, &'static str, Value)> = st
            .log
            .get(&res)
            .map(|l| l.iter().filter(|e| e.0 > sent).cloned().collect())
            .unwrap_or_default();
        let rv = st.rv;
        drop(st);
        for (v, ty, obj) in new {
            sent = v;
            if chunk(w, &json!({"type": ty, "object": obj})).is_err() {
                return;
            }
        }
        if last_bookmark.elapsed() >= Duration::from_secs(1) {
            last_bookmark = Instant::now();
            let (api, kind) = res.kind();
            let bm = json!({"type": "BOOKMARK", "object": {"apiVersion": api, "kind": kind,
                "metadata": {"resourceVersion": rv.to_string()}}});
            if chunk(w, &bm).is_err() {
                return;
            }
            sent = sent.max(rv);
        }
        st = cv
            .wait_timeout(m.lock().unwrap(), Duration::from_millis(200))
            .unwrap()
            .0;
        if st.cut != cut {
            drop(st);
            let _ = w.shutdown(Shutdown::Both);
            return;
        }
    }
}
