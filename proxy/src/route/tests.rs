//! The route table: desired routes from clusterdata, swaps, severing, the read-only pool.

use super::*;

fn cd(master: &str, enabled: &[&str], generation: i64) -> ClusterData {
    let doc = serde_json::json!({
        "formatVersion": 1,
        "cluster": {"uid": "c", "spec": {"initMode": "new"}},
        "dbs": {
            "db1": {"uid": "db1", "status": {"listenAddress": "127.0.0.1", "port": "5433"}},
            "db2": {"uid": "db2", "status": {"listenAddress": "::1", "port": "5434"}},
            "db3": {"uid": "db3", "status": {"listenAddress": "", "port": "5435"}}
        },
        "proxy": {"generation": generation, "spec": {"masterDbUid": master, "enabledProxies": enabled}}
    });
    ClusterData::from_json(doc.to_string().as_bytes()).expect("doc")
}

#[test]
fn desired_route_table() {
    let cases: Vec<(&str, Option<ClusterData>, Desired)> = vec![
        (
            "no document",
            None,
            Desired {
                generation: 0,
                master: Err(NoMaster::NoCluster),
                replicas: Vec::new(),
                drain: false,
                next: None,
            },
        ),
        (
            "enabled",
            Some(cd("db1", &["p1"], 4)),
            Desired {
                generation: 4,
                master: Ok("127.0.0.1:5433".into()),
                replicas: Vec::new(),
                drain: false,
                next: None,
            },
        ),
        (
            "ipv6",
            Some(cd("db2", &["p1"], 4)),
            Desired {
                generation: 4,
                master: Ok("[::1]:5434".into()),
                replicas: Vec::new(),
                drain: false,
                next: None,
            },
        ),
        (
            "not enabled",
            Some(cd("db1", &["p2"], 4)),
            Desired {
                generation: 0,
                master: Err(NoMaster::NotEnabled),
                replicas: Vec::new(),
                drain: false,
                next: None,
            },
        ),
        (
            "fencing: empty master",
            Some(cd("", &["p1"], 5)),
            Desired {
                generation: 5,
                master: Err(NoMaster::NoMasterDb),
                replicas: Vec::new(),
                drain: false,
                next: None,
            },
        ),
        (
            "unknown db",
            Some(cd("dbX", &["p1"], 5)),
            Desired {
                generation: 5,
                master: Err(NoMaster::NoMasterDb),
                replicas: Vec::new(),
                drain: false,
                next: None,
            },
        ),
        (
            "db without address",
            Some(cd("db3", &["p1"], 5)),
            Desired {
                generation: 5,
                master: Err(NoMaster::NoMasterDb),
                replicas: Vec::new(),
                drain: false,
                next: None,
            },
        ),
    ];
    for (name, doc, want) in cases {
        assert_eq!(desired(doc.as_ref(), "p1"), want, "{name}");
    }
}

#[test]
fn next_master_while_there_is_none() {
    use control::model::{SwitchoverPhase, SwitchoverStatus, Timestamp};
    let next = |master: &str, elected: &str, switchover: Option<(SwitchoverPhase, &str)>| {
        let mut c = cd(master, &["p1"], 5);
        c.cluster.status.master = elected.into();
        c.cluster.status.switchover = switchover.map(|(phase, target)| SwitchoverStatus {
            target_keeper_uid: "k".into(),
            requested_at: Timestamp::now(),
            phase,
            old_master_db_uid: elected.into(),
            target_db_uid: target.into(),
            stop_position: 0,
            started_at: Timestamp::now(),
            reason: String::new(),
        });
        desired(Some(&c), "p1").next
    };
    let at = |a: &str| Some(a.to_string());
    // A failover fences the proxies in the write that elects: the elected master.
    assert_eq!(next("", "db1", None), at("127.0.0.1:5433"));
    // A switchover's target until it is promoted, whatever the status still names.
    for phase in [SwitchoverPhase::Draining, SwitchoverPhase::Stopping] {
        assert_eq!(next("", "db1", Some((phase, "db2"))), at("[::1]:5434"));
    }
    for phase in [SwitchoverPhase::Completed, SwitchoverPhase::Failed] {
        assert_eq!(next("", "db1", Some((phase, "db2"))), at("127.0.0.1:5433"));
    }
    // Routed: nothing to prepare. Unknown or address-less dbs: nowhere.
    assert_eq!(
        next("db1", "db1", Some((SwitchoverPhase::Draining, "db2"))),
        None
    );
    assert_eq!(next("", "dbX", None), None);
    assert_eq!(next("", "db3", None), None);
    // Not enabled: the proxy routes nothing and prepares nothing.
    let mut c = cd("", &["p2"], 5);
    c.cluster.status.master = "db1".into();
    assert_eq!(desired(Some(&c), "p1").next, None);
}

