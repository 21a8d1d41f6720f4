//! Reading a cluster spec the way Go's encoding/json reads it: object keys match the field
//! names without regard to case (stolon's own docs write `primaryConnInfo` for
//! `primaryConninfo`; a serde derive would drop it silently, leaving a standby cluster with
//! no upstream), and keys that match no field are reported so `stolonctl` can warn.
//!
//! The known keys come from serialising a spec with every field set ([`full_sample`]), so
//! the serde renames stay the one source of the names; a test checks the sample covers
//! every field.

use super::spec::*;
use super::GoDuration;
use serde_json::{Map, Value};

/// Object fields whose keys are the user's (PostgreSQL parameter names), not field names.
const USER_MAPS: &[&str] = &["pgParameters"];

/// A spec with every field set, so its JSON holds every key at every level.
fn full_sample() -> ClusterSpec {
    let s = |v: &str| v.to_string();
    let archive = ArchiveRecoverySettings {
        restore_command: s("x"),
    };
    let mut spec = ClusterSpec {
        init_mode: Some(ClusterInitMode::New),
        new_config: Some(NewConfig {
            locale: s("x"),
            encoding: s("x"),
            data_checksums: true,
        }),
        pitr_config: Some(PitrConfig {
            data_restore_command: s("x"),
            archive_recovery_settings: Some(archive.clone()),
            recovery_target_settings: Some(RecoveryTargetSettings {
                recovery_target: s("x"),
                recovery_target_lsn: s("x"),
                recovery_target_name: s("x"),
                recovery_target_time: s("x"),
                recovery_target_xid: s("x"),
                recovery_target_timeline: s("x"),
            }),
        }),
        existing_config: Some(ExistingConfig { keeper_uid: s("x") }),
        standby_config: Some(StandbyConfig {
            standby_settings: Some(StandbySettings {
                primary_conninfo: s("x"),
                primary_slot_name: s("x"),
                recovery_min_apply_delay: s("x"),
            }),
            archive_recovery_settings: Some(archive),
        }),
        additional_master_replication_slots: vec![s("x")],
        pg_hba: Some(vec![]),
        ..ClusterSpec::default()
    }
    .with_defaults();
    spec.pg_parameters.insert(s("x"), s("x"));
    spec.sleep_interval = Some(GoDuration::from_secs(1));
    // Ours, not among the defaults Go prints: set here so it is a known key.
    spec.failsafe_mode = Some(true);
    spec
}

/// Renames every key of `doc` that matches a spec field only without regard to case to the
/// field's name (an exact match wins, as in Go), and returns the paths of keys that match
/// no field (`standbyConfig.standbySettings.primaryConnInfoo`).
pub fn normalize_spec_keys(doc: &mut Value) -> Vec<String> {
    let known = serde_json::to_value(full_sample()).unwrap_or(Value::Null);
    let mut unknown = Vec::new();
    normalize(doc, &known, "", &mut unknown);
    unknown
}

fn normalize(doc: &mut Value, known: &Value, path: &str, unknown: &mut Vec<String>) {
    let (Value::Object(obj), Value::Object(fields)) = (doc, known) else {
        return;
    };
    let old = std::mem::take(obj);
    let exact: Vec<String> = old
        .keys()
        .filter(|k| fields.contains_key(*k))
        .cloned()
        .collect();
    let mut out = Map::new();
    for (key, mut value) in old {
        let name = if fields.contains_key(&key) {
            key
        } else if let Some(f) = fields.keys().find(|f| f.eq_ignore_ascii_case(&key)) {
            if exact.contains(f) {
                // The exact spelling is present too: Go keeps the last one it reads; we keep
                // the exact one and report the other.
                unknown.push(join(path, &key));
                continue;
            }
            f.clone()
        } else {
            unknown.push(join(path, &key));
            out.insert(key, value);
            continue;
        };
        if !USER_MAPS.contains(&name.as_str()) {
            if let Some(sub) = fields.get(&name) {
                normalize(&mut value, sub, &join(path, &name), unknown);
            }
        }
        out.insert(name, value);
    }
    *obj = out;
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// A spec from JSON read as Go reads it, with the keys that matched no field.
pub fn spec_from_value(mut doc: Value) -> Result<(ClusterSpec, Vec<String>), serde_json::Error> {
    let unknown = normalize_spec_keys(&mut doc);
    let spec = serde_json::from_value(doc)?;
    Ok((spec, unknown))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_sample_sets_every_field() {
        // A field missing from the sample would be neither case-folded nor known: every
        // field of the spec must show in its JSON (none left in `extra`).
        let v = serde_json::to_value(full_sample()).expect("json");
        let back: ClusterSpec = serde_json::from_value(v.clone()).expect("back");
        assert!(back.extra.is_empty());
        let top = v.as_object().expect("object");
        for key in [
            "pgHBA",
            "automaticPgRestart",
            "dbWaitReadyTimeout",
            "maxStandbyLag",
            "failsafeMode",
        ] {
            assert!(top.contains_key(key), "{key} missing from the sample");
        }
    }

    #[test]
    fn keys_match_without_regard_to_case_at_every_level() {
        let (spec, unknown) = spec_from_value(json!({
            "initmode": "pitr",
            "ROLE": "standby",
            "standbyConfig": {"standbySettings": {"primaryConnInfo": "host=a port=5"}},
            "pitrConfig": {"DataRestoreCommand": "cp -a /b %d"},
            "pgParameters": {"Work_Mem": "4MB"},
            "SleepInterval": "2s"
        }))
        .expect("spec");
        assert!(unknown.is_empty(), "{unknown:?}");
        let ss = spec
            .standby_config
            .and_then(|c| c.standby_settings)
            .expect("ss");
        assert_eq!(ss.primary_conninfo, "host=a port=5");
        assert_eq!(spec.role, Some(ClusterRole::Standby));
        assert_eq!(spec.init_mode, Some(ClusterInitMode::Pitr));
        assert_eq!(
            spec.pitr_config.map(|p| p.data_restore_command).as_deref(),
            Some("cp -a /b %d")
        );
        // PostgreSQL parameter names are the user's: never renamed.
        assert_eq!(
            spec.pg_parameters.get("Work_Mem").map(String::as_str),
            Some("4MB")
        );
        assert_eq!(spec.sleep_interval, Some(GoDuration::from_secs(2)));
    }

    #[test]
    fn unknown_keys_are_reported_with_their_path_and_kept() {
        let (spec, unknown) = spec_from_value(json!({
            "initMode": "new",
            "sleepIntervall": "2s",
            "standbyConfig": {"standbySettings": {"primaryConnInfoo": "x"}}
        }))
        .expect("spec");
        assert_eq!(
            unknown,
            vec![
                "sleepIntervall".to_string(),
                "standbyConfig.standbySettings.primaryConnInfoo".to_string()
            ]
        );
        assert!(spec.extra.contains_key("sleepIntervall"));
    }

    #[test]
    fn an_exact_key_wins_over_a_folded_one() {
        let (spec, unknown) = spec_from_value(json!({
            "initMode": "new", "maxstandbys": 3, "maxStandbys": 5
        }))
        .expect("spec");
        assert_eq!(spec.max_standbys, Some(5));
        assert_eq!(unknown, vec!["maxstandbys".to_string()]);
    }
}
