//! One relayed session, whatever the mode: the client side, the server side and what is
//! known of the session (where it stands between transactions, its start: the startup
//! packet, the client's credentials, its minted cancel key). It relays until the session
//! ends; when a planned switchover's drain finds it between transactions, it moves to the
//! new master (a swap of its server side, see `migrate`) if it can, and is closed at that
//! boundary if it cannot. A session whose server goes away (a failover's sever, a crash)
//! while it is idle moves too, if the proxy can prove its state (`migrate::ledger`).

use crate::balance::Hop;
use crate::conn::{in_lane, Ctx, Lane};
use crate::metrics::CloseReason;
use crate::migrate::{self, state::Unmovable};
use crate::relay::{relay, Drain};
use crate::route::{Route, SocketHandle};
use crate::session_start::Started;
use crate::stream::Stream;
use crate::txstate::TxState;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use tokio_util::task::task_tracker::TaskTrackerToken;

/// A session once its start is done, as `conn::serve_with` hands it over.
pub(crate) struct Parts<S> {
    pub client: S,
    pub server: Stream,
    pub known: Known,
}

/// What is known of a session besides its two sides.
pub(crate) struct Known {
    pub route: Arc<Route>,
    pub lane: Lane,
    pub tx: TxState,
    pub started: Started,
    /// The startup packet as the client sent it (what a session elsewhere starts with).
    pub startup: Vec<u8>,
    /// The role the client logged in as (`None`: an opaque session).
    pub user: Option<String>,
    /// Counts the session in its lane while it is there (see `conn::Prepared`).
    pub task: Option<TaskTrackerToken>,
}

impl Known {
    /// The proxy authenticated the client (it can log in as it elsewhere) and tracks the
    /// session for a move after a failover (`--session-moves all`).
    fn may_move(&self) -> bool {
        self.started.credentials.is_some() && self.user.is_some() && self.tx.tracked()
    }
}

/// Relays the session to its end, moving it at each master change it can survive.
pub(crate) async fn run(s: Parts<Stream>, ctx: &Ctx) -> CloseReason {
    let Parts {
        mut client,
        server,
        known: mut k,
    } = s;
    let mut server = Some(server);
    if let Some(held) = k.started.lost.take() {
        drop(server.take());
        match start_elsewhere(&mut client, &mut k, ctx).await {
            Ok(s) => server = Some(s),
            Err(why) => {
                ctx.metrics.restarted(why.label());
                k.tx.held = start_lost_error(held);
                return close(client, None, &k, CloseReason::ServerLost).await;
            }
        }
    }
    run_from(client, server, k, ctx).await
}

