//! The proxy's side of store contact: every proxyCheckInterval, the check (the whole
//! document only when the watch may have missed something, else a revision compare), the
//! proof of liveness (ProxyInfo written, or its lease kept alive), and in failsafe mode the
//! confirmation task pointed at the master's keeper.

use super::{Discovery, State, READ, UNCHANGED};
use control::model::{ClusterData, GoDuration, ProxyInfo};
use control::store::StoreError;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

impl Discovery {
    /// Failsafe mode: points the confirmation task at the routed master's keeper (due from
    /// half a proxyTimeout after the last store contact), and says when routing starts and
    /// stops resting on its confirmed hold.
    pub(super) fn failsafe_step(
        &self,
        st: &mut State,
        target: &watch::Sender<Option<crate::failsafe::Target>>,
    ) {
        let want = match (&st.failsafe, st.contact.last_ok()) {
            (Some((address, db, every)), Some(last)) if !st.fenced && st.wanted.master.is_ok() => {
                Some(crate::failsafe::Target {
                    address: address.clone(),
                    db: db.clone(),
                    every: *every,
                    from: last + st.contact.timeout() / 2,
                })
            }
            _ => None,
        };
        target.send_if_modified(|t| {
            let changed = *t != want;
            *t = want;
            changed
        });
        let now = Instant::now();
        let on = !st.fenced && st.contact.on_failsafe(now);
        if on != st.on_failsafe {
            st.on_failsafe = on;
            self.metrics.failsafe_routing.set(i64::from(on));
            if on {
                tracing::warn!("failsafe: no store contact within proxyTimeout, routing on the master keeper's confirmed hold");
            } else if !st.fenced {
                tracing::info!("failsafe: store contact is back");
            }
        }
    }

    /// Reads clusterdata (or, while the watch is up, only compares its revision with the one
    /// applied) and publishes ProxyInfo; on success of both counts as contact from the moment
    /// the read was sent. Returns the clusterdata revision read.
    pub(super) async fn check(&self, st: &mut State, watch_up: bool) -> Option<i64> {
        let sent = Instant::now();
        if let Some(rev) = st.seen_revision.filter(|_| watch_up && !st.fenced) {
            match self.unchanged_since(st, rev).await {
                Some(true) => {
                    self.metrics.checks.get_or_create(&UNCHANGED).inc();
                    if self.prove_alive(st).await {
                        st.contact.ok(sent);
                    }
                    return Some(rev);
                }
                // Changed (the watch brings it too): read it now.
                Some(false) => {}
                None => return None,
            }
        }
        self.metrics.checks.get_or_create(&READ).inc();
        let Ok(read) =
            tokio::time::timeout_at(store_deadline(st), self.store.get_cluster_data()).await
        else {
            self.read_failed(st, "read", None);
            return None;
        };
        let (doc, revision) = match read {
            Ok(Some((cd, rev))) => (Ok(Some(cd)), rev),
            Ok(None) => (Ok(None), 0),
            Err(StoreError::Malformed { key, reason }) => {
                tracing::error!(%key, %reason, "clusterdata cannot be read: not routing");
                self.metrics.store_error("malformed");
                let rev = tokio::time::timeout_at(store_deadline(st), self.current_revision());
                (Err(()), rev.await.ok().flatten()?)
            }
            Err(e) => {
                self.read_failed(st, "read", Some(&e));
                return None;
            }
        };
        st.read_failing = false;
        st.seen_revision = matches!(doc, Ok(Some(_))).then_some(revision);
        self.set_wanted(st, doc);
        // Apply (and sever) before reporting anything about the new generation.
        self.apply(st).await;
        if self.prove_alive(st).await {
            st.contact.ok(sent);
            if st.fenced {
                tracing::info!("store contact established: routing");
                st.fenced = false;
                self.apply(st).await;
            }
        }
        Some(revision)
    }

    /// Whether clusterdata is still at `rev` (`None`: the store did not answer in time, or
    /// failed, which is counted and logged as a failed read is).
    pub(super) async fn unchanged_since(&self, st: &mut State, rev: i64) -> Option<bool> {
        let asked = self.store.cluster_data_unchanged(rev);
        match tokio::time::timeout_at(store_deadline(st), asked).await {
            Ok(Ok(unchanged)) => {
                st.read_failing = false;
                Some(unchanged)
            }
            Ok(Err(e)) => {
                self.read_failed(st, "check", Some(&e));
                None
            }
            Err(_) => {
                self.read_failed(st, "check", None);
                None
            }
        }
    }

    /// Counts a failed read or check of clusterdata (`error`: `None` for one still pending
    /// at the fence deadline) and logs it, at warn once per run of failures (an outage
    /// lasts, in failsafe mode, for minutes) and at debug after.
    pub(super) fn read_failed(&self, st: &mut State, what: &str, error: Option<&StoreError>) {
        self.metrics
            .store_error(error.map_or("timeout", StoreError::kind));
        let first = !std::mem::replace(&mut st.read_failing, true);
        match (error, first) {
            (Some(e), true) => {
                tracing::warn!(error = %e, "cannot {what} clusterdata (repeats at debug)")
            }
            (Some(e), false) => tracing::debug!(error = %e, "cannot {what} clusterdata"),
            (None, true) => tracing::warn!(
                "clusterdata {what} still pending at the fence deadline (repeats at debug)"
            ),
            (None, false) => {
                tracing::debug!("clusterdata {what} still pending at the fence deadline")
            }
        }
    }

