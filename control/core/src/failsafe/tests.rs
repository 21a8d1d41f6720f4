//! Table tests of the failsafe rules.

use super::*;
use crate::model::{ClusterSpec, Db, DbSpec, Keeper, KeeperStatus, Timestamp};

/// A cluster "c" whose master is db "d1" on keeper "k1", with standbys d2 on k2 and d3 on
/// k3; k4 is a keeper without a db.
fn cd(failsafe: bool) -> ClusterData {
    let spec = ClusterSpec {
        failsafe_mode: Some(failsafe),
        ..Default::default()
    };
    let mut cd = ClusterData::new("c", spec, Timestamp::now());
    for (k, addr) in [("k1", "h1:1"), ("k2", "h2:2"), ("k3", ""), ("k4", "h4:4")] {
        let status = KeeperStatus {
            failsafe_address: addr.into(),
            ..Default::default()
        };
        let keeper = Keeper {
            uid: k.into(),
            status,
            ..Default::default()
        };
        cd.keepers.insert(k.into(), keeper);
    }
    for (d, k) in [("d1", "k1"), ("d2", "k2"), ("d3", "k3")] {
        let db = Db {
            uid: d.into(),
            spec: DbSpec {
                keeper_uid: k.into(),
                ..Default::default()
            },
            ..Default::default()
        };
        cd.dbs.insert(d.into(), db);
    }
    cd.cluster.status.master = "d1".into();
    cd
}

fn req(db: &str, rev: i64) -> AckRequest {
    AckRequest {
        cluster_uid: "c".into(),
        master_db: db.into(),
        revision: rev,
        validity_ms: 1250,
    }
}

#[test]
fn acknowledgements_by_what_the_keeper_knows() {
    let on = cd(true);
    let off = cd(false);
    let other = ClusterData::new("x", on.cluster.spec.clone(), Timestamp::now());
    let view = |cd: Option<&'static ClusterData>, keeper: &'static str, rev: i64, primary: bool| {
        AckerView {
            keeper_uid: keeper,
            cd,
            revision: rev,
            runs_primary: primary,
            store_quiet: false,
        }
    };
    let quiet = |v: AckerView<'static>| AckerView {
        store_quiet: true,
        ..v
    };
    let on: &'static ClusterData = Box::leak(Box::new(on));
    let off: &'static ClusterData = Box::leak(Box::new(off));
    let other: &'static ClusterData = Box::leak(Box::new(other));
    let rows: [(&str, AckerView<'static>, AckRequest, bool); 11] = [
        (
            "same revision, same master",
            view(Some(on), "k2", 10, false),
            req("d1", 10),
            true,
        ),
        (
            "an older revision read",
            view(Some(on), "k2", 9, false),
            req("d1", 10),
            true,
        ),
        (
            "a newer revision read that names the same master, the store answering it",
            view(Some(on), "k2", 11, false),
            req("d1", 10),
            false,
        ),
        (
            "a newer revision read that names the same master, the store out for it too",
            quiet(view(Some(on), "k2", 11, false)),
            req("d1", 10),
            true,
        ),
        (
            "a newer revision read that names another master, the store out for it too",
            quiet(view(Some(on), "k2", 11, false)),
            req("d2", 10),
            false,
        ),
        (
            "another master named",
            view(Some(on), "k2", 10, false),
            req("d2", 10),
            false,
        ),
        (
            "failsafe off",
            view(Some(off), "k2", 10, false),
            req("d1", 10),
            false,
        ),
        (
            "no clusterdata",
            view(None, "k2", 0, false),
            req("d1", 10),
            false,
        ),
        (
            "another cluster",
            view(Some(other), "k2", 10, false),
            req("d1", 10),
            false,
        ),
        (
            "runs a primary itself",
            view(Some(on), "k2", 9, true),
            req("d1", 10),
            false,
        ),
        (
            "the master itself",
            view(Some(on), "k1", 10, false),
            req("d1", 10),
            false,
        ),
    ];
    for (what, v, r, want) in rows {
        let got = acknowledge(&v, &r);
        assert_eq!(got.is_ok(), want, "{what}: {got:?}");
    }
}

