//! `loadtest swarm`: what a fleet of proxies costs the cluster, for growing fleet sizes in
//! one run on one cluster of real processes (etcd, three keepers, a sentinel).
//!
//! For each N of `--proxies` (ascending) the fleet grows to N real `stolon-proxy`
//! processes, each with its own listener and metrics endpoint, while a light load of
//! writers opens a session per transaction through the proxies in turn. Then:
//! - idle: etcd's writes (raft proposals), key writes, lease renewals, watch events sent,
//!   CPU and memory over `--idle`; the sentinel's rounds and their mean time; the proxies'
//!   info writes and resident memory;
//! - `--switchovers` planned switchovers and `--failovers` kill -9 failovers, each judged
//!   on what the writers saw (the longest gap with no commit, errors) and on how long the
//!   master change took to reach every proxy: from the store delivering the routing write
//!   to a watcher here, to each proxy's own `stolon_proxy_route_changed_seconds`;
//! - with `--freeze`, at the largest N: one proxy frozen (SIGSTOP) just before a failover,
//!   the writers kept off it; how much later the new master is routed than without.
//!
//! The result is `swarm.json`, a table on stdout and `swarm.svg` (figures against N).

mod chart;
mod probe;
mod report;

use crate::ha::clients::{self, Endpoint, Kind, Shared};
use crate::ha::cluster::{create_load_table, ids_on_master, switchover, watch_master};
use crate::ha::committed;
use crate::ha::report::{percentile, seen, Window};
use crate::procstat::{cpu_seconds, rss_kib};
use anyhow::{bail, Context, Result};
use e2e::{Cluster, Opts};
use nix::sys::signal::Signal;
use probe::{sentinel_rounds, EtcdLoad, Scrape};
use report::{errors_of, line, table, Change, Idle, Result_, Step};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use testkit::{free_port, ChildGuard, PortGuard};

pub struct Options {
    /// Fleet sizes, ascending.
    pub proxies: Vec<usize>,
    pub switchovers: usize,
    pub failovers: usize,
    /// How long the idle store load is measured at each size.
    pub idle: Duration,
    /// Writers (a session per transaction, through the proxies in turn).
    pub clients: usize,
    pub think: Duration,
    /// One proxy frozen during a failover at the largest size.
    pub freeze: bool,
    /// Spec keys over the e2e suite's timings.
    pub spec: serde_json::Value,
    pub out_dir: PathBuf,
    /// The nice value every proxy runs at (0: as the cluster).
    pub proxy_nice: i32,
}

/// Writes flow this long before a change (the gap is measured from the last commit).
const BEFORE: Duration = Duration::from_secs(2);
/// After the cluster is healthy again, the window stays open this long.
const AFTER: Duration = Duration::from_secs(1);

/// One proxy of the fleet.
struct Member {
    name: String,
    port: u16,
    metrics: u16,
    pid: u32,
    frozen: bool,
}

struct Swarm {
    c: Cluster,
    members: Vec<Member>,
    /// The fleet beyond the cluster's own first proxy (stopped on drop).
    children: Vec<ChildGuard>,
    ports: Vec<PortGuard>,
    sentinel_metrics: u16,
    /// Where the writers go: every proxy not frozen.
    endpoints: Arc<RwLock<Vec<Endpoint>>>,
}

pub fn run(opts: &Options) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(opts))
}

