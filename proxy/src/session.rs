//! One relayed session, whatever the mode: the client side, the server side and what is
//! known of the session (where it stands between transactions, its start: the startup
//! packet, the client's credentials, its minted cancel key). It relays until the session
//! ends; when a planned switchover's drain finds it between transactions, it moves to the
//! new master (a swap of its server side, see `migrate`) if it can, and is closed at that
//! boundary if it cannot.

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

/// Relays the session to its end, moving it at each planned switchover it can survive.
pub(crate) async fn run(s: Parts<Stream>, ctx: &Ctx) -> CloseReason {
    let Parts {
        mut client,
        mut server,
        known: mut k,
    } = s;
    loop {
        let tx = Mutex::new(k.tx);
        let (reason, streams) = relay_once(client, server, &k.route, &k.lane, &tx, ctx).await;
        k.tx = tx.into_inner().unwrap_or_else(|p| p.into_inner());
        let Some((c, s)) = streams else {
            // Its sockets are being cut by a sever that came with the drain.
            return CloseReason::Severed;
        };
        (client, server) = (c, s);
        if reason != CloseReason::Drained {
            return reason;
        }
        let since = std::time::Instant::now();
        match move_session(&mut client, &mut server, &mut k, ctx).await {
            Ok(()) => {
                ctx.metrics.moved(since.elapsed());
                tracing::debug!(
                    held_ms = since.elapsed().as_millis() as u64,
                    "session moved to the new master"
                );
            }
            Err(why) => {
                ctx.metrics.unmoved(why.label());
                tracing::debug!(why = why.label(), "session closed at its boundary");
                let message = k.lane.drained_message();
                crate::terminate::close_drained(&mut client, &mut server, message).await;
                return reason;
            }
        }
    }
}

/// One relay of the session on its current server, in its lane, until it ends or drains.
/// The streams come back unless a sever still holds the plain sockets.
async fn relay_once(
    client: Stream,
    server: Stream,
    route: &Route,
    lane: &Lane,
    tx: &Mutex<TxState>,
    ctx: &Ctx,
) -> (CloseReason, Option<(Stream, Stream)>) {
    let metrics = &ctx.metrics;
    match (client, server) {
        // Plaintext both ways: the readiness relay, with no copy into a stream buffer; the
        // lane's sever shuts the sockets down through shared handles (no descriptor more).
        (Stream::Plain(c), Stream::Plain(s)) => {
            let (c, s) = (Arc::new(c), Arc::new(s));
            let handles: (SocketHandle, SocketHandle) = (c.clone(), s.clone());
            let (cr, sr) = (&c, &s);
            let reason = in_lane(route, lane, ctx, handles, |token, signal| async move {
                let drain = signal.map(|signal| Drain { signal, tx });
                relay(cr, sr, token, drain, metrics).await
            })
            .await;
            let back = Arc::try_unwrap(c).ok().zip(Arc::try_unwrap(s).ok());
            (
                reason,
                back.map(|(c, s)| (Stream::Plain(c), Stream::Plain(s))),
            )
        }
        // A TLS side owns its socket: the sever gets duplicates of the descriptors.
        (mut client, mut server) => {
            let fds = client
                .as_fd()
                .try_clone_to_owned()
                .and_then(|c| Ok((c, server.as_fd().try_clone_to_owned()?)));
            let Ok((cfd, sfd)) = fds else {
                return (CloseReason::IoError, Some((client, server)));
            };
            let (cfd, sfd) = (Arc::new(cfd), Arc::new(sfd));
            let handles: (SocketHandle, SocketHandle) = (cfd.clone(), sfd.clone());
            let (c, s) = (&mut client, &mut server);
            let reason = in_lane(route, lane, ctx, handles, |token, signal| async move {
                let drain = signal.map(|signal| Drain { signal, tx });
                crate::terminate::relay_streams(c, s, (&cfd, &sfd), token, drain, metrics).await
            })
            .await;
            (reason, Some((client, server)))
        }
    }
}

/// Moves a drained session: inspect it on the old server, leave that one, open it on the
/// next server of its listener (the new master, or another standby of the read-only pool). On `Err` the old server side may already be gone; the caller closes.
async fn move_session(
    client: &mut Stream,
    server: &mut Stream,
    s: &mut Known,
    ctx: &Ctx,
) -> Result<(), Unmovable> {
    let (Some(creds), Some(user)) = (&s.started.credentials, &s.user) else {
        return Err(Unmovable::NoCredentials);
    };
    if s.tx.custom_settings() {
        return Err(Unmovable::CustomSetting);
    }
    let state = migrate::inspect(client, server, user).await?;
    migrate::leave(server).await;
    // No longer on the old master: its drain need not wait for this session.
    s.task = None;
    let start = migrate::Start {
        startup: &s.startup,
        creds,
        reported: &s.started.reported,
    };
    let moved = migrate::open_on_next(client, &start, &state, ctx).await?;
    if let (Some(key), Some(real)) = (&s.started.key, moved.key) {
        key.retarget(real, moved.addr.clone());
    }
    s.task = Some(moved.lane.count_in(&moved.route));
    *server = moved.server;
    s.route = moved.route;
    s.lane = moved.lane;
    s.tx = TxState::moved();
    if !moved.reports.is_empty() {
        // As a server reports a SET: the client reads them before its next answer.
        crate::auth::wire::send(client, &moved.reports)
            .await
            .map_err(|_| Unmovable::NoMaster)?;
    }
    Ok(())
}
