//! Deliberate faults from the environment, for the test suites (the data type is the core's:
//! [`stolon_core::faults`]). `STOLON_E2E_BREAK` is read only in builds with the cargo feature
//! `fault-injection`, which the test suites enable as a dev-dependency feature (so
//! `cargo test` builds binaries with it and `cargo build`, debug or release, does not).

pub use stolon_core::faults::*;

/// The environment variable naming the one fault to inject.
pub const ENV: &str = "STOLON_E2E_BREAK";

/// The fault `STOLON_E2E_BREAK` names, logged; none, with an error logged, in a build
/// without the `fault-injection` feature or for a name that is not a fault.
pub fn from_env() -> Faults {
    let Ok(name) = std::env::var(ENV) else {
        return Faults::NONE;
    };
    match parse(&name) {
        Ok(f) => {
            tracing::warn!("{ENV}={name}: this process is deliberately broken");
            f
        }
        Err(e) => {
            tracing::error!("{ENV} ignored: {e}");
            Faults::NONE
        }
    }
}

#[cfg(feature = "fault-injection")]
fn parse(name: &str) -> Result<Faults, String> {
    name.parse().map(Faults::one)
}

#[cfg(not(feature = "fault-injection"))]
fn parse(name: &str) -> Result<Faults, String> {
    Err(format!(
        "{name:?} not injected: this build has no fault injection \
         (it is compiled in by the cargo feature control/fault-injection, which `cargo test` enables)"
    ))
}
