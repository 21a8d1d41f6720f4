//! Holding instead of refusing (issue 13, points 1 and 3), with real etcd, PostgreSQL and
//! the proxy binary: a session that arrives while no master is routed is held and released
//! to the next master at once, where its query runs; the hold timeout and the hold limit
//! give 57P03; a held client that hangs up is dropped at once; a CancelRequest during a
//! hold is answered; a master that refuses
//! connections, or accepts them and answers that it is shutting down, is retried until the
//! next route; a proxy that lost the store never holds.

mod common;

use common::*;
use std::io::{Read, Write};
use std::time::Duration;

/// A client that waits long enough to be held (libpq's connect_timeout covers the hold).
fn patient(proxy: &Proxy) -> String {
    format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=60",
        proxy.port.0
    )
}

async fn patient_connect(proxy: &Proxy) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    connect(&patient(proxy)).await
}

/// A session in a task that may be held; yields the port of the PostgreSQL it ran on.
fn held_query(proxy: &Proxy) -> tokio::task::JoinHandle<Result<u16, tokio_postgres::Error>> {
    let conninfo = patient(proxy);
    tokio::spawn(async move {
        let c = connect(&conninfo).await?;
        server_port(&c).await
    })
}

async fn wait_held(proxy: &Proxy, n: f64) {
    assert!(
        wait_for(Duration::from_secs(15), || async {
            metric(proxy, "stolon_proxy_sessions_held") == Some(n)
        })
        .await,
        "{n} sessions held: {:?}\n{}",
        metric(proxy, "stolon_proxy_sessions_held"),
        proxy.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_session_is_released_to_the_next_master_and_runs_there() {
    let s = Setup::new(2).await;
    let proxy = spawn_routed(&s, &["--hold-timeout", "30s"]).await;
    // The sentinel fences the proxies for a master change: no master routed.
    s.route_to("", &["p1"], 2).await;
    // Connecting before the proxy applied generation 2 would reach db0 and never hold.
    wait_applied(&proxy, 2).await;
    let held = held_query(&proxy);
    wait_held(&proxy, 1.0).await;
    // A CancelRequest during the hold is answered (closed), not held.
    let mut cancel = std::net::TcpStream::connect(("127.0.0.1", proxy.port.0)).expect("connect");
    cancel
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut packet = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
    packet.extend([0, 0, 0, 1, 0, 0, 0, 2]);
    cancel.write_all(&packet).expect("cancel");
    let mut rest = Vec::new();
    cancel
        .read_to_end(&mut rest)
        .expect("the cancel is answered by a close");
    // The new master: the held session connects there and its query runs.
    s.route_to("db1", &["p1"], 3).await;
    let port = released_port(held, Duration::from_secs(15)).await;
    assert_eq!(port, s.pgs[1].port(), "released to the new master");
    wait_held(&proxy, 0.0).await;
    assert_eq!(
        metric(&proxy, "stolon_proxy_sessions_holds_total"),
        Some(1.0)
    );
}

/// A held client that hangs up is dropped at once (issue 23, point 4): the hold count falls
/// while no master is routed yet, and the next master never sees it; one still waiting is
/// released there as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_client_that_hangs_up_is_dropped_at_once() {
    let s = Setup::new(2).await;
    let proxy = spawn_routed(&s, &["--hold-timeout", "60s"]).await;
    s.route_to("", &["p1"], 2).await;
    wait_applied(&proxy, 2).await;
    // Three clients send their startup packet, are held, and hang up.
    let mut startup = Vec::new();
    for kv in ["user", "postgres", "database", "postgres"] {
        startup.extend(kv.as_bytes());
        startup.push(0);
    }
    startup.push(0);
    let mut packet = ((startup.len() + 8) as u32).to_be_bytes().to_vec();
    packet.extend(196608u32.to_be_bytes());
    packet.extend(startup);
    let mut quitters = Vec::new();
    for _ in 0..3 {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", proxy.port.0)).expect("connect");
        c.write_all(&packet).expect("startup");
        quitters.push(c);
    }
    let stays = held_query(&proxy);
    wait_held(&proxy, 4.0).await;
    drop(quitters);
    // Dropped while still no master is routed: not kept until the next route.
    wait_held(&proxy, 1.0).await;
    assert_eq!(
        metric(
            &proxy,
            "stolon_proxy_sessions_closed_total{reason=\"ClientGone\"}"
        ),
        Some(3.0),
        "{}",
        proxy.log_text()
    );
    s.route_to("db1", &["p1"], 3).await;
    let port = released_port(stays, Duration::from_secs(15)).await;
    assert_eq!(port, s.pgs[1].port(), "the one still waiting is released");
    wait_held(&proxy, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_timeout_and_max_sessions_give_57p03() {
    let s = Setup::new(1).await;
    s.route_to("", &["p1"], 1).await;
    let proxy = Proxy::spawn(
        &s.etcd,
        "p1",
        &["--hold-timeout", "2s", "--hold-max-sessions", "1"],
    );
    assert!(wait_listening(&proxy).await, "{}", proxy.log_text());
    let first = held_query(&proxy);
    wait_held(&proxy, 1.0).await;
    // Over the limit: refused at once.
    let err = patient_connect(&proxy)
        .await
        .expect_err("over the hold limit");
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "57P03");
    assert!(
        db.message().contains("no primary available"),
        "{}",
        db.message()
    );
    // The held one: refused after the hold timeout.
    let err = first
        .await
        .expect("task")
        .expect_err("refused after the hold");
    assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("57P03"));
    wait_held(&proxy, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_that_refuses_connections_is_retried_until_the_next_route() {
    let s = Setup::new(1).await;
    // The routed master's address has nothing listening (it died, not failed over yet).
    let dead = testkit::free_port();
    let cd = clusterdata(
        "dead",
        &[("dead", dead.0), ("db0", s.pgs[0].port())],
        &["p1"],
        1,
    );
    put_cd(&s.store, &cd).await;
    let proxy = Proxy::spawn(&s.etcd, "p1", &["--hold-timeout", "30s"]);
    assert!(wait_listening(&proxy).await, "{}", proxy.log_text());
    let held = held_query(&proxy);
    wait_held(&proxy, 1.0).await;
    s.route_to("db0", &["p1"], 2).await;
    let port = released_port(held, Duration::from_secs(15)).await;
    assert_eq!(port, s.pgs[0].port());
}

/// A master that accepts the connection and then answers that it is shutting down (57P03,
/// as a killed or stopping master does) has not taken the session: it is held, retried, and
/// released to the next master; the client never sees the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_shutting_down_is_retried_until_the_next_route() {
    let s = Setup::new(2).await;
    let proxy = spawn_routed(&s, &["--hold-timeout", "30s"]).await;
    // An open session keeps a smart shutdown waiting, refusing new connections meanwhile.
    let open = connect(&s.pgs[0].conninfo()).await.expect("direct session");
    s.pgs[0].smart_shutdown();
    assert!(
        wait_for(Duration::from_secs(15), || async {
            let err = connect(&s.pgs[0].conninfo()).await.err();
            err.and_then(|e| e.as_db_error().map(|d| d.code().code() == "57P03")) == Some(true)
        })
        .await,
        "db0 refuses new connections while shutting down"
    );
    let held = held_query(&proxy);
    wait_held(&proxy, 1.0).await;
    assert!(
        proxy
            .log_text()
            .contains("the primary is not accepting connections"),
        "{}",
        proxy.log_text()
    );
    s.route_to("db1", &["p1"], 2).await;
    let port = released_port(held, Duration::from_secs(15)).await;
    assert_eq!(port, s.pgs[1].port(), "released to the new master");
    drop(open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_lost_the_store_does_not_hold() {
    let mut s = Setup::new(1).await;
    let proxy = spawn_routed(&s, &["--hold-timeout", "30s", "--stop-listening", "false"]).await;
    s.etcd.stop();
    // Fenced within proxyTimeout (3 s): refused at once with the reason, never held.
    assert!(
        wait_for(Duration::from_secs(15), || async {
            patient_connect(&proxy).await.err().is_some_and(|e| {
                e.as_db_error()
                    .is_some_and(|d| d.message().contains("lost contact with the store"))
            })
        })
        .await,
        "{}",
        proxy.log_text()
    );
    // Once fenced, a new session is refused without a hold. (A session that was connecting
    // at the instant the proxy fenced may count one hold: its route was cut under it, and
    // it was retried on the next route, which refused it at once.)
    let before = metric(&proxy, "stolon_proxy_sessions_holds_total");
    let refused = patient_connect(&proxy).await.expect_err("refused");
    assert!(
        refused
            .as_db_error()
            .is_some_and(|d| d.message().contains("lost contact with the store")),
        "{refused}"
    );
    assert_eq!(metric(&proxy, "stolon_proxy_sessions_holds_total"), before);
    assert!(before <= Some(1.0), "{before:?}");
}
