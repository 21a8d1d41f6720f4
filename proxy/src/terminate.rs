//! `--client-tls terminate`: the proxy answers the client's TLS itself, so the session is
//! read in the clear whatever the client asked for: the drain finds its transaction
//! boundaries as in a plaintext session. To the servers it speaks `--server-sslmode`.

use crate::conn::{reject, Next, Reject};
use crate::metrics::CloseReason;
use crate::protocol::{self, sqlstate, Startup};
use crate::stream::Stream;
use crate::tls::{ServerSslMode, Terminate};
use std::io::{self, ErrorKind};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Terminate mode: the client's TLS is settled first (within the startup timeout), then the
/// session takes the common path over the resulting stream.
pub(crate) async fn serve(client: TcpStream, ctx: &crate::conn::Ctx, t: &Terminate) {
    let deadline = ctx.config.startup_timeout;
    let negotiated = match tokio::time::timeout(deadline, negotiate(client, t)).await {
        Ok(n) => n,
        Err(_) => Err(Refusal {
            reject: reject(
                sqlstate::PROTOCOL_VIOLATION,
                "no startup packet received in time",
                CloseReason::RejectedTimeout,
            ),
            stream: None,
        }),
    };
    let n = match negotiated {
        Ok(Some(n)) => n,
        Ok(None) => return ctx.metrics.closed(CloseReason::ClientGone),
        Err(r) => {
            tracing::debug!(code = r.reject.code, message = %r.reject.message, "rejecting client");
            if let Some(stream) = r.stream {
                let message =
                    (!r.reject.silent).then_some((r.reject.code, r.reject.message.as_str()));
                crate::conn::close_with(stream, message).await;
            }
            return ctx.metrics.closed(r.reject.reason);
        }
    };
    crate::conn::serve_with(n.stream, n.first, ctx, |parts| {
        crate::session::run(parts, ctx)
    })
    .await
}

/// The client's encryption, settled: its stream (TLS or plain) and, when the client started
/// in the clear without asking for TLS, the packet it sent (read already).
pub(crate) struct Negotiated {
    pub stream: Stream,
    pub first: Option<Next>,
}

/// A refusal before the startup packet, with the stream to say it on (none after a failed
/// handshake).
pub(crate) struct Refusal {
    pub reject: Reject,
    pub stream: Option<Stream>,
}

impl Refusal {
    fn new(reject: Reject, stream: Stream) -> Refusal {
        Refusal {
            reject,
            stream: Some(stream),
        }
    }
}

/// Reads the client's opening and answers it: a direct TLS ClientHello or an SSLRequest is
/// handshaken with the current certificate (an SSLRequest gets 'N' when there is none);
/// anything else stays plaintext. `Ok(None)`: the client left.
pub(crate) async fn negotiate(
    mut client: TcpStream,
    t: &Terminate,
) -> Result<Option<Negotiated>, Refusal> {
    let mut first = [0u8; 1];
    match client.peek(&mut first).await {
        Ok(0) | Err(_) => return Ok(None),
        Ok(_) => {}
    }
    if first[0] == protocol::TLS_HANDSHAKE {
        // PostgreSQL 17's direct TLS: no SSLRequest, and the client must name the protocol.
        let Some(config) = t.acceptor.config() else {
            // As a server without ssl: no TLS to speak, nothing to say in the clear.
            return Err(Refusal::new(
                silent_reject("direct TLS without a certificate"),
                Stream::Plain(client),
            ));
        };
        let tls = accept(client, config).await?;
        let alpn = tls.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN);
        let stream = Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(tls)));
        if !alpn {
            // PostgreSQL's words for it.
            return Err(Refusal::new(
                reject(
                    sqlstate::PROTOCOL_VIOLATION,
                    "received direct SSL connection request without ALPN protocol negotiation extension",
                    CloseReason::RejectedProtocol,
                ),
                stream,
            ));
        }
        return Ok(Some(Negotiated {
            stream,
            first: None,
        }));
    }
    let next = match crate::conn::startup_phase(&mut client).await {
        Ok(n) => n,
        Err(r) => return Err(Refusal::new(r, Stream::Plain(client))),
    };
    let Next::Relay(bytes) = next else {
        return Ok(Some(Negotiated {
            stream: Stream::Plain(client),
            first: Some(next),
        }));
    };
    if !matches!(protocol::parse(&bytes), Ok(Some((Startup::SslRequest, 8)))) {
        return Ok(Some(Negotiated {
            stream: Stream::Plain(client),
            first: Some(Next::Relay(bytes)),
        }));
    }
    if bytes.len() > 8 {
        // Bytes sent before the answer to SSLRequest would be read as if they had come
        // over TLS (CVE-2021-23214): refused as PostgreSQL refuses them.
        return Err(Refusal::new(
            reject(
                sqlstate::PROTOCOL_VIOLATION,
                "received unencrypted data after SSL request",
                CloseReason::RejectedProtocol,
            ),
            Stream::Plain(client),
        ));
    }
    let Some(config) = t.acceptor.config() else {
        if client.write_all(b"N").await.is_err() {
            return Ok(None);
        }
        return Ok(Some(Negotiated {
            stream: Stream::Plain(client),
            first: None,
        }));
    };
    if client.write_all(b"S").await.is_err() {
        return Ok(None);
    }
    let tls = accept(client, config).await?;
    Ok(Some(Negotiated {
        stream: Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(tls))),
        first: None,
    }))
}

