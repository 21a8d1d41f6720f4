//! The sentinel daemon (`stolon-sentinel`): campaigns for leadership in the store and, while
//! leader, runs the pure decision (`stolon_core::sentinel::decide`) on every event and
//! writes the next clusterdata with one guarded compare-and-swap.
#![deny(unsafe_code)]

pub mod daemon;
mod view;
