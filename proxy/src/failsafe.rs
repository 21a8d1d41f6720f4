//! Failsafe mode in the proxy: while its store contact is going stale, the proxy asks the
//! master's keeper, directly, whether it holds the failsafe (`/failsafe/confirm?db=D`); the
//! answer says for how long, and the proxy may keep routing to that master until then
//! (`fence::StoreContact::confirm`). A hold ends before any other keeper can be promoted
//! (docs/design.md "Failsafe mode"), so routing within it never reaches a second master.

use crate::metrics::{Metrics, ResultLabel};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Whom to ask, and from when: set by the discovery loop from the last clusterdata and its
/// store contact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The master keeper's failsafe address (host:port) and the master db.
    pub address: String,
    pub db: String,
    /// How often to ask (the failsafe timing's `ask_every`).
    pub every: Duration,
    /// Ask from then on: half the proxyTimeout after the last store contact (a fresh
    /// contact needs no confirmation, and a thousand proxies must not ask all the time).
    pub from: Instant,
}

/// Asks while a target is set and due; sends each confirmation's end on `out`. A refused
/// or failed request sends nothing: the last confirmed end stays true (a hold cannot end
/// before the end its master stated, its acknowledgements cannot be taken back), so one
/// lost request does not fence the proxy early.
pub async fn run(
    mut target: watch::Receiver<Option<Target>>,
    out: watch::Sender<Option<Instant>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        let t = target.borrow_and_update().clone();
        let wait = match &t {
            None => None,
            Some(t) if Instant::now() < t.from => Some(t.from),
            Some(t) => Some(Instant::now() + t.every),
        };
        if let Some(t) = t.filter(|t| Instant::now() >= t.from) {
            let until = confirm(&t).await;
            let result = if until.is_some() { "held" } else { "refused" };
            metrics
                .failsafe_confirms
                .get_or_create(&ResultLabel { result })
                .inc();
            if until.is_some() {
                out.send_replace(until);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = target.changed() => {}
            _ = sleep_until_opt(wait) => {}
        }
    }
}

/// One confirmation: the end of the master's hold as this proxy may count it (from the
/// request's send time), or `None`.
async fn confirm(t: &Target) -> Option<Instant> {
    let sent = Instant::now();
    let path = format!("/failsafe/confirm?db={}", t.db);
    match control::peer_http::get(&t.address, &path, t.every).await {
        Ok((200, body)) => {
            let left = remaining_ms(&body)?;
            Some(sent + Duration::from_millis(left))
        }
        Ok((code, body)) => {
            tracing::debug!(code, %body, "failsafe: the master's keeper does not confirm a hold");
            None
        }
        Err(e) => {
            tracing::debug!(error = %e, address = %t.address, "failsafe: the master's keeper cannot be asked");
            None
        }
    }
}

/// `remaining_ms` from the keeper's answer (`{"db":"d1","remaining_ms":1234}`).
fn remaining_ms(body: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v.get("remaining_ms")?.as_u64()
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_is_left_of_the_hold() {
        assert_eq!(
            remaining_ms("{\"db\":\"d1\",\"remaining_ms\":1234}"),
            Some(1234)
        );
        for bad in [
            "",
            "{}",
            "{\"remaining_ms\":-1}",
            "{\"remaining_ms\":\"5\"}",
            "x",
        ] {
            assert_eq!(remaining_ms(bad), None, "{bad:?}");
        }
    }

    /// Against a real listener answering as a holding keeper: a confirmation is sent once
    /// due, and ends as the keeper said; a refusal is counted and leaves it as it was.
    #[tokio::test]
    async fn confirms_once_due_and_reports_a_refusal() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = l.local_addr().expect("addr").to_string();
        let answers = [
            "200 OK\r\n\r\n{\"db\":\"d1\",\"remaining_ms\":5000}",
            "503 No\r\n\r\n{}",
        ];
        let server = tokio::spawn(async move {
            for a in answers {
                let (mut s, _) = l.accept().await.expect("accept");
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).await.expect("read");
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                assert!(req.starts_with("GET /failsafe/confirm?db=d1 "), "{req}");
                s.write_all(format!("HTTP/1.0 {a}").as_bytes())
                    .await
                    .expect("write");
            }
        });
        let (target_tx, target_rx) = watch::channel(None);
        let (out_tx, mut out_rx) = watch::channel(None);
        let stop = CancellationToken::new();
        let metrics = Arc::new(Metrics::default());
        let task = tokio::spawn(run(target_rx, out_tx, metrics.clone(), stop.clone()));
        let start = Instant::now();
        target_tx.send_replace(Some(Target {
            address,
            db: "d1".into(),
            every: Duration::from_millis(100),
            from: start + Duration::from_millis(200),
        }));
        out_rx.changed().await.expect("a confirmation");
        let until = (*out_rx.borrow_and_update()).expect("held");
        assert!(
            until >= start + Duration::from_millis(5200),
            "asked only once due"
        );
        server.await.expect("server");
        let refused = || {
            metrics
                .failsafe_confirms
                .get_or_create(&ResultLabel { result: "refused" })
                .get()
        };
        let end = Instant::now() + Duration::from_secs(5);
        while refused() == 0 {
            assert!(Instant::now() < end, "the refusal is counted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            *out_rx.borrow(),
            Some(until),
            "the last confirmed end stays"
        );
        stop.cancel();
        task.await.expect("task");
    }
}
