//! stolon-keeper: runs one PostgreSQL instance and makes it converge to its db in the
//! cluster view (`control::keeper::plan` decides; this crate acts).
#![deny(unsafe_code)]

mod act;
pub mod config;
#[cfg(test)]
mod config_tests;
pub mod daemon;
pub mod failsafe;
pub mod health;
pub mod layout;
pub mod metrics;
pub mod passwords;
pub mod postmaster;
mod promote_gate;
pub mod sql;
mod switchover;
pub mod tools;
pub mod watchdog;
