//! `stolon-proxy`: the binary. Flags are stolon-proxy's, plus the engine and limits; every
//! flag can also come from `STPROXY_<FLAG>`.

use anyhow::Context;
use clap::{ArgAction, Parser};
use control::cli::{parse_duration, parse_with_env, CommonArgs};
use proxy::conn::{ConnConfig, Ctx, ReadOnly};
use proxy::discovery::Discovery;
use proxy::metrics::Metrics;
use proxy::route::Routes;
use proxy::server::{self, Engine, Listen, Shared};
use socket2::TcpKeepalive;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Routes PostgreSQL clients to the cluster's one master, as stolon-proxy does, and closes
/// every session to an old master the moment the master changes. It refuses clients (with
/// a PostgreSQL error) while there is no master or while it cannot reach the store.
#[derive(Parser, Debug)]
#[command(name = "stolon-proxy", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Address to listen on for clients
    #[arg(long, default_value = "127.0.0.1")]
    listen_address: String,
    /// Port to listen on for clients
    #[arg(long, default_value_t = 5432)]
    port: u16,
    /// Close the listener while the proxy cannot reach the store (true/false)
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true")]
    stop_listening: bool,
    /// TCP keepalive idle time in seconds for client connections. Keepalive is always on,
    /// as in Go stolon (Go's listener turns it on): 0 means Go's default period, 15 s
    #[arg(long, default_value_t = 0)]
    tcp_keepalive_idle: u64,
    /// TCP keepalive probe count for client connections (0: OS default)
    #[arg(long, default_value_t = 0)]
    tcp_keepalive_count: u32,
    /// TCP keepalive probe interval in seconds for client connections (0: 15 s, Go's default)
    #[arg(long, default_value_t = 0)]
    tcp_keepalive_interval: u64,
    /// Relay engine: one, tokio-tpc (auto is the same); io-uring and tokio-mt were removed and
    /// still start, with a warning
    #[arg(long, value_enum, default_value = "auto")]
    engine: Engine,
    /// Relay threads (default: one per core)
    #[arg(long)]
    threads: Option<usize>,
    /// Relay threads pack sessions: a new session goes to the first thread that used less
    /// than this share of a core over the last quarter second, and sessions move between
    /// threads at transaction boundaries as the load changes (a thread over it gives part
    /// of its sessions to the least busy; a light load gathers them back on the first).
    /// One thread serving a load uses less CPU per transaction than several sharing it
    /// (measured: 11.7 against 13.3 us at pgbench -S -c16, docs/benchmarks.md). Plaintext
    /// sessions move; a TLS session keeps its thread. 0: spread sessions evenly over the
    /// threads when they connect and never move them
    #[arg(long, default_value_t = 0.75, value_parser = parse_busy)]
    relay_busy: f64,
    /// Plaintext sessions that have lasted a few dozen transactions are relayed between
    /// their stops by a raw epoll loop, a thread of its own beside each relay thread,
    /// instead of by their tokio tasks: less CPU per transaction (measured,
    /// docs/benchmarks.md). TLS sessions, session starts, drains and moves stay in tokio
    /// either way (true/false)
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true")]
    relay_rail: bool,
    /// With --relay-busy 0 only: sessions the first relay thread takes before new ones go
    /// to the thread with the fewest (0, the default: always the fewest)
    #[arg(long, default_value_t = 0)]
    relay_fill: usize,
    /// Most client sessions at once; more get SQLSTATE 53300. Each session needs two file
    /// descriptors: checked against RLIMIT_NOFILE at start (default 10000, lowered to what
    /// the limit allows)
    #[arg(long)]
    max_connections: Option<usize>,
    /// Time a client has to send its first packet
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    startup_timeout: Duration,
    /// Time allowed to connect to the master
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// On SIGTERM, how long to wait for sessions to end (SIGINT exits at once)
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    shutdown_grace: Duration,
    /// This proxy's UID in the store (default: random)
    #[arg(long)]
    uid: Option<String>,
    /// Address of the read-only listener (off unless --ro-port is given)
    #[arg(long, default_value = "127.0.0.1")]
    ro_listen_address: String,
    /// Port of the read-only listener: each session goes to a healthy standby that follows
    /// the master within --ro-max-lag, least-connections first (off by default)
    #[arg(long)]
    ro_port: Option<u16>,
    /// Most a standby of the read-only pool may lag the master's last published WAL
    /// position: bytes, or a number with kB, MB or GB
    #[arg(long, default_value = "1MB", value_parser = control::cli::parse_size_flag)]
    ro_max_lag: u64,
    /// With no standby in the pool, read-only sessions go to the master (default: 57P03
    /// "no standby available")
    #[arg(long)]
    ro_fallback_master: bool,
    /// While a master change is under way (no master routed, or the routed master refuses
    /// connections), hold a new session this long for the next master instead of refusing
    /// it (0: refuse at once). The default covers a failover with the default spec
    /// (failInterval 20 s)
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    hold_timeout: Duration,
    /// On a planned switchover (stolonctl switchover), how long the old master's sessions
    /// have to reach a transaction boundary: each is closed cleanly when idle (FATAL 57P01,
    /// as a PostgreSQL shutting down says), never inside a transaction; what is still open
    /// at the timeout is severed (0: sever at once, and track nothing). Unplanned failovers
    /// sever at once
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Which sessions the proxy moves to another server instead of closing them (only
    /// sessions it authenticated, --client-tls terminate with --auth-user): all (at a planned
    /// switchover or a standby leaving the read-only pool, and after an unplanned failover
    /// when it can prove the session's state: it then tracks each session's statements),
    /// switchover (not after a failover, and nothing tracked for it), off (none, as Go
    /// stolon)
    #[arg(long, value_enum, default_value = "all")]
    session_moves: proxy::migrate::Moves,
    /// Most sessions held at once; more are refused (57P03) at once
    #[arg(long, default_value_t = 1000)]
    hold_max_sessions: usize,
    /// Clients' TLS: passthrough relays it to the server unread (Go stolon's behaviour; the
    /// drain then cannot see a TLS session's transactions and waits its timeout);
    /// terminate answers it with --tls-cert-file, so the proxy reads every session
    #[arg(long, value_enum, default_value = "passthrough")]
    client_tls: proxy::tls::ClientTlsMode,
    /// PEM certificate chain shown to clients in terminate mode (reloaded when the file
    /// changes, or on SIGHUP). Without it, terminate mode declines TLS ('N')
    #[arg(long, requires = "tls_key_file")]
    tls_cert_file: Option<std::path::PathBuf>,
    /// PEM private key of --tls-cert-file
    #[arg(long, requires = "tls_cert_file")]
    tls_key_file: Option<std::path::PathBuf>,
    /// In terminate mode, refuse plaintext sessions (28000, as PostgreSQL's hostssl rules)
    #[arg(long)]
    client_tls_required: bool,
    /// In terminate mode, TLS to the servers, in libpq's terms: disable, prefer, require
    /// (encrypted, unverified) or verify-full (against --server-ca-file). Default disable:
    /// until the proxy authenticates clients itself, SCRAM with channel binding (libpq's
    /// default when the server offers it) cannot pass through two TLS sessions
    #[arg(long, value_enum, default_value = "disable")]
    server_sslmode: proxy::tls::ServerSslMode,
    /// PEM CA certificates that sign the servers' certificates (verify-full)
    #[arg(long)]
    server_ca_file: Option<std::path::PathBuf>,
    /// host:port where the other proxies of the cluster reach this one's client port, to
    /// forward a CancelRequest for a session of this proxy that reached them (behind a load
    /// balancer). Default: --listen-address and --port, unless that address is a wildcard
    /// (0.0.0.0, ::): then such cancels are not forwarded here
    #[arg(long)]
    advertise_address: Option<String>,
    /// In terminate mode, authenticate clients at the proxy: the role whose login reads
    /// other roles' stored passwords through the lookup function the keeper keeps
    /// (keeper --pg-auth-username; README "TLS and authentication"). Roles it cannot check
    /// pass through to the server
    #[arg(long, requires = "auth_passwordfile")]
    auth_user: Option<String>,
    /// File with the --auth-user's password (trailing newlines removed)
    #[arg(long, requires = "auth_user")]
    auth_passwordfile: Option<std::path::PathBuf>,
    /// Database the --auth-user logs into for lookups (where the lookup function is)
    #[arg(long, default_value = "postgres")]
    auth_dbname: String,
    /// How long a role's looked-up password is used before it is read again (a failed
    /// login reads it again at once)
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    auth_cache_ttl: Duration,
}

