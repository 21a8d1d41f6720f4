//! Prometheus metrics and the `/health` endpoint on `--metrics-listen-address`.
//! Labels are fixed-cardinality kinds, never addresses or messages.

use crate::route::Routes;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Why a session ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum CloseReason {
    ClientClosed,
    ServerClosed,
    /// The master changed or the proxy was fenced: closed by the proxy.
    Severed,
    /// A planned switchover: closed by the proxy between transactions.
    Drained,
    IoError,
    /// A CancelRequest, forwarded and closed.
    Cancel,
    RejectedNoMaster,
    RejectedProtocol,
    RejectedLimit,
    RejectedTimeout,
    BackendUnreachable,
    ClientGone,
    /// The proxy refused the client's authentication (a wrong password).
    AuthFailed,
    /// Not a close (never counted): the relay stopped so the proxy can inspect a movable
    /// session, which then goes on.
    Inspect,
    /// Not a close yet (counted as ServerClosed or Severed if it does not move): a movable
    /// session's server side ended, its client's is open.
    ServerLost,
    /// Not a close (never counted): the session moved to another relay thread.
    Rebalance,
    /// Not a close (never counted): the session goes on its relay thread's rail.
    Rail,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: CloseReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Direction {
    ClientToServer,
    ServerToClient,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: Direction,
}

#[derive(Default)]
pub struct Metrics {
    pub accepted: Counter,
    pub active: Gauge,
    /// Sessions on each relay thread (see `placement`).
    pub relay_sessions: Family<ThreadLabel, Gauge>,
    /// Sessions on a relay thread's rail now (`rail`).
    pub rail_sessions: Gauge,
    /// Sessions the balancer moved to another relay thread.
    pub rebalanced: Counter,
    pub closed: Family<ReasonLabel, Counter>,
    pub generation: Gauge,
    pub routing: Gauge,
    pub store_errors: Family<KindLabel, Counter>,
    pub bytes: Family<DirectionLabel, Counter>,
    /// Sessions held now, waiting for a master.
    pub held: Gauge,
    /// Sessions that were held.
    pub holds: Counter,
    /// When the master route last changed (to a master or to none), as unix seconds: how
    /// long a master change took to reach this proxy (`loadtest swarm`).
    pub route_changed: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Failsafe mode: 1 while the proxy routes on the master keeper's confirmed hold, the
    /// store out of reach; confirmations asked, by result.
    pub failsafe_routing: Gauge,
    pub failsafe_confirms: Family<ResultLabel, Counter>,
    /// ProxyInfo writes, and lease keep-alives in their place: the store load of this proxy.
    pub info_writes: Counter,
    /// Checks by what they read: the whole clusterdata, or only that it is unchanged.
    pub checks: Family<ResultLabel, Counter>,
    pub info_keepalives: Counter,
    /// CancelRequests by where they went.
    pub cancels: Family<ResultLabel, Counter>,
    /// Session starts by who authenticated the client.
    pub auth: Family<ResultLabel, Counter>,
    /// Drained sessions by what became of them: moved, or why not.
    pub moves: Family<ResultLabel, Counter>,
    /// How long each moved session was held (from its drain to its first byte relayed on
    /// the new master).
    pub move_seconds: HeldSeconds,
    /// How long each move took once the proxy saw its new server routed (the login, the
    /// catalog check after a failover, the replay): what a move adds to a client's wait.
    pub move_after_route_seconds: StepSeconds,
    /// Sessions opened on the master-to-be before it was routed, by what became of them.
    pub move_prepared: Family<ResultLabel, Counter>,
    /// Sessions whose server went away during their start, by what became of them.
    pub start_lost: Family<ResultLabel, Counter>,
}

/// A histogram of short steps, from 0.1 ms to about 3 s.
pub struct StepSeconds(pub Histogram);

impl Default for StepSeconds {
    fn default() -> Self {
        StepSeconds(Histogram::new(exponential_buckets(0.0001, 2.0, 16)))
    }
}

/// A histogram of hold times, from 10 ms to about 20 s.
pub struct HeldSeconds(pub Histogram);

impl Default for HeldSeconds {
    fn default() -> Self {
        HeldSeconds(Histogram::new(exponential_buckets(0.01, 2.0, 12)))
    }
}

impl std::ops::Deref for HeldSeconds {
    type Target = Histogram;
    fn deref(&self) -> &Histogram {
        &self.0
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ThreadLabel {
    /// The listener's address (the read-write and the read-only one have threads each).
    pub listener: String,
    pub thread: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

impl Metrics {
    /// Registers the proxy's metrics under `stolon_proxy_` in `root`.
    pub fn register(self: &Arc<Self>, root: &mut Registry) {
        let r = root.sub_registry_with_prefix("stolon_proxy");
        r.register(
            "sessions_accepted",
            "Sessions accepted",
            self.accepted.clone(),
        );
        r.register("sessions_active", "Sessions open now", self.active.clone());
        r.register(
            "relay_thread_sessions",
            "Sessions open now on each relay thread, by listener",
            self.relay_sessions.clone(),
        );
        r.register(
            "relay_rail_sessions",
            "Plaintext sessions relayed now by the relay threads' epoll rails (the rest of the \
             open sessions relay in their tokio tasks: TLS, starts, drains, moves)",
            self.rail_sessions.clone(),
        );
        r.register(
            "relay_sessions_rebalanced",
            "Sessions moved to another relay thread at a transaction boundary, as the load changed",
            self.rebalanced.clone(),
        );
        r.register(
            "sessions_closed",
            "Sessions closed, by reason",
            self.closed.clone(),
        );
        r.register(
            "route_generation",
            "Proxy generation applied",
            self.generation.clone(),
        );
        r.register(
            "routing",
            "1 while a master is routed to",
            self.routing.clone(),
        );
        r.register(
            "store_errors",
            "Failed store requests, by kind",
            self.store_errors.clone(),
        );
        r.register("bytes", "Bytes relayed, by direction", self.bytes.clone());
        r.register(
            "sessions_held",
            "Sessions held now, waiting for a master",
            self.held.clone(),
        );
        r.register(
            "sessions_holds",
            "Sessions that were held for a master",
            self.holds.clone(),
        );
        r.register(
            "failsafe_routing",
            "1 while routing on the master keeper's confirmed failsafe hold, the store out of reach",
            self.failsafe_routing.clone(),
        );
        r.register(
            "failsafe_confirms",
            "Failsafe confirmations asked of the master's keeper, by result",
            self.failsafe_confirms.clone(),
        );
        r.register(
            "route_changed_seconds",
            "When the master route last changed, as seconds since the unix epoch",
            self.route_changed.clone(),
        );
        r.register(
            "info_writes",
            "ProxyInfo writes to the store",
            self.info_writes.clone(),
        );
        r.register(
            "store_checks",
            "Checks of the store every proxyCheckInterval, by what they read: read (the \
             whole clusterdata) or unchanged (only that its revision is the one the watch \
             brought)",
            self.checks.clone(),
        );
        r.register(
            "auth",
            "Session starts by who authenticated the client (--auth-user): scram or md5 (the \
             proxy), passthrough (the server: a role the proxy does not look up or cannot \
             answer for), lookup_error (passed through), failed (refused by the proxy)",
            self.auth.clone(),
        );
        r.register(
            "cancel_requests",
            "CancelRequests by where they went: local (a session of this proxy), peer (the \
             proxy that minted the key), peer_unknown, ended (its session is over), not_minted \
             (a server's own key: sent to this listener's servers)",
            self.cancels.clone(),
        );
        r.register(
            "session_moves",
            "Sessions drained by a planned switchover or a standby leaving the read-only pool, \
             or whose server went away, by what became of them: moved (to the new server, \
             unseen by the client), or why each was closed instead: no_credentials (the proxy \
             did not authenticate it), disabled (--session-moves off), listen, advisory_lock, \
             temp_table, hold_cursor, sql_prepare, session_authorization, custom_setting, \
             inspect_failed, no_master (none within --hold-timeout), replay_failed; after a \
             lost server: in_flight (a request in flight or a transaction open), unproven \
             (its state not proven), server_ended (the old server ended it and still runs), \
             implicit_calls (the database's catalog calls functions the proxy cannot judge)",
            self.moves.clone(),
        );
        r.register(
            "session_move_seconds",
            "How long each moved session was held, from its drain (or its server's loss) to \
             the new server",
            self.move_seconds.0.clone(),
        );
        r.register(
            "session_move_after_route_seconds",
            "How long each move took once its new server was routed: the login, the catalog \
             check after a failover and the replay",
            self.move_after_route_seconds.0.clone(),
        );
        r.register(
            "session_start_lost",
            "Sessions the proxy authenticated whose server went away before their start ended \
             (the client had sent it nothing yet), by what became of them: started (on the \
             next master, unseen by the client), or why they were closed with the server's \
             error: no_master (none within --hold-timeout, or the client left), replay_failed \
             (the next master refused the login)",
            self.start_lost.clone(),
        );
        r.register(
            "session_move_prepared",
            "Moving sessions logged in (and their state replayed) on the master-to-be while \
             it was not routed yet (a switchover's target, a failover's elected standby), by \
             what became of them: used (the move needed no login once the master was routed), \
             discarded (another server was routed, the session ended there meanwhile, or the \
             move gave up), refused (the login or the replay failed there: the move logs in \
             again once a master is routed)",
            self.move_prepared.clone(),
        );
        r.register(
            "info_keepalives",
            "ProxyInfo lease keep-alives (checks that wrote nothing)",
            self.info_keepalives.clone(),
        );
    }

    /// A session start by who authenticated it (see the metric's help).
    pub fn auth(&self, result: &'static str) {
        self.auth.get_or_create(&ResultLabel { result }).inc();
    }

    /// A session moved to the new master at a planned switchover, held for `held`.
    pub fn moved(&self, held: std::time::Duration) {
        self.moves
            .get_or_create(&ResultLabel { result: "moved" })
            .inc();
        self.move_seconds.observe(held.as_secs_f64());
    }

    /// A drained session that could not be moved, by why (`Unmovable::label`): closed at
    /// its boundary.
    pub fn unmoved(&self, why: &'static str) {
        self.moves.get_or_create(&ResultLabel { result: why }).inc();
    }

    /// A session whose server went away during its start: started elsewhere, or why not.
    pub fn restarted(&self, result: &'static str) {
        self.start_lost.get_or_create(&ResultLabel { result }).inc();
    }

    /// A session prepared on the master-to-be: used, discarded or refused.
    pub fn move_prepared(&self, result: &'static str) {
        self.move_prepared
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// A CancelRequest handled: local, peer, peer_unknown, ended or not_minted.
    pub fn cancel(&self, result: &'static str) {
        self.cancels.get_or_create(&ResultLabel { result }).inc();
    }

    pub fn closed(&self, reason: CloseReason) {
        self.closed.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn store_error(&self, kind: &'static str) {
        self.store_errors.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn add_bytes(&self, direction: Direction, n: u64) {
        if n > 0 {
            self.bytes
                .get_or_create(&DirectionLabel { direction })
                .inc_by(n);
        }
    }
}

/// Serves `GET /metrics` and `GET /health` (200 only while routing to a master).
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    routes: Arc<Routes>,
    cluster_name: &str,
    shutdown: CancellationToken,
) {
    let mut registry = control::metrics::root_registry("proxy", cluster_name);
    metrics.register(&mut registry);
    let registry = Arc::new(registry);
    let health: control::metrics::HealthFn = Arc::new(move || {
        let route = routes.load();
        match &route.master {
            Ok(_) => Ok(format!("routing generation {}", route.generation)),
            Err(why) => Err(format!("not routing: {why:?}")),
        }
    });
    control::metrics::serve(listener, registry, health, shutdown).await
}
