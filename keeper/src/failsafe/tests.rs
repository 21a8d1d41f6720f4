//! The keeper's failsafe answers and its asking loop, against real HTTP listeners.

use super::*;
use control::model::{ClusterSpec, Db, DbSpec, GoDuration, Keeper, KeeperStatus, Timestamp};

/// Cluster "c": d1 on k1 (the master), d2 on k2, with k2 answering at `k2_addr`.
fn cd(k2_addr: &str) -> ClusterData {
    let spec = ClusterSpec {
        failsafe_mode: Some(true),
        fail_interval: Some(GoDuration::from_secs(2)),
        ..Default::default()
    };
    let mut cd = ClusterData::new("c", spec, Timestamp::now());
    for (k, d, addr) in [("k1", "d1", ""), ("k2", "d2", k2_addr)] {
        let status = KeeperStatus {
            failsafe_address: addr.into(),
            ..Default::default()
        };
        cd.keepers.insert(
            k.into(),
            Keeper {
                uid: k.into(),
                status,
                ..Default::default()
            },
        );
        let spec = DbSpec {
            keeper_uid: k.into(),
            ..Default::default()
        };
        cd.dbs.insert(
            d.into(),
            Db {
                uid: d.into(),
                spec,
                ..Default::default()
            },
        );
    }
    cd.cluster.status.master = "d1".into();
    // The sentinel recorded the dbs the master reported (it may hold only then).
    if let Some(d1) = cd.dbs.get_mut("d1") {
        d1.status.failsafe_dbs = vec!["d1".into(), "d2".into()];
    }
    cd
}

fn state(me: &str, cd: ClusterData, revision: i64, master_of: Option<&str>) -> Shared {
    Arc::new(Mutex::new(State {
        keeper_uid: me.into(),
        cd: Some(cd),
        revision,
        runs_primary: master_of.is_some(),
        master_of: master_of.map(String::from),
        ..Default::default()
    }))
}

/// Serves `state`'s failsafe paths on a real listener, as the keeper's main does.
async fn serve(state: Shared) -> (String, CancellationToken) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let stop = CancellationToken::new();
    let routes: control::metrics::RouteFn =
        Arc::new(move |path: &str, query: &str| answer(&state, path, query));
    let registry = Arc::new(control::metrics::root_registry("keeper", "c"));
    let health: control::metrics::HealthFn = Arc::new(|| Ok("ok".into()));
    tokio::spawn(control::metrics::serve_with(
        l,
        registry,
        health,
        Some(routes),
        stop.clone(),
    ));
    (addr, stop)
}

#[tokio::test]
async fn an_acknowledgement_is_a_promise_and_a_refusal_is_none() {
    let k2 = state("k2", cd(""), 10, None);
    let q = "cluster=c&db=d1&rev=10&valid=500";
    assert!(answer(&k2, "/failsafe/ack", q).is_some_and(|r| r.is_ok()));
    let st = k2.lock().expect("lock");
    let (db, until) = st.promised.clone().expect("promised");
    assert_eq!(db, "d1");
    let left = until - Instant::now();
    assert!(
        left > Duration::from_millis(900) && left <= Duration::from_secs(1),
        "{left:?}"
    );
    assert!(st.promised_at(Instant::now()));
    drop(st);
    // A newer revision that names another master: refused.
    let mut elected = cd("");
    elected.cluster.status.master = "d2".into();
    let k2b = state("k2", elected, 11, None);
    let r = answer(&k2b, "/failsafe/ack", q).expect("answered");
    assert!(r.is_err_and(|b| b.contains("revision 11 names db") && b.contains("d2")));
    assert!(
        k2b.lock().expect("lock").promised.is_none(),
        "no promise on a refusal"
    );
    let r = answer(&k2b, "/failsafe/ack", "db=d1").expect("answered");
    assert!(r.is_err_and(|b| b.contains("malformed")));
    assert!(
        answer(&k2b, "/primary", "").is_none(),
        "not a failsafe path"
    );
}

