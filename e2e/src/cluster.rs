//! A cluster of real processes: etcd (one member or three), keepers with PostgreSQL,
//! sentinels and proxies, each writing its log to the cluster's directory. With
//! `Opts::netns` every process runs in its own network namespace ("host"), so a scenario
//! can cut or isolate any of them. Every process is stopped by PID when the cluster drops;
//! a failing test keeps the directory with every log and prints where it is.

use crate::sql;
use anyhow::{bail, Context, Result};
use control::model::ClusterData;
use control::store::etcd::{EtcdConfig, EtcdStore};
use control::store::timed::Timed;
use control::store::{CasOutcome, ClusterStore, Store};
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use testkit::etcd::EtcdCluster;
use testkit::netns::{Host, Net};
use testkit::{free_port, ChildGuard, Etcd, PortGuard};

pub const CLUSTER: &str = "e2e";

/// What to start. `spec` is merged over the suite's short timings (`base_spec`).
pub struct Opts {
    pub keepers: usize,
    pub sentinels: usize,
    pub proxies: usize,
    pub spec: Value,
    pub netns: bool,
    pub etcd_members: usize,
    /// Extra flags for keeper i (0-based). `NO_PASSWORD_FILES` among them drops the
    /// default `--pg-su-passwordfile` and `--pg-repl-passwordfile`.
    pub keeper_args: Vec<Vec<String>>,
    /// Environment for every process.
    pub env: Vec<(String, String)>,
}

/// In `Opts::keeper_args`: start that keeper without the default password files.
pub const NO_PASSWORD_FILES: &str = "--e2e-no-password-files";

impl Default for Opts {
    fn default() -> Self {
        Opts {
            keepers: 3,
            sentinels: 1,
            proxies: 1,
            spec: json!({}),
            netns: false,
            etcd_members: 1,
            keeper_args: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// The suite's timings: sleepInterval 1 s, failInterval 5 s, proxies checked every second
/// and expired after 3 s; fsync off (tests kill processes, durability is not under test).
/// With `STOLON_E2E_FAILSAFE=1` every scenario runs with spec `failsafeMode` on
/// (`scripts/test.sh --long` runs the partition and failover suites so).
pub fn base_spec() -> Value {
    json!({
        "initMode": "new",
        "sleepInterval": "1s",
        "failInterval": "5s",
        "convergenceTimeout": "30s",
        "proxyCheckInterval": "1s",
        "proxyTimeout": "3s",
        "failsafeMode": crate::failsafe_on(),
        "pgParameters": {"fsync": "off", "max_wal_senders": "10"}
    })
}

fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

pub struct Keeper {
    pub uid: String,
    pub host: Option<Host>,
    /// The address PostgreSQL listens on (loopback, or the host's address).
    pub addr: String,
    pub port: u16,
    _port: PortGuard,
    /// The keeper's `--metrics-listen-address` port (metrics and health endpoints).
    pub metrics_port: u16,
    _metrics_port: PortGuard,
    pub dir: PathBuf,
    pub child: Option<ChildGuard>,
    pub args: Vec<String>,
}

pub struct Proc {
    pub name: String,
    pub host: Option<Host>,
    pub child: Option<ChildGuard>,
    pub args: Vec<String>,
    /// A proxy's client address and port.
    pub addr: String,
    pub port: u16,
    _port: Option<PortGuard>,
}

pub struct Cluster {
    pub dir: PathBuf,
    tmp: Option<tempfile::TempDir>,
    pub net: Option<Net>,
    /// One member, or three (`Opts::etcd_members`).
    pub etcd: EtcdCluster,
    pub store: ClusterStore,
    pub keepers: Vec<Keeper>,
    pub sentinels: Vec<Proc>,
    pub proxies: Vec<Proc>,
    pub spec: Value,
    pub env: Vec<(String, String)>,
}

/// Where the workspace's binaries are: `STOLON_BIN_DIR` if set (another build's, for a
/// before/after comparison), else next to this test binary's `deps/` directory, or next to
/// the running binary itself (the `loadtest` tool, built beside them).
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("STOLON_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("current exe");
    let own_dir = exe.parent().expect("exe dir");
    let dir = if own_dir.ends_with("deps") {
        own_dir.parent().expect("target dir")
    } else {
        own_dir
    };
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} missing: run cargo build --workspace --bins",
        p.display()
    );
    p
}

impl Cluster {
    /// Starts everything and waits until the master takes writes through the first proxy
    /// and every keeper's db is healthy; creates the checker's tables.
    pub async fn start(opts: Opts) -> Result<Cluster> {
        let c = Cluster::launch(&opts).await?;
        c.wait_healthy(Duration::from_secs(120)).await?;
        let (addr, port) = c.proxy_addr(0);
        // With synchronous replication the first commit also waits for a standby in sync.
        c.wait_for("the checker's tables", Duration::from_secs(90), async || {
            sql::exec(
                &addr,
                port,
                "CREATE TABLE IF NOT EXISTS e2e_acked (id bigint PRIMARY KEY);
                 CREATE TABLE IF NOT EXISTS e2e_probe (id bigserial, src text, at timestamptz DEFAULT now())",
                Duration::from_secs(5),
            )
            .await
            .ok()
        })
        .await?;
        Ok(c)
    }

