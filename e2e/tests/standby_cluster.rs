//! Standby cluster (scenarios.md, "Standby cluster"): a second cluster initialised from a
//! base backup of the first one's master (through its proxy), following it by streaming
//! and from its WAL archive; a failover inside the standby cluster; then `stolonctl
//! promote`. Both clusters end with the acknowledged-write checker and the healthy check.

use e2e::{serial, Checker, Cluster, Opts};
use serde_json::json;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_cluster_follows_fails_over_inside_and_is_promoted() {
    let _s = serial().await;
    let archive = testkit::temp_dir("archive").expect("tmp");
    testkit::postgres::chown_to_pg_user(archive.path()).expect("chown");
    let arch = archive.path().display().to_string();
    let a = Cluster::start(Opts {
        keepers: 2,
        spec: json!({"pgParameters": {"archive_mode": "on",
            "archive_command": format!("cp %p {arch}/%f")}}),
        ..Default::default()
    })
    .await
    .expect("primary cluster");
    let a_checker = Checker::start(&a);
    a.exec_via_proxy("CREATE TABLE marks (v int); INSERT INTO marks VALUES (1)")
        .await
        .expect("write");
    let (pa, pp) = a.proxy_addr(0);
    let conninfo = format!(
        "host={pa} port={pp} user=repluser password={}",
        e2e::sql::REPL_PASSWORD
    );
    // Drop-in checks (issue 12): the keepers' environment reaches dataRestoreCommand and
    // restore_command (a backup tool's credentials live there), `%%` is `%` as in Go, and
    // the spec is read as Go reads it: stolon's docs write `primaryConnInfo`.
    std::env::set_var("STOLON_E2E_BACKUP_TOKEN", "tok3n");
    let b_spec = json!({
        "initMode": "pitr",
        "role": "standby",
        "pitrConfig": {"dataRestoreCommand": format!(
            "test \"$STOLON_E2E_BACKUP_TOKEN\" = tok3n && \
             pg_basebackup -D %d -X stream -d '{conninfo}' && \
             echo \"restored 100%% with $STOLON_E2E_BACKUP_TOKEN\" > %d/restore-note")},
        "standbyConfig": {
            "standbySettings": {"primaryConnInfo": conninfo},
            "archiveRecoverySettings": {"restoreCommand":
                format!("test \"$STOLON_E2E_BACKUP_TOKEN\" = tok3n && cp {arch}/%f %p")}
        }
    });
    let mut b = Cluster::launch(&Opts {
        keepers: 2,
        spec: b_spec,
        ..Default::default()
    })
    .await
    .expect("standby cluster");
    // The standby cluster's master follows the primary cluster; its standby cascades.
    let bm = b.wait_master(MIN).await.expect("standby cluster master");
    for k in ["k1", "k2"] {
        b.wait_for(&format!("row 1 on {k}"), MIN, async || {
            has_row(&b, k, 1).await.then_some(())
        })
        .await
        .expect("replicated");
    }
    let note = std::fs::read_to_string(b.keeper(&bm).dir.join("postgres/restore-note"))
        .expect("the dataRestoreCommand's note");
    assert_eq!(note.trim(), "restored 100% with tok3n");
    let pci = b.query(&bm, "SHOW primary_conninfo").await.expect("show");
    assert!(
        pci.contains(&format!("port={pp}")),
        "primary_conninfo {pci:?}"
    );
    let conf =
        std::fs::read_to_string(b.keeper(&bm).dir.join("postgres/postgresql.conf")).expect("conf");
    assert!(
        conf.contains("restore_command") && conf.contains(&arch),
        "archive recovery"
    );
    assert_eq!(
        b.query(&bm, "SELECT pg_is_in_recovery()::text")
            .await
            .expect("q"),
        "true"
    );

    // A failover inside the standby cluster: the other keeper follows the primary now.
    b.kill_keeper(&bm, true);
    let bm2 = b
        .wait_master_change(&bm, MIN)
        .await
        .expect("failover in the standby cluster");
    a.exec_via_proxy("INSERT INTO marks VALUES (2)")
        .await
        .expect("write");
    b.wait_for("row 2 on the new standby-cluster master", MIN, async || {
        has_row(&b, &bm2, 2).await.then_some(())
    })
    .await
    .expect("follows the primary");
    b.restart_keeper(&bm).expect("restart");

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
    b.finish("standby_cluster_promoted", b_checker)
        .await
        .expect("standby cluster invariants");
    a.finish("standby_cluster_primary", a_checker)
        .await
        .expect("primary cluster invariants");
}
