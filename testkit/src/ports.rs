//! Ports for test servers, below 32768 so they never collide with the kernel's ephemeral
//! source ports (32768-60999 here). A port is checked free by binding it; the guard keeps a
//! process-wide reservation so two tests in one process do not get the same port.

use rand::Rng;
use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

const LOW: u16 = 15000;
const HIGH: u16 = 32767;

static TAKEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A reserved port; released for reuse by this process on drop.
#[derive(Debug)]
pub struct PortGuard(pub u16);

impl Drop for PortGuard {
    fn drop(&mut self) {
        if let Ok(mut t) = TAKEN.lock() {
            if let Some(set) = t.as_mut() {
                set.remove(&self.0);
            }
        }
    }
}

/// A port in 15000..=32767 that was free on 127.0.0.1 a moment ago. Retries random ports
/// until one binds. Another process may still take it before the server binds: spawners
/// retry with a new port when their server fails to bind.
pub fn free_port() -> PortGuard {
    free_port_in(LOW..=HIGH).unwrap_or_else(|| panic!("no free port found in {LOW}..={HIGH}"))
}

/// A free port in `range` (10 000 random tries), reserved in this process.
fn free_port_in(range: std::ops::RangeInclusive<u16>) -> Option<PortGuard> {
    let mut rng = rand::thread_rng();
    for _ in 0..10_000 {
        let p = rng.gen_range(range.clone());
        let mut t = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
        let set = t.get_or_insert_with(HashSet::new);
        if set.contains(&p) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", p)).is_ok() {
            set.insert(p);
            return Some(PortGuard(p));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_and_in_range() {
        let ports: Vec<PortGuard> = (0..50).map(|_| free_port()).collect();
        let set: HashSet<u16> = ports.iter().map(|p| p.0).collect();
        assert_eq!(set.len(), 50);
        assert!(ports.iter().all(|p| (LOW..=HIGH).contains(&p.0)));
    }

    /// A port another socket holds is never handed out, though this process released it.
    /// (The check is on the port returned, not on binding it again afterwards: any other
    /// process on the machine may take a free port in between, which once failed CI.)
    /// (Another process may also take the port between `free_port` and the bind here, as
    /// once happened in CI: then take another.)
    #[test]
    fn a_bound_port_is_skipped() {
        let (held, _listener) = (0..100)
            .find_map(|_| {
                let held = free_port();
                let l = TcpListener::bind(("127.0.0.1", held.0)).ok()?;
                Some((held, l))
            })
            .expect("no port could be bound in 100 tries");
        let port = held.0;
        drop(held); // released in the set, but still bound by the listener
        assert!(
            free_port_in(port..=port).is_none(),
            "a bound port handed out"
        );
    }
}
