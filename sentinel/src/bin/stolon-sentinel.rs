//! `stolon-sentinel`: elects a leader among the sentinels; the leader computes the cluster
//! view from keeper and proxy infos and writes it to `P/clusterdata`. Every flag can also
//! come from `STSENTINEL_<FLAG>`.

use anyhow::Context;
use clap::Parser;
use control::cli::{parse_duration, parse_with_env, CommonArgs};
use control::model::{decode, ClusterSpec};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use stolon_sentinel::daemon::{Config, Metrics, Sentinel};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Computes and publishes the cluster view (master election, standbys, proxy fencing) as
/// stolon-sentinel does. Run two or more; one is elected leader through the store, the
/// others wait and take over when it stops or is cut off.
#[derive(Parser, Debug)]
#[command(name = "stolon-sentinel", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// A JSON cluster spec file: creates the cluster with it when no clusterdata exists
    /// (never overwrites an existing cluster)
    #[arg(long)]
    initial_cluster_spec: Option<PathBuf>,
    /// This sentinel's UID in the store (default: random)
    #[arg(long)]
    uid: Option<String>,
    /// TTL of the leader's session: a dead or frozen leader is replaced after this long
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    leader_ttl: Duration,
}

fn read_spec(path: &PathBuf) -> anyhow::Result<ClusterSpec> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read --initial-cluster-spec {}", path.display()))?;
    let doc: serde_json::Value = decode("cluster spec", &bytes)
        .with_context(|| format!("invalid --initial-cluster-spec {}", path.display()))?;
    // Read as Go stolon reads it: keys matched without regard to case.
    let (spec, unknown): (ClusterSpec, _) = control::model::spec_from_value(doc)
        .with_context(|| format!("invalid --initial-cluster-spec {}", path.display()))?;
    for key in unknown {
        tracing::warn!(%key, file = %path.display(), "unknown cluster spec key: ignored");
    }
    spec.validate()
        .with_context(|| format!("invalid --initial-cluster-spec {}", path.display()))?;
    Ok(spec)
}

fn main() -> anyhow::Result<()> {
    let args: Args = parse_with_env("STSENTINEL_");
    args.common.init_tracing();
    control::cli::exit_on_panic("stolon-sentinel");
    args.common.check().map_err(anyhow::Error::msg)?;
    let initial_cluster_spec = args
        .initial_cluster_spec
        .as_ref()
        .map(read_spec)
        .transpose()?;
    let uid = args.uid.clone().unwrap_or_else(control::model::short_uid);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let store = args
            .common
            .open_cluster_store()
            .await
            .context("cannot set up the store client")?;
        let shutdown = CancellationToken::new();
        let metrics = Arc::new(Metrics::default());
        if let Some(maddr) = &args.common.metrics_listen_address {
            let l = tokio::net::TcpListener::bind(maddr)
                .await
                .with_context(|| format!("cannot listen on --metrics-listen-address {maddr}"))?;
            let m = metrics.clone();
            let health: control::metrics::HealthFn = Arc::new(move || {
                Ok(if m.is_leader.get() == 1 {
                    "leader"
                } else {
                    "follower"
                }
                .to_string())
            });
            let mut registry =
                control::metrics::root_registry("sentinel", &args.common.cluster_name);
            metrics.register(&mut registry);
            let registry = Arc::new(registry);
            tokio::spawn(control::metrics::serve(
                l,
                registry,
                health,
                shutdown.clone(),
            ));
        }
        tracing::info!(%uid, cluster = %args.common.cluster_name, "stolon-sentinel starting");
        let sentinel = Sentinel::new(
            Config {
                uid,
                store,
                initial_cluster_spec,
                leader_ttl: args.leader_ttl,
                store_timeout: args.common.store_timeout,
                faults: control::faults::from_env(),
            },
            metrics,
        );
        let mut task = tokio::spawn(sentinel.run(shutdown.clone()));
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        // Supervision: a loop that ends or panics exits the process non-zero, so a service
        // manager restarts it and its leader lease lapses; it never stays up as a leader
        // that decides nothing.
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            ended = &mut task => {
                match ended {
                    Ok(()) => tracing::error!("the sentinel's loop ended by itself: exiting"),
                    Err(e) => tracing::error!(error = %e, "the sentinel's loop panicked: exiting"),
                }
                std::process::exit(1);
            }
        }
        tracing::info!("stopping: resigning leadership");
        shutdown.cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
        Ok(())
    })
}
