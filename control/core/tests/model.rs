//! Golden tests of the model: documents in the Go stolon encoding are read, understood and
//! written back without losing anything; spec defaults, validation and merge patch.

use serde_json::{json, Value};
use stolon_core::model::*;

const GO_CLUSTERDATA: &str = include_str!("golden/clusterdata-go.json");

#[test]
fn reads_go_clusterdata() {
    let cd = ClusterData::from_json(GO_CLUSTERDATA.as_bytes()).expect("parse");
    assert_eq!(cd.cluster.uid, "b8f0a6c2");
    assert_eq!(cd.cluster.status.phase, Some(ClusterPhase::Normal));
    assert_eq!(cd.cluster.status.master, "db0001");
    let spec = &cd.cluster.spec;
    assert_eq!(spec.sleep_interval(), GoDuration::from_secs(2));
    assert_eq!(spec.fail_interval(), GoDuration::from_secs(10));
    assert_eq!(
        spec.proxy_timeout(),
        GoDuration::from_secs(15),
        "default applies"
    );
    assert!(spec.synchronous_replication());
    assert_eq!(spec.max_synchronous_standbys(), 2);
    assert_eq!(spec.pg_hba, None, "null pgHBA means default rules");
    assert_eq!(spec.init_mode, Some(ClusterInitMode::New));

    let k1 = &cd.keepers["keeper1"];
    assert!(!k1.status.healthy, "omitted bool is false");
    assert!(k1.status.force_fail);
    assert_eq!(
        k1.status.postgres_binary_version,
        PostgresBinaryVersion { maj: 15, min: 6 }
    );

    let master = &cd.dbs["db0001"];
    assert_eq!(master.spec.role, Some(DbRole::Master));
    assert_eq!(master.status.port, Some(5432), "port read from a string");
    assert_eq!(master.status.system_id, "7365012345678901234");
    assert_eq!(master.status.x_log_pos, 50331744);
    assert_eq!(master.status.timelines_history[0].switch_point, 50331648);
    let standby = &cd.dbs["db0002"];
    assert_eq!(standby.spec.pg_hba, Some(vec![]), "[] differs from null");
    assert_eq!(standby.spec.init_mode, Some(DbInitMode::Resync));
    assert!(
        standby.spec.followers.is_empty(),
        "null slice reads as empty"
    );
    let follow = standby.spec.follow_config.as_ref().expect("followConfig");
    assert_eq!(
        (follow.kind, follow.dbuid.as_str()),
        (FollowType::Internal, "db0001")
    );

    assert_eq!(cd.proxy.generation, 7);
    assert_eq!(cd.proxy.spec.enabled_proxies, vec!["proxy-a", "proxy-b"]);
    assert_eq!(cd.proxy_master_address(), Some(("10.0.0.1", 5432)));
}

#[test]
fn rewrite_keeps_unknown_fields_and_round_trips() {
    let cd = ClusterData::from_json(GO_CLUSTERDATA.as_bytes()).expect("parse");
    let out: Value = serde_json::from_slice(&cd.to_json().expect("to json")).expect("json");
    assert_eq!(out["futureTopLevel"], "kept");
    assert_eq!(
        out["keepers"]["keeper1"]["status"]["futureKeeperField"],
        json!({"x": 1})
    );
    assert_eq!(
        out["dbs"]["db0001"]["status"]["systemdID"],
        "7365012345678901234"
    );
    assert_eq!(
        out["dbs"]["db0001"]["status"]["port"], "5432",
        "port written as Go does"
    );
    assert_eq!(out["proxy"]["spec"]["masterDbUid"], "db0001");
    let again = ClusterData::from_json(&cd.to_json().expect("to json")).expect("reparse");
    assert_eq!(again, cd);
}

#[test]
fn every_field_of_the_go_document_survives_a_rewrite() {
    // Everything the Go writer put in must come back out with the same meaning: compare
    // the two documents with Go's zero values and nulls dropped on both sides.
    fn strip(v: &Value) -> Option<Value> {
        match v {
            Value::Null => None,
            Value::Bool(false) => None,
            Value::Number(n) if n.as_f64() == Some(0.0) => None,
            Value::String(s) if s.is_empty() => None,
            Value::Array(a) if a.is_empty() => None,
            Value::Array(a) => Some(Value::Array(a.iter().filter_map(strip).collect())),
            Value::Object(o) => {
                let m: serde_json::Map<String, Value> = o
                    .iter()
                    .filter_map(|(k, v)| strip(v).map(|v| (k.clone(), v)))
                    .collect();
                (!m.is_empty()).then_some(Value::Object(m))
            }
            other => Some(other.clone()),
        }
    }
    let original: Value = serde_json::from_str(GO_CLUSTERDATA).expect("json");
    let cd = ClusterData::from_json(GO_CLUSTERDATA.as_bytes()).expect("parse");
    let rewritten: Value = serde_json::from_slice(&cd.to_json().expect("to json")).expect("json");
    let (mut a, mut b) = (strip(&original), strip(&rewritten));
    // Timestamps may be re-rendered in another but equal form: compare them parsed.
    for doc in [&mut a, &mut b].into_iter().flatten() {
        normalise_times(doc);
    }
    assert_eq!(a, b);
}