/// The session's relay from here on: on this thread until it ends or moves to another
/// (`balance`), whose task goes on with it here.
pub(crate) async fn run_from(
    mut client: Stream,
    mut server: Option<Stream>,
    mut k: Known,
    ctx: &Ctx,
) -> CloseReason {
    loop {
        let Some(s) = server.take() else {
            return CloseReason::Severed;
        };
        let (movable, lane) = (k.may_move(), (&k.route, &k.lane));
        let tx = Arc::new(Mutex::new(k.tx));
        let (reason, c, s) = relay_once(client, s, lane, movable, &tx, ctx).await;
        // The rail lets go of its handle before the session leaves it.
        k.tx = match Arc::try_unwrap(tx) {
            Ok(tx) => tx.into_inner().unwrap_or_else(|p| p.into_inner()),
            Err(shared) => shared.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        };
        let Some(c) = c else {
            // Its sockets are being cut by a sever.
            return CloseReason::Severed;
        };
        (client, server) = (c, s);
        if reason == CloseReason::Rebalance {
            let Some(s) = server.take() else {
                return CloseReason::Severed;
            };
            match crate::balance::hop(client, s, k) {
                Hop::Gone => return CloseReason::Rebalance,
                Hop::Lost => return CloseReason::IoError,
                Hop::Stay(parts) => {
                    let (c, s, known) = *parts;
                    (client, server, k) = (c, Some(s), known);
                    continue;
                }
            }
        }
        if reason == CloseReason::Rail {
            // On the rail from the next relay on (the same thread, the same sockets).
            continue;
        }
        let since = std::time::Instant::now();
        let result = match (reason, server.as_mut()) {
            (CloseReason::Inspect, Some(s)) => {
                inspect_in_place(&mut client, s, &mut k).await;
                continue;
            }
            (CloseReason::Drained, Some(s)) => move_drained(&mut client, s, &mut k, ctx).await,
            // The client said goodbye (Terminate) and its server went first: its end.
            (CloseReason::ServerLost, _) if k.tx.client_terminated => {
                return CloseReason::ClientClosed
            }
            (CloseReason::Severed | CloseReason::ServerLost, _)
                if k.may_move() && !k.tx.client_terminated =>
            {
                match move_lost(&mut client, &mut k, ctx).await {
                    Ok(s) => {
                        server = Some(s);
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            // Not closes of their own if they end it (a sever raced them): counted as one.
            (CloseReason::Inspect, _) => return CloseReason::Severed,
            (CloseReason::ServerLost, _) => return CloseReason::ServerClosed,
            _ => return reason,
        };
        match result {
            Ok(()) => {
                ctx.metrics.moved(since.elapsed());
                tracing::debug!(after = ?reason, "session moved");
            }
            Err(why) => {
                ctx.metrics.unmoved(why.label());
                tracing::debug!(why = why.label(), after = ?reason, "session closed");
                return close(client, server, &k, reason).await;
            }
        }
    }
}

/// Closes a session that could not move: at its boundary after a drain (FATAL 57P01), with
/// 57P01 too if its server went away while it was idle (it reads it when it next sends), or
/// as a sever does (no message) if it had a request in flight.
async fn close(
    mut client: Stream,
    server: Option<Stream>,
    k: &Known,
    reason: CloseReason,
) -> CloseReason {
    match (reason, server) {
        (CloseReason::Drained, Some(mut server)) => {
            let message = k.lane.drained_message();
            crate::terminate::close_drained(&mut client, &mut server, message).await;
            reason
        }
        (_, _) => {
            if !k.tx.held.is_empty() || k.tx.idle() {
                // The server's own last words if it said any, else the proxy's.
                let e = if k.tx.held.is_empty() {
                    crate::protocol::error_response(
                        crate::protocol::sqlstate::ADMIN_SHUTDOWN,
                        LOST_MESSAGE,
                    )
                } else {
                    k.tx.held.clone()
                };
                let say = async {
                    use tokio::io::AsyncWriteExt;
                    let _ = client.write_all(&e).await;
                    let _ = client.shutdown().await;
                };
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), say).await;
            }
            let _ = socket2::SockRef::from(client.tcp()).shutdown(std::net::Shutdown::Both);
            match reason {
                CloseReason::ServerLost => CloseReason::ServerClosed,
                r => r,
            }
        }
    }
}

/// What a client whose session could not start elsewhere reads: the server's own last
/// words, else the proxy's.
fn start_lost_error(held: Vec<u8>) -> Vec<u8> {
    if held.is_empty() {
        crate::protocol::error_response(
            crate::protocol::sqlstate::ADMIN_SHUTDOWN,
            START_LOST_MESSAGE,
        )
    } else {
        held
    }
}

const START_LOST_MESSAGE: &str = "terminating connection: its server went away during the \
     session's start and no other took it (closed by stolon-proxy)";

const LOST_MESSAGE: &str = "terminating connection: its server went away and the session's \
     state could not be carried to another (closed by stolon-proxy)";

/// One relay of the session on its current server, in its lane, until it ends, drains or
/// stops for an inspection. The client's stream comes back unless a sever still holds its
/// plain socket, the server's unless a sever holds it.
async fn relay_once(
    client: Stream,
    server: Stream,
    (route, lane): (&Arc<Route>, &Lane),
    movable: bool,
    tx: &Arc<Mutex<TxState>>,
    ctx: &Ctx,
) -> (CloseReason, Option<Stream>, Option<Stream>) {
    let metrics = &ctx.metrics;
    // A plaintext session on a thread with a rail is relayed there between its stops, once
    // it has shown it lasts; until then it stops for it (`Drain::to_rail`).
    let rail = crate::rail::Rail::here();
    let lasted = || {
        tx.lock()
            .is_ok_and(|t| t.activity >= crate::relay::RAIL_AFTER)
    };
    let to_rail = rail.is_some();
    match (client, server, rail.filter(|_| lasted())) {
        (Stream::Plain(c), Stream::Plain(s), Some(rail)) => {
            let lanes = (route, lane);
            crate::rail::relay_once(&rail, (c, s), lanes, movable, tx, ctx).await
        }
        // Plaintext both ways: the readiness relay, with no copy into a stream buffer; the
        // lane's sever shuts the sockets down through shared handles (no descriptor more).
        // A movable session's client socket is not the sever's: it may move.
        (Stream::Plain(c), Stream::Plain(s), None) => {
            // The balancer may ask this thread for sessions (plain ones can move).
            let here = crate::balance::this_thread();
            let thread = here.as_ref().map(|(seats, i)| &seats.threads[*i]);
            let (c, s) = (Arc::new(c), Arc::new(s));
            let client_handle = (!movable).then(|| c.clone() as SocketHandle);
            let handles = (client_handle, s.clone() as SocketHandle);
            let (cr, sr) = (&c, &s);
            let reason = in_lane(route, lane, ctx, handles, |token, signal| async move {
                let tracked = signal.is_some() || movable || thread.is_some() || to_rail;
                let d = tracked.then_some(Drain {
                    signal,
                    tx,
                    movable,
                    thread,
                    to_rail,
                });
                relay(cr, sr, token, d, metrics).await
            })
            .await;
            let c = Arc::try_unwrap(c).ok().map(Stream::Plain);
            let s = Arc::try_unwrap(s).ok().map(Stream::Plain);
            (reason, c, s)
        }
        // A TLS side owns its socket: the sever gets duplicates of the descriptors.
        (mut client, mut server, _) => {
            let fds = client
                .as_fd()
                .try_clone_to_owned()
                .and_then(|c| Ok((c, server.as_fd().try_clone_to_owned()?)));
            let Ok((cfd, sfd)) = fds else {
                return (CloseReason::IoError, Some(client), Some(server));
            };
            let (cfd, sfd) = (Arc::new(cfd), Arc::new(sfd));
            let client_handle = (!movable).then(|| cfd.clone() as SocketHandle);
            let handles = (client_handle, sfd.clone() as SocketHandle);
            let (c, s) = (&mut client, &mut server);
            let reason = in_lane(route, lane, ctx, handles, |token, signal| async move {
                let d = (signal.is_some() || movable).then_some(Drain {
                    signal,
                    tx,
                    movable,
                    thread: None,
                    to_rail: false,
                });
                crate::relay::relay_streams(c, s, (&cfd, &sfd), token, d, metrics).await
            })
            .await;
            (reason, Some(client), Some(server))
        }
    }
}

/// Asks the server what the idle session holds now (it changed what the proxy knew), and
/// keeps the answer as what a move after a failover gives it. A failed inspection leaves the
/// state unknown (the session then cannot move without its server); the relay goes on.
async fn inspect_in_place(client: &mut Stream, server: &mut Stream, k: &mut Known) {
    let Some(user) = &k.user else { return };
    let state = migrate::inspect(client, server, user).await;
    if let Err(why) = &state {
        tracing::debug!(
            why = why.label(),
            "session state not provable until it ends"
        );
    }
    k.tx.inspected(state.ok());
}

/// Moves a drained session: inspect it on the old server, leave that one, open it on the
/// next server of its listener (the new master, or another standby of the read-only pool).
/// On `Err` the old server side may already be gone; the caller closes.
async fn move_drained(
    client: &mut Stream,
    server: &mut Stream,
    s: &mut Known,
    ctx: &Ctx,
) -> Result<(), Unmovable> {
    if ctx.config.moves == migrate::Moves::Off {
        return Err(Unmovable::Disabled);
    }
    let (Some(_), Some(user)) = (&s.started.credentials, &s.user) else {
        return Err(Unmovable::NoCredentials);
    };
    if s.tx.custom_settings() {
        return Err(Unmovable::CustomSetting);
    }
    let state = migrate::inspect(client, server, user).await?;
    migrate::leave(server).await;
    // No longer on the old master: its drain need not wait for this session.
    s.task = None;
    *server = land(client, s, state, false, ctx).await?;
    Ok(())
}

/// Moves a session whose server went away (a failover's sever, a crash) with the state the
/// proxy proved, if it was idle and its state is proven (see `migrate::ledger`); the new
/// server's catalog must show no implicit call the proxy could not see.
async fn move_lost(client: &mut Stream, s: &mut Known, ctx: &Ctx) -> Result<Stream, Unmovable> {
    if s.tx.custom_settings() {
        return Err(Unmovable::CustomSetting);
    }
    if !s.tx.idle() {
        return Err(Unmovable::InFlight);
    }
    if !s.tx.held.is_empty() && still_serving(s).await {
        return Err(Unmovable::ServerEnded);
    }
    let Some(state) = s.tx.provable() else {
        tracing::debug!(tx = ?s.tx, "session state not proven");
        return Err(Unmovable::Unproven);
    };
    s.task = None;
    land(client, s, state, true, ctx).await
}

/// Whether the session's old server still serves (its postmaster lives): then the error
/// that ended the session was its decision, not its death. Asked with an SSLRequest, which a
/// postmaster answers at once ('S' or 'N'): a socket that only accepts (a listen socket
/// still open in a dying server's process) is not a server.
async fn still_serving(s: &Known) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = match &s.lane {
        Lane::Master => match &s.route.master {
            Ok(a) => a.clone(),
            Err(_) => return false,
        },
        Lane::Replica(r) => r.addr.clone(),
    };
    let ask = async {
        let mut c = tokio::net::TcpStream::connect(&*addr).await.ok()?;
        let mut request = 8u32.to_be_bytes().to_vec();
        request.extend(crate::protocol::SSL_REQUEST_CODE.to_be_bytes());
        c.write_all(&request).await.ok()?;
        let mut answer = [0u8; 1];
        c.read_exact(&mut answer).await.ok()?;
        Some(matches!(answer[0], b'S' | b'N'))
    };
    let answered = tokio::time::timeout(std::time::Duration::from_secs(1), ask).await;
    matches!(answered, Ok(Some(true)))
}

