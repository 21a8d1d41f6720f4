//! A child process in its own process group, killed (the whole group) on Drop, so servers
//! and their children never outlive a test, even a failing one. Signals go by PID only.

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    pub name: String,
}

impl ChildGuard {
    /// Spawns `cmd` as the leader of a new process group. The child also gets SIGKILL if
    /// the spawning thread dies (a test run killed by a timeout skips every Drop, and its
    /// servers would otherwise live on, holding ports).
    pub fn spawn(name: &str, cmd: &mut Command) -> std::io::Result<Self> {
        die_with_parent(cmd);
        let child = cmd.process_group(0).spawn()?;
        Ok(ChildGuard {
            child: Some(child),
            name: name.to_string(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends a signal to the process group.
    pub fn signal(&self, sig: Signal) -> nix::Result<()> {
        let pid = i32::try_from(self.pid()).unwrap_or(0);
        if pid == 0 {
            return Ok(());
        }
        killpg(Pid::from_raw(pid), sig)
    }

    /// True if the process has exited (reaps it).
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// The exit status once the process has exited (reaps it).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM, then SIGKILL after `grace`; waits for the exit.
    pub fn stop(&mut self, grace: Duration) {
        if self.child.is_none() {
            return;
        }
        let _ = self.signal(Signal::SIGCONT);
        let _ = self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    /// SIGKILL to the whole group, and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = self.signal_pid_group(&c, Signal::SIGKILL);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn signal_pid_group(&self, c: &Child, sig: Signal) -> nix::Result<()> {
        let pid = i32::try_from(c.id()).unwrap_or(0);
        killpg(Pid::from_raw(pid), sig)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: runs between fork and exec; prctl(PR_SET_PDEATHSIG) is a single syscall that
    // neither allocates nor takes locks.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
}
