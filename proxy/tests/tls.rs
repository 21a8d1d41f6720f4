//! `--client-tls terminate` (issue 19, point 1 and 4) with real etcd, PostgreSQL with ssl on,
//! the proxy binary, libpq's psql and tokio-postgres over OpenSSL: the proxy handshakes
//! clients itself (SSLRequest and PostgreSQL 17's direct TLS with ALPN), refuses plaintext
//! when told to, speaks --server-sslmode to the servers (verify-full refuses an expired or
//! foreign certificate), reloads its certificate, and drains a TLS session at its
//! transaction boundary instead of waiting for the drain timeout.

mod common;

use common::pki::*;
use common::*;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use testkit::{Etcd, Postgres};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// etcd, and one PostgreSQL per certificate (ssl on), routed to db0 with proxy p1 enabled.
async fn setup(pki: &Pki, certs: &[(&str, bool)]) -> Setup {
    let etcd = Etcd::start().expect("etcd");
    let pgs = certs
        .iter()
        .map(|(name, expired)| {
            let (c, k) = pki.issue(name, *expired);
            let s = ssl_settings(&c, &k);
            let refs: Vec<(&str, &str)> = s.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
            Postgres::start(&refs).expect("postgres with ssl")
        })
        .collect();
    let store = open_store(&etcd).await;
    let s = Setup { etcd, pgs, store };
    s.route_to("db0", &["p1"], 1).await;
    s
}

fn spawn(s: &Setup, flags: &[String]) -> Proxy {
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    Proxy::spawn(&s.etcd, "p1", &refs)
}

/// psql through the proxy with libpq's sslmode: the one row's value, or psql's error.
fn psql(proxy: &Proxy, sslmode: &str, ca: &Path, sql: &str) -> Result<String, String> {
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode={sslmode} sslrootcert={} connect_timeout=5",
        proxy.port.0,
        ca.display()
    );
    let out = std::process::Command::new(testkit::postgres::pg_bin_dir().join("psql"))
        .args(["-XAtq", "-d", &conninfo, "-c", sql])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

async fn wait_psql(proxy: &Proxy, sslmode: &str, ca: &Path) {
    let ok = wait_for(Duration::from_secs(15), || async {
        psql(proxy, sslmode, ca, "select 1").is_ok()
    })
    .await;
    assert!(
        ok,
        "psql sslmode={sslmode} through the proxy\n{}",
        proxy.log_text()
    );
}

/// Whether the proxy's own session to the server is encrypted.
async fn server_side_ssl(c: &tokio_postgres::Client) -> bool {
    c.query_one(
        "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
        &[],
    )
    .await
    .expect("pg_stat_ssl")
    .get(0)
}

/// A minimal client over direct TLS (PostgreSQL 17's `sslnegotiation=direct`): handshake
/// with or without ALPN, a startup as postgres (trust), one query. The value of its one row,
/// or the ErrorResponse's message.
async fn direct_tls(port: u16, ca: &Path, alpn: bool) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).expect("ca");
    let certs: Vec<_> = rustls_pemfile_certs(&pem);
    for c in certs {
        roots.add(c).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    if alpn {
        config.alpn_protocols = vec![b"postgresql".to_vec()];
    }
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let startup = startup_message();
    tls.write_all(&startup).await.map_err(|e| e.to_string())?;
    let mut value = None;
    let mut queried = false;
    loop {
        let (kind, body) = read_message(&mut tls).await?;
        match kind {
            b'E' => return Err(error_message(&body)),
            b'D' => {
                let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]) as usize;
                value = Some(String::from_utf8_lossy(&body[6..6 + len]).into_owned());
            }
            b'Z' if queried => return value.ok_or_else(|| "no row".to_string()),
            b'Z' => {
                let sql = b"select 'direct'\0";
                let mut q = vec![b'Q'];
                q.extend(((sql.len() + 4) as u32).to_be_bytes());
                q.extend(sql);
                tls.write_all(&q).await.map_err(|e| e.to_string())?;
                queried = true;
            }
            _ => {}
        }
    }
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .expect("pem")
}

