//! Seeded simulation of `decide` on the model world: random keepers with random WAL
//! progress, crashes, frozen keepers and PostgreSQL, lagging standbys, lost and duplicated
//! clusterdata writes, leader changes, proxies that ack late or vanish; writes go through the
//! proxies' routes. After every round the invariants are checked; after the faults stop the
//! cluster must settle. Each seed is printed on failure and can be replayed with
//! `SIM_SEED=<seed> cargo test -p control sim_replay -- --nocapture`.

use super::sim::{KeeperSim, World};
use super::*;
use crate::faults::Fault;
use crate::model::{ClusterSpec, DbRole};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What a run checks and counts.
#[derive(Debug, Default)]
struct Stats {
    failovers: u32,
    acked: u64,
}

struct Run {
    w: World,
    rng: StdRng,
    /// The highest WAL position ever acknowledged to a client (sync mode: never lost).
    acked: u64,
    sync: bool,
    stats: Stats,
    /// Every db that has been the cluster's master: only these may have role master (an old
    /// master keeps it, as Go stolon leaves it, until it is removed).
    ever_master: BTreeSet<String>,
}

fn spec_for(rng: &mut StdRng) -> ClusterSpec {
    let sync = rng.gen_bool(0.5);
    ClusterSpec {
        synchronous_replication: Some(sync),
        min_synchronous_standbys: Some(rng.gen_range(0..=1)),
        max_synchronous_standbys: Some(rng.gen_range(1..=2)),
        use_pgrewind: Some(rng.gen_bool(0.5)),
        max_standby_lag: Some(rng.gen_range(1..=4) * 4096),
        ..sim::test_spec()
    }
}

