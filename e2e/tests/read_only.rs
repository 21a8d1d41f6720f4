//! The proxy's read-only listener (issue 14, point 1) with real processes: sessions land
//! only on standbys; a standby past the lag bound (replay paused) leaves the pool and its
//! read-only sessions are closed, and it comes back once it caught up; a standby promoted by
//! a switchover has its read-only sessions closed and gets no more; with no standby in the
//! pool, 57P03 "no standby available", or the master with --ro-fallback-master. Prints how
//! fast a lagging standby leaves the pool and read-only throughput through the proxy against
//! direct to the standby (pgbench -S).

use e2e::{running, serial, sql, Cluster, Opts};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use testkit::{free_port, PortGuard};

const MIN: Duration = Duration::from_secs(60);

/// The PostgreSQL port a fresh session through `port` lands on, or the error's text.
async fn lands(port: u16) -> Result<u16, String> {
    sql::server_port("127.0.0.1", port)
        .await
        .map_err(|e| format!("{e:#}"))
}

/// The ports `n` fresh sessions through `port` land on.
async fn spread(port: u16, n: usize) -> BTreeSet<u16> {
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        if let Ok(p) = lands(port).await {
            seen.insert(p);
        }
    }
    seen
}

/// A session through the read-only `port` that landed on the standby at `target` (sessions
/// are opened until one does).
async fn session_on(c: &Cluster, port: u16, target: u16) -> tokio_postgres::Client {
    c.wait_for("a read-only session on the standby", MIN, async || {
        let client = sql::connect("127.0.0.1", port, Duration::from_secs(3))
            .await
            .ok()?;
        let row = client
            .query_one("SELECT inet_server_port()", &[])
            .await
            .ok()?;
        (u16::try_from(row.get::<_, i32>(0)).ok() == Some(target)).then_some(client)
    })
    .await
    .expect("a session on the standby")
}

/// A read-only proxy: its rw port is unused; `ro` is the read-only listener.
fn ro_proxy(c: &mut Cluster, name: &str, fallback: bool) -> PortGuard {
    let ro = free_port();
    let mut extra = vec![
        "--ro-port".to_string(),
        ro.0.to_string(),
        "--ro-max-lag".into(),
        "1MB".into(),
    ];
    if fallback {
        extra.push("--ro-fallback-master".into());
    }
    c.add_proxy_with(name, extra).expect("proxy");
    ro
}

async fn lag_on(c: &Cluster, uid: &str, pause: bool) {
    let f = if pause {
        "pg_wal_replay_pause"
    } else {
        "pg_wal_replay_resume"
    };
    c.query(uid, &format!("SELECT {f}()::text"))
        .await
        .expect("replay control");
}

async fn write_mb(c: &Cluster, mb: usize) {
    c.exec_via_proxy(&format!(
        "CREATE TABLE IF NOT EXISTS filler (v text); \
         INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, {})",
        mb * 1000
    ))
    .await
    .expect("write");
}

