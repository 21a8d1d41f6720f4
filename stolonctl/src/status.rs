//! `stolonctl status`: sentinels (leader marked), proxies, keepers with their db, the master
//! and the replication tree; as a readable table or JSON. The JSON has Go stolon's schema
//! (`sentinels[].uid/leader`, `proxies[].uid/generation`, `keepers[].uid/listen_address/
//! healthy/pg_healthy/pg_wanted_generation/pg_current_generation`, `cluster.available/
//! master_keeper_uid/master_db_uid`), so scripts written for it work; our extra fields
//! (role, lag, the proxies' route, the tree) are additional keys.

use super::{cluster_data, store_error};
use anyhow::Result;
use serde::Serialize;
use std::fmt::Write as _;
use stolon_core::model::{ClusterData, DbRole};
use stolon_store::ClusterStore;

#[derive(Debug, Serialize)]
pub struct Status {
    pub sentinels: Vec<SentinelRow>,
    pub proxies: Vec<ProxyRow>,
    pub keepers: Vec<KeeperRow>,
    pub cluster: ClusterRow,
    pub cluster_uid: String,
    pub phase: String,
    pub proxy_master_db: Option<String>,
    /// The maintenance pause in force (none when there is none or it has expired).
    pub paused: Option<stolon_core::model::Pause>,
    pub proxy_generation: i64,
    /// master keeper -> standby keepers.
    pub tree: Vec<(String, Vec<String>)>,
    /// Spec `failsafeMode` (ours).
    pub failsafe_mode: bool,
}

/// Go's `ClusterStatus`: empty strings when there is no master, as Go writes them.
#[derive(Debug, Serialize)]
pub struct ClusterRow {
    pub available: bool,
    pub master_keeper_uid: String,
    pub master_db_uid: String,
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
    /// `host:port`, or Go's "(no db assigned)" / "(unknown)".
    pub listen_address: String,
    pub healthy: bool,
    pub pg_healthy: bool,
    pub pg_wanted_generation: i64,
    pub pg_current_generation: i64,
    pub db: Option<String>,
    pub role: Option<String>,
    /// Bytes behind the master's last reported WAL position (standbys only).
    pub lag_bytes: Option<u64>,
    /// Failsafe mode: the keeper's state as it last published it.
    pub failsafe: Option<stolon_core::model::FailsafeReport>,
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
            let listen_address = match db {
                None => "(no db assigned)".to_string(),
                Some(d) if d.status.listen_address.is_empty() => "(unknown)".to_string(),
                Some(d) => format!(
                    "{}:{}",
                    d.status.listen_address,
                    d.status.port.map(|p| p.to_string()).unwrap_or_default()
                ),
            };
            KeeperRow {
                uid: k.uid.clone(),
                listen_address,
                healthy: k.status.healthy,
                pg_healthy: db.is_some_and(|d| d.status.healthy),
                pg_wanted_generation: db.map_or(0, |d| d.generation),
                pg_current_generation: db.map_or(0, |d| d.status.current_generation),
                db: db.map(|d| d.uid.clone()),
                role,
                lag_bytes: lag,
                failsafe: None,
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
    let keeper_infos = store
        .keeper_infos()
        .await
        .map_err(|e| store_error(store, e))?;
    let mut keepers = keeper_rows(&cd);
    for k in &mut keepers {
        k.failsafe = keeper_infos
            .items
            .get(&k.uid)
            .and_then(|i| i.failsafe.clone());
    }
    let leader = store
        .election(stolon_store::LEADER_TTL)
        .leader()
        .await
        .ok()
        .flatten()
        .and_then(|kv| String::from_utf8(kv.value).ok());
    let master = cd.dbs.get(&cd.cluster.status.master);
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
        keepers,
        failsafe_mode: cd.cluster.spec.failsafe_mode(),
        cluster: ClusterRow {
            available: true,
            master_keeper_uid: master
                .map(|d| d.spec.keeper_uid.clone())
                .unwrap_or_default(),
            master_db_uid: master.map(|d| d.uid.clone()).unwrap_or_default(),
        },
        proxy_master_db: Some(cd.proxy.spec.master_db_uid.clone()).filter(|s| !s.is_empty()),
        paused: super::pause_state(store)
            .await?
            .filter(|p| p.active(stolon_core::model::Timestamp::now())),
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
            k.listen_address,
            k.pg_healthy,
            k.role.as_deref().unwrap_or("-"),
            format!("{}/{}", k.pg_current_generation, k.pg_wanted_generation),
            k.lag_bytes.map_or("-".to_string(), |l| format!("{l} B")),
        );
    }
    let _ = writeln!(out, "\n=== cluster ===");
    if let Some(p) = &s.paused {
        let until = p
            .until
            .map_or("`stolonctl resume`".to_string(), |u| u.to_string());
        let why = if p.reason.is_empty() {
            "-"
        } else {
            p.reason.as_str()
        };
        let _ = writeln!(
            out,
            "PAUSED since {} until {until} (reason: {why}): no topology changes",
            p.since
        );
    }
    let _ = writeln!(
        out,
        "master: {} (db {}); proxies route to: {}",
        Some(s.cluster.master_keeper_uid.as_str())
            .filter(|m| !m.is_empty())
            .unwrap_or("none"),
        Some(s.cluster.master_db_uid.as_str())
            .filter(|m| !m.is_empty())
            .unwrap_or("-"),
        s.proxy_master_db.as_deref().unwrap_or("none (fenced)")
    );
    if s.failsafe_mode {
        let _ = writeln!(out, "failsafe mode: on");
        for k in &s.keepers {
            if let Some(line) = k.failsafe.as_ref().and_then(failsafe_line) {
                let _ = writeln!(out, "  {}: {line}", k.uid);
            }
        }
    }
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

/// "held since T, acks N/M" for a holding master, "promised to D for X ms" for a keeper
/// that acknowledged one; nothing when neither.
fn failsafe_line(r: &stolon_core::model::FailsafeReport) -> Option<String> {
    let mut parts = Vec::new();
    if !r.held_since.is_empty() {
        parts.push(format!(
            "held since {}, acks {}/{}",
            r.held_since, r.acks, r.peers
        ));
    }
    if !r.promised_to.is_empty() {
        parts.push(format!(
            "acknowledged master db {} (not a master for {} ms more)",
            r.promised_to, r.promised_for_ms
        ));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

#[cfg(test)]
mod failsafe_tests {
    use stolon_core::model::FailsafeReport;

    #[test]
    fn a_holding_master_and_a_promised_keeper_are_shown() {
        let held = FailsafeReport {
            held_since: "2026-12-03T07:00:00Z".into(),
            acks: 2,
            peers: 2,
            ..Default::default()
        };
        assert_eq!(
            super::failsafe_line(&held).as_deref(),
            Some("held since 2026-12-03T07:00:00Z, acks 2/2")
        );
        let promised = FailsafeReport {
            promised_to: "d1".into(),
            promised_for_ms: 1200,
            ..Default::default()
        };
        assert!(super::failsafe_line(&promised).is_some_and(|l| l.contains("db d1")));
        assert_eq!(super::failsafe_line(&FailsafeReport::default()), None);
    }
}
