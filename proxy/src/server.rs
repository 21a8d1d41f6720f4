//! Listeners and relay engines. `tokio-tpc`: one current-thread runtime per relay thread, each with
//! its own SO_REUSEPORT listener, so both sockets of a session stay on one thread and no
//! task ever migrates. `tokio-mt`: one multi-thread runtime with one listener. Listeners
//! open only while discovery says so (after the first store read; closed while fenced with
//! --stop-listening). Connections over the limit get 53300.

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

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// Chosen by measurement: tokio-tpc. In `loadtest compare` (docs/benchmarks.md) the
    /// tokio-uring engine was not faster on any workload and slower at one client.
    Auto,
    /// A current-thread tokio runtime per core with SO_REUSEPORT listeners.
    TokioTpc,
    /// One multi-thread tokio runtime.
    TokioMt,
    /// A tokio-uring runtime per core relaying over io_uring; falls back to tokio-tpc
    /// where io_uring is unavailable.
    IoUring,
}

impl Engine {
    pub fn resolve(self) -> Engine {
        match self {
            Engine::Auto => Engine::TokioTpc,
            e => e,
        }
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
    let mut engine = listen.engine.resolve();
    if engine == Engine::IoUring {
        if let Err(e) = crate::uring::probe() {
            tracing::warn!(error = %e, "io_uring is unavailable here: falling back to tokio-tpc (epoll)");
            engine = Engine::TokioTpc;
        }
    }
    tracing::info!(?engine, threads = listen.threads, addr = %listen.addr, "relay engine");
    let mut handles = Vec::new();
    let (addr, grace) = (listen.addr, listen.grace);
    match engine {
        Engine::TokioTpc | Engine::Auto => {
            for i in 0..listen.threads.max(1) {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let shared = shared.clone();
                handles.push(
                    std::thread::Builder::new()
                        .name(format!("relay-{i}"))
                        .spawn(move || {
                            rt.block_on(run_listener(addr, true, shared, grace, false))
                        })?,
                );
            }
        }
        Engine::IoUring => {
            for i in 0..listen.threads.max(1) {
                let shared = shared.clone();
                handles.push(
                    std::thread::Builder::new()
                        .name(format!("uring-{i}"))
                        .spawn(move || {
                            tokio_uring::start(run_listener(addr, true, shared, grace, true))
                        })?,
                );
            }
        }
        Engine::TokioMt => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(listen.threads.max(1))
                .thread_name("relay")
                .enable_all()
                .build()?;
            handles.push(
                std::thread::Builder::new()
                    .name("relay-main".into())
                    .spawn(move || rt.block_on(run_listener(addr, false, shared, grace, false)))?,
            );
        }
    }
    Ok(handles)
}

async fn run_listener(
    addr: SocketAddr,
    reuse_port: bool,
    shared: Arc<Shared>,
    grace: Duration,
    uring: bool,
) {
    let tracker = TaskTracker::new();
    accept_loop(addr, reuse_port, &shared, &tracker, uring).await;
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

async fn accept_loop(
    addr: SocketAddr,
    reuse_port: bool,
    shared: &Shared,
    tracker: &TaskTracker,
    uring: bool,
) {
    let mut listening = shared.listening.clone();
    let stop = &shared.stop_accepting;
    'outer: loop {
        if !wait_listening(&mut listening, stop).await {
            return;
        }
        let listener = match bind(addr, reuse_port) {
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
                    Ok((sock, _peer)) => admit(sock, shared, tracker, uring),
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

fn admit(sock: TcpStream, shared: &Shared, tracker: &TaskTracker, uring: bool) {
    let ctx = shared.ctx.clone();
    ctx.metrics.accepted.inc();
    match shared.limit.clone().try_acquire_owned() {
        Ok(permit) if uring => {
            // io_uring streams are not Send: the session stays on this runtime's LocalSet.
            tracker.spawn_local(async move {
                conn::serve_uring(sock, &ctx).await;
                drop(permit);
            });
        }
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
