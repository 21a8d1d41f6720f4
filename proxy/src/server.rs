//! Listeners and the relay engine: one current-thread runtime per relay thread, each with
//! its rail beside it (`rail`: a raw epoll loop that relays the thread's plaintext sessions
//! between their stops). The first
//! thread accepts and places each session on a thread (`placement`); a session placed
//! elsewhere is handed over as a socket before anything is read, so both its sockets stay
//! on one thread. The first thread also runs the balancer (`balance`), which moves
//! sessions between threads at their transaction boundaries. The listener opens only while
//! discovery says so (after the first store read; closed while fenced with
//! --stop-listening). Connections over the limit get 53300.

use crate::balance::{Home, HOME};
use crate::conn::{self, Ctx};
use crate::metrics::CloseReason;
use crate::placement::{Seat, Seats};
use crate::protocol::sqlstate;
use crate::rail::Rail;
use socket2::{Domain, Socket, Type};
use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// `--engine`. One relay path: the io_uring (tokio-uring) and multi-thread engines were
/// measured side by side (`loadtest compare`, docs/benchmarks.md) and were faster on no
/// workload, so they were removed; their names are still accepted, with a warning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// The only engine: tokio-tpc.
    Auto,
    /// A current-thread tokio runtime per relay thread, one accepting for all.
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
    /// Sessions the first relay thread keeps before new ones go to the thread with the
    /// fewest (0: always the fewest).
    pub fill: usize,
    /// `--relay-busy` in thousandths of a core (0: spread, sessions never move).
    pub busy: u32,
    /// How long SIGTERM waits for sessions to end.
    pub grace: Duration,
    /// Plaintext sessions relay on each thread's rail (`rail`) between their stops.
    pub rail: bool,
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

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.set_nodelay(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    TcpListener::from_std(sock.into())
}

/// Starts the engine's threads; each returns when accepting stopped and its sessions
/// drained (or the grace period ran out).
/// Fails if something already listens on `addr`, with SO_REUSEPORT too (an old proxy, an
/// HAProxy), rather than fail later or split the clients with it.
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
    let threads = listen.threads.max(1);
    tracing::info!(?engine, threads, fill = listen.fill, busy = listen.busy, addr = %listen.addr, "relay engine");
    let seats = Seats::new(
        threads,
        (listen.fill, listen.busy),
        &shared.ctx.metrics,
        &listen.addr.to_string(),
    );
    let (handoffs, inboxes): (Vec<_>, Vec<_>) =
        (1..threads).map(|_| mpsc::unbounded_channel()).unzip();
    let mut work = vec![Work::Accept(Dispatch {
        seats: seats.clone(),
        handoffs,
    })];
    work.extend(inboxes.into_iter().map(Work::Receive));
    let (addr, grace) = (listen.addr, listen.grace);
    let mut handles = Vec::new();
    for (i, work) in work.into_iter().enumerate() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let rail = match listen.rail {
            true => Some(Rail::start(i, &seats)?),
            false => None,
        };
        let (shared, seats) = (shared.clone(), seats.clone());
        let thread = move || {
            if let Some(rail) = &rail {
                Rail::set_here(rail.clone());
            }
            rt.block_on(run_thread(addr, shared, grace, work, (seats, i)));
            // Its sessions have ended or the grace ran out.
            if let Some(rail) = rail {
                rail.stop();
            }
        };
        handles.push(
            std::thread::Builder::new()
                .name(format!("relay-{i}"))
                .spawn(thread)?,
        );
    }
    Ok(handles)
}

/// What a relay thread does besides relaying its sessions.
enum Work {
    /// Accept every connection and place it (the first thread).
    Accept(Dispatch),
    /// Take the sessions the first thread hands over.
    Receive(mpsc::UnboundedReceiver<Handoff>),
}

/// A connection placed on another thread: its socket, out of the accepting thread's
/// reactor, and its seat there.
type Handoff = (std::net::TcpStream, Seat);

struct Dispatch {
    seats: Arc<Seats>,
    /// To threads 1.. (the first relays its own).
    handoffs: Vec<mpsc::UnboundedSender<Handoff>>,
}

impl Dispatch {
    fn place(&self, sock: TcpStream, shared: &Shared, tracker: &TaskTracker) {
        let seat = self.seats.take();
        let Some(to) = (seat.thread().checked_sub(1)).and_then(|i| self.handoffs.get(i)) else {
            return admit(sock, seat, shared, tracker);
        };
        // Out of this thread's reactor (nothing was read yet), into the other's on arrival.
        match sock.into_std() {
            // Fails only when that thread has ended (shutting down): the socket closes.
            Ok(std) => drop(to.send((std, seat))),
            Err(e) => tracing::warn!(error = %e, "cannot hand a connection to its relay thread"),
        }
    }
}

async fn run_thread(
    addr: SocketAddr,
    shared: Arc<Shared>,
    grace: Duration,
    work: Work,
    (seats, i): (Arc<Seats>, usize),
) {
    let tracker = TaskTracker::new();
    // Where sessions moving to this thread land, and where its CPU time is read.
    let schedstat = crate::balance::own_schedstat().unwrap_or_default();
    let home = (
        tokio::runtime::Handle::current(),
        tracker.clone(),
        schedstat,
    );
    let _ = seats.threads[i].home.set(home);
    match work {
        Work::Accept(dispatch) => {
            tokio::spawn(crate::balance::run(seats, shared.stop_accepting.clone()));
            accept_loop(addr, &shared, &dispatch, &tracker).await
        }
        Work::Receive(inbox) => receive_loop(inbox, &shared, &tracker).await,
    }
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            left = tracker.len(),
            "grace period over: closing remaining sessions"
        );
    }
}

/// A thread that does not accept: serves the connections handed to it until stopping.
async fn receive_loop(
    mut inbox: mpsc::UnboundedReceiver<Handoff>,
    shared: &Shared,
    tracker: &TaskTracker,
) {
    loop {
        let (std, seat) = tokio::select! {
            _ = shared.stop_accepting.cancelled() => return,
            got = inbox.recv() => match got {
                Some(h) => h,
                None => return,
            },
        };
        match TcpStream::from_std(std) {
            Ok(sock) => admit(sock, seat, shared, tracker),
            Err(e) => tracing::warn!(error = %e, "cannot take a connection on this relay thread"),
        }
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
    shared: &Shared,
    dispatch: &Dispatch,
    tracker: &TaskTracker,
) {
    let mut listening = shared.listening.clone();
    let stop = &shared.stop_accepting;
    'outer: loop {
        if !wait_listening(&mut listening, stop).await {
            return;
        }
        let listener = match bind(addr) {
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
                    Ok((sock, _peer)) => dispatch.place(sock, shared, tracker),
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

fn admit(sock: TcpStream, seat: Seat, shared: &Shared, tracker: &TaskTracker) {
    let ctx = shared.ctx.clone();
    ctx.metrics.accepted.inc();
    match shared.limit.clone().try_acquire_owned() {
        Ok(permit) => {
            // The seat and the permit stay with the session, on whichever thread it runs.
            let home = Home {
                seat,
                _permit: permit,
                ctx: ctx.clone(),
            };
            let session = async move { conn::serve(sock, &ctx).await };
            tracker.spawn(HOME.scope(RefCell::new(Some(home)), session));
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
