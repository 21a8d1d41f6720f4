//! The fencing watchdog: a separate process (this binary in watchdog mode) that stops the
//! master PostgreSQL when the keeper stops confirming store contact. It covers what the
//! keeper itself cannot: a frozen keeper (SIGSTOP freezes only the keeper; this process
//! goes on) and a killed one (its stdin closes). The keeper arms it with the postmaster PID
//! and a deadline on CLOCK_MONOTONIC (shared by all processes) after every acknowledged
//! KeeperInfo write; past the deadline the watchdog sends SIGQUIT (immediate shutdown: every
//! session ends at once, nothing more commits).
//!
//! Protocol on stdin, one command a line: `arm <pid> <deadline_ns>`, `disarm`.

use nix::sys::signal::{kill, Signal};
use nix::time::{clock_gettime, ClockId};
use nix::unistd::Pid;
use std::io::BufRead;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// The argument that starts this binary in watchdog mode.
pub const MODE_ARG: &str = "__fence-watchdog";

/// Nanoseconds on CLOCK_MONOTONIC.
pub fn monotonic_ns() -> u64 {
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| (t.tv_sec() as u64) * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

#[derive(Default)]
struct State {
    armed: Option<(i32, u64)>,
    eof: bool,
}

/// The watchdog process's main: returns when the keeper is gone.
pub fn run() {
    let shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
    let reader = shared.clone();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            let mut words = line.split_whitespace();
            let cmd = match (words.next(), words.next(), words.next()) {
                (Some("arm"), Some(pid), Some(deadline)) => match (pid.parse(), deadline.parse()) {
                    (Ok(p), Ok(d)) => Some((p, d)),
                    _ => continue,
                },
                (Some("disarm"), _, _) => None,
                _ => continue,
            };
            let (lock, cv) = &*reader;
            lock.lock().map(|mut s| s.armed = cmd).ok();
            cv.notify_all();
        }
        let (lock, cv) = &*reader;
        lock.lock().map(|mut s| s.eof = true).ok();
        cv.notify_all();
    });
    let (lock, cv) = &*shared;
    let Ok(mut state) = lock.lock() else { return };
    loop {
        if state.eof {
            // The keeper is gone: a master it ran must not stay writable.
            if let Some((pid, _)) = state.armed {
                fire(pid, "the keeper exited");
            }
            return;
        }
        match state.armed {
            Some((pid, deadline)) => {
                let now = monotonic_ns();
                if now >= deadline {
                    fire(pid, "no store contact confirmed before the fence deadline");
                    state.armed = None;
                    continue;
                }
                let wait = Duration::from_nanos(deadline - now);
                state = match cv.wait_timeout(state, wait) {
                    Ok((s, _)) => s,
                    Err(_) => return,
                };
            }
            None => {
                state = match cv.wait(state) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            }
        }
    }
}

fn fire(pid: i32, why: &str) {
    let r = kill(Pid::from_raw(pid), Signal::SIGQUIT);
    eprintln!("stolon-keeper watchdog: fencing PostgreSQL (pid {pid}): {why}: {r:?}");
}

/// The keeper's handle on its watchdog process.
pub struct Watchdog {
    /// Held so the process is killed when the keeper drops it (kill_on_drop).
    _child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
}

impl Watchdog {
    /// Starts `exe` in watchdog mode. When the keeper dies its stdin closes and it fences
    /// (if armed) and exits.
    pub fn spawn(exe: &std::path::Path) -> std::io::Result<Watchdog> {
        let mut cmd = tokio::process::Command::new(exe);
        // Its own process group: a signal to the keeper's group must not freeze it too.
        cmd.arg(MODE_ARG)
            .stdin(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| std::io::Error::other("watchdog has no stdin"))?;
        Ok(Watchdog {
            _child: child,
            stdin,
        })
    }

    /// Fence `pid` unless re-armed within `within`.
    pub async fn arm(&mut self, pid: i32, within: Duration) -> std::io::Result<()> {
        let deadline = monotonic_ns() + within.as_nanos() as u64;
        let line = format!("arm {pid} {deadline}\n");
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.flush().await
    }

    pub async fn disarm(&mut self) -> std::io::Result<()> {
        self.stdin.write_all(b"disarm\n").await?;
        self.stdin.flush().await
    }
}
