//! Data that is gone or comes from a backup: a wiped master data dir is refused (never
//! initdb) and the sentinel fails over; initMode pitr restores a base backup and archived
//! WAL made by the test.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

async fn system_id(port: u16) -> Option<String> {
    let c = connect(port).await.ok()?;
    let row = c
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .ok()?;
    Some(row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_master_data_dir_is_refused_and_the_standby_takes_over() {
    let _serial = serial().await;
    let env = Env::new().await;
    let _sentinel = env.sentinel(
        r#"{"initMode": "new", "sleepInterval": "1s", "failInterval": "4s",
            "pgParameters": {"fsync": "off"}}"#,
    );
    let mut k1 = env.keeper("k1", &["--priority", "5"]);
    // The first master is k1: init picks among the keepers alive at the time.
    wait_primary(&env, &k1, Duration::from_secs(60)).await;
    let k2 = env.keeper("k2", &[]);
    wait_for(
        &env,
        "k1 master, k2 streaming",
        Duration::from_secs(90),
        async || {
            (can_write(k1.port.0).await
                && !in_recovery(k1.port.0).await?
                && in_recovery(k2.port.0).await?)
                .then_some(())
        },
    )
    .await;
    let sysid = system_id(k1.port.0).await.expect("system id");

    k1.child.as_mut().expect("keeper").kill();
    wait_for(
        &env,
        "k1's PostgreSQL gone",
        Duration::from_secs(10),
        async || (!can_write(k1.port.0).await).then_some(()),
    )
    .await;
    std::fs::remove_dir_all(k1.dir.join("postgres")).expect("wipe");
    env.start_keeper(&mut k1, &["--priority", "5"]);

    wait_for(&env, "k2 promoted", Duration::from_secs(60), async || {
        can_write(k2.port.0).await.then_some(())
    })
    .await;
    let log = std::fs::read_to_string(&k1.log).unwrap_or_default();
    assert!(log.contains("refusing to initialise"), "k1 refused:\n{log}");
    // k1 rejoins as a standby of k2 by base backup: the same database, never a new one.
    wait_for(
        &env,
        "k1 back as a standby",
        Duration::from_secs(90),
        async || in_recovery(k1.port.0).await?.then_some(()),
    )
    .await;
    let k1_sysid = wait_for(
        &env,
        "k1's system id",
        Duration::from_secs(30),
        async || system_id(k1.port.0).await,
    )
    .await;
    assert_eq!(k1_sysid, sysid, "a base backup of the same database");
    assert_eq!(system_id(k2.port.0).await, Some(sysid));
    let log = std::fs::read_to_string(&k1.log).unwrap_or_default();
    assert_eq!(
        log.matches("done action=InitDb").count(),
        1,
        "initdb only at the first start"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pitr_from_a_base_backup_and_archived_wal() {
    let _serial = serial().await;
    // The source cluster archives its WAL.
    let src = Env::new().await;
    let arch = src.dir.path().join("archive");
    let base = src.dir.path().join("base");
    for d in [&arch, &base] {
        std::fs::create_dir_all(d).expect("mkdir");
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    }
    let spec = format!(
        r#"{{"initMode": "new", "sleepInterval": "1s", "failInterval": "4s",
            "pgParameters": {{"fsync": "off", "archive_mode": "on",
                              "archive_command": "cp %p {}/%f"}}}}"#,
        arch.display()
    );
    let _s1 = src.sentinel(&spec);
    let k = src.keeper("k1", &[]);
    wait_for(
        &src,
        "the source master",
        Duration::from_secs(60),
        async || can_write(k.port.0).await.then_some(()),
    )
    .await;
    // PostgreSQL takes writes before the keeper's start has created the replication role
    // the base backup below logs in as (CI once ran it in between).
    wait_for(
        &src,
        "the replication role",
        Duration::from_secs(30),
        async || {
            let c = connect(k.port.0).await.ok()?;
            let n = (c
                .query("SELECT 1 FROM pg_roles WHERE rolname = 'repluser'", &[])
                .await)
                .ok()?
                .len();
            (n == 1).then_some(())
        },
    )
    .await;
    // archive_mode needs a restart: wait until the keeper runs with it.
    let c = connect(k.port.0).await.expect("connect");
    c.batch_execute("ALTER SYSTEM RESET ALL")
        .await
        .expect("noop");
    let mode: String = c
        .query_one("SHOW archive_mode", &[])
        .await
        .expect("show")
        .get(0);
    assert_eq!(
        mode, "on",
        "archive_mode comes from the spec at the first start"
    );
    c.batch_execute("CREATE TABLE p (v int); INSERT INTO p SELECT generate_series(1, 100)")
        .await
        .expect("rows");

    let mut bb = std::process::Command::new(testkit::postgres::pg_bin_dir().join("pg_basebackup"));
    bb.arg("-D").arg(&base).args([
        "-h",
        "127.0.0.1",
        "-p",
        &k.port.0.to_string(),
        "-U",
        "repluser",
        "-X",
        "none",
        "-c",
        "fast",
        "-w",
    ]);
    testkit::postgres::as_pg_user(&mut bb).env("PGPASSWORD", REPL_PASSWORD);
    let out = bb.output().expect("pg_basebackup");
    assert!(
        out.status.success(),
        "pg_basebackup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.batch_execute("INSERT INTO p SELECT generate_series(101, 200)")
        .await
        .expect("more");
    let seg: String = c
        .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
        .await
        .expect("switch")
        .get(0);
    wait_for(
        &src,
        "the segment with the last rows to be archived",
        Duration::from_secs(30),
        async || {
            let r = c
                .query_one(
                    "SELECT COALESCE(last_archived_wal, '') FROM pg_stat_archiver",
                    &[],
                )
                .await
                .ok()?;
            (r.get::<_, String>(0) >= seg).then_some(())
        },
    )
    .await;

    // A new cluster restored from them.
    let dst = Env::new().await;
    let spec = format!(
        r#"{{"initMode": "pitr", "sleepInterval": "1s", "failInterval": "4s",
            "pgParameters": {{"fsync": "off"}},
            "pitrConfig": {{"dataRestoreCommand": "cp -a {}/. %d",
                            "archiveRecoverySettings": {{"restoreCommand": "cp {}/%f %p"}}}}}}"#,
        base.display(),
        arch.display()
    );
    let _s2 = dst.sentinel(&spec);
    let r = dst.keeper("r1", &[]);
    wait_for(
        &dst,
        "the restored master",
        Duration::from_secs(90),
        async || can_write(r.port.0).await.then_some(()),
    )
    .await;
    let c = connect(r.port.0).await.expect("connect");
    let n: i64 = c
        .query_one("SELECT count(*) FROM p", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 200, "the base backup plus the archived WAL");
    wait_for(&dst, "phase normal", Duration::from_secs(30), async || {
        let (cd, _) = dst.cluster_data().await?;
        (cd.cluster.status.phase == Some(control::model::ClusterPhase::Normal)).then_some(())
    })
    .await;
}
