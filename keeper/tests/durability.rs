//! The keeper's state files survive a power loss (issue 23, point 1): the real keeper binary
//! runs under strace while it writes its uid file, and the system calls show the file's
//! data synced before the rename that makes it the file, and the directory synced after it,
//! as PostgreSQL and Go stolon do. Its directory is created 0700, PostgreSQL's rule.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

/// The strace lines of one keeper start that stops right after writing its uid (no
/// password is given, so it exits there).
fn trace_uid_write(dir: &std::path::Path) -> String {
    let trace = dir.with_extension("strace");
    let out = Command::new("strace")
        .args([
            "-f",
            "-e",
            "trace=openat,fsync,fdatasync,rename,renameat,renameat2",
        ])
        .arg("-o")
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_stolon-keeper"))
        .args(["--cluster-name", "dur", "--uid", "k1", "--data-dir"])
        .arg(dir)
        .env("PG_BIN_PATH", testkit::postgres::pg_bin_dir())
        .output()
        .expect("strace (scripts/deps.sh installs it)");
    assert!(
        !out.status.success(),
        "the keeper stops for want of a password"
    );
    std::fs::read_to_string(&trace).expect("trace")
}

/// The file descriptor an `openat` line returned for a path ending in `name`.
fn fd_opened(trace: &str, name: &str) -> Option<String> {
    trace
        .lines()
        .filter(|l| l.contains("openat(") && l.contains(&format!("{name}\"")))
        .filter_map(|l| l.rsplit("= ").next())
        .map(|fd| fd.trim().to_string())
        .rfind(|fd| fd.parse::<i32>().is_ok())
}

#[test]
fn the_uid_file_is_synced_before_and_after_its_rename_in_a_0700_dir() {
    let tmp = testkit::temp_dir("durable").expect("tmp");
    let dir = tmp.path().join("keeper");
    let trace = trace_uid_write(&dir);
    let mode = std::fs::metadata(&dir).expect("dir").permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the keeper's data dir");
    assert_eq!(
        std::fs::read_to_string(dir.join("keeper-uid")).expect("uid"),
        "k1"
    );
    let file_fd = fd_opened(&trace, "keeper-uid.tmp").expect("the temporary file opened");
    let dir_name = dir
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let lines: Vec<&str> = trace.lines().collect();
    let at = |pred: &dyn Fn(&str) -> bool| lines.iter().position(|l| pred(l));
    let rename = at(&|l| l.contains("rename") && l.contains("keeper-uid.tmp"))
        .unwrap_or_else(|| panic!("no rename in\n{trace}"));
    let file_sync = at(&|l| l.contains(&format!("fsync({file_fd})")))
        .unwrap_or_else(|| panic!("the file is never synced\n{trace}"));
    assert!(file_sync < rename, "synced before the rename\n{trace}");
    let dir_fd = (lines[rename..].iter())
        .find(|l| l.contains("openat(") && l.contains(&format!("{dir_name}\"")))
        .and_then(|l| l.rsplit("= ").next())
        .map(|fd| fd.trim().to_string())
        .unwrap_or_else(|| panic!("the directory is not opened after the rename\n{trace}"));
    assert!(
        lines[rename..]
            .iter()
            .any(|l| l.contains(&format!("fsync({dir_fd})"))),
        "the directory is synced after the rename\n{trace}"
    );
}
