//! Table tests of `decide`, one or more per rule of issue 4, on the simulated world.

use super::sim::{test_spec, KeeperSim, World};
use super::*;
use crate::model::{
    ClusterInitMode, ClusterRole, ClusterSpec, DbInitMode, DbRole, ExistingConfig, FollowType,
    PitrConfig, StandbyConfig, StandbySettings, SwitchoverPhase,
};

const S: GoDuration = GoDuration::from_secs(1);

fn secs(n: i64) -> GoDuration {
    GoDuration::from_secs(n)
}

fn sync_spec(min: u16, max: u16) -> ClusterSpec {
    ClusterSpec {
        synchronous_replication: Some(true),
        min_synchronous_standbys: Some(min),
        max_synchronous_standbys: Some(max),
        ..test_spec()
    }
}

/// A healthy cluster of `n` keepers with the master on k0 (priority makes init pick k0).
fn cluster(spec: ClusterSpec, n: usize) -> World {
    let mut w = World::new(spec);
    for i in 0..n {
        let k = KeeperSim {
            priority: if i == 0 { 10 } else { 0 },
            ..Default::default()
        };
        w.keepers.insert(format!("k{i}"), k);
    }
    w.add_proxy("p0");
    assert!(w.run_until(300, |w| w.settled()), "{:#?}", w.reasons);
    assert_eq!(w.master_keeper(), "k0");
    w
}

fn db_uid(w: &World, keeper: &str) -> String {
    w.db_of(keeper).map(|d| d.uid.clone()).unwrap_or_default()
}

/// Kills the master's keeper and PostgreSQL and runs until a new master is published.
fn kill_master_and_fail_over(w: &mut World) -> String {
    let old = w.master_keeper();
    w.keeper(&old).alive = false;
    assert!(
        w.run_until(60, |w| w.master_keeper() != old
            && w.proxy_master() == w.master()),
        "no failover: {:#?}",
        w.reasons
    );
    w.master_keeper()
}

// ---- initialisation ----

#[test]
fn first_round_as_leader_only_observes() {
    let mut w = World::new(test_spec());
    w.keepers.insert("k0".into(), KeeperSim::default());
    w.act_keepers();
    let before = w.cd.clone();
    w.round();
    assert_eq!(w.cd, before);
    assert!(w.has_reason(ReasonKind::FirstRound));
    w.step(S);
    assert!(w.has_reason(ReasonKind::InitStarted), "{:?}", w.reasons);
}

#[test]
fn init_new_picks_the_highest_priority_keeper_and_becomes_normal() {
    let mut w = World::new(test_spec());
    for (k, p) in [("a", 0), ("b", 5), ("c", 1)] {
        let sim = KeeperSim {
            priority: p,
            ..Default::default()
        };
        w.keepers.insert(k.into(), sim);
    }
    w.add_proxy("p0");
    assert!(w.run_until(60, |w| w.settled()));
    assert_eq!(w.master_keeper(), "b");
    let master = &w.cd.dbs[w.master()];
    assert_eq!(master.spec.init_mode, Some(DbInitMode::None));
    assert_eq!(w.cd.cluster.status.phase, Some(ClusterPhase::Normal));
    assert_eq!(w.cd.dbs.len(), 3, "the others got standbys");
}

#[test]
fn init_new_retries_on_another_keeper_after_init_timeout() {
    let mut w = World::new(test_spec());
    w.keepers.insert(
        "a".into(),
        KeeperSim {
            converges: false,
            priority: 9,
            ..Default::default()
        },
    );
    w.keepers.insert("b".into(), KeeperSim::default());
    w.run(5);
    assert_eq!(w.master_keeper(), "a");
    w.run_until(120, |w| w.has_reason(ReasonKind::InitRetry));
    assert_eq!(w.master_keeper(), "b", "{:?}", w.reasons);
    assert!(w.run_until(30, |w| w.cd.cluster.status.phase
        == Some(ClusterPhase::Normal)));
}

#[test]
fn init_skips_keepers_that_cannot_be_master() {
    let mut w = World::new(test_spec());
    let no = KeeperSim {
        can_be_master: Some(false),
        priority: 100,
        ..Default::default()
    };
    w.keepers.insert("a".into(), no);
    w.keepers.insert("b".into(), KeeperSim::default());
    w.run(3);
    assert_eq!(w.master_keeper(), "b");
}

#[test]
fn init_existing_uses_the_configured_keeper_once_alive() {
    let spec = ClusterSpec {
        init_mode: Some(ClusterInitMode::Existing),
        existing_config: Some(ExistingConfig {
            keeper_uid: "b".into(),
        }),
        ..test_spec()
    };
    let mut w = World::new(spec);
    w.keepers.insert("a".into(), KeeperSim::default());
    w.run(3);
    assert!(w.master().is_empty(), "must wait for keeper b");
    w.keepers.insert("b".into(), KeeperSim::default());
    w.run(1);
    assert_eq!(w.master_keeper(), "b");
    let db = &w.cd.dbs[w.master()];
    assert_eq!(db.spec.init_mode, Some(DbInitMode::Existing));
    assert!(db.spec.include_previous_config);
}

#[test]
fn init_pitr_creates_a_pitr_db_with_the_config() {
    let pitr = PitrConfig {
        data_restore_command: "cp -a /backup/. %d".into(),
        ..Default::default()
    };
    let spec = ClusterSpec {
        init_mode: Some(ClusterInitMode::Pitr),
        pitr_config: Some(pitr.clone()),
        ..test_spec()
    };
    let mut w = World::new(spec);
    w.keepers.insert("a".into(), KeeperSim::default());
    w.run(2);
    let db = &w.cd.dbs[w.master()];
    assert_eq!(db.spec.init_mode, Some(DbInitMode::Pitr));
    assert_eq!(db.spec.pitr_config, Some(pitr));
    assert_eq!(db.spec.role, Some(DbRole::Master));
}

fn standby_cluster_spec(settings: &StandbySettings) -> ClusterSpec {
    ClusterSpec {
        init_mode: Some(ClusterInitMode::Pitr),
        role: Some(ClusterRole::Standby),
        pitr_config: Some(PitrConfig {
            data_restore_command: "true".into(),
            ..Default::default()
        }),
        standby_config: Some(StandbyConfig {
            standby_settings: Some(settings.clone()),
            archive_recovery_settings: None,
        }),
        ..test_spec()
    }
}

#[test]
fn standby_cluster_master_follows_the_external_primary() {
    let settings = StandbySettings {
        primary_conninfo: "host=10.0.0.1 port=5432".into(),
        ..Default::default()
    };
    let mut w = World::new(standby_cluster_spec(&settings));
    w.keepers.insert("a".into(), KeeperSim::default());
    w.keepers.insert("b".into(), KeeperSim::default());
    w.add_proxy("p0");
    assert!(w.run_until(60, |w| w.settled()), "{:#?}", w.reasons);
    let m = &w.cd.dbs[w.master()];
    assert_eq!(m.spec.role, Some(DbRole::Standby));
    let f = m.spec.follow_config.as_ref().expect("follow config");
    assert_eq!(f.kind, FollowType::External);
    assert_eq!(f.standby_settings.as_ref(), Some(&settings));
    // Promoting the standby cluster (stolonctl promote) makes its master a real master.
    w.cd.cluster.spec.role = Some(ClusterRole::Master);
    w.step(S);
    let m = &w.cd.dbs[w.master()];
    assert_eq!(m.spec.role, Some(DbRole::Master));
    assert!(m.spec.follow_config.is_none());
}

