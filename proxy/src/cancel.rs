//! The proxy's own cancel keys. Every session whose start the proxy reads gets a
//! BackendKeyData minted by the proxy instead of its server's ("Message Formats" in the
//! protocol docs: a process ID and a secret of 4 bytes up to protocol 3.1, up to 256 from
//! 3.2). A CancelRequest carrying a minted key is mapped to the server session it belongs
//! to now, and to nothing once that session has ended; so a later move of the session to
//! another server keeps the client's key valid, and a stale key cancels nothing.
//!
//! The process ID of a minted key names the proxy that owns it: its owner id (the high bit
//! set, which no PostgreSQL process ID has), published in its ProxyInfo with the address
//! other proxies reach it at. A cancel that reaches another proxy of the cluster (behind a
//! load balancer) is forwarded there, as PgBouncer's peering does. A key the proxy did not
//! mint (a session whose stream it cannot read: TLS passed through) goes where it went
//! before: the master, or every standby of the read-only pool.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest BackendKeyData body: a 4-byte process ID and a secret of at most 256 bytes.
const MAX_KEY: usize = 4 + 256;
/// Minted secrets are as long as the server's (a 3.0 client takes exactly 4 bytes), up to
/// this: 32 random bytes are as good as 256.
const MAX_MINTED_SECRET: usize = 32;
/// Set in every owner id: PostgreSQL's process IDs are below 2^22 (Linux's pid_max).
const OWNER_BIT: u32 = 0x8000_0000;

/// This proxy's owner id, from its UID (FNV-1a: the same in every build, so a proxy of
/// another version names the same owner).
pub fn owner_id(uid: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in uid.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h | OWNER_BIT
}

/// The key of a CancelRequest packet (what follows its length and code).
pub fn request_key(packet: &[u8]) -> Option<&[u8]> {
    packet.get(8..).filter(|k| (8..=MAX_KEY).contains(&k.len()))
}

/// A CancelRequest for `key` (process ID and secret).
pub fn request_packet(key: &[u8]) -> Vec<u8> {
    let mut p = ((8 + key.len()) as u32).to_be_bytes().to_vec();
    p.extend(crate::protocol::CANCEL_REQUEST_CODE.to_be_bytes());
    p.extend(key);
    p
}

/// Where a session's cancels go: its server and the key that server issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub addr: Arc<str>,
    pub real: Vec<u8>,
}

/// What a CancelRequest's key leads to.
#[derive(Debug, PartialEq, Eq)]
pub enum Routed {
    /// A live session of this proxy.
    Local(Target),
    /// Minted here, for a session that has ended: nothing to cancel.
    Ended,
    /// Minted by the proxy with this owner id.
    Peer(u32),
    /// Not a minted key: a server's own, from a session the proxy could not read.
    NotMinted,
}

/// The minted keys of this proxy's live sessions (both listeners share it).
pub struct Keys {
    owner: u32,
    live: Mutex<HashMap<Vec<u8>, Target>>,
}

impl Keys {
    pub fn new(owner: u32) -> Keys {
        Keys {
            owner,
            live: Mutex::new(HashMap::new()),
        }
    }

