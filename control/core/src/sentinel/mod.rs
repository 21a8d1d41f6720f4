//! The sentinel's decision: a pure function from the current clusterdata, the sentinel's
//! memory between rounds, what it observes in the store (keeper and proxy infos, a switchover
//! request) and the time, to the next clusterdata. No I/O and no clock here: the daemon
//! (`control::sentinel::daemon`) reads the store, calls [`decide`] and writes the result with a
//! compare-and-swap guarded by its leadership.
//!
//! Safety rules (architecture.md "Safety"): the proxies are fenced (masterDbUid emptied,
//! generation bumped) in the same write that names a new master, and the new master is
//! published to proxies only once every enabled proxy reported that generation or expired.

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

mod health;
mod init;
mod master;
#[cfg(test)]
#[allow(clippy::disallowed_methods)] // a test: its case count from the environment
mod no_panic;
mod proxy;
#[doc(hidden)]
#[allow(clippy::indexing_slicing, clippy::expect_used, clippy::panic)] // not the decision core
pub mod sim;
#[cfg(test)]
#[allow(clippy::disallowed_methods)] // a test: seeds from the environment, timing
mod simulation;
mod standbys;
mod switchover;
mod sync;
#[cfg(test)]
mod tests;
mod uid;

use crate::faults::Faults;
use crate::model::{
    ClusterData, ClusterPhase, Db, DbSpec, GoDuration, KeeperInfo, Pause, ProxyInfo,
    SwitchoverRequest, Timestamp,
};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

pub use sync::PLACEHOLDER_STANDBY;

/// What the sentinel read from the store for this round.
#[derive(Clone, Debug, Default)]
pub struct Observations {
    /// Keeper infos by keeper UID (malformed ones already dropped and logged by the daemon).
    pub keepers: BTreeMap<String, KeeperInfo>,
    /// Proxy infos by proxy UID.
    pub proxies: BTreeMap<String, ProxyInfo>,
    /// The pending `P/switchover` request, if any.
    pub switchover: Option<SwitchoverRequest>,
    /// The maintenance pause at `P/pause`, if any (active or past its deadline).
    pub pause: Option<Pause>,
}

/// When an info was last seen to change. Freshness is judged by the infoUID changing, not by
/// the key existing: a frozen component's key lives on until its lease expires.
#[derive(Clone, Debug, PartialEq)]
pub struct Seen {
    pub info_uid: String,
    /// When this `info_uid` was first seen (or when the component was first looked at, if it
    /// has no info at all).
    pub since: Timestamp,
}

/// What the sentinel carries between rounds and is not in the store. A new leader starts
/// with `SentinelMemory::default()`, and its first round only observes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SentinelMemory {
    /// Rounds decided since this sentinel became leader.
    pub rounds: u64,
    pub keepers: BTreeMap<String, Seen>,
    pub proxies: BTreeMap<String, Seen>,
    /// The last time each db was seen healthy (the first-seen time of the healthy info).
    pub db_last_good: BTreeMap<String, Timestamp>,
    /// Since when each db has not converged to which generation.
    pub unconverged_since: BTreeMap<String, (i64, Timestamp)>,
    /// The running initialisation attempt: (db uid, started at).
    pub init_attempt: Option<(String, Timestamp)>,
    /// Keepers an initialisation was already tried on and timed out.
    pub init_tried: BTreeSet<String>,
    /// Failsafe mode, after a store outage: until then no enabled proxy is dropped for a
    /// missing info (its lease may have expired in the outage while it kept routing on the
    /// master's hold; it writes the info again at its next check).
    pub proxy_grace_until: Option<Timestamp>,
}

/// Why the decision is what it is: logged by the daemon and shown by tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reason {
    pub kind: ReasonKind,
    pub detail: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReasonKind {
    FirstRound,
    BadSpec,
    InitStarted,
    InitWaiting,
    InitRetry,
    InitDone,
    KeeperAdded,
    KeeperRemoved,
    MasterFailed,
    NoEligibleStandby,
    Failover,
    WaitingForProxies,
    MasterPublished,
    StandbyAdded,
    DbRemoved,
    SyncStandbysChanged,
    Switchover,
    /// A maintenance pause holds: nothing but observation and the proxies' routing.
    Paused,
    /// The clusterdata refers to a db it does not hold; that step was skipped.
    Inconsistent,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.detail)
    }
}

/// One round's result: the next clusterdata (equal to the input when nothing is to be
/// written), the memory for the next round, and the reasons.
pub type Decision = (ClusterData, SentinelMemory, Vec<Reason>);

/// Computes the next cluster view. Pure: the same inputs give the same output.
pub fn decide(
    cd: &ClusterData,
    memory: &SentinelMemory,
    obs: &Observations,
    now: Timestamp,
) -> Decision {
    decide_with(cd, memory, obs, now, Faults::NONE)
}