impl Args {
    /// `--auth-user` (terminate mode only).
    fn auth(&self) -> anyhow::Result<Option<Arc<proxy::auth::Auth>>> {
        let (Some(user), Some(file)) = (&self.auth_user, &self.auth_passwordfile) else {
            return Ok(None);
        };
        anyhow::ensure!(
            self.client_tls == proxy::tls::ClientTlsMode::Terminate,
            "--auth-user needs --client-tls terminate (in passthrough the proxy cannot read the session)"
        );
        let password = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read --auth-passwordfile {}", file.display()))?;
        let password = password.trim_end_matches(['\r', '\n']).to_string();
        anyhow::ensure!(
            !password.is_empty(),
            "--auth-passwordfile {} is empty",
            file.display()
        );
        let role = proxy::auth::lookup::AuthRole {
            user: user.clone(),
            password,
            database: self.auth_dbname.clone(),
        };
        Ok(Some(Arc::new(proxy::auth::Auth::new(
            role,
            self.auth_cache_ttl,
        ))))
    }

    /// Where other proxies forward cancels for this proxy's sessions ("" if nowhere).
    fn cancel_address(&self, addr: SocketAddr) -> String {
        match &self.advertise_address {
            Some(a) => a.clone(),
            None if addr.ip().is_unspecified() => {
                tracing::warn!("--listen-address is a wildcard address: set --advertise-address so that other proxies can forward cancel requests for this proxy's sessions");
                String::new()
            }
            None => addr.to_string(),
        }
    }

