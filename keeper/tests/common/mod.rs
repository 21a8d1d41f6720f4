//! Shared helpers for the keeper tests: etcd, keeper and sentinel processes with their logs
//! in a temp dir, SQL through TCP, waiting with deadlines.
#![allow(dead_code)]

use control::model::{ClusterData, KeeperInfo};
use control::store::etcd::{EtcdConfig, EtcdStore};
use control::store::timed::Timed;
use control::store::{ClusterStore, Store};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use testkit::{free_port, ChildGuard, Etcd, PortGuard};

pub const CLUSTER: &str = "kt";
pub const SU_PASSWORD: &str = "su-secret";
pub const REPL_PASSWORD: &str = "repl-secret";

pub struct Env {
    pub etcd: Etcd,
    pub dir: tempfile::TempDir,
    pub store: ClusterStore,
}

pub struct KeeperProc {
    pub uid: String,
    pub port: PortGuard,
    pub dir: PathBuf,
    pub child: Option<ChildGuard>,
    pub log: PathBuf,
}

impl Env {
    pub async fn new() -> Env {
        let etcd = Etcd::start().expect("etcd");
        let dir = testkit::temp_dir("keeper").expect("tmp");
        // The PostgreSQL OS user must reach the keeper dirs below.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::write(dir.path().join("su.pw"), format!("{SU_PASSWORD}\n")).expect("pw");
        std::fs::write(dir.path().join("repl.pw"), REPL_PASSWORD).expect("pw");
        let cfg = EtcdConfig {
            endpoints: vec![etcd.endpoint()],
            connect_timeout: Duration::from_secs(2),
            ..Default::default()
        };
        let s = EtcdStore::connect(&cfg).await.expect("connect");
        let s: Arc<dyn Store> = Arc::new(Timed::new(s, Duration::from_secs(2)));
        let store = ClusterStore::new(s, "stolon/cluster", CLUSTER);
        Env { etcd, dir, store }
    }

    pub fn common_args(&self) -> Vec<String> {
        vec![
            "--cluster-name".into(),
            CLUSTER.into(),
            "--store-endpoints".into(),
            self.etcd.endpoint(),
            "--log-level".into(),
            "debug".into(),
        ]
    }

    fn log_file(&self, name: &str) -> (PathBuf, std::fs::File) {
        let path = self.dir.path().join(format!("{name}.log"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("log");
        (path, f)
    }

    pub fn keeper(&self, uid: &str, extra: &[&str]) -> KeeperProc {
        self.keeper_env(uid, extra, &[])
    }

    /// A keeper started with these environment variables set ("" removes one).
    pub fn keeper_env(&self, uid: &str, extra: &[&str], vars: &[(&str, &str)]) -> KeeperProc {
        let port = free_port();
        let dir = self.dir.path().join(uid);
        let mut k = KeeperProc {
            uid: uid.into(),
            port,
            dir,
            child: None,
            log: PathBuf::new(),
        };
        self.start_keeper_env(&mut k, extra, vars);
        k
    }

    pub fn start_keeper(&self, k: &mut KeeperProc, extra: &[&str]) {
        self.start_keeper_env(k, extra, &[]);
    }

    /// As `start_keeper`, with these environment variables set ("" removes one).
    pub fn start_keeper_env(&self, k: &mut KeeperProc, extra: &[&str], vars: &[(&str, &str)]) {
        let (log, f) = self.log_file(&k.uid);
        let mut cmd = self.keeper_command(k);
        for (name, value) in vars {
            if value.is_empty() {
                cmd.env_remove(name);
            } else {
                cmd.env(name, value);
            }
        }
        cmd.args(["--uid", &k.uid])
            .args(extra)
            .stdout(Stdio::from(f.try_clone().expect("log")))
            .stderr(Stdio::from(f));
        k.child = Some(ChildGuard::spawn(&k.uid, &mut cmd).expect("spawn keeper"));
        k.log = log;
    }

    /// The keeper binary with the common flags, `k`'s port and data dir, the password files
    /// and the PostgreSQL binaries; no uid (tests start keepers with or without one).
    pub fn keeper_command(&self, k: &KeeperProc) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stolon-keeper"));
        cmd.args(self.common_args())
            .args(["--pg-port", &k.port.0.to_string()])
            .arg("--data-dir")
            .arg(&k.dir)
            .arg("--pg-su-passwordfile")
            .arg(self.dir.path().join("su.pw"))
            .arg("--pg-repl-passwordfile")
            .arg(self.dir.path().join("repl.pw"))
            .env("PG_BIN_PATH", testkit::postgres::pg_bin_dir());
        cmd
    }

    pub fn sentinel(&self, spec_json: &str) -> ChildGuard {
        let spec = self.dir.path().join("spec.json");
        std::fs::write(&spec, spec_json).expect("spec");
        let (_, f) = self.log_file("sentinel");
        let mut cmd = Command::new(sentinel_bin());
        cmd.args(self.common_args())
            .args(["--leader-ttl", "3s"])
            .arg("--initial-cluster-spec")
            .arg(&spec)
            .stdout(Stdio::from(f.try_clone().expect("log")))
            .stderr(Stdio::from(f));
        ChildGuard::spawn("sentinel", &mut cmd).expect("spawn sentinel")
    }

    pub async fn cluster_data(&self) -> Option<(ClusterData, i64)> {
        self.store.get_cluster_data().await.ok().flatten()
    }

    pub async fn keeper_info(&self, uid: &str) -> Option<KeeperInfo> {
        self.store.keeper_infos().await.ok()?.items.remove(uid)
    }

    /// Prints the logs (for a failing test).
    pub fn dump_logs(&self) {
        for e in std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                eprintln!("==== {} (warnings and errors)", p.display());
                for l in text
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .take(40)
                {
                    eprintln!("{l}");
                }
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                eprintln!("==== {} (last 30 lines)", p.display());
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        for e in std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let pg = e.path().join("postgres.log");
            if let Ok(text) = std::fs::read_to_string(&pg) {
                eprintln!("==== {} (PANIC/FATAL/crash)", pg.display());
                for l in text
                    .lines()
                    .filter(|l| {
                        l.contains("PANIC")
                            || l.contains("FATAL")
                            || l.contains("terminated by")
                            || l.contains("crash")
                    })
                    .take(20)
                {
                    eprintln!("{l}");
                }
                eprintln!("==== {}", pg.display());
                for l in text
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                {
                    eprintln!("{l}");
                }
            }
        }
    }
}

