//! The session state machine around the byte loops (`pipe`): both directions, half-closes
//! passed on, the route's token severing both sockets at once, and a planned switchover's
//! drain to the session's next transaction boundary.

use crate::metrics::{Direction, Metrics};
use crate::pipe::{has_unread, pipe, Tcp};
use crate::txstate::TxState;
use futures::task::AtomicWaker;
use futures::FutureExt;
use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Flush byte counts to the shared metrics every this many bytes (and at the end), so
/// the hot path does not touch shared atomics on every read.
pub(crate) const METRIC_FLUSH: u64 = 1 << 20;

#[derive(Debug)]
pub enum End {
    ClientClosed,
    ServerClosed,
    Severed,
    /// A planned switchover's drain found the session between transactions: the caller
    /// closes it cleanly.
    Drained,
    /// A movable session changed what the proxy knows of it and is idle: the caller asks
    /// its server what it holds now, then relays again.
    Inspect,
    /// The server's side ended while the client's is open (a movable session, whose
    /// client's side the relay leaves alone: the caller may move it).
    ServerLost,
    /// The balancer asked the session's thread for sessions and it is between
    /// transactions: the caller moves it to another relay thread (`balance`).
    Rebalance,
    /// The session has lasted long enough and is between transactions: the caller puts it
    /// on its thread's rail (`rail`).
    Rail,
    Error(io::Error),
}

/// How one direction ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    Eof,
    /// The drain signal is on and the session is between transactions.
    Drained,
    /// See `End::Inspect`.
    Inspect,
    /// See `Drain::hold_if_lost`.
    Lost,
    /// See `End::Rebalance`.
    Rebalance,
    /// See `End::Rail`.
    Rail,
}

/// A session's drain: the route's signal and the session's transaction state, fed by both
/// directions as bytes are read. A session that may move has one without a signal too.
#[derive(Clone, Copy)]
pub struct Drain<'a> {
    pub signal: Option<&'a CancellationToken>,
    pub tx: &'a std::sync::Mutex<TxState>,
    /// The session may move (the proxy authenticated its client): it stops for an
    /// inspection when it asks for one, and a server's end leaves its client's side open.
    pub movable: bool,
    /// The session's relay thread, when the balancer may move sessions off it.
    pub(crate) thread: Option<&'a crate::placement::Thread>,
    /// The thread has a rail the session is not on yet: it stops for it once it has shown
    /// it lasts (`RAIL_AFTER`).
    pub(crate) to_rail: bool,
}

/// Reads relayed (both directions) before a plaintext session moves onto its thread's rail
/// (`rail`), about 64 simple transactions: entering and leaving the rail costs the session
/// two hand-overs between threads and a few system calls (measured with a connection per
/// transaction, `pgbench -C`: about 30 us of CPU per session), which a session saves back
/// within a few dozen transactions, and a short one never pays.
pub(crate) const RAIL_AFTER: u64 = 128;

