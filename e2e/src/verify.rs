//! How every scenario ends: the cluster converges back to healthy, no two masters accepted
//! writes at once, and every acknowledged write is on the final master.

use crate::checker::{Checker, Report};
use crate::cluster::Cluster;
use crate::sql;
use anyhow::{bail, Context, Result};
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// Below a fork point, a lost write's recorded insert position may sit this much lower than
/// its commit (other writers' records in between).
const SLACK: u64 = 64 * 1024;
const DEFAULT_MAX_STANDBY_LAG: u64 = 1024 * 1024;

#[derive(Debug)]
pub struct Outcome {
    pub acked: usize,
    pub missing: usize,
    /// From the nemesis to the first acknowledged write on the final master.
    pub resumed: Option<Duration>,
    pub max_gap: Duration,
    pub master: String,
    pub report: Report,
}

impl Cluster {
    /// From `since` to the end of the last write `uid`'s PostgreSQL accepted directly (the
    /// checker's probes): when an isolated old master last took one.
    pub fn last_direct_write(
        &self,
        report: &Report,
        uid: &str,
        since: Instant,
    ) -> Option<Duration> {
        let (addr, port) = self.pg_addr(uid);
        let backend = format!("{addr}:{port}");
        (report.probes.iter())
            .filter(|w| w.backend == backend && w.start > since)
            .map(|w| w.end - since)
            .max()
    }

    /// Waits until proxy `i` refuses a session; how long after `since` that was.
    pub async fn wait_proxy_refuses(
        &self,
        i: usize,
        since: Instant,
        timeout: Duration,
    ) -> Result<Duration> {
        let (addr, port) = self.proxy_addr(i);
        self.wait_for("the proxy to refuse sessions", timeout, async || {
            let r = sql::query_text(&addr, port, "SELECT 1::text").await;
            r.is_err().then(|| since.elapsed())
        })
        .await
    }

    /// Ends a scenario with the invariants (see the module doc); prints one summary line.
    pub async fn finish(&self, name: &str, checker: Checker) -> Result<Outcome> {
        self.finish_with(name, checker, false).await
    }

    /// As `finish`, for a scenario where an earlier master legitimately becomes master
    /// again (overlapping writes still fail it).
    pub async fn finish_with(
        &self,
        name: &str,
        checker: Checker,
        master_may_return: bool,
    ) -> Result<Outcome> {
        self.wait_healthy(Duration::from_secs(120)).await?;
        // A little more traffic on the healed cluster: a rejoined old master must not take
        // writes either.
        checker.wait_acks(20, Duration::from_secs(10)).await;
        let report = checker.stop().await;
        if let Some(sb) = report.split_brain(master_may_return) {
            bail!("split brain: {sb}");
        }
        let master = self.master().await.context("no master at the end")?;
        let (addr, port) = self.pg_addr(&master);
        let backend = format!("{addr}:{port}");
        let missing = self.missing_acks(&report, &addr, port).await?;
        let outcome = Outcome {
            acked: report.acks.len(),
            missing,
            resumed: report.resumed_after(&backend),
            max_gap: report.max_gap(),
            master,
            report,
        };
        let r = &outcome.report;
        let before = r
            .acks
            .iter()
            .filter(|a| r.nemesis.is_none_or(|n| a.end <= n))
            .count();
        eprintln!(
            "E2E {name}: {} acknowledged writes ({before} before the nemesis), {} lost \
             (allowed by async), writes resumed on the final master {} after the nemesis, \
             longest gap {:?}, final master {}, writes per backend {:?}",
            outcome.acked,
            outcome.missing,
            outcome
                .resumed
                .map(|d| format!("{d:?}"))
                .unwrap_or_else(|| "-".into()),
            outcome.max_gap,
            outcome.master,
            r.backends(),
        );
        if r.acks.is_empty() {
            bail!("no write was acknowledged at all");
        }
        Ok(outcome)
    }

    /// The acknowledged writes missing on the master at addr:port; Err if any is missing
    /// with synchronous replication, or (async) lies outside maxStandbyLag of a fork point.
    async fn missing_acks(&self, report: &Report, addr: &str, port: u16) -> Result<usize> {
        let c = sql::connect(addr, port, Duration::from_secs(3)).await?;
        let rows = c.query("SELECT id FROM e2e_acked", &[]).await?;
        let present: HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
        let missing: Vec<_> = report
            .acks
            .iter()
            .filter(|a| !present.contains(&a.id))
            .collect();
        if missing.is_empty() {
            return Ok(0);
        }
        let (cd, _) = self.data().await.context("clusterdata")?;
        let spec = &cd.cluster.spec;
        if spec.synchronous_replication.unwrap_or(false) {
            bail!(
                "{} acknowledged writes lost with synchronous replication (ids {:?}...)",
                missing.len(),
                missing.iter().take(5).map(|a| a.id).collect::<Vec<_>>()
            );
        }
        let max_lag = spec
            .max_standby_lag
            .map(u64::from)
            .unwrap_or(DEFAULT_MAX_STANDBY_LAG);
        let forks = fork_points(&c).await?;
        for a in &missing {
            let explained = forks
                .iter()
                .any(|f| a.lsn + SLACK >= *f && a.lsn <= f + max_lag + SLACK);
            if !explained {
                bail!(
                    "acknowledged write {} (at {:X}, via {}) lost, not within maxStandbyLag \
                     {max_lag} of a timeline fork ({forks:X?})",
                    a.id,
                    a.lsn,
                    a.via
                );
            }
        }
        Ok(missing.len())
    }
}

/// The positions where the master's timeline history forked (from its history file).
async fn fork_points(c: &tokio_postgres::Client) -> Result<Vec<u64>> {
    let row = c
        .query_one(
            "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)",
            &[],
        )
        .await?;
    let tli: String = row.get(0);
    if tli == "00000001" {
        return Ok(Vec::new());
    }
    let row = c
        .query_one(&format!("SELECT pg_read_file('pg_wal/{tli}.history')"), &[])
        .await?;
    let text: String = row.get(0);
    Ok(text
        .lines()
        .filter_map(|l| sql::parse_lsn(l.split_whitespace().nth(1)?))
        .collect())
}
