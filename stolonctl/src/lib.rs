//! `stolonctl`'s commands over the cluster store. Every change of clusterdata is a
//! compare-and-swap on its revision, retried on a conflict; errors name the problem and the fix.

pub mod status;

use anyhow::{anyhow, bail, Context, Result};
use stolon_core::model::{
    decode, ClusterData, ClusterRole, ClusterSpec, Pause, SwitchoverRequest, Timestamp,
};
use stolon_store::{CasOutcome, ClusterStore, Compare, Op, StoreError};

/// Reads the clusterdata, or explains how to create it.
pub async fn cluster_data(store: &ClusterStore) -> Result<(ClusterData, i64)> {
    let found = store
        .get_cluster_data()
        .await
        .map_err(|e| store_error(store, e))?;
    found.ok_or_else(|| {
        anyhow!(
            "no cluster at {}: create it with `stolonctl init` (or check --cluster-name / --store-prefix)",
            store.prefix()
        )
    })
}

/// Adds the fix to a store error.
pub fn store_error(store: &ClusterStore, e: StoreError) -> anyhow::Error {
    match e {
        StoreError::Timeout { .. } | StoreError::Unavailable(_) => anyhow!(
            "cannot reach the store ({e}): is etcd running at --store-endpoints? (cluster {})",
            store.prefix()
        ),
        other => anyhow!(other),
    }
}

/// Applies `change` with a compare-and-swap, re-reading and retrying on conflicts.
pub async fn modify(
    store: &ClusterStore,
    mut change: impl FnMut(&mut ClusterData) -> Result<()>,
) -> Result<ClusterData> {
    for _ in 0..10 {
        let (mut cd, rev) = cluster_data(store).await?;
        change(&mut cd)?;
        cd.change_time = Some(Timestamp::now());
        match store
            .put_cluster_data(&cd, rev, None)
            .await
            .map_err(|e| store_error(store, e))?
        {
            CasOutcome::Written(_) => return Ok(cd),
            CasOutcome::Conflict => continue,
        }
    }
    bail!("clusterdata kept changing underneath: try again")
}

/// A spec from a JSON argument, a file, or `-` (stdin).
pub fn read_spec_input(
    arg: Option<&str>,
    file: Option<&std::path::Path>,
) -> Result<serde_json::Value> {
    let text = match (arg, file) {
        (Some("-"), None) | (None, Some(_)) if is_stdin(arg, file) => {
            std::io::read_to_string(std::io::stdin()).context("cannot read the spec from stdin")?
        }
        (Some(s), None) => s.to_string(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?
        }
        (None, None) => bail!("give the spec as an argument, with -f FILE, or - for stdin"),
        (Some(_), Some(_)) => bail!("give the spec either as an argument or with -f, not both"),
    };
    serde_json::from_str(&text).context("the spec is not valid JSON")
}

/// `-` (as the argument or as `-f -`) means stdin, as in Go stolon.
fn is_stdin(arg: Option<&str>, file: Option<&std::path::Path>) -> bool {
    arg == Some("-") || file.is_some_and(|f| f.as_os_str() == "-")
}

/// Whether a clusterdata document exists.
pub async fn cluster_exists(store: &ClusterStore) -> Result<bool> {
    Ok(store
        .get_cluster_data()
        .await
        .map_err(|e| store_error(store, e))?
        .is_some())
}

/// Reads a spec as Go stolon does (keys matched without regard to case); a key that matches
/// no field is kept but warned about on stderr, naming it, since it has no effect.
fn parse_spec(v: serde_json::Value) -> Result<ClusterSpec> {
    let (spec, unknown) = stolon_core::model::spec_from_value(v).context("invalid cluster spec")?;
    warn_unknown(&unknown);
    spec.validate()?;
    Ok(spec)
}

fn warn_unknown(keys: &[String]) {
    for k in keys {
        eprintln!("warning: unknown cluster spec key {k:?}: ignored");
    }
}

/// `init`: creates the cluster; an existing one is replaced only with `force`.
pub async fn init(store: &ClusterStore, spec: serde_json::Value, force: bool) -> Result<String> {
    let spec = parse_spec(spec)?;
    let uid = stolon_core::model::short_uid();
    let cd = ClusterData::new(uid.clone(), spec, Timestamp::now());
    // A running sentinel rewrites the cluster it leads between our read and our write; the
    // user asked to replace whatever is there, so a conflict only means "read again".
    for _ in 0..10 {
        let existing = store
            .get_cluster_data()
            .await
            .map_err(|e| store_error(store, e))?;
        let rev = match (existing, force) {
            (None, _) => 0,
            (Some(_), false) => bail!(
                "a cluster already exists at {}: `stolonctl init -y` replaces it (its data is lost to the cluster)",
                store.prefix()
            ),
            (Some((_, rev)), true) => rev,
        };
        match store
            .put_cluster_data(&cd, rev, None)
            .await
            .map_err(|e| store_error(store, e))?
        {
            CasOutcome::Written(_) => return Ok(uid),
            CasOutcome::Conflict if force => continue,
            CasOutcome::Conflict => {
                bail!("the cluster changed meanwhile: nothing written, try again")
            }
        }
    }
    bail!("the cluster kept changing (10 attempts): nothing written, try again")
}

