//! Hold instead of refuse: while the proxy is in contact with the store but no master is
//! routed (the sentinel is fencing the proxies for a switchover or failover), or the routed
//! master refuses or does not answer the connection (it died and is not failed over yet),
//! a new session waits for the next route with nothing but its startup packet, then
//! connects and replays it. Bounded by `--hold-timeout` and `--hold-max-sessions`; past
//! either, the refusal it would have had. A proxy fenced because it lost the store never
//! holds (it refuses, and stops listening, as before).

use crate::metrics::{CloseReason, Metrics};
use crate::route::{NoMaster, Route};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How often a held session retries a master that refused the connection (the route may
/// stay the same until the sentinel fails it over).
const RETRY: Duration = Duration::from_millis(250);

/// The hold limits and the count of sessions held now (shared by every listener).
pub struct Hold {
    /// 0: never hold.
    pub timeout: Duration,
    pub max_sessions: usize,
    now: AtomicUsize,
    metrics: Arc<Metrics>,
}

impl Hold {
    pub fn new(timeout: Duration, max_sessions: usize, metrics: Arc<Metrics>) -> Hold {
        Hold {
            timeout,
            max_sessions,
            now: AtomicUsize::new(0),
            metrics,
        }
    }

    /// Off: every refusal is immediate (tests of the refusals, and `--hold-timeout 0`).
    pub fn off(metrics: Arc<Metrics>) -> Hold {
        Hold::new(Duration::ZERO, 0, metrics)
    }

    /// Starts holding a session, if the limits allow one more.
    pub fn start(self: &Arc<Self>) -> Option<Held> {
        if self.timeout.is_zero() {
            return None;
        }
        let prev = self.now.fetch_add(1, Ordering::AcqRel);
        if prev >= self.max_sessions {
            self.now.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        self.metrics.held.inc();
        self.metrics.holds.inc();
        Some(Held {
            hold: self.clone(),
            deadline: Instant::now() + self.timeout,
            since: Instant::now(),
        })
    }
}

/// Whether a refusal on the read-write listener may be held: in contact with the store with
/// no master routed, or a routed master that refused or did not answer the connection.
pub fn holdable(route: &Route, reason: CloseReason) -> bool {
    matches!(
        (&route.master, reason),
        (Err(NoMaster::NoMasterDb), CloseReason::RejectedNoMaster)
            | (Ok(_), CloseReason::BackendUnreachable)
    )
}

/// One held session; counted until dropped.
pub struct Held {
    hold: Arc<Hold>,
    deadline: Instant,
    since: Instant,
}

impl Held {
    /// Waits for the next route (`changed`), for a retry tick when the master refused, or
    /// for the deadline: false once the deadline passed.
    pub async fn wait(&self, changed: impl std::future::Future<Output = ()>, retry: bool) -> bool {
        let tick = async {
            if retry {
                tokio::time::sleep(RETRY).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            _ = changed => true,
            _ = tick => Instant::now() < self.deadline,
            _ = tokio::time::sleep_until(self.deadline) => false,
        }
    }

    pub fn held_for(&self) -> Duration {
        self.since.elapsed()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.hold.now.fetch_sub(1, Ordering::AcqRel);
        self.hold.metrics.held.dec();
    }
}