/// Starts a session whose server went away before its start ended (the proxy had
/// authenticated the client: nothing the client did reached the server yet) on the next
/// master, as a held session waits for it: the client is told the parameters it was not
/// told yet, its cancel key (minted now if the lost server had not sent one), and that the
/// session is ready. It never knows.
async fn start_elsewhere(
    client: &mut Stream,
    s: &mut Known,
    ctx: &Ctx,
) -> Result<Stream, Unmovable> {
    // No longer on the lost server: the proxy's report of the new generation (which the
    // sentinel waits for before it publishes the next master) must not wait for it.
    s.task = None;
    let fresh = migrate::state::SessionState::default();
    let moved = open_next(client, s, &fresh, false, ctx).await;
    let moved = moved.inspect_err(|why| {
        tracing::debug!(
            why = why.label(),
            "server lost during the start; not started elsewhere"
        );
    })?;
    let mut out = std::mem::take(&mut s.started.pending);
    out.extend(moved.reports);
    match (&s.started.key, moved.key) {
        (Some(key), Some(real)) => key.retarget(real, moved.addr.clone()),
        (None, Some(real)) => {
            let (minted, guard) = ctx.cancel_keys.mint(real, moved.addr.clone());
            out.extend(crate::auth::wire::message(b'K', &minted));
            s.started.key = Some(guard);
        }
        (_, None) => {}
    }
    out.extend(crate::auth::wire::message(b'Z', b"I"));
    crate::auth::wire::send(client, &out)
        .await
        .map_err(|_| Unmovable::NoMaster)?;
    adopt(s, moved.route, moved.lane, fresh, ctx);
    ctx.metrics.restarted("started");
    Ok(moved.server)
}

