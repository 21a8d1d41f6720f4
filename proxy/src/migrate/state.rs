//! What a session holds on its server, asked of that server while the client is idle, and
//! what a new session must be told to hold the same: the pure half of a move (issue 20).
//!
//! Movable: settings the session changed (`pg_settings` rows with source `session`), a
//! `SET ROLE`, and statements prepared through the protocol (Parse with a name). Startup
//! parameters need nothing here: the startup packet is replayed as it was. Not movable,
//! because no replay can restore them or because a lost one would go unnoticed: LISTEN,
//! session-level advisory locks, temporary tables, WITH HOLD cursors, statements prepared
//! with SQL PREPARE (the view shows the whole query string that created them, which may
//! hold other statements), a session authorisation other than the login role, and custom
//! (dotted) settings, which `pg_settings` never lists (see `TxState::custom_settings`).

use crate::auth::wire;

/// Asked on the old server, in one simple query, between transactions. Three result sets:
/// the unmovable kinds as counts and the two roles; the changed settings; the prepared
/// statements with their parameter types.
pub const INSPECT: &str = "SELECT \
 (SELECT count(*) FROM pg_catalog.pg_listening_channels()), \
 (SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()), \
 (SELECT count(*) FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema()), \
 (SELECT count(*) FROM pg_catalog.pg_cursors WHERE is_holdable), \
 (SELECT count(*) FROM pg_catalog.pg_prepared_statements WHERE from_sql), \
 session_user::text, current_user::text; \
 SELECT name, pg_catalog.current_setting(name) FROM pg_catalog.pg_settings WHERE source = 'session'; \
 SELECT name, statement, parameter_types::pg_catalog.oid[]::text FROM pg_catalog.pg_prepared_statements WHERE NOT from_sql";

/// Why a session stays where it is (closed at its boundary, as before moves existed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unmovable {
    /// The proxy did not authenticate the client: it cannot log in as it elsewhere.
    NoCredentials,
    /// `--session-moves off`.
    Disabled,
    Listen,
    AdvisoryLock,
    TempTable,
    HoldCursor,
    SqlPrepare,
    SessionAuthorization,
    /// The client set a custom (dotted) setting or called set_config: not listed anywhere.
    CustomSetting,
    /// The old server's answer could not be read, or it refused the inspection.
    Inspect,
    /// No new master within `--hold-timeout`, or the client left while held.
    NoMaster,
    /// The new master refused the login or the replay.
    Replay,
    /// Its server went away with a request of the session in flight or inside a
    /// transaction: the client gets the error it would get without moves.
    InFlight,
    /// Its server went away and the proxy cannot prove the session's state (it changed
    /// it since the last inspection, or an inspection found something unmovable).
    Unproven,
    /// Its server ended it with an error while the server still accepts connections (an
    /// administrator's command, a crash restart): the end was the server's to decide, so
    /// the client gets that error.
    ServerEnded,
    /// Its server went away and the new server's database has triggers, defaults, views or
    /// policies that call functions the proxy cannot judge: a statement it trusted may
    /// have changed the session's state through them.
    ImplicitCalls,
}

impl Unmovable {
    pub fn label(self) -> &'static str {
        match self {
            Unmovable::NoCredentials => "no_credentials",
            Unmovable::Disabled => "disabled",
            Unmovable::Listen => "listen",
            Unmovable::AdvisoryLock => "advisory_lock",
            Unmovable::TempTable => "temp_table",
            Unmovable::HoldCursor => "hold_cursor",
            Unmovable::SqlPrepare => "sql_prepare",
            Unmovable::SessionAuthorization => "session_authorization",
            Unmovable::CustomSetting => "custom_setting",
            Unmovable::Inspect => "inspect_failed",
            Unmovable::NoMaster => "no_master",
            Unmovable::Replay => "replay_failed",
            Unmovable::InFlight => "in_flight",
            Unmovable::Unproven => "unproven",
            Unmovable::ImplicitCalls => "implicit_calls",
            Unmovable::ServerEnded => "server_ended",
        }
    }
}

/// A named statement prepared through the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepared {
    pub name: String,
    pub query: String,
    pub param_types: Vec<u32>,
}

/// What a new session must be given to hold what the old one held.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionState {
    pub settings: Vec<(String, String)>,
    /// `SET ROLE` in force: the role to set again.
    pub role: Option<String>,
    pub prepared: Vec<Prepared>,
}

/// One result set's rows (NULL as `None`).
type Rows = Vec<Vec<Option<String>>>;

/// What the server answered to a simple query: its result sets, or its error's message;
/// and the asynchronous messages (notices, notifications, parameter changes) that came
/// with it, whole, for the client.
#[derive(Debug, Default)]
pub struct Answer {
    pub sets: Vec<Rows>,
    pub error: Option<String>,
    pub passed: Vec<u8>,
}

