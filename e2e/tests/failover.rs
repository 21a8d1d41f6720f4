//! Failover scenarios (scenarios.md, "Failover"), one test per line. Each runs the
//! acknowledged-write checker and the single-master check, and ends healthy
//! (`Cluster::finish`).

use e2e::{running, serial, Cluster, Opts};
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use std::time::Duration;

const MIN: Duration = Duration::from_secs(60);

fn sync_spec() -> Value {
    json!({"synchronousReplication": true, "minSynchronousStandbys": 1, "maxSynchronousStandbys": 1})
}

fn opts(spec: Value) -> Opts {
    Opts {
        spec,
        ..Default::default()
    }
}

/// Which standbys fall behind before the kill (async only: a frozen sync standby would
/// hold every commit).
#[derive(Clone, Copy, PartialEq)]
enum Lag {
    None,
    /// One standby: the other, with the highest WAL position, must be elected.
    One,
    /// Every standby: the old master has WAL the new one lacks and must be rewound or
    /// rebuilt when it comes back.
    All,
}

/// kill -9 of the master's keeper and PostgreSQL; a standby is elected and the old master
/// rejoins.
async fn kill_master(name: &str, spec: Value, rewind: bool, lag: Lag) -> Cluster {
    let mut spec = spec;
    spec["usePgrewind"] = json!(rewind);
    let (mut c, mut checker) = running(opts(spec)).await;
    let old = c.master().await.expect("master");
    let standbys: Vec<String> = c
        .keepers
        .iter()
        .map(|k| k.uid.clone())
        .filter(|k| *k != old)
        .collect();
    let lagging: Vec<String> = match lag {
        Lag::None => Vec::new(),
        Lag::One => standbys[..1].to_vec(),
        Lag::All => standbys.clone(),
    };
    let old_db = c.db_of(&old).await.expect("master db").uid;
    let receivers: Vec<i32> = lagging.iter().map(|s| freeze_receiver(&c, s)).collect();
    c.exec_via_proxy("CREATE TABLE ahead AS SELECT md5(v::text) v FROM generate_series(1, 2000) v")
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_secs(2)).await;
    checker.nemesis();
    c.kill_keeper(&old, true);
    for r in receivers {
        signal_pid(r, Signal::SIGKILL);
    }
    let new = c.wait_master_change(&old, MIN).await.expect("failover");
    if lag == Lag::One {
        assert_ne!(
            new, lagging[0],
            "the standby with the highest WAL position is elected"
        );
    }
    let old_db = old_master_db_removed(&c, &old_db).await;
    // The old master comes back and rejoins as a standby of the new one, in a new db.
    c.restart_keeper(&old)
        .expect("restart the old master's keeper");
    let out = c.finish(name, checker).await.expect("invariants");
    assert_eq!(out.master, new);
    let db = c
        .db_of(&old)
        .await
        .expect("the old master's keeper has a db");
    assert_eq!(db.spec.role, Some(control::model::DbRole::Standby));
    assert_ne!(db.uid, old_db, "a new db, made by resync");
    c
}

