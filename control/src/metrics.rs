//! The tiny HTTP endpoint every daemon serves on `--metrics-listen-address`: `GET /metrics`
//! (Prometheus text from a prometheus-client registry) and `GET /health` (200 or 503 with a
//! one-line reason). One request per connection; anything else is a 404/405.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

/// [`serve`] with extra paths, asked before `/health`.
pub async fn serve_with(
    listener: TcpListener,
    registry: Arc<Registry>,
    health: HealthFn,
    routes: Option<RouteFn>,
    shutdown: CancellationToken,
) {
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
        let (registry, health, routes) = (registry.clone(), health.clone(), routes.clone());
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
            let (status, ctype, body) = respond(&line, &registry, &*health, routes.as_deref());
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            // HEAD (and OPTIONS, which HAProxy's plain `option httpchk` sends) get the
            // status line and headers only.
            if line.starts_with("GET ") {
                let _ = sock.write_all(body.as_bytes()).await;
            }
            let _ = sock.shutdown().await;
        });
    }
}

type RouteDyn = dyn Fn(&str, &str) -> Option<Result<String, String>> + Send + Sync;

fn respond(
    line: &str,
    registry: &Registry,
    health: &(dyn Fn() -> Result<String, String> + Send + Sync),
    routes: Option<&RouteDyn>,
) -> (&'static str, &'static str, String) {
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !matches!(method, "GET" | "HEAD" | "OPTIONS") {
        return (
            "405 Method Not Allowed",
            "text/plain",
            "GET, HEAD or OPTIONS\n".into(),
        );
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if let Some(answer) = routes.and_then(|r| r(path, query)) {
        return match answer {
            Ok(body) => ("200 OK", "application/json", body + "\n"),
            Err(body) => ("503 Service Unavailable", "application/json", body + "\n"),
        };
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
        "/health" => match health() {
            Ok(text) => ("200 OK", "text/plain", text + "\n"),
            Err(text) => ("503 Service Unavailable", "text/plain", text + "\n"),
        },
        _ => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /health\n".into(),
        ),
    }
}
