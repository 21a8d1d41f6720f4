//! Shared test tools for every crate: a port allocator below 32768, process guards that
//! kill their process group on Drop, and spawners for etcd and PostgreSQL (run as the
//! unprivileged `postgres` user when the tests run as root).
#![deny(unsafe_code)]

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