/// The master asks its peer once its store contact is stale, holds while the peer says
/// yes (re-arming the watchdog), confirms to a proxy only while holding, holds on while the
/// peer has read a newer clusterdata naming it but cannot reach the store either, and the
/// hold lapses once the store answers the peer.
#[tokio::test]
async fn the_master_holds_while_its_peer_acknowledges_and_not_after() {
    let k2 = state("k2", cd(""), 10, None);
    let (addr, stop_server) = serve(k2.clone()).await;
    let k1 = state("k1", cd(&addr), 10, Some("d1"));
    k1.lock().expect("lock").store_ack = Some(Instant::now());
    let confirm = || answer(&k1, "/failsafe/confirm", "db=d1").expect("answered");
    // Not holding, but its store contact is fresh: confirmed to its own store deadline.
    let body = confirm().expect("confirmed on the store contact");
    let left: u64 = serde_json::from_str::<serde_json::Value>(&body).expect("json")["remaining_ms"]
        .as_u64()
        .expect("remaining_ms");
    assert!(
        left > 500 && left <= 1000,
        "the fence window, 1 s here: {left}"
    );
    let armed = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let a = armed.clone();
    let arm = move |d: Duration| {
        a.lock().expect("lock").push(d);
        std::future::ready(())
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(k1.clone(), arm, stop.clone()));
    let holding = || k1.lock().expect("lock").holding(Instant::now()).is_some();
    // A proxy's request alone makes the master ask (its store contact is fresh).
    wait_for(Duration::from_secs(5), holding).await;
    let body = confirm().expect("confirmed while holding");
    assert!(body.contains("\"db\":\"d1\""), "{body}");
    assert!(answer(&k1, "/failsafe/confirm", "db=d2")
        .expect("answered")
        .is_err());
    assert!(k2.lock().expect("lock").promised_at(Instant::now()));
    assert!(
        !armed.lock().expect("lock").is_empty(),
        "the watchdog follows the hold"
    );
    let report = k1.lock().expect("lock").report(Instant::now()).expect("on");
    assert_eq!((report.acks, report.peers), (1, 1));
    assert!(!report.held_since.is_empty());
    // From here on the master's own store contact is old: only the hold confirms.
    k1.lock().expect("lock").store_ack = Instant::now().checked_sub(Duration::from_secs(10));
    // The peer reads a newer clusterdata that names the same master, and the store is out
    // for it too (no store contact at all here, a probe went unanswered): it goes on
    // acknowledging, a fresh promise after the change.
    let before = {
        let mut st = k2.lock().expect("lock");
        st.revision = 11;
        st.probe_unanswered = Some(Instant::now());
        st.promised.clone().expect("promised").1
    };
    wait_for(Duration::from_secs(5), || {
        let st = k2.lock().expect("lock");
        st.promised
            .as_ref()
            .is_some_and(|(_, until)| *until > before)
    })
    .await;
    assert!(holding(), "still holding at a newer revision naming it");
    assert!(
        k2.lock().expect("lock").probe_until.is_some(),
        "asked with an older revision, the peer probes the store"
    );
    // The store answers the peer: the master alone is cut off. It refuses, and the hold
    // runs out.
    k2.lock().expect("lock").store_probe_ok = Some(Instant::now() + Duration::from_secs(3600));
    wait_for(Duration::from_secs(5), || !holding()).await;
    assert!(confirm().is_err());
    stop.cancel();
    stop_server.cancel();
    task.await.expect("task");
}

/// A peer that cannot be reached is a refusal: no hold at all.
#[tokio::test]
async fn an_unreachable_peer_means_no_hold() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    drop(l);
    let k1 = state("k1", cd(&addr), 10, Some("d1"));
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(k1.clone(), |_| std::future::ready(()), stop.clone()));
    // The store contact is stale from the start (no acknowledged publish): it asks.
    wait_for(Duration::from_secs(5), || {
        k1.lock().expect("lock").asks >= 2
    })
    .await;
    {
        let st = k1.lock().expect("lock");
        assert!(st.holding(Instant::now()).is_none());
        assert!(
            st.refusals
                .iter()
                .any(|(p, why)| p == "k2" && why.contains("connect")),
            "{:?}",
            st.refusals
        );
    }
    stop.cancel();
    task.await.expect("task");
}

async fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < end, "not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The master does not hold before the sentinel recorded which dbs may replace it.
#[tokio::test]
async fn no_hold_before_the_sentinel_recorded_the_masters_dbs() {
    let k2 = state("k2", cd(""), 10, None);
    let (addr, stop_server) = serve(k2.clone()).await;
    let mut unrecorded = cd(&addr);
    if let Some(d1) = unrecorded.dbs.get_mut("d1") {
        d1.status.failsafe_dbs.clear();
    }
    let k1 = state("k1", unrecorded, 10, Some("d1"));
    let now = Instant::now();
    assert!(next_ask(&mut k1.lock().expect("lock"), now).is_none());
    k1.lock().expect("lock").cd = Some(cd(&addr));
    assert!(next_ask(&mut k1.lock().expect("lock"), now).is_some());
    let report = k1.lock().expect("lock").report(now).expect("on");
    assert_eq!(
        report.dbs,
        ["d1", "d2"],
        "the master reports its clusterdata's dbs"
    );
    stop_server.cancel();
}

/// A keeper asked with an older revision than it read refuses until a store probe went
/// unanswered, then acknowledges; once a probe is answered it refuses again.
#[tokio::test]
async fn a_keeper_asked_with_an_older_revision_probes_the_store() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let k2 = state("k2", cd(""), 11, None);
    let q = "cluster=c&db=d1&rev=10&valid=500";
    assert!(k2.lock().expect("lock").probe_until.is_none());
    // Silent, but not probed yet: refused, and the prober is started.
    let r = answer(&k2, "/failsafe/ack", q).expect("answered");
    assert!(r.is_err_and(|b| b.contains("not found the store out")));
    assert!(k2.lock().expect("lock").probe_until.is_some());
    let answers = Arc::new(AtomicBool::new(false));
    let probes = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let (a, p) = (answers.clone(), probes.clone());
    let task = tokio::spawn(probe_store(
        k2.clone(),
        move || {
            p.fetch_add(1, Ordering::SeqCst);
            std::future::ready(a.load(Ordering::SeqCst))
        },
        stop.clone(),
    ));
    // An unanswered probe, its bound past: the store is out for it too, it acknowledges.
    wait_for(Duration::from_secs(5), || {
        answer(&k2, "/failsafe/ack", q).is_some_and(|r| r.is_ok())
    })
    .await;
    assert!(probes.load(Ordering::SeqCst) >= 1);
    assert!(k2.lock().expect("lock").store_probe_ok.is_none());
    // The store answers: the next ask is refused.
    answers.store(true, Ordering::SeqCst);
    wait_for(Duration::from_secs(5), || {
        k2.lock().expect("lock").store_probe_ok.is_some()
    })
    .await;
    let r = answer(&k2, "/failsafe/ack", q).expect("answered");
    assert!(r.is_err_and(|b| b.contains("not found the store out")));
    stop.cancel();
    task.await.expect("task");
}
