//! What pgbench runs against: PostgreSQL itself, stolon-proxy (one process per engine,
//! routed through a real etcd and clusterdata), HAProxy in TCP mode, PgBouncer in session
//! mode. Every server is a child process stopped on Drop.

use anyhow::{bail, Context, Result};
use control::model::ClusterData;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use testkit::postgres::{as_pg_user, chown_to_pg_user};
use testkit::{free_port, ChildGuard, Etcd, PortGuard, Postgres};

/// Finds a program in PATH or the sbin directories (Debian puts haproxy and pgbouncer in
/// /usr/sbin, which is not on every user's PATH).
pub fn find_program(name: &str) -> Result<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"])
        .map(|d| PathBuf::from(d).join(name))
        .find(|p| p.is_file());
    found.with_context(|| format!("{name} not found: install it (scripts/deps.sh)"))
}

pub struct Target {
    pub name: String,
    pub port: u16,
    /// The process whose CPU time is charged to this target (none for direct).
    pub pid: Option<u32>,
    _guard: Option<ChildGuard>,
    _port: Option<PortGuard>,
    _dir: Option<tempfile::TempDir>,
}

impl Target {
    pub fn direct(pg: &Postgres) -> Target {
        Target {
            name: "direct".into(),
            port: pg.port(),
            pid: None,
            _guard: None,
            _port: None,
            _dir: None,
        }
    }
}

fn wait_port(port: u16, child: &mut ChildGuard, what: &str) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if child.exited() {
            bail!("{what} exited during start-up");
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not listen on {port} within 20s")
}

/// The stolon-proxy binary next to this one (cargo puts both in target/<profile>/).
pub fn proxy_binary() -> Result<PathBuf> {
    build_binary("stolon-proxy")
}

/// `name` beside this binary (a build of stolon-proxy kept for an A/B, or the current one).
fn build_binary(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    let p = me.with_file_name(name);
    if !p.exists() {
        bail!(
            "{} not found: build it first (cargo build --release --workspace; for an `@NAME` A/B, copy a build of stolon-proxy there)",
            p.display()
        );
    }
    Ok(p)
}

/// A clusterdata routing proxy `uid` to PostgreSQL on `pg_port`.
pub fn routing_clusterdata(pg_port: u16, uids: &[String]) -> ClusterData {
    let doc = serde_json::json!({
        "formatVersion": 1,
        "cluster": {"uid": "bench", "generation": 1, "spec": {"initMode": "new"},
                    "status": {"phase": "normal", "master": "db0"}},
        "dbs": {"db0": {"uid": "db0", "status": {"healthy": true, "listenAddress": "127.0.0.1", "port": pg_port.to_string()}},
                "db1": {"uid": "db1", "status": {"healthy": true, "listenAddress": "127.0.0.1", "port": pg_port.to_string()}}},
        "proxy": {"generation": 1, "spec": {"masterDbUid": "db0", "enabledProxies": uids}}
    });
    ClusterData::from_json(doc.to_string().as_bytes()).expect("valid clusterdata")
}

pub fn stolon_proxy(
    etcd: &Etcd,
    cluster: &str,
    uid: &str,
    spec: &str,
    log_dir: &std::path::Path,
    terminate_flags: &[String],
) -> Result<Target> {
    let port = free_port();
    let log = std::fs::File::create(log_dir.join(format!("{uid}.log")))?;
    let full_spec = spec;
    // An `@NAME` suffix (after every other) runs the build `stolon-proxy-NAME` kept beside
    // this binary: an A/B of two builds in one run.
    let (spec, binary) = match spec.rsplit_once('@') {
        Some((core, name)) => (core, build_binary(&format!("stolon-proxy-{name}"))?),
        None => (spec, proxy_binary()?),
    };
    let mut cmd = Command::new(binary);
    // `engine:threads` pins the relay thread count (default: one per core); a `+no-drain`
    // suffix runs it with `--drain-timeout 0` (no transaction tracking), `+terminate` with
    // the proxy's own TLS and authentication (`terminate_flags`); suffixes in that order,
    // `+moves-switchover` between the other two.
    let (spec, terminate) = match spec.strip_suffix("+terminate") {
        Some(core) => (core, true),
        None => (spec, false),
    };
    if terminate {
        cmd.args(terminate_flags);
    }
    // `+moves-switchover` runs it with `--session-moves switchover`: nothing tracked for a
    // move after a failover (the A/B of that tracking's cost).
    let (spec_moves, moves_switchover) = match spec.strip_suffix("+moves-switchover") {
        Some(core) => (core, true),
        None => (spec, false),
    };
    if moves_switchover {
        cmd.args(["--session-moves", "switchover"]);
    }
    let (spec_core, no_drain) = match spec_moves.strip_suffix("+no-drain") {
        Some(core) => (core, true),
        None => (spec_moves, false),
    };
    if no_drain {
        cmd.args(["--drain-timeout", "0"]);
    }
    let (engine_name, threads) = match spec_core.split_once(':') {
        Some((e, t)) => (e, Some(t)),
        None => (spec_core, None),
    };
    if let Some(t) = threads {
        cmd.args(["--threads", t]);
    }
    cmd.args([
        "--cluster-name",
        cluster,
        "--store-endpoints",
        &etcd.endpoint(),
    ])
    .args([
        "--port",
        &port.0.to_string(),
        "--uid",
        uid,
        "--engine",
        engine_name,
    ])
    .args(["--log-level", "info", "--log-format", "json"])
    .stdin(Stdio::null())
    .stdout(log.try_clone()?)
    .stderr(log);
    let mut child = ChildGuard::spawn("stolon-proxy", &mut cmd)?;
    if let Err(e) = wait_port(port.0, &mut child, "stolon-proxy") {
        let log = std::fs::read_to_string(log_dir.join(format!("{uid}.log"))).unwrap_or_default();
        bail!("{e}; its log:\n{log}");
    }
    Ok(Target {
        name: format!("stolon-{full_spec}"),
        port: port.0,
        pid: Some(child.pid()),
        _guard: Some(child),
        _port: Some(port),
        _dir: None,
    })
}

