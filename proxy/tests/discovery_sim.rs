//! Discovery and fencing over the in-memory store on a paused clock: the proxy fences
//! within proxyTimeout of its last contact even when store calls hang instead of failing,
//! and routes again once the store answers.

use control::model::ClusterData;
use control::store::mem::{Faults, MemStore};
use control::store::{ClusterStore, Store};
use proxy::discovery::Discovery;
use proxy::metrics::Metrics;
use proxy::route::{NoMaster, Routes};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

fn doc() -> ClusterData {
    doc_with(1, false)
}

/// The document at proxy `generation`; `leases`: its sentinel honours lease liveness.
fn doc_with(generation: i64, leases: bool) -> ClusterData {
    doc_timeout(generation, leases, "3s")
}

/// As [`doc_with`], with this proxyTimeout.
fn doc_timeout(generation: i64, leases: bool, proxy_timeout: &str) -> ClusterData {
    let v = serde_json::json!({
        "formatVersion": 1,
        "cluster": {"uid": "c", "spec": {"initMode": "new", "proxyCheckInterval": "500ms", "proxyTimeout": proxy_timeout}},
        "dbs": {"db0": {"uid": "db0", "status": {"listenAddress": "127.0.0.1", "port": "5432"}}},
        "proxy": {"generation": generation, "spec": {"masterDbUid": "db0", "enabledProxies": ["p1"], "leaseLiveness": leases}}
    });
    ClusterData::from_json(v.to_string().as_bytes()).expect("doc")
}

const INFO_KEY: &str = "stolon/cluster/sim/proxies/info/p1";

/// From now until the proxy's info key is gone (within `limit`): when the proxy stopped
/// routing, if it did by then, and when the key went.
async fn fence_then_expiry(sim: &Sim, limit: Duration) -> (Option<Duration>, Option<Duration>) {
    let start = Instant::now();
    let mut fenced_at = None;
    let gone = wait_until(limit, || {
        if fenced_at.is_none() && sim.routes.load().master.is_err() {
            fenced_at = Some(start.elapsed());
        }
        sim.mem.peek(INFO_KEY).is_none()
    })
    .await;
    (fenced_at, gone)
}

fn info_of(kv: &control::store::KeyValue) -> control::model::ProxyInfo {
    serde_json::from_slice(&kv.value).expect("proxy info")
}

struct Sim {
    mem: MemStore,
    routes: Arc<Routes>,
    listening: tokio::sync::watch::Receiver<bool>,
    stop: CancellationToken,
}

async fn start() -> Sim {
    start_with(true).await
}

async fn start_with(cluster_exists: bool) -> Sim {
    start_doc(cluster_exists.then(doc)).await
}

async fn start_doc(doc: Option<ClusterData>) -> Sim {
    let mem = MemStore::new();
    let store: Arc<dyn Store> = Arc::new(mem.clone());
    let cs = ClusterStore::new(store, "stolon/cluster", "sim");
    if let Some(doc) = doc {
        cs.put_cluster_data(&doc, 0, None).await.expect("put");
    }
    let routes = Arc::new(Routes::default());
    let (tx, rx) = tokio::sync::watch::channel(false);
    let stop = CancellationToken::new();
    let d = Discovery {
        store: cs,
        uid: "p1".into(),
        routes: routes.clone(),
        metrics: Arc::new(Metrics::default()),
        listening: tx,
        stop_listening: true,
        ro_max_lag: None,
        faults: control::faults::Faults::NONE,
        drain_timeout: Duration::from_secs(5),
        cancel_id: proxy::cancel::owner_id("p1"),
        cancel_address: "127.0.0.1:5432".into(),
    };
    tokio::spawn(d.run(stop.clone()));
    Sim {
        mem,
        routes,
        listening: rx,
        stop,
    }
}

async fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() <= limit {
        if f() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

async fn fences_then_recovers(faults: Option<Faults>) {
    let sim = start().await;
    let routed = |s: &Sim| s.routes.load().master.is_ok();
    assert!(
        wait_until(Duration::from_secs(2), || routed(&sim))
            .await
            .is_some(),
        "routes"
    );
    assert!(*sim.listening.borrow());
    let outage = Instant::now();
    match &faults {
        Some(f) => sim.mem.set_faults(f.clone()),
        None => sim.mem.set_unavailable(true),
    }
    // Last contact was at most one check interval before the outage: fenced by then + 3s.
    let fenced = wait_until(Duration::from_secs(4), || {
        matches!(sim.routes.load().master, Err(NoMaster::StoreLost))
    })
    .await;
    let fenced = fenced.expect("not fenced within proxyTimeout of the outage");
    assert!(
        fenced <= Duration::from_millis(3010),
        "fenced {fenced:?} after the outage"
    );
    assert!(
        fenced >= Duration::from_millis(2400),
        "fenced too early: {fenced:?}"
    );
    assert!(!*sim.listening.borrow(), "stopped listening");
    assert!(outage.elapsed() < Duration::from_secs(4));
    sim.mem.set_faults(Faults::default());
    sim.mem.set_unavailable(false);
    // Calls that were hanging finish within their delay; after that it routes again.
    let back = wait_until(Duration::from_secs(90), || routed(&sim)).await;
    assert!(back.is_some(), "routes again after the store returns");
    assert!(*sim.listening.borrow());
    sim.stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn fences_when_store_calls_fail() {
    fences_then_recovers(None).await;
}

#[tokio::test(start_paused = true)]
async fn fences_when_store_calls_hang() {
    let hang = Faults {
        delay: Some((Duration::from_secs(60), Duration::from_secs(61))),
        ..Default::default()
    };
    fences_then_recovers(Some(hang)).await;
}

/// The cluster is created after the proxy's first read (defaults: check every 5 s, time out
/// after 15 s); the watch brings a spec with a 3 s proxyTimeout. The proxy must check by the
/// new interval at once, not keep its 5 s schedule and fence itself when 3 s pass.
#[tokio::test(start_paused = true)]
async fn a_shorter_proxy_timeout_seen_by_the_watch_does_not_fence_a_healthy_proxy() {
    let sim = start_with(false).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let store: Arc<dyn Store> = Arc::new(sim.mem.clone());
    let cs = ClusterStore::new(store, "stolon/cluster", "sim");
    cs.put_cluster_data(&doc(), 0, None).await.expect("put");
    assert!(
        wait_until(Duration::from_secs(2), || sim.routes.load().master.is_ok())
            .await
            .is_some(),
        "routes once the cluster exists"
    );
    let fenced = wait_until(Duration::from_secs(20), || {
        sim.routes.load().master.is_err() || !*sim.listening.borrow()
    })
    .await;
    assert_eq!(fenced, None, "a healthy proxy fenced itself");
    sim.stop.cancel();
}

/// Without the sentinel's lease mark (a Go sentinel), the info gets a new infoUID at every
/// check, as Go's proxy writes it.
#[tokio::test(start_paused = true)]
async fn without_the_lease_mark_every_check_rewrites_the_info() {
    let sim = start().await;
    let written = wait_until(Duration::from_secs(2), || sim.mem.peek(INFO_KEY).is_some()).await;
    assert!(written.is_some(), "no info written");
    let first = sim.mem.peek(INFO_KEY).expect("info");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let later = sim.mem.peek(INFO_KEY).expect("info");
    assert!(
        later.mod_revision > first.mod_revision + 5,
        "rewrites every 500 ms"
    );
    assert_ne!(info_of(&later).info_uid, info_of(&first).info_uid);
    assert!(!info_of(&later).lease_liveness);
    sim.stop.cancel();
}

/// With the mark: the info is written once, then kept by lease keep-alives alone; a new
/// generation is written at once; cut from the store, the proxy fences itself before its
/// key expires (only then may the sentinel stop waiting for it).
#[tokio::test(start_paused = true)]
async fn with_the_lease_mark_the_info_is_written_on_change_and_outlives_the_routing() {
    let sim = start_doc(Some(doc_with(1, true))).await;
    let routed = |s: &Sim| s.routes.load().master.is_ok();
    assert!(wait_until(Duration::from_secs(2), || routed(&sim))
        .await
        .is_some());
    let first = sim.mem.peek(INFO_KEY).expect("info");
    assert!(info_of(&first).lease_liveness);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let idle = sim.mem.peek(INFO_KEY).expect("info kept alive");
    assert_eq!(
        idle.mod_revision, first.mod_revision,
        "an idle proxy wrote its info"
    );
    // A new generation: acknowledged by a write.
    let store: Arc<dyn Store> = Arc::new(sim.mem.clone());
    let cs = ClusterStore::new(store, "stolon/cluster", "sim");
    let (_, rev) = cs.get_cluster_data().await.expect("read").expect("doc");
    cs.put_cluster_data(&doc_with(2, true), rev, None)
        .await
        .expect("put");
    let acked = wait_until(Duration::from_secs(2), || {
        sim.mem
            .peek(INFO_KEY)
            .is_some_and(|kv| info_of(&kv).generation == 2)
    })
    .await;
    assert!(acked.is_some(), "generation 2 not acknowledged");
    // The store goes away: the proxy fences within proxyTimeout (3 s), its key lives on
    // until its lease (2 x 3 s) runs out after the last keep-alive.
    sim.mem.set_unavailable(true);
    let (fenced, gone) = fence_then_expiry(&sim, Duration::from_secs(10)).await;
    let gone = gone.expect("the key outlived its lease");
    let fenced = fenced.expect("the key expired before the proxy fenced");
    assert!(
        fenced <= Duration::from_millis(3010),
        "fenced after {fenced:?}"
    );
    assert!(
        gone >= fenced + Duration::from_secs(2),
        "fenced {fenced:?}, key gone {gone:?}"
    );
    assert!(
        gone <= Duration::from_millis(6100),
        "key gone after {gone:?}"
    );
    // Back: the expired lease is noticed and the info written again.
    sim.mem.set_unavailable(false);
    let back = wait_until(Duration::from_secs(5), || sim.mem.peek(INFO_KEY).is_some()).await;
    assert!(back.is_some(), "info not written again after the outage");
    sim.stop.cancel();
}

/// A longer proxyTimeout is taken on only once the info reporting it (and its longer lease)
/// is written: if that write fails, the proxy still fences by the old timeout, before the
/// old lease (which the sentinel goes by) runs out.
#[tokio::test(start_paused = true)]
async fn a_longer_proxy_timeout_counts_only_once_reported() {
    let sim = start_doc(Some(doc_with(1, true))).await;
    let routed = |s: &Sim| s.routes.load().master.is_ok();
    assert!(wait_until(Duration::from_secs(2), || routed(&sim))
        .await
        .is_some());
    let store: Arc<dyn Store> = Arc::new(sim.mem.clone());
    let cs = ClusterStore::new(store, "stolon/cluster", "sim");
    let (_, rev) = cs.get_cluster_data().await.expect("read").expect("doc");
    // proxyTimeout 3 s -> 10 s, and from now on no write lands (reads still answer).
    cs.put_cluster_data(&doc_timeout(1, true, "10s"), rev, None)
        .await
        .expect("put");
    sim.mem.set_faults(Faults {
        lose_write: 1.0,
        ..Default::default()
    });
    let (fenced, gone) = fence_then_expiry(&sim, Duration::from_secs(12)).await;
    let gone = gone.expect("the old lease outlived its TTL");
    let fenced = fenced.expect("the key expired while the proxy still routed");
    assert!(
        fenced <= Duration::from_millis(3600),
        "fenced after {fenced:?}"
    );
    assert!(fenced < gone, "fenced {fenced:?}, key gone {gone:?}");
    sim.stop.cancel();
}
