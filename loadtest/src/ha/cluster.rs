//! The cluster under the clients: e2e's real processes, stolon-proxy with its metrics
//! endpoint, and HAProxy checking each keeper's `/primary` (Patroni's HAProxy layout:
//! `option httpchk`, `on-marked-down shutdown-sessions`).

use super::clients::{Endpoint, Kind, Sample, Shared};
use super::report::Window;
use super::{committed, seen_by_target, Change, TARGETS};
use anyhow::{bail, Context, Result};
use control::store::ClusterStore;
use e2e::{Cluster, Opts};
use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use testkit::{free_port, ChildGuard, PortGuard};
use tokio_util::sync::CancellationToken;

/// Counts by target, or by target and kind of client.
pub type Counts = BTreeMap<String, usize>;

pub struct Env {
    pub c: Cluster,
    proxy_metrics: PortGuard,
    haproxy: Option<ChildGuard>,
    haproxy_port: PortGuard,
    _haproxy_dir: tempfile::TempDir,
}

/// Before a change, writes flow this long through both targets (the gap is measured from
/// the last commit before the change, so it needs commits there).
const BEFORE: Duration = Duration::from_secs(2);
/// After the cluster is healthy again, the window stays open this long.
const AFTER: Duration = Duration::from_secs(1);

/// `ha --tls`: a certificate PostgreSQL (as its OS user) and the proxy can read.
pub struct TlsSetup {
    dir: tempfile::TempDir,
}

impl TlsSetup {
    pub fn new() -> Result<TlsSetup> {
        use std::os::unix::fs::PermissionsExt;
        let dir = testkit::temp_dir("ha-tls")?;
        let files = testkit::TlsFiles::generate()?;
        std::fs::copy(&files.server_cert, dir.path().join("server.crt"))?;
        std::fs::copy(&files.server_key, dir.path().join("server.key"))?;
        std::fs::set_permissions(
            dir.path().join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        testkit::postgres::chown_to_pg_user(dir.path())?;
        Ok(TlsSetup { dir })
    }

    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// The spec with ssl on in every keeper's PostgreSQL.
    pub fn spec(&self, mut spec: serde_json::Value) -> serde_json::Value {
        if let Some(o) = spec.as_object_mut() {
            let params = o
                .entry("pgParameters")
                .or_insert_with(|| serde_json::json!({}));
            if let Some(p) = params.as_object_mut() {
                p.insert("ssl".into(), "on".into());
                p.insert("ssl_cert_file".into(), self.file("server.crt").into());
                p.insert("ssl_key_file".into(), self.file("server.key").into());
            }
        }
        spec
    }

    /// stolon-proxy terminates the clients' TLS with the same certificate.
    fn proxy_flags(&self) -> Vec<String> {
        vec![
            "--client-tls".into(),
            "terminate".into(),
            "--tls-cert-file".into(),
            self.file("server.crt"),
            "--tls-key-file".into(),
            self.file("server.key"),
        ]
    }
}

/// `ha --move-sessions`: the proxies' auth role on every keeper, and the role the clients
/// log in as (a SCRAM role: the proxy never authenticates a superuser).
pub struct AuthSetup {
    dir: tempfile::TempDir,
}

pub const WRITER: &str = "lt_writer";
pub const WRITER_PASSWORD: &str = "lt-writer-pw";
const AUTH_ROLE: &str = "proxyauth";

impl AuthSetup {
    pub fn new() -> Result<AuthSetup> {
        let dir = testkit::temp_dir("ha-auth")?;
        std::fs::write(dir.path().join("auth.pw"), "auth-secret\n")?;
        Ok(AuthSetup { dir })
    }

    fn file(&self) -> String {
        self.dir.path().join("auth.pw").display().to_string()
    }

    fn keeper_args(&self) -> Vec<String> {
        vec![
            "--pg-auth-username".into(),
            AUTH_ROLE.into(),
            "--pg-auth-passwordfile".into(),
            self.file(),
        ]
    }

