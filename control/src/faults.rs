//! Deliberate faults, for the test suites to show that they catch a broken system.
//!
//! A fault is data: each daemon reads `STOLON_E2E_BREAK` once at start ([`Faults::from_env`])
//! and passes the value down to the code it breaks, so `decide` and `plan` stay pure functions
//! of their arguments. Reading the variable is compiled in only with the cargo feature
//! `fault-injection`, which the test suites enable as a dev-dependency feature (so
//! `cargo test` builds binaries with it and `cargo build`, debug or release, does not).

use std::fmt;
use std::str::FromStr;

/// The environment variable naming the one fault to inject.
pub const ENV: &str = "STOLON_E2E_BREAK";

/// One deliberate fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The sentinel publishes the new master without fencing the proxies first.
    SkipProxyHandshake,
    /// The sentinel elects the standby with the lowest WAL position (Go stolon's async flaw).
    LowestWal,
    /// The sentinel ignores the synchronous standby set when electing.
    IgnoreSyncSet,
    /// The keeper never fences a master that lost the store (and arms no watchdog).
    NoSelfFencing,
    /// A proxy cut from the store keeps routing.
    NoProxyFencing,
    /// The keeper's main loop panics after its first round.
    KeeperLoopPanic,
    /// The keeper's main loop stops making rounds (alive but stuck).
    KeeperLoopStall,
    /// The sentinel's main loop panics.
    SentinelLoopPanic,
    /// The proxy's discovery task panics once it has published.
    ProxyDiscoveryPanic,
}

const NAMES: [(Fault, &str); 9] = [
    (Fault::SkipProxyHandshake, "skip-proxy-handshake"),
    (Fault::LowestWal, "lowest-wal"),
    (Fault::IgnoreSyncSet, "ignore-sync-set"),
    (Fault::NoSelfFencing, "no-self-fencing"),
    (Fault::NoProxyFencing, "no-proxy-fencing"),
    (Fault::KeeperLoopPanic, "keeper-loop-panic"),
    (Fault::KeeperLoopStall, "keeper-loop-stall"),
    (Fault::SentinelLoopPanic, "sentinel-loop-panic"),
    (Fault::ProxyDiscoveryPanic, "proxy-discovery-panic"),
];

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = NAMES
            .iter()
            .find(|(fault, _)| fault == self)
            .map_or("?", |(_, n)| n);
        f.write_str(name)
    }
}

impl FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Fault, String> {
        NAMES
            .iter()
            .find(|(_, n)| *n == s)
            .map(|(f, _)| *f)
            .ok_or_else(|| {
                let known: Vec<&str> = NAMES.iter().map(|(_, n)| *n).collect();
                format!("unknown fault {s:?} (known: {})", known.join(", "))
            })
    }
}

/// The faults injected into one process: none in production.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults(Option<Fault>);

impl Faults {
    pub const NONE: Faults = Faults(None);

    pub fn one(fault: Fault) -> Faults {
        Faults(Some(fault))
    }

    pub fn has(self, fault: Fault) -> bool {
        self.0 == Some(fault)
    }

    /// The fault `STOLON_E2E_BREAK` names, logged; none, with a warning, in a build without
    /// the `fault-injection` feature or for a name that is not a fault.
    pub fn from_env() -> Faults {
        let Ok(name) = std::env::var(ENV) else {
            return Faults::NONE;
        };
        match Faults::parse(&name) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for (fault, name) in NAMES {
            assert_eq!(fault.to_string(), name);
            assert_eq!(name.parse::<Fault>(), Ok(fault));
        }
        assert!("lowest_wal".parse::<Fault>().is_err());
        assert!(!Faults::NONE.has(Fault::LowestWal));
        assert!(Faults::one(Fault::LowestWal).has(Fault::LowestWal));
        assert!(!Faults::one(Fault::LowestWal).has(Fault::NoSelfFencing));
    }
}