/// Cuts `bytes` into the answer of one simple query. `None` until its ReadyForQuery is in;
/// `Some(Err)` for bytes that are not messages.
pub fn answer(bytes: &[u8]) -> Option<Result<Answer, String>> {
    let mut a = Answer::default();
    let mut rows: Rows = Vec::new();
    let mut at = 0;
    loop {
        let rest = &bytes[at..];
        if rest.len() < 5 {
            return None;
        }
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        if len < 4 {
            return Some(Err(format!("a message of length {len}")));
        }
        let msg = rest.get(..1 + len)?;
        let body = &msg[5..];
        match msg[0] {
            // Row descriptions, empty queries, and the replay's Parse and Bind completions.
            b'T' | b'I' | b'1' | b'2' => {}
            b'D' => match data_row(body) {
                Some(r) => rows.push(r),
                None => return Some(Err("a malformed DataRow".into())),
            },
            b'C' => a.sets.push(std::mem::take(&mut rows)),
            b'E' => {
                a.error = Some(
                    crate::protocol::error_fields(msg)
                        .map_or_else(|| "an error".into(), |(c, m)| format!("{c}: {m}")),
                )
            }
            b'N' | b'A' | b'S' => a.passed.extend_from_slice(msg),
            b'Z' => return Some(Ok(a)),
            k => return Some(Err(format!("unexpected message {:?}", k as char))),
        }
        at += msg.len();
    }
}

fn data_row(body: &[u8]) -> Option<Vec<Option<String>>> {
    let n = u16::from_be_bytes(body.get(..2)?.try_into().ok()?) as usize;
    let mut at = 2;
    let mut cols = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if len < 0 {
            cols.push(None);
            continue;
        }
        let v = body.get(at..at + len as usize)?;
        at += len as usize;
        cols.push(Some(String::from_utf8_lossy(v).into_owned()));
    }
    Some(cols)
}

/// The state to replay, from the inspection's result sets, or why the session cannot move.
/// `user`: the role the client logged in as.
pub fn judge(sets: &[Rows], user: &str) -> Result<SessionState, Unmovable> {
    let [kinds, settings, prepared] = sets else {
        return Err(Unmovable::Inspect);
    };
    let Some(k) = kinds.first() else {
        return Err(Unmovable::Inspect);
    };
    let count = |i: usize| {
        k.get(i)
            .and_then(|v| v.as_deref())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let blockers = [
        Unmovable::Listen,
        Unmovable::AdvisoryLock,
        Unmovable::TempTable,
        Unmovable::HoldCursor,
        Unmovable::SqlPrepare,
    ];
    for (i, why) in blockers.into_iter().enumerate() {
        match count(i) {
            Some(0) => {}
            Some(_) => return Err(why),
            None => return Err(Unmovable::Inspect),
        }
    }
    let text = |i: usize| k.get(i).cloned().flatten();
    let (Some(session_user), Some(current_user)) = (text(5), text(6)) else {
        return Err(Unmovable::Inspect);
    };
    if session_user != user {
        return Err(Unmovable::SessionAuthorization);
    }
    let mut state = SessionState {
        role: (current_user != session_user).then_some(current_user),
        ..Default::default()
    };
    for row in settings {
        match row.as_slice() {
            [Some(name), Some(value)] => state.settings.push((name.clone(), value.clone())),
            _ => return Err(Unmovable::Inspect),
        }
    }
    for row in prepared {
        match row.as_slice() {
            [Some(name), Some(query), Some(types)] => state.prepared.push(Prepared {
                name: name.clone(),
                query: query.clone(),
                param_types: oids(types).ok_or(Unmovable::Inspect)?,
            }),
            _ => return Err(Unmovable::Inspect),
        }
    }
    Ok(state)
}

/// `{23,25}` as PostgreSQL prints an oid[].
fn oids(text: &str) -> Option<Vec<u32>> {
    let inner = text.strip_prefix('{')?.strip_suffix('}')?;
    if inner.is_empty() {
        return Some(Vec::new());
    }
    inner.split(',').map(|v| v.trim().parse().ok()).collect()
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// Bind of the unnamed statement with text parameters, then Execute.
fn bind_execute(out: &mut Vec<u8>, params: &[&str]) {
    let mut b = Vec::new();
    cstr(&mut b, "");
    cstr(&mut b, "");
    b.extend(0u16.to_be_bytes());
    b.extend((params.len() as u16).to_be_bytes());
    for p in params {
        b.extend((p.len() as i32).to_be_bytes());
        b.extend_from_slice(p.as_bytes());
    }
    b.extend(0u16.to_be_bytes());
    out.extend(wire::message(b'B', &b));
    let mut e = Vec::new();
    cstr(&mut e, "");
    e.extend(0i32.to_be_bytes());
    out.extend(wire::message(b'E', &e));
}

fn parse(out: &mut Vec<u8>, name: &str, query: &str, types: &[u32]) {
    let mut p = Vec::new();
    cstr(&mut p, name);
    cstr(&mut p, query);
    p.extend((types.len() as u16).to_be_bytes());
    for t in types {
        p.extend(t.to_be_bytes());
    }
    out.extend(wire::message(b'P', &p));
}

/// The extended-protocol messages that give a new session `state`, ending with one Sync:
/// settings first (a changed search_path decides what the statements' names mean), each
/// through set_config with its value as a parameter (no quoting to get wrong), then the
/// role, then the statements under their names.
pub fn replay(state: &SessionState) -> Vec<u8> {
    let mut out = Vec::new();
    let sets: Vec<(&str, &str)> = state
        .settings
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .chain(state.role.as_deref().map(|r| ("role", r)))
        .collect();
    if !sets.is_empty() {
        parse(
            &mut out,
            "",
            "SELECT pg_catalog.set_config($1, $2, false)",
            &[],
        );
        for (name, value) in sets {
            bind_execute(&mut out, &[name, value]);
        }
    }
    for p in &state.prepared {
        parse(&mut out, &p.name, &p.query, &p.param_types);
    }
    out.extend(wire::message(b'S', &[]));
    out
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