    pub fn owner(&self) -> u32 {
        self.owner
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Target>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Mints the key the client sees for a session whose server issued `real` (a
    /// BackendKeyData body) on `addr`; it leads there until the guard is dropped.
    pub fn mint(self: &Arc<Self>, real: Vec<u8>, addr: Arc<str>) -> (Vec<u8>, KeyGuard) {
        use rand::RngCore;
        let secret_len = real.len().saturating_sub(4).clamp(4, MAX_MINTED_SECRET);
        let mut key = self.owner.to_be_bytes().to_vec();
        key.resize(4 + secret_len, 0);
        let mut live = self.lock();
        loop {
            rand::rngs::OsRng.fill_bytes(&mut key[4..]);
            if !live.contains_key(&key) {
                break;
            }
        }
        live.insert(key.clone(), Target { addr, real });
        drop(live);
        let guard = KeyGuard {
            keys: self.clone(),
            key: key.clone(),
        };
        (key, guard)
    }

    /// Where a CancelRequest with `key` goes.
    pub fn route(&self, key: &[u8]) -> Routed {
        let Some(pid) = key
            .get(..4)
            .map(|p| u32::from_be_bytes([p[0], p[1], p[2], p[3]]))
        else {
            return Routed::NotMinted;
        };
        if pid & OWNER_BIT == 0 {
            return Routed::NotMinted;
        }
        if pid != self.owner {
            return Routed::Peer(pid);
        }
        match self.lock().get(key) {
            Some(t) => Routed::Local(t.clone()),
            None => Routed::Ended,
        }
    }
}

/// Removes its key when the session ends: a later cancel with it reaches nothing.
pub struct KeyGuard {
    keys: Arc<Keys>,
    key: Vec<u8>,
}

impl KeyGuard {
    /// The key now leads to the session's new server (a session moved by a switchover): the
    /// client keeps the key it was given.
    pub fn retarget(&self, real: Vec<u8>, addr: Arc<str>) {
        if let Some(t) = self.keys.lock().get_mut(&self.key) {
            *t = Target { addr, real };
        }
    }
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        self.keys.lock().remove(&self.key);
    }
}

/// Sends a CancelRequest where its key leads (see `cancel`): the server session a minted
/// key belongs to now, the proxy that minted it, or (a key the proxy did not mint: a
/// session it could not read) the backends of this listener: the master, or every standby
/// of the read-only pool (and the master with the fallback), as PostgreSQL ignores a key it
/// did not issue. PostgreSQL answers a cancel with nothing, and so does the proxy.
pub(crate) async fn forward(ctx: &crate::conn::Ctx, packet: &[u8]) {
    let timeout = ctx.config.connect_timeout;
    let routed = request_key(packet).map(|k| ctx.cancel_keys.route(k));
    let label = match routed {
        Some(Routed::Local(t)) => {
            cancel_one(&t.addr, &request_packet(&t.real), timeout).await;
            "local"
        }
        Some(Routed::Peer(owner)) => match &ctx.peers {
            Some(peers) => peers.forward(owner, packet, timeout).await,
            None => "peer_unknown",
        },
        Some(Routed::Ended) | None => "ended",
        Some(Routed::NotMinted) => {
            let route = ctx.routes.load();
            let mut targets: Vec<Arc<str>> = Vec::new();
            match ctx.read_only {
                Some(ro) => {
                    targets.extend(route.replicas.iter().map(|r| r.addr.clone()));
                    if ro.fallback_master {
                        targets.extend(route.master.as_ref().ok().cloned());
                    }
                }
                None => targets.extend(route.master.as_ref().ok().cloned()),
            }
            let sends = targets.iter().map(|addr| cancel_one(addr, packet, timeout));
            futures::future::join_all(sends).await;
            "not_minted"
        }
    };
    tracing::debug!(result = label, "cancel request");
    ctx.metrics.cancel(label);
}

/// Sends one cancel packet to `addr` and waits for the far end to close (PostgreSQL has
/// processed it then).
pub(crate) async fn cancel_one(addr: &str, packet: &[u8], connect_timeout: Duration) {
    if let Ok(Ok(mut s)) = tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
        let _ = s.write_all(packet).await;
        let _ = s.shutdown().await;
        let mut sink = [0u8; 64];
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut sink)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_requests_key_is_what_follows_its_code() {
        let key = [0, 0, 0, 7, 1, 2, 3, 4];
        let p = request_packet(&key);
        assert_eq!(&p[..8], &[0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e]);
        assert_eq!(request_key(&p), Some(&key[..]));
        assert_eq!(request_key(&p[..12]), None);
    }

    #[test]
    fn a_minted_key_leads_to_its_session_while_it_lives_and_then_to_nothing() {
        let keys = Arc::new(Keys::new(owner_id("p1")));
        let real = vec![0, 0, 0x30, 0x39, 9, 9, 9, 9];
        let (key, guard) = keys.mint(real.clone(), "10.0.0.1:5432".into());
        assert_eq!(key.len(), 8, "a 3.0 client takes a 4-byte secret");
        assert_eq!(&key[..4], &keys.owner().to_be_bytes());
        assert_ne!(key, real);
        let target = Target {
            addr: "10.0.0.1:5432".into(),
            real,
        };
        assert_eq!(keys.route(&key), Routed::Local(target));
        // The session moved: the same key leads to its new server.
        let moved = vec![0, 0, 0x40, 0x00, 7, 7, 7, 7];
        guard.retarget(moved.clone(), "10.0.0.2:5432".into());
        let target = Target {
            addr: "10.0.0.2:5432".into(),
            real: moved,
        };
        assert_eq!(keys.route(&key), Routed::Local(target));
        drop(guard);
        assert_eq!(keys.route(&key), Routed::Ended);
    }

    #[test]
    fn keys_are_as_long_as_the_servers_up_to_a_bound_and_never_repeat_while_live() {
        let keys = Arc::new(Keys::new(owner_id("p1")));
        let (long, _g) = keys.mint(vec![1; 4 + 256], "a:1".into());
        assert_eq!(long.len(), 4 + MAX_MINTED_SECRET);
        let (mid, _g2) = keys.mint(vec![1; 4 + 16], "a:1".into());
        assert_eq!(mid.len(), 4 + 16);
        let guards: Vec<_> = (0..1000)
            .map(|_| keys.mint(vec![1; 8], "a:1".into()))
            .collect();
        let distinct: std::collections::HashSet<_> =
            guards.iter().map(|(k, _)| k.clone()).collect();
        assert_eq!(distinct.len(), 1000);
    }

    #[test]
    fn a_key_names_its_owner_and_a_servers_key_is_no_ones() {
        let here = Keys::new(owner_id("p1"));
        let there = owner_id("p2");
        assert_ne!(here.owner(), there);
        let mut foreign = there.to_be_bytes().to_vec();
        foreign.extend([1, 2, 3, 4]);
        assert_eq!(here.route(&foreign), Routed::Peer(there));
        // A PostgreSQL process ID never has the owner bit.
        assert_eq!(
            here.route(&[0, 0x3f, 0xff, 0xff, 1, 2, 3, 4]),
            Routed::NotMinted
        );
        assert_eq!(here.route(&[1, 2]), Routed::NotMinted);
        // Stable across builds: other versions of the proxy compute the same id.
        assert_eq!(owner_id("p1"), 0xa04e_d67a);
    }
}
