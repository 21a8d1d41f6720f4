//! A session's start, from the server's first answer to its first ReadyForQuery: both ways
//! are relayed (authentication goes back and forth), the server's messages read whole, and
//! its BackendKeyData replaced by a key the proxy mints (see `cancel`). Then the relay
//! takes over. The client's bytes are passed on as they come.

use crate::auth::exchange;
use crate::auth::{Credentials, Secret};
use crate::cancel::{KeyGuard, Keys};
use crate::conn::{ClientStream, Ctx};
use crate::metrics::{Direction, Metrics};
use crate::migrate::Moves;
use crate::relay::End;
use crate::stream::Stream;
use crate::txstate::TxState;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// A startup message longer than this is not what PostgreSQL sends before its first
/// ReadyForQuery (authentication requests, ParameterStatus, notices are small): the proxy
/// stops reading messages and passes the stream on as it is.
const MAX_START_MESSAGE: usize = 1 << 20;

/// The server's start as the proxy passes it on when it arrives in `chunks`: every whole
/// message up to ReadyForQuery, a BackendKeyData through `mint`, then the rest as it is.
/// The bytes out, and whether the start was over (public for the fuzz target).
pub fn pass_start(chunks: &[&[u8]], mut mint: impl FnMut(&[u8]) -> Vec<u8>) -> (Vec<u8>, bool) {
    let mut m = ServerMessages::default();
    let mut out = Vec::new();
    for c in chunks {
        m.buf.extend_from_slice(c);
        if m.drain(&mut out, &mut mint) == Step::Done {
            return (out, true);
        }
    }
    (out, false)
}

/// What the server said so far, cut into whole messages.
#[derive(Default)]
struct ServerMessages {
    buf: Vec<u8>,
    /// The ParameterStatus values passed on (name, value), in order.
    reported: Vec<(String, String)>,
    /// Hold back the server's end (see `Step::Lost`) instead of passing it on.
    hold_loss: bool,
    /// The server's end, held back.
    lost: Option<Vec<u8>>,
    /// AuthenticationOk was passed on.
    told_ok: bool,
}

/// How the proxy authenticated a client, as `stolon_proxy_auth_total` names it.
fn method(creds: &Credentials) -> &'static str {
    match creds {
        Credentials::Scram { .. } => "scram",
        Credentials::Md5(_) => "md5",
    }
}

/// AuthenticationOk.
fn auth_ok() -> Vec<u8> {
    crate::auth::wire::message(b'R', &[0, 0, 0, 0])
}

/// A ParameterStatus body: its name and value.
pub(crate) fn parameter(body: &[u8]) -> Option<(String, String)> {
    let mut parts = body.split(|&b| b == 0);
    let name = parts.next()?;
    let value = parts.next()?;
    Some((
        String::from_utf8_lossy(name).into_owned(),
        String::from_utf8_lossy(value).into_owned(),
    ))
}

/// What one pass over the server's bytes found.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Wait for more bytes.
    More,
    /// ReadyForQuery was passed, or the stream is not what a start looks like: the rest is
    /// the relay's.
    Done,
    /// With `hold_loss`: the server ended the start because it is going away; its error is
    /// held back in `lost`, and what follows it dropped.
    Lost,
}

impl ServerMessages {
    /// Moves every whole message from the buffer to `out`, a BackendKeyData through
    /// `mint` (which gives the body the client sees).
    fn drain(&mut self, out: &mut Vec<u8>, mut mint: impl FnMut(&[u8]) -> Vec<u8>) -> Step {
        let mut at = 0;
        let step = loop {
            let rest = &self.buf[at..];
            if rest.len() < 5 {
                break Step::More;
            }
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            if !(4..=MAX_START_MESSAGE).contains(&len) {
                break Step::Done;
            }
            let Some(msg) = rest.get(..1 + len) else {
                break Step::More;
            };
            if self.hold_loss && msg[0] == b'E' && crate::protocol::going_away(msg) {
                self.lost = Some(msg.to_vec());
                self.buf.clear();
                return Step::Lost;
            }
            match msg[0] {
                b'K' if (8..=4 + crate::protocol::MAX_CANCEL_KEY).contains(&(len - 4)) => {
                    let minted = mint(&msg[5..]);
                    out.push(b'K');
                    out.extend(((minted.len() + 4) as u32).to_be_bytes());
                    out.extend(minted);
                }
                b'S' => {
                    self.reported.extend(parameter(&msg[5..]));
                    out.extend_from_slice(msg);
                }
                b'R' => {
                    self.told_ok |= msg[5..] == [0, 0, 0, 0];
                    out.extend_from_slice(msg);
                }
                _ => out.extend_from_slice(msg),
            }
            at += msg.len();
            if msg[0] == b'Z' {
                break Step::Done;
            }
        };
        self.buf.drain(..at);
        if step == Step::Done {
            // After ReadyForQuery (or on a stream it cannot read) everything goes as it is.
            out.append(&mut self.buf);
        }
        step
    }
}

