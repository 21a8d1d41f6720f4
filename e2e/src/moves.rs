//! What the session-move tests share (issue 20): a cluster whose keepers keep the proxies'
//! auth role, the role alice, and a proxy (p2) that terminates sessions and authenticates
//! its clients, with its metrics; and the helpers to read them.

use crate::{sql, Cluster, Opts};
use std::time::Duration;
use testkit::free_port;

pub const MIN: Duration = Duration::from_secs(60);

pub async fn as_alice(port: u16) -> anyhow::Result<tokio_postgres::Client> {
    sql::connect_as(
        "127.0.0.1",
        port,
        "alice",
        "alice-pw",
        Duration::from_secs(5),
    )
    .await
}

pub async fn server_port(c: &tokio_postgres::Client) -> u16 {
    let row = c
        .query_one("SELECT inet_server_port()", &[])
        .await
        .expect("port");
    u16::try_from(row.get::<_, i32>(0)).expect("a port")
}

pub async fn metrics(port: u16) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("metrics");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .expect("ask");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

pub fn count(text: &str, result: &str) -> u64 {
    counter(text, "stolon_proxy_session_moves_total", result)
}

/// `stolon_proxy_session_move_prepared_total` for `result` (used, discarded, refused).
pub fn prepared(text: &str, result: &str) -> u64 {
    counter(text, "stolon_proxy_session_move_prepared_total", result)
}

/// A counter labelled by `result` in a metrics page (0 when absent).
fn counter(text: &str, name: &str, result: &str) -> u64 {
    let want = format!("{name}{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&want))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A cluster of two keepers keeping the proxies' auth role, the role alice on it, and a
/// second proxy (p2) terminating sessions and authenticating clients, with its metrics.
pub struct Movable {
    pub c: Cluster,
    /// p2's client port and metrics port.
    pub port: u16,
    pub metrics: u16,
    _metrics: testkit::PortGuard,
    pub dir: tempfile::TempDir,
}

impl Movable {
    pub async fn start() -> Movable {
        Movable::start_with(2, Vec::new()).await
    }

    /// `keepers` keepers; p2 gets `extra` flags besides terminate, auth and metrics.
    pub async fn start_with(keepers: usize, extra: Vec<String>) -> Movable {
        let dir = tempfile::tempdir().expect("dir");
        let pw = dir.path().join("auth.pw");
        std::fs::write(&pw, "auth-secret\n").expect("pw");
        let pw = pw.display().to_string();
        let auth = vec![
            "--pg-auth-username".to_string(),
            "proxyauth".into(),
            "--pg-auth-passwordfile".into(),
            pw.clone(),
        ];
        let mut c = Cluster::start(Opts {
            keepers,
            keeper_args: vec![auth; keepers],
            ..Default::default()
        })
        .await
        .expect("cluster");
        c.exec_via_proxy("CREATE ROLE alice LOGIN PASSWORD 'alice-pw'")
            .await
            .expect("alice");
        let metrics = free_port();
        c.add_proxy_with(
            "p2",
            vec![
                "--client-tls".into(),
                "terminate".into(),
                "--auth-user".into(),
                "proxyauth".into(),
                "--auth-passwordfile".into(),
                pw,
                "--metrics-listen-address".into(),
                format!("127.0.0.1:{}", metrics.0),
            ]
            .into_iter()
            .chain(extra)
            .collect(),
        )
        .expect("proxy");
        let port = c.proxy_addr(1).1;
        c.wait_for("alice through the proxy", MIN, async || {
            as_alice(port).await.ok()
        })
        .await
        .expect("alice");
        Movable {
            c,
            port,
            metrics: metrics.0,
            _metrics: metrics,
            dir,
        }
    }

    /// Waits until keeper `uid`'s PostgreSQL has the role alice (replicated).
    pub async fn wait_alice_on(&self, uid: &str) {
        self.c
            .wait_for("alice on the standby", MIN, async || {
                let sql = "SELECT count(*)::text FROM pg_roles WHERE rolname = 'alice'";
                let n = self.c.query(uid, sql).await.ok()?;
                (n == "1").then_some(())
            })
            .await
            .expect("replicated");
    }

    /// The standby that a switchover will promote, once it has replayed everything so far.
    pub async fn target(&self) -> String {
        let m = self.c.master().await.expect("master");
        let target = self.c.others(&m).first().expect("a standby").clone();
        self.wait_alice_on(&target).await;
        target
    }

    pub fn switchover(&self, target: &str) {
        let out = self.c.ctl(&["switchover", "--to", target, "--wait"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A histogram's sum and count in a metrics page.
pub fn histogram(text: &str, name: &str) -> (f64, u64) {
    let value = |suffix: &str| {
        let want = format!("{name}_{suffix} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&want))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (value("sum"), value("count") as u64)
}

/// The mean time a move took once its new server was routed, in ms, and how many moves.
pub fn move_after_route_ms(text: &str) -> (f64, u64) {
    let (sum, n) = histogram(text, "stolon_proxy_session_move_after_route_seconds");
    (if n == 0 { 0.0 } else { sum * 1000.0 / n as f64 }, n)
}
