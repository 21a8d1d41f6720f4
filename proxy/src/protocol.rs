//! The PostgreSQL startup phase, parsed from bytes. Constants from the protocol docs,
//! "Message Formats" (https://www.postgresql.org/docs/current/protocol-message-formats.html):
//! SSLRequest, GSSENCRequest, CancelRequest and StartupMessage are untyped packets of an
//! Int32 length (including itself) and an Int32 code; PostgreSQL 17's direct TLS starts
//! with a TLS record instead (first byte 0x16, "direct SSL negotiation").

/// MAX_STARTUP_PACKET_LENGTH in PostgreSQL's `pqcomm.h`.
pub const MAX_STARTUP_PACKET: u32 = 10_000;
/// Every untyped startup packet has at least the length and the code.
pub const MIN_STARTUP_PACKET: u32 = 8;
/// SSLRequest code: 1234 << 16 | 5679.
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// GSSENCRequest code: 1234 << 16 | 5680.
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// CancelRequest code: 1234 << 16 | 5678.
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// Protocol 3.0 (196608) and 3.2 (196610, PostgreSQL 18) are major 3.
pub const PROTOCOL_MAJOR: u16 = 3;
/// The longest cancel key protocol 3.2 allows ("The maximum key length is 256 bytes").
pub const MAX_CANCEL_KEY: usize = 256;
/// A TLS handshake record's content type: the first byte of a direct TLS ClientHello.
pub const TLS_HANDSHAKE: u8 = 0x16;

/// A complete first packet of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Startup<'a> {
    SslRequest,
    GssEncRequest,
    /// `key` is 4 bytes in protocol 3.0, up to 256 in 3.2.
    Cancel {
        pid: u32,
        key: &'a [u8],
    },
    Startup {
        major: u16,
        minor: u16,
        /// Name/value pairs as sent (bytes: PostgreSQL does not require UTF-8 here).
        params: Vec<(&'a [u8], &'a [u8])>,
    },
    /// A TLS ClientHello (`sslnegotiation=direct`): nothing to parse, pass it through.
    DirectTls,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("invalid length of startup packet ({0} bytes)")]
    BadLength(u32),
    #[error("unsupported frontend protocol {major}.{minor}")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("invalid startup packet layout: {0}")]
    Layout(&'static str),
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Parses the first packet. `Ok(None)` until enough bytes are there; then the packet and
/// how many bytes it took (0 for `DirectTls`: those bytes belong to the TLS stream).
/// Longer input gives the same answer: bytes after the packet are not looked at.
pub fn parse(buf: &[u8]) -> Result<Option<(Startup<'_>, usize)>, ParseError> {
    match buf.first() {
        None => return Ok(None),
        Some(&TLS_HANDSHAKE) => return Ok(Some((Startup::DirectTls, 0))),
        Some(_) => {}
    }
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = be32(buf);
    if !(MIN_STARTUP_PACKET..=MAX_STARTUP_PACKET).contains(&len) {
        return Err(ParseError::BadLength(len));
    }
    if buf.len() < 8 {
        return Ok(None);
    }
    let code = be32(&buf[4..]);
    // Check fixed-size requests before waiting for the rest of a wrong length.
    match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE if len != 8 => {
            return Err(ParseError::BadLength(len))
        }
        CANCEL_REQUEST_CODE if !(16..=12 + MAX_CANCEL_KEY as u32).contains(&len) => {
            return Err(ParseError::BadLength(len))
        }
        _ => {}
    }
    let len = len as usize;
    if buf.len() < len {
        return Ok(None);
    }
    let packet = &buf[..len];
    let msg = match code {
        SSL_REQUEST_CODE => Startup::SslRequest,
        GSSENC_REQUEST_CODE => Startup::GssEncRequest,
        CANCEL_REQUEST_CODE => Startup::Cancel {
            pid: be32(&packet[8..]),
            key: &packet[12..],
        },
        _ => parse_startup_message(code, &packet[8..])?,
    };
    Ok(Some((msg, len)))
}