async fn run_async(opts: &Options) -> Result<()> {
    let mut sizes = opts.proxies.clone();
    sizes.sort_unstable();
    sizes.dedup();
    if sizes.first().is_none_or(|&n| n == 0) {
        bail!("--proxies needs sizes of at least 1");
    }
    let mut s = Swarm::start(opts.spec.clone()).await?;
    eprintln!("cluster up in {}", s.c.dir.display());
    let shared = Arc::new(Shared {
        t0: Instant::now(),
        log: Default::default(),
        next_id: 1.into(),
        stop: Default::default(),
        connect_timeout: Duration::from_secs(30),
        think: opts.think,
        tls: false,
        login: (e2e::sql::SU.into(), e2e::sql::SU_PASSWORD.into()),
    });
    let t0_unix = control::metrics::unix_now();
    let tasks: Vec<_> = (0..opts.clients)
        .map(|i| tokio::spawn(rotating(shared.clone(), s.endpoints.clone(), i as i32)))
        .collect();
    let watcher = watch_master(s.c.store.clone(), shared.t0, shared.stop.clone());
    let mut steps = Vec::new();
    let last = *sizes.last().unwrap_or(&1);
    for &n in &sizes {
        let grown = Instant::now();
        s.grow(n).await?;
        if opts.proxy_nice != 0 {
            s.renice(opts.proxy_nice)?;
        }
        eprintln!(
            "{n} proxies routing ({:.1} s to grow)",
            grown.elapsed().as_secs_f64()
        );
        let idle = s.idle(opts.idle).await?;
        let mut changes = Vec::new();
        let plan = std::iter::repeat_n("switchover", opts.switchovers)
            .chain(std::iter::repeat_n("failover", opts.failovers));
        for scenario in plan {
            let ch = s
                .change(scenario, false, &shared, &watcher, t0_unix)
                .await?;
            eprintln!("{}", line(&ch));
            changes.push(ch);
        }
        if opts.freeze && n == last && n >= 2 {
            let ch = s
                .change("failover", true, &shared, &watcher, t0_unix)
                .await?;
            eprintln!("{}", line(&ch));
            changes.push(ch);
        }
        steps.push(Step {
            proxies: n,
            idle,
            changes,
        });
    }
    shared.stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let samples = shared.log.lock().map(|l| l.clone()).unwrap_or_default();
    let (acked, acked_lost) = lost(&s.c, &samples).await?;
    let timeout = proxy_timeout(&s.c).await;
    let result = Result_ {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        spec: s.c.spec.clone(),
        clients: opts.clients,
        think_ms: opts.think.as_millis(),
        proxy_lease_ttl_s: control::model::proxy_lease_ttl(timeout).as_secs_f64(),
        steps,
        acked,
        acked_lost,
    };
    std::fs::create_dir_all(&opts.out_dir)?;
    let json = opts.out_dir.join("swarm.json");
    std::fs::write(&json, serde_json::to_vec_pretty(&result)?)?;
    let table = table(&result);
    println!("{table}");
    std::fs::write(opts.out_dir.join("swarm.md"), &table)?;
    chart::draw(&opts.out_dir.join("swarm.svg"), &result)?;
    eprintln!("wrote {} and swarm.svg", json.display());
    let sync = result.spec["synchronousReplication"] == serde_json::Value::Bool(true);
    if acked_lost > 0 && sync {
        bail!("{acked_lost} acknowledged writes lost with synchronous replication");
    }
    Ok(())
}

async fn proxy_timeout(c: &Cluster) -> control::model::GoDuration {
    match c.data().await {
        Some((cd, _)) => cd.cluster.spec.proxy_timeout(),
        None => control::model::defaults::PROXY_TIMEOUT,
    }
}

impl Swarm {
    async fn start(spec: serde_json::Value) -> Result<Swarm> {
        let mut c = Cluster::launch(&Opts {
            keepers: 3,
            sentinels: 0,
            proxies: 0,
            spec,
            ..Default::default()
        })
        .await?;
        let sentinel_metrics = free_port();
        c.add_sentinel_with(
            "s1",
            vec![
                "--metrics-listen-address".into(),
                format!("127.0.0.1:{}", sentinel_metrics.0),
            ],
        )?;
        let metrics = free_port();
        c.add_proxy_with(
            "p1",
            vec![
                "--metrics-listen-address".into(),
                format!("127.0.0.1:{}", metrics.0),
            ],
        )?;
        c.wait_healthy(Duration::from_secs(180)).await?;
        create_load_table(&c).await?;
        let (_, port) = c.proxy_addr(0);
        let pid = c.proxies[0].child.as_ref().map_or(0, |ch| ch.pid());
        let first = Member {
            name: "p1".into(),
            port,
            metrics: metrics.0,
            pid,
            frozen: false,
        };
        let endpoints = Arc::new(RwLock::new(vec![endpoint(&first)]));
        Ok(Swarm {
            c,
            members: vec![first],
            children: Vec::new(),
            sentinel_metrics: sentinel_metrics.0,
            ports: vec![metrics, sentinel_metrics],
            endpoints,
        })
    }

