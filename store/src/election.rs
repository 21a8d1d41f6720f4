//! Leader election over the primitive store operations, in the key layout of etcd's
//! `concurrency.Election` (which Go stolon uses): each candidate puts `<prefix>/<lease hex>`
//! under its own lease, and the key with the lowest create revision is the leader. A leader
//! whose lease expires loses its key and so its leadership; every leader write compares its
//! key's create revision ([`Leadership::guard`]), so a deposed leader's write fails.

use super::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub struct Election {
    store: Arc<dyn Store>,
    /// `P/sentinel-leader/`, with the trailing slash.
    key_prefix: String,
    ttl: Duration,
}

/// Proof of leadership while `is_lost()` is false. Dropping it resigns (revokes the lease).
pub struct Leadership {
    pub key: String,
    pub create_revision: i64,
    pub lease: LeaseId,
    keeper: LeaseKeeper,
}

impl Election {
    pub fn new(store: Arc<dyn Store>, name: &str, ttl: Duration) -> Self {
        Election {
            store,
            key_prefix: format!("{}/", name.trim_end_matches('/')),
            ttl,
        }
    }

    /// Waits until this candidate is the leader. Cancel-safe: dropping the future withdraws
    /// the candidacy.
    pub async fn campaign(&self, value: &[u8]) -> Result<Leadership> {
        let lease = self.store.grant_lease(self.ttl).await?;
        let keeper = LeaseKeeper::start(self.store.clone(), lease, self.ttl);
        let key = format!("{}{:x}", self.key_prefix, lease);
        self.store
            .txn(
                vec![Compare::CreateRevision {
                    key: key.clone(),
                    revision: 0,
                }],
                vec![Op::Put {
                    key: key.clone(),
                    value: value.to_vec(),
                    lease: Some(lease),
                }],
            )
            .await?;
        loop {
            if keeper.is_lost() {
                return Err(StoreError::LeaseNotFound(lease));
            }
            let range = self.store.get_prefix(&self.key_prefix).await?;
            let Some(mine) = range.kvs.iter().find(|kv| kv.key == key) else {
                return Err(StoreError::LeaseNotFound(lease));
            };
            let create_revision = mine.create_revision;
            let predecessor = range
                .kvs
                .iter()
                .filter(|kv| kv.create_revision < create_revision)
                .max_by_key(|kv| kv.create_revision);
            let Some(pred) = predecessor else {
                return Ok(Leadership {
                    key,
                    create_revision,
                    lease,
                    keeper,
                });
            };
            let pred_key = pred.key.clone();
            self.wait_deleted(&pred_key, range.revision + 1, &keeper)
                .await?;
        }
    }

    async fn wait_deleted(&self, key: &str, from: i64, keeper: &LeaseKeeper) -> Result<()> {
        let mut watcher = Watcher::from_revision(self.store.clone(), key, from);
        let mut lost = keeper.lost.clone();
        loop {
            tokio::select! {
                update = watcher.next() => match update? {
                    WatchUpdate::Events(events) => {
                        if events.iter().any(|e| e.kind == EventKind::Delete && e.kv.key == key) {
                            return Ok(());
                        }
                    }
                    WatchUpdate::Resync(_) => return Ok(()),
                    WatchUpdate::Progress(_) => {}
                },
                _ = lost.wait_for(|l| *l) => return Ok(()),
            }
        }
    }

    /// The current leader's key and value, if any.
    pub async fn leader(&self) -> Result<Option<KeyValue>> {
        let range = self.store.get_prefix(&self.key_prefix).await?;
        Ok(range.kvs.into_iter().min_by_key(|kv| kv.create_revision))
    }
}

impl Leadership {
    /// The compare that makes a write conditional on still being the leader.
    pub fn guard(&self) -> Compare {
        Compare::CreateRevision {
            key: self.key.clone(),
            revision: self.create_revision,
        }
    }

    /// True once the lease may have expired: no keep-alive succeeded within the TTL, or the
    /// store said the lease is gone. Conservative: it turns true no later than the store
    /// could hand leadership to another candidate.
    pub fn is_lost(&self) -> bool {
        self.keeper.is_lost()
    }

    /// Resolves when leadership is lost.
    pub async fn lost(&self) {
        let mut rx = self.keeper.lost.clone();
        let _ = rx.wait_for(|l| *l).await;
    }

    /// Stops keeping the lease alive without revoking it, as a crashed or frozen leader
    /// would: the store deposes it after the TTL.
    pub fn abandon(self) {
        self.keeper.abandon();
    }
}

/// Keeps a lease alive every TTL/3 on a task and reports when it may be lost. On drop the
/// lease is revoked (unless abandoned) so a successor need not wait for the TTL.
pub(crate) struct LeaseKeeper {
    lost: watch::Receiver<bool>,
    cancel: CancellationToken,
    revoke_on_stop: Arc<AtomicBool>,
}

impl LeaseKeeper {
    pub(crate) fn start(store: Arc<dyn Store>, lease: LeaseId, ttl: Duration) -> Self {
        let (tx, rx) = watch::channel(false);
        let cancel = CancellationToken::new();
        let revoke_on_stop = Arc::new(AtomicBool::new(true));
        let task_cancel = cancel.clone();
        let revoke = revoke_on_stop.clone();
        tokio::spawn(async move {
            let mut last_ok = Instant::now();
            loop {
                tokio::select! {
                    _ = task_cancel.cancelled() => break,
                    _ = tokio::time::sleep(ttl / 3) => {}
                }
                let sent = Instant::now();
                match store.keep_alive(lease).await {
                    Ok(()) => last_ok = sent,
                    Err(StoreError::LeaseNotFound(_)) => {
                        let _ = tx.send(true);
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, lease, "lease keep-alive failed"),
                }
                if Instant::now().duration_since(last_ok) >= ttl {
                    let _ = tx.send(true);
                    return;
                }
            }
            let _ = tx.send(true);
            if revoke.load(Ordering::SeqCst) {
                let _ = store.revoke_lease(lease).await;
            }
        });
        LeaseKeeper {
            lost: rx,
            cancel,
            revoke_on_stop,
        }
    }

    pub(crate) fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    pub(crate) fn abandon(&self) {
        self.revoke_on_stop.store(false, Ordering::SeqCst);
        self.cancel.cancel();
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
