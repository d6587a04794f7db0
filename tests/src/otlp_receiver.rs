//! A real OTLP receiver for the tests, on the official protobuf definitions
//! (opentelemetry-proto): the collector's gRPC services (tonic) or its
//! HTTP/protobuf endpoints `/v1/logs` and `/v1/metrics` (hyper + prost).
//!
//! It listens on 127.0.0.1 of a network namespace the test created (the
//! lab's node namespace, where `ktrace watch` runs), keeps every request,
//! and can be stopped hard (listener and connections closed) and started
//! again on the same port, as a collector that crashes and comes back.
//!
//! With [`ServerTls`] it speaks TLS (rustls), optionally requiring a client
//! certificate (mTLS), and keeps every failed handshake; [`Pki`] makes the
//! CA and certificates (rcgen) in the test.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point, AggregationTemporality};
use prost::Message as _;
use serde_json::{json, Value};

/// gRPC (tonic) or HTTP/protobuf (hyper).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Grpc,
    Http,
}

impl Wire {
    /// The `--otlp-protocol` value.
    pub fn protocol(self) -> &'static str {
        match self {
            Wire::Grpc => "grpc",
            Wire::Http => "http/protobuf",
        }
    }
}

/// Everything received, in arrival order.
#[derive(Default)]
pub struct Store {
    pub logs: Vec<ExportLogsServiceRequest>,
    pub metrics: Vec<ExportMetricsServiceRequest>,
    /// Request headers (gRPC metadata) of every request, lower-case names.
    pub headers: Vec<BTreeMap<String, String>>,
    /// Paths of the HTTP requests.
    pub paths: Vec<String>,
    /// Why each failed TLS handshake failed (rustls' words).
    pub tls_failures: Vec<String>,
}

/// One received log record, flattened for assertions.
#[derive(Debug, Clone)]
pub struct LogRec {
    pub resource: BTreeMap<String, Value>,
    pub scope: String,
    pub time_unix_nano: u64,
    pub severity_number: i32,
    pub severity_text: String,
    pub event_name: String,
    pub body: Value,
    pub attrs: BTreeMap<String, Value>,
}

/// One received metric data point, flattened.
#[derive(Debug, Clone)]
pub struct Point {
    pub name: String,
    pub unit: String,
    pub resource: BTreeMap<String, Value>,
    pub attrs: BTreeMap<String, Value>,
    /// "sum" or "gauge".
    pub kind: &'static str,
    pub monotonic: bool,
    pub cumulative: bool,
    pub value: f64,
    pub time_unix_nano: u64,
}

pub fn any_to_json(v: &AnyValue) -> Value {
    match &v.value {
        Some(any_value::Value::StringValue(s)) => json!(s),
        Some(any_value::Value::BoolValue(b)) => json!(b),
        Some(any_value::Value::IntValue(i)) => json!(i),
        Some(any_value::Value::DoubleValue(d)) => json!(d),
        Some(any_value::Value::ArrayValue(a)) => {
            Value::Array(a.values.iter().map(any_to_json).collect())
        }
        Some(any_value::Value::KvlistValue(l)) => Value::Object(
            l.values
                .iter()
                .map(|kv| {
                    (
                        kv.key.clone(),
                        kv.value.as_ref().map_or(Value::Null, any_to_json),
                    )
                })
                .collect(),
        ),
        Some(any_value::Value::BytesValue(b)) => json!(b),
        _ => Value::Null,
    }
}

fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, Value> {
    kvs.iter()
        .map(|kv| {
            (
                kv.key.clone(),
                kv.value.as_ref().map_or(Value::Null, any_to_json),
            )
        })
        .collect()
}

impl Store {
    pub fn log_records(&self) -> Vec<LogRec> {
        let mut out = Vec::new();
        for req in &self.logs {
            for rl in &req.resource_logs {
                let resource = rl
                    .resource
                    .as_ref()
                    .map(|r| attrs(&r.attributes))
                    .unwrap_or_default();
                for sl in &rl.scope_logs {
                    let scope = sl
                        .scope
                        .as_ref()
                        .map(|s| s.name.clone())
                        .unwrap_or_default();
                    for r in &sl.log_records {
                        out.push(LogRec {
                            resource: resource.clone(),
                            scope: scope.clone(),
                            time_unix_nano: r.time_unix_nano,
                            severity_number: r.severity_number,
                            severity_text: r.severity_text.clone(),
                            event_name: r.event_name.clone(),
                            body: r.body.as_ref().map_or(Value::Null, any_to_json),
                            attrs: attrs(&r.attributes),
                        });
                    }
                }
            }
        }
        out
    }

