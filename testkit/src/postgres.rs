//! A throw-away PostgreSQL for tests: initdb into a temp dir (tmpfs), start on a free port
//! with `fsync=off`, stop on Drop. When the tests run as root, every PostgreSQL tool runs as
//! the unprivileged `postgres` OS user (PostgreSQL refuses root) and the dir is chowned.

use crate::ports::{free_port, PortGuard};
use crate::process::ChildGuard;
use anyhow::{bail, Context, Result};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The OS user PostgreSQL tools run as when the caller is root.
pub const PG_OS_USER: &str = "postgres";

/// Where the PostgreSQL server binaries are: `PG_BIN_PATH`, the Debian PostgreSQL 15
/// directory, or `pg_config --bindir`.
pub fn pg_bin_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("PG_BIN_PATH") {
        return PathBuf::from(p);
    }
    let debian = PathBuf::from("/usr/lib/postgresql/15/bin");
    if debian.join("postgres").exists() {
        return debian;
    }
    Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| PathBuf::from(s.trim()))
        .unwrap_or(debian)
}

/// The uid/gid to run PostgreSQL tools as: `Some` only when we are root.
pub fn pg_os_user() -> Option<(nix::unistd::Uid, nix::unistd::Gid)> {
    if !nix::unistd::Uid::effective().is_root() {
        return None;
    }
    let user = nix::unistd::User::from_name(PG_OS_USER).ok().flatten()?;
    Some((user.uid, user.gid))
}

/// Makes `cmd` run as the PostgreSQL OS user when we are root, with a minimal environment.
pub fn as_pg_user(cmd: &mut Command) -> &mut Command {
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LC_ALL", "C.UTF-8");
    if let Some((uid, gid)) = pg_os_user() {
        cmd.uid(uid.as_raw()).gid(gid.as_raw()).env("HOME", "/tmp");
    }
    cmd
}

/// Gives `path` and everything below it to the PostgreSQL OS user (when we are root).
pub fn chown_to_pg_user(path: &Path) -> Result<()> {
    let Some((uid, gid)) = pg_os_user() else {
        return Ok(());
    };
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        nix::unistd::chown(&p, Some(uid), Some(gid))
            .with_context(|| format!("chown {}", p.display()))?;
        if p.is_dir() && !p.is_symlink() {
            for entry in std::fs::read_dir(&p)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(())
}

pub struct Postgres {
    dir: tempfile::TempDir,
    port: PortGuard,
    child: Option<ChildGuard>,
}

impl Postgres {
    /// initdb (trust auth, superuser `postgres`) and start, with `settings` as extra
    /// `-c name=value` options.
    pub fn start(settings: &[(&str, &str)]) -> Result<Postgres> {
        let dir = crate::temp_dir("pg")?;
        chown_to_pg_user(dir.path())?;
        let data = dir.path().join("data");
        let out = as_pg_user(&mut Command::new(pg_bin_dir().join("initdb")))
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut last_err = None;
        let mut pg = Postgres {
            dir,
            port: free_port(),
            child: None,
        };
        for _ in 0..5 {
            match pg.launch(settings) {
                Ok(()) => return Ok(pg),
                Err(e) => {
                    last_err = Some(e);
                    pg.port = free_port();
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("postgres did not start")))
    }

    pub fn port(&self) -> u16 {
        self.port.0
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A libpq connection string for the superuser over TCP.
    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port.0
        )
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn launch(&mut self, settings: &[(&str, &str)]) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = Command::new(pg_bin_dir().join("postgres"));
        as_pg_user(&mut cmd)
            .arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.0.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "full_page_writes=off", "-c", "synchronous_commit=off"]);
        for (k, v) in settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        cmd.current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = ChildGuard::spawn("postgres", &mut cmd)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if child.exited() {
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                bail!(
                    "postgres exited during start-up: {}",
                    log.lines().last().unwrap_or("")
                );
            }
            if self.ready() {
                self.child = Some(child);
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("postgres did not become ready within 30s")
    }

    fn ready(&self) -> bool {
        Command::new(pg_bin_dir().join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.0.to_string()])
            .stdin(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Runs SQL with psql as the superuser and returns the unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let out = Command::new(pg_bin_dir().join("psql"))
            .args([
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &self.conninfo(),
                "-c",
                sql,
            ])
            .stdin(Stdio::null())
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!(
                "psql failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Smart shutdown, not waited for: SIGTERM to the postmaster alone (its backends go
    /// on). While a session stays open, new connections get FATAL 57P03 "the database system
    /// is shutting down".
    pub fn smart_shutdown(&self) {
        if let Some(c) = &self.child {
            let pid = i32::try_from(c.pid()).unwrap_or(0);
            if pid > 0 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
    }

    /// Immediate stop (SIGQUIT to the postmaster group, then SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.signal(nix::sys::signal::Signal::SIGQUIT);
            c.stop(Duration::from_secs(5));
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