/// As Go stolon: no synchronous replication in a standby cluster (its master is a cascading
/// standby), whatever the spec says; a failover there elects as in async mode, and the old
/// master's db (an external follower) is kept, then removed, as in a master cluster.
#[test]
fn standby_cluster_never_uses_synchronous_replication_and_fails_over() {
    let spec = ClusterSpec {
        synchronous_replication: Some(true),
        min_synchronous_standbys: Some(1),
        ..standby_cluster_spec(&StandbySettings::default())
    };
    let mut w = World::new(spec);
    for k in ["a", "b", "c"] {
        w.keepers.insert(k.into(), KeeperSim::default());
    }
    w.add_proxy("p0");
    assert!(w.run_until(60, |w| w.settled()), "{:#?}", w.reasons);
    let no_sync = |w: &World| {
        w.cd.dbs
            .values()
            .all(|d| !d.spec.synchronous_replication && d.spec.synchronous_standbys.is_empty())
    };
    assert!(no_sync(&w), "{:#?}", w.cd.dbs);
    let old = w.master().to_string();
    let old_keeper = w.master_keeper();
    assert_eq!(w.cd.dbs[&old].spec.followers.len(), 2, "slots for both");
    w.keeper(&old_keeper).alive = false;
    assert!(w.run_until(60, |w| w.master() != old), "{:#?}", w.reasons);
    let kept = &w.cd.dbs[&old];
    assert_eq!(kept.spec.role, Some(DbRole::Standby));
    assert!(kept.spec.followers.is_empty());
    assert!(w.run_until(30, |w| !w.cd.dbs.contains_key(&old)));
    assert!(no_sync(&w));
    let m = &w.cd.dbs[w.master()];
    let f = m
        .spec
        .follow_config
        .as_ref()
        .expect("follows the external primary");
    assert_eq!(f.kind, FollowType::External);
}

#[test]
fn init_merges_reported_pg_parameters_only_when_asked() {
    for (merge, expect) in [(true, Some("100")), (false, None)] {
        let spec = ClusterSpec {
            merge_pg_parameters: Some(merge),
            pg_parameters: [("work_mem".to_string(), "8MB".to_string())].into(),
            ..test_spec()
        };
        let mut w = World::new(spec);
        w.keepers.insert("a".into(), KeeperSim::default());
        assert!(w.run_until(30, |w| w.cd.cluster.status.phase
            == Some(ClusterPhase::Normal)));
        let params = &w.cd.cluster.spec.pg_parameters;
        assert_eq!(params.get("max_connections").map(String::as_str), expect);
        assert_eq!(params.get("work_mem").map(String::as_str), Some("8MB"));
    }
}

// ---- health ----

#[test]
fn an_info_whose_info_uid_does_not_change_is_stale() {
    let mut w = cluster(test_spec(), 2);
    // k1 frozen: its key stays in the store, unchanged.
    w.keeper("k1").alive = false;
    w.run(9);
    assert!(
        w.cd.keepers["k1"].status.healthy,
        "healthy within failInterval"
    );
    w.run(2);
    assert!(!w.cd.keepers["k1"].status.healthy);
    assert!(w.keeper_infos.contains_key("k1"), "the key still exists");
}

#[test]
fn keeper_infos_of_another_cluster_are_ignored() {
    let mut w = cluster(test_spec(), 1);
    let mut info = w.keeper_infos["k0"].clone();
    info.uid = "stranger".into();
    info.cluster_uid = "other-cluster".into();
    w.keeper_infos.insert("stranger".into(), info);
    w.round();
    assert!(!w.cd.keepers.contains_key("stranger"));
}

#[test]
fn a_master_with_unhealthy_postgres_fails_after_fail_interval_not_before() {
    let mut w = cluster(test_spec(), 2);
    w.keeper("k0").pg_healthy = false;
    w.run(9);
    assert_eq!(w.master_keeper(), "k0", "no failover within failInterval");
    w.run(2);
    assert_eq!(w.master_keeper(), "k1");
}

#[test]
fn force_fail_fails_over_at_once_and_lasts_one_round() {
    let mut w = cluster(test_spec(), 2);
    w.cd.keepers.get_mut("k0").expect("k0").status.force_fail = true;
    w.step(S);
    assert_eq!(w.master_keeper(), "k1");
    assert!(
        !w.cd.keepers["k0"].status.force_fail,
        "cleared after one round"
    );
    w.step(S);
    assert!(w.cd.keepers["k0"].status.healthy);
}

#[test]
fn a_new_leader_does_not_fail_over_in_its_first_rounds() {
    let mut w = cluster(test_spec(), 2);
    w.keeper("k0").alive = false;
    w.run(20);
    let old = w.master_keeper();
    assert_eq!(old, "k1", "failed over");
    // A new leader with empty memory: infos look fresh until failInterval passes.
    w.keeper("k0").alive = true;
    w.run(3);
    w.keeper("k1").alive = false;
    w.mem = SentinelMemory::default();
    w.step(S);
    assert!(w.has_reason(ReasonKind::FirstRound));
    w.run(8);
    assert_eq!(w.master_keeper(), "k1", "a new leader waits a failInterval");
    w.run(5);
    assert_eq!(w.master_keeper(), "k0");
}

// ---- failover ----

/// Three keepers (k0 the master) where `lagging` stopped replicating between two writes:
/// the other standby is ahead of it.
fn with_a_lagging_standby(spec: ClusterSpec, lagging: &str) -> World {
    let mut w = cluster(spec, 3);
    w.write(100);
    w.keeper(lagging).replicates = false;
    w.run(2);
    w.write(50);
    w.run(2);
    let ahead = if lagging == "k1" { "k2" } else { "k1" };
    assert!(w.keepers[ahead].xlog > w.keepers[lagging].xlog);
    w
}

fn failsafe_spec() -> ClusterSpec {
    ClusterSpec {
        failsafe_mode: Some(true),
        ..test_spec()
    }
}

#[test]
fn a_dead_master_is_replaced_by_the_standby_with_the_highest_wal_position() {
    let mut w = with_a_lagging_standby(test_spec(), "k1");
    assert_eq!(kill_master_and_fail_over(&mut w), "k2");
}

#[test]
fn equal_wal_positions_are_broken_by_priority_then_uid() {
    let mut w = cluster(test_spec(), 3);
    w.keeper("k2").priority = 3;
    w.run(2);
    assert_eq!(kill_master_and_fail_over(&mut w), "k2");
    let mut w = cluster(test_spec(), 3);
    assert_eq!(
        kill_master_and_fail_over(&mut w),
        "k1",
        "then the lower uid"
    );
}

