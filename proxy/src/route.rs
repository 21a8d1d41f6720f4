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
    /// No master because a planned switchover began (`proxy.spec.drain`): the old master's
    /// sessions close at transaction boundaries instead of at once.
    pub drain: bool,
    /// While there is no master: `host:port` of the db the store names to become it (a
    /// switchover's target, else the elected master), so a moving session can log in there
    /// before it is routed (see `migrate::open_on_next`). Never routed to by itself.
    pub next: Option<String>,
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
            drain: false,
            next: None,
        };
    };
    if !cd.proxy.spec.enabled_proxies.iter().any(|p| p == proxy_uid) {
        return Desired {
            generation: 0,
            master: Err(NoMaster::NotEnabled),
            replicas: Vec::new(),
            drain: false,
            next: None,
        };
    }
    let master = match cd.proxy_master_address() {
        Some((host, port)) => Ok(host_port(host, port)),
        None => Err(NoMaster::NoMasterDb),
    };
    Desired {
        generation: cd.proxy.generation,
        drain: cd.proxy.spec.drain && master.is_err(),
        next: master.is_err().then(|| next_master(cd)).flatten(),
        master,
        replicas: ro_max_lag.map_or_else(Vec::new, |lag| replicas(cd, lag)),
    }
}

/// The db that is to become the master while proxies are told there is none: a planned
/// switchover's target until it is promoted, else the elected master (a failover fences the
/// proxies in the very write that elects it).
fn next_master(cd: &ClusterData) -> Option<String> {
    let target = switchover_target(cd);
    let (host, port) = cd.db_address(target.unwrap_or(&cd.cluster.status.master))?;
    Some(host_port(host, port))
}

/// The db a planned switchover in progress (draining or stopping) will promote.
fn switchover_target(cd: &ClusterData) -> Option<&String> {
    use control::model::SwitchoverPhase;
    cd.cluster
        .status
        .switchover
        .as_ref()
        .filter(|s| {
            matches!(
                s.phase,
                SwitchoverPhase::Draining | SwitchoverPhase::Stopping
            )
        })
        .map(|s| &s.target_db_uid)
        .filter(|uid| !uid.is_empty())
}

/// The standbys of the read-only pool: following the elected master, healthy, within the
/// lag. A switchover's target leaves it in the drain's generation, so that the generation
/// this proxy reports once drained also says it opens no read-only session there (the
/// promotion then needs no generation of its own: `ProxyInfo::target_out_at_drain`).
fn replicas(cd: &ClusterData, max_lag: u64) -> Vec<ReplicaTarget> {
    use control::model::DbRole;
    let elected = &cd.cluster.status.master;
    let Some(master) = cd.dbs.get(elected) else {
        return Vec::new();
    };
    let target = switchover_target(cd);
    cd.dbs
        .values()
        .filter(|d| d.uid != *elected && d.spec.role == Some(DbRole::Standby))
        .filter(|d| target != Some(&d.uid))
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
    /// Cancelled when a planned switchover begins: each session on it closes at its next
    /// transaction boundary (before `token` cuts what is left at the drain timeout).
    pub drain: CancellationToken,
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
    /// At a planned switchover away from this master: the standby being promoted, whose
    /// read-only sessions drain with this master's (the generation is reported, and the
    /// keeper promotes it, only once they are gone) and are severed with them.
    promoted: std::sync::OnceLock<Arc<Replica>>,
}

/// A standby of the read-only pool and the sessions relayed to it.
#[derive(Debug)]
pub struct Replica {
    pub db_uid: String,
    pub addr: Arc<str>,
    /// Cancelled when it leaves the pool: its sessions close.
    pub token: CancellationToken,
    /// Cancelled first when it leaves the pool while the proxy is not fenced: each session
    /// on it moves to another standby (or closes) at its next transaction boundary, before
    /// `token` cuts what is left at the drain timeout.
    pub drain: CancellationToken,
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
            drain: CancellationToken::new(),
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