/// How a start relayed by [`run`] ended, short of an error.
pub(crate) struct StartEnd {
    /// The key's registration (none if the server sent no key yet).
    pub key: Option<KeyGuard>,
    /// The parameters the server reported (passed on).
    pub reported: Vec<(String, String)>,
    /// With `hold_loss`: the server went away before its ReadyForQuery (its error, held
    /// back, or empty if it just closed or was cut): the session may start elsewhere.
    pub lost: Option<Vec<u8>>,
    /// AuthenticationOk was passed on to the client.
    pub told_ok: bool,
}

/// The session's start, `answer` being what the server sent first (already fed to `tx`),
/// once the relay can take over; `Err` if the session ended during it. With `hold_loss`
/// (the proxy authenticated the client, so it can log in elsewhere), a server that goes away
/// before its ReadyForQuery is not the client's error: see `StartEnd::lost`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run<C, S>(
    client: &mut C,
    server: &mut S,
    answer: Vec<u8>,
    tx: &mut TxState,
    token: &CancellationToken,
    (keys, addr): (&Arc<Keys>, &Arc<str>),
    hold_loss: bool,
    metrics: &Metrics,
) -> Result<StartEnd, End>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut messages = ServerMessages {
        buf: answer,
        hold_loss,
        ..Default::default()
    };
    let lost = |m: ServerMessages, guard, why: Vec<u8>| {
        Ok(StartEnd {
            key: guard,
            reported: m.reported,
            lost: Some(m.lost.unwrap_or(why)),
            told_ok: m.told_ok,
        })
    };
    let mut guard = None;
    let mut out = Vec::new();
    let mut cbuf = vec![0u8; 4096];
    let mut sbuf = vec![0u8; 8192];
    loop {
        let step = messages.drain(&mut out, |real| {
            let (key, g) = keys.mint(real.to_vec(), addr.clone());
            guard = Some(g);
            key
        });
        if !out.is_empty() {
            let written = async {
                client.write_all(&out).await?;
                client.flush().await
            };
            written.await.map_err(End::Error)?;
            metrics.add_bytes(Direction::ServerToClient, out.len() as u64);
            out.clear();
        }
        match step {
            Step::Done => {
                return Ok(StartEnd {
                    key: guard,
                    reported: messages.reported,
                    lost: None,
                    told_ok: true,
                })
            }
            Step::Lost => return lost(messages, guard, Vec::new()),
            Step::More => {}
        }
        tokio::select! {
            // The route's cut first: nothing more of the session reaches an old master.
            biased;
            _ = token.cancelled() => {
                if messages.hold_loss {
                    return lost(messages, guard, Vec::new());
                }
                return Err(End::Severed);
            }
            r = client.read(&mut cbuf) => {
                let n = r.map_err(End::Error)?;
                if n == 0 {
                    return Err(End::ClientClosed);
                }
                tx.from_client(&cbuf[..n]);
                let written = async {
                    server.write_all(&cbuf[..n]).await?;
                    server.flush().await
                };
                written.await.map_err(End::Error)?;
                metrics.add_bytes(Direction::ClientToServer, n as u64);
                // What the client sent before the start ended (a pipelined first query)
                // went to this server: a start elsewhere would lose it.
                messages.hold_loss = false;
            }
            r = server.read(&mut sbuf) => {
                let n = match r {
                    Ok(n) => n,
                    Err(_) if messages.hold_loss => 0,
                    Err(e) => return Err(End::Error(e)),
                };
                if n == 0 {
                    if messages.hold_loss {
                        return lost(messages, guard, Vec::new());
                    }
                    return Err(End::ServerClosed);
                }
                tx.from_server(&sbuf[..n]);
                messages.buf.extend_from_slice(&sbuf[..n]);
            }
        }
    }
}

/// A session about to start: what `begin` needs besides the streams.
pub(crate) struct Start<'a> {
    pub token: &'a CancellationToken,
    pub addr: &'a Arc<str>,
    pub user: &'a str,
    pub ctx: &'a Ctx,
}

/// What a started session keeps until it ends.
#[derive(Default)]
pub(crate) struct Started {
    /// Its minted cancel key's registration (the key leads nowhere once dropped; a moved
    /// session points it at its new server).
    pub key: Option<KeyGuard>,
    /// The client's credentials, when the proxy authenticated it: what a later session on
    /// another server would authenticate with.
    pub credentials: Option<Credentials>,
    /// The parameters the server reported at the start (ParameterStatus), as the client
    /// knows them: a session opened elsewhere tells the client only of the values that differ.
    pub reported: Vec<(String, String)>,
    /// The server went away before the start ended (`StartEnd::lost`): the session is to
    /// be opened elsewhere before it is relayed.
    pub lost: Option<Vec<u8>>,
    /// With `lost`: what the client must still be told of its login before the rest of a
    /// start elsewhere (SCRAM's final message, AuthenticationOk).
    pub pending: Vec<u8>,
}