    /// Terminate mode's settings (`None` in passthrough); refuses combinations that cannot
    /// work rather than ignore a flag.
    fn terminate(&self) -> anyhow::Result<Option<Arc<proxy::tls::Terminate>>> {
        use proxy::tls::{Acceptor, CertFiles, ClientTlsMode, ServerSslMode, ServerTls};
        let files = self.tls_cert_file.clone().zip(self.tls_key_file.clone());
        if self.client_tls == ClientTlsMode::Passthrough {
            anyhow::ensure!(
                files.is_none()
                    && !self.client_tls_required
                    && self.server_sslmode == ServerSslMode::Disable,
                "--tls-cert-file, --client-tls-required and --server-sslmode need --client-tls terminate (in passthrough the client's TLS goes to the server unread)"
            );
            return Ok(None);
        }
        anyhow::ensure!(
            files.is_some() || !self.client_tls_required,
            "--client-tls-required needs --tls-cert-file and --tls-key-file: no client could connect"
        );
        let files = files.map(|(cert, key)| CertFiles { cert, key });
        let acceptor = Acceptor::load(files).context("cannot load the TLS certificate")?;
        let server = ServerTls::new(self.server_sslmode, self.server_ca_file.as_deref())?;
        Ok(Some(Arc::new(proxy::tls::Terminate {
            acceptor,
            required: self.client_tls_required,
            server,
        })))
    }

    /// Keepalive for client connections: on unless the OS refuses, idle and interval 15 s
    /// unless set (what Go's net.Listen gives stolon-proxy's sockets), count the OS's.
    fn keepalive(&self) -> Option<TcpKeepalive> {
        const GO_DEFAULT: Duration = Duration::from_secs(15);
        let secs = |s: u64| {
            if s == 0 {
                GO_DEFAULT
            } else {
                Duration::from_secs(s)
            }
        };
        let mut ka = TcpKeepalive::new()
            .with_time(secs(self.tcp_keepalive_idle))
            .with_interval(secs(self.tcp_keepalive_interval));
        if self.tcp_keepalive_count > 0 {
            ka = ka.with_retries(self.tcp_keepalive_count);
        }
        Some(ka)
    }
}

