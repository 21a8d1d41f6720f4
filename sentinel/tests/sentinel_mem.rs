//! The sentinel daemon over the in-memory store on a paused clock: while the store fails
//! every read, the leader retries at its sleepInterval, not in a loop that hammers the
//! store (its rounds read from a view kept by the watch, and a failed read waits for the
//! next tick).

use async_trait::async_trait;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use stolon_sentinel::daemon::{Config, Metrics, Sentinel};
use stolon_store::mem::MemStore;
use stolon_store::{
    ClusterStore, Compare, KeyValue, LeaseId, Op, Range, Store, StoreError, TxnResponse,
    WatchStream,
};
use tokio_util::sync::CancellationToken;

/// The memory store, with prefix reads that fail on demand (everything else works, so the
/// leadership holds).
struct FailingReads {
    inner: MemStore,
    fail: AtomicBool,
    failed: AtomicUsize,
}

/// Failed reads past which the store stops answering (a hot loop would never let the
/// paused clock advance; stuck, it does, and the count tells).
const CAP: usize = 50;

#[async_trait]
impl Store for FailingReads {
    async fn get(&self, key: &str) -> stolon_store::Result<Option<KeyValue>> {
        self.inner.get(key).await
    }
    async fn get_prefix(&self, prefix: &str) -> stolon_store::Result<Range> {
        if self.fail.load(Ordering::SeqCst) {
            if self.failed.fetch_add(1, Ordering::SeqCst) >= CAP {
                std::future::pending::<()>().await;
            }
            return Err(StoreError::Unavailable("reads fail".into()));
        }
        self.inner.get_prefix(prefix).await
    }
    async fn txn(&self, c: Vec<Compare>, o: Vec<Op>) -> stolon_store::Result<TxnResponse> {
        self.inner.txn(c, o).await
    }
    async fn grant_lease(&self, ttl: Duration) -> stolon_store::Result<LeaseId> {
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> stolon_store::Result<()> {
        self.inner.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: LeaseId) -> stolon_store::Result<()> {
        self.inner.revoke_lease(lease).await
    }
    async fn watch_prefix(&self, prefix: &str, rev: i64) -> stolon_store::Result<WatchStream> {
        self.inner.watch_prefix(prefix, rev).await
    }
    async fn compact(&self, revision: i64) -> stolon_store::Result<()> {
        self.inner.compact(revision).await
    }
}

#[tokio::test(start_paused = true)]
async fn failed_reads_are_retried_at_the_sleep_interval() {
    let store = Arc::new(FailingReads {
        inner: MemStore::new(),
        fail: AtomicBool::new(false),
        failed: AtomicUsize::new(0),
    });
    let cs = ClusterStore::new(store.clone(), "stolon/cluster", "mem");
    let (spec, _) = stolon_core::model::spec_from_value(serde_json::json!({
        "initMode": "new", "sleepInterval": "1s"
    }))
    .expect("spec");
    let cfg = Config {
        uid: "s1".into(),
        store: cs.clone(),
        initial_cluster_spec: Some(spec),
        leader_ttl: Duration::from_secs(20),
        store_timeout: Duration::from_secs(2),
        faults: control::faults::Faults::NONE,
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(Sentinel::new(cfg, Arc::new(Metrics::default())).run(stop.clone()));
    let mut created = false;
    for _ in 0..100 {
        if cs.get_cluster_data().await.expect("read").is_some() {
            created = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(created, "the leader did not create the cluster");
    store.fail.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let failed = store.failed.load(Ordering::SeqCst);
    // One read per sleepInterval (1 s), and one per watch event at most: about ten.
    assert!(
        failed <= 15,
        "{failed} failed reads in 10 s: the leader hammers the store"
    );
    assert!(
        failed >= 5,
        "only {failed} reads in 10 s: the leader stopped retrying"
    );
    stop.cancel();
    store.fail.store(false, Ordering::SeqCst);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
}