impl Run {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let spec = spec_for(&mut rng);
        let sync = spec.synchronous_replication();
        let mut w = World::new(spec);
        for i in 0..rng.gen_range(2..=4) {
            w.keepers.insert(format!("k{i}"), KeeperSim::default());
        }
        for i in 0..rng.gen_range(1..=3) {
            let uid = format!("p{i}");
            w.add_proxy(&uid);
            // Half the proxies prove liveness by their lease (ours), half rewrite their
            // infoUID every step (Go's).
            w.proxies.get_mut(&uid).expect("proxy").lease = rng.gen_bool(0.5);
        }
        Run {
            w,
            rng,
            acked: 0,
            sync,
            stats: Stats::default(),
            ever_master: BTreeSet::new(),
        }
    }

    /// A client write through a random routing proxy; in sync mode acknowledged only when
    /// every member of the master's applied synchronous set has it.
    fn client_write(&mut self) {
        let routes: Vec<String> = self
            .w
            .proxies
            .values()
            .filter(|p| !p.route.is_empty())
            .map(|p| p.route.clone())
            .collect();
        if routes.is_empty() {
            return;
        }
        let db = routes[self.rng.gen_range(0..routes.len())].clone();
        let bytes = self.rng.gen_range(1..8192);
        let Some(uid) = self
            .w
            .keepers
            .iter()
            .find(|(_, k)| k.db == db)
            .map(|(u, _)| u.clone())
        else {
            return;
        };
        let k = self.w.keepers[&uid].clone();
        if !(k.pg_healthy && k.role == Some(DbRole::Master)) {
            return;
        }
        let members: Vec<String> = if self.sync {
            k.sync_standbys.clone()
        } else {
            vec![]
        };
        let mut holders = Vec::new();
        for m in &members {
            let ok = self
                .w
                .keepers
                .iter()
                .find(|(_, s)| s.db == *m)
                .filter(|(_, s)| {
                    s.pg_healthy
                        && s.replicates
                        && s.timeline == k.timeline
                        && s.role == Some(DbRole::Standby)
                });
            match ok {
                Some((u, _)) => holders.push(u.clone()),
                None => return, // commit waits: not acknowledged
            }
        }
        let pos = k.xlog + bytes;
        self.w.keeper(&uid).xlog = pos;
        for h in holders {
            let s = self.w.keeper(&h);
            s.xlog = s.xlog.max(pos);
        }
        self.acked = self.acked.max(pos);
        self.stats.acked += 1;
    }

    fn inject_faults(&mut self) {
        let uids: Vec<String> = self.w.keepers.keys().cloned().collect();
        for uid in uids {
            let r: f64 = self.rng.gen();
            let k = self.w.keeper(&uid);
            match r {
                r if r < 0.010 => k.alive = !k.alive, // crash or freeze / back
                r if r < 0.016 => k.pg_healthy = !k.pg_healthy, // PostgreSQL crash / back
                r if r < 0.030 => k.replicates = !k.replicates, // lag / catch up
                r if r < 0.034 => k.converges = !k.converges, // stuck / unstuck
                _ => {}
            }
        }
        let pids: Vec<String> = self.w.proxies.keys().cloned().collect();
        for uid in pids {
            let r: f64 = self.rng.gen();
            let p = self.w.proxies.get_mut(&uid).expect("proxy");
            match r {
                r if r < 0.01 => p.alive = !p.alive,
                r if r < 0.05 => p.slow = !p.slow,
                _ => {}
            }
        }
    }

    fn heal(&mut self) {
        for k in self.w.keepers.values_mut() {
            (k.alive, k.pg_healthy, k.replicates, k.converges) = (true, true, true, true);
        }
        for p in self.w.proxies.values_mut() {
            (p.alive, p.slow) = (true, false);
        }
    }

    /// One simulated second; `faults` turns on store faults and leader changes.
    fn tick(&mut self, faults: bool) -> Result<(), String> {
        for _ in 0..self.rng.gen_range(0..4) {
            self.client_write();
        }
        let prev = self.w.cd.clone();
        self.w.now = self.w.now.plus(GoDuration::from_secs(1));
        self.w.act_keepers();
        self.w.act_proxies();
        if faults && self.rng.gen_bool(0.01) {
            // A new leader: empty memory.
            self.w.mem = SentinelMemory::default();
        }
        self.w.round();
        if faults && self.rng.gen_bool(0.05) {
            // The write was lost (the next leader round re-reads the old document).
            self.w.cd = prev.clone();
        } else if faults && self.rng.gen_bool(0.05) {
            // Duplicated: the same round decided again on the same facts.
            self.w.round();
        }
        self.check(&prev)
    }

    fn check(&mut self, prev: &ClusterData) -> Result<(), String> {
        self.ever_master
            .insert(self.w.cd.cluster.status.master.clone());
        let cd = &self.w.cd;
        let routes: BTreeSet<&str> = self
            .w
            .proxies
            .values()
            .map(|p| p.route.as_str())
            .filter(|r| !r.is_empty())
            .collect();
        if routes.len() > 1 {
            return Err(format!("proxies route to two masters: {routes:?}"));
        }
        if let Some(d) = (cd.dbs.values())
            .find(|d| d.spec.role == Some(DbRole::Master) && !self.ever_master.contains(&d.uid))
        {
            return Err(format!(
                "db {} has role master but was never elected",
                d.uid
            ));
        }
        // Keepers that apply their spec (a stuck one goes on as it was: in the daemon its
        // fence or the watchdog covers it, which this world does not model).
        let writable: Vec<&String> = (self.w.keepers.iter())
            .filter(|(_, k)| {
                k.alive && k.converges && k.pg_healthy && k.role == Some(DbRole::Master)
            })
            .map(|(uid, _)| uid)
            .collect();
        if writable.len() > 1 {
            return Err(format!("keepers {writable:?} all run a writable master"));
        }
        let master = &cd.cluster.status.master;
        if let Some(db) = cd.dbs.get(master) {
            if !cd.keepers.contains_key(&db.spec.keeper_uid) {
                return Err(format!(
                    "the master's keeper {} was removed",
                    db.spec.keeper_uid
                ));
            }
        }
        let old = &prev.cluster.status.master;
        let switchover = cd.cluster.status.switchover.is_some();
        if !old.is_empty() && old != master && !switchover {
            self.stats.failovers += 1;
            self.check_election(prev, old, master)?;
        }
        Ok(())
    }

    /// The new master was eligible when elected, the best by WAL position, and (sync) has
    /// every acknowledged commit.
    fn check_election(&self, prev: &ClusterData, old: &str, new: &str) -> Result<(), String> {
        let cd = &self.w.cd;
        let (Some(o), Some(n)) = (cd.dbs.get(old), cd.dbs.get(new)) else {
            return Err("a db of the failover is missing".into());
        };
        let old_spec_sync = &prev.dbs[old].spec.synchronous_standbys;
        let eligible = |d: &Db| {
            let keeper_ok = cd
                .keepers
                .get(&d.spec.keeper_uid)
                .is_some_and(|k| k.status.can_be_master != Some(false));
            // Converged: it reported the generation its spec had before this round.
            let base = d.uid != old
                && prev.dbs.get(&d.uid).is_some_and(|p| {
                    (p.spec.role == Some(DbRole::Standby) || prev.is_old_master(p))
                        && d.status.current_generation == p.generation
                })
                && d.status.healthy
                && d.status.system_id == o.status.system_id
                && d.status.timeline_id == o.status.timeline_id
                && keeper_ok;
            if prev.dbs[old].spec.synchronous_replication {
                base && o.status.synchronous_standbys.contains(&d.uid)
                    && old_spec_sync.contains(&d.uid)
            } else {
                let max = u64::from(cd.cluster.spec.max_standby_lag());
                base && o.status.x_log_pos.saturating_sub(d.status.x_log_pos) <= max
            }
        };
        if !eligible(n) {
            let p = &prev.dbs[new];
            return Err(format!(
                "elected {new}, which was not eligible: prev role {:?} gen {} (reports {}), \
                 old master status {:?}, old master spec sync {:?}, new {:?}",
                p.spec.role,
                p.generation,
                n.status.current_generation,
                o.status,
                old_spec_sync,
                n.status
            ));
        }
        let best = cd
            .dbs
            .values()
            .filter(|d| eligible(d))
            .map(|d| d.status.x_log_pos)
            .max();
        if best.is_some_and(|b| b > n.status.x_log_pos) {
            return Err(format!(
                "elected {new} at {} but {best:?} was eligible",
                n.status.x_log_pos
            ));
        }
        if self.sync {
            let keeper = &n.spec.keeper_uid;
            let have = self.w.keepers.get(keeper).map_or(0, |k| k.xlog);
            if have < self.acked {
                return Err(format!(
                    "new master {new} has {have} < acknowledged {}",
                    self.acked
                ));
            }
        }
        Ok(())
    }
}

