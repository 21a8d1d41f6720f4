//! A key held under a lease: the infos keepers, sentinels and proxies publish. Each put
//! refreshes the lease (or grants a new one if it expired), so a component that publishes
//! every interval keeps its key, and one that stops loses it after the TTL. A component that
//! writes only on change keeps its key with [`LeasedKey::keep_alive`] between writes.

use super::*;
use std::sync::Arc;

pub struct LeasedKey {
    store: Arc<dyn Store>,
    key: String,
    ttl: Duration,
    lease: Option<LeaseId>,
    /// A lease replaced by [`LeasedKey::set_ttl`]: revoked once the key is written under
    /// the new one (revoking it first would delete the key in between).
    retired: Option<LeaseId>,
}

impl LeasedKey {
    pub fn new(store: Arc<dyn Store>, key: impl Into<String>, ttl: Duration) -> Self {
        LeasedKey {
            store,
            key: key.into(),
            ttl,
            lease: None,
            retired: None,
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Changes the TTL: the next [`LeasedKey::put`] writes the key under a new lease of
    /// this TTL, then revokes the old one.
    pub fn set_ttl(&mut self, ttl: Duration) {
        if ttl == self.ttl {
            return;
        }
        self.ttl = ttl;
        if let Some(old) = self.lease.take() {
            self.retired = Some(old);
        }
    }

    /// Renews the lease without writing: `Ok(true)` if the key's lease is alive and
    /// renewed, `Ok(false)` if there is none (never written, expired, or a TTL change
    /// pending), and the caller must [`LeasedKey::put`] the value again.
    pub async fn keep_alive(&mut self) -> Result<bool> {
        let Some(lease) = self.lease else {
            return Ok(false);
        };
        match self.store.keep_alive(lease).await {
            Ok(()) => Ok(true),
            Err(StoreError::LeaseNotFound(_)) => {
                self.lease = None;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// Writes `value` under the lease, then renews it; returns the store revision of the
    /// write, which the caller can use as the time of its last acknowledged publish. The
    /// renewal comes after the write, not before: readers wait for the write (a keeper's
    /// report of its replay position holds up a switchover's promotion), and a lease
    /// outlives the time between two puts by construction (its TTL is at least twice the
    /// publishing interval).
    pub async fn put(&mut self, value: Vec<u8>) -> Result<i64> {
        for _ in 0..2 {
            let (lease, granted) = match self.lease {
                Some(lease) => (lease, false),
                None => {
                    let lease = self.store.grant_lease(self.ttl).await?;
                    self.lease = Some(lease);
                    (lease, true)
                }
            };
            let op = Op::Put {
                key: self.key.clone(),
                value: value.clone(),
                lease: Some(lease),
            };
            match self.store.txn(vec![], vec![op]).await {
                Ok(r) => {
                    if let Some(old) = self.retired.take() {
                        // Best effort: a lease left behind holds no key and expires.
                        let _ = self.store.revoke_lease(old).await;
                    }
                    if granted {
                        return Ok(r.revision);
                    }
                    match self.store.keep_alive(lease).await {
                        Ok(()) => return Ok(r.revision),
                        // Expired just after the write (the key went with it): write again.
                        Err(StoreError::LeaseNotFound(_)) => self.lease = None,
                        Err(e) => return Err(e),
                    }
                }
                // The lease expired since the last put: take a new one.
                Err(StoreError::LeaseNotFound(_)) => self.lease = None,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Unavailable(
            format!("could not keep a lease for {}", self.key).into(),
        ))
    }

    /// Removes the key now (a clean stop), by revoking its lease.
    pub async fn revoke(&mut self) -> Result<()> {
        if let Some(old) = self.retired.take() {
            let _ = self.store.revoke_lease(old).await;
        }
        if let Some(lease) = self.lease.take() {
            match self.store.revoke_lease(lease).await {
                Ok(()) | Err(StoreError::LeaseNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
