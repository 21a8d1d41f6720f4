//! `loadtest`: benchmarks against real PostgreSQL on this machine.
//!   compare: pgbench side by side: direct, stolon-proxy engines, HAProxy, PgBouncer
//!   sever:   time to close N sessions after a master change, and memory per idle session
//!   ha:      what clients see of switchovers and failovers, stolon-proxy and HAProxy side by side
//!   swarm:   what N proxies cost the store and the sentinel, and master changes with N proxies
//!   store:   an etcd round trip through the daemons' store client and etcd-client's stock one
//!   relay-proto: a bare TCP relay (tokio task per session, or one epoll loop), a floor for compare

mod compare;
mod ha;
mod pgbench;
mod procstat;
mod relay_proto;
mod security;
mod sever;
mod store_rtt;
mod swarm;
mod targets;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "loadtest",
    about = "Benchmarks of stolon-proxy against real PostgreSQL"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// pgbench through each target in alternating rounds; ratios to direct in the same round
    Compare {
        /// Rounds (each runs every workload on every target, in a rotating order)
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Seconds per pgbench run
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// pgbench scale factor
        #[arg(long, default_value_t = 10)]
        scale: u32,
        /// stolon-proxy engines to run (comma list; `engine:threads` pins the thread count,
        /// a `+no-drain` suffix runs it with --drain-timeout 0: no transaction tracking; `+moves-switchover` with --session-moves switchover; `+terminate` last; an `@NAME` suffix after all runs the build stolon-proxy-NAME kept beside loadtest, for an A/B of two builds; `proto-tokio` and `proto-epoll` run `loadtest relay-proto` instead, a bare TCP relay, and `@NAME` after them the wrapper loadtest-NAME beside loadtest)
        #[arg(long, default_value = "tokio-tpc", value_delimiter = ',')]
        engines: Vec<String>,
        /// Leave out HAProxy and PgBouncer
        #[arg(long)]
        no_peers: bool,
        /// Also run HAProxy pinned to these thread counts (comma list), as `haproxy:N`
        #[arg(long, value_delimiter = ',')]
        haproxy_threads: Vec<u32>,
        /// How pgbench reaches every target: plain, tls (PostgreSQL with ssl on, sslmode
        /// require everywhere) or scram (a SCRAM role through md5 rules). Engines with a
        /// `+terminate` suffix run --client-tls terminate (with a certificate in tls mode,
        /// with --auth-user in scram mode)
        #[arg(long, value_enum, default_value = "plain")]
        security: security::Security,
        /// Only these workloads (names as printed, comma list)
        #[arg(long, value_delimiter = ',')]
        workloads: Option<Vec<String>>,
        /// Also write the table to this file
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// A bare TCP relay to one PostgreSQL (no protocol, no routing): the floor `compare`
    /// runs as engines `proto-tokio` and `proto-epoll`, to tell the runtime's cost from the
    /// proxy's own work. Runs until killed
    RelayProto {
        #[arg(long, value_enum)]
        mode: relay_proto::Mode,
        /// Port to listen on (127.0.0.1)
        #[arg(long)]
        listen: u16,
        /// PostgreSQL's port (127.0.0.1)
        #[arg(long)]
        backend: u16,
    },
    /// Sever time with N open sessions, and proxy memory per idle session
    Sever {
        #[arg(long, default_value_t = 1000)]
        sessions: usize,
        #[arg(long, default_value_t = 20)]
        tries: usize,
        #[arg(long, default_value = "tokio-tpc")]
        engine: String,
        /// Where sessions end: fake (a minimal backend, no process teardown noise) or postgres
        #[arg(long, default_value = "fake", value_parser = ["fake", "postgres"])]
        backend: String,
    },
    /// Switchovers and kill -9 failovers of a real cluster under write load, through
    /// stolon-proxy and through HAProxy checking the keepers' /primary, in the same run:
    /// failed connects, failed transactions, the longest gap with no commit, held sessions;
    /// a JSON result and a chart per scenario
    Ha {
        /// Planned switchovers (stolonctl switchover --wait)
        #[arg(long, default_value_t = 10)]
        switchovers: usize,
        /// Unplanned failovers (kill -9 of the master keeper and its PostgreSQL)
        #[arg(long, default_value_t = 10)]
        failovers: usize,
        /// etcd outages: etcd frozen (SIGSTOP) for --etcd-freeze-for, then thawed; run with
        /// --spec '{"failsafeMode":true}' and without it to compare
        #[arg(long, default_value_t = 0)]
        etcd_freezes: usize,
        /// How long each etcd freeze lasts
        #[arg(long, default_value = "10s", value_parser = humantime_ms)]
        etcd_freeze_for: std::time::Duration,
        /// Clients of each kind (session per transaction; persistent) per target: with 2,
        /// four writers through each (the baseline)
        #[arg(long, default_value_t = 2)]
        clients: usize,
        /// Pause after each transaction, per client
        #[arg(long, default_value = "10ms", value_parser = humantime_ms)]
        think: std::time::Duration,
        /// The clients' connect timeout (longer than the no-master window, so a held
        /// session is not given up)
        #[arg(long, default_value = "30s", value_parser = humantime_ms)]
        connect_timeout: std::time::Duration,
        /// Synchronous replication (one synchronous standby)
        #[arg(long)]
        sync: bool,
        /// Cluster spec keys (JSON) over the e2e suite's timings (sleepInterval 1s,
        /// failInterval 5s), e.g. '{"sleepInterval":"5s"}'
        #[arg(long, default_value = "{}", value_parser = parse_json)]
        spec: serde_json::Value,
        /// HAProxy's health-check timing for each keeper (`default-server` options)
        #[arg(long, default_value = "inter 1s fastinter 200ms fall 1 rise 1")]
        haproxy_check: String,
        /// Where ha.json and the charts go
        #[arg(long, default_value = "bench-results/ha")]
        out_dir: std::path::PathBuf,
        /// PostgreSQL with ssl on and every client at sslmode=require: stolon-proxy
        /// terminates the TLS (--client-tls terminate), HAProxy passes it through
        #[arg(long)]
        tls: bool,
        /// Sessions move at a switchover: every keeper keeps the proxies' auth role,
        /// stolon-proxy terminates the sessions and authenticates the clients
        /// (--client-tls terminate --auth-user), and every client of both targets logs in
        /// as a SCRAM role (a superuser is never authenticated by the proxy)
        #[arg(long)]
        move_sessions: bool,
        /// Application writers in other languages too, one of each through each target:
        /// psycopg2 (autocommit simple queries), pgx (its statement cache) and pgjdbc
        /// (server-side prepared statements), each keeping a session as a pool does and
        /// judged as loadtest's own clients (needs scripts/clients.sh)
        #[arg(long)]
        app_writers: bool,
    },
    /// N real stolon-proxy processes on one cluster of real processes, for each N of
    /// --proxies in one run: etcd's idle load (writes, lease renewals, watch events, CPU,
    /// memory), the sentinel's rounds, proxy memory, and switchovers and failovers under a
    /// light write load (no-commit gap, errors, time until every proxy routes to the new
    /// master); with --freeze, a failover with one proxy frozen (SIGSTOP). A JSON result, a
    /// markdown table and a chart (swarm.svg). STOLON_BIN_DIR runs other builds' binaries
    /// (a before/after comparison)
    Swarm {
        /// Fleet sizes (comma list), each measured in turn on the same cluster
        #[arg(long, default_value = "1,10,100", value_delimiter = ',')]
        proxies: Vec<usize>,
        /// Planned switchovers at each size
        #[arg(long, default_value_t = 3)]
        switchovers: usize,
        /// kill -9 failovers at each size
        #[arg(long, default_value_t = 3)]
        failovers: usize,
        /// How long the idle store load is measured at each size
        #[arg(long, default_value = "10s", value_parser = humantime_ms)]
        idle: std::time::Duration,
        /// Writers, each opening a session per transaction through the proxies in turn
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Pause after each transaction, per writer
        #[arg(long, default_value = "20ms", value_parser = humantime_ms)]
        think: std::time::Duration,
        /// At the largest size, one more failover with one proxy frozen (SIGSTOP)
        #[arg(long)]
        freeze: bool,
        /// Cluster spec keys (JSON) over the e2e suite's timings (sleepInterval 1s,
        /// failInterval 5s, proxyCheckInterval 1s, proxyTimeout 3s)
        #[arg(long, default_value = "{}", value_parser = parse_json)]
        spec: serde_json::Value,
        /// Where swarm.json, swarm.md and swarm.svg go
        #[arg(long, default_value = "bench-results/swarm")]
        out_dir: std::path::PathBuf,
        /// Run every proxy at this nice value (a diagnostic: sidecars on hosts of their
        /// own do not take the cluster's CPU; here they share its two cores)
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        proxy_nice: i32,
    },
    /// An etcd round trip (a compare-and-swap txn and a read) through the daemons' store
    /// client and through etcd-client's stock connection, alternating call by call against
    /// one etcd started for the run: p50/p90/p99 as a markdown table
    Store {
        /// Calls of each kind per client
        #[arg(long, default_value_t = 300)]
        calls: usize,
        /// Size of the value each txn writes
        #[arg(long, default_value_t = 4096)]
        value_bytes: usize,
        /// Pause between calls
        #[arg(long, default_value = "10ms", value_parser = humantime_ms)]
        pause: std::time::Duration,
    },
}

