//! What the keeper asks its PostgreSQL over the private unix socket as the superuser: its
//! state for KeeperInfo, and the few changes it makes (roles, slots, promote).

use control::model::TimelineHistoryEntry;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_postgres::{Client, Config, NoTls, Statement};

/// How to reach the local PostgreSQL.
#[derive(Clone, Debug)]
pub struct Conn {
    pub socket_dir: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
}

/// The state of a running PostgreSQL, as published.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PgState {
    pub in_recovery: bool,
    pub system_id: String,
    pub timeline: u64,
    pub xlog_pos: u64,
    pub history: Vec<TimelineHistoryEntry>,
    /// db UIDs of the standbys PostgreSQL reports as synchronous and streaming.
    pub sync_standbys: Vec<String>,
    pub older_wal_file: String,
    pub pending_restart: bool,
    /// A standby's walreceiver is streaming.
    pub streaming: bool,
}

impl Conn {
    /// Connects within `timeout`, the whole of it: tokio-postgres's connect timeout covers
    /// only the socket, and a frozen postmaster (SIGSTOP) accepts into its backlog and then
    /// never answers the startup, which hung the keeper's loop.
    pub async fn connect(&self, timeout: Duration) -> anyhow::Result<Client> {
        let mut cfg = Config::new();
        cfg.host_path(&self.socket_dir)
            .port(self.port)
            .user(&self.user)
            .dbname("postgres")
            .application_name("stolon-keeper")
            // The keeper's own writes (roles) must not wait for synchronous standbys that
            // may not exist yet; they are re-applied on every start anyway.
            .options("-c synchronous_commit=local")
            .connect_timeout(timeout);
        if let Some(p) = &self.password {
            cfg.password(p);
        }
        let (client, conn) = tokio::time::timeout(timeout, cfg.connect(NoTls))
            .await
            .map_err(|_| anyhow::anyhow!("PostgreSQL did not answer within {timeout:?}"))??;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }
}

/// Parses an LSN such as `0/3000148`.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// Writes an LSN as PostgreSQL does (`0/3000148`).
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses a timeline history file: `<tli>\t<switch lsn>\t<reason>` lines.
pub fn parse_history(text: &str) -> Vec<TimelineHistoryEntry> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let tli = f.next()?.trim().parse().ok()?;
            let lsn = parse_lsn(f.next()?.trim())?;
            Some(TimelineHistoryEntry {
                timeline_id: tli,
                switch_point: lsn,
                reason: f.next().unwrap_or("").trim().to_string(),
            })
        })
        .collect()
}

/// The highest timeline of a WAL file this standby holds for the segment of `pos`: the
/// walreceiver names the files it writes by the timeline it streams, so a standby that
/// followed a new master has that timeline's file for its replay position, and one stuck
/// at a fork does not. Unlike the walreceiver's view it survives the master going away.
async fn wal_file_timeline(
    client: &Client,
    pos: u64,
    seg_size: u64,
) -> Result<u64, tokio_postgres::Error> {
    if pos == 0 || seg_size == 0 {
        return Ok(0);
    }
    let segno = pos / seg_size;
    let per_id = 0x1_0000_0000 / seg_size;
    let suffix = format!("{:08X}{:08X}", segno / per_id, segno % per_id);
    let row = client
        .query_one(
            "SELECT max(('x' || substr(name, 1, 8))::bit(32)::bigint) FROM pg_ls_waldir() \
             WHERE length(name) = 24 AND substr(name, 9) = $1",
            &[&suffix],
        )
        .await?;
    Ok(row
        .get::<_, Option<i64>>(0)
        .and_then(|t| u64::try_from(t).ok())
        .unwrap_or(0))
}

/// A standby's timeline is the highest one it is known to be on: the walreceiver's (while one
/// runs), the minimum recovery point's (moved as replay writes pages) and the last
/// restartpoint's. Any one alone can lag behind the replay position reported with it, and
/// a lagging timeline with a current position looks like a fork to the sentinel.
///
/// The state query: one statement, one round trip on a session that has it prepared.
const STATE_SQL: &str = "SELECT pg_is_in_recovery(), \
     (SELECT system_identifier::text FROM pg_control_system()), \
     CASE WHEN pg_is_in_recovery() \
          THEN COALESCE(pg_last_wal_replay_lsn(), pg_last_wal_receive_lsn())::text \
          ELSE pg_current_wal_lsn()::text END, \
     CASE WHEN pg_is_in_recovery() \
          THEN GREATEST((SELECT received_tli FROM pg_stat_wal_receiver), \
                        (SELECT min_recovery_end_timeline FROM pg_control_recovery()), \
                        (SELECT timeline_id FROM pg_control_checkpoint()))::bigint \
          ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint END, \
     (SELECT count(*) FROM pg_settings WHERE pending_restart) > 0, \
     (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'), \
     COALESCE((SELECT status = 'streaming' FROM pg_stat_wal_receiver), false), \
     ARRAY(SELECT application_name FROM pg_stat_replication \
           WHERE sync_state IN ('sync', 'quorum') AND state = 'streaming'), \
     (SELECT COALESCE(min(name), '') FROM pg_ls_waldir() WHERE name ~ '^[0-9A-F]{24}$')";