#[test]
fn a_keeper_that_cannot_be_master_is_never_elected() {
    let mut w = cluster(test_spec(), 3);
    w.keeper("k1").can_be_master = Some(false);
    w.keeper("k1").priority = 50;
    w.keeper("k2").replicates = false;
    w.write(10);
    w.run(2);
    assert_eq!(kill_master_and_fail_over(&mut w), "k2");
}

#[test]
fn async_a_standby_lagging_more_than_max_standby_lag_is_not_elected() {
    let mut w = cluster(test_spec(), 2);
    w.keeper("k1").replicates = false;
    w.write(2 * 1024 * 1024);
    w.run(2);
    w.keeper("k0").alive = false;
    w.run(30);
    assert_eq!(w.master_keeper(), "k0");
    assert!(w.has_reason(ReasonKind::NoEligibleStandby));
    let why = &w
        .reasons
        .iter()
        .find(|r| r.kind == ReasonKind::NoEligibleStandby);
    assert!(
        why.is_some_and(|r| r.detail.contains("maxStandbyLag")),
        "{why:?}"
    );
}

#[test]
fn a_standby_on_another_timeline_or_not_converged_is_not_elected() {
    let mut w = cluster(test_spec(), 3);
    // The master moved to timeline 2; k1 (not applying anything) is still on 1.
    w.keeper("k0").timeline = 2;
    w.keeper("k0").history = vec![crate::model::TimelineHistoryEntry {
        timeline_id: 1,
        switch_point: u64::MAX,
        reason: String::new(),
    }];
    w.keeper("k1").converges = false;
    w.run(1);
    w.keeper("k2").converges = false;
    let k2 = db_uid(&w, "k2");
    // Make k2's spec change so it is not converged.
    w.cd.dbs.get_mut(&k2).expect("k2 db").generation += 1;
    w.keeper("k0").alive = false;
    w.run(20);
    assert_eq!(w.master_keeper(), "k0");
    let detail = &w
        .reasons
        .iter()
        .find(|r| r.kind == ReasonKind::NoEligibleStandby)
        .expect("reason")
        .detail;
    assert!(
        detail.contains("timeline") && detail.contains("not converged"),
        "{detail}"
    );
}

#[test]
fn a_master_that_does_not_converge_within_convergence_timeout_is_failed() {
    let mut w = cluster(test_spec(), 2);
    w.keeper("k0").converges = false;
    w.cd.cluster
        .spec
        .pg_parameters
        .insert("work_mem".into(), "1MB".into());
    w.run(25);
    assert_eq!(w.master_keeper(), "k0");
    w.run(10);
    assert_eq!(w.master_keeper(), "k1");
    assert!(w
        .reasons
        .iter()
        .chain(std::iter::empty())
        .all(|r| r.kind != ReasonKind::NoEligibleStandby));
}

#[test]
fn without_standbys_there_is_no_failover_and_a_reason() {
    let mut w = cluster(test_spec(), 1);
    w.keeper("k0").alive = false;
    w.run(15);
    assert_eq!(w.master_keeper(), "k0");
    assert!(w.has_reason(ReasonKind::NoEligibleStandby));
}

#[test]
fn sync_only_a_member_of_the_in_sync_set_is_elected() {
    let mut w = cluster(sync_spec(1, 1), 3);
    let master = w.cd.dbs[w.master()].clone();
    assert_eq!(master.spec.synchronous_standbys.len(), 1);
    let sync_db = master.spec.synchronous_standbys[0].clone();
    let sync_keeper = w.cd.dbs[&sync_db].spec.keeper_uid.clone();
    let other = if sync_keeper == "k1" { "k2" } else { "k1" };
    // The other standby is as far (async standbys may be) and has the higher priority.
    w.keeper(other).priority = 100;
    w.write(10);
    w.run(2);
    assert_eq!(kill_master_and_fail_over(&mut w), sync_keeper);
}

#[test]
fn sync_no_failover_when_the_in_sync_standby_is_gone() {
    let mut w = cluster(sync_spec(1, 1), 3);
    let sync_db = w.cd.dbs[w.master()].spec.synchronous_standbys[0].clone();
    let sync_keeper = w.cd.dbs[&sync_db].spec.keeper_uid.clone();
    w.keeper(&sync_keeper).alive = false;
    w.keeper("k0").alive = false;
    w.run(30);
    assert_eq!(w.master_keeper(), "k0");
    assert!(w.has_reason(ReasonKind::NoEligibleStandby));
}

// ---- proxy handshake ----

#[test]
fn failover_fences_proxies_and_publishes_only_after_every_proxy_acked() {
    let mut w = cluster(test_spec(), 2);
    w.add_proxy("p1");
    w.run(2);
    assert_eq!(w.cd.proxy.spec.enabled_proxies, ["p0", "p1"]);
    let generation = w.cd.proxy.generation;
    w.proxies.get_mut("p1").expect("p1").slow = true;
    w.keeper("k0").alive = false;
    w.run_until(30, |w| w.master_keeper() == "k1");
    assert_eq!(w.proxy_master(), "", "fenced in the same write");
    assert_eq!(w.cd.proxy.generation, generation + 1);
    w.run(5);
    assert_eq!(w.proxy_master(), "", "p1 has not acked");
    assert!(w.has_reason(ReasonKind::WaitingForProxies));
    w.proxies.get_mut("p1").expect("p1").slow = false;
    w.run(2);
    assert_eq!(w.proxy_master(), w.master());
}

#[test]
fn a_silent_proxy_expires_after_twice_its_timeout_and_is_disabled() {
    let mut w = cluster(test_spec(), 2);
    w.add_proxy("p1");
    w.run(2);
    w.proxies.get_mut("p1").expect("p1").alive = false;
    w.keeper("k0").alive = false;
    w.run(12);
    assert_eq!(w.master_keeper(), "k1");
    assert_eq!(w.proxy_master(), "", "p1 not expired yet");
    w.run(12);
    assert_eq!(w.proxy_master(), w.master());
    assert_eq!(w.cd.proxy.spec.enabled_proxies, ["p0"]);
    // Thawed: re-enabled.
    w.proxies.get_mut("p1").expect("p1").alive = true;
    w.run(2);
    assert_eq!(w.cd.proxy.spec.enabled_proxies, ["p0", "p1"]);
}

