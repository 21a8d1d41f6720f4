//! The relay rail: between its stops, a plaintext session is relayed by a raw epoll loop
//! on a thread of its own beside its relay thread (`lane`), not by its tokio task, which
//! sleeps meanwhile. Measured (issue 19, docs/benchmarks.md): a tokio task per session
//! costs about 1.1 us more user CPU per transaction than one edge-triggered epoll loop
//! (PgBouncer's shape), and a loop nested in a tokio task still 0.8 us more, so the loop
//! runs outside the runtime. The runtime keeps everything else: the startup, TLS
//! sessions, a drain's quiet ticks, inspections, moves between threads and servers.
//!
//! A session enters the rail at a transaction boundary once it has lasted
//! (`relay::RAIL_AFTER` reads in tokio first: a connection per transaction would pay the
//! hand-overs for nothing), with its sockets out of tokio's reactor. It leaves the rail
//! when its relay ends or stops at a transaction boundary (for the balancer, an
//! inspection), when its server's unasked error comes, or when its task takes it back (a
//! sever, a drain's signal); after a drain's signal it relays on in tokio until it ends.

mod lane;
#[cfg(test)]
mod tests;

use crate::conn::{in_lane, Ctx, Lane};
use crate::metrics::{CloseReason, Metrics};
use crate::placement::Seats;
use crate::relay::{Drain, End};
use crate::route::{Route, SocketHandle};
use crate::stream::Stream;
use crate::txstate::TxState;
use rustix::event::epoll;
use std::cell::RefCell;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// One relay thread's rail: its epoll set, and the commands of the thread's tasks.
pub(crate) struct Rail {
    ep: OwnedFd,
    /// An eventfd in the set: a command is waiting.
    wake: OwnedFd,
    inbox: Mutex<Inbox>,
    next: AtomicU64,
}

#[derive(Default)]
struct Inbox {
    cmds: Vec<Cmd>,
    /// The rail stopped (its relay thread ends): a session stays in tokio.
    stopped: bool,
}

enum Cmd {
    Add(Box<lane::Entry>),
    /// The task wants its session back.
    Back(u64),
    Stop,
}

/// Why a session left the rail.
enum Back {
    /// Its relay ended or stopped, as `relay::relay` would have.
    End(End),
    /// Its task took it back (or the rail could not take it).
    Asked,
}

/// How a session left the rail: with what it read and could not write yet (client to
/// server, server to client), which its task writes before anything else.
struct Left {
    back: Back,
    pending: [Vec<u8>; 2],
}

/// What the rail holds of a session: its own handles on the sockets (the task keeps its
/// own, and takes the sockets back once the rail has let go of them).
struct Session {
    client: Arc<std::net::TcpStream>,
    server: Arc<std::net::TcpStream>,
    tx: Option<Arc<Mutex<TxState>>>,
    movable: bool,
    thread: Option<(Arc<Seats>, usize)>,
    metrics: Arc<Metrics>,
}

thread_local! {
    /// The rail of the relay thread this runs on (none: sessions relay in tokio).
    static HERE: RefCell<Option<Arc<Rail>>> = const { RefCell::new(None) };
}

impl Rail {
    /// Starts relay thread `i`'s rail on a thread of its own, whose CPU time the balancer
    /// counts as the relay thread's.
    pub(crate) fn start(i: usize, seats: &Arc<Seats>) -> io::Result<Arc<Rail>> {
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let flags = rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK;
        let wake = rustix::event::eventfd(0, flags)?;
        let data = epoll::EventData::new_u64(lane::WAKE);
        epoll::add(&ep, &wake, data, epoll::EventFlags::IN)?;
        let rail = Arc::new(Rail {
            ep,
            wake,
            inbox: Mutex::default(),
            next: AtomicU64::new(0),
        });
        let (started, seen) = std::sync::mpsc::channel();
        let (r, seats) = (rail.clone(), seats.clone());
        std::thread::Builder::new()
            .name(format!("rail-{i}"))
            .spawn(move || {
                if let Some(path) = crate::balance::own_schedstat() {
                    let _ = seats.threads[i].rail.set(path);
                }
                let _ = started.send(());
                run(&r);
            })?;
        let _ = seen.recv();
        Ok(rail)
    }

    /// Sends a command; false if the rail has stopped.
    fn send(&self, cmd: Cmd) -> bool {
        let mut inbox = self.inbox.lock().unwrap_or_else(|p| p.into_inner());
        if inbox.stopped {
            return false;
        }
        if matches!(cmd, Cmd::Stop) {
            inbox.stopped = true;
        }
        inbox.cmds.push(cmd);
        drop(inbox);
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
        true
    }

    /// Stops the rail: its sessions go back to their tasks.
    pub(crate) fn stop(&self) {
        self.send(Cmd::Stop);
    }

    /// Makes `rail` the one of the relay thread this runs on.
    pub(crate) fn set_here(rail: Arc<Rail>) {
        HERE.with_borrow_mut(|h| *h = Some(rail));
    }

    pub(crate) fn here() -> Option<Arc<Rail>> {
        HERE.with_borrow(Clone::clone)
    }
}

