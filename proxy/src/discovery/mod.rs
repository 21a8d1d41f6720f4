//! Discovery and fencing: watch `P/clusterdata` and apply every change at once; every
//! proxyCheckInterval check it and prove liveness (proof of contact both ways); fence
//! (sever everything, refuse, optionally stop listening) once there was no successful
//! contact for proxyTimeout. ProxyInfo is published right after a new generation is applied
//! and the old master's sessions are closed.
//!
//! Liveness, two ways: while the clusterdata says its sentinel honours leases
//! (`proxy.spec.leaseLiveness`, ours), ProxyInfo is written only when what it reports
//! changes and the check renews its lease (TTL 2 x proxyTimeout), so idle proxies cost the
//! store no writes; otherwise (a Go sentinel) it is rewritten with a new infoUID every
//! check, as Go's proxy does.
//!
//! The check reads the whole document only when the watch may have missed something (it
//! is down, or the key's revision moved past the one applied): else it asks etcd whether
//! the key is still at that revision, a read-only compare that carries none of the
//! document, so a fleet of idle proxies does not pull it from etcd every interval.
//!
//! Failsafe mode (spec `failsafeMode`): while the store contact goes stale, the master's
//! keeper is asked directly (`failsafe`); its confirmed hold extends the fence deadline.

mod contact;

use crate::fence::StoreContact;
use crate::metrics::Metrics;
use crate::route::{desired_with_replicas, Desired, NoMaster, Route, Routes};
use control::model::{ClusterData, GoDuration, ProxyInfo};
use control::store::{info_ttl_for_proxy, ClusterStore, EventKind, LeasedKey, StoreError};
use control::store::{WatchUpdate, Watcher};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use contact::{failsafe_target, reported_timeout, store_deadline};

const READ: crate::metrics::ResultLabel = crate::metrics::ResultLabel { result: "read" };
const UNCHANGED: crate::metrics::ResultLabel = crate::metrics::ResultLabel {
    result: "unchanged",
};

/// How long to wait for severed sessions to close before reporting the generation anyway
/// (they were told to close; this only bounds a stuck task).
const SEVER_WAIT: Duration = Duration::from_secs(2);
/// Pause before retrying a broken watch.
const WATCH_RETRY: Duration = Duration::from_millis(200);

use control::faults::{Fault, Faults};

pub struct Discovery {
    pub store: ClusterStore,
    pub uid: String,
    pub routes: Arc<Routes>,
    pub metrics: Arc<Metrics>,
    /// True while listeners should be open.
    pub listening: watch::Sender<bool>,
    /// `--stop-listening`: close the listeners while fenced.
    pub stop_listening: bool,
    /// `--ro-max-lag` when the read-only listener is on: the pool's lag bound in bytes.
    pub ro_max_lag: Option<u64>,
    /// `--drain-timeout`: how long a planned switchover waits for the old master's sessions
    /// to reach a transaction boundary before severing the rest.
    pub drain_timeout: Duration,
    /// Deliberate faults (tests only).
    pub faults: Faults,
    /// Published for other proxies: the owner id in this proxy's cancel keys, and where it
    /// takes CancelRequests (empty: nowhere they can reach).
    pub cancel_id: u32,
    pub cancel_address: String,
}

struct State {
    contact: StoreContact,
    check_interval: Duration,
    info: LeasedKey,
    /// The generation last reported in ProxyInfo.
    published: Option<i64>,
    /// The last ProxyInfo written, to tell whether a check must rewrite it.
    written: Option<ProxyInfo>,
    /// The last clusterdata read says its sentinel honours lease liveness.
    lease_mode: bool,
    /// The master route last installed.
    routed: Option<Result<String, NoMaster>>,
    /// A longer proxyTimeout the spec asks for, taken on once the info reports it.
    raise_timeout: Option<Duration>,
    /// The route the store asks for, before fencing is applied.
    wanted: Desired,
    fenced: bool,
    /// A planned switchover's drain under way: the generation is reported once it ends.
    draining: Option<Draining>,
    /// Failsafe mode on: the routed master's keeper (failsafe address), db, and how often
    /// to ask it.
    failsafe: Option<(String, String, Duration)>,
    /// Routing on the failsafe now (logged when it starts and ends).
    on_failsafe: bool,
    /// The last check's read failed (a failure is logged once per run).
    read_failing: bool,
    /// The clusterdata revision the wanted route was computed from (`None`: none, or a
    /// document that could not be read). While the watch is up and the key is still at
    /// it, a check only proves contact: nothing of the document is read again.
    seen_revision: Option<i64>,
}

