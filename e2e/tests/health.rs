//! Health endpoints (issue 14, point 2) with real processes: each Patroni path's code on the
//! master, a standby, a lagging standby (replay paused) and a frozen PostgreSQL; and a real
//! HAProxy that routes on them (writes to `/primary`, reads to `/replica?lag=1MB`), following
//! a failover. The HAProxy configuration is docs/operating.md's example.

use e2e::{running, serial, sql, Cluster, Opts};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::process::{Command, Stdio};
use std::time::Duration;
use testkit::process::ChildGuard;
use testkit::{free_port, PortGuard};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIN: Duration = Duration::from_secs(60);

/// The HTTP status of `GET path` on a keeper's metrics port (0 when it does not answer).
async fn code(c: &Cluster, uid: &str, path: &str) -> u16 {
    let k = c.keeper(uid);
    let get = async {
        let mut s = tokio::net::TcpStream::connect((k.addr.as_str(), k.metrics_port)).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    match tokio::time::timeout(Duration::from_secs(5), get).await {
        Ok(Ok(out)) => out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

async fn wait_code(c: &Cluster, uid: &str, path: &str, want: u16) {
    c.wait_for(
        &format!("{path} on {uid} to answer {want}"),
        MIN,
        async || (code(c, uid, path).await == want).then_some(()),
    )
    .await
    .expect("health code");
}

/// Asserts the codes of every path on one keeper.
async fn codes(c: &Cluster, uid: &str, want: &[(&str, u16)]) {
    for (path, code_wanted) in want {
        wait_code(c, uid, path, *code_wanted).await;
    }
}

const MASTER: &[(&str, u16)] = &[
    ("/primary", 200),
    ("/master", 200),
    ("/read-write", 200),
    ("/replica", 503),
    ("/read-only", 200),
    ("/health", 200),
    ("/liveness", 200),
    ("/readiness", 200),
];

const STANDBY: &[(&str, u16)] = &[
    ("/primary", 503),
    ("/master", 503),
    ("/read-write", 503),
    ("/replica", 200),
    ("/replica?lag=1MB", 200),
    ("/read-only", 200),
    ("/health", 200),
    ("/liveness", 200),
    ("/readiness", 200),
];

/// HAProxy in front of every keeper: port `rw` sends sessions to the server whose `/primary`
/// answers 200, port `ro` to the servers whose `/replica?lag=1MB` does.
struct Haproxy {
    _child: ChildGuard,
    rw: PortGuard,
    ro: PortGuard,
    _dir: tempfile::TempDir,
}

fn haproxy(c: &Cluster) -> Haproxy {
    let dir = testkit::temp_dir("haproxy").expect("tmp");
    let (rw, ro) = (free_port(), free_port());
    let servers = |check: &str| {
        c.keepers
            .iter()
            .map(|k| {
                format!(
                    "  server {} {}:{} check port {} {check}\n",
                    k.uid, k.addr, k.port, k.metrics_port
                )
            })
            .collect::<String>()
    };
    let cfg = format!(
        "global\n  maxconn 200\n\
         defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 1h\n  timeout server 1h\n\
         \n  default-server inter 500ms fall 2 rise 1 on-marked-down shutdown-sessions\n\
         listen rw\n  bind 127.0.0.1:{}\n  option httpchk GET /primary\n  http-check expect status 200\n{}\
         listen ro\n  bind 127.0.0.1:{}\n  balance leastconn\n  option httpchk GET /replica?lag=1MB\n  http-check expect status 200\n{}",
        rw.0,
        servers(""),
        ro.0,
        servers("")
    );
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, cfg).expect("cfg");
    let mut cmd = Command::new("haproxy");
    cmd.arg("-f")
        .arg(&path)
        .arg("-db")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.path().join("haproxy.log")).expect("log"),
        ));
    let child = ChildGuard::spawn("haproxy", &mut cmd).expect("haproxy");
    Haproxy {
        _child: child,
        rw,
        ro,
        _dir: dir,
    }
}