fn silent_reject(message: &str) -> Reject {
    let mut r = reject(
        sqlstate::PROTOCOL_VIOLATION,
        message,
        CloseReason::RejectedProtocol,
    );
    r.silent = true;
    r
}

async fn accept(
    client: TcpStream,
    config: Arc<rustls::ServerConfig>,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, Refusal> {
    tokio_rustls::TlsAcceptor::from(config)
        .accept(client)
        .await
        .map_err(|e| {
            tracing::debug!(error = %e, "client TLS handshake failed");
            // The socket went with the failed handshake: nothing more to say to it.
            Refusal {
                reject: silent_reject("TLS handshake failed"),
                stream: None,
            }
        })
}

/// Opens the proxy's side to a server as `--server-sslmode` says: an SSLRequest first
/// unless disabled, then the handshake (bounded by `timeout`). `what` names the server in
/// errors.
pub(crate) async fn to_server(
    mut tcp: TcpStream,
    addr: &str,
    t: &Terminate,
    what: &str,
    timeout: Duration,
) -> Result<Stream, Reject> {
    let Some(connector) = t.server.connector() else {
        return Ok(Stream::Plain(tcp));
    };
    let failed = |message: String| {
        if crate::conn::warn_now(addr) {
            tracing::warn!(addr, "{message}");
        } else {
            tracing::debug!(addr, "{message}");
        }
        reject(
            sqlstate::CONNECTION_FAILURE,
            message,
            CloseReason::BackendUnreachable,
        )
    };
    let mode = t.server.mode;
    let handshake = async {
        let mut request = 8u32.to_be_bytes().to_vec();
        request.extend(protocol::SSL_REQUEST_CODE.to_be_bytes());
        tcp.write_all(&request).await?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        match answer[0] {
            b'S' => {
                let name = crate::tls::server_name(addr).ok_or_else(|| {
                    io::Error::new(ErrorKind::InvalidInput, "no server name in the address")
                })?;
                let tls = connector.connect(name, tcp).await?;
                Ok(Some(Stream::Tls(Box::new(
                    tokio_rustls::TlsStream::Client(tls),
                ))))
            }
            b'N' if mode == ServerSslMode::Prefer => Ok(Some(Stream::Plain(tcp))),
            b'N' => Ok(None),
            other => Err(io::Error::new(
                ErrorKind::InvalidData,
                format!("unexpected answer {other:#04x} to SSLRequest"),
            )),
        }
    };
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(Some(stream))) => Ok(stream),
        Ok(Ok(None)) => Err(failed(format!(
            "{what} does not accept TLS (--server-sslmode {})",
            clap::ValueEnum::to_possible_value(&mode)
                .map_or_else(String::new, |v| v.get_name().to_string())
        ))),
        Ok(Err(e)) => Err(failed(format!("TLS to {what} failed: {e}"))),
        Err(_) => Err(failed(format!(
            "timed out in the TLS handshake with {what}"
        ))),
    }
}

/// Closes a drained session as a PostgreSQL shutting down closes an idle one: FATAL 57P01
/// to the client, Terminate to the server (its backend exits without an "unexpected EOF"),
/// through the streams' TLS if any.
pub(crate) async fn close_drained(client: &mut Stream, server: &mut Stream, message: &str) {
    let write = async {
        let to_client = protocol::error_response(sqlstate::ADMIN_SHUTDOWN, message);
        let _ = client.write_all(&to_client).await;
        let _ = client.shutdown().await;
        let _ = server.write_all(&crate::conn::TERMINATE).await;
        let _ = server.shutdown().await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
    let _ = socket2::SockRef::from(client.tcp()).shutdown(std::net::Shutdown::Both);
    let _ = socket2::SockRef::from(server.tcp()).shutdown(std::net::Shutdown::Both);
}

/// The message of `tls_required` (public for the fuzz target).
pub fn tls_required_message(startup: &[u8]) -> String {
    tls_required(startup).message
}

/// The refusal a plaintext startup gets under `--client-tls-required`: PostgreSQL's answer
/// when only hostssl rows match (28000, with its message's shape).
pub(crate) fn tls_required(startup: &[u8]) -> Reject {
    let (mut user, mut database) = (String::new(), None);
    if let Ok(Some((Startup::Startup { params, .. }, _))) = protocol::parse(startup) {
        for (k, v) in params {
            match k {
                b"user" => user = String::from_utf8_lossy(v).into_owned(),
                b"database" => database = Some(String::from_utf8_lossy(v).into_owned()),
                _ => {}
            }
        }
    }
    let database = database.unwrap_or_else(|| user.clone());
    reject(
        sqlstate::INVALID_AUTHORIZATION,
        format!(
            "no pg_hba.conf entry for host, user \"{user}\", database \"{database}\", no encryption (stolon-proxy --client-tls-required)"
        ),
        CloseReason::RejectedProtocol,
    )
}
