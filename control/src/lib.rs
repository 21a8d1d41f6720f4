//! The control plane: the cluster model, the store adapter and the shared command line.
#![deny(unsafe_code)]

pub mod cli;
pub mod ctl;
pub mod faults;
pub mod keeper;
pub mod metrics;
pub mod model;
pub mod sentinel;
pub mod store;
