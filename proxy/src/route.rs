//! The route table: one immutable value under one `ArcSwap` (generation, master, the
//! cancellation token of the sessions relayed to that master). `desired` derives what the
//! route should be from clusterdata, purely; `Routes::apply` swaps it in and severs the
//! sessions of a replaced master.

use arc_swap::ArcSwap;
use control::model::ClusterData;
use std::collections::HashMap;
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Why there is no master to route to (for logs and the client's error message).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoMaster {
    /// Before the first successful read of the store.
    Starting,
    /// No clusterdata document.
    NoCluster,
    /// The document could not be read.
    BadDocument,
    /// This proxy is not in `proxy.spec.enabledProxies`.
    NotEnabled,
    /// `masterDbUid` is empty (the sentinel is fencing proxies) or names no usable db.
    NoMasterDb,
    /// No successful store contact within proxyTimeout.
    StoreLost,
    /// Shutting down.
    Stopping,
}

/// What clusterdata says the route is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    /// The proxy generation to report once applied: the document's when this proxy is
    /// enabled, 0 otherwise (as stolon's proxy reports).
    pub generation: i64,
    pub master: Result<String, NoMaster>,
}

/// Derives the route from a clusterdata document (`None`: no document).
pub fn desired(cd: Option<&ClusterData>, proxy_uid: &str) -> Desired {
    let Some(cd) = cd else {
        return Desired {
            generation: 0,
            master: Err(NoMaster::NoCluster),
        };
    };
    if !cd.proxy.spec.enabled_proxies.iter().any(|p| p == proxy_uid) {
        return Desired {
            generation: 0,
            master: Err(NoMaster::NotEnabled),
        };
    }
    let master = match cd.proxy_master_address() {
        Some((host, port)) if host.contains(':') => Ok(format!("[{host}]:{port}")),
        Some((host, port)) => Ok(format!("{host}:{port}")),
        None => Err(NoMaster::NoMasterDb),
    };
    Desired {
        generation: cd.proxy.generation,
        master,
    }
}

#[derive(Debug)]
pub struct Route {
    pub generation: i64,
    /// `host:port` of the master, or why there is none.
    pub master: Result<Arc<str>, NoMaster>,
    /// Cancelled when this master is replaced: every session on it closes.
    pub token: CancellationToken,
    /// Counts the sessions relayed to this master, so the proxy can report its generation
    /// only after they are all closed.
    pub sessions: TaskTracker,
    /// The sockets of those sessions, so severing can cut them all from one thread with
    /// plain syscalls instead of waking every session task first.
    pub sockets: Arc<SessionSockets>,
}

/// A handle on a session's socket, whatever engine relays it.
pub type SocketHandle = Arc<dyn AsFd + Send + Sync>;

/// Live sessions' (client, server) sockets by session id.
type SocketMap = HashMap<u64, (SocketHandle, SocketHandle)>;

/// The client and server sockets of the live sessions of one route.
#[derive(Default)]
pub struct SessionSockets {
    next: AtomicU64,
    /// `None` once severed: later registrations are refused.
    live: Mutex<Option<SocketMap>>,
}

impl std::fmt::Debug for SessionSockets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let live = self.lock().as_ref().map(|m| m.len());
        f.debug_struct("SessionSockets")
            .field("live", &live)
            .finish()
    }
}

/// Unregisters a session's sockets when the session ends.
pub struct Registration {
    sockets: Arc<SessionSockets>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(map) = self.sockets.lock().as_mut() {
            map.remove(&self.id);
        }
    }
}