/// `update`: replaces the spec, or merges a JSON merge patch into it; validated.
pub async fn update(
    store: &ClusterStore,
    input: serde_json::Value,
    patch: bool,
) -> Result<ClusterSpec> {
    let cd = modify(store, |cd| {
        let old = &cd.cluster.spec;
        let new = if patch {
            let mut input = input.clone();
            warn_unknown(&stolon_core::model::normalize_spec_keys(&mut input));
            old.merge_patch(&input)?
        } else {
            parse_spec(input.clone())?
        };
        new.validate()?;
        old.validate_update(&new)?;
        cd.cluster.spec = new;
        Ok(())
    })
    .await?;
    Ok(cd.cluster.spec)
}

pub async fn failkeeper(store: &ClusterStore, uid: &str) -> Result<()> {
    modify(store, |cd| {
        let k = cd
            .keepers
            .get_mut(uid)
            .ok_or_else(|| anyhow!("no keeper {uid} in the cluster (see `stolonctl status`)"))?;
        k.status.force_fail = true;
        Ok(())
    })
    .await
    .map(drop)
}

pub async fn removekeeper(store: &ClusterStore, uid: &str) -> Result<()> {
    modify(store, |cd| {
        if !cd.keepers.contains_key(uid) {
            bail!("no keeper {uid} in the cluster (see `stolonctl status`)");
        }
        let master = cd.dbs.get(&cd.cluster.status.master).map(|d| d.spec.keeper_uid.as_str());
        if master == Some(uid) {
            bail!("keeper {uid} hosts the master: fail it over first (`stolonctl failkeeper {uid}` or `stolonctl switchover`)");
        }
        cd.keepers.remove(uid);
        cd.dbs.retain(|_, db| db.spec.keeper_uid != uid);
        Ok(())
    })
    .await
    .map(drop)
}

/// `promote`: a standby cluster becomes a master cluster.
pub async fn promote(store: &ClusterStore) -> Result<()> {
    modify(store, |cd| {
        if cd.cluster.spec.role() != ClusterRole::Standby {
            bail!("the cluster is not a standby cluster: nothing to promote");
        }
        cd.cluster.spec.role = Some(ClusterRole::Master);
        Ok(())
    })
    .await
    .map(drop)
}

/// `clusterdata write`: writes a clusterdata document, over an existing one only with `overwrite` (Go stolon's
/// `--yes`); true when it replaced one.
pub async fn write_cluster_data(
    store: &ClusterStore,
    bytes: &[u8],
    overwrite: bool,
) -> Result<bool> {
    let cd = ClusterData::from_json(bytes).context("invalid cluster data")?;
    let rev = store
        .get_cluster_data()
        .await
        .map_err(|e| store_error(store, e))?
        .map_or(0, |(_, r)| r);
    if rev != 0 && !overwrite {
        bail!("WARNING: cluster data already available use --yes to override");
    }
    match store
        .put_cluster_data(&cd, rev, None)
        .await
        .map_err(|e| store_error(store, e))?
    {
        CasOutcome::Written(_) => Ok(rev != 0),
        CasOutcome::Conflict => bail!("the cluster changed meanwhile: nothing written, try again"),
    }
}

/// The maintenance pause at `P/pause`, if any (active or past its deadline).
pub async fn pause_state(store: &ClusterStore) -> Result<Option<Pause>> {
    let kv = store
        .store()
        .get(&store.pause_key())
        .await
        .map_err(|e| store_error(store, e))?;
    kv.map(|kv| decode::<Pause>("pause", &kv.value).map_err(anyhow::Error::from))
        .transpose()
}

/// `pause`: the sentinel stops changing the topology until `resume` or the deadline.
pub async fn pause(
    store: &ClusterStore,
    duration: Option<stolon_core::model::GoDuration>,
    reason: &str,
) -> Result<Pause> {
    cluster_data(store).await?;
    let now = Timestamp::now();
    let p = Pause {
        since: now,
        until: duration.map(|d| now.plus(d)),
        reason: reason.to_string(),
    };
    store
        .store()
        .txn(
            vec![],
            vec![Op::put(store.pause_key(), serde_json::to_vec(&p)?)],
        )
        .await
        .map_err(|e| store_error(store, e))?;
    Ok(p)
}

/// `resume`: ends a pause; `false` when there was none.
pub async fn resume(store: &ClusterStore) -> Result<bool> {
    let was = pause_state(store).await?.is_some();
    store
        .store()
        .txn(
            vec![],
            vec![Op::Delete {
                key: store.pause_key(),
            }],
        )
        .await
        .map_err(|e| store_error(store, e))?;
    Ok(was)
}

