//! The sentinel: the pure decision ([`decide`], from the core crate) and the daemon that runs
//! it against the store ([`daemon`]).

pub use stolon_core::sentinel::*;

pub mod daemon;
