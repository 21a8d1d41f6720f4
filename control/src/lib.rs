//! The control plane: the cluster model, the store adapter and the shared command line.
#![deny(unsafe_code)]

pub mod cli;
pub mod ctl;
pub mod faults;
pub mod metrics;
pub mod sentinel;
pub mod store;

/// The pure core, re-exported where it always was: `control::model`, `control::keeper` (the
/// plan) and `control::sentinel` (with the daemon beside `decide`).
pub use stolon_core::{keeper, model};
