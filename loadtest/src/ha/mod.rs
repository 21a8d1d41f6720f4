//! `loadtest ha`: what clients see of a master change, through stolon-proxy and through
//! HAProxy in front of the same cluster, in the same run.
//!
//! One cluster of real processes (etcd, three keepers, a sentinel, stolon-proxy) and an
//! HAProxy that health-checks every keeper's `/primary` endpoint (the Patroni layout).
//! Clients of both kinds (`clients::Kind`) write through each of the two, at the same time,
//! while the run makes `--switchovers` planned switchovers (`stolonctl switchover --wait`)
//! and then `--failovers` unplanned ones (kill -9 of the master keeper and its PostgreSQL,
//! the keeper restarted once a new master is routed). Each change is judged on its own
//! window (`report::Window`); the result is a JSON file and a chart per scenario.

mod apps;
mod chart;
pub(crate) mod clients;
pub(crate) mod cluster;
pub(crate) mod report;

use anyhow::{Context, Result};
use clients::{Endpoint, Kind, Outcome, Sample, Shared};
use report::{percentile, seen, Seen, Window};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Options {
    pub switchovers: usize,
    pub failovers: usize,
    /// etcd frozen this many times, each for `etcd_freeze_for` (after the master changes).
    pub etcd_freezes: usize,
    pub etcd_freeze_for: Duration,
    /// Clients of each kind per target.
    pub clients: usize,
    pub think: Duration,
    pub connect_timeout: Duration,
    pub sync: bool,
    /// Spec keys over the e2e suite's timings.
    pub spec: serde_json::Value,
    /// HAProxy's check timing for every server (`default-server` options).
    pub haproxy_check: String,
    pub out_dir: PathBuf,
    /// TLS everywhere: PostgreSQL ssl on, clients at sslmode=require, stolon-proxy
    /// terminating it.
    pub tls: bool,
    /// Sessions movable at a switchover (see `cluster::AuthSetup`).
    pub move_sessions: bool,
    /// psycopg2, pgx and pgjdbc writers too (`apps`).
    pub app_writers: bool,
}

pub const TARGETS: [&str; 2] = ["stolon-proxy", "haproxy"];

#[derive(Serialize)]
pub(crate) struct Change {
    scenario: &'static str,
    index: usize,
    window: Window,
    old_master: String,
    new_master: String,
    /// When the clusterdata first routed the new master (seconds since the run's start).
    routed_at: Option<f64>,
    /// Per target: every client, then each kind.
    seen: BTreeMap<&'static str, BTreeMap<&'static str, Seen>>,
    /// Sessions stolon-proxy held during the window (its sessions_holds counter).
    proxy_holds: Option<u64>,
    /// What became of the sessions stolon-proxy drained in the window: moved, or why it
    /// closed them (its session_moves counter, by result).
    proxy_moves: BTreeMap<String, u64>,
    /// When those moves and closes happened (polled every 100 ms).
    moves_seen: Vec<cluster::MovesSeen>,
    /// Every failed transaction in the window (seconds relative to the change).
    failed_txns: Vec<report::Failure>,
}

#[derive(Serialize)]
struct Summary {
    scenario: &'static str,
    target: &'static str,
    kind: &'static str,
    runs: usize,
    connects_failed_p50: f64,
    connects_failed_p99: f64,
    txns_failed_p50: f64,
    txns_failed_p99: f64,
    txns_failed_total: usize,
    txns_failed_at_change_total: usize,
    connects_failed_total: usize,
    connects_failed_at_change_total: usize,
    txns_failed_after_routed_total: usize,
    max_gap_p50: f64,
    max_gap_p99: f64,
    longest_connect_p50: f64,
    longest_connect_p99: f64,
}

#[derive(Serialize)]
struct Result_ {
    command: String,
    spec: serde_json::Value,
    haproxy_check: String,
    clients_per_kind_per_target: usize,
    think_ms: u128,
    connect_timeout_s: f64,
    changes: Vec<Change>,
    summary: Vec<Summary>,
    /// Acknowledged commits missing from the final master, per target, and per target and
    /// kind of client.
    acked_lost: cluster::Counts,
    acked: cluster::Counts,
}

pub fn run(opts: &Options) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(opts))
}

