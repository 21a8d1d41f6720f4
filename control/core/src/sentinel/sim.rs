//! A model world for exercising [`decide`] without processes: simulated keepers that apply
//! their db spec the way a real keeper would (initdb, promote, follow, base backup), proxies
//! that read clusterdata and acknowledge generations, and a virtual clock. Used by the table
//! tests, the seeded simulation and the criterion bench; it is not used by any daemon.

use super::{decide_with, Observations, Reason, ReasonKind, SentinelMemory};
use crate::model::{
    ClusterData, ClusterInitMode, ClusterPhase, ClusterSpec, Db, DbInitMode, DbRole, FollowType,
    GoDuration, KeeperInfo, PostgresState, ProxyInfo, SwitchoverRequest, TimelineHistoryEntry,
    Timestamp,
};
use std::collections::BTreeMap;

/// A simulated keeper and its PostgreSQL.
#[derive(Clone, Debug)]
pub struct KeeperSim {
    /// Publishes a new info every step (false: frozen or dead; its last info stays).
    pub alive: bool,
    /// Its info exists in the store (false: the lease expired).
    pub published: bool,
    /// PostgreSQL runs and answers.
    pub pg_healthy: bool,
    /// Applies new db generations (false: stuck, e.g. a failing promote).
    pub converges: bool,
    /// As a standby, streams from its master (false: lags behind).
    pub replicates: bool,
    pub priority: i32,
    pub can_be_master: Option<bool>,
    pub can_be_sync: Option<bool>,
    /// The db this PostgreSQL holds (empty: no data dir).
    pub db: String,
    pub generation: i64,
    pub system_id: String,
    pub timeline: u64,
    pub history: Vec<TimelineHistoryEntry>,
    pub xlog: u64,
    pub role: Option<DbRole>,
    pub sync_standbys: Vec<String>,
    /// The oldest WAL file it still has.
    pub older_wal_file: String,
    /// A stopped master's shutdown checkpoint, as its keeper reports it (0: none).
    pub shutdown_checkpoint: u64,
    /// Failsafe mode's state as its keeper reports it.
    pub failsafe: Option<crate::model::FailsafeReport>,
}

impl Default for KeeperSim {
    fn default() -> Self {
        KeeperSim {
            alive: true,
            published: true,
            pg_healthy: true,
            converges: true,
            replicates: true,
            priority: 0,
            can_be_master: None,
            can_be_sync: None,
            db: String::new(),
            generation: 0,
            system_id: String::new(),
            timeline: 0,
            history: Vec::new(),
            xlog: 0,
            role: None,
            sync_standbys: Vec::new(),
            older_wal_file: String::new(),
            shutdown_checkpoint: 0,
            failsafe: None,
        }
    }
}

/// A simulated proxy: what it routes to and which generation it acknowledged.
#[derive(Clone, Debug, Default)]
pub struct ProxySim {
    /// Reads the store and republishes (false: frozen or cut off).
    pub alive: bool,
    /// Reads the store but acknowledges late (skips this step's publish).
    pub slow: bool,
    pub route: String,
    pub generation: i64,
    pub last_contact: Option<Timestamp>,
    /// Its info exists in the store.
    pub published: bool,
    /// Proves liveness by its lease (when the sentinel's document allows it): rewrites its
    /// info only on change, and its key expires a lease TTL after its last contact.
    pub lease: bool,
    /// Runs a read-only listener (`ProxyInfo::read_only`).
    pub read_only: bool,
    /// Says it takes a switchover's target out of its pool at the drain
    /// (`ProxyInfo::target_out_at_drain`; false: an older proxy).
    pub target_out_at_drain: bool,
}

#[derive(Clone)]
pub struct World {
    pub cd: ClusterData,
    pub mem: SentinelMemory,
    pub now: Timestamp,
    pub keepers: BTreeMap<String, KeeperSim>,
    pub proxies: BTreeMap<String, ProxySim>,
    pub switchover: Option<SwitchoverRequest>,
    /// The maintenance pause at `P/pause`.
    pub pause: Option<crate::model::Pause>,
    pub keeper_infos: BTreeMap<String, KeeperInfo>,
    pub proxy_infos: BTreeMap<String, ProxyInfo>,
    /// The reasons of the last round.
    pub reasons: Vec<Reason>,
    /// Deliberate faults in the sentinel's rules (the simulation shows it catches them).
    pub faults: crate::faults::Faults,
    /// The lease TTL of proxies that prove liveness by their lease; `None`: the real one
    /// (`model::proxy_lease_ttl`). Tests shorten it to show the simulation catches a lease
    /// that expires before its proxy has fenced itself.
    pub proxy_lease_ttl: Option<GoDuration>,
    counter: u64,
}

