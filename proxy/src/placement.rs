//! Which relay thread a session runs on. The first relay thread accepts every connection.
//! By default sessions are packed: each goes to the first thread whose CPU use over the
//! balancer's last period is under `--relay-busy` (of one core), and the balancer
//! (`balance`) moves sessions between threads at their transaction boundaries as the load
//! changes: one thread serving a load spends less CPU per transaction than two sharing it
//! (each wake-up serves more ready sockets, fewer threads sleep and wake: 11.7 against 13.3
//! us at `pgbench -S -c16`, docs/benchmarks.md), and a thread that gets busy hands part of
//! its sessions to the least busy. With `--relay-busy 0` sessions are spread instead and
//! never move: each goes to the thread with the fewest, or to the first until it holds
//! `--relay-fill`.

use crate::metrics::{Metrics, ThreadLabel};
use prometheus_client::metrics::gauge::Gauge;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use tokio_util::task::TaskTracker;

/// The relay thread for a new session when spreading, given the sessions each holds now:
/// the first while it holds fewer than `fill`, else the one with the fewest (the first of
/// equals).
pub fn choose(sessions: &[i64], fill: usize) -> usize {
    match sessions.first() {
        Some(&n) if usize::try_from(n).unwrap_or(0) < fill => 0,
        _ => (sessions.iter().enumerate())
            .min_by_key(|&(_, &n)| n)
            .map_or(0, |(i, _)| i),
    }
}

/// The relay thread for a new session when packing, given each thread's CPU use (in
/// thousandths of a core): the first under `limit`, else the least busy.
pub fn choose_packed(busy: &[u32], limit: u32) -> usize {
    busy.iter().position(|&b| b < limit).unwrap_or_else(|| {
        (busy.iter().enumerate())
            .min_by_key(|&(_, &b)| b)
            .map_or(0, |(i, _)| i)
    })
}

/// What the balancer knows of one relay thread and asks of its sessions.
#[derive(Default)]
pub(crate) struct Thread {
    /// CPU use over the balancer's last period, in thousandths of a core.
    pub busy: AtomicU32,
    /// Sessions that should leave this thread at their next transaction boundary.
    pub quota: AtomicI64,
    /// The thread they go to.
    pub dest: AtomicUsize,
    /// Set when the thread starts: its runtime, its sessions' tracker and where the
    /// kernel counts its CPU time.
    pub home: OnceLock<(tokio::runtime::Handle, TaskTracker, std::path::PathBuf)>,
    /// Where the kernel counts the CPU time of the thread's relay rail (`rail`), if it
    /// has one: its sessions' relay, counted as the thread's.
    pub rail: OnceLock<std::path::PathBuf>,
}

impl Thread {
    /// Whether a session at a transaction boundary should leave now (it takes one of the
    /// quota's places).
    pub(crate) fn take_leave(&self) -> bool {
        self.quota.load(Ordering::Relaxed) > 0
            && (self.quota)
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |q| {
                    (q > 0).then(|| q - 1)
                })
                .is_ok()
    }
}

/// The sessions of each relay thread of one listener (the metric
/// `stolon_proxy_relay_thread_sessions` is the count itself), and the balancer's view.
pub struct Seats {
    counts: Vec<Gauge>,
    fill: usize,
    /// `--relay-busy` in thousandths of a core (0: spread, no moves).
    pub(crate) busy_limit: u32,
    /// Cleared when the threads' CPU time cannot be read: sessions spread instead.
    measured: AtomicBool,
    pub(crate) threads: Vec<Thread>,
}

impl Seats {
    pub fn new(
        threads: usize,
        (fill, busy_limit): (usize, u32),
        metrics: &Metrics,
        listener: &str,
    ) -> Arc<Seats> {
        let counts: Vec<Gauge> = (0..threads.max(1))
            .map(|i| {
                metrics
                    .relay_sessions
                    .get_or_create(&ThreadLabel {
                        listener: listener.to_string(),
                        thread: i.to_string(),
                    })
                    .clone()
            })
            .collect();
        let threads = counts.iter().map(|_| Thread::default()).collect();
        Arc::new(Seats {
            counts,
            fill,
            busy_limit,
            measured: AtomicBool::new(true),
            threads,
        })
    }

    /// Whether sessions are packed and moved (more than one thread, a busy limit, and the
    /// threads' CPU time can be read).
    pub(crate) fn packing(&self) -> bool {
        self.busy_limit > 0 && self.threads.len() > 1 && self.measured.load(Ordering::Relaxed)
    }

    /// The threads' CPU time cannot be read (no schedstat in this kernel, a hidden /proc):
    /// packing would keep every session on the first thread, so they spread from now on.
    pub(crate) fn unmeasured(&self) {
        self.measured.store(false, Ordering::Relaxed);
        for t in &self.threads {
            t.quota.store(0, Ordering::Relaxed);
        }
    }

    /// The sessions each thread holds now.
    pub(crate) fn counts(&self) -> Vec<i64> {
        self.counts.iter().map(Gauge::get).collect()
    }

