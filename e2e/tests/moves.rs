//! Sessions move to the new master at a planned switchover (issue 20, point 1), with real
//! keepers, sentinel and a proxy terminating the session and authenticating its clients:
//! a session that only changed settings and prepared statements keeps its socket, its
//! settings, its statements and its cancel key on the new master, and never sees an
//! error; a session holding a temporary table or a custom setting is closed at its
//! boundary, as before, and counted by reason. A read-only session whose standby leaves
//! the pool (point 5) moves to another standby the same way.

use e2e::moves::*;
use e2e::sql;
use std::time::Duration;
use testkit::free_port;
use tokio_postgres::error::SqlState;

/// Whether the session's server is in recovery, and its statement_timeout.
async fn recovery_and_timeout(a: &tokio_postgres::Client) -> (bool, String) {
    let row = a
        .query_one(
            "SELECT pg_is_in_recovery(), current_setting('statement_timeout')",
            &[],
        )
        .await
        .expect("the session still works");
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_moves_idle_sessions_with_their_settings_statements_and_cancel_key() {
    let _s = e2e::serial().await;
    let env = Movable::start().await;
    let (c, port) = (&env.c, env.port);
    let a = as_alice(port).await.expect("alice");
    let before = server_port(&a).await;
    assert_eq!(
        count(&metrics(env.metrics).await, "moved"),
        0,
        "nothing moved yet"
    );
    a.batch_execute("SET statement_timeout = '1234ms'; SET search_path = public, pg_catalog")
        .await
        .expect("settings");
    let stmt = a
        .prepare("SELECT $1::int + 1")
        .await
        .expect("a named statement");
    // A session for each state that cannot move, and the reason it is counted under.
    let unmovable = [
        ("temp_table", "CREATE TEMP TABLE mine (x int)"),
        ("custom_setting", "SET app.tenant = 'acme'"),
        ("listen", "LISTEN news"),
        ("advisory_lock", "SELECT pg_advisory_lock(42)"),
        (
            "hold_cursor",
            "BEGIN; DECLARE kept CURSOR WITH HOLD FOR SELECT 1; COMMIT",
        ),
        ("sql_prepare", "PREPARE p AS SELECT 1"),
    ];
    let mut stuck = Vec::new();
    for (reason, sql) in unmovable {
        let s = as_alice(port).await.expect("session");
        s.batch_execute(sql).await.expect(reason);
        stuck.push((reason, s));
    }
    let target = env.target().await;
    env.switchover(&target);
    let text = c
        .wait_for("the drained sessions counted", MIN, async || {
            let t = metrics(env.metrics).await;
            let closed: u64 = unmovable.iter().map(|(r, _)| count(&t, r)).sum();
            // The movable session, and each of the others.
            let all = unmovable.len() as u64 + 1;
            (count(&t, "moved") + closed >= all).then_some(t)
        })
        .await
        .expect("counted");
    assert_eq!(count(&text, "moved"), 1, "{text}");
    for (reason, _) in unmovable {
        assert_eq!(count(&text, reason), 1, "{reason}: {text}");
    }
    let (ms, n) = move_after_route_ms(&text);
    println!(
        "E2E moves at a switchover: {n} moved, {ms:.2} ms each once the new master was routed"
    );
    // It logged in to the target and replayed there during the drain, not after the route.
    assert_eq!(prepared(&text, "used"), 1, "{text}");

    // The moved session: the same socket, on the new master, with its state.
    let after = server_port(&a).await;
    assert_ne!(after, before, "on the new master");
    let row = a
        .query_one("SELECT pg_is_in_recovery(), current_setting('statement_timeout'), current_setting('search_path')", &[])
        .await
        .expect("the session still works");
    assert!(!row.get::<_, bool>(0), "the new master takes writes");
    assert_eq!(row.get::<_, String>(1), "1234ms");
    assert_eq!(row.get::<_, String>(2), "public, pg_catalog");
    let row = a.query_one(&stmt, &[&41]).await.expect("the statement");
    assert_eq!(
        row.get::<_, i32>(0),
        42,
        "the prepared statement runs there"
    );
    // Its cancel key leads to its new backend.
    let sleep = "SET statement_timeout = 0; SELECT pg_sleep(30)";
    let e = testkit::cancel::cancel_running(&a, sleep, Duration::from_millis(500)).await;
    assert_eq!(e.code(), Some(&SqlState::QUERY_CANCELED), "{e}");

    // The unmovable ones were closed at their boundary, as before moves.
    for (name, s) in &stuck {
        let e = s
            .query_one("SELECT 1", &[])
            .await
            .expect_err(&format!("{name}: closed"));
        assert!(
            e.is_closed() || e.code() == Some(&SqlState::ADMIN_SHUTDOWN),
            "{name}: {e}"
        );
    }
}

/// pgbench -M prepared, a client we did not write, keeps its sessions (and their prepared
/// statements) through a switchover: no client aborts, no transaction fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_runs_through_a_switchover_without_an_error() {
    let _s = e2e::serial().await;
    let env = Movable::start().await;
    let c = &env.c;
    let m = c.master().await.expect("master");
    let (maddr, mport) = c.pg_addr(&m);
    let pgbench = testkit::postgres::pg_bin_dir().join("pgbench");
    sql::pgbench_init(&maddr, mport).expect("pgbench -i");
    c.exec_via_proxy(
        "GRANT SELECT, INSERT, UPDATE ON pgbench_accounts, pgbench_branches, pgbench_tellers, \
         pgbench_history TO alice",
    )
    .await
    .expect("grants");
    let target = env.target().await;
    let run = tokio::process::Command::new(&pgbench)
        .args(["-n", "-M", "prepared", "-c", "4", "-j", "2", "-T", "12"])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &env.port.to_string(),
            "-U",
            "alice",
        ])
        .arg("postgres")
        .env("PGPASSWORD", "alice-pw")
        .stdin(std::process::Stdio::null())
        .output();
    let switch = async {
        // Its sessions are open and prepared by then.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let moved = count(&metrics(env.metrics).await, "moved");
        env.switchover(&target);
        moved
    };
    let (out, moved_before) = tokio::join!(run, switch);
    let out = out.expect("pgbench");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(moved_before, 0);
    assert!(out.status.success(), "pgbench failed: {stdout}{stderr}");
    assert!(
        stdout.contains("number of failed transactions: 0"),
        "{stdout}"
    );
    assert!(!stderr.contains("aborted"), "{stderr}");
    let text = metrics(env.metrics).await;
    assert_eq!(
        count(&text, "moved"),
        4,
        "each client's session moved: {text}"
    );
    assert_ne!(c.master().await.expect("master"), m, "the master changed");
}

