//! Initialisation scenarios (scenarios.md, "Initialisation"). Each ends with the
//! acknowledged-write checker and the healthy-cluster check.

use e2e::cluster::NO_PASSWORD_FILES;
use e2e::{serial, Checker, Cluster, Opts};
use serde_json::json;
use std::process::Command;
use std::time::Duration;

const MIN: Duration = Duration::from_secs(60);

async fn check(c: &Cluster, name: &str) {
    let checker = Checker::start(c);
    assert!(checker.wait_acks(30, MIN).await, "writes");
    c.finish(name, checker).await.expect("invariants");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_with_one_keeper() {
    let _s = serial().await;
    let c = Cluster::start(Opts {
        keepers: 1,
        ..Default::default()
    })
    .await
    .expect("cluster");
    assert_eq!(c.master().await.as_deref(), Some("k1"));
    check(&c, "init_one_keeper").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_with_three_keepers_and_two_sentinels_one_master_rest_standbys() {
    let _s = serial().await;
    let c = Cluster::start(Opts {
        sentinels: 2,
        ..Default::default()
    })
    .await
    .expect("cluster");
    let m = c.master().await.expect("master");
    for k in &c.keepers {
        let r = c
            .query(&k.uid, "SELECT pg_is_in_recovery()::text")
            .await
            .expect("ask");
        assert_eq!(r == "false", k.uid == m, "{} in recovery: {r}", k.uid);
    }
    let leaders = ["s1", "s2"]
        .iter()
        .filter(|s| c.log(s).contains("became sentinel leader"))
        .count();
    assert_eq!(leaders, 1, "one sentinel leads");
    check(&c, "init_three_keepers_two_sentinels").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_new_with_and_without_merging_pg_parameters_from_the_initial_cluster_spec() {
    let _s = serial().await;
    for merge in [true, false] {
        let c = Cluster::start(Opts {
            keepers: 1,
            spec: json!({"mergePgParameters": merge, "pgParameters": {"work_mem": "5MB"}}),
            ..Default::default()
        })
        .await
        .expect("cluster");
        // The sentinel created the cluster from --initial-cluster-spec: its parameter runs.
        assert_eq!(c.query("k1", "SHOW work_mem").await.expect("show"), "5MB");
        let (cd, _) = c.data().await.expect("cd");
        let params = &cd.cluster.spec.pg_parameters;
        // initdb writes max_connections into the new postgresql.conf.
        assert_eq!(params.contains_key("max_connections"), merge, "{params:?}");
        assert_eq!(params.get("work_mem").map(String::as_str), Some("5MB"));
        check(&c, &format!("init_new_merge_{merge}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_existing_takes_over_a_keepers_data() {
    let _s = serial().await;
    let c = Cluster::start(Opts {
        keepers: 2,
        ..Default::default()
    })
    .await
    .expect("cluster");
    let m = c.master().await.expect("master");
    let (cd, _) = c.data().await.expect("cd");
    let old_uid = cd.cluster.uid;
    c.exec_via_proxy("CREATE TABLE kept AS SELECT 42 AS v")
        .await
        .expect("write");
    let spec = json!({"initMode": "existing", "existingConfig": {"keeperUID": m},
        "sleepInterval": "1s", "failInterval": "5s", "proxyCheckInterval": "1s",
        "proxyTimeout": "3s", "pgParameters": {"fsync": "off"}});
    let out = c.ctl(&["init", "--force", "-y", &spec.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.wait_for(
        "a new cluster uid over the existing data",
        MIN,
        async || {
            let (cd, _) = c.data().await?;
            (cd.cluster.uid != old_uid
                && cd.cluster.spec.init_mode == Some(control::model::ClusterInitMode::Existing)
                && c.health().await.is_ok())
            .then_some(())
        },
    )
    .await
    .expect("re-initialised");
    assert_eq!(c.master().await.as_deref(), Some(m.as_str()));
    let v = c.query(&m, "SELECT v::text FROM kept").await.expect("kept");
    assert_eq!(v, "42", "the existing data is kept");
    assert!(c.keeper_log(&m).contains("done action=TakeOverExisting"));
    check(&c, "init_existing").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_keepers_on_one_data_dir_the_second_refuses() {
    let _s = serial().await;
    let c = Cluster::start(Opts {
        keepers: 1,
        ..Default::default()
    })
    .await
    .expect("cluster");
    let k = c.keeper("k1");
    let mut args = k.args.clone();
    if let Some(i) = args.iter().position(|a| a == "--uid") {
        args[i + 1] = "k1b".into();
    }
    let out = Command::new(e2e::cluster::bin("stolon-keeper"))
        .args(&args)
        .output()
        .expect("second keeper");
    let err =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "the second keeper must exit");
    assert!(err.contains("lock") || err.contains("in use"), "{err}");
    check(&c, "data_dir_lock").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_and_password_files_combinations() {
    let _s = serial().await;
    // A custom replication user whose password comes from the environment, and the
    // superuser's from a file ending in a newline (su.pw has one).
    let dir = testkit::temp_dir("pw").expect("tmp");
    let su = dir.path().join("su-crlf.pw");
    std::fs::write(&su, format!("{}\r\n", e2e::sql::SU_PASSWORD)).expect("pw");
    testkit::postgres::chown_to_pg_user(dir.path()).expect("chown");
    let keeper_args = |_: usize| {
        vec![
            NO_PASSWORD_FILES.to_string(),
            "--pg-su-passwordfile".into(),
            su.display().to_string(),
            "--pg-repl-username".into(),
            "replicator".into(),
        ]
    };
    let c = Cluster::start(Opts {
        keepers: 2,
        keeper_args: (0..2).map(keeper_args).collect(),
        env: vec![("STKEEPER_PG_REPL_PASSWORD".into(), "from-env".into())],
        ..Default::default()
    })
    .await
    .expect("cluster");
    let m = c.master().await.expect("master");
    let s = if m == "k1" { "k2" } else { "k1" };
    let conninfo = c
        .query(s, "SELECT current_setting('primary_conninfo')")
        .await
        .expect("conninfo");
    assert!(conninfo.contains("user=replicator"), "{conninfo}");
    // Go stolon's warning for the trailing CR/LF it removed.
    assert!(c
        .keeper_log(&m)
        .contains("superuser password contain trailing new line, removing"));
    // Refused at start, as Go refuses them: an empty password file (naming it), one that is
    // empty once its newline is removed, and one user for both roles with two passwords.
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("pw");
        p.display().to_string()
    };
    let (empty, newline) = (file("empty.pw", ""), file("newline.pw", "\r\n"));
    let other = file("other.pw", "other\n");
    let su = su.display().to_string();
    let empty_file = format!("password file {empty} is empty");
    #[rustfmt::skip]
    let refusals: [(&[&str], &str); 3] = [
        (&["--pg-su-passwordfile", &empty, "--pg-repl-passwordfile", &su], &empty_file),
        (&["--pg-su-passwordfile", &newline, "--pg-repl-passwordfile", &su],
            "superuser password is empty after removing trailing new line"),
        (&["--pg-su-username", "postgres", "--pg-su-passwordfile", &su,
            "--pg-repl-username", "postgres", "--pg-repl-passwordfile", &other],
            "provided superuser name and replication user name are the same but provided \
             passwords are different"),
    ];
    for (args, want) in refusals {
        let out = Command::new(e2e::cluster::bin("stolon-keeper"))
            .args(c.common_args())
            .args(["--uid", "k9", "--data-dir"])
            .arg(dir.path().join("k9"))
            .args(args)
            .output()
            .expect("keeper");
        let err = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    check(&c, "passwords").await;
}

/// A base backup taken before two marks and the WAL archive after them: a pitr cluster
/// restores both, or with a recovery target time between them only the first.
async fn pitr(target: bool) {
    let archive = testkit::temp_dir("archive").expect("tmp");
    let backup = testkit::temp_dir("backup").expect("tmp");
    for d in [archive.path(), backup.path()] {
        testkit::postgres::chown_to_pg_user(d).expect("chown");
    }
    let arch = archive.path().display().to_string();
    let a = Cluster::start(Opts {
        keepers: 1,
        spec: json!({"pgParameters": {"archive_mode": "on",
            "archive_command": format!("cp %p {arch}/%f")}}),
        ..Default::default()
    })
    .await
    .expect("source cluster");
    let (addr, port) = a.pg_addr("k1");
    let base = backup.path().join("base");
    let mut bb = Command::new(testkit::postgres::pg_bin_dir().join("pg_basebackup"));
    bb.arg("-D")
        .arg(&base)
        .args(["-X", "stream", "-d"])
        .arg(format!(
            "host={addr} port={port} user=repluser password={}",
            e2e::sql::REPL_PASSWORD
        ));
    testkit::postgres::as_pg_user(&mut bb);
    let out = bb.output().expect("pg_basebackup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    a.exec_via_proxy("CREATE TABLE marks (v int); INSERT INTO marks VALUES (1)")
        .await
        .expect("mark 1");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let at = a
        .query("k1", "SELECT now()::text")
        .await
        .expect("target time");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.exec_via_proxy("INSERT INTO marks VALUES (2)")
        .await
        .expect("mark 2");
    // The segment holding mark 2's commit, closed and archived.
    let segment = a
        .query("k1", "SELECT pg_walfile_name(pg_switch_wal())")
        .await
        .expect("switch");
    a.wait_for("the WAL archived", MIN, async || {
        let last = a
            .query(
                "k1",
                "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver",
            )
            .await
            .ok()?;
        (last >= segment).then_some(())
    })
    .await
    .expect("archived");
    let mut pitr = json!({
        "dataRestoreCommand": format!("cp -a {}/. %d", base.display()),
        "archiveRecoverySettings": {"restoreCommand": format!("cp {arch}/%f %p")}
    });
    if target {
        pitr["recoveryTargetSettings"] = json!({"recoveryTargetTime": at});
    }
    let b = Cluster::start(Opts {
        keepers: 2,
        spec: json!({"initMode": "pitr", "pitrConfig": pitr}),
        ..Default::default()
    })
    .await
    .expect("pitr cluster");
    let m = b.master().await.expect("master");
    let marks = b
        .query(&m, "SELECT string_agg(v::text, ',' ORDER BY v) FROM marks")
        .await
        .expect("marks");
    assert_eq!(marks, if target { "1" } else { "1,2" }, "target {at}");
    check(&b, &format!("init_pitr_target_{target}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_pitr_with_and_without_a_recovery_target_time() {
    let _s = serial().await;
    pitr(false).await;
    pitr(true).await;
}