fn parse_json(s: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(s).map_err(|e| format!("not JSON: {e}"))
}

/// "250ms", "2s" or "1m" as a duration.
fn humantime_ms(s: &str) -> Result<std::time::Duration, String> {
    control::cli::parse_duration(s)
}

fn main() -> anyhow::Result<()> {
    match Args::parse().cmd {
        Cmd::RelayProto {
            mode,
            listen,
            backend,
        } => relay_proto::run(mode, listen, backend),
        Cmd::Compare {
            rounds,
            seconds,
            scale,
            engines,
            no_peers,
            haproxy_threads,
            workloads,
            out,
            security,
        } => compare::run(&compare::Options {
            rounds,
            seconds,
            scale,
            engines,
            peers: !no_peers,
            haproxy_threads,
            workloads,
            out,
            security,
        }),
        Cmd::Sever {
            sessions,
            tries,
            engine,
            backend,
        } => sever::run(&sever::Options {
            sessions,
            tries,
            engine,
            fake_backend: backend == "fake",
        }),
        Cmd::Ha {
            switchovers,
            failovers,
            etcd_freezes,
            etcd_freeze_for,
            clients,
            think,
            connect_timeout,
            sync,
            spec,
            haproxy_check,
            out_dir,
            tls,
            move_sessions,
            app_writers,
        } => ha::run(&ha::Options {
            switchovers,
            failovers,
            etcd_freezes,
            etcd_freeze_for,
            clients,
            think,
            connect_timeout,
            sync,
            spec,
            haproxy_check,
            out_dir,
            tls,
            move_sessions,
            app_writers,
        }),
        Cmd::Swarm {
            proxies,
            switchovers,
            failovers,
            idle,
            clients,
            think,
            freeze,
            spec,
            out_dir,
            proxy_nice,
        } => swarm::run(&swarm::Options {
            proxies,
            switchovers,
            failovers,
            idle,
            clients,
            think,
            freeze,
            spec,
            out_dir,
            proxy_nice,
        }),
        Cmd::Store {
            calls,
            value_bytes,
            pause,
        } => store_rtt::run(&store_rtt::Options {
            calls,
            value_bytes,
            pause,
        }),
    }
}
