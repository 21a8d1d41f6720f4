//! `--max-connections` against the process's file descriptor limit (RLIMIT_NOFILE): a proxy
//! that accepts more sessions than it has descriptors for fails them with EMFILE under
//! load, at the worst moment. The limit is checked once at start instead.

/// The default `--max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Descriptors kept for everything but sessions: listeners, the store client, the metrics
/// endpoint, over-limit rejections (at most `server::REJECTING_MAX`), logs.
pub const RESERVED_FDS: u64 = 256;
/// Each session holds two descriptors: the client's socket and the master's.
const FDS_PER_SESSION: u64 = 2;

/// The session limit for a descriptor limit of `nofile`: the asked one if it fits, or the
/// default lowered to what fits (with a warning to log); an asked limit that does not fit
/// is an error that says what to change.
pub fn fit(asked: Option<usize>, nofile: u64) -> Result<(usize, Option<String>), String> {
    let room = nofile.saturating_sub(RESERVED_FDS) / FDS_PER_SESSION;
    let room = usize::try_from(room).unwrap_or(usize::MAX);
    match asked {
        Some(n) if n <= room => Ok((n, None)),
        Some(n) => Err(format!(
            "--max-connections {n} needs {} file descriptors but RLIMIT_NOFILE is {nofile} \
             (2 per session + {RESERVED_FDS}): raise the limit (ulimit -n, systemd \
             LimitNOFILE=, docker --ulimit nofile=) or lower --max-connections to {room}",
            n as u64 * FDS_PER_SESSION + RESERVED_FDS
        )),
        None if DEFAULT_MAX_CONNECTIONS <= room => Ok((DEFAULT_MAX_CONNECTIONS, None)),
        None if room == 0 => Err(format!(
            "RLIMIT_NOFILE is {nofile}: not even one session fits beside the \
             {RESERVED_FDS} descriptors the proxy keeps; raise the limit (ulimit -n)"
        )),
        None => Ok((
            room,
            Some(format!(
                "max connections lowered from the default {DEFAULT_MAX_CONNECTIONS} to {room}: \
                 RLIMIT_NOFILE is {nofile} (raise it, or set --max-connections to silence this)"
            )),
        )),
    }
}

/// Raises the soft descriptor limit to the hard one (as Go's runtime does at start) and
/// returns it.
pub fn raise_nofile() -> std::io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return Ok(hard);
    }
    Ok(soft)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_limit_fits_the_descriptor_limit() {
        // (asked, RLIMIT_NOFILE) -> limit, or an error
        assert_eq!(fit(Some(100), 1024), Ok((100, None)));
        assert_eq!(fit(Some(384), 1024), Ok((384, None)));
        assert!(fit(Some(385), 1024).expect_err("does not fit").contains(
            "--max-connections 385 needs 1026 file descriptors but RLIMIT_NOFILE is 1024"
        ));
        assert_eq!(fit(None, 1 << 20), Ok((DEFAULT_MAX_CONNECTIONS, None)));
        let (n, warning) = fit(None, 1024).expect("lowered");
        assert_eq!(n, 384);
        assert!(warning
            .expect("warned")
            .contains("lowered from the default 10000 to 384"));
        assert!(fit(None, 100).is_err());
        assert!(fit(Some(1), 0).is_err());
    }
}
