//! The keepers' parts in a planned switchover that shorten its no-write gap.
//!
//! The old master, ahead of its stop: while the proxies drain its sessions, a CHECKPOINT in
//! the background, so that the shutdown checkpoint of the fast stop that follows has little
//! left to write. That stop was the longest step of the gap (up to 0.4 s in `loadtest ha`);
//! the checkpoint overlaps the drain instead. Patroni does the same before it demotes a
//! primary.
//!
//! The target, while the old master stops: its replay position, polled on a connection of
//! its own and published as soon as it moves. The sentinel promotes the target once it has
//! replayed up to the old master's shutdown checkpoint; the target's next round would
//! report that only after the sentinel's write of the stop position woke it, and after its
//! observation and actions (about 100 ms under load in `loadtest ha`, then one more store
//! write); reported as it happens, the sentinel finds both facts in the round that sees
//! the clean stop.

use crate::daemon::{Keeper, Shared};
use crate::sql::{parse_lsn, Conn};
use control::keeper::{my_db, LocalObserved, PgRole};
use control::model::{ClusterData, SwitchoverPhase, Timestamp};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The switchover request to checkpoint ahead of, if any: one draining whose old master is
/// this keeper's db, running as a primary, and not checkpointed for yet (`done`).
pub fn checkpoint_due(
    cd: &ClusterData,
    keeper_uid: &str,
    primary: bool,
    done: Option<Timestamp>,
) -> Option<Timestamp> {
    let st = cd.cluster.status.switchover.as_ref()?;
    let db = my_db(cd, keeper_uid)?;
    let due = primary
        && st.phase == SwitchoverPhase::Draining
        && st.old_master_db_uid == db.uid
        && done != Some(st.requested_at);
    due.then_some(st.requested_at)
}

/// The switchover request whose target is this keeper's db, running as a standby, while
/// the old master stops.
pub fn catch_up_due(cd: &ClusterData, keeper_uid: &str, standby: bool) -> Option<Timestamp> {
    let st = cd.cluster.status.switchover.as_ref()?;
    let db = my_db(cd, keeper_uid)?;
    let due = standby && st.phase == SwitchoverPhase::Stopping && st.target_db_uid == db.uid;
    due.then_some(st.requested_at)
}

/// How often the target polls its replay position while the old master stops.
const CATCH_UP_POLL: Duration = Duration::from_millis(5);

/// Polls the replay position of the standby `db_uid` until it is promoted, the query
/// fails or `bound` passes (the round aborts it sooner once the switchover moves on), and
/// reports each advance at once.
async fn follow_replay(conn: Conn, db_uid: String, shared: Arc<Shared>, bound: Duration) {
    let deadline = Instant::now() + bound;
    let Ok(client) = conn.connect(Duration::from_secs(2)).await else {
        return;
    };
    let mut last = 0;
    while Instant::now() < deadline {
        let q = client.query_one(
            "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text",
            &[],
        );
        let Ok(Ok(row)) = tokio::time::timeout(Duration::from_secs(2), q).await else {
            return;
        };
        if !row.get::<_, bool>(0) {
            return;
        }
        let lsn = row
            .get::<_, Option<String>>(1)
            .as_deref()
            .and_then(parse_lsn)
            .unwrap_or(0);
        if lsn > last {
            last = lsn;
            shared.report_replayed(&db_uid, lsn);
        }
        tokio::time::sleep(CATCH_UP_POLL).await;
    }
}

impl Keeper {
    /// Starts following the replay position when this keeper's db becomes a switchover's
    /// target and the old master is stopping; stops it (and forgets the position it
    /// reported) once that is no longer so.
    pub(crate) fn catch_up_for_switchover(&mut self, local: &LocalObserved) {
        let standby = local
            .running
            .as_ref()
            .is_some_and(|r| r.role == PgRole::Standby);
        let cd = self.view.cd.as_ref();
        let due = cd.and_then(|cd| catch_up_due(cd, &self.settings.uid, standby));
        if due.is_some() && due == self.instance.catch_up.as_ref().map(|(r, _)| *r) {
            return;
        }
        if let Some((_, task)) = self.instance.catch_up.take() {
            task.abort();
            *self.shared.replayed.lock().expect("lock") = None;
        }
        let (Some(request), Some(cd)) = (due, cd) else {
            return;
        };
        let Some(db_uid) = self.my_db().map(|db| db.uid.clone()) else {
            return;
        };
        tracing::debug!("switchover: following the replay position while the old master stops");
        let bound = cd.cluster.spec.convergence_timeout().as_std();
        let task = tokio::spawn(follow_replay(
            self.conn(),
            db_uid,
            self.shared.clone(),
            bound,
        ));
        self.instance.catch_up = Some((request, task.abort_handle()));
    }

