//! The shared session path over in-memory duplex streams (no sockets for the client): the
//! startup phase, refusals and routing, as every engine runs them. Paused clock, except
//! where a real socket stands in for the master.

use super::*;
use crate::metrics::ReasonLabel;
use tokio::io::{duplex, DuplexStream};

fn startup_packet(pipelined: &[u8]) -> Vec<u8> {
    let body = b"user\0postgres\0database\0postgres\0\0";
    let len = (8 + body.len()) as u32;
    let mut p = len.to_be_bytes().to_vec();
    p.extend(196_608u32.to_be_bytes());
    p.extend(body);
    p.extend(pipelined);
    p
}

fn request(code: u32) -> Vec<u8> {
    let mut p = 8u32.to_be_bytes().to_vec();
    p.extend(code.to_be_bytes());
    p
}

fn cancel_packet() -> Vec<u8> {
    let mut p = 16u32.to_be_bytes().to_vec();
    p.extend(protocol::CANCEL_REQUEST_CODE.to_be_bytes());
    p.extend([0, 0, 0, 1, 0, 0, 0, 2]);
    p
}

fn ctx(routes: Arc<Routes>) -> Ctx {
    let metrics = Arc::new(Metrics::default());
    Ctx {
        routes,
        metrics: metrics.clone(),
        config: ConnConfig {
            startup_timeout: Duration::from_secs(5),
            ..ConnConfig::default()
        },
        read_only: None,
        hold: Arc::new(crate::hold::Hold::new(Duration::ZERO, 0, metrics)),
        cancel_keys: Arc::new(crate::cancel::Keys::new(crate::cancel::owner_id("p1"))),
        peers: None,
        auth: None,
        tls: None,
    }
}

fn closed(ctx: &Ctx, reason: CloseReason) -> u64 {
    ctx.metrics
        .closed
        .get_or_create(&ReasonLabel { reason })
        .get()
}

async fn read_all(c: &mut DuplexStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out))
        .await
        .expect("closed in time")
        .expect("read");
    out
}

/// Runs the shared path for one client; the session step must not be reached.
async fn refused(ctx: &Ctx, send: &[u8]) -> (Vec<u8>, DuplexStream) {
    let (mut client, proxy_side) = duplex(64 * 1024);
    client.write_all(send).await.expect("write");
    let serve = serve_with(proxy_side, None, ctx, |_| async {
        panic!("no session may start")
    });
    let mut first = vec![0u8; 1];
    let (_, n) = tokio::join!(serve, client.read(&mut first));
    first.truncate(n.expect("read"));
    (first, client)
}

#[tokio::test(start_paused = true)]
async fn the_startup_phase_decides_on_the_first_packet() {
    // (input, expected outcome, bytes the client reads back)
    let startup = startup_packet(b"Qselect 1");
    let mut gss_then_startup = request(protocol::GSSENC_REQUEST_CODE);
    gss_then_startup.extend(&startup);
    let cases: Vec<(&str, Vec<u8>, &str, &[u8])> = vec![
        (
            "startup with pipelined bytes",
            startup.clone(),
            "relay-all",
            b"",
        ),
        (
            "gssenc declined, then startup",
            gss_then_startup,
            "relay-startup",
            b"N",
        ),
        (
            "ssl request",
            request(protocol::SSL_REQUEST_CODE),
            "relay-all",
            b"",
        ),
        ("cancel", cancel_packet(), "cancel", b""),
        ("eof", Vec::new(), "gone", b""),
        ("garbage", b"GET / HTTP/1.1\r\n\r\n".to_vec(), "08P01", b""),
    ];
    for (name, input, want, answer) in cases {
        let (mut client, mut proxy_side) = duplex(64 * 1024);
        client.write_all(&input).await.expect("write");
        client.shutdown().await.expect("eof after the input");
        let got = match startup_phase(&mut proxy_side).await {
            Ok(Next::Relay(bytes)) if bytes == input => "relay-all".to_string(),
            Ok(Next::Relay(bytes)) if bytes == startup => "relay-startup".to_string(),
            Ok(Next::Relay(bytes)) => format!("relay {bytes:?}"),
            Ok(Next::Cancel(bytes)) if bytes == input => "cancel".to_string(),
            Ok(Next::Cancel(bytes)) => format!("cancel {bytes:?}"),
            Ok(Next::Gone) => "gone".to_string(),
            Err(r) => r.code.to_string(),
        };
        assert_eq!(got, want, "{name}");
        drop(proxy_side);
        assert_eq!(read_all(&mut client).await, answer, "{name}");
    }
}

#[tokio::test(start_paused = true)]
async fn no_master_gives_57p03_and_a_clean_close() {
    let ctx = ctx(Arc::new(Routes::default()));
    let (first, mut client) = refused(&ctx, &startup_packet(b"")).await;
    assert_eq!(first, b"E");
    let rest = read_all(&mut client).await;
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("C57P03"), "{text}");
    assert!(text.contains("no primary available"), "{text}");
    assert_eq!(closed(&ctx, CloseReason::RejectedNoMaster), 1);
}

