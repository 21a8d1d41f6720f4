//! Running PostgreSQL's tools: the keeper's environment (as in Go stolon: wal-g or
//! pgBackRest in archive/restore commands take their credentials from it) less the keeper's
//! own `STKEEPER_*` settings, stdin null, stderr captured into the error, a timeout, and the
//! unprivileged OS user when the keeper runs as root (PostgreSQL refuses to run as root).

use nix::unistd::{Gid, Uid};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("{tool}: could not run: {source}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed ({status}): {stderr}")]
    Failed {
        tool: String,
        status: String,
        stderr: String,
    },
    #[error("{tool} did not finish within {timeout:?}")]
    Timeout { tool: String, timeout: Duration },
}

/// Who runs the tools and where they are.
#[derive(Clone, Debug)]
pub struct Tools {
    pub bin_dir: PathBuf,
    /// The OS user to run as (set when the keeper is root).
    pub os_user: Option<(Uid, Gid)>,
}

/// The OS user to run PostgreSQL as: `name` when this process is root, else none (run as
/// ourselves).
pub fn os_user(name: &str) -> anyhow::Result<Option<(Uid, Gid)>> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    let user = nix::unistd::User::from_name(name)?.ok_or_else(|| {
        anyhow::anyhow!("running as root, but OS user {name:?} does not exist (--pg-os-user)")
    })?;
    Ok(Some((user.uid, user.gid)))
}

/// Finds PostgreSQL's binaries: the flag, `PG_BIN_PATH`, `pg_config --bindir`, then the
/// newest `/usr/lib/postgresql/<major>/bin`.
pub fn find_bin_dir(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("PG_BIN_PATH") {
        return Ok(PathBuf::from(p));
    }
    if let Ok(out) = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && dir.join("postgres").exists() {
            return Ok(dir);
        }
    }
    let mut majors: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((major, bin))
        })
        .collect();
    majors.sort();
    majors
        .pop()
        .map(|(_, p)| p)
        .ok_or_else(|| anyhow::anyhow!("PostgreSQL binaries not found: pass --pg-bin-path"))
}

/// The environment PostgreSQL and the commands it runs get: the keeper's, without the
/// keeper's own settings (`STKEEPER_*` may hold passwords) and with messages in English
/// (`LC_ALL=C.UTF-8`: the keeper reads some tools' stderr).
pub fn child_env(cmd: &mut std::process::Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("STKEEPER_") {
            cmd.env_remove(&k);
        }
    }
    if std::env::var_os("PATH").is_none() {
        cmd.env("PATH", "/usr/bin:/bin");
    }
    cmd.env("LC_ALL", "C.UTF-8");
}

/// initdb's locale when the spec's newConfig names none: the keeper's own, as Go stolon's
/// initdb inherits it (each category from LC_ALL, then LC_<category>, then LANG, as
/// setlocale reads them), or C.UTF-8 where the environment sets none. Passed as flags
/// because the tools run with LC_ALL=C.UTF-8 (`child_env`: the keeper reads their stderr).
pub fn initdb_locale_args(env: impl Fn(&str) -> Option<String>) -> Vec<String> {
    let set = |k: &str| env(k).filter(|v| !v.is_empty());
    [
        "COLLATE", "CTYPE", "MESSAGES", "MONETARY", "NUMERIC", "TIME",
    ]
    .into_iter()
    .map(|cat| {
        let value = set("LC_ALL")
            .or_else(|| set(&format!("LC_{cat}")))
            .or_else(|| set("LANG"))
            .unwrap_or_else(|| "C.UTF-8".into());
        format!("--lc-{}={value}", cat.to_lowercase())
    })
    .collect()
}

/// The version `postgres --version` prints: "postgres (PostgreSQL) 15.8", also with a
/// packager's suffix ("14.10 (Homebrew)", "16.2 (Debian 16.2-1.pgdg120+2)") or a
/// pre-release ("17beta1": minor 0).
pub fn parse_pg_version(text: &str) -> Option<(u32, u32)> {
    let ver = text
        .split_whitespace()
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))?;
    let digits = |s: &str| -> Option<u32> {
        let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        s[..end].parse().ok()
    };
    let maj = digits(ver)?;
    let min = ver
        .split_once('.')
        .and_then(|(_, rest)| digits(rest))
        .unwrap_or(0);
    Some((maj, min))
}

/// Expands a dataRestoreCommand as Go stolon does: `%d` is the data dir, `%%` is `%`, any
/// other `%x` is left as it is.
pub fn expand_restore_command(cmd: &str, data_dir: &str) -> String {
    let mut out = String::with_capacity(cmd.len() + data_dir.len());
    let mut chars = cmd.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('%', Some('d')) => {
                chars.next();
                out.push_str(data_dir);
            }
            ('%', Some('%')) => {
                chars.next();
                out.push('%');
            }
            _ => out.push(c),
        }
    }
    out
}

