//! `stolonctl status`: sentinels (leader marked), proxies, keepers with their db, the master
//! and the replication tree; as a readable table or stable JSON.

use super::{cluster_data, store_error};
use crate::model::{ClusterData, DbRole};
use crate::store::ClusterStore;
use anyhow::Result;
use serde::Serialize;
use std::fmt::Write as _;

#[derive(Debug, Serialize)]
pub struct Status {
    pub cluster_uid: String,
    pub phase: String,
    pub sentinels: Vec<SentinelRow>,
    pub proxies: Vec<ProxyRow>,
    pub keepers: Vec<KeeperRow>,
    pub master_keeper: Option<String>,
    pub master_db: Option<String>,
    pub proxy_master_db: Option<String>,
    pub proxy_generation: i64,
    /// master keeper -> standby keepers.
    pub tree: Vec<(String, Vec<String>)>,
}

#[derive(Debug, Serialize)]
pub struct SentinelRow {
    pub uid: String,
    pub leader: bool,
}

#[derive(Debug, Serialize)]
pub struct ProxyRow {
    pub uid: String,
    pub generation: i64,
}

#[derive(Debug, Serialize)]
pub struct KeeperRow {
    pub uid: String,
    pub healthy: bool,
    pub db: Option<String>,
    pub address: Option<String>,
    pub pg_healthy: bool,
    pub role: Option<String>,
    pub wanted_generation: i64,
    pub current_generation: i64,
    /// Bytes behind the master's last reported WAL position (standbys only).
    pub lag_bytes: Option<u64>,
}

fn keeper_rows(cd: &ClusterData) -> Vec<KeeperRow> {
    let master = cd.dbs.get(&cd.cluster.status.master);
    cd.keepers
        .values()
        .map(|k| {
            let db = cd.dbs.values().find(|d| d.spec.keeper_uid == k.uid);
            let role = db.and_then(|d| d.spec.role).map(|r| match r {
                DbRole::Master => "master".to_string(),
                DbRole::Standby => "standby".to_string(),
            });
            let lag = match (db, master) {
                (Some(d), Some(m)) if d.uid != m.uid => {
                    Some(m.status.x_log_pos.saturating_sub(d.status.x_log_pos))
                }
                _ => None,
            };
            KeeperRow {
                uid: k.uid.clone(),
                healthy: k.status.healthy,
                db: db.map(|d| d.uid.clone()),
                address: db.and_then(|d| {
                    let p = d.status.port?;
                    Some(format!("{}:{p}", d.status.listen_address))
                }),
                pg_healthy: db.is_some_and(|d| d.status.healthy),
                role,
                wanted_generation: db.map_or(0, |d| d.generation),
                current_generation: db.map_or(0, |d| d.status.current_generation),
                lag_bytes: lag,
            }
        })
        .collect()
}

pub async fn status(store: &ClusterStore) -> Result<Status> {
    let (cd, _) = cluster_data(store).await?;
    let sentinels = store
        .sentinel_infos()
        .await
        .map_err(|e| store_error(store, e))?;
    let proxies = store
        .proxy_infos()
        .await
        .map_err(|e| store_error(store, e))?;
    let leader = store
        .election(crate::store::LEADER_TTL)
        .leader()
        .await
        .ok()
        .flatten()
        .and_then(|kv| String::from_utf8(kv.value).ok());
    let master = cd.dbs.get(&cd.cluster.status.master);
    let master_keeper = master.map(|d| d.spec.keeper_uid.clone());
    let tree = master
        .map(|m| {
            let standbys = m
                .spec
                .followers
                .iter()
                .filter_map(|f| cd.dbs.get(f).map(|d| d.spec.keeper_uid.clone()))
                .collect();
            vec![(m.spec.keeper_uid.clone(), standbys)]
        })
        .unwrap_or_default();
    Ok(Status {
        cluster_uid: cd.cluster.uid.clone(),
        phase: format!("{:?}", cd.cluster.status.phase.unwrap_or_default()).to_lowercase(),
        sentinels: sentinels
            .items
            .keys()
            .map(|uid| SentinelRow {
                uid: uid.clone(),
                leader: leader.as_deref() == Some(uid.as_str()),
            })
            .collect(),
        proxies: proxies
            .items
            .iter()
            .map(|(uid, p)| ProxyRow {
                uid: uid.clone(),
                generation: p.generation,
            })
            .collect(),
        keepers: keeper_rows(&cd),
        master_keeper,
        master_db: master.map(|d| d.uid.clone()),
        proxy_master_db: Some(cd.proxy.spec.master_db_uid.clone()).filter(|s| !s.is_empty()),
        proxy_generation: cd.proxy.generation,
        tree,
    })
}

pub fn render_text(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "cluster {} ({})", s.cluster_uid, s.phase);
    let _ = writeln!(out, "\n=== sentinels ===");
    for r in &s.sentinels {
        let _ = writeln!(out, "{}{}", r.uid, if r.leader { " (leader)" } else { "" });
    }
    let _ = writeln!(
        out,
        "\n=== proxies === (cluster proxy generation {})",
        s.proxy_generation
    );
    for r in &s.proxies {
        let _ = writeln!(out, "{}  generation {}", r.uid, r.generation);
    }
    let _ = writeln!(out, "\n=== keepers ===");
    out.push_str(
        "UID          HEALTHY  ADDRESS                PG HEALTHY ROLE     GENERATION  LAG\n",
    );
    for k in &s.keepers {
        let _ = writeln!(
            out,
            "{:<12} {:<8} {:<22} {:<10} {:<8} {:<11} {}",
            k.uid,
            k.healthy,
            k.address.as_deref().unwrap_or("-"),
            k.pg_healthy,
            k.role.as_deref().unwrap_or("-"),
            format!("{}/{}", k.current_generation, k.wanted_generation),
            k.lag_bytes.map_or("-".to_string(), |l| format!("{l} B")),
        );
    }
    let _ = writeln!(out, "\n=== cluster ===");
    let _ = writeln!(
        out,
        "master: {} (db {}); proxies route to: {}",
        s.master_keeper.as_deref().unwrap_or("none"),
        s.master_db.as_deref().unwrap_or("-"),
        s.proxy_master_db.as_deref().unwrap_or("none (fenced)")
    );
    for (m, standbys) in &s.tree {
        let _ = writeln!(out, "{m}");
        for (i, sb) in standbys.iter().enumerate() {
            let branch = if i + 1 == standbys.len() {
                "└─"
            } else {
                "├─"
            };
            let _ = writeln!(out, "{branch}{sb}");
        }
    }
    out
}