async fn run_async(opts: &Options) -> Result<()> {
    if opts.app_writers {
        apps::check()?;
    }
    let spec = spec_of(opts);
    let tls = if opts.tls {
        Some(cluster::TlsSetup::new()?)
    } else {
        None
    };
    let spec = match &tls {
        Some(t) => t.spec(spec),
        None => spec,
    };
    let auth = if opts.move_sessions {
        Some(cluster::AuthSetup::new()?)
    } else {
        None
    };
    let mut env = cluster::Env::start(
        spec.clone(),
        &opts.haproxy_check,
        tls.as_ref(),
        auth.as_ref(),
    )
    .await?;
    eprintln!("cluster up in {}", env.c.dir.display());
    let shared = Arc::new(Shared {
        t0: Instant::now(),
        log: Default::default(),
        next_id: 1.into(),
        stop: Default::default(),
        connect_timeout: opts.connect_timeout,
        think: opts.think,
        tls: opts.tls,
        login: match &auth {
            Some(_) => (cluster::WRITER.into(), cluster::WRITER_PASSWORD.into()),
            None => (e2e::sql::SU.into(), e2e::sql::SU_PASSWORD.into()),
        },
    });
    let endpoints = [env.proxy_endpoint(), env.haproxy_endpoint()];
    let tasks = spawn_clients(&shared, &endpoints, opts.clients);
    let writers = if opts.app_writers {
        let first_no = (opts.clients * 2 * endpoints.len() + 1) as i32;
        apps::start(&shared, &endpoints, first_no, &opts.out_dir).await?
    } else {
        Vec::new()
    };
    let watcher = cluster::watch_master(env.c.store.clone(), shared.t0, shared.stop.clone());
    let mut changes = Vec::new();
    let plan = std::iter::repeat_n("switchover", opts.switchovers)
        .chain(std::iter::repeat_n("failover", opts.failovers))
        .chain(std::iter::repeat_n("etcd-freeze", opts.etcd_freezes));
    for (i, scenario) in plan.enumerate() {
        let change = env
            .change(scenario, i, &shared, &watcher, opts.etcd_freeze_for)
            .await?;
        eprintln!("{}", progress_line(&change));
        changes.push(change);
    }
    shared.stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    for w in writers {
        w.stop().await;
    }
    let samples = shared.log.lock().map(|l| l.clone()).unwrap_or_default();
    let (acked, acked_lost) = env.lost(&samples).await?;
    let result = Result_ {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        spec,
        haproxy_check: opts.haproxy_check.clone(),
        clients_per_kind_per_target: opts.clients,
        think_ms: opts.think.as_millis(),
        connect_timeout_s: opts.connect_timeout.as_secs_f64(),
        summary: summarise(&changes),
        changes,
        acked_lost,
        acked,
    };
    write_out(opts, &result, &samples)?;
    env.stop();
    Ok(())
}

/// `--spec` with `--sync`'s keys over it.
fn spec_of(opts: &Options) -> serde_json::Value {
    let mut spec = opts.spec.clone();
    if opts.sync {
        if let Some(o) = spec.as_object_mut() {
            o.insert("synchronousReplication".into(), true.into());
            o.insert("minSynchronousStandbys".into(), 1.into());
            o.insert("maxSynchronousStandbys".into(), 1.into());
        }
    }
    spec
}

/// `n` clients of each kind through each endpoint, numbered from 1.
fn spawn_clients(
    shared: &Arc<Shared>,
    endpoints: &[Endpoint],
    n: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    let mut no = 0;
    for e in endpoints {
        for kind in [Kind::PerTxn, Kind::Persistent] {
            for _ in 0..n {
                no += 1;
                tasks.push(tokio::spawn(clients::run(
                    shared.clone(),
                    e.clone(),
                    kind,
                    no,
                )));
            }
        }
    }
    tasks
}

/// One line per change on stderr, as the run goes.
fn progress_line(change: &Change) -> String {
    let per_target: Vec<String> = change
        .seen
        .iter()
        .map(|(t, s)| {
            let a = &s["all"];
            format!(
                "{t}: connects failed {} ({} cut at the change), txns failed {} ({} cut at the change, {} after the new master was routed), no-write gap {:.2}s, longest connect {:.2}s",
                a.connects_failed, a.connects_failed_at_change, a.txns_failed, a.txns_failed_at_change, a.txns_failed_after_routed, a.max_gap, a.longest_connect
            )
        })
        .collect();
    let moves: Vec<String> = change
        .proxy_moves
        .iter()
        .map(|(r, n)| format!("{r} {n}"))
        .collect();
    format!(
        "{} {}: {} -> {}; {}; stolon-proxy drained sessions: {}",
        change.scenario,
        change.index,
        change.old_master,
        change.new_master,
        per_target.join("; "),
        if moves.is_empty() {
            "none".to_string()
        } else {
            moves.join(", ")
        }
    )
}

