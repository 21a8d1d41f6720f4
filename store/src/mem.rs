//! An in-memory [`Store`] with etcd's semantics (one global revision, compare-and-swap
//! transactions, leases with TTLs on the tokio clock, watches with history and compaction),
//! plus seeded fault injection for simulations: lost writes, ambiguous writes (applied but
//! reported failed), duplicated writes, delays, forced lease expiry, outages and dropped
//! watch streams. The conformance tests run the same suite against it and real etcd.

use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Probabilities (0.0..=1.0) and delays of injected faults. All default to "no fault".
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// A write (txn) fails with `Unavailable` and is not applied.
    pub lose_write: f64,
    /// A write is applied but the caller gets `Unavailable` (like a timeout after commit).
    pub ambiguous_write: f64,
    /// A write is applied twice, as a retried request whose first attempt also landed.
    pub duplicate_write: f64,
    /// Every call waits a random time in this range first (on the tokio clock).
    pub delay: Option<(Duration, Duration)>,
}

#[derive(Clone)]
pub struct MemStore {
    state: Arc<Mutex<State>>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
}

struct Watch {
    prefix: String,
    tx: mpsc::UnboundedSender<Result<WatchBatch>>,
}

struct State {
    revision: i64,
    compact_revision: i64,
    kvs: BTreeMap<String, KeyValue>,
    /// Every event after `compact_revision`, for watches that start in the past.
    history: Vec<Event>,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    watches: Vec<Watch>,
    faults: Faults,
    rng: StdRng,
    unavailable: bool,
}

impl Default for MemStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemStore {
    pub fn new() -> Self {
        Self::with_faults(Faults::default(), 0)
    }

    /// A store whose faults are drawn from a generator seeded with `seed`, so a simulation
    /// run can be replayed. Must be called inside a tokio runtime (leases expire on a task).
    pub fn with_faults(faults: Faults, seed: u64) -> Self {
        let state = Arc::new(Mutex::new(State {
            revision: 1,
            compact_revision: 0,
            kvs: BTreeMap::new(),
            history: Vec::new(),
            leases: HashMap::new(),
            next_lease: 0x694d_0000,
            watches: Vec::new(),
            faults,
            rng: StdRng::seed_from_u64(seed),
            unavailable: false,
        }));
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(reap_leases(Arc::downgrade(&state)));
        }
        MemStore { state }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (no partial updates are
        // made across awaits), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    /// While true every call fails with `Unavailable` and watch streams are closed.
    pub fn set_unavailable(&self, down: bool) {
        let mut st = self.lock();
        st.unavailable = down;
        if down {
            st.watches.clear();
        }
    }

    /// Closes every open watch stream, as a broken connection would.
    pub fn drop_watches(&self) {
        self.lock().watches.clear();
    }

    /// Expires a lease now, deleting its keys.
    pub fn expire_lease(&self, lease: LeaseId) {
        let mut st = self.lock();
        if st.leases.remove(&lease).is_some() {
            st.delete_lease_keys(lease);
        }
    }

    pub fn revision(&self) -> i64 {
        self.lock().revision
    }

    /// A key as stored, even while the store is unavailable or faulty: a test's view from
    /// outside the outage it made.
    pub fn peek(&self, key: &str) -> Option<KeyValue> {
        let mut st = self.lock();
        st.expire_due(Instant::now());
        st.kvs.get(key).cloned()
    }

    async fn before_call(&self) -> Result<()> {
        let delay = {
            let mut st = self.lock();
            st.faults.delay.map(|(lo, hi)| {
                if hi > lo {
                    st.rng.gen_range(lo..hi)
                } else {
                    lo
                }
            })
        };
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let mut st = self.lock();
        st.expire_due(Instant::now());
        if st.unavailable {
            return Err(StoreError::Unavailable("memory store is down".into()));
        }
        Ok(())
    }
}

/// Expires leases on the tokio clock (so a paused clock drives them too) until the store
/// is dropped.
async fn reap_leases(state: Weak<Mutex<State>>) {
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let Some(state) = state.upgrade() else { return };
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        st.expire_due(Instant::now());
    }
}

