//! Failsafe mode's rules (spec `failsafeMode`; docs/design.md "Failsafe mode"), pure and
//! shared by the keeper and the simulation: when a keeper acknowledges a master, how long
//! the master counts that, how long the keeper then stays out of the master's role, and
//! which keepers the master must hear from.
//!
//! The ordering, in short: the master M counts a keeper's yes valid for `validity` from the
//! moment it SENT the request; the keeper does not act as a master for `promise` from the
//! moment it answered. `validity` plus the fencing watchdog's slack is well under
//! `promise` even with clocks running `CLOCK_RATE_BOUND` apart, so M has stopped before any
//! keeper that acknowledged it can be promoted, and a keeper that has read a clusterdata
//! naming another master (the one that elects it) refuses.

use crate::model::{ClusterData, GoDuration};
use std::collections::BTreeMap;
use std::time::Duration;

/// How much faster one machine's monotonic clock may run than another's, at most: the
/// documented assumption the ordering argument rests on (NTP-disciplined clocks drift by
/// parts per million; 1 % leaves room for a VM stalled and caught up).
pub const CLOCK_RATE_BOUND: f64 = 0.01;

/// The durations of failsafe mode, all derived from failInterval.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// L: how long a keeper that acknowledged a master stays out of the master's role,
    /// from its answer, on its own clock (the fence window, failInterval / 2).
    pub promise: Duration,
    /// How long the master counts one acknowledgement, from the request's send time.
    pub validity: Duration,
    /// How often the master asks while it needs the acknowledgements; each request's bound.
    pub ask_every: Duration,
    /// Store silence from which the master starts asking (a publish comes at least every
    /// half fence window, so less silence than this is no sign of trouble).
    pub ask_after: Duration,
    /// The fencing watchdog's slack past a hold's end (a quarter fence window, as for the
    /// store-contact deadline).
    pub watchdog_slack: Duration,
    /// How long an asked keeper's own store contact (its last acknowledged publish or
    /// store probe) must be silent before it counts the store out for itself too. While a
    /// master asks, the keeper probes the store every `ask_every`, so a store that answers
    /// it stays well within this.
    pub peer_quiet: Duration,
}

/// The failsafe durations for a failInterval.
pub fn timing(fail_interval: GoDuration) -> Timing {
    let l = crate::keeper::fence_timeout(fail_interval).as_std();
    Timing {
        promise: l,
        validity: l / 2,
        ask_every: (l / 10).max(Duration::from_millis(50)),
        ask_after: l * 6 / 10,
        watchdog_slack: l / 4,
        peer_quiet: l / 4,
    }
}

/// What a master asks a keeper: "do you acknowledge db `master_db` as the master of cluster
/// `cluster_uid` at clusterdata revision `revision`?"
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AckRequest {
    pub cluster_uid: String,
    pub master_db: String,
    pub revision: i64,
    /// How long the master will count a yes (its `Timing::validity`, ms): the keeper
    /// promises at least twice that (`promise_for`), so a master that read a longer
    /// failInterval than the keeper did is still covered.
    pub validity_ms: u64,
}

impl AckRequest {
    /// The query string the request travels as (`/failsafe/ack?...`).
    pub fn to_query(&self) -> String {
        format!(
            "cluster={}&db={}&rev={}&valid={}",
            self.cluster_uid, self.master_db, self.revision, self.validity_ms
        )
    }

    /// Reads a query string; `None` if a field is missing or malformed.
    pub fn from_query(query: &str) -> Option<AckRequest> {
        let field = |name: &str| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        };
        let id = |s: &str| {
            (!s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric()))
                .then(|| s.to_string())
        };
        Some(AckRequest {
            cluster_uid: id(field("cluster")?)?,
            master_db: id(field("db")?)?,
            revision: field("rev")?.parse().ok().filter(|r: &i64| *r > 0)?,
            // At most a day: a promise must end.
            validity_ms: (field("valid")?.parse().ok())
                .filter(|v: &u64| *v > 0 && *v <= 86_400_000)?,
        })
    }

    /// What the keeper promises for this request: its own promise, or twice the validity
    /// the master counts if that is longer (the ordering needs validity plus the
    /// watchdog's slack, 1.5 x validity, well inside the promise on any clock).
    pub fn promise_for(&self, own: &Timing) -> Duration {
        own.promise.max(Duration::from_millis(self.validity_ms) * 2)
    }
}