impl Drain<'_> {
    pub(crate) fn feed(&self, direction: Direction, bytes: &[u8]) {
        if let Ok(mut tx) = self.tx.lock() {
            match direction {
                Direction::ClientToServer => tx.from_client(bytes),
                Direction::ServerToClient => tx.from_server(bytes),
            }
        }
    }

    /// Whether the server's `chunk` (fed already) carries an error that answers no request
    /// (its backend is ending) in a movable session: then it is kept in the session's state
    /// instead of passed on, and the relay ends. The session may still move: its client
    /// must not have seen its server end.
    /// Returns how much of `chunk`, before the error, still goes to the client.
    pub(crate) fn hold_if_lost(&self, chunk: &[u8]) -> Option<usize> {
        if !self.movable {
            return None;
        }
        let mut tx = self.tx.lock().ok()?;
        let from = tx.lost_from.take()?.min(chunk.len());
        tx.held.extend_from_slice(&chunk[from..]);
        Some(from)
    }

    /// Where the server-to-client direction stops after a chunk (this runs after every
    /// chunk from the server), if it does; the caller checks that the client has nothing
    /// unread. Drained: draining past the quiet wait, and nothing of the session would be
    /// cut by closing it now (the relay closes it right after the answer that made it idle).
    pub fn stop_after_chunk(&self) -> Option<Stop> {
        let tx = self.tx.lock().ok()?;
        // `forced` first: it is false outside a drain, and the token's check takes a lock.
        if tx.forced && tx.idle() && self.signal.is_some_and(|s| s.is_cancelled()) {
            return Some(Stop::Drained);
        }
        if tx.idle() && self.thread.is_some_and(|t| t.take_leave()) {
            return Some(Stop::Rebalance);
        }
        if self.to_rail && tx.idle() && tx.activity >= RAIL_AFTER {
            return Some(Stop::Rail);
        }
        (self.movable && tx.wants_inspection()).then_some(Stop::Inspect)
    }

    /// Whether the session is between transactions, whether it is also settled (not
    /// between a prepare and its execute), and how many reads it has relayed.
    fn idle_activity(&self) -> (bool, bool, u64) {
        self.tx.lock().map_or((false, false, 0), |tx| {
            (tx.idle(), tx.settled(), tx.activity)
        })
    }

    /// Between transactions for at least the quiet time already (a client pausing, or a
    /// session idle in a pool, when the drain starts): closed at once.
    fn quiet_already(&self) -> bool {
        let quiet = DRAIN_TICK * DRAIN_QUIET_TICKS;
        self.tx
            .lock()
            .is_ok_and(|tx| tx.settled() && tx.idle_at.elapsed() >= quiet)
    }

    fn force(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.forced = true;
        }
    }
}

/// A draining session is closed once it has been settled (between transactions, and not
/// between a prepare and its execute or the startup and the first query: see
/// `TxState::settled`), with no byte moving either way, for `DRAIN_QUIET_TICKS` checks in a
/// row `DRAIN_TICK` apart (2 to 3 ms), or at once when the drain starts if its last
/// ReadyForQuery (idle) is older than that. A client whose second half the proxy cannot
/// foresee still sends it well within the quiet time as a rule; one that pauses between
/// transactions, or a session idle in a pool, is closed early in its pause, far from its
/// next request. (Measured: with the quiet time alone, a loaded 2-core machine let
/// tokio-postgres' execute come more than 2 ms after its prepare's answer in about one
/// close in five, and the client saw the close as a failed transaction.)
pub const DRAIN_TICK: Duration = Duration::from_millis(1);
pub const DRAIN_QUIET_TICKS: u32 = 2;

/// After this long, a session that never fell quiet (a client sending without pause) is
/// closed at its next transaction boundary, as soon as the answer that made it idle is
/// passed on.
pub const DRAIN_FORCE: Duration = Duration::from_millis(100);

/// The drain's state between checks.
struct Quiet {
    interval: tokio::time::Interval,
    ticks: u32,
    /// Checks in a row that found the session idle with no read since the previous one.
    quiet: u32,
    /// The activity count at the previous check.
    last: u64,
}

/// What the drain's check decided.
#[derive(Debug, PartialEq, Eq)]
enum Check {
    /// Close the session now.
    Close,
    /// Check again at the next tick.
    Again,
    /// Forced: the relay closes it at its next boundary; no more ticks (a session in a long
    /// transaction would otherwise wake every millisecond until the drain timeout).
    Forced,
}