/// Writes a switchover request (create-if-absent); returns it.
pub async fn request_switchover(store: &ClusterStore, target: &str) -> Result<SwitchoverRequest> {
    if let Some(p) = pause_state(store)
        .await?
        .filter(|p| p.active(Timestamp::now()))
    {
        bail!(
            "the cluster is paused since {} ({}): `stolonctl resume` first",
            p.since,
            if p.reason.is_empty() {
                "no reason given"
            } else {
                &p.reason
            }
        );
    }
    let (cd, _) = cluster_data(store).await?;
    if !cd.keepers.contains_key(target) {
        bail!("no keeper {target} in the cluster (see `stolonctl status`)");
    }
    let req = SwitchoverRequest {
        target_keeper_uid: target.to_string(),
        requested_at: Timestamp::now(),
    };
    let key = store.switchover_key();
    let value = serde_json::to_vec(&req)?;
    let r = store
        .store()
        .txn(
            vec![Compare::CreateRevision {
                key: key.clone(),
                revision: 0,
            }],
            vec![Op::put(key.clone(), value)],
        )
        .await
        .map_err(|e| store_error(store, e))?;
    if !r.succeeded {
        let pending = store.store().get(&key).await.ok().flatten();
        let what = pending
            .and_then(|kv| decode::<SwitchoverRequest>("switchover", &kv.value).ok())
            .map(|r| {
                format!(
                    "to {} requested at {:?}",
                    r.target_keeper_uid, r.requested_at
                )
            })
            .unwrap_or_default();
        bail!("a switchover is already pending ({what}); wait for it or delete {key}");
    }
    Ok(req)
}

/// The standby a switchover goes to by default: healthy, converged, on a keeper that may be
/// master, in the master's synchronous set when synchronous replication is on (the only
/// standbys the sentinel accepts then), furthest ahead.
pub fn default_target(cd: &ClusterData) -> Option<String> {
    let master = cd.dbs.get(&cd.cluster.status.master);
    let sync_ok = |uid: &String| {
        master.is_none_or(|m| {
            !m.spec.synchronous_replication
                || (m.spec.synchronous_standbys.contains(uid)
                    && m.status.synchronous_standbys.contains(uid))
        })
    };
    cd.dbs
        .values()
        .filter(|d| d.uid != cd.cluster.status.master)
        .filter(|d| d.status.healthy && d.status.current_generation == d.generation)
        .filter(|d| {
            cd.keepers
                .get(&d.spec.keeper_uid)
                .is_none_or(|k| k.status.can_be_master != Some(false))
        })
        .filter(|d| sync_ok(&d.uid))
        .max_by_key(|d| d.status.x_log_pos)
        .map(|d| d.spec.keeper_uid.clone())
}

#[cfg(test)]
mod tests {
    use super::default_target;
    use stolon_core::model::ClusterData;

    fn cd(sync: bool) -> ClusterData {
        let doc = serde_json::json!({
            "formatVersion": 1,
            "cluster": {"uid": "c", "generation": 1, "spec": {},
                        "status": {"phase": "normal", "master": "m"}},
            "keepers": {"k0": {"uid": "k0"}, "k1": {"uid": "k1"}, "k2": {"uid": "k2"},
                        "k3": {"uid": "k3", "status": {"canBeMaster": false}}},
            "dbs": {
                "m": {"uid": "m", "generation": 1, "spec": {"keeperUID": "k0", "role": "master",
                      "synchronousReplication": sync, "synchronousStandbys": ["s1"]},
                      "status": {"healthy": true, "currentGeneration": 1, "xLogPos": 100,
                                 "synchronousStandbys": ["s1"]}},
                "s1": {"uid": "s1", "generation": 1, "spec": {"keeperUID": "k1", "role": "standby"},
                       "status": {"healthy": true, "currentGeneration": 1, "xLogPos": 90}},
                "s2": {"uid": "s2", "generation": 1, "spec": {"keeperUID": "k2", "role": "standby"},
                       "status": {"healthy": true, "currentGeneration": 1, "xLogPos": 95}},
                "s3": {"uid": "s3", "generation": 1, "spec": {"keeperUID": "k3", "role": "standby"},
                       "status": {"healthy": true, "currentGeneration": 1, "xLogPos": 99}}
            }
        });
        ClusterData::from_json(doc.to_string().as_bytes()).expect("clusterdata")
    }

    #[test]
    fn the_default_target_is_one_the_sentinel_accepts() {
        assert_eq!(
            default_target(&cd(false)).as_deref(),
            Some("k2"),
            "async: the furthest ahead whose keeper may be master (not k3)"
        );
        assert_eq!(
            default_target(&cd(true)).as_deref(),
            Some("k1"),
            "sync: only the synchronous standby"
        );
    }
}
