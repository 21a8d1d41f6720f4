//! Authentication at the proxy (`--auth-user`, terminate mode): the proxy learns a role's
//! stored password through the auth role (`lookup`), authenticates the client itself
//! (SCRAM-SHA-256 with channel binding when it terminated TLS, or md5), and authenticates
//! to the server as that role with what the client's proof revealed (`exchange`), so it can
//! open another session for the client later without asking it. A role it cannot do that
//! for passes through: the server authenticates the client as it always did.

pub mod exchange;
pub mod lookup;
pub mod scram;
pub mod wire;

use md5::{Digest, Md5};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A role's stored password, as pg_authid keeps it.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    Scram(scram::Verifier),
    /// The 32 hex digits after "md5": md5(password || user).
    Md5(String),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Secret::Scram(_) => "Secret::Scram(..)",
            Secret::Md5(_) => "Secret::Md5(..)",
        })
    }
}

impl Secret {
    /// A SCRAM verifier or an md5 hash; anything else (a plaintext password: PostgreSQL
    /// stores none since version 10) is not one.
    pub fn parse(s: &str) -> Option<Secret> {
        if let Some(hex) = s.strip_prefix("md5") {
            let ok = hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit());
            return ok.then(|| Secret::Md5(hex.to_ascii_lowercase()));
        }
        scram::Verifier::parse(s).map(Secret::Scram)
    }
}

/// What the proxy keeps of an authenticated client, in memory only, to authenticate as it
/// to another server later.
pub enum Credentials {
    Scram {
        client_key: [u8; 32],
        verifier: scram::Verifier,
    },
    Md5(String),
}

/// md5(password || user) in hex, as PostgreSQL stores it (without "md5").
pub fn md5_stored(user: &str, password: &str) -> String {
    let mut h = Md5::new();
    h.update(password.as_bytes());
    h.update(user.as_bytes());
    hex(&h.finalize())
}

/// The answer to an md5 challenge: "md5" || md5(stored-hex || salt) in hex.
pub fn md5_response(stored_hex: &str, salt: &[u8; 4]) -> String {
    let mut h = Md5::new();
    h.update(stored_hex.as_bytes());
    h.update(salt);
    format!("md5{}", hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Most roles remembered at once: a flood of unknown names must not grow memory.
const CACHE_MAX: usize = 10_000;

/// `--auth-user` and the roles' secrets read through it, each for `ttl`.
pub struct Auth {
    pub role: lookup::AuthRole,
    pub ttl: Duration,
    cache: Mutex<HashMap<String, (Option<Secret>, Instant)>>,
}

impl Auth {
    pub fn new(role: lookup::AuthRole, ttl: Duration) -> Auth {
        Auth {
            role,
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Option<Secret>, Instant)>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached answer for `user`, if still fresh.
    pub fn cached(&self, user: &str) -> Option<Option<Secret>> {
        let c = self.lock();
        let (secret, at) = c.get(user)?;
        (at.elapsed() < self.ttl).then(|| secret.clone())
    }

    pub fn remember(&self, user: &str, secret: Option<Secret>) {
        let mut c = self.lock();
        if c.len() >= CACHE_MAX {
            let ttl = self.ttl;
            c.retain(|_, (_, at)| at.elapsed() < ttl);
            if c.len() >= CACHE_MAX {
                return;
            }
        }
        c.insert(user.to_string(), (secret, Instant::now()));
    }

    /// Drops what is known of `user`: the next session looks it up again (its password
    /// may have changed).
    pub fn forget(&self, user: &str) {
        self.lock().remove(user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_is_postgresqls() {
        // md5('postgres' || 'postgres'), as PostgreSQL stores it.
        let stored = md5_stored("postgres", "postgres");
        assert_eq!(stored, "3175bce1d3201d16594cebf9d7eb3f9d");
        assert_eq!(
            md5_response(&stored, &[1, 2, 3, 4]).len(),
            35,
            "md5 and 32 hex digits"
        );
        assert_eq!(
            Secret::parse("md53175BCE1D3201D16594CEBF9D7EB3F9D"),
            Some(Secret::Md5(stored))
        );
        assert_eq!(Secret::parse("md5short"), None);
        assert_eq!(Secret::parse("plain-text"), None);
    }

    #[test]
    fn the_cache_forgets_after_its_ttl_and_on_demand() {
        let a = Auth::new(
            lookup::AuthRole {
                user: "a".into(),
                password: "p".into(),
                database: "postgres".into(),
            },
            Duration::from_secs(3600),
        );
        assert_eq!(a.cached("u"), None);
        a.remember("u", None);
        assert_eq!(a.cached("u"), Some(None));
        a.forget("u");
        assert_eq!(a.cached("u"), None);
        let expired = Auth::new(
            lookup::AuthRole {
                user: "a".into(),
                password: "p".into(),
                database: "postgres".into(),
            },
            Duration::ZERO,
        );
        expired.remember("u", None);
        assert_eq!(expired.cached("u"), None);
    }
}