    fn proxy_flags(&self, tls: bool) -> Vec<String> {
        let mut f = vec![
            "--auth-user".into(),
            AUTH_ROLE.into(),
            "--auth-passwordfile".into(),
            self.file(),
        ];
        if !tls {
            f.extend(["--client-tls".into(), "terminate".into()]);
        }
        f
    }
}

impl Env {
    pub async fn start(
        spec: serde_json::Value,
        haproxy_check: &str,
        tls: Option<&TlsSetup>,
        auth: Option<&AuthSetup>,
    ) -> Result<Env> {
        let mut c = Cluster::launch(&Opts {
            keepers: 3,
            proxies: 0,
            spec,
            keeper_args: vec![auth.map(AuthSetup::keeper_args).unwrap_or_default(); 3],
            ..Default::default()
        })
        .await?;
        let proxy_metrics = free_port();
        let mut flags = vec![
            "--metrics-listen-address".into(),
            format!("127.0.0.1:{}", proxy_metrics.0),
        ];
        flags.extend(tls.map(TlsSetup::proxy_flags).unwrap_or_default());
        flags.extend(
            auth.map(|a| a.proxy_flags(tls.is_some()))
                .unwrap_or_default(),
        );
        c.add_proxy_with("p1", flags)?;
        c.wait_healthy(Duration::from_secs(180)).await?;
        create_load_table(&c).await?;
        if auth.is_some() {
            c.exec_via_proxy(&format!(
                "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{WRITER}') THEN \
                 CREATE ROLE {WRITER} LOGIN PASSWORD '{WRITER_PASSWORD}'; END IF; END $$; \
                 GRANT SELECT, INSERT ON lt_writes TO {WRITER}; \
                 GRANT USAGE ON SEQUENCE lt_pgbench_ids TO {WRITER}"
            ))
            .await?;
        }
        let dir = testkit::temp_dir("ha-haproxy")?;
        let haproxy_port = free_port();
        let cfg = haproxy_config(&c, haproxy_port.0, haproxy_check);
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, cfg)?;
        let haproxy = crate::targets::spawn_haproxy(&path)?;
        let env = Env {
            c,
            proxy_metrics,
            haproxy: Some(haproxy),
            haproxy_port,
            _haproxy_dir: dir,
        };
        let e = env.haproxy_endpoint();
        env.c
            .wait_for(
                "HAProxy to route to the master",
                Duration::from_secs(30),
                async || {
                    e2e::sql::exec(&e.addr, e.port, "SELECT 1", Duration::from_secs(2))
                        .await
                        .ok()
                },
            )
            .await?;
        Ok(env)
    }

    pub fn proxy_endpoint(&self) -> Endpoint {
        let (addr, port) = self.c.proxy_addr(0);
        Endpoint {
            target: 0,
            addr,
            port,
        }
    }

    pub fn haproxy_endpoint(&self) -> Endpoint {
        Endpoint {
            target: 1,
            addr: "127.0.0.1".into(),
            port: self.haproxy_port.0,
        }
    }