impl SessionSockets {
    fn new() -> Self {
        SessionSockets {
            next: AtomicU64::new(0),
            live: Mutex::new(Some(HashMap::new())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<SocketMap>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True once `sever_all` ran.
    pub fn is_severed(&self) -> bool {
        self.lock().is_none()
    }

    /// Registers a session; `None` if this route was already severed (the caller must not
    /// relay).
    pub fn register(
        self: &Arc<Self>,
        client: SocketHandle,
        server: SocketHandle,
    ) -> Option<Registration> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().as_mut()?.insert(id, (client, server));
        Some(Registration {
            sockets: self.clone(),
            id,
        })
    }

    /// Shuts down every client socket, then every server socket, and refuses further
    /// registrations. Clients first: they get their FIN before hundreds of master backends
    /// start exiting and compete for the CPU. Returns how many sessions were cut.
    pub fn sever_all(&self) -> SeverStats {
        let start = std::time::Instant::now();
        let Some(map) = self.lock().take() else {
            return SeverStats::default();
        };
        for (client, _) in map.values() {
            let _ = socket2::SockRef::from(&client.as_fd()).shutdown(Shutdown::Both);
        }
        let clients_cut = start.elapsed();
        for (_, server) in map.values() {
            let _ = socket2::SockRef::from(&server.as_fd()).shutdown(Shutdown::Both);
        }
        SeverStats {
            sessions: map.len(),
            clients_cut,
            all_cut: start.elapsed(),
        }
    }
}

/// What a sever did: how many sessions, and how long until every client socket and then
/// every server socket was shut down.
#[derive(Clone, Copy, Debug, Default)]
pub struct SeverStats {
    pub sessions: usize,
    pub clients_cut: std::time::Duration,
    pub all_cut: std::time::Duration,
}

impl Route {
    fn new(generation: i64, master: Result<Arc<str>, NoMaster>) -> Route {
        Route {
            generation,
            master,
            token: CancellationToken::new(),
            sessions: TaskTracker::new(),
            sockets: Arc::new(SessionSockets::new()),
        }
    }
}

/// The live route table.
pub struct Routes {
    current: ArcSwap<Route>,
}

impl Default for Routes {
    fn default() -> Self {
        Routes {
            current: ArcSwap::from_pointee(Route::new(0, Err(NoMaster::Starting))),
        }
    }
}

impl Routes {
    /// One snapshot for one connection.
    pub fn load(&self) -> Arc<Route> {
        self.current.load_full()
    }

    /// Installs the route for `generation` and `master`. If the master changed (or became
    /// none), the old route's sessions are severed, and the old route is returned so the
    /// caller can wait for them to close. Same master: only the generation is updated and
    /// sessions continue.
    pub fn apply(
        &self,
        generation: i64,
        master: Result<String, NoMaster>,
    ) -> Option<(Arc<Route>, SeverStats)> {
        let old = self.current.load_full();
        let same_master = match (&old.master, &master) {
            (Ok(a), Ok(b)) => **a == **b,
            _ => false,
        };
        if same_master {
            if old.generation != generation {
                let kept = Route {
                    generation,
                    master: old.master.clone(),
                    token: old.token.clone(),
                    sessions: old.sessions.clone(),
                    sockets: old.sockets.clone(),
                };
                self.current.store(Arc::new(kept));
            }
            return None;
        }
        let new = Route::new(generation, master.map(Arc::from));
        self.current.store(Arc::new(new));
        if old.master.is_err() {
            // No session was ever relayed on a route without a master.
            return None;
        }
        let stats = old.sockets.sever_all();
        old.token.cancel();
        old.sessions.close();
        Some((old, stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cd(master: &str, enabled: &[&str], generation: i64) -> ClusterData {
        let doc = serde_json::json!({
            "formatVersion": 1,
            "cluster": {"uid": "c", "spec": {"initMode": "new"}},
            "dbs": {
                "db1": {"uid": "db1", "status": {"listenAddress": "127.0.0.1", "port": "5433"}},
                "db2": {"uid": "db2", "status": {"listenAddress": "::1", "port": "5434"}},
                "db3": {"uid": "db3", "status": {"listenAddress": "", "port": "5435"}}
            },
            "proxy": {"generation": generation, "spec": {"masterDbUid": master, "enabledProxies": enabled}}
        });
        ClusterData::from_json(doc.to_string().as_bytes()).expect("doc")
    }

    #[test]
    fn desired_route_table() {
        let cases: Vec<(&str, Option<ClusterData>, Desired)> = vec![
            (
                "no document",
                None,
                Desired {
                    generation: 0,
                    master: Err(NoMaster::NoCluster),
                },
            ),
            (
                "enabled",
                Some(cd("db1", &["p1"], 4)),
                Desired {
                    generation: 4,
                    master: Ok("127.0.0.1:5433".into()),
                },
            ),
            (
                "ipv6",
                Some(cd("db2", &["p1"], 4)),
                Desired {
                    generation: 4,
                    master: Ok("[::1]:5434".into()),
                },
            ),
            (
                "not enabled",
                Some(cd("db1", &["p2"], 4)),
                Desired {
                    generation: 0,
                    master: Err(NoMaster::NotEnabled),
                },
            ),
            (
                "fencing: empty master",
                Some(cd("", &["p1"], 5)),
                Desired {
                    generation: 5,
                    master: Err(NoMaster::NoMasterDb),
                },
            ),
            (
                "unknown db",
                Some(cd("dbX", &["p1"], 5)),
                Desired {
                    generation: 5,
                    master: Err(NoMaster::NoMasterDb),
                },
            ),
            (
                "db without address",
                Some(cd("db3", &["p1"], 5)),
                Desired {
                    generation: 5,
                    master: Err(NoMaster::NoMasterDb),
                },
            ),
        ];
        for (name, doc, want) in cases {
            assert_eq!(desired(doc.as_ref(), "p1"), want, "{name}");
        }
    }

    #[test]
    fn go_encoded_document_without_master_field() {
        // Go's omitempty drops an empty masterDbUid entirely.
        let doc = r#"{"formatVersion":1,"cluster":{},"proxy":{"generation":3,"spec":{"enabledProxies":["p1"]}}}"#;
        let cd = ClusterData::from_json(doc.as_bytes()).expect("doc");
        assert_eq!(desired(Some(&cd), "p1").master, Err(NoMaster::NoMasterDb));
    }

    #[test]
    fn master_change_severs_same_master_keeps_sessions() {
        let routes = Routes::default();
        assert!(
            routes.apply(1, Ok("a:1".into())).is_none(),
            "from no master: nothing to sever"
        );
        let first = routes.load();
        assert!(routes.apply(2, Ok("a:1".into())).is_none(), "same master");
        let second = routes.load();
        assert_eq!(second.generation, 2);
        assert!(!first.token.is_cancelled());
        assert!(second.token.is_cancelled() == first.token.is_cancelled());
        let (old, _) = routes.apply(3, Err(NoMaster::NoMasterDb)).expect("severed");
        assert!(old.token.is_cancelled() && first.token.is_cancelled());
        assert!(routes.load().master.is_err());
        assert!(
            routes.apply(4, Err(NoMaster::StoreLost)).is_none(),
            "none to none"
        );
        assert_eq!(routes.load().generation, 4);
        routes.apply(5, Ok("b:1".into()));
        let (old, _) = routes.apply(6, Ok("c:1".into())).expect("master moved");
        assert_eq!(old.master.as_deref().ok(), Some("b:1"));
        assert!(old.token.is_cancelled());
    }
}
