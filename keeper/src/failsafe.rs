//! Failsafe mode in the keeper (spec `failsafeMode`; the rules are `control::failsafe`, the
//! ordering argument docs/design.md "Failsafe mode"):
//! - every keeper answers `/failsafe/ack` on its metrics listener: a yes is a promise not to
//!   act as a master for `Timing::promise`, which the loop's plan honours; asked with an
//!   older revision than it read, it probes the store (`probe_store`) to tell a master cut
//!   off alone from a store that is out for everyone;
//! - a master whose store contact is going stale (or that a proxy asked for confirmation)
//!   asks every peer each `Timing::ask_every`; while every peer's yes is valid it holds:
//!   its fence deadline and the watchdog's move to the hold's end;
//! - `/failsafe/confirm?db=D` tells a proxy cut from the store how long the master of D
//!   will take writes (the later of its hold's end and its own store-contact deadline), so
//!   it may route there until then.

use control::failsafe::{acknowledge, hold_until, peers, AckRequest, AckerView, Timing};
use control::model::{ClusterData, FailsafeReport};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the loop, the asking task and the HTTP answers share.
#[derive(Default)]
pub struct State {
    /// The newest clusterdata read and its revision (from the loop).
    pub cd: Option<ClusterData>,
    pub revision: i64,
    pub keeper_uid: String,
    /// The local PostgreSQL runs as a primary (last observation).
    pub runs_primary: bool,
    /// This keeper's db, when the clusterdata names it the master and it runs as a primary,
    /// not fenced: what it may hold for.
    pub master_of: Option<String>,
    /// Send time of the last acknowledged KeeperInfo write (the publisher records it).
    pub store_ack: Option<Instant>,
    /// Acker side: send time of the last store probe that was answered, and until when to
    /// keep probing (a master asked while this keeper had read a newer clusterdata).
    pub store_probe_ok: Option<Instant>,
    pub probe_until: Option<Instant>,
    /// Send time of the last store probe that went unanswered (failed, or no answer within
    /// its bound).
    pub probe_unanswered: Option<Instant>,
    /// Wakes the prober when a master's request starts it.
    pub probe_wake: Arc<tokio::sync::Notify>,
    /// Acker side: the db acknowledged last and until when this keeper stays out of the
    /// master's role.
    pub promised: Option<(String, Instant)>,
    /// Master side: each peer's acknowledgement, valid until then.
    pub acks: BTreeMap<String, Instant>,
    /// The peers the hold needs (their failsafe address, if published).
    pub peers: BTreeMap<String, Option<String>>,
    pub hold_until: Option<Instant>,
    pub held_since: Option<control::model::Timestamp>,
    /// When a proxy last asked this keeper to confirm its hold.
    pub proxy_asked: Option<Instant>,
    /// Rounds of asking done, and the refusals of the last one (peer, why).
    pub asks: u64,
    pub refusals: Vec<(String, String)>,
}

pub type Shared = Arc<Mutex<State>>;

impl State {
    fn failsafe_on(&self) -> bool {
        self.cd
            .as_ref()
            .is_some_and(|cd| cd.cluster.spec.failsafe_mode())
    }

    /// A clusterdata read at `revision`; an older one than the newest read is ignored
    /// (unless it is another cluster's: a store recreated starts its revisions again).
    pub fn read(&mut self, cd: &ClusterData, revision: i64) {
        let other = (self.cd.as_ref()).is_none_or(|c| c.cluster.uid != cd.cluster.uid);
        if other || revision > self.revision {
            self.cd = Some(cd.clone());
            self.revision = revision;
        }
    }

    /// The failsafe durations of the newest clusterdata read.
    pub fn timing(&self) -> Option<Timing> {
        let cd = self.cd.as_ref()?;
        Some(control::failsafe::timing(cd.cluster.spec.fail_interval()))
    }

    /// The store is out for this keeper too at `now`: its own store contact (its last
    /// acknowledged publish or probe) has been silent for `peer_quiet`, and a probe sent
    /// after that contact went unanswered. Silence alone is not enough:
    /// with a long sleepInterval a healthy keeper publishes only every few seconds.
    fn store_quiet(&self, now: Instant, timing: &Timing) -> bool {
        let last = self.store_ack.max(self.store_probe_ok);
        let silent = last.is_none_or(|l| now.saturating_duration_since(l) >= timing.peer_quiet);
        let probed = (self.probe_unanswered).is_some_and(|p| last.is_none_or(|l| p > l));
        silent && probed
    }

