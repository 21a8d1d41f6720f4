//! Sessions move between relay threads as the load changes (packing, see `placement`).
//! Every `PERIOD` the balancer reads each relay thread's CPU time from the kernel; when the
//! busiest thread is over `--relay-busy` it asks part of its sessions to leave for the
//! least busy one, and when the whole load would fit the first thread with room to spare,
//! the other threads' sessions come back to it. A session leaves only at a transaction
//! boundary with nothing of it in the proxy's buffers (the relay's stop, as for a drain),
//! as its two sockets: out of one thread's reactor, into the other's, its state with it.
//! Neither its client nor its server sees anything. Plaintext sessions only: a TLS side
//! keeps its thread.

use crate::conn::Ctx;
use crate::placement::{Seat, Seats};
use crate::session::Known;
use crate::stream::Stream;
use std::cell::RefCell;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;

/// How often the balancer measures and decides: long enough that a period's CPU time
/// says something, short enough that a load's change is followed within a second.
pub const PERIOD: Duration = Duration::from_millis(250);

/// The others' sessions come back to the first thread when all threads together use less
/// than this share of the busy limit (the gap to the limit keeps them from coming and
/// going at one load).
const GATHER_PERCENT: u32 = 60;

/// One period's decision: `sessions` of thread `from` leave for thread `to` at their next
/// boundary.
#[derive(Debug, PartialEq, Eq)]
pub struct Move {
    pub from: usize,
    pub to: usize,
    pub sessions: i64,
}

/// The balancer's decision, given each thread's CPU use over the last period and its
/// sessions (thousandths of a core, and `limit` too). At most one move per period.
/// - Gather: the whole load is under `GATHER_PERCENT` of the limit: the sessions of the
///   busiest other thread holding any go back to the first.
/// - Spread: the busiest thread is over the limit and the least busy has room (a quarter
///   of the limit less): enough of its sessions to even the two leave for the least busy,
///   never so many that the receiver would end up as busy as the giver was.
pub fn plan(busy: &[u32], sessions: &[i64], limit: u32) -> Option<Move> {
    if busy.len() < 2 || busy.len() != sessions.len() || limit == 0 {
        return None;
    }
    let total: u64 = busy.iter().map(|&b| u64::from(b)).sum();
    if total < u64::from(limit) * u64::from(GATHER_PERCENT) / 100 {
        return (1..busy.len())
            .filter(|&i| sessions[i] > 0)
            .max_by_key(|&i| busy[i])
            .map(|from| Move {
                from,
                to: 0,
                sessions: sessions[from],
            });
    }
    let hi = (0..busy.len()).max_by_key(|&i| (busy[i], std::cmp::Reverse(i)))?;
    let lo = (0..busy.len()).min_by_key(|&i| (busy[i], i))?;
    let (b_hi, b_lo) = (i64::from(busy[hi]), i64::from(busy[lo]));
    if busy[hi] <= limit || b_hi - b_lo <= i64::from(limit / 4) || sessions[hi] < 2 {
        return None;
    }
    // Half the difference, as a share of the busiest thread's sessions (rounded up).
    let n = ((sessions[hi] * (b_hi - b_lo) + 2 * b_hi - 1) / (2 * b_hi)).clamp(1, sessions[hi] - 1);
    // No move if, at the busiest thread's load per session, the receiver would end up at
    // least as busy as the giver is now: it would only swap which thread is over the limit,
    // and the next period would move the sessions back (seen with two sessions a thread).
    // Rounding up to whole sessions overshoots that far only for a single session.
    if b_lo * sessions[hi] + n * b_hi >= b_hi * sessions[hi] {
        return None;
    }
    Some(Move {
        from: hi,
        to: lo,
        sessions: n,
    })
}

/// A relay thread's CPU time so far (nanoseconds), from the kernel's scheduler statistics.
fn cpu_time(schedstat: &std::path::Path) -> Option<u64> {
    let text = std::fs::read_to_string(schedstat).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Where the kernel counts the calling thread's CPU time.
pub(crate) fn own_schedstat() -> Option<std::path::PathBuf> {
    let me = std::fs::read_link("/proc/thread-self").ok()?;
    Some(std::path::Path::new("/proc").join(me).join("schedstat"))
}

/// Measures and decides every `PERIOD` until `stop` (on the accepting thread).
pub(crate) async fn run(seats: Arc<Seats>, stop: CancellationToken) {
    if !seats.packing() {
        return;
    }
    let mut last: Vec<Option<u64>> = vec![None; seats.threads.len()];
    let mut at = Instant::now();
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let wall = now.duration_since(at).as_nanos().max(1);
        at = now;
        let Some(busy) = measure(&seats, &mut last, wall) else {
            tracing::warn!(
                "cannot read the relay threads' CPU time (/proc/thread-self/schedstat): \
                 sessions spread over the threads instead of packing"
            );
            seats.unmeasured();
            return;
        };
        let decision = plan(&busy, &seats.counts(), seats.busy_limit);
        for (i, t) in seats.threads.iter().enumerate() {
            let quota = match &decision {
                Some(m) if m.from == i => {
                    t.dest.store(m.to, Ordering::Relaxed);
                    m.sessions
                }
                _ => 0,
            };
            // Release: a session that takes a leave (`Thread::take_leave`) sees its `dest`.
            t.quota.store(quota, Ordering::Release);
        }
        if let Some(m) = decision {
            tracing::debug!(?busy, ?m, "relay threads: sessions move");
        }
    }
}

