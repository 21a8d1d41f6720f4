//! Prometheus metrics and the `/health` endpoint on `--metrics-listen-address`.
//! Labels are fixed-cardinality kinds, never addresses or messages.

use crate::route::Routes;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Why a session ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum CloseReason {
    ClientClosed,
    ServerClosed,
    /// The master changed or the proxy was fenced: closed by the proxy.
    Severed,
    IoError,
    /// A CancelRequest, forwarded and closed.
    Cancel,
    RejectedNoMaster,
    RejectedProtocol,
    RejectedLimit,
    RejectedTimeout,
    BackendUnreachable,
    ClientGone,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: CloseReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Direction {
    ClientToServer,
    ServerToClient,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: Direction,
}

#[derive(Default)]
pub struct Metrics {
    pub accepted: Counter,
    pub active: Gauge,
    pub closed: Family<ReasonLabel, Counter>,
    pub generation: Gauge,
    pub routing: Gauge,
    pub store_errors: Family<KindLabel, Counter>,
    pub bytes: Family<DirectionLabel, Counter>,
}

impl Metrics {
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut r = Registry::with_prefix("stolon_proxy");
        r.register(
            "sessions_accepted",
            "Sessions accepted",
            self.accepted.clone(),
        );
        r.register("sessions_active", "Sessions open now", self.active.clone());
        r.register(
            "sessions_closed",
            "Sessions closed, by reason",
            self.closed.clone(),
        );
        r.register(
            "route_generation",
            "Proxy generation applied",
            self.generation.clone(),
        );
        r.register(
            "routing",
            "1 while a master is routed to",
            self.routing.clone(),
        );
        r.register(
            "store_errors",
            "Failed store requests, by kind",
            self.store_errors.clone(),
        );
        r.register("bytes", "Bytes relayed, by direction", self.bytes.clone());
        r
    }

    pub fn closed(&self, reason: CloseReason) {
        self.closed.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn store_error(&self, kind: &'static str) {
        self.store_errors.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn add_bytes(&self, direction: Direction, n: u64) {
        if n > 0 {
            self.bytes
                .get_or_create(&DirectionLabel { direction })
                .inc_by(n);
        }
    }
}

/// Serves `GET /metrics` and `GET /health` (200 only while routing to a master).
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    routes: Arc<Routes>,
    shutdown: CancellationToken,
) {
    let registry = Arc::new(metrics.registry());
    loop {
        let (mut sock, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
        };
        let (registry, routes) = (registry.clone(), routes.clone());
        tokio::spawn(async move {
            let mut req = Vec::with_capacity(1024);
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                let mut chunk = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                    let n = sock.read(&mut chunk).await?;
                    if n == 0 {
                        break;
                    }
                    req.extend_from_slice(&chunk[..n]);
                }
                Ok::<_, std::io::Error>(())
            });
            if !matches!(read.await, Ok(Ok(()))) {
                return;
            }
            let line = String::from_utf8_lossy(req.split(|&b| b == b'\r').next().unwrap_or(&[]))
                .into_owned();
            let (status, ctype, body) = respond(&line, &registry, &routes);
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

fn respond(
    line: &str,
    registry: &Registry,
    routes: &Routes,
) -> (&'static str, &'static str, String) {
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return ("405 Method Not Allowed", "text/plain", "GET only\n".into());
    }
    match path {
        "/metrics" => {
            let mut out = String::new();
            if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
                return (
                    "500 Internal Server Error",
                    "text/plain",
                    "encode failed\n".into(),
                );
            }
            (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                out,
            )
        }
        "/health" => {
            let route = routes.load();
            match &route.master {
                Ok(_) => (
                    "200 OK",
                    "text/plain",
                    format!("routing generation {}\n", route.generation),
                ),
                Err(why) => (
                    "503 Service Unavailable",
                    "text/plain",
                    format!("not routing: {why:?}\n"),
                ),
            }
        }
        _ => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /health\n".into(),
        ),
    }
}
