//! The acknowledged-write checker and the split-brain detector.
//!
//! Writers insert unique ids through the proxies in autocommit and record each
//! acknowledgement with the master's WAL insert position and the backend that took it.
//! Probes write every 200 ms through every proxy (on a kept-open session, so a session the
//! proxy failed to sever shows up) and directly into every PostgreSQL. Afterwards:
//! - no two backends accepted writes at the same time, and no backend accepted a write
//!   after another one had (A..B..A), unless the scenario expects the master to return;
//! - every acknowledged id is on the final master (synchronous replication: none missing;
//!   async: a missing one must lie within maxStandbyLag of where the new master's timeline
//!   forked).

use crate::cluster::Cluster;
use crate::sql;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

/// One acknowledged write (a writer's insert, or a probe's).
#[derive(Clone, Debug)]
pub struct Write {
    pub id: i64,
    /// Which PostgreSQL took it: `inet_server_addr():inet_server_port()`.
    pub backend: String,
    pub via: String,
    pub lsn: u64,
    pub start: Instant,
    pub end: Instant,
}

#[derive(Clone)]
struct Target {
    name: String,
    addr: String,
    port: u16,
}

pub struct Checker {
    pub t0: Instant,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    acks: Arc<Mutex<Vec<Write>>>,
    probes: Arc<Mutex<Vec<Write>>>,
    nemesis: Option<Instant>,
    /// What the writers' clients saw go wrong: failed connects and failed or hung writes.
    errors: Arc<AtomicUsize>,
}

static NEXT_ID: AtomicI64 = AtomicI64::new(1);

const INSERT: &str = "INSERT INTO e2e_acked (id) VALUES ($1) RETURNING \
    pg_current_wal_insert_lsn()::text, host(inet_server_addr()) || ':' || inet_server_port()::text";
const PROBE: &str = "INSERT INTO e2e_probe (src) VALUES ($1) RETURNING \
    host(inet_server_addr()) || ':' || inet_server_port()::text";

impl Checker {
    /// Starts two writers (through the proxies in turn) and a probe per proxy and per
    /// PostgreSQL.
    pub fn start(c: &Cluster) -> Checker {
        let all: Vec<&str> = c.proxies.iter().map(|p| p.name.as_str()).collect();
        Checker::start_on(c, &all)
    }

    /// As [`Checker::start`], through the named proxies only (the others may be frozen).
    pub fn start_on(c: &Cluster, names: &[&str]) -> Checker {
        let stop = CancellationToken::new();
        let acks = Arc::new(Mutex::new(Vec::new()));
        let probes = Arc::new(Mutex::new(Vec::new()));
        let proxies: Vec<Target> = c
            .proxies
            .iter()
            .filter(|p| names.contains(&p.name.as_str()))
            .map(|p| Target {
                name: p.name.clone(),
                addr: p.addr.clone(),
                port: p.port,
            })
            .collect();
        let direct = c.keepers.iter().map(|k| Target {
            name: format!("direct {}", k.uid),
            addr: k.addr.clone(),
            port: k.port,
        });
        let mut tasks = Vec::new();
        let errors = Arc::new(AtomicUsize::new(0));
        for w in 0..2 {
            let ts = proxies.clone();
            let e = errors.clone();
            tasks.push(tokio::spawn(writer(w, ts, stop.clone(), acks.clone(), e)));
        }
        for t in proxies.iter().cloned().chain(direct) {
            tasks.push(tokio::spawn(probe(t, stop.clone(), probes.clone())));
        }
        Checker {
            t0: Instant::now(),
            stop,
            tasks,
            acks,
            probes,
            nemesis: None,
            errors,
        }
    }

    /// Failed connects and failed or hung writes the writers' clients have seen so far.
    pub fn errors(&self) -> usize {
        self.errors.load(Ordering::Relaxed)
    }

    /// Marks the moment the nemesis strikes (figures are measured from here).
    pub fn nemesis(&mut self) -> Instant {
        let now = Instant::now();
        self.nemesis = Some(now);
        now
    }

    pub fn acked(&self) -> usize {
        self.acks.lock().map(|a| a.len()).unwrap_or(0)
    }

