//! Whole messages of the authentication exchange, read and written on any stream.

use std::io::{self, ErrorKind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Authentication messages are short (a SCRAM message, a password): longer is refused.
pub const MAX_AUTH_MESSAGE: usize = 8192;

/// AuthenticationRequest codes ('R').
pub const AUTH_OK: u32 = 0;
pub const AUTH_CLEARTEXT: u32 = 3;
pub const AUTH_MD5: u32 = 5;
pub const AUTH_SASL: u32 = 10;
pub const AUTH_SASL_CONTINUE: u32 = 11;
pub const AUTH_SASL_FINAL: u32 = 12;

pub fn message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(5 + body.len());
    m.push(kind);
    m.extend(((body.len() + 4) as u32).to_be_bytes());
    m.extend(body);
    m
}

/// An AuthenticationRequest with its code and data.
pub fn auth_request(code: u32, data: &[u8]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    body.extend(data);
    message(b'R', &body)
}

/// One whole message from `buf` first, then from `s`; the bytes after it stay in `buf`.
pub async fn read_message<S>(s: &mut S, buf: &mut Vec<u8>) -> io::Result<(u8, Vec<u8>)>
where
    S: AsyncRead + Unpin,
{
    loop {
        if buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if !(4..=MAX_AUTH_MESSAGE).contains(&len) {
                return Err(io::Error::new(
                    ErrorKind::InvalidData,
                    format!("invalid message length {len} during authentication"),
                ));
            }
            if buf.len() > len {
                let kind = buf[0];
                let body = buf[5..1 + len].to_vec();
                buf.drain(..1 + len);
                return Ok((kind, body));
            }
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

pub async fn send<S>(s: &mut S, bytes: &[u8]) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    s.write_all(bytes).await?;
    s.flush().await
}

/// The code of an AuthenticationRequest body, and its data.
pub fn auth_code(body: &[u8]) -> Option<(u32, &[u8])> {
    let code = body.get(..4)?;
    Some((
        u32::from_be_bytes([code[0], code[1], code[2], code[3]]),
        &body[4..],
    ))
}

/// A SASLInitialResponse body: the mechanism and the client's first message.
pub fn sasl_initial(body: &[u8]) -> Option<(&str, &[u8])> {
    let end = body.iter().position(|&b| b == 0)?;
    let mech = std::str::from_utf8(&body[..end]).ok()?;
    let rest = &body[end + 1..];
    let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    let data = &rest[4..];
    (usize::try_from(len).ok()? == data.len()).then_some((mech, data))
}

/// A SASLInitialResponse for `mech` with `data`.
pub fn sasl_initial_message(mech: &str, data: &[u8]) -> Vec<u8> {
    let mut body = mech.as_bytes().to_vec();
    body.push(0);
    body.extend((data.len() as i32).to_be_bytes());
    body.extend(data);
    message(b'p', &body)
}

/// The SASL mechanisms of an AuthenticationSASL's data.
pub fn mechanisms(data: &[u8]) -> Vec<&str> {
    data.split(|&b| b == 0)
        .filter(|m| !m.is_empty())
        .filter_map(|m| std::str::from_utf8(m).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_are_read_whole_from_any_split_and_oversize_is_refused() {
        let mut stream = message(b'p', b"abc");
        stream.extend(message(b'R', &[0, 0, 0, 0]));
        for cut in 0..stream.len() {
            let (mut a, mut b) = tokio::io::duplex(64);
            let tail = stream[cut..].to_vec();
            let mut buf = stream[..cut].to_vec();
            tokio::spawn(async move { b.write_all(&tail).await });
            assert_eq!(
                read_message(&mut a, &mut buf).await.expect("first"),
                (b'p', b"abc".to_vec())
            );
            assert_eq!(
                read_message(&mut a, &mut buf).await.expect("second"),
                (b'R', vec![0; 4])
            );
        }
        let mut buf = vec![b'p', 0, 1, 0, 0];
        let (mut a, _b) = tokio::io::duplex(64);
        assert!(read_message(&mut a, &mut buf).await.is_err());
    }

    #[test]
    fn sasl_messages_parse_and_build() {
        let m = sasl_initial_message("SCRAM-SHA-256", b"n,,n=,r=x");
        assert_eq!(
            sasl_initial(&m[5..]),
            Some(("SCRAM-SHA-256", &b"n,,n=,r=x"[..]))
        );
        assert_eq!(
            sasl_initial(b"SCRAM\0\0\0\0\x09abc"),
            None,
            "length mismatch"
        );
        assert_eq!(sasl_initial(b"no terminator"), None);
        assert_eq!(
            mechanisms(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"),
            vec!["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
        );
    }
}
