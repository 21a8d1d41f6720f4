//! The short-lived documents each component publishes under a lease: KeeperInfo,
//! SentinelInfo and ProxyInfo (store-format.md).

use super::cluster::{PostgresBinaryVersion, TimelineHistoryEntry};
use super::serde_util::{is_default, nanos, nullable, port, GoDuration};
use super::spec::PgParameters;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeeperInfo {
    /// A new random value on every publish: the sentinel counts an info as fresh only when
    /// this changed.
    #[serde(rename = "infoUID", default, skip_serializing_if = "is_default")]
    pub info_uid: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub uid: String,
    #[serde(rename = "clusterUID", default, skip_serializing_if = "is_default")]
    pub cluster_uid: String,
    #[serde(rename = "bootUUID", default, skip_serializing_if = "is_default")]
    pub boot_uuid: String,
    #[serde(default)]
    pub postgres_binary_version: PostgresBinaryVersion,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres_state: Option<PostgresState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub can_be_master: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub can_be_synchronous_replica: Option<bool>,
    /// Ours: higher is preferred among equally up-to-date candidates.
    #[serde(default, skip_serializing_if = "is_default")]
    pub priority: i32,
    /// Ours: the keeper has fenced its master.
    #[serde(default, skip_serializing_if = "is_default")]
    pub fenced: bool,
    /// Ours: where this keeper answers failsafe requests (its health listener, host:port).
    #[serde(
        rename = "stolonFailsafeAddress",
        default,
        skip_serializing_if = "is_default"
    )]
    pub failsafe_address: String,
    /// Ours: the keeper's failsafe state when it published (failsafe mode on only).
    #[serde(
        rename = "stolonFailsafe",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub failsafe: Option<FailsafeReport>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A keeper's failsafe state, as `stolonctl status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailsafeReport {
    /// A master: since when it has been holding on its peers' acknowledgements (RFC 3339).
    #[serde(default, skip_serializing_if = "is_default")]
    pub held_since: String,
    /// A master: the peers whose acknowledgement is valid now, out of how many it needs.
    #[serde(default, skip_serializing_if = "is_default")]
    pub acks: u32,
    #[serde(default, skip_serializing_if = "is_default")]
    pub peers: u32,
    /// A keeper that acknowledged a master: that db, and how long it stays out of the
    /// master's role from the publish.
    #[serde(default, skip_serializing_if = "is_default")]
    pub promised_to: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub promised_for_ms: u64,
    /// A master: the dbs of the clusterdata it holds (the sentinel elects only among them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dbs: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PostgresState {
    #[serde(default, skip_serializing_if = "is_default")]
    pub uid: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub generation: i64,
    #[serde(default, skip_serializing_if = "is_default")]
    pub listen_address: String,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "port")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub healthy: bool,
    #[serde(rename = "systemID", default, skip_serializing_if = "is_default")]
    pub system_id: String,
    #[serde(rename = "timelineID", default, skip_serializing_if = "is_default")]
    pub timeline_id: u64,
    #[serde(default, skip_serializing_if = "is_default")]
    pub x_log_pos: u64,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "nullable"
    )]
    pub timelines_history: Vec<TimelineHistoryEntry>,
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "nullable"
    )]
    pub pg_parameters: PgParameters,
    #[serde(default, deserialize_with = "nullable")]
    pub synchronous_standbys: Vec<String>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub older_wal_file: String,
    /// Our addition (a Go component ignores it): this PostgreSQL was a master, stopped
    /// cleanly and has not run since, so its WAL ends with the shutdown checkpoint at this
    /// position. A switchover promotes its target once the target has received this far,
    /// without waiting for the old master to rejoin as a standby. 0: not known.
    #[serde(
        rename = "stolonShutdownCheckpoint",
        default,
        skip_serializing_if = "is_default"
    )]
    pub shutdown_checkpoint: u64,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentinelInfo {
    #[serde(rename = "UID")]
    pub uid: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProxyInfo {
    #[serde(rename = "infoUID", default, skip_serializing_if = "is_default")]
    pub info_uid: String,
    #[serde(rename = "UID", default)]
    pub uid: String,
    /// The proxy generation this proxy has applied (closed the old connections for).
    #[serde(rename = "Generation", default)]
    pub generation: i64,
    /// Go `time.Duration`: integer nanoseconds.
    #[serde(rename = "ProxyTimeout", default, with = "nanos")]
    pub proxy_timeout: GoDuration,
    /// Our addition (absent from Go's proxy, which has none): this proxy runs a read-only
    /// listener, so a standby's promotion waits for it to cut that standby's read-only
    /// sessions. A proxy without one has nothing to cut.
    #[serde(rename = "stolonReadOnly", default, skip_serializing_if = "is_default")]
    pub read_only: bool,
    /// Our addition: this proxy rewrites its info only when what it reports changes and
    /// proves it is alive by keeping its lease (TTL 2 x ProxyTimeout, [`proxy_lease_ttl`]),
    /// so the sentinel counts it active while the key exists instead of waiting for the
    /// infoUID to change. A Go proxy writes a new infoUID every interval and has no such key.
    #[serde(
        rename = "stolonLeaseLiveness",
        default,
        skip_serializing_if = "is_default"
    )]
    pub lease_liveness: bool,
    /// Our addition: at a planned switchover this proxy takes the target out of its
    /// read-only pool in the drain's generation (it opens no read-only session there once it
    /// reported that generation), so the target's promotion needs no generation of its own.
    /// Absent (an older proxy with a read-only listener): the promotion fences again.
    #[serde(
        rename = "stolonTargetOutAtDrain",
        default,
        skip_serializing_if = "is_default"
    )]
    pub target_out_at_drain: bool,
    /// Our addition: the process ID this proxy puts in the cancel keys it mints, and the
    /// address where it takes CancelRequests, so another proxy that receives one of its
    /// keys forwards the cancel there. Empty: it cannot be reached that way.
    #[serde(rename = "stolonCancelId", default, skip_serializing_if = "is_default")]
    pub cancel_id: u32,
    #[serde(
        rename = "stolonCancelAddress",
        default,
        skip_serializing_if = "is_default"
    )]
    pub cancel_address: String,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The lease TTL of a proxy that proves liveness by its lease: 2 x its proxyTimeout, as long
/// as the infoUID rule lets a silent proxy live, in whole seconds (etcd's unit) and at least
/// 2 s. The proxy fences itself after proxyTimeout without contact, and contact includes a
/// keep-alive of this lease, so the key outlives the proxy's routing by at least
/// proxyTimeout: once the key is gone, the proxy has fenced itself.
pub fn proxy_lease_ttl(proxy_timeout: GoDuration) -> std::time::Duration {
    let doubled = proxy_timeout.as_std().saturating_mul(2);
    let secs = doubled.as_secs() + u64::from(doubled.subsec_nanos() > 0);
    std::time::Duration::from_secs(secs.max(2))
}
