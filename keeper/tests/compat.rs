//! Drop-in compatibility with Go stolon (issue 12), against the real binaries, etcd and
//! PostgreSQL 15: each test names the points of the issue it shows. The standby-cluster
//! points (a `primaryConnInfo` spec key reaching PostgreSQL's primary_conninfo; the
//! keeper's environment in dataRestoreCommand and restore_command; `%%`) are in
//! e2e/tests/standby_cluster.rs, which has the two clusters they need.

mod common;

use common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn bin(name: &str) -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_stolon-keeper")).with_file_name(name);
    assert!(
        exe.exists(),
        "{} missing: cargo build --workspace --bins",
        exe.display()
    );
    exe
}

fn run(name: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(bin(name));
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write stdin");
    }
    drop(child.stdin.take());
    wait_output(child, Duration::from_secs(30))
}

/// Waits for a child that must end by itself; kills it past `limit` (a hang is a failure).
fn wait_output(mut child: std::process::Child, limit: Duration) -> Output {
    let start = std::time::Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("command did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ctl(env: &Env, args: &[&str], stdin: Option<&str>) -> Output {
    let ep = env.etcd.endpoint();
    let mut all = vec!["--cluster-name", CLUSTER, "--store-endpoints", &ep];
    all.extend_from_slice(args);
    run("stolonctl", &all, stdin)
}

/// Points 2 and 3: Go's other backends and kubernetes-only flags are refused with the way
/// out; `stolonctl version` needs no cluster name; keeper uids follow Go's rule.
#[test]
fn other_backends_and_kube_flags_are_refused_with_what_to_do() {
    for backend in ["etcd", "etcdv2", "consul", "kubernetes"] {
        for exe in ["stolon-sentinel", "stolon-proxy", "stolonctl"] {
            let mut args = vec!["--cluster-name", "c", "--store-backend", backend];
            if exe == "stolonctl" {
                args.push("status");
            }
            let o = run(exe, &args, None);
            let t = text(&o);
            assert!(!o.status.success(), "{exe} {backend}: {t}");
            assert!(
                t.contains("etcdv3") && t.contains("clusterdata write"),
                "{exe} {backend}: {t}"
            );
        }
    }
    let o = run(
        "stolon-sentinel",
        &["--cluster-name", "c", "--kube-resource-kind", "configmap"],
        None,
    );
    assert!(!o.status.success() && text(&o).contains("--kube-resource-kind"));
    for flag in ["--kubeconfig", "--kube-context", "--kube-namespace"] {
        let o = run(
            "stolonctl",
            &["--cluster-name", "c", flag, "x", "status"],
            None,
        );
        let t = text(&o);
        assert!(
            !o.status.success() && t.contains(flag) && t.contains("etcdv3"),
            "{t}"
        );
    }
    // Point 11: a PostgreSQL older than 13 is refused with what to do.
    let fake = tempfile::tempdir().expect("tmp");
    let pg = fake.path().join("postgres");
    std::fs::write(&pg, "#!/bin/sh\necho 'postgres (PostgreSQL) 12.17'\n").expect("fake");
    std::fs::set_permissions(&pg, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let kd = tempfile::tempdir().expect("tmp");
    let o = run(
        "stolon-keeper",
        &[
            "--cluster-name",
            "c",
            "--uid",
            "k1",
            "--pg-su-auth-method",
            "trust",
            "--pg-repl-auth-method",
            "trust",
            "--pg-bin-path",
            &fake.path().display().to_string(),
            "--data-dir",
            &kd.path().display().to_string(),
        ],
        None,
    );
    let t = text(&o);
    assert!(
        !o.status.success() && t.contains("PostgreSQL 12.17") && t.contains("13 or later"),
        "{t}"
    );
    let o = run("stolonctl", &["version"], None);
    assert!(o.status.success(), "{}", text(&o));
    // Go's commands we do not provide: a script learns what to do instead.
    for (args, want) in [
        (
            &["--cluster-name", "c", "setkeeperpriority", "k1", "2"][..],
            "switchover --to",
        ),
        (
            &[
                "--cluster-name",
                "c",
                "register",
                "--register-backend",
                "consul",
            ][..],
            "/primary",
        ),
    ] {
        let o = run("stolonctl", args, None);
        let t = text(&o);
        assert!(
            o.status.code() == Some(1) && t.contains("is not provided") && t.contains(want),
            "{args:?}: {t}"
        );
    }
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path().display().to_string();
    let o = run(
        "stolon-keeper",
        &["--cluster-name", "c", "--uid", "Keeper-1", "--data-dir", &d],
        None,
    );
    let t = text(&o);
    assert!(
        !o.status.success() && t.contains("invalid keeper uid"),
        "{t}"
    );
}

/// Point 2: `--store-skip-tls-verify` connects to an etcd whose certificate no CA given to
/// the client vouches for; without it the same connection is refused.
#[test]
fn store_skip_tls_verify_connects_to_an_unverified_etcd() {
    let tls = testkit::TlsFiles::generate().expect("certificates");
    let etcd = testkit::Etcd::start_tls(&tls).expect("tls etcd");
    let ep = etcd.endpoint();
    let (cert, key) = (
        tls.client_cert.display().to_string(),
        tls.client_key.display().to_string(),
    );
    let args = |skip: bool| {
        // A client certificate (etcd requires one) but no CA: only skipping verification
        // lets the connection through.
        let mut a = vec!["--cluster-name", "c", "--store-endpoints", ep.as_str()];
        a.extend([
            "--store-cert-file",
            cert.as_str(),
            "--store-key-file",
            key.as_str(),
        ]);
        if skip {
            a.push("--store-skip-tls-verify");
        }
        a.extend(["--store-timeout", "3s", "clusterdata", "read"]);
        a
    };
    let o = run("stolonctl", &args(true), None);
    // Connected: the store answered that there is no cluster yet.
    assert!(text(&o).contains("no cluster at"), "{}", text(&o));
    let o = run("stolonctl", &args(false), None);
    assert!(
        !o.status.success() && !text(&o).contains("no cluster at"),
        "{}",
        text(&o)
    );
}

fn spec_text() -> String {
    // Go's encoding/json matches keys without regard to case; `bogusKey` matches nothing.
    // fsync stays on: ALTER SYSTEM fails on fsyncing /dev/null, which fsync=off skips.
    format!(
        r#"{{"initmode": "new", "SleepInterval": "1s", "failInterval": "4s",
            "proxyCheckInterval": "1s", "proxyTimeout": "3s", "bogusKey": 1,
            "pgParameters": {{"archive_mode": "on",
              "archive_command": "echo \"$STOLON_COMPAT_TOKEN\" > {}/env-%f"}}}}"#,
        "ARCHIVE"
    )
}

