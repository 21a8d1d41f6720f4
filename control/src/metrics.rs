//! The tiny HTTP endpoint every daemon serves on `--metrics-listen-address`: `GET /metrics`
//! (Prometheus text from a prometheus-client registry) and `GET /health` (200 or 503 with a
//! one-line reason). One request per connection; anything else is a 404/405.

use prometheus_client::registry::Registry;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Answers `/health`: `Ok(text)` is 200, `Err(text)` is 503.
pub type HealthFn = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    health: HealthFn,
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
        let (registry, health) = (registry.clone(), health.clone());
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
            let (status, ctype, body) = respond(&line, &registry, &*health);
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
    health: &(dyn Fn() -> Result<String, String> + Send + Sync),
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
