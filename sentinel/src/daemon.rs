//! The `stolon-sentinel` daemon: publishes its info, campaigns for leadership and, while
//! leader, runs [`stolon_core::sentinel::decide`] on every watch event under the cluster prefix (keeper and proxy
//! infos, clusterdata, the switchover request) and on the sleepInterval tick. Each write is
//! one transaction comparing the clusterdata revision and the leader key; on a conflict it
//! re-reads and decides again. Losing leadership stops decisions at once.

use control::faults::{Fault, Faults};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Duration;
use stolon_core::model::{
    decode, ClusterData, ClusterSpec, GoDuration, Pause, SentinelInfo, SwitchoverPhase,
    SwitchoverRequest, Timestamp,
};
use stolon_core::sentinel::{decide_with, Observations, ReasonKind, SentinelMemory};
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

#[derive(Default)]
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
    }
}

/// One consistent read of the cluster's keys.
struct Snapshot {
    cd: Option<(ClusterData, i64)>,
    obs: Observations,
    revision: i64,
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
        let mut watcher: Option<Watcher> = None;
        let mut sleep_interval = stolon_core::model::defaults::SLEEP_INTERVAL.as_std();
        let liveness = Liveness::new(stuck_bound(sleep_interval, self.cfg.store_timeout));
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
            match self.round(leadership, &mut memory).await {
                Ok(Some((snapshot, interval))) => {
                    if self.cfg.faults.has(Fault::SentinelLoopPanic) {
                        panic!("STOLON_E2E_BREAK=sentinel-loop-panic");
                    }
                    sleep_interval = interval;
                    liveness.set_bound(stuck_bound(interval, self.cfg.store_timeout));
                    rounds += 1;
                    // After a round that read the spec (the first may have created it).
                    if self.cfg.faults.has(Fault::SentinelLoopStall) && rounds >= 2 {
                        tracing::warn!("STOLON_E2E_BREAK=sentinel-loop-stall: the loop stops");
                        std::future::pending::<()>().await;
                    }
                    if watcher.is_none() {
                        let prefix = format!("{}/", self.cfg.store.prefix());
                        let store = self.cfg.store.store().clone();
                        watcher = Some(Watcher::from_revision(store, prefix, snapshot + 1));
                    }
                }
                // A conflict: someone wrote in between; read and decide again at once.
                Ok(None) => continue,
                Err(e) => {
                    self.metrics.store_errors.inc();
                    tracing::warn!(error = %e, "sentinel round failed");
                }
            }
            let wait = async {
                match watcher.as_mut() {
                    Some(w) => w.next().await.map(|_| ()),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = leadership.lost() => return,
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(sleep_interval) => {}
                r = wait => if let Err(e) = r {
                    tracing::warn!(error = %e, "watch failed; retrying");
                    watcher = None;
                    pause(shutdown, Duration::from_millis(200)).await;
                },
            }
        }
    }

    /// Reads, decides and writes once. `Ok(Some((revision, sleepInterval)))` after a round,
    /// `Ok(None)` on a write conflict.
    async fn round(
        &self,
        leadership: &Leadership,
        memory: &mut SentinelMemory,
    ) -> Result<Option<(i64, Duration)>, StoreError> {
        let snap = self.read().await?;
        let Some((cd, rev)) = snap.cd else {
            self.create_cluster(leadership).await?;
            let interval = stolon_core::model::defaults::SLEEP_INTERVAL.as_std();
            return Ok(Some((snap.revision, interval)));
        };
        self.metrics.rounds.inc();
        let (next, mem, reasons) =
            decide_with(&cd, memory, &snap.obs, self.clock.now(), self.cfg.faults);
        *memory = mem;
        let details: Vec<String> = reasons.iter().map(|r| r.detail.clone()).collect();
        let last = match self.last_reasons.lock() {
            Ok(mut l) => std::mem::replace(&mut *l, details),
            Err(_) => Vec::new(),
        };
        for r in &reasons {
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
        let interval = next.cluster.spec.sleep_interval().as_std();
        if next != cd {
            if leadership.is_lost() {
                return Ok(None);
            }
            match self
                .cfg
                .store
                .put_cluster_data(&next, rev, Some(leadership))
                .await?
            {
                CasOutcome::Written(_) => drop(self.metrics.writes.inc()),
                CasOutcome::Conflict => {
                    self.metrics.conflicts.inc();
                    tracing::info!(
                        "clusterdata changed underneath (or leadership lost); re-reading"
                    );
                    return Ok(None);
                }
            }
        }
        self.clear_switchover_request(&next, snap.obs.switchover.as_ref(), leadership)
            .await?;
        self.metrics
            .last_check_success
            .set(control::metrics::unix_now());
        Ok(Some((snap.revision, interval)))
    }

    async fn read(&self) -> Result<Snapshot, StoreError> {
        let store = &self.cfg.store;
        let range = store
            .store()
            .get_prefix(&format!("{}/", store.prefix()))
            .await?;
        let (cd_key, keepers, proxies, switchover, pause) = (
            store.clusterdata_key(),
            store.keepers_info_prefix(),
            store.proxies_info_prefix(),
            store.switchover_key(),
            store.pause_key(),
        );
        let mut snap = Snapshot {
            cd: None,
            obs: Observations::default(),
            revision: range.revision,
        };
        for kv in range.kvs {
            let bad = |e: stolon_core::model::ModelError| {
                tracing::error!(key = %kv.key, error = %e, "ignoring malformed document");
            };
            if kv.key == cd_key {
                match ClusterData::from_json(&kv.value) {
                    Ok(cd) => snap.cd = Some((cd, kv.mod_revision)),
                    Err(e) => {
                        // Never overwrite a document we cannot read: it may hold the truth.
                        return Err(StoreError::Malformed {
                            key: kv.key.clone(),
                            reason: e.to_string(),
                        });
                    }
                }
            } else if let Some(uid) = kv.key.strip_prefix(&keepers) {
                match decode("keeper info", &kv.value) {
                    Ok(info) => drop(snap.obs.keepers.insert(uid.to_string(), info)),
                    Err(e) => bad(e),
                }
            } else if let Some(uid) = kv.key.strip_prefix(&proxies) {
                match decode("proxy info", &kv.value) {
                    Ok(info) => drop(snap.obs.proxies.insert(uid.to_string(), info)),
                    Err(e) => bad(e),
                }
            } else if kv.key == pause {
                match decode::<Pause>("pause", &kv.value) {
                    Ok(p) => snap.obs.pause = Some(p),
                    Err(e) => bad(e),
                }
            } else if kv.key == switchover {
                match decode::<SwitchoverRequest>("switchover request", &kv.value) {
                    Ok(req) => snap.obs.switchover = Some(req),
                    Err(e) => bad(e),
                }
            }
        }
        Ok(snap)
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

/// Aborts a task when dropped (the guard lives as long as the leadership it watches).
struct DropAbort(tokio::task::JoinHandle<()>);

impl Drop for DropAbort {
    fn drop(&mut self) {
        self.0.abort();
    }
}
