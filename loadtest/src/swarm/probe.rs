//! Readings of the processes under test: Prometheus text scrapes (etcd's, the sentinel's,
//! each proxy's).

use crate::ha::cluster::http_get;
use std::collections::BTreeMap;

/// One scrape: every sample by its full name (labels included), summed over repeats.
#[derive(Clone, Debug, Default)]
pub struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let mut m = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            if let Ok(v) = value.trim().parse::<f64>() {
                *m.entry(name.trim().to_string()).or_insert(0.0) += v;
            }
        }
        Scrape(m)
    }

    pub async fn of(addr: &str) -> Option<Scrape> {
        http_get(addr, "/metrics")
            .await
            .ok()
            .map(|t| Scrape::parse(&t))
    }

    /// A sample by exact name; 0 when absent.
    pub fn get(&self, name: &str) -> f64 {
        self.0.get(name).copied().unwrap_or(0.0)
    }
}

/// etcd's counters that make its load: raft proposals (every write, lease grants and
/// revokes included), key writes, lease renewals, events sent to watchers, and its process.
#[derive(Clone, Copy, Debug, Default)]
pub struct EtcdLoad {
    pub proposals: f64,
    pub puts: f64,
    pub txns: f64,
    pub keepalives: f64,
    pub watch_events: f64,
    pub cpu_seconds: f64,
    pub rss_bytes: f64,
}

impl EtcdLoad {
    pub fn from(s: &Scrape) -> EtcdLoad {
        EtcdLoad {
            proposals: s.get("etcd_server_proposals_committed_total"),
            puts: s.get("etcd_mvcc_put_total"),
            txns: s.get("etcd_mvcc_txn_total"),
            keepalives: s.get("etcd_debugging_lease_renewed_total"),
            watch_events: s.get("etcd_debugging_mvcc_events_total"),
            cpu_seconds: s.get("process_cpu_seconds_total"),
            rss_bytes: s.get("process_resident_memory_bytes"),
        }
    }
}

/// The sentinel's round histogram: (rounds, seconds spent in them).
pub fn sentinel_rounds(s: &Scrape) -> (f64, f64) {
    (
        s.get("stolon_sentinel_round_seconds_count"),
        s.get("stolon_sentinel_round_seconds_sum"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrape_parses_prometheus_text() {
        let s = Scrape::parse(
            "# HELP x y\n# TYPE x counter\netcd_mvcc_put_total 12\n\
             stolon_proxy_store_errors_total{kind=\"timeout\"} 2\n\
             stolon_proxy_store_errors_total{kind=\"unavailable\"} 3\n\
             process_resident_memory_bytes 2.4358912e+07\nbroken line\n",
        );
        assert_eq!(s.get("etcd_mvcc_put_total"), 12.0);
        assert_eq!(
            s.get("stolon_proxy_store_errors_total{kind=\"timeout\"}"),
            2.0
        );
        assert_eq!(s.get("process_resident_memory_bytes"), 24_358_912.0);
        assert_eq!(s.get("absent"), 0.0);
    }
}
