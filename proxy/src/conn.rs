//! One client connection: read the first packet within a deadline, act on it (answer
//! GSSENCRequest 'N', forward a CancelRequest, pass SSL/TLS through, route a startup), or
//! answer with a PostgreSQL ErrorResponse and close cleanly.

use crate::metrics::{CloseReason, Metrics};
use crate::protocol::{self, sqlstate, Startup};
use crate::relay::End;
use crate::route::{NoMaster, Replica, Route, Routes, SocketHandle};
use crate::stream::Stream;
use crate::txstate::{Start, TxState};
use socket2::{SockRef, TcpKeepalive};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug)]
pub struct ConnConfig {
    /// How long a client may take to send its first packet.
    pub startup_timeout: Duration,
    /// How long connecting to the master may take.
    pub connect_timeout: Duration,
    /// TCP keepalive for client sockets (`None`: the OS default).
    pub keepalive: Option<TcpKeepalive>,
    /// Track where master sessions stand between transactions, for a switchover's drain
    /// (off with `--drain-timeout 0`: a drain then severs at once, and nothing is tracked).
    pub drain: bool,
    /// `--session-moves`.
    pub moves: crate::migrate::Moves,
}

impl Default for ConnConfig {
    fn default() -> Self {
        ConnConfig {
            startup_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            keepalive: None,
            drain: true,
            moves: crate::migrate::Moves::All,
        }
    }
}

pub struct Ctx {
    pub routes: Arc<Routes>,
    pub metrics: Arc<Metrics>,
    pub config: ConnConfig,
    /// Set for the read-only listener: sessions go to the standbys of the route's pool.
    pub read_only: Option<ReadOnly>,
    /// Holding sessions while no master is routed (the read-write listener only).
    pub hold: Arc<crate::hold::Hold>,
    /// The minted cancel keys of this proxy's sessions, both listeners (see `cancel`).
    pub cancel_keys: Arc<crate::cancel::Keys>,
    /// The other proxies of the cluster, for cancels of keys they minted (`None`: such a
    /// cancel is dropped).
    pub peers: Option<Arc<crate::peers::Peers>>,
    /// `--client-tls terminate`: the proxy's TLS with clients and servers (`None`: clients'
    /// TLS passes through).
    pub tls: Option<Arc<crate::tls::Terminate>>,
    /// `--auth-user` (terminate mode): the proxy authenticates clients itself.
    pub auth: Option<Arc<crate::auth::Auth>>,
}

/// The read-only listener's choice when no standby qualifies.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReadOnly {
    /// `--ro-fallback-master`: use the master then; otherwise 57P03 "no standby available".
    pub fallback_master: bool,
}

/// Where a session is relayed: the master of a route, or a standby of its read-only pool.
/// Each has its own token, task tracker and socket registry, cut when it is replaced or
/// leaves the pool.
pub(crate) enum Lane {
    Master,
    Replica(Arc<Replica>),
}

struct LaneRefs<'a> {
    token: &'a tokio_util::sync::CancellationToken,
    /// The lane's drain signal: the master's at a planned switchover, a standby's when it
    /// leaves the read-only pool.
    drain: Option<&'a CancellationToken>,
    sessions: &'a tokio_util::task::TaskTracker,
    sockets: &'a Arc<crate::route::SessionSockets>,
}

impl Lane {
    /// Counts a session in this lane of `route` (see `Prepared`).
    pub(crate) fn count_in(
        &self,
        route: &Route,
    ) -> tokio_util::task::task_tracker::TaskTrackerToken {
        self.refs(route, false).sessions.token()
    }

    /// What the client is told when the proxy closes its session at a boundary.
    pub(crate) fn drained_message(&self) -> &'static str {
        match self {
            Lane::Master => DRAINED_MESSAGE,
            Lane::Replica(_) => STANDBY_LEFT_MESSAGE,
        }
    }

    /// The server this lane leads to, in a message.
    pub(crate) fn what(&self) -> &'static str {
        match self {
            Lane::Master => "the primary",
            Lane::Replica(_) => "the standby",
        }
    }

    fn refs<'a>(&'a self, route: &'a Route, drain: bool) -> LaneRefs<'a> {
        match self {
            Lane::Master => LaneRefs {
                token: &route.token,
                drain: drain.then_some(&route.drain),
                sessions: &route.sessions,
                sockets: &route.sockets,
            },
            Lane::Replica(r) => LaneRefs {
                token: &r.token,
                drain: drain.then_some(&r.drain),
                sessions: &r.sessions,
                sockets: &r.sockets,
            },
        }
    }
}

