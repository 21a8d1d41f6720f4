//! Store-contact fencing, as a pure state machine over a clock the caller passes in: a
//! proxy with no successful store contact for proxyTimeout must close everything and refuse
//! new sessions (consistency over availability). Contact is timed from when the successful
//! request was SENT, so the proxy fences no later than the sentinel may assume it has.
//! In failsafe mode the master's keeper may extend that, directly: until the end of its
//! own failsafe hold, which no new master can outlast (docs/design.md "Failsafe mode").

use std::time::Duration;
use tokio::time::Instant;

#[derive(Clone, Debug)]
pub struct StoreContact {
    timeout: Duration,
    /// When the last request that then succeeded was sent; `None` before the first.
    last_ok: Option<Instant>,
    /// Until when the master's keeper confirmed its failsafe hold (from the request's
    /// send time plus what it said was left).
    failsafe_until: Option<Instant>,
}

impl StoreContact {
    pub fn new(timeout: Duration) -> Self {
        StoreContact {
            timeout,
            last_ok: None,
            failsafe_until: None,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// proxyTimeout comes from the cluster spec and may change.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// A request sent at `sent` succeeded.
    pub fn ok(&mut self, sent: Instant) {
        if self.last_ok.is_none_or(|t| sent > t) {
            self.last_ok = Some(sent);
        }
    }

    /// The master's keeper confirmed its failsafe hold until `until` (a later confirmation
    /// extends it; none takes it back: a hold cannot end before its stated end).
    pub fn confirm(&mut self, until: Option<Instant>) {
        self.failsafe_until = self.failsafe_until.max(until);
    }

    /// The store-contact deadline alone.
    pub fn store_deadline(&self) -> Option<Instant> {
        self.last_ok.map(|t| t + self.timeout)
    }

    /// When the last successful store request was sent.
    pub fn last_ok(&self) -> Option<Instant> {
        self.last_ok
    }

    /// The instant the proxy must be fenced from, if contact does not come back: the store
    /// deadline, or a later end of the master's confirmed failsafe hold. Never before the
    /// first store contact.
    pub fn deadline(&self) -> Option<Instant> {
        let store = self.store_deadline()?;
        Some(self.failsafe_until.map_or(store, |f| f.max(store)))
    }

    /// The deadline is the failsafe's, not the store's, at `now`.
    pub fn on_failsafe(&self, now: Instant) -> bool {
        self.store_deadline().is_some_and(|d| now >= d) && !self.is_fenced(now)
    }

    pub fn is_fenced(&self, now: Instant) -> bool {
        self.deadline().is_none_or(|d| now >= d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn fenced_until_first_contact_then_after_timeout() {
        let mut c = StoreContact::new(Duration::from_secs(15));
        assert!(c.is_fenced(Instant::now()), "no contact yet");
        let sent = Instant::now();
        tokio::time::advance(Duration::from_millis(200)).await;
        c.ok(sent);
        assert!(!c.is_fenced(Instant::now()));
        tokio::time::advance(Duration::from_millis(14_700)).await;
        assert!(!c.is_fenced(Instant::now()), "14.9 s after the send");
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(
            c.is_fenced(Instant::now()),
            "15 s after the send, not the answer"
        );
        // Contact returns: unfenced.
        c.ok(Instant::now());
        assert!(!c.is_fenced(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_confirmed_failsafe_hold_extends_the_deadline_never_shortens_it() {
        let mut c = StoreContact::new(Duration::from_secs(3));
        c.confirm(Some(Instant::now() + Duration::from_secs(2)));
        assert!(
            c.is_fenced(Instant::now()),
            "no store contact yet: fenced anyway"
        );
        c.ok(Instant::now());
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(
            c.is_fenced(Instant::now()),
            "store deadline and hold both passed"
        );
        c.confirm(Some(Instant::now() + Duration::from_secs(1)));
        assert!(!c.is_fenced(Instant::now()), "a newer hold");
        assert!(c.on_failsafe(Instant::now()));
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(!c.is_fenced(Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(c.is_fenced(Instant::now()), "the hold's end");
        assert!(!c.on_failsafe(Instant::now()));
        // A confirmation shorter than the store deadline does not shorten it, nor does an
        // older or a missing one take a confirmed end back.
        c.ok(Instant::now());
        c.confirm(Some(Instant::now()));
        c.confirm(None);
        tokio::time::advance(Duration::from_millis(2999)).await;
        assert!(!c.is_fenced(Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(c.is_fenced(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn an_older_success_does_not_move_the_deadline_back() {
        let mut c = StoreContact::new(Duration::from_secs(10));
        let early = Instant::now();
        tokio::time::advance(Duration::from_secs(5)).await;
        let late = Instant::now();
        c.ok(late);
        c.ok(early);
        assert_eq!(c.deadline(), Some(late + Duration::from_secs(10)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_shorter_timeout_applies_at_once() {
        let mut c = StoreContact::new(Duration::from_secs(15));
        c.ok(Instant::now());
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(!c.is_fenced(Instant::now()));
        c.set_timeout(Duration::from_secs(5));
        assert!(c.is_fenced(Instant::now()));
    }
}
