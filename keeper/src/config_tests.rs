//! Golden tests of the rendered files (`UPDATE_GOLDEN=1` rewrites them) and table tests of
//! the small parsers.

use crate::config::*;
use control::model::{
    ArchiveRecoverySettings, ClusterData, ClusterSpec, Db, DbInitMode, DbRole, DbSpec,
    FollowConfig, FollowType, PitrConfig, RecoveryTargetSettings, StandbySettings,
    SuReplAccessMode, Timestamp,
};
use std::collections::BTreeMap;
use std::path::PathBuf;

fn local() -> Local {
    Local {
        listen_address: "10.0.0.5".into(),
        port: 5433,
        socket_dir: "/var/run/stolon/k1".into(),
        su_user: "postgres".into(),
        su_auth: AuthMethod::ScramSha256,
        repl_user: "repluser".into(),
        repl_auth: AuthMethod::Md5,
        passfile: "/var/lib/stolon/k1/pgpass".into(),
    }
}

fn cluster(spec: ClusterSpec) -> ClusterData {
    let mut cd = ClusterData::new("c1", spec, Timestamp::now());
    for (uid, addr) in [("m1", "10.0.0.5"), ("s1", "10.0.0.6"), ("s2", "10.0.0.7")] {
        let mut db = Db {
            uid: uid.into(),
            ..Default::default()
        };
        db.status.listen_address = addr.into();
        cd.dbs.insert(uid.into(), db);
    }
    cd
}