/// pgbench -S -c4 for 5 s against `port`: transactions per second.
fn pgbench_tps(port: u16) -> f64 {
    let out = std::process::Command::new(testkit::postgres::pg_bin_dir().join("pgbench"))
        .args([
            "-n",
            "-S",
            "-c",
            "4",
            "-j",
            "2",
            "-T",
            "5",
            "-h",
            "127.0.0.1",
        ])
        .args(["-p", &port.to_string(), "-U", sql::SU, "postgres"])
        .env("PGPASSWORD", sql::SU_PASSWORD)
        .output()
        .expect("pgbench");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_sessions_land_on_standbys_within_the_lag_bound() {
    let _s = serial().await;
    let (mut c, mut checker) = running(Opts::default()).await;
    c.wait_healthy(MIN).await.expect("healthy");
    let ro = ro_proxy(&mut c, "ro1", false);
    let ro_fb = ro_proxy(&mut c, "ro2", true);
    let m = c.master().await.expect("master");
    let standbys = c.others(&m);
    let port_of = |c: &Cluster, uid: &str| c.keeper(uid).port;
    let sb_ports: BTreeSet<u16> = standbys.iter().map(|s| port_of(&c, s)).collect();

    // Only standbys, and both of them (least connections, rotating among equals).
    c.wait_for("read-only sessions on both standbys", MIN, async || {
        (spread(ro.0, 12).await == sb_ports).then_some(())
    })
    .await
    .expect("spread");

    // A CancelRequest on the read-only listener reaches the standby running the query...
    let client = sql::connect("127.0.0.1", ro.0, Duration::from_secs(3))
        .await
        .expect("ro session");
    let cancel = client.cancel_token();
    let sleeping = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
    c.wait_for("the query cancelled", MIN, async || {
        let _ = cancel.cancel_query(tokio_postgres::NoTls).await;
        sleeping.is_finished().then_some(())
    })
    .await
    .expect("cancelled");
    let err = sleeping.await.expect("task").expect_err("cancelled");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("57014"),
        "{err:?}"
    );
    // ...and only that one: the client's key is one the proxy minted, which leads to the
    // standby that runs the session, not to both (a cancel the loop above sent after the
    // session ended leads nowhere).
    let log = c.log("ro1");
    let cancels: Vec<&str> = (log.lines())
        .filter(|l| l.contains("cancel request"))
        .collect();
    assert!(
        cancels.iter().any(|l| l.contains("result=\"local\"")),
        "{log}"
    );
    assert!(
        cancels
            .iter()
            .all(|l| l.contains("result=\"local\"") || l.contains("result=\"ended\"")),
        "{cancels:#?}"
    );

    // pgbench -S through the read-only listener against direct to a standby.
    sql::pgbench_init("127.0.0.1", c.proxy_addr(0).1).expect("pgbench -i");
    let a = standbys[0].clone();
    c.wait_for("pgbench tables on the standby", MIN, async || {
        c.query(&a, "SELECT count(*)::text FROM pgbench_branches")
            .await
            .ok()
            .filter(|n| n == "1")
    })
    .await
    .expect("replicated");
    let direct = pgbench_tps(port_of(&c, &a));
    let through = pgbench_tps(ro.0);
    println!(
        "E2E read-only throughput: pgbench -S -c4 -T5: through the proxy's read-only listener {through:.0} tps, direct to one standby {direct:.0} tps (ratio {:.2}; the proxy spreads over two standbys)",
        through / direct.max(1.0)
    );

    // A lagging standby leaves the pool, its read-only sessions are closed, and it comes
    // back once it caught up.
    let held = session_on(&c, ro.0, port_of(&c, &a)).await;
    lag_on(&c, &a, true).await;
    write_mb(&c, 4).await;
    let written = Instant::now();
    c.wait_for("the lagging standby to leave the pool", MIN, async || {
        let seen = spread(ro.0, 6).await;
        (!seen.is_empty() && !seen.contains(&port_of(&c, &a))).then_some(())
    })
    .await
    .expect("left the pool");
    println!(
        "E2E read-only pool: a standby 4 MB behind (limit 1 MB) left the pool {} ms after the write committed",
        written.elapsed().as_millis()
    );
    c.wait_for("its read-only session closed", MIN, async || {
        held.simple_query("SELECT 1").await.is_err().then_some(())
    })
    .await
    .expect("severed");
    lag_on(&c, &a, false).await;
    c.wait_for("the standby back in the pool", MIN, async || {
        spread(ro.0, 12)
            .await
            .contains(&port_of(&c, &a))
            .then_some(())
    })
    .await
    .expect("back");

    // No standby in the pool: 57P03 without the fallback, the master with it.
    for s in &standbys {
        lag_on(&c, s, true).await;
    }
    write_mb(&c, 4).await;
    let master_port = port_of(&c, &m);
    c.wait_for("no standby available", MIN, async || {
        lands(ro.0)
            .await
            .err()
            .filter(|e| e.contains("no standby available"))
    })
    .await
    .expect("57P03");
    c.wait_for("the fallback on the master", MIN, async || {
        (lands(ro_fb.0).await == Ok(master_port)).then_some(())
    })
    .await
    .expect("fallback");
    for s in &standbys {
        lag_on(&c, s, false).await;
    }
    c.wait_for("standbys back", MIN, async || {
        (spread(ro.0, 12).await == sb_ports).then_some(())
    })
    .await
    .expect("back");

    // A switchover promotes standby b: its read-only session is closed, and read-only
    // sessions never land on it again (it is the master now).
    let b = standbys[1].clone();
    let held_b = session_on(&c, ro.0, port_of(&c, &b)).await;
    checker.nemesis();
    let out = c.ctl(&["switchover", "--to", &b, "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Closed before the promotion: the keeper promotes only once the proxies reported the
    // generation of the write that took b out of their pools.
    assert!(
        held_b.simple_query("SELECT 1").await.is_err(),
        "a read-only session on the promoted standby is closed"
    );
    c.wait_for("sessions on the new standbys only", MIN, async || {
        let seen = spread(ro.0, 12).await;
        (!seen.is_empty() && !seen.contains(&port_of(&c, &b))).then_some(())
    })
    .await
    .expect("not on the new master");
    let out = c
        .finish_with("read_only", checker, true)
        .await
        .expect("invariants");
    assert_eq!(out.master, b);
}