/// A session kept open for the keeper's state query, with the query prepared. The keeper
/// observes on every round (several a second while anything changes); a new session each
/// time cost a backend fork, authentication and cold catalog caches, tens of milliseconds
/// on a loaded host, on the path of every switchover and failover step.
pub struct StateSession {
    client: Client,
    query: Statement,
    opened: Instant,
}

impl StateSession {
    /// Opens a session (within `timeout`, as `Conn::connect`) and prepares the query.
    pub async fn open(conn: &Conn, timeout: Duration) -> anyhow::Result<StateSession> {
        let opened = Instant::now();
        let client = conn.connect(timeout).await?;
        let query = tokio::time::timeout(timeout, client.prepare(STATE_SQL))
            .await
            .map_err(|_| anyhow::anyhow!("PostgreSQL did not prepare within {timeout:?}"))??;
        Ok(StateSession {
            client,
            query,
            opened,
        })
    }

    /// Still usable, and younger than `max_age`: a session is replaced now and then so
    /// that a PostgreSQL that stops accepting new sessions (a frozen postmaster, every
    /// slot taken) is seen as not answering, as a new session each round saw it.
    pub fn reusable(&self, max_age: Duration) -> bool {
        !self.client.is_closed() && self.opened.elapsed() < max_age
    }

    /// The session, for the keeper's own statements between state queries.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The server process behind this session.
    pub async fn backend_pid(&self) -> Result<i32, tokio_postgres::Error> {
        Ok(self
            .client
            .query_one("SELECT pg_backend_pid()", &[])
            .await?
            .get(0))
    }

    /// Reads the state to publish. `data_dir` gives the timeline history files.
    pub async fn state(&self, data_dir: &Path) -> Result<PgState, tokio_postgres::Error> {
        let row = self.client.query_one(&self.query, &[]).await?;
        let in_recovery: bool = row.get(0);
        let lsn: Option<String> = row.get(2);
        let timeline: i64 = row.get::<_, Option<i64>>(3).unwrap_or(0);
        let mut timeline = u64::try_from(timeline).unwrap_or(0);
        let xlog_pos = lsn.as_deref().and_then(parse_lsn).unwrap_or(0);
        if in_recovery {
            let seg_size = row
                .get::<_, Option<i64>>(5)
                .and_then(|s| u64::try_from(s).ok())
                .unwrap_or(16 << 20);
            timeline = timeline.max(wal_file_timeline(&self.client, xlog_pos, seg_size).await?);
        }
        let sync: Vec<String> = row.get(7);
        Ok(PgState {
            in_recovery,
            system_id: row.get::<_, Option<String>>(1).unwrap_or_default(),
            timeline,
            xlog_pos,
            history: read_history(data_dir, timeline),
            sync_standbys: sync
                .iter()
                .filter_map(|name| name.strip_prefix("stolon_").map(str::to_string))
                .collect(),
            older_wal_file: row.get(8),
            pending_restart: row.get(4),
            streaming: row.get(6),
        })
    }
}

/// Reads the state on `kept` if it is still usable, else (or if it broke) on a new
/// session; also returns the session to keep and whether it was `kept`. `None` when
/// PostgreSQL cannot be reached or does not answer within `limit`.
pub async fn observe(
    kept: Option<StateSession>,
    conn: &Conn,
    data_dir: &Path,
    limit: Duration,
    max_age: Duration,
) -> Option<(PgState, StateSession, bool)> {
    if let Some(session) = kept.filter(|s| s.reusable(max_age)) {
        match tokio::time::timeout(limit, session.state(data_dir)).await {
            Ok(Ok(st)) => return Some((st, session, true)),
            // Broken (PostgreSQL restarted, the backend was terminated): a new session at
            // once, not a round reported as not answering.
            Ok(Err(e)) => tracing::debug!(error = %e, "state session broken: opening another"),
            // Slow, not broken: a second try would only double the wait.
            Err(_) => return None,
        }
    }
    let session = StateSession::open(conn, Duration::from_secs(2))
        .await
        .ok()?;
    let st = tokio::time::timeout(limit, session.state(data_dir))
        .await
        .ok()?
        .ok()?;
    Some((st, session, false))
}

