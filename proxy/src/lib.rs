//! stolon-proxy: accepts PostgreSQL clients, parses the startup phase, and relays them to
//! the one master named in the store; severs every session to an old master at once.
#![deny(unsafe_code)]

pub mod auth;
pub mod balance;
pub mod cancel;
pub mod conn;
pub mod discovery;
pub mod failsafe;
pub mod fence;
pub mod hold;
pub mod limits;
pub mod metrics;
pub mod migrate;
pub mod peers;
pub mod pipe;
pub mod placement;
pub mod protocol;
mod rail;
pub mod relay;
pub mod route;
pub mod server;
pub mod session;
pub mod session_start;
pub mod stream;
pub mod terminate;
pub mod tls;
pub mod txstate;
