//! Standbys: every other db follows the master; invalid ones are removed (other system id,
//! forked timeline, WAL gone); free healthy keepers get a new db up to maxStandbysPerSender;
//! extra standbys are removed (failed ones first); dead keepers are removed after
//! deadKeeperRemovalInterval, never the master's.

use super::health::converged;
use super::{ReasonKind, Round};
use crate::model::{Db, DbInitMode, DbSpec};

/// The first LSN of a WAL segment file name (`TTTTTTTTXXXXXXXXYYYYYYYY`), assuming the default
/// 16 MiB segments. `None` when the name is not a WAL segment name.
pub(super) fn wal_file_start(name: &str) -> Option<u64> {
    if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
    const SEGMENT: u64 = 16 * 1024 * 1024;
    Some((log << 32) + seg * SEGMENT)
}

/// Whether `db`'s history has diverged from the master's (see `Db::forks_standby`).
pub(super) fn forked(master: &Db, db: &Db) -> bool {
    let s = &db.status;
    master.forks_standby(s.timeline_id, s.x_log_pos, &s.timelines_history)
}

impl Round<'_> {
    /// Why a standby cannot follow the master at all, if so.
    fn invalid_standby(&self, master: &Db, db: &Db) -> Option<String> {
        let (m, s) = (&master.status, &db.status);
        if !m.system_id.is_empty() && !s.system_id.is_empty() && m.system_id != s.system_id {
            return Some("different system id".into());
        }
        if forked(master, db) {
            // With pg_rewind the keeper gets convergenceTimeout to rewind it first.
            let rewind = self.cd.cluster.spec.use_pgrewind();
            let timeout = self.cd.cluster.spec.convergence_timeout();
            if !rewind || self.unconverged_for(&db.uid, timeout) {
                return Some(format!(
                    "forked from the master's timeline (it is at {}/{:X}, the master on \
                     timeline {} with history {:?})",
                    db.status.timeline_id,
                    db.status.x_log_pos,
                    master.status.timeline_id,
                    master
                        .status
                        .timelines_history
                        .iter()
                        .map(|h| format!("{}@{:X}", h.timeline_id, h.switch_point))
                        .collect::<Vec<_>>()
                ));
            }
        }
        // Go stolon's syncTimeout: a new standby (resync) that has not finished its first sync
        // within it is dropped and synced again (0, the default: no limit).
        let sync_timeout = self.cd.cluster.spec.sync_timeout();
        if sync_timeout.0 > 0
            && db.spec.init_mode == Some(DbInitMode::Resync)
            && s.current_generation == 0
            && self.unconverged_for(&db.uid, sync_timeout)
        {
            return Some(format!("not synced within syncTimeout ({sync_timeout})"));
        }
        let oldest = wal_file_start(&m.older_wal_file);
        if oldest.is_some_and(|o| s.x_log_pos > 0 && s.x_log_pos < o) && !self.db_good(&db.uid) {
            return Some("needs WAL the master no longer has".into());
        }
        None
    }

    pub(super) fn update_standbys(&mut self, master: &str) {
        let Some(master_db) = self.db(master, "update standbys").cloned() else {
            return;
        };
        let master_ok = self.db_good(master) && converged(&master_db);
        if master_ok {
            self.remove_old_masters(master);
        }
        let others: Vec<Db> = (self.cd.dbs.values())
            .filter(|db| db.uid != master && !self.cd.is_old_master(db))
            .cloned()
            .collect();
        for db in &others {
            let uid = &db.uid;
            if let Some(why) = self.invalid_standby(&master_db, db) {
                let keeper = db.spec.keeper_uid.clone();
                self.cd.dbs.remove(uid);
                self.reason(
                    ReasonKind::DbRemoved,
                    format!("db {uid} on keeper {keeper}: {why}; it will be resynced"),
                );
                continue;
            }
            let spec = self.standby_spec(&db.spec, master);
            self.set_db_spec(uid, spec);
        }
        if master_ok {
            self.add_standbys(master);
        }
        self.remove_extra_standbys(master);
        let mut followers: Vec<String> = self.standbys(master);
        followers.sort();
        let Some(mut spec) = self.db(master, "update standbys").map(|db| db.spec.clone()) else {
            return;
        };
        spec.followers = followers;
        self.set_db_spec(master, spec);
    }

    /// Standby dbs (every db but the master and old masters not removed yet).
    fn standbys(&self, master: &str) -> Vec<String> {
        self.cd
            .dbs
            .values()
            .filter(|db| db.uid != master && !self.cd.is_old_master(db))
            .map(|db| db.uid.clone())
            .collect()
    }

    /// Go stolon's rule, once the new master is healthy and converged: an old master's db is
    /// removed (it can no longer be elected back), and its keeper counts as free, so it gets a
    /// new standby db (resync: pg_rewind or a base backup) when it is alive.
    fn remove_old_masters(&mut self, master: &str) {
        let old: Vec<(String, String)> = (self.cd.dbs.values())
            .filter(|db| db.uid != master && self.cd.is_old_master(db))
            .map(|db| (db.uid.clone(), db.spec.keeper_uid.clone()))
            .collect();
        for (uid, keeper) in old {
            self.cd.dbs.remove(&uid);
            self.reason(
                ReasonKind::DbRemoved,
                format!("removing old master db {uid} on keeper {keeper}"),
            );
        }
    }

    fn wanted_standbys(&self) -> usize {
        let spec = &self.cd.cluster.spec;
        usize::from(spec.max_standbys().min(spec.max_standbys_per_sender()))
    }

    /// New standby dbs on free healthy keepers while fewer than wanted standbys are healthy.
    fn add_standbys(&mut self, master: &str) {
        let good = self
            .standbys(master)
            .iter()
            .filter(|u| !self.db_failed(u))
            .count();
        let missing = self.wanted_standbys().saturating_sub(good);
        let mut free: Vec<String> = self
            .cd
            .keepers
            .keys()
            .filter(|k| self.keeper_alive(k) && self.db_of_keeper(k).is_none())
            .cloned()
            .collect();
        free.sort_by_key(|k| self.keeper_rank(k));
        for keeper in free.into_iter().take(missing) {
            let base = DbSpec {
                keeper_uid: keeper.clone(),
                init_mode: Some(DbInitMode::Resync),
                ..Default::default()
            };
            let spec = self.standby_spec(&base, master);
            let uid = self.add_db(spec);
            self.reason(
                ReasonKind::StandbyAdded,
                format!("new standby db {uid} on keeper {keeper}"),
            );
        }
    }

    /// Removes standbys beyond the wanted count: failed ones first, then those not in the
    /// synchronous set, then the furthest behind.
    fn remove_extra_standbys(&mut self, master: &str) {
        let wanted = self.wanted_standbys();
        let mut standbys = self.standbys(master);
        if standbys.len() <= wanted {
            return;
        }
        let Some(sync) = (self.db(master, "remove extra standbys"))
            .map(|db| db.spec.synchronous_standbys.clone())
        else {
            return;
        };
        standbys.sort_by_key(|u| {
            (
                !self.db_failed(u),
                sync.contains(u),
                self.cd.dbs.get(u).map_or(0, |db| db.status.x_log_pos),
                std::cmp::Reverse(u.clone()),
            )
        });
        let extra = standbys.len() - wanted;
        for uid in standbys.into_iter().take(extra) {
            self.cd.dbs.remove(&uid);
            self.reason(
                ReasonKind::DbRemoved,
                format!("db {uid}: more standbys than maxStandbysPerSender"),
            );
        }
    }

    /// Keepers silent for deadKeeperRemovalInterval are forgotten with their dbs, except the
    /// master's keeper; and only while the master is alive: with the master gone, a dead
    /// keeper's db (an old master's, say) may hold the newest data there is and may have to
    /// be elected when it comes back.
    pub(super) fn remove_dead_keepers(&mut self, master: &str) {
        let interval = self.cd.cluster.spec.dead_keeper_removal_interval();
        let Some(mdb) = self.db(master, "remove dead keepers").cloned() else {
            return;
        };
        let master_keeper = mdb.spec.keeper_uid.clone();
        // Alive is not enough: a master keeper just restarted has a db that is not yet
        // healthy, and a dead keeper's db may still hold the newest data.
        if !self.keeper_alive(&master_keeper) || !mdb.status.healthy || !converged(&mdb) {
            return;
        }
        let dead: Vec<String> = self
            .cd
            .keepers
            .keys()
            .filter(|k| **k != master_keeper && self.keeper_silence(k) >= interval)
            .cloned()
            .collect();
        for keeper in dead {
            self.cd.keepers.remove(&keeper);
            self.cd.dbs.retain(|_, db| db.spec.keeper_uid != keeper);
            self.reason(
                ReasonKind::KeeperRemoved,
                format!("keeper {keeper} silent for deadKeeperRemovalInterval"),
            );
        }
    }
}
