//! The keeper's plan: a pure function from what the cluster view asks of this keeper and
//! what it observes of its local PostgreSQL to the next actions. The keeper (`keeper/`)
//! runs them in order, stops at the first failure, observes again and plans again.
//!
//! Safety rules here: a master whose last acknowledged KeeperInfo write is older than the
//! fence timeout is fenced (stopped) whatever else is going on, and stays fenced until the
//! store answers again; a wiped data dir of a db that already exists never leads to initdb;
//! PostgreSQL is not started before the sentinel has seen this keeper's boot UUID.

// No panics on any clusterdata: every lookup is checked and a missing db becomes a Reason.
#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::expect_used,
        clippy::unwrap_used,
        clippy::panic
    )
)]

#[cfg(test)]
mod tests;

use crate::faults::{Fault, Faults};
use crate::model::{ClusterData, Db, DbInitMode, DbRole, FollowType, GoDuration, SwitchoverPhase};

/// What the cluster view says, as far as this keeper is concerned.
#[derive(Clone, Copy, Debug)]
pub struct KeeperView<'a> {
    pub keeper_uid: &'a str,
    /// This keeper process's boot UUID (new on every start).
    pub boot_uuid: &'a str,
    /// The last clusterdata read; `None` if there is none (or none could be read yet).
    pub cd: Option<&'a ClusterData>,
    /// Time since the SEND time of the last acknowledged KeeperInfo write (or since the
    /// keeper started, before the first).
    pub store_silence: GoDuration,
    /// Deliberate faults (tests only; `Faults::NONE` in production).
    pub faults: Faults,
    /// Failsafe mode: this keeper acknowledged a master that may still hold on it, so it
    /// must not act as a master (promote, or start a db as master) yet.
    pub promised: bool,
}

/// What the data directory holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataState {
    /// No data directory (or an empty one).
    Missing,
    /// A PostgreSQL data directory; the db UID it holds, if the keeper recorded one.
    Present { db_uid: Option<String> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PgRole {
    Primary,
    Standby,
}

/// A running PostgreSQL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Running {
    pub role: PgRole,
    /// A parameter changed that needs a restart (`pg_settings.pending_restart`).
    pub pending_restart: bool,
    /// Its timeline and WAL position (0 when unknown).
    pub timeline: u64,
    pub xlog_pos: u64,
    /// Its timeline's history file (empty on timeline 1 or when unknown).
    pub history: Vec<crate::model::TimelineHistoryEntry>,
}

/// What the keeper observes locally.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalObserved {
    pub data: DataState,
    pub running: Option<Running>,
    /// The configuration files on disk equal what the current view renders.
    pub config_current: bool,
    /// The keeper fenced its master and has not lifted the fence.
    pub fenced: bool,
    /// The data directory is a standby's (standby.signal): never promoted.
    pub standby_data: bool,
    /// This keeper stopped its PostgreSQL cleanly as a master (its shutdown checkpoint is
    /// reported) and has not started it since.
    pub clean_stop: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// A clean shutdown (checkpoint; WAL sent to connected standbys).
    Fast,
    /// At once (crash-like); for fencing.
    Immediate,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PgAction {
    /// Stop PostgreSQL at once and refuse to start it until the store answers again.
    Fence,
    /// The store answers again: lift the fence (what to run is planned as usual).
    Unfence,
    Stop(StopMode),
    /// Empty the data directory (before a new init or base backup).
    ClearData,
    InitDb,
    /// initMode pitr: run dataRestoreCommand into the data directory.
    RestorePitr,
    /// initMode existing: adopt the data directory as this db.
    TakeOverExisting,
    BaseBackup {
        from_db: String,
    },
    /// pg_rewind from the followed master; falls back to ClearData + BaseBackup.
    Rewind {
        from_db: String,
    },
    /// Render postgresql.conf, pg_hba.conf and the recovery signal files.
    WriteConfig,
    Start,
    Promote,
    Reload,
    Restart,
    /// Create the replication slots of the db spec's followers and extra slots, and drop
    /// stale `stolon_*` ones (on a standby as on a master, as Go stolon).
    SyncSlots,
    /// The db spec of this generation is applied: report it.
    Converged(i64),
    /// Refuse to act, and report why (a wiped data dir for a db that exists).
    Refuse(String),
    /// Nothing to do until something changes.
    Wait(String),
}

use PgAction::*;

/// The fence timeout: half of failInterval, so a master fences itself well before the
/// sentinel may elect another (the sentinel waits failInterval from the time it first saw
/// the last info, which is after this keeper sent it).
pub fn fence_timeout(fail_interval: GoDuration) -> GoDuration {
    GoDuration(fail_interval.0 / 2)
}

/// The master a standby db follows, if it follows one of this cluster.
pub fn followed_db(db: &Db) -> Option<&str> {
    let f = db.spec.follow_config.as_ref()?;
    (f.kind == FollowType::Internal && !f.dbuid.is_empty()).then_some(f.dbuid.as_str())
}

