//! Side by side, in one run: rounds alternate the targets (rotating their order), each
//! workload's TPS is taken as a ratio to direct PostgreSQL in the same round, and the
//! proxy's CPU time per transaction is read from /proc.

use crate::pgbench::{self, Outcome, Workload, WORKLOADS};
use crate::procstat::{cpu_times, sleeps};
use crate::targets::{self, Target};
use anyhow::Result;
use std::collections::BTreeMap;

pub struct Options {
    pub rounds: usize,
    pub seconds: u32,
    pub scale: u32,
    pub engines: Vec<String>,
    pub peers: bool,
    /// Extra HAProxy targets pinned to these thread counts (`nbthread`), as `haproxy:N`.
    pub haproxy_threads: Vec<u32>,
    pub workloads: Option<Vec<String>>,
    pub out: Option<std::path::PathBuf>,
    /// How pgbench reaches every target: plaintext, TLS, or a SCRAM role.
    pub security: crate::security::Security,
}

#[derive(Clone, Debug)]
struct Sample {
    round: usize,
    outcome: Outcome,
    cpu_us_per_tx: Option<f64>,
    /// The user-space part of it.
    user_us_per_tx: Option<f64>,
    /// Voluntary context switches of the proxy process per transaction (its wake-ups).
    sleeps_per_tx: Option<f64>,
}

pub fn run(opts: &Options) -> Result<()> {
    let sec = crate::security::Secured::new(opts.security)?;
    let mut settings: Vec<(String, String)> = vec![
        ("max_connections".into(), "300".into()),
        ("shared_buffers".into(), "256MB".into()),
    ];
    settings.extend(sec.pg_settings());
    let refs: Vec<(&str, &str)> = settings
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let pg = testkit::Postgres::start(&refs)?;
    eprintln!(
        "postgres on {}; initialising pgbench scale {} ({:?})",
        pg.port(),
        opts.scale,
        opts.security
    );
    pgbench::init(pg.port(), opts.scale)?;
    sec.prepare(&pg)?;
    let login = sec.login();
    let etcd = testkit::Etcd::start()?;
    let logs = testkit::temp_dir("bench-logs")?;
    let uids: Vec<String> = opts.engines.iter().map(|e| format!("bench-{e}")).collect();
    write_clusterdata(&etcd, pg.port(), &uids)?;

    let mut targets = vec![Target::direct(&pg)];
    for (engine, uid) in opts.engines.iter().zip(&uids) {
        if let Some(mode) = engine.strip_prefix("proto-") {
            targets.push(targets::relay_proto(pg.port(), mode)?);
            continue;
        }
        targets.push(targets::stolon_proxy(
            &etcd,
            "bench",
            uid,
            engine,
            logs.path(),
            &sec.terminate_flags(),
        )?);
    }
    if opts.peers {
        targets.push(targets::haproxy(pg.port(), None)?);
        for n in &opts.haproxy_threads {
            targets.push(targets::haproxy(pg.port(), Some(*n))?);
        }
        targets.push(targets::pgbouncer(pg.port(), sec.pgbouncer())?);
    }
    // Wait until every proxy routes (they listen only after reading the store).
    std::thread::sleep(std::time::Duration::from_secs(1));

    let workloads: Vec<&Workload> = WORKLOADS
        .iter()
        .filter(|w| {
            opts.workloads
                .as_ref()
                .is_none_or(|names| names.iter().any(|n| n == w.name))
        })
        .collect();
    let mut samples: BTreeMap<(&str, String), Vec<Sample>> = BTreeMap::new();
    for round in 0..opts.rounds {
        for w in &workloads {
            let n = targets.len();
            for i in 0..n {
                let t = &targets[(i + round) % n];
                let sample = measure(round, t, w, &login, opts.seconds)?;
                eprintln!(
                    "round {round} {:<22} {:<16} tps {:>9.1}  lat {:>7.3} ms  cpu/tx {} (user {})  sleeps/tx {}",
                    w.name,
                    t.name,
                    sample.outcome.tps,
                    sample.outcome.latency_ms,
                    (sample.cpu_us_per_tx).map_or("-".into(), |c| format!("{c:.1} us")),
                    (sample.user_us_per_tx).map_or("-".into(), |c| format!("{c:.1}")),
                    (sample.sleeps_per_tx).map_or("-".into(), |c| format!("{c:.2}"))
                );
                samples
                    .entry((w.name, t.name.clone()))
                    .or_default()
                    .push(sample);
            }
        }
    }
    let mut report = summarise(&workloads, &targets, &samples, opts);
    report += &verdicts(&workloads, &targets, &samples);
    println!("{report}");
    if let Some(out) = &opts.out {
        std::fs::write(out, &report)?;
    }
    Ok(())
}

/// One pgbench run of `w` against `t`, with the target process's CPU time and sleeps over it.
fn measure(
    round: usize,
    t: &Target,
    w: &Workload,
    login: &pgbench::Login,
    seconds: u32,
) -> Result<Sample> {
    let cpu0 = t.pid.map(cpu_times);
    let sleeps0 = t.pid.map(sleeps);
    let outcome = pgbench::run(t.port, login, w, seconds)?;
    let per_tx = |v: f64| v / outcome.transactions.max(1.0);
    let used = t.pid.zip(cpu0).map(|(pid, (u0, s0))| {
        let (u, s) = cpu_times(pid);
        (u - u0, s - s0)
    });
    Ok(Sample {
        round,
        outcome,
        cpu_us_per_tx: used.map(|(u, s)| per_tx((u + s) * 1e6)),
        user_us_per_tx: used.map(|(u, _)| per_tx(u * 1e6)),
        sleeps_per_tx: (t.pid.zip(sleeps0))
            .map(|(pid, s0)| per_tx(sleeps(pid).saturating_sub(s0) as f64)),
    })
}

