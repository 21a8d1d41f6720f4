//! The command-line flags every component shares (stolon's names, store-format.md), their
//! `ST*_` environment variables, opening the store from them, and tracing set-up.

use crate::model::GoDuration;
use crate::store::etcd::{EtcdConfig, EtcdStore};
use crate::store::timed::Timed;
use crate::store::{ClusterStore, Store, StoreError};
use clap::{Args, Parser};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Clone, Debug)]
pub struct CommonArgs {
    /// Name of the cluster (required, except for `stolonctl version`)
    #[arg(long, default_value = "")]
    pub cluster_name: String,
    /// Store backend type. Only etcdv3 is supported; etcd/etcdv2, consul and kubernetes are
    /// refused with the way to migrate
    #[arg(long, default_value = "etcdv3")]
    pub store_backend: String,
    /// Comma-separated list of store endpoints (https:// for TLS)
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    pub store_endpoints: String,
    /// Timeout of every store request (Go duration: 5s, 500ms)
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub store_timeout: Duration,
    /// Store key prefix; the cluster lives under PREFIX/CLUSTER-NAME
    #[arg(long, default_value = "stolon/cluster")]
    pub store_prefix: String,
    /// Certificate file for client identification to the store (PEM; intermediate CA
    /// certificates may follow the client's own, and are sent with it)
    #[arg(long)]
    pub store_cert_file: Option<PathBuf>,
    /// Private key file for client identification to the store (also --store-key, stolon's
    /// deprecated name)
    #[arg(long = "store-key-file", visible_alias = "store-key")]
    pub store_key: Option<PathBuf>,
    /// CA file to verify the store's certificate
    #[arg(long)]
    pub store_ca_file: Option<PathBuf>,
    /// Skip store certificate verification (insecure)
    #[arg(long)]
    pub store_skip_tls_verify: bool,
    /// etcd user for authentication
    #[arg(long)]
    pub store_user: Option<String>,
    /// File holding the etcd user's password (trailing newline ignored)
    #[arg(long)]
    pub store_password_file: Option<PathBuf>,
    /// Address for the Prometheus metrics endpoint (host:port); off when unset. The keeper
    /// also serves its health paths there, and in failsafe mode the other keepers and the
    /// proxies must reach it (docs/operating.md "Failsafe mode")
    #[arg(long)]
    pub metrics_listen_address: Option<String>,
    /// Log level: error, warn, info, debug
    #[arg(long, default_value = "info", value_parser = ["error", "warn", "info", "debug", "trace"])]
    pub log_level: String,
    /// Deprecated (stolon's): the same as --log-level debug
    #[arg(long)]
    pub debug: bool,
    /// Colour in the log output (default: when stderr is a terminal)
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub log_color: Option<bool>,
    /// Log format
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Kubernetes resource kind (kubernetes backend only, which this build does not support)
    #[arg(long)]
    pub kube_resource_kind: Option<String>,
}

/// Backends of the Go stolon that this build refuses, with what to do instead.
fn unsupported_backend(backend: &str) -> Option<String> {
    let name = match backend {
        "etcdv3" => return None,
        "etcd" | "etcdv2" => "the etcd v2 API",
        "consul" => "consul",
        "kubernetes" => "kubernetes",
        other => {
            return Some(format!(
                "unknown store backend {other:?}: the supported one is etcdv3"
            ))
        }
    };
    Some(format!(
        "store backend {backend:?} ({name}) is not supported: the supported one is etcdv3. \
         To migrate, read the clusterdata with the Go stolonctl (`stolonctl clusterdata read`) \
         and write it into etcd v3 with this one (`stolonctl --store-backend etcdv3 \
         clusterdata write -f FILE -y`), then point every component at etcd v3"
    ))
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = GoDuration::parse(s)?;
    if d.is_negative() {
        return Err(format!("duration {s:?} must not be negative"));
    }
    Ok(d.as_std())
}

/// A size as PostgreSQL and Patroni write it: bytes, or a number with kB, MB, GB or TB
/// (1024-based; `k`, `M`, `G`, `T` and `KB` too). `None` when it is not one.
pub fn parse_size(v: &str) -> Option<u64> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" | "k" | "K" => 1 << 10,
        "MB" | "M" => 1 << 20,
        "GB" | "G" => 1 << 30,
        "TB" | "T" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// [`parse_size`] for a flag.
pub fn parse_size_flag(v: &str) -> Result<u64, String> {
    parse_size(v)
        .ok_or_else(|| format!("invalid size {v:?}: bytes, or a number with kB, MB, GB or TB"))
}

/// Reads a secret from a file, dropping one trailing newline. An empty secret is an error
/// naming the file (never its content).
pub fn read_secret_file(path: &std::path::Path) -> Result<String, String> {
    let raw = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read password file {}: {e}", path.display()))?;
    let secret = raw
        .strip_suffix('\n')
        .map(|s| s.strip_suffix('\r').unwrap_or(s))
        .unwrap_or(&raw);
    if secret.is_empty() {
        return Err(format!("password file {} is empty", path.display()));
    }
    Ok(secret.to_string())
}

impl CommonArgs {
    /// The checks Go stolon makes of the shared flags: a cluster name, a supported backend,
    /// kubernetes-only flags only with that backend.
    pub fn check(&self) -> Result<(), String> {
        if self.cluster_name.is_empty() {
            return Err("--cluster-name is required".into());
        }
        self.check_backend()?;
        if self.kube_resource_kind.is_some() {
            return Err(kube_only("--kube-resource-kind"));
        }
        Ok(())
    }

