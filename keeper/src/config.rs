//! PostgreSQL configuration rendered as pure strings: postgresql.conf from the db's
//! pgParameters plus the managed ones, pg_hba.conf from the spec (or stolon's defaults, in
//! `all` or `strict` mode), and which recovery signal file goes with them.

use control::model::{ClusterData, Db, DbInitMode, DbRole, FollowType, SuReplAccessMode};
use control::sentinel::PLACEHOLDER_STANDBY;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Parameters the keeper owns; a spec value for them is ignored.
pub const MANAGED: &[&str] = &[
    "listen_addresses",
    "port",
    "unix_socket_directories",
    "wal_level",
    "hot_standby",
    "max_wal_senders",
    "max_replication_slots",
    "wal_log_hints",
    "synchronous_standby_names",
    "primary_conninfo",
    "primary_slot_name",
    "recovery_target_timeline",
    "restore_command",
    "recovery_target",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
    "recovery_target_action",
    "recovery_min_apply_delay",
    "hba_file",
    "ident_file",
    "config_file",
    "data_directory",
];

/// The smallest wal_keep_size the keeper allows, in MB: standbys restarting briefly should
/// not need a new base backup.
pub const WAL_KEEP_SIZE_FLOOR_MB: u64 = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMethod {
    Md5,
    #[value(name = "scram-sha-256")]
    ScramSha256,
    Trust,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Md5 => "md5",
            AuthMethod::ScramSha256 => "scram-sha-256",
            AuthMethod::Trust => "trust",
        }
    }
}

/// Where this keeper's PostgreSQL listens and how it authenticates.
#[derive(Clone, Debug)]
pub struct Local {
    pub listen_address: String,
    pub port: u16,
    pub socket_dir: String,
    pub su_user: String,
    pub su_auth: AuthMethod,
    pub repl_user: String,
    pub repl_auth: AuthMethod,
    /// A libpq password file holding the replication password (for primary_conninfo).
    pub passfile: String,
}

/// The followed master's address, for a standby.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
    /// The primary's values of the parameters a hot standby may not set lower, as this
    /// standby last replayed them (pg_controldata). See `HOT_STANDBY_FLOORS`.
    pub floors: BTreeMap<String, u64>,
}

/// Parameters a hot standby must set at least as high as its primary: PostgreSQL aborts
/// recovery otherwise. When the spec lowers one, the standby keeps the primary's value
/// until it has replayed the primary's restart with the lower one.
pub const HOT_STANDBY_FLOORS: [(&str, &str); 5] = [
    ("max_connections setting", "max_connections"),
    ("max_worker_processes setting", "max_worker_processes"),
    ("max_wal_senders setting", "max_wal_senders"),
    ("max_prepared_xacts setting", "max_prepared_transactions"),
    ("max_locks_per_xact setting", "max_locks_per_transaction"),
];

/// The floors from `pg_controldata` output.
pub fn parse_floors(controldata: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in controldata.lines() {
        let Some((label, value)) = line.split_once(':') else {
            continue;
        };
        if let Some((_, param)) = HOT_STANDBY_FLOORS.iter().find(|(l, _)| *l == label.trim()) {
            if let Ok(v) = value.trim().parse::<u64>() {
                out.insert(param.to_string(), v);
            }
        }
    }
    out
}

/// The shutdown checkpoint's position from `pg_controldata` output, when the cluster is
/// cleanly shut down ("shut down", not "shut down in recovery" or "in production").
pub fn parse_shutdown_checkpoint(controldata: &str) -> Option<u64> {
    let field = |name: &str| {
        controldata.lines().find_map(|l| {
            let (label, value) = l.split_once(':')?;
            (label.trim() == name).then(|| value.trim())
        })
    };
    if field("Database cluster state")? != "shut down" {
        return None;
    }
    crate::sql::parse_lsn(field("Latest checkpoint location")?)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    pub postgresql_conf: String,
    pub pg_hba_conf: String,
    pub standby_signal: bool,
    pub recovery_signal: bool,
}

/// Quotes a value for postgresql.conf.
fn quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

/// The replication slot / application name of a db.
pub fn slot_name(db_uid: &str) -> String {
    format!("stolon_{db_uid}")
}