fn read_history(data_dir: &Path, timeline: u64) -> Vec<TimelineHistoryEntry> {
    if timeline <= 1 {
        return Vec::new();
    }
    let file = data_dir
        .join("pg_wal")
        .join(format!("{timeline:08X}.history"));
    std::fs::read_to_string(file)
        .map(|t| parse_history(&t))
        .unwrap_or_default()
}

/// Quotes a string literal for SQL (standard_conforming_strings is on since 9.1).
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Quotes an identifier for SQL.
fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// "ALTER" for a role that exists, "CREATE" for one that does not.
async fn create_or_alter(
    client: &Client,
    user: &str,
) -> Result<&'static str, tokio_postgres::Error> {
    let exists = client
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&user])
        .await?
        .is_some();
    Ok(if exists { "ALTER" } else { "CREATE" })
}

/// Creates (or updates) the replication role after initdb.
pub async fn ensure_repl_role(
    client: &Client,
    user: &str,
    password: Option<&str>,
) -> Result<(), tokio_postgres::Error> {
    let verb = create_or_alter(client, user).await?;
    let pw = password
        .map(|p| format!(" PASSWORD {}", literal(p)))
        .unwrap_or_default();
    // The statement holds a password: it is never logged by the keeper.
    let sql = format!("{verb} ROLE {} WITH LOGIN REPLICATION{pw}", ident(user));
    client.batch_execute(&sql).await
}

/// Creates (or updates) the proxy's auth role (`--pg-auth-username`) and the lookup function
/// it calls (`control::auth_sql`), on the master.
pub async fn ensure_auth_role(
    client: &Client,
    user: &str,
    password: &str,
) -> Result<(), tokio_postgres::Error> {
    let verb = create_or_alter(client, user).await?;
    // NOSUPERUSER and nothing else: the role can call the lookup function, no more. The
    // statement holds a password: it is never logged by the keeper.
    let sql = format!(
        "{verb} ROLE {} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD {}",
        ident(user),
        literal(password)
    );
    client.batch_execute(&sql).await?;
    client
        .batch_execute(&control::auth_sql::lookup_function_sql(user))
        .await
}

/// Physical replication slots: creates `wanted`, drops stale `stolon_*` ones, leaves the
/// others alone.
pub async fn sync_slots(client: &Client, wanted: &[String]) -> Result<(), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT slot_name::text FROM pg_replication_slots WHERE slot_type = 'physical'",
            &[],
        )
        .await?;
    let have: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    for slot in wanted.iter().filter(|s| !have.contains(s)) {
        client
            .execute("SELECT pg_create_physical_replication_slot($1)", &[slot])
            .await?;
        tracing::info!(%slot, "created replication slot");
    }
    for slot in have
        .iter()
        .filter(|s| s.starts_with("stolon_") && !wanted.contains(s))
    {
        let r = client
            .execute("SELECT pg_drop_replication_slot($1)", &[slot])
            .await;
        match r {
            Ok(_) => tracing::info!(%slot, "dropped stale replication slot"),
            // Active (a standby still streams): try again next round.
            Err(e) => tracing::debug!(%slot, error = %e, "cannot drop slot yet"),
        }
    }
    Ok(())
}

/// Promotes a standby and waits up to `wait` for the end of recovery. `pg_promote(true)`
/// would wait too, but it checks only every 100 ms (PostgreSQL's WAITS_PER_SECOND), and
/// every ms of that is a ms with no master during a switchover or failover: the end of
/// recovery is polled here every `PROMOTE_POLL` instead.
pub async fn promote(client: &Client, wait: Duration) -> Result<bool, tokio_postgres::Error> {
    let signalled: bool = client
        .query_one("SELECT pg_promote(false)", &[])
        .await?
        .get(0);
    if !signalled {
        return Ok(false);
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let in_recovery: bool = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await?
            .get(0);
        if !in_recovery {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(PROMOTE_POLL).await;
    }
}

/// How often the end of a promotion's recovery is checked.
const PROMOTE_POLL: Duration = Duration::from_millis(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_and_history_parse() {
        assert_eq!(parse_lsn("0/3000148"), Some(0x3000148));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(parse_lsn("x"), None);
        let h = parse_history(
            "1\t0/3000148\tno recovery target specified\n\n2\t0/5000000\tbefore 2000-01-01\n",
        );
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].timeline_id, 1);
        assert_eq!(h[0].switch_point, 0x3000148);
        assert_eq!(h[1].reason, "before 2000-01-01");
    }

    #[test]
    fn quoting() {
        assert_eq!(literal("a'b"), "'a''b'");
        assert_eq!(ident("we\"ird"), "\"we\"\"ird\"");
    }
}