#[test]
fn go_encoded_document_without_master_field() {
    // Go's omitempty drops an empty masterDbUid entirely.
    let doc = r#"{"formatVersion":1,"cluster":{},"proxy":{"generation":3,"spec":{"enabledProxies":["p1"]}}}"#;
    let cd = ClusterData::from_json(doc.as_bytes()).expect("doc");
    assert_eq!(desired(Some(&cd), "p1").master, Err(NoMaster::NoMasterDb));
}

#[test]
fn master_change_severs_same_master_keeps_sessions() {
    let routes = Routes::default();
    assert!(
        routes.apply(1, Ok("a:1".into())).is_none(),
        "from no master: nothing to sever"
    );
    let first = routes.load();
    assert!(routes.apply(2, Ok("a:1".into())).is_none(), "same master");
    let second = routes.load();
    assert_eq!(second.generation, 2);
    assert!(!first.token.is_cancelled());
    assert!(second.token.is_cancelled() == first.token.is_cancelled());
    let (old, _) = routes.apply(3, Err(NoMaster::NoMasterDb)).expect("severed");
    assert!(old.token.is_cancelled() && first.token.is_cancelled());
    assert!(routes.load().master.is_err());
    assert!(
        routes.apply(4, Err(NoMaster::StoreLost)).is_none(),
        "none to none"
    );
    assert_eq!(routes.load().generation, 4);
    routes.apply(5, Ok("b:1".into()));
    let (old, _) = routes.apply(6, Ok("c:1".into())).expect("master moved");
    assert_eq!(old.master.as_deref().ok(), Some("b:1"));
    assert!(old.token.is_cancelled());
}

fn ro_doc() -> ClusterData {
    let standby = |uid: &str, keeper: &str, follows: &str, pos: u64, healthy: bool, port: &str| {
        serde_json::json!({"uid": uid, "spec": {"keeperUID": keeper, "role": "standby",
            "followConfig": {"type": "internal", "dbuid": follows}},
            "status": {"healthy": healthy, "listenAddress": "127.0.0.1", "port": port,
                       "xLogPos": pos}})
    };
    let doc = serde_json::json!({
        "formatVersion": 1,
        "cluster": {"uid": "c", "spec": {"initMode": "new"}, "status": {"master": "m"}},
        "keepers": {
            "km": {"uid": "km", "status": {"healthy": true}},
            "k1": {"uid": "k1", "status": {"healthy": true}},
            "k2": {"uid": "k2", "status": {"healthy": true}},
            "k3": {"uid": "k3", "status": {"healthy": true}},
            "k4": {"uid": "k4", "status": {"healthy": false}},
            "k5": {"uid": "k5", "status": {"healthy": true}}
        },
        "dbs": {
            "m": {"uid": "m", "spec": {"keeperUID": "km", "role": "master"},
                  "status": {"healthy": true, "listenAddress": "127.0.0.1", "port": "5000",
                             "xLogPos": 10000}},
            "s1": standby("s1", "k1", "m", 9990, true, "5001"),
            "s2": standby("s2", "k2", "m", 5000, true, "5002"),
            "s3": standby("s3", "k3", "m", 10000, false, "5003"),
            "s4": standby("s4", "k4", "m", 10000, true, "5004"),
            "s5": standby("s5", "k5", "other", 10000, true, "5005")
        },
        "proxy": {"generation": 2, "spec": {"masterDbUid": "m", "enabledProxies": ["p1"]}}
    });
    ClusterData::from_json(doc.to_string().as_bytes()).expect("doc")
}

