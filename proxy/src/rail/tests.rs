//! The rail with real sockets: an application and a database on loopback, the rail
//! between them, as `relay_once` puts a session on it.

use super::*;
use crate::txstate::Start;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};

/// A connected pair: the far end (blocking, for a test thread) and the proxy's end.
fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let far = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (near, _) = l.accept().expect("accept");
    near.set_nonblocking(true).expect("nonblocking");
    (far, near)
}

struct Setup {
    rail: Arc<Rail>,
    seats: Arc<Seats>,
    metrics: Arc<Metrics>,
    app: std::net::TcpStream,
    db: std::net::TcpStream,
    client: Arc<std::net::TcpStream>,
    server: Arc<std::net::TcpStream>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.rail.stop();
    }
}

fn setup() -> Setup {
    let metrics = Arc::new(Metrics::default());
    let seats = Seats::new(1, (0, 750), &metrics, "test");
    let rail = Rail::start(0, &seats).expect("rail");
    let ((app, client), (server_far, server)) = (pair(), pair());
    Setup {
        rail,
        seats,
        metrics,
        app,
        db: server_far,
        client: Arc::new(client),
        server: Arc::new(server),
    }
}

impl Setup {
    /// The application's and the database's ends, for a test thread.
    fn far(&self) -> (std::net::TcpStream, std::net::TcpStream) {
        let dup = |s: &std::net::TcpStream| s.try_clone().expect("dup");
        (dup(&self.app), dup(&self.db))
    }

    fn session(&self, tx: Option<&Arc<Mutex<TxState>>>, movable: bool) -> Session {
        Session {
            client: self.client.clone(),
            server: self.server.clone(),
            tx: tx.cloned(),
            movable,
            thread: Some((self.seats.clone(), 0)),
            metrics: self.metrics.clone(),
        }
    }
}

fn read_exactly(s: &mut std::net::TcpStream, n: usize) -> Vec<u8> {
    let mut got = vec![0u8; n];
    s.read_exact(&mut got).expect("read");
    got
}

fn ended(left: Left) -> End {
    match left.back {
        Back::End(end) => end,
        Back::Asked => panic!("taken back, not ended"),
    }
}

/// The session's ride, failing the test if it never leaves the rail.
async fn ride_within(
    t: &Setup,
    session: Session,
    token: &CancellationToken,
    signal: Option<&CancellationToken>,
) -> Left {
    let ride = ride(&t.rail, session, token, signal);
    tokio::time::timeout(std::time::Duration::from_secs(20), ride)
        .await
        .expect("the session leaves the rail")
}

fn ready_idle() -> Vec<u8> {
    vec![b'Z', 0, 0, 0, 5, b'I']
}

#[tokio::test]
async fn bytes_go_both_ways_and_each_end_is_passed_on_as_a_half_close() {
    let t = setup();
    let (mut app, mut db) = t.far();
    let far = std::thread::spawn(move || {
        app.write_all(b"hello").expect("send");
        assert_eq!(read_exactly(&mut db, 5), b"hello");
        db.write_all(b"world").expect("send");
        assert_eq!(read_exactly(&mut app, 5), b"world");
        // The client says it has finished; its server still answers.
        app.shutdown(Shutdown::Write).expect("half-close");
        let mut rest = Vec::new();
        db.read_to_end(&mut rest).expect("EOF passed on");
        assert!(rest.is_empty());
        db.write_all(b"bye").expect("send");
        db.shutdown(Shutdown::Write).expect("close");
        let mut rest = Vec::new();
        app.read_to_end(&mut rest).expect("read");
        assert_eq!(rest, b"bye");
    });
    let token = CancellationToken::new();
    let left = ride_within(&t, t.session(None, false), &token, None).await;
    far.join().expect("far ends");
    assert!(matches!(ended(left), End::ServerClosed));
    assert_eq!(
        Arc::strong_count(&t.client),
        1,
        "the rail let go of the sockets"
    );
    let bytes = |d| {
        t.metrics
            .bytes
            .get_or_create(&crate::metrics::DirectionLabel { direction: d })
            .get()
    };
    assert_eq!(bytes(crate::metrics::Direction::ClientToServer), 5);
    assert_eq!(bytes(crate::metrics::Direction::ServerToClient), 8);
}

#[tokio::test]
async fn a_reader_slower_than_its_server_gets_every_byte_in_order() {
    let t = setup();
    let (mut app, mut db) = t.far();
    const LEN: usize = 16 << 20;
    let data: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
    let expect = data.clone();
    let writer = std::thread::spawn(move || {
        db.write_all(&data).expect("send");
        db.shutdown(Shutdown::Write).expect("close");
    });
    let reader = std::thread::spawn(move || {
        // Late, so that the kernel's buffers fill and the rail holds what it read.
        std::thread::sleep(std::time::Duration::from_millis(200));
        let mut got = Vec::with_capacity(LEN);
        app.read_to_end(&mut got).expect("read");
        assert!(got == expect, "{} bytes, in order", got.len());
        app.shutdown(Shutdown::Write).expect("close");
    });
    let token = CancellationToken::new();
    let left = ride_within(&t, t.session(None, false), &token, None).await;
    writer.join().expect("writer");
    reader.join().expect("reader");
    assert!(matches!(ended(left), End::ClientClosed));
}

