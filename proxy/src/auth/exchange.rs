//! The two authentications of a session the proxy authenticates: the client to the proxy,
//! then the proxy to the server as the client's role. The server asked first (its first
//! answer to the replayed startup), so the proxy speaks the method the server's rules chose.

use super::scram::{self, ClientSecret, ScramError};
use super::wire::{self, read_message, send};
use super::{Credentials, Secret};
use crate::protocol::{self, sqlstate};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite};

/// What the server asked for first.
#[derive(Debug, PartialEq, Eq)]
pub enum Asked {
    Scram,
    Md5([u8; 4]),
}

/// The server's first answer, if it is a request the proxy can answer for the client (and
/// nothing follows it).
pub fn asked(answer: &[u8]) -> Option<Asked> {
    let len = u32::from_be_bytes(answer.get(1..5)?.try_into().ok()?) as usize;
    if answer[0] != b'R' || answer.len() != 1 + len {
        return None;
    }
    match wire::auth_code(&answer[5..])? {
        (wire::AUTH_SASL, data) if wire::mechanisms(data).contains(&scram::MECHANISM) => {
            Some(Asked::Scram)
        }
        (wire::AUTH_MD5, salt) => Some(Asked::Md5(salt.try_into().ok()?)),
        _ => None,
    }
}

/// Whether the proxy can answer `asked` with `secret` (else the session passes through).
pub fn fits(asked: &Asked, secret: &Secret) -> bool {
    matches!(
        (asked, secret),
        (Asked::Scram, Secret::Scram(_)) | (Asked::Md5(_), Secret::Md5(_))
    )
}

/// Why the exchange stopped: the ErrorResponse for the client (if it can still take one),
/// and whether the role's secret may be stale.
#[derive(Debug)]
pub struct Failure {
    pub error: Option<Vec<u8>>,
    pub forget: bool,
    pub why: String,
    /// The client was authenticated, and then the server went away (its socket's end, or
    /// an error saying it is going away): the session may start on another server.
    pub lost: Option<Box<Lost>>,
}

/// What a session whose server went away during the login needs to start elsewhere.
pub struct Lost {
    pub creds: Credentials,
    /// What the client must still be told of its authentication (SCRAM's final message),
    /// before AuthenticationOk.
    pub tell: Vec<u8>,
}

impl std::fmt::Debug for Lost {
    // The credentials are a login to the role: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lost { .. }")
    }
}

/// Whether a failure of the proxy's login to the server says the server went away.
fn server_went_away(f: &Failure) -> bool {
    f.error.as_deref().is_none_or(crate::protocol::going_away)
}

fn fatal(code: &str, message: String) -> Failure {
    Failure {
        error: Some(protocol::error_response(code, &message)),
        forget: false,
        why: message,
        lost: None,
    }
}

fn gone(e: std::io::Error) -> Failure {
    Failure {
        error: None,
        forget: false,
        why: e.to_string(),
        lost: None,
    }
}

fn wrong_password(user: &str) -> Failure {
    Failure {
        error: Some(protocol::error_response(
            sqlstate::INVALID_PASSWORD,
            &format!("password authentication failed for user \"{user}\""),
        )),
        // The password may have changed since the lookup: read it again next time.
        forget: true,
        why: "wrong password".into(),
        lost: None,
    }
}

/// Runs both authentications. `binding`: the proxy certificate's tls-server-end-point hash
/// when it terminated the client's TLS (SCRAM-SHA-256-PLUS is offered then). `Ok`: the
/// server's bytes that followed its acceptance (AuthenticationOk and the rest of its
/// start) and what the proxy keeps of the client's credentials.
pub async fn run<C, S>(
    client: &mut C,
    server: &mut S,
    asked: Asked,
    secret: &Secret,
    user: &str,
    binding: Option<&[u8]>,
) -> Result<(Vec<u8>, Credentials), Failure>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    match (asked, secret) {
        (Asked::Scram, Secret::Scram(v)) => scram_both(client, server, v, user, binding).await,
        (Asked::Md5(salt), Secret::Md5(hex)) => md5_both(client, server, hex, salt, user).await,
        _ => Err(fatal(
            sqlstate::PROTOCOL_VIOLATION,
            "authentication method mismatch".into(),
        )),
    }
}

/// The client's next message, which must be a password-type message ('p').
async fn client_p<C>(client: &mut C, buf: &mut Vec<u8>) -> Result<Vec<u8>, Failure>
where
    C: AsyncRead + Unpin,
{
    match read_message(client, buf).await.map_err(gone)? {
        (b'p', body) => Ok(body),
        (kind, _) => Err(fatal(
            sqlstate::PROTOCOL_VIOLATION,
            format!("expected SASL response, got message type {}", kind as char),
        )),
    }
}