/// Counts a session on a standby for least-connections while it lives.
struct ActiveOn(Option<Arc<Replica>>);

impl ActiveOn {
    fn new(lane: &Lane) -> ActiveOn {
        match lane {
            Lane::Replica(r) => {
                r.active.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                ActiveOn(Some(r.clone()))
            }
            Lane::Master => ActiveOn(None),
        }
    }
}

impl Drop for ActiveOn {
    fn drop(&mut self) {
        if let Some(r) = &self.0 {
            r.active.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// A refusal: the SQLSTATE and message sent to the client, and the metric reason.
pub(crate) struct Reject {
    pub(crate) code: &'static str,
    pub(crate) message: String,
    pub(crate) reason: CloseReason,
    /// The client speaks TLS already (direct TLS): an ErrorResponse would land inside its
    /// handshake, so it only gets a clean close.
    pub(crate) silent: bool,
}

pub(crate) fn reject(
    code: &'static str,
    message: impl Into<String>,
    reason: CloseReason,
) -> Reject {
    Reject {
        code,
        message: message.into(),
        reason,
        silent: false,
    }
}

/// What the startup phase leads to.
pub(crate) enum Next {
    /// Connect to the master, replay these bytes, relay.
    Relay(Vec<u8>),
    /// A CancelRequest: forward these bytes to the master and close.
    Cancel(Vec<u8>),
    /// The client went away during the startup phase.
    Gone,
}

pub fn tune(sock: &TcpStream, keepalive: Option<&TcpKeepalive>) {
    let _ = sock.set_nodelay(true);
    if let Some(ka) = keepalive {
        let _ = SockRef::from(sock).set_tcp_keepalive(ka);
    }
}

/// Serves one accepted client to the end, recording why it closed.
pub async fn serve(client: TcpStream, ctx: &Ctx) {
    tune(&client, ctx.config.keepalive.as_ref());
    if let Some(t) = &ctx.tls {
        return crate::terminate::serve(client, ctx, t).await;
    }
    serve_with(Stream::Plain(client), None, ctx, |parts| {
        crate::session::run(parts, ctx)
    })
    .await
}

/// A client stream whose hang-up can be noticed without reading what it sent.
pub(crate) trait ClientStream: AsyncRead + AsyncWrite + Unpin {
    /// Resolves once the client has closed its side (or the socket failed); never while it
    /// is open, even when it sent bytes (they stay in the socket for the relay).
    fn hung_up(&self) -> impl Future<Output = ()>;

    /// Whether the proxy terminated TLS on it.
    fn encrypted(&self) -> bool {
        false
    }
}

impl ClientStream for TcpStream {
    async fn hung_up(&self) {
        use nix::sys::socket::{recv, MsgFlags};
        use std::os::fd::AsRawFd;
        let fd = self.as_raw_fd();
        loop {
            if self.readable().await.is_err() {
                return;
            }
            let mut byte = [0u8; 1];
            // A peek: what the client sent stays queued. WouldBlock clears the readiness.
            let peek = self.try_io(tokio::io::Interest::READABLE, || {
                recv(fd, &mut byte, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT)
                    .map_err(std::io::Error::from)
            });
            match peek {
                Ok(0) => return,
                // It is there and talking: nothing to watch until the relay reads it.
                Ok(_) => std::future::pending::<()>().await,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    }
}

impl ClientStream for tokio::io::DuplexStream {
    /// In-memory test streams: never noticed (their tests do not hang up while held).
    async fn hung_up(&self) {
        std::future::pending::<()>().await
    }
}

/// The path every engine shares: the startup phase, routing (holding while no master is
/// routed), refusals with an ErrorResponse and a clean close; then `session` relays. Generic
/// over the client stream, so it is tested over in-memory streams.
pub(crate) async fn serve_with<S, F, Fut>(mut client: S, first: Option<Next>, ctx: &Ctx, session: F)
where
    S: ClientStream,
    F: FnOnce(crate::session::Parts<S>) -> Fut,
    Fut: Future<Output = CloseReason>,
{
    let reason = match prepare(&mut client, first, ctx).await {
        Ok(Prepared::Done(reason)) => reason,
        Ok(Prepared::Session {
            mut server,
            route,
            lane,
            mut tx,
            answer,
            task,
            addr,
            user,
            startup,
        }) => {
            let token = lane.refs(&route, false).token.clone();
            let started = match &user {
                Some(user) => {
                    let s = crate::session_start::Start {
                        token: &token,
                        addr: &addr,
                        user,
                        ctx,
                    };
                    s.begin(&mut client, &mut server, answer, &mut tx)
                        .await
                        .map_err(|end| {
                            end.map_or(CloseReason::AuthFailed, |e| {
                                close_reason(e, &lane.refs(&route, false))
                            })
                        })
                }
                None => write_answer(&mut client, &answer, ctx)
                    .await
                    .map(|()| Default::default()),
            };
            match started {
                // The key leads to this session, and its credentials are kept, until it ends;
                // the task counts it in its lane until it ends or moves (the relay takes its
                // own count too).
                Ok(started) => {
                    session(crate::session::Parts {
                        client,
                        server,
                        known: crate::session::Known {
                            route,
                            lane,
                            tx: *tx,
                            started,
                            startup,
                            user,
                            task: Some(task),
                        },
                    })
                    .await
                }
                Err(reason) => reason,
            }
        }
        Err(r) => {
            tracing::debug!(code = r.code, message = %r.message, "rejecting client");
            let message = (!r.silent).then_some((r.code, r.message.as_str()));
            close_with(client, message).await;
            r.reason
        }
    };
    count_close(ctx, reason);
}

/// Counts a session's end (a move to another relay thread is none: it goes on there).
pub(crate) fn count_close(ctx: &Ctx, reason: CloseReason) {
    if reason != CloseReason::Rebalance {
        ctx.metrics.closed(reason);
    }
}

/// Passes the server's first answer on as it is (a session the proxy cannot read).
async fn write_answer<S>(client: &mut S, answer: &[u8], ctx: &Ctx) -> Result<(), CloseReason>
where
    S: AsyncWrite + Unpin,
{
    client
        .write_all(answer)
        .await
        .map_err(|_| CloseReason::ClientGone)?;
    let n = answer.len() as u64;
    ctx.metrics
        .add_bytes(crate::metrics::Direction::ServerToClient, n);
    Ok(())
}

enum Prepared {
    Done(CloseReason),
    /// Connected to the master of `route` or a standby of its pool, the startup bytes
    /// replayed.
    Session {
        server: Stream,
        route: Arc<Route>,
        lane: Lane,
        /// Where the session stands, from what was replayed and answered (for a drain).
        tx: Box<TxState>,
        /// The server's first answer, read before the relay: passed on to the client first.
        answer: Vec<u8>,
        /// The session counts in its lane from the moment it is connected, before the
        /// replay: a drain that starts while it waits for the server's first answer waits
        /// for it too, instead of finding the lane empty, finishing, and severing the
        /// session just after it registered (a failed connect in `loadtest ha`).
        task: tokio_util::task::task_tracker::TaskTrackerToken,
        /// The server's address, where the session's cancels go.
        addr: Arc<str>,
        /// The startup message's user, when the proxy replayed one: the session's messages
        /// are readable from the start (not TLS passed through), it gets a minted key and
        /// may be authenticated by the proxy. `None`: an opaque session.
        user: Option<String>,
        /// The startup packet alone (without what a pipelining client sent after it).
        startup: Vec<u8>,
    },
}

/// `first`: the client's first packet when terminate mode read it already.
async fn prepare<S>(client: &mut S, first: Option<Next>, ctx: &Ctx) -> Result<Prepared, Reject>
where
    S: ClientStream,
{
    let deadline = ctx.config.startup_timeout;
    let next = match first {
        Some(next) => next,
        None => read_first(client, deadline).await?,
    };
    let bytes = match next {
        Next::Gone => return Ok(Prepared::Done(CloseReason::ClientGone)),
        Next::Cancel(bytes) => {
            crate::cancel::forward(ctx, &bytes).await;
            return Ok(Prepared::Done(CloseReason::Cancel));
        }
        Next::Relay(bytes) => bytes,
    };
    if let Some(t) = &ctx.tls {
        // Terminated: only a startup packet may follow (a second SSLRequest or a TLS
        // record inside the session is a protocol error, as PostgreSQL says).
        if !matches!(
            protocol::parse(&bytes),
            Ok(Some((Startup::Startup { .. }, _)))
        ) {
            return Err(reject(
                sqlstate::PROTOCOL_VIOLATION,
                "unsupported frontend protocol: SSL negotiation already done",
                CloseReason::RejectedProtocol,
            ));
        }
        if t.required && !client.encrypted() {
            return Err(crate::terminate::tls_required(&bytes));
        }
    }
    // A client that hangs up while its session is held (or connecting) is dropped at once:
    // it is not replayed to the next master with the others, in one burst, for nobody.
    let routed = tokio::select! {
        r = route_session(bytes, ctx) => r,
        _ = client.hung_up() => return Ok(Prepared::Done(CloseReason::ClientGone)),
    };
    refused_after_ssl(client, routed, deadline).await
}

async fn read_first<S>(client: &mut S, deadline: Duration) -> Result<Next, Reject>
where
    S: ClientStream,
{
    match tokio::time::timeout(deadline, startup_phase(client)).await {
        Ok(next) => next,
        Err(_) => Err(reject(
            sqlstate::PROTOCOL_VIOLATION,
            "no startup packet received in time",
            CloseReason::RejectedTimeout,
        )),
    }
}

/// The routing's outcome, answered as PostgreSQL would after an SSLRequest it must refuse.
async fn refused_after_ssl<S>(
    client: &mut S,
    routed: Result<Prepared, Refused>,
    deadline: Duration,
) -> Result<Prepared, Reject>
where
    S: ClientStream,
{
    match routed {
        Err(r) if is_ssl_request(&r.bytes) => {
            // Refused after an SSLRequest: answer as PostgreSQL does when it must refuse
            // (decline SSL, read the startup packet, then the ErrorResponse), so libpq's
            // sslmode=prefer shows the real reason instead of "server sent an error
            // response during SSL exchange".
            let mut r = r.reject;
            if decline_ssl_and_read_startup(client, deadline)
                .await
                .is_err()
            {
                r.silent = true;
            }
            Err(r)
        }
        Err(r) => Err(r.reject),
        Ok(p) => Ok(p),
    }
}

/// A refusal, with the client's first packet (to know whether it asked for SSL).
struct Refused {
    reject: Reject,
    bytes: Vec<u8>,
}

fn is_ssl_request(bytes: &[u8]) -> bool {
    matches!(protocol::parse(bytes), Ok(Some((Startup::SslRequest, _))))
}

/// Sends 'N' for the pending SSLRequest and reads the plain startup packet that follows
/// (a client that wanted SSL only hangs up instead: `Err`).
async fn decline_ssl_and_read_startup<S>(client: &mut S, deadline: Duration) -> Result<(), ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    client.write_all(b"N").await.map_err(drop)?;
    let read = async {
        let mut buf: Vec<u8> = Vec::with_capacity(512);
        loop {
            match protocol::parse(&buf) {
                Ok(Some(_)) => return Ok(()),
                Err(_) => return Err(()),
                Ok(None) => {}
            }
            match client.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return Err(()),
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(deadline, read)
        .await
        .unwrap_or(Err(()))
}

/// Routes the session; on the read-write listener a refusal that a master change will cure
/// is held (see `hold`) until the next route, then tried again.
async fn route_session(bytes: Vec<u8>, ctx: &Ctx) -> Result<Prepared, Refused> {
    let mut held: Option<crate::hold::Held> = None;
    loop {
        let changed = ctx.routes.changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let route = ctx.routes.load();
        match try_route(route.clone(), &bytes, ctx).await {
            Ok(p) => {
                if let Some(h) = &held {
                    tracing::debug!(
                        held_ms = h.held_for().as_millis() as u64,
                        "held session released"
                    );
                }
                return Ok(p);
            }
            Err(r) if ctx.read_only.is_none() && crate::hold::holdable(&route, r.reject.reason) => {
                if held.is_none() {
                    held = ctx.hold.start();
                }
                let Some(h) = &held else { return Err(r) };
                let retry = r.reject.reason == CloseReason::BackendUnreachable;
                if !h.wait(changed, retry).await {
                    return Err(r);
                }
            }
            Err(r) => return Err(r),
        }
    }
}

async fn try_route(route: Arc<Route>, bytes: &[u8], ctx: &Ctx) -> Result<Prepared, Refused> {
    let refused = |reject: Reject, bytes: &[u8]| Refused {
        reject,
        bytes: bytes.to_vec(),
    };
    // One route snapshot for the whole session.
    let tls = bytes.first() == Some(&protocol::TLS_HANDSHAKE);
    let (lane, addr) = choose(&route, ctx.read_only).map_err(|mut r| {
        r.silent = tls;
        refused(r, bytes)
    })?;
    let what = lane.what();
    let mut server = open_server(&addr, what, ctx)
        .await
        .map_err(|r| refused(r, bytes))?;
    let refs = lane.refs(&route, false);
    // Counted from here, not from the connect: an unplanned sever waits for the lane's
    // sessions, and a connect to an unreachable master may hang for the connect timeout.
    let task = refs.sessions.token();
    if server.write_all(bytes).await.is_err() {
        return Err(refused(
            reject(
                sqlstate::CONNECTION_FAILURE,
                format!("{what} closed the connection"),
                CloseReason::BackendUnreachable,
            ),
            bytes,
        ));
    }
    let answer = if tls {
        // A direct TLS start is answered only if the server speaks it; PostgreSQL 15 just
        // closes, which must reach the client as it is, not be retried.
        Vec::new()
    } else {
        let master = matches!(lane, Lane::Master);
        first_answer(&mut server, refs.token, what, master)
            .await
            .map_err(|r| refused(r, bytes))?
    };
    let mut tx = tx_state(bytes);
    tx.from_server(&answer);
    let (user, startup) = match protocol::parse(bytes) {
        Ok(Some((Startup::Startup { params, .. }, len))) => (
            Some(
                params
                    .iter()
                    .find(|(k, _)| *k == b"user")
                    .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default(),
            ),
            bytes[..len].to_vec(),
        ),
        _ => (None, Vec::new()),
    };
    Ok(Prepared::Session {
        server,
        route,
        lane,
        tx: Box::new(tx),
        answer,
        task,
        addr,
        user,
        startup,
    })
}

/// Waits for the server's first answer to the replayed packet. A server that closes before
/// answering (killed with the connection in its accept queue, or as the backend started),
/// or a master that answers that it is shutting down, crashed or is starting up (57P01,
/// 57P02, 57P03), has not taken the session: that is a refusal the hold retries, and the
/// client, which has seen nothing yet, never knows. Any other answer is the session's, and
/// the caller passes it on. The route's token ends the wait if the server is replaced.
pub(crate) async fn first_answer(
    server: &mut (impl AsyncRead + Unpin),
    token: &CancellationToken,
    what: &str,
    master: bool,
) -> Result<Vec<u8>, Reject> {
    let mut answer = Vec::with_capacity(2048);
    let read = tokio::select! {
        r = server.read_buf(&mut answer) => r,
        _ = token.cancelled() => Ok(0),
    };
    if !matches!(read, Ok(n) if n > 0) {
        tracing::debug!("{what} closed the connection before answering the startup");
        return Err(reject(
            sqlstate::CONNECTION_FAILURE,
            format!("{what} closed the connection before answering"),
            CloseReason::BackendUnreachable,
        ));
    }
    let not_now = protocol::error_fields(&answer)
        .filter(|_| master)
        .and_then(|(code, message)| {
            let code = protocol::GOING_AWAY.into_iter().find(|c| *c == code)?;
            Some((code, message))
        });
    match not_now {
        Some((code, message)) => {
            tracing::debug!(code, message, "{what} is not accepting connections");
            Err(reject(
                code,
                format!("{what} is not accepting connections: {message}"),
                CloseReason::BackendUnreachable,
            ))
        }
        None => Ok(answer),
    }
}

/// The transaction state at the start of the relay, from the replayed first packet.
fn tx_state(bytes: &[u8]) -> TxState {
    match protocol::parse(bytes) {
        Ok(Some((Startup::SslRequest, _))) => TxState::new(Start::SslRequest, &[]),
        Ok(Some((Startup::Startup { .. }, len))) => {
            TxState::new(Start::Startup, bytes.get(len..).unwrap_or(&[]))
        }
        _ => TxState::new(Start::DirectTls, &[]),
    }
}

/// The master, or on the read-only listener the least-loaded standby of the pool (the
/// master only with the fallback), or why there is none.
pub(crate) fn choose(route: &Route, ro: Option<ReadOnly>) -> Result<(Lane, Arc<str>), Reject> {
    let master = route.master.as_ref().map_err(|why| no_master(*why));
    let Some(ro) = ro else {
        return master.map(|m| (Lane::Master, m.clone()));
    };
    if let Some(r) = route.pick_replica() {
        let addr = r.addr.clone();
        return Ok((Lane::Replica(r), addr));
    }
    match master {
        // Not routing at all (store lost, not enabled, starting): say why.
        Err(e) if !matches!(route.master, Err(NoMaster::NoMasterDb)) => Err(e),
        Ok(m) if ro.fallback_master => Ok((Lane::Master, m.clone())),
        _ => Err(reject(
            sqlstate::CANNOT_CONNECT_NOW,
            "no standby available: none is healthy and within the lag bound",
            CloseReason::RejectedNoMaster,
        )),
    }
}

/// What every engine does around its relay: count the session in its lane, register its
/// sockets for a sever (refused if the lane was severed since the route snapshot, so not
/// one byte of the session reaches an old master), relay, and say why it ended.
pub(crate) async fn in_lane<'a, F, Fut>(
    route: &'a Route,
    lane: &'a Lane,
    ctx: &Ctx,
    (client, server): (Option<SocketHandle>, SocketHandle),
    relay: F,
) -> CloseReason
where
    F: FnOnce(&'a CancellationToken, Option<&'a CancellationToken>) -> Fut,
    Fut: Future<Output = End>,
{
    let l = lane.refs(route, ctx.config.drain);
    let _task = l.sessions.token();
    let _active = ActiveOn::new(lane);
    let Some(_registration) = l.sockets.register(client, server) else {
        return CloseReason::Severed;
    };
    if l.token.is_cancelled() {
        return CloseReason::Severed;
    }
    ctx.metrics.active.inc();
    let end = relay(l.token, l.drain).await;
    ctx.metrics.active.dec();
    close_reason(end, &l)
}

fn close_reason(end: End, l: &LaneRefs<'_>) -> CloseReason {
    match end {
        // The sockets may have been cut before the task saw the cancel.
        _ if l.token.is_cancelled() || l.sockets.is_severed() => CloseReason::Severed,
        End::ClientClosed => CloseReason::ClientClosed,
        End::ServerClosed => CloseReason::ServerClosed,
        End::Severed => CloseReason::Severed,
        End::Drained => CloseReason::Drained,
        End::Inspect => CloseReason::Inspect,
        End::ServerLost => CloseReason::ServerLost,
        End::Rebalance => CloseReason::Rebalance,
        End::Rail => CloseReason::Rail,
        End::Error(e) => {
            tracing::debug!(error = %e, "relay ended with an error");
            CloseReason::IoError
        }
    }
}

pub(crate) const DRAINED_MESSAGE: &str =
    "terminating connection: planned switchover of the primary \
     (closed between transactions by stolon-proxy)";
pub(crate) const STANDBY_LEFT_MESSAGE: &str =
    "terminating connection: the standby left the read-only pool \
     (closed between transactions by stolon-proxy)";
/// The Terminate message: the backend exits cleanly.
pub(crate) const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];

fn no_master(why: NoMaster) -> Reject {
    let detail = match why {
        NoMaster::Starting => "the proxy has not read the cluster state yet",
        NoMaster::NoCluster => "the cluster is not initialised",
        NoMaster::BadDocument => "the cluster state cannot be read",
        NoMaster::NotEnabled => "this proxy is not enabled by the sentinel yet",
        NoMaster::NoMasterDb => "no master is elected",
        NoMaster::StoreLost => "the proxy lost contact with the store",
        NoMaster::Stopping => "the proxy is shutting down",
    };
    reject(
        sqlstate::CANNOT_CONNECT_NOW,
        format!("no primary available: {detail}"),
        CloseReason::RejectedNoMaster,
    )
}

/// The proxy's side to a server: connected, tuned, and with TLS as `--server-sslmode` says
/// in terminate mode (`what` names the server in errors).
pub(crate) async fn open_server(addr: &str, what: &str, ctx: &Ctx) -> Result<Stream, Reject> {
    let timeout = ctx.config.connect_timeout;
    let tcp = connect(addr, what, timeout).await?;
    tune(&tcp, None);
    match &ctx.tls {
        Some(t) => crate::terminate::to_server(tcp, addr, t, what, timeout).await,
        None => Ok(Stream::Plain(tcp)),
    }
}

async fn connect(addr: &str, what: &str, timeout: Duration) -> Result<TcpStream, Reject> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => {
            if warn_now(addr) {
                tracing::warn!(addr, error = %e, "cannot connect to {what} (repeats for this address are logged at debug for 10 s)");
            } else {
                tracing::debug!(addr, error = %e, "cannot connect to {what}");
            }
            Err(reject(
                sqlstate::CONNECTION_FAILURE,
                format!("could not connect to {what}"),
                CloseReason::BackendUnreachable,
            ))
        }
        Err(_) => Err(reject(
            sqlstate::CONNECTION_FAILURE,
            format!("timed out connecting to {what}"),
            CloseReason::BackendUnreachable,
        )),
    }
}

/// Whether a failed connect to `addr` is logged at warn: the first one, and then once per
/// 10 s. Held sessions retry a dead master many times a second until the failover; one line
/// says it, not hundreds.
pub(crate) fn warn_now(addr: &str) -> bool {
    static LAST: std::sync::Mutex<Option<(String, std::time::Instant)>> =
        std::sync::Mutex::new(None);
    let Ok(mut last) = LAST.lock() else {
        return true;
    };
    let now = std::time::Instant::now();
    let repeat = last
        .as_ref()
        .is_some_and(|(a, at)| a == addr && now.duration_since(*at) < Duration::from_secs(10));
    if !repeat {
        *last = Some((addr.to_string(), now));
    }
    !repeat
}

/// Reads packets until one decides the session. Bytes after the decisive packet (a
/// pipelining client) are kept and replayed.
pub(crate) async fn startup_phase<S>(client: &mut S) -> Result<Next, Reject>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf: Vec<u8> = Vec::with_capacity(512);
    loop {
        match protocol::parse(&buf) {
            Err(e) => {
                return Err(reject(
                    sqlstate::PROTOCOL_VIOLATION,
                    e.to_string(),
                    CloseReason::RejectedProtocol,
                ))
            }
            Ok(Some((Startup::GssEncRequest, len))) => {
                // No GSS encryption here: 'N', then the client goes on in the clear.
                buf.drain(..len);
                if client.write_all(b"N").await.is_err() {
                    return Ok(Next::Gone);
                }
                continue;
            }
            Ok(Some((Startup::Cancel { .. }, len))) => {
                buf.truncate(len);
                return Ok(Next::Cancel(buf));
            }
            Ok(Some((Startup::SslRequest | Startup::DirectTls | Startup::Startup { .. }, _))) => {
                return Ok(Next::Relay(buf));
            }
            Ok(None) => {}
        }
        // The parser refuses an oversize length as soon as the first 4 bytes are in, so
        // the buffer stays bounded by MAX_STARTUP_PACKET plus one read.
        match client.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return Ok(Next::Gone),
            Ok(_) => {}
        }
    }
}

/// Sends the ErrorResponse, then closes without a reset: shut down our side, and read and
/// discard what the client still sends for a short while, so unread input does not turn
/// the close into an RST that could destroy the error message in flight.
pub async fn send_error_and_close(client: TcpStream, code: &str, message: &str) {
    close_with(client, Some((code, message))).await;
}

/// Closes cleanly, after an ErrorResponse when one is given.
pub(crate) async fn close_with<S>(mut client: S, error: Option<(&str, &str)>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if let Some((code, message)) = error {
        let msg = protocol::error_response(code, message);
        if client.write_all(&msg).await.is_err() {
            return;
        }
    }
    let _ = client.shutdown().await;
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(n) = client.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

#[cfg(test)]
#[path = "conn_tests.rs"]
mod tests;
