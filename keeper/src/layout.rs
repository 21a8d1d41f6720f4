//! The keeper's directory (`--data-dir`): `postgres/` (the PostgreSQL data directory),
//! `run/` (the private unix socket directory), `dbstate.json` (which db the data holds),
//! `init-params.json` (the parameters found at init, reported for mergePgParameters),
//! `pgpass` (libpq password file for replication and pg_rewind), `postgres.log`, and
//! `keeper.lock` and `lock` (Go stolon's name), locked while a keeper runs here so two
//! keepers, ours or Go's, cannot share it.
//!
//! A data dir written by Go stolon's keeper (`keeperstate`, `dbstate`, `lock` beside
//! `postgres/`) is adopted in place: [`Layout::adopt_go_state`] takes the keeper UID and
//! the db identity from its files, so the data is neither wiped nor copied again.

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
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
pub struct DirLock(#[allow(dead_code)] Vec<Flock<File>>);

/// Go stolon's `keeperstate` (cmd/keeper: KeeperLocalState).
#[derive(Deserialize)]
struct GoKeeperState {
    #[serde(rename = "UID", default)]
    uid: String,
}

/// Go stolon's `dbstate` (cmd/keeper: DBLocalState); `Generation` is not needed: the
/// keeper reports its generation from the clusterdata it applies.
#[derive(Deserialize)]
struct GoDbState {
    #[serde(rename = "UID", default)]
    uid: String,
    #[serde(rename = "Initializing", default)]
    initializing: bool,
    #[serde(rename = "InitPGParameters", default)]
    init_pg_parameters: Option<BTreeMap<String, String>>,
}

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

    /// Locks the directory (our `keeper.lock` and Go stolon's `lock`, so a Go keeper on the
    /// same dir is kept out too); fails if another keeper holds either.
    pub fn lock(&self) -> anyhow::Result<DirLock> {
        create_private_dir(&self.dir)?;
        let go = self.lock_file("lock")?;
        let ours = self.lock_file("keeper.lock")?;
        Ok(DirLock(vec![ours, go]))
    }

    fn lock_file(&self, name: &str) -> anyhow::Result<Flock<File>> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(name))?;
        Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            anyhow::anyhow!(
                "data dir {} is in use by another keeper ({name} is locked: {e})",
                self.dir.display()
            )
        })
    }

    /// The keeper UID kept in the data dir (ours, or Go stolon's `keeperstate`).
    pub fn saved_uid(&self) -> Option<String> {
        if let Ok(uid) = std::fs::read_to_string(self.dir.join("keeper-uid")) {
            return Some(uid.trim().to_string()).filter(|u| !u.is_empty());
        }
        let bytes = std::fs::read(self.dir.join("keeperstate")).ok()?;
        let st: GoKeeperState = serde_json::from_slice(&bytes).ok()?;
        Some(st.uid).filter(|u| !u.is_empty())
    }

    pub fn save_uid(&self, uid: &str) -> std::io::Result<()> {
        write_atomic(&self.dir.join("keeper-uid"), uid.as_bytes())
    }

    /// Takes over a data dir written by Go stolon's keeper: its `dbstate` (which db the data
    /// holds, and the parameters found at init) becomes ours, once. The Go file is renamed
    /// to `dbstate.adopted`, so a later removal of our state (a resync) cannot bring the old
    /// identity back. Returns the adopted db UID.
    pub fn adopt_go_state(&self) -> anyhow::Result<Option<String>> {
        let go_path = self.dir.join("dbstate");
        if self.db_state_path().exists() || !go_path.exists() {
            return Ok(None);
        }
        let bytes = std::fs::read(&go_path)?;
        let go: GoDbState = serde_json::from_slice(&bytes)
            .map_err(|e| anyhow::anyhow!("cannot read Go stolon's {}: {e}", go_path.display()))?;
        if go.uid.is_empty() || go.initializing {
            // Go's keeper died while initialising this db: like Go, start over from the
            // sentinel's view (the data is not trusted, and no identity is claimed).
            return Ok(None);
        }
        self.set_init_params(&go.init_pg_parameters.unwrap_or_default())?;
        self.set_db_state(Some(&DbState {
            db_uid: go.uid.clone(),
            pitr_pending: false,
        }))?;
        std::fs::rename(&go_path, self.dir.join("dbstate.adopted"))?;
        Ok(Some(go.uid))
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

/// `postgresql.auto.conf` as a symlink to /dev/null (Go stolon's way of making ALTER SYSTEM
/// fail); whatever was there (a file from a base backup) is replaced.
pub fn auto_conf_to_dev_null(pg_data: &Path) -> std::io::Result<()> {
    if auto_conf_is_dev_null(pg_data) {
        return Ok(());
    }
    let path = pg_data.join("postgresql.auto.conf");
    let tmp = pg_data.join("postgresql.auto.conf.stolon-tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink("/dev/null", &tmp)?;
    std::fs::rename(tmp, path)
}

pub fn auto_conf_is_dev_null(pg_data: &Path) -> bool {
    std::fs::read_link(pg_data.join("postgresql.auto.conf"))
        .is_ok_and(|t| t == Path::new("/dev/null"))
}

/// Before pg_rewind: an empty regular file in place of the symlink, since pg_rewind sees the
/// source's as a regular file and refuses a file whose type differs between the two. It is
/// owned by the data dir's owner: pg_rewind runs as the PostgreSQL user and rewrites the
/// file, and a keeper running as root would otherwise leave it root's (pg_rewind then failed
/// with "could not open target file ... Permission denied" and fell back to a base backup).
pub fn auto_conf_to_regular(pg_data: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let path = pg_data.join("postgresql.auto.conf");
    if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
        std::fs::remove_file(&path)?;
        std::fs::write(&path, b"")?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let owner = std::fs::metadata(pg_data)?;
        std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid()))?;
    }
    Ok(())
}

