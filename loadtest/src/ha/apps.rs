//! Application writers in other languages (`--app-writers`): psycopg2 (libpq, autocommit
//! simple queries), pgx (its statement cache: named prepared statements), pgjdbc
//! (server-side prepared statements) and `pgbench -M prepared`, one of each through each
//! target, each a process of its own (`clients/`, built by scripts/clients.sh) that keeps
//! one session and opens it again after an error, as a pool does. Each prints a line as an
//! attempt ends (see `clients/psycopg2_client.py`'s `ha_writer`); the line becomes a
//! `Sample` of its kind, so these clients are judged exactly as loadtest's own: failed
//! connects and transactions, the longest gap with no commit, acknowledged writes lost.
//!
//! pgbench cannot reconnect: at an error its client aborts and, with one client, pgbench
//! exits. It is started again then (an application's restart), and the abort counts as a
//! failed transaction (a failed connect if it never wrote). Its script prints the line
//! itself: `\shell echo ok :id` after the INSERT returned, so only acknowledged ids.

use super::clients::{Endpoint, Kind, Outcome, Sample, Shared};
use anyhow::{Context, Result};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The writers, by kind.
pub const APPS: [Kind; 4] = [Kind::Psycopg2, Kind::Pgx, Kind::Pgjdbc, Kind::Pgbench];

/// pgbench's script: an autocommit INSERT of the next id of its range (a sequence: pgbench
/// has no counter of its own), the acknowledged id printed, then the think time.
fn pgbench_script(think: Duration) -> String {
    format!(
        "INSERT INTO lt_writes (id, client) VALUES (:base + nextval('lt_pgbench_ids'), :client) RETURNING id \\gset\n\
         \\shell echo ok :id 0\n\
         \\sleep {} ms\n",
        think.as_millis()
    )
}

/// Ids of a writer: its own range (loadtest's clients count from 1).
fn id_base(target: usize, app: usize) -> i64 {
    (1 + target as i64 * APPS.len() as i64 + app as i64) * 1_000_000_000_000
}

/// Fails unless every writer can run here (scripts/clients.sh built them).
pub fn check() -> Result<()> {
    for f in ["target/clients/pgx-client", "target/clients/postgresql.jar"] {
        let p = testkit::workspace_path(f);
        anyhow::ensure!(
            p.exists(),
            "{} missing: run scripts/clients.sh",
            p.display()
        );
    }
    Ok(())
}

