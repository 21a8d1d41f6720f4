//! The proxy's own TLS (`--client-tls terminate`): the certificate it shows clients, reloaded
//! when its files change or on SIGHUP, and the TLS it speaks to the servers
//! (`--server-sslmode`). rustls with the ring provider.

use anyhow::Context;
use arc_swap::ArcSwapOption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The ALPN protocol PostgreSQL 17 names for itself; a direct TLS start must negotiate it.
pub const ALPN: &[u8] = b"postgresql";

/// `--client-tls`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientTlsMode {
    /// Pass the client's TLS through to the server, unread (Go stolon's behaviour).
    #[default]
    Passthrough,
    /// Answer SSLRequest and direct TLS starts with the proxy's own certificate; the proxy
    /// reads the session in the clear.
    Terminate,
}

/// `--server-sslmode`: libpq's sslmode names, for the proxy's connections to the servers in
/// terminate mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ServerSslMode {
    /// Plaintext to the servers.
    #[default]
    Disable,
    /// TLS when the server offers it, unverified; plaintext otherwise.
    Prefer,
    /// TLS or no session; the certificate is not verified.
    Require,
    /// TLS with a certificate signed by --server-ca-file for the server's address.
    VerifyFull,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificate and key files of `--tls-cert-file` / `--tls-key-file`.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What identifies a version of both files: a change of any part means a reload.
type Stamp = Vec<(std::time::SystemTime, u64, u64)>;

fn stamp(files: &CertFiles) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    [&files.cert, &files.key]
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len(), m.ino()))
        })
        .collect()
}

/// The server side of client TLS: the current configuration, swapped whole on a reload so
/// a handshake under way keeps the one it started with.
pub struct Acceptor {
    files: Option<CertFiles>,
    current: ArcSwapOption<Loaded>,
    stamp: Mutex<Option<Stamp>>,
}

/// A loaded certificate: the handshake's configuration and the certificate's
/// tls-server-end-point hash (SCRAM channel binding).
struct Loaded {
    config: Arc<ServerConfig>,
    end_point: Vec<u8>,
}

impl Acceptor {
    /// Loads the files (an error names the file and what is wrong: the proxy does not start
    /// on a bad certificate). Without files, TLS is declined ('N') and sessions are plaintext.
    pub fn load(files: Option<CertFiles>) -> anyhow::Result<Acceptor> {
        let a = Acceptor {
            files,
            current: ArcSwapOption::empty(),
            stamp: Mutex::new(None),
        };
        if let Some(f) = &a.files {
            let s = stamp(f);
            a.current.store(Some(Arc::new(server_config(f)?)));
            *a.stamp.lock().unwrap_or_else(|e| e.into_inner()) = s;
        }
        Ok(a)
    }

    /// The configuration for the next handshake; `None` when no certificate is configured.
    pub fn config(&self) -> Option<Arc<ServerConfig>> {
        self.current.load().as_ref().map(|l| l.config.clone())
    }

    /// The current certificate's tls-server-end-point hash. (A reload between a client's
    /// handshake and its SCRAM exchange makes its binding fail once; it reconnects.)
    pub fn end_point(&self) -> Option<Vec<u8>> {
        self.current.load().as_ref().map(|l| l.end_point.clone())
    }

    /// Reloads if either file changed since the last load (`force`: whatever the files say,
    /// as on SIGHUP). A bad new pair is logged and the last good one kept.
    pub fn reload(&self, force: bool) {
        let Some(f) = &self.files else { return };
        let now = stamp(f);
        {
            let mut last = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
            if !force && *last == now {
                return;
            }
            *last = now;
        }
        match server_config(f) {
            Ok(c) => {
                self.current.store(Some(Arc::new(c)));
                tracing::info!(cert = %f.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                tracing::error!(
                    error = format!("{e:#}"),
                    "cannot reload the TLS certificate: keeping the last good one"
                )
            }
        }
    }
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not a PEM certificate file", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{}: no certificate in the file",
        path.display()
    );
    Ok(certs)
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("{}: not a PEM key file", path.display()))?
        .with_context(|| format!("{}: no private key in the file", path.display()))
}

fn server_config(f: &CertFiles) -> anyhow::Result<Loaded> {
    let certs = read_certs(&f.cert)?;
    let end_point = crate::auth::scram::end_point(&certs[0]);
    let key = read_key(&f.key)?;
    let mut c = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!(
                "{} and {} do not make a usable certificate and key",
                f.cert.display(),
                f.key.display()
            )
        })?;
    c.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Loaded {
        config: Arc::new(c),
        end_point,
    })
}

