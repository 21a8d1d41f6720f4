//! stolon-keeper: runs one PostgreSQL instance and makes it converge to its db in the
//! cluster view (`control::keeper::plan` decides; this crate acts).
#![deny(unsafe_code)]

pub mod config;
#[cfg(test)]
mod config_tests;
pub mod postmaster;
pub mod sql;
pub mod tools;
pub mod watchdog;
pub mod layout;
mod act;
pub mod daemon;
