//! The gRPC channel to etcd: etcd-client's OpenSSL transport, with Nagle's algorithm off.
//!
//! etcd-client's OpenSSL transport (its only TLS stack that can skip verification, which
//! `--store-skip-tls-verify` needs; it carries plaintext endpoints too) dials with hyper's
//! connector left at its default, TCP_NODELAY off. A gRPC request goes out in more than one
//! segment, the second waits for the server's delayed ACK, and every etcd call took 20-50 ms
//! on loopback where etcd handled it in 0.4 ms (its `grpc_server_handling_seconds`). Each
//! master change waits for several store round trips in a row (the sentinel's writes, every
//! proxy's acknowledgement, the keepers' reports), so this is the same channel with every
//! connection's Nagle off: one balanced set of lazily connected endpoints, an endpoint that
//! failed a call put behind the healthy ones for a back-off, a buffer making it cloneable.

use etcd_client::{BalancedChannelBuilder, Channel, SslConnectorBuilder};
use futures::future::BoxFuture;
use hyper_openssl::client::legacy::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::codegen::http::Uri;
use tonic::transport::channel::Change;
use tonic::transport::Endpoint;
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::discover::Change as TowerChange;
use tower::load::Load;
use tower::util::BoxCloneSyncService;
use tower::Service;

/// How many requests may wait for the balancer (etcd-client's figure).
const BUFFER: usize = 1024;
/// How long an endpoint that failed a call stays behind the others, doubling while it keeps
/// failing, up to the maximum.
const BACK_OFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(32));

/// Builds the channel for [`etcd_client::Client::connect_with_balanced_channel`].
pub(crate) struct NoDelay {
    pub tls: SslConnectorBuilder,
}

impl BalancedChannelBuilder for NoDelay {
    type Error = etcd_client::Error;

    fn balanced_channel(
        self,
        _buffer: usize,
    ) -> Result<(Channel, mpsc::Sender<Change<Uri, Endpoint>>), Self::Error> {
        let https = connector(self.tls)?;
        let (tx, rx) = mpsc::channel::<Change<Uri, Endpoint>>(16);
        let discover = futures::stream::unfold((rx, https), |(mut rx, https)| async move {
            let change = match rx.recv().await? {
                Change::Insert(uri, endpoint) => {
                    let chan = endpoint.connect_with_connector_lazy(https.clone());
                    TowerChange::Insert(uri, BackOff::new(chan))
                }
                Change::Remove(uri) => TowerChange::Remove(uri),
            };
            Some((Ok::<_, std::convert::Infallible>(change), (rx, https)))
        });
        let balance = Balance::new(Box::pin(discover));
        let buffered = Buffer::new(balance, BUFFER);
        Ok((Channel::Custom(BoxCloneSyncService::new(buffered)), tx))
    }
}

/// Dials plaintext for http:// and TLS for https:// endpoints, with Nagle off.
fn connector(
    tls: SslConnectorBuilder,
) -> Result<HttpsConnector<HttpConnector>, openssl::error::ErrorStack> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    HttpsConnector::with_connector(http, tls)
}

/// An endpoint's standing: put behind the others until `until` after a failed call.
#[derive(Debug)]
struct Standing {
    until: Option<Instant>,
    next: Duration,
}

impl Standing {
    fn new() -> Self {
        Standing {
            until: None,
            next: BACK_OFF.0,
        }
    }

    fn failing(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| now < u)
    }

    /// A failure while already failing does not double the back-off again: a burst of
    /// failed calls from one outage counts once.
    fn record(&mut self, ok: bool, now: Instant) {
        if ok {
            *self = Standing::new();
        } else if !self.failing(now) {
            self.until = Some(now + self.next);
            self.next = (self.next * 2).min(BACK_OFF.1);
        }
    }
}

/// A service whose load says whether it failed a call lately, so that the balancer picks a
/// healthy endpoint over it.
struct BackOff<S> {
    inner: S,
    standing: Arc<Mutex<Standing>>,
}

impl<S> BackOff<S> {
    fn new(inner: S) -> Self {
        BackOff {
            inner,
            standing: Arc::new(Mutex::new(Standing::new())),
        }
    }
}

fn lock(s: &Mutex<Standing>) -> std::sync::MutexGuard<'_, Standing> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

impl<S, Req> Service<Req> for BackOff<S>
where
    S: Service<Req>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let call = self.inner.call(req);
        let standing = self.standing.clone();
        Box::pin(async move {
            let result = call.await;
            lock(&standing).record(result.is_ok(), Instant::now());
            result
        })
    }
}

impl<S> Load for BackOff<S> {
    type Metric = bool;

    fn load(&self) -> bool {
        lock(&self.standing).failing(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_openssl::client::legacy::MaybeHttpsStream;

    #[tokio::test]
    async fn connections_are_dialled_with_nagle_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let uri: Uri = format!("http://{}", listener.local_addr().expect("addr"))
            .parse()
            .expect("uri");
        let tls = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls_client())
            .expect("tls");
        let mut dial = connector(tls).expect("connector");
        let stream = dial.call(uri).await.expect("connect");
        let MaybeHttpsStream::Http(tcp) = stream else {
            panic!("an http:// endpoint is dialled in plaintext");
        };
        assert!(tcp.inner().nodelay().expect("nodelay"), "Nagle is on");
    }

    #[test]
    fn a_failing_endpoint_backs_off_doubling_and_is_forgiven_by_a_success() {
        let t0 = Instant::now();
        let mut s = Standing::new();
        assert!(!s.failing(t0));
        s.record(false, t0);
        assert!(s.failing(t0 + Duration::from_millis(999)));
        assert!(!s.failing(t0 + Duration::from_secs(1)));
        // A second failure within the back-off does not lengthen it.
        s.record(false, t0 + Duration::from_millis(500));
        assert!(!s.failing(t0 + Duration::from_secs(1)));
        // Failing again after it: twice as long, up to the maximum.
        let mut t = t0 + Duration::from_secs(1);
        for want in [2, 4, 8, 16, 32, 32] {
            s.record(false, t);
            assert!(s.failing(t + Duration::from_secs(want) - Duration::from_millis(1)));
            assert!(!s.failing(t + Duration::from_secs(want)));
            t += Duration::from_secs(want);
        }
        s.record(true, t);
        assert!(!s.failing(t));
        s.record(false, t);
        assert!(
            !s.failing(t + Duration::from_secs(1)),
            "back to the first back-off"
        );
    }
}
