//! Failsafe mode (spec `failsafeMode`, issue 21): a store outage is not an outage. Each
//! scenario runs the acknowledged-write checker and the split-brain detector (which probes
//! every PostgreSQL directly too). With failsafe off, `partitions.rs` shows today's
//! behaviour (etcd out: proxies and master fence, the same master resumes).

use e2e::{running, serial, Checker, Cluster, Opts};
use serde_json::json;
use std::time::{Duration, Instant};

const MIN: Duration = Duration::from_secs(60);
/// The suite's fence window: failInterval 5 s / 2.
const FENCE: Duration = Duration::from_millis(2500);

fn failsafe(netns: bool, proxies: usize, sync: bool) -> Opts {
    Opts {
        netns,
        proxies,
        spec: json!({"failsafeMode": true, "synchronousReplication": sync}),
        ..Default::default()
    }
}

/// Waits until the clusterdata carries every keeper's failsafe address (the sentinel
/// copies them from the keepers' infos): before that a master could not ask its peers.
async fn wait_failsafe_ready(c: &Cluster) {
    c.wait_for("every keeper's failsafe address", MIN, async || {
        let (cd, _) = c.data().await?;
        let ready = cd.cluster.spec.failsafe_mode()
            && cd.keepers.len() == c.keepers.len()
            && (cd.keepers.values()).all(|k| !k.status.failsafe_address.is_empty());
        ready.then_some(())
    })
    .await
    .expect("failsafe addresses published");
}

/// The store revision of the newest clusterdata keeper `uid` has read, from its metrics.
async fn keeper_revision(c: &Cluster, uid: &str) -> Option<i64> {
    let k = c.keeper(uid);
    let addr = format!("{}:{}", k.addr, k.metrics_port);
    let t = Duration::from_secs(2);
    let (_, text) = control::peer_http::get(&addr, "/metrics", t).await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("stolon_keeper_clusterdata_revision "))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits until every keeper has read the store's current clusterdata
/// (`stolon_keeper_clusterdata_revision`): each keeper's store client is back after the
/// outage, not only the sentinel's and the proxy's.
async fn wait_keepers_caught_up(c: &Cluster) {
    c.wait_for("every keeper at the current clusterdata", MIN, async || {
        let (_, rev) = c.data().await?;
        for k in &c.keepers {
            // The sentinel may write again between the two reads: then ask again.
            (keeper_revision(c, &k.uid).await == Some(rev)).then_some(())?;
        }
        Some(())
    })
    .await
    .expect("every keeper reads the store again");
}