    pub fn points(&self) -> Vec<Point> {
        let mut out = Vec::new();
        for req in &self.metrics {
            for rm in &req.resource_metrics {
                let resource = rm
                    .resource
                    .as_ref()
                    .map(|r| attrs(&r.attributes))
                    .unwrap_or_default();
                for sm in &rm.scope_metrics {
                    for m in &sm.metrics {
                        let (kind, monotonic, cumulative, dps) = match &m.data {
                            Some(metric::Data::Sum(s)) => (
                                "sum",
                                s.is_monotonic,
                                s.aggregation_temporality
                                    == AggregationTemporality::Cumulative as i32,
                                &s.data_points,
                            ),
                            Some(metric::Data::Gauge(g)) => ("gauge", false, false, &g.data_points),
                            _ => continue,
                        };
                        for dp in dps {
                            let value = match dp.value {
                                Some(number_data_point::Value::AsInt(i)) => i as f64,
                                Some(number_data_point::Value::AsDouble(d)) => d,
                                None => continue,
                            };
                            out.push(Point {
                                name: m.name.clone(),
                                unit: m.unit.clone(),
                                resource: resource.clone(),
                                attrs: attrs(&dp.attributes),
                                kind,
                                monotonic,
                                cumulative,
                                value,
                                time_unix_nano: dp.time_unix_nano,
                            });
                        }
                    }
                }
            }
        }
        out
    }

    /// The latest value of every series of `name`, keyed by its attributes.
    pub fn latest(&self, name: &str) -> BTreeMap<Series, f64> {
        let mut out: BTreeMap<Series, (u64, f64)> = BTreeMap::new();
        for p in self.points().into_iter().filter(|p| p.name == name) {
            let e = out.entry(series(&p.attrs)).or_insert((0, 0.0));
            if p.time_unix_nano >= e.0 {
                *e = (p.time_unix_nano, p.value);
            }
        }
        out.into_iter().map(|(k, (_, v))| (k, v)).collect()
    }
}

/// A metric series: attribute names and their values as JSON text
/// (`"ipv4"` with its quotes, `2222` without).
pub type Series = BTreeMap<String, String>;

pub fn series(a: &BTreeMap<String, Value>) -> Series {
    a.iter().map(|(k, v)| (k.clone(), v.to_string())).collect()
}

type Shared = Arc<Mutex<Store>>;

