//! What the clients saw around one master change, counted from their samples: failed
//! connection attempts, failed transactions (cut at the change or not), the longest
//! gap with no committed write, the longest connection attempt that succeeded (a held
//! session's wait). Pure functions of the samples, so they are tested on tables.

use super::clients::{Kind, Outcome, Sample};
use serde::Serialize;
use std::collections::BTreeMap;

/// The part of the run one change is judged on: from `from` (before the change) to `to`
/// (the cluster healthy again), with the change at `mark` and the new master routed at
/// `routed` (the clusterdata write that routes it, seen through a watch).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Window {
    pub from: f64,
    pub mark: f64,
    pub routed: f64,
    pub to: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Seen {
    pub committed: usize,
    pub connects_failed: usize,
    /// Of the failed connection attempts, those cut at the change (see `AT_CHANGE`).
    pub connects_failed_at_change: usize,
    pub connect_errors: BTreeMap<String, usize>,
    pub txns_failed: usize,
    /// Of the failed transactions, those cut at the change (see `AT_CHANGE`): in flight on
    /// the master that died.
    pub txns_failed_at_change: usize,
    /// Of the failed transactions, those that failed after the new master was routed (none
    /// of these is the old master's doing).
    pub txns_failed_after_routed: usize,
    pub txn_errors: BTreeMap<String, usize>,
    /// The longest time with no commit, from the last commit before the change.
    pub max_gap: f64,
    /// The longest connection attempt that ended in a session.
    pub longest_connect: f64,
}

/// A failure this close after the routing write may have happened before the proxy
/// applied it.
const ROUTED_SLACK: f64 = 0.02;

/// A failure that ended this soon after the change was cut by it: after a kill -9 of the
/// postmaster its backends notice and exit within milliseconds (FATAL 57P01 "unexpected
/// postmaster exit"), failing what was in flight on them, connects included.
pub const AT_CHANGE: f64 = 0.1;

/// What `target`'s clients (of `kind`, or every kind) saw within `w`.
pub fn seen(samples: &[Sample], target: usize, kind: Option<Kind>, w: Window) -> Seen {
    let mine = |s: &&Sample| s.target == target && kind.is_none_or(|k| s.kind == k);
    let mut out = Seen::default();
    let mut commits = Vec::new();
    for s in samples.iter().filter(mine) {
        if s.end < w.from || s.end > w.to {
            continue;
        }
        match &s.outcome {
            Outcome::Committed(_) => commits.push(s.end),
            Outcome::Connected => out.longest_connect = out.longest_connect.max(s.end - s.start),
            Outcome::ConnectFailed(k) => {
                out.connects_failed += 1;
                if s.end <= w.mark + AT_CHANGE {
                    out.connects_failed_at_change += 1;
                }
                *out.connect_errors.entry(k.clone()).or_default() += 1;
            }
            Outcome::TxnFailed(k) => {
                out.txns_failed += 1;
                if s.end <= w.mark + AT_CHANGE {
                    out.txns_failed_at_change += 1;
                }
                if s.end > w.routed + ROUTED_SLACK {
                    out.txns_failed_after_routed += 1;
                }
                *out.txn_errors.entry(k.clone()).or_default() += 1;
            }
        }
    }
    out.committed = commits.len();
    out.max_gap = max_gap(&mut commits, w);
    out
}

/// The longest interval between consecutive commits in the window, counting its ends: a
/// target with no commit at all after the change has a gap to the window's end.
fn max_gap(commits: &mut [f64], w: Window) -> f64 {
    commits.sort_by(f64::total_cmp);
    let mut last = w.from;
    let mut gap: f64 = 0.0;
    for &t in commits.iter() {
        gap = gap.max(t - last);
        last = t;
    }
    gap.max(w.to - last)
}

/// A failed transaction, for the record: who, when (relative to the change) and why.
#[derive(Clone, Debug, Serialize)]
pub struct Failure {
    pub target: &'static str,
    pub kind: Kind,
    pub start: f64,
    pub end: f64,
    pub error: String,
}

pub fn failed_txns(samples: &[Sample], w: Window) -> Vec<Failure> {
    samples
        .iter()
        .filter(|s| s.end >= w.from && s.end <= w.to)
        .filter_map(|s| match &s.outcome {
            Outcome::TxnFailed(e) => Some(Failure {
                target: super::TARGETS.get(s.target).copied().unwrap_or("?"),
                kind: s.kind,
                start: s.start - w.mark,
                end: s.end - w.mark,
                error: e.clone(),
            }),
            _ => None,
        })
        .collect()
}

/// The p-th percentile (0..=100) by nearest rank; 0 for no values.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(target: usize, kind: Kind, start: f64, end: f64, outcome: Outcome) -> Sample {
        Sample {
            target,
            kind,
            start,
            end,
            outcome,
        }
    }

    const W: Window = Window {
        from: 0.0,
        mark: 5.0,
        routed: 5.6,
        to: 10.0,
    };

    #[test]
    fn counts_by_target_kind_and_phase() {
        let c = |t: f64| Outcome::Committed(t as i64);
        let samples = vec![
            s(0, Kind::PerTxn, 0.9, 1.0, c(1.0)),
            s(
                0,
                Kind::PerTxn,
                4.9,
                5.5,
                Outcome::TxnFailed("57P01".into()),
            ),
            s(
                0,
                Kind::PerTxn,
                5.6,
                5.7,
                Outcome::TxnFailed("closed".into()),
            ),
            s(0, Kind::PerTxn, 5.0, 7.5, Outcome::Connected),
            s(
                0,
                Kind::Persistent,
                6.0,
                6.1,
                Outcome::ConnectFailed("57P03".into()),
            ),
            s(0, Kind::Persistent, 8.0, 8.0, c(8.0)),
            s(0, Kind::Persistent, 9.9, 9.95, c(9.95)),
            // Another target's and outside the window: not counted.
            s(
                1,
                Kind::PerTxn,
                5.0,
                5.1,
                Outcome::ConnectFailed("closed".into()),
            ),
            s(
                0,
                Kind::PerTxn,
                10.5,
                11.0,
                Outcome::ConnectFailed("closed".into()),
            ),
        ];
        let all = seen(&samples, 0, None, W);
        assert_eq!(all.committed, 3);
        assert_eq!(all.connects_failed, 1);
        assert_eq!(all.txns_failed, 2);
        assert_eq!(all.txns_failed_at_change, 0, "none ended by 5.1");
        assert_eq!(all.txns_failed_after_routed, 1, "the one ending at 5.7");
        assert_eq!(all.txn_errors.get("57P01"), Some(&1));
        assert!((all.max_gap - 7.0).abs() < 1e-9, "{}", all.max_gap);
        assert!((all.longest_connect - 2.5).abs() < 1e-9);
        let per_txn = seen(&samples, 0, Some(Kind::PerTxn), W);
        assert_eq!(per_txn.committed, 1);
        assert_eq!(per_txn.connects_failed, 0);
        assert!(
            (per_txn.max_gap - 9.0).abs() < 1e-9,
            "no commit after 1.0: gap to the end"
        );
    }

    #[test]
    fn no_commit_at_all_is_the_whole_window() {
        assert_eq!(seen(&[], 0, None, W).max_gap, 10.0);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 5.0);
        assert_eq!(percentile(&v, 99.0), 10.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