/// Keeps checking, for `span` from `from`, that writes go on: 10 more acknowledged within
/// each second.
async fn writes_go_on(checker: &Checker, from: Instant, span: Duration) {
    while from.elapsed() < span {
        assert!(
            checker.wait_acks(10, Duration::from_secs(1)).await,
            "writes stopped {:?} into the outage",
            from.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_frozen_or_stopped_for_a_minute_changes_nothing_clients_see() {
    let _s = serial().await;
    let (mut c, mut checker) = running(failsafe(false, 1, false)).await;
    wait_failsafe_ready(&c).await;
    let m = c.master().await.expect("master");
    let errors = checker.errors();
    let from = checker.nemesis();
    for freeze in [true, false] {
        let start = Instant::now();
        if freeze {
            c.etcd.members[0].freeze().expect("freeze");
        } else {
            c.etcd.members[0].stop();
        }
        // Positive events first: the master holds on its peers, the proxy routes on it.
        c.wait_for(
            "the master to hold without the store",
            Duration::from_secs(10),
            async || {
                let log = c.keeper_log(&m);
                (log.matches("holding without the store").count() > usize::from(!freeze))
                    .then_some(())
            },
        )
        .await
        .expect("the master holds");
        if freeze {
            health_shows_the_hold(&c, &m).await;
        }
        writes_go_on(&checker, start, MIN).await;
        if freeze {
            c.etcd.members[0].thaw().expect("thaw");
        } else {
            c.etcd.members[0].restart().expect("etcd back");
        }
        eprintln!(
            "etcd {} for {:?}: client errors {}",
            if freeze { "frozen" } else { "stopped" },
            start.elapsed(),
            checker.errors() - errors
        );
        c.wait_healthy(MIN).await.expect("healthy after etcd");
        assert!(
            checker.wait_acks(20, MIN).await,
            "writes after etcd is back"
        );
        wait_keepers_caught_up(&c).await;
        if freeze {
            // The stop must find the master out of this hold, so that holding again is a
            // new round of acknowledgements. Nothing is written during a freeze, so the
            // keepers' revisions say nothing of their store contact, and a proxy that asked
            // the master to confirm its hold keeps it for the promise after the thaw (a CI
            // run stopped etcd 2 s after the thaw, still in the first hold).
            c.wait_for("the master to leave its hold", MIN, async || {
                (c.keeper_log(&m).contains("failsafe: no longer holding")).then_some(())
            })
            .await
            .expect("the hold ends once the store is back");
        }
    }
    assert_eq!(checker.errors(), errors, "no client saw the outages");
    let status = c.ctl(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("failsafe mode: on"), "{text}");
    let p1 = c.log("p1");
    assert!(
        p1.contains("routing on the master keeper's confirmed hold"),
        "the proxy said it"
    );
    let out = c
        .finish("failsafe_etcd_outage", checker)
        .await
        .expect("invariants");
    eprintln!(
        "failsafe, etcd out 2 x 60 s: longest gap without a write {:?} (from the first outage on)",
        out.max_gap
    );
    assert_eq!(out.master, m, "no failover");
    assert_eq!(out.missing, 0, "nothing lost");
    assert!(
        out.max_gap < Duration::from_secs(1),
        "writes never stopped: {:?}",
        out.max_gap
    );
    let k = c.keeper_log(&m);
    assert!(!k.contains("fencing the master"), "the master never fenced");
    let s1 = c.log("s1");
    assert!(
        !s1.contains("kind=Failover"),
        "the gap triggered no failover"
    );
    assert!(!k.contains("PostgreSQL exited"), "no restart");
    let _ = from;
}

/// The store goes out for everyone just after a write that a standby read and the master
/// did not (CI once stopped etcd in the millisecond of a sentinel's write): the standby
/// has a newer revision than the master asks with, but the store is out for it too, so it
/// acknowledges and the master holds. Made deterministic by cutting the master and etcd
/// from each other until a standby is ahead; failInterval 20 s gives the standby's probes room to find
/// the store out before the master's store deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_out_after_a_write_only_a_standby_read_changes_nothing() {
    let _s = serial().await;
    let opts = Opts {
        netns: true,
        proxies: 1,
        // proxyTimeout as long as the hold takes to start here (the standby's store
        // silence, a quarter of the 10 s fence window, then its next probe).
        spec: json!({"failsafeMode": true, "failInterval": "20s", "proxyTimeout": "10s"}),
        ..Default::default()
    };
    let (mut c, mut checker) = running(opts).await;
    wait_failsafe_ready(&c).await;
    let m = c.master().await.expect("master");
    let others = c.others(&m);
    let errors = checker.errors();
    let cut = checker.nemesis();
    let net = c.net.as_ref().expect("net");
    // Both ways: a blackhole on the master's side alone still lets etcd's pushes in.
    net.isolate_from(&m, &["etcd"]).expect("cut");
    net.isolate_from("etcd", &[&m]).expect("cut");
    let ahead = c
        .wait_for(
            "a standby ahead of the master",
            Duration::from_secs(10),
            async || {
                let mine = keeper_revision(&c, &m).await?;
                for o in &others {
                    if keeper_revision(&c, o).await? > mine {
                        return Some(o.clone());
                    }
                }
                None
            },
        )
        .await
        .expect("a standby read a write the master did not");
    c.etcd.members[0].stop();
    // The master's side heals at once; etcd's only before it comes back, so its kernel's
    // retransmissions of the write cannot reach the master meanwhile.
    c.net.as_ref().expect("net").heal(&m).expect("heal");
    eprintln!(
        "store out {:?} after the master's cut; {ahead} is ahead of it",
        cut.elapsed()
    );
    c.wait_for(
        "the master to hold without the store",
        Duration::from_secs(15),
        async || {
            let log = c.keeper_log(&m);
            log.contains("holding without the store").then_some(())
        },
    )
    .await
    .expect("the master holds");
    writes_go_on(&checker, Instant::now(), Duration::from_secs(20)).await;
    c.net.as_ref().expect("net").heal("etcd").expect("heal");
    c.etcd.members[0].restart().expect("etcd back");
    c.wait_healthy(MIN).await.expect("healthy after etcd");
    assert_eq!(checker.errors(), errors, "no client saw the outage");
    let out = c
        .finish("failsafe_store_out_after_a_missed_write", checker)
        .await
        .expect("invariants");
    assert_eq!(out.master, m, "no failover");
    assert_eq!(out.missing, 0, "nothing lost");
    assert!(
        !c.keeper_log(&m).contains("fencing the master"),
        "the master never fenced"
    );
}

/// The master cut from etcd only (it still reaches its peers, the sentinel and the
/// standbys still reach etcd): the standbys read the newer clusterdata and refuse it, so it
/// fences by its store deadline, and the failover comes after that; synchronous
/// replication: nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_cut_from_etcd_alone_fences_before_the_new_master_takes_writes() {
    let _s = serial().await;
    let (c, mut checker) = running(failsafe(true, 1, true)).await;
    wait_failsafe_ready(&c).await;
    let m = c.master().await.expect("master");
    let net = c.net.as_ref().expect("net");
    let cut = checker.nemesis();
    net.isolate_from(&m, &["etcd"]).expect("cut from etcd");
    let new = c.wait_master_change(&m, MIN).await.expect("failover");
    let elected = cut.elapsed();
    net.heal(&m).expect("heal");
    let out = c
        .finish("failsafe_master_cut", checker)
        .await
        .expect("invariants");
    assert_eq!(out.master, new);
    assert_eq!(out.missing, 0, "synchronous: nothing acknowledged lost");
    let last_direct = c.last_direct_write(&out.report, &m, cut);
    eprintln!(
        "failsafe, master cut from etcd: last write it accepted {last_direct:?} after the cut, \
         new master elected {elected:?} after it"
    );
    assert!(last_direct.is_none_or(|d| d < elected));
    assert!(c.keeper_log(&m).contains("fencing the master"), "it fenced");
}

/// The master cut from etcd and from one standby: that standby cannot acknowledge it, so
/// it fences within the fence window, as without failsafe mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_cut_from_etcd_and_a_standby_fences_within_the_fence_window() {
    let _s = serial().await;
    let (c, mut checker) = running(failsafe(true, 1, false)).await;
    wait_failsafe_ready(&c).await;
    let m = c.master().await.expect("master");
    let others = c.others(&m);
    let net = c.net.as_ref().expect("net");
    let cut = checker.nemesis();
    net.isolate_from(&m, &["etcd", &others[0]]).expect("cut");
    let fenced = c
        .wait_for("the master to fence", Duration::from_secs(10), async || {
            c.keeper_log(&m)
                .contains("fencing the master")
                .then(|| cut.elapsed())
        })
        .await
        .expect("fenced");
    c.wait_master_change(&m, MIN).await.expect("failover");
    net.heal(&m).expect("heal");
    let out = c
        .finish("failsafe_master_cut_and_standby", checker)
        .await
        .expect("invariants");
    let last_direct = c.last_direct_write(&out.report, &m, cut);
    eprintln!("failsafe, master cut from etcd and a standby: fenced {fenced:?} after the cut, last write it accepted {last_direct:?} after it");
    // The deadline runs from the last acknowledged publish, before the cut; the stop
    // itself and the log line take a little more.
    assert!(fenced < FENCE + Duration::from_secs(1), "{fenced:?}");
    assert!(last_direct.is_none_or(|d| d < FENCE + Duration::from_secs(1)));
}

