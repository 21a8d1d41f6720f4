//! Failover scenarios (scenarios.md, "Failover"): each runs the acknowledged-write checker
//! and the single-master check through `Cluster::finish`.

use e2e::{serial, Checker, Cluster, Opts};
use serde_json::json;
use std::time::Duration;

fn sync_spec() -> serde_json::Value {
    json!({"synchronousReplication": true, "minSynchronousStandbys": 1, "maxSynchronousStandbys": 1})
}

async fn kill_master_keeper_and_postgres(name: &str, spec: serde_json::Value) {
    let mut c = Cluster::start(Opts {
        spec,
        ..Default::default()
    })
    .await
    .expect("cluster");
    let mut checker = Checker::start(&c);
    assert!(
        checker.wait_acks(50, Duration::from_secs(20)).await,
        "writes before the kill"
    );
    let old = c.master().await.expect("master");
    checker.nemesis();
    c.kill_keeper(&old, true);
    let new = c
        .wait_master_change(&old, Duration::from_secs(60))
        .await
        .expect("failover");
    assert_ne!(new, old);
    c.restart_keeper(&old)
        .expect("restart the old master's keeper");
    let out = c.finish(name, checker).await.expect("invariants");
    assert_ne!(out.master, old, "a standby was elected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_master_keeper_and_postgres_async() {
    let _s = serial().await;
    kill_master_keeper_and_postgres("kill9_master_async", json!({})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_master_keeper_and_postgres_sync() {
    let _s = serial().await;
    kill_master_keeper_and_postgres("kill9_master_sync", sync_spec()).await;
}
