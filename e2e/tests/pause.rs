//! Maintenance pause (issue 14, point 3) with real processes: while paused the sentinel
//! observes a dead master and says so but does not fail over; `resume` lets the failover
//! happen; a pause with a deadline ends by itself. Each runs the acknowledged-write checker
//! and ends healthy (`Cluster::finish`).

use e2e::{running, serial, Cluster, Opts};
use std::process::Output;
use std::time::Duration;

const MIN: Duration = Duration::from_secs(60);

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "stolonctl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits for the positive sign of a held-back failover: the sentinel's report that the
/// master failed and that it does not fail over while paused.
async fn held_back(c: &Cluster, master: &str) {
    c.wait_for("the sentinel to hold the failover back", MIN, async || {
        c.log("s1")
            .contains("no failover while paused")
            .then_some(())
    })
    .await
    .expect("held back");
    assert_eq!(
        c.master().await.as_deref(),
        Some(master),
        "no failover while paused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_prevents_a_failover_and_resume_lets_it_happen() {
    let _s = serial().await;
    let (mut c, mut checker) = running(Opts::default()).await;
    let m = c.master().await.expect("master");
    ok(c.ctl(&["pause", "--reason", "e2e maintenance"]));
    let status = ok(c.ctl(&["status"]));
    assert!(
        status.contains("PAUSED") && status.contains("e2e maintenance"),
        "{status}"
    );
    let out = c.ctl(&["switchover"]);
    assert!(
        !out.status.success(),
        "a switchover is refused while paused"
    );
    checker.nemesis();
    c.kill_keeper(&m, true);
    held_back(&c, &m).await;
    ok(c.ctl(&["resume"]));
    let new = c
        .wait_master_change(&m, MIN)
        .await
        .expect("the failover happens after resume");
    assert_ne!(new, m);
    let status = ok(c.ctl(&["status"]));
    assert!(!status.contains("PAUSED"), "{status}");
    c.restart_keeper(&m).expect("restart");
    c.finish("pause_resume", checker).await.expect("invariants");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_with_a_deadline_expires_by_itself() {
    let _s = serial().await;
    let (mut c, mut checker) = running(Opts::default()).await;
    let m = c.master().await.expect("master");
    ok(c.ctl(&["pause", "--for", "15s", "--reason", "short"]));
    checker.nemesis();
    c.kill_keeper(&m, true);
    held_back(&c, &m).await;
    // No resume: the deadline ends the pause and the sentinel fails over by itself.
    c.wait_master_change(&m, MIN)
        .await
        .expect("the failover after the deadline");
    c.restart_keeper(&m).expect("restart");
    c.finish("pause_deadline", checker)
        .await
        .expect("invariants");
}