/// A proxy cut from etcd but not from the keepers keeps serving on the master's confirmed
/// hold long past its proxyTimeout; cut from the master too, it fences.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_cut_from_etcd_serves_on_the_masters_hold_and_fences_without_it() {
    let _s = serial().await;
    let (c, mut checker) = running(failsafe(true, 2, false)).await;
    wait_failsafe_ready(&c).await;
    let m = c.master().await.expect("master");
    let net = c.net.as_ref().expect("net");
    let errors = checker.errors();
    let cut = checker.nemesis();
    net.isolate_from("p2", &["etcd"]).expect("cut p2 from etcd");
    let (addr, port) = c.proxy_addr(1);
    c.wait_for(
        "p2 to route on the failsafe",
        Duration::from_secs(10),
        async || {
            c.log("p2")
                .contains("routing on the master keeper's confirmed hold")
                .then_some(())
        },
    )
    .await
    .expect("p2 on the failsafe");
    // Well past 2 x proxyTimeout (3 s), p2 still serves.
    c.wait_for(
        "p2 serving 8 s after the cut",
        Duration::from_secs(20),
        async || {
            let r = e2e::sql::query_text(&addr, port, "SELECT 'ok'::text").await;
            assert!(
                r.is_ok(),
                "p2 refused {:?} after the cut: {r:?}",
                cut.elapsed()
            );
            (cut.elapsed() > Duration::from_secs(8)).then_some(())
        },
    )
    .await
    .expect("served");
    assert_eq!(
        checker.errors(),
        errors,
        "no client error while p2 is on the failsafe"
    );
    let served = cut.elapsed();
    // Cut from the master's host too: no confirmation, p2 fences.
    let recut = Instant::now();
    net.isolate_from("p2", &[&m])
        .expect("cut p2 from the master");
    let refused = c
        .wait_proxy_refuses(1, recut, Duration::from_secs(10))
        .await
        .expect("p2 fenced");
    // It cannot reach the master any more, so sessions fail at once; it fences itself once
    // the last confirmed end has passed: the master reaches the store, so that is its own
    // store-contact deadline, at most the fence window after its last publish.
    let fenced = c
        .wait_for("p2 to fence", Duration::from_secs(5), async || {
            c.log("p2")
                .contains("no store contact within proxyTimeout: fencing")
                .then(|| recut.elapsed())
        })
        .await
        .expect("p2 fenced");
    eprintln!("failsafe, proxy cut from etcd: served {served:?} after the cut; cut from the master too, refused {refused:?} and fenced {fenced:?} after");
    assert!(fenced < FENCE + Duration::from_millis(500), "{fenced:?}");
    net.heal("p2").expect("heal");
    let out = c
        .finish("failsafe_proxy_cut", checker)
        .await
        .expect("invariants");
    assert_eq!(out.master, m);
}

/// The master keeper's `/health` and metrics show the hold: since when, and every peer's
/// acknowledgement.
async fn health_shows_the_hold(c: &Cluster, m: &str) {
    let k = c.keeper(m);
    let addr = format!("{}:{}", k.addr, k.metrics_port);
    let t = Duration::from_secs(2);
    // The endpoints answer from the loop's last round: poll until a round saw the hold.
    let body = c
        .wait_for(
            "/health to show the hold",
            Duration::from_secs(5),
            async || {
                let (code, body) = control::peer_http::get(&addr, "/health", t).await.ok()?;
                let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                (code == 200 && v["failsafe"]["held_since"].is_string()).then_some(v)
            },
        )
        .await
        .expect("the hold in /health");
    let f = &body["failsafe"];
    assert_eq!(
        (f["acks"].as_u64(), f["peers"].as_u64()),
        (Some(2), Some(2)),
        "{body}"
    );
    let (_, metrics) = control::peer_http::get(&addr, "/metrics", t)
        .await
        .expect("/metrics");
    assert!(
        metrics.contains("stolon_keeper_failsafe_held 1"),
        "held in the metrics"
    );
    assert!(metrics.contains("stolon_keeper_failsafe_acks 2"));
}