    /// One switchover or failover, judged on its window.
    pub async fn change(
        &mut self,
        scenario: &'static str,
        index: usize,
        sh: &Shared,
        watcher: &Watcher,
        freeze_for: Duration,
    ) -> Result<Change> {
        self.c.wait_healthy(Duration::from_secs(240)).await?;
        tokio::time::sleep(BEFORE).await;
        let old = self.c.master().await.context("no master")?;
        let holds_before = self.proxy_holds().await;
        let moves_before = self.proxy_moves().await;
        let mark = Instant::now();
        let stop = CancellationToken::new();
        let timeline = tokio::spawn(move_timeline(
            format!("127.0.0.1:{}", self.proxy_metrics.0),
            mark,
            stop.clone(),
        ));
        let new = if scenario == "etcd-freeze" {
            // The store out, then back: with failsafe mode the master and the proxy carry
            // on; without it both fence and the same master resumes.
            self.c.etcd.members[0].freeze()?;
            tokio::time::sleep(freeze_for).await;
            self.c.etcd.members[0].thaw()?;
            self.c.wait_healthy(Duration::from_secs(240)).await?;
            self.c
                .master()
                .await
                .context("no master after the freeze")?
        } else {
            if scenario == "switchover" {
                switchover(&self.c).await?;
            } else {
                self.c.kill_keeper(&old, true);
            }
            self.c
                .wait_master_change(&old, Duration::from_secs(120))
                .await?
        };
        if scenario == "failover" {
            self.c.restart_keeper(&old)?;
        }
        self.c.wait_healthy(Duration::from_secs(240)).await?;
        tokio::time::sleep(AFTER).await;
        let secs = |t: Instant| t.duration_since(sh.t0).as_secs_f64();
        let mark_s = secs(mark);
        let routed_at = watcher
            .changes()
            .iter()
            .find(|(t, m)| *t >= mark_s && m.as_deref() == Some(new.as_str()))
            .map(|(t, _)| *t);
        let to = secs(Instant::now());
        let w = Window {
            from: mark_s - BEFORE.as_secs_f64(),
            mark: mark_s,
            routed: routed_at.unwrap_or(to),
            to,
        };
        stop.cancel();
        let moves_seen = timeline.await.unwrap_or_default();
        let samples = sh.log.lock().map(|l| l.clone()).unwrap_or_default();
        let holds_after = self.proxy_holds().await;
        let moves_after = self.proxy_moves().await;
        let proxy_moves = moves_after
            .into_iter()
            .map(|(r, n)| {
                let before = moves_before.get(&r).copied().unwrap_or(0);
                (r, n.saturating_sub(before))
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        Ok(Change {
            scenario,
            index,
            window: w,
            old_master: old,
            new_master: new,
            routed_at,
            seen: seen_by_target(&samples, w),
            failed_txns: super::report::failed_txns(&samples, w),
            proxy_holds: holds_before
                .zip(holds_after)
                .map(|(a, b)| b.saturating_sub(a)),
            proxy_moves,
            moves_seen,
        })
    }

    /// stolon-proxy's counts of drained sessions so far, by what became of them.
    async fn proxy_moves(&self) -> BTreeMap<String, u64> {
        proxy_moves(&format!("127.0.0.1:{}", self.proxy_metrics.0)).await
    }

    /// stolon-proxy's count of held sessions so far.
    async fn proxy_holds(&self) -> Option<u64> {
        let url = format!("127.0.0.1:{}", self.proxy_metrics.0);
        let text = http_get(&url, "/metrics").await.ok()?;
        text.lines()
            .find(|l| l.starts_with("stolon_proxy_sessions_holds_total "))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    /// Acknowledged commits per target, and how many of them the final master lacks.
    /// Acknowledged commits and those missing from the final master: per target, and per
    /// target and kind of client ("stolon-proxy/pgx").
    pub async fn lost(&self, samples: &[Sample]) -> Result<(Counts, Counts)> {
        let present = ids_on_master(&self.c).await?;
        let mut acked = BTreeMap::new();
        let mut lost = BTreeMap::new();
        for (i, t) in TARGETS.iter().enumerate() {
            let mut count = |key: String, kind: Option<Kind>| {
                let ids = committed(samples, i, kind);
                acked.insert(key.clone(), ids.len());
                lost.insert(key, ids.iter().filter(|id| !present.contains(id)).count());
            };
            count(t.to_string(), None);
            for k in Kind::ALL {
                if samples.iter().any(|s| s.kind == k) {
                    count(format!("{t}/{}", k.name()), Some(k));
                }
            }
        }
        Ok((acked, lost))
    }

    pub fn stop(&mut self) {
        if let Some(mut h) = self.haproxy.take() {
            h.stop(Duration::from_secs(5));
        }
    }
}

/// Creates the table the writers insert into (through the first proxy, once it routes).
pub async fn create_load_table(c: &Cluster) -> Result<()> {
    let (addr, port) = c.proxy_addr(0);
    c.wait_for("the load table", Duration::from_secs(60), async || {
        e2e::sql::exec(
            &addr,
            port,
            "CREATE TABLE IF NOT EXISTS lt_writes (id bigint PRIMARY KEY, client int, \
             at timestamptz DEFAULT now()); \
             CREATE SEQUENCE IF NOT EXISTS lt_pgbench_ids",
            Duration::from_secs(5),
        )
        .await
        .ok()
    })
    .await?;
    Ok(())
}

/// The ids the writers' table holds on the current master.
pub async fn ids_on_master(c: &Cluster) -> Result<std::collections::HashSet<i64>> {
    let m = c.wait_master(Duration::from_secs(60)).await?;
    let (addr, port) = c.pg_addr(&m);
    let client = e2e::sql::connect(&addr, port, Duration::from_secs(10)).await?;
    let rows = client.query("SELECT id FROM lt_writes", &[]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// A planned switchover: `stolonctl switchover --wait`.
pub async fn switchover(c: &Cluster) -> Result<()> {
    let out = tokio::process::Command::new(e2e::cluster::bin("stolonctl"))
        .args([
            "--cluster-name",
            e2e::cluster::CLUSTER,
            "--store-endpoints",
            &c.endpoints(),
            "switchover",
            "--wait",
        ])
        .stdin(Stdio::null())
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "stolonctl switchover failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Patroni's documented HAProxy layout, checking each keeper's `/primary` on its metrics
/// listener; `check` is the `default-server` timing.
fn haproxy_config(c: &Cluster, port: u16, check: &str) -> String {
    let mut s = format!(
        "global\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  \
         timeout server 1h\n  timeout check 1s\nlisten pg\n  bind 127.0.0.1:{port}\n  \
         option httpchk GET /primary\n  http-check expect status 200\n  \
         default-server {check} on-marked-down shutdown-sessions\n"
    );
    for k in &c.keepers {
        s += &format!(
            "  server {} {}:{} check port {}\n",
            k.uid, k.addr, k.port, k.metrics_port
        );
    }
    s
}

/// A minimal HTTP/1.0 GET (the body), for a metrics scrape.
pub async fn http_get(addr: &str, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await??;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf);
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

/// When (seconds since the run's start) the routed master became which keeper (None: no
/// master routed).
type Routed = Vec<(f64, Option<String>)>;

/// The routed master over time, read from the store at each clusterdata write.
pub struct Watcher {
    changes: Arc<Mutex<Routed>>,
}

impl Watcher {
    pub fn changes(&self) -> Routed {
        self.changes.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

pub fn watch_master(store: ClusterStore, t0: Instant, stop: CancellationToken) -> Watcher {
    let changes = Arc::new(Mutex::new(Vec::new()));
    let w = Watcher {
        changes: changes.clone(),
    };
    tokio::spawn(async move {
        let mut last: Option<Option<String>> = None;
        let mut watch: Option<control::store::Watcher> = None;
        // When the write was delivered: the watch event's arrival, not the read after it.
        let mut delivered = t0.elapsed().as_secs_f64();
        while !stop.is_cancelled() {
            let (master, rev) = match store.get_cluster_data().await {
                Ok(Some((cd, rev))) => (
                    cd.dbs
                        .get(&cd.proxy.spec.master_db_uid)
                        .map(|db| db.spec.keeper_uid.clone()),
                    rev,
                ),
                _ => (None, 0),
            };
            if last.as_ref() != Some(&master) {
                if let Ok(mut c) = changes.lock() {
                    c.push((delivered, master.clone()));
                }
                last = Some(master);
            }
            // Read again on the next write (a watch, not a poll: the time is the write's).
            let w = watch.get_or_insert_with(|| {
                control::store::Watcher::from_revision(
                    store.store().clone(),
                    store.clusterdata_key(),
                    rev + 1,
                )
            });
            tokio::select! {
                _ = stop.cancelled() => return,
                r = w.next() => {
                    delivered = t0.elapsed().as_secs_f64();
                    if r.is_err() {
                        watch = None;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    });
    w
}

/// stolon-proxy's counts of drained sessions so far (its metrics at `url`), by what became
/// of them.
async fn proxy_moves(url: &str) -> BTreeMap<String, u64> {
    let Ok(text) = http_get(url, "/metrics").await else {
        return BTreeMap::new();
    };
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("stolon_proxy_session_moves_total{result=\"")?;
            let (result, value) = rest.split_once("\"} ")?;
            Some((result.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// When stolon-proxy moved or closed drained sessions: its counters read every 100 ms from
/// `mark` until `stop`, one entry (seconds from `mark`, moved, closed so far in the window)
/// each time they changed.
async fn move_timeline(url: String, mark: Instant, stop: CancellationToken) -> Vec<MovesSeen> {
    let split = |m: &BTreeMap<String, u64>| {
        let moved = m.get("moved").copied().unwrap_or(0);
        (moved, m.values().sum::<u64>() - moved)
    };
    let (moved0, closed0) = split(&proxy_moves(&url).await);
    let mut seen: Vec<MovesSeen> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while !stop.is_cancelled() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        let (moved, closed) = split(&proxy_moves(&url).await);
        let now = MovesSeen {
            at: mark.elapsed().as_secs_f64(),
            moved: moved.saturating_sub(moved0),
            closed: closed.saturating_sub(closed0),
        };
        let last = seen.last().map_or((0, 0), |l| (l.moved, l.closed));
        if (now.moved, now.closed) != last {
            seen.push(now);
        }
    }
    seen
}

/// What stolon-proxy had moved and closed of its drained sessions by `at` (seconds from
/// the change).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct MovesSeen {
    pub at: f64,
    pub moved: u64,
    pub closed: u64,
}
