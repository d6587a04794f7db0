//! Cost of Kubernetes names (issue 15), not a timed test:
//! - bytes per cached Service, EndpointSlice endpoint and Pod in the API
//!   source's cache and in the lookup layer built from it, at 10k Services,
//!   100k endpoints and 100k Pods (heap bytes counted by a global allocator,
//!   objects converted from real k8s-openapi types as the watcher hands them),
//!   and the CPU time to build that layer (the API source rebuilds it while
//!   the cluster changes);
//! - ns per lookup: a finding's names, an address's name records (what
//!   the recorder looks up once per address and version of the names),
//!   and for scale a finding whose names are in the CPU's caches and an
//!   address's entry looked up back to back (misses that overlap);
//! - the engine's events/s without names and with each finding's names
//!   (what `watch` does), for the worst case (every connection a finding,
//!   each from a different client Pod) and a typical mix (1 connection in
//!   100 a finding, clients that come back);
//! - the recorder's events/s (encode + zstd + write, inline on one core)
//!   without names and with each event's names (what `record` does: a
//!   block's addresses are named when it is sealed, a name is written once
//!   per segment), and the bytes per event it writes. Each run starts with
//!   an empty cache: every distinct address is looked up and written once;
//!   then again with every name already looked up and written (a long
//!   `record` between changes of the names: the per-event cost alone);
//!   then while a source renames 100 of the events' addresses every 50k
//!   events (a busy cluster's API source publishes every half second:
//!   the recorder looks up again what was renamed, not everything).
//!
//! Events/s are per second of this thread's CPU time, so that other work
//! on a shared machine does not count; its cache and memory traffic still
//! does, so it prints the load average at start and end: the goal (names
//! cost the engine and the recorder at most 5 % of their events/s) is best
//! judged on a quiet machine.
//!
//! Each pair (without, with) runs back to back, several times: the change
//! is given as the median and the spread over the pairs, so a noisy
//! machine shows as a wide spread rather than as a wrong figure.
//!
//! Run: `cargo bench -p ktrace --bench names` (`KTRACE_BENCH_RUNS`, default
//! 7; `KTRACE_BENCH_ONLY=TEXT` runs only the rows whose label holds TEXT,
//! e.g. `typical`, `recorder`, `renamed`, `lookups`).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicIsize, Ordering};

use common::{context, ev, unnated_reset};
use k8s_openapi::api::core::v1::{
    ObjectReference, Pod, PodIP, PodSpec, PodStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use ktrace::clock::WallClock;
use ktrace::engine::{Engine, EngineConfig};
use ktrace::event::{Event, EventBody, NatEntry};
use ktrace::names::kube::cache::{self, Cache};
use ktrace::names::kube::lenient::Lenient;
use ktrace::names::{Layer, NameResolver, Names, Peer, SourceId};
use ktrace::netns::NetnsNames;
use ktrace::output::Renderer;
use ktrace::pipeline::Pipeline;
use ktrace::recording::{Recorder, RotationConfig};
use kube::runtime::watcher::Event as WEvent;

struct Counting;
static HEAP: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        HEAP.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        HEAP.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        HEAP.fetch_add(n as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

const SERVICES: u32 = 10_000;
const SLICE_EPS: u32 = 10;
const PODS: u32 = 100_000;

/// CPU time this thread has used, in seconds: the events/s below are per second of
/// CPU, so that other work on a shared machine does not count (its cache
/// and memory traffic still does: compare pairs, not runs far apart).
fn cpu() -> f64 {
    common::thread_cpu().as_secs_f64()
}

fn heap() -> isize {
    HEAP.load(Ordering::Relaxed)
}

fn meta(ns: String, name: String) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(ns),
        name: Some(name),
        ..Default::default()
    }
}

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a60_0000 + i)
}

fn pod_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0af4_0000 + i)
}

fn ns(i: u32) -> String {
    format!("team-{:03}", i % 200)
}

