//! The keeper loop's side of failsafe mode: what each round tells the failsafe state, and
//! how a hold moves the loop's fence deadline and the watchdog.

use crate::daemon::{Keeper, Shared};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

impl Keeper {
    /// A failsafe hold in force now, if any.
    pub(crate) fn hold_until(&self) -> Option<Instant> {
        let f = self.settings.failsafe.lock().ok()?;
        f.holding(Instant::now())
    }

    /// The store silence the plan judges fencing by: the real one, or while a failsafe hold
    /// is in force, as if store contact lasted until the hold's end. A fenced master stays
    /// fenced until the store itself answers.
    pub(crate) fn effective_silence(&self) -> Duration {
        let real = self.store_silence();
        match self.hold_until() {
            Some(h) if !self.instance.fenced => {
                let left = h.saturating_duration_since(Instant::now());
                real.min(self.fence_timeout().saturating_sub(left))
            }
            _ => real,
        }
    }

    /// What failsafe mode needs from this round: the clusterdata, its revision, the local
    /// role and whether this keeper is the master it may hold for (the publisher records
    /// each acknowledged write itself).
    pub(crate) fn update_failsafe(&self) {
        let Ok(mut f) = self.settings.failsafe.lock() else {
            return;
        };
        let primary = self.instance.state.as_ref().is_some_and(|p| !p.in_recovery)
            && self.instance.postmaster.is_some();
        let my = self.my_db().map(|d| d.uid.clone());
        let named = self
            .view
            .cd
            .as_ref()
            .map(|c| c.cluster.status.master.clone());
        f.keeper_uid = self.settings.uid.clone();
        if let Some(cd) = &self.view.cd {
            f.read(cd, self.view.revision);
        }
        f.runs_primary = primary;
        f.master_of = my.filter(|m| primary && !self.instance.fenced && Some(m) == named.as_ref());
    }
}

/// Re-arms the fencing watchdog for a failsafe hold: the postmaster armed for is the one
/// the publisher arms (a running, unfenced primary).
pub(crate) fn arm_for_hold(
    shared: Arc<Shared>,
) -> impl Fn(Duration) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    move |within| {
        let shared = shared.clone();
        Box::pin(async move {
            let pid = *shared.arm_pid.lock().expect("lock");
            let Some(pid) = pid else { return };
            if let Some(wd) = shared.watchdog.lock().await.as_mut() {
                if let Err(e) = wd.arm(pid, within).await {
                    tracing::error!(error = %e, "fencing watchdog unreachable");
                }
            }
        })
    }
}
