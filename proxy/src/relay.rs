//! The byte relay between a client and its master. Readiness-driven: a session holds no
//! buffer while idle. Each read goes into a per-thread buffer and is written straight on;
//! only bytes the destination cannot take yet are copied into a buffer the session owns
//! until they are written. Half-closes are passed on, and the route's token severs both
//! sockets at once.

use crate::metrics::{Direction, Metrics};
use std::cell::RefCell;
use std::future::Future;
use std::io::{self, ErrorKind, Read};
use std::net::Shutdown;
use std::os::fd::AsFd;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Large enough that a big result set or COPY moves in few syscalls.
const READ_BUF: usize = 64 * 1024;
/// Flush byte counts to the shared metrics every this many bytes (and at the end), so
/// the hot path does not touch shared atomics on every read.
const METRIC_FLUSH: u64 = 1 << 20;

thread_local! {
    static BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; READ_BUF].into_boxed_slice());
}

#[derive(Debug)]
pub enum End {
    ClientClosed,
    ServerClosed,
    Severed,
    Error(io::Error),
}

/// Relays until both directions end, an error, or `token` is cancelled.
pub async fn relay(
    client: &TcpStream,
    server: &TcpStream,
    token: &CancellationToken,
    metrics: &Metrics,
) -> End {
    let c2s = pipe(client, server, metrics, Direction::ClientToServer);
    let s2c = pipe(server, client, metrics, Direction::ServerToClient);
    drive(c2s, s2c, client, server, token).await
}

/// The session state machine every engine shares: runs both directions; when one reaches
/// EOF its half-close is passed on (shutdown of the other side's write) and the other
/// direction goes on, so an answer in flight still arrives. Ends when both are done, on
/// the first error, or at once when `token` is cancelled.
pub async fn drive(
    c2s: impl Future<Output = io::Result<()>>,
    s2c: impl Future<Output = io::Result<()>>,
    client: &impl AsFd,
    server: &impl AsFd,
    token: &CancellationToken,
) -> End {
    tokio::pin!(c2s, s2c);
    let (mut c_done, mut s_done) = (false, false);
    loop {
        tokio::select! {
            biased;
            _ = token.cancelled() => return End::Severed,
            r = &mut c2s, if !c_done => {
                if let Err(e) = r { return End::Error(e) }
                c_done = true;
                // The client will send nothing more: tell the server, keep reading its answer.
                let _ = socket2::SockRef::from(server).shutdown(Shutdown::Write);
                if s_done { return End::ClientClosed }
            }
            r = &mut s2c, if !s_done => {
                if let Err(e) = r { return End::Error(e) }
                s_done = true;
                let _ = socket2::SockRef::from(client).shutdown(Shutdown::Write);
                if c_done { return End::ServerClosed }
            }
        }
    }
}

/// Copies `src` to `dst` until EOF on `src`.
async fn pipe(
    src: &TcpStream,
    dst: &TcpStream,
    metrics: &Metrics,
    direction: Direction,
) -> io::Result<()> {
    let mut unflushed = 0u64;
    let mut pending: Vec<u8> = Vec::new();
    let result = loop {
        if let Err(e) = src.readable().await {
            break Err(e);
        }
        let step = BUF.with(|cell| {
            let mut buf = cell.borrow_mut();
            let n = match read_once(src, &mut buf) {
                Ok(0) => return Ok(None),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(Some(0)),
                Err(e) => return Err(e),
            };
            let mut off = 0;
            while off < n {
                match dst.try_write(&buf[off..n]) {
                    Ok(w) => off += w,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            if off < n {
                pending.extend_from_slice(&buf[off..n]);
            }
            Ok(Some(n))
        });
        match step {
            Ok(None) => break Ok(()),
            Ok(Some(n)) => unflushed += n as u64,
            Err(e) => break Err(e),
        }
        if !pending.is_empty() {
            if let Err(e) = drain(dst, &mut pending).await {
                break Err(e);
            }
            // Give the memory back: an idle session keeps no buffer.
            pending = Vec::new();
        }
        if unflushed >= METRIC_FLUSH {
            metrics.add_bytes(direction, unflushed);
            unflushed = 0;
        }
    };
    metrics.add_bytes(direction, unflushed);
    result
}

/// One read. A read shorter than the buffer emptied the socket's receive queue, so the
/// readiness is cleared at once instead of by a second read that returns EAGAIN: one
/// syscall less per message in each direction. Safe with edge-triggered epoll: bytes that
/// arrive after the read raise a new event, and tokio does not clear readiness an event
/// newer than the read has set (tokio's own `poll_read` does the same).
fn read_once(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = None;
    let r = src.try_io(Interest::READABLE, || {
        let sock = socket2::SockRef::from(src);
        let n = (&*sock).read(buf)?;
        if n > 0 && n < buf.len() {
            got = Some(n);
            return Err(ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (r, got) {
        (_, Some(n)) => Ok(n),
        (r, None) => r,
    }
}

async fn drain(dst: &TcpStream, pending: &mut Vec<u8>) -> io::Result<()> {
    let mut off = 0;
    while off < pending.len() {
        dst.writable().await?;
        match dst.try_write(&pending[off..]) {
            Ok(w) => off += w,
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    pending.clear();
    Ok(())
}