/// `--listen-address` may be an IP or a host name (as in Go stolon): the first address the
/// name resolves to.
fn listen_addr(host: &str, port: u16) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host, port)
        .to_socket_addrs()
        .with_context(|| format!("invalid --listen-address {host:?}: cannot resolve it"))?
        .next()
        .with_context(|| format!("--listen-address {host:?} resolves to no address"))
}

/// `--relay-busy`: a share of one core, 0 (spread) to 1.
fn parse_busy(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        Ok(v) => Err(format!("{v} is not a share of a core (0 to 1)")),
        Err(e) => Err(e.to_string()),
    }
}

fn main() -> anyhow::Result<()> {
    let args: Args = parse_with_env("STPROXY_");
    args.common.init_tracing();
    args.common.check().map_err(anyhow::Error::msg)?;
    let addr = listen_addr(&args.listen_address, args.port)?;
    let uid = args.uid.clone().unwrap_or_else(control::model::short_uid);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args, addr, uid))
}

fn serve_metrics_thread(
    listener: std::net::TcpListener,
    metrics: Arc<Metrics>,
    routes: Arc<Routes>,
    cluster_name: &str,
    stop: CancellationToken,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let served = rt.map(|rt| {
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener)?;
            proxy::metrics::serve(l, metrics, routes, cluster_name, stop).await;
            Ok::<(), std::io::Error>(())
        })
    });
    if let Err(e) | Ok(Err(e)) = served {
        tracing::error!(error = %e, "metrics endpoint failed");
    }
}

/// Reloads the certificate when its files change (checked every 2 s) or on SIGHUP.
async fn reload_certificate(t: Arc<proxy::tls::Terminate>) {
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler: the certificate reloads on file changes only");
            None
        }
    };
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            _ = tick.tick() => false,
            Some(()) = async { match &mut hup { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
        };
        if forced {
            tracing::info!("SIGHUP: reloading the TLS certificate");
        }
        t.acceptor.reload(forced);
    }
}