/// The drain's check at each tick.
fn drain_check(d: &Drain<'_>, q: &mut Quiet) -> Check {
    q.ticks += 1;
    let (idle, settled, activity) = d.idle_activity();
    q.quiet = if settled && activity == q.last {
        q.quiet + 1
    } else {
        0
    };
    q.last = activity;
    if q.ticks.saturating_mul(DRAIN_TICK.as_millis() as u32) >= DRAIN_FORCE.as_millis() as u32 {
        d.force();
        return if idle { Check::Close } else { Check::Forced };
    }
    if q.quiet >= DRAIN_QUIET_TICKS {
        Check::Close
    } else {
        Check::Again
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
    let halves = ((Tcp(client), Tcp(client)), (Tcp(server), Tcp(server)));
    both_ways(
        halves,
        (client, server),
        token,
        drain,
        metrics,
        Gate::Directions,
    )
    .await
}

/// `relay` over streams either of which may be TLS: the same loop, through the streams'
/// own reading and writing. `fds` are the client's and the server's sockets (duplicates:
/// a TLS stream owns its socket).
pub(crate) async fn relay_streams(
    client: &mut crate::stream::Stream,
    server: &mut crate::stream::Stream,
    fds: (&std::os::fd::OwnedFd, &std::os::fd::OwnedFd),
    token: &CancellationToken,
    drain: Option<Drain<'_>>,
    metrics: &Metrics,
) -> End {
    let halves = (tokio::io::split(client), tokio::io::split(server));
    // Not gated: reading a TLS stream may write to its socket (an alert, a key update),
    // registering the reading direction's waker where the writing one's was.
    both_ways(halves, fds, token, drain, metrics, Gate::TokensOnly).await
}

/// Both directions of a session, each through the one byte loop (`pipe`) from a side's
/// read half to the other's write half, under the session state machine (`drive`).
async fn both_ways<CR, CW, SR, SW>(
    ((mut cr, mut cw), (mut sr, mut sw)): ((CR, CW), (SR, SW)),
    (client, server): (&impl AsFd, &impl AsFd),
    token: &CancellationToken,
    drain: Option<Drain<'_>>,
    metrics: &Metrics,
    gate: Gate,
) -> End
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    SR: AsyncRead + Unpin,
    SW: AsyncWrite + Unpin,
{
    let c2s = pipe(
        &mut cr,
        &mut sw,
        client,
        metrics,
        Direction::ClientToServer,
        drain,
    );
    let s2c = pipe(
        &mut sr,
        &mut cw,
        client,
        metrics,
        Direction::ServerToClient,
        drain,
    );
    match gate {
        Gate::Directions => {
            tokio::pin!(c2s, s2c);
            let (c2s, s2c) = (Gated::new(c2s), Gated::new(s2c));
            drive(c2s, s2c, client, server, token, drain).await
        }
        Gate::TokensOnly => drive(c2s, s2c, client, server, token, drain).await,
    }
}

/// Which of a session's waits `drive` polls only after their own wake-up (`Gated`).
#[derive(Clone, Copy)]
enum Gate {
    /// The tokens and each direction: a wake-up for one socket polls that direction only,
    /// not the other's readiness as well (a lock in tokio's readiness check, on every
    /// read). Sound where each socket's read readiness is waited on by one direction and
    /// its write readiness by the other (plain TCP both sides).
    Directions,
    /// The tokens only.
    TokensOnly,
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
    // The waits on the tokens are made once per session and gated (see `Gated`): polling a
    // token's wait takes two locks, and the task is polled on every read (twice per
    // transaction), a cost PgBouncer's loop does not have.
    let severed = token.cancelled();
    let signal = drain.and_then(|d| d.signal);
    let draining = wait_signal(signal);
    tokio::pin!(c2s, s2c, severed, draining);
    let mut severed = Gated::new(severed);
    let mut draining = Gated::new(draining);
    let (mut c_done, mut s_done) = (false, false);
    let mut drain_seen = signal.is_none();
    let mut quiet: Option<Quiet> = None;
    loop {
        tokio::select! {
            biased;
            _ = &mut severed => return End::Severed,
            _ = &mut draining, if !drain_seen => {
                drain_seen = true;
                if drain.is_some_and(|d| d.quiet_already()) && !has_unread(client) {
                    return End::Drained;
                }
                let start = tokio::time::Instant::now() + DRAIN_TICK;
                let mut interval = tokio::time::interval_at(start, DRAIN_TICK);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let last = drain.map_or(0, |d| d.idle_activity().2);
                quiet = Some(Quiet { interval, ticks: 0, quiet: 0, last });
            }
            _ = tick(&mut quiet) => {
                if let (Some(d), Some(q)) = (drain, quiet.as_mut()) {
                    match drain_check(&d, q) {
                        // Not quiet after all if its next request is already queued.
                        Check::Close if has_unread(client) => q.quiet = 0,
                        Check::Close => return End::Drained,
                        Check::Again => {}
                        Check::Forced => quiet = None,
                    }
                }
            }
            r = &mut c2s, if !c_done => {
                match r {
                    Err(e) => return End::Error(e),
                    Ok(Stop::Drained) => return End::Drained,
                    Ok(Stop::Inspect) => return End::Inspect,
                    Ok(Stop::Lost) => return End::ServerLost,
                    Ok(Stop::Rebalance) => return End::Rebalance,
                    Ok(Stop::Rail) => return End::Rail,
                    Ok(Stop::Eof) => {}
                }
                c_done = true;
                // The client will send nothing more: tell the server, keep reading its answer.
                let _ = socket2::SockRef::from(server).shutdown(Shutdown::Write);
                if s_done { return End::ClientClosed }
            }
            r = &mut s2c, if !s_done => {
                match r {
                    Err(e) if drain.is_some_and(|d| d.movable) && !c_done => {
                        tracing::debug!(error = %e, "server side lost");
                        return End::ServerLost;
                    }
                    Err(e) => return End::Error(e),
                    Ok(Stop::Drained) => return End::Drained,
                    Ok(Stop::Inspect) => return End::Inspect,
                    Ok(Stop::Lost) => return End::ServerLost,
                    Ok(Stop::Rebalance) => return End::Rebalance,
                    Ok(Stop::Rail) => return End::Rail,
                    // The client's side stays open: the caller may move the session.
                    Ok(Stop::Eof) if drain.is_some_and(|d| d.movable) && !c_done => {
                        return End::ServerLost
                    }
                    Ok(Stop::Eof) => {}
                }
                s_done = true;
                let _ = socket2::SockRef::from(client).shutdown(Shutdown::Write);
                if c_done { return End::ServerClosed }
            }
        }
    }
}

/// A wait polled only when its own wake-up came: the inner future is polled with a waker
/// of the gate's, which records that it fired and wakes the task; a poll of the task for
/// any other reason (a socket turned readable) costs one atomic swap, not the inner
/// future's poll.
struct Gated<F> {
    inner: F,
    wake: Arc<GateWake>,
    waker: Waker,
    started: bool,
}

struct GateWake {
    fired: AtomicBool,
    task: AtomicWaker,
}

impl Wake for GateWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future + Unpin> Gated<F> {
    fn new(inner: F) -> Gated<F> {
        let wake = Arc::new(GateWake {
            fired: AtomicBool::new(false),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(wake.clone());
        Gated {
            inner,
            wake,
            waker,
            started: false,
        }
    }
}

impl<F: Future + Unpin> Future for Gated<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.wake.task.register(cx.waker());
        // Polled once to register the gate's waker; then only after it fired.
        if self.started && !self.wake.fired.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        self.started = true;
        let this = &mut *self;
        this.inner.poll_unpin(&mut Context::from_waker(&this.waker))
    }
}

async fn tick(quiet: &mut Option<Quiet>) {
    match quiet {
        Some(q) => drop(q.interval.tick().await),
        None => std::future::pending().await,
    }
}

/// Until `signal` (a drain's) comes; forever without one.
pub(crate) async fn wait_signal(signal: Option<&CancellationToken>) {
    match signal {
        Some(s) => s.cancelled().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::txstate::Start;

    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend(((body.len() + 4) as u32).to_be_bytes());
        m.extend(body);
        m
    }

    /// A session past its startup and a first query: settled, as after ReadyForQuery 'I'.
    fn idle_session() -> std::sync::Mutex<TxState> {
        let mut tx = TxState::new(Start::Startup, &[]);
        tx.from_server(&msg(b'Z', b"I"));
        tx.from_client(&msg(b'Q', b"SELECT 1\0"));
        tx.from_server(&msg(b'Z', b"I"));
        assert!(tx.settled());
        std::sync::Mutex::new(tx)
    }

    /// A drain under way over a settled session.
    struct Draining {
        signal: CancellationToken,
        tx: std::sync::Mutex<TxState>,
    }

    impl Draining {
        fn new() -> Draining {
            let signal = CancellationToken::new();
            signal.cancel();
            Draining {
                signal,
                tx: idle_session(),
            }
        }

        fn drain(&self) -> Drain<'_> {
            Drain {
                signal: Some(&self.signal),
                tx: &self.tx,
                movable: false,
                thread: None,
                to_rail: false,
            }
        }
    }

    const FORCE_TICKS: u32 = (DRAIN_FORCE.as_millis() / DRAIN_TICK.as_millis()) as u32;

    fn quiet(d: &Drain<'_>) -> Quiet {
        Quiet {
            interval: tokio::time::interval(DRAIN_TICK),
            ticks: 0,
            quiet: 0,
            last: d.idle_activity().2,
        }
    }

    #[tokio::test]
    async fn a_session_is_drained_only_after_checks_in_a_row_found_it_quiet() {
        let w = Draining::new();
        let d = w.drain();
        let mut q = quiet(&d);
        assert_eq!(
            drain_check(&d, &mut q),
            Check::Again,
            "one quiet check is not enough"
        );
        assert_eq!(
            drain_check(&d, &mut q),
            Check::Close,
            "idle and silent for two checks"
        );

        // Bytes moved between checks (the second half of an extended-protocol exchange,
        // answered): idle again at the check, but not quiet; the count starts over.
        let mut q = quiet(&d);
        assert_eq!(drain_check(&d, &mut q), Check::Again);
        d.feed(Direction::ClientToServer, &msg(b'S', b""));
        d.feed(Direction::ServerToClient, &msg(b'Z', b"I"));
        assert_eq!(
            drain_check(&d, &mut q),
            Check::Again,
            "active since the last check"
        );
        assert_eq!(
            drain_check(&d, &mut q),
            Check::Again,
            "one quiet check again"
        );
        assert_eq!(drain_check(&d, &mut q), Check::Close, "two in a row");

        // A request in flight is never closed, quiet or not.
        d.feed(Direction::ClientToServer, &msg(b'Q', b"SELECT 1\0"));
        let mut q = quiet(&d);
        for _ in 0..5 {
            assert_eq!(drain_check(&d, &mut q), Check::Again);
        }
        assert!(
            d.stop_after_chunk().is_none(),
            "the relay does not close it at a boundary yet"
        );
    }

    #[tokio::test]
    async fn a_session_that_never_falls_quiet_is_closed_at_a_boundary_after_the_force_delay() {
        let w = Draining::new();
        let d = w.drain();
        let mut q = quiet(&d);
        for tick in 1..FORCE_TICKS {
            d.feed(Direction::ClientToServer, &msg(b'Q', b"SELECT 1\0"));
            assert_eq!(drain_check(&d, &mut q), Check::Again, "busy at tick {tick}");
            d.feed(Direction::ServerToClient, &msg(b'Z', b"I"));
            assert!(
                d.stop_after_chunk().is_none(),
                "not forced yet at tick {tick}"
            );
        }
        d.feed(Direction::ClientToServer, &msg(b'Q', b"SELECT 1\0"));
        assert_eq!(
            drain_check(&d, &mut q),
            Check::Forced,
            "in flight at the force tick: no more ticks"
        );
        assert!(d.stop_after_chunk().is_none(), "not at a boundary");
        d.feed(Direction::ServerToClient, &msg(b'Z', b"I"));
        assert_eq!(
            d.stop_after_chunk(),
            Some(Stop::Drained),
            "forced: closed right after the answer"
        );
    }

    #[tokio::test]
    async fn a_session_between_a_prepare_and_its_execute_is_not_closed_by_the_quiet_rule() {
        let w = Draining::new();
        let d = w.drain();
        // A prepare round trip (Parse, Describe, Sync), answered: the execute follows.
        d.feed(
            Direction::ClientToServer,
            &[
                msg(b'P', b"\0insert\0\0\0"),
                msg(b'D', b"S\0"),
                msg(b'S', b""),
            ]
            .concat(),
        );
        d.feed(
            Direction::ServerToClient,
            &[msg(b'1', b""), msg(b'Z', b"I")].concat(),
        );
        if let Ok(mut t) = w.tx.lock() {
            t.idle_at -= DRAIN_TICK * DRAIN_QUIET_TICKS;
        }
        assert!(!d.quiet_already(), "between the halves of a pair");
        let mut q = quiet(&d);
        for tick in 1..FORCE_TICKS {
            assert_eq!(drain_check(&d, &mut q), Check::Again, "tick {tick}");
        }
        // A client that prepared and never executes is still closed, at the force tick.
        assert_eq!(drain_check(&d, &mut q), Check::Close);
    }

    #[test]
    fn a_session_idle_for_the_quiet_time_already_is_closed_when_the_drain_starts() {
        let w = Draining::new();
        let d = w.drain();
        assert!(!d.quiet_already(), "idle just now");
        if let Ok(mut t) = w.tx.lock() {
            t.idle_at -= DRAIN_TICK * DRAIN_QUIET_TICKS;
        }
        assert!(d.quiet_already());
        d.feed(Direction::ClientToServer, &msg(b'Q', b"SELECT 1\0"));
        assert!(!d.quiet_already(), "a request in flight");
    }

    /// Counts its polls; pending until `ready` is set, waking through the last waker.
    struct Counted<'a> {
        polls: &'a std::cell::Cell<u32>,
        ready: &'a std::cell::Cell<bool>,
    }

    impl Future for Counted<'_> {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            self.polls.set(self.polls.get() + 1);
            if self.ready.get() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    #[test]
    fn a_gated_wait_is_polled_only_after_its_own_wake() {
        let (polls, ready) = (std::cell::Cell::new(0), std::cell::Cell::new(false));
        let mut gated = Gated::new(Counted {
            polls: &polls,
            ready: &ready,
        });
        let mut cx = Context::from_waker(Waker::noop());
        assert!(gated.poll_unpin(&mut cx).is_pending());
        assert_eq!(polls.get(), 1, "the first poll registers");
        for _ in 0..10 {
            assert!(gated.poll_unpin(&mut cx).is_pending());
        }
        assert_eq!(polls.get(), 1, "task polls for other reasons skip it");
        ready.set(true);
        gated.waker.wake_by_ref();
        assert!(gated.poll_unpin(&mut cx).is_ready());
        assert_eq!(polls.get(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_cancelled_while_the_relay_is_busy_still_ends_it() {
        let token = CancellationToken::new();
        let severed = token.cancelled();
        tokio::pin!(severed);
        let mut gated = Gated::new(severed);
        let busy = async {
            // Wakes the task often, for reasons of its own, then cancels.
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            token.cancel();
            std::future::pending::<()>().await;
        };
        tokio::select! {
            _ = &mut gated => {}
            _ = busy => unreachable!(),
            _ = tokio::time::sleep(Duration::from_secs(5)) => panic!("the cancel was missed"),
        }
    }

    #[test]
    fn a_session_stops_for_the_rail_between_transactions_once_it_has_lasted() {
        let tx = std::sync::Mutex::new(TxState::new(Start::Startup, &[]));
        let d = Drain {
            signal: None,
            tx: &tx,
            movable: false,
            thread: None,
            to_rail: true,
        };
        let query = msg(b'Q', b"select 1\0");
        let ready = |status: u8| msg(b'Z', &[status]);
        d.feed(Direction::ServerToClient, &ready(b'I'));
        let reads = || tx.lock().map_or(0, |t| t.activity);
        while reads() + 2 < RAIL_AFTER {
            d.feed(Direction::ClientToServer, &query);
            d.feed(Direction::ServerToClient, &ready(b'I'));
            assert_eq!(d.stop_after_chunk(), None, "too short yet: {}", reads());
        }
        // In a transaction when it has lasted: not yet.
        d.feed(Direction::ClientToServer, &query);
        d.feed(Direction::ServerToClient, &ready(b'T'));
        assert_eq!(d.stop_after_chunk(), None);
        d.feed(Direction::ClientToServer, &query);
        d.feed(Direction::ServerToClient, &ready(b'I'));
        assert_eq!(d.stop_after_chunk(), Some(Stop::Rail));
        // Not on a thread without a rail, nor on the rail itself.
        let d = Drain {
            to_rail: false,
            ..d
        };
        assert_eq!(d.stop_after_chunk(), None);
    }

    #[test]
    fn without_the_signal_nothing_is_due() {
        let signal = CancellationToken::new();
        let tx = idle_session();
        if let Ok(mut t) = tx.lock() {
            t.forced = true;
        }
        let d = Drain {
            signal: Some(&signal),
            tx: &tx,
            movable: false,
            thread: None,
            to_rail: false,
        };
        assert!(d.stop_after_chunk().is_none());
    }
}

#[cfg(test)]
#[path = "relay_tls_tests.rs"]
mod tls_tests;
