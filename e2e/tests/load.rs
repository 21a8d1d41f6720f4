//! Under load (scenarios.md, "Under load"): pgbench (TPC-B-like, through the proxy) and the
//! acknowledged-write checker run while the master's keeper and PostgreSQL are killed;
//! writes resume on the new master, the time to the first acknowledged write is reported,
//! and every acknowledged write is checked afterwards.

use e2e::{serial, Checker, Cluster, Opts};
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn pgbench(args: &[&str], port: u16) -> Command {
    let mut cmd = Command::new(testkit::postgres::pg_bin_dir().join("pgbench"));
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(args)
        .arg("postgres")
        .env("PGPASSWORD", e2e::sql::SU_PASSWORD)
        .env("PGCONNECT_TIMEOUT", "2")
        .stdin(Stdio::null());
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_through_the_proxy_while_the_master_is_killed() {
    let _s = serial().await;
    let mut c = Cluster::start(Opts {
        spec: json!({"synchronousReplication": true, "minSynchronousStandbys": 1,
            "maxSynchronousStandbys": 1}),
        ..Default::default()
    })
    .await
    .expect("cluster");
    let port = c.proxies[0].port;
    let init = pgbench(&["-i", "-s", "1", "-q"], port)
        .output()
        .expect("pgbench -i");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let mut checker = Checker::start(&c);
    // pgbench ends a client on a lost connection: run it again and again until the end.
    let stop_at = Instant::now() + Duration::from_secs(30);
    let bench = tokio::task::spawn_blocking(move || {
        let mut tx = 0u64;
        let mut runs = 0;
        while Instant::now() < stop_at {
            let left = stop_at
                .saturating_duration_since(Instant::now())
                .as_secs()
                .max(1);
            let out = pgbench(&["-c", "4", "-j", "2", "-T", &left.to_string()], port)
                .output()
                .expect("pgbench");
            runs += 1;
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(n) = text
                .lines()
                .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            {
                tx += n
                    .split('/')
                    .next()
                    .unwrap_or("0")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
            if !out.status.success() {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        (tx, runs)
    });
    tokio::time::sleep(Duration::from_secs(6)).await;
    let m = c.master().await.expect("master");
    checker.nemesis();
    c.kill_keeper(&m, true);
    c.wait_master_change(&m, Duration::from_secs(60))
        .await
        .expect("failover");
    let (tx, runs) = bench.await.expect("pgbench runs");
    c.restart_keeper(&m).expect("restart");
    let out = c
        .finish("pgbench_kill_master", checker)
        .await
        .expect("invariants");
    eprintln!(
        "pgbench under failover: {tx} transactions in {runs} runs over 30 s; writes resumed \
         {:?} after the kill",
        out.resumed
    );
    assert!(tx > 0);
    assert!(out.resumed.is_some());
    assert_eq!(
        out.missing, 0,
        "synchronous replication: nothing acknowledged is lost"
    );
}