async fn run(args: Args, addr: SocketAddr, uid: String) -> anyhow::Result<()> {
    let nofile = proxy::limits::raise_nofile().context("cannot read RLIMIT_NOFILE")?;
    let (max_connections, lowered) =
        proxy::limits::fit(args.max_connections, nofile).map_err(anyhow::Error::msg)?;
    if let Some(warning) = lowered {
        // The default adapting to the limit is expected: said once, not as a warning.
        tracing::info!("{warning}");
    }
    let metrics = Arc::new(Metrics::default());
    let routes = Arc::new(Routes::default());
    let store = args
        .common
        .open_cluster_store()
        .await
        .context("cannot set up the store client")?;
    let (listening_tx, listening_rx) = tokio::sync::watch::channel(false);
    let stop_discovery = CancellationToken::new();
    let stop_accepting = CancellationToken::new();
    tracing::info!(%uid, cluster = %args.common.cluster_name, "stolon-proxy starting");

    if let Some(maddr) = &args.common.metrics_listen_address {
        let l = std::net::TcpListener::bind(maddr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .with_context(|| format!("cannot listen on --metrics-listen-address {maddr}"))?;
        let (m, r, c, stop) = (
            metrics.clone(),
            routes.clone(),
            args.common.cluster_name.clone(),
            stop_discovery.clone(),
        );
        // Its own thread and runtime: a flood of scrapes or health checks must not delay
        // discovery, which fences the proxy when the store is lost.
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || serve_metrics_thread(l, m, r, &c, stop))
            .context("cannot start the metrics thread")?;
    }
    let owner = proxy::cancel::owner_id(&uid);
    let peers = Some(Arc::new(proxy::peers::Peers {
        store: store.clone(),
    }));
    let discovery = Discovery {
        store,
        uid,
        routes: routes.clone(),
        metrics: metrics.clone(),
        listening: listening_tx,
        stop_listening: args.stop_listening,
        ro_max_lag: args.ro_port.map(|_| args.ro_max_lag),
        faults: control::faults::from_env(),
        drain_timeout: args.drain_timeout,
        cancel_id: owner,
        cancel_address: args.cancel_address(addr),
    };
    let mut discovery = tokio::spawn(discovery.run(stop_discovery.clone()));

    let config = ConnConfig {
        startup_timeout: args.startup_timeout,
        connect_timeout: args.connect_timeout,
        keepalive: args.keepalive(),
        drain: !args.drain_timeout.is_zero(),
        moves: args.session_moves,
    };
    let limit = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let rejecting = Arc::new(tokio::sync::Semaphore::new(proxy::server::REJECTING_MAX));
    let hold = Arc::new(proxy::hold::Hold::new(
        args.hold_timeout,
        args.hold_max_sessions,
        metrics.clone(),
    ));
    let cancel_keys = Arc::new(proxy::cancel::Keys::new(owner));
    let tls = args.terminate()?;
    let auth = args.auth()?;
    if let Some(t) = &tls {
        tokio::spawn(reload_certificate(t.clone()));
        tracing::info!(
            certificate = t.acceptor.config().is_some(),
            required = t.required,
            server_sslmode = ?t.server.mode,
            "terminating client TLS"
        );
    }
    let shared_for = |read_only: Option<ReadOnly>| {
        Arc::new(Shared {
            ctx: Arc::new(Ctx {
                routes: routes.clone(),
                metrics: metrics.clone(),
                config: config.clone(),
                read_only,
                hold: hold.clone(),
                cancel_keys: cancel_keys.clone(),
                tls: tls.clone(),
                peers: peers.clone(),
                auth: auth.clone(),
            }),
            listening: listening_rx.clone(),
            limit: limit.clone(),
            rejecting: rejecting.clone(),
            stop_accepting: stop_accepting.clone(),
        })
    };
    let shared = shared_for(None);
    if args.relay_fill > 0 && args.relay_busy > 0.0 {
        tracing::warn!("--relay-fill applies only with --relay-busy 0 (sessions spread): ignored");
    }
    let listen = Listen {
        addr,
        engine: args.engine,
        threads: args.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }),
        fill: args.relay_fill,
        busy: (args.relay_busy * 1000.0).round() as u32,
        grace: args.shutdown_grace,
        rail: args.relay_rail,
    };
    let mut engines = server::start(&listen, shared)?;
    if let Some(ro_port) = args.ro_port {
        let ro = Listen {
            addr: listen_addr(&args.ro_listen_address, ro_port)?,
            ..listen
        };
        let read_only = ReadOnly {
            fallback_master: args.ro_fallback_master,
        };
        tracing::info!(addr = %ro.addr, max_lag = args.ro_max_lag, fallback_master = args.ro_fallback_master, "read-only listener");
        engines.extend(server::start(&ro, shared_for(Some(read_only)))?);
    }

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // Supervision: discovery is what keeps the routes true and fences the proxy; if it ends
    // or panics the proxy exits non-zero (every session dies with it) rather than relay on
    // a route nobody updates.
    tokio::select! {
        _ = term.recv() => tracing::info!(grace = ?args.shutdown_grace, "SIGTERM: draining sessions"),
        _ = int.recv() => {
            tracing::info!("SIGINT: exiting now");
            std::process::exit(0);
        }
        ended = &mut discovery => {
            match ended {
                Ok(()) => tracing::error!("discovery ended by itself: exiting"),
                Err(e) => tracing::error!(error = %e, "discovery panicked: exiting"),
            }
            std::process::exit(1);
        }
    }
    stop_accepting.cancel();
    // Keep routing (and fencing) while sessions drain; a second signal cuts it short.
    let drained = tokio::task::spawn_blocking(move || {
        for h in engines {
            let _ = h.join();
        }
    });
    tokio::select! {
        _ = drained => {}
        // Exit for real: returning would wait for the draining threads.
        _ = term.recv() => {
            tracing::warn!("second SIGTERM: exiting now");
            std::process::exit(0);
        }
        _ = int.recv() => {
            tracing::warn!("SIGINT: exiting now");
            std::process::exit(0);
        }
    }
    stop_discovery.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), discovery).await;
    tracing::info!("stopped");
    Ok(())
}
