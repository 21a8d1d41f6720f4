//! The store conformance suite: the same checks run against real etcd (`store_etcd.rs`)
//! and the in-memory store (`store_mem.rs`), so the simulation store behaves like etcd.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use stolon_core::model::ClusterData;
use stolon_store::*;
use tokio::time::timeout;

pub type Breaker<'a> = &'a mut (dyn FnMut() + Send);

const WAIT: Duration = Duration::from_secs(20);

pub async fn cas_race(store: Arc<dyn Store>) {
    let cs = ClusterStore::new(store.clone(), "stolon/cluster", "race");
    let cd = ClusterData::new(
        "c1",
        Default::default(),
        stolon_core::model::Timestamp::now(),
    );
    // Create-if-absent: of eight concurrent creators exactly one wins.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (cs, cd) = (cs.clone(), cd.clone());
        tasks.push(tokio::spawn(async move {
            cs.put_cluster_data(&cd, 0, None).await
        }));
    }
    let mut wins = 0;
    for t in tasks {
        if let CasOutcome::Written(_) = t.await.expect("join").expect("put") {
            wins += 1;
        }
    }
    assert_eq!(wins, 1, "exactly one create wins");
    // Compare-and-swap on one revision: of eight writers exactly one wins.
    let (_, rev) = cs.get_cluster_data().await.expect("get").expect("present");
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (cs, mut cd) = (cs.clone(), cd.clone());
        cd.cluster.uid = format!("writer-{i}");
        tasks.push(tokio::spawn(async move {
            cs.put_cluster_data(&cd, rev, None).await
        }));
    }
    let mut winners = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        if let CasOutcome::Written(new_rev) = t.await.expect("join").expect("put") {
            assert!(new_rev > rev);
            winners.push(i);
        }
    }
    assert_eq!(winners.len(), 1, "exactly one CAS wins");
    let (now, _) = cs.get_cluster_data().await.expect("get").expect("present");
    assert_eq!(now.cluster.uid, format!("writer-{}", winners[0]));
    // A stale revision always loses.
    assert_eq!(
        cs.put_cluster_data(&cd, rev, None).await.expect("put"),
        CasOutcome::Conflict
    );
}

