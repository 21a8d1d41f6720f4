//! "The cluster converges back to healthy": one routed master that every running proxy
//! reaches, every running keeper's db healthy and converged, every standby streaming.

use crate::cluster::Cluster;
use crate::sql;
use anyhow::{bail, ensure, Context, Result};
use control::model::DbRole;
use std::time::{Duration, Instant};

/// Whether the process is gone (exited, or a zombie not yet reaped).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

impl Cluster {
    /// Fails fast when a process the cluster started has died (a bad flag, say).
    pub fn all_alive(&self) -> Result<()> {
        let procs = self.keepers.iter().map(|k| (&k.uid, &k.child)).chain(
            self.sentinels
                .iter()
                .chain(&self.proxies)
                .map(|p| (&p.name, &p.child)),
        );
        for (name, child) in procs {
            if let Some(c) = child {
                if gone(c.pid()) {
                    let log = self.log(name);
                    let tail: Vec<&str> = log.lines().rev().take(8).collect();
                    bail!(
                        "{name} exited: {}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
            }
        }
        Ok(())
    }

    /// Waits until the cluster is healthy and stays so for 2 s: right after a failover a
    /// standby can look fine for a moment before its keeper finds it forked and rebuilds it.
    pub async fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut healthy_since: Option<Instant> = None;
        loop {
            self.all_alive()?;
            let err = match self.health().await {
                Ok(()) => {
                    let since = *healthy_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= Duration::from_secs(2) {
                        return Ok(());
                    }
                    None
                }
                Err(e) => {
                    healthy_since = None;
                    Some(e)
                }
            };
            if Instant::now() > deadline {
                match err {
                    Some(e) => bail!("not healthy after {timeout:?}: {e:#}"),
                    None => bail!("healthy only intermittently within {timeout:?}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// One check of the healthy state; the error says what is missing.
    pub async fn health(&self) -> Result<()> {
        self.all_alive()?;
        let (cd, _) = self.data().await.context("no clusterdata")?;
        if let Some(want) = expected_pg_major() {
            // The version matrix (scripts/test.sh): each scenario proves what it ran on.
            for (uid, k) in &cd.keepers {
                let got = k.status.postgres_binary_version.maj;
                ensure!(
                    got == want,
                    "keeper {uid} runs PostgreSQL {got}, not E2E_PG_MAJOR {want}"
                );
            }
        }
        let master = &cd.cluster.status.master;
        ensure!(!master.is_empty(), "no master db");
        ensure!(
            &cd.proxy.spec.master_db_uid == master,
            "proxies are not routed to the master db {master}"
        );
        let mdb = cd.dbs.get(master).context("master db missing")?;
        let mk = mdb.spec.keeper_uid.clone();
        let mut standbys: Vec<String> = Vec::new();
        let mut free = Vec::new();
        for k in self.keepers.iter().filter(|k| k.child.is_some()) {
            let Some(db) = cd.dbs.values().find(|d| d.spec.keeper_uid == k.uid) else {
                free.push(k.uid.clone());
                continue;
            };
            ensure!(db.status.healthy, "db of keeper {} is not healthy", k.uid);
            ensure!(
                db.status.current_generation == db.generation,
                "db of keeper {} has not converged",
                k.uid
            );
            if k.uid != mk {
                ensure!(
                    db.spec.role == Some(DbRole::Standby),
                    "keeper {} holds a db that is not a standby",
                    k.uid
                );
                standbys.push(db.uid.clone());
            }
        }
        // A running keeper without a db is fine only when the standbys are capped.
        let spec = &cd.cluster.spec;
        let cap = spec.max_standbys().min(spec.max_standbys_per_sender());
        ensure!(
            free.is_empty() || standbys.len() >= usize::from(cap),
            "keepers {free:?} have no db though only {} standbys run",
            standbys.len()
        );
        // Every standby streams from the master (its application_name is stolon_<db>).
        let (addr, port) = self.pg_addr(&mk);
        let streaming = sql::query_text(
            &addr,
            port,
            "SELECT coalesce(string_agg(application_name, ','), '') FROM pg_stat_replication \
             WHERE state = 'streaming'",
        )
        .await
        .context("asking the master for its standbys")?;
        for db in &standbys {
            ensure!(
                streaming.split(',').any(|a| a == format!("stolon_{db}")),
                "standby {db} does not stream from the master (streaming: {streaming})"
            );
        }
        // Streaming alone is not enough: a standby that forked streams the old timeline up
        // to the fork and stops there. Each must replay what the master has written by now
        // (within a few seconds), asked of PostgreSQL itself: the cluster view can be a
        // round behind.
        let master_lsn = sql::query_text(&addr, port, "SELECT pg_current_wal_lsn()::text").await?;
        for k in self
            .keepers
            .iter()
            .filter(|k| k.child.is_some() && k.uid != mk)
        {
            if free.contains(&k.uid) {
                continue;
            }
            let (a, p) = self.pg_addr(&k.uid);
            let q = format!("SELECT (pg_last_wal_replay_lsn() >= '{master_lsn}'::pg_lsn)::text");
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                let caught_up = sql::query_text(&a, p, &q).await.is_ok_and(|v| v == "true");
                if caught_up {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "standby {} has not replayed the master's WAL up to {master_lsn}",
                    k.uid
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        for (i, p) in self.proxies.iter().enumerate() {
            if p.child.is_none() {
                continue;
            }
            let (addr, pport) = self.proxy_addr(i);
            let answer = sql::query_text(
                &addr,
                pport,
                "SELECT inet_server_port()::text || ' ' || pg_is_in_recovery()::text",
            )
            .await
            .with_context(|| format!("through proxy {}", p.name))?;
            ensure!(
                answer == format!("{port} false"),
                "proxy {} reaches {answer}, not the master at port {port}",
                p.name
            );
        }
        Ok(())
    }
}

/// The PostgreSQL major version every keeper must run (`E2E_PG_MAJOR`, set with
/// `PG_BIN_PATH` by the version matrix), if one is asked for.
fn expected_pg_major() -> Option<u32> {
    std::env::var("E2E_PG_MAJOR").ok()?.parse().ok()
}