    /// Starts proxies until there are `n`, and waits until every one routes to the
    /// master at the current generation.
    async fn grow(&mut self, n: usize) -> Result<()> {
        while self.members.len() < n {
            let name = format!("p{}", self.members.len() + 1);
            let (port, metrics) = (free_port(), free_port());
            let args: Vec<String> = vec![
                "--cluster-name".into(),
                e2e::cluster::CLUSTER.into(),
                "--store-endpoints".into(),
                self.c.endpoints(),
                "--log-level".into(),
                "info".into(),
                "--uid".into(),
                name.clone(),
                "--listen-address".into(),
                "127.0.0.1".into(),
                "--port".into(),
                port.0.to_string(),
                "--metrics-listen-address".into(),
                format!("127.0.0.1:{}", metrics.0),
            ];
            let child = self
                .c
                .spawn(&name, &None, &e2e::cluster::bin("stolon-proxy"), &args)?;
            self.members.push(Member {
                name,
                port: port.0,
                metrics: metrics.0,
                pid: child.pid(),
                frozen: false,
            });
            self.children.push(child);
            self.ports.extend([port, metrics]);
        }
        let limit = Duration::from_secs(60) + Duration::from_millis(200) * n as u32;
        let deadline = Instant::now() + limit;
        loop {
            match self.all_routing().await {
                Ok(()) => break,
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!("{n} proxies not routing after {limit:?}")))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
        let eps = self
            .members
            .iter()
            .filter(|m| !m.frozen)
            .map(endpoint)
            .collect();
        if let Ok(mut e) = self.endpoints.write() {
            *e = eps;
        }
        Ok(())
    }

    /// Sets every proxy thread's nice value (`renice`, util-linux; on Linux a nice value
    /// is a thread's, so each of /proc/PID/task).
    fn renice(&self, nice: i32) -> Result<()> {
        let mut pids = Vec::new();
        for m in &self.members {
            for task in std::fs::read_dir(format!("/proc/{}/task", m.pid))? {
                pids.push(task?.file_name().to_string_lossy().into_owned());
            }
        }
        let status = std::process::Command::new("renice")
            .args(["-n", &nice.to_string(), "-p"])
            .args(&pids)
            .stdout(std::process::Stdio::null())
            .status()
            .context("renice")?;
        if !status.success() {
            bail!("renice -n {nice} failed: {status}");
        }
        Ok(())
    }

    /// Every proxy not frozen is enabled, routes, and has applied the current generation.
    async fn all_routing(&self) -> Result<()> {
        let (cd, _) = self.c.data().await.context("no clusterdata")?;
        let master = &cd.proxy.spec.master_db_uid;
        if master.is_empty() {
            bail!("no master routed");
        }
        for m in self.members.iter().filter(|m| !m.frozen) {
            if !cd.proxy.spec.enabled_proxies.contains(&m.name) {
                bail!("{} not enabled", m.name);
            }
            let s = Scrape::of(&format!("127.0.0.1:{}", m.metrics))
                .await
                .with_context(|| format!("{} metrics", m.name))?;
            let routing = s.get("stolon_proxy_routing") == 1.0;
            let generation = s.get("stolon_proxy_route_generation") as i64;
            if !routing || generation != cd.proxy.generation {
                bail!(
                    "{} not routing at generation {}",
                    m.name,
                    cd.proxy.generation
                );
            }
        }
        Ok(())
    }

    async fn etcd(&self) -> Result<EtcdLoad> {
        let ep = self.c.endpoints();
        let addr = ep
            .split(',')
            .next()
            .unwrap_or_default()
            .trim_start_matches("http://");
        let s = Scrape::of(addr).await.context("etcd metrics")?;
        Ok(EtcdLoad::from(&s))
    }

    async fn sentinel(&self) -> Result<(f64, f64)> {
        let s = Scrape::of(&format!("127.0.0.1:{}", self.sentinel_metrics))
            .await
            .context("sentinel metrics")?;
        Ok(sentinel_rounds(&s))
    }

