//! Start a child under a seccomp filter that makes chosen syscalls fail with EPERM, as a
//! container's seccomp profile does (Docker's default denies io_uring). Tests use it to
//! force fallback paths for real.
#![allow(unsafe_code)]

use anyhow::{Context, Result};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// io_uring_setup(2) on x86_64 and aarch64 (the number is the same on both).
pub const SYS_IO_URING_SETUP: i64 = 425;

/// Arranges for `cmd` to run with `syscalls` denied (EPERM).
pub fn deny_syscalls(cmd: &mut Command, syscalls: &[i64]) -> Result<()> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).context("seccomp: unsupported arch")?;
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        syscalls.iter().map(|s| (*s, vec![])).collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(nix::libc::EPERM as u32),
        arch,
    )
    .context("building the seccomp filter")?;
    // Compiled before fork: the child only installs it.
    let program: BpfProgram = filter.try_into().context("compiling the seccomp filter")?;
    // SAFETY: the closure runs between fork and exec; it only calls apply_filter, which
    // issues prctl/seccomp syscalls on the prepared program and does not allocate or take
    // locks, so it is safe in the forked child.
    unsafe {
        cmd.pre_exec(move || {
            seccompiler::apply_filter(&program).map_err(|e| std::io::Error::other(e.to_string()))
        });
    }
    Ok(())
}