#[test]
fn the_read_only_pool_has_healthy_standbys_of_the_master_within_the_lag() {
    let cd = ro_doc();
    let pool = |lag| {
        desired_with_replicas(Some(&cd), "p1", lag)
            .replicas
            .into_iter()
            .map(|r| r.db_uid)
            .collect::<Vec<_>>()
    };
    // s2 lags 5000 bytes; s3 is unhealthy; s4's keeper is; s5 follows another db.
    assert_eq!(pool(Some(100)), ["s1"]);
    assert_eq!(pool(Some(5000)), ["s1", "s2"]);
    assert!(
        pool(None).is_empty(),
        "no pool without the read-only listener"
    );
    assert!(desired_with_replicas(Some(&cd), "p9", Some(5000))
        .replicas
        .is_empty());
    // The elected master leaves the pool in the write that elects it, before its
    // promotion: a read-only session never lands on a db about to take writes.
    let mut promoted = cd.clone();
    promoted.cluster.status.master = "s1".into();
    assert!(desired_with_replicas(Some(&promoted), "p1", Some(u64::MAX))
        .replicas
        .iter()
        .all(|r| r.db_uid != "s1"));
    // A switchover's target leaves it in the drain's generation, before the promotion
    // (which then fences no more), and comes back if the switchover fails.
    use control::model::{SwitchoverPhase, SwitchoverStatus, Timestamp};
    let switching = |phase| {
        let mut c = cd.clone();
        c.cluster.status.switchover = Some(SwitchoverStatus {
            target_keeper_uid: "k1".into(),
            requested_at: Timestamp::now(),
            phase,
            old_master_db_uid: "m".into(),
            target_db_uid: "s1".into(),
            stop_position: 0,
            started_at: Timestamp::now(),
            reason: String::new(),
        });
        (desired_with_replicas(Some(&c), "p1", Some(5000))
            .replicas
            .into_iter())
        .map(|r| r.db_uid)
        .collect::<Vec<_>>()
    };
    assert_eq!(switching(SwitchoverPhase::Draining), ["s2"]);
    assert_eq!(switching(SwitchoverPhase::Stopping), ["s2"]);
    assert_eq!(switching(SwitchoverPhase::Failed), ["s1", "s2"]);
}

