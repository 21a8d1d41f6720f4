//! The store conformance suite against a real etcd, started on a free port per test.

mod common;

use std::sync::Arc;
use std::time::Duration;
use stolon_store::etcd::{EtcdConfig, EtcdStore};
use stolon_store::timed::Timed;
use stolon_store::{Store, StoreError};
use testkit::Etcd;

async fn connect(etcd: &Etcd) -> Arc<dyn Store> {
    let cfg = EtcdConfig {
        endpoints: vec![etcd.endpoint()],
        connect_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let store = EtcdStore::connect(&cfg).await.expect("connect");
    Arc::new(Timed::new(store, Duration::from_secs(2)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_cas_race() {
    let etcd = Etcd::start().expect("etcd");
    common::cas_race(connect(&etcd).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_lease_lifecycle() {
    let etcd = Etcd::start().expect("etcd");
    common::lease_lifecycle(connect(&etcd).await, Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_election() {
    let etcd = Etcd::start().expect("etcd");
    common::election(connect(&etcd).await, Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watch_resumes_after_restart() {
    let mut etcd = Etcd::start().expect("etcd");
    let store = connect(&etcd).await;
    let mut restart = || etcd.restart().expect("restart etcd");
    common::watch_resume(store, &mut restart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watch_compaction() {
    let etcd = Etcd::start().expect("etcd");
    common::watch_compaction(connect(&etcd).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_bad_documents() {
    let etcd = Etcd::start().expect("etcd");
    common::bad_documents(connect(&etcd).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_every_call_times_out_when_etcd_is_frozen() {
    let etcd = Etcd::start().expect("etcd");
    let store = connect(&etcd).await;
    store.get("x").await.expect("works before the freeze");
    etcd.freeze().expect("freeze");
    let err = store.get("x").await.expect_err("must time out");
    etcd.thaw().expect("thaw");
    assert!(
        matches!(err, StoreError::Timeout { op: "get", .. }),
        "{err:?}"
    );
    store.get("x").await.expect("works after the thaw");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_unreachable_is_an_error_not_a_hang() {
    let port = testkit::free_port();
    let cfg = EtcdConfig {
        endpoints: vec![format!("http://127.0.0.1:{}", port.0)],
        connect_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let res = tokio::time::timeout(Duration::from_secs(10), async {
        let store: Arc<dyn Store> = Arc::new(Timed::new(
            EtcdStore::connect(&cfg).await?,
            Duration::from_secs(1),
        ));
        store.get("x").await
    })
    .await
    .expect("no hang");
    assert!(res.is_err());
}

#[tokio::test]
async fn tls_options_are_checked() {
    let cfg = EtcdConfig {
        endpoints: vec!["https://127.0.0.1:1".into()],
        cert_file: Some("/nonexistent/cert.pem".into()),
        key_file: Some("/nonexistent/key.pem".into()),
        ..Default::default()
    };
    let err = EtcdStore::connect(&cfg).await.err().expect("must fail");
    assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
    let half = EtcdConfig {
        endpoints: vec!["https://127.0.0.1:1".into()],
        cert_file: Some("/tmp/c.pem".into()),
        ..Default::default()
    };
    let err = EtcdStore::connect(&half).await.err().expect("must fail");
    assert!(err.to_string().contains("together"), "{err}");
}

/// A client certificate file may carry the intermediates after the certificate (as Go's
/// tls.LoadX509KeyPair reads it): they are sent, and etcd, trusting the root only, accepts
/// the client; the leaf alone is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_chain_file_is_sent_whole() {
    let tls = testkit::TlsFiles::generate().expect("certs");
    let (leaf, chain, key) = tls.client_via_intermediate().expect("intermediate");
    let etcd = Etcd::start_tls(&tls).expect("etcd with tls");
    let cfg = |cert: &std::path::Path| EtcdConfig {
        endpoints: vec![etcd.endpoint()],
        ca_file: Some(tls.ca.clone()),
        cert_file: Some(cert.to_path_buf()),
        key_file: Some(key.clone()),
        connect_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let get = |cfg: EtcdConfig| async move {
        let s = Timed::new(EtcdStore::connect(&cfg).await?, Duration::from_secs(3));
        s.get("x").await
    };
    get(cfg(&chain)).await.expect("the chain is accepted");
    assert!(get(cfg(&leaf)).await.is_err(), "the leaf alone is refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_with_client_certificates() {
    let tls = testkit::TlsFiles::generate().expect("certs");
    let etcd = Etcd::start_tls(&tls).expect("etcd with tls");
    let cfg = EtcdConfig {
        endpoints: vec![etcd.endpoint()],
        ca_file: Some(tls.ca.clone()),
        cert_file: Some(tls.client_cert.clone()),
        key_file: Some(tls.client_key.clone()),
        connect_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let store: Arc<dyn Store> = Arc::new(Timed::new(
        EtcdStore::connect(&cfg).await.expect("connect"),
        Duration::from_secs(3),
    ));
    common::cas_race(store).await;
    // Without a client certificate the server refuses.
    let no_cert = EtcdConfig {
        cert_file: None,
        key_file: None,
        ..cfg
    };
    let res = async {
        let s = Timed::new(EtcdStore::connect(&no_cert).await?, Duration::from_secs(3));
        s.get("x").await
    }
    .await;
    assert!(
        res.is_err(),
        "a client without a certificate must be refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_revoked_leader_lease_hands_over_at_once() {
    let etcd = Etcd::start().expect("etcd");
    let store = connect(&etcd).await;
    let cs = stolon_store::ClusterStore::new(store.clone(), "stolon/cluster", "revoke");
    let ttl = Duration::from_secs(20);
    let a = cs.election(ttl).campaign(b"a").await.expect("a leads");
    let cs_b = cs.clone();
    let b_task = tokio::spawn(async move { cs_b.election(ttl).campaign(b"b").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b_task.is_finished());
    store.revoke_lease(a.lease).await.expect("kill A's lease");
    let b = tokio::time::timeout(Duration::from_secs(5), b_task)
        .await
        .expect("B leads well before A's TTL")
        .expect("join")
        .expect("campaign");
    tokio::time::timeout(Duration::from_secs(10), a.lost())
        .await
        .expect("A notices");
    assert!(a.is_lost());
    let guarded = store
        .txn(
            vec![a.guard()],
            vec![stolon_store::Op::put("k", b"a".to_vec())],
        )
        .await
        .expect("txn");
    assert!(!guarded.succeeded);
    assert!(b.create_revision > a.create_revision);
}

/// Errors are told apart by the client's kinds and codes, not by their text: a request that
/// hit a dead member while connecting is sent again (the balancer picks again), so a
/// cluster with one member down serves every request; a lease that is gone is
/// `LeaseNotFound` for keep-alive and revoke alike; other failures keep the client's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_errors_are_matched_by_kind() {
    let etcd = Etcd::start().expect("etcd");
    let dead = testkit::free_port();
    let cfg = EtcdConfig {
        endpoints: vec![etcd.endpoint(), format!("http://127.0.0.1:{}", dead.0)],
        connect_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let store = EtcdStore::connect(&cfg).await.expect("connect");
    for i in 0..40 {
        store
            .txn(vec![], vec![stolon_store::Op::put("k", format!("{i}"))])
            .await
            .unwrap_or_else(|e| panic!("write {i} with one member dead: {e:?}"));
    }
    let lease = store
        .grant_lease(Duration::from_secs(30))
        .await
        .expect("grant");
    store.revoke_lease(lease).await.expect("revoke");
    assert_eq!(
        store.revoke_lease(lease).await,
        Err(StoreError::LeaseNotFound(lease))
    );
    assert_eq!(
        store.keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(lease))
    );

    let only_dead = EtcdConfig {
        endpoints: vec![format!("http://127.0.0.1:{}", dead.0)],
        connect_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let store = EtcdStore::connect(&only_dead).await.expect("connect");
    let err = store.get("k").await.expect_err("nothing listens");
    let StoreError::Unavailable(cause) = &err else {
        panic!("{err:?}");
    };
    assert!(
        cause.get().downcast_ref::<etcd_client::Error>().is_some(),
        "the client's error is kept: {err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_keep_alive_without_writes() {
    let etcd = Etcd::start().expect("etcd");
    common::keep_alive_without_writes(connect(&etcd).await, Duration::from_secs(2)).await;
}

/// Renewals go over a kept keep-alive stream: one that broke (etcd restarted) is opened
/// again, and a lease that expired or was revoked is reported gone, not renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_kept_keep_alive_stream_survives_a_restart_and_sees_expiry() {
    let mut etcd = Etcd::start().expect("etcd");
    let store = connect(&etcd).await;
    let lease = store
        .grant_lease(Duration::from_secs(30))
        .await
        .expect("grant");
    store.keep_alive(lease).await.expect("first renewal");
    store
        .keep_alive(lease)
        .await
        .expect("renewal on the kept stream");
    etcd.restart().expect("restart etcd");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match store.keep_alive(lease).await {
            Ok(()) => break,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "renewal after the restart, again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no renewal after the restart: {e}"),
        }
    }
    store.revoke_lease(lease).await.expect("revoke");
    assert!(matches!(
        store.keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    // Expiry seen on a kept stream.
    let short = store
        .grant_lease(Duration::from_secs(1))
        .await
        .expect("grant");
    store.keep_alive(short).await.expect("renewal");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(matches!(
        store.keep_alive(short).await,
        Err(StoreError::LeaseNotFound(_))
    ));
}
