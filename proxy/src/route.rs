//! The route table: one immutable value under one `ArcSwap` (generation, master, the
//! cancellation token of the sessions relayed to that master, and the standbys the
//! read-only listener may use, each with its own token). `desired` derives what the route
//! should be from clusterdata, purely; `Routes::apply` swaps it in and severs the sessions
//! of a replaced master and of every standby that left the read-only pool.

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
    /// The standbys the read-only listener may use (empty without one).
    pub replicas: Vec<ReplicaTarget>,
}

/// A standby the read-only listener may send sessions to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaTarget {
    pub db_uid: String,
    /// `host:port`.
    pub addr: String,
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Derives the route from a clusterdata document (`None`: no document), without standbys.
pub fn desired(cd: Option<&ClusterData>, proxy_uid: &str) -> Desired {
    desired_with_replicas(cd, proxy_uid, None)
}

/// [`desired`], with the read-only pool when `ro_max_lag` is given: every db that is a
/// healthy standby (its keeper healthy too) following the elected master, not the elected
/// master itself (a standby being promoted leaves the pool in the very write that elects
/// it), within `ro_max_lag` bytes of the master's last published WAL position.
pub fn desired_with_replicas(
    cd: Option<&ClusterData>,
    proxy_uid: &str,
    ro_max_lag: Option<u64>,
) -> Desired {
    let Some(cd) = cd else {
        return Desired {
            generation: 0,
            master: Err(NoMaster::NoCluster),
            replicas: Vec::new(),
        };
    };
    if !cd.proxy.spec.enabled_proxies.iter().any(|p| p == proxy_uid) {
        return Desired {
            generation: 0,
            master: Err(NoMaster::NotEnabled),
            replicas: Vec::new(),
        };
    }
    let master = match cd.proxy_master_address() {
        Some((host, port)) => Ok(host_port(host, port)),
        None => Err(NoMaster::NoMasterDb),
    };
    Desired {
        generation: cd.proxy.generation,
        master,
        replicas: ro_max_lag.map_or_else(Vec::new, |lag| replicas(cd, lag)),
    }
}

fn replicas(cd: &ClusterData, max_lag: u64) -> Vec<ReplicaTarget> {
    use control::model::DbRole;
    let elected = &cd.cluster.status.master;
    let Some(master) = cd.dbs.get(elected) else {
        return Vec::new();
    };
    cd.dbs
        .values()
        .filter(|d| d.uid != *elected && d.spec.role == Some(DbRole::Standby))
        .filter(|d| {
            d.spec
                .follow_config
                .as_ref()
                .is_some_and(|f| f.dbuid == *elected)
        })
        .filter(|d| d.status.healthy)
        .filter(|d| {
            cd.keepers
                .get(&d.spec.keeper_uid)
                .is_some_and(|k| k.status.healthy)
        })
        .filter(|d| master.status.x_log_pos.saturating_sub(d.status.x_log_pos) <= max_lag)
        .filter_map(|d| {
            let port = d.status.port?;
            (!d.status.listen_address.is_empty()).then(|| ReplicaTarget {
                db_uid: d.uid.clone(),
                addr: host_port(&d.status.listen_address, port),
            })
        })
        .collect()
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
    /// The read-only pool; a standby that stays in it keeps its `Replica` (and sessions).
    pub replicas: Arc<[Arc<Replica>]>,
    /// Rotates the starting point of the least-connections pick, so equally loaded
    /// standbys share short sessions.
    next_pick: AtomicU64,
}

/// A standby of the read-only pool and the sessions relayed to it.
#[derive(Debug)]
pub struct Replica {
    pub db_uid: String,
    pub addr: Arc<str>,
    /// Cancelled when it leaves the pool: its sessions close.
    pub token: CancellationToken,
    pub sessions: TaskTracker,
    pub sockets: Arc<SessionSockets>,
    /// Sessions open on it now (least-connections).
    pub active: AtomicU64,
}