/// The old master's sessions closing at transaction boundaries.
struct Draining {
    old: Arc<Route>,
    generation: i64,
    started: Instant,
    until: Instant,
}

impl Discovery {
    pub async fn run(self, shutdown: CancellationToken) {
        let proxy_timeout = control::model::defaults::PROXY_TIMEOUT.as_std();
        let mut st = State {
            contact: StoreContact::new(proxy_timeout),
            check_interval: control::model::defaults::PROXY_CHECK_INTERVAL.as_std(),
            info: self
                .store
                .proxy_info_key(&self.uid, info_ttl_for_proxy(proxy_timeout)),
            published: None,
            written: None,
            lease_mode: false,
            routed: None,
            raise_timeout: None,
            wanted: Desired {
                generation: 0,
                master: Err(NoMaster::Starting),
                replicas: Vec::new(),
                drain: false,
                next: None,
            },
            fenced: true,
            draining: None,
            failsafe: None,
            on_failsafe: false,
            read_failing: false,
            seen_revision: None,
        };
        let (target_tx, target_rx) = watch::channel(None);
        let (confirm_tx, mut confirmed) = watch::channel(None);
        let confirmer = tokio::spawn(crate::failsafe::run(
            target_rx,
            confirm_tx,
            self.metrics.clone(),
            shutdown.clone(),
        ));
        let key = self.store.clusterdata_key();
        let mut watcher: Option<Watcher> = None;
        let mut watch_retry_at: Option<Instant> = None;
        let mut next_check = Instant::now();
        let mut last_check = Instant::now();
        loop {
            st.contact.confirm(*confirmed.borrow_and_update());
            self.failsafe_step(&mut st, &target_tx);
            let fence_at = if st.fenced {
                None
            } else {
                st.contact.deadline()
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(next_check) => {
                    last_check = Instant::now();
                    let watch_up = watcher.is_some() && watch_retry_at.is_none();
                    if let Some(rev) = self.check(&mut st, watch_up).await {
                        if watcher.is_none() {
                            watcher = Some(Watcher::from_revision(self.store.store().clone(), key.clone(), rev + 1));
                        }
                    }
                    next_check = Instant::now() + st.check_interval;
                }
                update = next_update(&mut watcher, watch_retry_at, self.faults) => {
                    watch_retry_at = None;
                    match update {
                        Ok(u) => {
                            self.on_watch(&mut st, u, &key).await;
                            // A spec seen first by the watch (the cluster created after the
                            // first check) may shorten proxyCheckInterval and proxyTimeout:
                            // check by the new interval, or contact lapses before the next
                            // check and the proxy fences itself for nothing.
                            next_check = next_check.min(last_check + st.check_interval);
                        }
                        Err(e) => {
                            self.metrics.store_error(e.kind());
                            tracing::debug!(error = %e, "clusterdata watch failed; retrying");
                            watch_retry_at = Some(Instant::now() + WATCH_RETRY);
                        }
                    }
                }
                _ = drained(st.draining.as_ref()) => {
                    self.finish_drain(&mut st).await;
                }
                _ = confirmed.changed() => {}
                _ = sleep_until_opt(fence_at) => {
                    st.contact.confirm(*confirmed.borrow_and_update());
                    if st.contact.is_fenced(Instant::now()) && !self.faults.has(Fault::NoProxyFencing) {
                        tracing::warn!(timeout = ?st.contact.timeout(), "no store contact within proxyTimeout: fencing");
                        st.fenced = true;
                        self.apply(&mut st).await;
                    }
                }
            }
        }
        if let Some(d) = st.draining.take() {
            d.old.sever();
        }
        confirmer.abort();
        self.routes.apply(0, Err(NoMaster::Stopping));
        let _ = st.info.revoke().await;
    }

