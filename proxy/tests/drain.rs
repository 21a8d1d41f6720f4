//! Drain on a planned switchover (issue 13, point 2), with real etcd, PostgreSQL and the
//! proxy binary: when the clusterdata fences the proxies with the drain hint, each session on
//! the old master is closed at its next transaction boundary (FATAL 57P01), never inside a
//! transaction; new sessions are held; the generation is reported only once the old master's
//! sessions are all closed; a transaction still open at the drain timeout is severed.

mod common;

use common::*;
use std::time::Duration;

/// The fencing write of a planned switchover: no master, the drain hint, a new generation.
async fn drain_to_none(s: &Setup, generation: i64) {
    let dbs = s.dbs();
    let refs: Vec<(&str, u16)> = dbs.iter().map(|(u, p)| (u.as_str(), *p)).collect();
    let mut cd = clusterdata("", &refs, &["p1"], generation);
    cd.proxy.spec.drain = true;
    put_cd(&s.store, &cd).await;
}

async fn reported(s: &Setup, generation: i64) -> bool {
    proxy_info(&s.store, "p1")
        .await
        .is_some_and(|i| i.generation == generation)
}

async fn wait_reported(s: &Setup, proxy: &Proxy, generation: i64) {
    assert!(
        wait_for(Duration::from_secs(20), || reported(s, generation)).await,
        "generation {generation} reported\n{}",
        proxy.log_text()
    );
}

async fn wait_closed(c: &tokio_postgres::Client, what: &str, proxy: &Proxy) {
    assert!(
        wait_for(Duration::from_secs(20), || async { c.is_closed() }).await,
        "{what} closed\n{}",
        proxy.log_text()
    );
}

async fn direct(pg: &testkit::Postgres) -> tokio_postgres::Client {
    connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        pg.port()
    ))
    .await
    .expect("direct connection")
}

