//! A planned switchover requested through `P/switchover`: fence the proxies with the drain
//! hint and wait until they report the new generation (they close the old master's
//! sessions at transaction boundaries first, up to their drain timeout) or proxyTimeout
//! passes; then turn the old master into a standby of the target (its keeper stops it
//! cleanly, so every WAL record is sent); once the old master reports its final position
//! (the shutdown checkpoint, reported right after the stop; from a Go keeper, its position
//! once it rejoined) and the target has replayed up to it, promote the target: in the
//! drain's generation when every proxy reported it with the target out of its read-only pool
//! (`ProxyInfo::target_out_at_drain`), so the new master is published without a second round
//! of acknowledgements from every proxy. Progress is kept in `cluster.status.switchover`; the
//! daemon deletes the request once it is completed or failed. A switchover that does not
//! finish within convergenceTimeout is abandoned and the old master restored.

use super::health::converged;
use super::{ReasonKind, Round};
use crate::model::{Db, SwitchoverPhase, SwitchoverRequest, SwitchoverStatus};

impl Round<'_> {
    /// Runs the switchover state machine; true while one is in progress (the rest of the
    /// normal round must then wait).
    pub(super) fn switchover_step(&mut self) -> bool {
        if let Some(req) = self.obs.switchover.clone() {
            let answered = self.cd.cluster.status.switchover.as_ref().is_some_and(|s| {
                s.requested_at == req.requested_at && s.target_keeper_uid == req.target_keeper_uid
            });
            if !answered {
                self.start_switchover(&req);
            }
        }
        match self.cd.cluster.status.switchover.clone() {
            Some(st) if st.phase == SwitchoverPhase::Draining => self.continue_draining(st),
            Some(st) if st.phase == SwitchoverPhase::Stopping => self.continue_switchover(st),
            _ => false,
        }
    }

    fn switchover_refusal(&self, req: &SwitchoverRequest) -> Result<(String, String), String> {
        let master = self.cd.cluster.status.master.clone();
        let m = self.cd.dbs.get(&master).ok_or("there is no master")?;
        if !(self.db_good(&master) && converged(m)) {
            return Err("the master is not healthy and converged".into());
        }
        let target = self
            .db_of_keeper(&req.target_keeper_uid)
            .ok_or_else(|| format!("keeper {} has no db", req.target_keeper_uid))?;
        if target.uid == master {
            return Err(format!(
                "keeper {} is already master",
                req.target_keeper_uid
            ));
        }
        match self.eligible(m, target) {
            // It will catch up before promotion: lag does not matter for a planned switch.
            Ok(()) | Err("lags more than maxStandbyLag") => Ok((master, target.uid.clone())),
            Err(why) => Err(format!("target db {} is not eligible: {why}", target.uid)),
        }
    }

    fn start_switchover(&mut self, req: &SwitchoverRequest) {
        let mut status = SwitchoverStatus {
            target_keeper_uid: req.target_keeper_uid.clone(),
            requested_at: req.requested_at,
            phase: SwitchoverPhase::Draining,
            old_master_db_uid: String::new(),
            target_db_uid: String::new(),
            stop_position: 0,
            started_at: self.now,
            reason: String::new(),
        };
        match self.switchover_refusal(req) {
            Err(why) => {
                status.phase = SwitchoverPhase::Failed;
                status.reason = why.clone();
                self.reason(ReasonKind::Switchover, format!("switchover refused: {why}"));
            }
            Ok((master, target)) => {
                self.fence_proxies_draining();
                self.reason(
                    ReasonKind::Switchover,
                    format!("switchover {master} -> {target}: proxies draining"),
                );
                status.old_master_db_uid = master;
                status.target_db_uid = target;
            }
        }
        self.cd.cluster.status.switchover = Some(status);
    }

    /// Waits until every enabled proxy reported the drain's generation (each has closed the
    /// old master's sessions) or proxyTimeout passed (a proxy that does not answer has
    /// fenced itself by then, or is Go's, which severs at once); then stops the old master.
    fn continue_draining(&mut self, mut st: SwitchoverStatus) -> bool {
        let (old, target) = (st.old_master_db_uid.clone(), st.target_db_uid.clone());
        if !self.cd.dbs.contains_key(&target) || !self.cd.dbs.contains_key(&old) {
            st.phase = SwitchoverPhase::Failed;
            st.reason = "a db involved disappeared".into();
            self.cd.cluster.status.switchover = Some(st);
            return false;
        }
        let lagging = self.proxies_lagging();
        let bound = self.cd.cluster.spec.proxy_timeout();
        if !lagging.is_empty() && self.elapsed(st.started_at) < bound {
            self.reason(
                ReasonKind::WaitingForProxies,
                format!("switchover waits for proxies {lagging:?} to drain"),
            );
            self.cd.cluster.status.switchover = Some(st);
            return true;
        }
        if let Some(spec) = self.db(&old, "switchover").map(|db| db.spec.clone()) {
            let spec = self.standby_spec(&spec, &target);
            self.set_db_spec(&old, spec);
        }
        let how = if lagging.is_empty() {
            "proxies drained".to_string()
        } else {
            format!("proxies {lagging:?} did not drain within proxyTimeout")
        };
        self.reason(
            ReasonKind::Switchover,
            format!("switchover {old} -> {target}: {how}; stopping the old master"),
        );
        st.phase = SwitchoverPhase::Stopping;
        // convergenceTimeout bounds the stop and the catch-up, as before the drain.
        st.started_at = self.now;
        self.cd.cluster.status.switchover = Some(st);
        true
    }

    /// Where the stopped old master's WAL ends, when its keeper (alive) reports a clean
    /// shutdown of that db: PostgreSQL is not running then and has not run since, and the
    /// db's spec already follows the target, so nothing can be written after it.
    fn clean_stop(&self, old_db: &Db) -> Option<u64> {
        let keeper = &old_db.spec.keeper_uid;
        if !self.keeper_alive(keeper) {
            return None;
        }
        let ps = self.obs.keepers.get(keeper)?.postgres_state.as_ref()?;
        (ps.uid == old_db.uid && !ps.healthy && ps.shutdown_checkpoint > 0)
            .then_some(ps.shutdown_checkpoint)
    }

    fn continue_switchover(&mut self, mut st: SwitchoverStatus) -> bool {
        let timeout = self.cd.cluster.spec.convergence_timeout();
        let (old, target) = (st.old_master_db_uid.clone(), st.target_db_uid.clone());
        let finish = |round: &mut Self, st: SwitchoverStatus| {
            round.cd.cluster.status.switchover = Some(st);
        };
        let (Some(old_db), Some(target_db)) = (self.cd.dbs.get(&old), self.cd.dbs.get(&target))
        else {
            st.phase = SwitchoverPhase::Failed;
            st.reason = "a db involved disappeared".into();
            finish(self, st);
            return false;
        };
        let (old_db, target_db) = (old_db.clone(), target_db.clone());
        if self.elapsed(st.started_at) >= timeout {
            // The normal round restores the old master's role (it is still the master).
            st.phase = SwitchoverPhase::Failed;
            st.reason = "not completed within convergenceTimeout".into();
            self.reason(ReasonKind::Switchover, "switchover abandoned: timeout");
            finish(self, st);
            return false;
        }
        if st.stop_position == 0 {
            // The old master's end of WAL: its shutdown checkpoint as soon as its keeper
            // reports the clean stop, else (a Go keeper, or the report missed) its position
            // once it has rejoined as a standby of the target.
            if let Some(lsn) = self.clean_stop(&old_db) {
                st.stop_position = lsn;
            } else if converged(&old_db) && self.keeper_alive(&old_db.spec.keeper_uid) {
                st.stop_position = old_db.status.x_log_pos;
            }
        }
        let caught_up = st.stop_position > 0 && target_db.status.x_log_pos >= st.stop_position;
        if !(caught_up && self.db_good(&target)) {
            finish(self, st);
            return true;
        }
        if self.drain_fenced_for_promotion() {
            self.promote_fenced(&target);
        } else {
            self.promote(&target);
        }
        st.phase = SwitchoverPhase::Completed;
        self.reason(
            ReasonKind::Switchover,
            format!("switchover: {target} promoted at {}", st.stop_position),
        );
        finish(self, st);
        false
    }
}
