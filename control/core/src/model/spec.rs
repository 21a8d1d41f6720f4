//! `ClusterSpec`: the operator's wishes for the cluster, with stolon's defaults, validation
//! and JSON merge patch (RFC 7386) for `stolonctl update -p`.

use super::serde_util::{is_default, nullable, GoDuration};
use super::ModelError;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

pub type PgParameters = BTreeMap<String, String>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterInitMode {
    New,
    Existing,
    Pitr,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterRole {
    #[default]
    Master,
    Standby,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SuReplAccessMode {
    #[default]
    All,
    Strict,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewConfig {
    #[serde(default, skip_serializing_if = "is_default")]
    pub locale: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub encoding: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub data_checksums: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArchiveRecoverySettings {
    #[serde(default, skip_serializing_if = "is_default")]
    pub restore_command: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryTargetSettings {
    #[serde(default, skip_serializing_if = "is_default")]
    pub recovery_target: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub recovery_target_lsn: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub recovery_target_name: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub recovery_target_time: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub recovery_target_xid: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub recovery_target_timeline: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PitrConfig {
    /// Shell command that restores the data dir; `%d` is replaced by its path.
    #[serde(default, skip_serializing_if = "is_default")]
    pub data_restore_command: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_recovery_settings: Option<ArchiveRecoverySettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_target_settings: Option<RecoveryTargetSettings>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExistingConfig {
    #[serde(rename = "keeperUID", default, skip_serializing_if = "is_default")]
    pub keeper_uid: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StandbySettings {
    #[serde(default, skip_serializing_if = "is_default")]
    pub primary_conninfo: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub primary_slot_name: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub recovery_min_apply_delay: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StandbyConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby_settings: Option<StandbySettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_recovery_settings: Option<ArchiveRecoverySettings>,
}

/// The cluster spec. Every field is optional as in Go stolon (pointers there): `None` means
/// "the default", resolved by [`ClusterSpec::with_defaults`] or the accessor methods.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleep_interval: Option<GoDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<GoDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub convergence_timeout: Option<GoDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_timeout: Option<GoDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_timeout: Option<GoDuration>,
    #[serde(
        rename = "dbWaitReadyTimeout",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub db_wait_ready_timeout: Option<GoDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_interval: Option<GoDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_keeper_removal_interval: Option<GoDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_check_interval: Option<GoDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_timeout: Option<GoDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_standbys: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_standbys_per_sender: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_standby_lag: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synchronous_replication: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_synchronous_standbys: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_synchronous_standbys: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub additional_wal_senders: Option<u16>,
    /// Go writes this without omitempty, so `null` is common.
    #[serde(default, deserialize_with = "nullable")]
    pub additional_master_replication_slots: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_pgrewind: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_mode: Option<ClusterInitMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge_pg_parameters: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<ClusterRole>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_config: Option<NewConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pitr_config: Option<PitrConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub existing_config: Option<ExistingConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby_config: Option<StandbyConfig>,
    #[serde(
        rename = "defaultSUReplAccessMode",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub default_su_repl_access_mode: Option<SuReplAccessMode>,
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "nullable"
    )]
    pub pg_parameters: PgParameters,
    /// `None` (JSON null) means the default md5 rules; `Some(vec![])` means no extra rules.
    #[serde(rename = "pgHBA", default)]
    pub pg_hba: Option<Vec<String>>,
    #[serde(default)]
    pub automatic_pg_restart: Option<bool>,
    /// Ours (a Go component ignores it): while the store cannot be reached, a master stays
    /// writable as long as every keeper of the last clusterdata acknowledges it directly
    /// (docs/design.md "Failsafe mode").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failsafe_mode: Option<bool>,
    /// Fields this version does not know, kept so a rewrite does not drop them.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Defaults, as in store-format.md (stolon's, with its maxStandbyLag typo fixed to 1 MiB).
pub mod defaults {
    use super::GoDuration;
    pub const SLEEP_INTERVAL: GoDuration = GoDuration::from_secs(5);
    pub const REQUEST_TIMEOUT: GoDuration = GoDuration::from_secs(10);
    pub const CONVERGENCE_TIMEOUT: GoDuration = GoDuration::from_secs(30);
    pub const INIT_TIMEOUT: GoDuration = GoDuration::from_secs(300);
    pub const SYNC_TIMEOUT: GoDuration = GoDuration(0);
    pub const DB_WAIT_READY_TIMEOUT: GoDuration = GoDuration::from_secs(60);
    pub const FAIL_INTERVAL: GoDuration = GoDuration::from_secs(20);
    pub const DEAD_KEEPER_REMOVAL_INTERVAL: GoDuration = GoDuration::from_secs(48 * 3600);
    pub const PROXY_CHECK_INTERVAL: GoDuration = GoDuration::from_secs(5);
    pub const PROXY_TIMEOUT: GoDuration = GoDuration::from_secs(15);
    pub const MAX_STANDBYS: u16 = 20;
    pub const MAX_STANDBYS_PER_SENDER: u16 = 3;
    pub const MAX_STANDBY_LAG: u32 = 1024 * 1024;
    pub const MIN_SYNCHRONOUS_STANDBYS: u16 = 1;
    pub const MAX_SYNCHRONOUS_STANDBYS: u16 = 1;
    pub const ADDITIONAL_WAL_SENDERS: u16 = 5;
}

macro_rules! accessors {
    ($($name:ident : $ty:ty = $default:expr;)*) => {
        impl ClusterSpec {
            $(
                #[doc = concat!("`", stringify!($name), "`, or its default.")]
                pub fn $name(&self) -> $ty { self.$name.unwrap_or($default) }
            )*
            /// A copy with every unset field filled with its default (`stolonctl spec --defaults`).
            pub fn with_defaults(&self) -> ClusterSpec {
                let mut s = self.clone();
                $( s.$name = Some(self.$name()); )*
                s
            }
        }
    };
}

accessors! {
    sleep_interval: GoDuration = defaults::SLEEP_INTERVAL;
    request_timeout: GoDuration = defaults::REQUEST_TIMEOUT;
    convergence_timeout: GoDuration = defaults::CONVERGENCE_TIMEOUT;
    init_timeout: GoDuration = defaults::INIT_TIMEOUT;
    sync_timeout: GoDuration = defaults::SYNC_TIMEOUT;
    db_wait_ready_timeout: GoDuration = defaults::DB_WAIT_READY_TIMEOUT;
    fail_interval: GoDuration = defaults::FAIL_INTERVAL;
    dead_keeper_removal_interval: GoDuration = defaults::DEAD_KEEPER_REMOVAL_INTERVAL;
    proxy_check_interval: GoDuration = defaults::PROXY_CHECK_INTERVAL;
    proxy_timeout: GoDuration = defaults::PROXY_TIMEOUT;
    max_standbys: u16 = defaults::MAX_STANDBYS;
    max_standbys_per_sender: u16 = defaults::MAX_STANDBYS_PER_SENDER;
    max_standby_lag: u32 = defaults::MAX_STANDBY_LAG;
    synchronous_replication: bool = false;
    min_synchronous_standbys: u16 = defaults::MIN_SYNCHRONOUS_STANDBYS;
    max_synchronous_standbys: u16 = defaults::MAX_SYNCHRONOUS_STANDBYS;
    additional_wal_senders: u16 = defaults::ADDITIONAL_WAL_SENDERS;
    use_pgrewind: bool = false;
    merge_pg_parameters: bool = true;
    role: ClusterRole = ClusterRole::Master;
    default_su_repl_access_mode: SuReplAccessMode = SuReplAccessMode::All;
    automatic_pg_restart: bool = false;
}

impl ClusterSpec {
    /// `failsafeMode`, or false. Ours, so outside `with_defaults`: `stolonctl spec
    /// --defaults` prints exactly Go stolon's keys, and this one only when it is set.
    pub fn failsafe_mode(&self) -> bool {
        self.failsafe_mode.unwrap_or(false)
    }
}

/// A validation failure: which field, and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid cluster spec: {field}: {reason}")]
pub struct SpecError {
    pub field: &'static str,
    pub reason: String,
}

fn bad(field: &'static str, reason: impl Into<String>) -> SpecError {
    SpecError {
        field,
        reason: reason.into(),
    }
}

impl ClusterSpec {
    /// Checks every rule of store-format.md ("Validation") plus stolon's own range checks.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.validate_durations()?;
        self.validate_counts()?;
        for slot in &self.additional_master_replication_slots {
            validate_slot_name(slot)?;
        }
        if let Some(hba) = &self.pg_hba {
            if hba.iter().any(|e| e.contains('\n')) {
                return Err(bad("pgHBA", "entries cannot contain newline characters"));
            }
        }
        self.validate_modes()
    }

    fn validate_durations(&self) -> Result<(), SpecError> {
        let all: [(&'static str, GoDuration); 10] = [
            ("sleepInterval", self.sleep_interval()),
            ("requestTimeout", self.request_timeout()),
            ("convergenceTimeout", self.convergence_timeout()),
            ("initTimeout", self.init_timeout()),
            ("syncTimeout", self.sync_timeout()),
            ("dbWaitReadyTimeout", self.db_wait_ready_timeout()),
            ("failInterval", self.fail_interval()),
            (
                "deadKeeperRemovalInterval",
                self.dead_keeper_removal_interval(),
            ),
            ("proxyCheckInterval", self.proxy_check_interval()),
            ("proxyTimeout", self.proxy_timeout()),
        ];
        for (field, d) in all {
            if d.is_negative() {
                return Err(bad(field, "must not be negative"));
            }
        }
        for (field, d) in [
            ("sleepInterval", self.sleep_interval()),
            ("failInterval", self.fail_interval()),
            ("proxyTimeout", self.proxy_timeout()),
        ] {
            if d.0 == 0 {
                return Err(bad(field, "must be greater than zero"));
            }
        }
        if self.proxy_check_interval() >= self.proxy_timeout() {
            return Err(bad(
                "proxyCheckInterval",
                format!(
                    "{} must be less than proxyTimeout ({})",
                    self.proxy_check_interval(),
                    self.proxy_timeout()
                ),
            ));
        }
        Ok(())
    }

    fn validate_counts(&self) -> Result<(), SpecError> {
        if self.max_standbys() < 1 {
            return Err(bad("maxStandbys", "must be at least 1"));
        }
        if self.max_standbys_per_sender() < 1 {
            return Err(bad("maxStandbysPerSender", "must be at least 1"));
        }
        let (min, max) = (
            self.min_synchronous_standbys(),
            self.max_synchronous_standbys(),
        );
        if max < min.max(1) {
            return Err(bad(
                "maxSynchronousStandbys",
                format!("{max} must be at least 1 and at least minSynchronousStandbys ({min})"),
            ));
        }
        Ok(())
    }

    fn validate_modes(&self) -> Result<(), SpecError> {
        let role = self.role();
        match self.init_mode {
            None => return Err(bad("initMode", "required (new, existing or pitr)")),
            Some(ClusterInitMode::New) if role == ClusterRole::Standby => {
                return Err(bad("role", "standby is not allowed with initMode new"));
            }
            Some(ClusterInitMode::New) => {}
            Some(ClusterInitMode::Existing) => {
                let uid = self.existing_config.as_ref().map(|c| c.keeper_uid.as_str());
                if uid.unwrap_or("").is_empty() {
                    return Err(bad(
                        "existingConfig.keeperUID",
                        "required when initMode is existing",
                    ));
                }
            }
            Some(ClusterInitMode::Pitr) => {
                let Some(pitr) = &self.pitr_config else {
                    return Err(bad("pitrConfig", "required when initMode is pitr"));
                };
                if pitr.data_restore_command.is_empty() {
                    return Err(bad(
                        "pitrConfig.dataRestoreCommand",
                        "required when initMode is pitr",
                    ));
                }
                if pitr.recovery_target_settings.is_some() && role == ClusterRole::Standby {
                    return Err(bad(
                        "pitrConfig.recoveryTargetSettings",
                        "recovery targets are not allowed with role standby",
                    ));
                }
            }
        }
        if role == ClusterRole::Standby && self.standby_config.is_none() {
            return Err(bad("standbyConfig", "required when role is standby"));
        }
        Ok(())
    }

    /// Checks that `new` may replace `self`: valid on its own, same initMode, and not a
    /// master cluster turned into a standby cluster.
    pub fn validate_update(&self, new: &ClusterSpec) -> Result<(), SpecError> {
        new.validate()?;
        if self.init_mode != new.init_mode {
            return Err(bad(
                "initMode",
                "cannot be changed after the cluster is created",
            ));
        }
        if self.role() == ClusterRole::Master && new.role() == ClusterRole::Standby {
            return Err(bad(
                "role",
                "a master cluster cannot be turned into a standby cluster",
            ));
        }
        Ok(())
    }

    /// Applies a JSON merge patch (RFC 7386) to this spec and returns the result, validated
    /// as an update of `self`.
    pub fn merge_patch(&self, patch: &Value) -> Result<ClusterSpec, ModelError> {
        let mut doc = serde_json::to_value(self).map_err(ModelError::json("spec"))?;
        json_patch::merge(&mut doc, patch);
        let new: ClusterSpec = serde_json::from_value(doc).map_err(ModelError::json("spec"))?;
        self.validate_update(&new)?;
        Ok(new)
    }
}

/// PostgreSQL's replication slot names: lower-case letters, digits and underscores, at most
/// 63 bytes (NAMEDATALEN - 1). `stolon_` names are reserved for the keepers' own slots.
fn validate_slot_name(name: &str) -> Result<(), SpecError> {
    let field = "additionalMasterReplicationSlots";
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !valid {
        return Err(bad(
            field,
            format!("invalid replication slot name {name:?}"),
        ));
    }
    if name.starts_with("stolon_") {
        return Err(bad(field, format!("slot name {name:?} is reserved")));
    }
    Ok(())
}
