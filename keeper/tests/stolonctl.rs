//! stolonctl against a real cluster (etcd, a sentinel, two keepers with PostgreSQL 15, a
//! proxy): status as text and JSON, update with a merge patch, clear errors, removekeeper
//! refusing the master, a switchover under a write load losing no acknowledged write
//! (synchronous replication), failkeeper causing a failover.

mod common;

use common::*;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

fn stolonctl_bin() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_stolon-keeper")).with_file_name("stolonctl");
    assert!(
        exe.exists(),
        "{} missing: cargo build --workspace --bins",
        exe.display()
    );
    exe
}

fn ctl(env: &Env, args: &[&str]) -> Output {
    Command::new(stolonctl_bin())
        .args([
            "--cluster-name",
            CLUSTER,
            "--store-endpoints",
            &env.etcd.endpoint(),
        ])
        .args(args)
        .output()
        .expect("stolonctl")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stolonctl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn err(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "stolonctl should fail: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const SPEC: &str = r#"{"initMode": "new", "sleepInterval": "1s", "failInterval": "4s",
    "proxyCheckInterval": "1s", "proxyTimeout": "3s",
    "synchronousReplication": true, "minSynchronousStandbys": 1, "maxSynchronousStandbys": 1,
    "pgParameters": {"fsync": "off"}}"#;

/// Writes unique ids through the proxy until stopped; returns the acknowledged ones.
fn spawn_writer(
    port: u16,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<Vec<i64>> {
    tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut id = 0i64;
        let mut client = None;
        while !stop.is_cancelled() {
            if client.is_none() {
                client = connect(port).await.ok();
            }
            let Some(c) = client.as_ref() else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            id += 1;
            match c.execute("INSERT INTO acked VALUES ($1)", &[&id]).await {
                Ok(_) => acked.push(id),
                Err(_) => client = None,
            }
        }
        acked
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stolonctl_on_a_real_cluster() {
    let _serial = serial().await;
    let env = Env::new().await;

    // Errors that name the problem and the fix.
    let e = err(&ctl(&env, &["status"]));
    assert!(
        e.contains("no cluster") && e.contains("stolonctl init"),
        "{e}"
    );
    let out = Command::new(stolonctl_bin())
        .args([
            "--store-endpoints",
            "http://127.0.0.1:1",
            "--store-timeout",
            "1s",
            "status",
        ])
        .output()
        .expect("stolonctl");
    let e = err(&out);
    assert!(e.contains("store"), "{e}");
    let e = err(&ctl(
        &env,
        &[
            "init",
            r#"{"initMode": "new", "maxSynchronousStandbys": 0}"#,
        ],
    ));
    assert!(e.contains("maxSynchronousStandbys"), "{e}");

    // init over an existing cluster asks first, as Go stolon's does; with no answer (no
    // terminal, stdin closed) nothing is overwritten.
    ok(&ctl(&env, &["init", SPEC]));
    let e = err(&ctl(&env, &["init", SPEC]));
    assert!(e.contains("not confirmed") && e.contains("-y"), "{e}");

    let _sentinel = env.sentinel(SPEC);
    let k1 = env.keeper("k1", &["--priority", "5"]);
    let k2 = env.keeper("k2", &[]);
    let (_proxy, proxy_port) = env.proxy();
    wait_for(
        &env,
        "a master with a synchronous standby, routed",
        Duration::from_secs(90),
        async || {
            let st: serde_json::Value =
                serde_json::from_str(&ok(&ctl(&env, &["status", "-f", "json"]))).ok()?;
            let standby_ok = st["keepers"]
                .as_array()?
                .iter()
                .all(|k| k["pg_healthy"] == true);
            let routed = !st["proxy_master_db"].is_null();
            (standby_ok && routed && can_write(proxy_port.0).await).then_some(())
        },
    )
    .await;
    // Init picks among the keepers seen first: either may be master.
    let st: serde_json::Value =
        serde_json::from_str(&ok(&ctl(&env, &["status", "-f", "json"]))).expect("json");
    let m = st["cluster"]["master_keeper_uid"]
        .as_str()
        .expect("master")
        .to_string();
    let (s, s_port) = if m == "k1" {
        ("k2", k2.port.0)
    } else {
        ("k1", k1.port.0)
    };
    let text = ok(&ctl(&env, &["status"]));
    assert!(
        text.contains("(leader)") && text.contains(&format!("master: {m}")),
        "{text}"
    );
    assert!(text.contains(&format!("└─{s}")), "the tree: {text}");

    // update -p: merged and validated; an invalid patch is refused with the field.
    let spec = ok(&ctl(
        &env,
        &["update", "-p", r#"{"pgParameters": {"work_mem": "8MB"}}"#],
    ));
    assert!(
        spec.contains("work_mem") && spec.contains("synchronousReplication"),
        "{spec}"
    );
    let e = err(&ctl(&env, &["update", "-p", r#"{"proxyTimeout": "1s"}"#]));
    assert!(e.contains("proxyCheckInterval"), "{e}");

    // removekeeper refuses the master's keeper.
    let e = err(&ctl(&env, &["removekeeper", &m]));
    assert!(e.contains("hosts the master"), "{e}");

    // Switchover to the standby under a write load: no acknowledged write lost.
    let c = connect(proxy_port.0).await.expect("connect");
    c.batch_execute("CREATE TABLE acked (id bigint PRIMARY KEY)")
        .await
        .expect("table");
    drop(c);
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = spawn_writer(proxy_port.0, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let out = ok(&ctl(
        &env,
        &["switchover", "--to", s, "--wait", "--timeout", "60s"],
    ));
    eprintln!("stolonctl switchover --to {s} --wait:\n{out}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let acked = writer.await.expect("writer");
    assert!(acked.len() > 10, "writes went on: {}", acked.len());
    let c = connect(s_port).await.expect("new master");
    let rows = c.query("SELECT id FROM acked", &[]).await.expect("ids");
    let have: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    let lost: Vec<&i64> = acked.iter().filter(|id| !have.contains(id)).collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    let text = ok(&ctl(&env, &["status"]));
    assert!(text.contains(&format!("master: {s}")), "{text}");

    // failkeeper fails the master over (back to k1 once it is in sync).
    wait_for(
        &env,
        "k1 back in sync",
        Duration::from_secs(60),
        async || {
            let st: serde_json::Value =
                serde_json::from_str(&ok(&ctl(&env, &["status", "-f", "json"]))).ok()?;
            st["keepers"]
                .as_array()?
                .iter()
                .all(|k| {
                    k["pg_healthy"] == true
                        && k["pg_current_generation"] == k["pg_wanted_generation"]
                })
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ok(&ctl(&env, &["failkeeper", s]));
    wait_for(
        &env,
        "a failover back",
        Duration::from_secs(60),
        async || {
            let text = ok(&ctl(&env, &["status"]));
            (text.contains(&format!("master: {m}")) && can_write(proxy_port.0).await).then_some(())
        },
    )
    .await;
}