/// Each relay thread's CPU use since the last measure (`last`, updated), in thousandths of
/// a core over `wall` nanoseconds, also kept for placing new sessions; a thread not
/// started yet counts 0. `None` if a started thread's CPU time cannot be read.
fn measure(seats: &Seats, last: &mut [Option<u64>], wall: u128) -> Option<Vec<u32>> {
    let mut busy = Vec::with_capacity(last.len());
    for (t, last) in seats.threads.iter().zip(last.iter_mut()) {
        let Some((_, _, path)) = t.home.get() else {
            busy.push(0);
            continue;
        };
        let rail = t.rail.get().map_or(Some(0), |p| cpu_time(p))?;
        let cpu = cpu_time(path)? + rail;
        let used = last.map_or(0, |l| u128::from(cpu.saturating_sub(l)));
        *last = Some(cpu);
        let b = u32::try_from(used * 1000 / wall).unwrap_or(u32::MAX);
        t.busy.store(b, Ordering::Relaxed);
        busy.push(b);
    }
    Some(busy)
}

/// What a session's task owns besides the session: its seat, its place under the
/// connection limit, and the proxy's context, which go with it when it moves.
pub(crate) struct Home {
    pub seat: Seat,
    /// Held, not read: the session's place under `--max-connections` until it ends.
    pub _permit: OwnedSemaphorePermit,
    pub ctx: Arc<Ctx>,
}

tokio::task_local! {
    /// The running session's `Home` (taken when it moves to another thread's task).
    pub(crate) static HOME: RefCell<Option<Home>>;
}

/// The balancer's ask of the running session's thread, if sessions may move: the relay
/// checks it at each boundary (`Thread::take_leave`).
pub(crate) fn this_thread() -> Option<(Arc<Seats>, usize)> {
    HOME.try_with(|h| {
        let h = h.borrow();
        let seat = &h.as_ref()?.seat;
        seat.seats()
            .packing()
            .then(|| (seat.seats().clone(), seat.thread()))
    })
    .ok()
    .flatten()
}

/// How a move went.
pub(crate) enum Hop {
    /// The session runs on another thread now: this task ends.
    Gone,
    /// It stays (the other thread is stopping, or a side is not plain TCP).
    Stay(Box<(Stream, Stream, Known)>),
    /// Its sockets could not be taken out of this thread's reactor: it ends.
    Lost,
}

/// Moves the session to the thread the balancer named for this one.
pub(crate) fn hop(client: Stream, server: Stream, k: Known) -> Hop {
    let Some(mut home) = HOME.try_with(|h| h.borrow_mut().take()).ok().flatten() else {
        return Hop::Stay(Box::new((client, server, k)));
    };
    let stay = |home: Home, client, server, k| {
        let _ = HOME.try_with(|h| *h.borrow_mut() = Some(home));
        Hop::Stay(Box::new((client, server, k)))
    };
    let Some((to, handle, token)) = target(&home.seat) else {
        return stay(home, client, server, k);
    };
    let (c, s) = match (client, server) {
        (Stream::Plain(c), Stream::Plain(s)) => (c, s),
        (client, server) => return stay(home, client, server, k),
    };
    let (Ok(c), Ok(s)) = (c.into_std(), s.into_std()) else {
        tracing::warn!("cannot take a session's sockets off its relay thread");
        return Hop::Lost;
    };
    home.seat.moved_to(to);
    home.ctx.metrics.rebalanced.inc();
    let ctx = home.ctx.clone();
    let resume = async move {
        resume((c, s), k, &ctx).await;
        drop(token);
    };
    // Boxed: the session's future would otherwise contain itself (it runs `hop`).
    let task: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
        Box::pin(HOME.scope(RefCell::new(Some(home)), resume));
    drop(handle.spawn(task));
    Hop::Gone
}

/// The thread the balancer named for this seat's sessions, its runtime, and a place in its
/// tracker: taken before anything else, so a stopping thread (closed tracker) takes no
/// session, and one that takes it waits for it.
fn target(seat: &Seat) -> Option<(usize, tokio::runtime::Handle, TaskTrackerToken)> {
    let seats = seat.seats();
    let from = seat.thread();
    let to = seats.threads[from].dest.load(Ordering::Relaxed);
    let (handle, tracker, _) = seats.threads.get(to).filter(|_| to != from)?.home.get()?;
    let token = tracker.token();
    (!tracker.is_closed()).then(|| (to, handle.clone(), token))
}