/// The PostgreSQL port a session through `port` lands on.
async fn lands_on(port: u16) -> Option<u16> {
    sql::server_port("127.0.0.1", port).await.ok()
}

async fn wait_lands(c: &Cluster, port: u16, what: &str, ok: impl Fn(u16) -> bool) -> u16 {
    c.wait_for(what, MIN, async || lands_on(port).await.filter(|p| ok(*p)))
        .await
        .expect("routed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_paths_and_haproxy_routing_through_a_failover() {
    let _s = serial().await;
    let (mut c, mut checker) = running(Opts::default()).await;
    c.wait_healthy(MIN).await.expect("healthy");
    let m = c.master().await.expect("master");
    let standbys = c.others(&m);
    codes(&c, &m, MASTER).await;
    for s in &standbys {
        codes(&c, s, STANDBY).await;
    }

    // A lagging standby: replay paused, then more than 1 MB written on the master.
    let lagging = &standbys[0];
    c.query(lagging, "SELECT pg_wal_replay_pause()::text")
        .await
        .expect("pause replay");
    c.exec_via_proxy(
        "CREATE TABLE IF NOT EXISTS filler (v text); \
         INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 4000)",
    )
    .await
    .expect("write 4 MB");
    wait_code(&c, lagging, "/replica?lag=1MB", 503).await;
    codes(
        &c,
        lagging,
        &[
            ("/replica", 200),
            ("/read-only?lag=1MB", 503),
            ("/primary", 503),
        ],
    )
    .await;
    codes(&c, &standbys[1], &[("/replica?lag=1MB", 200)]).await;
    c.query(lagging, "SELECT pg_wal_replay_resume()::text")
        .await
        .expect("resume replay");
    wait_code(&c, lagging, "/replica?lag=1MB", 200).await;

    // A frozen PostgreSQL (SIGSTOP): not healthy, the keeper itself alive.
    let frozen = &standbys[1];
    let pid = c.postmaster_pid(frozen).expect("postmaster");
    kill(Pid::from_raw(pid), Signal::SIGSTOP).expect("stop");
    codes(
        &c,
        frozen,
        &[
            ("/health", 503),
            ("/replica", 503),
            ("/readiness", 503),
            ("/liveness", 200),
        ],
    )
    .await;
    kill(Pid::from_raw(pid), Signal::SIGCONT).expect("cont");
    wait_code(&c, frozen, "/health", 200).await;

    // HAProxy on the health paths: writes on the master, reads on a standby, and both
    // follow a failover.
    let h = haproxy(&c);
    let master_port = c.keeper(&m).port;
    let standby_ports: Vec<u16> = standbys.iter().map(|s| c.keeper(s).port).collect();
    wait_lands(&c, h.rw.0, "HAProxy rw on the master", |p| p == master_port).await;
    wait_lands(&c, h.ro.0, "HAProxy ro on a standby", |p| {
        standby_ports.contains(&p)
    })
    .await;
    checker.nemesis();
    c.kill_keeper(&m, true);
    let new = c.wait_master_change(&m, MIN).await.expect("failover");
    let new_port = c.keeper(&new).port;
    let rw = wait_lands(&c, h.rw.0, "HAProxy rw on the new master", |p| {
        p == new_port
    })
    .await;
    assert_eq!(rw, new_port);
    sql::exec(
        "127.0.0.1",
        h.rw.0,
        "INSERT INTO filler VALUES ('after')",
        MIN,
    )
    .await
    .expect("a write through HAProxy on the new master");
    let other: Vec<u16> = standbys
        .iter()
        .filter(|s| **s != new)
        .map(|s| c.keeper(s).port)
        .collect();
    wait_lands(&c, h.ro.0, "HAProxy ro on the remaining standby", |p| {
        other.contains(&p)
    })
    .await;
    c.restart_keeper(&m).expect("restart");
    c.finish("health_haproxy", checker)
        .await
        .expect("invariants");
}
