//! Property test: `decide` and the keeper's `plan` never panic, whatever the clusterdata and
//! the observations hold. The rules never make an inconsistent clusterdata, but the store
//! may hold anything (an operator's `clusterdata write`, a bug in another version): a master
//! or a followed db that does not exist, keepers without dbs, sync sets naming strangers, a
//! switchover for dbs that are gone, infos reporting other dbs, time going back.

use super::sim::{test_spec, World};
use super::{decide_with, Observations};
use crate::faults::Faults;
use crate::keeper::{plan, DataState, KeeperView, LocalObserved, PgRole, Running};
use crate::model::{
    ClusterPhase, ClusterRole, DbInitMode, DbRole, FollowConfig, FollowType, GoDuration, Pause,
    SwitchoverPhase, SwitchoverRequest, SwitchoverStatus,
};
use proptest::prelude::*;
use std::sync::OnceLock;

/// A uid: one of the clusterdata's own (by index, modulo their number) or a stranger.
#[derive(Clone, Debug)]
enum Name {
    Own(usize),
    Ghost,
    Empty,
}

fn name() -> impl Strategy<Value = Name> {
    prop_oneof![
        4 => (0usize..8).prop_map(Name::Own),
        1 => Just(Name::Ghost),
        1 => Just(Name::Empty),
    ]
}

#[derive(Clone, Debug)]
enum Edit {
    RemoveDb(usize),
    RemoveKeeper(usize),
    Master(Name),
    ProxyMaster(Name),
    Follow(usize, Name),
    NoFollow(usize),
    SyncStandbys(usize, Vec<Name>),
    Followers(usize, Vec<Name>),
    DbKeeper(usize, Name),
    Phase(bool),
    Role(usize, bool),
    InitMode(usize, u8),
    Generation(usize, i64),
    XlogPos(usize, u64),
    Healthy(usize, bool),
    Switchover(Name, Name, u8, u64),
    Request(Name),
    Pause(bool),
    InfoReportsDb(usize, Name),
    DropInfo(usize),
    ProxyGeneration(i64),
    EnabledProxies(Vec<Name>),
    SyncSpec(bool, u16, u16, u16),
    StandbyCluster,
    Clock(i64),
}

fn edit() -> impl Strategy<Value = Edit> {
    let i = 0usize..8;
    prop_oneof![
        i.clone().prop_map(Edit::RemoveDb),
        i.clone().prop_map(Edit::RemoveKeeper),
        name().prop_map(Edit::Master),
        name().prop_map(Edit::ProxyMaster),
        (i.clone(), name()).prop_map(|(i, n)| Edit::Follow(i, n)),
        i.clone().prop_map(Edit::NoFollow),
        (i.clone(), prop::collection::vec(name(), 0..4))
            .prop_map(|(i, n)| Edit::SyncStandbys(i, n)),
        (i.clone(), prop::collection::vec(name(), 0..4)).prop_map(|(i, n)| Edit::Followers(i, n)),
        (i.clone(), name()).prop_map(|(i, n)| Edit::DbKeeper(i, n)),
        any::<bool>().prop_map(Edit::Phase),
        (i.clone(), any::<bool>()).prop_map(|(i, b)| Edit::Role(i, b)),
        (i.clone(), 0u8..6).prop_map(|(i, m)| Edit::InitMode(i, m)),
        (i.clone(), -2i64..1000).prop_map(|(i, g)| Edit::Generation(i, g)),
        (i.clone(), any::<u64>()).prop_map(|(i, x)| Edit::XlogPos(i, x)),
        (i.clone(), any::<bool>()).prop_map(|(i, b)| Edit::Healthy(i, b)),
        (name(), name(), 0u8..3, any::<u64>())
            .prop_map(|(a, b, p, x)| Edit::Switchover(a, b, p, x)),
        name().prop_map(Edit::Request),
        any::<bool>().prop_map(Edit::Pause),
        (i.clone(), name()).prop_map(|(i, n)| Edit::InfoReportsDb(i, n)),
        i.clone().prop_map(Edit::DropInfo),
        (-2i64..100).prop_map(Edit::ProxyGeneration),
        prop::collection::vec(name(), 0..4).prop_map(Edit::EnabledProxies),
        (any::<bool>(), 0u16..5, 0u16..5, 0u16..5)
            .prop_map(|(s, a, b, c)| Edit::SyncSpec(s, a, b, c)),
        Just(Edit::StandbyCluster),
        (-100_000i64..100_000).prop_map(Edit::Clock),
    ]
}