fn write_clusterdata(etcd: &testkit::Etcd, pg_port: u16, uids: &[String]) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let cfg = control::store::etcd::EtcdConfig {
            endpoints: vec![etcd.endpoint()],
            connect_timeout: std::time::Duration::from_secs(2),
            ..Default::default()
        };
        let store = std::sync::Arc::new(control::store::etcd::EtcdStore::connect(&cfg).await?);
        let cs = control::store::ClusterStore::new(store, "stolon/cluster", "bench");
        cs.put_cluster_data(&targets::routing_clusterdata(pg_port, uids), 0, None)
            .await?;
        Ok(())
    })
}

/// The median of `v` to `digits` decimals, or "-" when nothing was measured.
fn median_or_dash(v: Vec<f64>, digits: usize) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        format!("{:.digits$}", median(v))
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[m - 1] + v[m]) / 2.0
    } else {
        v[m]
    }
}

fn summarise(
    workloads: &[&Workload],
    targets: &[Target],
    samples: &BTreeMap<(&str, String), Vec<Sample>>,
    opts: &Options,
) -> String {
    let mut out = format!(
        "### stolon-proxy vs direct / HAProxy / PgBouncer: {} rounds x {} s, pgbench scale {}, clients {:?}\n\n\
         | workload | target | TPS ratio to direct: median (min-max) | median TPS | added latency (ms) | CPU per tx (us) | of it user (us) | sleeps per tx |\n\
         |---|---|---|---|---|---|---|---|\n",
        opts.rounds, opts.seconds, opts.scale, opts.security
    );
    for w in workloads {
        let direct = &samples[&(w.name, "direct".to_string())];
        let by_round = |s: &Sample| {
            direct
                .iter()
                .find(|d| d.round == s.round)
                .map(|d| d.outcome)
        };
        for t in targets {
            let Some(ss) = samples.get(&(w.name, t.name.clone())) else {
                continue;
            };
            let ratios: Vec<f64> = ss
                .iter()
                .filter_map(|s| by_round(s).map(|d| s.outcome.tps / d.tps))
                .collect();
            let added: Vec<f64> = ss
                .iter()
                .filter_map(|s| by_round(s).map(|d| s.outcome.latency_ms - d.latency_ms))
                .collect();
            let cpu: Vec<f64> = ss.iter().filter_map(|s| s.cpu_us_per_tx).collect();
            let user: Vec<f64> = ss.iter().filter_map(|s| s.user_us_per_tx).collect();
            let sleeps: Vec<f64> = ss.iter().filter_map(|s| s.sleeps_per_tx).collect();
            let (lo, hi) = ratios
                .iter()
                .fold((f64::MAX, f64::MIN), |(l, h), r| (l.min(*r), h.max(*r)));
            out += &format!(
                "| {} | {} | {:.3} ({:.3}-{:.3}) | {:.0} | {:.4} | {} | {} | {} |\n",
                w.name,
                t.name,
                median(ratios.clone()),
                lo,
                hi,
                median(ss.iter().map(|s| s.outcome.tps).collect()),
                median(added),
                median_or_dash(cpu, 1),
                median_or_dash(user, 1),
                median_or_dash(sleeps, 2),
            );
        }
    }
    out
}

/// Per-round TPS ratios to direct of one target on one workload.
fn ratios(
    samples: &BTreeMap<(&str, String), Vec<Sample>>,
    workload: &str,
    target: &str,
) -> Vec<f64> {
    let Some(direct) = samples.get(&(workload, "direct".to_string())) else {
        return vec![];
    };
    let Some(ss) = samples.get(&(workload, target.to_string())) else {
        return vec![];
    };
    ss.iter()
        .filter_map(|s| {
            let d = direct.iter().find(|d| d.round == s.round)?;
            Some(s.outcome.tps / d.outcome.tps)
        })
        .collect()
}

fn spread(v: &[f64]) -> f64 {
    let (lo, hi) = v
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), r| (l.min(*r), h.max(*r)));
    if v.is_empty() {
        f64::NAN
    } else {
        hi - lo
    }
}

/// "Beats" as the proxy issue defines it: a higher median ratio, by more than the
/// round-to-round spread (the larger of the two targets' max-min ranges).
fn verdicts(
    workloads: &[&Workload],
    targets: &[Target],
    samples: &BTreeMap<(&str, String), Vec<Sample>>,
) -> String {
    let engines: Vec<&str> = targets
        .iter()
        .map(|t| t.name.as_str())
        .filter(|n| n.starts_with("stolon-"))
        .collect();
    let peers: Vec<&str> = targets
        .iter()
        .map(|t| t.name.as_str())
        .filter(|n| n.starts_with("haproxy") || *n == "pgbouncer")
        .collect();
    if engines.is_empty() || peers.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\n| workload | engine | peer | engine median | peer median | margin | spread | beats? |\n|---|---|---|---|---|---|---|---|\n",
    );
    for w in workloads {
        for e in &engines {
            let er = ratios(samples, w.name, e);
            for p in &peers {
                let pr = ratios(samples, w.name, p);
                let (em, pm) = (median(er.clone()), median(pr.clone()));
                let sp = spread(&er).max(spread(&pr));
                let margin = em - pm;
                let verdict = if margin > sp {
                    "yes"
                } else if margin > 0.0 {
                    "higher, within spread"
                } else {
                    "no"
                };
                out += &format!(
                    "| {} | {e} | {p} | {em:.3} | {pm:.3} | {margin:+.3} | {sp:.3} | {verdict} |\n",
                    w.name
                );
            }
        }
    }
    out
}