    /// The sum of every proxy's info writes.
    async fn info_writes(&self) -> f64 {
        let mut sum = 0.0;
        for m in &self.members {
            if let Some(s) = Scrape::of(&format!("127.0.0.1:{}", m.metrics)).await {
                sum += s.get("stolon_proxy_info_writes_total");
            }
        }
        sum
    }

    /// The store's and the sentinel's load over `d` with no master change.
    async fn idle(&self, d: Duration) -> Result<Idle> {
        let (e0, r0, w0) = (
            self.etcd().await?,
            self.sentinel().await?,
            self.info_writes().await,
        );
        let c0 = self.proxies_cpu();
        let start = Instant::now();
        tokio::time::sleep(d).await;
        let c1 = self.proxies_cpu();
        let (e1, r1, w1) = (
            self.etcd().await?,
            self.sentinel().await?,
            self.info_writes().await,
        );
        let secs = start.elapsed().as_secs_f64();
        let rate = |a: f64, b: f64| (b - a) / secs;
        let rss: Vec<f64> = (self.members.iter())
            .map(|m| rss_kib(m.pid) as f64 / 1024.0)
            .filter(|m| *m > 0.0)
            .collect();
        let rounds = r1.0 - r0.0;
        Ok(Idle {
            seconds: secs,
            etcd_proposals_per_s: rate(e0.proposals, e1.proposals),
            etcd_puts_per_s: rate(e0.puts, e1.puts),
            etcd_txns_per_s: rate(e0.txns, e1.txns),
            etcd_lease_renewals_per_s: rate(e0.keepalives, e1.keepalives),
            etcd_watch_events_per_s: rate(e0.watch_events, e1.watch_events),
            etcd_cpu_percent: rate(e0.cpu_seconds, e1.cpu_seconds) * 100.0,
            etcd_rss_mib: e1.rss_bytes / 1048576.0,
            sentinel_rounds_per_s: rounds / secs,
            sentinel_round_ms_mean: if rounds > 0.0 {
                (r1.1 - r0.1) / rounds * 1000.0
            } else {
                0.0
            },
            proxy_info_writes_per_s: rate(w0, w1),
            proxies_cpu_percent: rate(c0, c1) * 100.0,
            proxy_rss_mib_mean: rss.iter().sum::<f64>() / rss.len().max(1) as f64,
        })
    }

    /// One switchover or kill -9 failover; `freeze`: with the last proxy frozen through it.
    async fn change(
        &mut self,
        scenario: &'static str,
        freeze: bool,
        sh: &Shared,
        watcher: &crate::ha::cluster::Watcher,
        t0_unix: f64,
    ) -> Result<Change> {
        self.c.wait_healthy(Duration::from_secs(240)).await?;
        tokio::time::sleep(BEFORE).await;
        let old = self.c.master().await.context("no master")?;
        if freeze {
            self.freeze_last(true)?;
        }
        let cpu_before = self.proxies_cpu();
        let mark = Instant::now();
        if scenario == "switchover" {
            switchover(&self.c).await?;
        } else {
            self.c.kill_keeper(&old, true);
        }
        let new = self
            .c
            .wait_master_change(&old, Duration::from_secs(120))
            .await?;
        if scenario == "failover" {
            self.c.restart_keeper(&old)?;
        }
        self.c.wait_healthy(Duration::from_secs(240)).await?;
        let proxies_cpu_s = self.proxies_cpu() - cpu_before;
        tokio::time::sleep(AFTER).await;
        let secs = |t: Instant| t.duration_since(sh.t0).as_secs_f64();
        let mark_s = secs(mark);
        let routed = watcher
            .changes()
            .iter()
            .find(|(t, m)| *t >= mark_s && m.as_deref() == Some(new.as_str()))
            .map(|(t, _)| *t)
            .context("the routing write was not seen")?;
        let routes = self.route_changes().await;
        let lags: Vec<f64> = (routes.iter())
            .map(|at| (at - (t0_unix + routed)) * 1000.0)
            .collect();
        // The sentinel's decision to publish the new master (its changeTime), if the
        // document still carries that one.
        let decided = (self.c.data().await)
            .and_then(|(cd, _)| cd.proxy.change_time)
            .map(|t| t.0.unix_timestamp_nanos() as f64 / 1e9)
            .filter(|t| *t >= t0_unix + mark_s);
        let last = routes.iter().copied().fold(f64::MIN, f64::max);
        let decision_to_last_proxy_ms = decided.map_or(f64::NAN, |d| (last - d) * 1000.0);
        if freeze {
            self.freeze_last(false)?;
            self.grow(self.members.len()).await?;
        }
        let w = Window {
            from: mark_s - BEFORE.as_secs_f64(),
            mark: mark_s,
            routed,
            to: secs(Instant::now()),
        };
        let samples = sh.log.lock().map(|l| l.clone()).unwrap_or_default();
        let seen = seen(&samples, 0, None, w);
        Ok(Change {
            scenario,
            proxies: self.members.len(),
            old_master: old,
            new_master: new,
            routed_after_s: routed - mark_s,
            max_gap_s: seen.max_gap,
            connects_failed: seen.connects_failed,
            txns_failed: seen.txns_failed,
            errors: errors_of(&seen),
            propagation_ms_p50: percentile(&lags, 50.0),
            propagation_ms_p99: percentile(&lags, 99.0),
            propagation_ms_max: lags.iter().copied().fold(f64::MIN, f64::max),
            decision_to_last_proxy_ms,
            propagation_proxies: lags.len(),
            frozen_proxy: freeze,
            proxies_cpu_s,
        })
    }

