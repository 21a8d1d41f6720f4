//! One real keeper with PostgreSQL 15, a real sentinel and etcd: initialisation, restart
//! after a crash (timed), parameters applied by reload, the keeper's own guarantees.

mod common;

use common::*;
use std::time::{Duration, Instant};

const SPEC: &str = r#"{"initMode": "new", "sleepInterval": "1s", "failInterval": "4s",
    "pgParameters": {"work_mem": "4MB", "fsync": "off"}}"#;

async fn master_ready(env: &Env, port: u16) {
    wait_for(
        env,
        "the master to take writes",
        Duration::from_secs(60),
        async || can_write(port).await.then_some(()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_crash_restart_and_reload() {
    let _serial = serial().await;
    let env = Env::new().await;
    let _sentinel = env.sentinel(SPEC);
    // initdb takes the keeper's locale, as Go stolon's does (C.UTF-8 only when none is
    // set): the database's collation and character type come from it.
    let unset = [
        "LC_ALL",
        "LC_COLLATE",
        "LC_CTYPE",
        "LC_MESSAGES",
        "LC_MONETARY",
    ];
    let mut vars: Vec<(&str, &str)> = unset.iter().map(|v| (*v, "")).collect();
    vars.extend([("LC_NUMERIC", ""), ("LC_TIME", ""), ("LANG", "C")]);
    let k = env.keeper_env("k1", &[], &vars);
    master_ready(&env, k.port.0).await;
    for setting in ["lc_collate", "lc_ctype"] {
        let v = wait_for(&env, setting, Duration::from_secs(20), async || {
            let c = connect(k.port.0)
                .await
                .map_err(|e| eprintln!("{e:?}"))
                .ok()?;
            let row = c.query_one(&format!("SHOW {setting}"), &[]).await.ok()?;
            Some(row.get::<_, String>(0))
        })
        .await;
        assert_eq!(v, "C", "{setting} from the keeper's LANG");
    }

    // The sentinel saw the init finish: phase normal, init parameters merged.
    let cd = wait_for(&env, "phase normal", Duration::from_secs(20), async || {
        let (cd, _) = env.cluster_data().await?;
        (cd.cluster.status.phase == Some(control::model::ClusterPhase::Normal)).then_some(cd)
    })
    .await;
    assert_eq!(
        cd.cluster
            .spec
            .pg_parameters
            .get("work_mem")
            .map(String::as_str),
        Some("4MB")
    );
    assert!(
        cd.cluster
            .spec
            .pg_parameters
            .contains_key("max_connections"),
        "initdb's parameters merged"
    );
    let info = env.keeper_info("k1").await.expect("info");
    let ps = info.postgres_state.expect("state");
    assert!(ps.healthy && !ps.system_id.is_empty() && ps.timeline_id == 1 && ps.x_log_pos > 0);
    assert_eq!(info.postgres_binary_version.maj, 15);

    // kill -9 the postmaster: the keeper (its parent) restarts it at once. Timed to the
    // first write that commits through stolon-proxy.
    let (_proxy, proxy_port) = env.proxy();
    wait_for(
        &env,
        "a write through the proxy",
        Duration::from_secs(30),
        async || can_write(proxy_port.0).await.then_some(()),
    )
    .await;
    let pid = postmaster_pid(&k.dir).expect("pid");
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    wait_for(
        &env,
        "a write through the proxy after the crash",
        Duration::from_secs(30),
        async || can_write(proxy_port.0).await.then_some(()),
    )
    .await;
    let recovered = killed.elapsed();
    eprintln!("kill -9 of the postmaster to the first write committed through stolon-proxy: {recovered:?}");
    assert_ne!(postmaster_pid(&k.dir), Some(pid));

    // A parameter change is applied by reload: same postmaster.
    let pid = postmaster_pid(&k.dir).expect("pid");
    set_pg_parameter(&env, "work_mem", "8MB").await;
    wait_for(
        &env,
        "work_mem = 8MB",
        Duration::from_secs(20),
        async || {
            let c = connect(k.port.0).await.ok()?;
            let v: String = c.query_one("SHOW work_mem", &[]).await.ok()?.get(0);
            (v == "8MB").then_some(())
        },
    )
    .await;
    assert_eq!(postmaster_pid(&k.dir), Some(pid), "reloaded, not restarted");
    // Go stolon's log lines, which operators' alerts match: the lock, the reload, and the
    // next check finding nothing to change.
    let log = || std::fs::read_to_string(&k.log).unwrap_or_default();
    assert!(log().contains("exclusive lock on data dir taken"));
    assert!(log().contains("postgres parameters changed, reloading postgres instance"));
    wait_for(
        &env,
        "parameters not changed",
        Duration::from_secs(20),
        async || {
            let l = log();
            let reload = l.rfind("postgres parameters changed, reloading postgres instance")?;
            l[reload..]
                .contains("postgres parameters not changed")
                .then_some(())
        },
    )
    .await;

    // ALTER SYSTEM has no lasting effect.
    let c = connect(k.port.0).await.expect("connect");
    c.batch_execute("ALTER SYSTEM SET work_mem = '64MB'")
        .await
        .expect("alter system");
    set_pg_parameter(&env, "statement_timeout", "1min").await;
    wait_for(
        &env,
        "statement_timeout applied",
        Duration::from_secs(20),
        async || {
            let c = connect(k.port.0).await.ok()?;
            let v: String = c
                .query_one("SHOW statement_timeout", &[])
                .await
                .ok()?
                .get(0);
            (v == "1min").then_some(())
        },
    )
    .await;
    let v: String = c
        .query_one("SHOW work_mem", &[])
        .await
        .expect("show")
        .get(0);
    assert_eq!(v, "8MB", "ALTER SYSTEM undone");
}