#[tokio::test]
async fn a_drain_takes_the_session_back_with_what_the_rail_still_held() {
    let t = setup();
    let tx = Arc::new(Mutex::new(TxState::new(Start::Startup, &[])));
    let (mut app, mut db) = t.far();
    let (token, signal) = (CancellationToken::new(), CancellationToken::new());
    let session = t.session(Some(&tx), false);
    let ride = ride_within(&t, session, &token, Some(&signal));
    let far = async {
        db.write_all(&ready_idle()).expect("send");
        assert_eq!(read_exactly(&mut app, 6), ready_idle());
        signal.cancel();
    };
    let (left, ()) = tokio::join!(ride, far);
    assert!(matches!(left.back, Back::Asked));
    assert_eq!(
        Arc::strong_count(&t.client),
        1,
        "the rail let go of the sockets"
    );
    assert!(
        tx.lock().expect("lock").idle(),
        "the rail fed the session's state"
    );
    // The task relays on in tokio.
    let relayed = async {
        let end = in_tokio(
            (&t.client, &t.server),
            left.pending,
            &token,
            None,
            &t.metrics,
        );
        tokio::time::timeout(std::time::Duration::from_secs(10), end).await
    };
    let far = std::thread::spawn(move || {
        app.write_all(b"Q").expect("send");
        assert_eq!(read_exactly(&mut db, 1), b"Q");
        for s in [app, db] {
            s.shutdown(Shutdown::Both).expect("close");
        }
    });
    let end = relayed.await.expect("ends");
    far.join().expect("far");
    assert!(!matches!(end, End::Error(_)), "{end:?}");
}

#[tokio::test]
async fn a_movable_sessions_server_end_leaves_its_client_open() {
    let t = setup();
    let tx = Arc::new(Mutex::new(TxState::new(Start::Startup, &[])));
    let (mut app, _) = t.far();
    t.db.shutdown(Shutdown::Both).expect("server goes away");
    let token = CancellationToken::new();
    let left = ride_within(&t, t.session(Some(&tx), true), &token, None).await;
    assert!(matches!(ended(left), End::ServerLost));
    // The client's side is open: what the proxy writes it reads.
    (&*t.client).write_all(b"still here").expect("write");
    assert_eq!(read_exactly(&mut app, 10), b"still here");
}

#[tokio::test]
async fn the_balancer_takes_a_session_at_its_transaction_boundary() {
    let t = setup();
    let tx = Arc::new(Mutex::new(TxState::new(Start::Startup, &[])));
    t.seats.threads[0]
        .quota
        .store(1, std::sync::atomic::Ordering::Release);
    let (mut app, mut db) = t.far();
    let far = std::thread::spawn(move || {
        // Inside a transaction first: no leave taken.
        db.write_all(&[b'Z', 0, 0, 0, 5, b'T']).expect("send");
        assert_eq!(read_exactly(&mut app, 6)[5], b'T');
        app.write_all(&[b'Q', 0, 0, 0, 5, 0]).expect("send");
        assert_eq!(read_exactly(&mut db, 6)[0], b'Q');
        db.write_all(&ready_idle()).expect("send");
        assert_eq!(read_exactly(&mut app, 6), ready_idle());
    });
    let token = CancellationToken::new();
    let left = ride_within(&t, t.session(Some(&tx), false), &token, None).await;
    far.join().expect("far");
    assert!(matches!(ended(left), End::Rebalance));
    assert_eq!(t.seats.threads[0].quota.load(Ordering::Acquire), 0);
}

#[tokio::test]
async fn a_stopped_rail_takes_no_session() {
    let t = setup();
    t.rail.stop();
    let token = CancellationToken::new();
    let left = ride_within(&t, t.session(None, false), &token, None).await;
    assert!(matches!(left.back, Back::Asked));
}

#[test]
fn a_socket_with_more_to_read_gives_up_its_turn_and_is_served_again() {
    let t = setup();
    // Room for the whole transfer on the way in and out: no write waits.
    socket2::SockRef::from(&*t.server)
        .set_recv_buffer_size(8 << 20)
        .expect("rcvbuf");
    socket2::SockRef::from(&*t.client)
        .set_send_buffer_size(8 << 20)
        .expect("sndbuf");
    let (mut app, mut db) = t.far();
    let total = 4 << 20;
    let writer = std::thread::spawn(move || db.write_all(&vec![7u8; total]).expect("send"));
    // Wait until more than a turn's worth is queued at the proxy's server socket.
    let turn = lane::TURN * lane::READ_BUF;
    let mut peek = vec![0u8; turn + 1];
    let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
    while rustix::net::recv(&*t.server, &mut peek[..], flags).map_or(0, |(n, _)| n) <= turn {
        std::thread::yield_now();
    }
    let reader = std::thread::spawn(move || read_exactly(&mut app, total).len());
    let (done, _left) = tokio::sync::oneshot::channel();
    let entry = lane::Entry::new(0, t.session(None, false), done);
    let mut buf = vec![0u8; lane::READ_BUF];
    let mut more = Vec::new();
    let mut all = lane::Slots::with(entry);
    let server_ready = (1, rustix::event::epoll::EventFlags::IN);
    lane::ready(&t.rail, &mut all, server_ready, &mut buf, &mut more);
    assert_eq!(
        more,
        vec![1],
        "its turn ended with bytes left: served again"
    );
    assert_eq!(all.relayed(0, 1), turn as u64, "a turn's reads, no more");
    // The rest, as the loop serves it (the writer may still be writing).
    while all.relayed(0, 1) < total as u64 {
        more.clear();
        let client_ready = (0, rustix::event::epoll::EventFlags::OUT);
        lane::ready(&t.rail, &mut all, client_ready, &mut buf, &mut more);
        lane::ready(&t.rail, &mut all, server_ready, &mut buf, &mut more);
    }
    writer.join().expect("writer");
    assert_eq!(reader.join().expect("reader"), total);
}
