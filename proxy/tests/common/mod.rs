//! A test cluster for the proxy: real etcd, real PostgreSQL instances, a hand-written
//! clusterdata, and the `stolon-proxy` binary as a child process.
#![allow(dead_code)]

pub mod authdb;
pub mod pki;

use control::model::{ClusterData, ProxyInfo};
use control::store::etcd::{EtcdConfig, EtcdStore};
use control::store::timed::Timed;
use control::store::{CasOutcome, ClusterStore, Store};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use testkit::{free_port, ChildGuard, Etcd, PortGuard, Postgres};
use tokio_postgres::NoTls;

pub const CLUSTER: &str = "t";

pub struct Proxy {
    pub child: ChildGuard,
    pub port: PortGuard,
    pub metrics_port: PortGuard,
    pub uid: String,
    pub log: tempfile::NamedTempFile,
}

impl Proxy {
    pub fn spawn(etcd: &Etcd, uid: &str, extra: &[&str]) -> Proxy {
        Proxy::spawn_env(etcd, uid, extra, &[])
    }

    /// `spawn` with environment variables (a fault to inject, say).
    pub fn spawn_env(etcd: &Etcd, uid: &str, extra: &[&str], env: &[(&str, &str)]) -> Proxy {
        let port = free_port();
        let metrics_port = free_port();
        let log = tempfile::NamedTempFile::new().expect("log file");
        let mut cmd = proxy_command(etcd, uid, port.0, &log);
        cmd.args(["--log-level", "debug", "--store-timeout", "1s"])
            .args([
                "--metrics-listen-address",
                &format!("127.0.0.1:{}", metrics_port.0),
            ])
            .args(extra);
        // The refusal tests want refusals at once: no hold unless a test asks for one.
        if !extra.contains(&"--hold-timeout") {
            cmd.args(["--hold-timeout", "0"]);
        }
        cmd.envs(env.iter().copied());
        let child = ChildGuard::spawn("stolon-proxy", &mut cmd).expect("spawn proxy");
        Proxy {
            child,
            port,
            metrics_port,
            uid: uid.into(),
            log,
        }
    }

    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=5",
            self.port.0
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    pub async fn connect(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        connect(&self.conninfo()).await
    }

    pub fn http_get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port.0)) else {
            return (0, String::new());
        };
        let _ = write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let code = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (code, out)
    }
}

/// The stolon-proxy command for this test cluster on `port`, logging to `log`.
pub fn proxy_command(etcd: &Etcd, uid: &str, port: u16, log: &tempfile::NamedTempFile) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stolon-proxy"));
    cmd.args([
        "--cluster-name",
        CLUSTER,
        "--store-endpoints",
        &etcd.endpoint(),
    ])
    .args(["--port", &port.to_string(), "--uid", uid])
    .stdin(Stdio::null())
    .stdout(log.reopen().expect("log"))
    .stderr(log.reopen().expect("log"));
    cmd
}

