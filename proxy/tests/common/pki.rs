//! Certificates for the TLS tests: a CA made with rcgen, certificates it signs (expired on
//! demand), written where PostgreSQL (running as its own OS user) can read them.
#![allow(dead_code)]

use super::Proxy;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use std::path::{Path, PathBuf};

/// A CA and certificates it signs, written as PEM files.
pub struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    pub fn new() -> Pki {
        // PostgreSQL, running as its own OS user, reads its certificate from here.
        let dir = testkit::temp_dir("pki").expect("dir");
        testkit::postgres::chown_to_pg_user(dir.path()).expect("chown");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, "test ca");
        let ca_key = KeyPair::generate().expect("key");
        let ca = p.self_signed(&ca_key).expect("ca");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write ca");
        Pki { dir, ca, ca_key }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A certificate for 127.0.0.1 and localhost, named `name` (CN), valid now unless
    /// `expired`; returns (cert file, key file).
    pub fn issue(&self, name: &str, expired: bool) -> (PathBuf, PathBuf) {
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("params");
        p.distinguished_name.push(DnType::CommonName, name);
        if expired {
            p.not_before = rcgen::date_time_ymd(2000, 1, 1);
            p.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &self.ca, &self.ca_key).expect("sign");
        let (c, k) = (
            self.dir.path().join(format!("{name}.crt")),
            self.dir.path().join(format!("{name}.key")),
        );
        write_key_pair(&c, &k, &cert.pem(), &key.serialize_pem());
        (c, k)
    }
}

/// Writes a pair as PostgreSQL accepts its key: owned by its OS user, mode 0600.
pub fn write_key_pair(cert: &Path, key: &Path, cert_pem: &str, key_pem: &str) {
    use std::os::unix::fs::PermissionsExt;
    // Written beside and renamed: a reload never reads half a file.
    let (tc, tk) = (cert.with_extension("tmp-c"), key.with_extension("tmp-k"));
    std::fs::write(&tc, cert_pem).expect("cert");
    std::fs::write(&tk, key_pem).expect("key");
    std::fs::set_permissions(&tk, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    testkit::postgres::chown_to_pg_user(&tc).expect("chown");
    testkit::postgres::chown_to_pg_user(&tk).expect("chown");
    std::fs::rename(&tk, key).expect("rename");
    std::fs::rename(&tc, cert).expect("rename");
}

pub fn ssl_settings(cert: &Path, key: &Path) -> Vec<(String, String)> {
    vec![
        ("ssl".into(), "on".into()),
        ("ssl_cert_file".into(), cert.display().to_string()),
        ("ssl_key_file".into(), key.display().to_string()),
    ]
}

pub fn terminate_flags(cert: &Path, key: &Path) -> Vec<String> {
    vec![
        "--client-tls".into(),
        "terminate".into(),
        "--tls-cert-file".into(),
        cert.display().to_string(),
        "--tls-key-file".into(),
        key.display().to_string(),
    ]
}

/// tokio-postgres over OpenSSL, verifying the proxy against `ca`.
pub async fn tls_client(
    proxy: &Proxy,
    ca: &Path,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut b = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls()).expect("ssl");
    b.set_ca_file(ca).expect("ca");
    let tls = postgres_openssl::MakeTlsConnector::new(b.build());
    let conninfo = format!("{} sslmode=require", proxy.conninfo());
    let (client, conn) = tokio_postgres::connect(&conninfo, tls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}
