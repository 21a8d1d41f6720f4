//! The old master's part in a planned switchover ahead of its stop: while the proxies
//! drain its sessions, a CHECKPOINT in the background, so that the shutdown checkpoint of
//! the fast stop that follows has little left to write. That stop was the longest step of
//! a switchover's no-write gap (up to 0.4 s in `loadtest ha`); the checkpoint overlaps the
//! drain instead. Patroni does the same before it demotes a primary.

use crate::daemon::Keeper;
use control::keeper::{my_db, LocalObserved, PgRole};
use control::model::{ClusterData, SwitchoverPhase, Timestamp};
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

impl Keeper {
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
}