fn base(n: usize) -> World {
    static WORLDS: OnceLock<Vec<World>> = OnceLock::new();
    let worlds =
        WORLDS.get_or_init(|| (1..=3).map(|n| World::healthy(test_spec(), n, 2)).collect());
    worlds[(n - 1) % worlds.len()].clone()
}

fn resolve(w: &World, n: &Name) -> String {
    let uids: Vec<&String> = w.cd.dbs.keys().chain(w.cd.keepers.keys()).collect();
    match n {
        Name::Own(i) if !uids.is_empty() => uids[i % uids.len()].clone(),
        Name::Own(_) | Name::Empty => String::new(),
        Name::Ghost => "ghost".into(),
    }
}

fn nth<T>(keys: impl Iterator<Item = T>, i: usize) -> Option<T> {
    let v: Vec<T> = keys.collect();
    let len = v.len();
    v.into_iter().nth(i % len.max(1))
}

fn apply(w: &mut World, e: &Edit) {
    let db = |w: &World, i: usize| nth(w.cd.dbs.keys().cloned(), i);
    match e {
        Edit::RemoveDb(i) => {
            if let Some(u) = db(w, *i) {
                w.cd.dbs.remove(&u);
            }
        }
        Edit::RemoveKeeper(i) => {
            if let Some(k) = nth(w.cd.keepers.keys().cloned(), *i) {
                w.cd.keepers.remove(&k);
            }
        }
        Edit::Master(n) => w.cd.cluster.status.master = resolve(w, n),
        Edit::ProxyMaster(n) => w.cd.proxy.spec.master_db_uid = resolve(w, n),
        Edit::Follow(i, n) => {
            let to = resolve(w, n);
            if let Some(d) = db(w, *i).and_then(|u| w.cd.dbs.get_mut(&u)) {
                d.spec.follow_config = Some(FollowConfig {
                    kind: FollowType::Internal,
                    dbuid: to,
                    standby_settings: None,
                    archive_recovery_settings: None,
                });
            }
        }
        Edit::NoFollow(i) => {
            if let Some(d) = db(w, *i).and_then(|u| w.cd.dbs.get_mut(&u)) {
                d.spec.follow_config = None;
            }
        }
        Edit::SyncStandbys(i, ns) | Edit::Followers(i, ns) => {
            let uids: Vec<String> = ns.iter().map(|n| resolve(w, n)).collect();
            if let Some(d) = db(w, *i).and_then(|u| w.cd.dbs.get_mut(&u)) {
                if matches!(e, Edit::SyncStandbys(..)) {
                    d.spec.synchronous_standbys = uids.clone();
                    d.status.synchronous_standbys = uids;
                } else {
                    d.spec.followers = uids;
                }
            }
        }
        Edit::DbKeeper(i, n) => {
            let k = resolve(w, n);
            if let Some(d) = db(w, *i).and_then(|u| w.cd.dbs.get_mut(&u)) {
                d.spec.keeper_uid = k;
            }
        }
        Edit::Phase(normal) => {
            w.cd.cluster.status.phase = Some(if *normal {
                ClusterPhase::Normal
            } else {
                ClusterPhase::Initializing
            })
        }
        Edit::Role(i, master) => {
            if let Some(d) = db(w, *i).and_then(|u| w.cd.dbs.get_mut(&u)) {
                d.spec.role = Some(if *master {
                    DbRole::Master
                } else {
                    DbRole::Standby
                });
            }
        }
        Edit::InitMode(i, m) => {
            let mode = [
                DbInitMode::None,
                DbInitMode::New,
                DbInitMode::Existing,
                DbInitMode::Pitr,
                DbInitMode::Resync,
            ]
            .get(*m as usize)
            .copied();
            if let Some(d) = db(w, *i).and_then(|u| w.cd.dbs.get_mut(&u)) {
                d.spec.init_mode = mode;
            }
        }
        Edit::Generation(i, g) => {
            if let Some(d) = db(w, *i).and_then(|u| w.cd.dbs.get_mut(&u)) {
                d.generation = *g;
                d.status.current_generation = g / 2;
            }
        }
        Edit::XlogPos(i, x) => {
            if let Some(d) = db(w, *i).and_then(|u| w.cd.dbs.get_mut(&u)) {
                d.status.x_log_pos = *x;
            }
        }
        Edit::Healthy(i, h) => {
            if let Some(d) = db(w, *i).and_then(|u| w.cd.dbs.get_mut(&u)) {
                d.status.healthy = *h;
            }
        }
        Edit::Switchover(old, target, phase, pos) => {
            w.cd.cluster.status.switchover = Some(SwitchoverStatus {
                target_keeper_uid: resolve(w, target),
                requested_at: w.now,
                phase: [
                    SwitchoverPhase::Stopping,
                    SwitchoverPhase::Completed,
                    SwitchoverPhase::Failed,
                ][*phase as usize % 3],
                old_master_db_uid: resolve(w, old),
                target_db_uid: resolve(w, target),
                stop_position: *pos,
                started_at: w.now,
                reason: String::new(),
            })
        }
        Edit::Request(n) => {
            w.switchover = Some(SwitchoverRequest {
                target_keeper_uid: resolve(w, n),
                requested_at: w.now,
            })
        }
        Edit::Pause(on) => {
            w.pause = on.then(|| Pause {
                since: w.now,
                until: None,
                reason: String::new(),
            })
        }
        Edit::InfoReportsDb(i, n) => {
            let to = resolve(w, n);
            if let Some(k) = nth(w.keeper_infos.keys().cloned(), *i) {
                if let Some(ps) = w
                    .keeper_infos
                    .get_mut(&k)
                    .and_then(|info| info.postgres_state.as_mut())
                {
                    ps.uid = to;
                }
            }
        }
        Edit::DropInfo(i) => {
            if let Some(k) = nth(w.keeper_infos.keys().cloned(), *i) {
                w.keeper_infos.remove(&k);
            }
        }
        Edit::ProxyGeneration(g) => w.cd.proxy.generation = *g,
        Edit::EnabledProxies(ns) => {
            w.cd.proxy.spec.enabled_proxies = ns.iter().map(|n| resolve(w, n)).collect()
        }
        Edit::SyncSpec(on, min, max, per_sender) => {
            let spec = &mut w.cd.cluster.spec;
            spec.synchronous_replication = Some(*on);
            spec.min_synchronous_standbys = Some(*min);
            spec.max_synchronous_standbys = Some(*max);
            spec.max_standbys_per_sender = Some(*per_sender);
        }
        Edit::StandbyCluster => w.cd.cluster.spec.role = Some(ClusterRole::Standby),
        Edit::Clock(secs) => w.now = w.now.plus(GoDuration::from_secs(*secs)),
    }
}