    /// The promise is still in force at `now`.
    pub fn promised_at(&self, now: Instant) -> bool {
        self.promised
            .as_ref()
            .is_some_and(|(_, until)| now < *until)
    }

    /// A valid hold at `now`, if any.
    pub fn holding(&self, now: Instant) -> Option<Instant> {
        self.hold_until
            .filter(|h| *h > now && self.master_of.is_some())
    }

    /// Until when this master will take writes, as a proxy may count it: the later of the
    /// hold's end and its own store-contact deadline (the fence window after its last
    /// acknowledged publish's send), which stolon's ordering covers without any hold. A
    /// master that still reaches the store thus confirms even while a round of its peers'
    /// answers fails (a peer that read a clusterdata write a few milliseconds before the
    /// master refuses that round); a proxy cut from the store fenced on such a stutter.
    pub fn confirmable_until(&self, now: Instant) -> Option<Instant> {
        self.master_of.as_ref()?;
        let store = (self.store_ack.zip(self.timing())).map(|(a, t)| a + t.promise);
        self.holding(now).max(store).filter(|u| *u > now)
    }

    /// How many peers' acknowledgements are valid at `now`.
    fn valid_acks(&self, now: Instant) -> usize {
        (self.peers.keys())
            .filter(|p| self.acks.get(*p).is_some_and(|t| *t > now))
            .count()
    }

    /// The state `stolonctl status` shows (failsafe mode on only).
    pub fn report(&self, now: Instant) -> Option<FailsafeReport> {
        if !self.failsafe_on() {
            return None;
        }
        let held_since = (self.holding(now).and(self.held_since))
            .map(|t| t.to_string())
            .unwrap_or_default();
        let (promised_to, promised_for_ms) = match &self.promised {
            Some((db, until)) if *until > now => (db.clone(), (*until - now).as_millis() as u64),
            _ => (String::new(), 0),
        };
        let dbs = match (&self.master_of, &self.cd) {
            (Some(_), Some(cd)) => cd.dbs.keys().cloned().collect(),
            _ => Vec::new(),
        };
        Some(FailsafeReport {
            held_since,
            acks: self.valid_acks(now) as u32,
            peers: self.peers.len() as u32,
            promised_to,
            promised_for_ms,
            dbs,
        })
    }

    /// For `/health`: `{"held_since":..., "acks":N, "peers":M}` or `null`.
    pub fn health_json(&self, now: Instant) -> String {
        match self.report(now) {
            None => "null".into(),
            Some(r) => format!(
                "{{\"held_since\":{},\"acks\":{},\"peers\":{},\"promised_to\":\"{}\",\"promised_for_ms\":{}}}",
                if r.held_since.is_empty() {
                    "null".to_string()
                } else {
                    format!("\"{}\"", r.held_since)
                },
                r.acks,
                r.peers,
                r.promised_to,
                r.promised_for_ms
            ),
        }
    }
}

/// The failsafe paths of the keeper's HTTP listener; `None` for any other path.
pub fn answer(state: &Shared, path: &str, query: &str) -> Option<Result<String, String>> {
    let now = Instant::now();
    let mut st = state.lock().ok()?;
    match path {
        "/failsafe/ack" => Some(ack(&mut st, query, now)),
        "/failsafe/confirm" => {
            st.proxy_asked = Some(now);
            let db = query.split('&').find_map(|kv| kv.strip_prefix("db="));
            let hold = st
                .confirmable_until(now)
                .filter(|_| st.master_of.as_deref() == db);
            Some(match hold {
                Some(until) => Ok(format!(
                    "{{\"db\":\"{}\",\"remaining_ms\":{}}}",
                    db.unwrap_or_default(),
                    (until - now).as_millis()
                )),
                None => Err("{\"error\":\"not holding the failsafe for that db\"}".into()),
            })
        }
        _ => None,
    }
}

