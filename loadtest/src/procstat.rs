//! CPU time and memory of a process, from /proc.

/// utime + stime of `pid` in seconds (all threads).
pub fn cpu_seconds(pid: u32) -> f64 {
    let (user, system) = cpu_times(pid);
    user + system
}

/// utime and stime of `pid` in seconds (all threads): the process's own work, and the
/// kernel's on its behalf (system calls, and on loopback the peer's side of each send).
pub fn cpu_times(pid: u32) -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0.0, 0.0);
    };
    // Fields after the command name, which is in parentheses and may contain spaces.
    let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
        return (0.0, 0.0);
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the state field.
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (field(11) / clock_ticks(), field(12) / clock_ticks())
}

fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map(|v| v as f64)
        .unwrap_or(100.0)
}

/// Voluntary context switches of `pid`, all threads summed: how often it went to sleep
/// waiting for something (in a relay, for the next readable socket), so that a wake-up
/// count per transaction can be set beside the CPU time.
pub fn sleeps(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .filter_map(|s| status_number(&s, "voluntary_ctxt_switches:"))
        .sum()
}

/// Resident set size of `pid` in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| status_number(&s, "VmRSS:"))
        .unwrap_or(0)
}

/// The number after `key` on its line of a /proc status file ("VmRSS:   1234 kB" gives 1234).
fn status_number(status: &str, key: &str) -> Option<u64> {
    let rest = status.lines().find_map(|l| l.strip_prefix(key))?;
    rest.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_numbers_are_read_by_their_exact_key() {
        let status = "Name:\tx\nVmRSS:\t    4108 kB\nvoluntary_ctxt_switches:\t1168\n\
                      nonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(status_number(status, "VmRSS:"), Some(4108));
        assert_eq!(
            status_number(status, "voluntary_ctxt_switches:"),
            Some(1168)
        );
        assert_eq!(status_number(status, "VmSwap:"), None);
        let me = std::process::id();
        assert!(rss_kib(me) > 0 && sleeps(me) > 0);
    }
}
