//! The README's first command, end to end: `scripts/cluster.sh up` brings up etcd, three
//! keepers, two sentinels and a proxy, shows `stolonctl status`, runs the failover demo; then
//! `status` and `stop` (every process gone). It uses the binaries this test run built and
//! ports chosen free for it.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use testkit::free_port;

struct Demo {
    root: PathBuf,
    envs: Vec<(String, String)>,
    /// Run as this OS user (uid, gid) instead of ourselves.
    user: Option<(u32, u32)>,
}

impl Demo {
    fn run(&self, sub: &str) -> (bool, String) {
        let mut cmd = Command::new("timeout");
        cmd.arg("600")
            .arg("bash")
            .arg(self.root.join("scripts/cluster.sh"))
            .arg(sub)
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if let Some((uid, gid)) = self.user {
            std::os::unix::process::CommandExt::uid(&mut cmd, uid);
            std::os::unix::process::CommandExt::gid(&mut cmd, gid);
            cmd.env("HOME", "/tmp");
        }
        let out = cmd.output().expect("cluster.sh");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.run("stop");
    }
}

fn pids(dir: &Path) -> Vec<i32> {
    std::fs::read_dir(dir.join("pids"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_cluster_command_brings_up_fails_over_and_stops() {
    let _serial = serial().await;
    run_demo(None);
}

/// Run by a non-root user, the cluster runs PostgreSQL as that user (here the `postgres` OS
/// user, when the tests run as root).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_cluster_command_runs_as_a_non_root_user() {
    let _serial = serial().await;
    let Some((uid, gid)) = testkit::postgres::pg_os_user() else {
        return; // not root: the other test already ran as a non-root user
    };
    run_demo(Some((uid.as_raw(), gid.as_raw())));
}

fn run_demo(user: Option<(u32, u32)>) {
    let dir = testkit::temp_dir("demo").expect("tmp");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    if let Some((uid, gid)) = user {
        nix::unistd::chown(dir.path(), Some(uid.into()), Some(gid.into())).expect("chown");
    }
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_stolon-keeper"))
        .parent()
        .expect("bin dir")
        .to_path_buf();
    let ports: Vec<_> = (0..6).map(|_| free_port()).collect();
    let p: Vec<String> = ports.iter().map(|p| p.0.to_string()).collect();
    drop(ports);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("root")
        .to_path_buf();
    let envs = vec![
        (
            "STOLON_DEMO_DIR".to_string(),
            dir.path().join("cluster").display().to_string(),
        ),
        ("STOLON_DEMO_BIN".into(), bin.display().to_string()),
        ("STOLON_DEMO_SKIP_BUILD".into(), "1".into()),
        ("STOLON_DEMO_ETCD_PORT".into(), p[0].clone()),
        ("STOLON_DEMO_ETCD_PEER_PORT".into(), p[1].clone()),
        ("STOLON_DEMO_PROXY_PORT".into(), p[2].clone()),
        (
            "STOLON_DEMO_KEEPER_PORTS".into(),
            format!("{} {} {}", p[3], p[4], p[5]),
        ),
        (
            "PG_BIN_PATH".into(),
            testkit::postgres::pg_bin_dir().display().to_string(),
        ),
        ("PATH".into(), std::env::var("PATH").unwrap_or_default()),
    ];
    let demo = Demo { root, envs, user };
    let (ok, out) = demo.run("up");
    eprintln!("{out}");
    assert!(ok, "cluster.sh up failed");
    assert!(
        out.contains("=== keepers ===") && out.contains("(leader)"),
        "stolonctl status shown"
    );
    assert!(
        out.contains("writes go through the proxy again after"),
        "failover demo ran"
    );
    let (ok, out) = demo.run("status");
    assert!(ok && out.contains("master (through the proxy"), "{out}");
    let running = pids(&dir.path().join("cluster"));
    assert_eq!(running.len(), 7, "etcd, 3 keepers, 2 sentinels, a proxy");
    if let Some((uid, _)) = user {
        // PostgreSQL runs as the user who ran the command.
        let pg = std::fs::metadata(dir.path().join("cluster/keeper2/postgres")).expect("data dir");
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&pg), uid);
    }
    let (ok, out) = demo.run("stop");
    assert!(ok, "{out}");
    for pid in running {
        assert!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err(),
            "pid {pid} still runs"
        );
    }
}
