//! Standby cluster (scenarios.md, "Standby cluster"): a second cluster initialised from a
//! base backup of the first one's master (through its proxy), following it by streaming
//! and from its WAL archive. Then, as Go stolon behaves: its cascading standby streams
//! through a slot on the standby cluster's master (which is in recovery); no synchronous
//! replication there even when the spec asks for it; the master changes address; the
//! standby cluster is cut from its primary and catches up; a failover inside it; the old
//! master returns; `stolonctl promote`. Asynchronous and synchronous spec alike. Both
//! clusters end with the acknowledged-write checker and the healthy check.

use e2e::{serial, Checker, Cluster, Opts};
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use std::time::Duration;

const MIN: Duration = Duration::from_secs(90);

async fn has_row(c: &Cluster, uid: &str, v: i32) -> bool {
    c.query(
        uid,
        &format!("SELECT count(*)::text FROM marks WHERE v = {v}"),
    )
    .await
    .is_ok_and(|n| n == "1")
}

/// Waits until every keeper of `c` in `on` has replayed row `v`.
async fn replicated(c: &Cluster, on: &[String], v: i32) {
    for k in on {
        c.wait_for(&format!("row {v} on {k}"), MIN, async || {
            has_row(c, k, v).await.then_some(())
        })
        .await
        .expect("replicated");
    }
}

/// The primary cluster: two keepers archiving their WAL into `arch`.
async fn primary(arch: &str) -> Cluster {
    let a = Cluster::start(Opts {
        keepers: 2,
        spec: json!({"pgParameters": {"archive_mode": "on",
            "archive_command": format!("cp %p {arch}/%f")}}),
        ..Default::default()
    })
    .await
    .expect("primary cluster");
    a.exec_via_proxy("CREATE TABLE marks (v int); INSERT INTO marks VALUES (1)")
        .await
        .expect("write");
    a
}

/// The standby cluster's spec: a pitr init from a base backup of `a` through its proxy,
/// then following it by streaming and from the archive.
fn standby_spec(a: &Cluster, arch: &str, sync: bool) -> Value {
    let (pa, pp) = a.proxy_addr(0);
    let conninfo = format!(
        "host={pa} port={pp} user=repluser password={}",
        e2e::sql::REPL_PASSWORD
    );
    // Drop-in checks (issue 12): the keepers' environment reaches dataRestoreCommand and
    // restore_command (a backup tool's credentials live there), `%%` is `%` as in Go, and
    // the spec is read as Go reads it: stolon's docs write `primaryConnInfo`.
    std::env::set_var("STOLON_E2E_BACKUP_TOKEN", "tok3n");
    // The pg_basebackup of the version under test (a 15 one refuses a 16 server).
    let basebackup = testkit::postgres::pg_bin_dir().join("pg_basebackup");
    let basebackup = basebackup.display();
    let mut spec = json!({
        "initMode": "pitr",
        "role": "standby",
        "pitrConfig": {"dataRestoreCommand": format!(
            "test \"$STOLON_E2E_BACKUP_TOKEN\" = tok3n && \
             {basebackup} -D %d -X stream -d '{conninfo}' && \
             echo \"restored 100%% with $STOLON_E2E_BACKUP_TOKEN\" > %d/restore-note")},
        "standbyConfig": {
            "standbySettings": {"primaryConnInfo": conninfo},
            "archiveRecoverySettings": {"restoreCommand":
                format!("test \"$STOLON_E2E_BACKUP_TOKEN\" = tok3n && cp {arch}/%f %p")}
        }
    });
    if sync {
        spec["synchronousReplication"] = json!(true);
        spec["minSynchronousStandbys"] = json!(1);
        spec["maxSynchronousStandbys"] = json!(1);
    }
    spec
}

/// The standby cluster's master follows the primary (restore note, primary_conninfo,
/// restore_command, in recovery), its standby streams through a slot on it, and no
/// synchronous replication is configured whatever the spec says.
async fn check_following(b: &Cluster, bm: &str, arch: &str, pp: u16) {
    let note = std::fs::read_to_string(b.keeper(bm).dir.join("postgres/restore-note"))
        .expect("the dataRestoreCommand's note");
    assert_eq!(note.trim(), "restored 100% with tok3n");
    let pci = b.query(bm, "SHOW primary_conninfo").await.expect("show");
    assert!(
        pci.contains(&format!("port={pp}")),
        "primary_conninfo {pci:?}"
    );
    let conf =
        std::fs::read_to_string(b.keeper(bm).dir.join("postgres/postgresql.conf")).expect("conf");
    assert!(
        conf.contains("restore_command") && conf.contains(arch),
        "archive recovery"
    );
    assert_eq!(
        b.query(bm, "SELECT pg_is_in_recovery()::text")
            .await
            .expect("q"),
        "true"
    );
    check_cascade(b, bm).await;
}

