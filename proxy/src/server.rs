//! Listeners and the relay engine: one current-thread runtime per relay thread, each with
//! its own SO_REUSEPORT listener, so both sockets of a session stay on one thread and no task
//! ever migrates. Listeners open only while discovery says so (after the first store read;
//! closed while fenced with --stop-listening). Connections over the limit get 53300.

use crate::conn::{self, Ctx};
use crate::metrics::CloseReason;
use crate::protocol::sqlstate;
use socket2::{Domain, Socket, Type};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// `--engine`. One relay path: the io_uring (tokio-uring) and multi-thread engines were
/// measured side by side (`loadtest compare`, docs/benchmarks.md) and were faster on no
/// workload, so they were removed; their names are still accepted, with a warning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// The only engine: tokio-tpc.
    Auto,
    /// A current-thread tokio runtime per core with SO_REUSEPORT listeners.
    TokioTpc,
    /// Removed (relays as tokio-tpc).
    #[value(hide = true)]
    TokioMt,
    /// Removed (relays as tokio-tpc).
    #[value(hide = true)]
    IoUring,
}

impl Engine {
    /// The engine that relays: always tokio-tpc, with a warning for a removed one.
    pub fn resolve(self) -> Engine {
        if matches!(self, Engine::TokioMt | Engine::IoUring) {
            tracing::warn!(engine = ?self, "this relay engine was removed (not faster on any measured workload): relaying with tokio-tpc");
        }
        Engine::TokioTpc
    }
}

pub struct Listen {
    pub addr: SocketAddr,
    pub engine: Engine,
    pub threads: usize,
    /// How long SIGTERM waits for sessions to end.
    pub grace: Duration,
}

pub struct Shared {
    pub ctx: Arc<Ctx>,
    pub listening: watch::Receiver<bool>,
    pub limit: Arc<Semaphore>,
    /// Over-limit rejections under way (at most [`REJECTING_MAX`]), over all listeners.
    pub rejecting: Arc<Semaphore>,
    /// Cancelled on SIGTERM: stop accepting, then drain.
    pub stop_accepting: CancellationToken,
}

fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    if reuse_port {
        sock.set_reuse_port(true)?;
    }
    sock.set_nonblocking(true)?;
    sock.set_nodelay(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    TcpListener::from_std(sock.into())
}

/// Starts the engine's threads; each returns when accepting stopped and its sessions
/// drained (or the grace period ran out).
/// Fails if something already listens on `addr`. The per-core listeners use SO_REUSEPORT,
/// which would otherwise silently share the port with any other process of the same user
/// that listens with it too (an old proxy, an HAProxy), splitting the clients between them.
pub fn check_port_free(addr: SocketAddr) -> std::io::Result<()> {
    match std::net::TcpListener::bind(addr) {
        Ok(probe) => {
            drop(probe);
            Ok(())
        }
        Err(e) => Err(std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr}: {e} (is another proxy or server using it?)"),
        )),
    }
}

pub fn start(
    listen: &Listen,
    shared: Arc<Shared>,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    check_port_free(listen.addr)?;
    let engine = listen.engine.resolve();
    tracing::info!(?engine, threads = listen.threads, addr = %listen.addr, "relay engine");
    let mut handles = Vec::new();
    let (addr, grace) = (listen.addr, listen.grace);
    for i in 0..listen.threads.max(1) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let shared = shared.clone();
        handles.push(
            std::thread::Builder::new()
                .name(format!("relay-{i}"))
                .spawn(move || rt.block_on(run_listener(addr, shared, grace)))?,
        );
    }
    Ok(handles)
}

async fn run_listener(addr: SocketAddr, shared: Arc<Shared>, grace: Duration) {
    let tracker = TaskTracker::new();
    accept_loop(addr, &shared, &tracker).await;
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            left = tracker.len(),
            "grace period over: closing remaining sessions"
        );
    }
}

/// Waits until the listener should be open; false when stopping.
async fn wait_listening(rx: &mut watch::Receiver<bool>, stop: &CancellationToken) -> bool {
    loop {
        if *rx.borrow_and_update() {
            return true;
        }
        tokio::select! {
            _ = stop.cancelled() => return false,
            r = rx.changed() => if r.is_err() { return false },
        }
    }
}

async fn accept_loop(addr: SocketAddr, shared: &Shared, tracker: &TaskTracker) {
    let mut listening = shared.listening.clone();
    let stop = &shared.stop_accepting;
    'outer: loop {
        if !wait_listening(&mut listening, stop).await {
            return;
        }
        let listener = match bind(addr, true) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(%addr, error = %e, "cannot listen; retrying in 1s");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        tracing::info!(%addr, "listening");
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = listening.changed() => {
                    if r.is_err() { return }
                    if !*listening.borrow_and_update() {
                        tracing::warn!(%addr, "fenced: stopped listening");
                        continue 'outer;
                    }
                }
                r = listener.accept() => match r {
                    Ok((sock, _peer)) => admit(sock, shared, tracker),
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }
}

fn admit(sock: TcpStream, shared: &Shared, tracker: &TaskTracker) {
    let ctx = shared.ctx.clone();
    ctx.metrics.accepted.inc();
    match shared.limit.clone().try_acquire_owned() {
        Ok(permit) => {
            tracker.spawn(async move {
                conn::serve(sock, &ctx).await;
                drop(permit);
            });
        }
        Err(_) => {
            ctx.metrics.closed(CloseReason::RejectedLimit);
            // Each rejection lingers (up to 2 s) so the client reads the error before the
            // close; past REJECTING_MAX of those at once a flood is closed without a word,
            // rather than growing tasks and descriptors without bound.
            if let Ok(permit) = shared.rejecting.clone().try_acquire_owned() {
                tracker.spawn(async move {
                    reject_over_limit(sock).await;
                    drop(permit);
                });
            }
        }
    }
}

/// Over-limit rejections answered at once, at most; the rest are closed without an answer.
pub const REJECTING_MAX: usize = 64;

async fn reject_over_limit(sock: TcpStream) {
    conn::send_error_and_close(
        sock,
        sqlstate::TOO_MANY_CONNECTIONS,
        "sorry, too many clients already (proxy connection limit reached)",
    )
    .await;
}