/// The spec most tests start from: short intervals so scenarios take few steps.
pub fn test_spec() -> ClusterSpec {
    ClusterSpec {
        init_mode: Some(ClusterInitMode::New),
        fail_interval: Some(GoDuration::from_secs(10)),
        convergence_timeout: Some(GoDuration::from_secs(30)),
        init_timeout: Some(GoDuration::from_secs(60)),
        proxy_timeout: Some(GoDuration::from_secs(10)),
        proxy_check_interval: Some(GoDuration::from_secs(2)),
        ..Default::default()
    }
}

fn epoch() -> Timestamp {
    Timestamp(time::OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000))
}

impl World {
    pub fn new(spec: ClusterSpec) -> Self {
        World {
            cd: ClusterData::new("cluster1", spec, epoch()),
            mem: SentinelMemory::default(),
            now: epoch(),
            keepers: BTreeMap::new(),
            proxies: BTreeMap::new(),
            switchover: None,
            pause: None,
            keeper_infos: BTreeMap::new(),
            proxy_infos: BTreeMap::new(),
            reasons: Vec::new(),
            faults: crate::faults::Faults::NONE,
            proxy_lease_ttl: None,
            counter: 0,
        }
    }

    /// A cluster initialised on `n` keepers (`k0`..), all standbys converged, with `proxies`
    /// proxies routing to the master.
    pub fn healthy(spec: ClusterSpec, n: usize, proxies: usize) -> Self {
        let mut w = World::new(spec);
        for i in 0..n {
            w.keepers.insert(format!("k{i}"), KeeperSim::default());
        }
        for i in 0..proxies {
            w.add_proxy(&format!("p{i}"));
        }
        w.run_until(600, |w| w.settled());
        assert!(w.settled(), "cluster did not settle: {:#?}", w.reasons);
        w
    }

    pub fn add_proxy(&mut self, uid: &str) {
        self.proxies.insert(
            uid.to_string(),
            ProxySim {
                alive: true,
                published: true,
                ..Default::default()
            },
        );
    }

    pub fn keeper(&mut self, uid: &str) -> &mut KeeperSim {
        self.keepers.get_mut(uid).expect("no such keeper")
    }

    pub fn master(&self) -> &str {
        &self.cd.cluster.status.master
    }

    pub fn master_keeper(&self) -> String {
        self.cd
            .dbs
            .get(self.master())
            .map(|db| db.spec.keeper_uid.clone())
            .unwrap_or_default()
    }

    pub fn proxy_master(&self) -> &str {
        &self.cd.proxy.spec.master_db_uid
    }

    pub fn db_of(&self, keeper: &str) -> Option<&Db> {
        self.cd.dbs.values().find(|db| db.spec.keeper_uid == keeper)
    }

    pub fn has_reason(&self, kind: ReasonKind) -> bool {
        self.reasons.iter().any(|r| r.kind == kind)
    }

    /// Normal phase, master published, every db converged and healthy, as many standbys as
    /// wanted (or every other keeper).
    pub fn settled(&self) -> bool {
        let spec = &self.cd.cluster.spec;
        let wanted = usize::from(spec.max_standbys().min(spec.max_standbys_per_sender()));
        let live = self.keepers.values().filter(|k| k.alive).count();
        self.cd.cluster.status.phase == Some(ClusterPhase::Normal)
            && !self.master().is_empty()
            && self.proxy_master() == self.master()
            && self.cd.dbs.len() == (live.saturating_sub(1)).min(wanted) + 1
            && self
                .cd
                .dbs
                .values()
                .all(|db| db.status.healthy && db.status.current_generation == db.generation)
    }

    fn next_id(&mut self, prefix: &str) -> String {
        self.counter += 1;
        format!("{prefix}{}", self.counter)
    }

    pub fn observations(&self) -> Observations {
        Observations {
            keepers: self.keeper_infos.clone(),
            proxies: self.proxy_infos.clone(),
            switchover: self.switchover.clone(),
            pause: self.pause.clone(),
        }
    }

    /// One sentinel round on the current observations.
    pub fn round(&mut self) {
        let (cd, mem, reasons) = decide_with(
            &self.cd,
            &self.mem,
            &self.observations(),
            self.now,
            self.faults,
        );
        self.cd = cd;
        self.mem = mem;
        self.reasons = reasons;
    }

    /// Advances the clock, lets keepers and proxies act and publish, then runs a round.
    pub fn step(&mut self, d: GoDuration) {
        self.now = self.now.plus(d);
        self.act_keepers();
        self.act_proxies();
        self.round();
    }

    /// Steps of one second until `done` or `max_secs` pass.
    pub fn run_until(&mut self, max_secs: i64, done: impl Fn(&World) -> bool) -> bool {
        for _ in 0..max_secs {
            self.step(GoDuration::from_secs(1));
            if done(self) {
                return true;
            }
        }
        false
    }