/// The db this keeper hosts in the view.
pub fn my_db<'a>(cd: &'a ClusterData, keeper_uid: &str) -> Option<&'a Db> {
    cd.dbs.values().find(|db| db.spec.keeper_uid == keeper_uid)
}

/// The next actions for this keeper.
pub fn plan(view: &KeeperView<'_>, local: &LocalObserved) -> Vec<PgAction> {
    let fail_interval = view
        .cd
        .map(|cd| cd.cluster.spec.fail_interval())
        .unwrap_or(crate::model::defaults::FAIL_INTERVAL);
    let silent = view.store_silence >= fence_timeout(fail_interval);
    let mut out = Vec::new();
    if silent && local.running.is_some() && !local.fenced && !view.faults.has(Fault::NoSelfFencing)
    {
        // The store may already have elected another master: no writes here, whoever asks.
        let primary = local
            .running
            .as_ref()
            .is_some_and(|r| r.role == PgRole::Primary);
        if primary {
            return vec![Fence];
        }
    }
    if local.fenced {
        if silent {
            return vec![Wait("fenced: no store contact".into())];
        }
        out.push(Unfence);
    }
    let Some(cd) = view.cd else {
        out.push(Wait("no clusterdata".into()));
        return out;
    };
    let seen = cd
        .keepers
        .get(view.keeper_uid)
        .is_some_and(|k| k.status.boot_uuid == view.boot_uuid);
    let Some(db) = my_db(cd, view.keeper_uid) else {
        if local.running.is_some() {
            out.push(Stop(StopMode::Fast));
        } else {
            out.push(Wait("no db assigned to this keeper".into()));
        }
        return out;
    };
    let holds_db = local.data
        == DataState::Present {
            db_uid: Some(db.uid.clone()),
        };
    let steps = if holds_db && cd.is_old_master(db) {
        plan_old_master(local)
    } else if holds_db {
        plan_same_db(cd, db, local)
    } else {
        plan_new_data(db, local)
    };
    for step in steps {
        // PostgreSQL is not started before the sentinel has seen this keeper's boot: until
        // then a stale view could still name it master.
        // A keeper that acknowledged another master in failsafe mode stays out of the
        // master's role until that promise ends (docs/design.md "Failsafe mode").
        let as_master = matches!(step, Promote) || (matches!(step, Start) && db.acts_as_master());
        if as_master && view.promised {
            out.push(Wait(
                "failsafe: this keeper acknowledged another master that may still hold; promoting once that promise ends".into(),
            ));
            return out;
        }
        if matches!(step, Start | Promote) && !seen {
            out.push(Wait(
                "the sentinel has not seen this keeper's boot yet".into(),
            ));
            return out;
        }
        let stop_here = matches!(step, Refuse(_) | Wait(_));
        out.push(step);
        if stop_here {
            return out;
        }
    }
    // Its followers' and the spec's slots, whatever its role (a standby cluster's master is
    // in recovery); stale stolon_ ones dropped.
    out.push(SyncSlots);
    out.push(Converged(db.generation));
    out
}

/// The data directory does not hold this db: create it (init, restore, base backup) or
/// refuse.
fn plan_new_data(db: &Db, local: &LocalObserved) -> Vec<PgAction> {
    let mut out = Vec::new();
    if local.running.is_some() {
        out.push(Stop(StopMode::Fast));
    }
    let present = matches!(local.data, DataState::Present { .. });
    let mut init_mode = db.spec.init_mode.unwrap_or(DbInitMode::None);
    if !db.acts_as_master() && followed_db(db).is_some() {
        // A standby is always made from its master, whatever init mode is left in its spec:
        // initdb would make a different database.
        init_mode = DbInitMode::Resync;
    }
    match init_mode {
        DbInitMode::New | DbInitMode::Pitr => {
            if present {
                out.push(ClearData);
            }
            out.push(if init_mode == DbInitMode::New {
                InitDb
            } else {
                RestorePitr
            });
        }
        DbInitMode::Existing => {
            if !present {
                return vec![Refuse(
                    "initMode existing but the data directory is missing".into(),
                )];
            }
            out.push(TakeOverExisting);
        }
        DbInitMode::Resync | DbInitMode::None => {
            let Some(master) = followed_db(db) else {
                return vec![Refuse(format!(
                    "the data directory does not hold db {} and it exists already: \
                     refusing to initialise a new one (was it wiped?)",
                    db.uid
                ))];
            };
            if present && db.spec.use_pgrewind {
                out.push(Rewind {
                    from_db: master.to_string(),
                });
            } else {
                if present {
                    out.push(ClearData);
                }
                out.push(BaseBackup {
                    from_db: master.to_string(),
                });
            }
        }
    }
    out.push(WriteConfig);
    out.push(Start);
    out
}