/// libpq's sslmode=prefer: declined with 'N', then the startup packet in the clear gets the
/// real reason.
#[tokio::test(start_paused = true)]
async fn a_refused_ssl_request_is_declined_then_answered() {
    let ctx = ctx(Arc::new(Routes::default()));
    let (mut client, proxy_side) = duplex(64 * 1024);
    client
        .write_all(&request(protocol::SSL_REQUEST_CODE))
        .await
        .expect("write");
    let serve = serve_with(proxy_side, None, &ctx, |_| async {
        panic!("no session may start")
    });
    let talk = async {
        let mut n = [0u8; 1];
        client
            .read_exact(&mut n)
            .await
            .expect("the answer to SSLRequest");
        assert_eq!(&n, b"N");
        client
            .write_all(&startup_packet(b""))
            .await
            .expect("startup");
        read_all(&mut client).await
    };
    let ((), rest) = tokio::join!(serve, talk);
    assert_eq!(rest.first(), Some(&b'E'));
    assert!(String::from_utf8_lossy(&rest).contains("C57P03"));
}

/// A client already speaking TLS gets no ErrorResponse inside its handshake: a clean close.
#[tokio::test(start_paused = true)]
async fn direct_tls_without_a_master_is_closed_silently() {
    let ctx = ctx(Arc::new(Routes::default()));
    let (first, mut client) =
        refused(&ctx, &[0x16, 0x03, 0x01, 0x00, 0x20, 0x01, 0, 0, 0x1c]).await;
    assert!(first.is_empty(), "{first:?}");
    assert!(read_all(&mut client).await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn garbage_gets_08p01() {
    let ctx = ctx(Arc::new(Routes::default()));
    let (first, mut client) = refused(&ctx, &[0, 0, 0, 9, 0, 0, 0, 0, 0]).await;
    assert_eq!(first, b"E");
    assert!(String::from_utf8_lossy(&read_all(&mut client).await).contains("C08P01"));
    assert_eq!(closed(&ctx, CloseReason::RejectedProtocol), 1);
}

/// A loopback listener standing in for PostgreSQL: accepts one connection, reads `expect`
/// bytes, answers `answer` (nothing: it closes at once), and returns what it read, keeping
/// the socket open until `keep` ends.
async fn fake_master(
    listener: &tokio::net::TcpListener,
    expect: usize,
    answer: &[u8],
    keep: impl Future<Output = ()>,
) -> Vec<u8> {
    let (mut s, _) = listener.accept().await.expect("accept");
    let mut got = vec![0u8; expect];
    s.read_exact(&mut got).await.expect("replayed bytes");
    if answer.is_empty() {
        return got;
    }
    s.write_all(answer).await.expect("answer");
    keep.await;
    got
}

async fn listener() -> (tokio::net::TcpListener, String) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    (l, addr)
}

/// AuthenticationOk then ReadyForQuery (idle).
const AUTH_OK_READY: &[u8] = b"R\0\0\0\x08\0\0\0\0Z\0\0\0\x05I";

fn holding_ctx(routes: Arc<Routes>) -> Ctx {
    let mut c = ctx(routes);
    c.hold = Arc::new(crate::hold::Hold::new(
        Duration::from_secs(5),
        10,
        c.metrics.clone(),
    ));
    c
}

/// Routed: the master receives the startup packet and the bytes pipelined after it, its
/// first answer reaches the client before the engine's session step, which gets the
/// client, the server socket and the route snapshot.
#[tokio::test]
async fn a_routed_client_reaches_the_master_with_its_pipelined_bytes() {
    let (master, addr) = listener().await;
    let routes = Arc::new(Routes::default());
    routes.apply(4, Ok(addr.clone()));
    let ctx = ctx(routes);
    let (mut client, proxy_side) = duplex(64 * 1024);
    let sent = startup_packet(b"Qselect 1\0");
    client.write_all(&sent).await.expect("write");
    let done = tokio::sync::Notify::new();
    let serve = async {
        serve_with(proxy_side, None, &ctx, |p| async move {
            assert_eq!(p.known.route.generation, 4);
            assert!(matches!(p.known.lane, Lane::Master));
            assert!(
                !p.known.tx.idle(),
                "the pipelined query is not answered yet"
            );
            CloseReason::ClientClosed
        })
        .await;
        done.notify_one();
    };
    let accept = fake_master(&master, sent.len(), AUTH_OK_READY, done.notified());
    let ((), got) = tokio::join!(serve, accept);
    assert_eq!(got, sent);
    let mut answer = vec![0u8; AUTH_OK_READY.len()];
    client.read_exact(&mut answer).await.expect("answer");
    assert_eq!(answer, AUTH_OK_READY);
    assert_eq!(closed(&ctx, CloseReason::ClientClosed), 1);
}

/// A master that closes before answering (killed with the connection in its accept queue)
/// or answers that it is shutting down has not taken the session: it is held and goes to
/// the next master, and the client sees only that one's answer.
#[tokio::test]
async fn a_master_that_dies_before_answering_is_retried_on_the_next_route() {
    let shutting_down = protocol::error_response("57P03", "the database system is shutting down");
    for (name, first) in [("closed", Vec::new()), ("57P03", shutting_down)] {
        let ((old, old_addr), (new, new_addr)) = (listener().await, listener().await);
        let routes = Arc::new(Routes::default());
        routes.apply(4, Ok(old_addr));
        let ctx = holding_ctx(routes.clone());
        let (mut client, proxy_side) = duplex(64 * 1024);
        let sent = startup_packet(b"");
        client.write_all(&sent).await.expect("write");
        let done = tokio::sync::Notify::new();
        let serve = async {
            serve_with(proxy_side, None, &ctx, |p| async move {
                assert_eq!(
                    p.known.route.generation, 5,
                    "{name}: the new master's route"
                );
                CloseReason::ClientClosed
            })
            .await;
            done.notify_one();
        };
        let masters = async {
            let got = fake_master(&old, sent.len(), &first, async {}).await;
            assert_eq!(got, sent, "{name}");
            routes.apply(5, Ok(new_addr.clone()));
            fake_master(&new, sent.len(), AUTH_OK_READY, done.notified()).await
        };
        let ((), got) = tokio::join!(serve, masters);
        assert_eq!(got, sent, "{name}: replayed to the new master");
        let mut answer = vec![0u8; AUTH_OK_READY.len()];
        client.read_exact(&mut answer).await.expect("answer");
        assert_eq!(
            answer, AUTH_OK_READY,
            "{name}: only the new master's answer"
        );
    }
}

/// Without a hold, the client learns why; an answer that is not about the server's state
/// (here: no pg_hba.conf entry) is the session's, passed on as it is.
#[tokio::test]
async fn a_refusal_at_startup_reaches_the_client() {
    let shutting_down = protocol::error_response("57P03", "the database system is shutting down");
    let no_hba = protocol::error_response("28000", "no pg_hba.conf entry");
    for (name, first, want_code, want_text) in [
        (
            "closed",
            Vec::new(),
            "C08006",
            "closed the connection before answering",
        ),
        (
            "57P03",
            shutting_down,
            "C57P03",
            "the database system is shutting down",
        ),
        ("28000", no_hba.clone(), "C28000", "no pg_hba.conf entry"),
    ] {
        let (master, addr) = listener().await;
        let routes = Arc::new(Routes::default());
        routes.apply(4, Ok(addr));
        let ctx = ctx(routes);
        let (mut client, proxy_side) = duplex(64 * 1024);
        let sent = startup_packet(b"");
        client.write_all(&sent).await.expect("write");
        // The client hangs up its side: a refusal's close need not wait for it.
        client.shutdown().await.expect("shutdown");
        let serve = serve_with(proxy_side, None, &ctx, |p| async move {
            drop(p.server);
            CloseReason::ServerClosed
        });
        let accept = fake_master(&master, sent.len(), &first, async {});
        tokio::join!(serve, accept);
        let got = read_all(&mut client).await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.contains(want_code), "{name}: {text}");
        assert!(text.contains(want_text), "{name}: {text}");
        if name == "28000" {
            assert_eq!(got, no_hba, "passed on unchanged");
        }
    }
}