impl State {
    fn expire_due(&mut self, now: Instant) {
        let due: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.leases.remove(&id);
            self.delete_lease_keys(id);
        }
    }

    fn delete_lease_keys(&mut self, lease: LeaseId) {
        let keys: Vec<String> = self
            .kvs
            .values()
            .filter(|kv| kv.lease == lease)
            .map(|kv| kv.key.clone())
            .collect();
        if keys.is_empty() {
            return;
        }
        let ops = keys.into_iter().map(|key| Op::Delete { key }).collect();
        self.apply(ops);
    }

    fn compare_holds(&self, c: &Compare) -> bool {
        match c {
            Compare::ModRevision { key, revision } => {
                self.kvs.get(key).map(|kv| kv.mod_revision).unwrap_or(0) == *revision
            }
            Compare::CreateRevision { key, revision } => {
                self.kvs.get(key).map(|kv| kv.create_revision).unwrap_or(0) == *revision
            }
        }
    }

    /// Applies ops as one revision and notifies watches. Returns false if a put names a
    /// lease that does not exist (etcd refuses the whole txn then).
    fn apply(&mut self, ops: Vec<Op>) -> bool {
        let leases_ok = ops.iter().all(|op| match op {
            Op::Put { lease: Some(l), .. } => self.leases.contains_key(l),
            _ => true,
        });
        if !leases_ok {
            return false;
        }
        let rev = self.revision + 1;
        let mut events = Vec::new();
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    let create_revision = self.kvs.get(&key).map_or(rev, |kv| kv.create_revision);
                    let kv = KeyValue {
                        key: key.clone(),
                        value,
                        create_revision,
                        mod_revision: rev,
                        lease: lease.unwrap_or(0),
                    };
                    self.kvs.insert(key, kv.clone());
                    events.push(Event {
                        kind: EventKind::Put,
                        kv,
                    });
                }
                Op::Delete { key } => {
                    if let Some(old) = self.kvs.remove(&key) {
                        let kv = KeyValue {
                            key,
                            value: Vec::new(),
                            create_revision: old.create_revision,
                            mod_revision: rev,
                            lease: 0,
                        };
                        events.push(Event {
                            kind: EventKind::Delete,
                            kv,
                        });
                    }
                }
            }
        }
        if events.is_empty() {
            return true;
        }
        self.revision = rev;
        self.history.extend(events.iter().cloned());
        let revision = self.revision;
        self.watches.retain(|w| {
            let mine: Vec<Event> = events
                .iter()
                .filter(|e| e.kv.key.starts_with(&w.prefix))
                .cloned()
                .collect();
            if mine.is_empty() {
                return !w.tx.is_closed();
            }
            let batch = WatchBatch {
                events: mine,
                header_revision: revision,
            };
            w.tx.send(Ok(batch)).is_ok()
        });
        true
    }

    fn roll(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.gen_bool(p.min(1.0))
    }
}

#[async_trait]
impl Store for MemStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        self.before_call().await?;
        Ok(self.lock().kvs.get(key).cloned())
    }

    async fn get_prefix(&self, prefix: &str) -> Result<Range> {
        self.before_call().await?;
        let st = self.lock();
        let kvs = st
            .kvs
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, kv)| kv.clone())
            .collect();
        Ok(Range {
            kvs,
            revision: st.revision,
        })
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnResponse> {
        self.before_call().await?;
        let mut st = self.lock();
        let lost = st.faults.lose_write;
        if st.roll(lost) {
            return Err(StoreError::Unavailable("injected: write lost".into()));
        }
        let succeeded = compares.iter().all(|c| st.compare_holds(c));
        if succeeded && !st.apply(ops.clone()) {
            if let Some(Op::Put { lease: Some(l), .. }) = ops
                .iter()
                .find(|op| matches!(op, Op::Put { lease: Some(_), .. }))
            {
                return Err(StoreError::LeaseNotFound(*l));
            }
        }
        let dup = st.faults.duplicate_write;
        if succeeded && st.roll(dup) {
            // The replayed request re-checks its compares, as etcd would.
            if compares.iter().all(|c| st.compare_holds(c)) {
                st.apply(ops);
            }
        }
        let ambiguous = st.faults.ambiguous_write;
        if st.roll(ambiguous) {
            return Err(StoreError::Unavailable(
                "injected: write outcome unknown".into(),
            ));
        }
        Ok(TxnResponse {
            succeeded,
            revision: st.revision,
        })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        self.before_call().await?;
        let mut st = self.lock();
        st.next_lease += 1;
        let id = st.next_lease;
        // etcd's minimum TTL is one second.
        let ttl = ttl.max(Duration::from_secs(1));
        let deadline = Instant::now() + ttl;
        st.leases.insert(id, Lease { ttl, deadline });
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        self.before_call().await?;
        let mut st = self.lock();
        match st.leases.get_mut(&lease) {
            Some(l) => {
                l.deadline = Instant::now() + l.ttl;
                Ok(())
            }
            None => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.before_call().await?;
        let mut st = self.lock();
        if st.leases.remove(&lease).is_none() {
            return Err(StoreError::LeaseNotFound(lease));
        }
        st.delete_lease_keys(lease);
        Ok(())
    }

    async fn watch_prefix(&self, prefix: &str, start_revision: i64) -> Result<WatchStream> {
        self.before_call().await?;
        let mut st = self.lock();
        let (tx, rx) = mpsc::unbounded_channel();
        // etcd keeps the compact revision itself readable; anything older is gone.
        if start_revision > 0 && start_revision < st.compact_revision {
            let _ = tx.send(Err(StoreError::Compacted {
                compact_revision: st.compact_revision,
            }));
        } else {
            let past: Vec<Event> = st
                .history
                .iter()
                .filter(|e| e.kv.mod_revision >= start_revision && e.kv.key.starts_with(prefix))
                .cloned()
                .collect();
            if !past.is_empty() {
                let _ = tx.send(Ok(WatchBatch {
                    events: past,
                    header_revision: st.revision,
                }));
            }
            st.watches.push(Watch {
                prefix: prefix.to_string(),
                tx,
            });
        }
        Ok(Box::pin(tokio_stream_from(rx)))
    }

    async fn compact(&self, revision: i64) -> Result<()> {
        self.before_call().await?;
        let mut st = self.lock();
        if revision > st.revision {
            return Err(StoreError::Unavailable(
                format!(
                    "compact revision {revision} is in the future (current {})",
                    st.revision
                )
                .into(),
            ));
        }
        st.compact_revision = st.compact_revision.max(revision);
        let keep_from = st.compact_revision;
        st.history.retain(|e| e.kv.mod_revision >= keep_from);
        Ok(())
    }
}

fn tokio_stream_from(
    mut rx: mpsc::UnboundedReceiver<Result<WatchBatch>>,
) -> impl futures::Stream<Item = Result<WatchBatch>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
