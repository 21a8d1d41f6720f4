//! Health endpoints on the keeper's `--metrics-listen-address` (one port for `/metrics` and
//! health, as stolon serves `/metrics`), with Patroni's paths and meanings so HAProxy,
//! Kubernetes or Consul checks written for Patroni work unchanged:
//!
//! | path | 200 when |
//! |---|---|
//! | `/primary`, `/master`, `/leader`, `/read-write` | this is the elected, converged master the proxies route to, running and not fenced |
//! | `/replica[?lag=N]` | a running standby streaming from the master, not the elected master, within `lag` bytes (`10MB`, `1GB`, `16kB` or bytes) |
//! | `/read-only[?lag=N]` | `/primary` or `/replica` would answer 200 |
//! | `/health` | PostgreSQL is running |
//! | `/liveness` | the snapshot is fresh: the keeper's loop completed a round within the fence window (failInterval / 2), or is in a bounded step |
//! | `/readiness` | `/primary`, or a running standby that streams |
//! | `/failsafe/ack`, `/failsafe/confirm` | failsafe mode's requests between keepers and from proxies (`failsafe`) |
//!
//! Every path answers from the snapshot the loop left after its last round; once that is
//! older than the fence window and no bounded step is under way (a stuck loop), every path
//! answers 503: a stuck keeper's last word is not a health check's truth.
//! Anything else is 503 with the same JSON body (role, state, lag, age). The lag of a standby is
//! the master's WAL position as last published in the clusterdata minus this standby's replay
//! position: it is as stale as one sentinel round plus one keeper publish (a sleepInterval
//! each at most; event driven, so usually far less).

use std::time::{Duration, Instant};

/// What the keeper's loop last saw, for the health endpoints.
#[derive(Clone, Debug, Default)]
pub struct HealthState {
    /// When the loop last completed a round, and how old that may be (the fence window).
    pub loop_at: Option<Instant>,
    pub loop_bound: Duration,
    /// A bounded step of the loop (an observation, a base backup) may run until then: the
    /// loop is alive meanwhile.
    pub acting_until: Option<Instant>,
    pub pg_running: bool,
    pub in_recovery: bool,
    /// A standby's walreceiver streams.
    pub streaming: bool,
    pub fenced: bool,
    /// The clusterdata names this keeper's db the master...
    pub elected: bool,
    /// ...and the proxies route to it.
    pub routed: bool,
    /// Its db spec is applied.
    pub converged: bool,
    /// Bytes behind the master's last published WAL position (standbys).
    pub lag: Option<u64>,
    /// Failsafe mode's state as JSON (`failsafe::State::health_json`); empty: off.
    pub failsafe: String,
}

impl HealthState {
    fn primary(&self) -> bool {
        self.pg_running
            && !self.in_recovery
            && !self.fenced
            && self.elected
            && self.routed
            && self.converged
    }

    fn replica(&self, max_lag: Option<u64>) -> bool {
        let within = match max_lag {
            None => true,
            Some(max) => self.lag.is_some_and(|l| l <= max),
        };
        self.pg_running && self.in_recovery && self.streaming && !self.elected && within
    }

    /// The JSON body; `age_ms` is how old the snapshot is (null before the first round).
    fn body(&self, now: Instant) -> String {
        let role = match (self.pg_running, self.in_recovery) {
            (false, _) => "unknown",
            (true, false) => "master",
            (true, true) => "replica",
        };
        let state = if self.pg_running {
            "running"
        } else {
            "stopped"
        };
        let lag = self.lag.map_or("null".to_string(), |l| l.to_string());
        let age = (self.loop_at).map_or("null".to_string(), |t| {
            now.saturating_duration_since(t).as_millis().to_string()
        });
        let failsafe = if self.failsafe.is_empty() {
            "null"
        } else {
            &self.failsafe
        };
        format!(
            "{{\"role\":\"{role}\",\"state\":\"{state}\",\"elected\":{},\"routed\":{},\"streaming\":{},\"fenced\":{},\"lag\":{lag},\"failsafe\":{failsafe},\"age_ms\":{age}}}",
            self.elected, self.routed, self.streaming, self.fenced
        )
    }

    /// Whether the snapshot may still be answered from at `now` (see the module's header).
    fn fresh(&self, now: Instant) -> bool {
        self.acting_until.is_some_and(|t| now < t)
            || (self.loop_at).is_some_and(|t| now.saturating_duration_since(t) <= self.loop_bound)
    }

    /// The answer for `path?query` at `now`: `None` for an unknown path (404),
    /// `Some(Ok(body))` for 200, `Some(Err(body))` for 503.
    pub fn answer(&self, path: &str, query: &str, now: Instant) -> Option<Result<String, String>> {
        let lag = match lag_param(query) {
            Ok(l) => l,
            Err(e) => return Some(Err(e)),
        };
        let ok = match path {
            "/primary" | "/master" | "/leader" | "/read-write" => self.primary(),
            "/replica" => self.replica(lag),
            "/read-only" => self.primary() || self.replica(lag),
            "/health" => self.pg_running,
            "/liveness" => true,
            "/readiness" => {
                self.primary() || (self.pg_running && self.in_recovery && self.streaming)
            }
            _ => return None,
        };
        let ok = ok && self.fresh(now);
        let body = self.body(now);
        Some(if ok { Ok(body) } else { Err(body) })
    }
}