/// A session waiting for the master's first answer already counts in its lane, so a drain
/// that starts meanwhile waits for it instead of finding the lane empty, finishing, and
/// severing the session just after it registered.
#[tokio::test]
async fn a_session_counts_in_its_lane_while_it_waits_for_the_first_answer() {
    let (master, addr) = listener().await;
    let routes = Arc::new(Routes::default());
    routes.apply(4, Ok(addr));
    let route = routes.load();
    let ctx = ctx(routes);
    let (mut client, proxy_side) = duplex(64 * 1024);
    let sent = startup_packet(b"");
    client.write_all(&sent).await.expect("write");
    let done = tokio::sync::Notify::new();
    let serve = async {
        serve_with(proxy_side, None, &ctx, |_| async {
            CloseReason::ClientClosed
        })
        .await;
        done.notify_one();
    };
    let master_side = async {
        let (mut s, _) = master.accept().await.expect("accept");
        let mut got = vec![0u8; sent.len()];
        s.read_exact(&mut got).await.expect("replayed bytes");
        // The proxy now waits for the answer: the session is in the lane's count.
        for _ in 0..100 {
            if route.sessions.len() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(route.sessions.len(), 1, "counted while it waits");
        s.write_all(AUTH_OK_READY).await.expect("answer");
        done.notified().await;
    };
    tokio::join!(serve, master_side);
    assert_eq!(route.sessions.len(), 0, "uncounted once it ended");
}