/// What a Go keeper, sentinel or proxy reads after the failover, while the old master's
/// keeper is dead (Go stolon's rule): the old master's db keeps role master and never
/// becomes a follower of the new master, which keeps no replication slot (and no WAL) for
/// it; once the new master has converged the db is removed. Returns its uid.
async fn old_master_db_removed(c: &Cluster, old_db: &str) -> String {
    let new_master = c
        .wait_for("the old master's db removed", MIN, async || {
            let (cd, _) = c.data().await?;
            let new = cd.dbs.get(&cd.cluster.status.master)?;
            assert!(
                !new.spec.followers.iter().any(|f| f == old_db),
                "the new master follows nothing of the dead old master"
            );
            if let Some(db) = cd.dbs.get(old_db) {
                assert_eq!(db.spec.role, Some(control::model::DbRole::Master), "{db:?}");
                assert!(db.spec.followers.is_empty(), "{db:?}");
                return None;
            }
            Some(new.spec.keeper_uid.clone())
        })
        .await
        .expect("Go stolon's removal of the old master db");
    let slots = c
        .query(
            &new_master,
            "SELECT coalesce(string_agg(slot_name, ','), '') FROM pg_replication_slots",
        )
        .await
        .expect("the new master's slots");
    assert!(
        !slots.contains(old_db),
        "no slot for the old master: {slots}"
    );
    old_db.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_master_keeper_and_postgres_async() {
    let _s = serial().await;
    kill_master("kill9_master_async", json!({}), false, Lag::One).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_master_keeper_and_postgres_sync() {
    let _s = serial().await;
    kill_master("kill9_master_sync", sync_spec(), false, Lag::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_master_rejoins_with_pg_rewind() {
    let _s = serial().await;
    let c = kill_master("old_master_rejoins_rewind", json!({}), true, Lag::All).await;
    let old = c
        .keepers
        .iter()
        .find(|k| c.keeper_log(&k.uid).contains("done action=Rewind"));
    assert!(old.is_some(), "the old master rejoined by pg_rewind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_master_rejoins_with_a_base_backup() {
    let _s = serial().await;
    let c = kill_master("old_master_rejoins_basebackup", json!({}), false, Lag::All).await;
    let rebuilt = c.keepers.iter().find(|k| {
        let log = c.keeper_log(&k.uid);
        log.contains("done action=InitDb") && log.contains("done action=BaseBackup")
    });
    assert!(
        rebuilt.is_some(),
        "the old master rejoined by a base backup"
    );
    for k in &c.keepers {
        assert!(!c.keeper_log(&k.uid).contains("done action=Rewind"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crash_alone_is_restarted_without_failover() {
    let _s = serial().await;
    let (c, mut checker) = running(Opts::default()).await;
    let m = c.master().await.expect("master");
    let pid = c.postmaster_pid(&m).expect("pid");
    checker.nemesis();
    c.crash_postgres(&m).expect("kill -9 postgres");
    c.wait_for("a new postmaster", MIN, async || {
        c.postmaster_pid(&m).filter(|p| *p != pid)
    })
    .await
    .expect("restarted");
    let out = c
        .finish("postgres_crash", checker)
        .await
        .expect("invariants");
    assert_eq!(out.master, m, "no failover");
    let failovers = c.log("s1").matches("kind=Failover").count();
    assert_eq!(failovers, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stolonctl_failkeeper_forces_a_failover() {
    let _s = serial().await;
    let (c, mut checker) = running(Opts::default()).await;
    let m = c.master().await.expect("master");
    checker.nemesis();
    let out = c.ctl(&["failkeeper", &m]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Well before failInterval would have done it (the keeper is healthy).
    c.wait_master_change(&m, Duration::from_secs(4))
        .await
        .expect("failover");
    let out = c.finish("failkeeper", checker).await.expect("invariants");
    assert_ne!(out.master, m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_switchover_under_load_loses_nothing() {
    let _s = serial().await;
    let (c, mut checker) = running(opts(sync_spec())).await;
    let m = c.master().await.expect("master");
    // With synchronous replication only a synchronous standby is eligible.
    let target = sync_set(&c).await.first().expect("a sync standby").clone();
    assert_ne!(target, m);
    checker.nemesis();
    let out = c.ctl(&["switchover", "--to", &target, "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = c.finish("switchover", checker).await.expect("invariants");
    assert_eq!(out.master, target);
    assert_eq!(out.missing, 0);
    // It went through the drain: the proxy closed the old master's sessions between
    // transactions before it reported the generation, and only then was the old master
    // stopped.
    let proxy_log = c.log("p1");
    assert!(
        proxy_log.contains("old master's sessions drained"),
        "{proxy_log}"
    );
    let sentinel_log = c.log("s1");
    assert!(
        sentinel_log.contains("proxies drained; stopping the old master"),
        "{sentinel_log}"
    );
    // The old master's keeper reported where its WAL ends as soon as it stopped it, so the
    // target was promoted without waiting for the old master to rejoin.
    let old_log = c.keeper_log(&m);
    assert!(old_log.contains("master stopped cleanly"), "{old_log}");
    // It was resynced only once the proxies routed to the new master: a base backup started
    // during the promotion failed ("the standby was promoted during online backup").
    assert!(
        old_log.contains("waits until the proxies route to it"),
        "{old_log}"
    );
    assert!(!old_log.contains("action failed"), "{old_log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_changes_address_before_fail_interval_and_stays_master() {
    let _s = serial().await;
    let (mut c, mut checker) = running(Opts::default()).await;
    let m = c.master().await.expect("master");
    checker.nemesis();
    c.kill_keeper(&m, true);
    let port = c.move_keeper_port(&m);
    c.restart_keeper(&m).expect("restart on a new port");
    let cd_port = c
        .wait_for("the new port in the cluster view", MIN, async || {
            let db = c.db_of(&m).await?;
            (db.status.port == Some(port)).then_some(port)
        })
        .await
        .expect("new port");
    assert_eq!(cd_port, port);
    let out = c.finish("master_moves", checker).await.expect("invariants");
    assert_eq!(out.master, m, "still the master");
    assert_eq!(c.log("s1").matches("kind=Failover").count(), 0);
    // The standbys follow the master at its new port.
    for k in c.keepers.iter().filter(|k| k.uid != m) {
        let conninfo = c
            .query(&k.uid, "SELECT current_setting('primary_conninfo')")
            .await
            .expect("conninfo");
        assert!(conninfo.contains(&format!("port={port}")), "{conninfo}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_standby_is_replaced_and_lowering_max_standbys_per_sender_removes_one() {
    let _s = serial().await;
    let (mut c, mut checker) = running(Opts {
        keepers: 4,
        spec: json!({"maxStandbys": 2}),
        ..Default::default()
    })
    .await;
    let m = c.master().await.expect("master");
    let mut standbys = Vec::new();
    let mut free = None;
    for k in &c.keepers {
        match c.db_of(&k.uid).await {
            Some(_) if k.uid != m => standbys.push(k.uid.clone()),
            None => free = Some(k.uid.clone()),
            _ => {}
        }
    }
    let free = free.expect("one keeper without a db (maxStandbys 2)");
    assert_eq!(standbys.len(), 2);
    checker.nemesis();
    c.kill_keeper(&standbys[0], true);
    c.wait_for("a standby on the free keeper", MIN, async || {
        let db = c.db_of(&free).await?;
        db.status.healthy.then_some(())
    })
    .await
    .expect("replaced");
    c.update_spec(|s| s["maxStandbysPerSender"] = json!(1))
        .await
        .expect("spec");
    c.wait_for("one standby left", MIN, async || {
        let (cd, _) = c.data().await?;
        let n = cd.dbs.values().filter(|d| d.spec.keeper_uid != m).count();
        (n == 1).then_some(())
    })
    .await
    .expect("a standby removed");
    c.restart_keeper(&standbys[0]).expect("restart");
    c.finish("standby_replaced", checker)
        .await
        .expect("invariants");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_keeper_is_removed_but_never_the_masters() {
    let _s = serial().await;
    let (mut c, mut checker) = running(Opts {
        spec: json!({"maxStandbys": 1, "deadKeeperRemovalInterval": "6s"}),
        ..Default::default()
    })
    .await;
    let m = c.master().await.expect("master");
    let mut others = Vec::new();
    for k in &c.keepers {
        if k.uid != m {
            others.push((k.uid.clone(), c.db_of(&k.uid).await.is_some()));
        }
    }
    let free = others
        .iter()
        .find(|(_, db)| !db)
        .expect("a keeper without db")
        .0
        .clone();
    let standby = others
        .iter()
        .find(|(_, db)| *db)
        .expect("a standby")
        .0
        .clone();
    checker.nemesis();
    c.kill_keeper(&free, true);
    c.wait_for("the dead free keeper removed", MIN, async || {
        let (cd, _) = c.data().await?;
        (!cd.keepers.contains_key(&free)).then_some(())
    })
    .await
    .expect("removed");
    // Master and standby dead: no failover is possible, and neither keeper is removed.
    c.kill_keeper(&standby, true);
    c.kill_keeper(&m, true);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (cd, _) = c.data().await.expect("cd");
    assert!(cd.keepers.contains_key(&m), "the master's keeper stays");
    c.restart_keeper(&m).expect("restart");
    c.restart_keeper(&standby).expect("restart");
    c.restart_keeper(&free).expect("restart");
    let out = c
        .finish("dead_keeper_removed", checker)
        .await
        .expect("invariants");
    // The master was declared failed during the outage, so either restarted db may be the
    // master now: the first to report healthy can be elected (finish() checked that no
    // acknowledged write was lost and that there was one master). The old master's keeper
    // was never removed.
    assert!(
        out.master == m || out.master == standby,
        "master {}",
        out.master
    );
    let (cd, _) = c.data().await.expect("cd");
    assert!(cd.keepers.contains_key(&m), "the old master's keeper stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_master_data_dir_is_refused_and_a_standby_is_elected() {
    let _s = serial().await;
    let (mut c, mut checker) = running(Opts::default()).await;
    let m = c.master().await.expect("master");
    checker.nemesis();
    c.kill_keeper(&m, true);
    std::fs::remove_dir_all(c.keeper(&m).dir.join("postgres")).expect("wipe");
    c.restart_keeper(&m).expect("restart");
    let new = c.wait_master_change(&m, MIN).await.expect("failover");
    assert!(c.keeper_log(&m).contains("refusing to initialise"));
    let out = c.finish("wiped_master", checker).await.expect("invariants");
    assert_eq!(out.master, new);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_whose_wal_is_gone_is_resynced() {
    let _s = serial().await;
    let (mut c, checker) = running(Opts {
        keepers: 2,
        spec: json!({"pgParameters": {"max_slot_wal_keep_size": "32MB"}}),
        ..Default::default()
    })
    .await;
    let m = c.master().await.expect("master");
    let s = if m == "k1" { "k2" } else { "k1" };
    let old_db = c.db_of(s).await.expect("db").uid;
    c.kill_keeper(s, true);
    // More WAL than wal_keep_size (floor 128 MB) and the slot's limit keep.
    for _ in 0..4 {
        c.exec_via_proxy(
            "CREATE TABLE IF NOT EXISTS big (v text);
             INSERT INTO big SELECT repeat('x', 500) FROM generate_series(1, 120000);
             TRUNCATE big; SELECT pg_switch_wal(); CHECKPOINT",
        )
        .await
        .expect("wal");
    }
    c.restart_keeper(s).expect("restart");
    c.wait_for(
        "a new db for the standby",
        Duration::from_secs(90),
        async || {
            let db = c.db_of(s).await?;
            (db.uid != old_db && db.status.healthy).then_some(())
        },
    )
    .await
    .expect("resynced");
    c.finish("wal_gone_resync", checker)
        .await
        .expect("invariants");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_lagging_more_than_max_standby_lag_is_not_elected() {
    let _s = serial().await;
    let (mut c, checker) = running(Opts {
        keepers: 2,
        spec: json!({"maxStandbyLag": 65536}),
        ..Default::default()
    })
    .await;
    let m = c.master().await.expect("master");
    let s = if m == "k1" { "k2" } else { "k1" };
    let receiver = freeze_receiver(&c, s);
    c.exec_via_proxy("CREATE TABLE lag AS SELECT md5(v::text) v FROM generate_series(1, 4000) v")
        .await
        .expect("wal");
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.kill_keeper(&m, true);
    // The WAL the standby did not read still sits in its socket buffer: gone with the
    // walreceiver, it cannot catch up from a dead master.
    signal_pid(receiver, Signal::SIGKILL);
    // Three failIntervals: no failover to the lagging standby.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let (cd, _) = c.data().await.expect("cd");
    let routed = cd
        .dbs
        .get(&cd.proxy.spec.master_db_uid)
        .map(|d| d.spec.keeper_uid.clone());
    assert_ne!(
        routed.as_deref(),
        Some(s),
        "the lagging standby was elected"
    );
    assert!(c.log("s1").contains("maxStandbyLag") || c.log("s1").contains("lag"));
    c.restart_keeper(&m).expect("restart");
    let out = c
        .finish("lagging_not_elected", checker)
        .await
        .expect("invariants");
    assert_eq!(out.master, m);
}

fn signal_pid(pid: i32, sig: Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_elected_standby_dies_before_promotion_and_the_old_master_is_reelected() {
    let _s = serial().await;
    let (mut c, mut checker) = running(Opts {
        keepers: 2,
        ..Default::default()
    })
    .await;
    let m = c.master().await.expect("master");
    let s = if m == "k1" { "k2" } else { "k1" };
    // The standby's startup process frozen: it reports healthy and is elected, but a
    // promotion can never finish.
    let startup = c.pg_process(s, "startup").expect("startup process");
    signal_pid(startup, Signal::SIGSTOP);
    checker.nemesis();
    c.kill_keeper(&m, true);
    c.wait_for("the standby elected", MIN, async || {
        let db = c.db_of(s).await?;
        (db.spec.role == Some(control::model::DbRole::Master)).then_some(())
    })
    .await
    .expect("elected");
    c.kill_keeper(s, true);
    signal_pid(startup, Signal::SIGKILL);
    c.restart_keeper(&m).expect("the old master back");
    c.wait_for(
        "the old master re-elected",
        Duration::from_secs(120),
        async || {
            (c.master().await.as_deref() == Some(m.as_str()) && c.health().await.is_ok())
                .then_some(())
        },
    )
    .await
    .expect("re-elected");
    c.restart_keeper(s).expect("restart");
    let out = c
        .finish_with("elected_dies_before_promotion", checker, true)
        .await
        .expect("invariants");
    assert_eq!(out.master, m);
}

async fn sync_set(c: &Cluster) -> Vec<String> {
    let (cd, _) = c.data().await.expect("cd");
    let m = &cd.dbs[&cd.cluster.status.master];
    m.spec
        .synchronous_standbys
        .iter()
        .filter_map(|d| cd.dbs.get(d).map(|d| d.spec.keeper_uid.clone()))
        .collect()
}

/// Stops a standby's walreceiver: WAL stops arriving (what is sent meanwhile waits in its
/// socket buffer until the receiver is killed with it). Returns the receiver's PID.
fn freeze_receiver(c: &Cluster, uid: &str) -> i32 {
    let wr = c.pg_process(uid, "walreceiver").expect("walreceiver");
    signal_pid(wr, Signal::SIGSTOP);
    wr
}

/// k_lag falls behind: its walreceiver is frozen while writes go on. Returns the receiver
/// to kill once the master is gone.
#[must_use]
async fn make_lag(c: &Cluster, k_lag: &str) -> i32 {
    let wr = freeze_receiver(c, k_lag);
    c.exec_via_proxy("CREATE TABLE fork AS SELECT md5(v::text) v FROM generate_series(1, 1000) v")
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_secs(2)).await;
    wr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeline_fork_async_the_standby_ahead_resyncs() {
    let _s = serial().await;
    let (mut c, mut checker) = running(Opts::default()).await;
    let m = c.master().await.expect("master");
    let others: Vec<String> = c
        .keepers
        .iter()
        .map(|k| k.uid.clone())
        .filter(|k| *k != m)
        .collect();
    let (lag, ahead) = (others[0].clone(), others[1].clone());
    let wr = make_lag(&c, &lag).await;
    c.signal_keeper(&ahead, Signal::SIGSTOP, true)
        .expect("freeze the one ahead");
    checker.nemesis();
    c.kill_keeper(&m, true);
    signal_pid(wr, Signal::SIGKILL);
    let new = c.wait_master_change(&m, MIN).await.expect("failover");
    assert_eq!(
        new, lag,
        "the lagging standby, the only healthy one, is elected"
    );
    c.signal_keeper(&ahead, Signal::SIGCONT, true)
        .expect("thaw");
    c.restart_keeper(&m).expect("restart");
    let out = c
        .finish("timeline_fork_async", checker)
        .await
        .expect("invariants");
    assert_eq!(out.master, lag);
    let log = c.keeper_log(&ahead);
    assert!(
        log.contains("done action=BaseBackup") || log.contains("done action=Rewind"),
        "the standby that was ahead resynced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeline_fork_sync_the_lagging_standby_is_never_elected() {
    let _s = serial().await;
    let (mut c, mut checker) = running(Opts {
        spec: json!({"synchronousReplication": true, "minSynchronousStandbys": 1,
            "maxSynchronousStandbys": 1}),
        ..Default::default()
    })
    .await;
    let m = c.master().await.expect("master");
    let set = sync_set(&c).await;
    let in_sync = set.first().expect("a synchronous standby").clone();
    let lag = c
        .keepers
        .iter()
        .map(|k| k.uid.clone())
        .find(|k| *k != m && *k != in_sync)
        .expect("an async standby");
    let wr = make_lag(&c, &lag).await;
    c.signal_keeper(&in_sync, Signal::SIGSTOP, true)
        .expect("freeze the sync standby");
    checker.nemesis();
    c.kill_keeper(&m, true);
    signal_pid(wr, Signal::SIGKILL);
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_ne!(
        c.master().await.as_deref(),
        Some(lag.as_str()),
        "never the lagging one"
    );
    c.signal_keeper(&in_sync, Signal::SIGCONT, true)
        .expect("thaw");
    let new = c.wait_master_change(&m, MIN).await.expect("failover");
    assert_eq!(new, in_sync);
    c.restart_keeper(&m).expect("restart");
    let out = c
        .finish("timeline_fork_sync", checker)
        .await
        .expect("invariants");
    assert_eq!(out.missing, 0);
}

async fn app_can_connect(c: &Cluster, uid: &str) -> bool {
    let (addr, port) = c.pg_addr(uid);
    e2e::sql::connect_as(&addr, port, "app", "app-pw", Duration::from_secs(2))
        .await
        .is_ok()
}

async fn master_restart_in_sync_mode(min: u16) {
    let (mut c, checker) = running(Opts {
        keepers: 2,
        spec: json!({"synchronousReplication": true, "minSynchronousStandbys": min,
            "maxSynchronousStandbys": 1}),
        ..Default::default()
    })
    .await;
    let m = c.master().await.expect("master");
    let s = if m == "k1" { "k2" } else { "k1" };
    c.exec_via_proxy("CREATE ROLE app LOGIN PASSWORD 'app-pw'")
        .await
        .expect("role");
    assert!(app_can_connect(&c, &m).await);
    c.kill_keeper(s, true);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = c.postmaster_pid(&m).expect("pid");
    c.crash_postgres(&m).expect("crash");
    c.wait_for("the master back", MIN, async || {
        (c.postmaster_pid(&m) != Some(pid) && c.query(&m, "SELECT 'up'").await.is_ok())
            .then_some(())
    })
    .await
    .expect("back");
    if min == 0 {
        assert!(
            app_can_connect(&c, &m).await,
            "minSynchronousStandbys 0: admitted at once"
        );
    } else {
        assert!(
            !app_can_connect(&c, &m).await,
            "normal users wait for a sync standby"
        );
    }
    c.restart_keeper(s).expect("restart");
    c.wait_for("normal users admitted", MIN, async || {
        app_can_connect(&c, &m).await.then_some(())
    })
    .await
    .expect("admitted");
    c.finish(&format!("sync_restart_min{min}"), checker)
        .await
        .expect("invariants");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_master_restart_in_sync_mode_normal_users_wait_for_a_sync_standby() {
    let _s = serial().await;
    master_restart_in_sync_mode(1).await;
    master_restart_in_sync_mode(0).await;
}

/// `--long`: the kill -9 scenario over the whole matrix (async, sync, sync with
/// minSynchronousStandbys 0; with and without pg_rewind), each twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "matrix and repetitions: scripts/test.sh --long"]
async fn kill9_matrix_and_repetitions() {
    let _s = serial().await;
    let modes = [
        ("async", json!({})),
        ("sync", sync_spec()),
        (
            "sync_min0",
            json!({"synchronousReplication": true, "minSynchronousStandbys": 0,
                "maxSynchronousStandbys": 1}),
        ),
    ];
    for round in 0..2 {
        for (mode, spec) in &modes {
            for rewind in [false, true] {
                let lag = if *mode == "async" {
                    Lag::All
                } else {
                    Lag::None
                };
                let name = format!("matrix_{mode}_rewind_{rewind}_{round}");
                kill_master(&name, spec.clone(), rewind, lag).await;
            }
        }
    }
}