fn local() -> impl Strategy<Value = LocalObserved> {
    (
        any::<bool>(),
        prop::option::of((any::<bool>(), any::<bool>(), 0u64..5, any::<u64>())),
        any::<(bool, bool, bool)>(),
    )
        .prop_map(
            |(missing, running, (config_current, fenced, standby_data))| LocalObserved {
                data: if missing {
                    DataState::Missing
                } else {
                    DataState::Present { db_uid: None }
                },
                running: running.map(|(primary, pending_restart, timeline, xlog_pos)| Running {
                    role: if primary {
                        PgRole::Primary
                    } else {
                        PgRole::Standby
                    },
                    pending_restart,
                    timeline,
                    xlog_pos,
                    history: Vec::new(),
                }),
                config_current,
                fenced,
                standby_data,
                clean_stop: fenced && standby_data,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: if std::env::var_os("STOLON_TEST_LONG").is_some() { 5000 } else { 300 },
        ..ProptestConfig::default()
    })]

    #[test]
    fn decide_and_plan_never_panic(
        n in 1usize..=3,
        edits in prop::collection::vec(edit(), 1..12),
        rounds in 1usize..6,
        locals in prop::collection::vec(local(), 4),
        data_is_own in any::<bool>(),
        silence in 0i64..200,
    ) {
        let mut w = base(n);
        for e in &edits {
            apply(&mut w, e);
        }
        let obs: Observations = w.observations();
        for _ in 0..rounds {
            let (cd, mem, _) = decide_with(&w.cd, &w.mem, &obs, w.now, Faults::NONE);
            w.cd = cd;
            w.mem = mem;
            w.now = w.now.plus(GoDuration::from_secs(7));
        }
        let keepers: Vec<String> = w.cd.keepers.keys().cloned().chain(["ghost".into()]).collect();
        for (keeper, mut local) in keepers.iter().zip(locals.into_iter().cycle()) {
            if data_is_own {
                local.data = DataState::Present {
                    db_uid: super::super::keeper::my_db(&w.cd, keeper).map(|d| d.uid.clone()),
                };
            }
            for cd in [Some(&w.cd), None] {
                let view = KeeperView {
                    keeper_uid: keeper,
                    boot_uuid: "boot",
                    cd,
                    store_silence: GoDuration::from_secs(silence),
                    faults: Faults::NONE,
                    promised: false,
                };
                let _ = plan(&view, &local);
            }
        }
    }
}
