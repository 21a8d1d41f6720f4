//! Typed access to one cluster's keys (store-format.md): the clusterdata document with
//! compare-and-swap, the published infos, the leader election and the switchover request.

use super::*;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::sync::Arc;
use stolon_core::model::{ClusterData, KeeperInfo, ModelError, ProxyInfo, SentinelInfo};

/// The minimum lease TTL of an info key (store-format.md: max(2 x interval, 20 s)).
pub const MIN_INFO_TTL: Duration = Duration::from_secs(20);
/// The sentinel leader's session TTL, as stolon uses.
pub const LEADER_TTL: Duration = Duration::from_secs(20);

#[derive(Clone)]
pub struct ClusterStore {
    store: Arc<dyn Store>,
    /// `--store-prefix` + "/" + `--cluster-name`.
    prefix: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CasOutcome {
    /// Written; the new mod revision of the key.
    Written(i64),
    /// Someone else wrote first (or leadership was lost): re-read and decide again.
    Conflict,
}

/// Infos listed under a prefix: the good ones by UID, and an error for each malformed one
/// (so one bad document does not hide the others).
#[derive(Clone, Debug)]
pub struct Infos<T> {
    pub items: BTreeMap<String, T>,
    pub errors: Vec<StoreError>,
    pub revision: i64,
}

/// A proxy's info TTL: max(2 x proxyTimeout, 20 s).
pub fn info_ttl_for_proxy(proxy_timeout: Duration) -> Duration {
    info_ttl(proxy_timeout)
}

/// The info lease TTL for a component republishing every `interval`.
pub fn info_ttl(interval: Duration) -> Duration {
    (interval * 2).max(MIN_INFO_TTL)
}

fn malformed(key: &str, e: ModelError) -> StoreError {
    StoreError::Malformed {
        key: key.to_string(),
        reason: e.to_string(),
    }
}

impl ClusterStore {
    pub fn new(store: Arc<dyn Store>, store_prefix: &str, cluster_name: &str) -> Self {
        let prefix = format!("{}/{}", store_prefix.trim_end_matches('/'), cluster_name);
        ClusterStore { store, prefix }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn clusterdata_key(&self) -> String {
        format!("{}/clusterdata", self.prefix)
    }
    pub fn keepers_info_prefix(&self) -> String {
        format!("{}/keepers/info/", self.prefix)
    }
    pub fn sentinels_info_prefix(&self) -> String {
        format!("{}/sentinels/info/", self.prefix)
    }
    pub fn proxies_info_prefix(&self) -> String {
        format!("{}/proxies/info/", self.prefix)
    }
    pub fn leader_key_prefix(&self) -> String {
        format!("{}/sentinel-leader", self.prefix)
    }
    /// `P/pause`: a maintenance pause (see `model::Pause`).
    pub fn pause_key(&self) -> String {
        format!("{}/pause", self.prefix)
    }

    pub fn switchover_key(&self) -> String {
        format!("{}/switchover", self.prefix)
    }

    /// The clusterdata and its mod revision; `None` if the cluster was never initialised.
    /// A document that cannot be read is `Malformed` with the key and the reason.
    pub async fn get_cluster_data(&self) -> Result<Option<(ClusterData, i64)>> {
        let key = self.clusterdata_key();
        let Some(kv) = self.store.get(&key).await? else {
            return Ok(None);
        };
        let cd = ClusterData::from_json(&kv.value).map_err(|e| malformed(&key, e))?;
        Ok(Some((cd, kv.mod_revision)))
    }

    /// Whether clusterdata is still at mod revision `revision`: a transaction of one
    /// compare and no operation, which etcd answers as a read (no proposal) and which
    /// carries none of the document. A proxy whose watch keeps the document current checks
    /// its contact with the store this way instead of reading it all every interval.
    pub async fn cluster_data_unchanged(&self, revision: i64) -> Result<bool> {
        let compare = Compare::ModRevision {
            key: self.clusterdata_key(),
            revision,
        };
        Ok(self.store.txn(vec![compare], Vec::new()).await?.succeeded)
    }

    /// Writes clusterdata if its mod revision is still `expected` (0: create only if absent)
    /// and, with `leader`, only while that leadership holds.
    pub async fn put_cluster_data(
        &self,
        cd: &ClusterData,
        expected: i64,
        leader: Option<&Leadership>,
    ) -> Result<CasOutcome> {
        let key = self.clusterdata_key();
        let mut compares = vec![Compare::ModRevision {
            key: key.clone(),
            revision: expected,
        }];
        compares.extend(leader.map(Leadership::guard));
        let doc = cd.to_json().map_err(|e| StoreError::Malformed {
            key: key.clone(),
            reason: format!("not written: {e}"),
        })?;
        let resp = self.store.txn(compares, vec![Op::put(key, doc)]).await?;
        Ok(if resp.succeeded {
            CasOutcome::Written(resp.revision)
        } else {
            CasOutcome::Conflict
        })
    }

    async fn list<T: DeserializeOwned>(
        &self,
        prefix: &str,
        what: &'static str,
    ) -> Result<Infos<T>> {
        let range = self.store.get_prefix(prefix).await?;
        let mut infos = Infos {
            items: BTreeMap::new(),
            errors: Vec::new(),
            revision: range.revision,
        };
        for kv in range.kvs {
            let uid = kv.key[prefix.len()..].to_string();
            match stolon_core::model::decode::<T>(what, &kv.value) {
                Ok(v) => {
                    infos.items.insert(uid, v);
                }
                Err(e) => infos.errors.push(malformed(&kv.key, e)),
            }
        }
        Ok(infos)
    }

    pub async fn keeper_infos(&self) -> Result<Infos<KeeperInfo>> {
        self.list(&self.keepers_info_prefix(), "keeper info").await
    }
    pub async fn sentinel_infos(&self) -> Result<Infos<SentinelInfo>> {
        self.list(&self.sentinels_info_prefix(), "sentinel info")
            .await
    }
    pub async fn proxy_infos(&self) -> Result<Infos<ProxyInfo>> {
        self.list(&self.proxies_info_prefix(), "proxy info").await
    }

    pub fn keeper_info_key(&self, uid: &str, ttl: Duration) -> LeasedKey {
        LeasedKey::new(
            self.store.clone(),
            format!("{}{uid}", self.keepers_info_prefix()),
            ttl,
        )
    }
    pub fn sentinel_info_key(&self, uid: &str, ttl: Duration) -> LeasedKey {
        LeasedKey::new(
            self.store.clone(),
            format!("{}{uid}", self.sentinels_info_prefix()),
            ttl,
        )
    }
    pub fn proxy_info_key(&self, uid: &str, ttl: Duration) -> LeasedKey {
        LeasedKey::new(
            self.store.clone(),
            format!("{}{uid}", self.proxies_info_prefix()),
            ttl,
        )
    }

    /// The sentinel leader election on `P/sentinel-leader`.
    pub fn election(&self, ttl: Duration) -> Election {
        Election::new(self.store.clone(), &self.leader_key_prefix(), ttl)
    }
}
