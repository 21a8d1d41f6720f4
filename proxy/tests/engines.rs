//! Every relay engine serves real PostgreSQL traffic; the io_uring engine falls back to
//! epoll, and says so, when io_uring_setup is denied by a seccomp filter.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_mt_engine_serves() {
    let log = serves_with("tokio-mt").await;
    assert!(log.contains("TokioMt"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_uring_engine_serves_where_available() {
    if let Err(e) = proxy::uring::probe() {
        eprintln!("io_uring unavailable here ({e}): the fallback test covers this machine");
        return;
    }
    let log = serves_with("io-uring").await;
    assert!(log.contains("IoUring"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_uring_denied_by_seccomp_falls_back_to_epoll_and_serves() {
    let s = Setup::new(1).await;
    s.route_to("db0", &["p1"], 1).await;
    let port = free_port();
    let log = tempfile::NamedTempFile::new().expect("log");
    let mut cmd = proxy_command(&s.etcd, "p1", port.0, &log);
    cmd.args(["--engine", "io-uring"]);
    testkit::seccomp::deny_syscalls(&mut cmd, &[testkit::seccomp::SYS_IO_URING_SETUP])
        .expect("seccomp");
    let _child = ChildGuard::spawn("stolon-proxy", &mut cmd).expect("spawn");
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=5",
        port.0
    );
    let served = wait_for(Duration::from_secs(15), || async {
        match connect(&conninfo).await {
            Ok(c) => server_port(&c).await.ok() == Some(s.pgs[0].port()),
            Err(_) => false,
        }
    })
    .await;
    let text = std::fs::read_to_string(log.path()).unwrap_or_default();
    assert!(served, "{text}");
    assert!(text.contains("io_uring is unavailable here"), "{text}");
    assert!(
        text.contains("TokioTpc"),
        "the engine it fell back to is logged: {text}"
    );
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
