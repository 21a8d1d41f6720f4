//! The byte relay between a client and its master. Readiness-driven: a session holds no
//! buffer while idle. Each read goes into a per-thread buffer and is written straight on;
//! only bytes the destination cannot take yet are copied into a buffer the session owns
//! until they are written. Half-closes are passed on, and the route's token severs both
//! sockets at once.

use crate::metrics::{Direction, Metrics};
use crate::txstate::TxState;
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
    /// A planned switchover's drain found the session between transactions: the caller
    /// closes it cleanly.
    Drained,
    Error(io::Error),
}

/// How one direction ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    Eof,
    /// The drain signal is on and the session is between transactions.
    Drained,
}

/// A session's drain: the route's signal and the session's transaction state, fed by both
/// directions as bytes are read.
#[derive(Clone, Copy)]
pub struct Drain<'a> {
    pub signal: &'a CancellationToken,
    pub tx: &'a std::sync::Mutex<TxState>,
}

impl Drain<'_> {
    pub(crate) fn feed(&self, direction: Direction, bytes: &[u8]) {
        if let Ok(mut tx) = self.tx.lock() {
            match direction {
                Direction::ClientToServer => tx.from_client(bytes),
                Direction::ServerToClient => tx.from_server(bytes),
            }
        }
    }

    /// Draining, and nothing of the session would be cut by closing it now.
    pub fn due(&self) -> bool {
        self.signal.is_cancelled() && self.tx.lock().is_ok_and(|tx| tx.idle())
    }
}

/// Relays until both directions end, an error, `token` is cancelled, or (with `drain`) the
/// drain signal finds the session between transactions.
pub async fn relay(
    client: &TcpStream,
    server: &TcpStream,
    token: &CancellationToken,
    drain: Option<Drain<'_>>,
    metrics: &Metrics,
) -> End {
    let c2s = pipe(client, server, metrics, Direction::ClientToServer, drain);
    let s2c = pipe(server, client, metrics, Direction::ServerToClient, drain);
    drive(c2s, s2c, client, server, token, drain).await
}

/// The session state machine every engine shares: runs both directions; when one reaches
/// EOF its half-close is passed on (shutdown of the other side's write) and the other
/// direction goes on, so an answer in flight still arrives. Ends when both are done, on
/// the first error, or at once when `token` is cancelled. With `drain`, it also ends when
/// the drain signal comes while the session is between transactions (the server-to-client
/// direction notices a later boundary itself).
pub async fn drive(
    c2s: impl Future<Output = io::Result<Stop>>,
    s2c: impl Future<Output = io::Result<Stop>>,
    client: &impl AsFd,
    server: &impl AsFd,
    token: &CancellationToken,
    drain: Option<Drain<'_>>,
) -> End {
    tokio::pin!(c2s, s2c);
    let (mut c_done, mut s_done) = (false, false);
    let signal = drain.map(|d| d.signal);
    let mut drain_seen = signal.is_none();
    loop {
        tokio::select! {
            biased;
            _ = token.cancelled() => return End::Severed,
            _ = wait_signal(signal), if !drain_seen => {
                drain_seen = true;
                if drain.is_some_and(|d| d.due()) { return End::Drained }
            }
            r = &mut c2s, if !c_done => {
                match r {
                    Err(e) => return End::Error(e),
                    Ok(Stop::Drained) => return End::Drained,
                    Ok(Stop::Eof) => {}
                }
                c_done = true;
                // The client will send nothing more: tell the server, keep reading its answer.
                let _ = socket2::SockRef::from(server).shutdown(Shutdown::Write);
                if s_done { return End::ClientClosed }
            }
            r = &mut s2c, if !s_done => {
                match r {
                    Err(e) => return End::Error(e),
                    Ok(Stop::Drained) => return End::Drained,
                    Ok(Stop::Eof) => {}
                }
                s_done = true;
                let _ = socket2::SockRef::from(client).shutdown(Shutdown::Write);
                if c_done { return End::ServerClosed }
            }
        }
    }
}

async fn wait_signal(signal: Option<&CancellationToken>) {
    match signal {
        Some(s) => s.cancelled().await,
        None => std::future::pending().await,
    }
}

/// Copies `src` to `dst` until EOF on `src`, or (server to client, with `drain`) until a
/// chunk leaves the session between transactions while draining.
async fn pipe(
    src: &TcpStream,
    dst: &TcpStream,
    metrics: &Metrics,
    direction: Direction,
    drain: Option<Drain<'_>>,
) -> io::Result<Stop> {
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
            if let Some(d) = drain {
                d.feed(direction, &buf[..n]);
            }
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
            Ok(None) => break Ok(Stop::Eof),
            Ok(Some(n)) => unflushed += n as u64,
            Err(e) => break Err(e),
        }
        if !pending.is_empty() {
            if let Err(e) = write_pending(dst, &mut pending).await {
                break Err(e);
            }
            // Give the memory back: an idle session keeps no buffer.
            pending = Vec::new();
        }
        if direction == Direction::ServerToClient && drain.is_some_and(|d| d.due()) {
            break Ok(Stop::Drained);
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

/// Writes all of `pending` (emptied) to `dst`.
pub async fn write_pending(dst: &TcpStream, pending: &mut Vec<u8>) -> io::Result<()> {
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