fn master_db() -> Db {
    Db {
        uid: "m1".into(),
        spec: DbSpec {
            role: Some(DbRole::Master),
            max_standbys: 20,
            additional_wal_senders: 5,
            pg_parameters: [
                ("max_connections", "100"),
                ("shared_buffers", "128MB"),
                ("log_line_prefix", "%m [%p] 'x' "),
                ("port", "9999"),
                ("wal_keep_size", "64MB"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn standby_db() -> Db {
    Db {
        uid: "s1".into(),
        spec: DbSpec {
            role: Some(DbRole::Standby),
            max_standbys: 20,
            follow_config: Some(FollowConfig {
                kind: FollowType::Internal,
                dbuid: "m1".into(),
                standby_settings: None,
                archive_recovery_settings: None,
            }),
            pg_parameters: [("wal_keep_size".to_string(), "1GB".to_string())].into(),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// The rendering of `db` on the test keeper with no upstream, no restriction, no pitr and no
/// previous parameters.
fn plain(cd: &ClusterData, db: &Db) -> Rendered {
    render(cd, db, &local(), None, false, false, &BTreeMap::new())
}

fn golden(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        std::fs::write(&path, actual).expect("write golden");
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 creates it)", path.display()));
    assert_eq!(actual, want, "{name} differs from its golden file");
}

fn show(r: &Rendered) -> String {
    format!(
        "## postgresql.conf\n{}## pg_hba.conf\n{}## standby.signal: {}, recovery.signal: {}\n",
        r.postgresql_conf, r.pg_hba_conf, r.standby_signal, r.recovery_signal
    )
}

#[test]
fn golden_master_async_default_hba() {
    let cd = cluster(ClusterSpec::default());
    golden("master-async.txt", &show(&plain(&cd, &master_db())));
}

#[test]
fn golden_master_sync_with_placeholder_and_strict_hba_restricted() {
    let spec = ClusterSpec {
        default_su_repl_access_mode: Some(SuReplAccessMode::Strict),
        ..Default::default()
    };
    let cd = cluster(spec);
    let mut db = master_db();
    db.spec.synchronous_replication = true;
    db.spec.synchronous_standbys = vec!["s1".into(), "stolonfakestandby".into()];
    db.spec.pg_hba = Some(vec!["host app app 10.1.0.0/16 scram-sha-256".into()]);
    let restricted = render(&cd, &db, &local(), None, true, false, &BTreeMap::new());
    golden("master-sync-strict-restricted.txt", &show(&restricted));
    let open = plain(&cd, &db);
    assert!(open
        .pg_hba_conf
        .ends_with("host app app 10.1.0.0/16 scram-sha-256\n"));
    assert!(!restricted.pg_hba_conf.contains("host app app"));
}

#[test]
fn golden_standby_following_the_master() {
    let cd = cluster(ClusterSpec::default());
    let up = Upstream {
        host: "10.0.0.5".into(),
        port: 5433,
        floors: Default::default(),
    };
    let r = render(
        &cd,
        &standby_db(),
        &local(),
        Some(&up),
        false,
        false,
        &BTreeMap::new(),
    );
    golden("standby.txt", &show(&r));
}

#[test]
fn a_standby_keeps_the_primarys_higher_hot_standby_settings() {
    let mut spec = ClusterSpec::default();
    spec.pg_parameters
        .insert("max_connections".into(), "77".into());
    spec.pg_parameters
        .insert("max_locks_per_transaction".into(), "128".into());
    let cd = cluster(spec.clone());
    let mut db = standby_db();
    db.spec.pg_parameters = spec.pg_parameters.clone();
    let controldata = "max_connections setting:              100\n\
                       max_locks_per_xact setting:           64\n\
                       wal_level setting:                    replica\n";
    let up = Upstream {
        host: "10.0.0.5".into(),
        port: 5433,
        floors: parse_floors(controldata),
    };
    let r = render(
        &cd,
        &db,
        &local(),
        Some(&up),
        false,
        false,
        &BTreeMap::new(),
    );
    // Lowered in the spec, still 100 on the primary as replayed: 100 until it is not.
    assert!(
        r.postgresql_conf.contains("max_connections = 100\n"),
        "{}",
        r.postgresql_conf
    );
    // Raised in the spec: the spec's value.
    assert!(r
        .postgresql_conf
        .contains("max_locks_per_transaction = '128'\n"));
}

#[test]
fn golden_pitr_with_targets_and_standby_cluster_master() {
    let cd = cluster(ClusterSpec::default());
    let mut db = master_db();
    db.spec.init_mode = Some(DbInitMode::Pitr);
    db.spec.pitr_config = Some(PitrConfig {
        data_restore_command: "cp -a /backups/base/. %d".into(),
        archive_recovery_settings: Some(ArchiveRecoverySettings {
            restore_command: "cp /backups/wal/%f %p".into(),
        }),
        recovery_target_settings: Some(RecoveryTargetSettings {
            recovery_target_time: "2026-11-24 10:00:00+00".into(),
            ..Default::default()
        }),
    });
    golden(
        "pitr.txt",
        &show(&render(
            &cd,
            &db,
            &local(),
            None,
            false,
            true,
            &BTreeMap::new(),
        )),
    );
    let promoted = plain(&cd, &db);
    assert!(!promoted.recovery_signal && !promoted.postgresql_conf.contains("recovery_target"));
    let mut db = master_db();
    db.spec.role = Some(DbRole::Standby);
    db.spec.follow_config = Some(FollowConfig {
        kind: FollowType::External,
        dbuid: String::new(),
        standby_settings: Some(StandbySettings {
            primary_conninfo: "host=192.0.2.1 port=5432 user=repl".into(),
            primary_slot_name: "dr_site".into(),
            recovery_min_apply_delay: String::new(),
        }),
        archive_recovery_settings: None,
    });
    golden("standby-cluster-master.txt", &show(&plain(&cd, &db)));
    // Right after its pitr-style restore (init mode pitr, restore pending) a standby
    // cluster's master is a standby of the external primary, not a point-in-time recovery.
    db.spec.init_mode = Some(DbInitMode::Pitr);
    let restored = render(&cd, &db, &local(), None, false, true, &BTreeMap::new());
    assert!(restored.standby_signal && !restored.recovery_signal);
    assert!(restored
        .postgresql_conf
        .contains("primary_conninfo = 'host=192.0.2.1"));
}

#[test]
fn synchronous_standby_names_table() {
    let cases: &[(&[&str], &str)] = &[
        (&[], ""),
        (&["a"], "1 (stolon_a)"),
        (&["a", "b"], "2 (stolon_a,stolon_b)"),
        (&["stolonfakestandby"], "1 (stolonfakestandby)"),
    ];
    for (set, want) in cases {
        let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
        assert_eq!(synchronous_standby_names(&set), *want);
    }
}

#[test]
fn parse_size_mb_table() {
    for (v, want) in [
        ("128MB", Some(128)),
        ("1GB", Some(1024)),
        ("512", Some(512)),
        ("2048kB", Some(2)),
        ("'64MB'", Some(64)),
        ("lots", None),
        ("", None),
    ] {
        assert_eq!(parse_size_mb(v), want, "{v}");
    }
}

#[test]
fn wal_keep_size_has_a_floor() {
    let cd = cluster(ClusterSpec::default());
    let r = plain(&cd, &master_db());
    assert!(r.postgresql_conf.contains("wal_keep_size = '128MB'"));
    let r = plain(&cd, &standby_db());
    assert!(r.postgresql_conf.contains("wal_keep_size = '1024MB'"));
}

#[test]
fn parse_conf_reads_what_initdb_writes() {
    let text = "max_connections = 100\t\t\t# (change requires restart)\n\
                shared_buffers = 128MB\n\
                #work_mem = 4MB\n\
                log_timezone = 'Etc/UTC'\n\
                datestyle = 'iso, mdy'\n\
                lc_messages = 'C.UTF-8'  # locale\n\
                weird = 'it''s # not a comment'\n\
                include_if_exists = 'x.conf'\n";
    let p = parse_conf(text);
    assert_eq!(p["max_connections"], "100");
    assert_eq!(p["shared_buffers"], "128MB");
    assert_eq!(p["log_timezone"], "Etc/UTC");
    assert_eq!(p["datestyle"], "iso, mdy");
    assert_eq!(p["weird"], "it's # not a comment");
    assert!(!p.contains_key("work_mem"));
    assert!(!p.contains_key("include_if_exists"));
}

#[test]
fn the_shutdown_checkpoint_only_of_a_clean_shutdown() {
    let out = |state: &str| {
        format!(
            "pg_control version number:            1300\n\
             Database cluster state:               {state}\n\
             pg_control last modified:             Tue 01 Dec 2026 20:15:44 UTC\n\
             Latest checkpoint location:           1/6000028\n\
             Latest checkpoint's REDO location:    1/6000028\n"
        )
    };
    assert_eq!(
        parse_shutdown_checkpoint(&out("shut down")),
        Some((1 << 32) | 0x600_0028)
    );
    for state in [
        "shut down in recovery",
        "in production",
        "in crash recovery",
    ] {
        assert_eq!(parse_shutdown_checkpoint(&out(state)), None, "{state}");
    }
    assert_eq!(
        parse_shutdown_checkpoint("Database cluster state: shut down\n"),
        None
    );
}

/// `initMode: existing` with mergePgParameters: the parameters found in the data dir are
/// rendered at the first start (under the spec's own), as Go stolon's includeConfig does, so
/// a setting that needs a restart (archive_mode) is there from the start; without
/// includePreviousConfig they are not.
#[test]
fn an_existing_instances_parameters_are_rendered_while_included() {
    let cd = cluster(ClusterSpec::default());
    let previous: BTreeMap<String, String> = [
        ("archive_mode", "on"),
        ("work_mem", "1MB"),
        ("port", "6000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let mut db = master_db();
    db.spec
        .pg_parameters
        .insert("work_mem".into(), "8MB".into());
    db.spec.include_previous_config = true;
    let conf = render(&cd, &db, &local(), None, false, false, &previous).postgresql_conf;
    assert!(conf.contains("archive_mode = 'on'"), "{conf}");
    assert!(conf.contains("work_mem = '8MB'"), "the spec wins: {conf}");
    assert!(
        conf.contains("port = 5433"),
        "managed ones stay managed: {conf}"
    );
    db.spec.include_previous_config = false;
    let conf = render(&cd, &db, &local(), None, false, false, &previous).postgresql_conf;
    assert!(!conf.contains("archive_mode"), "{conf}");
}

/// A db replaced as master (role master, another db is the cluster's master) is rendered as
/// a standby of nobody: standby.signal, no primary_conninfo, no synchronous standbys.
#[test]
fn an_old_master_is_rendered_as_a_standby_of_nobody() {
    let mut cd = cluster(ClusterSpec::default());
    let mut db = master_db();
    db.spec.synchronous_replication = true;
    db.spec.synchronous_standbys = vec!["s1".into()];
    cd.cluster.status.master = "m1".into();
    let current = plain(&cd, &db);
    assert!(!current.standby_signal);
    assert!(current
        .postgresql_conf
        .contains("synchronous_standby_names = '1 (stolon_s1)'"));
    cd.cluster.status.master = "s1".into();
    let old = plain(&cd, &db);
    assert!(old.standby_signal, "read-only");
    assert!(!old.postgresql_conf.contains("primary_conninfo"));
    assert!(old
        .postgresql_conf
        .contains("synchronous_standby_names = ''"));
}
