//! The etcd v3 implementation of [`Store`] (crate `etcd-client`), with TLS, client
//! certificates and user/password authentication.

use super::*;
use etcd_client::{
    Client, CompactionOptions, Compare as EtcdCompare, CompareOp, ConnectOptions, EventType,
    GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, SslConnectorBuilder, Txn, TxnOp,
    WatchOptions,
};
use openssl::pkey::PKey;
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use openssl::x509::X509;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// How to reach etcd. Secrets (the password) are never logged: `Debug` redacts them.
#[derive(Clone, Default)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub skip_tls_verify: bool,
    pub user: Option<String>,
    pub password: Option<String>,
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    /// Each lease's keep-alive stream, kept between renewals: opening one per renewal cost
    /// a stream set-up and an extra round trip each time (40-90 ms on a loaded machine, on
    /// the path of every keeper and proxy report), and CPU in every idle proxy.
    keepers: Arc<std::sync::Mutex<KeptStreams>>,
}

type KeptStreams = HashMap<LeaseId, (LeaseKeeper, LeaseKeepAliveStream)>;

/// One renewal on a kept stream: `Ok(false)` if etcd answered that the lease is gone.
async fn renew(
    keeper: &mut LeaseKeeper,
    stream: &mut LeaseKeepAliveStream,
) -> std::result::Result<bool, etcd_client::Error> {
    keeper.keep_alive().await?;
    match stream.message().await? {
        Some(resp) => Ok(resp.ttl() > 0),
        None => Err(etcd_client::Error::LeaseKeepAliveError(
            "keep-alive stream ended".into(),
        )),
    }
}

fn unavailable(e: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(Cause::new(e))
}

/// Attempts for a request that never connected. The client balances requests over the
/// endpoints and keeps sending some to a dead member ("tcp connect error"), for seconds: a
/// keeper then missed its info writes for a failInterval and was failed. Such a request
/// reached no etcd, so sending it again (the balancer picks again) is safe, also for a
/// compare-and-swap.
const CONNECT_ATTEMPTS: usize = 4;

/// The request failed while connecting: an `Unavailable` status caused by a refused or
/// unroutable TCP connect. These socket errors come from connect(2) only, so the request
/// cannot have reached etcd. (A reset or a timeout may come after the request was sent,
/// and is not resent.)
pub(crate) fn never_connected(e: &etcd_client::Error) -> bool {
    let etcd_client::Error::GRpcStatus(status) = e else {
        return false;
    };
    if status.code() != tonic::Code::Unavailable {
        return false;
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable
                    | std::io::ErrorKind::AddrNotAvailable
            );
        }
        cause = c.source();
    }
    false
}

/// The keep-alive answered TTL 0: the lease is gone. The client reports this with its own
/// fixed message and no code (etcd-client 0.21, rpc/lease.rs), so the text is all there is.
fn lease_gone_on_keep_alive(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::LeaseKeepAliveError(m) if m == "lease not found")
}

/// etcd answered NotFound ("etcdserver: requested lease not found").
fn not_found(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::NotFound)
}

async fn retry_unconnected<T, F, Fut>(mut f: F) -> std::result::Result<T, etcd_client::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
{
    let mut attempt = 1;
    loop {
        match f().await {
            Err(e) if attempt < CONNECT_ATTEMPTS && never_connected(&e) => attempt += 1,
            r => return r,
        }
    }
}

fn read_file(what: &str, path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| StoreError::Config(format!("cannot read {what} {}: {e}", path.display())))
}

impl EtcdConfig {
    fn tls_wanted(&self) -> bool {
        self.ca_file.is_some()
            || self.cert_file.is_some()
            || self.skip_tls_verify
            || self.endpoints.iter().any(|e| e.starts_with("https://"))
    }

    /// An endpoint without a scheme is dialled with TLS when any TLS option is given (as
    /// etcd-client does).
    fn endpoint_urls(&self) -> Vec<String> {
        let scheme = if self.tls_wanted() { "https" } else { "http" };
        (self.endpoints.iter())
            .map(|e| match e.contains("://") {
                true => e.clone(),
                false => format!("{scheme}://{e}"),
            })
            .collect()
    }