fn scram_failure(e: ScramError, user: &str) -> Failure {
    match e {
        ScramError::Proof => wrong_password(user),
        other => fatal(sqlstate::PROTOCOL_VIOLATION, other.to_string()),
    }
}

async fn scram_both<C, S>(
    client: &mut C,
    server: &mut S,
    verifier: &scram::Verifier,
    user: &str,
    binding: Option<&[u8]>,
) -> Result<(Vec<u8>, Credentials), Failure>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (client_key, server_final) = scram_with_client(client, verifier, user, binding).await?;
    let creds = Credentials::Scram {
        client_key,
        verifier: verifier.clone(),
    };
    let tell = wire::auth_request(wire::AUTH_SASL_FINAL, server_final.as_bytes());
    let rest = match scram_to_server(server, &creds).await {
        Ok(rest) => rest,
        Err(f) if server_went_away(&f) => {
            let lost = Lost { creds, tell };
            return Err(Failure {
                forget: false,
                lost: Some(Box::new(lost)),
                ..f
            });
        }
        Err(f) => return Err(f),
    };
    // The client hears it is in only once the server took the proxy's proof.
    send(client, &tell).await.map_err(gone)?;
    Ok((rest, creds))
}

/// The proxy as the SCRAM server of its client, up to the checked proof: the ClientKey it
/// revealed and the server-final-message to send once the server is won.
async fn scram_with_client<C>(
    client: &mut C,
    verifier: &scram::Verifier,
    user: &str,
    binding: Option<&[u8]>,
) -> Result<([u8; 32], String), Failure>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut mechs = Vec::new();
    if binding.is_some() {
        mechs.extend(scram::MECHANISM_PLUS.as_bytes());
        mechs.push(0);
    }
    mechs.extend(scram::MECHANISM.as_bytes());
    mechs.extend([0, 0]);
    send(client, &wire::auth_request(wire::AUTH_SASL, &mechs))
        .await
        .map_err(gone)?;
    let mut cbuf = Vec::new();
    let body = client_p(client, &mut cbuf).await?;
    let (mech, first) = wire::sasl_initial(&body).ok_or_else(|| {
        fatal(
            sqlstate::PROTOCOL_VIOLATION,
            "malformed SASLInitialResponse".into(),
        )
    })?;
    let plus = mech == scram::MECHANISM_PLUS && binding.is_some();
    if !(plus || mech == scram::MECHANISM) {
        return Err(fatal(
            sqlstate::PROTOCOL_VIOLATION,
            "client selected an invalid SASL authentication mechanism".into(),
        ));
    }
    let first = std::str::from_utf8(first)
        .map_err(|_| scram_failure(ScramError::Malformed("utf-8"), user))?;
    let exchange = scram::Server::start(verifier.clone(), first, plus, binding.is_some())
        .map_err(|e| scram_failure(e, user))?;
    let continue_msg =
        wire::auth_request(wire::AUTH_SASL_CONTINUE, exchange.server_first().as_bytes());
    send(client, &continue_msg).await.map_err(gone)?;
    let body = client_p(client, &mut cbuf).await?;
    let fin = std::str::from_utf8(&body)
        .map_err(|_| scram_failure(ScramError::Malformed("utf-8"), user))?;
    exchange
        .finish(fin, binding)
        .map_err(|e| scram_failure(e, user))
}

/// The proxy as the client's role to a server that asked for SCRAM, with the kept
/// credentials (what a session moved to another server will need too): the server's bytes
/// after its SASL final message (AuthenticationOk and the rest of its start).
async fn scram_to_server<S>(server: &mut S, creds: &Credentials) -> Result<Vec<u8>, Failure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Credentials::Scram {
        client_key,
        verifier,
    } = creds
    else {
        return Err(stale("SCRAM asked of an md5 role".into()));
    };
    let mut c = scram::Client::new(ClientSecret::Keys {
        client_key: *client_key,
        server_key: verifier.server_key,
    });
    let initial = wire::sasl_initial_message(scram::MECHANISM, c.client_first().as_bytes());
    send(server, &initial).await.map_err(gone)?;
    let mut sbuf = Vec::new();
    let data = server_request(server, &mut sbuf, wire::AUTH_SASL_CONTINUE).await?;
    let answer = std::str::from_utf8(&data)
        .map_err(|_| stale("a malformed server-first-message".into()))
        .and_then(|d| c.client_final(d).map_err(|e| stale(e.to_string())))?;
    send(server, &wire::message(b'p', answer.as_bytes()))
        .await
        .map_err(gone)?;
    let data = server_request(server, &mut sbuf, wire::AUTH_SASL_FINAL).await?;
    std::str::from_utf8(&data)
        .map_err(|_| stale("a malformed server-final-message".into()))
        .and_then(|d| c.verify(d).map_err(|e| stale(e.to_string())))?;
    Ok(sbuf)
}