/// The session's relay on its new thread, to its end.
async fn resume((c, s): (std::net::TcpStream, std::net::TcpStream), k: Known, ctx: &Ctx) {
    use tokio::net::TcpStream;
    let reason = match (TcpStream::from_std(c), TcpStream::from_std(s)) {
        (Ok(c), Ok(s)) => {
            let (c, s) = (Stream::Plain(c), Some(Stream::Plain(s)));
            crate::session::run_from(c, s, k, ctx).await
        }
        _ => {
            tracing::warn!("cannot take a session's sockets on its new relay thread");
            crate::metrics::CloseReason::IoError
        }
    };
    crate::conn::count_close(ctx, reason);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mv(from: usize, to: usize, sessions: i64) -> Option<Move> {
        Some(Move { from, to, sessions })
    }

    #[test]
    fn the_busy_thread_gives_half_its_excess_and_a_light_load_gathers() {
        let cases: &[(&[u32], &[i64], Option<Move>)] = &[
            // Under the limit: stays (no gather: nothing elsewhere).
            (&[500, 0], &[16, 0], None),
            // Over it: half the difference, as a share of its sessions.
            (&[900, 0], &[16, 0], mv(0, 1, 8)),
            (&[900, 300], &[16, 4], mv(0, 1, 6)),
            // Over it, but the other is nearly as busy: stays.
            (&[900, 800], &[8, 8], None),
            // A single session cannot be split.
            (&[950, 0], &[1, 0], None),
            // A light load: the other thread's sessions come back.
            (&[200, 200], &[8, 8], mv(1, 0, 8)),
            (&[100, 50, 200], &[4, 2, 3], mv(2, 0, 3)),
            // Light, and all on the first already.
            (&[300, 0], &[16, 0], None),
            // The busiest may be another thread.
            (&[100, 900, 0], &[2, 10, 0], mv(1, 2, 5)),
            // Two sessions each: one more would put the receiver where the giver was (and
            // the next period would send it back).
            (&[790, 560], &[2, 2], None),
            (&[960, 400], &[3, 1], mv(0, 1, 1)),
            // One thread, or no limit: never.
            (&[950], &[16], None),
            (&[950, 0], &[16, 0], None),
        ];
        for (i, &(busy, sessions, ref want)) in cases.iter().enumerate() {
            let limit = if i == cases.len() - 1 { 0 } else { 750 };
            assert_eq!(&plan(busy, sessions, limit), want, "{busy:?} {sessions:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn without_the_threads_cpu_time_sessions_spread() {
        let metrics = crate::metrics::Metrics::default();
        let seats = Seats::new(2, (0, 750), &metrics, "test");
        for t in &seats.threads {
            let home = (
                tokio::runtime::Handle::current(),
                tokio_util::task::TaskTracker::new(),
                std::path::PathBuf::from("/nonexistent/schedstat"),
            );
            assert!(t.home.set(home).is_ok());
        }
        assert!(seats.packing());
        // It gives up at its first measure.
        run(seats.clone(), CancellationToken::new()).await;
        assert!(!seats.packing());
        let (a, b) = (seats.take(), seats.take());
        assert_eq!((a.thread(), b.thread()), (0, 1), "spread");
    }

    #[test]
    fn a_thread_reads_its_own_cpu_time() {
        let path = own_schedstat().expect("/proc/thread-self");
        let before = cpu_time(&path).expect("schedstat");
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(20) {
            std::hint::black_box(0u64);
        }
        assert!(cpu_time(&path).expect("schedstat") > before);
    }

    proptest! {
        /// A move always goes between two threads, leaves the busy one a session, and
        /// never makes the receiving thread busier than the giving one was.
        #[test]
        fn moves_are_sane(
            busy in proptest::collection::vec(0u32..2000, 2..6),
            seed in proptest::collection::vec(0i64..200, 6),
            limit in 1u32..1500,
        ) {
            let sessions = &seed[..busy.len()];
            if let Some(m) = plan(&busy, sessions, limit) {
                prop_assert!(m.from != m.to && m.from < busy.len() && m.to < busy.len());
                prop_assert!(m.sessions >= 1 && m.sessions <= sessions[m.from]);
                let total: u64 = busy.iter().map(|&b| u64::from(b)).sum();
                if total * 100 < u64::from(limit) * 60 {
                    prop_assert_eq!(m.to, 0);
                    prop_assert_eq!(m.sessions, sessions[m.from], "a gather takes all");
                } else {
                    prop_assert!(busy[m.from] > limit && busy[m.to] < busy[m.from]);
                    prop_assert!(m.sessions < sessions[m.from]);
                    // The receiver ends below the giver's load, at its load per session.
                    let (b_from, b_to) = (i64::from(busy[m.from]), i64::from(busy[m.to]));
                    prop_assert!(b_to * sessions[m.from] + m.sessions * b_from < b_from * sessions[m.from]);
                }
            }
        }
    }
}