/// Parses a size as PostgreSQL does for MB-based settings ("128MB", "1GB", "512" = MB).
pub fn parse_size_mb(v: &str) -> Option<u64> {
    let v = v.trim().trim_matches('\'');
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().ok()?;
    let factor_kb: u64 = match unit.trim() {
        "" | "MB" => 1024,
        "kB" => 1,
        "GB" => 1024 * 1024,
        "TB" => 1024 * 1024 * 1024,
        _ => return None,
    };
    Some(n.checked_mul(factor_kb)? / 1024)
}

/// `synchronous_standby_names` for a sync set: `N (stolon_a,stolon_b)` where every member
/// must acknowledge; the placeholder keeps its name so nothing can match it.
pub fn synchronous_standby_names(set: &[String]) -> String {
    if set.is_empty() {
        return String::new();
    }
    let names: Vec<String> = set
        .iter()
        .map(|u| {
            if u == PLACEHOLDER_STANDBY {
                u.clone()
            } else {
                slot_name(u)
            }
        })
        .collect();
    format!("{} ({})", names.len(), names.join(","))
}

/// Renders the configuration of `db` on this keeper.
/// `pitr_recovery`: the data was restored for point-in-time recovery and has not promoted
/// yet (after promotion the instance is an ordinary master).
/// `previous`: the parameters found in the data dir at init (`initMode: existing`), under
/// the spec's own while the db spec says `includePreviousConfig`, as Go stolon renders them
/// (so the first start of a taken-over instance keeps e.g. its archive_mode).
pub fn render(
    cd: &ClusterData,
    db: &Db,
    local: &Local,
    upstream: Option<&Upstream>,
    restricted: bool,
    pitr_recovery: bool,
    previous: &BTreeMap<String, String>,
) -> Rendered {
    let read_only;
    let db = if cd.is_old_master(db) && db.spec.role == Some(DbRole::Master) {
        read_only = standby_of_nobody(db);
        &read_only
    } else {
        db
    };
    let spec = &db.spec;
    let previous = previous.iter().filter(|_| spec.include_previous_config);
    let mut params: BTreeMap<String, String> = previous
        .chain(&spec.pg_parameters)
        .filter(|(k, _)| !MANAGED.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), quote(v)))
        .collect();
    let set = |p: &mut BTreeMap<String, String>, k: &str, v: String| {
        p.insert(k.to_string(), v);
    };
    set(
        &mut params,
        "listen_addresses",
        quote(&local.listen_address),
    );
    set(&mut params, "port", local.port.to_string());
    set(
        &mut params,
        "unix_socket_directories",
        quote(&local.socket_dir),
    );
    let logical = spec.pg_parameters.get("wal_level").map(String::as_str) == Some("logical");
    set(
        &mut params,
        "wal_level",
        if logical { "logical" } else { "replica" }.into(),
    );
    set(&mut params, "hot_standby", "on".into());
    let senders = u32::from(spec.max_standbys) + u32::from(spec.additional_wal_senders) + 1;
    set(&mut params, "max_wal_senders", senders.to_string());
    let slots = senders + spec.additional_replication_slots.len() as u32;
    set(&mut params, "max_replication_slots", slots.to_string());
    set(&mut params, "wal_log_hints", "on".into());
    // After a failover a standby re-pointed at the new master may ask for its slot before
    // the master has created it; PostgreSQL's default 5 s before the next try would hold
    // synchronous commits that long.
    params
        .entry("wal_retrieve_retry_interval".into())
        .or_insert_with(|| "'1s'".into());
    // Commits waiting on a master whose synchronous_standby_names was changed (a new master
    // after a failover or switchover gets its synchronous standby in two steps) are released
    // only when a synchronous standby's walsender processes its next reply. An idle standby
    // that already has the WAL replies only every wal_receiver_status_interval: with
    // PostgreSQL's 10 s that wait can reach ten seconds. 1 s bounds it. (The suspected cause
    // of a 16 s write gap measured after a sync-mode kill -9; the e2e harness does not
    // reproduce that gap, see docs/benchmarks.md.)
    params
        .entry("wal_receiver_status_interval".into())
        .or_insert_with(|| "'1s'".into());
    let keep = spec
        .pg_parameters
        .get("wal_keep_size")
        .and_then(|v| parse_size_mb(v))
        .unwrap_or(0)
        .max(WAL_KEEP_SIZE_FLOOR_MB);
    set(&mut params, "wal_keep_size", quote(&format!("{keep}MB")));
    let sync = if spec.synchronous_replication {
        synchronous_standby_names(&spec.synchronous_standbys)
    } else {
        String::new()
    };
    set(&mut params, "synchronous_standby_names", quote(&sync));
    if let Some(up) = upstream {
        for (name, floor) in &up.floors {
            let ours = params
                .get(name)
                .and_then(|v| v.trim_matches('\'').parse::<u64>().ok());
            if ours.is_some_and(|v| v < *floor) {
                params.insert(name.clone(), floor.to_string());
            }
        }
    }
    let (standby_signal, recovery_signal) =
        recovery(db, local, upstream, pitr_recovery, &mut params);

    let mut conf = String::from(
        "# Managed by stolon-keeper from the cluster spec: edits here are overwritten, and\n\
         # ALTER SYSTEM fails (postgresql.auto.conf points at /dev/null).\n",
    );
    for (k, v) in &params {
        let _ = writeln!(conf, "{k} = {v}");
    }
    Rendered {
        postgresql_conf: conf,
        pg_hba_conf: render_hba(cd, db, local, restricted),
        standby_signal,
        recovery_signal,
    }
}

