//! `ClusterData`: the one document under `P/clusterdata` (store-format.md), in stolon's
//! formatVersion 1 encoding. Unknown fields are kept in `extra` on every object.

use super::serde_util::{is_default, nullable, port, GoDuration, Timestamp};
use super::spec::ArchiveRecoverySettings;
use super::spec::{ClusterSpec, NewConfig, PgParameters, PitrConfig, StandbySettings};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

pub const FORMAT_VERSION: u64 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterData {
    pub format_version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_time: Option<Timestamp>,
    pub cluster: Cluster,
    #[serde(default, deserialize_with = "nullable")]
    pub keepers: BTreeMap<String, Keeper>,
    #[serde(default, deserialize_with = "nullable")]
    pub dbs: BTreeMap<String, Db>,
    #[serde(default, deserialize_with = "nullable")]
    pub proxy: Proxy,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterPhase {
    #[default]
    Initializing,
    Normal,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cluster {
    #[serde(default, skip_serializing_if = "is_default")]
    pub uid: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub generation: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_time: Option<Timestamp>,
    #[serde(default, deserialize_with = "nullable")]
    pub spec: ClusterSpec,
    #[serde(default)]
    pub status: ClusterStatus,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    #[serde(default, skip_serializing_if = "is_default")]
    pub current_generation: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ClusterPhase>,
    /// The master db's UID.
    #[serde(default, skip_serializing_if = "is_default")]
    pub master: String,
    /// Ours: the progress of the last planned switchover (store-format.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switchover: Option<SwitchoverStatus>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A planned switchover request, written by `stolonctl switchover` to `P/switchover`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SwitchoverRequest {
    #[serde(rename = "targetKeeperUID")]
    pub target_keeper_uid: String,
    pub requested_at: Timestamp,
}

/// A maintenance pause, written by `stolonctl pause` to `P/pause` (our key; Go stolon ignores
/// it): while active the sentinel observes and reports but changes no topology.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pause {
    pub since: Timestamp,
    /// When it ends by itself; none: until `stolonctl resume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

impl Pause {
    /// Whether the pause holds at `now` (a deadline ends it by itself).
    pub fn active(&self, now: Timestamp) -> bool {
        self.until.is_none_or(|u| now < u)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SwitchoverPhase {
    /// Proxies told there is no master and to drain: they hold new sessions and close the
    /// old master's at transaction boundaries; the old master still runs.
    Draining,
    /// Proxies drained (or past proxyTimeout); the old master is being stopped cleanly and
    /// turned into a standby.
    Stopping,
    /// The target was promoted.
    Completed,
    /// Refused or abandoned; `reason` says why.
    Failed,
}

/// Progress of a planned switchover, kept in `cluster.status.switchover`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SwitchoverStatus {
    #[serde(rename = "targetKeeperUID")]
    pub target_keeper_uid: String,
    /// Identifies the request this status answers.
    pub requested_at: Timestamp,
    pub phase: SwitchoverPhase,
    #[serde(default, skip_serializing_if = "is_default")]
    pub old_master_db_uid: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub target_db_uid: String,
    /// The old master's last WAL position once it stopped; the target is promoted only
    /// after replaying up to here.
    #[serde(default, skip_serializing_if = "is_default")]
    pub stop_position: u64,
    pub started_at: Timestamp,
    #[serde(default, skip_serializing_if = "is_default")]
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostgresBinaryVersion {
    #[serde(rename = "Maj", default)]
    pub maj: u32,
    #[serde(rename = "Min", default)]
    pub min: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Keeper {
    #[serde(default, skip_serializing_if = "is_default")]
    pub uid: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub generation: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_time: Option<Timestamp>,
    /// Empty in stolon; kept as raw JSON so a future field survives a rewrite.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<Map<String, Value>>,
    #[serde(default)]
    pub status: KeeperStatus,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeeperStatus {
    #[serde(default, skip_serializing_if = "is_default")]
    pub healthy: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_healthy_time: Option<Timestamp>,
    #[serde(rename = "bootUUID", default, skip_serializing_if = "is_default")]
    pub boot_uuid: String,
    #[serde(default)]
    pub postgres_binary_version: PostgresBinaryVersion,
    #[serde(default, skip_serializing_if = "is_default")]
    pub force_fail: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub can_be_master: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub can_be_synchronous_replica: Option<bool>,
    /// Ours (a Go sentinel drops it): where the keeper answers failsafe requests, copied
    /// from its KeeperInfo so that a master cut from the store still knows where to ask.
    #[serde(
        rename = "stolonFailsafeAddress",
        default,
        skip_serializing_if = "is_default"
    )]
    pub failsafe_address: String,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DbInitMode {
    None,
    New,
    Existing,
    Pitr,
    Resync,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DbRole {
    Master,
    Standby,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FollowType {
    Internal,
    External,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FollowConfig {
    #[serde(rename = "type")]
    pub kind: FollowType,
    /// The followed db when `kind` is internal.
    #[serde(default, skip_serializing_if = "is_default")]
    pub dbuid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby_settings: Option<StandbySettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_recovery_settings: Option<ArchiveRecoverySettings>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Db {
    #[serde(default, skip_serializing_if = "is_default")]
    pub uid: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub generation: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_time: Option<Timestamp>,
    #[serde(default, deserialize_with = "nullable")]
    pub spec: DbSpec,
    #[serde(default)]
    pub status: DbStatus,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DbSpec {
    #[serde(rename = "keeperUID", default, skip_serializing_if = "is_default")]
    pub keeper_uid: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub request_timeout: GoDuration,
    #[serde(default, skip_serializing_if = "is_default")]
    pub max_standbys: u16,
    #[serde(default, skip_serializing_if = "is_default")]
    pub synchronous_replication: bool,
    #[serde(default, skip_serializing_if = "is_default")]
    pub use_pgrewind: bool,
    #[serde(default)]
    pub additional_wal_senders: u16,
    #[serde(default, deserialize_with = "nullable")]
    pub additional_replication_slots: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_mode: Option<DbInitMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_config: Option<NewConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pitr_config: Option<PitrConfig>,
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "nullable"
    )]
    pub pg_parameters: PgParameters,
    #[serde(rename = "pgHBA", default)]
    pub pg_hba: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<DbRole>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow_config: Option<FollowConfig>,
    #[serde(default, deserialize_with = "nullable")]
    pub followers: Vec<String>,
    #[serde(
        rename = "includePreviousConfig",
        default,
        skip_serializing_if = "is_default"
    )]
    pub include_previous_config: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub synchronous_standbys: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub external_synchronous_standbys: Vec<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TimelineHistoryEntry {
    #[serde(rename = "timelineID", default, skip_serializing_if = "is_default")]
    pub timeline_id: u64,
    #[serde(default, skip_serializing_if = "is_default")]
    pub switch_point: u64,
    #[serde(default, skip_serializing_if = "is_default")]
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DbStatus {
    #[serde(default, skip_serializing_if = "is_default")]
    pub healthy: bool,
    #[serde(default, skip_serializing_if = "is_default")]
    pub current_generation: i64,
    #[serde(default, skip_serializing_if = "is_default")]
    pub listen_address: String,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "port")]
    pub port: Option<u16>,
    /// Spelled `systemdID` in stolon's encoding (sic).
    #[serde(rename = "systemdID", default, skip_serializing_if = "is_default")]
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
    /// Ours, failsafe mode, on the master's db: the dbs of the clusterdata its keeper last
    /// reported holding. Only one of them may replace it (db uids are never reused, so a db
    /// listed there that still exists was in every clusterdata since: the master asks its
    /// keeper before it holds).
    #[serde(
        rename = "stolonFailsafeDbs",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub failsafe_dbs: Vec<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Db {
    /// Whether a standby at `(timeline, pos)`, whose own timeline history is `history`, has
    /// diverged from this master (`DbStatus::forked_from`), with one exception: while this
    /// db has not converged on its spec (its promotion is being acted on), its status can
    /// still be the one from before the promotion, and a standby that already follows the
    /// new timeline looks exactly like that: on a later timeline, branched from this db's
    /// reported one at or after the position this db reported. Such a standby is not
    /// rebuilt on that evidence; once this db reports again, the fork is proven or not.
    pub fn forks_standby(&self, timeline: u64, pos: u64, history: &[TimelineHistoryEntry]) -> bool {
        let m = &self.status;
        if !m.forked_from(timeline, pos) {
            return false;
        }
        let settling = m.current_generation != self.generation;
        let follows_a_promotion = timeline > m.timeline_id
            && (history.iter())
                .any(|h| h.timeline_id == m.timeline_id && h.switch_point >= m.x_log_pos);
        !(settling && follows_a_promotion)
    }
}

impl DbStatus {
    /// Whether a history at `(timeline, pos)` has diverged from this (master's) one: it is
    /// on an older timeline and went past the point where this one switched away from it,
    /// or on a timeline this one never was on. Unknown facts (zeroes, a timeline missing
    /// from this history) count as not forked.
    pub fn forked_from(&self, timeline: u64, pos: u64) -> bool {
        if timeline == 0 || self.timeline_id == 0 || timeline == self.timeline_id {
            return false;
        }
        if timeline > self.timeline_id {
            return true;
        }
        self.timelines_history
            .iter()
            .find(|h| h.timeline_id == timeline)
            // Past the switch point by even one record: PostgreSQL still follows when that
            // last record starts exactly at the switch point, but refuses for anything more,
            // and the position alone cannot tell the two apart. A rebuild more than needed
            // is the price; a standby stuck at a fork forever is not.
            .is_some_and(|entry| pos > entry.switch_point)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Proxy {
    #[serde(default, skip_serializing_if = "is_default")]
    pub uid: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub generation: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_time: Option<Timestamp>,
    #[serde(default)]
    pub spec: ProxySpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Map<String, Value>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxySpec {
    /// The db proxies route to; empty while proxies must be fenced.
    #[serde(default, skip_serializing_if = "is_default")]
    pub master_db_uid: String,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "nullable"
    )]
    pub enabled_proxies: Vec<String>,
    /// Our addition: the master change under way is planned (a switchover), so proxies
    /// close the old master's sessions at transaction boundaries instead of at once, and
    /// report the generation after. Go stolon's components ignore it (its proxy severs at
    /// once, which fences just as well).
    #[serde(default, skip_serializing_if = "is_default")]
    pub drain: bool,
    /// Our addition: the sentinel that wrote this counts a proxy whose info says
    /// `stolonLeaseLiveness` active while its key exists, so such proxies may stop rewriting
    /// their info every interval. A Go sentinel drops the key when it rewrites the
    /// document, and our proxies then go back to rewriting their infoUID every interval.
    #[serde(default, skip_serializing_if = "is_default")]
    pub lease_liveness: bool,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Db {
    /// Whether this db is the one that takes writes (or, in a standby cluster, the one that
    /// follows the external primary).
    pub fn acts_as_master(&self) -> bool {
        match self.spec.role {
            Some(DbRole::Master) => true,
            Some(DbRole::Standby) => self
                .spec
                .follow_config
                .as_ref()
                .is_some_and(|f| f.kind == FollowType::External),
            None => false,
        }
    }
}

impl ClusterData {
    /// A new cluster document in phase initializing, as `stolonctl init` writes it.
    pub fn new(uid: impl Into<String>, spec: ClusterSpec, now: Timestamp) -> Self {
        ClusterData {
            format_version: FORMAT_VERSION,
            change_time: Some(now),
            cluster: Cluster {
                uid: uid.into(),
                generation: 1,
                change_time: Some(now),
                spec,
                status: ClusterStatus {
                    phase: Some(ClusterPhase::Initializing),
                    ..Default::default()
                },
                extra: Map::new(),
            },
            keepers: BTreeMap::new(),
            dbs: BTreeMap::new(),
            proxy: Proxy::default(),
            extra: Map::new(),
        }
    }

    /// A db replaced as master by a failover. Go stolon's sentinel leaves its spec as it was
    /// (role master, or a standby cluster's external follower) with its followers cleared,
    /// and removes it once the new master is healthy and converged; its keeper then gets a
    /// new standby db. Until then our keeper runs it read-only (see the keeper's plan).
    pub fn is_old_master(&self, db: &Db) -> bool {
        let master = &self.cluster.status.master;
        db.acts_as_master() && !master.is_empty() && *master != db.uid
    }

    /// Whether `next` differs from this document only in the dbs' reported WAL positions
    /// (and the document's change time): the churn a cluster under write load makes on
    /// every keeper report, which no keeper or proxy acts on. The sentinel writes such a
    /// change at most once per sleepInterval (as Go's timer-driven sentinel does), so a
    /// fleet of proxies watching the document is not woken for each WAL position.
    pub fn differs_only_in_wal_positions(&self, next: &ClusterData) -> bool {
        let strip = |cd: &ClusterData| {
            let mut cd = cd.clone();
            cd.change_time = None;
            for db in cd.dbs.values_mut() {
                db.status.x_log_pos = 0;
            }
            cd
        };
        self != next && strip(self) == strip(next)
    }

    /// The address proxies must route to: the db named by `proxy.spec.masterDbUid`, when it
    /// exists and has a listen address and port. `None` means "no master".
    pub fn proxy_master_address(&self) -> Option<(&str, u16)> {
        self.db_address(&self.proxy.spec.master_db_uid)
    }

    /// The listen address and port the db `uid` reports, when it exists and has both.
    pub fn db_address(&self, uid: &str) -> Option<(&str, u16)> {
        let db = self.dbs.get(uid)?;
        let port = db.status.port?;
        if db.status.listen_address.is_empty() {
            return None;
        }
        Some((db.status.listen_address.as_str(), port))
    }
}