pub async fn connect(conninfo: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(conninfo, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

pub async fn open_store(etcd: &Etcd) -> ClusterStore {
    let cfg = EtcdConfig {
        endpoints: vec![etcd.endpoint()],
        connect_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let store: Arc<dyn Store> = Arc::new(Timed::new(
        EtcdStore::connect(&cfg).await.expect("connect"),
        Duration::from_secs(2),
    ));
    ClusterStore::new(store, "stolon/cluster", CLUSTER)
}

/// A clusterdata naming `master` (a db UID or "") among `dbs` (UID, port), with short proxy
/// timings (check 500ms, timeout 3s).
pub fn clusterdata(
    master: &str,
    dbs: &[(&str, u16)],
    enabled: &[&str],
    generation: i64,
) -> ClusterData {
    let mut db_map = serde_json::Map::new();
    for (uid, port) in dbs {
        db_map.insert(
            uid.to_string(),
            serde_json::json!({"uid": uid, "spec": {"keeperUID": format!("k-{uid}"), "role": "standby"},
                "status": {"healthy": true, "listenAddress": "127.0.0.1", "port": port.to_string()}}),
        );
    }
    let doc = serde_json::json!({
        "formatVersion": 1,
        "cluster": {"uid": "c1", "generation": 1,
            "spec": {"initMode": "new", "proxyCheckInterval": "500ms", "proxyTimeout": "3s"},
            "status": {"phase": "normal", "master": master}},
        "dbs": db_map,
        "proxy": {"generation": generation, "spec": {"masterDbUid": master, "enabledProxies": enabled}}
    });
    ClusterData::from_json(doc.to_string().as_bytes()).expect("clusterdata")
}

/// Writes clusterdata (create or overwrite, compare-and-swap on the current revision).
pub async fn put_cd(store: &ClusterStore, cd: &ClusterData) -> i64 {
    loop {
        // The raw revision: the current document may be malformed on purpose.
        let key = store.clusterdata_key();
        let rev = store
            .store()
            .get(&key)
            .await
            .expect("get")
            .map_or(0, |kv| kv.mod_revision);
        if let CasOutcome::Written(r) = store.put_cluster_data(cd, rev, None).await.expect("put") {
            return r;
        }
    }
}

pub async fn proxy_info(store: &ClusterStore, uid: &str) -> Option<ProxyInfo> {
    store.proxy_infos().await.ok()?.items.remove(uid)
}

/// Polls `f` every 20 ms until it returns true or `limit` passes.
pub async fn wait_for<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Waits up to `limit` for a held session's task (see the hold and drain tests) to be
/// released and run its query; the port of the PostgreSQL it ran on.
pub async fn released_port(
    held: tokio::task::JoinHandle<Result<u16, tokio_postgres::Error>>,
    limit: Duration,
) -> u16 {
    tokio::time::timeout(limit, held)
        .await
        .expect("released")
        .expect("task")
        .expect("the held session's query, with no error")
}

/// The port of the PostgreSQL a client is connected to.
pub async fn server_port(client: &tokio_postgres::Client) -> Result<u16, tokio_postgres::Error> {
    let row = client
        .query_one("select current_setting('port')", &[])
        .await?;
    Ok(row.get::<_, String>(0).parse().unwrap_or(0))
}

pub struct Setup {
    pub etcd: Etcd,
    pub pgs: Vec<Postgres>,
    pub store: ClusterStore,
}

impl Setup {
    pub async fn new(n_pg: usize) -> Setup {
        let etcd = Etcd::start().expect("etcd");
        let pgs = (0..n_pg)
            .map(|_| Postgres::start(&[]).expect("postgres"))
            .collect();
        let store = open_store(&etcd).await;
        Setup { etcd, pgs, store }
    }

    pub fn dbs(&self) -> Vec<(String, u16)> {
        self.pgs
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("db{i}"), p.port()))
            .collect()
    }

    pub async fn route_to(&self, master: &str, enabled: &[&str], generation: i64) -> i64 {
        let dbs = self.dbs();
        let refs: Vec<(&str, u16)> = dbs.iter().map(|(u, p)| (u.as_str(), *p)).collect();
        put_cd(
            &self.store,
            &clusterdata(master, &refs, enabled, generation),
        )
        .await
    }
}

/// Routes the cluster to db0 (generation 1, proxy p1 enabled), starts proxy p1 with
/// `extra` flags and waits until it routes sessions there.
pub async fn spawn_routed(s: &Setup, extra: &[&str]) -> Proxy {
    s.route_to("db0", &["p1"], 1).await;
    let proxy = Proxy::spawn(&s.etcd, "p1", extra);
    assert!(
        wait_routed(&proxy, s.pgs[0].port()).await,
        "{}",
        proxy.log_text()
    );
    proxy
}

/// Waits (10 s at most) until the proxy's client port accepts connections.
pub async fn wait_listening(proxy: &Proxy) -> bool {
    wait_for(Duration::from_secs(10), || async { proxy_listens(proxy) }).await
}

/// Waits until the proxy accepts a session routed to `port`.
pub async fn wait_routed(proxy: &Proxy, port: u16) -> bool {
    wait_for(Duration::from_secs(15), || async {
        match proxy.connect().await {
            Ok(c) => server_port(&c).await.ok() == Some(port),
            Err(_) => false,
        }
    })
    .await
}

/// The SQLSTATE of a failed connection attempt.
pub async fn connect_error_code(proxy: &Proxy) -> Option<String> {
    match proxy.connect().await {
        Ok(_) => None,
        Err(e) => e.as_db_error().map(|d| d.code().code().to_string()),
    }
}

/// The client port accepts connections. /health can answer 200 a moment before the
/// listener threads have bound the port.
pub fn proxy_listens(proxy: &Proxy) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", proxy.port.0)).is_ok()
}

/// A sample of the proxy's /metrics with labels, by name and one `label="value"`.
pub fn labeled_metric(proxy: &Proxy, name: &str, label: &str) -> Option<f64> {
    let (_, body) = proxy.http_get("/metrics");
    let start = format!("{name}{{");
    body.lines()
        .find(|l| l.starts_with(&start) && l.contains(label))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

/// A sample of the proxy's /metrics, by name (no labels).
pub fn metric(proxy: &Proxy, name: &str) -> Option<f64> {
    let (_, body) = proxy.http_get("/metrics");
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Waits until the proxy has applied clusterdata generation `generation`.
pub async fn wait_applied(proxy: &Proxy, generation: i64) {
    assert!(
        wait_for(Duration::from_secs(15), || async {
            metric(proxy, "stolon_proxy_route_generation") == Some(generation as f64)
        })
        .await,
        "generation {generation} applied\n{}",
        proxy.log_text()
    );
}
