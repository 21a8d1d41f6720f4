//! The store: a small key-value trait with etcd v3 semantics (revisions, compare-and-swap
//! transactions, leases, watches), its etcd implementation, a fault-injecting in-memory one
//! for simulations, and the logic every component shares on top of it (watch resume,
//! leader election, lease-held infos, typed clusterdata access).
#![deny(unsafe_code)]

pub mod cluster;
pub mod election;
pub mod etcd;
mod etcd_channel;
pub mod mem;
pub mod publish;
pub mod timed;
pub mod watch;

use async_trait::async_trait;
use futures::stream::BoxStream;
use std::time::Duration;

pub use cluster::{info_ttl, info_ttl_for_proxy, CasOutcome, ClusterStore, Infos, LEADER_TTL};
pub use election::{Election, Leadership};
pub use publish::LeasedKey;
pub use watch::{WatchUpdate, Watcher};

pub type LeaseId = i64;

/// One key with its etcd revisions. `create_revision` 0 never appears on a live key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    /// 0 when the key is not attached to a lease.
    pub lease: LeaseId,
}

/// A transaction guard; each compares for equality. Revision 0 means "the key is absent".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    ModRevision { key: String, revision: i64 },
    CreateRevision { key: String, revision: i64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxnResponse {
    pub succeeded: bool,
    /// The store revision after the transaction (unchanged if it failed).
    pub revision: i64,
}

/// The keys under a prefix at one store revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Range {
    pub kvs: Vec<KeyValue>,
    pub revision: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// A change to one key; for a delete, `kv` holds the key and the deleting revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
}

/// What a raw watch stream yields: the events of one or more revisions, in order, and the
/// store revision the response was sent at (a progress notification has no events).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchBatch {
    pub events: Vec<Event>,
    pub header_revision: i64,
}

pub type WatchStream = BoxStream<'static, Result<WatchBatch, StoreError>>;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("store request {op} timed out after {timeout:?}")]
    Timeout { op: &'static str, timeout: Duration },
    #[error("store unavailable: {0}")]
    Unavailable(#[source] Cause),
    #[error("watch start revision was compacted (compact revision {compact_revision})")]
    Compacted { compact_revision: i64 },
    #[error("lease {0} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    #[error("malformed document at {key}: {reason}")]
    Malformed { key: String, reason: String },
    #[error("invalid store configuration: {0}")]
    Config(String),
}

impl StoreError {
    /// A fixed-cardinality label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Timeout { .. } => "timeout",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Compacted { .. } => "compacted",
            StoreError::LeaseNotFound(_) => "lease_not_found",
            StoreError::Malformed { .. } => "malformed",
            StoreError::Config(_) => "config",
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Why the store is unavailable: the client's own error, kept whole (its type and its
/// source chain) so that callers match on kinds and codes, or a message where there is
/// no error to keep (the in-memory store's injected faults).
#[derive(Clone, Debug)]
pub struct Cause(std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>);

impl Cause {
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Cause {
        Cause(std::sync::Arc::new(e))
    }

    /// The kept error, for downcasting.
    pub fn get(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// Two causes are equal when they read the same (errors have no equality of their own).
impl PartialEq for Cause {
    fn eq(&self, other: &Cause) -> bool {
        self.to_string() == other.to_string()
    }
}

impl Eq for Cause {}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Message(String);

impl From<String> for Cause {
    fn from(s: String) -> Cause {
        Cause::new(Message(s))
    }
}

impl From<&str> for Cause {
    fn from(s: &str) -> Cause {
        Cause::new(Message(s.to_string()))
    }
}

/// The primitive operations, with etcd v3 semantics. Implementations: [`etcd::EtcdStore`],
/// [`mem::MemStore`]; [`timed::Timed`] adds the per-call timeout.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;
    /// Every key starting with `prefix`, sorted by key, and the store revision.
    async fn get_prefix(&self, prefix: &str) -> Result<Range>;
    /// Applies `ops` atomically if every compare holds.
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnResponse>;
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;
    /// Refreshes a lease once; `LeaseNotFound` when it has expired or was revoked.
    async fn keep_alive(&self, lease: LeaseId) -> Result<()>;
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;
    /// Events on keys under `prefix` from `start_revision` (inclusive). A start revision that
    /// was compacted yields `Compacted`; the stream ends or errs when the connection breaks.
    async fn watch_prefix(&self, prefix: &str, start_revision: i64) -> Result<WatchStream>;
    /// Drops history before `revision` (tests and maintenance).
    async fn compact(&self, revision: i64) -> Result<()>;
}

impl Op {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Op {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: None,
        }
    }
}
