//! Replication and configuration scenarios (scenarios.md, "Replication and
//! configuration"). Each ends with the acknowledged-write checker and the healthy check.

use e2e::{serial, Checker, Cluster, Opts};
use serde_json::{json, Value};
use std::time::Duration;

const MIN: Duration = Duration::from_secs(60);

fn opts(keepers: usize, spec: Value) -> Opts {
    Opts {
        keepers,
        spec,
        ..Default::default()
    }
}

async fn wait_setting(c: &Cluster, uid: &str, sql: &str, want: &str) {
    c.wait_for(&format!("{sql} = {want} on {uid}"), MIN, async || {
        (c.query(uid, sql).await.ok()? == want).then_some(())
    })
    .await
    .expect("setting");
}

async fn replicate(sync: bool) {
    let spec = if sync {
        json!({"synchronousReplication": true, "minSynchronousStandbys": 1, "maxSynchronousStandbys": 1})
    } else {
        json!({})
    };
    let c = Cluster::start(opts(2, spec)).await.expect("cluster");
    let checker = Checker::start(&c);
    let m = c.master().await.expect("master");
    let s = if m == "k1" { "k2" } else { "k1" };
    c.exec_via_proxy("CREATE TABLE rep AS SELECT 7 AS v")
        .await
        .expect("write");
    wait_setting(&c, s, "SELECT v::text FROM rep", "7").await;
    let state = c
        .query(
            &m,
            "SELECT string_agg(sync_state, ',') FROM pg_stat_replication",
        )
        .await
        .expect("state");
    assert_eq!(state, if sync { "sync" } else { "async" });
    c.finish(&format!("replicate_sync_{sync}"), checker)
        .await
        .expect("invariants");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_and_standby_replicate_async() {
    let _s = serial().await;
    replicate(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_and_standby_replicate_sync() {
    let _s = serial().await;
    replicate(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_parameters_reload_restart_only_with_automatic_restart_and_a_bad_one_recovers() {
    let _s = serial().await;
    let c = Cluster::start(opts(2, json!({}))).await.expect("cluster");
    let checker = Checker::start(&c);
    let m = c.master().await.expect("master");
    // A reloadable parameter reaches every db.
    c.update_spec(|s| s["pgParameters"]["work_mem"] = json!("7MB"))
        .await
        .expect("spec");
    for k in &c.keepers {
        wait_setting(&c, &k.uid, "SHOW work_mem", "7MB").await;
    }
    // A parameter needing a restart: pending until automaticPgRestart.
    let before = c.query(&m, "SHOW max_connections").await.expect("show");
    c.update_spec(|s| s["pgParameters"]["max_connections"] = json!("77"))
        .await
        .expect("spec");
    wait_setting(
        &c,
        &m,
        "SELECT pending_restart::text FROM pg_settings WHERE name = 'max_connections'",
        "true",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        c.query(&m, "SHOW max_connections").await.expect("show"),
        before
    );
    c.update_spec(|s| s["automaticPgRestart"] = json!(true))
        .await
        .expect("spec");
    wait_setting(&c, &m, "SHOW max_connections", "77").await;
    // A bad value: PostgreSQL keeps running on its last good config; fixing the spec
    // recovers.
    c.update_spec(|s| s["pgParameters"]["work_mem"] = json!("lots"))
        .await
        .expect("spec");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        checker.wait_acks(20, MIN).await,
        "writes go on with a bad parameter"
    );
    c.update_spec(|s| s["pgParameters"]["work_mem"] = json!("9MB"))
        .await
        .expect("spec");
    wait_setting(&c, &m, "SHOW work_mem", "9MB").await;
    let out = c
        .finish("pg_parameters", checker)
        .await
        .expect("invariants");
    assert_eq!(out.master, m, "no failover");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_wal_keep_size_floor_and_alter_system_fails() {
    let _s = serial().await;
    let c = Cluster::start(opts(
        2,
        // fsync on: ALTER SYSTEM fails on fsyncing /dev/null, which fsync=off skips.
        json!({"pgParameters": {"wal_level": "minimal", "wal_keep_size": "1MB", "fsync": "on"}}),
    ))
    .await
    .expect("cluster");
    let checker = Checker::start(&c);
    let m = c.master().await.expect("master");
    assert_eq!(
        c.query(&m, "SHOW wal_level").await.expect("show"),
        "replica"
    );
    assert_eq!(
        c.query(&m, "SHOW wal_keep_size").await.expect("show"),
        "128MB"
    );
    // ALTER SYSTEM fails with an error, as in Go stolon (postgresql.auto.conf points at
    // /dev/null, which PostgreSQL cannot fsync), on the master and on a standby.
    let err = c
        .exec_via_proxy("ALTER SYSTEM SET work_mem = '11MB'")
        .await
        .expect_err("ALTER SYSTEM must fail");
    assert!(
        format!("{err:#}").contains("postgresql.auto.conf"),
        "unexpected error: {err:#}"
    );
    c.exec_via_proxy("SELECT pg_reload_conf()")
        .await
        .expect("reload");
    assert_ne!(c.query(&m, "SHOW work_mem").await.expect("show"), "11MB");
    // A spec change is applied by reload, and ALTER SYSTEM had no effect.
    c.update_spec(|s| s["pgParameters"]["maintenance_work_mem"] = json!("33MB"))
        .await
        .expect("spec");
    wait_setting(&c, &m, "SHOW maintenance_work_mem", "33MB").await;
    assert_ne!(c.query(&m, "SHOW work_mem").await.expect("show"), "11MB");
    c.finish("wal_settings", checker).await.expect("invariants");
}

async fn slots(c: &Cluster, uid: &str) -> String {
    c.query(
        uid,
        "SELECT coalesce(string_agg(slot_name, ',' ORDER BY slot_name), '') FROM pg_replication_slots WHERE slot_name = 'stolon_extra1'",
    )
    .await
    .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn additional_replication_slots_live_on_the_master_only_and_follow_a_failover() {
    let _s = serial().await;
    let mut c = Cluster::start(opts(
        2,
        json!({"additionalMasterReplicationSlots": ["extra1"]}),
    ))
    .await
    .expect("cluster");
    let mut checker = Checker::start(&c);
    let m = c.master().await.expect("master");
    let s = if m == "k1" { "k2" } else { "k1" };
    c.wait_for("extra1 on the master", MIN, async || {
        (slots(&c, &m).await == "stolon_extra1").then_some(())
    })
    .await
    .expect("slot");
    assert_eq!(slots(&c, s).await, "", "not on the standby");
    checker.nemesis();
    c.kill_keeper(&m, true);
    c.wait_master_change(&m, MIN).await.expect("failover");
    c.wait_for("extra1 on the new master", MIN, async || {
        (slots(&c, s).await == "stolon_extra1").then_some(())
    })
    .await
    .expect("slot");
    c.restart_keeper(&m).expect("restart");
    c.update_spec(|sp| sp["additionalMasterReplicationSlots"] = json!([]))
        .await
        .expect("spec");
    c.wait_for("extra1 dropped", MIN, async || {
        (slots(&c, s).await.is_empty()).then_some(())
    })
    .await
    .expect("dropped");
    c.finish("additional_slots", checker)
        .await
        .expect("invariants");
    assert_eq!(
        slots(&c, &m).await,
        "",
        "not on the old master, now a standby"
    );
}

/// Relays 127.0.0.1:listen to 127.0.0.1:to (a port mapping, as a container runtime does).
fn forward(to: u16) -> (u16, tokio::task::JoinHandle<()>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.set_nonblocking(true).expect("nonblocking");
    let port = l.local_addr().expect("addr").port();
    let l = tokio::net::TcpListener::from_std(l).expect("listener");
    let h = tokio::spawn(async move {
        while let Ok((mut a, _)) = l.accept().await {
            tokio::spawn(async move {
                if let Ok(mut b) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }
            });
        }
    });
    (port, h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advertised_address_and_port_differ_from_the_listen_ones() {
    let _s = serial().await;
    // Keepers start without forwarders; each is then restarted advertising a forwarded
    // port (the relays must exist before anyone connects to them).
    let mut c = Cluster::start(opts(2, json!({}))).await.expect("cluster");
    let mut relays = Vec::new();
    for uid in ["k1", "k2"] {
        let (port, h) = forward(c.keeper(uid).port);
        relays.push(h);
        c.restart_keeper_with(uid, |a| {
            a.extend(["--pg-advertise-address".into(), "localhost".into()]);
            a.extend(["--pg-advertise-port".into(), port.to_string()]);
        })
        .expect("restart");
        c.wait_for("the advertised port in the cluster view", MIN, async || {
            let db = c.db_of(uid).await?;
            (db.status.port == Some(port) && db.status.listen_address == "localhost").then_some(())
        })
        .await
        .expect("advertised");
    }
    let checker = Checker::start(&c);
    c.wait_healthy(MIN).await.expect("healthy");
    let m = c.master().await.expect("master");
    let s = if m == "k1" { "k2" } else { "k1" };
    let conninfo = c
        .query(s, "SELECT current_setting('primary_conninfo')")
        .await
        .expect("conninfo");
    assert!(conninfo.contains("host=localhost"), "{conninfo}");
    assert!(
        !conninfo.contains(&format!("port={} ", c.keeper(&m).port)),
        "{conninfo}"
    );
    c.finish("advertised_address", checker)
        .await
        .expect("invariants");
    for h in relays {
        h.abort();
    }
}