impl Start<'_> {
    /// Authenticates the client at the proxy when it can (`--auth-user`), then relays the
    /// rest of the start. `Err(None)`: the proxy refused the client (it got the error).
    pub(crate) async fn begin<C>(
        &self,
        client: &mut C,
        server: &mut Stream,
        mut answer: Vec<u8>,
        tx: &mut TxState,
    ) -> Result<Started, Option<End>>
    where
        C: ClientStream,
    {
        let mut credentials = None;
        if let Some(asked) = self
            .ctx
            .auth
            .as_ref()
            .and_then(|_| exchange::asked(&answer))
        {
            if let Some(secret) = self.secret(&asked).await {
                let binding = self
                    .ctx
                    .tls
                    .as_ref()
                    .filter(|_| client.encrypted())
                    .and_then(|t| t.acceptor.end_point());
                let done = exchange::run(
                    client,
                    server,
                    asked,
                    &secret,
                    self.user,
                    binding.as_deref(),
                )
                .await;
                match done {
                    Ok((rest, creds)) => {
                        self.ctx.metrics.auth(method(&creds));
                        tx.from_server(&rest);
                        // The session may move from here on: what it sets is watched.
                        match self.ctx.config.moves {
                            Moves::All => tx.watch_for_moves(true),
                            Moves::Switchover => tx.watch_for_moves(false),
                            Moves::Off => {}
                        }
                        answer = rest;
                        credentials = Some(creds);
                    }
                    Err(f) if f.lost.is_some() && self.ctx.config.moves != Moves::Off => {
                        return Ok(self.lost_in_login(f));
                    }
                    Err(f) => return Err(self.refused(client, f).await),
                }
            }
        }
        let hold_loss = credentials.is_some() && self.ctx.config.moves != Moves::Off;
        let end = run(
            client,
            server,
            answer,
            tx,
            self.token,
            (&self.ctx.cancel_keys, self.addr),
            hold_loss,
            &self.ctx.metrics,
        )
        .await
        .map_err(Some)?;
        let pending = if end.told_ok { Vec::new() } else { auth_ok() };
        Ok(Started {
            key: end.key,
            credentials,
            reported: end.reported,
            lost: end.lost,
            pending,
        })
    }

    /// The client proved its password, then the server went away before it took the
    /// proxy's login: the session is to start elsewhere (see `Started::lost`).
    fn lost_in_login(&self, f: exchange::Failure) -> Started {
        tracing::debug!(
            user = self.user,
            why = f.why,
            "the server went away during the login"
        );
        let Some(lost) = f.lost else {
            return Started::default();
        };
        self.ctx.metrics.auth(method(&lost.creds));
        let mut pending = lost.tell;
        pending.extend(auth_ok());
        Started {
            key: None,
            credentials: Some(lost.creds),
            reported: Vec::new(),
            lost: Some(f.error.unwrap_or_default()),
            pending,
        }
    }

    async fn refused<C>(&self, client: &mut C, f: exchange::Failure) -> Option<End>
    where
        C: ClientStream,
    {
        tracing::debug!(
            user = self.user,
            why = f.why,
            "authentication at the proxy failed"
        );
        if f.forget {
            if let Some(auth) = &self.ctx.auth {
                auth.forget(self.user);
            }
        }
        if let Some(e) = f.error {
            let _ = crate::auth::wire::send(client, &e).await;
        }
        self.ctx.metrics.auth("failed");
        None
    }

    /// The role's secret if the proxy can answer `asked` with it; `None` to pass through.
    async fn secret(&self, asked: &exchange::Asked) -> Option<Secret> {
        let auth = self.ctx.auth.as_ref()?;
        let secret = match auth.cached(self.user) {
            Some(s) => s,
            None => match self.look_up(auth).await {
                Ok(s) => {
                    if s.is_none() {
                        tracing::info!(user = self.user, "role passed through to the server: the lookup gives no password the proxy can check (unknown role, no login, superuser, expired, or none); its sessions cannot be moved to another server");
                    }
                    auth.remember(self.user, s.clone());
                    s
                }
                Err(e) => {
                    if crate::conn::warn_now(self.addr) {
                        tracing::warn!(user = self.user, error = format!("{e:#}"), "cannot look up the role through --auth-user: passing its session through to the server");
                    }
                    self.ctx.metrics.auth("lookup_error");
                    return None;
                }
            },
        };
        match secret {
            Some(s) if exchange::fits(asked, &s) => Some(s),
            _ => {
                self.ctx.metrics.auth("passthrough");
                None
            }
        }
    }

    async fn look_up(&self, auth: &crate::auth::Auth) -> anyhow::Result<Option<Secret>> {
        let timeout = self.ctx.config.connect_timeout;
        let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&**self.addr))
            .await
            .map_err(|_| anyhow::anyhow!("timed out connecting to {}", self.addr))??;
        let stream = match &self.ctx.tls {
            Some(t) => crate::terminate::to_server(tcp, self.addr, t, "the server", timeout)
                .await
                .map_err(|r| anyhow::anyhow!("{}", r.message))?,
            None => Stream::Plain(tcp),
        };
        crate::auth::lookup::lookup(stream, &auth.role, self.user, timeout).await
    }
}

#[cfg(test)]
#[path = "session_start_tests.rs"]
mod tests;
