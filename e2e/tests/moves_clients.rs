//! Clients we did not write keep writing through master changes (issue 20's goals):
//! psycopg2 (libpq, autocommit simple queries), pgx (its statement cache: named prepared
//! statements) and pgjdbc (server-side prepared statements), each an application writer with
//! one session through a proxy that moves sessions (built by scripts/clients.sh). Through a
//! planned switchover: no error, every acknowledged write on the new master. Through a
//! kill -9 failover: at most the one write each had in flight fails.

use e2e::moves::*;
use std::collections::BTreeMap;
use std::time::Duration;

/// The three writers through `port` for `secs` seconds.
fn writers(port: u16, secs: u64) -> Vec<(&'static str, tokio::process::Command)> {
    let conninfo = format!(
        "host=127.0.0.1 port={port} user=alice password=alice-pw dbname=postgres sslmode=disable connect_timeout=10"
    );
    let mut psycopg2 = tokio::process::Command::new("/usr/bin/python3");
    psycopg2.arg(testkit::workspace_path("clients/psycopg2_client.py"));
    let mut pgx = tokio::process::Command::new(testkit::built_client("pgx-client"));
    for c in [&mut psycopg2, &mut pgx] {
        c.env("CONNINFO", &conninfo)
            .env("MODE", "writer")
            .env("SECS", secs.to_string());
    }
    let url =
        format!("jdbc:postgresql://127.0.0.1:{port}/postgres?sslmode=disable&connectTimeout=10");
    let mut pgjdbc = tokio::process::Command::new("java");
    pgjdbc
        .arg("-cp")
        .arg(testkit::built_client("postgresql.jar"))
        .arg(testkit::workspace_path("clients/pgjdbc/Client.java"))
        .args([
            url.as_str(),
            "alice",
            "alice-pw",
            "writer",
            &secs.to_string(),
        ]);
    vec![("psycopg2", psycopg2), ("pgx", pgx), ("pgjdbc", pgjdbc)]
}

/// A writer's report: acknowledged writes, errors, and its output.
struct Report {
    writes: u64,
    errors: u64,
    text: String,
}

fn report(out: std::process::Output) -> Report {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}{err}");
    let last = text
        .lines()
        .find_map(|l| l.strip_prefix("writes "))
        .unwrap_or_else(|| panic!("no report: {text}{err}"));
    let f: Vec<u64> = last
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    Report {
        writes: f[0],
        errors: f[1],
        text,
    }
}

/// Rows each client wrote, on the master.
async fn rows(env: &Movable) -> BTreeMap<String, u64> {
    let m = env.c.master().await.expect("master");
    let text = env
        .c
        .query(
            &m,
            "SELECT coalesce(string_agg(client || '=' || n, ','), '') FROM \
             (SELECT client, count(*) AS n FROM client_writes GROUP BY client) t",
        )
        .await
        .expect("rows");
    (text.split(','))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap_or(0)))
        .collect()
}

type Running = Vec<(
    &'static str,
    tokio::task::JoinHandle<std::io::Result<std::process::Output>>,
)>;

/// Starts the writers for `secs`; returns once each has written for a while.
async fn start(env: &Movable, secs: u64) -> Running {
    let running: Running = writers(env.port, secs)
        .into_iter()
        .map(|(name, mut cmd)| {
            cmd.kill_on_drop(true);
            (name, tokio::spawn(async move { cmd.output().await }))
        })
        .collect();
    let before = rows(env).await;
    env.c
        .wait_for("each writer writing", MIN, async || {
            let now = rows(env).await;
            let n = |m: &BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
            let wrote = |k: &str| n(&now, k) >= n(&before, k) + 20;
            ["psycopg2", "pgx", "pgjdbc"]
                .iter()
                .all(|k| wrote(k))
                .then_some(())
        })
        .await
        .expect("writing");
    running
}

/// Waits for the writers' reports.
async fn finish(running: Running) -> BTreeMap<&'static str, Report> {
    let mut out = BTreeMap::new();
    for (name, task) in running {
        // A writer runs its seconds, plus a session's wait for a new master at most.
        let o = tokio::time::timeout(Duration::from_secs(90), task)
            .await
            .unwrap_or_else(|_| panic!("{name} hung"))
            .expect("task")
            .expect("the writer runs");
        out.insert(name, report(o));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg2_pgx_and_pgjdbc_writers_through_a_switchover_and_a_kill_9_failover() {
    let _s = e2e::serial().await;
    let mut env = Movable::start().await;
    env.c
        .exec_via_proxy(
            "CREATE TABLE client_writes (client text, n int); GRANT INSERT ON client_writes TO alice",
        )
        .await
        .expect("table");
    let target = env.target().await;

    // A planned switchover: no error, nothing acknowledged lost.
    let running = start(&env, 12).await;
    env.switchover(&target);
    let seen = finish(running).await;
    let on_new = rows(&env).await;
    for (name, r) in &seen {
        assert_eq!(r.errors, 0, "{name} through the switchover: {}", r.text);
        assert_eq!(
            on_new.get(*name).copied(),
            Some(r.writes),
            "{name}: every write acknowledged is on the new master"
        );
        println!(
            "E2E moves, {name} through a switchover: {} writes, 0 errors",
            r.writes
        );
    }
    let moved = count(&metrics(env.metrics).await, "moved");
    assert!(moved >= 3, "each writer's session moved: {moved}");

    // kill -9 of the master: at most the write in flight fails, per writer.
    let m = env.c.master().await.expect("master");
    let running = start(&env, 15).await;
    env.c.kill_keeper(&m, true);
    env.c
        .wait_master_change(&m, Duration::from_secs(120))
        .await
        .expect("failover");
    let seen = finish(running).await;
    let text = metrics(env.metrics).await;
    for (name, r) in &seen {
        assert!(
            r.errors <= 1,
            "{name} through a kill -9 failover: {}",
            r.text
        );
        let errors: Vec<&str> = r.text.lines().filter(|l| l.starts_with("error")).collect();
        println!(
            "E2E moves, {name} through a kill -9 failover: {} writes, {} errors {errors:?}",
            r.writes, r.errors
        );
    }
    println!(
        "E2E moves, proxy counts after both changes: moved {}, in flight {}, unproven {}, server ended {}",
        count(&text, "moved"),
        count(&text, "in_flight"),
        count(&text, "unproven"),
        count(&text, "server_ended")
    );
}
