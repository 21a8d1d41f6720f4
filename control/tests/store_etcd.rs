//! The store conformance suite against a real etcd, started on a free port per test.

mod common;

use control::store::etcd::{EtcdConfig, EtcdStore};
use control::store::timed::Timed;
use control::store::{Store, StoreError};
use std::sync::Arc;
use std::time::Duration;
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
