//! Phase normal: detect a failed master, elect the best standby, and keep the master's spec
//! in line with the cluster spec.

use super::health::converged;
use super::{ReasonKind, Round};
use crate::faults::Fault;
use crate::model::{ClusterRole, Db, DbRole, DbSpec, FollowConfig, FollowType};

impl Round<'_> {
    pub(super) fn normal(&mut self) {
        self.update_proxies_enabled();
        if self.paused().is_some() {
            self.paused_round();
            return;
        }
        if self.switchover_step() {
            return;
        }
        let master = self.cd.cluster.status.master.clone();
        if let Some(why) = self.master_failure(&master) {
            self.reason(ReasonKind::MasterFailed, format!("master {master}: {why}"));
            match self.candidates(&master).first().cloned() {
                Some(new) if self.promised(&new) => {
                    // Failsafe mode: it acknowledged the old master, and promotes only once
                    // that promise ends; named now, it would wait as master-elect meanwhile.
                    self.reason(
                        ReasonKind::NoEligibleStandby,
                        format!("failsafe: the best candidate {new} acknowledged master {master}; electing once its promise ends"),
                    );
                }
                Some(new) => self.failover(&master, &new),
                None => {
                    let why = self.no_candidate_reason(&master);
                    self.reason(ReasonKind::NoEligibleStandby, why);
                }
            }
        }
        let master = self.cd.cluster.status.master.clone();
        if !self.cd.dbs.contains_key(&master) {
            return;
        }
        self.update_master_spec(&master);
        self.remove_dead_keepers(&master);
        self.update_standbys(&master);
        self.update_sync_standbys(&master);
        self.publish_master(&master);
    }

    /// A round under a maintenance pause: health is observed (done before) and reported, the
    /// proxies keep routing to the master they have (a fencing handshake under way is still
    /// completed, so a pause never leaves clients without the master already chosen), and
    /// nothing else changes: no failover, no switchover, no standby rebuilt, no keeper removed.
    fn paused_round(&mut self) {
        let pause = self.paused().cloned();
        let master = self.cd.cluster.status.master.clone();
        let mut detail = match pause.as_ref().and_then(|p| p.until) {
            Some(until) => format!("paused until {until}"),
            None => "paused until `stolonctl resume`".to_string(),
        };
        if let Some(reason) = pause.map(|p| p.reason).filter(|r| !r.is_empty()) {
            detail.push_str(&format!(" ({reason})"));
        }
        if let Some(why) = self.master_failure(&master) {
            detail.push_str(&format!(
                ": master {master} {why}, no failover while paused"
            ));
        }
        self.reason(ReasonKind::Paused, detail);
        if self.cd.dbs.contains_key(&master) {
            self.publish_master(&master);
        }
    }

    /// Why the master counts as failed, if it does.
    fn master_failure(&self, master: &str) -> Option<String> {
        let Some(db) = self.cd.dbs.get(master) else {
            return Some("no such db".into());
        };
        if self.db_failed(master) {
            return Some(format!(
                "unhealthy for failInterval (keeper {})",
                db.spec.keeper_uid
            ));
        }
        let timeout = self.cd.cluster.spec.convergence_timeout();
        if self.unconverged_for(master, timeout) {
            return Some("not converged within convergenceTimeout".into());
        }
        None
    }

    /// Standbys that may become master, best first: healthy, converged, same system id, on
    /// the master's timeline, keeper allowed to be master; async: lag <= maxStandbyLag;
    /// sync: in the master's reported in-sync set and in its spec's set. Ordered by the
    /// highest WAL position, then keeper priority, then UID.
    pub(super) fn candidates(&self, master: &str) -> Vec<String> {
        let Some(m) = self.cd.dbs.get(master) else {
            return Vec::new();
        };
        let mut out: Vec<&Db> = self
            .cd
            .dbs
            .values()
            .filter(|db| db.uid != master && self.eligible(m, db).is_ok())
            .collect();
        let lowest_first = self.faults.has(Fault::LowestWal);
        out.sort_by(|a, b| {
            let by_wal = b.status.x_log_pos.cmp(&a.status.x_log_pos);
            let by_wal = if lowest_first {
                by_wal.reverse()
            } else {
                by_wal
            };
            by_wal.then_with(|| {
                self.keeper_rank(&a.spec.keeper_uid)
                    .cmp(&self.keeper_rank(&b.spec.keeper_uid))
            })
        });
        out.into_iter().map(|db| db.uid.clone()).collect()
    }

    /// Failsafe mode: the keeper of `db` reported, in an info the sentinel first saw at
    /// `since`, that it stays out of the master's role for `promised_for_ms` from then.
    fn promised(&self, db: &str) -> bool {
        let Some(keeper) = self.cd.dbs.get(db).map(|d| d.spec.keeper_uid.as_str()) else {
            return false;
        };
        let report = (self.obs.keepers.get(keeper)).and_then(|i| i.failsafe.as_ref());
        let since = self.mem.keepers.get(keeper).map(|s| s.since);
        match (report, since) {
            (Some(r), Some(since))
                if r.promised_for_ms > 0 && self.cd.cluster.spec.failsafe_mode() =>
            {
                self.elapsed(since)
                    < crate::model::GoDuration::from_millis(r.promised_for_ms as i64)
            }
            _ => false,
        }
    }

    /// Whether `db` may replace master `m`, or why not.
    pub(super) fn eligible(&self, m: &Db, db: &Db) -> Result<(), &'static str> {
        let keeper = self.cd.keepers.get(&db.spec.keeper_uid);
        // An old master whose replacement never converged may be elected back (its keeper
        // runs it read-only meanwhile).
        if db.spec.role != Some(DbRole::Standby) && !self.cd.is_old_master(db) {
            return Err("not a standby");
        }
        if !self.db_good(&db.uid) {
            return Err("unhealthy");
        }
        if !converged(db) {
            return Err("not converged");
        }
        if keeper.is_none_or(|k| k.status.can_be_master == Some(false)) {
            return Err("keeper cannot be master");
        }
        let listed = &m.status.failsafe_dbs;
        if self.cd.cluster.spec.failsafe_mode() && !listed.is_empty() && !listed.contains(&db.uid) {
            // The master may hold on acknowledgements of the keepers of the clusterdata it
            // last reported: a db outside it was never asked (docs/design.md rule 4).
            return Err("failsafe: not in the clusterdata the master last reported");
        }
        if !m.status.system_id.is_empty() && db.status.system_id != m.status.system_id {
            return Err("different system id");
        }
        if db.status.timeline_id != m.status.timeline_id {
            return Err("not on the master's timeline");
        }
        if m.spec.synchronous_replication && !self.faults.has(Fault::IgnoreSyncSet) {
            let reported = m.status.synchronous_standbys.contains(&db.uid);
            let wanted = m.spec.synchronous_standbys.contains(&db.uid);
            if !(reported && wanted) {
                return Err("not in the synchronous standby set");
            }
        } else {
            let lag = m.status.x_log_pos.saturating_sub(db.status.x_log_pos);
            if lag > u64::from(self.cd.cluster.spec.max_standby_lag()) {
                return Err("lags more than maxStandbyLag");
            }
        }
        Ok(())
    }

    fn no_candidate_reason(&self, master: &str) -> String {
        let Some(m) = self.cd.dbs.get(master) else {
            return "the master db is gone and no standby is known".into();
        };
        let why: Vec<String> = self
            .cd
            .dbs
            .values()
            .filter(|db| db.uid != master)
            .map(|db| format!("{}: {}", db.uid, self.eligible(m, db).err().unwrap_or("?")))
            .collect();
        if why.is_empty() {
            "no standby exists".into()
        } else {
            format!("no eligible standby ({})", why.join(", "))
        }
    }

    /// Makes `new` the master. The proxies are fenced in the same write: masterDbUid is
    /// emptied and the generation bumped, and `publish_master` names the new master only once
    /// every enabled proxy has acknowledged.
    pub(super) fn failover(&mut self, old: &str, new: &str) {
        let Some(pos) = self.db(new, "failover").map(|db| db.status.x_log_pos) else {
            return;
        };
        self.reason(
            ReasonKind::Failover,
            format!("electing {new} (WAL position {pos}) to replace {old}"),
        );
        let old_sync = self
            .cd
            .dbs
            .get(old)
            .map(|db| db.spec.synchronous_standbys.clone())
            .unwrap_or_default();
        self.promote(new);
        // As Go stolon: the old master's db keeps its role and loses its followers; it is
        // removed once the new master is healthy and converged (`update_standbys`), and its
        // keeper, when alive, gets a new standby db. Rewritten into a standby of the new
        // master it would make the new master keep a replication slot (and WAL) for it while
        // it is gone, and a Go keeper cannot turn a master into a standby.
        if let Some(db) = self.cd.dbs.get(old) {
            let mut spec = db.spec.clone();
            spec.followers.clear();
            self.set_db_spec(old, spec);
        }
        // Keep the old in-sync set (minus the new master) so that commits on the new master
        // keep waiting for a standby that has everything.
        let Some(mut spec) = self.db(new, "failover").map(|db| db.spec.clone()) else {
            return;
        };
        spec.synchronous_standbys = old_sync.into_iter().filter(|u| u != new).collect();
        self.set_db_spec(new, spec);
        if self.faults.has(Fault::SkipProxyHandshake) {
            self.cd.proxy.spec.master_db_uid = new.to_string();
        }
    }

    /// Names `new` master in the cluster status and its spec, and fences the proxies.
    pub(super) fn promote(&mut self, new: &str) {
        self.fence_proxies();
        self.promote_fenced(new);
    }

    /// Promotes `new` when the proxies are fenced already (no route, every enabled proxy
    /// at the current generation, the target out of every read-only pool): a switchover's
    /// drain did it, and a generation of its own would cost another round of
    /// acknowledgements from every proxy before the new master is published.
    pub(super) fn promote_fenced(&mut self, new: &str) {
        self.cd.cluster.status.master = new.to_string();
        let Some(db) = self.db(new, "promote").cloned() else {
            return;
        };
        let mut spec = db.spec.clone();
        self.apply_master_role(&mut spec);
        self.set_db_spec(new, spec);
        if let Some(db) = self
            .cd
            .dbs
            .get_mut(new)
            .filter(|d| d.generation == db.generation)
        {
            // An old master elected back has the spec it had: a new generation all the same,
            // so it counts as converged only once its keeper has promoted it (it ran
            // read-only meanwhile).
            db.generation += 1;
            db.change_time = Some(self.now);
        }
    }

    fn apply_master_role(&self, spec: &mut DbSpec) {
        if self.cd.cluster.spec.role() == ClusterRole::Standby {
            spec.role = Some(DbRole::Standby);
            spec.follow_config = Some(self.external_follow_config());
        } else {
            spec.role = Some(DbRole::Master);
            spec.follow_config = None;
        }
    }

    /// A standby's spec following `master`.
    pub(super) fn standby_spec(&self, base: &DbSpec, master: &str) -> DbSpec {
        let mut spec = self.managed_spec(base);
        spec.role = Some(DbRole::Standby);
        spec.follow_config = Some(FollowConfig {
            kind: FollowType::Internal,
            dbuid: master.to_string(),
            standby_settings: None,
            archive_recovery_settings: None,
        });
        spec.followers.clear();
        spec.synchronous_replication = false;
        spec.synchronous_standbys.clear();
        spec.additional_replication_slots.clear();
        spec
    }

    fn update_master_spec(&mut self, master: &str) {
        let Some(spec) = self.db(master, "master spec").map(|db| db.spec.clone()) else {
            return;
        };
        let mut spec = self.managed_spec(&spec);
        self.apply_master_role(&mut spec);
        spec.additional_replication_slots = self
            .cd
            .cluster
            .spec
            .additional_master_replication_slots
            .clone();
        self.set_db_spec(master, spec);
    }
}