async fn rows(pg: &testkit::Postgres) -> Vec<i32> {
    direct(pg)
        .await
        .query("select v from t order by v", &[])
        .await
        .expect("select")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn routed_proxy(s: &Setup, extra: &[&str]) -> Proxy {
    direct(&s.pgs[0])
        .await
        .batch_execute("create table t (v int)")
        .await
        .expect("create");
    let proxy = spawn_routed(s, extra).await;
    wait_reported(s, &proxy, 1).await;
    proxy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_switchover_closes_each_session_between_transactions() {
    let s = Setup::new(2).await;
    let proxy = routed_proxy(&s, &["--drain-timeout", "20s", "--hold-timeout", "30s"]).await;
    let in_tx = proxy.connect().await.expect("connect");
    in_tx
        .batch_execute("begin; insert into t values (1)")
        .await
        .expect("open transaction");
    let idle = proxy.connect().await.expect("connect");
    idle.simple_query("select 1").await.expect("query");

    drain_to_none(&s, 2).await;
    // The idle session is closed at once; the one in a transaction is not.
    wait_closed(&idle, "the idle session", &proxy).await;
    assert!(
        !in_tx.is_closed(),
        "a session inside a transaction is never closed early"
    );
    assert!(
        reported(&s, 1).await,
        "the generation waits for the open transaction"
    );
    // A new session meanwhile is held, not refused.
    let held = tokio::spawn({
        let conninfo = format!("{} connect_timeout=60", proxy.conninfo());
        async move {
            let c = connect(&conninfo).await?;
            server_port(&c).await
        }
    });
    // The transaction goes on and commits on the old master...
    in_tx
        .batch_execute("insert into t values (2)")
        .await
        .expect("still in the transaction");
    in_tx.batch_execute("commit").await.expect("commit");
    // ...and the session closes right after, at the boundary.
    wait_closed(&in_tx, "the session after its commit", &proxy).await;
    wait_reported(&s, &proxy, 2).await;
    assert_eq!(
        rows(&s.pgs[0]).await,
        vec![1, 2],
        "the transaction committed"
    );
    let log = proxy.log_text();
    assert!(log.contains("old master's sessions drained"), "{log}");
    assert_eq!(
        metric(
            &proxy,
            "stolon_proxy_sessions_closed_total{reason=\"Drained\"}"
        ),
        Some(2.0)
    );
    // The new master: the held session lands there.
    s.route_to("db1", &["p1"], 3).await;
    let port = released_port(held, Duration::from_secs(20)).await;
    assert_eq!(port, s.pgs[1].port());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_still_open_at_the_drain_timeout_is_severed() {
    let s = Setup::new(2).await;
    let proxy = routed_proxy(&s, &["--drain-timeout", "1s"]).await;
    let in_tx = proxy.connect().await.expect("connect");
    in_tx
        .batch_execute("begin; insert into t values (1)")
        .await
        .expect("open transaction");
    drain_to_none(&s, 2).await;
    wait_reported(&s, &proxy, 2).await;
    assert!(
        in_tx.batch_execute("commit").await.is_err(),
        "severed at the timeout"
    );
    assert_eq!(
        rows(&s.pgs[0]).await,
        Vec::<i32>::new(),
        "nothing committed"
    );
    assert!(
        proxy.log_text().contains("timed_out=true"),
        "{}",
        proxy.log_text()
    );
}

/// Without the hint (a Go sentinel's fencing write) nothing waits: the session in a
/// transaction is severed at once and the generation reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_hint_the_old_master_is_severed_at_once() {
    let s = Setup::new(2).await;
    let proxy = routed_proxy(&s, &["--drain-timeout", "60s"]).await;
    let in_tx = proxy.connect().await.expect("connect");
    in_tx
        .batch_execute("begin; insert into t values (1)")
        .await
        .expect("open transaction");
    s.route_to("", &["p1"], 2).await;
    wait_closed(&in_tx, "the session in a transaction", &proxy).await;
    wait_reported(&s, &proxy, 2).await;
    assert!(
        !proxy.log_text().contains("drained"),
        "{}",
        proxy.log_text()
    );
}

/// `--drain-timeout 0` turns the drain off: with the hint, an idle session (one a drain
/// would close cleanly) is severed at once like any other, since nothing tracks where it
/// stands, and the generation is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_timeout_of_zero_severs_at_once_and_tracks_nothing() {
    let s = Setup::new(2).await;
    let proxy = routed_proxy(&s, &["--drain-timeout", "0"]).await;
    let idle = proxy.connect().await.expect("connect");
    idle.batch_execute("select 1").await.expect("query");
    drain_to_none(&s, 2).await;
    wait_closed(&idle, "the idle session", &proxy).await;
    wait_reported(&s, &proxy, 2).await;
    let log = proxy.log_text();
    assert!(log.contains("severed_at_timeout=1"), "{log}");
}

/// A raw protocol client, to place each message exactly: what tokio-postgres does in one
/// `execute(sql, params)` call, split where the drain must not cut it.
struct Raw(tokio::net::TcpStream);

impl Raw {
    async fn connect(proxy: &Proxy) -> Raw {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port.0))
            .await
            .expect("connect");
        let startup = proxy::protocol::startup_message(&[("user", "postgres")]);
        s.write_all(&startup).await.expect("startup");
        let mut raw = Raw(s);
        raw.until_ready().await.expect("authenticated");
        raw
    }

    async fn send(&mut self, msgs: &[(u8, &[u8])]) {
        use tokio::io::AsyncWriteExt;
        let mut out = Vec::new();
        for (kind, body) in msgs {
            out.push(*kind);
            out.extend(((body.len() + 4) as u32).to_be_bytes());
            out.extend(*body);
        }
        self.0.write_all(&out).await.expect("send");
    }

    /// The first half of tokio-postgres' `execute`: Parse and Describe the unnamed
    /// statement, Sync.
    async fn prepare(&mut self, sql: &str) {
        let parse = [b"\0", sql.as_bytes(), b"\0\0\0"].concat();
        self.send(&[(b'P', &parse), (b'D', b"S\0"), (b'S', b"")])
            .await;
    }

    /// The second half: Bind (no parameters), Execute, Sync.
    async fn execute(&mut self) {
        self.send(&[(b'B', &[0; 8]), (b'E', &[0; 5]), (b'S', b"")])
            .await;
    }

    /// Reads messages up to ReadyForQuery: their types, or the SQLSTATE of an error.
    async fn until_ready(&mut self) -> Result<Vec<u8>, String> {
        use tokio::io::AsyncReadExt;
        let mut kinds = Vec::new();
        loop {
            let mut header = [0u8; 5];
            if self.0.read_exact(&mut header).await.is_err() {
                return Err("closed".into());
            }
            let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
            let mut body = vec![0u8; len - 4];
            self.0.read_exact(&mut body).await.expect("body");
            match header[0] {
                b'E' => {
                    let text = String::from_utf8_lossy(&body).into_owned();
                    return Err(text);
                }
                b'Z' => return Ok(kinds),
                k => kinds.push(k),
            }
        }
    }
}

/// tokio-postgres' `execute(sql, params)` prepares (Parse, Describe, Sync), waits for the
/// answer, then binds and executes. Between the two the session is idle, but its client is
/// about to send: the drain's quiet rule must not close it there (it closes a session idle
/// since before the drain at once), only after the execute, at the boundary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_between_a_prepare_and_its_execute_is_closed_only_after_the_execute() {
    let s = Setup::new(2).await;
    let proxy = routed_proxy(&s, &["--drain-timeout", "20s", "--hold-timeout", "30s"]).await;
    let mut idle = Raw::connect(&proxy).await;
    idle.send(&[(b'Q', b"select 1\0")]).await;
    idle.until_ready().await.expect("select");
    let mut prepared = Raw::connect(&proxy).await;
    prepared.prepare("insert into t values (7)").await;
    prepared.until_ready().await.expect("prepared");

    drain_to_none(&s, 2).await;
    // The idle session is closed the moment the drain reaches the proxy...
    let closed = idle.until_ready().await.expect_err("closed by the drain");
    assert!(closed.contains("57P01"), "{closed}");
    // ...and the prepared one, idle as long, is still there for its execute.
    prepared.execute().await;
    let kinds = prepared
        .until_ready()
        .await
        .unwrap_or_else(|e| panic!("the execute ran: {e}\n{}", proxy.log_text()));
    assert_eq!(kinds, vec![b'2', b'C'], "BindComplete, CommandComplete");
    let after = prepared.until_ready().await.expect_err("closed after it");
    assert!(after.contains("57P01"), "{after}");
    wait_reported(&s, &proxy, 2).await;
    assert_eq!(rows(&s.pgs[0]).await, vec![7], "the insert committed");
}