impl Env {
    /// A stolon-proxy on a free port; returns its process and port.
    pub fn proxy(&self) -> (ChildGuard, PortGuard) {
        self.proxy_with(&[])
    }

    /// A stolon-proxy with extra flags.
    pub fn proxy_with(&self, extra: &[&str]) -> (ChildGuard, PortGuard) {
        let port = free_port();
        let (_, f) = self.log_file("proxy");
        let exe = PathBuf::from(env!("CARGO_BIN_EXE_stolon-keeper")).with_file_name("stolon-proxy");
        assert!(
            exe.exists(),
            "{} missing: cargo build --workspace --bins",
            exe.display()
        );
        let mut cmd = Command::new(exe);
        cmd.args(self.common_args())
            .args(["--port", &port.0.to_string(), "--uid", "p1"])
            .args(extra)
            .stdout(Stdio::from(f.try_clone().expect("log")))
            .stderr(Stdio::from(f));
        (
            ChildGuard::spawn("proxy", &mut cmd).expect("spawn proxy"),
            port,
        )
    }
}

/// The sentinel binary, built by cargo for the control crate's tests.
pub fn sentinel_bin() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_stolon-keeper")).with_file_name("stolon-sentinel");
    assert!(
        exe.exists(),
        "{} missing: cargo build --workspace --bins",
        exe.display()
    );
    exe
}

/// Connects as the superuser over TCP.
pub async fn connect(port: u16) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .user("postgres")
        .password(SU_PASSWORD)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(2));
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Polls `f` every 100 ms until it yields, or panics after `timeout` (dumping logs).
pub async fn wait_for<T>(
    _env: &Env,
    what: &str,
    timeout: Duration,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The postmaster PID from a keeper's data dir.
pub fn postmaster_pid(dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(dir.join("postgres/postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// True if a write commits on the PostgreSQL at `port`.
pub async fn can_write(port: u16) -> bool {
    match connect(port).await {
        Ok(c) => c
            .batch_execute("CREATE TABLE IF NOT EXISTS t (v int); INSERT INTO t VALUES (1)")
            .await
            .is_ok(),
        Err(_) => false,
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // A failing test shows what the processes said.
        if std::thread::panicking() {
            self.dump_logs();
        }
    }
}

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Held for a whole test: the tests of one binary run one at a time, since their timings
/// (fence deadlines, failIntervals) must not compete for 2 cores with each other.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// Sets one pgParameter in the cluster spec with a compare-and-swap, retrying when the
/// sentinel wrote in between.
pub async fn set_pg_parameter(env: &Env, name: &str, value: &str) {
    for _ in 0..50 {
        let (mut cd, rev) = env.cluster_data().await.expect("cd");
        cd.cluster
            .spec
            .pg_parameters
            .insert(name.into(), value.into());
        if let Ok(control::store::CasOutcome::Written(_)) =
            env.store.put_cluster_data(&cd, rev, None).await
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("could not update the spec");
}

/// Whether the PostgreSQL at `port` is a standby; `None` if it does not answer.
pub async fn in_recovery(port: u16) -> Option<bool> {
    let c = connect(port).await.ok()?;
    c.query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .ok()
        .map(|r| r.get(0))
}

/// Waits until the keeper's PostgreSQL runs as a primary: the cluster was initialised on it.
/// Init picks among the keepers it has seen alive, so a test that wants a given keeper as
/// its first master starts the others only after this.
pub async fn wait_primary(env: &Env, k: &KeeperProc, timeout: Duration) {
    wait_for(env, "the first master", timeout, async || {
        (in_recovery(k.port.0).await == Some(false)).then_some(())
    })
    .await;
}

/// `GET path` on `addr` (a keeper's or sentinel's metrics listener): the status code and the
/// whole response.
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, out))
}
