//! `watch --metrics-addr HOST:PORT`: the HTTP server Prometheus and the
//! kubelet scrape (named so, not "endpoint": an endpoint in ktrace is an
//! address and port of the traffic it watches).
//!
//! - `GET /metrics`: the metrics of the OTLP export ([`crate::export::metrics`],
//!   the same instruments, collected from the same reader) in the
//!   Prometheus text format ([`crate::export::prometheus`]).
//! - `GET /healthz`: 200 when the hooks are attached and the ring buffer
//!   was drained recently, else 503 ([`health`]); the body says why.
//!
//! The socket is bound before the hooks are attached (a taken port fails
//! at once) and served by a thread of its own with its own event loop: a
//! slow scraper never delays the pipeline. There is no default address:
//! without the flag, nothing listens.

pub mod health;

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::reader::MetricReader as _;

use crate::background;
use crate::export::metrics::Metrics;
use crate::export::prometheus;
pub use health::Health;

#[derive(Debug, thiserror::Error)]
pub enum MetricsServerError {
    #[error("--metrics-addr {addr}: cannot listen: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the metrics endpoint thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("--metrics-addr: metrics are not collected by this command")]
    NoMetrics,
}

/// The running server (it serves until the process exits).
#[derive(Debug)]
pub struct MetricsServer {
    /// The address bound (the port the system chose, for port 0).
    pub local_addr: SocketAddr,
}

/// Binds `addr` and serves `/metrics` from `metrics` and `/healthz` from `health`.
pub(crate) fn start(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> Result<MetricsServer, MetricsServerError> {
    let bind = |source| MetricsServerError::Bind { addr, source };
    let listener = TcpListener::bind(addr).map_err(bind)?;
    listener.set_nonblocking(true).map_err(bind)?;
    let local_addr = listener.local_addr().map_err(bind)?;
    background::spawn(
        "ktrace-metrics",
        move || serve(listener, metrics, health),
        |why| tracing::error!("metrics endpoint: {why}"),
    )
    .map_err(MetricsServerError::Thread)?;
    Ok(MetricsServer { local_addr })
}

async fn serve(listener: TcpListener, metrics: Arc<Metrics>, health: Arc<Health>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("metrics endpoint: {e}");
            return;
        }
    };
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                tracing::warn!("metrics endpoint: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (metrics, health) = (metrics.clone(), health.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let r = respond(&req, &metrics, &health);
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!("metrics endpoint: connection: {e}");
            }
        });
    }
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

const PLAIN: &str = "text/plain; charset=utf-8";

fn respond(req: &Request<Incoming>, metrics: &Metrics, health: &Health) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let mut rm = ResourceMetrics::default();
            match metrics.reader.collect(&mut rm) {
                Ok(()) => text(
                    StatusCode::OK,
                    prometheus::CONTENT_TYPE,
                    prometheus::encode(&rm),
                ),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    PLAIN,
                    format!("cannot collect the metrics: {e}\n"),
                ),
            }
        }
        "/healthz" => match health.check() {
            Ok(why) => text(StatusCode::OK, PLAIN, format!("ok: {why}\n")),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                PLAIN,
                format!("unhealthy: {why}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found: ktrace serves /metrics and /healthz\n".into(),
        ),
    }
}
