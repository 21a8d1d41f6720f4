//! The `stolon-sentinel` daemon: publishes its info, campaigns for leadership and, while
//! leader, runs [`stolon_core::sentinel::decide`] on every burst of watch events under the
//! cluster prefix (keeper and proxy infos, clusterdata, the switchover request) and on the
//! sleepInterval tick, on a view of the keys kept from the watch (`view`) and read in full
//! once per tick. Each write is one transaction comparing the clusterdata revision and the
//! leader key; on a conflict it re-reads and decides again. Losing leadership stops
//! decisions at once.

use crate::view::{Keys, View};
use control::faults::{Fault, Faults};
use futures::FutureExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Duration;
use stolon_core::model::{
    ClusterData, ClusterSpec, GoDuration, SentinelInfo, SwitchoverPhase, SwitchoverRequest,
    Timestamp,
};
use stolon_core::sentinel::{decide_with, ReasonKind, SentinelMemory};
use stolon_store::{
    info_ttl, CasOutcome, ClusterStore, Compare, Leadership, Op, StoreError, Watcher,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub struct Config {
    pub uid: String,
    pub store: ClusterStore,
    /// `--initial-cluster-spec`: creates the cluster when there is no clusterdata.
    pub initial_cluster_spec: Option<ClusterSpec>,
    /// The leader's session TTL (stolon: 20 s).
    pub leader_ttl: Duration,
    /// `--store-timeout`: the bound of each store call, so of a round's store work.
    pub store_timeout: Duration,
    /// Deliberate faults (tests only).
    pub faults: Faults,
}

pub struct Metrics {
    pub is_leader: Gauge,
    pub rounds: Counter,
    pub writes: Counter,
    pub conflicts: Counter,
    pub failovers: Counter,
    pub store_errors: Counter,
    /// Go stolon's `stolon_sentinel_last_cluster_check_success_seconds`: when the last round
    /// (read, decide, write) succeeded, as seconds since the unix epoch.
    pub last_check_success: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// How long each round took (decide and write, and the full read on a tick).
    pub round_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            is_leader: Gauge::default(),
            rounds: Counter::default(),
            writes: Counter::default(),
            conflicts: Counter::default(),
            failovers: Counter::default(),
            store_errors: Counter::default(),
            last_check_success: Gauge::default(),
            // 100 us to about 6.5 s.
            round_seconds: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(1e-4, 2.0, 17),
            ),
        }
    }
}

impl Metrics {
    /// Registers the sentinel's metrics under `stolon_sentinel_` in `root`.
    pub fn register(self: &Arc<Self>, root: &mut Registry) {
        let r = root.sub_registry_with_prefix("stolon_sentinel");
        r.register(
            "last_cluster_check_success_seconds",
            "Last time we successfully performed a cluster check as seconds since unix epoch",
            self.last_check_success.clone(),
        );
        r.register(
            "is_leader",
            "1 while this sentinel is the leader",
            self.is_leader.clone(),
        );
        r.register("rounds", "Decision rounds run", self.rounds.clone());
        r.register("writes", "Clusterdata writes", self.writes.clone());
        r.register(
            "conflicts",
            "Clusterdata writes lost to a conflict",
            self.conflicts.clone(),
        );
        r.register("failovers", "Masters replaced", self.failovers.clone());
        r.register(
            "store_errors",
            "Failed store requests",
            self.store_errors.clone(),
        );
        r.register(
            "round_seconds",
            "Time a decision round took",
            self.round_seconds.clone(),
        );
    }
}

/// Wall-clock time that never goes back: the start time plus monotonic time elapsed, so a
/// clock step cannot make infos look older or younger than they are.
#[derive(Clone, Copy)]
struct Clock {
    wall: Timestamp,
    mono: Instant,
}

impl Clock {
    fn new() -> Self {
        Clock {
            wall: Timestamp::now(),
            mono: Instant::now(),
        }
    }
    fn now(&self) -> Timestamp {
        self.wall.plus(GoDuration::from_std(self.mono.elapsed()))
    }
}

pub struct Sentinel {
    cfg: Config,
    metrics: Arc<Metrics>,
    clock: Clock,
    /// Last round's reasons: a reason repeated round after round (waiting for a standby,
    /// say) is logged once at its level and then at debug, not on every watch event.
    last_reasons: std::sync::Mutex<Vec<String>>,
}

