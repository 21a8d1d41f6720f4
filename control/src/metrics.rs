//! The tiny HTTP endpoint every daemon serves on `--metrics-listen-address`: `GET /metrics`
//! (Prometheus text from a prometheus-client registry) and `GET /health` (200 or 503 with a
//! one-line reason); anything else is a 404/405.

use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentifierLabels {
    cluster_name: String,
    component: String,
}

/// The registry every daemon starts from: Go stolon's `stolon_cluster_identifier{cluster_name,
/// component}` = 1 (dashboards join on it) and the process metrics Go's client exports
/// (`process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_open_fds`, ...).
/// Each component registers its own metrics under its `stolon_<component>_` prefix.
pub fn root_registry(component: &str, cluster_name: &str) -> Registry {
    let mut r = Registry::default();
    let id = Family::<IdentifierLabels, Gauge>::default();
    id.get_or_create(&IdentifierLabels {
        cluster_name: cluster_name.to_string(),
        component: component.to_string(),
    })
    .set(1);
    r.register(
        "stolon_cluster_identifier",
        "Set to 1, is labelled with the cluster_name and component",
        id,
    );
    r.register_collector(Box::new(ProcessCollector));
    r
}

/// Process metrics from /proc/self, read at each scrape.
#[derive(Debug)]
struct ProcessCollector;

impl ProcessCollector {
    fn stat() -> Option<(f64, f64, f64, f64)> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
        // After ')': state=0, utime=11, stime=12, starttime=19 (clock ticks), vsize=20
        // (bytes). Ticks in /proc are USER_HZ, 100 on Linux whatever the kernel's HZ.
        let ticks = 100.0;
        let rss_kb = std::fs::read_to_string("/proc/self/status")
            .ok()?
            .lines()
            .find_map(|l| {
                l.strip_prefix("VmRSS:")
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            })?;
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| {
                l.strip_prefix("btime ")
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })?;
        Some((
            (num(11)? + num(12)?) / ticks,
            rss_kb * 1024.0,
            num(20)?,
            boot + num(19)? / ticks,
        ))
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some((cpu, rss, vsize, start)) = Self::stat() else {
            return Ok(());
        };
        let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count()) as i64;
        let cpu_c = ConstCounter::new(cpu);
        let m = encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            MetricType::Counter,
        )?;
        cpu_c.encode(m)?;
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                rss,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                vsize,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                start,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                fds as f64,
            ),
        ] {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value).encode(m)?;
        }
        Ok(())
    }
}

/// Seconds since the unix epoch, as Go stolon's `*_seconds` timestamps.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Answers `/health`: `Ok(text)` is 200, `Err(text)` is 503.
pub type HealthFn = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Answers further paths (the keeper's health checks): `(path, query)` -> `None` for an
/// unknown path (404), `Some(Ok(body))` for 200, `Some(Err(body))` for 503.
pub type RouteFn = Arc<dyn Fn(&str, &str) -> Option<Result<String, String>> + Send + Sync>;

pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    health: HealthFn,
    shutdown: CancellationToken,
) {
    serve_with(listener, registry, health, None, shutdown).await
}

/// What the endpoint answers from.
struct Endpoints {
    registry: Arc<Registry>,
    health: HealthFn,
    routes: Option<RouteFn>,
}

/// [`serve`] with extra paths, asked before `/health`. HTTP/1.1 by hyper (through axum):
/// keep-alive, HEAD, pipelining and a back-off on accept errors (EMFILE) come with it.
pub async fn serve_with(
    listener: TcpListener,
    registry: Arc<Registry>,
    health: HealthFn,
    routes: Option<RouteFn>,
    shutdown: CancellationToken,
) {
    let endpoints = Arc::new(Endpoints {
        registry,
        health,
        routes,
    });
    let app = axum::Router::new().fallback(move |method: Method, uri: Uri| {
        let endpoints = endpoints.clone();
        async move { answer(&endpoints, &method, &uri) }
    });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "metrics endpoint stopped");
    }
}

fn answer(endpoints: &Endpoints, method: &Method, uri: &Uri) -> Response {
    let (status, ctype, body) = respond(method, uri.path(), uri.query().unwrap_or(""), endpoints);
    // HEAD gets the headers only (hyper drops the body); OPTIONS, which HAProxy's plain
    // `option httpchk` sends, gets the status with no body.
    let body = if *method == Method::OPTIONS {
        String::new()
    } else {
        body
    };
    (status, [(header::CONTENT_TYPE, ctype)], body).into_response()
}

fn respond(
    method: &Method,
    path: &str,
    query: &str,
    endpoints: &Endpoints,
) -> (StatusCode, &'static str, String) {
    if !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET, HEAD or OPTIONS\n".into(),
        );
    }
    if let Some(answer) = endpoints.routes.as_ref().and_then(|r| r(path, query)) {
        return match answer {
            Ok(body) => (StatusCode::OK, "application/json", body + "\n"),
            Err(body) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "application/json",
                body + "\n",
            ),
        };
    }
    match path {
        "/metrics" => {
            let mut out = String::new();
            if prometheus_client::encoding::text::encode(&mut out, &endpoints.registry).is_err() {
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "encode failed\n".into(),
                );
            }
            (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                out,
            )
        }
        "/health" => match (endpoints.health)() {
            Ok(text) => (StatusCode::OK, "text/plain", text + "\n"),
            Err(text) => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", text + "\n"),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics or /health\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(routes: Option<RouteFn>) -> (std::net::SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let health: HealthFn = Arc::new(|| Err("no master".to_string()));
        let registry = Arc::new(root_registry("test", "c1"));
        tokio::spawn(serve_with(listener, registry, health, routes, stop.clone()));
        (addr, stop)
    }

    /// Sends raw requests on one connection and reads until the server closes it.
    async fn exchange(addr: std::net::SocketAddr, requests: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(requests.as_bytes()).await.expect("write");
        let mut out = String::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            s.read_to_string(&mut out),
        )
        .await
        .expect("answered and closed")
        .expect("read");
        out
    }

    #[tokio::test]
    async fn answers_get_head_options_and_refuses_the_rest() {
        let routes: RouteFn = Arc::new(|path: &str, query: &str| {
            (path == "/master").then(|| Ok(format!("{{\"q\":\"{query}\"}}")))
        });
        let (addr, stop) = start(Some(routes)).await;
        // Keep-alive: two requests on one connection, the second closes it.
        let out = exchange(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(out.contains("stolon_cluster_identifier{"), "{out}");
        assert!(out.contains("HTTP/1.1 503 Service Unavailable"), "{out}");
        assert!(out.ends_with("no master\n"), "{out}");
        let out = exchange(addr, "GET /master?lag=1MB HTTP/1.0\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.0 200 OK"), "{out}");
        assert!(out.ends_with("{\"q\":\"lag=1MB\"}\n"), "{out}");
        let out = exchange(addr, "HEAD /health HTTP/1.0\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.0 503"), "{out}");
        assert!(out.ends_with("\r\n\r\n"), "no body: {out}");
        let out = exchange(addr, "OPTIONS / HTTP/1.0\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.0 404"), "{out}");
        assert!(out.ends_with("\r\n\r\n"), "no body: {out}");
        let out = exchange(addr, "POST /health HTTP/1.0\r\nContent-Length: 0\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.0 405"), "{out}");
        let out = exchange(addr, "GET /nothing HTTP/1.0\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.0 404"), "{out}");
        let out = exchange(addr, "this is not http\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        stop.cancel();
    }
}
