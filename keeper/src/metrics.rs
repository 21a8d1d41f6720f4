//! The keeper's metrics on `--metrics-listen-address`, under Go stolon's names so a stolon
//! dashboard keeps working: `stolon_keeper_clusterdata_last_valid_update_seconds`,
//! `_target_role{role}`, `_local_role{role}`, `_needs_reload`, `_needs_restart`,
//! `_last_sync_success_seconds`, `_sleep_interval`, `_shutdown_seconds`, ours
//! `_clusterdata_revision`, `_failsafe_held`, `_failsafe_acks`, `_failsafe_peers`,
//! `_failsafe_promised`, plus
//! `stolon_cluster_identifier` and the process metrics (see `control::metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

type F64Gauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabel {
    pub role: &'static str,
}

/// Go's roles (`common.Roles`); exactly one is 1 at a time.
const ROLES: [&str; 3] = ["master", "standby", "undefined"];

#[derive(Default)]
pub struct KeeperMetrics {
    pub clusterdata_last_valid_update: F64Gauge,
    pub target_role: Family<RoleLabel, Gauge>,
    pub local_role: Family<RoleLabel, Gauge>,
    pub needs_reload: Gauge,
    pub needs_restart: Gauge,
    pub last_sync_success: F64Gauge,
    pub sleep_interval: F64Gauge,
    pub shutdown: F64Gauge,
    /// Ours: the store revision of the clusterdata the loop's last round planned on (0
    /// before the first), so an operator sees a keeper that lags the store's. Failsafe
    /// acknowledgements compare the watch's newest, which may be a moment ahead of it.
    pub clusterdata_revision: Gauge,
    /// Ours, failsafe mode: holding on the peers' acknowledgements (0/1), how many of them
    /// acknowledge now out of how many the hold needs, and whether this keeper promised to
    /// stay out of the master's role (0/1).
    pub failsafe_held: Gauge,
    pub failsafe_acks: Gauge,
    pub failsafe_peers: Gauge,
    pub failsafe_promised: Gauge,
}

impl KeeperMetrics {
    pub fn new() -> Arc<Self> {
        let m = Arc::new(Self::default());
        set_role(&m.target_role, None);
        set_role(&m.local_role, None);
        m
    }

    /// Registers under `stolon_keeper_` in `root`.
    pub fn register(self: &Arc<Self>, root: &mut Registry) {
        let r = root.sub_registry_with_prefix("stolon_keeper");
        r.register(
            "clusterdata_last_valid_update_seconds",
            "Last time we received a valid clusterdata from our store as seconds since unix epoch",
            self.clusterdata_last_valid_update.clone(),
        );
        r.register(
            "target_role",
            "Keeper last requested target role",
            self.target_role.clone(),
        );
        r.register(
            "local_role",
            "Keeper current local role",
            self.local_role.clone(),
        );
        r.register(
            "needs_reload",
            "Set to 1 if Postgres requires reload",
            self.needs_reload.clone(),
        );
        r.register(
            "needs_restart",
            "Set to 1 if Postgres requires restart",
            self.needs_restart.clone(),
        );
        r.register(
            "last_sync_success_seconds",
            "Last time we successfully synced our keeper",
            self.last_sync_success.clone(),
        );
        r.register(
            "sleep_interval",
            "Seconds to sleep between sync loops",
            self.sleep_interval.clone(),
        );
        r.register(
            "shutdown_seconds",
            "Shutdown time (received termination signal) since unix epoch in seconds",
            self.shutdown.clone(),
        );
        r.register(
            "clusterdata_revision",
            "Store revision of the newest clusterdata this keeper has read",
            self.clusterdata_revision.clone(),
        );
        r.register(
            "failsafe_held",
            "1 while this master holds on its peers' failsafe acknowledgements without the store",
            self.failsafe_held.clone(),
        );
        r.register(
            "failsafe_acks",
            "Peers whose failsafe acknowledgement of this master is valid now",
            self.failsafe_acks.clone(),
        );
        r.register(
            "failsafe_peers",
            "Peers a failsafe hold of this master needs",
            self.failsafe_peers.clone(),
        );
        r.register(
            "failsafe_promised",
            "1 while this keeper stays out of the master's role after acknowledging another master",
            self.failsafe_promised.clone(),
        );
    }
}

/// Sets `role` to 1 and every other role to 0 (`None`: "undefined").
pub fn set_role(family: &Family<RoleLabel, Gauge>, role: Option<&'static str>) {
    let role = role.unwrap_or("undefined");
    for r in ROLES {
        family
            .get_or_create(&RoleLabel { role: r })
            .set(i64::from(r == role));
    }
}
