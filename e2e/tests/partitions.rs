//! Partition scenarios (scenarios.md, "Partitions"): freezes with SIGSTOP, network cuts
//! in network namespaces, etcd outages. Each runs the acknowledged-write checker and the
//! single-master check (which probes every PostgreSQL directly too: an isolated old master
//! that takes a direct write after the new master took one fails it).

use e2e::{running, serial, Checker, Cluster, Opts};
use nix::sys::signal::Signal;
use std::time::{Duration, Instant};

const MIN: Duration = Duration::from_secs(60);

fn netns(proxies: usize, sentinels: usize) -> Opts {
    Opts {
        netns: true,
        proxies,
        sentinels,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_master_fails_over_and_rejoins_after_thaw() {
    let _s = serial().await;
    let (c, mut checker) = running(Opts::default()).await;
    let m = c.master().await.expect("master");
    checker.nemesis();
    c.signal_keeper(&m, Signal::SIGSTOP, true).expect("freeze");
    let new = c.wait_master_change(&m, MIN).await.expect("failover");
    c.signal_keeper(&m, Signal::SIGCONT, true).expect("thaw");
    let out = c
        .finish("frozen_master", checker)
        .await
        .expect("invariants");
    assert_eq!(out.master, new);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_master_fences_itself_before_a_new_master_and_rejoins() {
    let _s = serial().await;
    let (c, mut checker) = running(netns(1, 1)).await;
    let m = c.master().await.expect("master");
    let net = c.net.as_ref().expect("net");
    let cut = checker.nemesis();
    // Cut from etcd and every other host; the test (a client) still reaches it directly.
    net.isolate(&m).expect("isolate");
    let new = c.wait_master_change(&m, MIN).await.expect("failover");
    let elected = cut.elapsed();
    net.heal(&m).expect("heal");
    let out = c
        .finish("isolated_master", checker)
        .await
        .expect("invariants");
    assert_eq!(out.master, new);
    let last_direct = c.last_direct_write(&out.report, &m, cut);
    eprintln!(
        "isolated master: last write it accepted {last_direct:?} after the cut, new master \
         elected {elected:?} after it"
    );
    assert!(last_direct.is_none_or(|d| d < elected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_leader_cut_off_another_takes_over_without_double_decisions() {
    let _s = serial().await;
    let (mut c, mut checker) = running(netns(1, 2)).await;
    let leader = c
        .wait_for("a sentinel leader", MIN, async || {
            ["s1", "s2"]
                .into_iter()
                .find(|s| c.log(s).contains("became sentinel leader"))
        })
        .await
        .expect("leader");
    let other = if leader == "s1" { "s2" } else { "s1" };
    c.net.as_ref().expect("net").cut(leader).expect("cut");
    c.wait_for("the other sentinel to lead", MIN, async || {
        c.log(other)
            .contains("became sentinel leader")
            .then_some(())
    })
    .await
    .expect("takeover");
    let m = c.master().await.expect("master");
    checker.nemesis();
    c.kill_keeper(&m, true);
    c.wait_master_change(&m, MIN)
        .await
        .expect("failover by the new leader");
    c.net.as_ref().expect("net").heal(leader).expect("heal");
    c.restart_keeper(&m).expect("restart");
    c.finish("sentinel_leader_cut", checker)
        .await
        .expect("invariants");
    let failovers: usize = ["s1", "s2"]
        .iter()
        .map(|s| c.log(s).matches("kind=Failover").count())
        .sum();
    assert_eq!(failovers, 1, "one failover decision in all");
    assert_eq!(c.log(leader).matches("kind=Failover").count(), 0);
    let _ = c.signal(leader, Signal::SIGCONT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_cut_from_etcd_fences_and_the_sentinel_waits_for_it() {
    if e2e::failsafe_on() {
        // Failsafe mode keeps it routing on the master's confirmation: `failsafe.rs`.
        eprintln!("skipped with STOLON_E2E_FAILSAFE=1: a proxy cut from etcd alone keeps serving");
        return;
    }
    let _s = serial().await;
    let (c, mut checker) = running(netns(2, 1)).await;
    let net = c.net.as_ref().expect("net");
    let cut = checker.nemesis();
    // Cut from etcd only: it still reaches the master, so only its fence stops it.
    net.isolate_from("p2", &["etcd"])
        .expect("isolate p2 from etcd");
    let refused = c
        .wait_proxy_refuses(1, cut, Duration::from_secs(10))
        .await
        .expect("p2 fenced");
    eprintln!("proxy cut from etcd: refuses sessions {refused:?} after the cut (proxyTimeout 3 s)");
    // proxyTimeout runs from the last contact's send time, which was up to one check
    // interval (1 s) plus that check's own duration before the cut: the earliest fence is
    // a little under 2 s after it (1.94 s seen in CI). A proxy fencing at its first failed
    // check would refuse within about 1 s.
    assert!(
        refused > Duration::from_millis(1500),
        "fenced by its proxyTimeout, not sooner"
    );
    assert!(refused < Duration::from_secs(5));
    // A failover now: the new master is published only once p2 fenced or expired.
    let m = c.master().await.expect("master");
    let out = c.ctl(&["failkeeper", &m]);
    assert!(out.status.success());
    c.wait_master_change(&m, MIN).await.expect("failover");
    net.heal("p2").expect("heal");
    c.finish("proxy_cut", checker).await.expect("invariants");
}

async fn etcd_outage(c: &mut Cluster, checker: &Checker, freeze: bool) {
    let from = Instant::now();
    if freeze {
        c.etcd.members[0].freeze().expect("freeze");
    } else {
        c.etcd.members[0].stop();
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    let to = Instant::now();
    if freeze {
        c.etcd.members[0].thaw().expect("thaw");
    } else {
        c.etcd.members[0].restart().expect("etcd back");
    }
    c.wait_healthy(MIN).await.expect("healthy after etcd");
    assert!(checker.wait_acks(20, MIN).await, "writes resume");
    let _ = (from, to);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_or_frozen_fences_proxies_and_master_and_the_same_master_resumes() {
    if e2e::failsafe_on() {
        // The opposite is the point of failsafe mode: `failsafe.rs` shows it.
        eprintln!("skipped with STOLON_E2E_FAILSAFE=1: failsafe mode keeps writing through an etcd outage");
        return;
    }
    let _s = serial().await;
    let (mut c, mut checker) = running(Opts::default()).await;
    let m = c.master().await.expect("master");
    let mut windows = Vec::new();
    for freeze in [false, true] {
        let from = checker.nemesis();
        etcd_outage(&mut c, &checker, freeze).await;
        // From proxyTimeout (3 s) + 1 s after the outage began to its end (8 s): nothing
        // may be written, neither through the proxy nor directly (fence timeout 2.5 s).
        windows.push((from + Duration::from_secs(4), from + Duration::from_secs(8)));
    }
    let out = c.finish("etcd_outage", checker).await.expect("invariants");
    assert_eq!(out.master, m, "the same master resumes");
    assert_eq!(out.missing, 0, "nothing lost");
    for (a, b) in windows {
        let w = out.report.writes_between(a, b);
        assert!(w.is_empty(), "writes while etcd was out: {w:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_keeper_alone_frozen_or_killed_leaves_no_writable_postgres() {
    let _s = serial().await;
    let (mut c, mut checker) = running(Opts::default()).await;
    let m = c.master().await.expect("master");
    checker.nemesis();
    // Frozen keeper, PostgreSQL running: the watchdog fences it before failInterval.
    c.signal_keeper(&m, Signal::SIGSTOP, false)
        .expect("freeze keeper");
    let m2 = c.wait_master_change(&m, MIN).await.expect("failover");
    c.signal_keeper(&m, Signal::SIGCONT, false).expect("thaw");
    // The old master (and a standby that got its last WAL) may have forked and be rebuilt
    // a few seconds after the failover: let that finish before the next nemesis.
    c.wait_healthy(Duration::from_secs(120))
        .await
        .expect("healthy");
    tokio::time::sleep(Duration::from_secs(8)).await;
    c.wait_healthy(Duration::from_secs(120))
        .await
        .expect("healthy again");
    // Killed keeper, PostgreSQL running: it goes with its keeper.
    c.kill_keeper(&m2, false);
    let m3 = c
        .wait_master_change(&m2, MIN)
        .await
        .expect("second failover");
    c.restart_keeper(&m2).expect("restart");
    // Two failovers: the first master may legitimately be elected again by the second.
    let out = c
        .finish_with("master_keeper_alone", checker, true)
        .await
        .expect("invariants");
    assert_eq!(out.master, m3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_proxy_is_removed_from_enabled_proxies_and_readded() {
    let _s = serial().await;
    let (mut c, mut checker) = running(Opts {
        proxies: 2,
        ..Default::default()
    })
    .await;
    checker.nemesis();
    c.signal("p2", Signal::SIGSTOP).expect("freeze p2");
    let enabled = async |c: &Cluster| -> Option<bool> {
        let (cd, _) = c.data().await?;
        Some(cd.proxy.spec.enabled_proxies.iter().any(|p| p == "p2"))
    };
    c.wait_for("p2 removed", MIN, async || {
        (enabled(&c).await == Some(false)).then_some(())
    })
    .await
    .expect("removed");
    c.signal("p2", Signal::SIGCONT).expect("thaw");
    c.wait_for("p2 re-added", MIN, async || {
        (enabled(&c).await == Some(true)).then_some(())
    })
    .await
    .expect("re-added");
    c.finish("frozen_proxy", checker).await.expect("invariants");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_member_etcd_loses_a_member_and_its_leader_during_a_failover() {
    let _s = serial().await;
    let (mut c, mut checker) = running(Opts {
        etcd_members: 3,
        sentinels: 2,
        ..Default::default()
    })
    .await;
    // One member (not the leader) killed and brought back.
    let leader = c.etcd.leader().expect("etcd leader");
    let follower = (leader + 1) % 3;
    c.etcd.members[follower].kill();
    assert!(
        checker.wait_acks(20, MIN).await,
        "writes with 2 of 3 members"
    );
    c.etcd.members[follower].restart().expect("member back");
    // A failover, and the etcd leader killed while it runs.
    let m = c.master().await.expect("master");
    checker.nemesis();
    c.kill_keeper(&m, true);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let leader = c.etcd.leader().expect("etcd leader");
    c.etcd.members[leader].kill();
    c.wait_master_change(&m, MIN).await.expect("failover");
    c.etcd.members[leader].restart().expect("leader back");
    c.restart_keeper(&m).expect("restart");
    c.finish("etcd_three_members", checker)
        .await
        .expect("invariants");
    // A round whose write failed with the etcd leader may be decided again after a
    // re-read, but only ever to the same outcome: one elected db in all.
    let elected: std::collections::BTreeSet<String> = ["s1", "s2"]
        .iter()
        .flat_map(|s| {
            c.log(s)
                .lines()
                .filter(|l| l.contains("kind=Failover"))
                .filter_map(|l| l.split("electing ").nth(1))
                .filter_map(|r| r.split_whitespace().next())
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(
        elected.len(),
        1,
        "one failover decision in all: {elected:?}"
    );
    let (cd, _) = c.data().await.expect("cd");
    assert_eq!(cd.proxy.generation, 1, "one master change published");
}