    pub fn run(&mut self, secs: i64) {
        for _ in 0..secs {
            self.step(GoDuration::from_secs(1));
        }
    }

    /// Every live keeper applies its db spec and publishes; dead ones leave their last info.
    pub fn act_keepers(&mut self) {
        let uids: Vec<String> = self.keepers.keys().cloned().collect();
        for uid in uids {
            let k = &self.keepers[&uid];
            if !k.published {
                self.keeper_infos.remove(&uid);
                continue;
            }
            if !k.alive {
                continue;
            }
            if k.converges {
                self.apply_spec(&uid);
            }
            self.replicate(&uid);
            let info = self.keeper_info(&uid);
            self.keeper_infos.insert(uid, info);
        }
    }

    /// The master's keeper as simulated (not as last reported).
    fn master_sim(&self) -> Option<&KeeperSim> {
        self.keepers.get(&self.master_keeper())
    }

    /// A streaming standby on the master's timeline receives everything the master has.
    fn replicate(&mut self, uid: &str) {
        let Some(m) = self
            .master_sim()
            .filter(|m| m.alive && m.pg_healthy)
            .cloned()
        else {
            return;
        };
        let master_db = self.master().to_string();
        let follows_master = self
            .db_of(uid)
            .and_then(|db| db.spec.follow_config.as_ref())
            .is_some_and(|f| f.dbuid == master_db);
        let k = self.keepers.get_mut(uid).expect("keeper");
        let follows = k.role == Some(DbRole::Standby) && follows_master;
        if follows && k.replicates && k.pg_healthy && k.timeline == m.timeline {
            k.xlog = k.xlog.max(m.xlog);
        }
    }

    /// The master commits `bytes` of WAL (if it runs); returns the new position.
    pub fn write(&mut self, bytes: u64) -> u64 {
        let uid = self.master_keeper();
        match self.keepers.get_mut(&uid) {
            Some(k) if k.pg_healthy && k.role == Some(DbRole::Master) => {
                k.xlog += bytes;
                k.xlog
            }
            _ => 0,
        }
    }

    /// The members of a master's applied synchronous set that PostgreSQL reports as
    /// synchronous: streaming (caught up with the master's WAL) on its timeline. A member that
    /// is still catching up is not, as in `pg_stat_replication.sync_state`.
    fn reported_sync(&self, master: &KeeperSim) -> Vec<String> {
        master
            .sync_standbys
            .iter()
            .filter(|m| {
                self.keepers.values().any(|s| {
                    s.db == **m
                        && s.pg_healthy
                        && s.replicates
                        && s.role == Some(DbRole::Standby)
                        && s.timeline == master.timeline
                        && s.xlog >= master.xlog
                })
            })
            .cloned()
            .collect()
    }

    fn keeper_info(&mut self, uid: &str) -> KeeperInfo {
        let info_uid = self.next_id("i");
        let k = &self.keepers[uid];
        let reported_sync = self.reported_sync(k);
        let state = (!k.db.is_empty()).then(|| PostgresState {
            uid: k.db.clone(),
            generation: k.generation,
            listen_address: "127.0.0.1".into(),
            port: Some(5432),
            healthy: k.pg_healthy,
            system_id: k.system_id.clone(),
            timeline_id: k.timeline,
            x_log_pos: k.xlog,
            timelines_history: k.history.clone(),
            pg_parameters: [("max_connections".to_string(), "100".to_string())].into(),
            synchronous_standbys: reported_sync,
            older_wal_file: k.older_wal_file.clone(),
            shutdown_checkpoint: k.shutdown_checkpoint,
            ..Default::default()
        });
        KeeperInfo {
            info_uid,
            uid: uid.to_string(),
            cluster_uid: self.cd.cluster.uid.clone(),
            boot_uuid: format!("boot-{uid}"),
            postgres_state: state,
            can_be_master: k.can_be_master,
            can_be_synchronous_replica: k.can_be_sync,
            priority: k.priority,
            failsafe: k.failsafe.clone(),
            ..Default::default()
        }
    }