#[test]
fn peers_are_the_other_keepers_with_a_db() {
    let p = peers(&cd(true), "k1");
    let want: BTreeMap<String, Option<String>> = [
        ("k2".to_string(), Some("h2:2".to_string())),
        ("k3".to_string(), None),
    ]
    .into_iter()
    .collect();
    assert_eq!(p, want, "k4 has no db, k3 published no address");
}

#[test]
fn the_hold_ends_at_the_earliest_acknowledgement_and_needs_every_peer() {
    let peers: Vec<String> = vec!["k2".into(), "k3".into()];
    let mut acks = BTreeMap::new();
    assert_eq!(hold_until(&peers, &acks), None::<u64>);
    acks.insert("k2".to_string(), 50u64);
    assert_eq!(hold_until(&peers, &acks), None, "k3 has not answered");
    acks.insert("k3".to_string(), 40);
    assert_eq!(hold_until(&peers, &acks), Some(40));
    acks.insert("k9".to_string(), 10);
    assert_eq!(hold_until(&peers, &acks), Some(40), "not a peer");
    assert_eq!(
        hold_until(&Vec::<String>::new(), &acks),
        None,
        "a lone keeper"
    );
}

#[test]
fn requests_travel_as_a_query_and_bad_ones_are_refused() {
    let r = req("d1", 42);
    assert_eq!(AckRequest::from_query(&r.to_query()), Some(r));
    for bad in [
        "",
        "cluster=c&db=d1",
        "cluster=c&db=d1&rev=x&valid=5",
        "cluster=c&db=d1&rev=3",
        "cluster=c&db=d1&rev=3&valid=0",
        "cluster=c&db=d1&rev=3&valid=99999999999",
        "cluster=c&db=d1&rev=-3",
        "cluster=c&db=d%201&rev=3",
        "cluster=&db=d1&rev=3",
        "clusterx=c&db=d1&rev=3",
    ] {
        assert_eq!(AckRequest::from_query(bad), None, "{bad:?}");
    }
}

/// A master that read a longer failInterval than the keeper (a spec change reaching them
/// at different times) is still covered: the promise is at least twice its validity.
#[test]
fn the_promise_covers_a_master_with_a_longer_fail_interval() {
    let keeper = timing(GoDuration::from_secs(5));
    let master = timing(GoDuration::from_secs(60));
    let r = AckRequest {
        validity_ms: master.validity.as_millis() as u64,
        ..req("d1", 1)
    };
    let promise = r.promise_for(&keeper);
    let held = (master.validity + master.watchdog_slack).as_secs_f64() * (1.0 + CLOCK_RATE_BOUND);
    assert!(
        held < promise.as_secs_f64() * (1.0 - CLOCK_RATE_BOUND),
        "{promise:?}"
    );
    let short = AckRequest {
        validity_ms: 10,
        ..req("d1", 1)
    };
    assert_eq!(
        short.promise_for(&keeper),
        keeper.promise,
        "never less than its own"
    );
}

/// The ordering argument's inequality, for every failInterval a spec may hold: a master
/// that sent its request at s stops, watchdog included, before s + validity + slack on its
/// clock, which is earlier than the keeper's promise ends on the keeper's clock (answered
/// at or after s) even with the clocks CLOCK_RATE_BOUND apart.
#[test]
fn a_hold_ends_before_the_promise_on_any_clock_within_the_bound() {
    for ms in [1000u64, 5000, 20_000, 60_000, 3_600_000] {
        let t = timing(GoDuration::from_std(Duration::from_millis(ms)));
        let master_side = (t.validity + t.watchdog_slack).as_secs_f64() * (1.0 + CLOCK_RATE_BOUND);
        let keeper_side = t.promise.as_secs_f64() * (1.0 - CLOCK_RATE_BOUND);
        assert!(master_side < keeper_side, "failInterval {ms} ms: {t:?}");
        assert!(t.ask_after + t.ask_every * 2 < t.promise, "{t:?}");
    }
}
