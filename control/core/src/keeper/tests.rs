//! Table tests of `plan`.

use super::*;
use crate::model::{ClusterSpec, DbSpec, FollowConfig, Keeper, KeeperStatus, Timestamp};

const ME: &str = "k1";
const BOOT: &str = "boot-1";

fn cd_with(db: Option<Db>, seen: bool, spec: ClusterSpec) -> ClusterData {
    let mut cd = ClusterData::new("c", spec, Timestamp::now());
    let status = KeeperStatus {
        boot_uuid: if seen { BOOT.into() } else { "old-boot".into() },
        ..Default::default()
    };
    cd.keepers.insert(
        ME.into(),
        Keeper {
            uid: ME.into(),
            status,
            ..Default::default()
        },
    );
    if let Some(db) = db {
        cd.dbs.insert(db.uid.clone(), db);
    }
    cd
}

fn db(role: DbRole, init: DbInitMode, follow: Option<&str>) -> Db {
    Db {
        uid: "d1".into(),
        generation: 7,
        spec: DbSpec {
            keeper_uid: ME.into(),
            role: Some(role),
            init_mode: Some(init),
            follow_config: follow.map(|m| FollowConfig {
                kind: FollowType::Internal,
                dbuid: m.into(),
                standby_settings: None,
                archive_recovery_settings: None,
            }),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn local(data: DataState, running: Option<PgRole>) -> LocalObserved {
    LocalObserved {
        data,
        running: running.map(|role| Running {
            role,
            pending_restart: false,
            timeline: 0,
            xlog_pos: 0,
            history: Vec::new(),
        }),
        config_current: true,
        fenced: false,
        standby_data: false,
        clean_stop: false,
    }
}

fn holds(uid: &str) -> DataState {
    DataState::Present {
        db_uid: Some(uid.into()),
    }
}

fn run(cd: Option<&ClusterData>, silence: i64, local: &LocalObserved) -> Vec<PgAction> {
    let view = KeeperView {
        keeper_uid: ME,
        boot_uuid: BOOT,
        cd,
        store_silence: GoDuration::from_secs(silence),
        faults: crate::faults::Faults::NONE,
        promised: false,
    };
    plan(&view, local)
}

/// `cd` in a switchover from d1 to m at `phase`, the proxies routed to `routed`.
fn switching(mut cd: ClusterData, phase: SwitchoverPhase, routed: &str) -> ClusterData {
    cd.cluster.status.switchover = Some(crate::model::SwitchoverStatus {
        target_keeper_uid: "km".into(),
        requested_at: Timestamp::now(),
        phase,
        old_master_db_uid: "d1".into(),
        target_db_uid: "m".into(),
        stop_position: 0,
        started_at: Timestamp::now(),
        reason: String::new(),
    });
    cd.proxy.spec.master_db_uid = routed.into();
    cd
}

fn from(m: &str) -> String {
    m.to_string()
}

/// (name, clusterdata, store silence in seconds, local state, expected plan)
type Case = (
    &'static str,
    Option<ClusterData>,
    i64,
    LocalObserved,
    Vec<PgAction>,
);

#[test]
fn plan_table() {
    let spec = ClusterSpec::default;
    let rewind = || ClusterSpec {
        use_pgrewind: Some(true),
        ..Default::default()
    };
    let master_new = db(DbRole::Master, DbInitMode::New, None);
    let master = db(DbRole::Master, DbInitMode::None, None);
    let standby = db(DbRole::Standby, DbInitMode::None, Some("m"));
    let resync = db(DbRole::Standby, DbInitMode::Resync, Some("m"));
    let pitr = db(DbRole::Master, DbInitMode::Pitr, None);
    let existing = db(DbRole::Master, DbInitMode::Existing, None);
    let with_rewind = |mut d: Db| {
        d.spec.use_pgrewind = true;
        d
    };
    let pending = LocalObserved {
        running: Some(Running {
            role: PgRole::Primary,
            pending_restart: true,
            timeline: 0,
            xlog_pos: 0,
            history: Vec::new(),
        }),
        ..local(holds("d1"), None)
    };
    let stale_config = LocalObserved {
        config_current: false,
        ..local(holds("d1"), Some(PgRole::Standby))
    };
    let fenced = LocalObserved {
        fenced: true,
        ..local(holds("d1"), None)
    };
    let auto = ClusterSpec {
        automatic_pg_restart: Some(true),
        ..Default::default()
    };
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        ("no clusterdata: wait",
            None, 0, local(DataState::Missing, None),
            vec![Wait("no clusterdata".into())]),
        ("no db for this keeper, nothing runs: wait",
            Some(cd_with(None, true, spec())), 0, local(DataState::Missing, None),
            vec![Wait("no db assigned to this keeper".into())]),
        ("no db for this keeper, PostgreSQL runs: stop it",
            Some(cd_with(None, true, spec())), 0, local(holds("x"), Some(PgRole::Standby)),
            vec![Stop(StopMode::Fast)]),
        ("initMode new on an empty dir: initdb and start",
            Some(cd_with(Some(master_new.clone()), true, spec())), 0, local(DataState::Missing, None),
            vec![InitDb, WriteConfig, Start, SyncSlots, Converged(7)]),
        ("a standby with a stale initMode new: base backup, never initdb",
            Some(cd_with(Some(db(DbRole::Standby, DbInitMode::New, Some("m"))), true, spec())), 0, local(DataState::Missing, None),
            vec![BaseBackup { from_db: from("m") }, WriteConfig, Start, SyncSlots, Converged(7)]),
        ("initMode new over another db's data: clear first",
            Some(cd_with(Some(master_new.clone()), true, spec())), 0, local(holds("old"), None),
            vec![ClearData, InitDb, WriteConfig, Start, SyncSlots, Converged(7)]),
        ("not seen by the sentinel yet: prepare but do not start",
            Some(cd_with(Some(master_new), false, spec())), 0, local(DataState::Missing, None),
            vec![InitDb, WriteConfig, Wait("the sentinel has not seen this keeper's boot yet".into())]),
        ("initMode pitr: restore, then start in recovery",
            Some(cd_with(Some(pitr.clone()), true, spec())), 0, local(DataState::Missing, None),
            vec![RestorePitr, WriteConfig, Start, SyncSlots, Converged(7)]),
        ("pitr recovery running: wait for it to promote itself",
            Some(cd_with(Some(pitr.clone()), true, spec())), 0, local(holds("d1"), Some(PgRole::Standby)),
            vec![Wait("point-in-time recovery in progress".into())]),
        ("initMode existing: take over the data dir",
            Some(cd_with(Some(existing.clone()), true, spec())), 0, local(DataState::Present { db_uid: None }, None),
            vec![TakeOverExisting, WriteConfig, Start, SyncSlots, Converged(7)]),
        ("initMode existing without data: refuse",
            Some(cd_with(Some(existing), true, spec())), 0, local(DataState::Missing, None),
            vec![Refuse("initMode existing but the data directory is missing".into())]),
        ("existing master db, data dir wiped: refuse, never initdb",
            Some(cd_with(Some(master.clone()), true, spec())), 0, local(DataState::Missing, None),
            vec![Refuse("the data directory does not hold db d1 and it exists already: refusing to initialise a new one (was it wiped?)".into())]),
        ("new standby: base backup from the master",
            Some(cd_with(Some(resync.clone()), true, spec())), 0, local(DataState::Missing, None),
            vec![BaseBackup { from_db: from("m") }, WriteConfig, Start, SyncSlots, Converged(7)]),
        ("standby over another db's data without rewind: clear and base backup",
            Some(cd_with(Some(resync), true, spec())), 0, local(holds("old"), Some(PgRole::Primary)),
            vec![Stop(StopMode::Fast), ClearData, BaseBackup { from_db: from("m") }, WriteConfig, Start, SyncSlots, Converged(7)]),
        ("standby over another db's data with rewind: rewind",
            Some(cd_with(Some(with_rewind(standby.clone())), true, rewind())), 0, local(holds("old"), None),
            vec![Rewind { from_db: from("m") }, WriteConfig, Start, SyncSlots, Converged(7)]),
        ("old master demoted to standby: stop, the resync in a later round",
            Some(cd_with(Some(standby.clone()), true, spec())), 0, local(holds("d1"), Some(PgRole::Primary)),
            vec![Stop(StopMode::Fast), Wait("stopped as a master: resynced once stopped".into())]),
        ("old master stopped, not cleanly, no rewind: base backup",
            Some(cd_with(Some(standby.clone()), true, spec())), 0, local(holds("d1"), None),
            vec![ClearData, BaseBackup { from_db: from("m") }, WriteConfig, Start, SyncSlots, Converged(7)]),
        ("old master stopped, not cleanly, with rewind: rewind",
            Some(cd_with(Some(with_rewind(standby.clone())), true, rewind())), 0, local(holds("d1"), None),
            vec![Rewind { from_db: from("m") }, WriteConfig, Start, SyncSlots, Converged(7)]),
        ("old master stopped cleanly, its switchover's target being promoted: wait",
            Some(switching(cd_with(Some(standby.clone()), true, spec()), SwitchoverPhase::Stopping, "d1")), 0, LocalObserved { clean_stop: true, ..local(holds("d1"), None) },
            vec![Wait("the resync from m waits until the proxies route to it".into())]),
        ("old master stopped cleanly, its switchover's target promoted, not routed: wait",
            Some(switching(cd_with(Some(standby.clone()), true, spec()), SwitchoverPhase::Completed, "d1")), 0, LocalObserved { clean_stop: true, ..local(holds("d1"), None) },
            vec![Wait("the resync from m waits until the proxies route to it".into())]),
        ("old master stopped cleanly, the new master routed: base backup",
            Some(switching(cd_with(Some(standby.clone()), true, spec()), SwitchoverPhase::Completed, "m")), 0, LocalObserved { clean_stop: true, ..local(holds("d1"), None) },
            vec![ClearData, BaseBackup { from_db: from("m") }, WriteConfig, Start, SyncSlots, Converged(7)]),
        ("old master stopped cleanly, no switchover (demoted by hand): base backup",
            Some(cd_with(Some(standby.clone()), true, spec())), 0, LocalObserved { clean_stop: true, ..local(holds("d1"), None) },
            vec![ClearData, BaseBackup { from_db: from("m") }, WriteConfig, Start, SyncSlots, Converged(7)]),
        ("old master stopped cleanly, its switchover failed: base backup",
            Some(switching(cd_with(Some(standby.clone()), true, spec()), SwitchoverPhase::Failed, "d1")), 0, LocalObserved { clean_stop: true, ..local(holds("d1"), None) },
            vec![ClearData, BaseBackup { from_db: from("m") }, WriteConfig, Start, SyncSlots, Converged(7)]),
        ("a standby's own data, stopped: start it",
            Some(cd_with(Some(standby.clone()), true, spec())), 0, LocalObserved { standby_data: true, ..local(holds("d1"), None) },
            vec![WriteConfig, Start, SyncSlots, Converged(7)]),
        ("standby elected master: promote",
            Some(cd_with(Some(master.clone()), true, spec())), 0, local(holds("d1"), Some(PgRole::Standby)),
            vec![Promote, WriteConfig, Reload, SyncSlots, Converged(7)]),
        ("master stopped: start",
            Some(cd_with(Some(master.clone()), true, spec())), 0, local(holds("d1"), None),
            vec![WriteConfig, Start, SyncSlots, Converged(7)]),
        ("standby follows a new master: config and reload, no restart",
            Some(cd_with(Some(standby.clone()), true, spec())), 0, stale_config,
            vec![WriteConfig, Reload, SyncSlots, Converged(7)]),
        ("parameter needing restart, automaticPgRestart off: no restart",
            Some(cd_with(Some(master.clone()), true, spec())), 0, pending.clone(),
            vec![SyncSlots, Converged(7)]),
        ("parameter needing restart, automaticPgRestart on: restart",
            Some(cd_with(Some(master.clone()), true, auto)), 0, pending,
            vec![Restart, SyncSlots, Converged(7)]),
        ("master without store contact for the fence timeout: fence",
            Some(cd_with(Some(master.clone()), true, spec())), 10, local(holds("d1"), Some(PgRole::Primary)),
            vec![Fence]),
        ("a standby without store contact is not fenced",
            Some(cd_with(Some(standby), true, spec())), 10, local(holds("d1"), Some(PgRole::Standby)),
            vec![SyncSlots, Converged(7)]),
        ("fenced and still no contact: stay down",
            Some(cd_with(Some(master.clone()), true, spec())), 12, fenced.clone(),
            vec![Wait("fenced: no store contact".into())]),
        ("fenced, contact back, still master: lift and start",
            Some(cd_with(Some(master), true, spec())), 1, fenced,
            vec![Unfence, WriteConfig, Start, SyncSlots, Converged(7)]),
    ];
    for (name, cd, silence, local, want) in cases {
        assert_eq!(run(cd.as_ref(), silence, &local), want, "{name}");
    }
}

/// A standby of master "m", which is on timeline 2 after switching from timeline 1 at 1000.
fn standby_at(timeline: u64, pos: u64, rewind: bool) -> (ClusterData, LocalObserved) {
    let mut d = db(DbRole::Standby, DbInitMode::None, Some("m"));
    d.spec.use_pgrewind = rewind;
    let mut cd = cd_with(Some(d), true, ClusterSpec::default());
    let mut m = db(DbRole::Master, DbInitMode::None, None);
    m.uid = "m".into();
    m.spec.keeper_uid = "k2".into();
    m.status.timeline_id = 2;
    m.status.timelines_history = vec![crate::model::TimelineHistoryEntry {
        timeline_id: 1,
        switch_point: 1000,
        reason: String::new(),
    }];
    cd.dbs.insert("m".into(), m);
    let mut l = local(holds("d1"), Some(PgRole::Standby));
    if let Some(r) = l.running.as_mut() {
        r.timeline = timeline;
        r.xlog_pos = pos;
    }
    (cd, l)
}

/// A running standby's plan when it is rebuilt from master db "m" (no pg_rewind).
fn rebuilt_from_m() -> Vec<PgAction> {
    vec![
        Stop(StopMode::Fast),
        ClearData,
        BaseBackup { from_db: from("m") },
        WriteConfig,
        Start,
        SyncSlots,
        Converged(7),
    ]
}

#[test]
fn a_running_standby_whose_history_forked_from_the_master_is_rewound_or_rebuilt() {
    let rebuilt = rebuilt_from_m();
    let rewound = vec![
        Stop(StopMode::Fast),
        Rewind { from_db: from("m") },
        WriteConfig,
        Start,
        SyncSlots,
        Converged(7),
    ];
    let cases = [
        ("past the switch point, no rewind", 1, 1500, false, rebuilt),
        ("past the switch point, rewind", 1, 1500, true, rewound),
        (
            "before the switch point: it can follow",
            1,
            900,
            true,
            vec![SyncSlots, Converged(7)],
        ),
        (
            "on the master's timeline",
            2,
            5000,
            true,
            vec![SyncSlots, Converged(7)],
        ),
        (
            "position unknown",
            0,
            0,
            true,
            vec![SyncSlots, Converged(7)],
        ),
    ];
    for (name, tl, pos, rewind, want) in cases {
        let (cd, l) = standby_at(tl, pos, rewind);
        assert_eq!(run(Some(&cd), 0, &l), want, "{name}");
    }
}

/// A standby already on the timeline its master's fresh promotion began, while the master's
/// status still reports the timeline before it (its keeper has not reported since): it
/// follows. The same standby against a master that converged, or one whose history
/// branched before where the master was seen, is rebuilt (CI caught a standby rebuilt after
/// every switchover where it was quicker to follow than the master's keeper to report).
#[test]
fn a_standby_ahead_of_a_master_that_has_not_reported_its_promotion_follows() {
    let rebuilt = rebuilt_from_m();
    let follows = vec![SyncSlots, Converged(7)];
    let branch = |at: u64| {
        vec![crate::model::TimelineHistoryEntry {
            timeline_id: 1,
            switch_point: at,
            reason: String::new(),
        }]
    };
    #[rustfmt::skip]
    let cases = [
        ("branched where the master was seen, master settling", false, branch(5000), &follows),
        ("branched after, master settling", false, branch(6000), &follows),
        ("branched where the master was seen, master converged", true, branch(5000), &rebuilt),
        ("branched before where the master was seen", false, branch(4000), &rebuilt),
        ("no history known", false, Vec::new(), &rebuilt),
    ];
    for (name, converged, history, want) in cases {
        let (mut cd, mut l) = standby_at(2, 6000, false);
        let m = cd.dbs.get_mut("m").expect("master");
        m.status.timeline_id = 1;
        m.status.x_log_pos = 5000;
        m.status.timelines_history.clear();
        m.status.current_generation = if converged { m.generation } else { 0 };
        if let Some(r) = l.running.as_mut() {
            r.history = history;
        }
        assert_eq!(&run(Some(&cd), 0, &l), want, "{name}");
    }
}

#[test]
fn a_master_db_over_a_standbys_data_is_started_as_a_standby_and_promoted() {
    let master = db(DbRole::Master, DbInitMode::None, None);
    let cd = cd_with(Some(master), true, ClusterSpec::default());
    let l = LocalObserved {
        standby_data: true,
        ..local(holds("d1"), None)
    };
    assert_eq!(
        run(Some(&cd), 0, &l),
        vec![Start, Promote, WriteConfig, Reload, SyncSlots, Converged(7)]
    );
}

#[test]
fn fence_timeout_is_strictly_below_fail_interval() {
    for secs in [1, 2, 5, 20, 60] {
        let fi = GoDuration::from_secs(secs);
        assert!(fence_timeout(fi) < fi);
        assert!(fence_timeout(fi).0 > 0);
    }
}

/// A db replaced as master (Go stolon leaves it role master until the sentinel removes it):
/// its keeper runs it read-only, never as a primary, and never promotes it while another db
/// is the cluster's master; elected back, it is promoted.
#[test]
fn an_old_master_runs_read_only_until_replaced_or_elected_back() {
    let old_master = |master: &str| {
        let mut cd = cd_with(
            Some(db(DbRole::Master, DbInitMode::None, None)),
            true,
            ClusterSpec::default(),
        );
        cd.cluster.status.master = master.into();
        cd
    };
    let read_only = vec![WriteConfig, Start, SyncSlots, Converged(7)];
    let standby_data = LocalObserved {
        standby_data: true,
        ..local(holds("d1"), None)
    };
    let stale = LocalObserved {
        config_current: false,
        ..local(holds("d1"), Some(PgRole::Standby))
    };
    #[rustfmt::skip]
    let cases: Vec<(&str, &str, LocalObserved, Vec<PgAction>)> = vec![
        ("down: started read-only", "d2", local(holds("d1"), None), read_only.clone()),
        ("down with standby data: started read-only, not promoted", "d2", standby_data.clone(),
            read_only),
        ("running as a primary: stopped and started read-only", "d2",
            local(holds("d1"), Some(PgRole::Primary)),
            vec![Stop(StopMode::Fast), WriteConfig, Start, SyncSlots, Converged(7)]),
        ("running read-only, config current: nothing", "d2",
            local(holds("d1"), Some(PgRole::Standby)), vec![SyncSlots, Converged(7)]),
        ("running read-only, config stale: reload", "d2", stale,
            vec![WriteConfig, Reload, SyncSlots, Converged(7)]),
        ("elected back, down: started and promoted", "d1", standby_data,
            vec![Start, Promote, WriteConfig, Reload, SyncSlots, Converged(7)]),
        ("elected back, running read-only: promoted", "d1",
            local(holds("d1"), Some(PgRole::Standby)),
            vec![Promote, WriteConfig, Reload, SyncSlots, Converged(7)]),
    ];
    for (name, master, local, want) in cases {
        let cd = old_master(master);
        assert_eq!(run(Some(&cd), 0, &local), want, "{name}");
    }
}

/// Failsafe mode: a keeper that acknowledged another master stays out of the master's role
/// until its promise ends, and does everything else as usual.
#[test]
fn a_promised_keeper_neither_promotes_nor_starts_a_master() {
    let master = db(DbRole::Master, DbInitMode::None, None);
    let standby = db(DbRole::Standby, DbInitMode::None, Some("m"));
    let cases = [
        (
            "elected, running read-only",
            master.clone(),
            local(holds("d1"), Some(PgRole::Standby)),
        ),
        ("elected, stopped", master.clone(), local(holds("d1"), None)),
    ];
    for (what, db, l) in cases {
        let cd = cd_with(Some(db), true, ClusterSpec::default());
        let view = |promised| KeeperView {
            keeper_uid: ME,
            boot_uuid: BOOT,
            cd: Some(&cd),
            store_silence: GoDuration::from_secs(0),
            faults: crate::faults::Faults::NONE,
            promised,
        };
        let got = plan(&view(true), &l);
        assert!(
            matches!(got.last(), Some(Wait(w)) if w.starts_with("failsafe")),
            "{what}: {got:?}"
        );
        assert!(
            !got.iter().any(|a| matches!(a, Promote | Start)),
            "{what}: {got:?}"
        );
        let free = plan(&view(false), &l);
        assert!(
            free.iter().any(|a| matches!(a, Promote | Start)),
            "{what}: {free:?}"
        );
    }
    // A standby starts as usual while promised.
    let cd = cd_with(Some(standby), true, ClusterSpec::default());
    let view = KeeperView {
        keeper_uid: ME,
        boot_uuid: BOOT,
        cd: Some(&cd),
        store_silence: GoDuration::from_secs(0),
        faults: crate::faults::Faults::NONE,
        promised: true,
    };
    let l = LocalObserved {
        standby_data: true,
        ..local(holds("d1"), None)
    };
    assert_eq!(
        plan(&view, &l),
        vec![WriteConfig, Start, SyncSlots, Converged(7)]
    );
}
