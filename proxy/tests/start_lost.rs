//! A session whose server goes away during its start (after the proxy authenticated the
//! client, before the server's ReadyForQuery: a kill -9 of the master while a client logs
//! in) starts on the next master instead of failing: the client's connect just takes
//! longer. Real etcd, PostgreSQL, the proxy binary and tokio-postgres; a shim in front of
//! PostgreSQL plays the dying master (it ends alice's login with the FATAL a backend sends
//! when its postmaster dies, then accepts no more connections).

mod common;

use common::authdb::*;
use common::pki::*;
use common::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A server in front of PostgreSQL at `pg` that relays every session but the first of
/// alice, which it ends when the server sends the authentication message `cut` (11 SASL
/// continue, 12 SASL final, 0 AuthenticationOk) with the FATAL of a dying postmaster; then
/// it stops listening, as a dead master's address does. Returns its port.
async fn dying_master(pg: u16, cut: u32) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let died = std::sync::Arc::new(tokio::sync::Notify::new());
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                // The listener goes with the postmaster.
                _ = died.notified() => return,
            };
            let Ok((c, _)) = accepted else { return };
            tokio::spawn(relay(c, pg, cut, died.clone()));
        }
    });
    port
}

/// Relays one session; alice's is ended at `cut`, and `died` told.
async fn relay(
    mut c: tokio::net::TcpStream,
    pg: u16,
    cut: u32,
    died: std::sync::Arc<tokio::sync::Notify>,
) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", pg))
        .await
        .expect("pg");
    let mut buf = vec![0u8; 4096];
    let n = c.read(&mut buf).await.unwrap_or(0);
    s.write_all(&buf[..n]).await.expect("startup");
    if !buf[..n].windows(5).any(|w| w == b"alice") {
        let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
        return;
    }
    let mut seen = Vec::new();
    loop {
        let mut from_server = vec![0u8; 8192];
        tokio::select! {
            r = c.read(&mut buf) => match r {
                Ok(n) if n > 0 => s.write_all(&buf[..n]).await.expect("to pg"),
                _ => return,
            },
            r = s.read(&mut from_server) => {
                let n = r.unwrap_or(0);
                if n == 0 {
                    return;
                }
                seen.extend_from_slice(&from_server[..n]);
                // Whole messages only: the cut one is replaced by the FATAL.
                while seen.len() >= 5 {
                    let len = u32::from_be_bytes([seen[1], seen[2], seen[3], seen[4]]) as usize;
                    if seen.len() < 1 + len {
                        break;
                    }
                    let msg: Vec<u8> = seen.drain(..1 + len).collect();
                    let code = msg.get(5..9).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                    if msg[0] == b'R' && code == Some(cut) {
                        let fatal: &[u8] =
                            b"SFATAL\0C57P01\0Mterminating connection due to unexpected postmaster exit\0\0";
                        let mut e = vec![b'E'];
                        e.extend(((fatal.len() + 4) as u32).to_be_bytes());
                        e.extend_from_slice(fatal);
                        let _ = c.write_all(&e).await;
                        died.notify_one();
                        return;
                    }
                    c.write_all(&msg).await.expect("to client");
                }
            }
        }
    }
}

fn count(proxy: &Proxy, result: &str) -> f64 {
    metric(
        proxy,
        &format!("stolon_proxy_session_start_lost_total{{result=\"{result}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_cut_by_the_masters_death_starts_on_the_next_master() {
    let pki = Pki::new();
    let s = setup(&pki).await;
    let pg = s.pgs[0].port();
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("auth-password");
    std::fs::write(&file, "auth-pw\n").expect("password file");
    let (cert, key) = pki.issue("proxy", false);
    let mut flags = terminate_flags(&cert, &key);
    let file = file.display().to_string();
    flags.extend(
        [
            "--auth-user",
            "proxyauth",
            "--auth-passwordfile",
            &file,
            "--hold-timeout",
            "60s",
        ]
        .map(String::from),
    );
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let proxy = Proxy::spawn(&s.etcd, "p1", &refs);
    // Cut when the server would accept the proxy's proof (the proxy has checked alice's
    // but not told her yet), then when it would say she is in.
    let mut generation = 1;
    for (n, cut) in [(1.0, 12), (2.0, 0)] {
        let shim = dying_master(pg, cut).await;
        let dbs = [("db0", pg), ("dbX", shim)];
        generation += 1;
        put_cd(&s.store, &clusterdata("dbX", &dbs, &["p1"], generation)).await;
        wait_applied(&proxy, generation).await;
        assert!(wait_routed(&proxy, pg).await, "{}", proxy.log_text());
        let alice = login_across_the_failover(&s, &proxy, &dbs, &mut generation).await;
        assert_eq!(count(&proxy, "started"), n, "{}", proxy.log_text());
        let row = alice
            .query_one("SELECT current_user::text, current_setting('port')", &[])
            .await
            .expect("her session works");
        assert_eq!(row.get::<_, String>(0), "alice");
        assert_eq!(row.get::<_, String>(1), pg.to_string());
        // Her cancel key (minted once the next master gave its own) cancels there.
        let sleep = "SELECT pg_sleep(30)";
        let e = testkit::cancel::cancel_running(&alice, sleep, Duration::from_millis(300)).await;
        assert_eq!(e.code().map(|c| c.code()), Some("57014"), "{e}");
        // Her session ends before the next dying master is routed: one still open then is
        // moved there, and its login is what that one-shot master dies on (with the store's
        // round trip under a millisecond the route can beat her disconnect).
        drop(alice);
        let closed = wait_for(Duration::from_secs(15), || async {
            metric(&proxy, "stolon_proxy_sessions_active") == Some(0.0)
        })
        .await;
        assert!(closed, "{}", proxy.log_text());
    }
}

/// alice logs in through the proxy while the routed master dies; once she is held, the
/// failover routes db0. Returns her session.
async fn login_across_the_failover(
    s: &Setup,
    proxy: &Proxy,
    dbs: &[(&str, u16)],
    generation: &mut i64,
) -> tokio_postgres::Client {
    let conninfo = format!(
        "host=127.0.0.1 port={} user=alice password=alice-pw dbname=postgres sslmode=disable connect_timeout=60",
        proxy.port.0
    );
    let login = tokio::spawn(async move { connect(&conninfo).await });
    let held = wait_for(Duration::from_secs(15), || async {
        metric(proxy, "stolon_proxy_sessions_held").unwrap_or(0.0) >= 1.0
    })
    .await;
    assert!(held, "{}", proxy.log_text());
    assert!(!login.is_finished(), "the client waits, it is not refused");
    // The sentinel fences the proxies first; the proxy reports the generation at once: the
    // held start is not counted among the dead master's sessions.
    *generation += 1;
    put_cd(&s.store, &clusterdata("", dbs, &["p1"], *generation)).await;
    let want = *generation;
    let acked = wait_for(Duration::from_secs(15), || async {
        proxy_info(&s.store, "p1")
            .await
            .is_some_and(|i| i.generation == want)
    })
    .await;
    assert!(acked, "{}", proxy.log_text());
    assert!(
        !proxy.log_text().contains("not all ended in time"),
        "the report waited for the held start: {}",
        proxy.log_text()
    );
    *generation += 1;
    put_cd(&s.store, &clusterdata("db0", dbs, &["p1"], *generation)).await;
    tokio::time::timeout(Duration::from_secs(30), login)
        .await
        .expect("the login ends")
        .expect("task")
        .unwrap_or_else(|e| panic!("alice logs in: {e}\n{}", proxy.log_text()))
}
