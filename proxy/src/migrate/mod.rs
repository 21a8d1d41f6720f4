//! Moving a session to the new master at a planned switchover (issue 20): when the drain
//! finds the session between transactions, instead of closing it the proxy asks the old
//! server what the session holds (`state`), ends it there, waits for the new master as a
//! held session does, logs in to it as the client's role with the credentials kept at the
//! start, and replays the startup packet, the settings and the prepared statements. The
//! client's bytes wait in its socket meanwhile; it keeps its socket, its cancel key and its
//! statement names, and sees nothing. A session that cannot be moved is closed at its
//! boundary as before, and counted by reason. A read-only session whose standby leaves the
//! pool (promoted, lagging, unhealthy) moves the same way to another standby.

/// `--session-moves`: how far the proxy moves the sessions it authenticated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Moves {
    /// At a planned switchover (and a standby leaving the pool), and after an unplanned
    /// failover when the proxy can prove the session's state.
    #[default]
    All,
    /// Only at a planned switchover or a standby leaving the pool: nothing is tracked for a
    /// failover, whose sessions are cut as without moves.
    Switchover,
    /// Never: every session is closed at the drain or cut at a failover, as Go stolon does.
    Off,
}

pub mod classify;
mod early;
pub mod ledger;
pub mod scan;
pub mod state;

use crate::auth::{exchange, wire, Credentials};
use crate::conn::{ClientStream, Ctx, Lane};
use crate::route::Route;
use crate::stream::Stream;
use state::{SessionState, Unmovable};