/// Whether an environment variable steers libpq (PGPASSWORD, PGUSER, PGSSLMODE, PGHOST,
/// ...: every `PG` name but PostgreSQL's own `PG_` ones). The keeper's own connections must
/// not follow them: with PGPASSWORD exported for a user's restore command, libpq prefers it
/// to the keeper's passfile and every base backup failed authentication.
pub fn steers_libpq(name: &std::ffi::OsStr) -> bool {
    let n = name.to_string_lossy();
    n.starts_with("PG") && !n.starts_with("PG_")
}

impl Tools {
    /// A command for `tool` (the keeper's own: initdb, pg_basebackup, pg_rewind, ...) with
    /// the keeper's environment ([`child_env`]) less the variables that steer libpq, run as
    /// the OS user.
    pub fn command(&self, tool: &str) -> Command {
        let mut std_cmd = std::process::Command::new(self.bin_dir.join(tool));
        child_env(&mut std_cmd);
        for (name, _) in std::env::vars_os().filter(|(n, _)| steers_libpq(n)) {
            std_cmd.env_remove(name);
        }
        let mut cmd = Command::from(std_cmd);
        cmd.stdin(Stdio::null());
        if let Some((uid, gid)) = self.os_user {
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
        }
        cmd
    }

    /// Runs `tool` with `args` and extra environment, within `timeout`; returns stdout.
    pub async fn run<I, S>(
        &self,
        tool: &str,
        args: I,
        env: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<String, ToolError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(tool);
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        run_command(tool, cmd, timeout).await
    }

    /// Makes `path` belong to the OS user (files the tools must read or write).
    pub fn chown(&self, path: &Path) -> std::io::Result<()> {
        if let Some((uid, gid)) = self.os_user {
            nix::unistd::chown(path, Some(uid), Some(gid)).map_err(std::io::Error::from)?;
        }
        Ok(())
    }
}

/// Runs a prepared command within `timeout`, turning a failure into an error with stderr.
pub async fn run_command(
    tool: &str,
    mut cmd: Command,
    timeout: Duration,
) -> Result<String, ToolError> {
    let child = cmd.spawn().map_err(|source| ToolError::Spawn {
        tool: tool.to_string(),
        source,
    })?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(r) => r.map_err(|source| ToolError::Spawn {
            tool: tool.to_string(),
            source,
        })?,
        Err(_) => {
            return Err(ToolError::Timeout {
                tool: tool.to_string(),
                timeout,
            })
        }
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(ToolError::Failed {
            tool: tool.to_string(),
            status: out.status.to_string(),
            stderr: stderr.trim().chars().take(2000).collect(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod version_and_locale_tests {
    use super::{initdb_locale_args, parse_pg_version};

    #[test]
    fn postgres_version_lines_are_parsed_with_any_suffix() {
        #[rustfmt::skip]
        let cases = [
            ("postgres (PostgreSQL) 15.8", Some((15, 8))),
            ("postgres (PostgreSQL) 15.8 (Debian 15.8-0+deb12u1)\n", Some((15, 8))),
            ("postgres (PostgreSQL) 14.10 (Homebrew)", Some((14, 10))),
            ("postgres (PostgreSQL) 18.6", Some((18, 6))),
            ("postgres (PostgreSQL) 17beta1", Some((17, 0))),
            ("postgres (PostgreSQL) 9.6.24", Some((9, 6))),
            ("", None),
            ("postgres (PostgreSQL)", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_pg_version(text), want, "{text:?}");
        }
    }

    #[test]
    fn initdb_gets_the_keepers_locale_as_setlocale_reads_it() {
        let run = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            initdb_locale_args(move |k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
        };
        let all = |v: &str| -> Vec<String> {
            [
                "collate", "ctype", "messages", "monetary", "numeric", "time",
            ]
            .iter()
            .map(|c| format!("--lc-{c}={v}"))
            .collect()
        };
        assert_eq!(run(&[]), all("C.UTF-8"), "none set");
        assert_eq!(run(&[("LANG", "")]), all("C.UTF-8"), "empty is unset");
        assert_eq!(run(&[("LANG", "de_DE.UTF-8")]), all("de_DE.UTF-8"));
        assert_eq!(run(&[("LANG", "de_DE.UTF-8"), ("LC_ALL", "C")]), all("C"));
        let mixed = run(&[("LANG", "de_DE.UTF-8"), ("LC_COLLATE", "C")]);
        assert_eq!(mixed[0], "--lc-collate=C");
        assert_eq!(mixed[1], "--lc-ctype=de_DE.UTF-8");
    }
}

#[cfg(test)]
mod tests {
    use super::expand_restore_command as expand;

    #[test]
    fn restore_command_expands_as_go_does() {
        assert_eq!(expand("cp -a /b/. %d", "/x"), "cp -a /b/. /x");
        assert_eq!(expand("date +%%s > %d/t", "/x"), "date +%s > /x/t");
        assert_eq!(expand("a %%d b", "/x"), "a %d b");
        assert_eq!(expand("50% %q %", "/x"), "50% %q %");
        assert_eq!(expand("%d%d", "/x"), "/x/x");
    }
}
