//! `loadtest compare --security`: the same side-by-side runs with TLS from pgbench
//! (`tls`: PostgreSQL with ssl on, every target reached with sslmode=require) or with a
//! SCRAM role (`scram`: pgbench logs in as a role with a SCRAM password through md5 rules).
//! stolon-proxy engines with a `+terminate` suffix terminate the TLS (and, with `scram`,
//! authenticate at the proxy); PgBouncer terminates TLS (`client_tls_sslmode=require`) and
//! authenticates through the same lookup function (`auth_query`).

use crate::pgbench::Login;
use anyhow::{Context, Result};
use std::path::PathBuf;
use testkit::postgres::chown_to_pg_user;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Security {
    #[default]
    Plain,
    Tls,
    Scram,
}

const ROLE: &str = "bench";
const ROLE_PASSWORD: &str = "bench-pw";
const AUTH_ROLE: &str = "proxyauth";
const AUTH_PASSWORD: &str = "auth-pw";

/// Files and settings of one security mode, for every target of the run.
pub struct Secured {
    pub mode: Security,
    dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

impl Secured {
    pub fn new(mode: Security) -> Result<Secured> {
        let dir = testkit::temp_dir("bench-sec")?;
        let files = testkit::TlsFiles::generate()?;
        // PostgreSQL and PgBouncer (running as postgres) read the key: theirs, mode 0600.
        let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
        std::fs::copy(&files.server_cert, &cert)?;
        std::fs::copy(&files.server_key, &key)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
        std::fs::write(dir.path().join("auth.pw"), AUTH_PASSWORD)?;
        chown_to_pg_user(dir.path())?;
        Ok(Secured {
            mode,
            dir,
            cert,
            key,
        })
    }

    /// PostgreSQL settings (ssl on in `tls` mode).
    pub fn pg_settings(&self) -> Vec<(String, String)> {
        match self.mode {
            Security::Tls => vec![
                ("ssl".into(), "on".into()),
                ("ssl_cert_file".into(), self.cert.display().to_string()),
                ("ssl_key_file".into(), self.key.display().to_string()),
            ],
            _ => vec![],
        }
    }

    /// After pgbench's init: the SCRAM role, the auth role and lookup function, md5 rules.
    pub fn prepare(&self, pg: &testkit::Postgres) -> Result<()> {
        if self.mode != Security::Scram {
            return Ok(());
        }
        pg.psql(&format!(
            "CREATE ROLE {ROLE} LOGIN PASSWORD '{ROLE_PASSWORD}';
             GRANT SELECT, UPDATE, INSERT ON ALL TABLES IN SCHEMA public TO {ROLE};
             CREATE ROLE {AUTH_ROLE} LOGIN PASSWORD '{AUTH_PASSWORD}';
             {}",
            control::auth_sql::lookup_function_sql(AUTH_ROLE)
        ))?;
        std::fs::write(
            pg.data_dir().join("pg_hba.conf"),
            "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 md5\n",
        )
        .context("pg_hba.conf")?;
        pg.psql("SELECT pg_reload_conf()")?;
        Ok(())
    }

    /// How pgbench logs in, whatever the target.
    pub fn login(&self) -> Login {
        match self.mode {
            Security::Plain => Login::default(),
            Security::Tls => Login {
                user: "postgres".into(),
                env: vec![("PGSSLMODE".into(), "require".into())],
            },
            Security::Scram => Login {
                user: ROLE.into(),
                env: vec![
                    ("PGPASSWORD".into(), ROLE_PASSWORD.into()),
                    ("PGSSLMODE".into(), "disable".into()),
                ],
            },
        }
    }

    /// stolon-proxy flags of a `+terminate` engine.
    pub fn terminate_flags(&self) -> Vec<String> {
        let mut f: Vec<String> = vec!["--client-tls".into(), "terminate".into()];
        match self.mode {
            Security::Tls => f.extend([
                "--tls-cert-file".into(),
                self.cert.display().to_string(),
                "--tls-key-file".into(),
                self.key.display().to_string(),
            ]),
            Security::Scram => f.extend([
                "--auth-user".into(),
                AUTH_ROLE.into(),
                "--auth-passwordfile".into(),
                self.dir.path().join("auth.pw").display().to_string(),
            ]),
            Security::Plain => {}
        }
        f
    }

    /// PgBouncer's authentication and TLS lines, and its userlist.
    pub fn pgbouncer(&self) -> (String, String) {
        match self.mode {
            Security::Plain => ("auth_type = trust\n".into(), "\"postgres\" \"\"\n".into()),
            Security::Tls => (
                format!(
                    "auth_type = trust\nclient_tls_sslmode = require\nclient_tls_cert_file = {}\nclient_tls_key_file = {}\n",
                    self.cert.display(),
                    self.key.display()
                ),
                "\"postgres\" \"\"\n".into(),
            ),
            Security::Scram => (
                format!(
                    "auth_type = scram-sha-256\nauth_user = {AUTH_ROLE}\nauth_query = SELECT $1::text, password FROM stolon_auth.lookup($1)\n"
                ),
                format!("\"{AUTH_ROLE}\" \"{AUTH_PASSWORD}\"\n"),
            ),
        }
    }
}
