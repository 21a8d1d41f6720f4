//! What a swarm run reports: the result document (`swarm.json`), the one-line account of
//! each master change, and the markdown table of the run.

use crate::ha::report::percentile;
use serde::Serialize;

#[derive(Serialize)]
pub(super) struct Idle {
    pub(super) seconds: f64,
    pub(super) etcd_proposals_per_s: f64,
    pub(super) etcd_puts_per_s: f64,
    pub(super) etcd_txns_per_s: f64,
    pub(super) etcd_lease_renewals_per_s: f64,
    pub(super) etcd_watch_events_per_s: f64,
    pub(super) etcd_cpu_percent: f64,
    pub(super) etcd_rss_mib: f64,
    pub(super) sentinel_rounds_per_s: f64,
    pub(super) sentinel_round_ms_mean: f64,
    pub(super) proxy_info_writes_per_s: f64,
    /// Every proxy's utime + stime together, as a share of one core.
    pub(super) proxies_cpu_percent: f64,
    pub(super) proxy_rss_mib_mean: f64,
}

#[derive(Serialize)]
pub(super) struct Change {
    pub(super) scenario: &'static str,
    pub(super) proxies: usize,
    pub(super) old_master: String,
    pub(super) new_master: String,
    /// From the change (the switchover command or the kill) to the routing write.
    pub(super) routed_after_s: f64,
    /// The longest time with no commit, from the last commit before the change.
    pub(super) max_gap_s: f64,
    pub(super) connects_failed: usize,
    pub(super) txns_failed: usize,
    /// Every failure by kind (SQLSTATE or what the socket did), connects and transactions.
    pub(super) errors: std::collections::BTreeMap<String, usize>,
    /// From the routing write reaching this tool's own watch of the store (the moment etcd
    /// delivered the change) to each proxy routing to the new master (its own
    /// `stolon_proxy_route_changed_seconds`); a proxy served by etcd before this tool shows
    /// a negative figure.
    pub(super) propagation_ms_p50: f64,
    pub(super) propagation_ms_p99: f64,
    pub(super) propagation_ms_max: f64,
    /// The same to the last proxy, from the sentinel's decision to route the new master
    /// (the document's changeTime, before its write to etcd is committed).
    pub(super) decision_to_last_proxy_ms: f64,
    /// Proxies whose route change was read (all but a frozen one).
    pub(super) propagation_proxies: usize,
    /// A proxy was frozen (SIGSTOP) through this change.
    pub(super) frozen_proxy: bool,
    /// CPU seconds every proxy spent together from the change to the new master routed
    /// and healthy: on this 2-core machine they share the cores with PostgreSQL and etcd.
    pub(super) proxies_cpu_s: f64,
}

#[derive(Serialize)]
pub(super) struct Step {
    pub(super) proxies: usize,
    pub(super) idle: Idle,
    pub(super) changes: Vec<Change>,
}

#[derive(Serialize)]
pub(super) struct Result_ {
    pub(super) command: String,
    pub(super) spec: serde_json::Value,
    pub(super) clients: usize,
    pub(super) think_ms: u128,
    /// The lease TTL of a proxy at this spec's proxyTimeout.
    pub(super) proxy_lease_ttl_s: f64,
    pub(super) steps: Vec<Step>,
    pub(super) acked: usize,
    pub(super) acked_lost: usize,
}

pub(super) fn errors_of(
    seen: &crate::ha::report::Seen,
) -> std::collections::BTreeMap<String, usize> {
    let mut all = seen.connect_errors.clone();
    for (k, n) in &seen.txn_errors {
        *all.entry(format!("txn {k}")).or_default() += n;
    }
    all
}

pub(super) fn line(c: &Change) -> String {
    format!(
        "{} with {} proxies{}: routed after {:.2} s, gap {:.2} s, {} failed connects, {} failed \
         txns {:?}, propagation p50 {:.1} ms p99 {:.1} ms max {:.1} ms over {} proxies \
         ({:.1} ms from the sentinel's decision to the last), proxies' CPU {:.2} s",
        c.scenario,
        c.proxies,
        if c.frozen_proxy { " (one frozen)" } else { "" },
        c.routed_after_s,
        c.max_gap_s,
        c.connects_failed,
        c.txns_failed,
        c.errors,
        c.propagation_ms_p50,
        c.propagation_ms_p99,
        c.propagation_ms_max,
        c.propagation_proxies,
        c.decision_to_last_proxy_ms,
        c.proxies_cpu_s
    )
}

/// The markdown table of the run: one row per size (medians over its changes).
pub(super) fn table(r: &Result_) -> String {
    let mut s = format!(
        "`{}`\n\n| proxies | etcd proposals/s idle | lease renewals/s | watch events/s | \
         etcd CPU % | etcd RSS MiB | sentinel rounds/s | round ms | proxies' CPU % | proxy RSS MiB | \
         switchover gap s | failover gap s | propagation p99 ms | errors |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        r.command
    );
    for st in &r.steps {
        let med = |scenario: &str, f: fn(&Change) -> f64| {
            let v: Vec<f64> = (st.changes.iter())
                .filter(|c| c.scenario == scenario && !c.frozen_proxy)
                .map(f)
                .collect();
            if v.is_empty() {
                "-".to_string()
            } else {
                format!("{:.2}", percentile(&v, 50.0))
            }
        };
        let p99 = (st.changes.iter().filter(|c| !c.frozen_proxy))
            .map(|c| c.propagation_ms_p99)
            .fold(0.0, f64::max);
        let errors: usize = (st.changes.iter())
            .map(|c| c.connects_failed + c.txns_failed)
            .sum();
        let i = &st.idle;
        s += &format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.2} | {:.2} | {:.1} | {:.1} | {} | {} | {:.1} | {} |\n",
            st.proxies,
            i.etcd_proposals_per_s,
            i.etcd_lease_renewals_per_s,
            i.etcd_watch_events_per_s,
            i.etcd_cpu_percent,
            i.etcd_rss_mib,
            i.sentinel_rounds_per_s,
            i.sentinel_round_ms_mean,
            i.proxies_cpu_percent,
            i.proxy_rss_mib_mean,
            med("switchover", |c| c.max_gap_s),
            med("failover", |c| c.max_gap_s),
            p99,
            errors,
        );
    }
    for st in &r.steps {
        for c in st.changes.iter().filter(|c| c.frozen_proxy) {
            s += &format!("\nfrozen proxy: {}\n", line(c));
        }
    }
    s += &format!(
        "\nacknowledged writes {}, lost {}; proxy lease TTL {:.0} s\n",
        r.acked, r.acked_lost, r.proxy_lease_ttl_s
    );
    s
}