    /// Takes a seat on the thread `choose` (spreading) or `choose_packed` picks. Only the
    /// accepting thread calls it, so no two sessions are placed on one count read.
    pub fn take(self: &Arc<Self>) -> Seat {
        let thread = if self.packing() {
            let busy: Vec<u32> = (self.threads.iter())
                .map(|t| t.busy.load(Ordering::Relaxed))
                .collect();
            choose_packed(&busy, self.busy_limit)
        } else {
            choose(&self.counts(), self.fill)
        };
        self.counts[thread].inc();
        Seat {
            seats: self.clone(),
            thread,
        }
    }
}

/// A session's place on a relay thread, given back when dropped (the session ended, or
/// it was refused).
pub struct Seat {
    seats: Arc<Seats>,
    thread: usize,
}

impl Seat {
    pub fn thread(&self) -> usize {
        self.thread
    }

    pub(crate) fn seats(&self) -> &Arc<Seats> {
        &self.seats
    }

    /// The session now runs on thread `to`.
    pub(crate) fn moved_to(&mut self, to: usize) {
        let from = std::mem::replace(&mut self.thread, to);
        self.seats.counts[from].dec();
        self.seats.counts[to].inc();
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.seats.counts[self.thread()].dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_first_thread_fills_then_the_fewest_take_the_rest() {
        let cases: &[(&[i64], usize, usize)] = &[
            (&[0, 0], 32, 0),
            (&[31, 0], 32, 0),
            (&[32, 0], 32, 1),
            (&[32, 5, 3], 32, 2),
            (&[32, 40, 40], 32, 0),
            (&[4, 4], 0, 0),
            (&[5, 4], 0, 1),
            (&[7], 0, 0),
            (&[], 32, 0),
        ];
        for &(sessions, fill, want) in cases {
            assert_eq!(choose(sessions, fill), want, "{sessions:?} fill {fill}");
        }
    }

    #[test]
    fn seats_count_sessions_and_give_them_back() {
        let metrics = Metrics::default();
        let seats = Seats::new(2, (2, 0), &metrics, "test");
        let a = seats.take();
        let b = seats.take();
        let c = seats.take();
        assert_eq!((a.thread(), b.thread(), c.thread()), (0, 0, 1));
        drop(a);
        // Thread 0 is below its fill again.
        assert_eq!(seats.take().thread(), 0);
        drop(c);
        assert_eq!(seats.counts[1].get(), 0);
    }

    #[test]
    fn packing_takes_the_first_thread_under_the_limit_else_the_least_busy() {
        let cases: &[(&[u32], u32, usize)] = &[
            (&[0, 0], 750, 0),
            (&[749, 0], 750, 0),
            (&[750, 0], 750, 1),
            (&[900, 800, 100], 750, 2),
            (&[900, 950, 800], 750, 2),
            (&[900, 900], 750, 0),
            (&[], 750, 0),
        ];
        for &(busy, limit, want) in cases {
            assert_eq!(choose_packed(busy, limit), want, "{busy:?} limit {limit}");
        }
    }

    #[test]
    fn a_moved_seat_counts_on_its_new_thread_and_the_quota_runs_out() {
        let metrics = Metrics::default();
        let seats = Seats::new(2, (0, 750), &metrics, "test");
        assert!(seats.packing());
        let (mut a, b) = (seats.take(), seats.take());
        assert_eq!((a.thread(), b.thread()), (0, 0), "packed while not busy");
        seats.threads[0].busy.store(800, Ordering::Relaxed);
        let c = seats.take();
        assert_eq!(c.thread(), 1, "the first is busy");
        a.moved_to(1);
        assert_eq!(seats.counts(), vec![1, 2]);
        drop(a);
        assert_eq!(seats.counts(), vec![1, 1]);
        drop((b, c));
        assert_eq!(seats.counts(), vec![0, 0]);
        let t = &seats.threads[1];
        assert!(!t.take_leave(), "no quota");
        t.quota.store(2, Ordering::Relaxed);
        assert!(t.take_leave() && t.take_leave() && !t.take_leave());
        assert_eq!(t.quota.load(Ordering::Relaxed), 0);
    }

    proptest! {
        /// Placing sessions one by one: the first thread never holds more than `fill`
        /// while another holds fewer than it, and past the fill the counts stay within
        /// one of each other.
        #[test]
        fn placement_is_bounded_and_even(threads in 1usize..8, fill in 0usize..40, n in 0usize..300) {
            let mut counts = vec![0i64; threads];
            for _ in 0..n {
                let t = choose(&counts, fill);
                prop_assert!(t < threads);
                counts[t] += 1;
            }
            let rest = &counts[1..];
            if let (Some(max), Some(min)) = (rest.iter().max(), rest.iter().min()) {
                prop_assert!(max - min <= 1, "{counts:?}");
                prop_assert!(counts[0] <= (fill as i64).max(*max + 1), "{counts:?}");
            }
        }
    }
}
