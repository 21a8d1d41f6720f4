//! The other proxies of the cluster, as their ProxyInfo names them: a CancelRequest whose
//! key another proxy minted is forwarded to the address that proxy publishes (see
//! `cancel`). Cancels are rare, so each such one reads the proxies' infos afresh rather
//! than keep a watch on them.

use control::store::ClusterStore;
use std::time::Duration;

pub struct Peers {
    pub store: ClusterStore,
}

impl Peers {
    /// Sends `packet` to every proxy that publishes `owner` as its id (one, unless two UIDs
    /// hash alike: the other ignores a key it did not mint). The metric label of what
    /// happened.
    pub async fn forward(&self, owner: u32, packet: &[u8], timeout: Duration) -> &'static str {
        let infos = match tokio::time::timeout(timeout, self.store.proxy_infos()).await {
            Ok(Ok(infos)) => infos,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot read the proxies' infos for a cancel");
                return "peer_unknown";
            }
            Err(_) => return "peer_unknown",
        };
        let addrs: Vec<String> = infos
            .items
            .into_values()
            .filter(|i| i.cancel_id == owner && !i.cancel_address.is_empty())
            .map(|i| i.cancel_address)
            .collect();
        if addrs.is_empty() {
            tracing::debug!(
                owner,
                "cancel for a key of a proxy that publishes no address"
            );
            return "peer_unknown";
        }
        let sends = addrs
            .iter()
            .map(|a| crate::cancel::cancel_one(a, packet, timeout));
        futures::future::join_all(sends).await;
        "peer"
    }
}
