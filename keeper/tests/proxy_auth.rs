//! The keeper keeps the proxies' auth role (issue 19, point 2): with --pg-auth-username it
//! creates the role and the lookup function on the master, and a real stolon-proxy in
//! terminate mode with --auth-user authenticates a SCRAM role through them (the server
//! accepts the proxy's proof), and refuses a wrong password with 28P01.

mod common;

use common::*;
use std::time::Duration;

const SPEC: &str = r#"{"initMode": "new", "sleepInterval": "1s", "failInterval": "4s"}"#;

async fn connect_as(port: u16, user: &str, password: &str) -> Result<String, String> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .user(user)
        .password(password)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(3));
    match cfg.connect(tokio_postgres::NoTls).await {
        Ok((c, conn)) => {
            tokio::spawn(conn);
            let row = c
                .query_one("select current_user::text", &[])
                .await
                .map_err(|e| e.to_string())?;
            Ok(row.get(0))
        }
        Err(e) => Err(e
            .code()
            .map_or_else(|| e.to_string(), |c| c.code().to_string())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keeper_keeps_the_proxies_auth_role_and_lookup_function() {
    let _serial = serial().await;
    let env = Env::new().await;
    let _sentinel = env.sentinel(SPEC);
    let pw = env.dir.path().join("auth.pw");
    std::fs::write(&pw, "auth-secret\n").expect("pw");
    let pw_arg = pw.display().to_string();
    let k = env.keeper(
        "k1",
        &[
            "--pg-auth-username",
            "proxyauth",
            "--pg-auth-passwordfile",
            &pw_arg,
        ],
    );
    let port = k.port.0;
    wait_for(&env, "the master", Duration::from_secs(60), async || {
        can_write(port).await.then_some(())
    })
    .await;
    let su = connect(port).await.expect("superuser");
    let lookup = wait_for(
        &env,
        "the lookup function",
        Duration::from_secs(20),
        async || {
            su.query_one(
                "select has_function_privilege('proxyauth', 'stolon_auth.lookup(text)', 'execute')",
                &[],
            )
            .await
            .ok()
            .map(|r| r.get::<_, bool>(0))
        },
    )
    .await;
    assert!(lookup, "the auth role may call the lookup function");
    su.batch_execute("CREATE ROLE alice LOGIN PASSWORD 'alice-pw'")
        .await
        .expect("alice");

    let (_proxy, proxy_port) = env.proxy_with(&[
        "--client-tls",
        "terminate",
        "--auth-user",
        "proxyauth",
        "--auth-passwordfile",
        &pw_arg,
        "--metrics-listen-address",
        "127.0.0.1:0",
    ]);
    let through = proxy_port.0;
    let who = wait_for(
        &env,
        "alice through the proxy",
        Duration::from_secs(30),
        async || connect_as(through, "alice", "alice-pw").await.ok(),
    )
    .await;
    assert_eq!(who, "alice");
    assert_eq!(
        connect_as(through, "alice", "wrong").await,
        Err("28P01".to_string())
    );
    // The proxy, not the server, checked it: the proxy's log says which roles it passed
    // through, and alice is not one of them.
    let log = std::fs::read_to_string(env.dir.path().join("proxy.log")).unwrap_or_default();
    assert!(
        !log.lines()
            .any(|l| l.contains("role passed through to the server") && l.contains("alice")),
        "{log}"
    );
    assert!(
        log.contains("authentication at the proxy failed"),
        "the wrong password was refused by the proxy\n{log}"
    );
}