/// [`decide`] with deliberate faults (tests only; `Faults::NONE` in production).
pub fn decide_with(
    cd: &ClusterData,
    memory: &SentinelMemory,
    obs: &Observations,
    now: Timestamp,
    faults: Faults,
) -> Decision {
    let mut round = Round {
        cd: cd.clone(),
        mem: memory.clone(),
        obs,
        now,
        faults,
        reasons: Vec::new(),
    };
    round.observe();
    round.mem.rounds += 1;
    if memory.rounds == 0 {
        // A new leader does not know how long infos have been unchanged: acting now could
        // fail a healthy master whose infos it has simply not watched long enough.
        if cd.cluster.spec.failsafe_mode() && round.mem.proxy_grace_until.is_none() {
            // Failsafe mode: leadership changes hands after a store outage, and the proxies'
            // leases may have expired with it while they kept routing on the master's hold:
            // the enabled ones keep their place until they have written their infos again.
            let grace = GoDuration(cd.cluster.spec.proxy_timeout().0.saturating_mul(2));
            round.mem.proxy_grace_until = Some(now.plus(grace));
        }
        round.reason(
            ReasonKind::FirstRound,
            "first round as leader: observing only",
        );
        return (cd.clone(), round.mem, round.reasons);
    }
    if let Err(e) = cd.cluster.spec.validate() {
        round.reason(ReasonKind::BadSpec, e.to_string());
        return (cd.clone(), round.mem, round.reasons);
    }
    round.update_keepers();
    round.update_dbs();
    match cd.cluster.status.phase.unwrap_or_default() {
        ClusterPhase::Initializing => round.initialize(),
        ClusterPhase::Normal => round.normal(),
    }
    round.consume_force_fail();
    round.forget_gone();
    let Round {
        cd: mut next,
        mem,
        reasons,
        ..
    } = round;
    if next != *cd {
        next.change_time = Some(now);
    }
    (next, mem, reasons)
}

/// The state of one round of [`decide`].
struct Round<'a> {
    cd: ClusterData,
    mem: SentinelMemory,
    obs: &'a Observations,
    now: Timestamp,
    faults: Faults,
    reasons: Vec<Reason>,
}

impl Round<'_> {
    /// The db `uid`, or `None` with an `Inconsistent` reason: the clusterdata names a db it
    /// does not hold (the rules never make one, but the store may hold anything).
    fn db(&mut self, uid: &str, during: &str) -> Option<&Db> {
        if !self.cd.dbs.contains_key(uid) {
            self.reason(
                ReasonKind::Inconsistent,
                format!("{during}: db {uid:?} is not in the clusterdata; skipped"),
            );
        }
        self.cd.dbs.get(uid)
    }

    fn reason(&mut self, kind: ReasonKind, detail: impl Into<String>) {
        self.reasons.push(Reason {
            kind,
            detail: detail.into(),
        });
    }

    /// The active maintenance pause, if any.
    fn paused(&self) -> Option<&Pause> {
        self.obs.pause.as_ref().filter(|p| p.active(self.now))
    }

    fn fail_interval(&self) -> GoDuration {
        self.cd.cluster.spec.fail_interval()
    }

    fn elapsed(&self, since: Timestamp) -> GoDuration {
        self.now.since(since)
    }

    /// Replaces a db's spec, bumping its generation only when something changed (a keeper
    /// acts on every generation bump).
    fn set_db_spec(&mut self, uid: &str, spec: DbSpec) {
        let now = self.now;
        if let Some(db) = self.cd.dbs.get_mut(uid) {
            if db.spec != spec {
                db.spec = spec;
                db.generation += 1;
                db.change_time = Some(now);
            }
        }
    }

    /// Adds a db with a fresh unique UID and returns the UID.
    fn add_db(&mut self, spec: DbSpec) -> String {
        let uid = uid::new_db_uid(&self.cd, &spec.keeper_uid, self.now);
        self.cd.dbs.insert(
            uid.clone(),
            Db {
                uid: uid.clone(),
                generation: 1,
                change_time: Some(self.now),
                spec,
                ..Default::default()
            },
        );
        uid
    }

    /// The db hosted by a keeper, if any.
    fn db_of_keeper(&self, keeper_uid: &str) -> Option<&Db> {
        crate::keeper::my_db(&self.cd, keeper_uid)
    }

    /// The managed fields of a db spec, taken from the cluster spec; the rest of `base` is
    /// kept (init mode, configs, unknown fields).
    fn managed_spec(&self, base: &DbSpec) -> DbSpec {
        let spec = &self.cd.cluster.spec;
        DbSpec {
            request_timeout: spec.request_timeout(),
            max_standbys: spec.max_standbys(),
            use_pgrewind: spec.use_pgrewind(),
            additional_wal_senders: spec.additional_wal_senders(),
            pg_parameters: spec.pg_parameters.clone(),
            pg_hba: spec.pg_hba.clone(),
            ..base.clone()
        }
    }
}
