//! `stolon-keeper`: the binary. Flags are stolon-keeper's; each can also come from
//! `STKEEPER_<FLAG>`. Passwords come from files (`--pg-*-passwordfile`) or the environment;
//! the plain password flags are accepted for compatibility and warn.

use anyhow::{bail, Context};
use clap::{ArgAction, Parser};
use control::cli::{parse_with_env, CommonArgs};
use control::model::PostgresBinaryVersion;
use keeper::config::{AuthMethod, Local};
use keeper::daemon::{Keeper, Settings};
use keeper::layout::Layout;
use keeper::passwords::{self, Login, Role};
use keeper::tools::{self, Tools};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Runs one PostgreSQL instance and makes it follow the cluster view computed by the
/// sentinel: initialises, starts, promotes, rebuilds standbys, and fences a master that
/// loses the store.
#[derive(Parser, Debug)]
#[command(name = "stolon-keeper", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Keeper UID: lower-case letters, digits and '_' (default: the one kept in the data
    /// dir, Go stolon's `keeperstate` included, or a new random one)
    #[arg(long)]
    uid: Option<String>,
    /// Deprecated (stolon's): the same as --uid
    #[arg(long, hide = true)]
    id: Option<String>,
    /// Do not lock the data dir (stolon's flag; two keepers on one dir then corrupt it)
    #[arg(long)]
    disable_data_dir_locking: bool,
    /// The keeper's directory (PostgreSQL data in <data-dir>/postgres)
    #[arg(long)]
    data_dir: PathBuf,
    /// Address PostgreSQL listens on
    #[arg(long, default_value = "127.0.0.1")]
    pg_listen_address: String,
    /// Port PostgreSQL listens on
    #[arg(long, default_value_t = 5432)]
    pg_port: u16,
    /// Address other keepers and proxies use (default: --pg-listen-address)
    #[arg(long)]
    pg_advertise_address: Option<String>,
    /// Port other keepers and proxies use (default: --pg-port)
    #[arg(long)]
    pg_advertise_port: Option<u16>,
    /// Directory of the PostgreSQL binaries (default: PG_BIN_PATH, pg_config --bindir, or the
    /// newest /usr/lib/postgresql/<major>/bin)
    #[arg(long)]
    pg_bin_path: Option<PathBuf>,
    /// Replication user
    #[arg(long, default_value = "repluser")]
    pg_repl_username: String,
    /// Replication password (visible in the process list: prefer --pg-repl-passwordfile)
    #[arg(long)]
    pg_repl_password: Option<String>,
    /// File holding the replication password
    #[arg(long)]
    pg_repl_passwordfile: Option<PathBuf>,
    /// Role the proxies' --auth-user logs in as to look up other roles' stored passwords
    /// (stolon-proxy --client-tls terminate): the keeper creates it and its lookup function
    /// on the master, as it does the replication role (off by default)
    #[arg(long, requires = "pg_auth_passwordfile")]
    pg_auth_username: Option<String>,
    /// File holding the --pg-auth-username password
    #[arg(long, requires = "pg_auth_username")]
    pg_auth_passwordfile: Option<PathBuf>,
    /// Replication authentication method
    #[arg(long, value_enum, default_value = "md5")]
    pg_repl_auth_method: AuthMethod,
    /// Superuser name (default: the OS user that runs PostgreSQL: the keeper's own user as in
    /// Go stolon, or --pg-os-user when the keeper runs as root)
    #[arg(long)]
    pg_su_username: Option<String>,
    /// Superuser password (visible in the process list: prefer --pg-su-passwordfile)
    #[arg(long)]
    pg_su_password: Option<String>,
    /// File holding the superuser password
    #[arg(long)]
    pg_su_passwordfile: Option<PathBuf>,
    /// Superuser authentication method
    #[arg(long, value_enum, default_value = "md5")]
    pg_su_auth_method: AuthMethod,
    /// Whether this keeper may become master
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true")]
    can_be_master: bool,
    /// Whether this keeper may be a synchronous standby
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true")]
    can_be_synchronous_replica: bool,
    /// Preference among equally up-to-date failover candidates (higher wins)
    #[arg(long, default_value_t = 0)]
    priority: i32,
    /// OS user that runs PostgreSQL when the keeper runs as root
    #[arg(long, default_value = "postgres")]
    pg_os_user: String,
}