/// `lag=<bytes|NkB|NMB|NGB|NTB>` from a query string, as Patroni reads it (1024-based units).
fn lag_param(query: &str) -> Result<Option<u64>, String> {
    let Some(v) = query.split('&').find_map(|kv| kv.strip_prefix("lag=")) else {
        return Ok(None);
    };
    control::cli::parse_size(v).map(Some).ok_or_else(|| {
        format!("{{\"error\":\"invalid lag {v:?}: bytes, or a number with kB, MB, GB or TB\"}}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master() -> HealthState {
        HealthState {
            loop_at: Some(Instant::now()),
            loop_bound: Duration::from_secs(10),
            pg_running: true,
            elected: true,
            routed: true,
            converged: true,
            lag: None,
            ..Default::default()
        }
    }

    fn standby(lag: u64) -> HealthState {
        HealthState {
            loop_at: Some(Instant::now()),
            loop_bound: Duration::from_secs(10),
            pg_running: true,
            in_recovery: true,
            streaming: true,
            converged: true,
            lag: Some(lag),
            ..Default::default()
        }
    }

    fn code(s: &HealthState, path: &str, query: &str) -> u16 {
        match s.answer(path, query, Instant::now()) {
            None => 404,
            Some(Ok(_)) => 200,
            Some(Err(_)) => 503,
        }
    }

    #[test]
    fn codes_by_path_and_state() {
        let stopped = HealthState {
            pg_running: false,
            ..standby(0)
        };
        let not_routed = HealthState {
            routed: false,
            ..master()
        };
        let fenced = HealthState {
            fenced: true,
            ..master()
        };
        let rows: [(&str, &HealthState, &str, &str, u16); 20] = [
            ("master", &master(), "/primary", "", 200),
            ("master", &master(), "/master", "", 200),
            ("master", &master(), "/read-write", "", 200),
            ("master", &master(), "/replica", "", 503),
            ("master", &master(), "/read-only", "", 200),
            ("master", &master(), "/health", "", 200),
            ("fenced master", &fenced, "/primary", "", 503),
            ("unrouted master", &not_routed, "/primary", "", 503),
            ("standby", &standby(100), "/primary", "", 503),
            ("standby", &standby(100), "/replica", "", 200),
            ("standby", &standby(100), "/replica", "lag=1kB", 200),
            (
                "lagging standby",
                &standby(20 << 20),
                "/replica",
                "lag=10MB",
                503,
            ),
            (
                "lagging standby",
                &standby(20 << 20),
                "/read-only",
                "lag=10MB",
                503,
            ),
            ("lagging standby", &standby(20 << 20), "/replica", "", 200),
            ("standby", &standby(0), "/readiness", "", 200),
            ("stopped", &stopped, "/health", "", 503),
            ("stopped", &stopped, "/replica", "", 503),
            ("stopped", &stopped, "/liveness", "", 200),
            ("stopped", &stopped, "/readiness", "", 503),
            ("any", &master(), "/nosuch", "", 404),
        ];
        for (what, s, path, q, want) in rows {
            assert_eq!(code(s, path, q), want, "{what} {path}?{q}");
        }
    }

    /// A snapshot older than its bound (the fence window) answers 503 on every path, a
    /// master's `/primary` included, unless a bounded step of the loop is under way.
    #[test]
    fn a_stale_snapshot_answers_503_on_every_path() {
        let mut s = master();
        s.loop_at = None;
        assert_eq!(code(&s, "/liveness", ""), 503);
        let now = Instant::now();
        s.loop_at = Some(now);
        let at = |s: &HealthState, path: &str, secs: u64| match s.answer(
            path,
            "",
            now + Duration::from_secs(secs),
        ) {
            None => 404,
            Some(Ok(_)) => 200,
            Some(Err(_)) => 503,
        };
        for path in [
            "/primary",
            "/read-only",
            "/health",
            "/liveness",
            "/readiness",
        ] {
            assert_eq!(at(&s, path, 10), 200, "{path} within the bound");
            assert_eq!(at(&s, path, 11), 503, "{path} past the bound");
        }
        s.acting_until = Some(now + Duration::from_secs(60));
        assert_eq!(at(&s, "/primary", 30), 200, "a bounded step under way");
        assert_eq!(at(&s, "/primary", 61), 503, "past the step's own bound");
        assert_eq!(at(&s, "/nosuch", 61), 404, "an unknown path is still 404");
        let body = s.answer("/primary", "", now + Duration::from_secs(61));
        assert!(
            matches!(&body, Some(Err(b)) if b.ends_with(",\"age_ms\":61000}")),
            "the body says how old the snapshot is: {body:?}"
        );
    }

    #[test]
    fn lag_units_as_patroni_reads_them() {
        use control::cli::parse_size;
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        assert_eq!(parse_size("16kB"), Some(16 << 10));
        assert_eq!(parse_size("10MB"), Some(10 << 20));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("10XB"), None);
        assert_eq!(code(&standby(0), "/replica", "lag=bogus"), 503);
    }
}