/// The standbys of the standby cluster's master stream through their slots on it (it is
/// in recovery: a keeper that dropped them there left its standbys without WAL), and no
/// synchronous standby is set.
async fn check_cascade(b: &Cluster, bm: &str) {
    for s in b.others(bm) {
        let db = b.db_of(&s).await.expect("standby db").uid;
        let sql = format!(
            "SELECT active::text FROM pg_replication_slots WHERE slot_name = 'stolon_{db}'"
        );
        b.wait_for(
            &format!("{s} streaming through its slot"),
            MIN,
            async || (b.query(bm, &sql).await.ok()? == "true").then_some(()),
        )
        .await
        .expect("an active slot on the cascading master");
    }
    let names = b
        .query(bm, "SHOW synchronous_standby_names")
        .await
        .expect("show");
    assert_eq!(names, "", "no synchronous standby in a standby cluster");
    let (cd, _) = b.data().await.expect("cd");
    assert!(
        cd.dbs
            .values()
            .all(|d| !d.spec.synchronous_replication && d.spec.synchronous_standbys.is_empty()),
        "{:?}",
        cd.dbs
    );
}

async fn standby_cluster_scenario(name: &str, sync: bool) {
    let archive = testkit::temp_dir("archive").expect("tmp");
    testkit::postgres::chown_to_pg_user(archive.path()).expect("chown");
    let arch = archive.path().display().to_string();
    let mut a = primary(&arch).await;
    let mut a_checker = Checker::start(&a);
    let mut b = Cluster::launch(&Opts {
        keepers: 2,
        spec: standby_spec(&a, &arch, sync),
        ..Default::default()
    })
    .await
    .expect("standby cluster");
    // The standby cluster's master follows the primary cluster; its standby cascades.
    let bm = b.wait_master(MIN).await.expect("standby cluster master");
    replicated(&b, &b.others(""), 1).await;
    check_following(&b, &bm, &arch, a.proxy_addr(0).1).await;

    // The master changes address (before failInterval): it stays master, its standby
    // follows it at the new port.
    b.kill_keeper(&bm, true);
    let port = b.move_keeper_port(&bm);
    b.restart_keeper(&bm).expect("restart on a new port");
    b.wait_for("the new port in the view", MIN, async || {
        (b.db_of(&bm).await?.status.port == Some(port)).then_some(())
    })
    .await
    .expect("new port");
    a.exec_via_proxy("INSERT INTO marks VALUES (2)")
        .await
        .expect("write");
    replicated(&b, &b.others(""), 2).await;
    for s in b.others(&bm) {
        let pci = b.query(&s, "SHOW primary_conninfo").await.expect("show");
        assert!(pci.contains(&format!("port={port}")), "{pci}");
    }

    // Cut from its primary (the primary's proxy frozen) while the primary takes a write:
    // no failover inside the standby cluster, and it catches up after the heal.
    a_checker.nemesis();
    a.signal("p1", Signal::SIGSTOP)
        .expect("freeze the primary's proxy");
    let am = a.master().await.expect("primary master");
    a.query(&am, "INSERT INTO marks VALUES (3) RETURNING v::text")
        .await
        .expect("write on the primary");
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.signal("p1", Signal::SIGCONT).expect("thaw");
    replicated(&b, &b.others(""), 3).await;
    assert_eq!(
        b.master().await.as_deref(),
        Some(bm.as_str()),
        "no failover"
    );

    // A failover inside the standby cluster: the other keeper follows the primary now;
    // the old master's db is kept (an external follower, no followers) then removed.
    let old_db = b.db_of(&bm).await.expect("db").uid;
    b.kill_keeper(&bm, true);
    let bm2 = b
        .wait_master_change(&bm, MIN)
        .await
        .expect("failover in the standby cluster");
    b.wait_for("the old master's db removed", MIN, async || {
        let (cd, _) = b.data().await?;
        if let Some(db) = cd.dbs.get(&old_db) {
            assert!(db.spec.followers.is_empty(), "{db:?}");
            return None;
        }
        Some(())
    })
    .await
    .expect("removed");
    a.exec_via_proxy("INSERT INTO marks VALUES (4)")
        .await
        .expect("write");
    replicated(&b, std::slice::from_ref(&bm2), 4).await;

    // The old master returns: a new db, a standby cascading from the new master.
    b.restart_keeper(&bm).expect("restart");
    b.wait_for("the old master's keeper in a new db", MIN, async || {
        let db = b.db_of(&bm).await?;
        (db.uid != old_db).then_some(())
    })
    .await
    .expect("new db");
    a.exec_via_proxy("INSERT INTO marks VALUES (5)")
        .await
        .expect("write");
    replicated(&b, &b.others(""), 5).await;
    check_cascade(&b, &bm2).await;

    // Promote: the standby cluster becomes a master cluster of its own.
    let out = b.ctl(&["promote", "-y"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    b.wait_healthy(MIN).await.expect("promoted and healthy");
    let b_checker = Checker::start(&b);
    assert!(
        b_checker.wait_acks(30, MIN).await,
        "writes on the promoted cluster"
    );
    b.finish(&format!("{name}_promoted"), b_checker)
        .await
        .expect("standby cluster invariants");
    a.finish(&format!("{name}_primary"), a_checker)
        .await
        .expect("primary cluster invariants");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_cluster_async() {
    let _s = serial().await;
    standby_cluster_scenario("standby_cluster_async", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_cluster_with_a_synchronous_spec() {
    let _s = serial().await;
    standby_cluster_scenario("standby_cluster_sync", true).await;
}
