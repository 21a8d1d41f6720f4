//! The keeper's loop: observe the local PostgreSQL, plan (`control::keeper::plan`), act,
//! publish; then wait for a clusterdata event, the postmaster's exit, the fence deadline or
//! the sleepInterval tick. KeeperInfo is published by its own task at once after a change
//! and every sleepInterval; each acknowledged publish extends the watchdog's fence deadline.

use crate::config::{self, Local, Rendered, Upstream};
use crate::layout::Layout;
use crate::postmaster::{self, Postmaster};
use crate::sql::{self, PgState};
use crate::tools::Tools;
use crate::watchdog::Watchdog;
use control::faults::{Fault, Faults};
use control::keeper::{fence_timeout, followed_db, my_db, plan, KeeperView, LocalObserved};
use control::keeper::{DataState, PgRole, Running};
use control::model::{
    ClusterData, Db, GoDuration, KeeperInfo, PostgresBinaryVersion, PostgresState,
};
use control::store::{info_ttl, ClusterStore, WatchUpdate, Watcher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Everything fixed at start (flags).
pub struct Settings {
    pub uid: String,
    pub layout: Layout,
    pub tools: Tools,
    pub local: Local,
    pub advertise_address: String,
    pub advertise_port: u16,
    pub su_password: Option<String>,
    pub repl_password: Option<String>,
    /// `--pg-auth-username` and its password: the proxy's auth role, kept on the master.
    pub auth: Option<(String, String)>,
    pub can_be_master: bool,
    pub can_be_sync: bool,
    pub priority: i32,
    pub store: ClusterStore,
    /// Go stolon's keeper metrics, updated by the loop.
    pub metrics: Arc<crate::metrics::KeeperMetrics>,
    /// What the health endpoints answer from, updated by the loop.
    pub health: Arc<Mutex<crate::health::HealthState>>,
    /// This binary, started again as the fencing watchdog.
    pub exe: PathBuf,
    /// Deliberate faults (tests only).
    pub faults: Faults,
    /// Failsafe mode's state, shared with the HTTP answers (`/failsafe/...`).
    pub failsafe: crate::failsafe::Shared,
    /// Where this keeper answers failsafe requests (host:port), published in KeeperInfo;
    /// empty without a metrics listener.
    pub failsafe_address: String,
}

impl Shared {
    fn new(failsafe: crate::failsafe::Shared) -> Shared {
        Shared {
            failsafe,
            info: Mutex::new(KeeperInfo::default()),
            last_ack: Mutex::new(None),
            publish_now: Notify::new(),
            sleep_ms: AtomicU64::new(5000),
            fence_ns: AtomicU64::new(fence_timeout(GoDuration::from_secs(20)).0 as u64),
            arm_pid: Mutex::new(None),
            origin: std::time::Instant::now(),
            beat_ms: AtomicU64::new(0),
            acting_until_ms: AtomicU64::new(0),
            watchdog: tokio::sync::Mutex::new(None),
            replayed: Mutex::new(None),
        }
    }

    /// Publishes at once that the db `db_uid` has replayed up to `lsn`.
    pub(crate) fn report_replayed(&self, db_uid: &str, lsn: u64) {
        *self.replayed.lock().expect("lock") = Some((db_uid.to_string(), lsn));
        let mut info = self.info.lock().expect("lock");
        let Some(ps) = info.postgres_state.as_mut() else {
            return;
        };
        if ps.uid == db_uid && ps.x_log_pos < lsn {
            ps.x_log_pos = lsn;
            drop(info);
            self.publish_now.notify_one();
        }
    }

    /// The replay position reported for `db_uid` since its last observation, if any.
    fn replayed_floor(&self, db_uid: &str) -> u64 {
        match &*self.replayed.lock().expect("lock") {
            Some((uid, lsn)) if uid == db_uid => *lsn,
            _ => 0,
        }
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// The loop is alive now.
    pub(crate) fn beat(&self) {
        self.beat_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// An action that may take up to `limit` is under way (`None`: it ended).
    pub(crate) fn acting(&self, limit: Option<Duration>) {
        let until = limit.map_or(0, |l| self.now_ms() + l.as_millis() as u64);
        self.acting_until_ms.store(until, Ordering::Relaxed);
    }

    /// Whether the loop proved itself alive recently enough to publish for it.
    pub(crate) fn loop_alive(&self) -> bool {
        loop_alive(
            self.now_ms(),
            self.beat_ms.load(Ordering::Relaxed),
            self.acting_until_ms.load(Ordering::Relaxed),
            Duration::from_nanos(self.fence_ns.load(Ordering::Relaxed)),
        )
    }
}

/// The loop beats at least every half fence window when idle (`publish_every`) and before
/// and after every round; what it awaits in a round (its SQL, a tool) is bounded and marked
/// with `acting`. So a loop that has not beaten for a fence window (failInterval / 2) and is
/// past any bounded step is stuck: the publisher stops, the master's fence window is no
/// longer re-armed, and the sentinel sees the keeper unhealthy.
pub(crate) fn loop_alive(now_ms: u64, beat_ms: u64, acting_until_ms: u64, fence: Duration) -> bool {
    now_ms.saturating_sub(beat_ms) <= fence.as_millis() as u64 || now_ms < acting_until_ms
}

/// State shared with the publisher task.
pub(crate) struct Shared {
    pub info: Mutex<KeeperInfo>,
    /// Send time of the last acknowledged KeeperInfo write.
    pub last_ack: Mutex<Option<Instant>>,
    pub publish_now: Notify,
    pub sleep_ms: AtomicU64,
    pub fence_ns: AtomicU64,
    /// The postmaster to fence, while it runs as primary.
    pub arm_pid: Mutex<Option<i32>>,
    /// Proof that the loop is alive, for the publisher: when it last began or ended a round,
    /// and until when an action under way may run (a base backup takes long), both in ms
    /// since `origin`. A loop that stops proving it stops the publishing, so the sentinel
    /// sees the keeper unhealthy and the watchdog is no longer re-armed.
    pub origin: std::time::Instant,
    pub beat_ms: AtomicU64,
    pub acting_until_ms: AtomicU64,
    pub watchdog: tokio::sync::Mutex<Option<Watchdog>>,
    /// (db uid, replay position) a switchover's target reported between its rounds
    /// (`switchover::follow_replay`): a floor for the position the rounds publish, which
    /// were observed earlier.
    pub replayed: Mutex<Option<(String, u64)>>,
    /// Failsafe mode's state (the publisher records each acknowledged write there too).
    pub failsafe: crate::failsafe::Shared,
}

/// One keeper: its settings, what it knows of its PostgreSQL instance, what the cluster view
/// asks of it, and the state it shares with the publisher task.
pub struct Keeper {
    pub(crate) settings: Settings,
    /// This process's boot UUID (new on every start): PostgreSQL is started only once the
    /// sentinel has seen it.
    pub(crate) boot_uuid: String,
    pub(crate) started: Instant,
    pub(crate) instance: Instance,
    pub(crate) view: View,
    pub(crate) shared: Arc<Shared>,
}

/// The local PostgreSQL instance, as the keeper runs and observes it.
pub(crate) struct Instance {
    pub(crate) postmaster: Option<Postmaster>,
    /// The last observed state (kept when a query fails, for fencing).
    pub(crate) state: Option<PgState>,
    /// The session the state is read on, kept between rounds.
    pub(crate) session: Option<sql::StateSession>,
    pub(crate) version: PostgresBinaryVersion,
    /// The last state query was answered (a frozen or overloaded PostgreSQL is not healthy
    /// for the health endpoints, while `state` keeps the last known state for fencing).
    pub(crate) answering: bool,
    /// A standby's hot-standby floors, from pg_controldata (see `config::Upstream`).
    pub(crate) floors: std::collections::BTreeMap<String, u64>,
    /// Stopped because the store was lost; not started again until it answers.
    pub(crate) fenced: bool,
    /// Only superuser and replication may connect (master restarted with sync standbys).
    pub(crate) restricted: bool,
    /// Where the WAL of a master this keeper stopped cleanly ends (its shutdown
    /// checkpoint), until PostgreSQL runs again: published for a switchover's promotion.
    pub(crate) shutdown_checkpoint: Option<u64>,
    /// The switchover request a checkpoint ahead of the stop was started for (once each).
    pub(crate) switchover_checkpoint: Option<control::model::Timestamp>,
    /// The switchover request this keeper, its target, follows its replay position for,
    /// and the task doing it.
    pub(crate) catch_up: Option<(control::model::Timestamp, tokio::task::AbortHandle)>,
    /// A reload was sent and no plan has found the configuration current since: the next
    /// one logs Go stolon's "postgres parameters not changed" (operators' checks match it).
    pub(crate) reloaded: bool,
}

impl Instance {
    /// PostgreSQL stopped or exited: its last state and the session it was read on go.
    pub(crate) fn forget_observed(&mut self) {
        self.state = None;
        self.session = None;
    }

    /// The postmaster exited on its own (not stopped by the keeper).
    fn postmaster_exited(&mut self) {
        tracing::warn!("PostgreSQL exited");
        self.postmaster = None;
        self.forget_observed();
    }
}

/// The cluster view and how far this keeper has followed it.
#[derive(Default)]
pub(crate) struct View {
    pub(crate) cd: Option<ClusterData>,
    /// (db uid, generation) of the last fully applied spec.
    pub(crate) converged: Option<(String, i64)>,
    /// Why the last action failed, reported in KeeperInfo until one succeeds.
    pub(crate) problem: Option<String>,
    /// The store revision of `cd` (failsafe acknowledgements compare it).
    pub(crate) revision: i64,
}

impl Keeper {
    pub fn new(settings: Settings, version: PostgresBinaryVersion) -> Keeper {
        let shared = Arc::new(Shared::new(settings.failsafe.clone()));
        Keeper {
            settings,
            boot_uuid: uuid::Uuid::new_v4().to_string(),
            started: Instant::now(),
            instance: Instance {
                postmaster: None,
                state: None,
                session: None,
                version,
                answering: false,
                floors: Default::default(),
                shutdown_checkpoint: None,
                switchover_checkpoint: None,
                catch_up: None,
                reloaded: false,
                fenced: false,
                restricted: false,
            },
            view: View::default(),
            shared,
        }
    }

    /// Runs until `shutdown`, then stops PostgreSQL cleanly.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        if let Some(pid) = postmaster::running_pid(&self.settings.layout.pg_data()) {
            tracing::warn!(
                pid,
                "adopting a PostgreSQL left running by an earlier keeper"
            );
            self.instance.postmaster = Some(Postmaster::Adopted(pid));
            self.instance.shutdown_checkpoint = None;
        }
        *self.shared.watchdog.lock().await = Some(Watchdog::spawn(&self.settings.exe)?);
        let (cd_tx, mut cd_rx) = watch::channel(None);
        tokio::spawn(watch_cluster_data(
            self.settings.store.clone(),
            cd_tx,
            self.settings.failsafe.clone(),
            shutdown.clone(),
        ));
        let publisher = tokio::spawn(publish(
            self.settings.store.clone(),
            self.settings.uid.clone(),
            self.shared.clone(),
            shutdown.clone(),
        ));
        let failsafe = tokio::spawn(crate::failsafe::run(
            self.settings.failsafe.clone(),
            crate::failsafe::arm_for_hold(self.shared.clone()),
            shutdown.clone(),
        ));
        let probe_store = self.settings.store.clone();
        let probe = tokio::spawn(crate::failsafe::probe_store(
            self.settings.failsafe.clone(),
            move || {
                let store = probe_store.clone();
                async move { store.get_cluster_data().await.is_ok() }
            },
            shutdown.clone(),
        ));
        self.refresh_info();
        let mut first = true;
        loop {
            self.shared.beat();
            if self.view.converged.is_some() {
                if self.settings.faults.has(Fault::KeeperLoopPanic) {
                    panic!("STOLON_E2E_BREAK=keeper-loop-panic");
                }
                if self.settings.faults.has(Fault::KeeperLoopStall) {
                    tracing::warn!("STOLON_E2E_BREAK=keeper-loop-stall: the loop stops");
                    std::future::pending::<()>().await;
                }
            }
            let fresh = first || cd_rx.has_changed().unwrap_or(false);
            first = false;
            let (cd, revision) = match cd_rx.borrow_and_update().clone() {
                Some((cd, rev)) => (Some(cd), rev),
                None => (None, 0),
            };
            self.view.cd = cd;
            self.view.revision = revision;
            self.settings.metrics.clusterdata_revision.set(revision);
            if fresh && self.view.cd.is_some() {
                let now = control::metrics::unix_now();
                self.settings.metrics.clusterdata_last_valid_update.set(now);
            }
            self.update_timing();
            let acted = self.round().await;
            self.shared.beat();
            self.refresh_info();
            self.update_metrics();
            self.update_health();
            if acted {
                // Let the publisher report the change before the next round.
                tokio::task::yield_now().await;
                continue;
            }
            let fence_at = self.fence_deadline();
            let sleep = Duration::from_millis(self.shared.sleep_ms.load(Ordering::Relaxed));
            // Idle, the loop still beats twice per fence window (see `loop_alive`).
            let sleep = publish_every(sleep, self.fence_timeout());
            let exited = async {
                match self.instance.postmaster.as_mut() {
                    Some(pm) => pm.exited().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = cd_rx.changed() => {}
                _ = tokio::time::sleep(sleep) => {}
                _ = tokio::time::sleep_until(fence_at) => {}
                _ = exited => self.instance.postmaster_exited(),
            }
        }
        self.settings
            .metrics
            .shutdown
            .set(control::metrics::unix_now());
        self.stop_pg(nix::sys::signal::Signal::SIGINT).await;
        // The publisher removes the info (revokes its lease) as it stops.
        let _ = tokio::time::timeout(Duration::from_secs(5), publisher).await;
        failsafe.abort();
        probe.abort();
        Ok(())
    }

    /// A step of the loop that may take up to `limit` is under way (`None`: it ended): the
    /// publisher and the health endpoints count the loop alive until then.
    pub(crate) fn acting(&self, limit: Option<Duration>) {
        self.shared.acting(limit);
        if let Ok(mut h) = self.settings.health.lock() {
            h.acting_until = limit.map(|l| std::time::Instant::now() + l);
        }
    }

    /// The health endpoints' view from what the last round saw.
    fn update_health(&self) {
        let my = self.my_db();
        let my_uid = my.map(|d| d.uid.as_str());
        let cd = self.view.cd.as_ref();
        let master_uid = cd.map(|c| c.cluster.status.master.as_str());
        let elected = my_uid.is_some() && my_uid == master_uid;
        let routed = my_uid.is_some() && my_uid == cd.map(|c| c.proxy.spec.master_db_uid.as_str());
        let master_pos = cd
            .zip(master_uid)
            .and_then(|(c, m)| c.dbs.get(m))
            .map(|d| d.status.x_log_pos);
        let pg = self.instance.state.as_ref();
        let lag = match (pg, master_pos) {
            (Some(p), Some(m)) if p.in_recovery && !elected => Some(m.saturating_sub(p.xlog_pos)),
            (Some(p), _) if !p.in_recovery => Some(0),
            _ => None,
        };
        let converged = match (my, &self.view.converged) {
            (Some(db), Some((u, g))) => *u == db.uid && *g == db.generation,
            _ => false,
        };
        let state = crate::health::HealthState {
            loop_at: Some(Instant::now().into_std()),
            loop_bound: self.fence_timeout(),
            acting_until: None,
            pg_running: self.instance.postmaster.is_some()
                && pg.is_some()
                && self.instance.answering,
            in_recovery: pg.is_some_and(|p| p.in_recovery),
            streaming: pg.is_some_and(|p| p.streaming),
            fenced: self.instance.fenced,
            elected,
            routed,
            converged,
            lag,
            failsafe: (self.settings.failsafe.lock().ok())
                .map(|f| f.health_json(Instant::now()))
                .unwrap_or_default(),
        };
        if let Ok(mut h) = self.settings.health.lock() {
            *h = state;
        }
    }

    /// Go stolon's keeper gauges from what the last round saw.
    fn update_metrics(&self) {
        let m = &self.settings.metrics;
        let target = self.my_db().and_then(|db| db.spec.role).map(|r| match r {
            control::model::DbRole::Master => "master",
            control::model::DbRole::Standby => "standby",
        });
        crate::metrics::set_role(&m.target_role, target);
        let local =
            self.instance
                .state
                .as_ref()
                .map(|p| if p.in_recovery { "standby" } else { "master" });
        crate::metrics::set_role(&m.local_role, local);
        let running = self.instance.state.is_some();
        m.needs_reload
            .set(i64::from(running && !self.config_current()));
        m.needs_restart.set(i64::from(
            self.instance
                .state
                .as_ref()
                .is_some_and(|p| p.pending_restart),
        ));
        if running && self.view.problem.is_none() {
            m.last_sync_success.set(control::metrics::unix_now());
        }
        let sleep = self.shared.sleep_ms.load(Ordering::Relaxed) as f64 / 1000.0;
        m.sleep_interval.set(sleep);
        if let Some(r) = (self.settings.failsafe.lock().ok()).and_then(|f| f.report(Instant::now()))
        {
            m.failsafe_held.set(i64::from(!r.held_since.is_empty()));
            m.failsafe_acks.set(i64::from(r.acks));
            m.failsafe_peers.set(i64::from(r.peers));
            m.failsafe_promised.set(i64::from(r.promised_for_ms > 0));
        }
    }

    /// sleepInterval and the fence timeout from the current spec.
    fn update_timing(&self) {
        if let Some(cd) = &self.view.cd {
            let spec = &cd.cluster.spec;
            let ms = spec
                .sleep_interval()
                .as_std()
                .as_millis()
                .clamp(100, 60_000) as u64;
            self.shared.sleep_ms.store(ms, Ordering::Relaxed);
            let fence = fence_timeout(spec.fail_interval()).0.max(0) as u64;
            self.shared.fence_ns.store(fence, Ordering::Relaxed);
        }
    }

    pub(crate) fn fence_timeout(&self) -> Duration {
        Duration::from_nanos(self.shared.fence_ns.load(Ordering::Relaxed))
    }

    /// Time since the send time of the last acknowledged publish (or since start).
    pub(crate) fn store_silence(&self) -> Duration {
        let ack = *self.shared.last_ack.lock().expect("lock");
        ack.unwrap_or(self.started).elapsed()
    }

    /// How long the watchdog may wait from now: a quarter past the keeper's own fence
    /// deadline, counted from the send time of the last acknowledged publish.
    pub(crate) fn watchdog_window(&self) -> Duration {
        let fence = self.fence_timeout();
        (fence + fence / 4).saturating_sub(self.effective_silence())
    }

    /// When a running master must be fenced if no publish is acknowledged before (nor a
    /// failsafe hold extends it).
    fn fence_deadline(&self) -> Instant {
        let ack = *self.shared.last_ack.lock().expect("lock");
        let primary = self.instance.state.as_ref().is_some_and(|p| !p.in_recovery);
        if !primary || self.instance.fenced {
            return Instant::now() + Duration::from_secs(3600);
        }
        let store = ack.unwrap_or(self.started) + self.fence_timeout();
        store.max(self.hold_until().unwrap_or(store)) + Duration::from_millis(1)
    }

    /// Observe, plan, act once; true if something was done (observe again at once).
    async fn round(&mut self) -> bool {
        // The observation's own bounds: the connect, the state query (requestTimeout) and
        // pg_controldata.
        let limit = Duration::from_secs(8) + self.request_timeout();
        self.acting(Some(limit));
        let started = Instant::now();
        let observed = self.observe().await;
        self.acting(None);
        let observe = started.elapsed();
        let Some(local) = observed else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            return false;
        };
        self.update_failsafe();
        let promised = (self.settings.failsafe.lock()).is_ok_and(|f| f.promised_at(Instant::now()));
        let view = KeeperView {
            keeper_uid: &self.settings.uid,
            boot_uuid: &self.boot_uuid,
            cd: self.view.cd.as_ref(),
            store_silence: GoDuration::from_std(self.effective_silence()),
            faults: self.settings.faults,
            promised,
        };
        let actions = plan(&view, &local);
        tracing::debug!(?actions, "plan");
        self.checkpoint_ahead_of_switchover(&local);
        self.catch_up_for_switchover(&local);
        let acting = Instant::now();
        let acted = self.execute(actions).await;
        tracing::debug!(?observe, act = ?acting.elapsed(), "round");
        acted
    }

    /// What runs locally; `None` while PostgreSQL runs but cannot answer yet (starting).
    async fn observe(&mut self) -> Option<LocalObserved> {
        if self
            .instance
            .postmaster
            .as_mut()
            .is_some_and(|pm| pm.has_exited())
        {
            self.instance.postmaster_exited();
        }
        let data = if self.settings.layout.has_data() {
            DataState::Present {
                db_uid: self.settings.layout.db_state().map(|s| s.db_uid),
            }
        } else {
            DataState::Missing
        };
        let running = match &self.instance.postmaster {
            None => None,
            Some(_) => match self.query_state().await {
                Some(st) => Some(Running {
                    role: if st.in_recovery {
                        PgRole::Standby
                    } else {
                        PgRole::Primary
                    },
                    pending_restart: st.pending_restart,
                    // The timeline the keeper publishes: for a standby the highest of the
                    // walreceiver's, the recovery and checkpoint ones and the WAL file's
                    // for the replay position, so it never lags the position (no false
                    // fork). A standby stuck at a fork streams only for milliseconds per
                    // retry, so the streaming walreceiver's alone was almost never seen,
                    // and such a standby was left waiting forever (CI caught it).
                    timeline: st.timeline,
                    xlog_pos: st.xlog_pos,
                    history: st.history,
                }),
                // Cannot answer: keep fencing decisions on the last known role.
                None => match &self.instance.state {
                    Some(st) if !st.in_recovery => Some(Running {
                        role: PgRole::Primary,
                        pending_restart: false,
                        timeline: 0,
                        xlog_pos: 0,
                        history: Vec::new(),
                    }),
                    _ => return None,
                },
            },
        };
        self.refresh_floors().await;
        self.after_observe();
        Some(LocalObserved {
            data,
            running,
            config_current: self.config_current(),
            fenced: self.instance.fenced,
            standby_data: self
                .settings
                .layout
                .pg_data()
                .join("standby.signal")
                .exists(),
            clean_stop: self.instance.shutdown_checkpoint.is_some()
                && self.instance.postmaster.is_none(),
        })
    }

    pub(crate) async fn query_state(&mut self) -> Option<PgState> {
        self.instance.answering = false;
        let limit = self.request_timeout();
        let data_dir = self.settings.layout.pg_data();
        let kept = self.instance.session.take();
        let started = Instant::now();
        let (st, session, reused) =
            sql::observe(kept, &self.conn(), &data_dir, limit, SESSION_MAX_AGE).await?;
        tracing::debug!(elapsed = ?started.elapsed(), reused, "observed PostgreSQL");
        self.instance.session = Some(session);
        self.instance.state = Some(st.clone());
        self.instance.answering = true;
        Some(st)
    }

    /// A session for the keeper's own statements: the kept state session while it is
    /// usable (a new one per action cost a backend fork each round on a master), else a
    /// new one.
    pub(crate) async fn session(&mut self, timeout: Duration) -> anyhow::Result<sql::StateSession> {
        match (self.instance.session.take()).filter(|s| s.reusable(SESSION_MAX_AGE)) {
            Some(s) => Ok(s),
            None => sql::StateSession::open(&self.conn(), timeout).await,
        }
    }

    /// Keeps `session` for the next round, unless what ran on it failed (it may be broken,
    /// or left in a failed transaction).
    pub(crate) fn give_back(&mut self, session: sql::StateSession, ok: bool) {
        if ok && self.instance.postmaster.is_some() {
            self.instance.session = Some(session);
        }
    }

    /// The db spec's requestTimeout, which bounds the keeper's queries, as in Go stolon.
    fn request_timeout(&self) -> Duration {
        self.my_db()
            .map(|db| db.spec.request_timeout.as_std())
            .filter(|d| !d.is_zero())
            .unwrap_or(control::model::defaults::REQUEST_TIMEOUT.as_std())
    }

    pub(crate) fn conn(&self) -> sql::Conn {
        sql::Conn {
            socket_dir: self.settings.local.socket_dir.clone(),
            port: self.settings.local.port,
            user: self.settings.local.su_user.clone(),
            password: self.settings.su_password.clone(),
        }
    }

    /// Housekeeping on what was observed: a promoted pitr db, the sync restriction.
    fn after_observe(&mut self) {
        let Some(st) = &self.instance.state else {
            return;
        };
        if !st.in_recovery {
            if let Some(mut ds) = self.settings.layout.db_state().filter(|d| d.pitr_pending) {
                ds.pitr_pending = false;
                let _ = self.settings.layout.set_db_state(Some(&ds));
            }
        }
        if self.instance.restricted {
            let wanted: Vec<String> = self
                .my_db()
                .map(|db| db.spec.synchronous_standbys.clone())
                .unwrap_or_default()
                .into_iter()
                .filter(|u| u != control::sentinel::PLACEHOLDER_STANDBY)
                .collect();
            if wanted.iter().all(|u| st.sync_standbys.contains(u)) {
                tracing::info!("synchronous standbys in sync: admitting all users again");
                self.instance.restricted = false;
            }
        }
    }

    /// `pg_controldata` of the data dir.
    pub(crate) async fn controldata(&self) -> Result<String, crate::tools::ToolError> {
        let dir = self.settings.layout.pg_data();
        self.settings
            .tools
            .run(
                "pg_controldata",
                [dir.as_os_str()],
                &[],
                Duration::from_secs(5),
            )
            .await
    }

    /// For a standby, the primary's hot-standby settings as this data dir last replayed them.
    async fn refresh_floors(&mut self) {
        let standby = self.my_db().is_some_and(|db| followed_db(db).is_some());
        if !standby || !self.settings.layout.has_data() {
            self.instance.floors.clear();
            return;
        }
        match self.controldata().await {
            Ok(out) => self.instance.floors = config::parse_floors(&out),
            Err(e) => tracing::debug!(error = %e, "pg_controldata failed: keeping the last floors"),
        }
    }

    pub(crate) fn my_db(&self) -> Option<&Db> {
        my_db(self.view.cd.as_ref()?, &self.settings.uid)
    }

    /// The configuration the current view asks for, if this keeper has a db.
    pub(crate) fn rendered(&self) -> Option<Rendered> {
        let cd = self.view.cd.as_ref()?;
        let db = my_db(cd, &self.settings.uid)?;
        let upstream = followed_db(db).and_then(|m| cd.dbs.get(m)).and_then(|m| {
            Some(Upstream {
                host: Some(m.status.listen_address.clone()).filter(|a| !a.is_empty())?,
                port: m.status.port?,
                floors: self.instance.floors.clone(),
            })
        });
        let pitr = self
            .settings
            .layout
            .db_state()
            .is_some_and(|d| d.pitr_pending);
        let previous = if db.spec.include_previous_config {
            self.settings.layout.init_params()
        } else {
            Default::default()
        };
        Some(config::render(
            cd,
            db,
            &self.settings.local,
            upstream.as_ref(),
            self.instance.restricted,
            pitr,
            &previous,
        ))
    }

    fn config_current(&self) -> bool {
        let Some(r) = self.rendered() else {
            return true;
        };
        let dir = self.settings.layout.pg_data();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        read("postgresql.conf") == r.postgresql_conf
            && read("pg_hba.conf") == r.pg_hba_conf
            && dir.join("standby.signal").exists() == r.standby_signal
            && crate::layout::auto_conf_is_dev_null(&dir)
    }

    /// The info to publish, from the latest observation.
    pub(crate) fn refresh_info(&self) {
        let db_uid = self.settings.layout.db_state().map(|s| s.db_uid);
        let st = self.instance.state.clone().unwrap_or_default();
        let running = self.instance.postmaster.is_some() && self.instance.state.is_some();
        // A standby's position may have been reported since it was observed.
        let xlog_pos = match (&db_uid, st.in_recovery) {
            (Some(uid), true) => st.xlog_pos.max(self.shared.replayed_floor(uid)),
            _ => st.xlog_pos,
        };
        let state = db_uid.map(|uid| PostgresState {
            generation: match &self.view.converged {
                Some((u, g)) if *u == uid => *g,
                _ => 0,
            },
            uid,
            listen_address: self.settings.advertise_address.clone(),
            port: Some(self.settings.advertise_port),
            healthy: running && !self.instance.fenced,
            system_id: st.system_id,
            timeline_id: st.timeline,
            x_log_pos: xlog_pos,
            timelines_history: st.history,
            pg_parameters: self.settings.layout.init_params(),
            synchronous_standbys: st.sync_standbys,
            older_wal_file: st.older_wal_file,
            shutdown_checkpoint: self
                .instance
                .shutdown_checkpoint
                .filter(|_| self.instance.postmaster.is_none())
                .unwrap_or(0),
            ..Default::default()
        });
        let info = KeeperInfo {
            uid: self.settings.uid.clone(),
            cluster_uid: self
                .view
                .cd
                .as_ref()
                .map(|c| c.cluster.uid.clone())
                .unwrap_or_default(),
            boot_uuid: self.boot_uuid.clone(),
            postgres_binary_version: self.instance.version.clone(),
            postgres_state: state,
            can_be_master: Some(self.settings.can_be_master),
            can_be_synchronous_replica: Some(self.settings.can_be_sync),
            priority: self.settings.priority,
            fenced: self.instance.fenced,
            failsafe_address: self.settings.failsafe_address.clone(),
            failsafe: (self.settings.failsafe.lock().ok()).and_then(|f| f.report(Instant::now())),
            ..Default::default()
        };
        {
            let mut arm = self.shared.arm_pid.lock().expect("lock");
            *arm = match (&self.instance.postmaster, &self.instance.state) {
                (Some(pm), Some(st)) => pm
                    .pid()
                    .filter(|_| !st.in_recovery && !self.instance.fenced),
                // Started but not observed yet: keep what Start/Promote armed, or a keeper
                // frozen right now would leave its new master unfenced.
                (Some(_), None) => *arm,
                (None, _) => None,
            };
            if self.settings.faults.has(Fault::NoSelfFencing) {
                *arm = None;
            }
        }
        let changed = {
            let mut cur = self.shared.info.lock().expect("lock");
            let changed = *cur != info;
            *cur = info;
            changed
        };
        if changed {
            self.shared.publish_now.notify_one();
        }
    }
}

/// Keeps the latest readable clusterdata in `tx` (a malformed one is logged and skipped).
async fn watch_cluster_data(
    store: ClusterStore,
    tx: watch::Sender<Option<(ClusterData, i64)>>,
    failsafe: crate::failsafe::Shared,
    shutdown: CancellationToken,
) {
    // Failsafe answers go by the newest clusterdata read, not the one the loop last
    // planned on (a loop in a long step would have a master ask with an old revision,
    // which its peers refuse).
    let send = |cd: ClusterData, rev: i64| {
        if let Ok(mut f) = failsafe.lock() {
            f.read(&cd, rev);
        }
        tx.send_replace(Some((cd, rev)));
    };
    let key = store.clusterdata_key();
    let mut failing = false;
    while !shutdown.is_cancelled() {
        // Read, then watch from the revision after the one read (nothing missed between).
        let start = match store.get_cluster_data().await {
            Ok(Some((cd, rev))) => {
                failing = false;
                send(cd, rev);
                rev + 1
            }
            Ok(None) => match store.store().get_prefix(&key).await {
                Ok(range) => range.revision + 1,
                Err(_) => continue,
            },
            Err(e) => {
                // Once per run of failures: an outage may last minutes in failsafe mode.
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(error = %e, "cannot read clusterdata (retrying every second; repeats at debug)");
                } else {
                    tracing::debug!(error = %e, "cannot read clusterdata");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut watcher = Watcher::from_revision(store.store().clone(), key.clone(), start);
        loop {
            let update = tokio::select! {
                _ = shutdown.cancelled() => return,
                u = watcher.next() => u,
            };
            match update {
                Ok(WatchUpdate::Events(events)) => {
                    if let Some(ev) = events.last() {
                        match ClusterData::from_json(&ev.kv.value) {
                            Ok(cd) => send(cd, ev.kv.mod_revision),
                            Err(e) => {
                                tracing::error!(error = %e, "malformed clusterdata: keeping the last good one")
                            }
                        }
                    }
                }
                Ok(WatchUpdate::Resync(_)) => break,
                Ok(WatchUpdate::Progress(_)) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "clusterdata watch failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
            }
        }
    }
}

/// Publishes KeeperInfo at once when asked and every sleepInterval, each time with a new
/// infoUID; an acknowledged write extends the watchdog's fence deadline.
async fn publish(
    store: ClusterStore,
    uid: String,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    // The lease TTL follows sleepInterval (max(2 x interval, 20 s)): a new key when it changes.
    let mut ttl_for = Duration::ZERO;
    let mut key = store.keeper_info_key(&uid, info_ttl(ttl_for));
    let mut stalled = false;
    let mut failing = false;
    loop {
        let sleep = Duration::from_millis(shared.sleep_ms.load(Ordering::Relaxed));
        if sleep != ttl_for {
            ttl_for = sleep;
            key = store.keeper_info_key(&uid, info_ttl(sleep));
        }
        let fence = Duration::from_nanos(shared.fence_ns.load(Ordering::Relaxed));
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = key.revoke().await;
                return;
            }
            _ = shared.publish_now.notified() => {}
            _ = tokio::time::sleep(match failing {
                true => PUBLISH_RETRY,
                false => publish_every(sleep, fence),
            }) => {}
        }
        if !shared.loop_alive() {
            if !stalled {
                tracing::error!(
                    "the keeper's loop has not completed a round in time: not publishing, so the sentinel sees this keeper unhealthy"
                );
            }
            stalled = true;
            continue;
        }
        stalled = false;
        let mut info = shared.info.lock().expect("lock").clone();
        info.info_uid = uuid::Uuid::new_v4().simple().to_string();
        let sent = Instant::now();
        let bytes = serde_json::to_vec(&info).unwrap_or_default();
        // One write can hang on an etcd member whose leader died (until etcd's own request
        // timeout, 5 s): bounded to a quarter of the fence window and sent again soon, the
        // next write reaches the leader the others elect meanwhile. Waiting it out made a
        // just-elected master fence itself when the etcd leader died during the failover.
        let attempt = (fence / 4).max(PUBLISH_RETRY);
        let put = match tokio::time::timeout(attempt, key.put(bytes)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {attempt:?}")),
        };
        match put {
            Ok(_) => {
                failing = false;
                *shared.last_ack.lock().expect("lock") = Some(sent);
                if let Ok(mut f) = shared.failsafe.lock() {
                    f.store_ack = Some(sent);
                }
                let pid = *shared.arm_pid.lock().expect("lock");
                let fence = Duration::from_nanos(shared.fence_ns.load(Ordering::Relaxed));
                let mut wd = shared.watchdog.lock().await;
                if let Some(wd) = wd.as_mut() {
                    // The watchdog is the backstop: a little after the keeper's own deadline.
                    let within = (fence + fence / 4).saturating_sub(sent.elapsed());
                    let put = sent.elapsed();
                    tracing::debug!(?pid, ?within, ?put, "fencing watchdog deadline");
                    let r = match pid {
                        Some(pid) => wd.arm(pid, within).await,
                        None => wd.disarm().await,
                    };
                    if let Err(e) = r {
                        tracing::error!(error = %e, "fencing watchdog unreachable");
                    }
                }
            }
            // Logged once per run of failures (retried every PUBLISH_RETRY meanwhile).
            Err(error) if failing => tracing::debug!(%error, "cannot publish keeper info"),
            Err(error) => {
                failing = true;
                tracing::warn!(%error, "cannot publish keeper info (retrying)");
            }
        }
    }
}

/// The pause before a failed KeeperInfo write is tried again, and the shortest bound on
/// one write.
const PUBLISH_RETRY: Duration = Duration::from_millis(200);

/// How long the state session is kept before a new one replaces it: short enough that a
/// PostgreSQL refusing new sessions stops looking healthy within a few rounds, long
/// enough that a switchover's burst of rounds opens none.
const SESSION_MAX_AGE: Duration = Duration::from_secs(2);

/// How long the publisher waits between periodic publishes: sleepInterval, but at most half
/// the fence window (two publishes per window, as stolon's defaults give: sleepInterval 5 s,
/// window 10 s), since each acknowledged publish is what keeps a master from fencing itself
/// (failInterval / 2 after the last one). With failInterval 5 s and stolon's default
/// sleepInterval 5 s the master fenced itself between publishes, every few seconds.
fn publish_every(sleep: Duration, fence: Duration) -> Duration {
    if fence.is_zero() {
        sleep
    } else {
        sleep.min(fence / 2)
    }
}

#[cfg(test)]
mod tests {
    use super::loop_alive;

    #[tokio::test]
    async fn a_reported_replay_position_is_published_at_once_and_kept_as_a_floor() {
        use super::*;
        use control::model::PostgresState;
        let shared = Shared::new(Default::default());
        shared.info.lock().expect("lock").postgres_state = Some(PostgresState {
            uid: "d2".into(),
            x_log_pos: 100,
            ..Default::default()
        });
        let published = shared.publish_now.notified();
        shared.report_replayed("d2", 150);
        tokio::time::timeout(Duration::from_secs(5), published)
            .await
            .expect("a publish is asked for");
        let pos = |s: &Shared| {
            s.info
                .lock()
                .expect("lock")
                .postgres_state
                .clone()
                .map(|p| p.x_log_pos)
        };
        assert_eq!(pos(&shared), Some(150));
        // Neither an older position nor another db's lowers or moves it.
        shared.report_replayed("d2", 120);
        shared.report_replayed("d9", 900);
        assert_eq!(pos(&shared), Some(150));
        assert_eq!(
            shared.replayed_floor("d2"),
            0,
            "the last report was another db's"
        );
        shared.report_replayed("d2", 160);
        assert_eq!(shared.replayed_floor("d2"), 160);
        assert_eq!(shared.replayed_floor("d9"), 0);
    }

    #[test]
    fn a_publish_comes_at_least_twice_per_fence_window() {
        use super::publish_every;
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        let table = [
            (s(5), s(10), s(5)),        // stolon's defaults: failInterval 20 s
            (s(5), ms(2500), ms(1250)), // failInterval 5 s with sleepInterval 5 s
            (s(1), ms(2500), s(1)),
            (ms(500), s(10), ms(500)),
            (s(5), Duration::ZERO, s(5)), // no fence window known
        ];
        for (sleep, fence, want) in table {
            assert_eq!(publish_every(sleep, fence), want, "{sleep:?} {fence:?}");
        }
    }
    use std::time::Duration;

    /// The bound is the fence window (failInterval / 2) from the spec, not a fixed 30 s: with
    /// stolon's default failInterval of 20 s a stuck loop stops publishing after 10 s.
    #[test]
    fn the_loop_proves_itself_by_rounds_or_a_bounded_action() {
        let fence = Duration::from_secs(10);
        assert!(loop_alive(10_000, 9_000, 0, fence), "a recent round");
        assert!(
            loop_alive(20_000, 10_000, 0, fence),
            "within the fence window"
        );
        assert!(!loop_alive(20_001, 10_000, 0, fence), "no round for longer");
        assert!(
            loop_alive(100_000, 10_000, 200_000, fence),
            "a base backup under way"
        );
        assert!(
            !loop_alive(200_001, 10_000, 200_000, fence),
            "past the action's bound"
        );
        let e2e = Duration::from_millis(2500); // failInterval 5 s
        assert!(loop_alive(12_500, 10_000, 0, e2e));
        assert!(!loop_alive(12_501, 10_000, 0, e2e));
    }
}
