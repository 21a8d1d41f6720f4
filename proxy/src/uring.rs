//! The io_uring relay engine (tokio-uring, one runtime per core with SO_REUSEPORT
//! listeners). Accepting and the startup phase stay on the runtime's epoll reactor; once a
//! session is routed, both sockets move to io_uring for the byte relay. Each direction
//! keeps one small buffer while its read is queued in the ring (io_uring reads need their
//! buffer up front), so an idle session costs 2 x URING_BUF.
//!
//! io_uring is often unavailable (disabled by sysctl, blocked by a container's seccomp
//! profile): `probe` tells, and the server falls back to the epoll engine.

use crate::metrics::{Direction, Metrics};
use crate::relay::{Drain, End, Stop};
use std::io;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Per-direction buffer of a session.
pub const URING_BUF: usize = 8 * 1024;

/// Whether this process may use io_uring: creates (and drops) a tiny ring.
pub fn probe() -> Result<(), String> {
    io_uring::IoUring::new(4)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Relays between two sockets over io_uring until both directions end, an error, or the
/// token is cancelled. `client_ctl` / `server_ctl` are handles on the same sockets used
/// for half-closes (the sever registry holds others).
pub async fn relay(
    client: std::net::TcpStream,
    server: std::net::TcpStream,
    client_ctl: &std::net::TcpStream,
    server_ctl: &std::net::TcpStream,
    token: &CancellationToken,
    drain: Option<Drain<'_>>,
    metrics: &Arc<Metrics>,
) -> End {
    let c = tokio_uring::net::TcpStream::from_std(client);
    let s = tokio_uring::net::TcpStream::from_std(server);
    let c2s = pipe(&c, &s, metrics, Direction::ClientToServer, drain);
    let s2c = pipe(&s, &c, metrics, Direction::ServerToClient, drain);
    crate::relay::drive(c2s, s2c, client_ctl, server_ctl, token, drain).await
}

async fn pipe(
    src: &tokio_uring::net::TcpStream,
    dst: &tokio_uring::net::TcpStream,
    metrics: &Metrics,
    direction: Direction,
    drain: Option<Drain<'_>>,
) -> io::Result<Stop> {
    let mut buf = Vec::with_capacity(URING_BUF);
    let mut total = 0u64;
    let result = loop {
        buf.clear();
        let (res, b) = src.read(buf).await;
        buf = b;
        match res {
            Ok(0) => break Ok(Stop::Eof),
            Ok(n) => total += n as u64,
            Err(e) => break Err(e),
        }
        if let Some(d) = drain {
            d.feed(direction, &buf);
        }
        let (res, b) = dst.write_all(buf).await;
        buf = b;
        if let Err(e) = res {
            break Err(e);
        }
        if direction == Direction::ServerToClient && drain.is_some_and(|d| d.due()) {
            break Ok(Stop::Drained);
        }
    };
    metrics.add_bytes(direction, total);
    result
}
