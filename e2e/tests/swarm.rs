//! Many proxies on one cluster (issue "a thousand proxies"): a proxy that proves liveness
//! by its lease and is frozen (SIGSTOP) delays a failover by at most its lease, the
//! clients of the other proxies go on, and the thawed proxy never routes to the old master.
//! The fleet's figures at 1, 10, 100 and more proxies are `loadtest swarm`'s.

use e2e::{serial, Checker, Cluster, Opts};
use nix::sys::signal::Signal;
use std::time::{Duration, Instant};

const MIN: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_proxy_among_ten_delays_a_failover_by_at_most_its_lease() {
    let _serial = serial().await;
    let mut c = Cluster::start(Opts {
        proxies: 10,
        ..Default::default()
    })
    .await
    .expect("cluster");
    let others: Vec<String> = (1..=9).map(|i| format!("p{i}")).collect();
    let names: Vec<&str> = others.iter().map(String::as_str).collect();
    let mut checker = Checker::start_on(&c, &names);
    assert!(checker.wait_acks(50, Duration::from_secs(30)).await);
    let infos = c.store.proxy_infos().await.expect("proxy infos");
    let frozen = &infos.items["p10"];
    assert!(
        frozen.lease_liveness,
        "p10 does not prove liveness by its lease"
    );
    let (cd, _) = c.data().await.expect("clusterdata");
    let spec = &cd.cluster.spec;
    let ttl = control::model::proxy_lease_ttl(spec.proxy_timeout());
    let fail_interval = spec.fail_interval().as_std();
    let old = c.master().await.expect("master");
    c.signal("p10", Signal::SIGSTOP).expect("freeze p10");
    let frozen_at = Instant::now();
    checker.nemesis();
    c.kill_keeper(&old, true);
    let new = c.wait_master_change(&old, MIN).await.expect("failover");
    let routed = c
        .wait_for("the new master routed", MIN, async || {
            let (cd, _) = c.data().await?;
            let db = cd.dbs.get(&cd.proxy.spec.master_db_uid)?;
            (db.spec.keeper_uid == new).then_some(cd)
        })
        .await
        .expect("routed");
    let after = frozen_at.elapsed();
    eprintln!("new master routed {after:?} after the freeze and the kill (lease {ttl:?})");
    // Failed after failInterval, then the handshake waits for p10 at most until its lease
    // (kept alive up to one check before the freeze) runs out; a few rounds of slack.
    assert!(
        after <= fail_interval + ttl + Duration::from_secs(4),
        "routed {after:?} after the kill: more than failInterval + the proxy lease"
    );
    assert!(
        !routed
            .proxy
            .spec
            .enabled_proxies
            .contains(&"p10".to_string()),
        "the frozen proxy is still enabled"
    );
    let infos = c.store.proxy_infos().await.expect("proxy infos");
    assert!(!infos.items.contains_key("p10"), "p10's lease outlived it");
    c.restart_keeper(&old)
        .expect("restart the old master's keeper");
    // Thawed: it fenced itself (its timers are long past), writes its info again and is
    // enabled and routed to the new master; finish checks every proxy reaches it.
    c.signal("p10", Signal::SIGCONT).expect("thaw p10");
    c.wait_for("p10 enabled again", MIN, async || {
        let (cd, _) = c.data().await?;
        cd.proxy
            .spec
            .enabled_proxies
            .contains(&"p10".to_string())
            .then_some(())
    })
    .await
    .expect("p10 back");
    let out = c
        .finish("a frozen proxy among ten", checker)
        .await
        .expect("invariants");
    assert_eq!(out.master, new);
    let log = c.log("p10");
    assert!(
        log.contains("no store contact within proxyTimeout: fencing"),
        "the thawed proxy did not fence itself"
    );
}