/// This db was master and another was elected (see `ClusterData::is_old_master`): until the
/// sentinel replaces it, it runs read-only, a standby of nobody (`config::render` writes it
/// so), never a primary. It cannot take a write a client made directly, and it can still be
/// elected back if its replacement never converges. (A Go keeper runs it as a primary.)
fn plan_old_master(local: &LocalObserved) -> Vec<PgAction> {
    match &local.running {
        Some(r) if r.role == PgRole::Primary => {
            vec![Stop(StopMode::Fast), WriteConfig, Start]
        }
        Some(_) if !local.config_current => vec![WriteConfig, Reload],
        Some(_) => Vec::new(),
        None => vec![WriteConfig, Start],
    }
}

/// A switchover from this db to `from` has not reached the proxies yet: `from` is being
/// promoted, or promoted and not routed.
fn switchover_promoting(cd: &ClusterData, db: &Db, from: &str) -> bool {
    let Some(st) = cd.cluster.status.switchover.as_ref() else {
        return false;
    };
    st.old_master_db_uid == db.uid
        && st.target_db_uid == from
        && st.phase != SwitchoverPhase::Failed
        && cd.proxy.spec.master_db_uid != from
}

/// Makes this db's data a copy of `from`'s: pg_rewind if the spec allows, else a new base
/// backup.
fn resync(db: &Db, from: String) -> Vec<PgAction> {
    if db.spec.use_pgrewind {
        vec![Rewind { from_db: from }]
    } else {
        vec![ClearData, BaseBackup { from_db: from }]
    }
}

/// Whether the running standby's history diverged from the db it follows.
fn forked_from_followed(cd: &ClusterData, db: &Db, r: &Running) -> bool {
    followed_db(db)
        .and_then(|m| cd.dbs.get(m))
        .is_some_and(|m| m.forks_standby(r.timeline, r.xlog_pos, &r.history))
}

/// The data directory holds this db: bring the running instance to the wanted role and
/// configuration.
fn plan_same_db(cd: &ClusterData, db: &Db, local: &LocalObserved) -> Vec<PgAction> {
    let mut out = Vec::new();
    let master = db.acts_as_master();
    let auto_restart = cd.cluster.spec.automatic_pg_restart();
    match (&local.running, master) {
        (None, true) if local.standby_data && db.spec.role == Some(DbRole::Master) => {
            // Elected while down (or it died before its promotion): start it as the standby
            // its data is and promote it, so it gets a new timeline. Started as a primary
            // straight away it would go on writing the old timeline, and another copy of
            // that timeline (the old master's) would no longer look forked.
            out.push(Start);
            out.push(Promote);
            out.push(WriteConfig);
            out.push(Reload);
        }
        (None, false) if !local.standby_data && followed_db(db).is_some() => {
            // A master's data that must now follow another db: resynced. After a clean
            // stop (a switchover) only once the proxies route to the new master: until then
            // it is being promoted, a base backup from it fails when the promotion lands
            // ("the standby was promoted during online backup"), and it takes the new
            // master's CPU and disk in the very window in which no one can write.
            let from = followed_db(db).unwrap_or_default().to_string();
            if local.clean_stop && switchover_promoting(cd, db, &from) {
                out.push(Wait(format!(
                    "the resync from {from} waits until the proxies route to it"
                )));
                return out;
            }
            out.extend(resync(db, from));
            out.push(WriteConfig);
            out.push(Start);
        }
        (None, _) => {
            out.push(WriteConfig);
            out.push(Start);
        }
        (Some(r), true)
            if r.role == PgRole::Standby && db.spec.init_mode == Some(DbInitMode::Pitr) =>
        {
            // Point-in-time recovery promotes by itself at its target.
            out.push(Wait("point-in-time recovery in progress".into()));
        }
        (Some(r), true) if r.role == PgRole::Standby && db.spec.role == Some(DbRole::Master) => {
            // Promote first: PostgreSQL removes standby.signal itself and fails (crashes
            // the promotion) if it is already gone. Then the master's configuration.
            out.push(Promote);
            out.push(WriteConfig);
            out.push(Reload);
        }
        (Some(r), false) if r.role == PgRole::Primary => {
            // An old master turned standby may have WAL the new master lacks: stopped here,
            // resynced by a later round (above), which knows how the stop went.
            out.push(Stop(StopMode::Fast));
            out.push(Wait("stopped as a master: resynced once stopped".into()));
        }
        (Some(r), false) if forked_from_followed(cd, db, r) => {
            // A standby that was ahead of the one elected, or an old master that crashed and
            // came back as a standby (PostgreSQL then waits forever for WAL at the fork).
            let from = followed_db(db).unwrap_or_default().to_string();
            out.push(Stop(StopMode::Fast));
            out.extend(resync(db, from));
            out.push(WriteConfig);
            out.push(Start);
        }
        (Some(r), _) => {
            if !local.config_current {
                // Includes following a new master: primary_conninfo reloads without a
                // restart on PostgreSQL 13 and later.
                out.push(WriteConfig);
                out.push(Reload);
            }
            if r.pending_restart && auto_restart {
                out.push(Restart);
            }
        }
    }
    out
}
