//! What every daemon shares: the command line flags common to them all (and opening the
//! store from them), the metrics and health HTTP server, and fault injection from the
//! environment. The pure core, the store, the sentinel and stolonctl are crates of their own
//! (`control/core`, `store/`, `sentinel/`, `stolonctl/`); this crate re-exports the core and
//! the store under their old paths (`control::model`, `control::store`, ...).
#![deny(unsafe_code)]

pub mod auth_sql;
pub mod cli;
pub mod faults;
pub mod metrics;
pub mod peer_http;

pub use stolon_core::{failsafe, keeper, model, sentinel};
pub use stolon_store as store;