impl Replica {
    fn new(t: &ReplicaTarget) -> Replica {
        Replica {
            db_uid: t.db_uid.clone(),
            addr: Arc::from(t.addr.as_str()),
            token: CancellationToken::new(),
            sessions: TaskTracker::new(),
            sockets: Arc::new(SessionSockets::new()),
            active: AtomicU64::new(0),
        }
    }

    fn sever(&self) -> SeverStats {
        let stats = self.sockets.sever_all();
        self.token.cancel();
        self.sessions.close();
        stats
    }
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
    fn new(
        generation: i64,
        master: Result<Arc<str>, NoMaster>,
        replicas: Arc<[Arc<Replica>]>,
    ) -> Route {
        Route {
            generation,
            master,
            token: CancellationToken::new(),
            sessions: TaskTracker::new(),
            sockets: Arc::new(SessionSockets::new()),
            replicas,
            next_pick: AtomicU64::new(0),
        }
    }

    /// The standby with the fewest open sessions (ties rotate), if the pool has any.
    pub fn pick_replica(&self) -> Option<Arc<Replica>> {
        let n = self.replicas.len();
        if n == 0 {
            return None;
        }
        let start = (self.next_pick.fetch_add(1, Ordering::Relaxed) % n as u64) as usize;
        (0..n)
            .filter_map(|i| self.replicas.get((start + i) % n))
            .min_by_key(|r| r.active.load(Ordering::Relaxed))
            .cloned()
    }
}

/// The live route table.
pub struct Routes {
    current: ArcSwap<Route>,
}

impl Default for Routes {
    fn default() -> Self {
        Routes {
            current: ArcSwap::from_pointee(Route::new(
                0,
                Err(NoMaster::Starting),
                Arc::from(Vec::new()),
            )),
        }
    }
}

impl Routes {
    /// One snapshot for one connection.
    pub fn load(&self) -> Arc<Route> {
        self.current.load_full()
    }

    /// Installs the route for `generation` and `master` (no read-only pool).
    pub fn apply(
        &self,
        generation: i64,
        master: Result<String, NoMaster>,
    ) -> Option<(Arc<Route>, SeverStats)> {
        self.apply_with_replicas(generation, master, &[]).0
    }

    /// Installs the route for `generation`, `master` and the read-only pool `replicas`. If
    /// the master changed (or became none), the old route's sessions are severed, and the old
    /// route is returned so the caller can wait for them to close. Same master: only the
    /// generation is updated and sessions continue. Standbys that left the pool are severed
    /// at once (their count is returned); those that stay keep their sessions.
    pub fn apply_with_replicas(
        &self,
        generation: i64,
        master: Result<String, NoMaster>,
        replicas: &[ReplicaTarget],
    ) -> (Option<(Arc<Route>, SeverStats)>, usize) {
        let old = self.current.load_full();
        let (pool, left) = Self::next_pool(&old, replicas);
        let severed_ro: usize = left.iter().map(|r| r.sever().sessions).sum();
        let pool_changed = !left.is_empty() || pool.len() != old.replicas.len();
        let same_master = match (&old.master, &master) {
            (Ok(a), Ok(b)) => **a == **b,
            _ => false,
        };
        if same_master {
            if old.generation != generation || pool_changed {
                let kept = Route {
                    generation,
                    master: old.master.clone(),
                    token: old.token.clone(),
                    sessions: old.sessions.clone(),
                    sockets: old.sockets.clone(),
                    replicas: pool,
                    next_pick: AtomicU64::new(0),
                };
                self.current.store(Arc::new(kept));
            }
            return (None, severed_ro);
        }
        let new = Route::new(generation, master.map(Arc::from), pool);
        self.current.store(Arc::new(new));
        if old.master.is_err() {
            // No session was ever relayed on a route without a master.
            return (None, severed_ro);
        }
        let stats = old.sockets.sever_all();
        old.token.cancel();
        old.sessions.close();
        (Some((old, stats)), severed_ro)
    }

