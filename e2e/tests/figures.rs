//! The figures of the issue, from the suite's own checker: time from a kill -9 to the first
//! acknowledged write through the proxy, p50 over 5 runs each, with the suite's timings
//! (failInterval 5 s) and with stolon's default spec (sleepInterval 5 s, failInterval 20 s,
//! proxyCheckInterval 5 s, proxyTimeout 15 s); and for a PostgreSQL-only crash.
//! Ignored in CI (about 15 minutes): `scripts/test.sh --long`, or
//! `cargo test -p e2e --test figures -- --ignored --nocapture`.

use e2e::{serial, Checker, Cluster, Opts};
use serde_json::{json, Value};
use std::time::Duration;

const RUNS: usize = 5;

fn defaults() -> Value {
    json!({"sleepInterval": "5s", "failInterval": "20s", "proxyCheckInterval": "5s",
        "proxyTimeout": "15s"})
}

/// One run: the time from the nemesis to the first acknowledged write on the final master.
async fn once(spec: Value, keeper_too: bool) -> Duration {
    let mut c = Cluster::start(Opts {
        spec,
        ..Default::default()
    })
    .await
    .expect("cluster");
    let mut checker = Checker::start(&c);
    assert!(checker.wait_acks(50, Duration::from_secs(60)).await);
    let m = c.master().await.expect("master");
    checker.nemesis();
    if keeper_too {
        c.kill_keeper(&m, true);
        c.wait_master_change(&m, Duration::from_secs(120))
            .await
            .expect("failover");
        c.restart_keeper(&m).expect("restart");
    } else {
        c.crash_postgres(&m).expect("crash");
    }
    let out = c.finish("figure", checker).await.expect("invariants");
    out.resumed.expect("writes resumed")
}

fn p50(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn figure(what: &str, spec: Value, keeper_too: bool) {
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        runs.push(once(spec.clone(), keeper_too).await);
    }
    eprintln!(
        "FIGURE {what}: first acknowledged write through the proxy after the kill: p50 {:?} \
         over {RUNS} runs {runs:?}",
        p50(runs.clone())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "figures: about 15 minutes (scripts/test.sh --long)"]
async fn failover_figures() {
    let _s = serial().await;
    // E2E_FIGURES=default measures only stolon's default spec, =pgcrash only the
    // PostgreSQL-only crash, =sync only synchronous replication.
    let only = std::env::var("E2E_FIGURES").unwrap_or_default();
    if only == "sync" || only.is_empty() {
        let sync = json!({"synchronousReplication": true, "minSynchronousStandbys": 1,
            "maxSynchronousStandbys": 1});
        figure(
            "kill -9 master keeper+postgres, synchronous replication, failInterval 5s",
            sync.clone(),
            true,
        )
        .await;
        // PostgreSQL's default status interval, as before the keeper set 1 s: writers wait
        // for the synchronous standby's next reply.
        let mut before = sync;
        before["pgParameters"] = json!({"wal_receiver_status_interval": "10s"});
        figure(
            "the same with wal_receiver_status_interval 10s (PostgreSQL's default)",
            before,
            true,
        )
        .await;
        if only == "sync" {
            return;
        }
    }
    let suite = only != "default" && only != "pgcrash";
    if suite {
        figure(
            "kill -9 master keeper+postgres, failInterval 5s",
            json!({}),
            true,
        )
        .await;
    }
    if only != "pgcrash" {
        figure(
            "kill -9 master keeper+postgres, default spec (failInterval 20s)",
            defaults(),
            true,
        )
        .await;
    }
    if suite || only == "pgcrash" {
        figure("kill -9 postgres only, failInterval 5s", json!({}), false).await;
    }
    figure("kill -9 postgres only, default spec", defaults(), false).await;
}