fn parse_startup_message(version: u32, body: &[u8]) -> Result<Startup<'_>, ParseError> {
    let major = (version >> 16) as u16;
    let minor = (version & 0xffff) as u16;
    if major != PROTOCOL_MAJOR {
        return Err(ParseError::UnsupportedProtocol { major, minor });
    }
    let mut params = Vec::new();
    let mut rest = body;
    loop {
        let Some(end) = rest.iter().position(|&b| b == 0) else {
            return Err(ParseError::Layout("expected terminator as last byte"));
        };
        if end == 0 {
            // The empty name ends the list; it must be the last byte.
            if rest.len() != 1 {
                return Err(ParseError::Layout("bytes after the terminator"));
            }
            return Ok(Startup::Startup {
                major,
                minor,
                params,
            });
        }
        let name = &rest[..end];
        rest = &rest[end + 1..];
        let Some(vend) = rest.iter().position(|&b| b == 0) else {
            return Err(ParseError::Layout("parameter without a value"));
        };
        params.push((name, &rest[..vend]));
        rest = &rest[vend + 1..];
    }
}

/// A protocol 3.0 StartupMessage with these parameters (clients, tests and benchmarks).
pub fn startup_message(params: &[(&str, &str)]) -> Vec<u8> {
    startup_packet(u32::from(PROTOCOL_MAJOR) << 16, params)
}

/// A startup packet with any version code (tests also build invalid ones).
fn startup_packet(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend(k.as_bytes());
        body.push(0);
        body.extend(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend(body);
    packet
}

/// An ErrorResponse ('E') with severity FATAL, the SQLSTATE and the message, as the server
/// sends it before closing (fields S, V, C, M; zero-terminated).
pub fn error_response(sqlstate: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(32 + message.len());
    for (tag, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', sqlstate),
        (b'M', message),
    ] {
        body.push(tag);
        // A NUL inside a field would end it early; drop any.
        body.extend(value.bytes().filter(|&b| b != 0));
        body.push(0);
    }
    body.push(0);
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(b'E');
    out.extend(((body.len() + 4) as u32).to_be_bytes());
    out.extend(body);
    out
}

/// The SQLSTATE (field 'C') and message ('M') of an ErrorResponse at the start of `bytes`,
/// if a whole one is there. `None` for anything else (another message, a partial one, or
/// a malformed one): the caller then passes the bytes on unread.
pub fn error_fields(bytes: &[u8]) -> Option<(&str, &str)> {
    if bytes.first() != Some(&b'E') {
        return None;
    }
    let len = usize::try_from(be32(bytes.get(1..5)?)).ok()?;
    let body = bytes.get(5..len.checked_add(1)?)?;
    let (mut code, mut message) = (None, "");
    let mut rest = body;
    while let Some((&tag, tail)) = rest.split_first() {
        if tag == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0)?;
        let value = std::str::from_utf8(&tail[..end]).ok()?;
        match tag {
            b'C' => code = Some(value),
            b'M' => message = value,
            _ => {}
        }
        rest = &tail[end + 1..];
    }
    code.map(|c| (c, message))
}

/// The SQLSTATEs of a server going away (or not there yet): a shutdown, a crash of another
/// backend, the postmaster's death, still starting up.
pub(crate) const GOING_AWAY: [&str; 3] = [
    sqlstate::ADMIN_SHUTDOWN,
    sqlstate::CRASH_SHUTDOWN,
    sqlstate::CANNOT_CONNECT_NOW,
];

/// Whether `bytes` is the ErrorResponse of a server going away (`GOING_AWAY`).
pub(crate) fn going_away(bytes: &[u8]) -> bool {
    error_fields(bytes).is_some_and(|(code, _)| GOING_AWAY.contains(&code))
}

/// SQLSTATEs the proxy answers with (PostgreSQL's errcodes.txt).
pub mod sqlstate {
    /// protocol_violation: malformed or oversized startup packet, or none in time.
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    /// cannot_connect_now: there is no master to route to.
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    /// connection_failure: the master did not accept the connection.
    pub const CONNECTION_FAILURE: &str = "08006";
    /// too_many_connections: the proxy's connection limit is reached.
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    /// admin_shutdown: what PostgreSQL sends an idle session when it shuts down; the proxy
    /// closes a drained session with it.
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    /// crash_shutdown: a backend of a server that crashed.
    pub const CRASH_SHUTDOWN: &str = "57P02";
    /// invalid_authorization_specification: no pg_hba.conf entry (a plaintext session where
    /// TLS is required).
    pub const INVALID_AUTHORIZATION: &str = "28000";
    /// invalid_password: a wrong password.
    pub const INVALID_PASSWORD: &str = "28P01";
}

#[cfg(test)]
mod tests;
