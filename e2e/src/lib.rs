//! The end-to-end HA suite's harness: a `Cluster` of real processes (etcd, keepers running
//! PostgreSQL, sentinels, proxies), optionally each in its own network namespace; a
//! `Checker` that writes through the proxies and probes every PostgreSQL while a nemesis
//! runs; and the invariants every scenario ends with (`Cluster::finish`).
//!
//! The scenarios themselves are the tests in `e2e/tests/`, one per line of
//! `scenarios.md`. They need root (namespaces, the `postgres` OS user) and the workspace's
//! binaries (`cargo build --workspace --bins`, which `cargo test --workspace` does).

pub mod checker;
pub mod cluster;
mod health;
pub mod moves;
pub mod sql;
pub mod verify;

pub use checker::{Checker, Report};
pub use cluster::{Cluster, Opts};
pub use verify::Outcome;

/// Serializes the scenarios of one test binary: their timings (fence deadlines,
/// failIntervals) must not compete for 2 cores with another scenario.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

/// A started cluster with writes flowing: the checker has 50 acknowledged writes (the
/// starting point of every scenario with a nemesis).
pub async fn running(o: Opts) -> (Cluster, Checker) {
    let c = Cluster::start(o).await.expect("cluster");
    let checker = Checker::start(&c);
    assert!(
        checker
            .wait_acks(50, std::time::Duration::from_secs(30))
            .await,
        "writes before the nemesis"
    );
    (c, checker)
}

/// Whether every scenario runs with spec `failsafeMode` on (`STOLON_E2E_FAILSAFE=1`).
pub fn failsafe_on() -> bool {
    std::env::var_os("STOLON_E2E_FAILSAFE").is_some_and(|v| v == "1")
}

/// Whether the long matrix and repetitions run (`scripts/test.sh --long`).
pub fn long() -> bool {
    std::env::var_os("STOLON_TEST_LONG").is_some()
}