#[test]
fn a_standby_leaving_the_pool_is_severed_and_those_staying_keep_their_sessions() {
    let t = |uid: &str, port: u16| ReplicaTarget {
        db_uid: uid.into(),
        addr: format!("127.0.0.1:{port}"),
    };
    let routes = Routes::default();
    routes.apply_with_replicas(1, Ok("m:1".into()), &[t("s1", 1), t("s2", 2)], None);
    let first = routes.load();
    let (s1, s2) = (first.replicas[0].clone(), first.replicas[1].clone());
    let (old_master, severed) =
        routes.apply_with_replicas(1, Ok("m:1".into()), &[t("s1", 1)], None);
    assert!(old_master.is_none(), "the master's sessions go on");
    assert_eq!(severed, 0, "no session was open");
    assert!(s2.token.is_cancelled(), "s2 left: its sessions are cut");
    assert!(!s1.token.is_cancelled(), "s1 stays");
    let now = routes.load();
    assert!(Arc::ptr_eq(&now.replicas[0], &s1));
    assert!(!now.token.is_cancelled() && Arc::ptr_eq(&now.sockets, &first.sockets));
    // Store lost: the pool empties with the master.
    routes.apply_with_replicas(1, Err(NoMaster::StoreLost), &[], None);
    assert!(s1.token.is_cancelled() && routes.load().replicas.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_standby_leaving_while_not_fenced_drains_then_is_severed_at_the_timeout() {
    let t = |uid: &str, port: u16| ReplicaTarget {
        db_uid: uid.into(),
        addr: format!("127.0.0.1:{port}"),
    };
    let routes = Routes::default();
    let drain = Some(std::time::Duration::from_secs(10));
    routes.apply_with_replicas(1, Ok("m:1".into()), &[t("s1", 1), t("s2", 2)], drain);
    let s2 = routes.load().replicas[1].clone();
    let session = s2.sessions.token();
    let (_, severed) = routes.apply_with_replicas(1, Ok("m:1".into()), &[t("s1", 1)], drain);
    assert_eq!(severed, 0, "nothing cut at once");
    assert!(s2.drain.is_cancelled() && !s2.token.is_cancelled());
    assert!(s2.sessions.is_closed(), "no new session on it");
    // A session still open at the timeout is cut then.
    tokio::time::timeout(std::time::Duration::from_secs(11), s2.token.cancelled())
        .await
        .expect("severed at the drain timeout");
    drop(session);
    // One that ends before the timeout ends the drain early.
    let routes = Routes::default();
    routes.apply_with_replicas(1, Ok("m:1".into()), &[t("s1", 1)], drain);
    let s1 = routes.load().replicas[0].clone();
    let session = s1.sessions.token();
    routes.apply_with_replicas(1, Ok("m:1".into()), &[], drain);
    let before = tokio::time::Instant::now();
    drop(session);
    s1.token.cancelled().await;
    assert!(before.elapsed() < std::time::Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn a_promoted_standby_is_cut_at_a_failover_and_drains_with_the_master_at_a_switchover() {
    let t = |uid: &str, port: u16| ReplicaTarget {
        db_uid: uid.into(),
        addr: format!("127.0.0.1:{port}"),
    };
    let drain = Some(std::time::Duration::from_secs(10));
    // Failover to s1: its read-only sessions are cut in the swap itself.
    let routes = Routes::default();
    routes.apply_with_replicas(1, Ok("m:1".into()), &[t("s1", 1), t("s2", 2)], drain);
    let s1 = routes.load().replicas[0].clone();
    routes.apply_with_replicas(2, Ok("127.0.0.1:1".into()), &[t("s2", 2)], drain);
    assert!(
        s1.token.is_cancelled(),
        "cut before the generation is reported"
    );
    // Switchover to s1: they drain with the old master's, and go with its sever.
    let routes = Routes::default();
    routes.apply_with_replicas(1, Ok("m:1".into()), &[t("s1", 1), t("s2", 2)], drain);
    let s1 = routes.load().replicas[0].clone();
    let session = s1.sessions.token();
    let (old, _) = routes.apply_draining(2, Ok("127.0.0.1:1".into()), &[t("s2", 2)], drain);
    let old = old.expect("the old master drains");
    assert!(s1.drain.is_cancelled() && !s1.token.is_cancelled());
    let closed = old.sessions_closed();
    tokio::pin!(closed);
    assert!(
        futures::poll!(closed.as_mut()).is_pending(),
        "the drain waits for the promoted standby's read-only session"
    );
    drop(session);
    closed.await;
    old.sever();
    assert!(s1.token.is_cancelled());
    // A standby still draining out of the pool that is then elected is cut at once.
    let routes = Routes::default();
    routes.apply_with_replicas(1, Ok("m:1".into()), &[t("s1", 1), t("s2", 2)], drain);
    let s1 = routes.load().replicas[0].clone();
    let _session = s1.sessions.token();
    routes.apply_with_replicas(1, Ok("m:1".into()), &[t("s2", 2)], drain);
    assert!(!s1.token.is_cancelled(), "draining");
    routes.apply_with_replicas(2, Ok("127.0.0.1:1".into()), &[t("s2", 2)], drain);
    assert!(s1.token.is_cancelled(), "elected: cut");
}

#[test]
fn pick_is_least_connections_and_rotates_among_equals() {
    let t = |uid: &str, port: u16| ReplicaTarget {
        db_uid: uid.into(),
        addr: format!("127.0.0.1:{port}"),
    };
    let routes = Routes::default();
    routes.apply_with_replicas(1, Ok("m:1".into()), &[t("s1", 1), t("s2", 2)], None);
    let r = routes.load();
    let picks: Vec<String> = (0..4)
        .map(|_| r.pick_replica().expect("pick").db_uid.clone())
        .collect();
    assert!(picks.contains(&"s1".to_string()) && picks.contains(&"s2".to_string()));
    r.replicas[0].active.store(3, Ordering::Relaxed);
    for _ in 0..4 {
        assert_eq!(r.pick_replica().expect("pick").db_uid, "s2");
    }
    assert!(
        Route::new(0, Err(NoMaster::Starting), Arc::from(Vec::new()))
            .pick_replica()
            .is_none()
    );
}