/// A password from its file, the environment or (with a warning) the flag, trailing CR/LF
/// removed as Go stolon does (`passwords::trim`). Required unless the method is trust.
fn password(
    role: Role,
    flag_name: &str,
    value: &Option<String>,
    file: &Option<PathBuf>,
    method: AuthMethod,
) -> anyhow::Result<Option<String>> {
    let raw = match file {
        Some(f) => Some(read_password_file(f)?),
        None => {
            if value.is_some() && std::env::args().any(|a| a.starts_with(flag_name)) {
                tracing::warn!("{flag_name} puts the password in the process list: use {flag_name}file or the environment");
            }
            match value {
                Some(v) if v.is_empty() => bail!("{flag_name} is empty"),
                v => v.clone(),
            }
        }
    };
    let Some(raw) = raw else {
        if method == AuthMethod::Trust {
            return Ok(None);
        }
        bail!(
            "{flag_name} or {flag_name}file is required with {} authentication",
            method.as_str()
        );
    };
    let (password, warning) = passwords::trim(role, &raw).map_err(anyhow::Error::msg)?;
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
    Ok(Some(password))
}

/// A password file as it is (its trailing newline is `passwords::trim`'s), with Go's warning
/// when others than its owner may read it.
/// `--pg-auth-username` with the password from `--pg-auth-passwordfile` (trailing CR/LF
/// removed), or none.
fn auth_role(args: &Args) -> anyhow::Result<Option<(String, String)>> {
    let (Some(user), Some(file)) = (&args.pg_auth_username, &args.pg_auth_passwordfile) else {
        return Ok(None);
    };
    let raw = read_password_file(file)?;
    let password = raw.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        bail!("password file {} is empty", file.display());
    }
    for other in [&args.pg_repl_username] {
        if other == user {
            bail!("--pg-auth-username {user} is the replication role: give the proxies' auth role its own name");
        }
    }
    Ok(Some((user.clone(), password.to_string())))
}

fn read_password_file(f: &std::path::Path) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let cannot =
        |e: std::io::Error| anyhow::anyhow!("cannot read password file {}: {e}", f.display());
    let mode = std::fs::metadata(f).map_err(cannot)?.permissions().mode();
    if passwords::too_open(mode) {
        tracing::warn!(file = %f.display(), mode = %format!("{:#o}", mode & 0o777),
            "password file permissions are too open. This file should only be readable to the user executing stolon! Continuing...");
    }
    let raw = std::fs::read_to_string(f).map_err(cannot)?;
    if raw.is_empty() {
        bail!("password file {} is empty", f.display());
    }
    Ok(raw)
}

/// Go stolon's rule for keeper UIDs (cmd/keeper: `[a-z0-9_]+`).
fn valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn keeper_uid(args: &Args, layout: &Layout) -> anyhow::Result<String> {
    if args.id.is_some() {
        tracing::warn!("--id is deprecated: use --uid");
    }
    let given = args.uid.clone().or_else(|| args.id.clone());
    let saved = layout.saved_uid();
    let uid = match (given, saved) {
        (Some(g), Some(s)) if g != s => bail!(
            "keeper uid {g:?} differs from the uid {s:?} saved in {}: a data dir belongs to one keeper",
            layout.dir.display()
        ),
        (Some(g), _) => g,
        (None, Some(s)) => s,
        (None, None) => control::model::short_uid(),
    };
    if !valid_uid(&uid) {
        bail!("invalid keeper uid {uid:?}: only lower-case letters, digits and '_' are allowed");
    }
    layout
        .save_uid(&uid)
        .with_context(|| format!("write the keeper uid into {}", layout.dir.display()))?;
    Ok(uid)
}

/// The superuser's default name, as Go stolon picks it: the OS user running PostgreSQL.
fn default_su_username(pg_os_user: &str) -> String {
    if nix::unistd::geteuid().is_root() {
        return pg_os_user.to_string();
    }
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| pg_os_user.to_string())
}