    /// The revision of the clusterdata key even when its content is bad.
    pub(super) async fn current_revision(&self) -> Option<i64> {
        let kv = self
            .store
            .store()
            .get(&self.store.clusterdata_key())
            .await
            .ok()?;
        Some(kv.map_or(0, |kv| kv.mod_revision))
    }

    /// The check's proof of liveness: in lease mode a keep-alive of the info's lease, or a
    /// rewrite if what the info says changed or its lease is gone; else a rewrite with a
    /// new infoUID.
    pub(super) async fn prove_alive(&self, st: &mut State) -> bool {
        let info = self.info(st);
        let unchanged = st.written.as_ref().is_some_and(|w| {
            ProxyInfo {
                info_uid: String::new(),
                ..w.clone()
            } == info
        });
        if !(st.lease_mode && unchanged) {
            return self.publish(st).await;
        }
        let kept = tokio::time::timeout_at(store_deadline(st), st.info.keep_alive()).await;
        match kept.unwrap_or(Err(StoreError::Timeout {
            op: "keep proxy info alive",
            timeout: Duration::ZERO,
        })) {
            Ok(true) => {
                self.metrics.info_keepalives.inc();
                true
            }
            Ok(false) => {
                tracing::info!("proxy info lease gone (or its TTL changed): writing it again");
                self.publish(st).await
            }
            Err(e) => {
                self.metrics.store_error(e.kind());
                tracing::warn!(error = %e, "cannot keep the proxy info's lease alive");
                false
            }
        }
    }

    /// What ProxyInfo says now, but its infoUID.
    pub(super) fn info(&self, st: &State) -> ProxyInfo {
        ProxyInfo {
            info_uid: String::new(),
            uid: self.uid.clone(),
            // While fenced the proxy holds no session at all, so reporting the wanted
            // generation is true: nothing of an older generation is open. While draining,
            // the old master's sessions are: the last generation reported stays.
            generation: match &st.draining {
                Some(_) => st.published.unwrap_or(0),
                None => st.wanted.generation,
            },
            proxy_timeout: GoDuration::from_std(reported_timeout(st)),
            read_only: self.ro_max_lag.is_some(),
            lease_liveness: st.lease_mode,
            // `route::replicas` leaves a switchover's target out from the drain on.
            target_out_at_drain: true,
            cancel_id: self.cancel_id,
            cancel_address: self.cancel_address.clone(),
            extra: Default::default(),
        }
    }

    /// Publishes ProxyInfo with a fresh infoUID and the applied generation.
    pub(super) async fn publish(&self, st: &mut State) -> bool {
        let info = ProxyInfo {
            info_uid: control::model::short_uid(),
            ..self.info(st)
        };
        let value = serde_json::to_vec(&info).unwrap_or_default();
        let deadline = store_deadline(st);
        let put = tokio::time::timeout_at(deadline, st.info.put(value)).await;
        match put.unwrap_or(Err(StoreError::Timeout {
            op: "publish proxy info",
            timeout: Duration::ZERO,
        })) {
            Ok(_) => {
                self.metrics.info_writes.inc();
                if let Some(t) = st.raise_timeout.take() {
                    st.contact.set_timeout(t);
                }
                st.published = Some(info.generation);
                st.written = Some(ProxyInfo {
                    info_uid: String::new(),
                    ..info
                });
                true
            }
            Err(e) => {
                self.metrics.store_error(e.kind());
                tracing::warn!(error = %e, "cannot publish proxy info");
                false
            }
        }
    }
}

/// In failsafe mode, the keeper of the db the proxies route to: its failsafe address, the
/// db, and how often to ask.
pub(super) fn failsafe_target(cd: &ClusterData) -> Option<(String, String, Duration)> {
    if !cd.cluster.spec.failsafe_mode() {
        return None;
    }
    let db_uid = &cd.proxy.spec.master_db_uid;
    let db = cd.dbs.get(db_uid)?;
    let keeper = cd.keepers.get(&db.spec.keeper_uid)?;
    let address = Some(keeper.status.failsafe_address.clone()).filter(|a| !a.is_empty())?;
    let every = control::failsafe::timing(cd.cluster.spec.fail_interval()).ask_every;
    Some((address, db_uid.clone(), every))
}

/// The proxyTimeout the info reports and its lease is sized for: a pending longer one.
pub(super) fn reported_timeout(st: &State) -> Duration {
    st.raise_timeout.unwrap_or_else(|| st.contact.timeout())
}

/// How long a store call inside the loop may wait: never past the fence deadline, since
/// the loop cannot fence while it waits. Unbounded (an hour) once fenced.
pub(super) fn store_deadline(st: &State) -> Instant {
    if st.fenced {
        return Instant::now() + Duration::from_secs(3600);
    }
    st.contact.deadline().unwrap_or_else(Instant::now)
}