/// `loadtest relay-proto --mode MODE`: a bare TCP relay to PostgreSQL on `pg_port`.
pub fn relay_proto(pg_port: u16, spec: &str) -> Result<Target> {
    let port = free_port();
    // `MODE@NAME` runs `loadtest-NAME` beside loadtest (a wrapper: under a profiler, say).
    let (mode, program) = match spec.split_once('@') {
        Some((mode, name)) => (
            mode,
            std::env::current_exe()?.with_file_name(format!("loadtest-{name}")),
        ),
        None => (spec, std::env::current_exe()?),
    };
    let mut cmd = Command::new(program);
    cmd.args(["relay-proto", "--mode", mode, "--listen"])
        .arg(port.0.to_string())
        .arg("--backend")
        .arg(pg_port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let mut child = ChildGuard::spawn("relay-proto", &mut cmd).context("starting relay-proto")?;
    wait_port(port.0, &mut child, "relay-proto")?;
    Ok(Target {
        name: format!("proto-{spec}"),
        port: port.0,
        pid: Some(child.pid()),
        _guard: Some(child),
        _port: Some(port),
        _dir: None,
    })
}

/// HAProxy in TCP mode; `threads` sets `nbthread` (default: HAProxy's own, one per core).
pub fn haproxy(pg_port: u16, threads: Option<u32>) -> Result<Target> {
    let dir = testkit::temp_dir("haproxy")?;
    let port = free_port();
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 4000\n{}defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n\
             listen pg\n  bind 127.0.0.1:{}\n  server pg0 127.0.0.1:{pg_port}\n",
            threads.map_or(String::new(), |n| format!("  nbthread {n}\n")),
            port.0
        ),
    )?;
    let mut child = spawn_haproxy(&cfg)?;
    wait_port(port.0, &mut child, "haproxy")?;
    Ok(Target {
        name: threads.map_or("haproxy".into(), |n| format!("haproxy:{n}")),
        port: port.0,
        pid: Some(child.pid()),
        _guard: Some(child),
        _port: Some(port),
        _dir: Some(dir),
    })
}

/// HAProxy in the foreground on configuration file `cfg`, its output discarded.
pub fn spawn_haproxy(cfg: &std::path::Path) -> Result<ChildGuard> {
    let mut cmd = Command::new(find_program("haproxy")?);
    cmd.arg("-f")
        .arg(cfg)
        .arg("-db")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    ChildGuard::spawn("haproxy", &mut cmd).context("starting haproxy")
}

/// PgBouncer in session mode; `auth` is its authentication and TLS lines and its userlist
/// (`security::Secured::pgbouncer`).
pub fn pgbouncer(pg_port: u16, auth: (String, String)) -> Result<Target> {
    let dir = testkit::temp_dir("pgbouncer")?;
    let port = free_port();
    let d = dir.path();
    std::fs::write(d.join("userlist.txt"), auth.1)?;
    std::fs::write(
        d.join("pgbouncer.ini"),
        format!(
            "[databases]\npostgres = host=127.0.0.1 port={pg_port} dbname=postgres\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {}\nunix_socket_dir = {}\n\
             {}auth_file = {}\npool_mode = session\nmax_client_conn = 2000\n\
             default_pool_size = 100\nignore_startup_parameters = extra_float_digits\n\
             logfile = {}\n",
            port.0,
            d.display(),
            auth.0,
            d.join("userlist.txt").display(),
            d.join("pgbouncer.log").display()
        ),
    )?;
    chown_to_pg_user(d)?;
    let mut cmd = Command::new(find_program("pgbouncer")?);
    as_pg_user(&mut cmd)
        .arg(d.join("pgbouncer.ini"))
        .current_dir(d)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = ChildGuard::spawn("pgbouncer", &mut cmd).context("starting pgbouncer")?;
    wait_port(port.0, &mut child, "pgbouncer")?;
    Ok(Target {
        name: "pgbouncer".into(),
        port: port.0,
        pid: Some(child.pid()),
        _guard: Some(child),
        _port: Some(port),
        _dir: Some(dir),
    })
}
