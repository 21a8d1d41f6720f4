//! The postmaster process. The keeper starts `postgres` as its own child, so it sees the
//! postmaster exit at once (a crash is restarted without waiting for a tick), and with a
//! parent-death signal of SIGQUIT, so a killed keeper leaves no running PostgreSQL behind
//! (SIGQUIT is PostgreSQL's immediate shutdown: every backend ends at once). A postmaster
//! left running by an earlier keeper (frozen, not killed) is adopted: watched by PID.
#![allow(unsafe_code)]

use crate::tools::Tools;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

pub enum Postmaster {
    Child(tokio::process::Child),
    /// Found running at start; not our child.
    Adopted(i32),
}

/// The PID in `postmaster.pid`, if that process is alive.
pub fn running_pid(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    // A stale file may name a PID reused by another program.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let is_postgres = cmdline
        .split(|b| *b == 0)
        .next()
        .is_some_and(|a| a.ends_with(b"postgres"));
    (alive(pid) && is_postgres).then_some(pid)
}

fn alive(pid: i32) -> bool {
    pid > 0 && kill(Pid::from_raw(pid), None).is_ok() && !is_zombie(pid)
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

impl Postmaster {
    /// Starts `postgres -D data_dir` as a child; its output goes to `log`.
    pub fn spawn(tools: &Tools, data_dir: &Path, log: &Path) -> std::io::Result<Postmaster> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut std_cmd = std::process::Command::new(tools.bin_dir.join("postgres"));
        std_cmd
            .arg("-D")
            .arg(data_dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            // Its own process group: a signal to the keeper's group (a frozen keeper in a
            // test) must not reach PostgreSQL too.
            .process_group(0);
        // The keeper's environment, as in Go stolon: archive_command and restore_command
        // (wal-g, pgBackRest) take their credentials from it.
        crate::tools::child_env(&mut std_cmd);
        if let Some((uid, gid)) = tools.os_user {
            std_cmd.uid(uid.as_raw()).gid(gid.as_raw());
        }
        // SAFETY: runs between fork and exec; prctl(PR_SET_PDEATHSIG) is one syscall that
        // neither allocates nor takes locks. The keeper spawns from its main thread (a
        // current-thread runtime), whose exit is the process's exit.
        unsafe {
            std_cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGQUIT).map_err(std::io::Error::from)
            });
        }
        let child = tokio::process::Command::from(std_cmd).spawn()?;
        Ok(Postmaster::Child(child))
    }

    pub fn pid(&self) -> Option<i32> {
        match self {
            Postmaster::Child(c) => c.id().and_then(|p| i32::try_from(p).ok()),
            Postmaster::Adopted(p) => Some(*p),
        }
    }

    pub fn signal(&self, sig: Signal) -> nix::Result<()> {
        match self.pid() {
            Some(pid) => kill(Pid::from_raw(pid), sig),
            None => Ok(()),
        }
    }

    /// Resolves when the postmaster has exited (reaps a child).
    pub async fn exited(&mut self) {
        match self {
            Postmaster::Child(c) => {
                let _ = c.wait().await;
            }
            Postmaster::Adopted(pid) => {
                while alive(*pid) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// True if it exited already (without waiting).
    pub fn has_exited(&mut self) -> bool {
        match self {
            Postmaster::Child(c) => !matches!(c.try_wait(), Ok(None)),
            Postmaster::Adopted(pid) => !alive(*pid),
        }
    }

    /// Stops with `sig` (SIGINT fast, SIGQUIT immediate); after `timeout` escalates to
    /// SIGQUIT, then SIGKILL. Returns once the process is gone.
    pub async fn stop(&mut self, sig: Signal, timeout: Duration) {
        let _ = self.signal(sig);
        for next in [Signal::SIGQUIT, Signal::SIGKILL] {
            if tokio::time::timeout(timeout, self.exited()).await.is_ok() {
                return;
            }
            tracing::warn!(signal = ?next, "PostgreSQL did not stop in time: escalating");
            let _ = self.signal(next);
        }
        self.exited().await;
    }
}