/// A proxy that proves liveness by its lease writes its info once and then only on change:
/// it stays enabled with the same infoUID for as long as its key exists, acks a new
/// generation by writing, and once frozen is waited for only until its lease (2 x
/// proxyTimeout after its last contact) deletes its key.
#[test]
fn a_lease_proxy_is_active_while_its_key_exists() {
    let mut w = cluster(test_spec(), 2);
    assert!(
        w.cd.proxy.spec.lease_liveness,
        "the sentinel honours leases"
    );
    w.add_proxy("p1");
    w.proxies.get_mut("p1").expect("p1").lease = true;
    w.run(2);
    let info = w.proxy_infos["p1"].clone();
    assert!(info.lease_liveness);
    w.run(60); // far past 2 x proxyTimeout with no write
    assert_eq!(
        w.proxy_infos["p1"].info_uid, info.info_uid,
        "rewritten while idle"
    );
    assert_eq!(w.cd.proxy.spec.enabled_proxies, ["p0", "p1"]);
    // Frozen, then the master dies: the new master waits for p1's key to expire.
    w.proxies.get_mut("p1").expect("p1").alive = false;
    let frozen_at = w.now;
    w.keeper("k0").alive = false;
    assert!(w.run_until(60, |w| w.master_keeper() == "k1"
        && w.proxy_master() == w.master()));
    let waited = w.now.since(frozen_at);
    let ttl = GoDuration::from_std(crate::model::proxy_lease_ttl(
        w.cd.cluster.spec.proxy_timeout(),
    ));
    assert!(
        waited >= ttl,
        "published after {waited:?}, before p1's lease expired"
    );
    assert!(
        waited <= GoDuration(ttl.0 + GoDuration::from_secs(3).0),
        "waited {waited:?}"
    );
    assert_eq!(w.cd.proxy.spec.enabled_proxies, ["p0"]);
    assert!(!w.proxy_infos.contains_key("p1"), "an expired lease's key");
}

/// A Go proxy (no lease liveness) is still judged by its infoUID, and a document without
/// the sentinel's lease mark (a Go sentinel wrote it) keeps our proxies rewriting theirs.
#[test]
fn without_the_lease_mark_proxies_rewrite_their_info_every_step() {
    let mut w = cluster(test_spec(), 2);
    w.add_proxy("p1");
    w.proxies.get_mut("p1").expect("p1").lease = true;
    w.cd.proxy.spec.lease_liveness = false;
    w.act_proxies();
    let before = w.proxy_infos["p1"].clone();
    assert!(
        !before.lease_liveness,
        "lease mode without the sentinel's mark"
    );
    w.act_proxies();
    assert_ne!(w.proxy_infos["p1"].info_uid, before.info_uid);
}

// ---- standbys ----

#[test]
fn a_free_keeper_gets_a_resync_standby_following_the_master() {
    let mut w = cluster(test_spec(), 1);
    w.keepers.insert("k9".into(), KeeperSim::default());
    w.run(2);
    let db = w.db_of("k9").expect("standby on k9").clone();
    assert_eq!(db.spec.init_mode, Some(DbInitMode::Resync));
    assert_eq!(db.spec.role, Some(DbRole::Standby));
    let follow = db.spec.follow_config.expect("follows");
    assert_eq!(follow.dbuid, w.master());
    assert!(w.cd.dbs[w.master()].spec.followers.contains(&db.uid));
}

#[test]
fn a_new_standby_not_synced_within_sync_timeout_is_synced_again_and_never_without_one() {
    for timeout in [0, 10] {
        let spec = ClusterSpec {
            sync_timeout: Some(GoDuration::from_secs(timeout)),
            ..test_spec()
        };
        let mut w = cluster(spec, 1);
        w.keepers.insert(
            "k9".into(),
            KeeperSim {
                converges: false,
                ..KeeperSim::default()
            },
        );
        w.run(2);
        let first = w.db_of("k9").expect("standby on k9").uid.clone();
        let mut details = Vec::new();
        for _ in 0..30 {
            w.step(S);
            details.extend(w.reasons.iter().map(|r| r.detail.clone()));
        }
        let now = w.db_of("k9").map(|d| d.uid.clone());
        if timeout == 0 {
            assert_eq!(
                now.as_deref(),
                Some(first.as_str()),
                "no limit without syncTimeout"
            );
        } else {
            assert_ne!(now.as_deref(), Some(first.as_str()), "{details:#?}");
            assert!(
                details.iter().any(|d| d.contains(&format!(
                    "{first} on keeper k9: not synced within syncTimeout"
                ))),
                "{details:#?}"
            );
        }
    }
}

#[test]
fn max_standbys_per_sender_caps_standbys_and_lowering_it_removes_one() {
    let spec = ClusterSpec {
        max_standbys_per_sender: Some(2),
        ..test_spec()
    };
    let mut w = cluster(spec, 4);
    assert_eq!(w.cd.dbs.len(), 3, "master + 2");
    w.cd.cluster.spec.max_standbys_per_sender = Some(1);
    w.step(S);
    assert_eq!(w.cd.dbs.len(), 2);
    assert!(w.has_reason(ReasonKind::DbRemoved));
}

#[test]
fn a_failed_standby_is_replaced_on_a_free_keeper() {
    let spec = ClusterSpec {
        max_standbys_per_sender: Some(1),
        ..test_spec()
    };
    let mut w = cluster(spec, 3);
    let standby_keeper =
        w.cd.dbs
            .values()
            .find(|d| d.uid != w.master())
            .map(|d| d.spec.keeper_uid.clone())
            .expect("standby");
    w.keeper(&standby_keeper).alive = false;
    w.run(12);
    let free = if standby_keeper == "k1" { "k2" } else { "k1" };
    assert!(w.db_of(free).is_some(), "{:#?}", w.reasons);
    assert!(w.db_of(&standby_keeper).is_none(), "failed extra removed");
}

#[test]
fn a_standby_with_another_system_id_is_removed_and_resynced() {
    let mut w = cluster(test_spec(), 2);
    let old = db_uid(&w, "k1");
    w.keeper("k1").system_id = "other".into();
    w.step(S);
    assert!(!w.cd.dbs.contains_key(&old));
    assert!(w.has_reason(ReasonKind::DbRemoved));
    assert!(w.db_of("k1").is_some(), "a new db on the same keeper");
    assert!(w.run_until(10, |w| w.settled()));
}

#[test]
fn a_forked_standby_is_resynced_at_once_without_rewind_and_later_with_it() {
    for rewind in [false, true] {
        let spec = ClusterSpec {
            use_pgrewind: Some(rewind),
            ..test_spec()
        };
        let mut w = cluster(spec, 3);
        // k1 lags, the master dies, k2 is elected; then k0 comes back ahead of the fork.
        w.write(500);
        w.run(2);
        kill_master_and_fail_over(&mut w);
        assert_eq!(w.master_keeper(), "k1");
        // k0 comes back ahead of the fork: the old master's db is gone (Go's rule), and
        // the new db is one k0 has to build from the new master (a standby that forks is
        // resynced at once without rewind and after convergenceTimeout with it).
        let old = db_uid(&w, "k0");
        w.keeper("k0").xlog += 100; // had unreplicated WAL past the switch point
        w.keeper("k0").alive = true;
        w.run(2);
        assert!(!w.cd.dbs.contains_key(&old), "rewind={rewind}");
        let back = w.db_of("k0").expect("a new db").clone();
        assert_eq!(back.spec.init_mode, Some(DbInitMode::Resync));
        assert_eq!(back.spec.use_pgrewind, rewind);
    }
}