fn summarise(changes: &[Change]) -> Vec<Summary> {
    let mut out = Vec::new();
    for scenario in ["switchover", "failover", "etcd-freeze"] {
        let mine: Vec<&Change> = changes.iter().filter(|c| c.scenario == scenario).collect();
        if mine.is_empty() {
            continue;
        }
        for target in TARGETS {
            for &kind in mine[0].seen[target].keys() {
                let v: Vec<&Seen> = mine.iter().map(|c| &c.seen[target][kind]).collect();
                let f = |g: fn(&Seen) -> f64, p: f64| {
                    percentile(&v.iter().map(|s| g(s)).collect::<Vec<_>>(), p)
                };
                out.push(Summary {
                    scenario,
                    target,
                    kind,
                    runs: v.len(),
                    connects_failed_p50: f(|s| s.connects_failed as f64, 50.0),
                    connects_failed_p99: f(|s| s.connects_failed as f64, 99.0),
                    txns_failed_p50: f(|s| s.txns_failed as f64, 50.0),
                    txns_failed_p99: f(|s| s.txns_failed as f64, 99.0),
                    txns_failed_total: v.iter().map(|s| s.txns_failed).sum(),
                    txns_failed_at_change_total: v.iter().map(|s| s.txns_failed_at_change).sum(),
                    connects_failed_total: v.iter().map(|s| s.connects_failed).sum(),
                    connects_failed_at_change_total: v
                        .iter()
                        .map(|s| s.connects_failed_at_change)
                        .sum(),
                    txns_failed_after_routed_total: v
                        .iter()
                        .map(|s| s.txns_failed_after_routed)
                        .sum(),
                    max_gap_p50: f(|s| s.max_gap, 50.0),
                    max_gap_p99: f(|s| s.max_gap, 99.0),
                    longest_connect_p50: f(|s| s.longest_connect, 50.0),
                    longest_connect_p99: f(|s| s.longest_connect, 99.0),
                });
            }
        }
    }
    out
}

/// What each target's clients saw in `w`: all of them, then by kind.
fn seen_by_target(
    samples: &[Sample],
    w: Window,
) -> BTreeMap<&'static str, BTreeMap<&'static str, Seen>> {
    TARGETS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let kinds = Kind::ALL
                .into_iter()
                .filter(|k| samples.iter().any(|s| s.kind == *k));
            let by_kind = std::iter::once(("all", seen(samples, i, None, w)))
                .chain(kinds.map(|k| (k.name(), seen(samples, i, Some(k), w))))
                .collect();
            (*t, by_kind)
        })
        .collect()
}

fn write_out(opts: &Options, result: &Result_, samples: &[Sample]) -> Result<()> {
    std::fs::create_dir_all(&opts.out_dir)?;
    let json = opts.out_dir.join("ha.json");
    std::fs::write(&json, serde_json::to_string_pretty(result)?)
        .with_context(|| format!("writing {}", json.display()))?;
    println!("{}", table(&result.summary));
    println!(
        "acknowledged commits lost: {:?} of {:?}",
        result.acked_lost, result.acked
    );
    for scenario in ["switchover", "failover"] {
        let mine: Vec<&Change> = result
            .changes
            .iter()
            .filter(|c| c.scenario == scenario)
            .collect();
        // The chart shows the median change by stolon-proxy's no-write gap.
        let mut by_gap = mine.clone();
        by_gap.sort_by(|a, b| {
            a.seen[TARGETS[0]]["all"]
                .max_gap
                .total_cmp(&b.seen[TARGETS[0]]["all"].max_gap)
        });
        if let Some(c) = by_gap.get(by_gap.len() / 2) {
            let path = opts.out_dir.join(format!("ha-{scenario}.svg"));
            let moves = chart::move_marks(&c.moves_seen);
            chart::draw(
                &path,
                scenario,
                c.index,
                c.window,
                c.routed_at,
                &moves,
                samples,
            )?;
            eprintln!("chart: {}", path.display());
        }
    }
    eprintln!("result: {}", json.display());
    Ok(())
}

fn table(summary: &[Summary]) -> String {
    let mut s = String::from(
        "| scenario | target | clients | runs | failed connects p50/p99 (total: cut at the change) | failed txns p50/p99 (total: cut at the change / after the new master was routed) | no-write gap p50/p99 | longest connect p50/p99 |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in summary {
        s += &format!(
            "| {} | {} | {} | {} | {}/{} ({}: {}) | {}/{} ({}: {} / {}) | {:.2}/{:.2} s | {:.2}/{:.2} s |\n",
            r.scenario,
            r.target,
            r.kind,
            r.runs,
            r.connects_failed_p50,
            r.connects_failed_p99,
            r.connects_failed_total,
            r.connects_failed_at_change_total,
            r.txns_failed_p50,
            r.txns_failed_p99,
            r.txns_failed_total,
            r.txns_failed_at_change_total,
            r.txns_failed_after_routed_total,
            r.max_gap_p50,
            r.max_gap_p99,
            r.longest_connect_p50,
            r.longest_connect_p99
        );
    }
    s
}

/// The committed ids of `target` (of one kind of client, or all).
pub(crate) fn committed(samples: &[Sample], target: usize, kind: Option<Kind>) -> Vec<i64> {
    samples
        .iter()
        .filter(|s| s.target == target && kind.is_none_or(|k| s.kind == k))
        .filter_map(|s| match s.outcome {
            Outcome::Committed(id) => Some(id),
            _ => None,
        })
        .collect()
}
