//! The proxy's own cancel keys (issue 19, point 3), with real etcd, PostgreSQL and proxy
//! binaries: a client sees a key the proxy minted (not its server's), a cancel with it
//! cancels that session's query, through the proxy that owns it or through another proxy
//! of the cluster (forwarded to the owner), and leads nowhere once the session has ended.

mod common;

use common::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A session spoken by hand, to see its BackendKeyData.
struct Raw {
    sock: TcpStream,
    key: Vec<u8>,
}

fn message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind];
    m.extend(((body.len() + 4) as u32).to_be_bytes());
    m.extend(body);
    m
}

async fn read_message(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut header = [0u8; 5];
    s.read_exact(&mut header).await.expect("header");
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body).await.expect("body");
    (header[0], body)
}

impl Raw {
    async fn connect(port: u16) -> Raw {
        let mut sock = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let body = b"user\0postgres\0database\0postgres\0\0";
        let mut startup = ((8 + body.len()) as u32).to_be_bytes().to_vec();
        startup.extend(196_608u32.to_be_bytes());
        startup.extend(body);
        sock.write_all(&startup).await.expect("startup");
        let mut key = Vec::new();
        loop {
            match read_message(&mut sock).await {
                (b'K', body) => key = body,
                (b'Z', _) => break,
                (b'E', body) => panic!("refused: {}", String::from_utf8_lossy(&body)),
                _ => {}
            }
        }
        Raw { sock, key }
    }

    fn pid(&self) -> u32 {
        u32::from_be_bytes([self.key[0], self.key[1], self.key[2], self.key[3]])
    }

    /// Runs `sql`: the first column of its first row, or the SQLSTATE of its error.
    async fn query(&mut self, sql: &str) -> Result<String, String> {
        let mut q = sql.as_bytes().to_vec();
        q.push(0);
        self.sock
            .write_all(&message(b'Q', &q))
            .await
            .expect("query");
        let mut result = Ok(String::new());
        loop {
            match read_message(&mut self.sock).await {
                (b'D', body) => {
                    let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]) as usize;
                    result = Ok(String::from_utf8_lossy(&body[6..6 + len]).into_owned());
                }
                (b'E', body) => {
                    let code = body
                        .split(|&b| b == 0)
                        .find(|f| f.first() == Some(&b'C'))
                        .map(|f| String::from_utf8_lossy(&f[1..]).into_owned());
                    result = Err(code.unwrap_or_default());
                }
                (b'Z', _) => return result,
                _ => {}
            }
        }
    }
}

/// A CancelRequest for `key`, sent to `port`; waits until the proxy closes.
async fn cancel(port: u16, key: &[u8]) {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut p = ((8 + key.len()) as u32).to_be_bytes().to_vec();
    p.extend(80_877_102u32.to_be_bytes());
    p.extend(key);
    s.write_all(&p).await.expect("cancel");
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut sink)).await;
}

fn cancels(proxy: &Proxy, result: &str) -> f64 {
    let (_, body) = proxy.http_get("/metrics");
    let name = format!("stolon_proxy_cancel_requests_total{{result=\"{result}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&name))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Runs pg_sleep on `raw` in a task, waits until PostgreSQL runs it, then cancels with
/// `key` through `port`: the query's outcome.
async fn sleep_and_cancel(s: &Setup, mut raw: Raw, port: u16) -> Result<String, String> {
    let key = raw.key.clone();
    let sleeper = tokio::spawn(async move { raw.query("select pg_sleep(60)").await });
    let direct = connect(&s.pgs[0].conninfo()).await.expect("direct");
    let running = wait_for(Duration::from_secs(10), || async {
        direct
            .query_one(
                "select count(*) from pg_stat_activity where query = 'select pg_sleep(60)' and state = 'active'",
                &[],
            )
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) == 1)
    })
    .await;
    assert!(running, "the query runs");
    cancel(port, &key).await;
    tokio::time::timeout(Duration::from_secs(20), sleeper)
        .await
        .expect("the query ended")
        .expect("task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sees_a_minted_key_that_cancels_its_query() {
    let s = Setup::new(1).await;
    let proxy = spawn_routed(&s, &[]).await;
    let mut raw = Raw::connect(proxy.port.0).await;
    let real_pid: u32 = raw
        .query("select pg_backend_pid()")
        .await
        .expect("pid")
        .parse()
        .expect("number");
    assert_ne!(raw.pid(), real_pid, "the server's key is not shown");
    assert!(raw.pid() & 0x8000_0000 != 0, "a minted key names its owner");
    let outcome = sleep_and_cancel(&s, raw, proxy.port.0).await;
    assert_eq!(outcome, Err("57014".to_string()), "query_canceled");
    assert_eq!(cancels(&proxy, "local"), 1.0);

    // Once the session has ended, its key leads nowhere.
    let raw = Raw::connect(proxy.port.0).await;
    let old = raw.key.clone();
    drop(raw);
    let ended = wait_for(Duration::from_secs(10), || async {
        cancel(proxy.port.0, &old).await;
        cancels(&proxy, "ended") >= 1.0
    })
    .await;
    assert!(ended, "{}", proxy.http_get("/metrics").1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_that_reaches_another_proxy_is_forwarded_to_the_owner() {
    let s = Setup::new(1).await;
    s.route_to("db0", &["p1", "p2"], 1).await;
    let p1 = Proxy::spawn(&s.etcd, "p1", &[]);
    let p2 = Proxy::spawn(&s.etcd, "p2", &[]);
    assert!(wait_routed(&p1, s.pgs[0].port()).await, "{}", p1.log_text());
    assert!(wait_routed(&p2, s.pgs[0].port()).await, "{}", p2.log_text());
    // p1 publishes where it takes cancels.
    let info = proxy_info(&s.store, "p1").await.expect("p1 info");
    assert_eq!(info.cancel_address, format!("127.0.0.1:{}", p1.port.0));

    let raw = Raw::connect(p1.port.0).await;
    assert_eq!(raw.pid(), info.cancel_id);
    let outcome = sleep_and_cancel(&s, raw, p2.port.0).await;
    assert_eq!(outcome, Err("57014".to_string()));
    assert_eq!(cancels(&p2, "peer"), 1.0);
    assert_eq!(cancels(&p1, "local"), 1.0);
}
