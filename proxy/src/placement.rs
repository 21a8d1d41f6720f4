//! Which relay thread a new session runs on. The first relay thread accepts every
//! connection; by default each session goes to the thread with the fewest (an even spread,
//! where SO_REUSEPORT's hash was only even on average). With `--relay-fill N` the first
//! thread keeps new sessions until it holds N: one thread serving a light load spends less
//! CPU per transaction than two sharing it (each wake-up serves more ready sockets, fewer
//! threads sleep and wake: 18.2 against 22.0 us at `pgbench -S -c16`), but its sessions'
//! messages queue behind each other, which costs latency and throughput on other workloads
//! (6-9% at tpcb and prepared -S, 16 clients): docs/benchmarks.md. A session never changes
//! threads, so the fill is also a bound: at most N of a pool's connections opened at once
//! share the first thread.

use crate::metrics::{Metrics, ThreadLabel};
use prometheus_client::metrics::gauge::Gauge;
use std::sync::Arc;

/// The relay thread for a new session, given the sessions each holds now: the first while
/// it holds fewer than `fill`, else the one with the fewest (the first of equals).
pub fn choose(sessions: &[i64], fill: usize) -> usize {
    match sessions.first() {
        Some(&n) if usize::try_from(n).unwrap_or(0) < fill => 0,
        _ => (sessions.iter().enumerate())
            .min_by_key(|&(_, &n)| n)
            .map_or(0, |(i, _)| i),
    }
}

/// The sessions of each relay thread of one listener (the metric
/// `stolon_proxy_relay_thread_sessions` is the count itself).
pub struct Seats {
    counts: Vec<Gauge>,
    fill: usize,
}

impl Seats {
    pub fn new(threads: usize, fill: usize, metrics: &Metrics, listener: &str) -> Arc<Seats> {
        let counts = (0..threads.max(1))
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
        Arc::new(Seats { counts, fill })
    }

    /// Takes a seat on the thread `choose` picks. Only the accepting thread calls it, so
    /// no two sessions are placed on one count read.
    pub fn take(self: &Arc<Self>) -> Seat {
        let now: Vec<i64> = self.counts.iter().map(Gauge::get).collect();
        let thread = choose(&now, self.fill);
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
    pub thread: usize,
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.seats.counts[self.thread].dec();
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
        let seats = Seats::new(2, 2, &metrics, "test");
        let a = seats.take();
        let b = seats.take();
        let c = seats.take();
        assert_eq!((a.thread, b.thread, c.thread), (0, 0, 1));
        drop(a);
        // Thread 0 is below its fill again.
        assert_eq!(seats.take().thread, 0);
        drop(c);
        assert_eq!(seats.counts[1].get(), 0);
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