impl Sentinel {
    pub fn new(cfg: Config, metrics: Arc<Metrics>) -> Self {
        Sentinel {
            cfg,
            metrics,
            clock: Clock::new(),
            last_reasons: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Runs until `shutdown`; store errors are logged and retried, never fatal.
    pub async fn run(self, shutdown: CancellationToken) {
        let publisher = tokio::spawn(publish_info(
            self.cfg.store.clone(),
            self.cfg.uid.clone(),
            shutdown.clone(),
        ));
        let election = self.cfg.store.election(self.cfg.leader_ttl);
        while !shutdown.is_cancelled() {
            let leadership = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = election.campaign(self.cfg.uid.as_bytes()) => r,
            };
            match leadership {
                Ok(l) => {
                    tracing::info!(uid = %self.cfg.uid, "became sentinel leader");
                    self.metrics.is_leader.set(1);
                    self.lead(&l, &shutdown).await;
                    self.metrics.is_leader.set(0);
                    tracing::info!(uid = %self.cfg.uid, "no longer the leader");
                }
                Err(e) => {
                    self.metrics.store_errors.inc();
                    tracing::warn!(error = %e, "campaign failed; retrying");
                    pause(&shutdown, Duration::from_secs(1)).await;
                }
            }
        }
        let _ = publisher.await;
    }

    /// Decides while `leadership` holds.
    async fn lead(&self, leadership: &Leadership, shutdown: &CancellationToken) {
        let mut memory = SentinelMemory::default();
        let keys = Keys::new(&self.cfg.store);
        let mut lead = Lead {
            view: None,
            watcher: None,
            sleep_interval: stolon_core::model::defaults::SLEEP_INTERVAL.as_std(),
            next_full_read: Instant::now(),
            last_write: None,
            last_round: None,
        };
        let liveness = Liveness::new(stuck_bound(lead.sleep_interval, self.cfg.store_timeout));
        let mut rounds = 0u32;
        let _guard = DropAbort(tokio::spawn(give_up_when_stuck(
            liveness.clone(),
            self.cfg.store.clone(),
            leadership.lease,
        )));
        loop {
            liveness.beat();
            if leadership.is_lost() || shutdown.is_cancelled() {
                return;
            }
            let started = Instant::now();
            let outcome = self.round(leadership, &mut memory, &keys, &mut lead).await;
            self.metrics
                .round_seconds
                .observe(started.elapsed().as_secs_f64());
            match outcome {
                Ok(true) => {
                    if self.cfg.faults.has(Fault::SentinelLoopPanic) {
                        panic!("STOLON_E2E_BREAK=sentinel-loop-panic");
                    }
                    liveness.set_bound(stuck_bound(lead.sleep_interval, self.cfg.store_timeout));
                    rounds += 1;
                    // After a round that read the spec (the first may have created it).
                    if self.cfg.faults.has(Fault::SentinelLoopStall) && rounds >= 2 {
                        tracing::warn!("STOLON_E2E_BREAK=sentinel-loop-stall: the loop stops");
                        std::future::pending::<()>().await;
                    }
                }
                // A conflict: someone wrote in between; read and decide again at once.
                Ok(false) => {
                    lead.view = None;
                    continue;
                }
                Err(e) => {
                    // Read again on the next tick (or watch event), not at once: a store
                    // that fails fast would otherwise be hammered.
                    lead.view = None;
                    lead.next_full_read = Instant::now() + lead.sleep_interval;
                    self.metrics.store_errors.inc();
                    tracing::warn!(error = %e, "sentinel round failed");
                }
            }
            let wake = tokio::time::sleep_until(lead.next_full_read.max(Instant::now()));
            let wait = async {
                match lead.watcher.as_mut() {
                    Some(w) => w.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = leadership.lost() => return,
                _ = shutdown.cancelled() => return,
                _ = wake => {}
                r = wait => match r {
                    Ok(update) => lead.absorb(&keys, update),
                    Err(e) => {
                        tracing::warn!(error = %e, "watch failed; retrying");
                        lead.watcher = None;
                        lead.view = None;
                        pause(shutdown, Duration::from_millis(200)).await;
                    }
                },
            }
        }
    }

    /// Reads (in full on the tick, else from the view), decides and writes once.
    /// `Ok(true)` after a round, `Ok(false)` on a write conflict.
    async fn round(
        &self,
        leadership: &Leadership,
        memory: &mut SentinelMemory,
        keys: &Keys,
        lead: &mut Lead,
    ) -> Result<bool, StoreError> {
        if lead.view.is_none() || Instant::now() >= lead.next_full_read {
            let range = self
                .cfg
                .store
                .store()
                .get_prefix(&format!("{}/", self.cfg.store.prefix()))
                .await?;
            let view = View::from_range(keys, range)?;
            if lead.watcher.is_none() {
                let prefix = format!("{}/", self.cfg.store.prefix());
                let store = self.cfg.store.store().clone();
                lead.watcher = Some(Watcher::from_revision(store, prefix, view.revision + 1));
            }
            lead.view = Some(view);
            lead.next_full_read = Instant::now() + lead.sleep_interval;
        }
        let Some(view) = lead.view.as_mut() else {
            return Ok(false);
        };
        let Some((cd, rev)) = view.cd.clone() else {
            self.create_cluster(leadership).await?;
            lead.view = None;
            return Ok(true);
        };
        self.metrics.rounds.inc();
        // Rounds come at least every quarter failInterval (each keeper publishes that often,
        // and each publish is a watch event): a longer gap was the store's.
        if let Some(t) = lead.last_round {
            forget_after_outage(memory, &cd, t.elapsed());
        }
        lead.last_round = Some(Instant::now());
        let (next, mem, reasons) =
            decide_with(&cd, memory, &view.obs, self.clock.now(), self.cfg.faults);
        *memory = mem;
        self.log_reasons(&reasons);
        lead.sleep_interval = next.cluster.spec.sleep_interval().as_std();
        // WAL positions alone are written once per sleepInterval, not on every keeper report
        // (the next tick writes them): every proxy and keeper watching the document would
        // otherwise be woken for each.
        let churn_only = cd.differs_only_in_wal_positions(&next)
            && lead
                .last_write
                .is_some_and(|t| t.elapsed() < lead.sleep_interval);
        if next != cd && !churn_only {
            if leadership.is_lost() {
                return Ok(false);
            }
            let writing = Instant::now();
            match self
                .cfg
                .store
                .put_cluster_data(&next, rev, Some(leadership))
                .await?
            {
                CasOutcome::Written(written) => {
                    self.metrics.writes.inc();
                    let write = writing.elapsed();
                    tracing::debug!(revision = written, ?write, "clusterdata written");
                    lead.last_write = Some(Instant::now());
                    // The watch brings the same document soon; decide on it meanwhile.
                    view.cd = Some((next.clone(), written));
                }
                CasOutcome::Conflict => {
                    self.metrics.conflicts.inc();
                    tracing::info!(
                        "clusterdata changed underneath (or leadership lost); re-reading"
                    );
                    return Ok(false);
                }
            }
        }
        let request = view.obs.switchover.clone();
        self.clear_switchover_request(&next, request.as_ref(), leadership)
            .await?;
        self.metrics
            .last_check_success
            .set(control::metrics::unix_now());
        Ok(true)
    }

    /// Logs each reason once at its level, then at debug while it repeats.
    fn log_reasons(&self, reasons: &[stolon_core::sentinel::Reason]) {
        let details: Vec<String> = reasons.iter().map(|r| r.detail.clone()).collect();
        let last = match self.last_reasons.lock() {
            Ok(mut l) => std::mem::replace(&mut *l, details),
            Err(_) => Vec::new(),
        };
        for r in reasons {
            match r.kind {
                ReasonKind::Failover => {}
                _ if last.contains(&r.detail) => {
                    tracing::debug!(kind = ?r.kind, detail = %r.detail, "decision (unchanged)");
                    continue;
                }
                _ => {}
            }
            match r.kind {
                ReasonKind::InitWaiting | ReasonKind::WaitingForProxies => {
                    tracing::debug!(kind = ?r.kind, detail = %r.detail, "decision")
                }
                ReasonKind::Failover => {
                    self.metrics.failovers.inc();
                    tracing::warn!(kind = ?r.kind, detail = %r.detail, "decision")
                }
                ReasonKind::Inconsistent => {
                    tracing::warn!(kind = ?r.kind, detail = %r.detail, "decision")
                }
                _ => tracing::info!(kind = ?r.kind, detail = %r.detail, "decision"),
            }
        }
    }

    /// `--initial-cluster-spec`: creates the clusterdata if it does not exist (create-only,
    /// guarded by leadership, so it never overwrites one).
    async fn create_cluster(&self, leadership: &Leadership) -> Result<(), StoreError> {
        let Some(spec) = &self.cfg.initial_cluster_spec else {
            tracing::info!(
                "no clusterdata yet: waiting for `stolonctl init` or --initial-cluster-spec"
            );
            return Ok(());
        };
        let uid = stolon_core::model::short_uid();
        let cd = ClusterData::new(uid, spec.clone(), self.clock.now());
        match self
            .cfg
            .store
            .put_cluster_data(&cd, 0, Some(leadership))
            .await?
        {
            CasOutcome::Written(_) => tracing::info!("cluster created from --initial-cluster-spec"),
            CasOutcome::Conflict => tracing::info!("clusterdata appeared meanwhile; not created"),
        }
        Ok(())
    }

    /// Deletes the `P/switchover` request once the status answers it (completed or failed).
    async fn clear_switchover_request(
        &self,
        cd: &ClusterData,
        req: Option<&SwitchoverRequest>,
        leadership: &Leadership,
    ) -> Result<(), StoreError> {
        let (Some(req), Some(st)) = (req, cd.cluster.status.switchover.as_ref()) else {
            return Ok(());
        };
        let answered = st.requested_at == req.requested_at
            && st.target_keeper_uid == req.target_keeper_uid
            && matches!(
                st.phase,
                SwitchoverPhase::Completed | SwitchoverPhase::Failed
            );
        if answered {
            let key = self.cfg.store.switchover_key();
            let guard: Vec<Compare> = vec![leadership.guard()];
            self.cfg
                .store
                .store()
                .txn(guard, vec![Op::Delete { key }])
                .await?;
            tracing::info!(phase = ?st.phase, reason = %st.reason, "switchover request answered");
        }
        Ok(())
    }
}

/// Publishes `{"UID": uid}` under a lease every few seconds until shutdown, then removes it.
async fn publish_info(store: ClusterStore, uid: String, shutdown: CancellationToken) {
    let interval = stolon_core::model::defaults::SLEEP_INTERVAL.as_std();
    let mut key = store.sentinel_info_key(&uid, info_ttl(interval));
    let value = serde_json::to_vec(&SentinelInfo { uid: uid.clone() }).unwrap_or_default();
    loop {
        if let Err(e) = key.put(value.clone()).await {
            tracing::warn!(error = %e, "cannot publish sentinel info");
        }
        if !pause(&shutdown, interval).await {
            break;
        }
    }
    let _ = key.revoke().await;
}

/// Sleeps unless shut down first; false if shut down.
async fn pause(shutdown: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// How long the leader's loop may go without a beat before it counts as stuck: it beats
/// before every round and wakes at least every sleepInterval; a round makes a few store
/// calls (read, write, the switchover request), each bounded by --store-timeout. Past
/// twice the one and four times the other, it is not slow but stuck.
fn stuck_bound(sleep_interval: Duration, store_timeout: Duration) -> Duration {
    sleep_interval * 2 + store_timeout * 4
}

/// The decision loop's last beat, shared with its guard.
#[derive(Clone)]
struct Liveness {
    origin: Instant,
    beat_ms: Arc<std::sync::atomic::AtomicU64>,
    bound_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl Liveness {
    fn new(bound: Duration) -> Liveness {
        let l = Liveness {
            origin: Instant::now(),
            beat_ms: Arc::default(),
            bound_ms: Arc::default(),
        };
        l.set_bound(bound);
        l
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    fn beat(&self) {
        let now = self.now_ms();
        self.beat_ms
            .store(now, std::sync::atomic::Ordering::Relaxed);
    }

    fn set_bound(&self, bound: Duration) {
        let ms = bound.as_millis() as u64;
        self.bound_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long the loop has been silent, if longer than its bound.
    fn stuck_for(&self) -> Option<Duration> {
        let beat = self.beat_ms.load(std::sync::atomic::Ordering::Relaxed);
        let silent = self.now_ms().saturating_sub(beat);
        let bound = self.bound_ms.load(std::sync::atomic::Ordering::Relaxed);
        (silent > bound).then(|| Duration::from_millis(silent))
    }
}

/// The leader's lease is kept alive by a task that does not watch the decision loop, so a
/// stuck loop would hold the leadership and decide nothing, for ever. This guard watches
/// it: past its bound, it revokes the lease (another sentinel takes over at once) and ends
/// the process non-zero, so a service manager restarts it.
async fn give_up_when_stuck(liveness: Liveness, store: ClusterStore, lease: stolon_store::LeaseId) {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Some(stuck) = liveness.stuck_for() {
            tracing::error!(
                ?stuck,
                "the sentinel's decision loop is stuck: giving up the leadership and exiting"
            );
            if let Err(e) = store.store().revoke_lease(lease).await {
                tracing::error!(error = %e, "cannot revoke the leader lease: it lapses after its TTL");
            }
            std::process::exit(1);
        }
    }
}

/// What the leader's loop carries between rounds.
struct Lead {
    /// The keys as the watch left them; `None`: read them in full before deciding.
    view: Option<View>,
    watcher: Option<Watcher>,
    sleep_interval: Duration,
    /// The tick: a round with a full read of the keys.
    next_full_read: Instant,
    /// When this leader last wrote the clusterdata.
    last_write: Option<Instant>,
    /// When the last round was decided: a long gap before the next is the store's outage.
    last_round: Option<Instant>,
}

/// Failsafe mode: after a store outage longer than half a failInterval, the sentinel forgets
/// when it last saw each info change, as a new leader does (its next round only observes).
/// The keepers' silence during the outage was the store's, not theirs: judged by it, the
/// return of the store would fail over a master that held all along. Without failsafe mode
/// the behaviour stays Go stolon's (the master fenced itself during the outage anyway).
/// Proxies keep their place among the enabled ones for 2 x proxyTimeout meanwhile (their
/// info's lease may have expired with the outage).
fn forget_after_outage(memory: &mut SentinelMemory, cd: &ClusterData, gap: Duration) {
    let spec = &cd.cluster.spec;
    if spec.failsafe_mode() && gap > spec.fail_interval().as_std() / 2 && memory.rounds > 0 {
        tracing::warn!(
            ?gap,
            "failsafe: the store could not be read for longer than half a failInterval: judging keepers afresh from now"
        );
        // The first round of a fresh memory gives the enabled proxies their grace.
        *memory = SentinelMemory::default();
    }
}

/// At most this many watch updates already waiting are folded into one round.
const BURST: usize = 4096;

impl Lead {
    /// Applies a watch update and every one already waiting behind it, so a burst of
    /// changes is decided on once.
    fn absorb(&mut self, keys: &Keys, first: stolon_store::WatchUpdate) {
        let mut update = Some(first);
        let mut n = 0;
        while let Some(u) = update.take() {
            if let Some(view) = self.view.as_mut() {
                if let Err(e) = view.apply(keys, u) {
                    tracing::error!(error = %e, "clusterdata cannot be read: reading again");
                    self.view = None;
                }
            }
            n += 1;
            if n >= BURST {
                break;
            }
            update = match self.watcher.as_mut().map(|w| w.next().now_or_never()) {
                Some(Some(Ok(u))) => Some(u),
                Some(Some(Err(_))) => {
                    self.watcher = None;
                    self.view = None;
                    None
                }
                _ => None,
            };
        }
    }
}

/// Aborts a task when dropped (the guard lives as long as the leadership it watches).
struct DropAbort(tokio::task::JoinHandle<()>);

impl Drop for DropAbort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Failsafe mode only: a gap between rounds longer than half a failInterval was the
    /// store's outage, and the memory starts afresh (as a new leader's).
    #[test]
    fn only_a_long_gap_in_failsafe_mode_forgets() {
        let spec = |failsafe| ClusterSpec {
            failsafe_mode: Some(failsafe),
            fail_interval: Some(GoDuration::from_secs(20)),
            ..Default::default()
        };
        let seen = SentinelMemory {
            rounds: 7,
            ..Default::default()
        };
        let table = [(true, 11, true), (true, 9, false), (false, 60, false)];
        for (failsafe, gap_secs, forgets) in table {
            let cd = ClusterData::new("c", spec(failsafe), Timestamp::now());
            let mut mem = seen.clone();
            forget_after_outage(&mut mem, &cd, Duration::from_secs(gap_secs));
            assert_eq!(
                mem.rounds == 0,
                forgets,
                "failsafe {failsafe}, gap {gap_secs} s"
            );
        }
    }
}
