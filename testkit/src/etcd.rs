//! A single-member etcd on loopback ports below 32768, with its data in a temp dir; stopped
//! on Drop. It can be stopped and restarted on the same ports and data (an etcd outage),
//! frozen with SIGSTOP, and thawed.

use crate::netns::Host;
use crate::ports::{free_port, PortGuard};
use crate::process::ChildGuard;
use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub struct Etcd {
    dir: tempfile::TempDir,
    client: PortGuard,
    peer: PortGuard,
    child: Option<ChildGuard>,
    /// With TLS the client port speaks https and requires a client certificate.
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
    /// Where it listens: loopback, or a host's address inside its network namespace.
    ip: Ipv4Addr,
    host: Option<Host>,
    name: String,
    /// `name=peer-url,...` of every member (a multi-member cluster), or just this one.
    initial_cluster: Option<String>,
}

/// A three-member (or any size) etcd cluster on loopback, each member its own process.
pub struct EtcdCluster {
    pub members: Vec<Etcd>,
}

impl EtcdCluster {
    pub fn start(size: usize) -> Result<EtcdCluster> {
        let mut members = Vec::new();
        for i in 0..size {
            members.push(Etcd::unstarted(
                format!("m{i}"),
                Ipv4Addr::LOCALHOST,
                None,
                None,
            )?);
        }
        let initial = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        for m in &mut members {
            m.initial_cluster = Some(initial.clone());
            m.spawn()?;
        }
        for m in &mut members {
            m.wait_healthy()?;
        }
        Ok(EtcdCluster { members })
    }

    /// Every member's client URL, comma separated (the `--store-endpoints` form).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.endpoint())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The member that is the raft leader now, by etcdctl's status.
    pub fn leader(&self) -> Option<usize> {
        self.members.iter().position(|m| m.is_leader())
    }
}

impl Etcd {
    /// Starts etcd and waits until it reports healthy. Retries on new ports if the chosen
    /// ones were taken in the meantime.
    pub fn start() -> Result<Etcd> {
        Self::start_with(None)
    }

    /// Starts etcd serving clients over TLS only, with client certificates required.
    pub fn start_tls(tls: &crate::TlsFiles) -> Result<Etcd> {
        Self::start_with(Some((
            tls.server_cert.clone(),
            tls.server_key.clone(),
            tls.ca.clone(),
        )))
    }

    /// Starts a single-member etcd inside a network namespace host, on its address.
    pub fn start_in(host: &Host) -> Result<Etcd> {
        let mut e = Etcd::unstarted("test".into(), host.ip, Some(host.clone()), None)?;
        e.launch()?;
        Ok(e)
    }

    fn unstarted(
        name: String,
        ip: Ipv4Addr,
        host: Option<Host>,
        tls: Option<(PathBuf, PathBuf, PathBuf)>,
    ) -> Result<Etcd> {
        Ok(Etcd {
            dir: crate::temp_dir("etcd")?,
            client: free_port(),
            peer: free_port(),
            child: None,
            tls,
            ip,
            host,
            name,
            initial_cluster: None,
        })
    }

    fn start_with(tls: Option<(PathBuf, PathBuf, PathBuf)>) -> Result<Etcd> {
        let mut last_err = None;
        for _ in 0..5 {
            let mut e = Etcd::unstarted("test".into(), Ipv4Addr::LOCALHOST, None, tls.clone())?;
            match e.launch() {
                Ok(()) => return Ok(e),
                Err(err) => last_err = Some(err),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("etcd did not start")))
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.ip, self.client.0)
    }

    fn peer_url(&self) -> String {
        format!("http://{}:{}", self.ip, self.peer.0)
    }

    fn is_leader(&self) -> bool {
        let Ok(out) = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .args([
                "--dial-timeout=1s",
                "--command-timeout=2s",
                "endpoint",
                "status",
                "-w",
                "json",
            ])
            .stdin(Stdio::null())
            .output()
        else {
            return false;
        };
        // {"Status":{"header":{"member_id":M,...},"leader":L,...}}: leader when L == M.
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| -> Option<String> {
            let at = text.find(&format!("\"{name}\":"))? + name.len() + 3;
            Some(
                text[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_digit())
                    .collect(),
            )
        };
        matches!((field("member_id"), field("leader")), (Some(m), Some(l)) if !m.is_empty() && m == l)
    }

    pub fn client_port(&self) -> u16 {
        self.client.0
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn launch(&mut self) -> Result<()> {
        self.spawn()?;
        self.wait_healthy()
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let client = self.endpoint();
        let peer = self.peer_url();
        let initial = self
            .initial_cluster
            .clone()
            .unwrap_or_else(|| format!("{}={peer}", self.name));
        let mut cmd = match &self.host {
            Some(h) => h.command("etcd"),
            None => Command::new("etcd"),
        };
        cmd.arg(format!("--name={}", self.name))
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={initial}"))
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .args(self.tls.iter().flat_map(|(cert, key, ca)| {
                [
                    format!("--cert-file={}", cert.display()),
                    format!("--key-file={}", key.display()),
                    format!("--trusted-ca-file={}", ca.display()),
                    "--client-cert-auth".to_string(),
                ]
            }))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(
            ChildGuard::spawn("etcd", &mut cmd)
                .context("spawning etcd (is etcd-server installed?)")?,
        );
        Ok(())
    }

    fn wait_healthy(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.child.as_mut().is_none_or(|c| c.exited()) {
                self.child = None;
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join("\n");
                bail!("etcd exited during start-up: {tail}");
            }
            if self.healthy() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("etcd did not become healthy within 20s")
    }

    /// etcd's own /health answer on the client port.
    pub fn healthy(&self) -> bool {
        if self.tls.is_some() {
            return self.healthy_tls();
        }
        let Ok(mut s) = TcpStream::connect((self.ip, self.client.0)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        if s.write_all(b"GET /health HTTP/1.0\r\n\r\n").is_err() {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }

    fn healthy_tls(&self) -> bool {
        let Some((cert, key, ca)) = &self.tls else {
            return false;
        };
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .arg(format!("--cacert={}", ca.display()))
            .arg(format!("--cert={}", cert.display()))
            .arg(format!("--key={}", key.display()))
            .args(["--dial-timeout=1s", "endpoint", "health"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Stops etcd (SIGTERM, then SIGKILL) and keeps its data for a restart.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.stop(Duration::from_secs(5));
        }
    }

    /// Kills etcd with SIGKILL, keeping its data.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }

    /// The etcd process ID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.pid())
    }

    /// Starts a stopped etcd again on the same ports and data.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.launch()
    }

    pub fn freeze(&self) -> Result<()> {
        self.signal(Signal::SIGSTOP)
    }

    pub fn thaw(&self) -> Result<()> {
        self.signal(Signal::SIGCONT)
    }

    fn signal(&self, sig: Signal) -> Result<()> {
        match &self.child {
            Some(c) => Ok(c.signal(sig)?),
            None => bail!("etcd is not running"),
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
