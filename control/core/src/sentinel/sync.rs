//! Synchronous replication: the master's synchronous standby set, changed in two steps so
//! that at every moment each member of the set the master reports has every acknowledged
//! commit: first the new members are added (the keeper renders `N (all members)`, so commits
//! wait for all), and only once the master reports the members to keep as synchronous
//! (streaming, caught up) are the old ones dropped.

use super::health::converged;
use super::{ReasonKind, Round};
use crate::model::{ClusterRole, DbRole, FollowType};
use std::collections::BTreeSet;

/// A standby name no server uses: while it is in the set, commits wait (fewer than
/// minSynchronousStandbys real ones are available), as stolon's `stolonfakestandby`.
pub const PLACEHOLDER_STANDBY: &str = "stolonfakestandby";

fn as_set(v: &[String]) -> BTreeSet<&str> {
    v.iter().map(String::as_str).collect()
}

impl Round<'_> {
    /// Standbys fit to be synchronous: following the master, healthy, converged, on a keeper
    /// that allows it. Best first.
    fn sync_candidates(&self, master: &str) -> Vec<String> {
        let mut out: Vec<&crate::model::Db> =
            self.cd
                .dbs
                .values()
                .filter(|db| {
                    let follows =
                        db.spec.role == Some(DbRole::Standby)
                            && db.spec.follow_config.as_ref().is_some_and(|f| {
                                f.kind == FollowType::Internal && f.dbuid == master
                            });
                    let keeper_ok = self
                        .cd
                        .keepers
                        .get(&db.spec.keeper_uid)
                        .is_some_and(|k| k.status.can_be_synchronous_replica != Some(false));
                    follows && keeper_ok && self.db_good(&db.uid) && converged(db)
                })
                .collect();
        out.sort_by(|a, b| {
            b.status.x_log_pos.cmp(&a.status.x_log_pos).then_with(|| {
                self.keeper_rank(&a.spec.keeper_uid)
                    .cmp(&self.keeper_rank(&b.spec.keeper_uid))
            })
        });
        out.into_iter().map(|db| db.uid.clone()).collect()
    }

    /// The set we want: current good members kept (stability), then the best others up to
    /// maxSynchronousStandbys; below minSynchronousStandbys, current members are kept even if
    /// unhealthy, then the placeholder blocks commits.
    fn desired_sync(&self, master: &str, current: &[String]) -> Vec<String> {
        let spec = &self.cd.cluster.spec;
        let (min, max) = (
            usize::from(spec.min_synchronous_standbys()),
            usize::from(spec.max_synchronous_standbys()),
        );
        let good = self.sync_candidates(master);
        let mut out: Vec<String> = current
            .iter()
            .filter(|u| good.contains(u))
            .take(max)
            .cloned()
            .collect();
        for u in &good {
            if out.len() >= max {
                break;
            }
            if !out.contains(u) {
                out.push(u.clone());
            }
        }
        for u in current {
            if out.len() >= min {
                break;
            }
            if u != PLACEHOLDER_STANDBY && !out.contains(u) && self.cd.dbs.contains_key(u) {
                out.push(u.clone());
            }
        }
        if out.len() < min {
            out.push(PLACEHOLDER_STANDBY.to_string());
        }
        out
    }

    pub(super) fn update_sync_standbys(&mut self, master: &str) {
        let Some(db) = self.db(master, "synchronous standbys").cloned() else {
            return;
        };
        let mut spec = db.spec.clone();
        // As Go stolon: never in a standby cluster, whose master is a cascading standby (no
        // standby can be synchronous to it, and a failover there would find none eligible).
        let standby_cluster = self.cd.cluster.spec.role() == ClusterRole::Standby;
        if !self.cd.cluster.spec.synchronous_replication() || standby_cluster {
            spec.synchronous_replication = false;
            spec.synchronous_standbys.clear();
            self.set_db_spec(master, spec);
            return;
        }
        spec.synchronous_replication = true;
        if !self.db_good(master) {
            // A failed master's set is what guards the election: changing it now would make
            // a standby "wanted" that the master never waited for.
            self.set_db_spec(master, spec);
            return;
        }
        let current = spec.synchronous_standbys.clone();
        let desired = self.desired_sync(master, &current);
        let reported = as_set(&db.status.synchronous_standbys);
        let additions: Vec<&String> = desired.iter().filter(|u| !current.contains(u)).collect();
        let next = if as_set(&desired) == as_set(&current) {
            current.clone()
        } else if current.iter().all(|u| u == PLACEHOLDER_STANDBY) {
            // No real member: nothing was acknowledged under this set (the placeholder
            // blocks every commit), so there is nothing for the two steps to protect. A new
            // master after a failover starts so: its first standby is its set at once, one
            // round trip through the master's keeper sooner (writes resume sooner).
            desired
        } else if !converged(&db) {
            self.reason(
                ReasonKind::SyncStandbysChanged,
                format!("waiting for master {master} to apply synchronous standbys {current:?}"),
            );
            current.clone()
        } else if !additions.is_empty() {
            // Step 1: add; commits now wait for the old and the new members.
            let mut union = current.clone();
            union.extend(additions.into_iter().cloned());
            union
        } else if desired
            .iter()
            .all(|u| u == PLACEHOLDER_STANDBY || reported.contains(u.as_str()))
        {
            // Step 2: the members we keep are reported in sync: drop the others.
            desired
        } else {
            self.reason(
                ReasonKind::SyncStandbysChanged,
                format!("waiting for {desired:?} to be reported in sync by master {master}"),
            );
            current.clone()
        };
        if next != current {
            self.reason(
                ReasonKind::SyncStandbysChanged,
                format!("synchronous standbys of {master}: {current:?} -> {next:?}"),
            );
        }
        spec.synchronous_standbys = next;
        self.set_db_spec(master, spec);
    }
}