    fn connect_options(&self) -> ConnectOptions {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout.max(Duration::from_millis(100)))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
        if let Some(user) = &self.user {
            let password = self.password.clone().unwrap_or_default();
            opts = opts.with_user(user.clone(), password);
        }
        opts
    }

    /// The TLS set-up (used for https:// endpoints only): the system's CAs plus
    /// `--store-ca-file`, a client certificate, and with `--store-skip-tls-verify` no
    /// verification of the server at all (as Go stolon).
    fn tls_config(&self) -> Result<SslConnectorBuilder> {
        let ssl = |e: openssl::error::ErrorStack| StoreError::Config(format!("TLS set-up: {e}"));
        let mut tls = SslConnector::builder(SslMethod::tls_client()).map_err(ssl)?;
        // gRPC needs HTTP/2 negotiated by ALPN: without it etcd answers GONE.
        tls.set_alpn_protos(b"\x02h2").map_err(ssl)?;
        if let Some(ca) = &self.ca_file {
            let pem = read_file("CA file", ca)?;
            let cert = X509::from_pem(&pem).map_err(|e| {
                StoreError::Config(format!("CA file {} is not PEM: {e}", ca.display()))
            })?;
            tls.cert_store_mut().add_cert(cert).map_err(ssl)?;
        }
        match (&self.cert_file, &self.key_file) {
            (Some(cert_file), Some(key_file)) => {
                let pem = read_file("certificate file", cert_file)?;
                let not_pem = |why: String| {
                    let path = cert_file.display();
                    StoreError::Config(format!("certificate file {path} is not PEM: {why}"))
                };
                // The client certificate first, then any intermediates it needs (as Go's
                // tls.LoadX509KeyPair reads the file).
                let mut chain = X509::stack_from_pem(&pem)
                    .map_err(|e| not_pem(e.to_string()))?
                    .into_iter();
                let cert = chain
                    .next()
                    .ok_or_else(|| not_pem("no certificate".into()))?;
                for intermediate in chain {
                    tls.add_extra_chain_cert(intermediate).map_err(ssl)?;
                }
                let key = read_file("key file", key_file)?;
                let key = PKey::private_key_from_pem(&key).map_err(|e| {
                    let path = key_file.display();
                    StoreError::Config(format!("key file {path} is not a PEM private key: {e}"))
                })?;
                tls.set_certificate(&cert).map_err(ssl)?;
                tls.set_private_key(&key).map_err(ssl)?;
            }
            (None, None) => {}
            _ => {
                return Err(StoreError::Config(
                    "--store-cert-file and --store-key-file must be given together".into(),
                ))
            }
        }
        if self.skip_tls_verify {
            tracing::warn!("--store-skip-tls-verify: the store's certificate is not verified");
            tls.set_verify(SslVerifyMode::NONE);
        }
        Ok(tls)
    }
}

impl EtcdStore {
    /// The kept keep-alive streams; held only to take one out or put it back, never
    /// across an await.
    fn kept(&self) -> std::sync::MutexGuard<'_, KeptStreams> {
        self.keepers.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub async fn connect(config: &EtcdConfig) -> Result<Self> {
        if config.endpoints.is_empty() {
            return Err(StoreError::Config("no store endpoints given".into()));
        }
        let channel = crate::etcd_channel::NoDelay {
            tls: config.tls_config()?,
        };
        let opts = Some(config.connect_options());
        let client = Client::connect_with_balanced_channel(config.endpoint_urls(), opts, channel)
            .await
            .map_err(unavailable)?;
        Ok(EtcdStore {
            client,
            keepers: Default::default(),
        })
    }
}

fn convert_kv(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    }
}

