//! Authentication at the proxy (issue 19, point 2) with real etcd, PostgreSQL (md5 rules in
//! pg_hba, SCRAM and md5 roles), the proxy binary, libpq's psql and tokio-postgres over
//! OpenSSL: the proxy checks the client's password against the verifier the lookup function
//! gives, authenticates to the server with what the proof revealed (the server accepts it),
//! refuses a wrong password as PostgreSQL does, and passes through what it cannot check.

mod common;

use common::authdb::*;
use common::pki::*;
use common::*;
use std::time::Duration;

/// psql through the proxy as `user` with `password`: the one value, or psql's error.
fn psql_as(proxy: &Proxy, user: &str, password: &str, extra: &str) -> Result<String, String> {
    let conninfo = format!(
        "host=127.0.0.1 port={} user={user} dbname=postgres connect_timeout=5 {extra}",
        proxy.port.0
    );
    let out = std::process::Command::new(testkit::postgres::pg_bin_dir().join("psql"))
        .args(["-XAtq", "-d", &conninfo, "-c", "select current_user"])
        .env("PGPASSWORD", password)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn auth_count(proxy: &Proxy, result: &str) -> f64 {
    let (_, body) = proxy.http_get("/metrics");
    let name = format!("stolon_proxy_auth_total{{result=\"{result}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&name))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_authenticates_scram_and_md5_roles_and_passes_the_rest_through() {
    let pki = Pki::new();
    let s = setup(&pki).await;
    let dir = tempfile::tempdir().expect("dir");
    let proxy = spawn_proxy(&s, &pki, dir.path());
    let up = wait_for(Duration::from_secs(15), || async {
        psql_as(&proxy, "postgres", "", "sslmode=require").is_ok()
    })
    .await;
    assert!(up, "{}", proxy.log_text());

    // SCRAM, over TLS with channel binding required (SCRAM-SHA-256-PLUS bound to the
    // proxy's certificate), and in the clear.
    assert_eq!(
        psql_as(
            &proxy,
            "alice",
            "alice-pw",
            "sslmode=require channel_binding=require"
        ),
        Ok("alice".into()),
        "{}",
        proxy.log_text()
    );
    assert_eq!(
        psql_as(&proxy, "alice", "alice-pw", "sslmode=disable"),
        Ok("alice".into())
    );
    assert_eq!(auth_count(&proxy, "scram"), 2.0);
    // md5.
    assert_eq!(
        psql_as(&proxy, "bob", "bob-pw", "sslmode=require"),
        Ok("bob".into())
    );
    assert_eq!(auth_count(&proxy, "md5"), 1.0);

    // A wrong password: refused by the proxy as PostgreSQL refuses it.
    let err = psql_as(&proxy, "alice", "wrong", "sslmode=require").expect_err("refused");
    assert!(
        err.contains("password authentication failed for user \"alice\""),
        "{err}"
    );
    let err = psql_as(&proxy, "bob", "wrong", "sslmode=require").expect_err("refused");
    assert!(
        err.contains("password authentication failed for user \"bob\""),
        "{err}"
    );
    assert_eq!(auth_count(&proxy, "failed"), 2.0);

    // A superuser and an unknown role: not looked up, the server authenticates them (and
    // refuses the unknown one with its own words).
    assert_eq!(
        psql_as(&proxy, "root", "root-pw", "sslmode=require"),
        Ok("root".into())
    );
    let err = psql_as(&proxy, "nobody", "x", "sslmode=require").expect_err("unknown");
    assert!(
        err.contains("password authentication failed for user \"nobody\""),
        "{err}"
    );
    assert_eq!(auth_count(&proxy, "passthrough"), 2.0);

    // A role that may not log in: the server's own refusal, passed through.
    s.pgs[0]
        .psql("CREATE ROLE locked NOLOGIN PASSWORD 'locked-pw'")
        .expect("locked");
    let err = psql_as(&proxy, "locked", "locked-pw", "sslmode=require").expect_err("locked");
    assert!(
        err.contains("role \"locked\" is not permitted to log in"),
        "{err}"
    );

    // Another client library: tokio-postgres over OpenSSL picks SCRAM-SHA-256-PLUS.
    let mut b = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls()).expect("ssl");
    b.set_ca_file(pki.ca_file()).expect("ca");
    let tls = postgres_openssl::MakeTlsConnector::new(b.build());
    let conninfo = format!(
        "host=127.0.0.1 port={} user=alice password=alice-pw dbname=postgres sslmode=require channel_binding=require",
        proxy.port.0
    );
    let (c, conn) = tokio_postgres::connect(&conninfo, tls.clone())
        .await
        .expect("tokio-postgres");
    tokio::spawn(conn);
    let who: String = c
        .query_one("select current_user::text", &[])
        .await
        .expect("q")
        .get(0);
    assert_eq!(who, "alice");
    let bad = conninfo.replace("alice-pw", "nope");
    let err = tokio_postgres::connect(&bad, tls)
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code().map(|c| c.code()), Some("28P01"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_password_is_read_again_after_a_failed_login() {
    let pki = Pki::new();
    let s = setup(&pki).await;
    let dir = tempfile::tempdir().expect("dir");
    let proxy = spawn_proxy(&s, &pki, dir.path());
    let up = wait_for(Duration::from_secs(15), || async {
        psql_as(&proxy, "alice", "alice-pw", "sslmode=require").is_ok()
    })
    .await;
    assert!(up, "{}", proxy.log_text());
    // The verifier is cached; the password changes on the server.
    s.pgs[0]
        .psql("ALTER ROLE alice PASSWORD 'new-pw'")
        .expect("alter");
    // The first try with the new password fails against the cached verifier and drops
    // it; the next one reads it again and gets in.
    let _ = psql_as(&proxy, "alice", "new-pw", "sslmode=require");
    assert_eq!(
        psql_as(&proxy, "alice", "new-pw", "sslmode=require"),
        Ok("alice".into())
    );
    let err = psql_as(&proxy, "alice", "alice-pw", "sslmode=require").expect_err("old one");
    assert!(err.contains("password authentication failed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_lookup_passes_the_session_through_to_the_server() {
    let pki = Pki::new();
    let s = setup(&pki).await;
    // The auth role's password is wrong: every lookup fails.
    s.pgs[0]
        .psql("ALTER ROLE proxyauth PASSWORD 'something-else'")
        .expect("alter");
    let dir = tempfile::tempdir().expect("dir");
    let proxy = spawn_proxy(&s, &pki, dir.path());
    let up = wait_for(Duration::from_secs(15), || async {
        psql_as(&proxy, "alice", "alice-pw", "sslmode=require").is_ok()
    })
    .await;
    assert!(
        up,
        "alice gets in, authenticated by the server\n{}",
        proxy.log_text()
    );
    assert!(auth_count(&proxy, "lookup_error") >= 1.0);
    assert_eq!(auth_count(&proxy, "scram"), 0.0);
    assert!(
        proxy
            .log_text()
            .contains("cannot look up the role through --auth-user"),
        "{}",
        proxy.log_text()
    );
}
