//! One bounded HTTP GET to another component's metrics listener (failsafe mode: a master
//! asking its peers, a proxy asking the master's keeper). The servers are ours (the axum
//! endpoint of `metrics`): HTTP/1.0, `Connection: close`, a small JSON body, so a plain
//! request on a socket does the job without a client library.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The largest answer read; ours are well under it.
const MAX_ANSWER: u64 = 16 * 1024;

/// `GET path_and_query` on `addr` (host:port), all within `timeout`: the status code and
/// the body.
pub async fn get(
    addr: &str,
    path_and_query: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = s.set_nodelay(true);
        let req = format!("GET {path_and_query} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut out = Vec::new();
        s.take(MAX_ANSWER)
            .read_to_end(&mut out)
            .await
            .map_err(|e| format!("read: {e}"))?;
        parse(&out)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

/// The status code and body of a whole HTTP/1.x response.
fn parse(raw: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "an incomplete answer".to_string())?;
    let code = head
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {:?}", head.lines().next()))?;
    Ok((code, body.trim_end().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_response_and_refuses_the_rest() {
        let ok = b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n{\"a\":1}\n";
        assert_eq!(parse(ok), Ok((200, "{\"a\":1}".into())));
        let no = b"HTTP/1.1 503 Service Unavailable\r\n\r\n";
        assert_eq!(parse(no), Ok((503, String::new())));
        for bad in [
            &b""[..],
            b"HTTP/1.0 200 OK\r\n",
            b"SSH-2.0\r\n\r\n",
            b"HTTP/1.0 2x0\r\n\r\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_silent_server_is_a_timeout_and_a_closed_port_an_error() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let r = get(&addr, "/x", Duration::from_millis(200)).await;
        assert!(r.is_err_and(|e| e.contains("no answer")));
        drop(l);
        assert!(get(&addr, "/x", Duration::from_secs(5)).await.is_err());
    }
}