/// The rail's loop. A daemon that cannot relay must not look healthy: if the loop fails or
/// panics, the proxy exits.
fn run(rail: &Rail) {
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| lane::run(rail)));
    let why = match ran {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e.to_string(),
        Err(_) => "it panicked".to_string(),
    };
    tracing::error!(why, "a relay rail stopped: exiting");
    std::process::exit(70);
}

/// `session::relay_once` for a plaintext session on a thread with a rail: the same lane,
/// sever registration and outcome, with the session on the rail until it stops.
pub(crate) async fn relay_once(
    rail: &Rail,
    (client, server): (TcpStream, TcpStream),
    (route, lane): (&Arc<Route>, &Lane),
    movable: bool,
    tx: &Arc<Mutex<TxState>>,
    ctx: &Ctx,
) -> (CloseReason, Option<Stream>, Option<Stream>) {
    // Out of tokio's reactor: the rail's set takes them.
    let (c, s) = match (client.into_std(), server.into_std()) {
        (Ok(c), Ok(s)) => (Arc::new(c), Arc::new(s)),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "cannot take a session out of the runtime's reactor");
            return (CloseReason::IoError, None, None);
        }
    };
    let here = crate::balance::this_thread();
    let client_handle = (!movable).then(|| c.clone() as SocketHandle);
    let handles = (client_handle, s.clone() as SocketHandle);
    let (cr, sr, metrics) = (&c, &s, &ctx.metrics);
    let reason = in_lane(route, lane, ctx, handles, |token, signal| async move {
        let tracked = signal.is_some() || movable || here.is_some();
        let session = Session {
            client: cr.clone(),
            server: sr.clone(),
            tx: tracked.then(|| tx.clone()),
            movable,
            thread: here.clone(),
            metrics: metrics.clone(),
        };
        let left = ride(rail, session, token, signal).await;
        match left.back {
            Back::End(end) => end,
            Back::Asked if token.is_cancelled() => End::Severed,
            Back::Asked => {
                let thread = here.as_ref().map(|(seats, i)| &seats.threads[*i]);
                let d = tracked.then_some(Drain {
                    signal,
                    tx,
                    movable,
                    thread,
                    to_rail: false,
                });
                in_tokio((cr, sr), left.pending, token, d, metrics).await
            }
        }
    })
    .await;
    let back = |a: Arc<std::net::TcpStream>| {
        let sock = Arc::try_unwrap(a).ok()?;
        TcpStream::from_std(sock).ok().map(Stream::Plain)
    };
    (reason, back(c), back(s))
}

/// Puts the session on the rail and waits until it leaves, taking it back at a sever or a
/// drain's signal.
async fn ride(
    rail: &Rail,
    session: Session,
    token: &CancellationToken,
    signal: Option<&CancellationToken>,
) -> Left {
    let (done, mut left) = tokio::sync::oneshot::channel();
    let id = rail.next.fetch_add(1, Ordering::Relaxed);
    if !rail.send(Cmd::Add(Box::new(lane::Entry::new(id, session, done)))) {
        return Left {
            back: Back::Asked,
            pending: Default::default(),
        };
    }
    let mut asking = AskBack(Some((rail, id)));
    tokio::select! {
        biased;
        l = &mut left => {
            asking.0 = None;
            return l.unwrap_or_else(|_| gone());
        }
        _ = token.cancelled() => {}
        _ = crate::relay::wait_signal(signal) => {}
    }
    asking.ask();
    left.await.unwrap_or_else(|_| gone())
}

/// Asks the rail for the session back (when its task's wait ends without it, dropped too).
struct AskBack<'a>(Option<(&'a Rail, u64)>);

impl AskBack<'_> {
    fn ask(&mut self) {
        if let Some((rail, id)) = self.0.take() {
            rail.send(Cmd::Back(id));
        }
    }
}

impl Drop for AskBack<'_> {
    fn drop(&mut self) {
        self.ask();
    }
}

/// The rail ended without saying how the session left (it cannot: its loop exits the
/// process if it fails).
fn gone() -> Left {
    Left {
        back: Back::End(End::Error(io::Error::other("the relay rail stopped"))),
        pending: Default::default(),
    }
}

/// The rest of a session taken back from the rail, in tokio (through duplicates of its
/// sockets, registered in the reactor while they relay): what the rail could not write
/// yet first, then `relay::relay`.
async fn in_tokio(
    (client, server): (&std::net::TcpStream, &std::net::TcpStream),
    [to_server, to_client]: [Vec<u8>; 2],
    token: &CancellationToken,
    d: Option<Drain<'_>>,
    metrics: &Metrics,
) -> End {
    use tokio::io::AsyncWriteExt;
    let dup = |s: &std::net::TcpStream| s.try_clone().and_then(TcpStream::from_std);
    let (c, s) = match (dup(client), dup(server)) {
        (Ok(c), Ok(s)) => (c, s),
        (Err(e), _) | (_, Err(e)) => return End::Error(e),
    };
    for (sock, bytes) in [(&s, to_server), (&c, to_client)] {
        if !bytes.is_empty() {
            if let Err(e) = crate::pipe::Tcp(sock).write_all(&bytes).await {
                return End::Error(e);
            }
        }
    }
    crate::relay::relay(&c, &s, token, d, metrics).await
}
