//! `loadtest swarm` in its small form, as CI runs it: 1 and then 10 real proxies on one
//! cluster of real processes, a switchover and a failover at each size, and a failover
//! with one proxy frozen. With `STOLON_TEST_LONG` (`scripts/test.sh --long`): 1, 10 and
//! 100 proxies, three changes of each kind at each size. Timings are the benchmark's to report, not this test's to
//! assert; what must hold is what the fleet design promises: no acknowledged write lost,
//! (synchronous replication), every proxy's route change read, and idle proxies writing nothing to the store (their
//! info is written on change and kept alive by its lease).

use std::process::{Command, Stdio};

#[test]
fn swarm_of_ten() {
    let out = tempfile::tempdir().expect("tempdir");
    let long = std::env::var_os("STOLON_TEST_LONG").is_some();
    let (sizes, changes) = if long {
        ("1,10,100", "3")
    } else {
        ("1,10", "1")
    };
    let status = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args([
            "swarm",
            "--proxies",
            sizes,
            "--switchovers",
            changes,
            "--failovers",
            changes,
            "--idle",
            "5s",
            "--freeze",
            // Synchronous: a kill -9 failover may then lose no acknowledged write.
            "--spec",
            r#"{"synchronousReplication": true, "minSynchronousStandbys": 1, "maxSynchronousStandbys": 1}"#,
            "--out-dir",
        ])
        .arg(out.path())
        .stdin(Stdio::null())
        .status()
        .expect("run loadtest swarm");
    assert!(status.success(), "loadtest swarm failed: {status}");
    let text = std::fs::read_to_string(out.path().join("swarm.json")).expect("swarm.json");
    let r: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert!(
        r["acked"].as_u64().unwrap_or(0) > 0,
        "no write acknowledged"
    );
    assert_eq!(r["acked_lost"], 0, "acknowledged writes lost");
    let steps = r["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), if long { 3 } else { 2 });
    for step in steps {
        let n = step["proxies"].as_u64().expect("proxies");
        let idle = &step["idle"];
        let writes = idle["proxy_info_writes_per_s"].as_f64().expect("writes")
            * idle["seconds"].as_f64().expect("seconds");
        assert!(
            writes < 0.5,
            "{n} idle proxies wrote their info {writes} times"
        );
        for ch in step["changes"].as_array().expect("changes") {
            let frozen = ch["frozen_proxy"].as_bool().unwrap_or(false);
            let expected = if frozen { n - 1 } else { n };
            assert_eq!(
                ch["propagation_proxies"].as_u64(),
                Some(expected),
                "route changes read: {ch}"
            );
        }
    }
    let frozen = steps[steps.len() - 1]["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .filter(|c| c["frozen_proxy"] == true)
        .count();
    assert_eq!(frozen, 1, "no failover with a frozen proxy");
    for f in ["swarm.md", "swarm.svg"] {
        assert!(out.path().join(f).exists(), "{f} missing");
    }
}