    async fn on_watch(&self, st: &mut State, update: WatchUpdate, key: &str) {
        let value = match update {
            WatchUpdate::Progress(_) => return,
            WatchUpdate::Events(events) => match events.iter().rev().find(|e| e.kv.key == key) {
                Some(e) if e.kind == EventKind::Put => {
                    Some((e.kv.value.clone(), e.kv.mod_revision))
                }
                Some(_) => None,
                None => return,
            },
            WatchUpdate::Resync(range) => range
                .kvs
                .into_iter()
                .find(|kv| kv.key == key)
                .map(|kv| (kv.value, kv.mod_revision)),
        };
        st.seen_revision = value.as_ref().map(|(_, rev)| *rev);
        let value = value.map(|(v, _)| v);
        let doc = match value {
            None => Ok(None),
            Some(v) => ClusterData::from_json(&v).map(Some).map_err(|e| {
                st.seen_revision = None;
                tracing::error!(error = %e, "clusterdata cannot be read: not routing");
                self.metrics.store_error("malformed");
            }),
        };
        self.set_wanted(st, doc);
        self.apply(st).await;
    }

    fn set_wanted(&self, st: &mut State, doc: Result<Option<ClusterData>, ()>) {
        st.wanted = match doc {
            Ok(cd) => {
                if let Some(cd) = &cd {
                    let spec = &cd.cluster.spec;
                    // A shorter proxyTimeout fences sooner: at once. A longer one only once
                    // the info saying so (and its longer lease) is written: until then the
                    // sentinel may count this proxy gone by the old one.
                    let want = spec.proxy_timeout().as_std();
                    if want <= st.contact.timeout() {
                        st.contact.set_timeout(want);
                        st.raise_timeout = None;
                    } else {
                        st.raise_timeout = Some(want);
                    }
                    st.check_interval = spec
                        .proxy_check_interval()
                        .as_std()
                        .max(Duration::from_millis(100));
                }
                st.lease_mode = cd.as_ref().is_some_and(|cd| cd.proxy.spec.lease_liveness);
                st.failsafe = cd.as_ref().and_then(failsafe_target);
                let timeout = reported_timeout(st);
                st.info.set_ttl(if st.lease_mode {
                    control::model::proxy_lease_ttl(GoDuration::from_std(timeout))
                } else {
                    info_ttl_for_proxy(timeout)
                });
                desired_with_replicas(cd.as_ref(), &self.uid, self.ro_max_lag)
            }
            Err(()) => Desired {
                generation: 0,
                master: Err(NoMaster::BadDocument),
                replicas: Vec::new(),
                drain: false,
                next: None,
            },
        };
    }

