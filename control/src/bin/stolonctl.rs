//! `stolonctl`: administers a cluster through the store. Every flag can also come from
//! `STOLONCTL_<FLAG>`.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use control::cli::{parse_duration, parse_with_env, CommonArgs};
use control::ctl::{self, status};
use control::model::SwitchoverPhase;
use control::store::ClusterStore;
use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Administers a stolon cluster: create it, show its state, change its spec, fail or remove
/// keepers, switch the master over, promote a standby cluster.
#[derive(Parser, Debug)]
#[command(name = "stolonctl", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create the cluster from a spec (JSON argument, -f FILE, or - for stdin)
    Init {
        spec: Option<String>,
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        /// Replace an existing cluster (needs -y)
        #[arg(long)]
        force: bool,
        /// Do not ask for confirmation
        #[arg(short = 'y', long = "yes")]
        yes: bool,
    },
    /// Show sentinels, proxies, keepers, the master and the replication tree
    Status {
        #[arg(short = 'f', long = "format", value_enum, default_value = "text")]
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
    /// Print the version
    Version,
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

/// Asks on a terminal; without one (scripts, CI) `-y` is required.
fn confirm(what: &str, yes: bool) -> Result<()> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        bail!("{what}: pass -y to confirm (no terminal to ask on)");
    }
    eprint!("{what}. Continue? [y/N] ");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    if line.trim().eq_ignore_ascii_case("y") {
        Ok(())
    } else {
        bail!("aborted")
    }
}

fn main() {
    let args: Args = parse_with_env("STOLONCTL_");
    if let Cmd::Version = args.cmd {
        println!("stolonctl {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    control::cli::init_tracing(
        &std::env::var("STOLONCTL_LOG_LEVEL").unwrap_or("warn".into()),
        false,
    );
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
            force,
            yes,
        } => {
            let input = match (spec.as_deref(), file.as_deref()) {
                (None, None) => serde_json::json!({"initMode": "new"}),
                (s, f) => ctl::read_spec_input(s, f)?,
            };
            if force {
                confirm("this replaces the existing cluster's clusterdata", yes)?;
            }
            let uid = ctl::init(&store, input, force).await?;
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
            confirm(
                "the standby cluster stops following its primary and takes writes",
                yes,
            )?;
            ctl::promote(&store).await?;
            println!("standby cluster promoted");
        }
        Cmd::Clusterdata { op } => clusterdata(&store, op).await?,
        Cmd::Switchover { to, wait, timeout } => switchover(&store, to, wait, timeout).await?,
        Cmd::Version => unreachable!("handled before the store is opened"),
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
                println!("{}", String::from_utf8_lossy(&cd.to_json()));
            }
        }
        ClusterdataOp::Write { file, yes } => {
            let mut bytes = Vec::new();
            match &file {
                Some(f) => {
                    bytes =
                        std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?
                }
                None => drop(std::io::stdin().read_to_end(&mut bytes)?),
            }
            confirm("this overwrites the cluster's clusterdata", yes)?;
            ctl::write_cluster_data(store, &bytes).await?;
            println!("clusterdata written");
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