    /// Starts the processes without waiting for a healthy cluster.
    pub async fn launch(opts: &Opts) -> Result<Cluster> {
        let tmp = testkit::temp_dir("e2e")?;
        let dir = tmp.path().to_path_buf();
        // The PostgreSQL OS user must reach the keeper dirs below.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        std::fs::write(dir.join("su.pw"), format!("{}\n", sql::SU_PASSWORD))?;
        std::fs::write(dir.join("repl.pw"), sql::REPL_PASSWORD)?;
        let mut spec = base_spec();
        merge(&mut spec, &opts.spec);
        std::fs::write(dir.join("spec.json"), spec.to_string())?;
        let net = if opts.netns {
            let mut names = vec!["etcd".to_string()];
            names.extend((1..=opts.keepers).map(|i| format!("k{i}")));
            names.extend((1..=opts.sentinels).map(|i| format!("s{i}")));
            names.extend((1..=opts.proxies).map(|i| format!("p{i}")));
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            Some(Net::new(&refs)?)
        } else {
            None
        };
        let etcd = match (&net, opts.etcd_members) {
            (Some(n), _) => EtcdCluster {
                members: vec![Etcd::start_in(n.host("etcd"))?],
            },
            (None, 1) => EtcdCluster {
                members: vec![Etcd::start()?],
            },
            (None, m) => EtcdCluster::start(m)?,
        };
        let endpoints = etcd.endpoints();
        let cfg = EtcdConfig {
            endpoints: endpoints.split(',').map(String::from).collect(),
            connect_timeout: Duration::from_secs(2),
            ..Default::default()
        };
        let s = EtcdStore::connect(&cfg).await?;
        let s: Arc<dyn Store> = Arc::new(Timed::new(s, Duration::from_secs(2)));
        let store = ClusterStore::new(s, "stolon/cluster", CLUSTER);
        let mut c = Cluster {
            dir,
            tmp: Some(tmp),
            net,
            etcd,
            store,
            keepers: Vec::new(),
            sentinels: Vec::new(),
            proxies: Vec::new(),
            spec,
            env: opts.env.clone(),
        };
        for i in 1..=opts.sentinels {
            c.add_sentinel(&format!("s{i}"))?;
        }
        for i in 1..=opts.keepers {
            let args = opts.keeper_args.get(i - 1).cloned().unwrap_or_default();
            c.add_keeper(&format!("k{i}"), args)?;
        }
        for i in 1..=opts.proxies {
            c.add_proxy(&format!("p{i}"))?;
        }
        Ok(c)
    }

    pub fn endpoints(&self) -> String {
        self.etcd.endpoints()
    }

    pub fn common_args(&self) -> Vec<String> {
        vec![
            "--cluster-name".into(),
            CLUSTER.into(),
            "--store-endpoints".into(),
            self.endpoints(),
            "--log-level".into(),
            "debug".into(),
        ]
    }

    fn host(&self, name: &str) -> Option<Host> {
        self.net.as_ref().map(|n| n.host(name).clone())
    }

    /// The address a process on `host` listens on.
    fn listen_addr(host: &Option<Host>) -> String {
        host.as_ref()
            .map(|h| h.ip.to_string())
            .unwrap_or_else(|| "127.0.0.1".into())
    }