/// An old master's db as its keeper runs it until the sentinel replaces it: a standby with
/// no upstream (read-only; promoted again only if it is elected back).
fn standby_of_nobody(db: &Db) -> Db {
    let mut db = db.clone();
    db.spec.role = Some(DbRole::Standby);
    db.spec.follow_config = None;
    db.spec.synchronous_replication = false;
    db.spec.synchronous_standbys.clear();
    db
}

/// Recovery settings: a standby follows its upstream (or the external primary of a standby
/// cluster); a pitr init restores from the archive up to its target and promotes.
fn recovery(
    db: &Db,
    local: &Local,
    upstream: Option<&Upstream>,
    pitr_recovery: bool,
    params: &mut BTreeMap<String, String>,
) -> (bool, bool) {
    let spec = &db.spec;
    // A standby cluster's master restores its data the pitr way but then follows the
    // external primary as a standby: no point-in-time recovery (and no promotion) there.
    let standby_cluster = spec.role == Some(DbRole::Standby);
    if pitr_recovery && spec.init_mode == Some(DbInitMode::Pitr) && !standby_cluster {
        let pitr = spec.pitr_config.clone().unwrap_or_default();
        if let Some(a) = pitr
            .archive_recovery_settings
            .filter(|a| !a.restore_command.is_empty())
        {
            params.insert("restore_command".into(), quote(&a.restore_command));
        }
        if let Some(t) = pitr.recovery_target_settings {
            for (k, v) in [
                ("recovery_target", t.recovery_target),
                ("recovery_target_lsn", t.recovery_target_lsn),
                ("recovery_target_name", t.recovery_target_name),
                ("recovery_target_time", t.recovery_target_time),
                ("recovery_target_xid", t.recovery_target_xid),
                ("recovery_target_timeline", t.recovery_target_timeline),
            ] {
                if !v.is_empty() {
                    params.insert(k.into(), quote(&v));
                }
            }
        }
        params.insert("recovery_target_action".into(), quote("promote"));
        return (false, true);
    }
    if spec.role != Some(DbRole::Standby) {
        return (false, false);
    }
    let follow = spec.follow_config.as_ref();
    match (follow.map(|f| f.kind), upstream) {
        (Some(FollowType::Internal), Some(up)) => {
            // `password=''`: libpq then reads the passfile, not a PGPASSWORD the server
            // inherited from the keeper's environment (exported for a user's
            // restore_command, it made every standby fail authentication). The other
            // connection settings are given, so PGUSER, PGHOST... do not apply either.
            let conninfo = format!(
                "host={} port={} user={} password='' passfile={} application_name={} \
                 sslmode=prefer",
                up.host,
                up.port,
                local.repl_user,
                local.passfile,
                slot_name(&db.uid)
            );
            params.insert("primary_conninfo".into(), quote(&conninfo));
            params.insert("primary_slot_name".into(), quote(&slot_name(&db.uid)));
        }
        (Some(FollowType::External), _) => {
            let f = follow.expect("matched Some");
            if let Some(s) = &f.standby_settings {
                if !s.primary_conninfo.is_empty() {
                    params.insert("primary_conninfo".into(), quote(&s.primary_conninfo));
                }
                if !s.primary_slot_name.is_empty() {
                    params.insert("primary_slot_name".into(), quote(&s.primary_slot_name));
                }
                if !s.recovery_min_apply_delay.is_empty() {
                    let d = quote(&s.recovery_min_apply_delay);
                    params.insert("recovery_min_apply_delay".into(), d);
                }
            }
            if let Some(a) = &f.archive_recovery_settings {
                if !a.restore_command.is_empty() {
                    params.insert("restore_command".into(), quote(&a.restore_command));
                }
            }
        }
        _ => {}
    }
    params.insert("recovery_target_timeline".into(), quote("latest"));
    (true, false)
}

