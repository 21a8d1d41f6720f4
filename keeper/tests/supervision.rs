//! Supervision (issue 15, point 1) with the real keeper, etcd, sentinel and PostgreSQL: a
//! keeper whose loop panics exits non-zero (a service manager restarts it) instead of
//! staying up publishing for a loop that no longer manages PostgreSQL; a keeper whose loop
//! stalls stops publishing, so the sentinel sees it unhealthy. The failures are injected
//! with the debug builds' `STOLON_E2E_BREAK` knobs.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

const SPEC: &str = r#"{"initMode": "new", "sleepInterval": "1s", "failInterval": "4s",
    "pgParameters": {"fsync": "off"}}"#;

fn keeper_with_break(env: &Env, k: &mut KeeperProc, knob: &str) {
    let f = std::fs::File::create(env.dir.path().join(format!("{}.log", k.uid))).expect("log");
    let mut cmd = env.keeper_command(k);
    cmd.args(["--uid", &k.uid])
        .env("STOLON_E2E_BREAK", knob)
        .stdout(Stdio::from(f.try_clone().expect("log")))
        .stderr(Stdio::from(f));
    k.child = Some(testkit::ChildGuard::spawn(&k.uid, &mut cmd).expect("keeper"));
    k.log = env.dir.path().join(format!("{}.log", k.uid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keeper_whose_loop_panics_exits_non_zero() {
    let _s = serial().await;
    let env = Env::new().await;
    let _sentinel = env.sentinel(SPEC);
    let mut k = env.keeper("k1", &[]);
    drop(k.child.take());
    keeper_with_break(&env, &mut k, "keeper-loop-panic");
    let status = wait_for(
        &env,
        "the keeper to exit",
        Duration::from_secs(90),
        async || k.child.as_mut().and_then(|c| c.exit_status()),
    )
    .await;
    assert!(!status.success(), "{status:?}");
    let log = std::fs::read_to_string(&k.log).expect("log");
    assert!(
        log.contains("STOLON_E2E_BREAK=keeper-loop-panic") && log.contains("panic: exiting"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keeper_whose_loop_stalls_stops_publishing_and_looks_unhealthy() {
    let _s = serial().await;
    let env = Env::new().await;
    let _sentinel = env.sentinel(SPEC);
    let mut k = env.keeper("k1", &[]);
    drop(k.child.take());
    keeper_with_break(&env, &mut k, "keeper-loop-stall");
    // Healthy first (the loop stalls only once its db is applied)...
    wait_for(
        &env,
        "the keeper healthy",
        Duration::from_secs(90),
        async || {
            let (cd, _) = env.cluster_data().await?;
            cd.keepers.get("k1")?.status.healthy.then_some(())
        },
    )
    .await;
    // ...then the publisher stops for the stalled loop, and the sentinel sees it unhealthy.
    wait_for(
        &env,
        "the keeper unhealthy",
        Duration::from_secs(90),
        async || {
            let (cd, _) = env.cluster_data().await?;
            (!cd.keepers.get("k1")?.status.healthy).then_some(())
        },
    )
    .await;
    let log = std::fs::read_to_string(&k.log).expect("log");
    assert!(log.contains("not publishing"), "{log}");
    assert!(!k.child.as_mut().expect("child").exited(), "still running");
}

/// Spawns `bin` (next to the keeper binary) with the common flags, `extra` and a knob.
fn spawn_with_break(env: &Env, bin: &str, extra: &[String], knob: &str) -> testkit::ChildGuard {
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_stolon-keeper")).with_file_name(bin);
    let f = std::fs::File::create(env.dir.path().join(format!("{bin}.log"))).expect("log");
    let mut cmd = Command::new(exe);
    cmd.args(env.common_args())
        .args(extra)
        .env("STOLON_E2E_BREAK", knob)
        .stdout(Stdio::from(f.try_clone().expect("log")))
        .stderr(Stdio::from(f));
    testkit::ChildGuard::spawn(bin, &mut cmd).expect("spawn")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_or_proxy_whose_main_task_panics_exits_non_zero() {
    let _s = serial().await;
    let env = Env::new().await;
    let spec = env.dir.path().join("spec.json");
    std::fs::write(&spec, SPEC).expect("spec");
    let mut sentinel = spawn_with_break(
        &env,
        "stolon-sentinel",
        &["--initial-cluster-spec".into(), spec.display().to_string()],
        "sentinel-loop-panic",
    );
    let port = testkit::free_port();
    let mut proxy = spawn_with_break(
        &env,
        "stolon-proxy",
        &["--port".into(), port.0.to_string()],
        "proxy-discovery-panic",
    );
    for (name, child) in [("sentinel", &mut sentinel), ("proxy", &mut proxy)] {
        let status = wait_for(
            &env,
            &format!("the {name} to exit"),
            Duration::from_secs(60),
            async || child.exit_status(),
        )
        .await;
        assert!(!status.success(), "{name}: {status:?}");
    }
    let log = std::fs::read_to_string(env.dir.path().join("stolon-sentinel.log")).expect("log");
    assert!(
        log.contains("STOLON_E2E_BREAK=sentinel-loop-panic") && log.contains("panic: exiting"),
        "{log}"
    );
    let log = std::fs::read_to_string(env.dir.path().join("stolon-proxy.log")).expect("log");
    assert!(log.contains("discovery panicked: exiting"), "{log}");
}