/// The client side of the proxy's TLS to the servers.
pub struct ServerTls {
    pub mode: ServerSslMode,
    connector: Option<tokio_rustls::TlsConnector>,
}

impl ServerTls {
    /// `ca` is required for verify-full (its roots are the only ones trusted).
    pub fn new(mode: ServerSslMode, ca: Option<&Path>) -> anyhow::Result<ServerTls> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
        let config = match mode {
            ServerSslMode::Disable => None,
            ServerSslMode::Prefer | ServerSslMode::Require => Some(
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
                    .with_no_client_auth(),
            ),
            ServerSslMode::VerifyFull => {
                let ca = ca.context("--server-sslmode verify-full needs --server-ca-file")?;
                let mut roots = RootCertStore::empty();
                for c in read_certs(ca)? {
                    roots
                        .add(c)
                        .with_context(|| format!("{}: a certificate is invalid", ca.display()))?;
                }
                Some(builder.with_root_certificates(roots).with_no_client_auth())
            }
        };
        let connector = config.map(|mut c| {
            c.alpn_protocols = vec![ALPN.to_vec()];
            tokio_rustls::TlsConnector::from(Arc::new(c))
        });
        Ok(ServerTls { mode, connector })
    }

    pub fn connector(&self) -> Option<&tokio_rustls::TlsConnector> {
        self.connector.as_ref()
    }
}

/// The name a server's certificate must carry: the host of its address (an IP address
/// matches an IP SAN).
pub fn server_name(addr: &str) -> Option<ServerName<'static>> {
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h,
        None => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).ok()
}

/// sslmode prefer/require: encrypted, not authenticated (libpq's meaning of those modes).
/// The handshake's signatures are still checked, so the session is bound to the key the
/// server showed.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Terminate mode's settings, shared by every session of a listener.
pub struct Terminate {
    pub acceptor: Acceptor,
    /// `--client-tls-required`: a plaintext startup is refused with 28000.
    pub required: bool,
    pub server: ServerTls,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_name_is_the_host_of_the_address() {
        let ip = |s: &str| server_name(s).map(|n| n.to_str().into_owned());
        assert_eq!(ip("10.0.0.1:5432").as_deref(), Some("10.0.0.1"));
        assert_eq!(ip("[::1]:5432").as_deref(), Some("::1"));
        assert_eq!(ip("db.example:5432").as_deref(), Some("db.example"));
        assert!(matches!(
            server_name("127.0.0.1:1"),
            Some(ServerName::IpAddress(_))
        ));
    }

    #[test]
    fn a_bad_certificate_file_is_refused_at_load_and_kept_at_reload() {
        let dir = tempfile::tempdir().expect("test setup");
        let files = CertFiles {
            cert: dir.path().join("c.pem"),
            key: dir.path().join("k.pem"),
        };
        std::fs::write(&files.cert, "not a certificate").expect("test setup");
        std::fs::write(&files.key, "nor a key").expect("test setup");
        let err = Acceptor::load(Some(files.clone())).err().expect("refused");
        assert!(format!("{err:#}").contains("c.pem"), "{err:#}");

        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("test setup");
        std::fs::write(&files.cert, ck.cert.pem()).expect("test setup");
        std::fs::write(&files.key, ck.key_pair.serialize_pem()).expect("test setup");
        let a = Acceptor::load(Some(files.clone())).expect("test setup");
        let first = a.config().expect("test setup");
        // A broken file written over a good one: the last good configuration stays.
        std::fs::write(&files.cert, "garbage").expect("test setup");
        a.reload(true);
        assert!(Arc::ptr_eq(&first, &a.config().expect("test setup")));
        // A good new pair replaces it.
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("test setup");
        std::fs::write(&files.cert, ck.cert.pem()).expect("test setup");
        std::fs::write(&files.key, ck.key_pair.serialize_pem()).expect("test setup");
        a.reload(false);
        assert!(!Arc::ptr_eq(&first, &a.config().expect("test setup")));
    }

    #[test]
    fn verify_full_needs_a_ca_file() {
        let err = ServerTls::new(ServerSslMode::VerifyFull, None)
            .err()
            .expect("test setup");
        assert!(err.to_string().contains("--server-ca-file"), "{err}");
        assert!(ServerTls::new(ServerSslMode::Disable, None)
            .expect("test setup")
            .connector()
            .is_none());
    }
}