    /// Waits until `n` more writes were acknowledged (or `timeout`); true if they were.
    pub async fn wait_acks(&self, n: usize, timeout: Duration) -> bool {
        let target = self.acked() + n;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.acked() >= target {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    pub async fn stop(self) -> Report {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        let take = |m: &Arc<Mutex<Vec<Write>>>| m.lock().map(|v| v.clone()).unwrap_or_default();
        Report {
            acks: take(&self.acks),
            probes: take(&self.probes),
            nemesis: self.nemesis,
        }
    }
}

async fn writer(
    w: usize,
    targets: Vec<Target>,
    stop: CancellationToken,
    acks: Arc<Mutex<Vec<Write>>>,
    errors: Arc<AtomicUsize>,
) {
    let mut client: Option<Client> = None;
    let mut turn = w;
    while !stop.is_cancelled() {
        let t = &targets[turn % targets.len()];
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            turn += 1;
            client = sql::connect(&t.addr, t.port, Duration::from_secs(1))
                .await
                .ok();
            if client.is_none() {
                if !stop.is_cancelled() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        }
        let Some(c) = client.as_ref() else { continue };
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(2), c.query_one(INSERT, &[&id])).await;
        match r {
            Ok(Ok(row)) => {
                let lsn: String = row.get(0);
                let write = Write {
                    id,
                    backend: row.get(1),
                    via: t.name.clone(),
                    lsn: sql::parse_lsn(&lsn).unwrap_or(0),
                    start,
                    end: Instant::now(),
                };
                if let Ok(mut a) = acks.lock() {
                    a.push(write);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // A refused or hung write is not acknowledged: start over on a new session.
            _ => {
                if !stop.is_cancelled() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                cancel(client.take());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Drops a session whose statement hangs, cancelling the statement first: a commit waiting
/// for a synchronous standby would otherwise hold its backend (and a connection slot) for
/// as long as the wait lasts, and the suite's retries would exhaust max_connections.
fn cancel(client: Option<Client>) {
    if let Some(c) = client {
        let token = c.cancel_token();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                token.cancel_query(tokio_postgres::NoTls),
            )
            .await;
            drop(c);
        });
    }
}

async fn probe(t: Target, stop: CancellationToken, probes: Arc<Mutex<Vec<Write>>>) {
    let mut client: Option<Client> = None;
    while !stop.is_cancelled() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = sql::connect(&t.addr, t.port, Duration::from_secs(1))
                .await
                .ok();
        }
        let Some(c) = client.as_ref() else { continue };
        let start = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(1), c.query_one(PROBE, &[&t.name])).await;
        match r {
            Ok(Ok(row)) => {
                let w = Write {
                    id: 0,
                    backend: row.get(0),
                    via: t.name.clone(),
                    lsn: 0,
                    start,
                    end: Instant::now(),
                };
                if let Ok(mut p) = probes.lock() {
                    p.push(w);
                }
            }
            Ok(Err(_)) => {} // a standby refuses: keep the session
            Err(_) => cancel(client.take()),
        }
    }
}

#[derive(Debug)]
pub struct Report {
    pub acks: Vec<Write>,
    pub probes: Vec<Write>,
    pub nemesis: Option<Instant>,
}

impl Report {
    /// From the nemesis to the first acknowledged write on `backend` sent after it (one
    /// sent before can still land in the microseconds before a kill takes effect).
    pub fn resumed_after(&self, backend: &str) -> Option<Duration> {
        let n = self.nemesis?;
        self.acks
            .iter()
            .filter(|a| a.start > n && a.backend == backend)
            .map(|a| a.end - n)
            .min()
    }

    /// The longest time without an acknowledged write, from the nemesis on.
    pub fn max_gap(&self) -> Duration {
        let Some(n) = self.nemesis else {
            return Duration::ZERO;
        };
        let mut ends: Vec<Instant> = self.acks.iter().map(|a| a.end).filter(|e| *e > n).collect();
        ends.sort();
        let mut prev = n;
        let mut gap = Duration::ZERO;
        for e in ends {
            gap = gap.max(e - prev);
            prev = e;
        }
        gap
    }

    /// Writes (writers' and probes') that ended within [from, to], with their target.
    pub fn writes_between(&self, from: Instant, to: Instant) -> Vec<(String, String)> {
        self.acks
            .iter()
            .chain(&self.probes)
            .filter(|w| w.end >= from && w.end <= to)
            .map(|w| (w.via.clone(), w.backend.clone()))
            .collect()
    }

    /// Every acknowledged write, writers' and probes', by backend.
    pub fn backends(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for w in self.acks.iter().chain(&self.probes) {
            *m.entry(w.backend.clone()).or_insert(0) += 1;
        }
        m
    }