/// Opens the session on the next server with `state` (see `migrate::open_on_next`), as the
/// client's role with its kept credentials.
async fn open_next(
    client: &Stream,
    s: &Known,
    state: &migrate::state::SessionState,
    after_loss: bool,
    ctx: &Ctx,
) -> Result<migrate::Moved, Unmovable> {
    let Some(creds) = &s.started.credentials else {
        return Err(Unmovable::NoCredentials);
    };
    let start = migrate::Start {
        startup: &s.startup,
        creds,
        reported: &s.started.reported,
    };
    migrate::open_on_next(client, &start, state, after_loss, ctx).await
}

/// The session is relayed on `route`'s `lane` from now on, known to hold `state`.
fn adopt(
    s: &mut Known,
    route: Arc<Route>,
    lane: Lane,
    state: migrate::state::SessionState,
    ctx: &Ctx,
) {
    s.task = Some(lane.count_in(&route));
    s.route = route;
    s.lane = lane;
    s.tx = TxState::moved(state, ctx.config.moves == migrate::Moves::All);
}

/// Opens the session on the next server with `state`, and points the client's view (its
/// cancel key, its parameters) at it. Returns the new server side.
async fn land(
    client: &mut Stream,
    s: &mut Known,
    state: migrate::state::SessionState,
    after_loss: bool,
    ctx: &Ctx,
) -> Result<Stream, Unmovable> {
    let moved = open_next(client, s, &state, after_loss, ctx).await?;
    if let (Some(key), Some(real)) = (&s.started.key, moved.key) {
        key.retarget(real, moved.addr.clone());
    }
    adopt(s, moved.route, moved.lane, state, ctx);
    if !moved.reports.is_empty() {
        // As a server reports a SET: the client reads them before its next answer.
        crate::auth::wire::send(client, &moved.reports)
            .await
            .map_err(|_| Unmovable::NoMaster)?;
    }
    Ok(moved.server)
}
