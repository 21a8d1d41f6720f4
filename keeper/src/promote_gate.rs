//! Before a standby is promoted, the proxies must have cut its read-only sessions: the write
//! that elects it also takes it out of every proxy's read-only pool and bumps the proxy
//! generation, and a proxy reports that generation only after applying it. So the keeper
//! promotes once every proxy the clusterdata enables that runs a read-only listener has
//! reported the generation (or has no info any more), or after 2 x proxyTimeout, by when a
//! proxy that cannot reach the store has closed everything by itself (the sentinel's own
//! rule for publishing a master). A session opened as read-only thus never becomes
//! writable. A proxy without a read-only listener (every Go proxy) has no session on a
//! standby, which is all this wait is for, so it is not waited for (the master is published
//! to the proxies only after every one acked, as before). Proxies ack within milliseconds of
//! the write, so a failover waits that long when one has a read-only listener.

use crate::daemon::Keeper;
use control::model::ProxyInfo;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;

/// Whether every enabled proxy with a read-only listener reported `generation` or later (a
/// proxy with no info is gone).
pub fn proxies_caught_up(
    enabled: &[String],
    infos: &BTreeMap<String, ProxyInfo>,
    generation: i64,
) -> bool {
    enabled.iter().all(|u| {
        infos
            .get(u)
            .is_none_or(|i| !i.read_only || i.generation >= generation)
    })
}

impl Keeper {
    pub(crate) async fn wait_proxies_before_promotion(&self) {
        let Some(cd) = &self.view.cd else { return };
        let (enabled, generation) = (&cd.proxy.spec.enabled_proxies, cd.proxy.generation);
        if enabled.is_empty() {
            return;
        }
        let limit = cd.cluster.spec.proxy_timeout().as_std() * 2;
        let start = Instant::now();
        loop {
            match self.settings.store.proxy_infos().await {
                Ok(infos) if proxies_caught_up(enabled, &infos.items, generation) => {
                    tracing::debug!(
                        generation,
                        waited_ms = start.elapsed().as_millis() as u64,
                        "proxies caught up: promoting"
                    );
                    return;
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "cannot read proxy infos"),
            }
            if start.elapsed() >= limit {
                tracing::warn!(
                    generation,
                    "proxies did not report the generation within 2 x proxyTimeout: they have fenced themselves; promoting"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(generation: i64) -> ProxyInfo {
        ProxyInfo {
            generation,
            read_only: true,
            ..Default::default()
        }
    }

    #[test]
    fn every_enabled_proxy_must_report_the_generation() {
        let enabled = vec!["p1".to_string(), "p2".to_string()];
        let mut infos = BTreeMap::new();
        infos.insert("p1".to_string(), info(5));
        infos.insert("p2".to_string(), info(4));
        assert!(!proxies_caught_up(&enabled, &infos, 5), "p2 is behind");
        infos.insert("p2".to_string(), info(5));
        assert!(proxies_caught_up(&enabled, &infos, 5));
        infos.remove("p2");
        assert!(
            proxies_caught_up(&enabled, &infos, 5),
            "a proxy without info is gone"
        );
        assert!(proxies_caught_up(&[], &infos, 9), "no proxies");
        let no_listener = ProxyInfo {
            generation: 1,
            ..Default::default()
        };
        infos.insert("p2".to_string(), no_listener);
        assert!(
            proxies_caught_up(&enabled, &infos, 5),
            "a proxy without a read-only listener has no standby session to cut"
        );
    }
}