    /// A description of two masters at once, or None. See `split_brain`.
    pub fn split_brain(&self, master_may_return: bool) -> Option<String> {
        let all: Vec<Write> = self.acks.iter().chain(&self.probes).cloned().collect();
        split_brain(&all, master_may_return)
    }
}

/// Two masters at once, as the issue defines it:
/// - through the proxies (writers and proxy probes), two backends' writes overlap in time,
///   or (unless the scenario expects a master to come back) a backend took writes before
///   and after another one did (A..B..A);
/// - directly, a backend that had been the proxies' master took a write after another
///   backend took one through the proxies: an old master still writable after a new one
///   was promoted (what self-fencing prevents). A PostgreSQL the proxies never routed to
///   is not judged on direct writes: no client of the system can reach it.
pub fn split_brain(writes: &[Write], master_may_return: bool) -> Option<String> {
    let (direct, proxied): (Vec<&Write>, Vec<&Write>) =
        writes.iter().partition(|w| w.via.starts_with("direct "));
    if let Some(e) = overlap(&proxied) {
        return Some(e);
    }
    let mut by_end = proxied.clone();
    by_end.sort_by_key(|w| w.end);
    if !master_may_return {
        let mut runs: Vec<&Write> = Vec::new();
        for w in &by_end {
            if runs.last().is_none_or(|r| r.backend != w.backend) {
                if let Some(earlier) = runs.iter().find(|r| r.backend == w.backend) {
                    let between = runs.last().copied().unwrap_or(w);
                    return Some(format!(
                        "{} accepted writes (via {}), then {} (via {}), then {} again (via {})",
                        earlier.backend,
                        earlier.via,
                        between.backend,
                        between.via,
                        w.backend,
                        w.via
                    ));
                }
                runs.push(w);
            }
        }
    }
    for d in &direct {
        // The proxies' master before d: the last proxied write that ended before d began.
        let replaced_by = by_end
            .iter()
            .rev()
            .find(|p| p.end < d.start && p.backend != d.backend);
        let Some(newer) = replaced_by else { continue };
        let was_master = by_end
            .iter()
            .any(|p| p.backend == d.backend && p.end < newer.start);
        // Elected again later (a scenario with two failovers): the proxies route to it.
        let master_again = master_may_return
            && by_end
                .iter()
                .any(|p| p.backend == d.backend && p.end > newer.end);
        if was_master && !master_again {
            return Some(format!(
                "old master {} took a direct write after {} took one through {}",
                d.backend, newer.backend, newer.via
            ));
        }
    }
    None
}

/// Two writes on different backends whose intervals overlap.
fn overlap(writes: &[&Write]) -> Option<String> {
    let mut by_start = writes.to_vec();
    by_start.sort_by_key(|w| w.start);
    // The latest-ending write so far per backend: a later-starting write of another
    // backend that starts before it ends overlaps it.
    let mut last_end: BTreeMap<&str, &Write> = BTreeMap::new();
    for w in &by_start {
        for (b, prev) in &last_end {
            if *b != w.backend && prev.end > w.start {
                return Some(format!(
                    "{} (via {}) and {} (via {}) accepted writes at the same time",
                    prev.backend, prev.via, w.backend, w.via
                ));
            }
        }
        let e = last_end.entry(w.backend.as_str()).or_insert(w);
        if w.end > e.end {
            *e = w;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(backend: &str, t0: Instant, start_ms: u64, end_ms: u64) -> Write {
        via(backend, "p1", t0, start_ms, end_ms)
    }

    fn d(backend: &str, t0: Instant, start_ms: u64, end_ms: u64) -> Write {
        via(backend, &format!("direct {backend}"), t0, start_ms, end_ms)
    }

    fn via(backend: &str, via: &str, t0: Instant, start_ms: u64, end_ms: u64) -> Write {
        Write {
            id: 0,
            backend: backend.into(),
            via: via.into(),
            lsn: 0,
            start: t0 + Duration::from_millis(start_ms),
            end: t0 + Duration::from_millis(end_ms),
        }
    }

    #[test]
    fn split_brain_cases() {
        let t = Instant::now();
        let cases: Vec<(&str, Vec<Write>, bool, bool)> = vec![
            (
                "one master",
                vec![w("a", t, 0, 5), w("a", t, 3, 8)],
                false,
                false,
            ),
            (
                "clean failover",
                vec![w("a", t, 0, 5), w("b", t, 100, 105)],
                false,
                false,
            ),
            (
                "overlap",
                vec![w("a", t, 0, 50), w("b", t, 10, 20)],
                false,
                true,
            ),
            (
                "old master takes a write after the new one",
                vec![w("a", t, 0, 5), w("b", t, 100, 105), w("a", t, 200, 205)],
                false,
                true,
            ),
            (
                "a master that may come back",
                vec![w("a", t, 0, 5), w("b", t, 100, 105), w("a", t, 200, 205)],
                true,
                false,
            ),
            (
                "overlap even when the master may come back",
                vec![w("a", t, 0, 50), w("b", t, 10, 20)],
                true,
                true,
            ),
            (
                "an old master takes a direct write after the new one took one",
                vec![w("a", t, 0, 5), w("b", t, 100, 105), d("a", t, 200, 205)],
                false,
                true,
            ),
            (
                "direct writes on the master before a failover",
                vec![
                    d("a", t, 0, 5),
                    w("a", t, 10, 15),
                    w("b", t, 100, 105),
                    d("b", t, 110, 115),
                ],
                false,
                false,
            ),
            (
                "an old master elected again takes direct writes",
                vec![
                    w("a", t, 0, 5),
                    w("b", t, 100, 105),
                    w("a", t, 200, 205),
                    d("a", t, 210, 215),
                ],
                true,
                false,
            ),
            (
                "a PostgreSQL the proxies never routed to",
                vec![w("a", t, 0, 5), d("c", t, 50, 55), w("a", t, 100, 105)],
                false,
                false,
            ),
        ];
        for (name, writes, may_return, broken) in cases {
            assert_eq!(split_brain(&writes, may_return).is_some(), broken, "{name}");
        }
    }
}
