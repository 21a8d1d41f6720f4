//! The relay under a request/response load like pgbench's: many sessions, small messages,
//! on a current-thread runtime (the tpc engine's) and a multi-thread one. A lost wakeup
//! shows up as a stall, caught by the timeout.

use proxy::metrics::Metrics;
use proxy::relay::relay;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

async fn ping_pong(sessions: usize, round_trips: usize) {
    let backend = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let front = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (baddr, faddr) = (
        backend.local_addr().expect("addr"),
        front.local_addr().expect("addr"),
    );
    // The backend answers each 5-byte request with a 20-byte reply, like a tiny query.
    tokio::spawn(async move {
        while let Ok((mut s, _)) = backend.accept().await {
            tokio::spawn(async move {
                let mut req = [0u8; 5];
                while s.read_exact(&mut req).await.is_ok() {
                    if s.write_all(&[7u8; 20]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let metrics = Arc::new(Metrics::default());
    let token = CancellationToken::new();
    let (m, t) = (metrics.clone(), token.clone());
    tokio::spawn(async move {
        while let Ok((c, _)) = front.accept().await {
            let (m, t) = (m.clone(), t.clone());
            tokio::spawn(async move {
                let s = TcpStream::connect(baddr).await.expect("backend");
                let _ = relay(&c, &s, &t, None, &m).await;
            });
        }
    });
    let mut clients = Vec::new();
    for _ in 0..sessions {
        clients.push(tokio::spawn(async move {
            let mut c = TcpStream::connect(faddr).await.expect("client");
            c.set_nodelay(true).expect("nodelay");
            let mut reply = [0u8; 20];
            for _ in 0..round_trips {
                c.write_all(&[1u8; 5]).await.expect("send");
                c.read_exact(&mut reply).await.expect("reply");
            }
            // Terminate-like last message, then close.
            c.write_all(&[b'X', 0, 0, 0, 4]).await.expect("send");
        }));
    }
    for c in clients {
        tokio::time::timeout(Duration::from_secs(60), c)
            .await
            .expect("a session stalled: lost wakeup in the relay")
            .expect("client task");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn no_stall_on_a_current_thread_runtime() {
    ping_pong(16, 2000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stall_on_a_multi_thread_runtime() {
    ping_pong(16, 2000).await;
}

/// Bulk transfer both ways, bigger than the relay's read buffer, in odd-sized writes:
/// every byte arrives, in order, through full reads and short ones alike. The client reads
/// only once it has sent everything, through small socket buffers, so the relay's writes to
/// it are held back and wait in the session's buffer.
#[tokio::test(flavor = "current_thread")]
async fn bulk_both_ways_arrives_intact() {
    const LEN: usize = 3 * 1024 * 1024 + 17;
    let pattern = |i: usize| (i * 31 % 251) as u8;
    let data: Arc<Vec<u8>> = Arc::new((0..LEN).map(pattern).collect());
    let backend = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let front = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (baddr, faddr) = (
        backend.local_addr().expect("addr"),
        front.local_addr().expect("addr"),
    );
    let d = data.clone();
    // The backend sends the pattern while it reads (and checks) the client's copy.
    let server = tokio::spawn(async move {
        let (s, _) = backend.accept().await.expect("accept");
        let (mut r, mut w) = s.into_split();
        let send = async move {
            for chunk in d.chunks(7919) {
                w.write_all(chunk).await.expect("backend send");
            }
            w.shutdown().await.expect("backend shutdown");
        };
        let (_, got) = tokio::join!(send, read_all(&mut r));
        got
    });
    tokio::spawn(async move {
        let (c, _) = front.accept().await.expect("accept");
        socket2::SockRef::from(&c)
            .set_send_buffer_size(16 * 1024)
            .expect("sndbuf");
        let s = TcpStream::connect(baddr).await.expect("backend");
        let _ = relay(&c, &s, &CancellationToken::new(), None, &Metrics::default()).await;
    });
    let c = TcpStream::connect(faddr).await.expect("client");
    socket2::SockRef::from(&c)
        .set_recv_buffer_size(16 * 1024)
        .expect("rcvbuf");
    let (mut r, mut w) = c.into_split();
    let d = data.clone();
    let send = async move {
        for chunk in d.chunks(4099) {
            w.write_all(chunk).await.expect("client send");
        }
        w.shutdown().await.expect("client shutdown");
    };
    let from_server = tokio::time::timeout(Duration::from_secs(60), async {
        send.await;
        read_all(&mut r).await
    })
    .await
    .expect("the transfer stalled");
    let from_client = server.await.expect("backend task");
    assert!(from_server == *data, "server to client bytes differ");
    assert!(from_client == *data, "client to server bytes differ");
}

async fn read_all(r: &mut tokio::net::tcp::OwnedReadHalf) -> Vec<u8> {
    let mut got = Vec::new();
    r.read_to_end(&mut got).await.expect("read");
    got
}
