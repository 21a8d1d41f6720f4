//! `stolonctl`: administers a cluster through the store. Every flag can also come from
//! `STOLONCTL_<FLAG>`.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use control::cli::{parse_duration, parse_with_env, CommonArgs};
use control::model::SwitchoverPhase;
use control::store::ClusterStore;
use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use stolonctl::{self as ctl, status};

/// Administers a stolon cluster: create it, show its state, change its spec, fail or remove
/// keepers, switch the master over, promote a standby cluster.
#[derive(Parser, Debug)]
#[command(name = "stolonctl", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Path to a kubeconfig file (kubernetes backend only, which this build does not support)
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context (kubernetes backend only)
    #[arg(long)]
    kube_context: Option<String>,
    /// Kubernetes namespace (kubernetes backend only)
    #[arg(long)]
    kube_namespace: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

impl Args {
    /// The kubernetes-only flags are refused with another backend, as the resource kind is.
    fn check_kube_flags(&self) -> Result<()> {
        for (flag, given) in [
            ("--kubeconfig", self.kubeconfig.is_some()),
            ("--kube-context", self.kube_context.is_some()),
            ("--kube-namespace", self.kube_namespace.is_some()),
        ] {
            if given {
                bail!(control::cli::kube_only(flag));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug)]
enum Format {
    Text,
    Json,
}

/// `--format` as Go stolon's status reads it: empty (its default) or `text` is text.
fn parse_format(s: &str) -> Result<Format, String> {
    match s {
        "" | "text" => Ok(Format::Text),
        "json" => Ok(Format::Json),
        other => Err(format!(
            "unsupported output format {other:?}: text (or empty) or json"
        )),
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create the cluster from a spec (JSON argument, -f FILE, or -f - for stdin); over an
    /// existing cluster it asks first (or takes -y), as Go stolon does
    Init {
        spec: Option<String>,
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        /// Replace an existing cluster (the default, as in Go stolon; kept for old scripts)
        #[arg(long, hide = true)]
        force: bool,
        /// Replace an existing cluster; with --overwrite=false an existing one is kept and
        /// init exits 0
        #[arg(short = 'o', long, default_value_t = true, action = clap::ArgAction::Set,
              num_args = 0..=1, default_missing_value = "true")]
        overwrite: bool,
        /// Do not ask for confirmation
        #[arg(short = 'y', long = "yes")]
        yes: bool,
    },
    /// Show sentinels, proxies, keepers, the master and the replication tree
    Status {
        /// Output format: text (the default; an empty value too, as in Go stolon) or json
        #[arg(short = 'f', long = "format", value_parser = parse_format, default_value = "text")]
        format: Format,
    },
    /// Print the cluster spec
    Spec {
        /// Fill in every default
        #[arg(long)]
        defaults: bool,
    },
    /// Replace the spec, or with -p apply a JSON merge patch to it
    Update {
        spec: Option<String>,
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        #[arg(short = 'p', long = "patch")]
        patch: bool,
    },
    /// Force a keeper to be considered failed (its master fails over)
    Failkeeper { uid: String },
    /// Remove a keeper and its db from the cluster (never the master's)
    Removekeeper { uid: String },
    /// Promote a standby cluster to a master cluster
    Promote {
        #[arg(short = 'y', long = "yes")]
        yes: bool,
    },
    /// Read or write the raw clusterdata document
    Clusterdata {
        #[command(subcommand)]
        op: ClusterdataOp,
    },
    /// Planned master change to a standby (default: the most advanced healthy one)
    Switchover {
        #[arg(long = "to")]
        to: Option<String>,
        /// Follow it until the proxies route to the new master
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Maintenance pause: the sentinel keeps observing and reporting but changes no topology
    /// (no failover, no switchover, no standby rebuilt, no keeper removed); keepers keep
    /// managing PostgreSQL. Ends with `resume` or, given --for, by itself
    Pause {
        /// End the pause by itself after this long (Go duration: 30m, 2h)
        #[arg(long = "for", value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Why (shown by `status`)
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// End a maintenance pause
    Resume,
    /// Print the version
    Version,
    /// Go stolon's command; not provided: refused with what to do instead
    #[command(hide = true)]
    Setkeeperpriority {
        #[arg(num_args = 0.., allow_hyphen_values = true, trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Go stolon's command; not provided: refused with what to do instead
    #[command(hide = true)]
    Register {
        #[arg(num_args = 0.., allow_hyphen_values = true, trailing_var_arg = true)]
        args: Vec<String>,
    },
}

/// What a stolon user's script gets for a Go command this stolonctl does not have: what
/// to do instead (docs/differences.md), not a bare "unrecognized subcommand".
fn not_provided(cmd: &Cmd) -> Option<&'static str> {
    match cmd {
        Cmd::Setkeeperpriority { .. } => Some(
            "setkeeperpriority is not provided: a keeper's priority comes from its --priority \
             flag (restart the keeper to change it) and only breaks ties among equally \
             up-to-date failover candidates; to move the master to a keeper, use \
             `stolonctl switchover --to <keeper uid>`",
        ),
        Cmd::Register { .. } => Some(
            "register is not provided: it registers keepers as Consul services, and only the \
             etcdv3 store is supported; point health checks at each keeper's /primary, \
             /replica and /health endpoints on --metrics-listen-address instead",
        ),
        _ => None,
    }
}

#[derive(Subcommand, Debug)]
enum ClusterdataOp {
    Read {
        #[arg(long)]
        pretty: bool,
    },
    Write {
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        #[arg(short = 'y', long = "yes")]
        yes: bool,
    },
}

/// Asks on stdin (a terminal or a pipe, as Go stolon's askConfirmation); `yes`/`y` go on;
/// `no`/`n` prints "exiting" and ends the command with exit status 0, as Go's does; end of
/// input is an error. With -y nothing is asked.
fn confirm(what: &str, yes: bool) -> Result<()> {
    if yes {
        return Ok(());
    }
    let stdin = std::io::stdin();
    loop {
        eprint!("{what}. Are you sure you want to continue? [yes/no] ");
        let mut line = String::new();
        if stdin.read_line(&mut line)? == 0 {
            let hint = if stdin.is_terminal() {
                ""
            } else {
                " (no answer on stdin)"
            };
            bail!("not confirmed{hint}: pass -y to go on without asking");
        }
        match line.trim().to_ascii_lowercase().as_str() {
            "y" | "yes" => return Ok(()),
            "n" | "no" => {
                println!("exiting");
                std::process::exit(0);
            }
            _ => eprintln!("please answer yes or no"),
        }
    }
}

/// `--log-level` as given; stolonctl's own default is warn, so a plain command prints only
/// its output (the flag's default of info is for the daemons).
fn log_level(args: &Args) -> String {
    let given = std::env::args().any(|a| a == "--log-level" || a.starts_with("--log-level="))
        || std::env::var_os("STOLONCTL_LOG_LEVEL").is_some();
    if args.common.debug {
        "debug".into()
    } else if given {
        args.common.log_level.clone()
    } else {
        "warn".into()
    }
}

fn main() {
    let args: Args = parse_with_env("STOLONCTL_");
    if let Cmd::Version = args.cmd {
        println!("stolonctl {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    if let Some(why) = not_provided(&args.cmd) {
        eprintln!("stolonctl: {why}");
        std::process::exit(1);
    }
    control::cli::init_tracing_with(&log_level(&args), false, args.common.log_color);
    if let Err(e) = args.check_kube_flags() {
        eprintln!("stolonctl: {e:#}");
        std::process::exit(1);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stolonctl: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("stolonctl: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    let store = args
        .common
        .open_cluster_store()
        .await
        .context("cannot set up the store client (check --store-endpoints)")?;
    match args.cmd {
        Cmd::Init {
            spec,
            file,
            force: _,
            overwrite,
            yes,
        } => {
            let input = match (spec.as_deref(), file.as_deref()) {
                (None, None) => serde_json::json!({"initMode": "new"}),
                (s, f) => ctl::read_spec_input(s, f)?,
            };
            let exists = ctl::cluster_exists(&store).await?;
            if exists && !overwrite {
                println!("Exiting as DB is already initialized");
                return Ok(());
            }
            if exists {
                println!("WARNING: The current cluster data will be removed");
                println!("WARNING: The databases managed by the keepers will be overwritten depending on the provided cluster spec.");
                confirm("The existing cluster is replaced", yes)?;
            }
            let uid = ctl::init(&store, input, exists).await?;
            println!("cluster {uid} created at {}", store.prefix());
        }
        Cmd::Status { format } => {
            let st = status::status(&store).await?;
            match format {
                Format::Text => print!("{}", status::render_text(&st)),
                Format::Json => println!("{}", serde_json::to_string_pretty(&st)?),
            }
        }
        Cmd::Spec { defaults } => {
            let (cd, _) = ctl::cluster_data(&store).await?;
            let spec = if defaults {
                cd.cluster.spec.with_defaults()
            } else {
                cd.cluster.spec
            };
            println!("{}", serde_json::to_string_pretty(&spec)?);
        }
        Cmd::Update { spec, file, patch } => {
            let input = ctl::read_spec_input(spec.as_deref(), file.as_deref())?;
            let new = ctl::update(&store, input, patch).await?;
            println!("{}", serde_json::to_string_pretty(&new)?);
        }
        Cmd::Failkeeper { uid } => {
            ctl::failkeeper(&store, &uid).await?;
            println!("keeper {uid} marked failed for one sentinel round");
        }
        Cmd::Removekeeper { uid } => {
            ctl::removekeeper(&store, &uid).await?;
            println!("keeper {uid} removed");
        }
        Cmd::Promote { yes } => {
            let (cd, _) = ctl::cluster_data(&store).await?;
            if cd.cluster.spec.role() != control::model::ClusterRole::Standby {
                // Go stolon's promote is a no-op here, and scripts rely on its exit 0.
                println!("the cluster is already a master cluster: nothing to promote");
                return Ok(());
            }
            confirm(
                "the standby cluster stops following its primary and takes writes",
                yes,
            )?;
            ctl::promote(&store).await?;
            println!("standby cluster promoted");
        }
        Cmd::Pause { duration, reason } => {
            let d = duration.map(control::model::GoDuration::from_std);
            let p = ctl::pause(&store, d, &reason).await?;
            match p.until {
                Some(u) => println!("cluster paused until {u}: no failover, switchover or standby change until then or `stolonctl resume`"),
                None => println!("cluster paused: no failover, switchover or standby change until `stolonctl resume`"),
            }
        }
        Cmd::Resume => {
            if ctl::resume(&store).await? {
                println!("cluster resumed");
            } else {
                println!("the cluster was not paused");
            }
        }
        Cmd::Clusterdata { op } => clusterdata(&store, op).await?,
        Cmd::Switchover { to, wait, timeout } => switchover(&store, to, wait, timeout).await?,
        Cmd::Version | Cmd::Setkeeperpriority { .. } | Cmd::Register { .. } => {
            unreachable!("handled before the store is opened")
        }
    }
    Ok(())
}

async fn clusterdata(store: &ClusterStore, op: ClusterdataOp) -> Result<()> {
    match op {
        ClusterdataOp::Read { pretty } => {
            let (cd, _) = ctl::cluster_data(store).await?;
            if pretty {
                println!("{}", serde_json::to_string_pretty(&cd)?);
            } else {
                println!("{}", String::from_utf8_lossy(&cd.to_json()?));
            }
        }
        ClusterdataOp::Write { file, yes } => {
            let mut bytes = Vec::new();
            match file.as_deref().filter(|f| f.as_os_str() != "-") {
                Some(f) => {
                    bytes =
                        std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?
                }
                None => drop(std::io::stdin().read_to_end(&mut bytes)?),
            }
            // As Go stolon: no question (the document may come on stdin); over an existing
            // clusterdata only with --yes.
            if ctl::write_cluster_data(store, &bytes, yes).await? {
                println!("WARNING: The current cluster data was removed");
            }
            println!("successfully wrote cluster data into the new store");
        }
    }
    Ok(())
}

async fn switchover(
    store: &ClusterStore,
    to: Option<String>,
    wait: bool,
    timeout: Duration,
) -> Result<()> {
    let target = match to {
        Some(t) => t,
        None => {
            let (cd, _) = ctl::cluster_data(store).await?;
            ctl::default_target(&cd).context("no healthy, converged standby to switch over to")?
        }
    };
    let req = ctl::request_switchover(store, &target).await?;
    println!("switchover to keeper {target} requested");
    if !wait {
        return Ok(());
    }
    let started = Instant::now();
    let mut last_phase = None;
    let mut fenced_at: Option<Instant> = None;
    loop {
        anyhow::ensure!(
            started.elapsed() < timeout,
            "switchover not finished within {timeout:?}"
        );
        let (cd, _) = ctl::cluster_data(store).await?;
        let proxy_master = cd.proxy.spec.master_db_uid.clone();
        if proxy_master.is_empty() && fenced_at.is_none() {
            fenced_at = Some(Instant::now());
            println!(
                "{:>7.2}s proxies fenced (no master routed)",
                started.elapsed().as_secs_f64()
            );
        }
        if let Some(st) = cd
            .cluster
            .status
            .switchover
            .as_ref()
            .filter(|s| s.requested_at == req.requested_at)
        {
            if last_phase != Some(st.phase) {
                println!(
                    "{:>7.2}s phase {:?} {}",
                    started.elapsed().as_secs_f64(),
                    st.phase,
                    st.reason
                );
                last_phase = Some(st.phase);
            }
            match st.phase {
                SwitchoverPhase::Failed => bail!("switchover failed: {}", st.reason),
                SwitchoverPhase::Completed if proxy_master == st.target_db_uid => {
                    let gap = fenced_at.map(|t| t.elapsed()).unwrap_or_default();
                    println!(
                        "{:>7.2}s proxies route to {} on keeper {target}; no master routed for {:.2}s",
                        started.elapsed().as_secs_f64(),
                        st.target_db_uid,
                        gap.as_secs_f64()
                    );
                    return Ok(());
                }
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