/// Point 5: a read-only session whose standby leaves the pool (its replay paused, so it falls
/// past the lag bound) moves to the other standby with its settings and statements.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_session_moves_to_another_standby_when_its_standby_leaves_the_pool() {
    let _s = e2e::serial().await;
    let ro = free_port();
    let extra = vec![
        "--ro-port".to_string(),
        ro.0.to_string(),
        "--ro-max-lag".into(),
        "1MB".into(),
    ];
    let env = Movable::start_with(3, extra).await;
    let c = &env.c;
    let m = c.master().await.expect("master");
    let standbys = c.others(&m);
    for s in &standbys {
        env.wait_alice_on(s).await;
    }
    let a = c
        .wait_for("alice on the read-only listener", MIN, async || {
            as_alice(ro.0).await.ok()
        })
        .await
        .expect("a read-only session");
    let before = server_port(&a).await;
    let (from, to): (Vec<_>, Vec<_>) = standbys.iter().partition(|s| c.keeper(s).port == before);
    let (from, to) = (from[0].clone(), to[0].clone());
    a.batch_execute("SET statement_timeout = '4321ms'")
        .await
        .expect("a setting");
    let stmt = a.prepare("SELECT $1::int * 2").await.expect("a statement");

    c.query(&from, "SELECT pg_wal_replay_pause()::text")
        .await
        .expect("pause");
    c.exec_via_proxy(
        "CREATE TABLE filler (v text); \
         INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 4000)",
    )
    .await
    .expect("4 MB written");
    c.wait_for("the session moved", MIN, async || {
        (count(&metrics(env.metrics).await, "moved") == 1).then_some(())
    })
    .await
    .expect("moved");
    assert_eq!(
        server_port(&a).await,
        c.keeper(&to).port,
        "on the other standby"
    );
    let (standby, timeout) = recovery_and_timeout(&a).await;
    assert!(standby, "still on a standby");
    assert_eq!(timeout, "4321ms");
    let row = a.query_one(&stmt, &[&21]).await.expect("the statement");
    assert_eq!(row.get::<_, i32>(0), 42);
    c.query(&from, "SELECT pg_wal_replay_resume()::text")
        .await
        .expect("resume");

    // Its new standby is promoted: the session moves on to a standby again.
    env.switchover(&to);
    // At least once more: read every 100 ms, two moves can land in one reading (a second
    // session of this proxy's listener, or this one moved again as the standbys re-point at
    // the new master); where the session ends up is checked below.
    c.wait_for("the session moved again", MIN, async || {
        (count(&metrics(env.metrics).await, "moved") >= 2).then_some(())
    })
    .await
    .expect("moved again");
    let (standby, timeout) = recovery_and_timeout(&a).await;
    assert!(standby, "on a standby, not the promoted one");
    assert_eq!(timeout, "4321ms");
    assert_ne!(server_port(&a).await, c.keeper(&to).port);
}