/// Waits (polling) until `key` is absent; returns how long it took.
async fn wait_absent(store: &Arc<dyn Store>, key: &str, limit: Duration) -> Option<Duration> {
    let start = tokio::time::Instant::now();
    while start.elapsed() < limit {
        if store.get(key).await.expect("get").is_none() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

pub async fn lease_lifecycle(store: Arc<dyn Store>, ttl: Duration) {
    let cs = ClusterStore::new(store.clone(), "stolon/cluster", "lease");
    let mut info = cs.keeper_info_key("k1", ttl);
    let key = info.key().to_string();
    // Kept alive for three TTLs: still there.
    let start = tokio::time::Instant::now();
    let mut last_put = start;
    while start.elapsed() < ttl * 3 {
        // Taken before the put: the store refreshes the lease no earlier than this.
        last_put = tokio::time::Instant::now();
        info.put(br#"{"uid":"k1"}"#.to_vec())
            .await
            .expect("publish");
        tokio::time::sleep(ttl / 4).await;
        assert!(
            store.get(&key).await.expect("get").is_some(),
            "kept-alive info vanished"
        );
    }
    // The owner stops: gone after the TTL, not before half of it.
    let stopped = tokio::time::Instant::now();
    tokio::time::sleep(ttl / 2).await;
    let kv = store.get(&key).await.expect("get");
    assert!(
        kv.is_some(),
        "info vanished before its TTL ({:?} after the last put)",
        stopped.elapsed()
    );
    let gone = wait_absent(&store, &key, ttl * 3).await;
    assert!(gone.is_some(), "info outlived 3.5 x its TTL");
    assert!(last_put.elapsed() >= ttl, "info vanished before its TTL");
    // A clean stop removes it at once.
    info.put(b"{}".to_vec()).await.expect("publish again");
    info.revoke().await.expect("revoke");
    assert!(store.get(&key).await.expect("get").is_none());
    // The infos listing shows only live keepers.
    let infos = cs.keeper_infos().await.expect("list");
    assert!(infos.items.is_empty());
}

/// A key written once and kept by lease keep-alives alone (a proxy that writes its info
/// only on change): it stays, unwritten, for as long as the keep-alives go on; a TTL change
/// moves it to a new lease without a moment of absence; stopped, it is gone after the TTL.
pub async fn keep_alive_without_writes(store: Arc<dyn Store>, ttl: Duration) {
    let cs = ClusterStore::new(store.clone(), "stolon/cluster", "keepalive");
    let mut info = cs.proxy_info_key("p1", ttl);
    let key = info.key().to_string();
    assert!(
        !info.keep_alive().await.expect("keep-alive"),
        "no lease before the first put"
    );
    info.put(br#"{"UID":"p1"}"#.to_vec())
        .await
        .expect("publish");
    let written = store
        .get(&key)
        .await
        .expect("get")
        .expect("written")
        .mod_revision;
    let start = tokio::time::Instant::now();
    while start.elapsed() < ttl * 3 {
        assert!(info.keep_alive().await.expect("keep-alive"), "lease lost");
        tokio::time::sleep(ttl / 4).await;
        let kv = store
            .get(&key)
            .await
            .expect("get")
            .expect("kept-alive key vanished");
        assert_eq!(kv.mod_revision, written, "a keep-alive wrote the key");
    }
    // A new TTL: the next put moves the key to a new lease, then revokes the old one.
    info.set_ttl(ttl * 2);
    assert!(
        !info.keep_alive().await.expect("keep-alive"),
        "the old lease is retired"
    );
    info.put(br#"{"UID":"p1"}"#.to_vec())
        .await
        .expect("publish");
    assert!(
        store.get(&key).await.expect("get").is_some(),
        "revoking the old lease deleted the key"
    );
    tokio::time::sleep(ttl + ttl / 2).await;
    assert!(
        store.get(&key).await.expect("get").is_some(),
        "the key kept the old TTL"
    );
    assert!(info.keep_alive().await.expect("keep-alive"));
    // Stopped: gone after the new TTL.
    let gone = wait_absent(&store, &key, ttl * 6).await;
    assert!(
        gone.is_some_and(|g| g >= ttl),
        "gone after {gone:?}, TTL {:?}",
        ttl * 2
    );
    assert!(
        !info.keep_alive().await.expect("keep-alive"),
        "a keep-alive of an expired lease"
    );
}

pub async fn election(store: Arc<dyn Store>, ttl: Duration) {
    let cs = ClusterStore::new(store.clone(), "stolon/cluster", "elect");
    let writes: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let a = cs
        .election(ttl)
        .campaign(b"sentinel-a")
        .await
        .expect("a campaigns");
    let leader = cs
        .election(ttl)
        .leader()
        .await
        .expect("leader")
        .expect("some");
    assert_eq!(leader.value, b"sentinel-a");

    // B campaigns in the background and must wait.
    let cs_b = cs.clone();
    let b_task = tokio::spawn(async move { cs_b.election(ttl).campaign(b"sentinel-b").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !b_task.is_finished(),
        "B became leader while A holds the lease"
    );

    // A writes under its leadership while it lasts.
    let key = format!("{}/leader-writes", cs.prefix());
    let a_write = |tag: &'static str| {
        let (store, key, writes, guard) = (store.clone(), key.clone(), writes.clone(), a.guard());
        async move {
            let r = store
                .txn(vec![guard], vec![Op::put(key, tag.as_bytes().to_vec())])
                .await
                .expect("txn");
            if r.succeeded {
                writes.lock().expect("lock").push(("a".into(), r.revision));
            }
            r.succeeded
        }
    };
    assert!(a_write("a1").await, "the leader's guarded write succeeds");

    // A dies without resigning (frozen): B takes over after the TTL.
    let a_key = a.key.clone();
    let a_create = a.create_revision;
    let a_guard = a.guard();
    a.abandon();
    let b = timeout(ttl * 4, b_task)
        .await
        .expect("B took over within 4 x TTL")
        .expect("join")
        .expect("b campaign");
    assert!(b.create_revision > a_create);
    assert!(
        store.get(&a_key).await.expect("get").is_none(),
        "A's key is gone"
    );
    let r = store
        .txn(vec![b.guard()], vec![Op::put(key.clone(), b"b1".to_vec())])
        .await
        .expect("txn");
    assert!(r.succeeded);
    writes.lock().expect("lock").push(("b".into(), r.revision));
    // A deposed leader's write fails.
    let r = store
        .txn(vec![a_guard], vec![Op::put(key.clone(), b"a2".to_vec())])
        .await
        .expect("txn");
    assert!(!r.succeeded, "deposed leader wrote");
    // Never two leaders: every A write precedes every B write in store revisions.
    let w = writes.lock().expect("lock").clone();
    let last_a = w
        .iter()
        .filter(|(who, _)| who == "a")
        .map(|(_, r)| *r)
        .max();
    let first_b = w
        .iter()
        .filter(|(who, _)| who == "b")
        .map(|(_, r)| *r)
        .min();
    assert!(last_a < first_b, "leadership overlapped: {w:?}");
    let leader = cs
        .election(ttl)
        .leader()
        .await
        .expect("leader")
        .expect("some");
    assert_eq!(leader.value, b"sentinel-b");
    drop(b);
}

fn keys_of(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.kv.key.clone()).collect()
}

async fn collect(w: &mut Watcher, n: usize, seen: &mut Vec<Event>) {
    while seen.len() < n {
        match timeout(WAIT, w.next()).await.expect("watch timed out") {
            Ok(WatchUpdate::Events(ev)) => seen.extend(ev),
            Ok(WatchUpdate::Progress(_)) => {}
            Ok(WatchUpdate::Resync(r)) => panic!("unexpected resync at {}", r.revision),
            Err(e) => {
                // The store may still be coming back after a restart.
                tracing::debug!(error = %e, "watch error, retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

pub async fn watch_resume(store: Arc<dyn Store>, break_streams: Breaker<'_>) {
    let prefix = "stolon/cluster/watch/";
    let (initial, mut w) = Watcher::start(store.clone(), prefix).await.expect("start");
    assert!(initial.kvs.is_empty());
    for i in 0..5 {
        store
            .txn(vec![], vec![Op::put(format!("{prefix}k{i}"), vec![b'x'])])
            .await
            .expect("put");
    }
    let mut seen = Vec::new();
    collect(&mut w, 3, &mut seen).await;
    // The stream breaks mid-way; writes land while it is down.
    break_streams();
    for i in 5..10 {
        let mut ok = false;
        for _ in 0..100 {
            let put = store.txn(vec![], vec![Op::put(format!("{prefix}k{i}"), vec![b'y'])]);
            if put.await.is_ok() {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ok, "store did not come back");
    }
    collect(&mut w, 10, &mut seen).await;
    let expected: Vec<String> = (0..10).map(|i| format!("{prefix}k{i}")).collect();
    assert_eq!(
        keys_of(&seen),
        expected,
        "events lost, repeated or out of order"
    );
    let revs: Vec<i64> = seen.iter().map(|e| e.kv.mod_revision).collect();
    assert!(
        revs.windows(2).all(|p| p[0] < p[1]),
        "revisions not increasing: {revs:?}"
    );
    // Deletes arrive as delete events.
    store
        .txn(
            vec![],
            vec![Op::Delete {
                key: format!("{prefix}k0"),
            }],
        )
        .await
        .expect("del");
    let mut more = Vec::new();
    collect(&mut w, 1, &mut more).await;
    assert_eq!(more[0].kind, EventKind::Delete);
    assert_eq!(more[0].kv.key, format!("{prefix}k0"));
}

pub async fn watch_compaction(store: Arc<dyn Store>) {
    let prefix = "stolon/cluster/compact/";
    store
        .txn(vec![], vec![Op::put(format!("{prefix}a"), b"1".to_vec())])
        .await
        .expect("put");
    let (_, mut w) = Watcher::start(store.clone(), prefix).await.expect("start");
    // The watcher falls behind (its stream is not open) while history is compacted.
    let mut last = 0;
    for i in 0..5 {
        let r = store
            .txn(
                vec![],
                vec![Op::put(format!("{prefix}b{i}"), b"2".to_vec())],
            )
            .await
            .expect("put");
        last = r.revision;
    }
    store.compact(last).await.expect("compact");
    match timeout(WAIT, w.next())
        .await
        .expect("timed out")
        .expect("next")
    {
        WatchUpdate::Resync(range) => {
            let keys: BTreeSet<String> = range.kvs.iter().map(|kv| kv.key.clone()).collect();
            assert_eq!(keys.len(), 6, "resync has the whole state: {keys:?}");
            assert!(range.revision >= last);
        }
        other => panic!("expected a resync, got {other:?}"),
    }
    // And it goes on from the new revision.
    store
        .txn(vec![], vec![Op::put(format!("{prefix}c"), b"3".to_vec())])
        .await
        .expect("put");
    let mut seen = Vec::new();
    collect(&mut w, 1, &mut seen).await;
    assert_eq!(keys_of(&seen), vec![format!("{prefix}c")]);
}

pub async fn bad_documents(store: Arc<dyn Store>) {
    let cs = ClusterStore::new(store.clone(), "stolon/cluster", "bad");
    let key = cs.clusterdata_key();
    let cases: &[(&str, &str)] = &[
        (r#"{"formatVersion":1,"cluster":{"uid":"#, "EOF"),
        (r#"{"formatVersion":2,"cluster":{}}"#, "formatVersion 2"),
        (r#"{"cluster":{}}"#, "formatVersion missing"),
        (
            r#"{"formatVersion":1,"cluster":{"generation":"one"}}"#,
            "invalid type",
        ),
        (
            r#"{"formatVersion":1,"cluster":{},"dbs":{"d":{"status":{"port":"99999"}}}}"#,
            "port",
        ),
        (r#"[1,2,3]"#, "invalid type"),
        ("", "EOF"),
    ];
    for (doc, needle) in cases {
        store
            .txn(vec![], vec![Op::put(key.clone(), doc.as_bytes().to_vec())])
            .await
            .expect("put");
        match cs.get_cluster_data().await {
            Err(StoreError::Malformed { key: k, reason }) => {
                assert_eq!(k, key);
                assert!(
                    reason.contains(needle),
                    "{doc:?}: reason {reason:?} lacks {needle:?}"
                );
            }
            other => panic!("{doc:?} gave {other:?}"),
        }
    }
    // One bad info does not hide the good ones.
    let p = cs.keepers_info_prefix();
    store
        .txn(
            vec![],
            vec![Op::put(format!("{p}good"), br#"{"uid":"good"}"#.to_vec())],
        )
        .await
        .expect("put");
    store
        .txn(vec![], vec![Op::put(format!("{p}bad"), b"{nope".to_vec())])
        .await
        .expect("put");
    let infos = cs.keeper_infos().await.expect("list");
    assert_eq!(infos.items.keys().collect::<Vec<_>>(), vec!["good"]);
    assert_eq!(infos.errors.len(), 1);
    assert!(infos.errors[0].to_string().contains(&format!("{p}bad")));
}