    /// Starts the CHECKPOINT if one is due; never waits for it (the keeper's loop must see
    /// the order to stop at once; a stop during the checkpoint makes PostgreSQL finish it
    /// at full speed, then write the shutdown checkpoint).
    pub(crate) fn checkpoint_ahead_of_switchover(&mut self, local: &LocalObserved) {
        let Some(cd) = &self.view.cd else { return };
        let primary = local
            .running
            .as_ref()
            .is_some_and(|r| r.role == PgRole::Primary);
        let done = self.instance.switchover_checkpoint;
        let Some(request) = checkpoint_due(cd, &self.settings.uid, primary, done) else {
            return;
        };
        self.instance.switchover_checkpoint = Some(request);
        tracing::info!("switchover: checkpoint started ahead of the old master's stop");
        let conn = self.conn();
        tokio::spawn(async move {
            let start = Instant::now();
            let r = match conn.connect(Duration::from_secs(2)).await {
                Ok(client) => client
                    .batch_execute("CHECKPOINT")
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            let elapsed_ms = start.elapsed().as_millis() as u64;
            match r {
                Ok(()) => tracing::info!(elapsed_ms, "switchover: checkpoint done"),
                // Only an optimisation: the stop writes its own checkpoint anyway.
                Err(error) => {
                    tracing::debug!(elapsed_ms, %error, "switchover: checkpoint cut short")
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use control::model::{ClusterSpec, Db, SwitchoverStatus};

    fn at(secs: u32) -> Timestamp {
        serde_json::from_value(serde_json::json!(format!("2026-01-01T00:00:{secs:02}Z")))
            .expect("timestamp")
    }

    fn cluster(phase: SwitchoverPhase, old_master: &str, requested: u32) -> ClusterData {
        let mut cd = ClusterData::new("c", ClusterSpec::default(), at(0));
        for (uid, keeper) in [("d1", "k1"), ("d2", "k2")] {
            let mut db = Db {
                uid: uid.into(),
                ..Default::default()
            };
            db.spec.keeper_uid = keeper.into();
            cd.dbs.insert(uid.into(), db);
        }
        cd.cluster.status.switchover = Some(SwitchoverStatus {
            target_keeper_uid: "k2".into(),
            requested_at: at(requested),
            phase,
            old_master_db_uid: old_master.into(),
            target_db_uid: "d2".into(),
            stop_position: 0,
            started_at: at(requested),
            reason: String::new(),
        });
        cd
    }

    #[test]
    fn once_per_request_on_the_draining_old_master_only() {
        let t = at;
        let draining = cluster(SwitchoverPhase::Draining, "d1", 10);
        // (name, clusterdata, keeper, primary, done, due?)
        let cases = [
            (
                "the old master, draining",
                &draining,
                "k1",
                true,
                None,
                true,
            ),
            (
                "done for this request",
                &draining,
                "k1",
                true,
                Some(t(10)),
                false,
            ),
            (
                "done for an earlier request",
                &draining,
                "k1",
                true,
                Some(t(5)),
                true,
            ),
            (
                "not running as a primary",
                &draining,
                "k1",
                false,
                None,
                false,
            ),
            ("the target", &draining, "k2", true, None, false),
            ("a keeper with no db", &draining, "k9", true, None, false),
        ];
        for (name, cd, keeper, primary, done, due) in cases {
            assert_eq!(
                checkpoint_due(cd, keeper, primary, done).is_some(),
                due,
                "{name}"
            );
        }
        for phase in [
            SwitchoverPhase::Stopping,
            SwitchoverPhase::Completed,
            SwitchoverPhase::Failed,
        ] {
            let cd = cluster(phase, "d1", 10);
            assert_eq!(checkpoint_due(&cd, "k1", true, None), None, "{phase:?}");
        }
        let mut none = draining.clone();
        none.cluster.status.switchover = None;
        assert_eq!(
            checkpoint_due(&none, "k1", true, None),
            None,
            "no switchover"
        );
    }

    #[test]
    fn the_target_follows_its_replay_while_the_old_master_stops() {
        let stopping = cluster(SwitchoverPhase::Stopping, "d1", 10);
        // (name, clusterdata, keeper, standby, due?)
        let cases = [
            ("the target, a standby", &stopping, "k2", true, true),
            (
                "the target, not running as a standby",
                &stopping,
                "k2",
                false,
                false,
            ),
            ("the old master", &stopping, "k1", true, false),
            ("a keeper with no db", &stopping, "k9", true, false),
        ];
        for (name, cd, keeper, standby, due) in cases {
            let got = catch_up_due(cd, keeper, standby);
            assert_eq!(got.is_some(), due, "{name}");
        }
        for phase in [
            SwitchoverPhase::Draining,
            SwitchoverPhase::Completed,
            SwitchoverPhase::Failed,
        ] {
            let cd = cluster(phase, "d1", 10);
            assert_eq!(catch_up_due(&cd, "k2", true), None, "{phase:?}");
        }
        assert_eq!(catch_up_due(&stopping, "k2", true), Some(at(10)));
    }
}