/// pg_hba.conf: the keeper's own local connections, superuser and replication access (from
/// anywhere in `all` mode, from the cluster's db addresses in `strict` mode), then the
/// spec's rules (null: stolon's default md5 rules), which are left out while `restricted`.
pub fn render_hba(cd: &ClusterData, db: &Db, local: &Local, restricted: bool) -> String {
    let (su, su_auth) = (&local.su_user, local.su_auth.as_str());
    let (repl, repl_auth) = (&local.repl_user, local.repl_auth.as_str());
    let mut out = String::from("# Managed by stolon-keeper from the cluster spec.\n");
    let _ = writeln!(out, "local all {su} {su_auth}");
    let _ = writeln!(out, "local replication {repl} {repl_auth}");
    let sources: Vec<String> = match cd.cluster.spec.default_su_repl_access_mode() {
        SuReplAccessMode::All => vec!["0.0.0.0/0".into(), "::0/0".into()],
        SuReplAccessMode::Strict => {
            let mut addrs: Vec<String> = cd
                .dbs
                .values()
                .map(|d| d.status.listen_address.clone())
                .filter(|a| !a.is_empty())
                .map(|a| {
                    if a.contains(':') {
                        format!("{a}/128")
                    } else {
                        format!("{a}/32")
                    }
                })
                .collect();
            addrs.sort();
            addrs.dedup();
            addrs
        }
    };
    for src in &sources {
        let _ = writeln!(out, "host all {su} {src} {su_auth}");
        let _ = writeln!(out, "host replication {repl} {src} {repl_auth}");
    }
    if restricted {
        out.push_str("# Restricted: normal users wait until a synchronous standby is in sync.\n");
        return out;
    }
    match &db.spec.pg_hba {
        Some(rules) => {
            for r in rules {
                out.push_str(r);
                out.push('\n');
            }
        }
        None => {
            out.push_str("host all all 0.0.0.0/0 md5\n");
            out.push_str("host all all ::0/0 md5\n");
        }
    }
    out
}

/// Parses the settings of a postgresql.conf (as initdb writes it): `name = value` lines,
/// comments and blank lines ignored, quotes removed. Used to report init-time parameters.
pub fn parse_conf(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = strip_comment(line).trim().to_string();
        if line.is_empty() {
            continue;
        }
        let (k, v) = match line.split_once('=') {
            Some((k, v)) => (k.trim(), v.trim()),
            None => match line.split_once(char::is_whitespace) {
                Some((k, v)) => (k.trim(), v.trim()),
                None => continue,
            },
        };
        if k.is_empty() || k.starts_with("include") {
            continue;
        }
        let v = if v.len() >= 2 && v.starts_with('\'') && v.ends_with('\'') {
            v[1..v.len() - 1].replace("''", "'")
        } else {
            v.to_string()
        };
        out.insert(k.to_string(), v);
    }
    out
}

/// Drops a `#` comment that is not inside single quotes.
fn strip_comment(line: &str) -> &str {
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '#' if !quoted => return &line[..i],
            _ => {}
        }
    }
    line
}