/// A standby that follows its master's fresh promotion can report the new timeline before
/// the master's keeper does: while the master has not converged on its spec it is kept (its
/// history branched where the master was last seen); once the master, converged, still
/// reports the old timeline, the fork is proven and it is removed.
#[test]
fn a_standby_ahead_of_a_master_settling_on_its_promotion_is_kept_until_proven_forked() {
    let mut w = cluster(test_spec(), 3);
    let master = w.master().to_string();
    let (x, generation) = (
        w.cd.dbs[&master].status.x_log_pos,
        w.cd.dbs[&master].generation,
    );
    let k0 = w.keeper("k0");
    k0.converges = false;
    k0.generation = generation - 1;
    let k1 = w.keeper("k1");
    k1.timeline = 2;
    k1.history = vec![crate::model::TimelineHistoryEntry {
        timeline_id: 1,
        switch_point: x,
        reason: "promoted".into(),
    }];
    k1.xlog = x + 100;
    let standby = db_uid(&w, "k1");
    w.step(S);
    assert!(w.cd.dbs.contains_key(&standby), "{:#?}", w.reasons);
    assert!(!w.has_reason(ReasonKind::DbRemoved));
    w.keeper("k0").generation = generation;
    w.step(S);
    assert!(!w.cd.dbs.contains_key(&standby), "{:#?}", w.reasons);
}

#[test]
fn a_standby_that_needs_wal_the_master_no_longer_has_is_resynced() {
    let mut w = cluster(test_spec(), 2);
    let old = db_uid(&w, "k1");
    w.keeper("k1").pg_healthy = false;
    w.keeper("k1").replicates = false;
    w.write(3 << 24);
    w.run(1);
    w.keeper("k0").older_wal_file = "000000010000000000000003".into();
    w.run(2);
    assert!(!w.cd.dbs.contains_key(&old));
    assert!(w.db_of("k1").is_some(), "a new db to resync");
}

#[test]
fn a_dead_keeper_is_removed_after_the_interval_but_never_the_masters() {
    let spec = ClusterSpec {
        dead_keeper_removal_interval: Some(secs(60)),
        ..test_spec()
    };
    let mut w = cluster(spec, 3);
    w.keeper("k2").alive = false;
    w.keeper("k2").published = false;
    w.run(50);
    assert!(w.cd.keepers.contains_key("k2"));
    w.run(15);
    assert!(!w.cd.keepers.contains_key("k2"));
    assert!(w.has_reason(ReasonKind::KeeperRemoved) || w.db_of("k2").is_none());
    // The master's keeper, silent as long, stays (no standby to elect).
    w.keeper("k1").alive = false;
    w.keeper("k0").alive = false;
    w.run(100);
    assert!(w.cd.keepers.contains_key(&w.master_keeper()));
}

#[test]
fn with_the_master_dead_no_keeper_is_removed_and_the_old_master_comes_back() {
    let spec = ClusterSpec {
        dead_keeper_removal_interval: Some(secs(30)),
        ..test_spec()
    };
    let mut w = cluster(spec, 2);
    // Master and standby die together: the standby is elected (still within its own
    // failInterval) and fails too. Nobody may be removed meanwhile, least of all the old
    // master, whose data is the newest.
    w.keeper("k0").alive = false;
    w.keeper("k1").alive = false;
    w.run(100);
    assert!(w.cd.keepers.contains_key("k0") && w.cd.keepers.contains_key("k1"));
    assert!(!w.has_reason(ReasonKind::KeeperRemoved));
    w.keeper("k0").alive = true;
    w.keeper("k1").alive = true;
    assert!(w.run_until(60, |w| w.settled()), "{:#?}", w.reasons);
}

/// The clusterdata a Go keeper, sentinel or proxy reads at each step of a failover and of
/// the old master's return (Go stolon's rule): the old master's db keeps role master with
/// no followers while the new master converges (a Go keeper never turns a master into a
/// standby), the new master keeps no slot for it, and once the new master is healthy and
/// converged the old db is removed; the keeper, back, gets a new standby db (resync).
#[test]
fn the_old_master_keeps_its_role_until_removed_and_its_keeper_gets_a_new_db() {
    let mut w = cluster(test_spec(), 3);
    let old = db_uid(&w, "k0");
    w.keeper("k0").alive = false;
    assert!(
        w.run_until(60, |w| w.master_keeper() != "k0"),
        "{:#?}",
        w.reasons
    );
    // The round of the election: the old db as it was, without followers.
    let db = &w.cd.dbs[&old];
    assert_eq!(db.spec.role, Some(DbRole::Master));
    assert!(db.spec.follow_config.is_none());
    assert!(db.spec.followers.is_empty(), "{:?}", db.spec.followers);
    assert_eq!(w.cd.proxy.spec.master_db_uid, "", "proxies fenced");
    let new = w.master().to_string();
    assert_ne!(new, old);
    // The new master converges: the old db is removed, never made a follower of it.
    let mut saw_removal = false;
    for _ in 0..30 {
        w.step(S);
        assert!(
            !w.cd.dbs[&new].spec.followers.contains(&old),
            "the new master keeps no slot for the dead old master"
        );
        if let Some(db) = w.cd.dbs.get(&old) {
            assert_eq!(db.spec.role, Some(DbRole::Master), "never a standby");
        } else {
            saw_removal = true;
            break;
        }
    }
    assert!(saw_removal, "{:#?}", w.reasons);
    assert!(w
        .reasons
        .iter()
        .any(|r| r.detail.contains(&format!("removing old master db {old}"))));
    assert!(w.db_of("k0").is_none(), "a dead keeper gets no db");
    assert!(w.run_until(10, |w| w.proxy_master() == w.master()));
    // The keeper comes back: a new db, a standby of the new master, made by resync.
    w.keeper("k0").alive = true;
    assert!(w.run_until(30, |w| w.db_of("k0").is_some()));
    let back = w.db_of("k0").expect("db").clone();
    assert_ne!(back.uid, old);
    assert_eq!(back.spec.role, Some(DbRole::Standby));
    assert_eq!(back.spec.init_mode, Some(DbInitMode::Resync));
    assert_eq!(
        back.spec.follow_config.as_ref().map(|f| f.dbuid.as_str()),
        Some(new.as_str())
    );
    assert!(w.run_until(30, |w| w.settled()));
    assert!(w.cd.dbs[&new].spec.followers.contains(&back.uid));
}

/// The elected standby never converges (its promotion hangs) and the old master comes back:
/// its db, still role master, is elected back with a new generation, so it counts as
/// converged only once its keeper has promoted it.
#[test]
fn an_old_master_is_elected_back_when_its_replacement_never_converges() {
    let mut w = cluster(test_spec(), 2);
    let old = db_uid(&w, "k0");
    w.keeper("k0").alive = false;
    w.keeper("k1").converges = false;
    assert!(w.run_until(60, |w| w.master_keeper() == "k1"));
    w.keeper("k0").alive = true;
    w.run(2);
    assert!(
        w.cd.dbs.contains_key(&old),
        "kept while k1 has not converged"
    );
    let gen = w.cd.dbs[&old].generation;
    assert!(w.run_until(120, |w| w.master() == old), "{:#?}", w.reasons);
    assert!(
        w.cd.dbs[&old].generation > gen,
        "a new generation to converge to"
    );
    w.keeper("k1").converges = true;
    assert!(w.run_until(60, |w| w.settled()), "{:#?}", w.reasons);
    assert_eq!(w.master_keeper(), "k0");
}

