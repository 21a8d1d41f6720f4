//! `stolonctl init` against an in-memory store whose clusterdata a sentinel keeps
//! rewriting: a conflict only means read again.

use std::sync::Arc;
use std::time::Duration;
use stolon_store::mem::MemStore;
use stolon_store::*;

/// A store where another writer (a running sentinel) rewrites every key just before each of
/// the first `left` transactions: the caller's compare-and-swap then conflicts.
struct Racing {
    inner: MemStore,
    left: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl Store for Racing {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        self.inner.get(key).await
    }
    async fn get_prefix(&self, prefix: &str) -> Result<Range> {
        self.inner.get_prefix(prefix).await
    }
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnResponse> {
        use std::sync::atomic::Ordering;
        if self.left.load(Ordering::SeqCst) > 0 {
            self.left.fetch_sub(1, Ordering::SeqCst);
            for op in &ops {
                if let Op::Put { key, .. } = op {
                    if let Some(kv) = self.inner.get(key).await? {
                        self.inner
                            .txn(vec![], vec![Op::put(key.clone(), kv.value)])
                            .await?;
                    }
                }
            }
        }
        self.inner.txn(compares, ops).await
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        self.inner.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.inner.revoke_lease(lease).await
    }
    async fn watch_prefix(&self, prefix: &str, start_revision: i64) -> Result<WatchStream> {
        self.inner.watch_prefix(prefix, start_revision).await
    }
    async fn compact(&self, revision: i64) -> Result<()> {
        self.inner.compact(revision).await
    }
}

/// `stolonctl init -y` replaces the cluster even while its sentinel keeps rewriting it (a
/// conflict only means: read again), and without `-y` never replaces one.
#[tokio::test(start_paused = true)]
async fn init_over_a_cluster_that_is_being_rewritten_replaces_it() {
    use stolon_core::model::{ClusterData, ClusterSpec, Timestamp};
    let store = Arc::new(Racing {
        inner: MemStore::new(),
        left: std::sync::atomic::AtomicUsize::new(0),
    });
    let cs = ClusterStore::new(store.clone(), "stolon/cluster", "c1");
    let old = ClusterData::new("old", ClusterSpec::default(), Timestamp::now());
    cs.put_cluster_data(&old, 0, None).await.expect("put");
    store.left.store(3, std::sync::atomic::Ordering::SeqCst);
    let spec = serde_json::json!({"initMode": "new"});
    let uid = stolonctl::init(&cs, spec.clone(), true)
        .await
        .expect("replaced despite three conflicting writes");
    let (now, _) = cs.get_cluster_data().await.expect("get").expect("cd");
    assert_eq!(now.cluster.uid, uid);
    assert!(stolonctl::init(&cs, spec, false).await.is_err());
}