use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How long the old server may take to answer the inspection, and the new one to take the
/// login and the replay (each well under a second on a live server).
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest answer the inspection or the replay may get (a session with thousands of
/// prepared statements is still far below it).
const MAX_ANSWER: usize = 16 << 20;

/// A session's new server side.
pub(crate) struct Moved {
    pub server: Stream,
    pub route: Arc<Route>,
    pub lane: Lane,
    pub addr: Arc<str>,
    /// The new server's BackendKeyData body (the client's minted key now leads to it).
    pub key: Option<Vec<u8>>,
    /// ParameterStatus messages for the client: the new server's values that differ from
    /// those reported at the session's start, then those the replay changed (as a server
    /// reports a SET), so the client's view ends as the new server's.
    pub reports: Vec<u8>,
}

/// Reads one simple query's answer from `server`.
async fn read_answer<S>(server: &mut S) -> Result<state::Answer, String>
where
    S: AsyncRead + Unpin,
{
    let mut buf = Vec::with_capacity(4096);
    loop {
        if let Some(a) = state::answer(&buf) {
            return a;
        }
        if buf.len() > MAX_ANSWER {
            return Err("answer too long".into());
        }
        match server.read_buf(&mut buf).await {
            Ok(0) => return Err("the server closed the connection".into()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Asks the old server what the idle session holds. Notices and notifications that arrive
/// with the answer are the client's: passed on.
pub(crate) async fn inspect<C, S>(
    client: &mut C,
    server: &mut S,
    user: &str,
) -> Result<SessionState, Unmovable>
where
    C: AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut query = state::INSPECT.as_bytes().to_vec();
    query.push(0);
    let ask = async {
        wire::send(server, &wire::message(b'Q', &query))
            .await
            .map_err(|e| e.to_string())?;
        read_answer(server).await
    };
    let answer = match tokio::time::timeout(STEP_TIMEOUT, ask).await {
        Ok(Ok(a)) => a,
        Ok(Err(why)) => {
            tracing::debug!(why, "cannot inspect the session on the old master");
            return Err(Unmovable::Inspect);
        }
        Err(_) => return Err(Unmovable::Inspect),
    };
    if !answer.passed.is_empty() && wire::send(client, &answer.passed).await.is_err() {
        return Err(Unmovable::Inspect);
    }
    if let Some(e) = answer.error {
        tracing::debug!(error = e, "the old master refused the session's inspection");
        return Err(Unmovable::Inspect);
    }
    state::judge(&answer.sets, user)
}

/// Ends the session on the old server as a client leaving does (its backend exits without
/// an "unexpected EOF"), without waiting for more than a moment.
pub(crate) async fn leave(server: &mut Stream) {
    let bye = async {
        let _ = server.write_all(&crate::conn::TERMINATE).await;
        let _ = server.shutdown().await;
    };
    let _ = tokio::time::timeout(Duration::from_millis(500), bye).await;
    let _ = socket2::SockRef::from(server.tcp()).shutdown(std::net::Shutdown::Both);
}

/// Waits (as a held session, within `--hold-timeout`) for a master that is not draining
/// (on the read-only listener: a standby of the pool, or the master with the fallback), and
/// opens the session there. Meanwhile it opens the session on the master-to-be the store
/// names (`Routes::next`), so that once that one is routed the move waits for no login.
/// `Err` if none came in time, the client left, or the new server refused the login or the
/// replay.
pub(crate) async fn open_on_next<C>(
    client: &C,
    start: &Start<'_>,
    state: &SessionState,
    after_loss: bool,
    ctx: &Ctx,
) -> Result<Moved, Unmovable>
where
    C: ClientStream,
{
    let Some(held) = ctx.hold.start() else {
        return Err(Unmovable::NoMaster);
    };
    let mut retry = false;
    // When the next server was first seen routed: what the move adds from there is measured.
    let mut routed_at: Option<(Arc<str>, std::time::Instant)> = None;
    let mut early = early::Early::new(&ctx.metrics);
    loop {
        let changed = ctx.routes.changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let route = ctx.routes.load();
        // Waited for only while no master is elected, as a new session is: a fenced or
        // stopping proxy routes nothing, and closes what it cannot route.
        if matches!(&route.master, Err(why) if *why != crate::route::NoMaster::NoMasterDb) {
            return Err(Unmovable::NoMaster);
        }
        let ready = !route.drain.is_cancelled() && !route.token.is_cancelled();
        let next = crate::conn::choose(&route, ctx.read_only).ok();
        if let (Some((lane, addr)), true) = (next, ready) {
            // Measured from the first try of this server (a dead old master tried first, while
            // still routed, does not count).
            let routed = match &routed_at {
                Some((a, t)) if *a == addr => *t,
                _ => {
                    routed_at
                        .insert((addr.clone(), std::time::Instant::now()))
                        .1
                }
            };
            let opened = match early.take(&addr).await {
                Some(o) => Ok(o),
                None => open(&route, &addr, lane.what(), start, state, after_loss, ctx).await,
            };
            match opened {
                Ok(o) => {
                    let took = routed.elapsed().as_secs_f64();
                    ctx.metrics.move_after_route_seconds.0.observe(took);
                    return Ok(o.into_moved(route, lane, addr));
                }
                // The new master not accepting connections yet: tried again, as a held
                // session's connect is.
                Err(Attempt::NotYet) => retry = true,
                Err(Attempt::Refused(why)) => {
                    tracing::warn!(
                        addr = &*addr,
                        why,
                        "cannot move a session to {}",
                        lane.what()
                    );
                    return Err(Unmovable::Replay);
                }
                Err(Attempt::ImplicitCalls) => {
                    tracing::info!(
                        addr = &*addr,
                        "not moving a session after a failover: its database has triggers, defaults, views or policies calling functions the proxy cannot judge"
                    );
                    return Err(Unmovable::ImplicitCalls);
                }
            }
        } else if let Some(next) = ctx.routes.next().filter(|_| ctx.read_only.is_none()) {
            if early.worth_trying(&next) {
                let what = "the master-to-be";
                let opened = open(&route, &next, what, start, state, after_loss, ctx).await;
                early.prepared(next, opened);
                continue;
            }
        }
        tokio::select! {
            go_on = held.wait(changed, retry) => if !go_on {
                return Err(Unmovable::NoMaster);
            },
            _ = client.hung_up() => return Err(Unmovable::NoMaster),
        }
    }
}

/// Why one attempt to open the session failed.
enum Attempt {
    /// Not reachable or not accepting connections: worth another try.
    NotYet,
    /// It refused the login or the replay (why): no other try will differ.
    Refused(String),
    /// Its catalog has implicit calls the proxy cannot judge (`CATALOG_CHECK`).
    ImplicitCalls,
}

/// What a session elsewhere starts from: the startup packet, the client's credentials, and
/// the parameters the client was told at the start.
pub(crate) struct Start<'a> {
    pub startup: &'a [u8],
    pub creds: &'a Credentials,
    pub reported: &'a [(String, String)],
}

/// A session opened on a server, its state replayed, not yet relayed.
struct Opened {
    server: Stream,
    key: Option<Vec<u8>>,
    reports: Vec<u8>,
}

impl Opened {
    fn into_moved(self, route: Arc<Route>, lane: Lane, addr: Arc<str>) -> Moved {
        Moved {
            server: self.server,
            route,
            lane,
            addr,
            key: self.key,
            reports: self.reports,
        }
    }
}

/// Logs in to `addr` as the client (the startup packet, its credentials), checks the
/// catalog after a failover, and replays `state`.
async fn open(
    route: &Route,
    addr: &Arc<str>,
    what: &str,
    start: &Start<'_>,
    state: &SessionState,
    after_loss: bool,
    ctx: &Ctx,
) -> Result<Opened, Attempt> {
    let mut server = crate::conn::open_server(addr, what, ctx)
        .await
        .map_err(|_| Attempt::NotYet)?;
    let first = async {
        server.write_all(start.startup).await.ok()?;
        crate::conn::first_answer(&mut server, &route.token, what, true)
            .await
            .ok()
    };
    let answer = tokio::time::timeout(STEP_TIMEOUT, first)
        .await
        .ok()
        .flatten()
        .ok_or(Attempt::NotYet)?;
    let started = async {
        let rest = exchange::login(&mut server, &answer, start.creds)
            .await
            .map_err(|f| f.why)?;
        let (key, mut reports) = read_start(&mut server, rest, start.reported).await?;
        if after_loss && implicit_calls(&mut server).await? {
            return Ok(None);
        }
        wire::send(&mut server, &state::replay(state))
            .await
            .map_err(|e| e.to_string())?;
        let a = read_answer(&mut server).await?;
        match a.error {
            Some(e) => Err(format!("the replay failed: {e}")),
            None => {
                reports.extend(a.passed);
                Ok(Some((key, reports)))
            }
        }
    };
    match tokio::time::timeout(STEP_TIMEOUT, started).await {
        Ok(Ok(None)) => Err(Attempt::ImplicitCalls),
        Ok(Ok(Some((key, reports)))) => Ok(Opened {
            server,
            key,
            reports,
        }),
        Ok(Err(why)) => Err(Attempt::Refused(why)),
        Err(_) => Err(Attempt::Refused("timed out".into())),
    }
}

/// Whether the database has objects created by users (triggers, defaults, views, rules,
/// policies, constraints, index expressions) that call a user-defined function or operator,
/// or a built-in with session state (`classify::SESSION_STATE_FUNCTIONS`): a statement the
/// proxy found clean may have changed the session's state through one of them.
async fn implicit_calls(server: &mut Stream) -> Result<bool, String> {
    let mut q = catalog_check().into_bytes();
    q.push(0);
    wire::send(server, &wire::message(b'Q', &q))
        .await
        .map_err(|e| e.to_string())?;
    let a = read_answer(server).await?;
    if let Some(e) = a.error {
        return Err(format!("the catalog check failed: {e}"));
    }
    let first = a
        .sets
        .first()
        .and_then(|rows| rows.first())
        .and_then(|r| r.first());
    Ok(!matches!(first, Some(Some(v)) if v == "f"))
}

/// The catalog check's query (see `implicit_calls`). 16384 is FirstNormalObjectId: below
/// it, every object is the system's own. PostgreSQL records no dependency on a built-in
/// (pinned) function, so calls of those are found in the stored expression trees.
pub fn catalog_check() -> String {
    let trees = "SELECT ev_action::text AS n FROM pg_catalog.pg_rewrite WHERE oid >= 16384 \
         UNION ALL SELECT adbin::text FROM pg_catalog.pg_attrdef WHERE oid >= 16384 \
         UNION ALL SELECT conbin::text FROM pg_catalog.pg_constraint WHERE oid >= 16384 AND conbin IS NOT NULL \
         UNION ALL SELECT polqual::text FROM pg_catalog.pg_policy WHERE polqual IS NOT NULL \
         UNION ALL SELECT polwithcheck::text FROM pg_catalog.pg_policy WHERE polwithcheck IS NOT NULL \
         UNION ALL SELECT tgqual::text FROM pg_catalog.pg_trigger WHERE tgqual IS NOT NULL \
         UNION ALL SELECT indexprs::text FROM pg_catalog.pg_index WHERE indexrelid >= 16384 AND indexprs IS NOT NULL \
         UNION ALL SELECT indpred::text FROM pg_catalog.pg_index WHERE indexrelid >= 16384 AND indpred IS NOT NULL";
    format!(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d \
         WHERE d.refclassid IN ('pg_catalog.pg_proc'::pg_catalog.regclass, 'pg_catalog.pg_operator'::pg_catalog.regclass) \
         AND d.classid NOT IN ('pg_catalog.pg_proc'::pg_catalog.regclass, 'pg_catalog.pg_operator'::pg_catalog.regclass) \
         AND d.refobjid >= 16384 AND d.deptype <> 'e') \
         OR EXISTS (SELECT 1 FROM ({trees}) t, \
         pg_catalog.regexp_matches(t.n, ':funcid (\\d+)', 'g') m \
         JOIN pg_catalog.pg_proc p ON p.oid = m[1]::pg_catalog.oid \
         WHERE p.proname = ANY ('{{{}}}'::pg_catalog.name[]))",
        classify::SESSION_STATE_FUNCTIONS.join(",")
    )
}

/// Reads the server's start after the login, up to its ReadyForQuery: its BackendKeyData,
/// and its ParameterStatus messages whose values differ from `reported` (the client knows
/// the others already).
async fn read_start(
    server: &mut Stream,
    mut buf: Vec<u8>,
    reported: &[(String, String)],
) -> Result<(Option<Vec<u8>>, Vec<u8>), String> {
    let (mut key, mut reports) = (None, Vec::new());
    loop {
        let (kind, body) = wire::read_message(server, &mut buf)
            .await
            .map_err(|e| e.to_string())?;
        match kind {
            b'K' => key = Some(body),
            b'E' => {
                let why = crate::protocol::error_fields(&wire::message(b'E', &body))
                    .map_or_else(|| "an error".into(), |(c, m)| format!("{c}: {m}"));
                return Err(format!("the new master refused the login: {why}"));
            }
            b'Z' => return Ok((key, reports)),
            b'S' if !known(&body, reported) => reports.extend(wire::message(b'S', &body)),
            _ => {}
        }
    }
}

/// Whether a ParameterStatus body names a value the client was told at the start.
fn known(body: &[u8], reported: &[(String, String)]) -> bool {
    crate::session_start::parameter(body).is_some_and(|p| reported.contains(&p))
}
