//! Real clients the project did not write, through the proxy in terminate mode with
//! authentication at the proxy (issue 19, point 5): psycopg2 (libpq), pgx (Go) and pgjdbc
//! (Java), each at sslmode verify-full with SCRAM channel binding required, an md5 role at
//! sslmode require, a wrong password, a named prepared statement and a cancel. Built by
//! scripts/clients.sh (scripts/test.sh runs it).

mod common;

use common::authdb::*;
use common::pki::*;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// One client's run: its output lines.
fn run(mut cmd: Command) -> Vec<String> {
    let out = cmd.stdin(Stdio::null()).output().expect("the client runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines().map(str::to_string).collect()
}

/// A session's parameters, in libpq's words.
struct Login<'a> {
    user: &'a str,
    password: &'a str,
    sslmode: &'a str,
    channel_binding: &'a str,
}

fn conninfo(port: u16, ca: &Path, l: &Login) -> String {
    format!(
        "host=127.0.0.1 port={port} dbname=postgres user={} password={} sslmode={} sslrootcert={} channel_binding={} connect_timeout=10",
        l.user,
        l.password,
        l.sslmode,
        ca.display(),
        l.channel_binding
    )
}

fn psycopg2(port: u16, ca: &Path, l: &Login) -> Vec<String> {
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(testkit::workspace_path("clients/psycopg2_client.py"))
        .env("CONNINFO", conninfo(port, ca, l));
    run(cmd)
}

fn pgx(port: u16, ca: &Path, l: &Login) -> Vec<String> {
    let mut cmd = Command::new(testkit::built_client("pgx-client"));
    cmd.env("CONNINFO", conninfo(port, ca, l));
    run(cmd)
}

fn pgjdbc(port: u16, ca: &Path, l: &Login) -> Vec<String> {
    let url = format!(
        "jdbc:postgresql://127.0.0.1:{port}/postgres?sslmode={}&sslrootcert={}&channelBinding={}&connectTimeout=10",
        l.sslmode,
        ca.display(),
        l.channel_binding
    );
    let mut cmd = Command::new("java");
    cmd.arg("-cp")
        .arg(testkit::built_client("postgresql.jar"))
        .arg(testkit::workspace_path("clients/pgjdbc/Client.java"))
        .args([url.as_str(), l.user, l.password]);
    run(cmd)
}

type Client = fn(u16, &Path, &Login) -> Vec<String>;

fn check(name: &str, client: Client, proxy: &Proxy, ca: &Path) {
    let port = proxy.port.0;
    let full = [
        "connect ok".to_string(),
        "prepared 42".into(),
        "cancel ok".into(),
    ];
    // SCRAM with channel binding to the proxy's certificate, verified.
    let alice = Login {
        user: "alice",
        password: "alice-pw",
        sslmode: "verify-full",
        channel_binding: "require",
    };
    assert_eq!(
        client(port, ca, &alice),
        full,
        "{name}: alice\n{}",
        proxy.log_text()
    );
    // md5.
    let bob = Login {
        user: "bob",
        password: "bob-pw",
        sslmode: "require",
        channel_binding: "prefer",
    };
    assert_eq!(
        client(port, ca, &bob),
        full,
        "{name}: bob\n{}",
        proxy.log_text()
    );
    // A wrong password: PostgreSQL's refusal.
    let wrong = Login {
        password: "wrong",
        ..alice
    };
    let out = client(port, ca, &wrong);
    let refused = out.first().is_some_and(|l| {
        l == "connect error 28P01"
            || l.contains("password authentication failed for user \"alice\"")
    });
    assert!(refused, "{name}: wrong password: {out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg2_pgx_and_pgjdbc_through_tls_termination_and_proxy_authentication() {
    let pki = Pki::new();
    let s = setup(&pki).await;
    let dir = tempfile::tempdir().expect("dir");
    let proxy = spawn_proxy(&s, &pki, dir.path());
    assert!(wait_listening(&proxy).await, "{}", proxy.log_text());
    let ca = pki.ca_file();
    let up = wait_for(Duration::from_secs(15), || async {
        proxy.connect().await.is_ok()
    })
    .await;
    assert!(up, "{}", proxy.log_text());
    check("psycopg2", psycopg2, &proxy, &ca);
    check("pgx", pgx, &proxy, &ca);
    check("pgjdbc", pgjdbc, &proxy, &ca);
    // Every login above was checked by the proxy: SCRAM for alice, md5 for bob.
    let (_, metrics) = proxy.http_get("/metrics");
    for line in [
        "stolon_proxy_auth_total{result=\"scram\"} 3",
        "stolon_proxy_auth_total{result=\"md5\"} 3",
        "stolon_proxy_auth_total{result=\"failed\"} 3",
    ] {
        assert!(metrics.contains(line), "{line}\n{metrics}");
    }
}