/// Removes a whole directory on the blocking pool: a big data dir takes seconds to remove,
/// and the keeper's runtime is one thread shared with the publisher, whose heartbeat must
/// not stall meanwhile (the sentinel would see the keeper unhealthy).
pub async fn remove_dir_off_runtime(dir: &Path) -> std::io::Result<()> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir))
        .await
        .map_err(std::io::Error::other)?
}

/// Writes a file through a temporary and a rename, so a crash leaves the old or the new.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    // As PostgreSQL and Go stolon: the data reaches the disk before the rename makes it the
    // file, and the rename reaches it before we go on (after a power loss the file is the old
    // one or the new one, never empty: an empty db state made the keeper refuse its data).
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
}

/// Creates `dir` and its missing parents with mode 0700, as PostgreSQL wants its data dir
/// and as Go stolon creates the keeper's.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
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

    /// The regular file that replaces the /dev/null symlink before pg_rewind belongs to the
    /// data dir's owner (root here, when the tests run as root, would hide the fault: the
    /// data dir is handed to another user first when one exists).
    #[test]
    fn the_file_put_back_for_pg_rewind_belongs_to_the_data_dirs_owner() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tmp");
        auto_conf_to_dev_null(dir.path()).expect("symlink");
        let owner = testkit::postgres::pg_os_user();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid.as_raw()), Some(gid.as_raw()))
                .expect("chown");
        }
        auto_conf_to_regular(dir.path()).expect("regular file");
        let meta = std::fs::metadata(dir.path().join("postgresql.auto.conf")).expect("file");
        let dir_meta = std::fs::metadata(dir.path()).expect("dir");
        assert!(meta.file_type().is_file());
        assert_eq!((meta.uid(), meta.gid()), (dir_meta.uid(), dir_meta.gid()));
    }

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
    fn a_go_keeper_dir_is_adopted_once() {
        let dir = tempfile::tempdir().expect("tmp");
        let l = Layout::new(dir.path());
        std::fs::write(
            dir.path().join("keeperstate"),
            r#"{"UID":"keeper0","ClusterUID":"c1"}"#,
        )
        .expect("write");
        std::fs::write(
            dir.path().join("dbstate"),
            r#"{"UID":"d1","Generation":4,"Initializing":false,"InitPGParameters":{"max_connections":"100"}}"#,
        )
        .expect("write");
        assert_eq!(l.saved_uid().as_deref(), Some("keeper0"));
        assert_eq!(l.adopt_go_state().expect("adopt").as_deref(), Some("d1"));
        assert_eq!(l.db_state().map(|d| d.db_uid).as_deref(), Some("d1"));
        assert_eq!(
            l.init_params().get("max_connections").map(String::as_str),
            Some("100")
        );
        // Once: our state is authoritative from now on, even after it is removed.
        l.set_db_state(None).expect("remove");
        assert_eq!(l.adopt_go_state().expect("again"), None);
        assert_eq!(l.db_state(), None);
    }

    #[test]
    fn a_go_db_that_was_initialising_is_not_adopted() {
        let dir = tempfile::tempdir().expect("tmp");
        let l = Layout::new(dir.path());
        std::fs::write(
            dir.path().join("dbstate"),
            r#"{"UID":"d1","Initializing":true}"#,
        )
        .expect("write");
        assert_eq!(l.adopt_go_state().expect("adopt"), None);
        assert_eq!(l.db_state(), None);
    }

    /// The runtime goes on (here: a ticker, in the keeper: the publisher) while a large
    /// directory is removed; with `std::fs::remove_dir_all` on the runtime it would not
    /// tick at all during the removal.
    #[tokio::test(flavor = "current_thread")]
    async fn a_large_removal_does_not_stall_the_runtime() {
        let dir = tempfile::tempdir().expect("tmp");
        let big = dir.path().join("postgres");
        for d in 0..40 {
            let sub = big.join(format!("base/{d}"));
            std::fs::create_dir_all(&sub).expect("mkdir");
            for f in 0..1000 {
                std::fs::write(sub.join(f.to_string()), b"x").expect("write");
            }
        }
        let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let t = ticks.clone();
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                t.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        tokio::task::yield_now().await;
        let before = ticks.load(std::sync::atomic::Ordering::Relaxed);
        remove_dir_off_runtime(&big).await.expect("removed");
        let during = ticks.load(std::sync::atomic::Ordering::Relaxed) - before;
        ticker.abort();
        assert!(!big.exists());
        assert!(during > 0, "the runtime ran during the removal");
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