fn startup_message() -> Vec<u8> {
    let body = b"user\0postgres\0database\0postgres\0\0";
    let mut p = ((8 + body.len()) as u32).to_be_bytes().to_vec();
    p.extend(196_608u32.to_be_bytes());
    p.extend(body);
    p
}

async fn read_message(
    s: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<(u8, Vec<u8>), String> {
    let mut header = [0u8; 5];
    s.read_exact(&mut header)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let mut body = vec![0u8; len.saturating_sub(4)];
    s.read_exact(&mut body)
        .await
        .map_err(|e| format!("read: {e}"))?;
    Ok((header[0], body))
}

/// "CODE message" of an ErrorResponse body.
fn error_message(body: &[u8]) -> String {
    let (mut code, mut message) = (String::new(), String::new());
    for field in body.split(|&b| b == 0) {
        match field.first() {
            Some(b'C') => code = String::from_utf8_lossy(&field[1..]).into_owned(),
            Some(b'M') => message = String::from_utf8_lossy(&field[1..]).into_owned(),
            _ => {}
        }
    }
    format!("{code} {message}")
}

/// The subject CN of the certificate the proxy shows now.
async fn shown_certificate(port: u16) -> Option<String> {
    #[derive(Debug)]
    struct Capture(
        Arc<std::sync::Mutex<Option<Vec<u8>>>>,
        Arc<rustls::crypto::CryptoProvider>,
    );
    impl rustls::client::danger::ServerCertVerifier for Capture {
        fn verify_server_cert(
            &self,
            end_entity: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            *self.0.lock().expect("lock") = Some(end_entity.to_vec());
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &rustls::pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.1.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &rustls::pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.1.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.1.signature_verification_algorithms.supported_schemes()
        }
    }
    let seen = Arc::new(std::sync::Mutex::new(None));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .ok()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Capture(seen.clone(), provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").ok()?;
    let _tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .ok()?;
    let der = seen.lock().ok()?.clone()?;
    let cert = openssl::x509::X509::from_der(&der).ok()?;
    let cn = cert
        .subject_name()
        .entries_by_nid(openssl::nid::Nid::COMMONNAME)
        .next()?
        .data()
        .to_string();
    cn.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_clients_are_served_over_tls_and_in_the_clear() {
    let pki = Pki::new();
    let s = setup(&pki, &[("db0", false)]).await;
    let (cert, key) = pki.issue("proxy", false);
    let proxy = spawn(&s, &terminate_flags(&cert, &key));
    wait_psql(&proxy, "verify-full", &pki.ca_file()).await;

    // libpq verifies the proxy's certificate; the proxy's side to the server is plaintext
    // (--server-sslmode disable, the default).
    let ca = pki.ca_file();
    assert_eq!(
        psql(&proxy, "verify-full", &ca, "select 'libpq'"),
        Ok("libpq".into())
    );
    let c = tls_client(&proxy, &ca)
        .await
        .expect("tokio-postgres over TLS");
    assert!(!server_side_ssl(&c).await);
    // A cancel over TLS (tokio-postgres opens it as its session: SSLRequest, handshake,
    // CancelRequest inside) reaches the session by the key the proxy minted.
    let token = c.cancel_token();
    let sleeper =
        tokio::spawn(async move { c.simple_query("select pg_sleep(60)").await.map(drop) });
    let mut b = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls()).expect("ssl");
    b.set_ca_file(&ca).expect("ca");
    let tls = postgres_openssl::MakeTlsConnector::new(b.build());
    let cancelled = wait_for(Duration::from_secs(15), || async {
        let _ = token.cancel_query(tls.clone()).await;
        sleeper.is_finished()
    })
    .await;
    assert!(cancelled, "{}", proxy.log_text());
    let err = sleeper.await.expect("task").expect_err("cancelled");
    assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err}");
    // Plaintext is still served (no --client-tls-required).
    let plain = proxy.connect().await.expect("plaintext client");
    assert_eq!(server_port(&plain).await.expect("port"), s.pgs[0].port());

    // PostgreSQL 17's direct TLS: served with ALPN "postgresql", refused without it.
    assert_eq!(
        direct_tls(proxy.port.0, &ca, true).await,
        Ok("direct".into())
    );
    let no_alpn = direct_tls(proxy.port.0, &ca, false)
        .await
        .expect_err("no ALPN");
    assert!(
        no_alpn.starts_with("08P01") && no_alpn.contains("ALPN"),
        "{no_alpn}"
    );

    // Bytes pipelined after an SSLRequest, before its answer (CVE-2021-23214): refused.
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port.0))
        .await
        .expect("tcp");
    let mut bytes = 8u32.to_be_bytes().to_vec();
    bytes.extend(80_877_103u32.to_be_bytes());
    bytes.extend(startup_message());
    tcp.write_all(&bytes).await.expect("write");
    let (kind, body) = read_message(&mut tcp).await.expect("answer");
    assert_eq!(kind, b'E');
    assert!(error_message(&body).starts_with("08P01 received unencrypted data after SSL request"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_tls_required_refuses_plaintext_and_no_certificate_declines_tls() {
    let pki = Pki::new();
    let s = setup(&pki, &[("db0", false)]).await;
    let (cert, key) = pki.issue("proxy", false);
    let mut flags = terminate_flags(&cert, &key);
    flags.push("--client-tls-required".into());
    let required = spawn(&s, &flags);
    let ca = pki.ca_file();
    wait_psql(&required, "require", &ca).await;
    let refused = required.connect().await.expect_err("plaintext refused");
    let db = refused.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "28000");
    assert!(db.message().contains("no encryption"), "{}", db.message());
    assert!(psql(&required, "disable", &ca, "select 1").is_err());
    drop(required);

    // Terminate mode without a certificate: TLS is declined ('N'), as by a server with
    // ssl off: sslmode=prefer goes on in the clear, sslmode=require gives up.
    let proxy = Proxy::spawn(&s.etcd, "p1", &["--client-tls", "terminate"]);
    wait_psql(&proxy, "prefer", &ca).await;
    let err = psql(&proxy, "require", &ca, "select 1").expect_err("require without TLS");
    assert!(err.contains("does not support SSL"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sslmode_verify_full_refuses_an_expired_certificate_and_require_does_not() {
    let pki = Pki::new();
    // db0's certificate is good, db1's expired.
    let s = setup(&pki, &[("db0", false), ("db1", true)]).await;
    let (cert, key) = pki.issue("proxy", false);
    let ca = pki.ca_file();
    let mut flags = terminate_flags(&cert, &key);
    flags.extend([
        "--server-sslmode".into(),
        "verify-full".into(),
        "--server-ca-file".into(),
        ca.display().to_string(),
    ]);
    let proxy = spawn(&s, &flags);
    wait_psql(&proxy, "require", &ca).await;
    let c = tls_client(&proxy, &ca).await.expect("session");
    assert!(server_side_ssl(&c).await, "the proxy's side to db0 is TLS");

    s.route_to("db1", &["p1"], 2).await;
    wait_applied(&proxy, 2).await;
    let err = psql(&proxy, "require", &ca, "select 1").expect_err("expired server certificate");
    assert!(err.contains("TLS to the primary failed"), "{err}");
    assert!(
        proxy.log_text().contains("certificate expired"),
        "{}",
        proxy.log_text()
    );

    // A certificate signed by another CA is refused too.
    let other = Pki::new();
    let mut flags = terminate_flags(&cert, &key);
    flags.extend([
        "--server-sslmode".into(),
        "verify-full".into(),
        "--server-ca-file".into(),
        other.ca_file().display().to_string(),
    ]);
    s.route_to("db0", &["p1", "p2"], 3).await;
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let foreign = Proxy::spawn(&s.etcd, "p2", &refs);
    assert!(wait_listening(&foreign).await);
    let refused = wait_for(Duration::from_secs(15), || async {
        psql(&foreign, "require", &ca, "select 1")
            .is_err_and(|e| e.contains("TLS to the primary failed"))
    })
    .await;
    assert!(refused, "foreign CA refused\n{}", foreign.log_text());

    // sslmode require encrypts without verifying: the expired one is accepted.
    s.route_to("db1", &["p1", "p2", "p3"], 4).await;
    let mut flags = terminate_flags(&cert, &key);
    flags.extend(["--server-sslmode".into(), "require".into()]);
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let unverified = Proxy::spawn(&s.etcd, "p3", &refs);
    wait_psql(&unverified, "require", &ca).await;
    let c = tls_client(&unverified, &ca).await.expect("session");
    assert_eq!(server_port(&c).await.expect("port"), s.pgs[1].port());
    assert!(server_side_ssl(&c).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_is_reloaded_when_its_files_change_and_sighup_keeps_the_proxy() {
    let pki = Pki::new();
    let s = setup(&pki, &[("db0", false)]).await;
    let (cert, key) = pki.issue("first", false);
    let proxy = spawn(&s, &terminate_flags(&cert, &key));
    wait_psql(&proxy, "require", &pki.ca_file()).await;
    assert_eq!(
        shown_certificate(proxy.port.0).await.as_deref(),
        Some("first")
    );

    let (c2, k2) = pki.issue("second", false);
    let (pem, key_pem) = (
        std::fs::read_to_string(&c2).expect("c"),
        std::fs::read_to_string(&k2).expect("k"),
    );
    write_key_pair(&cert, &key, &pem, &key_pem);
    let reloaded = wait_for(Duration::from_secs(15), || async {
        shown_certificate(proxy.port.0).await.as_deref() == Some("second")
    })
    .await;
    assert!(reloaded, "new certificate shown\n{}", proxy.log_text());

    // SIGHUP reloads too, and does not end the proxy (the default action would).
    let pid = nix::unistd::Pid::from_raw(proxy.child.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    let logged = wait_for(Duration::from_secs(10), || async {
        proxy
            .log_text()
            .contains("SIGHUP: reloading the TLS certificate")
    })
    .await;
    assert!(logged, "{}", proxy.log_text());
    assert_eq!(
        psql(&proxy, "require", &pki.ca_file(), "select 1"),
        Ok("1".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_tls_session_is_drained_at_its_boundary_not_at_the_timeout() {
    let pki = Pki::new();
    let s = setup(&pki, &[("db0", false), ("db1", false)]).await;
    let (cert, key) = pki.issue("proxy", false);
    let mut flags = terminate_flags(&cert, &key);
    flags.extend([
        "--drain-timeout".into(),
        "30s".into(),
        "--hold-timeout".into(),
        "30s".into(),
    ]);
    let proxy = spawn(&s, &flags);
    let ca = pki.ca_file();
    wait_psql(&proxy, "require", &ca).await;
    let c = tls_client(&proxy, &ca).await.expect("TLS session");
    c.batch_execute("select 1").await.expect("query");

    // The planned switchover's fencing write: no master, the drain hint.
    let dbs = s.dbs();
    let refs: Vec<(&str, u16)> = dbs.iter().map(|(u, p)| (u.as_str(), *p)).collect();
    let mut cd = clusterdata("", &refs, &["p1"], 2);
    cd.proxy.spec.drain = true;
    put_cd(&s.store, &cd).await;
    let closed = wait_for(Duration::from_secs(25), || async { c.is_closed() }).await;
    assert!(closed, "drained\n{}", proxy.log_text());
    // Closed as drained (at its boundary, seen through the TLS), not severed at the 30 s
    // timeout as an opaque session would be. Counted once the proxy has ended its side too,
    // which may be just after the client has seen the close.
    let drained = "stolon_proxy_sessions_closed_total{reason=\"Drained\"} 1";
    let counted = wait_for(Duration::from_secs(5), || async {
        proxy.http_get("/metrics").1.contains(drained)
    })
    .await;
    assert!(counted, "{}", proxy.http_get("/metrics").1);
}