fn metadata_map(m: &tonic::metadata::MetadataMap) -> BTreeMap<String, String> {
    m.clone()
        .into_headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

struct Grpc {
    store: Shared,
    delay: Arc<Mutex<Duration>>,
}

#[tonic::async_trait]
impl LogsService for Grpc {
    async fn export(
        &self,
        req: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        let d = *self.delay.lock().unwrap();
        tokio::time::sleep(d).await;
        let mut s = self.store.lock().unwrap();
        s.headers.push(metadata_map(req.metadata()));
        s.logs.push(req.into_inner());
        Ok(tonic::Response::new(ExportLogsServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Grpc {
    async fn export(
        &self,
        req: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let d = *self.delay.lock().unwrap();
        tokio::time::sleep(d).await;
        let mut s = self.store.lock().unwrap();
        s.headers.push(metadata_map(req.metadata()));
        s.metrics.push(req.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

async fn http_handle(
    store: Shared,
    delay: Arc<Mutex<Duration>>,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<http_body_util::Full<bytes::Bytes>>, std::convert::Infallible> {
    use http_body_util::BodyExt as _;
    let path = req.uri().path().to_string();
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let reply = |status: u16, body: Vec<u8>| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", "application/x-protobuf")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap()
    };
    let is_proto = headers
        .get("content-type")
        .is_some_and(|c| c == "application/x-protobuf");
    if req.method() != hyper::Method::POST || !is_proto {
        return Ok(reply(415, Vec::new()));
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(reply(400, Vec::new())),
    };
    let d = *delay.lock().unwrap();
    tokio::time::sleep(d).await;
    let mut s = store.lock().unwrap();
    s.paths.push(path.clone());
    match path.as_str() {
        "/v1/logs" => match ExportLogsServiceRequest::decode(body) {
            Ok(r) => {
                s.headers.push(headers);
                s.logs.push(r);
                Ok(reply(
                    200,
                    ExportLogsServiceResponse {
                        partial_success: None,
                    }
                    .encode_to_vec(),
                ))
            }
            Err(_) => Ok(reply(400, Vec::new())),
        },
        "/v1/metrics" => match ExportMetricsServiceRequest::decode(body) {
            Ok(r) => {
                s.headers.push(headers);
                s.metrics.push(r);
                Ok(reply(
                    200,
                    ExportMetricsServiceResponse {
                        partial_success: None,
                    }
                    .encode_to_vec(),
                ))
            }
            Err(_) => Ok(reply(400, Vec::new())),
        },
        _ => Ok(reply(404, Vec::new())),
    }
}

/// Binds 127.0.0.1:`port` in network namespace `netns` (by `ip netns` name)
/// or in the caller's when `None`. Runs on the calling thread: the thread
/// enters the namespace for good.
fn bind_in(netns: Option<&str>, port: u16) -> std::io::Result<std::net::TcpListener> {
    use std::os::fd::AsRawFd;
    if let Some(ns) = netns {
        let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
        // SAFETY: setns on a valid namespace fd; it affects this thread only.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let l = std::net::TcpListener::bind(("127.0.0.1", port))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// A CA made by the test, and certificates it signs (all for 127.0.0.1).
pub struct Pki {
    pub ca_pem: String,
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let ca_pem = params.self_signed(&key).unwrap().pem();
        Pki {
            ca_pem,
            ca: rcgen::Issuer::new(params, key),
        }
    }

    /// A certificate and its key (PEM) for 127.0.0.1, as a server or a
    /// client; `expired`: valid in 2020 only.
    fn leaf(&self, client: bool, expired: bool) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 12, 31);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    pub fn server(&self, expired: bool) -> (String, String) {
        self.leaf(false, expired)
    }

    pub fn client(&self) -> (String, String) {
        self.leaf(true, false)
    }
}

/// The receiver's TLS: its certificate chain and key (PEM), and the CA a
/// client certificate must chain to (`Some`: mTLS, a client without one is
/// refused).
#[derive(Clone)]
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
    pub client_ca_pem: Option<String>,
}

impl ServerTls {
    fn acceptor(&self, wire: Wire) -> tokio_rustls::TlsAcceptor {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = |pem: &str| -> Vec<CertificateDer<'static>> {
            CertificateDer::pem_slice_iter(pem.as_bytes())
                .map(Result::unwrap)
                .collect()
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match &self.client_ca_pem {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add_parsable_certificates(certs(ca));
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots.into(),
                    provider,
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap();
        let mut config = builder
            .with_single_cert(certs(&self.cert_pem), key)
            .unwrap();
        config.alpn_protocols = vec![match wire {
            Wire::Grpc => b"h2".to_vec(),
            Wire::Http => b"http/1.1".to_vec(),
        }];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

/// Accepts connections and does the TLS handshake of each (failures go to
/// the store); the connections that made it, as tonic's incoming stream.
fn tls_incoming(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    store: Shared,
) -> tokio_stream::wrappers::ReceiverStream<
    std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, store, tx) = (acceptor.clone(), store.clone(), tx.clone());
            tokio::spawn(async move {
                match acceptor.accept(conn).await {
                    Ok(tls) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Err(e) => store.lock().unwrap().tls_failures.push(e.to_string()),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A running receiver. Dropping it stops it.
pub struct Receiver {
    pub addr: SocketAddr,
    pub store: Shared,
    delay: Arc<Mutex<Duration>>,
    tls: bool,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    /// Starts a receiver on 127.0.0.1:`port` (0: any) of `netns`.
    pub fn start(wire: Wire, netns: Option<&str>, port: u16) -> Receiver {
        Self::start_tls(wire, netns, port, None)
    }

    /// [`Receiver::start`], speaking TLS when `tls` is given.
    pub fn start_tls(
        wire: Wire,
        netns: Option<&str>,
        port: u16,
        tls: Option<ServerTls>,
    ) -> Receiver {
        Self::try_start(wire, netns, port, Arc::default(), tls)
            .unwrap_or_else(|e| panic!("binding the OTLP receiver on 127.0.0.1:{port}: {e}"))
    }

    fn try_start(
        wire: Wire,
        netns: Option<&str>,
        port: u16,
        store: Shared,
        tls: Option<ServerTls>,
    ) -> std::io::Result<Receiver> {
        let acceptor = tls.as_ref().map(|t| t.acceptor(wire));
        let is_tls = acceptor.is_some();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let delay = Arc::new(Mutex::new(Duration::ZERO));
        let (s, d, ns) = (store.clone(), delay.clone(), netns.map(str::to_string));
        let thread = std::thread::spawn(move || {
            let listener = match bind_in(ns.as_deref(), port) {
                Ok(l) => l,
                Err(e) => {
                    let _ = addr_tx.send(Err(e));
                    return;
                }
            };
            let _ = addr_tx.send(Ok(listener.local_addr().unwrap()));
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                match wire {
                    Wire::Grpc => {
                        let svc = || Grpc {
                            store: s.clone(),
                            delay: d.clone(),
                        };
                        let router = tonic::transport::Server::builder()
                            .add_service(LogsServiceServer::new(svc()))
                            .add_service(MetricsServiceServer::new(svc()));
                        match acceptor {
                            None => tokio::spawn(router.serve_with_incoming(
                                tokio_stream::wrappers::TcpListenerStream::new(listener),
                            )),
                            Some(a) => tokio::spawn(router.serve_with_incoming(tls_incoming(
                                listener,
                                a,
                                s.clone(),
                            ))),
                        };
                    }
                    Wire::Http => {
                        tokio::spawn(async move {
                            loop {
                                let Ok((conn, _)) = listener.accept().await else {
                                    continue;
                                };
                                let (s, d, a) = (s.clone(), d.clone(), acceptor.clone());
                                tokio::spawn(async move {
                                    let svc = hyper::service::service_fn({
                                        let s = s.clone();
                                        move |req| http_handle(s.clone(), d.clone(), req)
                                    });
                                    let http = hyper::server::conn::http1::Builder::new();
                                    let Some(a) = a else {
                                        let io = hyper_util::rt::TokioIo::new(conn);
                                        let _ = http.serve_connection(io, svc).await;
                                        return;
                                    };
                                    match a.accept(conn).await {
                                        Ok(tls) => {
                                            let io = hyper_util::rt::TokioIo::new(tls);
                                            let _ = http.serve_connection(io, svc).await;
                                        }
                                        Err(e) => {
                                            s.lock().unwrap().tls_failures.push(e.to_string())
                                        }
                                    }
                                });
                            }
                        });
                    }
                }
                // Until stopped; then the runtime drops every task, and with
                // them the listener and the open connections.
                let _ = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
            });
            rt.shutdown_background();
        });
        let addr = addr_rx.recv().expect("receiver thread")?;
        Ok(Receiver {
            addr,
            store,
            delay,
            tls: is_tls,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// `http[s]://127.0.0.1:PORT`, as `--otlp-endpoint` takes it.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Answers every request only after `d` (a slow collector).
    pub fn set_delay(&self, d: Duration) {
        *self.delay.lock().unwrap() = d;
    }

    /// Stops hard: the port is closed and open connections are cut.
    pub fn kill(mut self) -> Shared {
        self.shutdown();
        self.store.clone()
    }

    /// Starts again on the same port, keeping what was received.
    pub fn restart(wire: Wire, netns: Option<&str>, addr: SocketAddr, store: Shared) -> Receiver {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match Self::try_start(wire, netns, addr.port(), store.clone(), None) {
                Ok(r) => return r,
                Err(e) if Instant::now() > deadline => {
                    panic!("restarting the OTLP receiver on {addr}: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Waits until `pred` holds for what was received, up to `timeout`.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&Store) -> bool) -> bool {
        let start = Instant::now();
        loop {
            if pred(&self.store.lock().unwrap()) {
                return true;
            }
            if start.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shutdown();
    }
}