fn command(kind: Kind, e: &Endpoint, sh: &Shared, script: &std::path::Path) -> Command {
    let (user, password) = &sh.login;
    let ssl = if sh.tls { "require" } else { "disable" };
    let timeout = sh.connect_timeout.as_secs().max(1);
    let conninfo = format!(
        "host={} port={} user={user} password={password} dbname=postgres sslmode={ssl} connect_timeout={timeout}",
        e.addr, e.port
    );
    let mut c = match kind {
        Kind::Pgbench => {
            let mut c = Command::new(testkit::postgres::pg_bin_dir().join("pgbench"));
            // The password from the environment, not argv.
            let conninfo = conninfo.replace(&format!(" password={password}"), "");
            c.env("PGPASSWORD", password)
                .args(["-n", "-M", "prepared", "-c", "1", "-T", "86400", "-f"])
                .arg(script)
                .arg(conninfo);
            c
        }
        Kind::Psycopg2 => {
            // Debian's python3, where scripts/deps.sh installs psycopg2.
            let mut c = Command::new("/usr/bin/python3");
            c.arg(testkit::workspace_path("clients/psycopg2_client.py"));
            c.env("CONNINFO", conninfo);
            c
        }
        Kind::Pgx => {
            let mut c = Command::new(testkit::workspace_path("target/clients/pgx-client"));
            c.env("CONNINFO", conninfo);
            c
        }
        _ => {
            let mut c = Command::new("java");
            let url = format!(
                "jdbc:postgresql://{}:{}/postgres?sslmode={ssl}&connectTimeout={timeout}",
                e.addr, e.port
            );
            c.arg("-cp")
                .arg(testkit::workspace_path("target/clients/postgresql.jar"))
                .arg(testkit::workspace_path("clients/pgjdbc/Client.java"))
                .args([url.as_str(), user, password, "ha"]);
            c
        }
    };
    c.env("MODE", "ha")
        .env("THINK_MS", sh.think.as_millis().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    c
}

/// A running writer: its process (pgbench's is owned by `reader`, which restarts it).
pub struct Writer {
    child: Option<Child>,
    reader: tokio::task::JoinHandle<()>,
}

impl Writer {
    /// Stops it (what it printed is recorded already).
    pub async fn stop(mut self) {
        match self.child.as_mut() {
            Some(child) => {
                let _ = child.kill().await;
                let _ = tokio::time::timeout(Duration::from_secs(5), self.reader).await;
            }
            // Dropping the task's future kills the pgbench it runs (kill_on_drop).
            None => self.reader.abort(),
        }
    }
}

/// Runs pgbench through `e` until the run stops, starting it again whenever it exits.
async fn pgbench(sh: Arc<Shared>, target: usize, mut cmd: Command) {
    while !sh.stop.is_cancelled() {
        let Ok(mut child) = cmd.spawn() else {
            return;
        };
        let Some(out) = child.stdout.take() else {
            return;
        };
        let started = Instant::now();
        let lines = record(sh.clone(), target, Kind::Pgbench, out).await;
        let _ = child.wait().await;
        if sh.stop.is_cancelled() {
            return;
        }
        let end = sh.t0.elapsed().as_secs_f64();
        let outcome = match lines {
            0 => Outcome::ConnectFailed("pgbench".into()),
            _ => Outcome::TxnFailed("pgbench-abort".into()),
        };
        let start = (end - started.elapsed().as_secs_f64()).max(0.0);
        sh.push(Sample {
            target,
            kind: Kind::Pgbench,
            start: if lines == 0 { start } else { end },
            end,
            outcome,
        });
        // As an application restarting it would, not in a tight loop.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts one writer of each kind through each endpoint; returns once each has committed.
/// Their stderr goes to `out_dir/writer-<target>-<kind>.err`.
pub async fn start(
    sh: &Arc<Shared>,
    endpoints: &[Endpoint],
    first_no: i32,
    out_dir: &std::path::Path,
) -> Result<Vec<Writer>> {
    std::fs::create_dir_all(out_dir)?;
    let script = out_dir.join("pgbench-writer.sql");
    std::fs::write(&script, pgbench_script(sh.think))?;
    let mut writers = Vec::new();
    let mut no = first_no;
    for e in endpoints {
        for (i, kind) in APPS.into_iter().enumerate() {
            let mut cmd = command(kind, e, sh, &script);
            let err = out_dir.join(format!("writer-{}-{}.err", e.target, kind.name()));
            let base = id_base(e.target, i);
            cmd.env("ID_BASE", base.to_string())
                .env("CLIENT_NO", no.to_string())
                .stderr(std::fs::File::create(&err)?);
            if kind == Kind::Pgbench {
                // pgbench's variables; its stderr (aborts) kept across restarts.
                cmd.args(["-D", &format!("base={base}"), "-D", &format!("client={no}")]);
                let err = std::fs::OpenOptions::new().append(true).open(&err)?;
                cmd.stderr(err);
                let reader = tokio::spawn(pgbench(sh.clone(), e.target, cmd));
                writers.push(Writer {
                    child: None,
                    reader,
                });
                no += 1;
                continue;
            }
            no += 1;
            let mut child = cmd
                .spawn()
                .with_context(|| format!("starting the {kind:?} writer"))?;
            let out = child.stdout.take().context("writer stdout")?;
            let (sh, target) = (sh.clone(), e.target);
            let reader = tokio::spawn(async move {
                record(sh, target, kind, out).await;
            });
            writers.push(Writer {
                child: Some(child),
                reader,
            });
        }
    }
    // Java takes a few seconds to start: the first change waits for every writer.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let log = sh.log.lock().map(|l| l.clone()).unwrap_or_default();
        let writing = |t: usize, k: Kind| {
            log.iter()
                .any(|s| s.target == t && s.kind == k && matches!(s.outcome, Outcome::Committed(_)))
        };
        let idle: Vec<String> = endpoints
            .iter()
            .flat_map(|e| APPS.iter().map(move |k| (e.target, *k)))
            .filter(|(t, k)| !writing(*t, *k))
            .map(|(t, k)| format!("{} through {}", k.name(), super::TARGETS[t]))
            .collect();
        if idle.is_empty() {
            return Ok(writers);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "application writers not writing after 120 s: {idle:?} (their stderr: {})",
            out_dir.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Turns each line a writer prints into a sample, timed as it arrives; returns how many.
async fn record(
    sh: Arc<Shared>,
    target: usize,
    kind: Kind,
    out: tokio::process::ChildStdout,
) -> usize {
    let mut lines = BufReader::new(out).lines();
    let mut n = 0;
    while let Ok(Some(line)) = lines.next_line().await {
        let Some((outcome, took)) = parse(&line) else {
            continue;
        };
        n += 1;
        let end = sh.t0.elapsed().as_secs_f64();
        let s = Sample {
            target,
            kind,
            start: (end - took).max(0.0),
            end,
            outcome,
        };
        sh.push(s);
    }
    n
}

/// One line: the outcome and how long the attempt took (seconds).
fn parse(line: &str) -> Option<(Outcome, f64)> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let us = |w: &str| w.parse::<u64>().ok().map(|u| u as f64 / 1e6);
    match words[..] {
        ["connected", t] => Some((Outcome::Connected, us(t)?)),
        ["connect_error", k, t] => Some((Outcome::ConnectFailed(k.into()), us(t)?)),
        ["ok", id, t] => Some((Outcome::Committed(id.parse().ok()?), us(t)?)),
        ["error", k, t] => Some((Outcome::TxnFailed(k.into()), us(t)?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_lines() {
        assert_eq!(parse("connected 1500"), Some((Outcome::Connected, 0.0015)));
        assert_eq!(
            parse("connect_error refused 20"),
            Some((Outcome::ConnectFailed("refused".into()), 0.00002))
        );
        assert_eq!(
            parse("ok 1000000000007 1000000"),
            Some((Outcome::Committed(1_000_000_000_007), 1.0))
        );
        assert_eq!(
            parse("error 57P01 3"),
            Some((Outcome::TxnFailed("57P01".into()), 0.000003))
        );
        for bad in [
            "",
            "ok",
            "ok x 1",
            "error 57P01",
            "connected -1",
            "hello 1 2",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn id_ranges_do_not_meet() {
        let bases: Vec<i64> = (0..2)
            .flat_map(|t| (0..APPS.len()).map(move |a| id_base(t, a)))
            .collect();
        assert!(bases.windows(2).all(|w| w[1] - w[0] >= 1_000_000_000_000));
        assert!(bases[0] > 1_000_000_000);
    }
}
