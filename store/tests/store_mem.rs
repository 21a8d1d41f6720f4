//! The same conformance suite against the in-memory store (on a paused clock), and the
//! fault injection it offers simulations.

mod common;

use std::sync::Arc;
use std::time::Duration;
use stolon_store::mem::{Faults, MemStore};
use stolon_store::*;

#[tokio::test(start_paused = true)]
async fn mem_cas_race() {
    common::cas_race(Arc::new(MemStore::new())).await;
}

#[tokio::test(start_paused = true)]
async fn mem_lease_lifecycle() {
    common::lease_lifecycle(Arc::new(MemStore::new()), Duration::from_secs(20)).await;
}

#[tokio::test(start_paused = true)]
async fn mem_election() {
    common::election(Arc::new(MemStore::new()), Duration::from_secs(20)).await;
}

#[tokio::test(start_paused = true)]
async fn mem_watch_resumes_after_dropped_streams() {
    let store = MemStore::new();
    let handle = store.clone();
    let mut drop_all = move || handle.drop_watches();
    common::watch_resume(Arc::new(store), &mut drop_all).await;
}

#[tokio::test(start_paused = true)]
async fn mem_watch_compaction() {
    common::watch_compaction(Arc::new(MemStore::new())).await;
}

#[tokio::test(start_paused = true)]
async fn mem_bad_documents() {
    common::bad_documents(Arc::new(MemStore::new())).await;
}

/// Under lost, ambiguous and duplicated writes, a read-CAS-retry writer never loses an
/// acknowledged update and never applies one twice: the history of values is 1, 2, 3...
#[tokio::test(start_paused = true)]
async fn cas_counter_survives_injected_faults_over_seeds() {
    for seed in 0..40u64 {
        let faults = Faults {
            lose_write: 0.2,
            ambiguous_write: 0.2,
            duplicate_write: 0.2,
            delay: Some((Duration::from_millis(1), Duration::from_millis(30))),
        };
        let store: Arc<dyn Store> = Arc::new(MemStore::with_faults(faults, seed));
        let (_, mut watcher) = Watcher::start(store.clone(), "n").await.expect("start");
        let mut acked = 0u64;
        while acked < 30 {
            let Ok(cur) = store.get("n").await else {
                continue;
            };
            let (value, rev) = cur.map_or((0, 0), |kv| {
                (
                    String::from_utf8_lossy(&kv.value)
                        .parse::<u64>()
                        .unwrap_or(0),
                    kv.mod_revision,
                )
            });
            let put = Op::put("n", (value + 1).to_string().into_bytes());
            let cmp = Compare::ModRevision {
                key: "n".into(),
                revision: rev,
            };
            if let Ok(r) = store.txn(vec![cmp], vec![put]).await {
                acked += u64::from(r.succeeded);
            }
        }
        let final_value: u64 = loop {
            if let Ok(Some(kv)) = store.get("n").await {
                break String::from_utf8_lossy(&kv.value).parse().expect("number");
            }
        };
        assert!(
            final_value >= acked,
            "seed {seed}: acknowledged update lost"
        );
        let mut history = Vec::new();
        while history.len() < final_value as usize {
            if let Ok(WatchUpdate::Events(ev)) = watcher.next().await {
                history.extend(
                    ev.iter()
                        .map(|e| String::from_utf8_lossy(&e.kv.value).to_string()),
                );
            }
        }
        let expected: Vec<String> = (1..=final_value).map(|v| v.to_string()).collect();
        assert_eq!(
            history, expected,
            "seed {seed}: update applied twice or skipped"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn outage_fails_calls_and_closes_watches() {
    let store = MemStore::new();
    let dyn_store: Arc<dyn Store> = Arc::new(store.clone());
    let (_, mut w) = Watcher::start(dyn_store.clone(), "p/")
        .await
        .expect("start");
    store.set_unavailable(true);
    assert!(matches!(
        dyn_store.get("p/x").await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(w.next().await.is_err(), "the watcher reports the outage");
    store.set_unavailable(false);
    dyn_store
        .txn(vec![], vec![Op::put("p/x", b"1".to_vec())])
        .await
        .expect("put");
    assert!(matches!(w.next().await, Ok(WatchUpdate::Events(_))));
}

#[tokio::test(start_paused = true)]
async fn forced_lease_expiry_deletes_keys_and_ends_leadership() {
    let store = MemStore::new();
    let dyn_store: Arc<dyn Store> = Arc::new(store.clone());
    let cs = ClusterStore::new(dyn_store.clone(), "stolon/cluster", "x");
    let leader = cs
        .election(Duration::from_secs(20))
        .campaign(b"s1")
        .await
        .expect("lead");
    store.expire_lease(leader.lease);
    tokio::time::timeout(Duration::from_secs(30), leader.lost())
        .await
        .expect("loss noticed");
    assert!(leader.is_lost());
    let r = dyn_store
        .txn(vec![leader.guard()], vec![Op::put("k", vec![])])
        .await
        .expect("txn");
    assert!(!r.succeeded);
}

#[tokio::test(start_paused = true)]
async fn delayed_calls_hit_the_store_timeout() {
    let faults = Faults {
        delay: Some((Duration::from_secs(10), Duration::from_secs(11))),
        ..Default::default()
    };
    let store = timed::Timed::new(MemStore::with_faults(faults, 1), Duration::from_secs(5));
    let err = store.get("k").await.expect_err("times out");
    assert!(matches!(err, StoreError::Timeout { op: "get", .. }));
}

/// A clusterdata that cannot be serialised (a timestamp before year 0, which RFC 3339
/// cannot write) is refused before the compare-and-swap: the stored document stays as it
/// was, never replaced by an empty one.
#[tokio::test(start_paused = true)]
async fn an_unwritable_clusterdata_is_refused_and_the_stored_one_stays() {
    use stolon_core::model::{ClusterData, ClusterSpec, Timestamp};
    let store = Arc::new(MemStore::new());
    let cs = ClusterStore::new(store.clone(), "stolon/cluster", "c1");
    let cd = ClusterData::new("c1", ClusterSpec::default(), Timestamp::now());
    let CasOutcome::Written(rev) = cs.put_cluster_data(&cd, 0, None).await.expect("put") else {
        panic!("first write conflicts");
    };
    let mut bad = cd.clone();
    bad.change_time = Some(Timestamp(
        time::OffsetDateTime::UNIX_EPOCH
            .replace_year(-5)
            .expect("year"),
    ));
    assert!(bad.to_json().is_err());
    let err = cs
        .put_cluster_data(&bad, rev, None)
        .await
        .expect_err("refused");
    assert!(matches!(err, StoreError::Malformed { .. }), "{err:?}");
    let stored = store
        .get("stolon/cluster/c1/clusterdata")
        .await
        .expect("get")
        .expect("kept");
    assert_eq!(stored.mod_revision, rev);
    assert_eq!(
        ClusterData::from_json(&stored.value).expect("the stored document reads"),
        cd
    );
}

#[tokio::test(start_paused = true)]
async fn mem_keep_alive_without_writes() {
    common::keep_alive_without_writes(Arc::new(MemStore::new()), Duration::from_secs(20)).await;
}
