//! Health from observations: when each info last changed, which keepers and dbs are alive,
//! which have failed (unhealthy for failInterval), which have not converged.

use super::{ReasonKind, Round, Seen};
use crate::model::{Db, GoDuration, Keeper, KeeperStatus, Timestamp};
use std::collections::BTreeMap;

/// Records when each info's infoUID changed. Components in clusterdata without any info are
/// given a first-look time so they fail after failInterval, not at once.
fn observe_infos<'i>(
    seen: &mut BTreeMap<String, Seen>,
    infos: impl Iterator<Item = (&'i String, &'i str)>,
    known: impl Iterator<Item = &'i String>,
    now: Timestamp,
) {
    for (uid, info_uid) in infos {
        let changed = seen.get(uid).is_none_or(|s| s.info_uid != info_uid);
        if changed {
            seen.insert(
                uid.clone(),
                Seen {
                    info_uid: info_uid.to_string(),
                    since: now,
                },
            );
        }
    }
    for uid in known {
        seen.entry(uid.clone()).or_insert_with(|| Seen {
            info_uid: String::new(),
            since: now,
        });
    }
}

impl Round<'_> {
    pub(super) fn observe(&mut self) {
        let cluster_uid = self.cd.cluster.uid.clone();
        let keepers = self
            .obs
            .keepers
            .iter()
            .filter(|(_, i)| i.cluster_uid.is_empty() || i.cluster_uid == cluster_uid)
            .map(|(uid, i)| (uid, i.info_uid.as_str()));
        observe_infos(
            &mut self.mem.keepers,
            keepers,
            self.cd.keepers.keys(),
            self.now,
        );
        let proxies = self
            .obs
            .proxies
            .iter()
            .map(|(uid, i)| (uid, i.info_uid.as_str()));
        observe_infos(&mut self.mem.proxies, proxies, std::iter::empty(), self.now);
    }

    /// Drops memory of keepers, proxies and dbs that no longer exist anywhere.
    pub(super) fn forget_gone(&mut self) {
        let (cd, obs) = (&self.cd, self.obs);
        self.mem
            .keepers
            .retain(|uid, _| cd.keepers.contains_key(uid) || obs.keepers.contains_key(uid));
        self.mem
            .proxies
            .retain(|uid, _| obs.proxies.contains_key(uid));
        self.mem
            .db_last_good
            .retain(|uid, _| cd.dbs.contains_key(uid));
        self.mem
            .unconverged_since
            .retain(|uid, _| cd.dbs.contains_key(uid));
    }

    /// How long since this keeper's info last changed.
    pub(super) fn keeper_silence(&self, uid: &str) -> GoDuration {
        self.mem
            .keepers
            .get(uid)
            .map_or(GoDuration(i64::MAX), |s| self.elapsed(s.since))
    }

    /// A keeper is alive while its info changed within failInterval and it is not forced to
    /// fail this round.
    pub(super) fn keeper_alive(&self, uid: &str) -> bool {
        let forced = self
            .cd
            .keepers
            .get(uid)
            .is_some_and(|k| k.status.force_fail);
        !forced && self.keeper_silence(uid) < self.fail_interval()
    }

    fn keeper_priority(&self, uid: &str) -> i32 {
        self.obs.keepers.get(uid).map_or(0, |i| i.priority)
    }

    /// Sort key preferring higher priority, then the lower UID (deterministic).
    pub(super) fn keeper_rank(&self, uid: &str) -> (std::cmp::Reverse<i32>, String) {
        (
            std::cmp::Reverse(self.keeper_priority(uid)),
            uid.to_string(),
        )
    }

    /// Adds keepers that published an info and refreshes every keeper's status.
    pub(super) fn update_keepers(&mut self) {
        let cluster_uid = self.cd.cluster.uid.clone();
        for (uid, info) in &self.obs.keepers {
            // A removed dead keeper's info may outlive it (its lease): only a changing info
            // brings a keeper (back) in.
            let stale = self.mem.keepers.contains_key(uid) && !self.keeper_alive(uid);
            if self.cd.keepers.contains_key(uid)
                || stale
                || !(info.cluster_uid.is_empty() || info.cluster_uid == cluster_uid)
            {
                continue;
            }
            self.cd.keepers.insert(
                uid.clone(),
                Keeper {
                    uid: uid.clone(),
                    generation: 1,
                    change_time: Some(self.now),
                    ..Default::default()
                },
            );
            self.reason(ReasonKind::KeeperAdded, format!("keeper {uid} appeared"));
        }
        let uids: Vec<String> = self.cd.keepers.keys().cloned().collect();
        for uid in uids {
            let alive = self.keeper_alive(&uid);
            let since = self.mem.keepers.get(&uid).map(|s| s.since);
            let info = self.obs.keepers.get(&uid);
            let Some(keeper) = self.cd.keepers.get_mut(&uid) else {
                continue;
            };
            let status: &mut KeeperStatus = &mut keeper.status;
            if alive && (!status.healthy || status.last_healthy_time.is_none()) {
                status.last_healthy_time = Some(self.now);
            } else if !alive && status.healthy {
                status.last_healthy_time = since;
            }
            status.healthy = alive;
            if let Some(info) = info {
                status.boot_uuid = info.boot_uuid.clone();
                status.postgres_binary_version = info.postgres_binary_version.clone();
                status.can_be_master = info.can_be_master;
                status.can_be_synchronous_replica = info.can_be_synchronous_replica;
                status.failsafe_address = info.failsafe_address.clone();
            }
        }
    }

    /// Copies each db's reported PostgreSQL state into its status and judges its health.
    pub(super) fn update_dbs(&mut self) {
        let dbs: Vec<(String, String)> = (self.cd.dbs.iter())
            .map(|(uid, db)| (uid.clone(), db.spec.keeper_uid.clone()))
            .collect();
        for (uid, keeper_uid) in dbs {
            let alive = self.keeper_alive(&keeper_uid);
            let info_since = self.mem.keepers.get(&keeper_uid).map(|s| s.since);
            let state = self
                .obs
                .keepers
                .get(&keeper_uid)
                .and_then(|i| i.postgres_state.as_ref())
                .filter(|ps| ps.uid == uid);
            let good = alive && state.is_some_and(|ps| ps.healthy);
            let Some(db) = self.cd.dbs.get_mut(&uid) else {
                continue;
            };
            // A PostgreSQL that is not running reports nothing useful (a wiped or stopped
            // instance says timeline 0): keep the last known facts, which elections and
            // fork checks compare against.
            if let Some(ps) = state.filter(|ps| !ps.healthy) {
                if !ps.listen_address.is_empty() {
                    db.status.listen_address = ps.listen_address.clone();
                    db.status.port = ps.port;
                }
            }
            // Failsafe mode: the master's keeper reports the dbs of the clusterdata it holds.
            let reported_dbs = (self.obs.keepers.get(&keeper_uid))
                .and_then(|i| i.failsafe.as_ref())
                .map(|f| f.dbs.clone())
                .filter(|d| !d.is_empty());
            if !self.cd.cluster.spec.failsafe_mode() {
                db.status.failsafe_dbs.clear();
            } else if let (Some(dbs), true) = (reported_dbs, alive) {
                db.status.failsafe_dbs = dbs;
            }
            if let Some(ps) = state.filter(|ps| ps.healthy) {
                let st = &mut db.status;
                st.current_generation = ps.generation;
                st.listen_address = ps.listen_address.clone();
                st.port = ps.port;
                st.system_id = ps.system_id.clone();
                st.timeline_id = ps.timeline_id;
                st.x_log_pos = ps.x_log_pos;
                st.timelines_history = ps.timelines_history.clone();
                st.pg_parameters = ps.pg_parameters.clone();
                st.synchronous_standbys = ps.synchronous_standbys.clone();
                st.older_wal_file = ps.older_wal_file.clone();
            }
            db.status.healthy = good;
            let now = self.now;
            match (good, info_since) {
                (true, Some(since)) => {
                    self.mem.db_last_good.insert(uid.clone(), since);
                }
                _ => {
                    self.mem.db_last_good.entry(uid.clone()).or_insert(now);
                }
            }
            self.track_convergence(&uid);
        }
    }

    fn track_convergence(&mut self, uid: &str) {
        let Some(db) = self.cd.dbs.get(uid) else {
            return;
        };
        if converged(db) {
            self.mem.unconverged_since.remove(uid);
            return;
        }
        let generation = db.generation;
        let now = self.now;
        let entry = self
            .mem
            .unconverged_since
            .entry(uid.to_string())
            .or_insert((generation, now));
        if entry.0 != generation {
            *entry = (generation, now);
        }
    }

    /// A db has failed when it was not seen healthy for failInterval, or its keeper is forced
    /// to fail this round.
    pub(super) fn db_failed(&self, uid: &str) -> bool {
        let Some(db) = self.cd.dbs.get(uid) else {
            return true;
        };
        let forced = self
            .cd
            .keepers
            .get(&db.spec.keeper_uid)
            .is_none_or(|k| k.status.force_fail);
        let last_good = self.mem.db_last_good.get(uid).copied().unwrap_or(self.now);
        forced || self.elapsed(last_good) >= self.fail_interval()
    }

    /// Healthy now (fresh info reporting a healthy PostgreSQL for this db) and not failed.
    pub(super) fn db_good(&self, uid: &str) -> bool {
        self.cd.dbs.get(uid).is_some_and(|db| db.status.healthy) && !self.db_failed(uid)
    }

    /// True once a db has not converged to its current generation for `timeout`.
    pub(super) fn unconverged_for(&self, uid: &str, timeout: GoDuration) -> bool {
        self.mem
            .unconverged_since
            .get(uid)
            .is_some_and(|(_, since)| self.elapsed(*since) >= timeout)
    }

    /// forceFail acts for exactly one round.
    pub(super) fn consume_force_fail(&mut self) {
        for keeper in self.cd.keepers.values_mut() {
            keeper.status.force_fail = false;
        }
    }
}

/// The keeper reported the db's current generation: it has applied the spec.
pub(super) fn converged(db: &Db) -> bool {
    db.status.current_generation == db.generation
}
