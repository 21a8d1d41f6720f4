//! The startup phase over raw TCP: errors are PostgreSQL ErrorResponses followed by a clean
//! close, GSSENCRequest gets 'N', limits and deadlines hold; SSL passes through end to end.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn raw(proxy: &Proxy) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", proxy.port.0)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s
}

/// Reads to EOF; an RST (an error instead of EOF) fails the test.
fn read_to_eof(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("clean close, not a reset");
    out
}

/// The SQLSTATE and message of an ErrorResponse.
fn parse_error(bytes: &[u8]) -> (String, String) {
    assert_eq!(
        bytes.first(),
        Some(&b'E'),
        "not an ErrorResponse: {bytes:?}"
    );
    let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
    let (mut code, mut msg) = (String::new(), String::new());
    for field in bytes[5..1 + len].split(|&b| b == 0) {
        match field.first() {
            Some(b'C') => code = String::from_utf8_lossy(&field[1..]).into(),
            Some(b'M') => msg = String::from_utf8_lossy(&field[1..]).into(),
            _ => {}
        }
    }
    (code, msg)
}

async fn routed(extra: &[&str]) -> (Setup, Proxy) {
    let s = Setup::new(1).await;
    let proxy = spawn_routed(&s, extra).await;
    (s, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversize_and_slow_clients_get_08p01() {
    let (_s, proxy) = routed(&["--startup-timeout", "300ms"]).await;
    // Garbage with a plausible length.
    let mut c = raw(&proxy);
    c.write_all(&[0, 0, 0, 12, 0, 2, 0, 0, b'x', b'y', b'z', 0])
        .expect("write");
    let (code, msg) = parse_error(&read_to_eof(&mut c));
    assert_eq!(code, "08P01");
    assert!(msg.contains("unsupported frontend protocol 2.0"), "{msg}");
    // An oversize length is refused before its body arrives, even with more input pending.
    let mut c = raw(&proxy);
    let mut big = 20_000u32.to_be_bytes().to_vec();
    big.extend(vec![7u8; 3000]);
    c.write_all(&big).expect("write");
    let (code, msg) = parse_error(&read_to_eof(&mut c));
    assert_eq!(code, "08P01");
    assert!(msg.contains("invalid length"), "{msg}");
    // Nothing sent within the deadline.
    let mut c = raw(&proxy);
    let (code, msg) = parse_error(&read_to_eof(&mut c));
    assert_eq!(code, "08P01");
    assert!(msg.contains("in time"), "{msg}");
    // Half a packet, then silence.
    let mut c = raw(&proxy);
    c.write_all(&[0, 0, 0, 40, 0, 3]).expect("write");
    assert_eq!(parse_error(&read_to_eof(&mut c)).0, "08P01");
    // The proxy is still fine.
    assert!(proxy.connect().await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gssenc_request_gets_n_then_the_startup_goes_through() {
    let (_s, proxy) = routed(&[]).await;
    let mut c = raw(&proxy);
    c.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30])
        .expect("gssenc request");
    let mut one = [0u8; 1];
    c.read_exact(&mut one).expect("answer");
    assert_eq!(&one, b"N");
    c.write_all(&proxy::protocol::startup_message(&[
        ("user", "postgres"),
        ("database", "postgres"),
    ]))
    .expect("startup");
    let mut head = [0u8; 9];
    c.read_exact(&mut head)
        .expect("auth answer from PostgreSQL");
    assert_eq!(head[0], b'R', "AuthenticationOk expected (trust)");
    assert_eq!(&head[5..9], &[0, 0, 0, 0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_gives_53300() {
    let (_s, proxy) = routed(&["--max-connections", "2"]).await;
    // The probe sessions of `routed` release their permits asynchronously: retry briefly.
    let mut sessions = Vec::new();
    for _ in 0..50 {
        match proxy.connect().await {
            Ok(c) => sessions.push(c),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
        if sessions.len() == 2 {
            break;
        }
    }
    assert_eq!(sessions.len(), 2, "two sessions within the limit");
    let (a, b) = (sessions.remove(0), sessions.remove(0));
    assert_eq!(connect_error_code(&proxy).await.as_deref(), Some("53300"));
    drop((a, b));
    assert!(
        wait_for(Duration::from_secs(5), || async {
            proxy.connect().await.is_ok()
        })
        .await
    );
}

/// A flood over the limit: the first REJECTING_MAX rejections are answered with 53300 (and
/// linger to let the client read it), the rest are closed without a word instead of each
/// holding a task and a descriptor for 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_limit_flood_is_answered_up_to_a_cap_then_closed() {
    let (_s, proxy) = routed(&["--max-connections", "1"]).await;
    let mut held = None;
    for _ in 0..50 {
        if let Ok(c) = proxy.connect().await {
            held = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(held.is_some(), "the one session within the limit");
    let flood: Vec<TcpStream> = (0..300).map(|_| raw(&proxy)).collect();
    let (mut answered, mut closed) = (0, 0);
    for mut c in flood {
        let mut first = [0u8; 1];
        match c.read(&mut first) {
            Ok(1) if first[0] == b'E' => answered += 1,
            Ok(_) | Err(_) => closed += 1,
        }
    }
    assert!(
        answered >= proxy::server::REJECTING_MAX,
        "{answered} answered, {closed} closed"
    );
    assert!(closed > 0, "{answered} answered, {closed} closed: no cap");
    drop(held);
}

/// `--max-connections` that RLIMIT_NOFILE cannot carry is refused at start with what to
/// change; without the flag the default is lowered to what fits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_is_checked_against_the_descriptor_limit() {
    let s = Setup::new(1).await;
    s.route_to("db0", &["p1"], 1).await;
    let spawn = |extra: &[&str]| {
        let port = testkit::free_port();
        let log = tempfile::NamedTempFile::new().expect("log");
        let inner = proxy_command(&s.etcd, "p1", port.0, &log);
        let mut cmd = std::process::Command::new("prlimit");
        cmd.arg("--nofile=300:300")
            .arg(inner.get_program())
            .args(inner.get_args())
            .args(extra)
            .stdin(std::process::Stdio::null())
            .stdout(log.reopen().expect("log"))
            .stderr(log.reopen().expect("log"));
        (
            testkit::ChildGuard::spawn("stolon-proxy", &mut cmd).expect("spawn"),
            log,
            port,
        )
    };
    let (mut child, log, _port) = spawn(&["--max-connections", "1000"]);
    assert!(
        wait_for(Duration::from_secs(20), || {
            let exited = child.exited();
            async move { exited }
        })
        .await,
        "exits"
    );
    let status = child.exit_status().expect("status");
    let text = std::fs::read_to_string(log.path()).expect("log");
    assert!(!status.success(), "{text}");
    assert!(
        text.contains(
            "--max-connections 1000 needs 2256 file descriptors but RLIMIT_NOFILE is 300"
        ),
        "{text}"
    );
    let (_child, log, _port) = spawn(&[]);
    assert!(
        wait_for(Duration::from_secs(20), || async {
            std::fs::read_to_string(log.path())
                .is_ok_and(|t| t.contains("lowered from the default 10000 to 22"))
        })
        .await,
        "{}",
        std::fs::read_to_string(log.path()).unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_is_passed_through_end_to_end() {
    let tls = testkit::TlsFiles::generate().expect("certs");
    // PostgreSQL wants its key owned by itself with mode 0600.
    let dir = testkit::temp_dir("pgssl").expect("dir");
    let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
    std::fs::copy(&tls.server_cert, &cert).expect("cert");
    std::fs::copy(&tls.server_key, &key).expect("key");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    testkit::postgres::chown_to_pg_user(dir.path()).expect("chown");
    let pg = testkit::Postgres::start(&[
        ("ssl", "on"),
        ("ssl_cert_file", cert.to_str().expect("path")),
        ("ssl_key_file", key.to_str().expect("path")),
    ])
    .expect("postgres with ssl");
    let etcd = testkit::Etcd::start().expect("etcd");
    let store = open_store(&etcd).await;
    put_cd(
        &store,
        &clusterdata("db0", &[("db0", pg.port())], &["p1"], 1),
    )
    .await;
    let proxy = Proxy::spawn(&etcd, "p1", &[]);
    assert!(
        wait_for(Duration::from_secs(10), || async {
            proxy.http_get("/health").0 == 200 && proxy_listens(&proxy)
        })
        .await
    );
    // psql verifies the server certificate against our CA through the proxy: the TLS
    // session is between psql and PostgreSQL.
    let conn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert={}",
        proxy.port.0,
        tls.ca.display()
    );
    let out = std::process::Command::new("psql")
        .args([
            "-X",
            "-A",
            "-t",
            "-d",
            &conn,
            "-c",
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
        ])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "t");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_sigint_exits_at_once() {
    let (_s, mut proxy) = routed(&["--shutdown-grace", "20s"]).await;
    let session = proxy.connect().await.expect("connect");
    proxy
        .child
        .signal(nix::sys::signal::Signal::SIGTERM)
        .expect("term");
    assert!(
        wait_for(Duration::from_secs(5), || async {
            TcpStream::connect(("127.0.0.1", proxy.port.0)).is_err()
        })
        .await,
        "still accepting after SIGTERM"
    );
    assert!(
        session.simple_query("select 1").await.is_ok(),
        "open sessions keep working while draining"
    );
    assert!(!proxy.child.exited());
    drop(session);
    assert!(
        wait_exit(&mut proxy.child, Duration::from_secs(10)),
        "exits once drained"
    );

    // SIGINT while a drain is still waiting on a session: exits at once all the same.
    let (_s3, mut proxy3) = routed(&["--shutdown-grace", "60s"]).await;
    let session = proxy3.connect().await.expect("connect");
    proxy3
        .child
        .signal(nix::sys::signal::Signal::SIGTERM)
        .expect("term");
    assert!(
        wait_for(Duration::from_secs(10), || async {
            proxy3.log_text().contains("SIGTERM: draining sessions")
        })
        .await,
        "draining"
    );
    assert!(!proxy3.child.exited(), "draining");
    proxy3
        .child
        .signal(nix::sys::signal::Signal::SIGINT)
        .expect("int");
    assert!(
        wait_exit(&mut proxy3.child, Duration::from_secs(3)),
        "SIGINT during a drain exits at once"
    );
    drop(session);

    let (_s2, mut proxy2) = routed(&["--shutdown-grace", "60s"]).await;
    let session = proxy2.connect().await.expect("connect");
    proxy2
        .child
        .signal(nix::sys::signal::Signal::SIGINT)
        .expect("int");
    assert!(
        wait_exit(&mut proxy2.child, Duration::from_secs(3)),
        "SIGINT exits at once"
    );
    assert!(session.simple_query("select 1").await.is_err());
}

fn wait_exit(child: &mut testkit::ChildGuard, limit: Duration) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if child.exited() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_without_a_master_gets_a_clean_close_not_an_error_inside_tls() {
    let s = Setup::new(1).await;
    s.route_to("", &["p1"], 1).await;
    let proxy = Proxy::spawn(&s.etcd, "p1", &[]);
    assert!(
        wait_for(Duration::from_secs(10), || async {
            connect_error_code(&proxy).await.as_deref() == Some("57P03")
        })
        .await
    );
    let mut c = raw(&proxy);
    // The start of a TLS ClientHello record.
    c.write_all(&[0x16, 0x03, 0x01, 0x00, 0x20, 0x01, 0x00, 0x00, 0x1c])
        .expect("write");
    assert!(
        read_to_eof(&mut c).is_empty(),
        "nothing written into the TLS stream"
    );
}

/// With no master, a client that asks for SSL first (libpq's default sslmode=prefer) is
/// declined ('N'), sends its startup packet in the clear, and reads the real reason: 57P03
/// "no primary available", as PostgreSQL answers when it must refuse. psql shows it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_ssl_client_reads_the_real_reason() {
    let s = Setup::new(1).await;
    s.route_to("db0", &["other-proxy"], 1).await;
    let proxy = Proxy::spawn(&s.etcd, "p1", &[]);
    assert!(
        wait_for(Duration::from_secs(10), || async {
            proxy
                .connect()
                .await
                .err()
                .is_some_and(|e| e.as_db_error().is_some())
        })
        .await,
        "{}",
        proxy.log_text()
    );
    let mut c = raw(&proxy);
    c.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .expect("SSLRequest");
    let mut answer = [0u8; 1];
    c.read_exact(&mut answer).expect("answer");
    assert_eq!(&answer, b"N", "SSL declined");
    let mut startup = vec![0, 3, 0, 0];
    startup.extend_from_slice(b"user\0postgres\0\0");
    let mut packet = ((startup.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend(startup);
    c.write_all(&packet).expect("startup");
    let (code, msg) = parse_error(&read_to_eof(&mut c));
    assert_eq!(code, "57P03");
    assert!(msg.contains("no primary available"), "{msg}");

    let out = std::process::Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=prefer connect_timeout=5",
            proxy.port.0
        ))
        .args(["-c", "select 1"])
        .env("PGPASSWORD", "x")
        .output()
        .expect("psql");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no primary available") && !err.contains("SSL exchange"),
        "{err}"
    );
}