/// What the asked keeper knows when it answers.
#[derive(Clone, Copy, Debug)]
pub struct AckerView<'a> {
    pub keeper_uid: &'a str,
    /// The newest clusterdata it has read and that document's revision in the store.
    pub cd: Option<&'a ClusterData>,
    pub revision: i64,
    /// Its own PostgreSQL runs as a primary.
    pub runs_primary: bool,
    /// Its own store contact has been silent for `Timing::peer_quiet` and a store probe
    /// sent since went unanswered: the store is out for it too, not only for the master.
    pub store_quiet: bool,
}

/// Whether the keeper acknowledges the request; the reason for a refusal. A yes is a
/// promise: the keeper does not act as a master for `Timing::promise` from now.
pub fn acknowledge(view: &AckerView<'_>, req: &AckRequest) -> Result<(), String> {
    let Some(cd) = view.cd else {
        return Err("no clusterdata read yet".into());
    };
    if cd.cluster.uid != req.cluster_uid {
        return Err(format!("another cluster ({})", cd.cluster.uid));
    }
    if !cd.cluster.spec.failsafe_mode() {
        return Err("failsafe mode is off".into());
    }
    if view.revision >= req.revision && cd.cluster.status.master != req.master_db {
        return Err(format!(
            "revision {} names db {:?} the master",
            view.revision, cd.cluster.status.master
        ));
    }
    // A newer revision that still names the master means the store moved on without it.
    // While the store answers this keeper, the master alone is cut off: refuse, and it
    // fences as without failsafe mode. Once the store is silent for this keeper too, the
    // write it read may just be the last one before the whole store went out (CI saw etcd
    // stop in the millisecond of a sentinel's write that one standby read and the master
    // did not): refusing then would fence a master every peer still names.
    if view.revision > req.revision && !view.store_quiet {
        return Err(format!(
            "a newer clusterdata was read (revision {} > {}) and this keeper has not found the store out",
            view.revision, req.revision
        ));
    }
    let mine = crate::keeper::my_db(cd, view.keeper_uid).map(|d| d.uid.as_str());
    if mine == Some(req.master_db.as_str()) {
        return Err("the master does not acknowledge itself".into());
    }
    if view.runs_primary {
        return Err("this keeper runs a primary itself".into());
    }
    Ok(())
}

/// The keepers a master must hear from: every other keeper that hosts a db in `cd` (in
/// failsafe mode the sentinel elects only a db the master reported from a clusterdata it
/// held, and db uids are never reused, so any electable db is in `cd`), with the failsafe
/// address it published.
pub fn peers(cd: &ClusterData, master_keeper: &str) -> BTreeMap<String, Option<String>> {
    cd.dbs
        .values()
        .map(|db| db.spec.keeper_uid.as_str())
        .filter(|k| *k != master_keeper && !k.is_empty())
        .map(|k| {
            let addr = cd
                .keepers
                .get(k)
                .map(|kp| kp.status.failsafe_address.clone())
                .filter(|a| !a.is_empty());
            (k.to_string(), addr)
        })
        .collect()
}

/// Until when the master may hold: the earliest acknowledgement's end over every peer;
/// `None` if a peer has none (or there are no peers: a lone keeper has nobody to make the
/// promise that keeps a second master out).
pub fn hold_until<'a, T: Ord + Copy + 'a>(
    peers: impl IntoIterator<Item = &'a String>,
    acks: &BTreeMap<String, T>,
) -> Option<T> {
    let mut until: Option<T> = None;
    for p in peers {
        let t = *acks.get(p)?;
        until = Some(until.map_or(t, |u| u.min(t)));
    }
    until
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // a test: seeds from the environment
mod simulation;
#[cfg(test)]
mod tests;
