//! The proxy fencing handshake (architecture.md "Safety" 1): to change master the proxies
//! are first told there is none (masterDbUid emptied, generation bumped); the new master is
//! published only once every enabled proxy has reported that generation in its info, or its
//! info stopped changing for 2 x its proxyTimeout (it has fenced itself by then). A proxy
//! whose info says it proves liveness by its lease (`stolonLeaseLiveness`) rewrites its info
//! only on change: it is active while its key exists, and its key is gone at most 2 x its
//! proxyTimeout after its last contact with the store (`model::proxy_lease_ttl`), by which
//! time it has fenced itself.

use super::health::converged;
use super::{ReasonKind, Round};
use crate::model::GoDuration;

impl Round<'_> {
    /// A proxy is active while its infoUID changed within 2 x its ProxyTimeout, or, if it
    /// proves liveness by its lease, while its key exists.
    fn proxy_active(&self, uid: &str) -> bool {
        let Some(info) = self.obs.proxies.get(uid) else {
            return false;
        };
        if info.lease_liveness {
            return true;
        }
        let timeout = if info.proxy_timeout.0 > 0 {
            info.proxy_timeout
        } else {
            self.cd.cluster.spec.proxy_timeout()
        };
        let expiry = GoDuration(timeout.0.saturating_mul(2));
        self.mem
            .proxies
            .get(uid)
            .is_some_and(|s| self.elapsed(s.since) < expiry)
    }

    /// enabledProxies := the active proxies. Also says, in the document, that this
    /// sentinel honours proxies that prove liveness by their lease.
    pub(super) fn update_proxies_enabled(&mut self) {
        if !self.cd.proxy.spec.lease_liveness {
            self.cd.proxy.spec.lease_liveness = true;
        }
        let mut active: Vec<String> = self
            .obs
            .proxies
            .keys()
            .filter(|u| self.proxy_active(u))
            .cloned()
            .collect();
        if self.mem.proxy_grace_until.is_some_and(|t| self.now < t) {
            active.extend(self.cd.proxy.spec.enabled_proxies.iter().cloned());
            active.sort();
            active.dedup();
        }
        if self.cd.proxy.spec.enabled_proxies != active {
            self.cd.proxy.spec.enabled_proxies = active;
        }
    }

    /// Tells every proxy there is no master: they close their connections and ack the new
    /// generation.
    pub(super) fn fence_proxies(&mut self) {
        self.cd.proxy.spec.master_db_uid.clear();
        self.cd.proxy.spec.drain = false;
        self.cd.proxy.generation += 1;
        self.cd.proxy.change_time = Some(self.now);
    }

    /// Like [`Self::fence_proxies`], for a planned change: the proxies drain the old
    /// master's sessions at transaction boundaries before they ack.
    pub(super) fn fence_proxies_draining(&mut self) {
        self.fence_proxies();
        self.cd.proxy.spec.drain = true;
    }

    /// The enabled proxies that have not reported the current generation yet.
    pub(super) fn proxies_lagging(&self) -> Vec<String> {
        let generation = self.cd.proxy.generation;
        (self.cd.proxy.spec.enabled_proxies.iter())
            .filter(|u| {
                self.obs
                    .proxies
                    .get(*u)
                    .is_none_or(|i| i.generation < generation)
            })
            .cloned()
            .collect()
    }

    /// Whether the drain's generation already fenced every proxy for the promotion of a
    /// switchover's target: no route is published, every enabled proxy reported the
    /// current generation, and each that runs a read-only listener took the target out of
    /// its pool in that generation (`target_out_at_drain`; an older proxy did not, and the
    /// promotion then fences again so that it stops opening read-only sessions there first).
    pub(super) fn drain_fenced_for_promotion(&self) -> bool {
        self.cd.proxy.spec.master_db_uid.is_empty()
            && self.proxies_lagging().is_empty()
            && (self.cd.proxy.spec.enabled_proxies.iter()).all(|u| {
                (self.obs.proxies.get(u)).is_some_and(|i| !i.read_only || i.target_out_at_drain)
            })
    }

    /// Publishes the master to the proxies once it runs as master (converged) and every
    /// enabled proxy acknowledged the current generation.
    pub(super) fn publish_master(&mut self, master: &str) {
        if self.cd.proxy.spec.master_db_uid == master {
            return;
        }
        if !self.cd.proxy.spec.master_db_uid.is_empty() {
            // Never move proxies from one master to another without the handshake.
            self.fence_proxies();
        }
        let Some(db) = self.db(master, "publish master") else {
            return;
        };
        // A standby cluster's master follows the external primary: it counts too.
        let runs_as_master = db.acts_as_master();
        let converged = converged(db);
        if !(runs_as_master && converged && self.db_good(master)) {
            return;
        }
        let generation = self.cd.proxy.generation;
        let lagging = self.proxies_lagging();
        if !lagging.is_empty() {
            let detail = format!(
                "master {master} waits for proxies {lagging:?} to ack generation {generation}"
            );
            self.reason(ReasonKind::WaitingForProxies, detail);
            return;
        }
        self.cd.proxy.spec.master_db_uid = master.to_string();
        self.cd.proxy.spec.drain = false;
        self.cd.proxy.change_time = Some(self.now);
        self.reason(
            ReasonKind::MasterPublished,
            format!("proxies route to {master} (generation {generation})"),
        );
    }
}