    /// Out of the pool: sever its sessions at once (`None`), or (`Some(timeout)`) let each
    /// reach its transaction boundary first, and sever what is left at `timeout` (needs a
    /// Tokio runtime). Returns the sessions severed now.
    fn retire(self: Arc<Self>, drain: Option<std::time::Duration>) -> usize {
        let Some(timeout) = drain else {
            return self.sever().sessions;
        };
        self.drain.cancel();
        self.sessions.close();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(timeout, self.sessions.wait()).await;
            let stats = self.sever();
            tracing::info!(
                standby = &*self.addr,
                severed_at_timeout = stats.sessions,
                "read-only sessions of a standby that left the pool drained"
            );
        });
        0
    }
}

/// A handle on a session's socket, whatever engine relays it.
pub type SocketHandle = Arc<dyn AsFd + Send + Sync>;

/// Live sessions' (client, server) sockets by session id. No client socket for a session
/// that may move: a sever cuts its server side, and the session decides about its client.
type SocketMap = HashMap<u64, (Option<SocketHandle>, SocketHandle)>;

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
        client: Option<SocketHandle>,
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
        for client in map.values().filter_map(|(c, _)| c.as_ref()) {
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
    /// Cuts every session on this master (and on the standby it hands over to) at once.
    pub fn sever(&self) -> SeverStats {
        let mut stats = self.sockets.sever_all();
        self.token.cancel();
        self.sessions.close();
        if let Some(r) = self.promoted.get() {
            stats.sessions += r.sever().sessions;
        }
        stats
    }

    /// Completes once every session on this master (and on the standby it hands over to)
    /// has ended.
    pub async fn sessions_closed(&self) {
        self.sessions.wait().await;
        if let Some(r) = self.promoted.get() {
            r.sessions.wait().await;
        }
    }

    fn new(
        generation: i64,
        master: Result<Arc<str>, NoMaster>,
        replicas: Arc<[Arc<Replica>]>,
    ) -> Route {
        Route {
            generation,
            master,
            token: CancellationToken::new(),
            drain: CancellationToken::new(),
            sessions: TaskTracker::new(),
            sockets: Arc::new(SessionSockets::new()),
            replicas,
            next_pick: AtomicU64::new(0),
            promoted: std::sync::OnceLock::new(),
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
    /// Woken on every swap: held sessions wait on it for the next master.
    changed: tokio::sync::Notify,
    /// Standbys out of the pool whose read-only sessions are still draining: one elected
    /// master meanwhile has them severed before the swap completes.
    retiring: Mutex<Vec<Arc<Replica>>>,
    /// [`Desired::next`], as last applied.
    next: Mutex<Option<Arc<str>>>,
}

impl Default for Routes {
    fn default() -> Self {
        Routes {
            current: ArcSwap::from_pointee(Route::new(
                0,
                Err(NoMaster::Starting),
                Arc::from(Vec::new()),
            )),
            changed: tokio::sync::Notify::new(),
            retiring: Mutex::new(Vec::new()),
            next: Mutex::new(None),
        }
    }
}

impl Routes {
    /// One snapshot for one connection.
    pub fn load(&self) -> Arc<Route> {
        self.current.load_full()
    }

    /// A future that completes at the next swap. Create (and `enable`) it before loading the
    /// route it waits to see replaced, so a swap in between is not missed.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Where the master is to be while there is none ([`Desired::next`]).
    pub fn next(&self) -> Option<Arc<str>> {
        self.next.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sets [`Self::next`]; a change wakes the sessions waiting for a master.
    pub fn set_next(&self, next: Option<&str>) {
        let mut cur = self.next.lock().unwrap_or_else(|p| p.into_inner());
        if cur.as_deref() != next {
            *cur = next.map(Arc::from);
            drop(cur);
            self.changed.notify_waiters();
        }
    }

    fn store(&self, route: Route) {
        self.current.store(Arc::new(route));
        // Held sessions go to the new route at once, in the order they wait.
        self.changed.notify_waiters();
    }

    /// Installs the route for `generation` and `master` (no read-only pool).
    pub fn apply(
        &self,
        generation: i64,
        master: Result<String, NoMaster>,
    ) -> Option<(Arc<Route>, SeverStats)> {
        self.apply_with_replicas(generation, master, &[], None).0
    }

    /// Installs the route for `generation`, `master` and the read-only pool `replicas`. If
    /// the master changed (or became none), the old route's sessions are severed, and the old
    /// route is returned so the caller can wait for them to close. Same master: only the
    /// generation is updated and sessions continue. Standbys that left the pool are severed
    /// at once (their count is returned), or with `ro_drain` drained first (see
    /// [`Replica::retire`]); those that stay keep their sessions.
    pub fn apply_with_replicas(
        &self,
        generation: i64,
        master: Result<String, NoMaster>,
        replicas: &[ReplicaTarget],
        ro_drain: Option<std::time::Duration>,
    ) -> (Option<(Arc<Route>, SeverStats)>, usize) {
        let (old, mut severed_ro, promoted) = self.swap(generation, master, replicas, ro_drain);
        // A failover: the promoted standby's read-only sessions are cut at once, before the
        // generation is reported (the keeper promotes it only then).
        if let Some(r) = promoted {
            severed_ro += r.sever().sessions;
        }
        (
            old.map(|old| {
                let stats = old.sever();
                (old, stats)
            }),
            severed_ro,
        )
    }

    /// Like [`Self::apply_with_replicas`] for a planned switchover: the old master's
    /// sessions are told to close at their next transaction boundary (its `drain` token)
    /// instead of being severed. The caller severs what is left at its drain timeout
    /// ([`Route::sever`]) and waits for `sessions` before it reports the generation.
    pub fn apply_draining(
        &self,
        generation: i64,
        master: Result<String, NoMaster>,
        replicas: &[ReplicaTarget],
        ro_drain: Option<std::time::Duration>,
    ) -> (Option<Arc<Route>>, usize) {
        let (old, severed_ro, promoted) = self.swap(generation, master, replicas, ro_drain);
        match (&old, promoted) {
            (Some(old), promoted) => {
                old.drain.cancel();
                old.sessions.close();
                if let Some(r) = promoted {
                    r.drain.cancel();
                    r.sessions.close();
                    let _ = old.promoted.set(r);
                }
            }
            (None, Some(r)) => {
                r.sever();
            }
            (None, None) => {}
        }
        (old, severed_ro)
    }

    /// Installs the next route; returns the old one if its master changed (its sessions
    /// still open), how many read-only sessions were severed, and the standby of the pool
    /// that is the new master (its sessions still open: the caller drains or severs them).
    /// The other standbys that left are retired (see [`Replica::retire`]).
    fn swap(
        &self,
        generation: i64,
        master: Result<String, NoMaster>,
        replicas: &[ReplicaTarget],
        ro_drain: Option<std::time::Duration>,
    ) -> (Option<Arc<Route>>, usize, Option<Arc<Replica>>) {
        let old = self.current.load_full();
        let (pool, left) = Self::next_pool(&old, replicas);
        let pool_changed = !left.is_empty() || pool.len() != old.replicas.len();
        let elected = |r: &Replica| master.as_ref().is_ok_and(|m| *r.addr == **m);
        let (promoted, left): (Vec<_>, Vec<_>) = left.into_iter().partition(|r| elected(r));
        let mut severed_ro = self.retire(left, ro_drain);
        // One still draining from an earlier swap cannot wait for its boundaries any more.
        self.lock_retiring().retain(|r| {
            if elected(r) {
                severed_ro += r.sever().sessions;
            }
            !r.token.is_cancelled()
        });
        let promoted = promoted.into_iter().next();
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
                    drain: old.drain.clone(),
                    sessions: old.sessions.clone(),
                    sockets: old.sockets.clone(),
                    replicas: pool,
                    next_pick: AtomicU64::new(0),
                    promoted: std::sync::OnceLock::new(),
                };
                self.store(kept);
            }
            return (None, severed_ro, promoted);
        }
        let new = Route::new(generation, master.map(Arc::from), pool);
        self.store(new);
        if old.master.is_err() {
            // No session was ever relayed on a route without a master.
            return (None, severed_ro, promoted);
        }
        (Some(old), severed_ro, promoted)
    }

    fn lock_retiring(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Replica>>> {
        self.retiring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Retires standbys that left the pool; returns the sessions severed at once.
    fn retire(&self, left: Vec<Arc<Replica>>, drain: Option<std::time::Duration>) -> usize {
        let mut severed = 0;
        for r in left {
            if drain.is_some() {
                self.lock_retiring().push(r.clone());
            }
            severed += r.retire(drain);
        }
        severed
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
mod tests;