/// Runs one seed: init, a fault phase, then healing until the cluster settles.
fn run_seed(seed: u64, faults: Faults) -> Result<Stats, String> {
    run_seed_with(seed, faults, None)
}

/// [`run_seed`] with the proxies' lease TTL set (`None`: the real one).
fn run_seed_with(
    seed: u64,
    faults: Faults,
    proxy_lease_ttl: Option<GoDuration>,
) -> Result<Stats, String> {
    let mut run = Run::new(seed);
    run.w.faults = faults;
    run.w.proxy_lease_ttl = proxy_lease_ttl;
    let result = (|| {
        if !run.w.run_until(300, |w| w.settled()) {
            return Err(format!("did not initialise: {:?}", run.w.reasons));
        }
        for _ in 0..400 {
            run.inject_faults();
            run.tick(true)?;
        }
        run.heal();
        for _ in 0..400 {
            run.tick(false)?;
            if run.w.settled() {
                return Ok(());
            }
        }
        Err(format!(
            "did not converge after healing: {:?}",
            run.w.reasons
        ))
    })();
    result.map(|()| std::mem::take(&mut run.stats))
}

fn seed_count() -> u64 {
    if std::env::var_os("STOLON_TEST_LONG").is_some() {
        5000
    } else {
        300
    }
}

#[test]
fn simulation_keeps_the_invariants_over_many_seeds() {
    let started = std::time::Instant::now();
    let (mut failovers, mut acked) = (0, 0);
    for seed in 0..seed_count() {
        match run_seed(seed, Faults::NONE) {
            Ok(s) => {
                failovers += s.failovers;
                acked += s.acked;
            }
            Err(e) => panic!("seed {seed}: {e}\nreplay: SIM_SEED={seed} cargo test -p control sim_replay -- --nocapture"),
        }
    }
    eprintln!(
        "simulation: {} seeds, {failovers} failovers, {acked} acknowledged writes, {:?}",
        seed_count(),
        started.elapsed()
    );
    assert!(
        failovers > seed_count() as u32 / 4,
        "the faults must cause failovers"
    );
}

#[test]
fn sim_replay() {
    let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) else {
        return;
    };
    let out = run_seed(seed, Faults::NONE);
    eprintln!("seed {seed}: {out:?}");
    out.expect("invariants");
}

/// The simulation must catch each broken variant within its seed budget.
#[test]
fn simulation_catches_broken_variants() {
    for fault in [
        Fault::SkipProxyHandshake,
        Fault::LowestWal,
        Fault::IgnoreSyncSet,
    ] {
        let faults = Faults::one(fault);
        let caught =
            (0..seed_count()).find_map(|seed| run_seed(seed, faults).err().map(|e| (seed, e)));
        let (seed, err) = caught.unwrap_or_else(|| panic!("{fault} not caught"));
        eprintln!("{fault} caught by seed {seed}: {err}");
    }
}

/// A proxy lease that can expire before its proxy has fenced itself (shorter than
/// proxyTimeout) lets the sentinel stop waiting for a proxy that still routes to the old
/// master: the simulation must catch it, so the real TTL (2 x proxyTimeout) is what keeps
/// lease-liveness proxies safe.
#[test]
fn simulation_catches_a_proxy_lease_shorter_than_the_proxy_timeout() {
    let short = GoDuration::from_secs(4); // test_spec's proxyTimeout is 10 s
    let caught = (0..seed_count()).find_map(|seed| {
        run_seed_with(seed, Faults::NONE, Some(short))
            .err()
            .map(|e| (seed, e))
    });
    let (seed, err) = caught.expect("a lease shorter than proxyTimeout not caught");
    eprintln!("short proxy lease caught by seed {seed}: {err}");
}