    /// Spawns `program` (in `host`'s namespace if any), appending to `<name>.log`.
    pub fn spawn(
        &self,
        name: &str,
        host: &Option<Host>,
        program: &Path,
        args: &[String],
    ) -> Result<ChildGuard> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))?;
        let mut cmd = match host {
            Some(h) => h.command(program),
            None => Command::new(program),
        };
        cmd.args(args)
            .env("PG_BIN_PATH", testkit::postgres::pg_bin_dir())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        Ok(ChildGuard::spawn(name, &mut cmd)?)
    }

    pub fn add_sentinel(&mut self, name: &str) -> Result<()> {
        self.add_sentinel_with(name, Vec::new())
    }

    /// A sentinel with extra flags (a metrics listener).
    pub fn add_sentinel_with(&mut self, name: &str, extra: Vec<String>) -> Result<()> {
        let host = self.host(name);
        let mut args = self.common_args();
        args.extend(extra);
        args.extend([
            "--uid".into(),
            name.into(),
            "--leader-ttl".into(),
            "3s".into(),
        ]);
        args.push("--initial-cluster-spec".into());
        args.push(self.dir.join("spec.json").display().to_string());
        let child = self.spawn(name, &host, &bin("stolon-sentinel"), &args)?;
        self.sentinels.push(Proc {
            name: name.into(),
            host,
            child: Some(child),
            args,
            addr: String::new(),
            port: 0,
            _port: None,
        });
        Ok(())
    }

    pub fn add_proxy(&mut self, name: &str) -> Result<()> {
        self.add_proxy_with(name, Vec::new())
    }

    /// A proxy with extra flags (the read-only listener's).
    pub fn add_proxy_with(&mut self, name: &str, extra: Vec<String>) -> Result<()> {
        let host = self.host(name);
        let port = free_port();
        let addr = Self::listen_addr(&host);
        let mut args = self.common_args();
        args.extend([
            "--uid".into(),
            name.into(),
            "--listen-address".into(),
            addr.clone(),
            "--port".into(),
            port.0.to_string(),
        ]);
        args.extend(extra);
        let child = self.spawn(name, &host, &bin("stolon-proxy"), &args)?;
        self.proxies.push(Proc {
            name: name.into(),
            host,
            child: Some(child),
            args,
            addr,
            port: port.0,
            _port: Some(port),
        });
        Ok(())
    }

    pub fn add_keeper(&mut self, uid: &str, extra: Vec<String>) -> Result<()> {
        let host = self.host(uid);
        let port = free_port();
        let metrics = free_port();
        let addr = Self::listen_addr(&host);
        let dir = self.dir.join(uid);
        let mut args = self.common_args();
        args.extend([
            "--uid".into(),
            uid.into(),
            "--pg-listen-address".into(),
            addr.clone(),
            "--pg-port".into(),
            port.0.to_string(),
            "--data-dir".into(),
            dir.display().to_string(),
            "--metrics-listen-address".into(),
            format!("{addr}:{}", metrics.0),
        ]);
        if !extra.iter().any(|a| a == NO_PASSWORD_FILES) {
            args.extend([
                "--pg-su-passwordfile".into(),
                self.dir.join("su.pw").display().to_string(),
                "--pg-repl-passwordfile".into(),
                self.dir.join("repl.pw").display().to_string(),
            ]);
        }
        args.extend(extra.into_iter().filter(|a| a != NO_PASSWORD_FILES));
        let child = self.spawn(uid, &host, &bin("stolon-keeper"), &args)?;
        self.keepers.push(Keeper {
            uid: uid.into(),
            host,
            addr,
            port: port.0,
            _port: port,
            metrics_port: metrics.0,
            _metrics_port: metrics,
            dir,
            child: Some(child),
            args,
        });
        Ok(())
    }

    /// Every keeper but `master` (its standbys in a healthy cluster).
    pub fn others(&self, master: &str) -> Vec<String> {
        self.keepers
            .iter()
            .map(|k| k.uid.clone())
            .filter(|u| u != master)
            .collect()
    }

    pub fn keeper(&self, uid: &str) -> &Keeper {
        self.keepers
            .iter()
            .find(|k| k.uid == uid)
            .unwrap_or_else(|| panic!("no keeper {uid}"))
    }

    fn keeper_mut(&mut self, uid: &str) -> &mut Keeper {
        self.keepers
            .iter_mut()
            .find(|k| k.uid == uid)
            .unwrap_or_else(|| panic!("no keeper {uid}"))
    }

    pub fn proxy_addr(&self, i: usize) -> (String, u16) {
        (self.proxies[i].addr.clone(), self.proxies[i].port)
    }

    pub fn pg_addr(&self, uid: &str) -> (String, u16) {
        let k = self.keeper(uid);
        (k.addr.clone(), k.port)
    }

    pub async fn data(&self) -> Option<(ClusterData, i64)> {
        self.store.get_cluster_data().await.ok().flatten()
    }

    /// The keeper whose db the proxies route to now.
    pub async fn master(&self) -> Option<String> {
        let (cd, _) = self.data().await?;
        let db = cd.dbs.get(&cd.proxy.spec.master_db_uid)?;
        Some(db.spec.keeper_uid.clone())
    }

    /// Waits until there is a routed master; returns its keeper.
    pub async fn wait_master(&self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(m) = self.master().await {
                return Ok(m);
            }
            if Instant::now() > deadline {
                bail!("no master within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the master is `expected`... or any other than `not` (when `expected` is
    /// None); returns it.
    pub async fn wait_master_change(&self, not: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.master().await {
                Some(m) if m != not => return Ok(m),
                _ => {}
            }
            if Instant::now() > deadline {
                bail!("the master is still {not} (or none) after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The postmaster PID of a keeper's PostgreSQL.
    pub fn postmaster_pid(&self, uid: &str) -> Option<i32> {
        let text =
            std::fs::read_to_string(self.keeper(uid).dir.join("postgres/postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// The PID of one of a keeper's PostgreSQL auxiliary processes, by its title
    /// (`startup`, `walreceiver`, ...).
    pub fn pg_process(&self, uid: &str, title: &str) -> Option<i32> {
        let pm = self.postmaster_pid(uid)?;
        let prefix = format!("postgres: {title}");
        for e in std::fs::read_dir("/proc").ok()?.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<i32>().ok());
            let cmd = std::fs::read_to_string(e.path().join("cmdline")).unwrap_or_default();
            if ppid == Some(pm) && cmd.starts_with(&prefix) {
                return Some(pid);
            }
        }
        None
    }

    /// Sends `sig` to a keeper and, with `pg`, to its PostgreSQL (the postmaster's process
    /// group: every backend).
    pub fn signal_keeper(&self, uid: &str, sig: Signal, pg: bool) -> Result<()> {
        if pg {
            if let Some(pid) = self.postmaster_pid(uid) {
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), sig);
            }
        }
        if let Some(c) = &self.keeper(uid).child {
            c.signal(sig)?;
        }
        Ok(())
    }

    /// kill -9 of a keeper and, with `pg`, of its PostgreSQL at the same moment.
    pub fn kill_keeper(&mut self, uid: &str, pg: bool) {
        let pm = self.postmaster_pid(uid);
        if let (true, Some(pid)) = (pg, pm) {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
        if let Some(mut c) = self.keeper_mut(uid).child.take() {
            c.kill();
        }
    }

    /// kill -9 of a keeper's PostgreSQL alone (every process of it).
    pub fn crash_postgres(&self, uid: &str) -> Result<()> {
        let pid = self.postmaster_pid(uid).context("no postmaster.pid")?;
        nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL)?;
        Ok(())
    }

    /// Starts a stopped keeper again with its flags and data dir.
    pub fn restart_keeper(&mut self, uid: &str) -> Result<()> {
        self.restart_keeper_with(uid, |_| {})
    }

    /// Starts a keeper again (stopping it first if it runs) with its flags changed by `f`.
    pub fn restart_keeper_with(
        &mut self,
        uid: &str,
        f: impl FnOnce(&mut Vec<String>),
    ) -> Result<()> {
        let (host, args) = {
            let k = self.keeper_mut(uid);
            f(&mut k.args);
            (k.host.clone(), k.args.clone())
        };
        // The old keeper goes first, and its data dir lock with it: started while the old
        // one (or its fencing watchdog) still held the lock, the new keeper exits at once.
        if let Some(mut old) = self.keeper_mut(uid).child.take() {
            old.kill();
        }
        wait_lock_free(&self.keeper(uid).dir.join("keeper.lock"));
        let child = self.spawn(uid, &host, &bin("stolon-keeper"), &args)?;
        self.keeper_mut(uid).child = Some(child);
        Ok(())
    }

    /// Changes the port a keeper's PostgreSQL listens on (applied by restart_keeper).
    pub fn move_keeper_port(&mut self, uid: &str) -> u16 {
        let port = free_port();
        let k = self.keeper_mut(uid);
        let p = port.0;
        if let Some(i) = k.args.iter().position(|a| a == "--pg-port") {
            k.args[i + 1] = p.to_string();
        }
        k.port = p;
        k._port = port;
        p
    }

    pub fn keeper_log(&self, uid: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{uid}.log"))).unwrap_or_default()
    }

    pub fn log(&self, name: &str) -> String {
        self.keeper_log(name)
    }

    /// The db the cluster view gives keeper `uid`.
    pub async fn db_of(&self, uid: &str) -> Option<control::model::Db> {
        let (cd, _) = self.data().await?;
        cd.dbs.into_values().find(|d| d.spec.keeper_uid == uid)
    }

    /// Runs `sql` on keeper `uid`'s PostgreSQL and returns the first column as text.
    pub async fn query(&self, uid: &str, sql: &str) -> Result<String> {
        let (addr, port) = self.pg_addr(uid);
        sql::query_text(&addr, port, sql).await
    }

    /// Runs statements on the current master through the first running proxy.
    pub async fn exec_via_proxy(&self, sql: &str) -> Result<()> {
        let i = self
            .proxies
            .iter()
            .position(|p| p.child.is_some())
            .context("no proxy runs")?;
        let (addr, port) = self.proxy_addr(i);
        sql::exec(&addr, port, sql, Duration::from_secs(60)).await
    }

    /// Polls `f` every 100 ms until it yields, or fails after `timeout` saying `what`.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl AsyncFnMut() -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f().await {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("timed out after {timeout:?} waiting for {what}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn proc_mut(&mut self, name: &str) -> &mut Proc {
        self.sentinels
            .iter_mut()
            .chain(self.proxies.iter_mut())
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no process {name}"))
    }

    pub fn signal(&mut self, name: &str, sig: Signal) -> Result<()> {
        if let Some(c) = &self.proc_mut(name).child {
            c.signal(sig)?;
        }
        Ok(())
    }

    pub fn kill(&mut self, name: &str) {
        if let Some(mut c) = self.proc_mut(name).child.take() {
            c.kill();
        }
    }

    pub fn restart(&mut self, name: &str) -> Result<()> {
        let (host, args) = {
            let p = self.proc_mut(name);
            (p.host.clone(), p.args.clone())
        };
        let program = if name.starts_with('p') {
            bin("stolon-proxy")
        } else {
            bin("stolon-sentinel")
        };
        let child = self.spawn(name, &host, &program, &args)?;
        if let Some(mut old) = self.proc_mut(name).child.replace(child) {
            old.kill();
        }
        Ok(())
    }

    /// Runs stolonctl against this cluster.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(bin("stolonctl"))
            .args([
                "--cluster-name",
                CLUSTER,
                "--store-endpoints",
                &self.endpoints(),
            ])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("stolonctl")
    }

    /// Changes the cluster spec with a compare-and-swap, retrying when the sentinel wrote
    /// in between.
    pub async fn update_spec(&self, f: impl Fn(&mut Value)) -> Result<()> {
        for _ in 0..100 {
            let (mut cd, rev) = self.data().await.context("no clusterdata")?;
            let mut spec = serde_json::to_value(&cd.cluster.spec)?;
            f(&mut spec);
            cd.cluster.spec = serde_json::from_value(spec)?;
            if let Ok(CasOutcome::Written(_)) = self.store.put_cluster_data(&cd, rev, None).await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("could not update the spec")
    }

    /// Prints the warnings, errors and last lines of every log (for a failing test).
    pub fn dump_logs(&self) {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        for k in &self.keepers {
            logs.push(k.dir.join("postgres.log"));
        }
        for p in logs {
            let Ok(text) = std::fs::read_to_string(&p) else {
                continue;
            };
            eprintln!("==== {} (errors)", p.display());
            let bad = ["WARN", "ERROR", "PANIC", "FATAL"];
            for l in text
                .lines()
                .filter(|l| bad.iter().any(|b| l.contains(b)))
                .take(30)
            {
                eprintln!("{l}");
            }
            eprintln!("==== {} (last 25 lines)", p.display());
            let tail: Vec<&str> = text.lines().rev().take(25).collect();
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Processes first (their guards kill by PID), then the namespaces.
        for k in &mut self.keepers {
            if let Some(mut c) = k.child.take() {
                c.stop(Duration::from_secs(3));
            }
        }
        self.proxies.clear();
        self.sentinels.clear();
        let keep = std::env::var_os("E2E_KEEP").is_some();
        if std::thread::panicking() {
            self.dump_logs();
        }
        if std::thread::panicking() || keep {
            if let Some(t) = self.tmp.take() {
                let kept = t.keep();
                eprintln!("logs of every process kept in {}", kept.display());
            }
        }
    }
}

/// Waits (up to 10 s) until no process holds a keeper's data dir lock.
fn wait_lock_free(path: &Path) {
    use nix::fcntl::{Flock, FlockArg};
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let Ok(file) = std::fs::File::open(path) else {
            return;
        };
        if Flock::lock(file, FlockArg::LockExclusiveNonblock).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