/// Oldest PostgreSQL major version the keeper manages (its config and recovery handling
/// assume 12+'s standby.signal; 13 is the oldest tested and supported).
const MIN_PG_MAJOR: u32 = 13;

fn pg_version(tools: &Tools) -> PostgresBinaryVersion {
    let out = std::process::Command::new(tools.bin_dir.join("postgres"))
        .arg("--version")
        .output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let (maj, min) = tools::parse_pg_version(&text).unwrap_or((0, 0));
    PostgresBinaryVersion { maj, min }
}

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some(keeper::watchdog::MODE_ARG) {
        keeper::watchdog::run();
        return Ok(());
    }
    let args: Args = parse_with_env("STKEEPER_");
    args.common.init_tracing();
    control::cli::exit_on_panic("stolon-keeper");
    args.common.check().map_err(anyhow::Error::msg)?;
    let layout = Layout::new(&args.data_dir);
    let _lock = if args.disable_data_dir_locking {
        tracing::warn!(
            "--disable-data-dir-locking: nothing stops a second keeper on this data dir"
        );
        keeper::layout::create_private_dir(&layout.dir)?;
        None
    } else {
        let lock = layout.lock()?;
        tracing::info!(data_dir = %layout.dir.display(), "exclusive lock on data dir taken");
        Some(lock)
    };
    let uid = keeper_uid(&args, &layout)?;
    if let Some(db) = layout.adopt_go_state()? {
        tracing::info!(%uid, %db, "adopted a data dir written by Go stolon's keeper");
    }
    let su_password = password(
        Role::Superuser,
        "--pg-su-password",
        &args.pg_su_password,
        &args.pg_su_passwordfile,
        args.pg_su_auth_method,
    )?;
    let repl_password = password(
        Role::Replication,
        "--pg-repl-password",
        &args.pg_repl_password,
        &args.pg_repl_passwordfile,
        args.pg_repl_auth_method,
    )?;
    let auth = auth_role(&args)?;
    let su_user = args
        .pg_su_username
        .clone()
        .unwrap_or_else(|| default_su_username(&args.pg_os_user));
    let su = Login {
        user: &su_user,
        method: args.pg_su_auth_method,
        password: su_password.as_deref(),
    };
    let repl = Login {
        user: &args.pg_repl_username,
        method: args.pg_repl_auth_method,
        password: repl_password.as_deref(),
    };
    if let Some(w) = passwords::check_same_user(su, repl).map_err(anyhow::Error::msg)? {
        tracing::warn!("{w}");
    }
    let tools = Tools {
        bin_dir: tools::find_bin_dir(args.pg_bin_path.as_deref())?,
        os_user: tools::os_user(&args.pg_os_user)?,
    };
    if tools.os_user.is_some() {
        tools.chown(&layout.dir)?;
    }
    let local = Local {
        listen_address: args.pg_listen_address.clone(),
        port: args.pg_port,
        socket_dir: layout.socket_dir().display().to_string(),
        su_user,
        su_auth: args.pg_su_auth_method,
        repl_user: args.pg_repl_username.clone(),
        repl_auth: args.pg_repl_auth_method,
        passfile: layout.passfile().display().to_string(),
    };
    let version = pg_version(&tools);
    if version.maj < MIN_PG_MAJOR {
        bail!(
            "PostgreSQL {}.{} in {} is not supported: the keeper needs PostgreSQL {MIN_PG_MAJOR} or later (give another with --pg-bin-path)",
            version.maj,
            version.min,
            tools.bin_dir.display()
        );
    }
    // One thread: the postmaster's parent-death signal follows the spawning thread, which
    // must live as long as the process.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let store = args.common.open_cluster_store().await.context("cannot set up the store client")?;
        let metrics = keeper::metrics::KeeperMetrics::new();
        let health = Arc::new(std::sync::Mutex::new(keeper::health::HealthState::default()));
        let failsafe: keeper::failsafe::Shared = Default::default();
        let stop_metrics = CancellationToken::new();
        let advertise_address = args.pg_advertise_address.clone().unwrap_or(args.pg_listen_address.clone());
        let mut failsafe_address = String::new();
        if let Some(maddr) = &args.common.metrics_listen_address {
            let l = tokio::net::TcpListener::bind(maddr)
                .await
                .with_context(|| format!("cannot listen on --metrics-listen-address {maddr}"))?;
            let mut registry = control::metrics::root_registry("keeper", &args.common.cluster_name);
            metrics.register(&mut registry);
            // `/health` and the other Patroni paths come from the loop's last view.
            let h = health.clone();
            let f = failsafe.clone();
            let routes: control::metrics::RouteFn = Arc::new(move |path: &str, query: &str| {
                if path.starts_with("/failsafe/") {
                    return keeper::failsafe::answer(&f, path, query);
                }
                let state = h.lock().ok()?.clone();
                state.answer(path, query, std::time::Instant::now())
            });
            failsafe_address = failsafe_address_for(&l.local_addr()?, &advertise_address);
            let unused: control::metrics::HealthFn = Arc::new(|| Ok("ok".to_string()));
            tokio::spawn(control::metrics::serve_with(
                l,
                Arc::new(registry),
                unused,
                Some(routes),
                stop_metrics.clone(),
            ));
        }
        tracing::info!(%uid, data_dir = %args.data_dir.display(), pg = ?version, "stolon-keeper starting");
        let settings = Settings {
            uid,
            layout,
            tools,
            local,
            advertise_address,
            advertise_port: args.pg_advertise_port.unwrap_or(args.pg_port),
            su_password,
            repl_password,
            auth,
            can_be_master: args.can_be_master,
            can_be_sync: args.can_be_synchronous_replica,
            priority: args.priority,
            store,
            metrics,
            health,
            exe: std::env::current_exe()?,
            faults: control::faults::from_env(),
            failsafe,
            failsafe_address,
        };
        let shutdown = CancellationToken::new();
        let mut keeper = tokio::spawn(Keeper::new(settings, version).run(shutdown.clone()));
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        // Supervision: the loop is awaited beside the signals. If it ends or panics, the
        // keeper exits non-zero so a service manager restarts it; it must not stay up
        // publishing while nothing manages PostgreSQL. (The postmaster's parent-death signal
        // and the watchdog fence a master left behind.)
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            ended = &mut keeper => {
                match ended {
                    Ok(Ok(())) => tracing::error!("the keeper's loop ended by itself: exiting"),
                    Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "the keeper's loop failed: exiting"),
                    Err(e) => tracing::error!(error = %e, "the keeper's loop panicked: exiting"),
                }
                std::process::exit(1);
            }
        }
        tracing::info!("stopping PostgreSQL and exiting");
        shutdown.cancel();
        keeper.await??;
        Ok(())
    })
}

/// Where other keepers and the proxies reach this keeper's failsafe answers: the metrics
/// listener's port, on its own address unless that is a wildcard (then PostgreSQL's
/// advertised host).
fn failsafe_address_for(bound: &std::net::SocketAddr, pg_advertise: &str) -> String {
    if bound.ip().is_unspecified() {
        let host = if pg_advertise.contains(':') && !pg_advertise.starts_with('[') {
            format!("[{pg_advertise}]")
        } else {
            pg_advertise.to_string()
        };
        format!("{host}:{}", bound.port())
    } else {
        bound.to_string()
    }
}

#[cfg(test)]
mod failsafe_address_tests {
    #[test]
    fn a_wildcard_listener_is_reached_at_the_advertised_host() {
        let at = |s: &str| s.parse().expect("addr");
        assert_eq!(
            super::failsafe_address_for(&at("127.0.0.1:8080"), "10.0.0.1"),
            "127.0.0.1:8080"
        );
        assert_eq!(
            super::failsafe_address_for(&at("0.0.0.0:8080"), "10.0.0.1"),
            "10.0.0.1:8080"
        );
        assert_eq!(
            super::failsafe_address_for(&at("[::]:8080"), "fd00::1"),
            "[fd00::1]:8080"
        );
    }
}
