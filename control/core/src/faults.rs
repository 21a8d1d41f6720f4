//! Deliberate faults, for the test suites to show that they catch a broken system.
//!
//! A fault is data: each daemon reads `STOLON_E2E_BREAK` once at start (`control::faults::
//! from_env`, compiled in only with the cargo feature `control/fault-injection`) and passes
//! the value down to the code it breaks, so `decide` and `plan` stay pure functions of their
//! arguments.

use std::fmt;
use std::str::FromStr;

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
    /// The sentinel leader's decision loop stops after its second round (alive but stuck).
    SentinelLoopStall,
    /// The proxy's discovery task panics once it has published.
    ProxyDiscoveryPanic,
    /// The proxy's clusterdata watch delivers nothing, as a silently stalled one would:
    /// only its checks can learn a change.
    ProxyWatchDeaf,
}

const NAMES: [(Fault, &str); 11] = [
    (Fault::SkipProxyHandshake, "skip-proxy-handshake"),
    (Fault::LowestWal, "lowest-wal"),
    (Fault::IgnoreSyncSet, "ignore-sync-set"),
    (Fault::NoSelfFencing, "no-self-fencing"),
    (Fault::NoProxyFencing, "no-proxy-fencing"),
    (Fault::KeeperLoopPanic, "keeper-loop-panic"),
    (Fault::KeeperLoopStall, "keeper-loop-stall"),
    (Fault::SentinelLoopPanic, "sentinel-loop-panic"),
    (Fault::SentinelLoopStall, "sentinel-loop-stall"),
    (Fault::ProxyDiscoveryPanic, "proxy-discovery-panic"),
    (Fault::ProxyWatchDeaf, "proxy-watch-deaf"),
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