    /// Installs the wanted route (none while fenced), waits for severed sessions to close,
    /// then reports the generation if it changed.
    async fn apply(&self, st: &mut State) {
        if st.published.is_some() && self.faults.has(Fault::ProxyDiscoveryPanic) {
            panic!("STOLON_E2E_BREAK=proxy-discovery-panic");
        }
        let (master, replicas) = if st.fenced {
            (Err(NoMaster::StoreLost), &[][..])
        } else {
            (st.wanted.master.clone(), &st.wanted.replicas[..])
        };
        let routing = master.is_ok();
        self.routes
            .set_next(st.wanted.next.as_deref().filter(|_| !st.fenced));
        if st.routed.as_ref() != Some(&master) {
            st.routed = Some(master.clone());
            self.metrics.route_changed.set(control::metrics::unix_now());
        }
        // A drain goes on only while the store still asks for it; anything else (a new
        // generation, fencing) cuts what is left of it at once.
        let keep_draining = st
            .draining
            .as_ref()
            .is_some_and(|d| !st.fenced && d.generation == st.wanted.generation);
        if !keep_draining {
            if let Some(d) = st.draining.take() {
                let stats = d.old.sever();
                tracing::warn!(
                    severed = stats.sessions,
                    "drain cut short (fenced or a newer generation): old master's sessions severed"
                );
            }
        }
        let swapped_at = Instant::now();
        // A standby that leaves the pool while the proxy can see the store has its read-only
        // sessions drained (moved or closed at their boundaries); fenced, everything is cut.
        let ro_drain = (!st.fenced && !self.drain_timeout.is_zero()).then_some(self.drain_timeout);
        let drain = !st.fenced
            && st.wanted.drain
            && st.draining.is_none()
            && self.routes.load().master.is_ok();
        if drain {
            let (old, severed_ro) =
                self.routes
                    .apply_draining(st.wanted.generation, master, replicas, ro_drain);
            log_severed_ro(severed_ro);
            if let Some(old) = old {
                let now = Instant::now();
                tracing::info!(
                    generation = st.wanted.generation,
                    timeout = ?self.drain_timeout,
                    "planned switchover: new sessions held, the old master's closing at transaction boundaries"
                );
                st.draining = Some(Draining {
                    old,
                    generation: st.wanted.generation,
                    started: now,
                    until: now + self.drain_timeout,
                });
            }
        } else {
            let (old_master, severed_ro) =
                self.routes
                    .apply_with_replicas(st.wanted.generation, master, replicas, ro_drain);
            log_severed_ro(severed_ro);
            if let Some((old, stats)) = old_master {
                let until = (Instant::now() + SEVER_WAIT).min(store_deadline(st));
                let waited = tokio::time::timeout_at(until, old.sessions.wait()).await;
                if waited.is_err() {
                    // A session task that does not end when its sockets are cut delays the
                    // report of the generation, and with it the next master's publication.
                    tracing::warn!(
                        generation = st.wanted.generation,
                        left = old.sessions.len(),
                        "old master's sessions not all ended in time: reporting the generation anyway"
                    );
                }
                tracing::info!(
                    generation = st.wanted.generation,
                    severed = stats.sessions,
                    clients_cut_us = stats.clients_cut.as_micros() as u64,
                    sockets_cut_us = stats.all_cut.as_micros() as u64,
                    sever_us = swapped_at.elapsed().as_micros() as u64,
                    "old master's sessions closed"
                );
            }
        }
        self.metrics.generation.set(st.wanted.generation);
        self.metrics.routing.set(i64::from(routing));
        let _ = self.listening.send_if_modified(|l| {
            let want = !(st.fenced && self.stop_listening);
            let changed = *l != want;
            *l = want;
            changed
        });
        if !st.fenced && st.draining.is_none() && st.published != Some(st.wanted.generation) {
            let sent = Instant::now();
            if self.publish(st).await {
                st.contact.ok(sent);
            }
        }
    }

    /// The drain ended (every old session closed, or the timeout): sever what is left,
    /// then report the generation.
    async fn finish_drain(&self, st: &mut State) {
        let Some(d) = st.draining.take() else { return };
        let timed_out = Instant::now() >= d.until;
        let stats = d.old.sever();
        let until = (Instant::now() + SEVER_WAIT).min(store_deadline(st));
        let _ = tokio::time::timeout_at(until, d.old.sessions_closed()).await;
        tracing::info!(
            generation = d.generation,
            drained_ms = d.started.elapsed().as_millis() as u64,
            severed_at_timeout = stats.sessions,
            timed_out,
            "old master's sessions drained"
        );
        if !st.fenced && st.published != Some(st.wanted.generation) {
            let sent = Instant::now();
            if self.publish(st).await {
                st.contact.ok(sent);
            }
        }
    }
}

async fn next_update(
    watcher: &mut Option<Watcher>,
    retry_at: Option<Instant>,
    faults: Faults,
) -> Result<WatchUpdate, StoreError> {
    let Some(w) = watcher
        .as_mut()
        .filter(|_| !faults.has(Fault::ProxyWatchDeaf))
    else {
        return std::future::pending().await;
    };
    if let Some(at) = retry_at {
        tokio::time::sleep_until(at).await;
    }
    w.next().await
}

/// Completes when a drain is over: its sessions all closed, or its timeout.
async fn drained(d: Option<&Draining>) {
    match d {
        Some(d) => {
            let _ = tokio::time::timeout_at(d.until, d.old.sessions_closed()).await;
        }
        None => std::future::pending().await,
    }
}

fn log_severed_ro(n: usize) {
    if n > 0 {
        tracing::info!(
            sessions = n,
            "read-only sessions of standbys that left the pool closed"
        );
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
