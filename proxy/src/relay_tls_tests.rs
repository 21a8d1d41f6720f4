//! The relay over TLS on both sides (a terminated client, a server reached over TLS): the
//! same byte loop as plain sockets, through the streams' own reading and writing. Bytes a
//! full client socket cannot take at once wait in the TLS writer (rustls takes a whole
//! chunk) and must be flushed.

use super::*;
use crate::stream::Stream;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use std::os::fd::AsFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    connector: tokio_rustls::TlsConnector,
}

fn tls() -> Tls {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der()));
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .expect("server config");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).expect("root");
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Tls {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
    }
}

fn localhost() -> ServerName<'static> {
    ServerName::try_from("localhost").expect("name")
}

/// The server's and the relay's listeners, with their addresses.
async fn listeners() -> (
    TcpListener,
    std::net::SocketAddr,
    TcpListener,
    std::net::SocketAddr,
) {
    let backend = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let front = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (baddr, faddr) = (
        backend.local_addr().expect("addr"),
        front.local_addr().expect("addr"),
    );
    (backend, baddr, front, faddr)
}

/// The relay's side: takes one client on `front` (TLS, through a small send buffer so a
/// late reader holds its writes back), reaches the server at `backend` over TLS, relays.
fn spawn_relay(
    t: &Tls,
    front: TcpListener,
    backend: std::net::SocketAddr,
) -> tokio::task::JoinHandle<End> {
    let (acceptor, connector) = (t.acceptor.clone(), t.connector.clone());
    tokio::spawn(async move {
        let (c, _) = front.accept().await.expect("accept");
        socket2::SockRef::from(&c)
            .set_send_buffer_size(16 * 1024)
            .expect("sndbuf");
        let c = acceptor.accept(c).await.expect("client side handshake");
        let s = TcpStream::connect(backend).await.expect("backend");
        let s = connector
            .connect(localhost(), s)
            .await
            .expect("server side handshake");
        let mut client = Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(c)));
        let mut server = Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(s)));
        let cfd = client.as_fd().try_clone_to_owned().expect("dup");
        let sfd = server.as_fd().try_clone_to_owned().expect("dup");
        let (metrics, token) = (Metrics::default(), CancellationToken::new());
        relay_streams(
            &mut client,
            &mut server,
            (&cfd, &sfd),
            &token,
            None,
            &metrics,
        )
        .await
    })
}

/// A client over TLS to `front`, through a small receive buffer.
async fn client(
    t: &Tls,
    front: std::net::SocketAddr,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let c = TcpStream::connect(front).await.expect("client");
    socket2::SockRef::from(&c)
        .set_recv_buffer_size(16 * 1024)
        .expect("rcvbuf");
    t.connector
        .connect(localhost(), c)
        .await
        .expect("client handshake")
}

/// Both ways, far more than a TLS record and than the relay's read buffer, in odd sizes;
/// each end half-closes (TLS close_notify) when done and reads to the other's end. The
/// client reads only once it has sent everything, so the relay's writes to it fill its
/// socket and are held back.
#[tokio::test(flavor = "current_thread")]
async fn bulk_both_ways_through_tls_on_both_sides_arrives_intact() {
    const LEN: usize = 2 * 1024 * 1024 + 13;
    let data: Arc<Vec<u8>> = Arc::new((0..LEN).map(|i| (i * 31 % 251) as u8).collect());
    let t = tls();
    let (backend, baddr, front, faddr) = listeners().await;
    // An end: sends the pattern in `chunk`-sized writes while it reads the other's copy
    // (or after, if `late`).
    async fn end<S: tokio::io::AsyncRead + tokio::io::AsyncWrite>(
        s: S,
        data: Arc<Vec<u8>>,
        chunk: usize,
        late: bool,
    ) -> Vec<u8> {
        let (mut r, mut w) = tokio::io::split(s);
        let send = async move {
            for c in data.chunks(chunk) {
                w.write_all(c).await.expect("send");
            }
            w.shutdown().await.expect("close_notify");
        };
        let mut got = Vec::new();
        if late {
            send.await;
            r.read_to_end(&mut got).await.expect("read to the end");
        } else {
            let (_, read) = tokio::join!(send, r.read_to_end(&mut got));
            read.expect("read to the end");
        }
        got
    }
    let (acceptor, d) = (t.acceptor.clone(), data.clone());
    let server = tokio::spawn(async move {
        let (s, _) = backend.accept().await.expect("accept");
        let s = acceptor.accept(s).await.expect("backend handshake");
        end(s, d, 7919, false).await
    });
    let relay = spawn_relay(&t, front, baddr);
    let c = client(&t, faddr).await;
    let from_server =
        tokio::time::timeout(Duration::from_secs(60), end(c, data.clone(), 4099, true))
            .await
            .expect("the transfer stalled");
    let from_client = server.await.expect("backend task");
    assert!(from_server == *data, "server to client bytes differ");
    assert!(from_client == *data, "client to server bytes differ");
    let end = relay.await.expect("relay task");
    assert!(
        matches!(end, End::ClientClosed | End::ServerClosed),
        "both directions ended at their EOF: {end:?}"
    );
}

/// A response bigger than the sockets hold, to a client that reads it late, with nothing
/// after it: the part the TLS writer kept when the client's socket was full must still be
/// flushed, though no further byte comes to push it.
#[tokio::test(flavor = "current_thread")]
async fn a_response_held_back_by_a_late_reader_arrives_whole_with_nothing_after_it() {
    const LEN: usize = 1024 * 1024;
    let t = tls();
    let (backend, baddr, front, faddr) = listeners().await;
    let acceptor = t.acceptor.clone();
    // The server answers a one-byte request with LEN bytes, then waits for more.
    let _server = tokio::spawn(async move {
        let (s, _) = backend.accept().await.expect("accept");
        let mut s = acceptor.accept(s).await.expect("backend handshake");
        let mut req = [0u8; 1];
        while s.read_exact(&mut req).await.is_ok() {
            s.write_all(&vec![req[0]; LEN]).await.expect("answer");
            s.flush().await.expect("flush");
        }
    });
    let _relay = spawn_relay(&t, front, baddr);
    let mut c = client(&t, faddr).await;
    for round in 1..=3u8 {
        c.write_all(&[round]).await.expect("request");
        c.flush().await.expect("flush");
        // Late: the relay meets a full socket and its writer keeps the rest.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut got = vec![0u8; LEN];
        tokio::time::timeout(Duration::from_secs(20), c.read_exact(&mut got))
            .await
            .unwrap_or_else(|_| panic!("round {round}: the answer's end never came"))
            .expect("read");
        assert!(
            got.iter().all(|b| *b == round),
            "round {round}: bytes differ"
        );
    }
}
