//! Throw-away certificates for TLS tests, made with the `openssl` command: a CA, a server
//! certificate for 127.0.0.1/localhost, and a client certificate, all signed by the CA.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub struct TlsFiles {
    _dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("running openssl")?;
    if !out.status.success() {
        bail!(
            "openssl {:?} failed: {}",
            args,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A new key and certificate `name.key`/`name.pem` in `d`, for CN=`name`, signed by
/// `ca.pem`/`ca.key` with the extensions in the file `ext`.
fn issue(d: &Path, name: &str, ca: &str, ext: &str) -> Result<()> {
    let subject = format!("/CN={name}");
    let (key, csr, pem) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
    );
    openssl(
        d,
        &[
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", &subject, "-keyout", &key, "-out",
            &csr,
        ],
    )?;
    let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            ext,
            "-out",
            &pem,
        ],
    )
}

impl TlsFiles {
    pub fn generate() -> Result<TlsFiles> {
        let dir = crate::temp_dir("tls")?;
        let d = dir.path();
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=test-ca",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ],
        )?;
        std::fs::write(
            d.join("san.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
        )?;
        for name in ["server", "client"] {
            issue(d, name, "ca", "san.ext")?;
        }
        Ok(TlsFiles {
            ca: d.join("ca.pem"),
            server_cert: d.join("server.pem"),
            server_key: d.join("server.key"),
            client_cert: d.join("client.pem"),
            client_key: d.join("client.key"),
            _dir: dir,
        })
    }

    /// A client certificate signed by an intermediate CA that the root signed: the leaf
    /// alone, the leaf followed by the intermediate (a chain file), and the key.
    pub fn client_via_intermediate(&self) -> Result<(PathBuf, PathBuf, PathBuf)> {
        let d = self._dir.path();
        std::fs::write(
            d.join("ca.ext"),
            "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n",
        )?;
        issue(d, "intermediate", "ca", "ca.ext")?;
        issue(d, "leaf", "intermediate", "san.ext")?;
        let mut chain = std::fs::read(d.join("leaf.pem"))?;
        chain.extend(std::fs::read(d.join("intermediate.pem"))?);
        std::fs::write(d.join("chain.pem"), chain)?;
        Ok((d.join("leaf.pem"), d.join("chain.pem"), d.join("leaf.key")))
    }
}
