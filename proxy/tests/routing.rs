//! Routing, severing on master change, generation reporting, no-master errors, cancel
//! forwarding, the health endpoint and the checks that back the watch: real etcd, real
//! PostgreSQL, the real binary.

mod common;

use common::*;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_to_the_master_and_severs_on_change() {
    let s = Setup::new(2).await;
    let (p0, p1) = (s.pgs[0].port(), s.pgs[1].port());
    s.route_to("db0", &["p1"], 1).await;
    let proxy = Proxy::spawn(&s.etcd, "p1", &[]);
    assert!(
        wait_routed(&proxy, p0).await,
        "not routed to db0: {}",
        proxy.log_text()
    );
    assert!(
        wait_for(Duration::from_secs(5), || async {
            proxy_info(&s.store, "p1")
                .await
                .is_some_and(|i| i.generation == 1)
        })
        .await,
        "generation 1 reported"
    );
    assert_eq!(proxy.http_get("/health").0, 200);

    let mut sessions = Vec::new();
    for _ in 0..20 {
        let c = proxy.connect().await.expect("connect");
        assert_eq!(server_port(&c).await.expect("query"), p0);
        sessions.push(c);
    }
    // The sentinel's fencing step: no master, generation bumped.
    let written = Instant::now();
    s.route_to("", &["p1"], 2).await;
    for c in &sessions {
        assert!(
            wait_for(Duration::from_secs(2), || async {
                c.is_closed() || c.simple_query("select 1").await.is_err()
            })
            .await,
            "a session to the old master survived"
        );
    }
    let severed_in = written.elapsed();
    assert!(
        wait_for(Duration::from_secs(5), || async {
            proxy_info(&s.store, "p1")
                .await
                .is_some_and(|i| i.generation == 2)
        })
        .await,
        "generation 2 reported after severing"
    );
    assert_eq!(connect_error_code(&proxy).await.as_deref(), Some("57P03"));
    assert_eq!(proxy.http_get("/health").0, 503);

    // The new master.
    s.route_to("db1", &["p1"], 3).await;
    assert!(wait_routed(&proxy, p1).await);
    let metrics = proxy.http_get("/metrics").1;
    assert!(
        metrics.contains("stolon_proxy_sessions_closed_total{reason=\"Severed\"} 20"),
        "{metrics}"
    );
    assert!(
        metrics.contains("stolon_proxy_route_generation 3"),
        "{metrics}"
    );
    eprintln!("20 sessions severed within {severed_in:?} of the clusterdata write (wall clock, for information)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_master_not_enabled_and_unknown_db_are_refused_with_57p03() {
    let s = Setup::new(1).await;
    s.route_to("db0", &["other-proxy"], 1).await;
    let proxy = Proxy::spawn(&s.etcd, "p1", &[]);
    assert!(
        // An ErrorResponse, not just any error: before its first store read the proxy
        // does not listen yet, and "connection refused" is no answer from it.
        wait_for(Duration::from_secs(10), || async {
            proxy
                .connect()
                .await
                .err()
                .is_some_and(|e| e.as_db_error().is_some())
                && proxy.http_get("/health").0 == 503
        })
        .await
    );
    let err = proxy.connect().await.expect_err("refused");
    let db = err.as_db_error().unwrap_or_else(|| {
        panic!(
            "an ErrorResponse, not a reset: {err:?}\n{}",
            proxy.log_text()
        )
    });
    assert_eq!(db.code().code(), "57P03");
    assert!(
        db.message().contains("no primary available"),
        "{}",
        db.message()
    );
    assert!(db.message().contains("not enabled"), "{}", db.message());
    // A proxy that is not enabled reports generation 0, as stolon's does.
    assert!(
        wait_for(Duration::from_secs(5), || async {
            proxy_info(&s.store, "p1")
                .await
                .is_some_and(|i| i.generation == 0)
        })
        .await
    );
    s.route_to("db-unknown", &["p1"], 2).await;
    assert!(
        wait_for(Duration::from_secs(5), || async {
            proxy_info(&s.store, "p1")
                .await
                .is_some_and(|i| i.generation == 2)
        })
        .await
    );
    assert_eq!(connect_error_code(&proxy).await.as_deref(), Some("57P03"));
    // A malformed document: no master either, and no crash.
    s.store
        .store()
        .txn(
            vec![],
            vec![control::store::Op::put(
                s.store.clusterdata_key(),
                b"{broken".to_vec(),
            )],
        )
        .await
        .expect("put");
    assert!(
        wait_for(Duration::from_secs(10), || async {
            proxy.log_text().contains("cannot be read")
        })
        .await,
        "the bad document is read and logged"
    );
    assert_eq!(connect_error_code(&proxy).await.as_deref(), Some("57P03"));
    s.route_to("db0", &["p1"], 3).await;
    assert!(
        wait_routed(&proxy, s.pgs[0].port()).await,
        "recovers once the document is good"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_cancels_a_query_through_the_proxy() {
    let s = Setup::new(1).await;
    s.route_to("db0", &["p1"], 1).await;
    let proxy = Proxy::spawn(&s.etcd, "p1", &[]);
    assert!(wait_routed(&proxy, s.pgs[0].port()).await);
    let client = proxy.connect().await.expect("connect");
    let token = client.cancel_token();
    let started = Instant::now();
    let sleeper =
        tokio::spawn(async move { client.simple_query("select pg_sleep(30)").await.map(|_| ()) });
    // The positive event: PostgreSQL runs the query.
    let direct = connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        s.pgs[0].port()
    ))
    .await
    .expect("direct connection");
    assert!(
        wait_for(Duration::from_secs(10), || async {
            direct
                .query_one(
                    "select count(*) from pg_stat_activity \
                     where state = 'active' and query = 'select pg_sleep(30)'",
                    &[],
                )
                .await
                .is_ok_and(|r| r.get::<_, i64>(0) == 1)
        })
        .await,
        "the query runs"
    );
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel sent via the proxy");
    let res = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .expect("query ended")
        .expect("join");
    let err = res.expect_err("the sleep was cancelled");
    assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_master_is_08006() {
    let s = Setup::new(0).await;
    let dead = testkit::free_port();
    put_cd(
        &s.store,
        &clusterdata("db0", &[("db0", dead.0)], &["p1"], 1),
    )
    .await;
    let proxy = Proxy::spawn(&s.etcd, "p1", &[]);
    assert!(
        wait_for(Duration::from_secs(10), || async {
            proxy.http_get("/health").0 == 200 && proxy_listens(&proxy)
        })
        .await
    );
    assert_eq!(connect_error_code(&proxy).await.as_deref(), Some("08006"));
}

/// The check every proxyCheckInterval reads only the clusterdata's revision while the watch
/// is up; a change the watch does not bring (a silently stalled watch, injected) is still
/// found by it, read whole and routed to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_watch_misses_is_found_by_the_check() {
    let s = Setup::new(2).await;
    let (p0, p1) = (s.pgs[0].port(), s.pgs[1].port());
    s.route_to("db0", &["p1"], 1).await;
    let env = [("STOLON_E2E_BREAK", "proxy-watch-deaf")];
    let proxy = Proxy::spawn_env(&s.etcd, "p1", &[], &env);
    assert!(wait_routed(&proxy, p0).await, "{}", proxy.log_text());
    let checks = |result: &str| {
        let label = format!("result=\"{result}\"");
        labeled_metric(&proxy, "stolon_proxy_store_checks_total", &label).unwrap_or(0.0)
    };
    // Idle: the checks ask for the revision, not the document.
    assert!(
        wait_for(Duration::from_secs(5), || async {
            checks("unchanged") >= 2.0
        })
        .await,
        "{}",
        proxy.log_text()
    );
    let reads = checks("read");
    s.route_to("db1", &["p1"], 2).await;
    assert!(wait_routed(&proxy, p1).await, "{}", proxy.log_text());
    assert!(checks("read") > reads);
}
