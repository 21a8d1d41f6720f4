//! Shared test tools for every crate: a port allocator below 32768, process guards that
//! kill their process group on Drop, and spawners for etcd and PostgreSQL (run as the
//! unprivileged `postgres` user when the tests run as root).
#![deny(unsafe_code)]

pub mod cancel;
pub mod etcd;
pub mod netns;
pub mod ports;
pub mod postgres;
pub mod process;
pub mod seccomp;
pub mod tls;

pub use etcd::Etcd;
pub use ports::{free_port, PortGuard};
pub use postgres::Postgres;
pub use process::ChildGuard;
pub use tls::TlsFiles;

/// A directory for test data: on tmpfs (`/dev/shm`) when available, since tests that kill
/// processes gain nothing from durable disks and a lot from speed.
pub fn temp_dir(name: &str) -> std::io::Result<tempfile::TempDir> {
    let base = std::path::Path::new("/dev/shm");
    let prefix = format!("stolon-{name}-");
    let mut b = tempfile::Builder::new();
    b.prefix(&prefix);
    if base.is_dir() {
        b.tempdir_in(base)
    } else {
        b.tempdir()
    }
}

/// A path in the workspace (`path` relative to its root).
pub fn workspace_path(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

/// A client that scripts/clients.sh built into target/clients (panics if it is missing).
pub fn built_client(name: &str) -> std::path::PathBuf {
    let p = workspace_path("target/clients").join(name);
    assert!(
        p.exists(),
        "{} missing: run scripts/clients.sh",
        p.display()
    );
    p
}
