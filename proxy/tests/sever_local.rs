//! Severing many relayed sessions is immediate: local sockets, the real relay, one cancel.

use proxy::metrics::Metrics;
use proxy::relay::{relay, End};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_the_route_closes_every_session_at_once() {
    let n = 300;
    let backend = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let front = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (baddr, faddr) = (
        backend.local_addr().expect("addr"),
        front.local_addr().expect("addr"),
    );
    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    let metrics = std::sync::Arc::new(Metrics::default());
    let mut clients = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..n {
        let client = TcpStream::connect(faddr).await.expect("client");
        let (proxied_client, _) = front.accept().await.expect("accept");
        let proxied_server = TcpStream::connect(baddr).await.expect("server side");
        let (server, _) = backend.accept().await.expect("accept backend");
        let (t, m) = (token.clone(), metrics.clone());
        tracker.spawn(async move {
            let end = relay(&proxied_client, &proxied_server, &t, None, &m).await;
            assert!(matches!(end, End::Severed), "{end:?}");
        });
        clients.push(client);
        servers.push(server);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = Instant::now();
    token.cancel();
    tracker.close();
    tracker.wait().await;
    let tasks_done = start.elapsed();
    for c in &mut clients {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(2), c.read(&mut b))
            .await
            .expect("closed");
        assert!(matches!(r, Ok(0) | Err(_)));
    }
    for s in &mut servers {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(2), s.read(&mut b))
            .await
            .expect("closed");
        assert!(matches!(r, Ok(0) | Err(_)));
    }
    eprintln!("{n} sessions: relay tasks ended {tasks_done:?} after the cancel; all peers saw EOF {:?} after", start.elapsed());
}
