//! Reading a role's stored password through the auth role, as PgBouncer's `auth_query`:
//! one short session on the current master as `--auth-user`, one call of the lookup
//! function the keeper keeps (README "TLS and authentication"), then Terminate.

use super::scram::{Client, ClientSecret};
use super::wire::{self, read_message, send};
use super::Secret;
use crate::stream::Stream;
use anyhow::{anyhow, bail, Context};
use std::time::Duration;

/// The schema and function the keeper creates (`control::auth_sql`).
pub const LOOKUP_FUNCTION: &str = "stolon_auth.lookup";

/// The auth role's login.
pub struct AuthRole {
    pub user: String,
    pub password: String,
    pub database: String,
}

/// What the lookup said of a role: its secret, or `None` when the proxy must not
/// authenticate it (unknown, no login, superuser, expired, no password, a method it cannot
/// do): the session then passes through to the server, which answers as it always does.
pub async fn lookup(
    stream: Stream,
    auth: &AuthRole,
    role: &str,
    timeout: Duration,
) -> anyhow::Result<Option<Secret>> {
    tokio::time::timeout(timeout, run(stream, auth, role))
        .await
        .map_err(|_| anyhow!("the lookup took longer than {timeout:?}"))?
}

async fn run(mut s: Stream, auth: &AuthRole, role: &str) -> anyhow::Result<Option<Secret>> {
    if role.contains('\0') {
        return Ok(None);
    }
    let startup = crate::protocol::startup_message(&[
        ("user", auth.user.as_str()),
        ("database", auth.database.as_str()),
        ("application_name", "stolon-proxy auth lookup"),
    ]);
    send(&mut s, &startup).await?;
    let mut buf = Vec::new();
    authenticate(&mut s, &mut buf, auth).await?;
    // ParameterStatus, BackendKeyData... up to ReadyForQuery.
    loop {
        match read_message(&mut s, &mut buf).await? {
            (b'Z', _) => break,
            (b'E', body) => bail!("{}", error_text(&body)),
            _ => {}
        }
    }
    // standard_conforming_strings is on in every supported version: '' is the only escape.
    let sql = format!(
        "SELECT password, expired FROM {LOOKUP_FUNCTION}('{}')\0",
        role.replace('\'', "''")
    );
    send(&mut s, &wire::message(b'Q', sql.as_bytes())).await?;
    let mut row: Option<(Option<String>, Option<String>)> = None;
    let mut error = None;
    loop {
        match read_message(&mut s, &mut buf).await? {
            (b'D', body) => row = data_row(&body),
            (b'E', body) => error = Some(error_text(&body)),
            (b'Z', _) => break,
            _ => {}
        }
    }
    let _ = send(&mut s, &wire::message(b'X', &[])).await;
    if let Some(e) = error {
        bail!("{LOOKUP_FUNCTION} failed: {e}");
    }
    Ok(match row {
        Some((Some(password), Some(expired))) if expired == "f" => Secret::parse(&password),
        _ => None,
    })
}

/// The auth role's own authentication: SCRAM, md5, cleartext or trust.
async fn authenticate(s: &mut Stream, buf: &mut Vec<u8>, auth: &AuthRole) -> anyhow::Result<()> {
    let mut scram: Option<Client> = None;
    loop {
        let (kind, body) = read_message(s, buf).await?;
        if kind == b'E' {
            bail!("as {}: {}", auth.user, error_text(&body));
        }
        let (code, data) = wire::auth_code(&body)
            .filter(|_| kind == b'R')
            .context("unexpected message during authentication")?;
        let reply = match code {
            wire::AUTH_OK => return Ok(()),
            wire::AUTH_CLEARTEXT => {
                let mut p = auth.password.as_bytes().to_vec();
                p.push(0);
                wire::message(b'p', &p)
            }
            wire::AUTH_MD5 => {
                let salt: [u8; 4] = data.try_into().context("md5 salt")?;
                let stored = super::md5_stored(&auth.user, &auth.password);
                let mut p = super::md5_response(&stored, &salt).into_bytes();
                p.push(0);
                wire::message(b'p', &p)
            }
            wire::AUTH_SASL => {
                let c = Client::new(ClientSecret::Password(auth.password.clone()));
                let first = c.client_first();
                scram = Some(c);
                wire::sasl_initial_message(super::scram::MECHANISM, first.as_bytes())
            }
            wire::AUTH_SASL_CONTINUE => {
                let c = scram.as_mut().context("SASL continue without a start")?;
                let fin = c.client_final(std::str::from_utf8(data)?)?;
                wire::message(b'p', fin.as_bytes())
            }
            wire::AUTH_SASL_FINAL => {
                let c = scram.as_ref().context("SASL final without a start")?;
                c.verify(std::str::from_utf8(data)?)?;
                continue;
            }
            other => bail!("authentication method {other} is not supported for --auth-user"),
        };
        send(s, &reply).await?;
    }
}

/// The two text columns of a DataRow (NULL as None).
fn data_row(body: &[u8]) -> Option<(Option<String>, Option<String>)> {
    let n = u16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    let mut rest = &body[2..];
    let mut cols = Vec::new();
    for _ in 0..n {
        let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
        rest = &rest[4..];
        if len < 0 {
            cols.push(None);
            continue;
        }
        let len = usize::try_from(len).ok()?;
        cols.push(Some(String::from_utf8_lossy(rest.get(..len)?).into_owned()));
        rest = &rest[len..];
    }
    let mut cols = cols.into_iter();
    Some((cols.next()?, cols.next()?))
}

/// "SQLSTATE: message" of an ErrorResponse body.
fn error_text(body: &[u8]) -> String {
    let mut framed = vec![b'E'];
    framed.extend(((body.len() + 4) as u32).to_be_bytes());
    framed.extend(body);
    match crate::protocol::error_fields(&framed) {
        Some((code, message)) => format!("{code}: {message}"),
        None => "an unreadable error".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_row_gives_its_two_columns() {
        let mut body = 2u16.to_be_bytes().to_vec();
        body.extend(3i32.to_be_bytes());
        body.extend(b"abc");
        body.extend((-1i32).to_be_bytes());
        assert_eq!(data_row(&body), Some((Some("abc".into()), None)));
        assert_eq!(data_row(&body[..7]), None, "truncated");
        assert_eq!(data_row(&[0, 1]), None, "one column");
    }
}
