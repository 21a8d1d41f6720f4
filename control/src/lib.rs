//! The control plane: the cluster model, the store adapter and the shared command line.
#![deny(unsafe_code)]

pub mod cli;
pub mod ctl;
pub mod keeper;
pub mod metrics;
pub mod model;
pub mod sentinel;
pub mod store;

/// Deliberate breakage, for the end-to-end suite to show that it catches a broken system:
/// `STOLON_E2E_BREAK=<name>` (`lowest-wal`, `no-self-fencing`, `no-proxy-fencing`) in a
/// debug build. Release builds ignore the variable.
pub fn broken(name: &str) -> bool {
    #[cfg(debug_assertions)]
    {
        static BREAK: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        BREAK
            .get_or_init(|| std::env::var("STOLON_E2E_BREAK").ok())
            .as_deref()
            == Some(name)
    }
    #[cfg(not(debug_assertions))]
    {
        let _ = name;
        false
    }
}
