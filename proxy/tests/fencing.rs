//! Store-contact fencing with a real etcd: the proxy closes everything and refuses new
//! sessions within proxyTimeout of losing the store, and routes again when it returns.

mod common;

use common::*;
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn refuses_tcp(proxy: &Proxy) -> bool {
    TcpStream::connect(("127.0.0.1", proxy.port.0)).is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_down_fences_within_proxy_timeout_and_recovers() {
    let mut s = Setup::new(1).await;
    let p0 = s.pgs[0].port();
    s.route_to("db0", &["p1"], 1).await;
    let proxy = Proxy::spawn(&s.etcd, "p1", &[]);
    assert!(wait_routed(&proxy, p0).await, "{}", proxy.log_text());
    let session = proxy.connect().await.expect("connect");

    s.etcd.stop();
    let stopped = Instant::now();
    // proxyTimeout is 3s in the test spec: fenced by then (plus the check interval and slack).
    assert!(
        wait_for(Duration::from_secs(6), || async {
            session.simple_query("select 1").await.is_err()
        })
        .await,
        "session survived the store outage"
    );
    let fenced_after = stopped.elapsed();
    assert!(
        wait_for(Duration::from_secs(2), || async { refuses_tcp(&proxy) }).await,
        "still listening"
    );
    assert!(
        fenced_after >= Duration::from_millis(2000),
        "fenced too early: {fenced_after:?}"
    );

    s.etcd.restart().expect("etcd back");
    assert!(
        wait_routed(&proxy, p0).await,
        "routing again after the store returned"
    );
    assert!(proxy.log_text().contains("fencing"), "{}", proxy.log_text());
    eprintln!("fenced {fenced_after:?} after etcd stopped (proxyTimeout 3s)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_stop_listening_fenced_clients_get_57p03() {
    let mut s = Setup::new(1).await;
    s.route_to("db0", &["p1"], 1).await;
    let proxy = Proxy::spawn(&s.etcd, "p1", &["--stop-listening=false"]);
    assert!(wait_routed(&proxy, s.pgs[0].port()).await);
    s.etcd.freeze().expect("freeze etcd");
    let fenced = wait_for(Duration::from_secs(8), || async {
        connect_error_code(&proxy).await.as_deref() == Some("57P03")
    })
    .await;
    s.etcd.thaw().expect("thaw");
    assert!(fenced, "{}", proxy.log_text());
    let err = proxy.connect().await;
    if let Err(e) = err {
        // Either already routing again, or refused with the reason.
        let msg = e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_default();
        assert!(
            msg.is_empty() || msg.contains("lost contact with the store"),
            "{msg}"
        );
    }
    assert!(wait_routed(&proxy, s.pgs[0].port()).await);
    s.etcd.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn does_not_listen_before_the_first_successful_read() {
    let mut s = Setup::new(1).await;
    s.route_to("db0", &["p1"], 1).await;
    s.etcd.stop();
    let proxy = Proxy::spawn(&s.etcd, "p1", &[]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        refuses_tcp(&proxy),
        "listening without having read the store"
    );
    s.etcd.restart().expect("etcd");
    assert!(
        wait_routed(&proxy, s.pgs[0].port()).await,
        "{}",
        proxy.log_text()
    );
}
