//! The pure core of the HA manager: the cluster model (the documents in the store), the
//! sentinel's decision ([`sentinel::decide`]) and the keeper's plan ([`keeper::plan`]).
//!
//! A crate of its own so that purity is the compiler's rule: its dependencies are serde,
//! time, uuid and json-patch only (no tokio, no etcd client), and clippy (`clippy.toml`
//! here) refuses reading the environment or the clock outside tests. Everything a rule
//! depends on is an argument, including deliberate faults ([`faults::Faults`]).
#![deny(unsafe_code)]

pub mod failsafe;
pub mod faults;
pub mod keeper;
pub mod model;
pub mod sentinel;
