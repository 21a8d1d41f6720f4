//! The keeper's directory (`--data-dir`): `postgres/` (the PostgreSQL data directory),
//! `run/` (the private unix socket directory), `dbstate.json` (which db the data holds),
//! `init-params.json` (the parameters found at init, reported for mergePgParameters),
//! `pgpass` (libpq password file for replication and pg_rewind), `postgres.log`, and
//! `keeper.lock`, locked while a keeper runs here so two keepers cannot share it.

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct Layout {
    pub dir: PathBuf,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbState {
    #[serde(rename = "dbUID")]
    pub db_uid: String,
    /// Restored for point-in-time recovery and not promoted yet.
    #[serde(default, rename = "pitrPending")]
    pub pitr_pending: bool,
}

/// Held for the keeper's lifetime.
pub struct DirLock(#[allow(dead_code)] Flock<File>);

impl Layout {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Layout { dir: dir.into() }
    }
    pub fn pg_data(&self) -> PathBuf {
        self.dir.join("postgres")
    }
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.join("run")
    }
    pub fn passfile(&self) -> PathBuf {
        self.dir.join("pgpass")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }
    fn db_state_path(&self) -> PathBuf {
        self.dir.join("dbstate.json")
    }
    fn init_params_path(&self) -> PathBuf {
        self.dir.join("init-params.json")
    }

    /// Locks the directory; fails if another keeper holds it.
    pub fn lock(&self) -> anyhow::Result<DirLock> {
        std::fs::create_dir_all(&self.dir)?;
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join("keeper.lock"))?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            anyhow::anyhow!(
                "data dir {} is in use by another keeper ({e})",
                self.dir.display()
            )
        })?;
        Ok(DirLock(lock))
    }

    /// Whether the data directory holds a PostgreSQL cluster.
    pub fn has_data(&self) -> bool {
        self.pg_data().join("PG_VERSION").exists()
    }

    pub fn db_state(&self) -> Option<DbState> {
        let bytes = std::fs::read(self.db_state_path()).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn set_db_state(&self, state: Option<&DbState>) -> std::io::Result<()> {
        match state {
            Some(s) => write_atomic(&self.db_state_path(), &serde_json::to_vec(s)?),
            None => match std::fs::remove_file(self.db_state_path()) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        }
    }

    pub fn init_params(&self) -> BTreeMap<String, String> {
        std::fs::read(self.init_params_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn set_init_params(&self, p: &BTreeMap<String, String>) -> std::io::Result<()> {
        write_atomic(&self.init_params_path(), &serde_json::to_vec(p)?)
    }
}

/// Writes a file through a temporary and a rename, so a crash leaves the old or the new.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, path)
}

/// Writes a secret file readable only by its owner (mode 0600 from creation).
pub fn write_secret(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// A libpq password file line, escaping `:` and `\` as libpq requires.
pub fn pgpass_line(user: &str, password: &str) -> String {
    let esc = |s: &str| s.replace('\\', "\\\\").replace(':', "\\:");
    format!("*:*:*:{}:{}\n", esc(user), esc(password))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_dir_fails() {
        let dir = tempfile::tempdir().expect("tmp");
        let layout = Layout::new(dir.path());
        let _held = layout.lock().expect("first lock");
        let err = Layout::new(dir.path())
            .lock()
            .err()
            .expect("second lock must fail");
        assert!(
            err.to_string().contains("in use by another keeper"),
            "{err}"
        );
    }

    #[test]
    fn pgpass_escapes() {
        assert_eq!(pgpass_line("u", "a:b\\c"), "*:*:*:u:a\\:b\\\\c\n");
    }

    #[test]
    fn db_state_roundtrip() {
        let dir = tempfile::tempdir().expect("tmp");
        let l = Layout::new(dir.path());
        assert_eq!(l.db_state(), None);
        let s = DbState {
            db_uid: "abc".into(),
            pitr_pending: false,
        };
        l.set_db_state(Some(&s)).expect("write");
        assert_eq!(l.db_state(), Some(s));
        l.set_db_state(None).expect("remove");
        assert_eq!(l.db_state(), None);
    }
}
