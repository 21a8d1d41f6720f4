//! A moving session's login on the master-to-be before it is routed. Between a master's
//! fencing and the new one's publication (a switchover's drain, stop and promotion; a
//! failover's election and promotion) the store already names the db that is to be the
//! master. A moving session logs in there meanwhile and replays its state (a standby
//! accepts both; a session opened during recovery writes once the server is promoted), so
//! that once the master is routed the move costs nothing more. The prepared session is used
//! only if the routed master is the very address it was opened on and its socket is quiet
//! (the server ended nothing meanwhile); otherwise it is dropped and the move logs in anew.

use super::{Attempt, Opened};
use crate::metrics::Metrics;
use std::sync::Arc;

/// The PostgreSQL 14+ parameter a standby reports as `on`: the prepared session's server is
/// promoted by the time it is used (and reports `off` at its next answer), so the client is
/// not told.
const IN_HOT_STANDBY: &str = "in_hot_standby";

pub(super) struct Early<'a> {
    metrics: &'a Metrics,
    /// The master-to-be last tried: tried once each.
    tried: Option<Arc<str>>,
    /// The session prepared there.
    opened: Option<(Arc<str>, Opened)>,
}

impl<'a> Early<'a> {
    pub fn new(metrics: &'a Metrics) -> Self {
        Early {
            metrics,
            tried: None,
            opened: None,
        }
    }

    /// Whether `next` has not been tried yet.
    pub fn worth_trying(&self, next: &Arc<str>) -> bool {
        self.tried.as_deref() != Some(&**next)
    }

    /// Keeps the outcome of a try on `next` (replacing what an earlier master-to-be gave).
    pub fn prepared(&mut self, next: Arc<str>, outcome: Result<Opened, Attempt>) {
        self.tried = Some(next.clone());
        self.discard();
        match outcome {
            Ok(mut o) => {
                o.reports = without_parameter(&o.reports, IN_HOT_STANDBY);
                self.opened = Some((next, o));
            }
            Err(why) => {
                let why = match why {
                    Attempt::NotYet => "not reachable".to_string(),
                    Attempt::Refused(why) => why,
                    Attempt::ImplicitCalls => "implicit calls in its catalog".to_string(),
                };
                tracing::debug!(addr = &*next, why, "cannot prepare a moving session there");
                self.metrics.move_prepared("refused");
            }
        }
    }

    /// The session prepared on `addr`, now routed, if it is still quiet.
    pub async fn take(&mut self, addr: &Arc<str>) -> Option<Opened> {
        match self.opened.take() {
            Some((at, o)) if at == *addr && quiet(&o.server) => {
                self.metrics.move_prepared("used");
                Some(o)
            }
            Some((_, mut o)) => {
                self.metrics.move_prepared("discarded");
                super::leave(&mut o.server).await;
                None
            }
            None => None,
        }
    }

    fn discard(&mut self) {
        if self.opened.take().is_some() {
            self.metrics.move_prepared("discarded");
        }
    }
}

impl Drop for Early<'_> {
    fn drop(&mut self) {
        self.discard();
    }
}

/// Whether nothing came from the server since the prepared session's replay: an idle
/// backend sends nothing unasked but its end (an error, the socket's close).
fn quiet(server: &crate::stream::Stream) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    // The socket is non-blocking: nothing to read is WouldBlock.
    matches!(
        socket2::SockRef::from(server.tcp()).peek(&mut byte),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
    )
}

/// `messages` without the ParameterStatus messages for `name`.
fn without_parameter(messages: &[u8], name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(messages.len());
    let mut rest = messages;
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let end = (1 + len).min(rest.len());
        let (m, tail) = rest.split_at(end);
        let named = m[0] == b'S'
            && crate::session_start::parameter(&m[5.min(m.len())..])
                .is_some_and(|(n, _)| n == name);
        if !named {
            out.extend_from_slice(m);
        }
        rest = tail;
    }
    out.extend_from_slice(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::wire::message;

    /// A prepared session is used only while nothing came from its server: a byte (an
    /// error, a notice) or the socket's end makes it stale.
    #[tokio::test]
    async fn a_prepared_session_is_quiet_until_its_server_says_or_ends_anything() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        for end in ["a byte", "a close"] {
            let ours = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (mut theirs, _) = listener.accept().await.expect("accept");
            let ours = crate::stream::Stream::Plain(ours);
            assert!(quiet(&ours), "{end}: nothing sent yet");
            match end {
                "a byte" => theirs.write_all(b"E").await.expect("write"),
                _ => drop(theirs),
            }
            let mut stale = false;
            for _ in 0..200 {
                if !quiet(&ours) {
                    stale = true;
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            assert!(stale, "{end} makes it stale");
        }
    }

    #[test]
    fn in_hot_standby_is_not_told() {
        let param = |n: &str, v: &str| message(b'S', format!("{n}\0{v}\0").as_bytes());
        let notice = message(b'N', b"SNOTICE\0\0");
        let all = [
            param("in_hot_standby", "on"),
            notice.clone(),
            param("TimeZone", "UTC"),
        ]
        .concat();
        let kept = without_parameter(&all, IN_HOT_STANDBY);
        assert_eq!(kept, [notice, param("TimeZone", "UTC")].concat());
        assert_eq!(without_parameter(&[], IN_HOT_STANDBY), Vec::<u8>::new());
        // A truncated tail is kept as it is (the caller's bytes, not the proxy's to judge).
        assert_eq!(
            without_parameter(b"S\0\0", IN_HOT_STANDBY),
            b"S\0\0".to_vec()
        );
    }
}
