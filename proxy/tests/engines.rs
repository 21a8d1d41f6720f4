//! The relay engine serves real PostgreSQL traffic, severing included; sessions spread over
//! the relay threads by default, and with a fill the first thread takes its fill before the
//! others; a session handed to another thread is served as well; the names of the removed
//! engines still start a proxy; a port another process listens on is refused.

mod common;

use common::*;
use std::time::Duration;
use testkit::{free_port, ChildGuard};

async fn serves_with(engine: &str) -> String {
    let s = Setup::new(1).await;
    let proxy = spawn_routed(&s, &["--engine", engine]).await;
    // Some traffic, severing included.
    let c = proxy.connect().await.expect("connect");
    for i in 0..200 {
        let row = c
            .query_one("select $1::int + 1", &[&i])
            .await
            .expect("query");
        assert_eq!(row.get::<_, i32>(0), i + 1);
    }
    s.route_to("", &["p1"], 2).await;
    assert!(
        wait_for(Duration::from_secs(3), || async {
            c.simple_query("select 1").await.is_err()
        })
        .await
    );
    proxy.log_text()
}

/// One relay path (issue 23, point 4): the removed engines' names still start a proxy, which
/// relays with tokio-tpc and says so, so an old command line keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_engine_name_relays_with_tokio_tpc() {
    for engine in ["io-uring", "tokio-mt"] {
        let log = serves_with(engine).await;
        assert!(log.contains("this relay engine was removed"), "{log}");
        assert!(log.contains("engine=TokioTpc"), "{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_engine_serves() {
    let log = serves_with("auto").await;
    assert!(log.contains("engine=TokioTpc"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_to_share_a_port_another_process_listens_on() {
    let s = Setup::new(0).await;
    // Another listener with SO_REUSEPORT, as HAProxy binds.
    let port = free_port();
    let other =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    other.set_reuse_port(true).expect("reuseport");
    other
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], port.0)).into())
        .expect("bind");
    other.listen(16).expect("listen");
    let log = tempfile::NamedTempFile::new().expect("log");
    let mut cmd = proxy_command(&s.etcd, "p1", port.0, &log);
    let mut child = ChildGuard::spawn("stolon-proxy", &mut cmd).expect("spawn");
    let start = std::time::Instant::now();
    while !child.exited() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(log.path()).unwrap_or_default();
    assert!(child.exited(), "must not start on a port in use: {text}");
    assert!(text.contains("cannot listen on"), "{text}");
}

/// The sessions the proxy reports on relay thread `thread`.
fn thread_sessions(proxy: &Proxy, thread: usize) -> Option<f64> {
    let label = format!("thread=\"{thread}\"");
    labeled_metric(proxy, "stolon_proxy_relay_thread_sessions", &label)
}

/// Placement: with `--relay-fill 2` on two threads, the first two sessions stay on the
/// accepting thread, the third is handed to the other and relays real traffic there, and a
/// session's end gives its seat back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_thread_fills_then_another_serves_the_rest() {
    let s = Setup::new(1).await;
    let proxy = spawn_routed(&s, &["--threads", "2", "--relay-fill", "2"]).await;
    // The routing probe's sessions have ended (each gives its seat back).
    assert!(
        wait_for(Duration::from_secs(5), || async {
            thread_sessions(&proxy, 0) == Some(0.0) && thread_sessions(&proxy, 1) == Some(0.0)
        })
        .await,
        "{}",
        proxy.log_text()
    );
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(proxy.connect().await.expect("connect"));
    }
    assert_eq!(thread_sessions(&proxy, 0), Some(2.0));
    assert_eq!(thread_sessions(&proxy, 1), Some(1.0));
    for (n, c) in clients.iter().enumerate() {
        for i in 0..50 {
            let row = c
                .query_one("select $1::int * 2", &[&i])
                .await
                .expect("query");
            assert_eq!(row.get::<_, i32>(0), i * 2, "session {n}");
        }
    }
    // The handed-over session ends: its thread's seat is free again.
    drop(clients.pop());
    assert!(
        wait_for(Duration::from_secs(5), || async {
            thread_sessions(&proxy, 1) == Some(0.0)
        })
        .await
    );
    assert_eq!(thread_sessions(&proxy, 0), Some(2.0));
}

/// By default (no fill) each new session goes to the thread with the fewest: two sessions
/// on two threads, one each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_sessions_spread_over_the_threads() {
    let s = Setup::new(1).await;
    let proxy = spawn_routed(&s, &["--threads", "2"]).await;
    assert!(
        wait_for(Duration::from_secs(5), || async {
            thread_sessions(&proxy, 0) == Some(0.0) && thread_sessions(&proxy, 1) == Some(0.0)
        })
        .await
    );
    let a = proxy.connect().await.expect("connect");
    let b = proxy.connect().await.expect("connect");
    assert_eq!(thread_sessions(&proxy, 0), Some(1.0));
    assert_eq!(thread_sessions(&proxy, 1), Some(1.0));
    for c in [&a, &b] {
        assert_eq!(
            c.query_one("select 1", &[])
                .await
                .expect("query")
                .get::<_, i32>(0),
            1
        );
    }
}