async fn scrape(addr: &str) -> String {
    http_get(addr, "/metrics").await.expect("scrape").1
}

/// Points 3 (Go's flags on a running keeper, sentinel and proxy), 5 (case-insensitive keys,
/// unknown keys warned), 6 (a Go keeper's data dir adopted in place), 7 (the keeper's
/// environment in archive_command), 8 (ALTER SYSTEM fails), 9 (stolonctl for scripts) and
/// 10 (metrics under Go's names) on one real cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolon_users_cluster_runs_unchanged() {
    let _s = serial().await;
    let env = Env::new().await;
    let archive = env.dir.path().join("archive");
    std::fs::create_dir_all(&archive).expect("archive dir");
    testkit::postgres::chown_to_pg_user(&archive).expect("chown");
    let spec = spec_text().replace("ARCHIVE", &archive.display().to_string());

    // stolonctl init -f - reads stdin; the unknown key is named on stderr.
    let o = ctl(&env, &["init", "-f", "-", "-y"], Some(&spec));
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("\"bogusKey\""), "{}", text(&o));
    let (cd, _) = env.cluster_data().await.expect("cd");
    assert_eq!(
        cd.cluster.spec.sleep_interval().as_std(),
        Duration::from_secs(1)
    );

    // A sentinel with Go's flags, and its metrics.
    let smetrics = format!("127.0.0.1:{}", testkit::free_port().0);
    let mut cmd = Command::new(sentinel_bin());
    cmd.args(env.common_args())
        .args([
            "--debug",
            "--log-color=false",
            "--metrics-listen-address",
            &smetrics,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _sentinel = testkit::ChildGuard::spawn("sentinel", &mut cmd).expect("sentinel");

    // A keeper with Go's flags (--id, --debug, --log-color), the environment of a backup
    // tool, and metrics.
    let kmetrics = format!("127.0.0.1:{}", testkit::free_port().0);
    std::env::set_var("STOLON_COMPAT_TOKEN", "t0ken");
    let mut k1 = env.keeper("k1", &[]);
    drop(k1.child.take());
    start_go_style_keeper(&env, &mut k1, &kmetrics, true);
    // A proxy given a host name to listen on.
    let port = testkit::free_port();
    let mut cmd = Command::new(bin("stolon-proxy"));
    cmd.args(env.common_args())
        .args([
            "--listen-address",
            "localhost",
            "--port",
            &port.0.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _proxy = testkit::ChildGuard::spawn("proxy", &mut cmd).expect("proxy");
    wait_for(
        &env,
        "writes through the proxy",
        Duration::from_secs(90),
        async || can_write(port.0).await.then_some(()),
    )
    .await;

    proxy_sockets_have_keepalive(port.0).await;
    alter_system_fails(k1.port.0).await;
    archive_command_sees_the_keepers_environment(&env, k1.port.0, &archive).await;
    status_json_has_gos_schema(&env);
    stolonctl_prompts_as_go_does(&env);
    metrics_have_gos_names(&kmetrics, &smetrics).await;
    go_data_dir_is_adopted(&env, &mut k1, &kmetrics).await;
    // Point 9: `yes` on stdin confirms an init over the existing cluster.
    let before = env.cluster_data().await.expect("cd").0.cluster.uid;
    let o = ctl(&env, &["init", r#"{"initMode": "new"}"#], Some("yes\n"));
    assert!(o.status.success(), "{}", text(&o));
    let after = env.cluster_data().await.expect("cd").0.cluster.uid;
    assert_ne!(before, after, "a new cluster replaced the old one");
}

/// Point 3: TCP keepalive is on for the proxy's client sockets by default, as Go's listener
/// turns it on (`ss -o` shows the keepalive timer on the accepted socket). Until the client
/// acknowledges the session's first answer, `ss` shows the retransmission timer instead:
/// polled until the keepalive one shows.
async fn proxy_sockets_have_keepalive(port: u16) {
    let _c = connect(port).await.expect("session through the proxy");
    let mut t = String::new();
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        let out = Command::new("ss")
            .args([
                "-tno",
                "state",
                "established",
                &format!("( sport = :{port} )"),
            ])
            .output()
            .expect("ss");
        t = String::from_utf8_lossy(&out.stdout).into_owned();
        if t.contains("keepalive") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no keepalive timer on the proxy's socket:\n{t}");
}

fn start_go_style_keeper(env: &Env, k: &mut KeeperProc, metrics: &str, with_id: bool) {
    let log = env.dir.path().join(format!("{}-go.log", k.uid));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .expect("log");
    let mut cmd = env.keeper_command(k);
    if with_id {
        cmd.args(["--id", &k.uid]);
    }
    cmd.args(["--debug", "--log-color"])
        .args([
            "--metrics-listen-address",
            metrics,
            "--pg-listen-address",
            "127.0.0.1",
        ])
        .stdout(Stdio::from(f.try_clone().expect("log")))
        .stderr(Stdio::from(f));
    k.child = Some(testkit::ChildGuard::spawn(&k.uid, &mut cmd).expect("keeper"));
    k.log = log;
}

/// Point 8: as in Go, postgresql.auto.conf points at /dev/null and ALTER SYSTEM errors.
async fn alter_system_fails(port: u16) {
    let c = connect(port).await.expect("connect");
    let e = c
        .batch_execute("ALTER SYSTEM SET work_mem = '11MB'")
        .await
        .expect_err("ALTER SYSTEM must fail");
    let msg = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert!(msg.contains("postgresql.auto.conf"), "{e:?}");
}

/// Point 7: archive_command runs with the keeper's environment (wal-g's credentials).
async fn archive_command_sees_the_keepers_environment(env: &Env, port: u16, archive: &Path) {
    let c = connect(port).await.expect("connect");
    c.batch_execute("CREATE TABLE IF NOT EXISTS compat(v int); INSERT INTO compat VALUES (1)")
        .await
        .expect("write");
    c.batch_execute("SELECT pg_switch_wal()")
        .await
        .expect("switch");
    let archive = archive.to_path_buf();
    let got = wait_for(
        env,
        "an archived segment",
        Duration::from_secs(60),
        async || {
            let e = std::fs::read_dir(&archive).ok()?.flatten().next()?;
            Some(std::fs::read_to_string(e.path()).ok()?.trim().to_string())
                .filter(|s| !s.is_empty())
        },
    )
    .await;
    assert_eq!(got, "t0ken");
}

/// Point 9: `status -f json` in Go's schema; promote on a master cluster exits 0.
fn status_json_has_gos_schema(env: &Env) {
    let o = ctl(env, &["status", "-f", "json"], None);
    assert!(o.status.success(), "{}", text(&o));
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(st["cluster"]["available"], true);
    assert_eq!(st["cluster"]["master_keeper_uid"], "k1");
    assert!(st["cluster"]["master_db_uid"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    let k = &st["keepers"][0];
    for key in [
        "uid",
        "listen_address",
        "healthy",
        "pg_healthy",
        "pg_wanted_generation",
        "pg_current_generation",
    ] {
        assert!(k.get(key).is_some(), "keepers[].{key} missing: {k}");
    }
    assert!(k["listen_address"]
        .as_str()
        .is_some_and(|a| a.starts_with("127.0.0.1:")));
    for s in st["sentinels"].as_array().expect("sentinels") {
        assert!(s.get("uid").is_some() && s.get("leader").is_some(), "{s}");
    }
    for p in st["proxies"].as_array().expect("proxies") {
        assert!(
            p.get("uid").is_some() && p.get("generation").is_some(),
            "{p}"
        );
    }
    let o = ctl(env, &["promote"], None);
    assert!(
        o.status.success(),
        "promote on a master cluster: {}",
        text(&o)
    );
}

/// Point 9: init over an existing cluster asks; `yes` is accepted, `no` exits 0 saying
/// "exiting" as Go's does; with --overwrite=false it exits 0; update -f - reads stdin;
/// `status -f ""` is text; Go's migration recipe `clusterdata write < cd.json` writes onto
/// an empty store without a question, and over an existing one only with --yes.
fn stolonctl_prompts_as_go_does(env: &Env) {
    let o = ctl(env, &["init"], Some("no\n"));
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("[yes/no]") && text(&o).contains("exiting"),
        "{}",
        text(&o)
    );
    let o = ctl(env, &["status", "-f", ""], None);
    assert!(
        o.status.success() && text(&o).contains("=== keepers ==="),
        "{}",
        text(&o)
    );
    let cd = ctl(env, &["clusterdata", "read"], None);
    assert!(cd.status.success(), "{}", text(&cd));
    let cd = String::from_utf8_lossy(&cd.stdout).into_owned();
    let ep = env.etcd.endpoint();
    let other = ["--cluster-name", "migrated", "--store-endpoints", &ep];
    let write = |extra: &[&str]| {
        let args: Vec<&str> = other
            .iter()
            .chain(["clusterdata", "write"].iter())
            .chain(extra)
            .copied()
            .collect();
        run("stolonctl", &args, Some(&cd))
    };
    let o = write(&[]);
    assert!(
        o.status.success() && text(&o).contains("successfully wrote cluster data"),
        "{}",
        text(&o)
    );
    let o = write(&[]);
    assert!(
        !o.status.success() && text(&o).contains("cluster data already available use --yes"),
        "{}",
        text(&o)
    );
    let o = write(&["--yes"]);
    assert!(o.status.success(), "{}", text(&o));
    let read: Vec<&str> = other
        .iter()
        .chain(["clusterdata", "read"].iter())
        .copied()
        .collect();
    let o = run("stolonctl", &read, None);
    let copied = control::model::ClusterData::from_json(&o.stdout).expect("copied clusterdata");
    let original = control::model::ClusterData::from_json(cd.as_bytes()).expect("clusterdata");
    assert_eq!(copied.cluster.uid, original.cluster.uid);
    let o = ctl(env, &["init", "--overwrite=false"], None);
    assert!(
        o.status.success() && text(&o).contains("already initialized"),
        "{}",
        text(&o)
    );
    let o = ctl(
        env,
        &["update", "-p", "-f", "-"],
        Some(r#"{"MaxStandbys": 7}"#),
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = ctl(env, &["spec"], None);
    let spec: serde_json::Value = serde_json::from_slice(&o.stdout).expect("spec");
    assert_eq!(spec["maxStandbys"], 7);
}

/// Point 10: the names a stolon dashboard reads, scraped from a running keeper and sentinel.
async fn metrics_have_gos_names(keeper: &str, sentinel: &str) {
    let k = scrape(keeper).await;
    for name in [
        "stolon_cluster_identifier{cluster_name=\"kt\",component=\"keeper\"} 1",
        "stolon_keeper_clusterdata_last_valid_update_seconds ",
        "stolon_keeper_target_role{role=\"master\"} 1",
        "stolon_keeper_local_role{role=\"master\"} 1",
        "stolon_keeper_needs_reload 0",
        "stolon_keeper_needs_restart ",
        "stolon_keeper_last_sync_success_seconds ",
        "stolon_keeper_sleep_interval 1",
        "stolon_keeper_shutdown_seconds ",
        "process_cpu_seconds_total ",
        "process_resident_memory_bytes ",
        "process_open_fds ",
    ] {
        assert!(k.contains(name), "keeper metrics lack {name:?}:\n{k}");
    }
    let s = scrape(sentinel).await;
    for name in [
        "stolon_cluster_identifier{cluster_name=\"kt\",component=\"sentinel\"} 1",
        "stolon_sentinel_last_cluster_check_success_seconds ",
        "process_start_time_seconds ",
    ] {
        assert!(s.contains(name), "sentinel metrics lack {name:?}:\n{s}");
    }
}

/// Point 6: the keeper's dir rewritten in Go stolon's format (cmd/keeper: `keeperstate` =
/// KeeperLocalState {UID, ClusterUID}, `dbstate` = DBLocalState {UID, Generation,
/// Initializing, InitPGParameters}, `lock`); a keeper started on it with no --uid keeps the
/// uid and the db, and neither wipes nor copies the data.
async fn go_data_dir_is_adopted(env: &Env, k: &mut KeeperProc, metrics: &str) {
    let c = connect(k.port.0).await.expect("connect");
    let sysid: String = c
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .expect("sysid")
        .get(0);
    drop(c);
    let (cd, _) = env.cluster_data().await.expect("cd");
    let db = cd
        .dbs
        .values()
        .find(|d| d.spec.keeper_uid == "k1")
        .expect("db")
        .clone();
    k.child.take(); // SIGKILL-free stop: ChildGuard stops the keeper, which stops PostgreSQL.
    wait_for(
        env,
        "PostgreSQL stopped",
        Duration::from_secs(30),
        async || postmaster_pid(&k.dir).is_none().then_some(()),
    )
    .await;
    let marker = k.dir.join("postgres/compat-marker");
    std::fs::write(&marker, "kept").expect("marker");
    for ours in [
        "keeper-uid",
        "dbstate.json",
        "init-params.json",
        "keeper.lock",
    ] {
        let _ = std::fs::remove_file(k.dir.join(ours));
    }
    let go = |name: &str, v: serde_json::Value| {
        std::fs::write(k.dir.join(name), v.to_string()).expect("go state")
    };
    go(
        "keeperstate",
        serde_json::json!({"UID": "k1", "ClusterUID": cd.cluster.uid}),
    );
    go(
        "dbstate",
        serde_json::json!({"UID": db.uid, "Generation": db.generation, "Initializing": false,
                           "InitPGParameters": {"max_connections": "100"}}),
    );
    std::fs::write(k.dir.join("lock"), "").expect("lock");
    start_go_style_keeper(env, k, metrics, false);
    wait_for(
        env,
        "the adopted keeper serves its db again",
        Duration::from_secs(90),
        async || {
            let c = connect(k.port.0).await.ok()?;
            let row = c
                .query_one(
                    "SELECT system_identifier::text FROM pg_control_system()",
                    &[],
                )
                .await
                .ok()?;
            let rows = c.query("SELECT v FROM compat", &[]).await.ok()?;
            (row.get::<_, String>(0) == sysid && !rows.is_empty()).then_some(())
        },
    )
    .await;
    let info = env.keeper_info("k1").await.expect("info");
    assert_eq!(
        info.postgres_state.map(|s| s.uid).as_deref(),
        Some(db.uid.as_str())
    );
    assert_eq!(
        std::fs::read_to_string(&marker).expect("marker kept"),
        "kept"
    );
    let log = std::fs::read_to_string(&k.log).expect("log");
    assert!(
        log.contains("adopted a data dir written by Go stolon's keeper"),
        "{log}"
    );
    assert!(
        !log.contains("initdb") && !log.contains("pg_basebackup"),
        "{log}"
    );
}