fn ack(st: &mut State, query: &str, now: Instant) -> Result<String, String> {
    let Some(req) = AckRequest::from_query(query) else {
        return Err("{\"ack\":false,\"reason\":\"malformed request\"}".into());
    };
    let timing = st.timing();
    if st.revision > req.revision {
        // Whether to refuse depends on whether the store still answers this keeper: find
        // out while the master asks (`probe_store`).
        if let Some(t) = &timing {
            if st.probe_until.is_none_or(|u| u <= now) {
                st.probe_wake.notify_one();
            }
            st.probe_until = Some(now + t.promise);
        }
    }
    let view = AckerView {
        keeper_uid: &st.keeper_uid,
        cd: st.cd.as_ref(),
        revision: st.revision,
        runs_primary: st.runs_primary,
        store_quiet: timing.is_some_and(|t| st.store_quiet(now, &t)),
    };
    match acknowledge(&view, &req) {
        Ok(()) => {
            // From the clusterdata just judged.
            let Some(own) = st.timing() else {
                return Err("{\"ack\":false,\"reason\":\"no clusterdata\"}".into());
            };
            let promise = req.promise_for(&own);
            let until = now + promise;
            let fresh = !st.promised_at(now);
            // The promise only ever grows: an earlier yes may still be counted on.
            let until = match &st.promised {
                Some((_, u)) if *u > until => *u,
                _ => until,
            };
            st.promised = Some((req.master_db.clone(), until));
            if fresh {
                tracing::info!(master = %req.master_db, revision = req.revision, ?promise, "failsafe: acknowledged the master; not acting as a master meanwhile");
            }
            Ok("{\"ack\":true}".into())
        }
        Err(reason) => {
            tracing::debug!(master = %req.master_db, %reason, "failsafe: refused an acknowledgement");
            Err(format!(
                "{{\"ack\":false,\"reason\":{}}}",
                serde_json::Value::String(reason)
            ))
        }
    }
}

/// What one round of asking needs, taken under the lock.
struct Ask {
    req: AckRequest,
    peers: BTreeMap<String, Option<String>>,
    timing: Timing,
}

/// Whether the master must ask now, and what; clears the hold when it need not.
fn next_ask(st: &mut State, now: Instant) -> Option<Ask> {
    let timing = st.timing()?;
    // The sentinel must have recorded which dbs it may elect in this master's place (the
    // dbs this keeper reported holding) before it may hold: rule 4 of the design.
    let recorded = (st.cd.as_ref())
        .zip(st.master_of.as_ref())
        .and_then(|(cd, db)| cd.dbs.get(db))
        .is_some_and(|d| !d.status.failsafe_dbs.is_empty());
    let needed = st.failsafe_on()
        && st.master_of.is_some()
        && recorded
        && (st
            .store_ack
            .is_none_or(|a| now.saturating_duration_since(a) >= timing.ask_after)
            || st
                .proxy_asked
                .is_some_and(|p| now.saturating_duration_since(p) < timing.promise));
    let (Some(cd), Some(db), true) = (&st.cd, &st.master_of, needed) else {
        if st.held_since.take().is_some() {
            tracing::info!(
                "failsafe: no longer holding (store contact is back, or not the master)"
            );
        }
        st.acks.clear();
        st.hold_until = None;
        return None;
    };
    let req = AckRequest {
        cluster_uid: cd.cluster.uid.clone(),
        master_db: db.clone(),
        revision: st.revision,
        validity_ms: timing.validity.as_millis() as u64,
    };
    st.peers = peers(cd, &st.keeper_uid);
    Some(Ask {
        req,
        peers: st.peers.clone(),
        timing,
    })
}

/// Asks every peer once; returns the peers that said yes and the refusals.
async fn ask_peers(ask: &Ask) -> (Vec<String>, Vec<(String, String)>) {
    let path = format!("/failsafe/ack?{}", ask.req.to_query());
    let calls = ask.peers.iter().map(|(uid, addr)| {
        let path = path.clone();
        async move {
            let r = match addr {
                None => Err("it published no failsafe address".to_string()),
                Some(a) => match control::peer_http::get(a, &path, ask.timing.ask_every).await {
                    Ok((200, _)) => Ok(()),
                    Ok((code, body)) => Err(format!("{code} {body}")),
                    Err(e) => Err(e),
                },
            };
            (uid.clone(), r)
        }
    });
    let mut yes = Vec::new();
    let mut no = Vec::new();
    for (uid, r) in futures::future::join_all(calls).await {
        match r {
            Ok(()) => yes.push(uid),
            Err(e) => no.push((uid, e)),
        }
    }
    (yes, no)
}

