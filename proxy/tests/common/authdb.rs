//! A cluster for the authentication tests: PostgreSQL with md5 rules in pg_hba and the roles
//! alice (SCRAM), bob (md5), root (a superuser) and the proxy's auth role with its lookup
//! function; a proxy in terminate mode with a certificate and --auth-user.
#![allow(dead_code)]

use super::pki::*;
use super::*;
use std::path::Path;
use testkit::{Etcd, Postgres};

/// PostgreSQL with password rules and the roles of the tests: alice (SCRAM), bob (md5),
/// root (a superuser with a password), and the proxy's auth role with its lookup function.
pub async fn setup(pki: &Pki) -> Setup {
    let etcd = Etcd::start().expect("etcd");
    let pg = Postgres::start(&[]).expect("postgres");
    pg.psql(&format!(
        "CREATE ROLE alice LOGIN PASSWORD 'alice-pw';
         SET password_encryption = 'md5'; CREATE ROLE bob LOGIN PASSWORD 'bob-pw';
         RESET password_encryption;
         CREATE ROLE root LOGIN SUPERUSER PASSWORD 'root-pw';
         CREATE ROLE proxyauth LOGIN PASSWORD 'auth-pw';
         {}",
        control::auth_sql::lookup_function_sql("proxyauth")
    ))
    .expect("roles");
    // md5 rows: a SCRAM-stored role is asked for SCRAM, an md5-stored one for md5.
    std::fs::write(
        pg.data_dir().join("pg_hba.conf"),
        "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 md5\n",
    )
    .expect("pg_hba");
    pg.psql("SELECT pg_reload_conf()").expect("reload");
    let _ = pki;
    let store = open_store(&etcd).await;
    let s = Setup {
        etcd,
        pgs: vec![pg],
        store,
    };
    s.route_to("db0", &["p1"], 1).await;
    s
}

pub fn spawn_proxy(s: &Setup, pki: &Pki, dir: &Path) -> Proxy {
    let (cert, key) = pki.issue("proxy", false);
    let file = dir.join("auth-password");
    std::fs::write(&file, "auth-pw\n").expect("password file");
    let mut flags = terminate_flags(&cert, &key);
    flags.extend([
        "--auth-user".into(),
        "proxyauth".into(),
        "--auth-passwordfile".into(),
        file.display().to_string(),
    ]);
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    Proxy::spawn(&s.etcd, "p1", &refs)
}
