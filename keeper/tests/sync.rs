//! Synchronous replication with a real sentinel and two keepers: the synchronous standby,
//! replication slots (followers, the spec's extra ones, stale `stolon_*` ones dropped,
//! others left alone), a parameter that needs a restart applied by automaticPgRestart, and
//! after a master restart only superuser and replication connect until the synchronous
//! standby is back in sync.

mod common;

use common::*;
use nix::sys::signal::Signal;
use std::time::Duration;

const SPEC: &str = r#"{"initMode": "new", "sleepInterval": "1s", "failInterval": "4s",
    "synchronousReplication": true, "minSynchronousStandbys": 1, "maxSynchronousStandbys": 1,
    "automaticPgRestart": true, "additionalMasterReplicationSlots": ["extra_slot"],
    "pgParameters": {"fsync": "off"}}"#;

async fn slots(port: u16) -> Vec<String> {
    let Ok(c) = connect(port).await else {
        return vec![];
    };
    c.query(
        "SELECT slot_name::text FROM pg_replication_slots ORDER BY 1",
        &[],
    )
    .await
    .map(|rows| rows.iter().map(|r| r.get(0)).collect())
    .unwrap_or_default()
}

async fn app_can_connect(port: u16) -> bool {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .user("app")
        .password("app-pw")
        .dbname("postgres");
    cfg.connect_timeout(Duration::from_secs(2));
    cfg.connect(tokio_postgres::NoTls).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_standby_slots_restart_and_restricted_access() {
    let _serial = serial().await;
    let env = Env::new().await;
    let _sentinel = env.sentinel(SPEC);
    let k1 = env.keeper("k1", &["--priority", "5"]);
    // The first master is k1: init picks among the keepers alive at the time.
    wait_primary(&env, &k1, Duration::from_secs(60)).await;
    let mut k2 = env.keeper("k2", &[]);
    let c = wait_for(
        &env,
        "a synchronous standby",
        Duration::from_secs(90),
        async || {
            let c = connect(k1.port.0).await.ok()?;
            let row = c
                .query_opt(
                    "SELECT 1 FROM pg_stat_replication WHERE sync_state = 'sync'",
                    &[],
                )
                .await
                .ok()?;
            row.map(|_| c)
        },
    )
    .await;
    c.batch_execute("CREATE ROLE app LOGIN PASSWORD 'app-pw'")
        .await
        .expect("role");
    assert!(app_can_connect(k1.port.0).await);

    // Slots: the follower's and the extra one; stale stolon_* dropped, others kept.
    c.batch_execute(
        "SELECT pg_create_physical_replication_slot('stolon_gone'); \
                     SELECT pg_create_physical_replication_slot('user_slot')",
    )
    .await
    .expect("slots");
    let (cd, _) = env.cluster_data().await.expect("cd");
    let standby = cd
        .dbs
        .values()
        .find(|d| d.spec.keeper_uid == "k2")
        .expect("d2")
        .uid
        .clone();
    let mut want = vec![
        "stolon_extra_slot".to_string(),
        format!("stolon_{standby}"),
        "user_slot".into(),
    ];
    // In the order slots() reads them (the uid is random hex).
    want.sort();
    let mut seen = vec![];
    wait_for(
        &env,
        "slots in order",
        Duration::from_secs(20),
        async || {
            let now = slots(k1.port.0).await;
            if now != seen {
                // On a timeout the last of these says what was there instead.
                eprintln!("slots on the master: {now:?} (want {want:?})");
                seen = now;
            }
            (seen == want).then_some(())
        },
    )
    .await;

    // A parameter that needs a restart, with automaticPgRestart.
    let pid = postmaster_pid(&k1.dir);
    set_pg_parameter(&env, "max_locks_per_transaction", "128").await;
    wait_for(
        &env,
        "the restart with the new parameter",
        Duration::from_secs(60),
        async || {
            let c = connect(k1.port.0).await.ok()?;
            let v: String = c
                .query_one("SHOW max_locks_per_transaction", &[])
                .await
                .ok()?
                .get(0);
            (v == "128").then_some(())
        },
    )
    .await;
    assert_ne!(postmaster_pid(&k1.dir), pid, "restarted");

    // Master restarted while its synchronous standby is away: superuser yes, app no.
    k2.child.as_mut().expect("k2").kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = postmaster_pid(&k1.dir).expect("pid");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
    wait_for(
        &env,
        "the master back",
        Duration::from_secs(30),
        async || {
            (postmaster_pid(&k1.dir) != Some(pid) && connect(k1.port.0).await.is_ok()).then_some(())
        },
    )
    .await;
    assert!(
        !app_can_connect(k1.port.0).await,
        "normal users wait for the sync standby"
    );
    env.start_keeper(&mut k2, &[]);
    wait_for(
        &env,
        "normal users admitted again",
        Duration::from_secs(60),
        async || app_can_connect(k1.port.0).await.then_some(()),
    )
    .await;
}