fn header_revision(h: Option<&etcd_client::ResponseHeader>) -> i64 {
    h.map(|h| h.revision()).unwrap_or(0)
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let resp = retry_unconnected(|| {
            let mut kv = self.client.kv_client();
            async move { kv.get(key, None).await }
        })
        .await
        .map_err(unavailable)?;
        Ok(resp.kvs().first().map(convert_kv))
    }

    async fn get_prefix(&self, prefix: &str) -> Result<Range> {
        let resp = retry_unconnected(|| {
            let mut kv = self.client.kv_client();
            async move { kv.get(prefix, Some(GetOptions::new().with_prefix())).await }
        })
        .await
        .map_err(unavailable)?;
        Ok(Range {
            kvs: resp.kvs().iter().map(convert_kv).collect(),
            revision: header_revision(resp.header()),
        })
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnResponse> {
        // etcd refuses the whole txn when a put names a lease that is gone.
        let lease = ops.iter().find_map(|op| match op {
            Op::Put { lease, .. } => *lease,
            Op::Delete { .. } => None,
        });
        let when: Vec<EtcdCompare> = compares
            .into_iter()
            .map(|c| match c {
                Compare::ModRevision { key, revision } => {
                    EtcdCompare::mod_revision(key, CompareOp::Equal, revision)
                }
                Compare::CreateRevision { key, revision } => {
                    EtcdCompare::create_revision(key, CompareOp::Equal, revision)
                }
            })
            .collect();
        let then: Vec<TxnOp> = ops
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value, lease } => {
                    let opts = lease.map(|l| PutOptions::new().with_lease(l));
                    TxnOp::put(key, value, opts)
                }
                Op::Delete { key } => TxnOp::delete(key, None),
            })
            .collect();
        let txn = Txn::new().when(when).and_then(then);
        let resp = retry_unconnected(|| {
            let mut kv = self.client.kv_client();
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await
        .map_err(|e| match lease {
            Some(lease) if not_found(&e) => {
                // Gone: its kept keep-alive stream goes too.
                self.kept().remove(&lease);
                StoreError::LeaseNotFound(lease)
            }
            _ => unavailable(e),
        })?;
        Ok(TxnResponse {
            succeeded: resp.succeeded(),
            revision: header_revision(resp.header()),
        })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let resp = retry_unconnected(|| {
            let mut leases = self.client.lease_client();
            async move { leases.grant(secs, None).await }
        })
        .await
        .map_err(unavailable)?;
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        // Taken out while in use: a renewal cut short (a timeout) drops its stream, and
        // the next one opens a new stream.
        let kept = self.kept().remove(&lease);
        if let Some((mut keeper, mut stream)) = kept {
            match renew(&mut keeper, &mut stream).await {
                Ok(true) => {
                    self.kept().insert(lease, (keeper, stream));
                    return Ok(());
                }
                Ok(false) => return Err(StoreError::LeaseNotFound(lease)),
                // The stream broke (a member restarted): open another below.
                Err(e) => tracing::debug!(error = %e, "lease keep-alive stream lost"),
            }
        }
        // Opening the stream sends one request and checks the answered TTL.
        let sent = retry_unconnected(|| {
            let mut leases = self.client.lease_client();
            async move { leases.keep_alive(lease).await }
        });
        match sent.await {
            Ok(kept) => {
                self.kept().insert(lease, kept);
                Ok(())
            }
            Err(e) if lease_gone_on_keep_alive(&e) || not_found(&e) => {
                Err(StoreError::LeaseNotFound(lease))
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.kept().remove(&lease);
        match self.client.lease_client().revoke(lease).await {
            Ok(_) => Ok(()),
            Err(e) if not_found(&e) => Err(StoreError::LeaseNotFound(lease)),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn watch_prefix(&self, prefix: &str, start_revision: i64) -> Result<WatchStream> {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(start_revision)
            .with_progress_notify();
        let stream = self
            .client
            .watch_client()
            .watch(prefix, Some(opts))
            .await
            .map_err(unavailable)?;
        Ok(Box::pin(futures::stream::unfold(Some(stream), next_batch)))
    }

    async fn compact(&self, revision: i64) -> Result<()> {
        self.client
            .kv_client()
            .compact(revision, Some(CompactionOptions::new().with_physical()))
            .await
            .map(|_| ())
            .map_err(unavailable)
    }
}

type EtcdWatch = etcd_client::WatchStream;

/// One step of the watch stream: the next batch with events or progress, or the end.
async fn next_batch(state: Option<EtcdWatch>) -> Option<(Result<WatchBatch>, Option<EtcdWatch>)> {
    let mut stream = state?;
    loop {
        let resp = match stream.message().await {
            Ok(Some(resp)) => resp,
            Ok(None) => return None,
            Err(e) => return Some((Err(unavailable(e)), None)),
        };
        if resp.canceled() {
            let err = if resp.compact_revision() > 0 {
                StoreError::Compacted {
                    compact_revision: resp.compact_revision(),
                }
            } else {
                StoreError::Unavailable(format!("watch canceled: {}", resp.cancel_reason()).into())
            };
            return Some((Err(err), None));
        }
        if resp.created() && resp.events().is_empty() {
            continue;
        }
        let events = resp
            .events()
            .iter()
            .filter_map(|e| {
                let kv = convert_kv(e.kv()?);
                let kind = match e.event_type() {
                    EventType::Put => EventKind::Put,
                    EventType::Delete => EventKind::Delete,
                };
                Some(Event { kind, kv })
            })
            .collect();
        let batch = WatchBatch {
            events,
            header_revision: header_revision(resp.header()),
        };
        return Some((Ok(batch), Some(stream)));
    }
}