    /// What a keeper does with its db spec: create the data (initdb or base backup), promote,
    /// follow, take the sync set.
    fn apply_spec(&mut self, uid: &str) {
        let Some(db) = self.db_of(uid).cloned() else {
            // No db assigned: the keeper stops PostgreSQL.
            self.keeper(uid).role = None;
            return;
        };
        let master = self.cd.dbs.get(self.master()).cloned();
        let counter = self.next_id("sys");
        let k = self.keepers.get_mut(uid).expect("keeper");
        if k.db != db.uid {
            match db.spec.init_mode {
                Some(DbInitMode::New | DbInitMode::Pitr | DbInitMode::Existing) => {
                    *k = KeeperSim {
                        system_id: counter,
                        timeline: 1,
                        xlog: 1000,
                        ..k.clone()
                    };
                }
                // Resync: a base backup of the master.
                _ => {
                    let Some(m) = master.as_ref().filter(|m| m.uid != db.uid) else {
                        return;
                    };
                    if m.status.system_id.is_empty() {
                        return;
                    }
                    k.system_id = m.status.system_id.clone();
                    k.timeline = m.status.timeline_id;
                    k.history = m.status.timelines_history.clone();
                    k.xlog = m.status.x_log_pos;
                }
            }
            k.db = db.uid.clone();
            k.role = db.spec.role;
        }
        if self.cd.is_old_master(&db) {
            // As the keeper's plan: read-only, a standby of nobody, until replaced.
            k.role = Some(DbRole::Standby);
            k.sync_standbys.clear();
            k.generation = db.generation;
            return;
        }
        if k.role == Some(DbRole::Standby) && db.spec.role == Some(DbRole::Master) {
            k.history.push(TimelineHistoryEntry {
                timeline_id: k.timeline,
                switch_point: k.xlog,
                reason: "promoted".into(),
            });
            k.timeline += 1;
        }
        let follows = db.spec.follow_config.as_ref().and_then(|f| {
            (f.kind == FollowType::Internal)
                .then(|| master.as_ref().filter(|m| m.uid == f.dbuid))
                .flatten()
        });
        if let Some(m) = follows {
            let (mt, sp) = (m.status.timeline_id, switch_point(m, k.timeline));
            let forked = k.timeline > mt || (k.timeline < mt && k.xlog > sp);
            if forked && !db.spec.use_pgrewind {
                // Cannot stream from a master it forked from: never converges.
                return;
            }
            if forked {
                // pg_rewind: back to the fork point, then the master's timeline.
                k.xlog = k.xlog.min(sp);
            }
            if mt > 0 {
                k.timeline = mt;
                k.history = m.status.timelines_history.clone();
            }
        }
        k.role = db.spec.role;
        k.sync_standbys = db.spec.synchronous_standbys.clone();
        k.generation = db.generation;
    }

    /// Proxies read clusterdata, route to the published master while enabled, and ack the
    /// generation; one without store contact for proxyTimeout stops routing. A proxy that
    /// proves liveness by its lease rewrites its info only on change, and its key expires
    /// a lease TTL after its last contact.
    pub fn act_proxies(&mut self) {
        let timeout = self.cd.cluster.spec.proxy_timeout();
        let lease_ttl = self
            .proxy_lease_ttl
            .unwrap_or_else(|| GoDuration::from_std(crate::model::proxy_lease_ttl(timeout)));
        for (uid, p) in self.proxies.iter_mut() {
            if !p.published {
                self.proxy_infos.remove(uid);
            }
            // Contact is a read AND a publish (or a lease keep-alive) that succeeded, as
            // the real proxy counts it.
            let contact = p.alive && !p.slow && p.published;
            if p.alive {
                let enabled = self.cd.proxy.spec.enabled_proxies.contains(uid);
                p.route = if enabled {
                    self.cd.proxy.spec.master_db_uid.clone()
                } else {
                    String::new()
                };
            }
            if !contact {
                if p.last_contact.is_none_or(|t| self.now.since(t) >= timeout) {
                    p.route.clear();
                }
                let leased = self.proxy_infos.get(uid).is_some_and(|i| i.lease_liveness);
                if leased
                    && p.last_contact
                        .is_none_or(|t| self.now.since(t) >= lease_ttl)
                {
                    self.proxy_infos.remove(uid);
                }
                continue;
            }
            p.last_contact = Some(self.now);
            p.generation = self.cd.proxy.generation;
            let lease_mode = p.lease && self.cd.proxy.spec.lease_liveness;
            let unchanged = self.proxy_infos.get(uid).is_some_and(|i| {
                i.lease_liveness && i.generation == p.generation && i.proxy_timeout == timeout
            });
            if lease_mode && unchanged {
                // A keep-alive: the info (and its infoUID) stays as it is.
                continue;
            }
            self.counter += 1;
            self.proxy_infos.insert(
                uid.clone(),
                ProxyInfo {
                    info_uid: format!("pi{}", self.counter),
                    uid: uid.clone(),
                    generation: p.generation,
                    proxy_timeout: timeout,
                    lease_liveness: lease_mode,
                    read_only: p.read_only,
                    target_out_at_drain: p.target_out_at_drain,
                    ..Default::default()
                },
            );
        }
    }
}

fn switch_point(master: &Db, timeline: u64) -> u64 {
    master
        .status
        .timelines_history
        .iter()
        .find(|h| h.timeline_id == timeline)
        .map_or(u64::MAX, |h| h.switch_point)
}