fn normalise_times(v: &mut Value) {
    match v {
        Value::Object(o) => {
            for (k, v) in o.iter_mut() {
                if k.ends_with("Time") {
                    let t: Timestamp = serde_json::from_value(v.clone()).expect("time");
                    *v = json!(t.0.unix_timestamp_nanos().to_string());
                } else {
                    normalise_times(v);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(normalise_times),
        _ => {}
    }
}

#[test]
fn reads_go_infos() {
    let v: Value = serde_json::from_str(include_str!("golden/infos-go.json")).expect("json");
    let ki: KeeperInfo = serde_json::from_value(v["keeper"].clone()).expect("keeper info");
    let ps = ki.postgres_state.as_ref().expect("state");
    assert_eq!((ps.port, ps.healthy, ps.timeline_id), (Some(5432), true, 2));
    assert_eq!(ki.priority, 0, "absent priority is 0");
    let pi: ProxyInfo = serde_json::from_value(v["proxy"].clone()).expect("proxy info");
    assert_eq!(pi.proxy_timeout, GoDuration::from_secs(15), "nanoseconds");
    assert_eq!(pi.generation, 7);
    let back: Value = serde_json::to_value(&pi).expect("json");
    assert_eq!(back["ProxyTimeout"], 15_000_000_000i64);
    assert_eq!(back["UID"], "proxy-a");
    let si: SentinelInfo = serde_json::from_value(v["sentinel"].clone()).expect("sentinel");
    assert_eq!(si.uid, "sentinel-1");
}

#[test]
fn spec_defaults_golden() {
    let spec = ClusterSpec {
        init_mode: Some(ClusterInitMode::New),
        ..Default::default()
    };
    let got = serde_json::to_value(spec.with_defaults()).expect("json");
    let want: Value =
        serde_json::from_str(include_str!("golden/spec-defaults.json")).expect("golden");
    assert_eq!(got, want);
    assert_eq!(
        spec.with_defaults().max_standby_lag(),
        1024 * 1024,
        "not stolon's typo"
    );
}

fn new_spec() -> ClusterSpec {
    ClusterSpec {
        init_mode: Some(ClusterInitMode::New),
        ..Default::default()
    }
}

fn spec_from(v: Value) -> ClusterSpec {
    serde_json::from_value(v).expect("spec json")
}

#[test]
fn validation_rules_table() {
    let standby_cfg = json!({"standbySettings": {"primaryConninfo": "host=x"}});
    let cases: Vec<(&str, Value, Option<&str>)> = vec![
        ("minimal new", json!({"initMode": "new"}), None),
        ("initMode required", json!({}), Some("initMode")),
        (
            "standby with new",
            json!({"initMode": "new", "role": "standby", "standbyConfig": standby_cfg}),
            Some("role"),
        ),
        (
            "standby needs standbyConfig",
            json!({"initMode": "pitr", "role": "standby", "pitrConfig": {"dataRestoreCommand": "cp"}}),
            Some("standbyConfig"),
        ),
        (
            "standby pitr ok",
            json!({"initMode": "pitr", "role": "standby", "pitrConfig": {"dataRestoreCommand": "cp"}, "standbyConfig": standby_cfg}),
            None,
        ),
        (
            "recovery target with standby",
            json!({"initMode": "pitr", "role": "standby", "standbyConfig": standby_cfg, "pitrConfig": {"dataRestoreCommand": "cp", "recoveryTargetSettings": {"recoveryTargetTime": "2024-01-01"}}}),
            Some("recoveryTargetSettings"),
        ),
        (
            "pitr needs config",
            json!({"initMode": "pitr"}),
            Some("pitrConfig"),
        ),
        (
            "pitr needs command",
            json!({"initMode": "pitr", "pitrConfig": {}}),
            Some("dataRestoreCommand"),
        ),
        (
            "existing needs keeper",
            json!({"initMode": "existing"}),
            Some("existingConfig.keeperUID"),
        ),
        (
            "existing ok",
            json!({"initMode": "existing", "existingConfig": {"keeperUID": "k1"}}),
            None,
        ),
        (
            "check interval below timeout",
            json!({"initMode": "new", "proxyCheckInterval": "15s", "proxyTimeout": "15s"}),
            Some("proxyCheckInterval"),
        ),
        (
            "check interval below default timeout",
            json!({"initMode": "new", "proxyCheckInterval": "20s"}),
            Some("proxyCheckInterval"),
        ),
        (
            "max sync below min",
            json!({"initMode": "new", "minSynchronousStandbys": 2, "maxSynchronousStandbys": 1}),
            Some("maxSynchronousStandbys"),
        ),
        (
            "max sync zero",
            json!({"initMode": "new", "minSynchronousStandbys": 0, "maxSynchronousStandbys": 0}),
            Some("maxSynchronousStandbys"),
        ),
        (
            "min sync zero allowed",
            json!({"initMode": "new", "minSynchronousStandbys": 0, "maxSynchronousStandbys": 1}),
            None,
        ),
        (
            "negative duration",
            json!({"initMode": "new", "requestTimeout": "-1s"}),
            Some("requestTimeout"),
        ),
        (
            "zero fail interval",
            json!({"initMode": "new", "failInterval": "0s"}),
            Some("failInterval"),
        ),
        (
            "maxStandbys zero",
            json!({"initMode": "new", "maxStandbys": 0}),
            Some("maxStandbys"),
        ),
        (
            "maxStandbysPerSender zero",
            json!({"initMode": "new", "maxStandbysPerSender": 0}),
            Some("maxStandbysPerSender"),
        ),
        (
            "bad slot name",
            json!({"initMode": "new", "additionalMasterReplicationSlots": ["Bad-Name"]}),
            Some("additionalMasterReplicationSlots"),
        ),
        (
            "reserved slot name",
            json!({"initMode": "new", "additionalMasterReplicationSlots": ["stolon_x"]}),
            Some("reserved"),
        ),
        (
            "good slot name",
            json!({"initMode": "new", "additionalMasterReplicationSlots": ["backup_1"]}),
            None,
        ),
        (
            "hba newline",
            json!({"initMode": "new", "pgHBA": ["host all all 0.0.0.0/0 md5\nlocal all all trust"]}),
            Some("pgHBA"),
        ),
    ];
    for (name, doc, want) in cases {
        let got = spec_from(doc).validate();
        match (want, got) {
            (None, Ok(())) => {}
            (Some(needle), Err(e)) => {
                assert!(
                    e.to_string().contains(needle),
                    "{name}: error {e} lacks {needle:?}"
                )
            }
            (want, got) => panic!("{name}: wanted {want:?}, got {got:?}"),
        }
    }
}

#[test]
fn update_rules() {
    let base = new_spec();
    let mut other_mode = base.clone();
    other_mode.init_mode = Some(ClusterInitMode::Existing);
    other_mode.existing_config = Some(ExistingConfig {
        keeper_uid: "k".into(),
    });
    let e = base
        .validate_update(&other_mode)
        .expect_err("initMode change");
    assert_eq!(e.field, "initMode");

    let master = spec_from(json!({"initMode": "pitr", "pitrConfig": {"dataRestoreCommand": "x"}}));
    let standby = spec_from(
        json!({"initMode": "pitr", "pitrConfig": {"dataRestoreCommand": "x"},
        "role": "standby", "standbyConfig": {}}),
    );
    assert_eq!(
        master
            .validate_update(&standby)
            .expect_err("to standby")
            .field,
        "role"
    );
    standby
        .validate_update(&master)
        .expect("promote a standby cluster is allowed");
}

#[test]
fn merge_patch_rfc7386() {
    let base = spec_from(
        json!({"initMode": "new", "pgParameters": {"a": "1", "b": "2"},
        "synchronousReplication": true}),
    );
    let patched = base
        .merge_patch(
            &json!({"pgParameters": {"a": null, "c": "3"}, "synchronousReplication": null,
            "failInterval": "8s"}),
        )
        .expect("patch");
    assert_eq!(
        patched
            .pg_parameters
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect::<Vec<_>>(),
        vec![("b", "2"), ("c", "3")]
    );
    assert_eq!(
        patched.synchronous_replication, None,
        "null removes, back to the default"
    );
    assert_eq!(patched.fail_interval, Some(GoDuration::from_secs(8)));
    let err = base
        .merge_patch(&json!({"proxyCheckInterval": "1m"}))
        .expect_err("invalid");
    assert!(err.to_string().contains("proxyCheckInterval"), "{err}");
    let err = base
        .merge_patch(&json!({"maxStandbys": "lots"}))
        .expect_err("bad type");
    assert!(err.to_string().contains("malformed spec"), "{err}");
}

#[test]
fn new_cluster_document() {
    let cd = ClusterData::new("uid1", new_spec(), Timestamp::now());
    let back = ClusterData::from_json(&cd.to_json().expect("to json")).expect("reparse");
    assert_eq!(back.cluster.status.phase, Some(ClusterPhase::Initializing));
    assert_eq!(back.format_version, FORMAT_VERSION);
    assert_eq!(back.proxy_master_address(), None);
}

#[test]
fn no_master_when_db_unknown_or_address_missing() {
    let mut cd = ClusterData::from_json(GO_CLUSTERDATA.as_bytes()).expect("parse");
    cd.proxy.spec.master_db_uid = "nope".into();
    assert_eq!(cd.proxy_master_address(), None);
    cd.proxy.spec.master_db_uid = "db0001".into();
    cd.dbs.get_mut("db0001").expect("db").status.port = None;
    assert_eq!(cd.proxy_master_address(), None);
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn go_duration_display_parses_back(n in any::<i64>()) {
            let d = GoDuration(n);
            prop_assert_eq!(GoDuration::parse(&d.to_string()).map(|p| (p.0 - n).abs() <= (n.abs() / 1_000_000_000_000).max(1)), Ok(true));
        }

        #[test]
        fn clusterdata_reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = ClusterData::from_json(&bytes);
        }

        #[test]
        fn mutated_golden_never_panics(pos in 0usize..2000, byte in any::<u8>()) {
            let mut doc = GO_CLUSTERDATA.as_bytes().to_vec();
            let p = pos % doc.len();
            doc[p] = byte;
            let _ = ClusterData::from_json(&doc);
        }
    }
}

/// Found by the `infos` fuzz target: a number in an unknown field (a newer version's, say)
/// came back from a rewrite with its last digit changed. It must be written as read.
#[test]
fn unknown_numbers_are_written_back_exactly() {
    let doc = br#"{"infoUID":"a","uid":"k","newField":{"x":66666666666666666666666666666666666650331744,"y":0.1,"z":1e-300}}"#;
    let info: stolon_core::model::KeeperInfo =
        stolon_core::model::decode("keeper info", doc).expect("reads");
    let written = serde_json::to_vec(&info).expect("writes");
    let again: stolon_core::model::KeeperInfo =
        stolon_core::model::decode("keeper info", &written).expect("reads again");
    assert_eq!(again, info);
    assert_eq!(serde_json::to_vec(&again).expect("writes"), written);
}

/// WAL positions (and the document's change time) alone are churn the sentinel may hold back
/// for a sleepInterval; anything else is a change to write at once.
#[test]
fn wal_positions_alone_are_churn() {
    let base = {
        let mut cd = ClusterData::new("c", Default::default(), Timestamp::now());
        let mut db = Db {
            uid: "d1".into(),
            ..Default::default()
        };
        db.status.x_log_pos = 100;
        db.status.healthy = true;
        cd.dbs.insert("d1".into(), db);
        cd
    };
    let with = |f: &dyn Fn(&mut ClusterData)| {
        let mut cd = base.clone();
        f(&mut cd);
        cd
    };
    let cases: Vec<(&str, ClusterData, bool)> = vec![
        ("identical", base.clone(), false),
        (
            "a WAL position",
            with(&|cd| cd.dbs.get_mut("d1").expect("d1").status.x_log_pos = 200),
            true,
        ),
        (
            "a WAL position and the change time",
            with(&|cd| {
                cd.dbs.get_mut("d1").expect("d1").status.x_log_pos = 300;
                cd.change_time = None;
            }),
            true,
        ),
        (
            "health",
            with(&|cd| cd.dbs.get_mut("d1").expect("d1").status.healthy = false),
            false,
        ),
        (
            "a WAL position and a timeline",
            with(&|cd| {
                let st = &mut cd.dbs.get_mut("d1").expect("d1").status;
                st.x_log_pos = 200;
                st.timeline_id = 2;
            }),
            false,
        ),
        (
            "the proxies' generation",
            with(&|cd| cd.proxy.generation += 1),
            false,
        ),
        ("a db removed", with(&|cd| drop(cd.dbs.remove("d1"))), false),
    ];
    for (what, next, churn) in cases {
        assert_eq!(base.differs_only_in_wal_positions(&next), churn, "{what}");
    }
}