/// Point 2: kill -9 of the master's keeper and PostgreSQL. An idle session whose state the
/// proxy proved (a setting and a prepared statement, each seen by an inspection the proxy
/// made when the session changed them) moves to the new master with them; an idle one
/// holding an advisory lock (taken by a simple query, or by a prepared statement's
/// execution) is closed with 57P01; one with a request in flight at the kill gets an error,
/// as without moves; so does an idle one through a proxy run with `--session-moves
/// switchover`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_failover_moves_idle_sessions_whose_state_the_proxy_proved() {
    let _s = e2e::serial().await;
    let mut env = Movable::start().await;
    let port = env.port;
    // A proxy that moves sessions only at switchovers: its sessions are cut as before.
    let pw = env.dir.path().join("auth.pw").display().to_string();
    let p3 = [
        "--client-tls",
        "terminate",
        "--auth-user",
        "proxyauth",
        "--auth-passwordfile",
    ];
    let p3: Vec<String> = (p3.iter().map(|s| s.to_string()))
        .chain([pw, "--session-moves".into(), "switchover".into()])
        .collect();
    env.c.add_proxy_with("p3", p3).expect("p3");
    let p3 = env.c.proxy_addr(2).1;
    let untracked = env
        .c
        .wait_for("alice through p3", MIN, async || as_alice(p3).await.ok())
        .await
        .expect("p3 session");
    let a = as_alice(port).await.expect("alice");
    let before = server_port(&a).await;
    a.batch_execute("SET statement_timeout = '2345ms'")
        .await
        .expect("a setting");
    let stmt = a.prepare("SELECT $1::int + 2").await.expect("a statement");
    a.query_one(&stmt, &[&1]).await.expect("executed once");
    a.query_one("SELECT count(*) FROM pg_class", &[])
        .await
        .expect("a clean query");
    let locked = as_alice(port).await.expect("second session");
    locked
        .batch_execute("SELECT pg_advisory_lock(7)")
        .await
        .expect("a lock");
    // The same through a prepared statement: its execution is what the proxy judges.
    let locked_prepared = as_alice(port).await.expect("another session");
    locked_prepared
        .query_one("SELECT pg_advisory_lock(8)::text", &[])
        .await
        .expect("a lock");
    let busy = as_alice(port).await.expect("third session");
    let in_flight = tokio::spawn(async move {
        busy.batch_execute("SET statement_timeout = 0; SELECT pg_sleep(60)")
            .await
    });
    let target = env.target().await;
    let m = env.c.master().await.expect("master");
    // An administrator's pg_terminate_backend of an idle, proven session: its server still
    // serves, so the end was the server's decision: the client gets the server's own error.
    let ended = as_alice(port).await.expect("fourth session");
    let pid: i32 = (ended.query_one("SELECT pg_backend_pid()", &[]).await)
        .expect("pid")
        .get(0);
    (env.c
        .query(&m, &format!("SELECT pg_terminate_backend({pid})::text"))
        .await)
        .expect("terminated");
    env.c
        .wait_for("the end counted", MIN, async || {
            (count(&metrics(env.metrics).await, "server_ended") == 1).then_some(())
        })
        .await
        .expect("server_ended");
    let e = ended.query_one("SELECT 1", &[]).await.expect_err("ended");
    assert!(
        e.is_closed() || e.code() == Some(&SqlState::ADMIN_SHUTDOWN),
        "{e}"
    );
    // The sleep is running before the kill.
    env.c
        .wait_for("the sleep running", MIN, async || {
            let n = env
                .c
                .query(
                    &m,
                    "SELECT count(*)::text FROM pg_stat_activity WHERE query LIKE '%pg_sleep(60)%' AND state = 'active' AND pid <> pg_backend_pid()",
                )
                .await
                .ok()?;
            (n == "1").then_some(())
        })
        .await
        .expect("sleeping");
    env.c.kill_keeper(&m, true);
    let new = env
        .c
        .wait_master_change(&m, Duration::from_secs(120))
        .await
        .expect("failover");
    assert_eq!(new, target);
    let text = env
        .c
        .wait_for("the lost sessions counted", MIN, async || {
            let t = metrics(env.metrics).await;
            (count(&t, "moved") + count(&t, "unproven") + count(&t, "in_flight") >= 4).then_some(t)
        })
        .await
        .unwrap_or_else(|e| {
            let moves: Vec<String> = (env.c.log("p2").lines())
                .filter(|l| l.contains("session") || l.contains("move"))
                .map(String::from)
                .collect();
            panic!("{e}: {moves:#?}")
        });
    let log = env.c.log("p2");
    let lines: Vec<&str> = (log.lines())
        .filter(|l| l.contains("session") || l.contains("move") || l.contains("inspect"))
        .collect();
    assert_eq!(count(&text, "moved"), 1, "{text}{lines:#?}");
    let (ms, n) = move_after_route_ms(&text);
    println!("E2E moves after a kill -9 failover: {n} moved, {ms:.2} ms each once the new master was routed");
    // It logged in to the elected standby (and checked its catalog) before it was routed.
    assert_eq!(prepared(&text, "used"), 1, "{text}");
    assert_eq!(count(&text, "unproven"), 2, "{text}");
    assert_eq!(count(&text, "in_flight"), 1, "{text}");

    // The proven session: the same socket, on the new master, with its state.
    assert_ne!(server_port(&a).await, before, "on the new master");
    let (standby, timeout) = recovery_and_timeout(&a).await;
    assert!(!standby, "the new master takes writes");
    assert_eq!(timeout, "2345ms");
    let row = a.query_one(&stmt, &[&40]).await.expect("the statement");
    assert_eq!(row.get::<_, i32>(0), 42);

    // The lock holders: closed with 57P01 (their locks are gone with the old master).
    for s in [&locked, &locked_prepared] {
        let e = s.query_one("SELECT 1", &[]).await.expect_err("closed");
        assert!(
            e.is_closed() || e.code() == Some(&SqlState::ADMIN_SHUTDOWN),
            "{e}"
        );
    }
    // Not tracked for a failover (--session-moves switchover): cut, as without moves.
    untracked
        .query_one("SELECT 1", &[])
        .await
        .expect_err("cut with its server");
    // The request in flight: an error.
    let slept = in_flight.await.expect("task");
    assert!(slept.is_err(), "the sleep's session was lost: {slept:?}");
}