// ---- synchronous replication ----

#[test]
fn sync_the_set_is_changed_in_two_steps() {
    let mut w = cluster(sync_spec(1, 1), 3);
    let master = w.master().to_string();
    let first = w.cd.dbs[&master].spec.synchronous_standbys.clone();
    let first_keeper = w.cd.dbs[&first[0]].spec.keeper_uid.clone();
    w.keeper(&first_keeper).pg_healthy = false;
    let mut seen = vec![first.clone()];
    for _ in 0..20 {
        w.step(S);
        let cur = w.cd.dbs[&master].spec.synchronous_standbys.clone();
        if seen.last() != Some(&cur) {
            seen.push(cur);
        }
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(seen[1].len(), 2, "first the union");
    assert!(seen[1].contains(&first[0]));
    assert_eq!(seen[2].len(), 1);
    assert_ne!(seen[2], first);
}

#[test]
fn sync_below_min_the_failed_standby_stays_in_the_set_and_with_min_0_it_is_dropped() {
    let mut w = cluster(sync_spec(1, 1), 2);
    let master = w.master().to_string();
    let k1 = db_uid(&w, "k1");
    w.keeper("k1").alive = false;
    w.run(60);
    // Commits keep waiting for k1 rather than going on without any synchronous standby.
    assert_eq!(w.cd.dbs[&master].spec.synchronous_standbys, [k1]);
    let mut w = cluster(sync_spec(0, 1), 2);
    let master = w.master().to_string();
    w.keeper("k1").alive = false;
    w.run(40);
    assert!(w.cd.dbs[&master].spec.synchronous_standbys.is_empty());
}

#[test]
fn sync_a_new_master_starts_with_a_placeholder_until_standbys_follow() {
    let mut w = cluster(sync_spec(1, 1), 2);
    let old = w.master().to_string();
    w.keeper("k0").alive = false;
    w.run_until(30, |w| w.master() != old);
    let new = w.cd.dbs[w.master()].spec.synchronous_standbys.clone();
    assert_eq!(new, [PLACEHOLDER_STANDBY]);
}

/// A set of only the placeholder is replaced by the first real standby in one step: no
/// commit was acknowledged under it, so the add-then-drop steps protect nothing and only
/// delay the first write on the new master by a round trip through its keeper.
#[test]
fn sync_a_placeholder_only_set_is_replaced_at_once() {
    let mut w = cluster(sync_spec(1, 1), 3);
    let old = w.master().to_string();
    w.keeper("k0").alive = false;
    assert!(w.run_until(30, |w| w.master() != old));
    let master = w.master().to_string();
    let mut seen = Vec::new();
    for _ in 0..30 {
        w.step(S);
        let set = w.cd.dbs[&master].spec.synchronous_standbys.clone();
        let done = !set.is_empty() && !set.contains(&PLACEHOLDER_STANDBY.to_string());
        seen.push(set);
        if done {
            break;
        }
    }
    assert!(
        seen.last()
            .is_some_and(|s| !s.contains(&PLACEHOLDER_STANDBY.to_string())),
        "{seen:?}"
    );
    assert!(
        seen.iter().all(|s| s.len() == 1),
        "never the placeholder and a standby together: {seen:?}"
    );
}

#[test]
fn sync_a_keeper_that_cannot_be_a_synchronous_replica_is_not_chosen() {
    let mut w = World::new(sync_spec(1, 1));
    let k0 = KeeperSim {
        priority: 9,
        ..Default::default()
    };
    w.keepers.insert("k0".into(), k0);
    let k1 = KeeperSim {
        can_be_sync: Some(false),
        priority: 5,
        ..Default::default()
    };
    w.keepers.insert("k1".into(), k1);
    w.keepers.insert("k2".into(), KeeperSim::default());
    w.add_proxy("p0");
    assert!(w.run_until(100, |w| w.settled()));
    let set = w.cd.dbs[w.master()].spec.synchronous_standbys.clone();
    assert_eq!(set, [db_uid(&w, "k2")]);
}

#[test]
fn sync_turning_synchronous_replication_off_clears_the_set() {
    let mut w = cluster(sync_spec(1, 2), 3);
    w.cd.cluster.spec.synchronous_replication = Some(false);
    w.step(S);
    let m = &w.cd.dbs[w.master()];
    assert!(!m.spec.synchronous_replication);
    assert!(m.spec.synchronous_standbys.is_empty());
}

// ---- switchover ----

fn request(w: &World, keeper: &str) -> SwitchoverRequest {
    SwitchoverRequest {
        target_keeper_uid: keeper.into(),
        requested_at: w.now,
    }
}

#[test]
fn switchover_fences_stops_the_old_master_and_promotes_after_replay() {
    let mut w = cluster(test_spec(), 3);
    let old = w.master().to_string();
    let target = db_uid(&w, "k2");
    let generation = w.cd.proxy.generation;
    w.keeper("k2").replicates = false;
    w.write(100);
    w.switchover = Some(request(&w, "k2"));
    w.step(S);
    // First the proxies drain: fenced with the hint, the old master still runs.
    let st = w.cd.cluster.status.switchover.clone().expect("status");
    assert_eq!(st.phase, SwitchoverPhase::Draining);
    assert_eq!(w.proxy_master(), "");
    assert!(w.cd.proxy.spec.drain);
    assert!(w.cd.proxy.generation > generation);
    assert_eq!(w.cd.dbs[&old].spec.role, Some(DbRole::Master));
    // Once they report the generation, the old master is stopped.
    w.step(S);
    let st = w.cd.cluster.status.switchover.clone().expect("status");
    assert_eq!(st.phase, SwitchoverPhase::Stopping);
    assert_eq!(w.cd.dbs[&old].spec.role, Some(DbRole::Standby));
    w.run(5);
    assert_eq!(
        w.master(),
        old,
        "target has not replayed the old master's WAL"
    );
    w.keeper("k2").replicates = true;
    // Catch up with the stopped master's position.
    let pos = w.keepers["k0"].xlog;
    w.keeper("k2").xlog = pos;
    assert!(w.run_until(10, |w| w.master() == target));
    let st = w.cd.cluster.status.switchover.clone().expect("status");
    assert_eq!(st.phase, SwitchoverPhase::Completed);
    assert_eq!(st.stop_position, pos);
    w.switchover = None;
    assert!(w.run_until(20, |w| w.settled()));
    assert!(!w.cd.proxy.spec.drain, "the hint goes with the new master");
}

/// The old master's keeper reports its clean stop (the shutdown checkpoint) right after
/// stopping it: the target is promoted once it has replayed that far, while the old master
/// is still being resynced (a base backup of a big database takes long), and not before.
#[test]
fn switchover_promotes_on_the_old_masters_clean_stop_not_after_its_resync() {
    let mut w = cluster(test_spec(), 3);
    let old = w.master().to_string();
    let old_keeper = w.master_keeper();
    let target = db_uid(&w, "k2");
    w.write(100);
    w.switchover = Some(request(&w, "k2"));
    w.step(S);
    w.step(S);
    let st = w.cd.cluster.status.switchover.clone().expect("status");
    assert_eq!(st.phase, SwitchoverPhase::Stopping);
    // Stopped cleanly, its resync never ends here; its WAL ends past what k2 replayed.
    let checkpoint = w.keepers[&old_keeper].xlog + 40;
    let k = w.keeper(&old_keeper);
    k.converges = false;
    k.pg_healthy = false;
    k.shutdown_checkpoint = checkpoint;
    w.run(5);
    assert_eq!(
        w.master(),
        old,
        "k2 has not replayed the shutdown checkpoint"
    );
    w.keeper("k2").replicates = false;
    w.keeper("k2").xlog = checkpoint;
    assert!(w.run_until(10, |w| w.master() == target));
    let st = w.cd.cluster.status.switchover.clone().expect("status");
    assert_eq!(st.phase, SwitchoverPhase::Completed);
    assert_eq!(st.stop_position, checkpoint);
    assert!(
        !health::converged(&w.cd.dbs[&old]),
        "promoted before the old master rejoined"
    );
}

/// The drain's generation fences the proxies for the promotion too when each reported it
/// with the target out of its read-only pool: the promotion bumps no generation, so the new
/// master is published without another round of acknowledgements from every proxy. An
/// older proxy with a read-only listener (no `target_out_at_drain`) still gets the
/// promotion's own generation, and the master is published only once it reported that.
#[test]
fn a_switchover_promotes_in_the_drains_generation_unless_an_older_read_only_proxy_needs_one() {
    for (read_only, out_at_drain, own_generation) in [
        (false, false, false),
        (true, true, false),
        (true, false, true),
    ] {
        let case = format!("read-only {read_only}, out at drain {out_at_drain}");
        let mut w = cluster(test_spec(), 3);
        let p0 = w.proxies.get_mut("p0").expect("p0");
        (p0.read_only, p0.target_out_at_drain) = (read_only, out_at_drain);
        let target = db_uid(&w, "k2");
        w.switchover = Some(request(&w, "k2"));
        w.step(S);
        let drained = w.cd.proxy.generation;
        assert!(w.run_until(20, |w| w.master() == target), "{case}");
        assert_eq!(w.cd.proxy.generation > drained, own_generation, "{case}");
        let promoted = w.cd.proxy.generation;
        w.proxies.get_mut("p0").expect("p0").slow = true;
        w.step(S);
        assert_eq!(
            w.proxy_master() == target,
            !own_generation,
            "{case}: published before p0 reported the promotion's generation"
        );
        w.proxies.get_mut("p0").expect("p0").slow = false;
        assert!(w.run_until(20, |w| w.proxy_master() == target), "{case}");
        assert_eq!(w.cd.proxy.generation, promoted, "{case}");
    }
}

/// A proxy that does not report the drain's generation (slow, or gone) holds the old
/// master's stop back for proxyTimeout at most; the new master is still published only
/// after every enabled proxy acked (or expired), as for any master change.
#[test]
fn a_proxy_that_does_not_drain_delays_the_stop_by_proxy_timeout_at_most() {
    let mut w = cluster(test_spec(), 2);
    let old = w.master().to_string();
    let target = db_uid(&w, "k1");
    w.proxies.get_mut("p0").expect("p0").slow = true;
    w.switchover = Some(request(&w, "k1"));
    w.step(S);
    let timeout = w.cd.cluster.spec.proxy_timeout();
    let started = w.now;
    assert!(w.run_until(30, |w| w.cd.dbs[&old].spec.role == Some(DbRole::Standby)));
    let waited = w.now.since(started);
    assert!(
        waited >= timeout,
        "stopped after {waited} < proxyTimeout {timeout}"
    );
    assert!(
        waited.0 <= timeout.0 + 2_000_000_000,
        "stopped after {waited}"
    );
    w.proxies.get_mut("p0").expect("p0").slow = false;
    assert!(w.run_until(40, |w| w.proxy_master() == target));
}

#[test]
fn switchover_to_an_ineligible_or_unknown_keeper_is_refused() {
    let mut w = cluster(sync_spec(1, 1), 3);
    let master = w.master().to_string();
    let sync = w.cd.dbs[&master].spec.synchronous_standbys[0].clone();
    let not_sync =
        w.cd.dbs
            .values()
            .find(|d| d.uid != master && d.uid != sync)
            .map(|d| d.spec.keeper_uid.clone())
            .expect("async standby");
    for target in ["nobody", "k0", not_sync.as_str()] {
        w.switchover = Some(request(&w, target));
        w.step(S);
        let st = w.cd.cluster.status.switchover.clone().expect("status");
        assert_eq!(st.phase, SwitchoverPhase::Failed, "{target}");
        assert_eq!(w.master(), master);
        w.now = w.now.plus(S);
    }
}

#[test]
fn switchover_not_done_within_convergence_timeout_restores_the_old_master() {
    let mut w = cluster(test_spec(), 2);
    let old = w.master().to_string();
    w.keeper("k1").replicates = false;
    w.write(100);
    w.switchover = Some(request(&w, "k1"));
    w.run(35);
    let st = w.cd.cluster.status.switchover.clone().expect("status");
    assert_eq!(st.phase, SwitchoverPhase::Failed);
    assert_eq!(w.master(), old);
    assert_eq!(w.cd.dbs[&old].spec.role, Some(DbRole::Master));
    w.keeper("k1").replicates = true;
    assert!(w.run_until(20, |w| w.settled()));
}

// ---- spec changes ----

#[test]
fn a_pg_parameter_change_reaches_every_db_with_a_new_generation() {
    let mut w = cluster(test_spec(), 3);
    let gens: Vec<i64> = w.cd.dbs.values().map(|d| d.generation).collect();
    w.cd.cluster
        .spec
        .pg_parameters
        .insert("work_mem".into(), "64MB".into());
    w.step(S);
    for (db, g) in w.cd.dbs.values().zip(gens) {
        assert_eq!(db.generation, g + 1);
        assert_eq!(db.spec.pg_parameters["work_mem"], "64MB");
    }
}

#[test]
fn an_invalid_spec_changes_nothing_and_says_why() {
    let mut w = cluster(test_spec(), 2);
    w.cd.cluster.spec.max_synchronous_standbys = Some(0);
    let before = w.cd.clone();
    w.keeper("k0").alive = false;
    w.run(20);
    assert_eq!(
        w.cd.dbs.keys().collect::<Vec<_>>(),
        before.dbs.keys().collect::<Vec<_>>()
    );
    assert_eq!(w.master(), before.cluster.status.master);
    assert!(w.has_reason(ReasonKind::BadSpec));
}

#[test]
fn nothing_changes_in_a_settled_cluster_without_new_facts() {
    let w = cluster(test_spec(), 3);
    let obs = w.observations();
    let (cd, _, _) = decide(&w.cd, &w.mem, &obs, w.now);
    assert_eq!(cd, w.cd, "no write when nothing happened");
}

#[test]
fn a_stopped_master_reporting_zeroes_keeps_its_last_known_timeline() {
    // A keeper whose PostgreSQL is down (e.g. its data dir was wiped) reports timeline 0 and
    // WAL position 0: the master's last known facts must stay the reference.
    let mut w = cluster(test_spec(), 2);
    w.keeper("k0").pg_healthy = false;
    w.keeper("k0").timeline = 0;
    w.keeper("k0").xlog = 0;
    w.run(12);
    assert_eq!(w.master_keeper(), "k1", "{:#?}", w.reasons);
}

// ---- maintenance pause ----

fn pause(w: &World, secs: Option<i64>) -> crate::model::Pause {
    crate::model::Pause {
        since: w.now,
        until: secs.map(|s| w.now.plus(GoDuration::from_secs(s))),
        reason: "upgrade".into(),
    }
}

#[test]
fn a_pause_prevents_a_failover_and_resume_lets_it_happen() {
    let mut w = cluster(test_spec(), 3);
    let old = w.master_keeper();
    w.pause = Some(pause(&w, None));
    let dbs = w.cd.dbs.len();
    w.keeper(&old).alive = false;
    let mut details = Vec::new();
    for _ in 0..60 {
        w.step(S);
        details.extend(w.reasons.iter().map(|r| r.detail.clone()));
    }
    assert_eq!(w.master_keeper(), old, "no failover while paused");
    assert_eq!(
        w.proxy_master(),
        w.master(),
        "the proxies keep their master"
    );
    assert!(
        details
            .iter()
            .any(|d| d.contains("no failover while paused") && d.contains("upgrade")),
        "{details:#?}"
    );
    // Nothing else changes either: no db is removed or rebuilt elsewhere.
    assert_eq!(w.cd.dbs.len(), dbs);
    w.pause = None;
    let new = kill_master_and_fail_over(&mut w);
    assert_ne!(new, old, "resume lets the failover happen");
}

#[test]
fn a_pause_with_a_deadline_ends_by_itself() {
    let mut w = cluster(test_spec(), 3);
    let old = w.master_keeper();
    w.pause = Some(pause(&w, Some(30)));
    w.keeper(&old).alive = false;
    w.run(25);
    assert_eq!(w.master_keeper(), old, "paused for 30 s");
    assert!(
        w.run_until(40, |w| w.master_keeper() != old
            && w.proxy_master() == w.master()),
        "the pause expired and the failover happened: {:#?}",
        w.reasons
    );
}

#[test]
fn a_pause_holds_back_a_requested_switchover_and_standby_changes() {
    let mut w = cluster(test_spec(), 3);
    let master = w.master_keeper();
    let standbys: Vec<String> = ["k0", "k1", "k2"]
        .into_iter()
        .filter(|k| *k != master)
        .map(String::from)
        .collect();
    let (target, dying) = (standbys[0].clone(), standbys[1].clone());
    w.pause = Some(pause(&w, None));
    w.switchover = Some(crate::model::SwitchoverRequest {
        target_keeper_uid: target.clone(),
        requested_at: w.now,
    });
    // A standby's keeper dies: while paused its db is not replaced on a free keeper.
    w.keepers.insert("k9".into(), KeeperSim::default());
    let before = w.cd.dbs.clone();
    w.keeper(&dying).alive = false;
    w.run(40);
    assert_eq!(w.master_keeper(), master, "no switchover while paused");
    assert!(w.db_of("k9").is_none(), "no new standby while paused");
    assert_eq!(
        w.cd.dbs.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
}

/// Failsafe mode, after a store outage: a sentinel with a fresh memory (a new leader, or
/// the daemon forgetting after the outage) gives the enabled proxies a grace, so a proxy whose lease expired in the outage (it
/// kept routing on the master's hold) is not disabled before it writes its info again.
#[test]
fn after_a_store_outage_enabled_proxies_keep_their_place_for_the_grace() {
    let mut w = cluster(test_spec(), 2);
    w.add_proxy("p1");
    w.proxies.get_mut("p1").expect("p1").lease = true;
    w.run(2);
    assert_eq!(w.cd.proxy.spec.enabled_proxies, ["p0", "p1"]);
    // The outage took p1's key (its lease) with it; p1 has not written it back yet.
    w.proxies.get_mut("p1").expect("p1").alive = false;
    w.proxy_infos.remove("p1");
    w.cd.cluster.spec.failsafe_mode = Some(true);
    w.mem = SentinelMemory::default();
    let mut off = w.clone();
    w.run(4);
    assert_eq!(
        w.cd.proxy.spec.enabled_proxies,
        ["p0", "p1"],
        "within the grace"
    );
    w.run(17); // 2 x proxyTimeout (10 s) from the first round
    assert_eq!(w.cd.proxy.spec.enabled_proxies, ["p0"], "past the grace");
    // Failsafe mode off: a new leader drops it at once, as before.
    off.cd.cluster.spec.failsafe_mode = None;
    off.run(4);
    assert_eq!(off.cd.proxy.spec.enabled_proxies, ["p0"]);
}

/// Failsafe mode: only a db of the clusterdata the master last reported holding may
/// replace it (its keeper was asked for every acknowledgement the master held on), even
/// when another is further ahead.
#[test]
fn failsafe_elects_only_among_the_dbs_the_master_reported() {
    let setup = |listed: bool| {
        let mut w = with_a_lagging_standby(failsafe_spec(), "k1");
        if listed {
            let keep = vec![db_uid(&w, "k0"), db_uid(&w, "k1")];
            let m = w.master().to_string();
            w.cd.dbs.get_mut(&m).expect("master db").status.failsafe_dbs = keep;
        }
        w
    };
    let mut w = setup(true);
    assert_eq!(kill_master_and_fail_over(&mut w), "k1", "k2 was not listed");
    let mut w = setup(false);
    assert_eq!(
        kill_master_and_fail_over(&mut w),
        "k2",
        "no list: the usual rule"
    );
}

/// Failsafe mode: the best candidate reports it acknowledged the old master; the sentinel
/// elects it only once that promise has ended (not a worse candidate meanwhile).
#[test]
fn failsafe_waits_for_the_best_candidates_promise() {
    let mut w = with_a_lagging_standby(failsafe_spec(), "k2");
    let old = w.master().to_string();
    w.keeper("k1").failsafe = Some(crate::model::FailsafeReport {
        promised_to: old.clone(),
        promised_for_ms: 60_000,
        ..Default::default()
    });
    w.keeper("k0").alive = false;
    w.run(30);
    assert_eq!(
        w.master_keeper(),
        "k0",
        "no election while the best candidate is promised"
    );
    assert!(
        w.reasons
            .iter()
            .any(|r| r.detail.contains("acknowledged master")),
        "{:#?}",
        w.reasons
    );
    w.keeper("k1").failsafe = None;
    assert!(
        w.run_until(30, |w| w.master_keeper() == "k1"),
        "{:#?}",
        w.reasons
    );
}
