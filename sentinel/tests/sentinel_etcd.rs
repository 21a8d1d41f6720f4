//! Two real `stolon-sentinel` processes against a real etcd, with keepers simulated by the
//! test (they publish KeeperInfo under leases and report the db the clusterdata gives them
//! as healthy and converged). Shows: the cluster is created from --initial-cluster-spec and
//! initialised; one leader decides and the follower never does; leadership moves when the
//! leader is frozen or killed; a thawed old leader makes no write; the new leader fails over.

use control::model::{decode, ClusterData, ClusterPhase, KeeperInfo, PostgresState};
use control::store::etcd::{EtcdConfig, EtcdStore};
use control::store::timed::Timed;
use control::store::{ClusterStore, Store};
use nix::sys::signal::Signal;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use testkit::{free_port, ChildGuard, Etcd, PortGuard};
use tokio_util::sync::CancellationToken;

const CLUSTER: &str = "sentineltest";

async fn cluster_store(etcd: &Etcd) -> ClusterStore {
    let cfg = EtcdConfig {
        endpoints: vec![etcd.endpoint()],
        connect_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let store = EtcdStore::connect(&cfg).await.expect("connect");
    let store: Arc<dyn Store> = Arc::new(Timed::new(store, Duration::from_secs(2)));
    ClusterStore::new(store, "stolon/cluster", CLUSTER)
}

struct SentinelProc {
    uid: String,
    child: ChildGuard,
    metrics: PortGuard,
}

fn spawn_sentinel(etcd: &Etcd, uid: &str, spec: &std::path::Path) -> SentinelProc {
    let metrics = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stolon-sentinel"));
    cmd.args([
        "--cluster-name",
        CLUSTER,
        "--store-endpoints",
        &etcd.endpoint(),
    ])
    .args(["--uid", uid, "--leader-ttl", "3s", "--log-level", "info"])
    .arg("--initial-cluster-spec")
    .arg(spec)
    .args([
        "--metrics-listen-address",
        &format!("127.0.0.1:{}", metrics.0),
    ]);
    let child = ChildGuard::spawn(uid, &mut cmd).expect("spawn stolon-sentinel");
    SentinelProc {
        uid: uid.to_string(),
        child,
        metrics,
    }
}

/// One metric's value from the sentinel's /metrics, if it answers.
fn metric(p: &SentinelProc, name: &str) -> Option<f64> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", p.metrics.0)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Simulated keepers: every 300 ms each live keeper publishes a fresh info reporting the db
/// the clusterdata assigns it as healthy and converged.
fn spawn_keepers(
    store: ClusterStore,
    live: Arc<Mutex<BTreeSet<String>>>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    spawn_keepers_with(store, live, stop, false)
}

/// As [`spawn_keepers`]; `writing`: a cluster under write load, each report at a new WAL
/// position.
fn spawn_keepers_with(
    store: ClusterStore,
    live: Arc<Mutex<BTreeSet<String>>>,
    stop: CancellationToken,
    writing: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut keys = std::collections::BTreeMap::new();
        let mut n = 0u64;
        while !stop.is_cancelled() {
            let cd = store
                .get_cluster_data()
                .await
                .ok()
                .flatten()
                .map(|(cd, _)| cd);
            let uids: Vec<String> = live.lock().expect("lock").iter().cloned().collect();
            for uid in uids {
                n += 1;
                let db = cd
                    .as_ref()
                    .and_then(|cd| cd.dbs.values().find(|d| d.spec.keeper_uid == uid).cloned());
                let info = KeeperInfo {
                    info_uid: format!("i{n}"),
                    uid: uid.clone(),
                    cluster_uid: cd
                        .as_ref()
                        .map(|c| c.cluster.uid.clone())
                        .unwrap_or_default(),
                    postgres_state: db.map(|db| PostgresState {
                        uid: db.uid.clone(),
                        generation: db.generation,
                        healthy: true,
                        listen_address: "127.0.0.1".into(),
                        port: Some(5432),
                        system_id: "7000000000000000001".into(),
                        timeline_id: 1,
                        x_log_pos: if writing { 5000 + n * 100 } else { 5000 },
                        synchronous_standbys: db.spec.synchronous_standbys.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                let key = keys
                    .entry(uid.clone())
                    .or_insert_with(|| store.keeper_info_key(&uid, Duration::from_secs(20)));
                let _ = key.put(serde_json::to_vec(&info).expect("json")).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

async fn wait_for<T>(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for the cluster created from the spec file: initialised on two keepers, the
/// master published to proxies.
async fn initialised(store: &ClusterStore) -> ClusterData {
    wait_for(
        "an initialised cluster",
        Duration::from_secs(30),
        async || {
            let cd = cluster_data(store).await?;
            let ready = cd.cluster.status.phase == Some(ClusterPhase::Normal)
                && cd.proxy.spec.master_db_uid == cd.cluster.status.master
                && cd.dbs.len() == 2;
            ready.then_some(cd)
        },
    )
    .await
}

async fn leader(store: &ClusterStore) -> Option<String> {
    let kv = store
        .election(Duration::from_secs(3))
        .leader()
        .await
        .ok()??;
    String::from_utf8(kv.value).ok()
}

async fn cluster_data(store: &ClusterStore) -> Option<ClusterData> {
    store
        .get_cluster_data()
        .await
        .ok()
        .flatten()
        .map(|(cd, _)| cd)
}

fn master_keeper(cd: &ClusterData) -> Option<String> {
    let db = cd.dbs.get(&cd.cluster.status.master)?;
    Some(db.spec.keeper_uid.clone())
}

fn spec_file(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let path = dir.path().join("spec.json");
    let spec = r#"{"initMode": "new", "sleepInterval": "1s", "failInterval": "3s",
                  "proxyCheckInterval": "1s", "proxyTimeout": "3s"}"#;
    std::fs::write(&path, spec).expect("write spec");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sentinels_one_leader_that_moves_when_frozen_or_killed() {
    let etcd = Etcd::start().expect("etcd");
    let dir = testkit::temp_dir("sentinel").expect("tmp");
    let spec = spec_file(&dir);
    let store = cluster_store(&etcd).await;
    let live = Arc::new(Mutex::new(BTreeSet::from([
        "k0".to_string(),
        "k1".to_string(),
    ])));
    let stop = CancellationToken::new();
    let keepers = spawn_keepers(store.clone(), live.clone(), stop.clone());
    let mut sentinels = [
        spawn_sentinel(&etcd, "s1", &spec),
        spawn_sentinel(&etcd, "s2", &spec),
    ];

    // Created from --initial-cluster-spec, initialised, master published to proxies.
    let cd = initialised(&store).await;
    let first_master = master_keeper(&cd).expect("master");

    let lead = leader(&store).await.expect("a leader");
    let (li, fi) = if lead == "s1" { (0, 1) } else { (1, 0) };
    assert!(metric(&sentinels[li], "stolon_sentinel_rounds_total").unwrap_or(0.0) > 0.0);
    assert_eq!(
        metric(&sentinels[li], "stolon_sentinel_is_leader"),
        Some(1.0)
    );
    assert_eq!(
        metric(&sentinels[fi], "stolon_sentinel_is_leader"),
        Some(0.0)
    );
    assert_eq!(
        metric(&sentinels[fi], "stolon_sentinel_rounds_total"),
        Some(0.0),
        "a follower never decides"
    );
    assert_eq!(
        metric(&sentinels[fi], "stolon_sentinel_writes_total"),
        Some(0.0)
    );

    // Freeze the leader: the other takes over after the leader TTL and fails over a dead
    // master on its own.
    let writes_before = metric(&sentinels[li], "stolon_sentinel_writes_total").expect("metrics");
    sentinels[li]
        .child
        .signal(Signal::SIGSTOP)
        .expect("SIGSTOP");
    let follower = sentinels[fi].uid.clone();
    wait_for("leadership to move", Duration::from_secs(15), async || {
        (leader(&store).await? == follower).then_some(())
    })
    .await;
    live.lock().expect("lock").remove(&first_master);
    let cd = wait_for(
        "a failover by the new leader",
        Duration::from_secs(20),
        async || {
            let cd = cluster_data(&store).await?;
            (master_keeper(&cd)? != first_master
                && cd.proxy.spec.master_db_uid == cd.cluster.status.master)
                .then_some(cd)
        },
    )
    .await;
    assert_eq!(
        metric(&sentinels[fi], "stolon_sentinel_is_leader"),
        Some(1.0)
    );
    assert!(metric(&sentinels[fi], "stolon_sentinel_failovers_total").unwrap_or(0.0) >= 1.0);

    // Thawed, the old leader knows it lost and writes nothing.
    sentinels[li]
        .child
        .signal(Signal::SIGCONT)
        .expect("SIGCONT");
    // The positive event: the thawed sentinel notices it is no longer the leader.
    wait_for(
        "the thawed sentinel to drop its leadership",
        Duration::from_secs(15),
        async || (metric(&sentinels[li], "stolon_sentinel_is_leader")? == 0.0).then_some(()),
    )
    .await;
    assert_eq!(
        metric(&sentinels[li], "stolon_sentinel_writes_total"),
        Some(writes_before)
    );
    assert_eq!(leader(&store).await.as_deref(), Some(follower.as_str()));

    // Kill -9 the new leader: the thawed one leads again and acts: the returning keeper
    // gets a standby db.
    sentinels[fi].child.kill();
    let old = sentinels[li].uid.clone();
    wait_for(
        "leadership to return",
        Duration::from_secs(15),
        async || (leader(&store).await? == old).then_some(()),
    )
    .await;
    live.lock().expect("lock").insert(first_master.clone());
    let new_master = master_keeper(&cd).expect("master");
    wait_for(
        "the old master's keeper to rejoin",
        Duration::from_secs(20),
        async || {
            let cd = cluster_data(&store).await?;
            let db = cd
                .dbs
                .values()
                .find(|d| d.spec.keeper_uid == first_master)?;
            let follows = db.spec.follow_config.as_ref()?.dbuid == cd.cluster.status.master;
            (follows && master_keeper(&cd)? == new_master).then_some(())
        },
    )
    .await;
    stop.cancel();
    let _ = keepers.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_cluster_spec_never_overwrites_an_existing_cluster() {
    let etcd = Etcd::start().expect("etcd");
    let dir = testkit::temp_dir("sentinel").expect("tmp");
    let spec = spec_file(&dir);
    let store = cluster_store(&etcd).await;
    let existing = ClusterData::new(
        "existing",
        decode("spec", br#"{"initMode": "new"}"#).expect("spec"),
        control::model::Timestamp::now(),
    );
    store
        .put_cluster_data(&existing, 0, None)
        .await
        .expect("put");
    let s = spawn_sentinel(&etcd, "s1", &spec);
    wait_for("a round", Duration::from_secs(15), async || {
        (metric(&s, "stolon_sentinel_rounds_total")? >= 2.0).then_some(())
    })
    .await;
    let cd = cluster_data(&store).await.expect("clusterdata");
    assert_eq!(cd.cluster.uid, "existing");
    assert_eq!(
        cd.cluster.spec.sleep_interval, None,
        "the file's spec was not applied"
    );
}

/// Under write load every keeper report carries a new WAL position. The leader folds those
/// into the clusterdata at most once per sleepInterval (1 s here), not at each report
/// (about 7 a second here), so the keepers and proxies watching the document are not woken
/// for each; a real change (a keeper gone) is still written at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_positions_alone_are_written_once_per_sleep_interval() {
    let etcd = Etcd::start().expect("etcd");
    let dir = testkit::temp_dir("sentinel").expect("tmp");
    let spec = spec_file(&dir);
    let store = cluster_store(&etcd).await;
    let live = Arc::new(Mutex::new(BTreeSet::from([
        "k0".to_string(),
        "k1".to_string(),
    ])));
    let stop = CancellationToken::new();
    let keepers = spawn_keepers_with(store.clone(), live.clone(), stop.clone(), true);
    let s1 = spawn_sentinel(&etcd, "s1", &spec);
    initialised(&store).await;
    let writes = |p: &SentinelProc| metric(p, "stolon_sentinel_writes_total");
    let (w0, rev0) = (writes(&s1).expect("metrics"), cd_revision_any(&store).await);
    let start = Instant::now();
    // Forty more store writes: keeper reports, each at a new position, and the sentinel's.
    let rev1 = wait_for("keeper reports", Duration::from_secs(30), async || {
        let rev = cd_revision_any(&store).await;
        (rev >= rev0 + 40).then_some(rev)
    })
    .await;
    let w1 = writes(&s1).expect("metrics");
    let written = w1 - w0;
    let reports = (rev1 - rev0) as f64 - written;
    eprintln!(
        "{written} clusterdata writes for {reports} keeper reports in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    // Written at each report, there would be one write per report.
    assert!(
        written * 3.0 < reports,
        "{written} clusterdata writes for {reports} reports of WAL positions alone"
    );
    let cd = cluster_data(&store).await.expect("cd");
    assert!(
        cd.dbs.values().all(|d| d.status.x_log_pos > 5000),
        "WAL positions never written"
    );
    // A real change is not held back: a dead keeper is noticed after failInterval (3 s),
    // and its db's health written at once.
    let master = master_keeper(&cd).expect("master");
    let standby = if master == "k0" { "k1" } else { "k0" };
    live.lock().expect("lock").remove(standby);
    wait_for("the standby failed", Duration::from_secs(20), async || {
        let cd = cluster_data(&store).await?;
        let db = cd.dbs.values().find(|d| d.spec.keeper_uid == standby)?;
        (!db.status.healthy).then_some(())
    })
    .await;
    stop.cancel();
    let _ = keepers.await;
}

/// The store's revision (every write to any key moves it).
async fn cd_revision_any(store: &ClusterStore) -> i64 {
    store
        .store()
        .get_prefix("stolon/")
        .await
        .map_or(0, |r| r.revision)
}