    /// The backend check alone (stolonctl's kube flags are checked by stolonctl).
    pub fn check_backend(&self) -> Result<(), String> {
        unsupported_backend(&self.store_backend).map_or(Ok(()), Err)
    }

    /// The log level in effect: `--debug` is `--log-level debug`.
    pub fn effective_log_level(&self) -> &str {
        if self.debug {
            "debug"
        } else {
            &self.log_level
        }
    }

    pub fn etcd_config(&self) -> Result<EtcdConfig, StoreError> {
        let password = match &self.store_password_file {
            Some(p) => Some(read_secret_file(p).map_err(StoreError::Config)?),
            None => None,
        };
        Ok(EtcdConfig {
            endpoints: self
                .store_endpoints
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(String::from)
                .collect(),
            ca_file: self.store_ca_file.clone(),
            cert_file: self.store_cert_file.clone(),
            key_file: self.store_key.clone(),
            skip_tls_verify: self.store_skip_tls_verify,
            user: self.store_user.clone(),
            password,
            connect_timeout: self.store_timeout,
        })
    }

    /// Connects to the store; every call on it times out after `--store-timeout`.
    pub async fn open_store(&self) -> Result<Arc<dyn Store>, StoreError> {
        self.check().map_err(StoreError::Config)?;
        let etcd = EtcdStore::connect(&self.etcd_config()?).await?;
        Ok(Arc::new(Timed::new(etcd, self.store_timeout)))
    }

    pub async fn open_cluster_store(&self) -> Result<ClusterStore, StoreError> {
        let store = self.open_store().await?;
        Ok(ClusterStore::new(
            store,
            &self.store_prefix,
            &self.cluster_name,
        ))
    }

    /// Sets up tracing once for the process, as text or JSON on stderr.
    pub fn init_tracing(&self) {
        if self.debug {
            eprintln!("--debug is deprecated: use --log-level debug");
        }
        init_tracing_with(
            self.effective_log_level(),
            self.log_format == "json",
            self.log_color,
        );
    }
}

/// For the controllers (keeper, sentinel): a panic in any thread or task exits the process
/// (status 101) after logging it. Their state lives in etcd and the data dir, so a restart by
/// the service manager is safe, while a process that lost a task (the keeper's clusterdata
/// watch, its publisher) could keep acting on a stale view. The proxy does not install it: a
/// panic in one session's task must not cut every other session (its discovery task is
/// supervised on its own).
pub fn exit_on_panic(component: &'static str) {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        // Plain stderr: the logger itself may be what panicked.
        eprintln!("{component}: panic: exiting");
        std::process::exit(101);
    }));
}

/// The message for a kubernetes-only flag given with another backend.
pub fn kube_only(flag: &str) -> String {
    format!(
        "{flag} is only used with --store-backend kubernetes, which this build does not \
         support: remove {flag} and use --store-backend etcdv3"
    )
}

pub fn init_tracing(level: &str, json: bool) {
    init_tracing_with(level, json, None)
}

/// Tracing on stderr; `color` None means "when stderr is a terminal" (stolon's --log-color).
pub fn init_tracing_with(level: &str, json: bool, color: Option<bool>) {
    // `--log-level debug` is about our components, not the gRPC/HTTP2 stack's frames.
    let directives =
        format!("{level},h2=info,tower=info,hyper=info,tonic=info,tokio_postgres=info");
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(directives));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(color.unwrap_or_else(|| std::io::IsTerminal::is_terminal(&std::io::stderr())))
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Adds an environment variable to every flag of `cmd` and its subcommands: `PREFIX` +
/// the flag name upper-cased with `_` (stolon's `STKEEPER_CLUSTER_NAME` and so on).
pub fn with_env_prefix(cmd: clap::Command, prefix: &str) -> clap::Command {
    let cmd = cmd.mut_args(|a| {
        let id = a.get_id().as_str();
        if a.get_long().is_none() || id == "help" || id == "version" {
            return a;
        }
        let name = format!("{prefix}{}", id.to_uppercase().replace('-', "_"));
        a.env(name)
    });
    cmd.mut_subcommands(|sub| with_env_prefix(sub, prefix))
}

/// Parses `T` from the process arguments, with `prefix` environment variables.
pub fn parse_with_env<T: Parser>(prefix: &str) -> T {
    parse_from_with_env(prefix, std::env::args_os())
}

pub fn parse_from_with_env<T, I, A>(prefix: &str, args: I) -> T
where
    T: Parser,
    I: IntoIterator<Item = A>,
    A: Into<std::ffi::OsString> + Clone,
{
    let matches = with_env_prefix(T::command(), prefix).get_matches_from(args);
    match T::from_arg_matches(&matches) {
        Ok(v) => v,
        Err(e) => e.exit(),
    }
}

/// Like [`parse_from_with_env`] but returns the error instead of exiting (tests).
pub fn try_parse_from_with_env<T, I, A>(prefix: &str, args: I) -> Result<T, clap::Error>
where
    T: Parser,
    I: IntoIterator<Item = A>,
    A: Into<std::ffi::OsString> + Clone,
{
    let matches = with_env_prefix(T::command(), prefix).try_get_matches_from(args)?;
    T::from_arg_matches(&matches)
}