/// Logs in to a server as the client's role with the kept credentials, `answer` being the
/// server's first answer to the replayed startup packet (a session moved to another
/// server). `Ok`: the server's bytes after its acceptance.
pub async fn login<S>(
    server: &mut S,
    answer: &[u8],
    creds: &Credentials,
) -> Result<Vec<u8>, Failure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match (asked(answer), creds) {
        (Some(Asked::Scram), Credentials::Scram { .. }) => scram_to_server(server, creds).await,
        (Some(Asked::Md5(salt)), Credentials::Md5(stored)) => {
            let mut response = super::md5_response(stored, &salt).into_bytes();
            response.push(0);
            send(server, &wire::message(b'p', &response))
                .await
                .map_err(gone)?;
            Ok(Vec::new())
        }
        // Trusted, or refused at once: the caller reads what follows.
        _ if answer.first() != Some(&b'R')
            || wire::auth_code(answer.get(5..).unwrap_or_default())
                .is_some_and(|(code, _)| code == wire::AUTH_OK) =>
        {
            Ok(answer.to_vec())
        }
        _ => Err(stale(
            "the server asks for another method than the client's login used".into(),
        )),
    }
}

/// The server refused what the proxy derived from the looked-up secret: it changed.
fn stale(why: String) -> Failure {
    Failure {
        error: Some(protocol::error_response(
            sqlstate::INVALID_PASSWORD,
            "password authentication failed: the role's password changed during the login, try again",
        )),
        forget: true,
        why,
        lost: None,
    }
}

/// The server's next AuthenticationRequest, which must have `code`; its ErrorResponse is
/// passed to the client as it is.
async fn server_request<S>(server: &mut S, buf: &mut Vec<u8>, code: u32) -> Result<Vec<u8>, Failure>
where
    S: AsyncRead + Unpin,
{
    match read_message(server, buf).await.map_err(gone)? {
        (b'R', body) => match wire::auth_code(&body) {
            Some((c, data)) if c == code => Ok(data.to_vec()),
            _ => Err(stale(format!(
                "the server answered with another request than {code}"
            ))),
        },
        (b'E', body) => Err(Failure {
            why: "the server refused the proxy's authentication".into(),
            error: Some(wire::message(b'E', &body)),
            forget: true,
            lost: None,
        }),
        (kind, _) => Err(stale(format!(
            "unexpected message {} from the server",
            kind as char
        ))),
    }
}

async fn md5_both<C, S>(
    client: &mut C,
    server: &mut S,
    stored_hex: &str,
    server_salt: [u8; 4],
    user: &str,
) -> Result<(Vec<u8>, Credentials), Failure>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let salt: [u8; 4] = rand::random();
    send(client, &wire::auth_request(wire::AUTH_MD5, &salt))
        .await
        .map_err(gone)?;
    let mut cbuf = Vec::new();
    let body = client_p(client, &mut cbuf).await?;
    let got = body.strip_suffix(&[0]).unwrap_or(&body);
    let want = super::md5_response(stored_hex, &salt);
    if !bool::from(got.ct_eq(want.as_bytes())) {
        return Err(wrong_password(user));
    }
    let mut answer = super::md5_response(stored_hex, &server_salt).into_bytes();
    answer.push(0);
    send(server, &wire::message(b'p', &answer))
        .await
        .map_err(gone)?;
    Ok((Vec::new(), Credentials::Md5(stored_hex.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_servers_request_decides_the_method() {
        let sasl = wire::auth_request(wire::AUTH_SASL, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        assert_eq!(asked(&sasl), Some(Asked::Scram));
        let md5 = wire::auth_request(wire::AUTH_MD5, &[1, 2, 3, 4]);
        assert_eq!(asked(&md5), Some(Asked::Md5([1, 2, 3, 4])));
        // Trust (AuthenticationOk), cleartext, GSS, or more than the request: not the proxy's.
        assert_eq!(asked(&wire::auth_request(wire::AUTH_OK, &[])), None);
        assert_eq!(asked(&wire::auth_request(wire::AUTH_CLEARTEXT, &[])), None);
        assert_eq!(asked(&wire::auth_request(7, &[])), None);
        let mut two = md5.clone();
        two.extend(&md5);
        assert_eq!(asked(&two), None);
        assert_eq!(asked(&[]), None);
    }
}