fn service(i: u32) -> Service {
    Service {
        metadata: meta(ns(i), format!("svc-{i}-backend")),
        spec: Some(ServiceSpec {
            cluster_ip: Some(vip(i).to_string()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 8080,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn slice(i: u32) -> EndpointSlice {
    let mut m = meta(ns(i), format!("svc-{i}-backend-x7k2p"));
    m.labels = Some(BTreeMap::from([(
        "kubernetes.io/service-name".into(),
        format!("svc-{i}-backend"),
    )]));
    EndpointSlice {
        metadata: m,
        address_type: "IPv4".into(),
        endpoints: (0..SLICE_EPS)
            .map(|e| {
                let p = i * SLICE_EPS + e;
                Endpoint {
                    addresses: vec![pod_ip(p).to_string()],
                    node_name: Some(format!("node-{:04}", p % 1000)),
                    target_ref: Some(ObjectReference {
                        kind: Some("Pod".into()),
                        name: Some(format!("svc-{i}-backend-7f9c8d6b5-{e:05}")),
                        namespace: Some(ns(i)),
                        ..Default::default()
                    }),
                    ..Default::default()
                }
            })
            .collect(),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    }
}

fn pod(p: u32) -> Pod {
    let i = p / SLICE_EPS;
    Pod {
        metadata: meta(
            ns(i),
            format!("svc-{i}-backend-7f9c8d6b5-{:05}", p % SLICE_EPS),
        ),
        spec: Some(PodSpec {
            node_name: Some(format!("node-{:04}", p % 1000)),
            containers: Vec::new(),
            ..Default::default()
        }),
        status: Some(PodStatus {
            pod_ip: Some(pod_ip(p).to_string()),
            pod_ips: Some(vec![PodIP {
                ip: pod_ip(p).to_string(),
            }]),
            host_ip: Some(format!("192.168.{}.{}", (p % 1000) / 250, (p % 250) + 1)),
            ..Default::default()
        }),
    }
}

/// Heap bytes one resource's cache entries take, per object.
fn per_object<K: kube::Resource>(
    n: u32,
    make: impl Fn(u32) -> K,
    store: impl Fn(&mut Cache, WEvent<Lenient<K>>),
    cache: &mut Cache,
) -> f64 {
    let before = heap();
    for i in 0..n {
        store(cache, WEvent::Apply(Lenient::Ok(make(i))));
    }
    (heap() - before) as f64 / f64::from(n)
}

fn nat(ts: u64, client: SocketAddr, service: SocketAddr, backend: SocketAddr) -> Event {
    ev(
        ts,
        EventBody::NatMapping(Box::new(NatEntry {
            snat: None,
            client,
            service,
            backend,
            protocol: 6,
        })),
    )
}

/// The client's no-socket RST to the backend's own address (an un-NATed
/// reply: a finding).
fn reset(ts: u64, client: SocketAddr, backend: SocketAddr) -> Event {
    ev(ts, unnated_reset(client, backend))
}

fn svc_addr(i: u32) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(vip(i % SERVICES)), 8080)
}

fn backend_addr(i: u32) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(pod_ip((i % SERVICES) * SLICE_EPS)), 8080)
}

/// The worst case: NAT mappings, then each client resetting its backend's
/// own address: every connection a finding, the clients spread over all
/// 100k Pods (a new client address almost every event).
fn worst(n: u32) -> Vec<Event> {
    let client = |i: u32| {
        SocketAddr::new(
            IpAddr::V4(pod_ip((i * 7919) % PODS)),
            20_000 + (i % 40_000) as u16,
        )
    };
    let mut out = Vec::with_capacity(2 * n as usize);
    for i in 0..n {
        out.push(nat(
            u64::from(i) * 1000,
            client(i),
            svc_addr(i),
            backend_addr(i),
        ));
    }
    for i in 0..n {
        let ts = u64::from(n + i) * 1000;
        out.push(reset(ts, client(i), backend_addr(i)));
    }
    out
}

/// A typical mix: connections opened and closed (NAT mapping, then its
/// destroy), 2000 client Pods that come back, 1 connection in 100 reset
/// mid-stream (a finding).
fn typical(n: u32) -> Vec<Event> {
    let mut out = Vec::with_capacity(2 * n as usize + n as usize / 100);
    let mut ts = 0u64;
    for i in 0..n {
        let client = SocketAddr::new(
            IpAddr::V4(pod_ip((i * 7919) % 2000 * 50)),
            20_000 + (i % 40_000) as u16,
        );
        let entry = NatEntry {
            snat: None,
            client,
            service: svc_addr(i * 31),
            backend: backend_addr(i * 31),
            protocol: 6,
        };
        ts += 1000;
        out.push(ev(ts, EventBody::NatMapping(Box::new(entry.clone()))));
        ts += 1000;
        if i % 100 == 0 {
            out.push(reset(ts, client, entry.backend));
        } else {
            out.push(ev(ts, EventBody::NatDestroy(Box::new(entry))));
        }
    }
    out
}

/// Events/s of the engine over `events`, naming each finding when `r` is given.
fn engine(events: &[Event], r: Option<&NameResolver>) -> (f64, usize) {
    let mut e = Engine::new(EngineConfig::default());
    let mut found = Vec::new();
    let mut named = 0usize;
    let t = cpu();
    for x in events {
        e.process(x, &mut found);
        if let Some(r) = r {
            for f in &found {
                named += usize::from(std::hint::black_box(r.finding(f)).is_some());
            }
        }
        found.clear();
    }
    (events.len() as f64 / (cpu() - t), named)
}

/// How the recorder meets the names in [`record`].
#[derive(Clone, Copy)]
enum Pass<'a> {
    /// Every distinct address is looked up and written once in the timed pass.
    Cold,
    /// The events go through once untimed, then again timed, as in a long
    /// `record` whose recorder has looked up and written every name
    /// already (what each event then costs is the probe of its block's
    /// addresses).
    Warm,
    /// As `Warm`, while these layers of the rules source take turns every
    /// 50k events: each renames some of the events' addresses.
    Renamed(&'a [Layer]),
}

/// Events/s of `watch` as a user runs it: the engine and the renderer
/// (the human view, or `--json`) printing every finding to a sink, the
/// events in batches as the ring buffer hands them over; each finding
/// named when `r` is given.
fn watch(events: &[Event], r: Option<&NameResolver>, json: bool) -> f64 {
    let out = Renderer::new(
        std::io::sink(),
        json,
        false,
        WallClock::now(),
        NetnsNames::default(),
    );
    let mut p = Pipeline::new(Some(Engine::new(EngineConfig::default())), out);
    if let Some(n) = r.and_then(NameResolver::names) {
        p.name_with(n.clone());
    }
    let t = cpu();
    let mut next_tick = 0;
    for batch in events.chunks(64) {
        let ts = batch[0].ts_ns;
        if ts >= next_tick {
            p.tick(ts).unwrap();
            next_tick = ts + 200_000_000;
        }
        p.handle_batch(batch).unwrap();
    }
    p.finish(events[events.len() - 1].ts_ns).unwrap();
    events.len() as f64 / (cpu() - t)
}

/// Events/s `record` writes (encode + zstd + write, inline on one core),
/// writing each event's names when `r` is given; the file's size.
fn record(path: &Path, events: &[Event], r: Option<&NameResolver>, how: Pass) -> (f64, u64) {
    let _ = std::fs::remove_file(path);
    let mut cfg = RotationConfig::new(path);
    cfg.threaded = false;
    let mut rec = Recorder::create(cfg, "record", EngineConfig::default()).unwrap();
    rec.start_with(context("record")).unwrap();
    let names = r.and_then(NameResolver::names);
    if let Some(n) = names {
        rec.name_with(n.clone());
    }
    let pass = |rec: &mut Recorder, renames: &[Layer]| {
        for (i, e) in events.iter().enumerate() {
            rec.event(e);
            if i % 400_000 == 0 {
                rec.tick(e.ts_ns);
            }
            if let (Some(n), false) = (names, renames.is_empty()) {
                if i % 50_000 == 0 {
                    n.publish(SourceId::Rules, renames[i / 50_000 % renames.len()].clone());
                }
            }
        }
    };
    if !matches!(how, Pass::Cold) {
        pass(&mut rec, &[]);
    }
    let t = cpu();
    pass(&mut rec, if let Pass::Renamed(l) = how { l } else { &[] });
    rec.finish();
    let eps = events.len() as f64 / (cpu() - t);
    (eps, std::fs::metadata(path).unwrap().len())
}

/// Layers of the rules source, each naming 100 of the client addresses
/// (the engine's Pod IPs) as nodes of its own: from one to the next, 200
/// addresses change names.
fn renames() -> Vec<Layer> {
    (0..8u32)
        .map(|j| {
            let mut l = Layer::default();
            for i in 0..100 {
                let ip = IpAddr::V4(pod_ip((j * 100 + i) * 50));
                l.set_peer(ip, Peer::Node(format!("node-churn-{j}").into()));
            }
            l
        })
        .collect()
}

/// True when `KTRACE_BENCH_ONLY` is unset or `label` holds it.
fn selected(label: &str) -> bool {
    std::env::var("KTRACE_BENCH_ONLY").map_or(true, |o| label.contains(&o))
}

/// Runs each (without, with) pair `runs` times back to back: the best
/// events/s of each, and the change with names per pair, sorted.
fn pairs(runs: usize, mut f: impl FnMut(bool) -> f64) -> (f64, f64, Vec<f64>) {
    let (mut best_off, mut best_on, mut deltas) = (0f64, 0f64, Vec::new());
    for _ in 0..runs {
        let off = f(false);
        let on = f(true);
        best_off = best_off.max(off);
        best_on = best_on.max(on);
        deltas.push((on / off - 1.0) * 100.0);
    }
    deltas.sort_by(f64::total_cmp);
    (best_off, best_on, deltas)
}

fn report(what: &str, (off, on, d): (f64, f64, Vec<f64>)) {
    println!(
        "  {what:<44} {off:>10.0} -> {on:>10.0} events/s   change with names: median {:+.1} % (from {:+.1} to {:+.1} over {} pairs; goal: no worse than -5 %)",
        d[d.len() / 2],
        d[0],
        d[d.len() - 1],
        d.len()
    );
}

/// The load average now (the machine may be shared: say how busy it was).
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// The API cache's size per object, then the lookup layer built from
/// it, published as the names a resolver reads.
fn cache_and_layer() -> NameResolver {
    let mut c = Cache::default();
    let svc = per_object(
        SERVICES,
        service,
        |c, e| {
            c.services.apply(e, cache::service);
        },
        &mut c,
    );
    let sl = per_object(
        SERVICES,
        slice,
        |c, e| {
            c.slices.apply(e, cache::slice);
        },
        &mut c,
    );
    let pods = per_object(
        PODS,
        pod,
        |c, e| {
            c.pods.apply(e, cache::pod);
        },
        &mut c,
    );
    let eps = sl / f64::from(SLICE_EPS);
    println!("API cache (stripped objects, as kept between watch events):");
    println!("  {SERVICES} Services: {svc:.0} B per Service");
    println!(
        "  {} endpoints in {SERVICES} EndpointSlices: {eps:.0} B per endpoint",
        SERVICES * SLICE_EPS
    );
    println!("  {PODS} Pods: {pods:.0} B per Pod");

    let before = heap();
    let layer = c.layer();
    let lb = heap() - before;
    let n = layer.counts();
    println!(
        "lookup layer built from it: {:.1} MiB ({} VIP ports, {} endpoints, {} pod IPs, {} node IPs): {:.0} B per endpoint+Pod",
        lb as f64 / f64::from(1 << 20),
        n.vips,
        n.endpoints,
        n.pods,
        n.nodes,
        lb as f64 / (n.endpoints + n.pods) as f64
    );
    build_time(&c);
    independent_lookups(&layer);
    let names = Names::new();
    names.publish(SourceId::Api, layer);
    NameResolver::live(names)
}

/// CPU time to build the lookup layer from the cache: the API source
/// rebuilds it (at most every 500 ms) while the cluster changes.
fn build_time(c: &Cache) {
    let mut ms = Vec::new();
    for _ in 0..5 {
        let t = cpu();
        std::hint::black_box(c.layer());
        ms.push((cpu() - t) * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    println!(
        "  built in {:.1} ms (median of {}, from {:.1} to {:.1})",
        ms[ms.len() / 2],
        ms.len(),
        ms[0],
        ms[ms.len() - 1]
    );
}

/// One address's entry in the layer, lookups one after another with
/// nothing in between (their misses overlap): the floor of a lookup.
fn independent_lookups(layer: &ktrace::names::Layer) {
    let ips: Vec<IpAddr> = (0..500_000u32)
        .map(|i| IpAddr::V4(pod_ip((i * 7919) % PODS)))
        .collect();
    let t = cpu();
    let found = ips.iter().filter(|ip| layer.get(**ip).is_some()).count();
    println!(
        "  one address's entry, lookups back to back: {:.0} ns ({found} found)",
        (cpu() - t) * 1e9 / ips.len() as f64
    );
}

/// Lookup cost alone: an address's name records (what the recorder asks
/// once per address and version of the names), and a finding's names.
fn lookups(r: &NameResolver, worst: &[Event]) {
    let ips: Vec<IpAddr> = (0..500_000u32)
        .map(|i| IpAddr::V4(pod_ip((i * 7919) % PODS)))
        .collect();
    // One scratch vector, emptied per address, as the recorder's.
    let t = cpu();
    let (mut out, mut records) = (Vec::new(), 0usize);
    for ip in &ips {
        out.clear();
        r.addr_records(*ip, &mut out);
        records += out.len();
    }
    let per_addr = (cpu() - t) * 1e9 / ips.len() as f64;
    println!("name records of one address: {per_addr:.0} ns ({records} records)");
    let mut e = Engine::new(EngineConfig::default());
    let mut fs = Vec::new();
    for x in worst {
        e.process(x, &mut fs);
    }
    let t = cpu();
    let named = fs.iter().filter(|f| r.finding(f).is_some()).count();
    let per_finding = (cpu() - t) * 1e9 / fs.len().max(1) as f64;
    println!(
        "names of one finding: {per_finding:.0} ns ({named} of {} findings named)",
        fs.len()
    );
    // The same 64 findings over and over: the names in the CPU's caches,
    // what is left is the work itself (the rest above is memory).
    let t = cpu();
    let mut n = 0usize;
    for _ in 0..2000 {
        for f in fs.iter().take(64) {
            n += usize::from(r.finding(f).is_some());
        }
    }
    println!(
        "names of one finding, names in the CPU's caches: {:.0} ns",
        (cpu() - t) * 1e9 / n.max(1) as f64
    );
}

/// The engine and the recorder over each mix, without names and with.
fn with_and_without_names(r: &NameResolver, mixes: [(&str, &[Event]); 2]) {
    let runs = std::env::var("KTRACE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let renames = renames();
    for (what, events) in mixes {
        let row = |label: &str| selected(&format!("{what}: {label}"));
        let (_, named) = engine(events, Some(r));
        println!("{what}: {} events, {named} findings named", events.len());
        if row("engine") {
            report(
                "engine (watch: each finding's names)",
                pairs(runs, |on| engine(events, on.then_some(r)).0),
            );
        }
        for (label, json) in [
            ("watch (engine + human view printing findings)", false),
            ("watch --json (engine + JSON findings)", true),
        ] {
            if row(label) {
                report(
                    label,
                    pairs(runs, |on| watch(events, on.then_some(r), json)),
                );
            }
        }
        let dir = std::env::temp_dir().join(format!("ktrace-bench-names-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("names.rec");
        let recorder = |label: &str, how: Pass| {
            if row(label) {
                report(
                    label,
                    pairs(runs, |on| record(&path, events, on.then_some(r), how).0),
                );
            }
        };
        recorder("recorder (record: each event's names)", Pass::Cold);
        recorder("recorder, names already looked up and written", Pass::Warm);
        recorder(
            "recorder, 200 addresses renamed every 50k events",
            Pass::Renamed(&renames),
        );
        if row("recorder") {
            let (_, plain) = record(&path, events, None, Pass::Cold);
            let (_, with) = record(&path, events, Some(r), Pass::Cold);
            println!(
                "  recording size: {:.2} -> {:.2} bytes/event with names",
                plain as f64 / events.len() as f64,
                with as f64 / events.len() as f64
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn main() {
    println!(
        "names benchmark: {} cores, load average {} at start",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load()
    );
    let r = cache_and_layer();
    let worst = worst(500_000);
    let typical = typical(500_000);
    if selected("lookups") {
        lookups(&r, &worst);
    }
    with_and_without_names(&r, [("worst case", &worst), ("typical mix", &typical)]);
    println!("load average {} at the end", load());
}
