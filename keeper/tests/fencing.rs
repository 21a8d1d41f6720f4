//! Self-fencing and the keeper's process guarantees, with real PostgreSQL 15, etcd and a
//! sentinel: a master that loses the store fences itself (an open superuser session with
//! `default_transaction_read_only = off` cannot commit, nor can a new one) and resumes when
//! the store is back; a frozen keeper's master is fenced by the watchdog; a killed keeper
//! leaves no PostgreSQL running; a restarted keeper adopts a running PostgreSQL; PostgreSQL is
//! not started before the sentinel has seen the keeper's new boot.

mod common;

use common::*;
use nix::sys::signal::Signal;
use std::time::{Duration, Instant};

/// failInterval 4 s: the fence timeout is 2 s.
const SPEC: &str = r#"{"initMode": "new", "sleepInterval": "1s", "failInterval": "4s",
    "pgParameters": {"fsync": "off"}}"#;

async fn writable(env: &Env, port: u16, what: &str) {
    wait_for(env, what, Duration::from_secs(60), async || {
        can_write(port).await.then_some(())
    })
    .await;
}

/// Polls until nothing can be written at `port` any more; returns how long it took.
async fn until_unwritable(env: &Env, port: u16, what: &str) -> Duration {
    let start = Instant::now();
    wait_for(env, what, Duration::from_secs(20), async || {
        (!can_write(port).await).then_some(())
    })
    .await;
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_cut_from_the_store_fences_itself_and_resumes() {
    let _serial = serial().await;
    let mut env = Env::new().await;
    let _sentinel = env.sentinel(SPEC);
    let k = env.keeper("k1", &[]);
    writable(&env, k.port.0, "the master").await;
    let session = connect(k.port.0).await.expect("session");
    session
        .batch_execute("SET default_transaction_read_only = off; CREATE TABLE acked (v int); INSERT INTO acked VALUES (1)")
        .await
        .expect("write");

    env.etcd.stop();
    let stopped = Instant::now();
    let took = until_unwritable(&env, k.port.0, "the fence").await;
    eprintln!(
        "etcd stopped -> master refuses writes in {took:?} (fence timeout 2 s, failInterval 4 s)"
    );
    assert!(
        stopped.elapsed() < Duration::from_secs(4),
        "fenced before failInterval: {:?}",
        stopped.elapsed()
    );
    let r = session.batch_execute("INSERT INTO acked VALUES (2)").await;
    assert!(r.is_err(), "the open superuser session cannot commit");

    env.etcd.restart().expect("etcd back");
    writable(&env, k.port.0, "the master again").await;
    let c = connect(k.port.0).await.expect("connect");
    let n: i64 = c
        .query_one("SELECT count(*) FROM acked", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        n, 1,
        "the acknowledged write survived, the refused one is not there"
    );
    wait_for(
        &env,
        "the keeper to report the fence lifted",
        Duration::from_secs(10),
        async || (!env.keeper_info("k1").await?.fenced).then_some(()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_or_killed_keeper_leaves_no_writable_master_and_adoption() {
    let _serial = serial().await;
    let env = Env::new().await;
    let _sentinel = env.sentinel(SPEC);
    let mut k = env.keeper("k1", &[]);
    writable(&env, k.port.0, "the master").await;

    // Frozen keeper (here as soon as PostgreSQL answers, possibly before the keeper has
    // published anything as master): the watchdog, a separate process, fences it.
    k.child
        .as_ref()
        .expect("keeper")
        .signal(Signal::SIGSTOP)
        .expect("SIGSTOP");
    let took = until_unwritable(&env, k.port.0, "the watchdog's fence").await;
    eprintln!("keeper frozen -> master refuses writes in {took:?}");
    k.child
        .as_ref()
        .expect("keeper")
        .signal(Signal::SIGCONT)
        .expect("SIGCONT");
    writable(&env, k.port.0, "the master after the thaw").await;

    // Killed keeper: PostgreSQL goes with it (parent-death signal, watchdog).
    let pid = postmaster_pid(&k.dir).expect("pid");
    k.child.as_mut().expect("keeper").kill();
    let took = until_unwritable(&env, k.port.0, "PostgreSQL to go with its keeper").await;
    eprintln!("keeper killed -> master refuses writes in {took:?}");
    wait_for(
        &env,
        "the postmaster to be gone",
        Duration::from_secs(10),
        async || {
            let gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err();
            gone.then_some(())
        },
    )
    .await;

    // A PostgreSQL found running (started by hand here) is adopted, not started twice.
    let pg_data = k.dir.join("postgres");
    let mut pg_ctl = std::process::Command::new(testkit::postgres::pg_bin_dir().join("pg_ctl"));
    pg_ctl
        .arg("-D")
        .arg(&pg_data)
        .args(["-w", "-l"])
        .arg(k.dir.join("manual.log"))
        .arg("start");
    testkit::postgres::as_pg_user(&mut pg_ctl);
    let out = pg_ctl.output().expect("pg_ctl");
    assert!(
        out.status.success(),
        "pg_ctl start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manual = postmaster_pid(&k.dir).expect("manual pid");
    let boot_before = env
        .keeper_info("k1")
        .await
        .map(|i| i.boot_uuid)
        .unwrap_or_default();
    env.start_keeper(&mut k, &[]);
    writable(&env, k.port.0, "the adopted master").await;
    // A whole round after the adoption: the keeper reports the adopted PostgreSQL healthy.
    wait_for(
        &env,
        "the keeper to report the adopted PostgreSQL",
        Duration::from_secs(20),
        async || {
            let info = env.keeper_info("k1").await?;
            let ps = info.postgres_state?;
            (ps.healthy && info.boot_uuid != boot_before).then_some(())
        },
    )
    .await;
    assert_eq!(
        postmaster_pid(&k.dir),
        Some(manual),
        "adopted, not restarted"
    );
    let log = std::fs::read_to_string(&k.log).unwrap_or_default();
    assert!(log.contains("adopting a PostgreSQL"), "{log}");
    // The adopted master is stopped with the keeper's own shutdown (no stray server).
    k.child
        .as_mut()
        .expect("keeper")
        .stop(Duration::from_secs(20));
    until_unwritable(
        &env,
        k.port.0,
        "the adopted PostgreSQL to stop with SIGTERM",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_waits_until_the_sentinel_saw_the_new_boot() {
    let _serial = serial().await;
    let env = Env::new().await;
    let mut sentinel = env.sentinel(SPEC);
    let mut k = env.keeper("k1", &[]);
    writable(&env, k.port.0, "the master").await;
    sentinel.kill();
    k.child.as_mut().expect("keeper").kill();
    until_unwritable(&env, k.port.0, "PostgreSQL gone with the keeper").await;
    let logged_before = std::fs::read_to_string(&k.log).unwrap_or_default().len();
    env.start_keeper(&mut k, &[]);
    // The positive event: the new keeper decided to wait for the sentinel.
    wait_for(
        &env,
        "the keeper to wait for the sentinel to see its boot",
        Duration::from_secs(20),
        async || {
            let log = std::fs::read_to_string(&k.log).unwrap_or_default();
            log.get(logged_before..)?
                .contains("the sentinel has not seen this keeper's boot yet")
                .then_some(())
        },
    )
    .await;
    assert!(
        !can_write(k.port.0).await,
        "not started: the sentinel has not seen this boot"
    );
    // The new keeper's info may not be published yet: until it is, the store
    // still holds the killed keeper's (its lease has not expired), whose boot
    // the clusterdata does record. Wait for the new boot to show there.
    let (cd, _) = env.cluster_data().await.expect("cd");
    let seen = cd.keepers["k1"].status.boot_uuid.clone();
    wait_for(
        &env,
        "the new keeper's info, with a boot the sentinel has not seen",
        Duration::from_secs(20),
        async || {
            let info = env.keeper_info("k1").await?;
            (info.boot_uuid != seen).then_some(())
        },
    )
    .await;
    assert!(
        !can_write(k.port.0).await,
        "still not started while no sentinel runs"
    );
    let _sentinel = env.sentinel(SPEC);
    writable(&env, k.port.0, "the master once the sentinel saw the boot").await;
}

/// failInterval 5 s with stolon's default sleepInterval 5 s: the master's fence window
/// (2.5 s after its last acknowledged KeeperInfo) is shorter than sleepInterval, so the
/// keeper publishes at least twice per window. Before, it published every 5 s and the
/// master fenced itself between publishes, over and over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_window_shorter_than_sleep_interval_does_not_fence_a_healthy_master() {
    let _serial = serial().await;
    let env = Env::new().await;
    let spec = r#"{"initMode": "new", "sleepInterval": "5s", "failInterval": "5s",
        "pgParameters": {"fsync": "off"}}"#;
    let _sentinel = env.sentinel(spec);
    let k = env.keeper("k1", &[]);
    writable(&env, k.port.0, "the master").await;
    // The positive event: six publishes, more than two fence windows' worth.
    let mut seen = std::collections::BTreeSet::new();
    wait_for(
        &env,
        "six KeeperInfo publishes",
        Duration::from_secs(40),
        async || {
            let info = env.keeper_info("k1").await?;
            seen.insert(info.info_uid);
            (seen.len() >= 6).then_some(())
        },
    )
    .await;
    let log = std::fs::read_to_string(&k.log).unwrap_or_default();
    assert!(!log.contains("fencing the master"), "{log}");
    assert!(can_write(k.port.0).await, "still writable");
}
