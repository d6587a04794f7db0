//! Cost of Kubernetes names (issue 15), not a timed test:
//! - bytes per cached Service, EndpointSlice endpoint and Pod in the API
//!   source's cache and in the lookup layer built from it, at 10k Services,
//!   100k endpoints and 100k Pods (heap bytes counted by a global allocator,
//!   objects converted from real k8s-openapi types as the watcher hands them);
//! - ns per lookup: a finding's names, an event's names (what `record`
//!   does per event);
//! - the engine's events/s without names, with a finding's names looked up
//!   per finding (what `watch` does), and with an event's names per event.
//!
//! Run: `cargo bench -p ktrace --bench names`.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use common::ev;
use k8s_openapi::api::core::v1::{
    ObjectReference, Pod, PodIP, PodSpec, PodStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use ktrace::engine::{Engine, EngineConfig};
use ktrace::event::{Event, EventBody, NatEntry};
use ktrace::names::kube::cache::{self, Cache};
use ktrace::names::{NameResolver, Names, SourceId};
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
    store: impl Fn(&mut Cache, WEvent<K>),
    cache: &mut Cache,
) -> f64 {
    let before = heap();
    for i in 0..n {
        store(cache, WEvent::Apply(make(i)));
    }
    (heap() - before) as f64 / f64::from(n)
}

/// NAT mappings, then each client resetting its backend's own address (an
/// un-NATed reply: one finding per connection), over Services and Pods the
/// cache knows.
fn stream(n: u32) -> Vec<Event> {
    let mut out = Vec::with_capacity(2 * n as usize);
    for i in 0..n {
        let client = SocketAddr::new(
            IpAddr::V4(pod_ip((i * 7919) % PODS)),
            20_000 + (i % 40_000) as u16,
        );
        let svc = SocketAddr::new(IpAddr::V4(vip(i % SERVICES)), 8080);
        let be = SocketAddr::new(IpAddr::V4(pod_ip((i % SERVICES) * SLICE_EPS)), 8080);
        out.push(ev(
            u64::from(i) * 1000,
            EventBody::NatMapping(NatEntry {
                snat: None,
                client,
                service: svc,
                backend: be,
                protocol: 6,
            }),
        ));
    }
    for i in 0..n {
        let client = SocketAddr::new(
            IpAddr::V4(pod_ip((i * 7919) % PODS)),
            20_000 + (i % 40_000) as u16,
        );
        let be = SocketAddr::new(IpAddr::V4(pod_ip((i % SERVICES) * SLICE_EPS)), 8080);
        let ts = u64::from(n + i) * 1000;
        out.push(ev(
            ts,
            EventBody::TcpSendReset {
                src: client,
                dst: be,
                reason: Some("NO_SOCKET".into()),
                socket: None,
                trigger_flags: Some(0x18),
            },
        ));
    }
    out
}

#[derive(Clone, Copy)]
enum Mode {
    Plain,
    Findings,
    Events,
}

/// Events a recording block holds, about (the recorder looks an address
/// up once per block).
const BLOCK_EVENTS: usize = 4096;

fn run(events: &[Event], r: &NameResolver, mode: Mode) -> (f64, usize) {
    let mut e = Engine::new(EngineConfig::default());
    let mut found = Vec::new();
    let mut named = 0usize;
    let mut seen = std::collections::HashSet::with_hasher(foldhash::fast::RandomState::default());
    let t = Instant::now();
    for x in events {
        e.process(x, &mut found);
        match mode {
            Mode::Plain => {}
            Mode::Findings => {
                for f in found.drain(..) {
                    named += usize::from(r.finding(&f).is_some());
                }
            }
            Mode::Events => {
                if named.is_multiple_of(BLOCK_EVENTS) {
                    seen.clear();
                }
                named += 1;
                std::hint::black_box(r.event_records(x, &mut seen));
            }
        }
        found.clear();
    }
    (events.len() as f64 / t.elapsed().as_secs_f64(), named)
}

fn main() {
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
    println!(
        "lookup layer built from it: {:.1} MiB ({} VIPs, {} endpoints, {} pod IPs, {} node IPs): {:.0} B per endpoint+Pod",
        lb as f64 / f64::from(1 << 20),
        layer.services.len(),
        layer.endpoints.len(),
        layer.pods.len(),
        layer.nodes.len(),
        lb as f64 / (layer.endpoints.len() + layer.pods.len()) as f64
    );
    let names = Names::new();
    names.publish(SourceId::Api, layer);
    let r = NameResolver::live(names);

    let events = stream(500_000);
    // Lookup cost alone: an event's names with every address looked up
    // (no per-block memory), and a finding's names.
    let t = Instant::now();
    let mut n = 0usize;
    for x in &events {
        let mut seen = Default::default();
        n += r.event_records(x, &mut seen).len();
    }
    let per_event = t.elapsed().as_nanos() as f64 / events.len() as f64;
    println!("names of one event's addresses, every one looked up: {per_event:.0} ns ({n} names)");
    let mut e = Engine::new(EngineConfig::default());
    let mut fs = Vec::new();
    for x in &events {
        e.process(x, &mut fs);
    }
    let t = Instant::now();
    let named = fs.iter().filter(|f| r.finding(f).is_some()).count();
    let per_finding = t.elapsed().as_nanos() as f64 / fs.len().max(1) as f64;
    println!(
        "names of one finding: {per_finding:.0} ns ({named} of {} findings named)",
        fs.len()
    );

    let off = NameResolver::default();
    let runs = std::env::var("KTRACE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut best = [0f64; 3];
    let mut found = [0usize; 3];
    for _ in 0..runs {
        for (i, (res, mode)) in [
            (&off, Mode::Plain),
            (&r, Mode::Findings),
            (&r, Mode::Events),
        ]
        .into_iter()
        .enumerate()
        {
            let (eps, f) = run(&events, res, mode);
            best[i] = best[i].max(eps);
            found[i] = f;
        }
    }
    println!("engine events/s (best of {runs}):");
    println!("  without names:                         {:>10.0}", best[0]);
    println!(
        "  with each finding's names (watch):     {:>10.0}  ({:+.1} %, {} findings named)",
        best[1],
        (best[1] / best[0] - 1.0) * 100.0,
        found[1]
    );
    println!(
        "  with each event's names, per block (record path): {:>10.0}  ({:+.1} %)",
        best[2],
        (best[2] / best[0] - 1.0) * 100.0
    );
}