    /// utime + stime of every proxy, in seconds.
    fn proxies_cpu(&self) -> f64 {
        self.members.iter().map(|m| cpu_seconds(m.pid)).sum()
    }

    /// When each proxy (not frozen) last changed its route, as unix seconds, from its own
    /// metric: every process here reads the same clock.
    async fn route_changes(&self) -> Vec<f64> {
        let mut at = Vec::new();
        for m in self.members.iter().filter(|m| !m.frozen) {
            if let Some(s) = Scrape::of(&format!("127.0.0.1:{}", m.metrics)).await {
                at.push(s.get("stolon_proxy_route_changed_seconds"));
            }
        }
        at
    }

    /// Freezes (SIGSTOP) or thaws the last proxy, keeping the writers off it while frozen.
    fn freeze_last(&mut self, frozen: bool) -> Result<()> {
        let m = self.members.last_mut().context("no proxy")?;
        let sig = if frozen {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(m.pid as i32), sig)?;
        m.frozen = frozen;
        let eps = (self.members.iter())
            .filter(|m| !m.frozen)
            .map(endpoint)
            .collect();
        if let Ok(mut e) = self.endpoints.write() {
            *e = eps;
        }
        Ok(())
    }
}

fn endpoint(m: &Member) -> Endpoint {
    Endpoint {
        target: 0,
        addr: "127.0.0.1".into(),
        port: m.port,
    }
}

/// A writer that opens a session per transaction through the proxies in turn.
async fn rotating(sh: Arc<Shared>, eps: Arc<RwLock<Vec<Endpoint>>>, client_no: i32) {
    let mut next = client_no as usize;
    while !sh.stop.is_cancelled() {
        let e = eps
            .read()
            .ok()
            .and_then(|v| (!v.is_empty()).then(|| v[next % v.len()].clone()));
        next += 1;
        let Some(e) = e else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        match clients::connect(&sh, &e, Kind::PerTxn).await {
            Some(c) => drop(clients::transact(&sh, &e, Kind::PerTxn, &c, client_no).await),
            None => tokio::time::sleep(Duration::from_millis(10)).await,
        }
        tokio::time::sleep(sh.think).await;
    }
}

/// Acknowledged commits, and how many of them the final master lacks.
async fn lost(c: &Cluster, samples: &[clients::Sample]) -> Result<(usize, usize)> {
    let present = ids_on_master(c).await?;
    let acked = committed(samples, 0, None);
    let lost = acked.iter().filter(|id| !present.contains(id)).count();
    Ok((acked.len(), lost))
}