    /// The next pool: standbys that stay keep their `Replica`; returns it and those that left.
    fn next_pool(
        old: &Route,
        wanted: &[ReplicaTarget],
    ) -> (Arc<[Arc<Replica>]>, Vec<Arc<Replica>>) {
        let same = |r: &Replica, t: &ReplicaTarget| r.db_uid == t.db_uid && *r.addr == *t.addr;
        let pool: Vec<Arc<Replica>> = wanted
            .iter()
            .map(|t| {
                old.replicas
                    .iter()
                    .find(|r| same(r, t))
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Replica::new(t)))
            })
            .collect();
        let left = old
            .replicas
            .iter()
            .filter(|r| !wanted.iter().any(|t| same(r, t)))
            .cloned()
            .collect();
        (Arc::from(pool), left)
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
                    replicas: Vec::new(),
                },
            ),
            (
                "enabled",
                Some(cd("db1", &["p1"], 4)),
                Desired {
                    generation: 4,
                    master: Ok("127.0.0.1:5433".into()),
                    replicas: Vec::new(),
                },
            ),
            (
                "ipv6",
                Some(cd("db2", &["p1"], 4)),
                Desired {
                    generation: 4,
                    master: Ok("[::1]:5434".into()),
                    replicas: Vec::new(),
                },
            ),
            (
                "not enabled",
                Some(cd("db1", &["p2"], 4)),
                Desired {
                    generation: 0,
                    master: Err(NoMaster::NotEnabled),
                    replicas: Vec::new(),
                },
            ),
            (
                "fencing: empty master",
                Some(cd("", &["p1"], 5)),
                Desired {
                    generation: 5,
                    master: Err(NoMaster::NoMasterDb),
                    replicas: Vec::new(),
                },
            ),
            (
                "unknown db",
                Some(cd("dbX", &["p1"], 5)),
                Desired {
                    generation: 5,
                    master: Err(NoMaster::NoMasterDb),
                    replicas: Vec::new(),
                },
            ),
            (
                "db without address",
                Some(cd("db3", &["p1"], 5)),
                Desired {
                    generation: 5,
                    master: Err(NoMaster::NoMasterDb),
                    replicas: Vec::new(),
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

    fn ro_doc() -> ClusterData {
        let standby =
            |uid: &str, keeper: &str, follows: &str, pos: u64, healthy: bool, port: &str| {
                serde_json::json!({"uid": uid, "spec": {"keeperUID": keeper, "role": "standby",
                "followConfig": {"type": "internal", "dbuid": follows}},
                "status": {"healthy": healthy, "listenAddress": "127.0.0.1", "port": port,
                           "xLogPos": pos}})
            };
        let doc = serde_json::json!({
            "formatVersion": 1,
            "cluster": {"uid": "c", "spec": {"initMode": "new"}, "status": {"master": "m"}},
            "keepers": {
                "km": {"uid": "km", "status": {"healthy": true}},
                "k1": {"uid": "k1", "status": {"healthy": true}},
                "k2": {"uid": "k2", "status": {"healthy": true}},
                "k3": {"uid": "k3", "status": {"healthy": true}},
                "k4": {"uid": "k4", "status": {"healthy": false}},
                "k5": {"uid": "k5", "status": {"healthy": true}}
            },
            "dbs": {
                "m": {"uid": "m", "spec": {"keeperUID": "km", "role": "master"},
                      "status": {"healthy": true, "listenAddress": "127.0.0.1", "port": "5000",
                                 "xLogPos": 10000}},
                "s1": standby("s1", "k1", "m", 9990, true, "5001"),
                "s2": standby("s2", "k2", "m", 5000, true, "5002"),
                "s3": standby("s3", "k3", "m", 10000, false, "5003"),
                "s4": standby("s4", "k4", "m", 10000, true, "5004"),
                "s5": standby("s5", "k5", "other", 10000, true, "5005")
            },
            "proxy": {"generation": 2, "spec": {"masterDbUid": "m", "enabledProxies": ["p1"]}}
        });
        ClusterData::from_json(doc.to_string().as_bytes()).expect("doc")
    }

    #[test]
    fn the_read_only_pool_has_healthy_standbys_of_the_master_within_the_lag() {
        let cd = ro_doc();
        let pool = |lag| {
            desired_with_replicas(Some(&cd), "p1", lag)
                .replicas
                .into_iter()
                .map(|r| r.db_uid)
                .collect::<Vec<_>>()
        };
        // s2 lags 5000 bytes; s3 is unhealthy; s4's keeper is; s5 follows another db.
        assert_eq!(pool(Some(100)), ["s1"]);
        assert_eq!(pool(Some(5000)), ["s1", "s2"]);
        assert!(
            pool(None).is_empty(),
            "no pool without the read-only listener"
        );
        assert!(desired_with_replicas(Some(&cd), "p9", Some(5000))
            .replicas
            .is_empty());
        // The elected master leaves the pool in the write that elects it, before its
        // promotion: a read-only session never lands on a db about to take writes.
        let mut promoted = cd.clone();
        promoted.cluster.status.master = "s1".into();
        assert!(desired_with_replicas(Some(&promoted), "p1", Some(u64::MAX))
            .replicas
            .iter()
            .all(|r| r.db_uid != "s1"));
    }

    #[test]
    fn a_standby_leaving_the_pool_is_severed_and_those_staying_keep_their_sessions() {
        let t = |uid: &str, port: u16| ReplicaTarget {
            db_uid: uid.into(),
            addr: format!("127.0.0.1:{port}"),
        };
        let routes = Routes::default();
        routes.apply_with_replicas(1, Ok("m:1".into()), &[t("s1", 1), t("s2", 2)]);
        let first = routes.load();
        let (s1, s2) = (first.replicas[0].clone(), first.replicas[1].clone());
        let (old_master, severed) = routes.apply_with_replicas(1, Ok("m:1".into()), &[t("s1", 1)]);
        assert!(old_master.is_none(), "the master's sessions go on");
        assert_eq!(severed, 0, "no session was open");
        assert!(s2.token.is_cancelled(), "s2 left: its sessions are cut");
        assert!(!s1.token.is_cancelled(), "s1 stays");
        let now = routes.load();
        assert!(Arc::ptr_eq(&now.replicas[0], &s1));
        assert!(!now.token.is_cancelled() && Arc::ptr_eq(&now.sockets, &first.sockets));
        // Store lost: the pool empties with the master.
        routes.apply_with_replicas(1, Err(NoMaster::StoreLost), &[]);
        assert!(s1.token.is_cancelled() && routes.load().replicas.is_empty());
    }

    #[test]
    fn pick_is_least_connections_and_rotates_among_equals() {
        let t = |uid: &str, port: u16| ReplicaTarget {
            db_uid: uid.into(),
            addr: format!("127.0.0.1:{port}"),
        };
        let routes = Routes::default();
        routes.apply_with_replicas(1, Ok("m:1".into()), &[t("s1", 1), t("s2", 2)]);
        let r = routes.load();
        let picks: Vec<String> = (0..4)
            .map(|_| r.pick_replica().expect("pick").db_uid.clone())
            .collect();
        assert!(picks.contains(&"s1".to_string()) && picks.contains(&"s2".to_string()));
        r.replicas[0].active.store(3, Ordering::Relaxed);
        for _ in 0..4 {
            assert_eq!(r.pick_replica().expect("pick").db_uid, "s2");
        }
        assert!(
            Route::new(0, Err(NoMaster::Starting), Arc::from(Vec::new()))
                .pick_replica()
                .is_none()
        );
    }
}