/// How often both sides act: the failsafe timing's `ask_every` for the newest clusterdata
/// read (250 ms before the first).
fn ask_every(state: &Shared) -> Duration {
    (state.lock().ok())
        .and_then(|st| st.timing())
        .map_or(Duration::from_millis(250), |t| t.ask_every)
}

/// The asked keeper's side: while a master asks it with an older revision than it has
/// read, reads the store every `ask_every` (each read bounded by it) so that
/// `State::store_quiet` tells a store that still answers this keeper (the master alone is
/// cut off) from one that is out for everyone. `probe` is one store read, true if answered.
pub async fn probe_store<P, F>(state: Shared, probe: P, shutdown: CancellationToken)
where
    P: Fn() -> F,
    F: std::future::Future<Output = bool>,
{
    let Some(wake) = state.lock().ok().map(|st| st.probe_wake.clone()) else {
        return;
    };
    loop {
        let every = ask_every(&state);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
            _ = wake.notified() => {}
        }
        let wanted = (state.lock().ok())
            .and_then(|st| st.probe_until)
            .is_some_and(|u| Instant::now() < u);
        if !wanted {
            continue;
        }
        let sent = Instant::now();
        let answered = matches!(tokio::time::timeout(every, probe()).await, Ok(true));
        if let Ok(mut st) = state.lock() {
            if answered {
                st.store_probe_ok = st.store_probe_ok.max(Some(sent));
            } else {
                st.probe_unanswered = st.probe_unanswered.max(Some(sent));
            }
        }
    }
}

/// The master's side: asks its peers while it needs them, and keeps the hold and the
/// watchdog in step. `arm` re-arms the fencing watchdog to a hold's end plus its slack.
pub async fn run<A, F>(state: Shared, arm: A, shutdown: CancellationToken)
where
    A: Fn(Duration) -> F,
    F: std::future::Future<Output = ()>,
{
    // The peers refusing in the last round (their reasons are logged when this changes).
    let mut refusing: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(ask_every(&state)) => {}
        }
        let Some(ask) = (state.lock().ok()).and_then(|mut st| next_ask(&mut st, Instant::now()))
        else {
            refusing.clear();
            continue;
        };
        let sent = Instant::now();
        let (yes, no) = ask_peers(&ask).await;
        let uids: Vec<String> = no.iter().map(|(u, _)| u.clone()).collect();
        if uids != refusing && !no.is_empty() {
            tracing::warn!(refusals = ?no, "failsafe: peers that do not acknowledge this master");
        }
        refusing = uids;
        let left = match state.lock() {
            Ok(mut st) => record(&mut st, yes, no, sent, &ask.timing),
            Err(_) => return,
        };
        if let Some(left) = left {
            arm(left + ask.timing.watchdog_slack).await;
        }
    }
}

/// Records one round of answers (requests sent at `sent`); returns how long the hold
/// lasts from now, if it holds.
fn record(
    st: &mut State,
    yes: Vec<String>,
    no: Vec<(String, String)>,
    sent: Instant,
    timing: &Timing,
) -> Option<Duration> {
    for uid in yes {
        st.acks.insert(uid, sent + timing.validity);
    }
    st.asks += 1;
    st.refusals = no;
    let now = Instant::now();
    st.hold_until = hold_until(st.peers.keys(), &st.acks);
    let holding = st.holding(now);
    match (st.held_since.is_some(), holding.is_some()) {
        (false, true) => {
            st.held_since = Some(control::model::Timestamp::now());
            tracing::warn!(
                peers = st.peers.len(),
                "failsafe: every peer acknowledges this master; holding without the store"
            );
        }
        (true, false) => {
            st.held_since = None;
            tracing::error!(
                refusals = ?st.refusals,
                "failsafe: the hold lapsed (a peer refused or did not answer in time): fenced by the store deadline"
            );
        }
        _ => {}
    }
    holding.map(|h| h - now)
}

mod in_loop;
pub(crate) use in_loop::arm_for_hold;

#[cfg(test)]
mod tests;
