//! Phase initializing: create the first db on a chosen keeper (initMode new / pitr: the best
//! healthy keeper that may be master, another one after initTimeout; existing: the configured
//! keeper), wait for it to converge, then switch the cluster to phase normal.

use super::health::converged;
use super::{ReasonKind, Round};
use crate::model::{
    ClusterInitMode, ClusterPhase, ClusterRole, Db, DbInitMode, DbRole, DbSpec, FollowConfig,
    FollowType,
};

impl Round<'_> {
    pub(super) fn initialize(&mut self) {
        let master = self.cd.cluster.status.master.clone();
        let Some(db) = self.cd.dbs.get(&master).filter(|_| !master.is_empty()) else {
            self.start_init();
            return;
        };
        if converged(db) && db.status.healthy {
            let db = db.clone();
            self.finish_init(&db);
            return;
        }
        let started = match &self.mem.init_attempt {
            Some((uid, at)) if *uid == master => *at,
            // A new leader does not know when the attempt started: count from now.
            _ => {
                self.mem.init_attempt = Some((master.clone(), self.now));
                self.now
            }
        };
        if self.elapsed(started) < self.cd.cluster.spec.init_timeout() {
            self.reason(
                ReasonKind::InitWaiting,
                format!("waiting for db {master} to initialise"),
            );
            return;
        }
        let keeper = db.spec.keeper_uid.clone();
        self.reason(
            ReasonKind::InitRetry,
            format!("db {master} on keeper {keeper} did not initialise within initTimeout"),
        );
        self.mem.init_tried.insert(keeper);
        self.cd.dbs.remove(&master);
        self.cd.cluster.status.master.clear();
        self.mem.init_attempt = None;
        self.start_init();
    }

    fn start_init(&mut self) {
        let spec = &self.cd.cluster.spec;
        let Some(mode) = spec.init_mode else {
            self.reason(ReasonKind::BadSpec, "cluster spec has no initMode");
            return;
        };
        let keeper = match mode {
            ClusterInitMode::Existing => {
                let uid = spec
                    .existing_config
                    .as_ref()
                    .map(|c| c.keeper_uid.clone())
                    .unwrap_or_default();
                Some(uid).filter(|uid| self.keeper_alive(uid))
            }
            ClusterInitMode::New | ClusterInitMode::Pitr => self.init_candidate(),
        };
        let Some(keeper) = keeper else {
            self.reason(
                ReasonKind::InitWaiting,
                "no healthy keeper to initialise the cluster on",
            );
            return;
        };
        let db_spec = self.init_db_spec(mode, &keeper);
        let uid = self.add_db(db_spec);
        self.cd.cluster.status.master = uid.clone();
        self.mem.init_attempt = Some((uid.clone(), self.now));
        self.reason(
            ReasonKind::InitStarted,
            format!("initialising db {uid} ({mode:?}) on keeper {keeper}"),
        );
    }

    /// The best healthy keeper that may be master and was not tried yet; once all were
    /// tried, all are candidates again.
    fn init_candidate(&mut self) -> Option<String> {
        let eligible: Vec<String> = self
            .cd
            .keepers
            .iter()
            .filter(|(uid, k)| self.keeper_alive(uid) && k.status.can_be_master != Some(false))
            .map(|(uid, _)| uid.clone())
            .collect();
        let mut untried: Vec<&String> = eligible
            .iter()
            .filter(|uid| !self.mem.init_tried.contains(*uid))
            .collect();
        if untried.is_empty() {
            self.mem.init_tried.clear();
            untried = eligible.iter().collect();
        }
        untried
            .into_iter()
            .min_by_key(|uid| self.keeper_rank(uid))
            .cloned()
    }

    fn init_db_spec(&self, mode: ClusterInitMode, keeper: &str) -> DbSpec {
        let spec = &self.cd.cluster.spec;
        let standby_cluster = spec.role() == ClusterRole::Standby;
        let base = DbSpec {
            keeper_uid: keeper.to_string(),
            init_mode: Some(match mode {
                ClusterInitMode::New => DbInitMode::New,
                ClusterInitMode::Existing => DbInitMode::Existing,
                ClusterInitMode::Pitr => DbInitMode::Pitr,
            }),
            new_config: spec.new_config.clone(),
            pitr_config: spec.pitr_config.clone(),
            role: Some(if standby_cluster {
                DbRole::Standby
            } else {
                DbRole::Master
            }),
            follow_config: standby_cluster.then(|| self.external_follow_config()),
            // Init-time parameters of an existing data dir are kept when they are merged.
            include_previous_config: mode == ClusterInitMode::Existing
                && spec.merge_pg_parameters(),
            ..Default::default()
        };
        self.managed_spec(&base)
    }

    /// A standby cluster's master follows the external primary of `standbyConfig`.
    pub(super) fn external_follow_config(&self) -> FollowConfig {
        let standby = self
            .cd
            .cluster
            .spec
            .standby_config
            .clone()
            .unwrap_or_default();
        FollowConfig {
            kind: FollowType::External,
            dbuid: String::new(),
            standby_settings: standby.standby_settings,
            archive_recovery_settings: standby.archive_recovery_settings,
        }
    }

    fn finish_init(&mut self, db: &Db) {
        let master = db.uid.as_str();
        let spec = &self.cd.cluster.spec;
        if spec.merge_pg_parameters() {
            // The parameters the new instance reported, with the spec's own on top.
            let mut merged = db.status.pg_parameters.clone();
            merged.extend(spec.pg_parameters.clone());
            self.cd.cluster.spec.pg_parameters = merged;
        }
        let mut db_spec = db.spec.clone();
        db_spec.init_mode = Some(DbInitMode::None);
        db_spec.include_previous_config = false;
        let db_spec = self.managed_spec(&db_spec);
        self.set_db_spec(master, db_spec);
        self.cd.cluster.status.phase = Some(ClusterPhase::Normal);
        self.mem.init_attempt = None;
        self.mem.init_tried.clear();
        self.reason(
            ReasonKind::InitDone,
            format!("db {master} initialised; cluster is normal"),
        );
    }
}
