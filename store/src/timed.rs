//! A wrapper that gives every store call a deadline (`--store-timeout`), so a hung etcd
//! turns into an error the caller handles instead of a stuck component.

use super::*;

pub struct Timed<S> {
    inner: S,
    timeout: Duration,
}

impl<S: Store> Timed<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        Timed { inner, timeout }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    async fn run<T>(
        &self,
        op: &'static str,
        fut: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout {
                op,
                timeout: self.timeout,
            }),
        }
    }
}

#[async_trait]
impl<S: Store> Store for Timed<S> {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        self.run("get", self.inner.get(key)).await
    }
    async fn get_prefix(&self, prefix: &str) -> Result<Range> {
        self.run("get_prefix", self.inner.get_prefix(prefix)).await
    }
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnResponse> {
        self.run("txn", self.inner.txn(compares, ops)).await
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        self.run("grant_lease", self.inner.grant_lease(ttl)).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        self.run("keep_alive", self.inner.keep_alive(lease)).await
    }
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.run("revoke_lease", self.inner.revoke_lease(lease))
            .await
    }
    async fn watch_prefix(&self, prefix: &str, start_revision: i64) -> Result<WatchStream> {
        self.run("watch", self.inner.watch_prefix(prefix, start_revision))
            .await
    }
    async fn compact(&self, revision: i64) -> Result<()> {
        self.run("compact", self.inner.compact(revision)).await
    }
}
