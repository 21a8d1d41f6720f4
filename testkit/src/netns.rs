//! Network namespaces for partition tests. A `Net` is a private /24 (10.x.y.0/24) that
//! exists only on this machine: a bridge namespace, one namespace per "host" joined to the
//! bridge by a veth pair, and a veth from the test's own namespace (at .254) so the test can
//! act as a client of every host. Servers listen on their host's address inside their
//! namespace, never in the root namespace. Cutting a host takes its bridge port down (no
//! traffic at all); isolating it blackholes every address but the test's own (clients still
//! reach it directly). Everything is deleted on Drop.

use anyhow::{bail, Context, Result};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct Net {
    tag: String,
    subnet: [u8; 3],
    bridge_ns: String,
    root_veth: String,
    hosts: Vec<Host>,
}

#[derive(Clone, Debug)]
pub struct Host {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    bridge_port: String,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Net {
    /// Creates the bridge and one namespace per name in `hosts` (needs root).
    pub fn new(hosts: &[&str]) -> Result<Net> {
        if !nix::unistd::Uid::effective().is_root() {
            bail!("network namespaces need root");
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Interface names are limited to 15 bytes: a short hex tag per Net.
        let tag = format!("{:x}", ((pid & 0xffff) << 4 | (n & 0xf)) & 0xfffff);
        let subnet = [
            10,
            128 + (n % 64) as u8 + (pid % 2) as u8 * 64,
            (pid % 250) as u8,
        ];
        let mut net = Net {
            bridge_ns: format!("e2e-{tag}-br"),
            root_veth: format!("e{tag}r"),
            tag,
            subnet,
            hosts: Vec::new(),
        };
        net.setup(hosts)?;
        Ok(net)
    }

    fn addr(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], last)
    }

    fn setup(&mut self, hosts: &[&str]) -> Result<()> {
        let br = self.bridge_ns.clone();
        ip(&["netns", "add", &br])?;
        ip(&["-n", &br, "link", "set", "lo", "up"])?;
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        for (i, name) in hosts.iter().enumerate() {
            let ns = format!("e2e-{}-{name}", self.tag);
            let inner = format!("e{}h{i}", self.tag);
            let port = format!("e{}b{i}", self.tag);
            let addr = self.addr(i as u8 + 1);
            ip(&["netns", "add", &ns])?;
            self.hosts.push(Host {
                name: name.to_string(),
                ns: ns.clone(),
                ip: addr,
                bridge_port: port.clone(),
            });
            ip(&["link", "add", &inner, "type", "veth", "peer", "name", &port])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["link", "set", &port, "netns", &br])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &inner,
            ])?;
            ip(&["-n", &ns, "link", "set", &inner, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &br, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &br, "link", "set", &port, "up"])?;
        }
        let root_port = format!("e{}R", self.tag);
        ip(&[
            "link",
            "add",
            &self.root_veth,
            "type",
            "veth",
            "peer",
            "name",
            &root_port,
        ])?;
        ip(&["link", "set", &root_port, "netns", &br])?;
        let root_addr = format!("{}/24", self.client_ip());
        ip(&["addr", "add", &root_addr, "dev", &self.root_veth])?;
        ip(&["link", "set", &self.root_veth, "up"])?;
        ip(&["-n", &br, "link", "set", &root_port, "master", "br0"])?;
        ip(&["-n", &br, "link", "set", &root_port, "up"])?;
        Ok(())
    }

    /// The test's own address on this network.
    pub fn client_ip(&self) -> Ipv4Addr {
        self.addr(254)
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name} in this network"))
    }

    /// Takes the host's link down: it reaches nothing and nothing reaches it.
    pub fn cut(&self, name: &str) -> Result<()> {
        let h = self.host(name);
        ip(&["-n", &self.bridge_ns, "link", "set", &h.bridge_port, "down"])
    }

    pub fn heal(&self, name: &str) -> Result<()> {
        let h = self.host(name);
        ip(&["-n", &self.bridge_ns, "link", "set", &h.bridge_port, "up"])?;
        for other in &self.hosts {
            // Routes added by isolate(); absent ones are fine.
            let _ = ip(&[
                "-n",
                &h.ns,
                "route",
                "del",
                "blackhole",
                &other.ip.to_string(),
            ]);
        }
        Ok(())
    }

    /// Cuts the host from every other host, but the test (a client) still reaches it.
    pub fn isolate(&self, name: &str) -> Result<()> {
        let others: Vec<&str> = self
            .hosts
            .iter()
            .filter(|o| o.name != name)
            .map(|o| o.name.as_str())
            .collect();
        self.isolate_from(name, &others)
    }

    /// Cuts the host from the named hosts only (both ways: its replies go nowhere).
    pub fn isolate_from(&self, name: &str, others: &[&str]) -> Result<()> {
        let h = self.host(name);
        for other in others {
            let o = self.host(other).ip.to_string();
            ip(&["-n", &h.ns, "route", "add", "blackhole", &o])?;
        }
        Ok(())
    }
}

impl Host {
    /// A command that runs `program` inside this host's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth ends, and with them their peers.
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.ns]);
        }
        let _ = ip(&["link", "del", &self.root_veth]);
        let _ = ip(&["netns", "del", &self.bridge_ns]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// True if a TCP connect from `from` (the test's namespace if None) to `to` gets an
    /// answer: a refusal from a closed port counts, a timeout or a routing error does not.
    fn reachable(from: Option<&Host>, to: Ipv4Addr) -> bool {
        let script = format!("exec 3<>/dev/tcp/{to}/9");
        let mut c = match from {
            Some(h) => h.command("timeout"),
            None => Command::new("timeout"),
        };
        let out = c
            .args(["2", "bash", "-c", &script])
            .stdin(Stdio::null())
            .output()
            .expect("bash");
        out.status.success() || String::from_utf8_lossy(&out.stderr).contains("refused")
    }

    #[test]
    fn hosts_talk_over_the_bridge_until_cut_and_isolation_keeps_the_client() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let net = Net::new(&["a", "b"]).expect("net");
        let a = net.host("a").clone();
        let b = net.host("b").clone();
        assert!(reachable(Some(&a), b.ip), "a reaches b");
        assert!(reachable(None, a.ip), "the test reaches a");
        net.isolate("a").expect("isolate");
        assert!(!reachable(Some(&a), b.ip), "isolated a does not reach b");
        assert!(reachable(None, a.ip), "the test still reaches isolated a");
        net.heal("a").expect("heal");
        assert!(reachable(Some(&a), b.ip), "healed");
        net.cut("b").expect("cut");
        assert!(!reachable(None, b.ip), "cut b is unreachable");
        assert!(!reachable(Some(&a), b.ip), "cut b is unreachable from a");
        net.heal("b").expect("heal");
        assert!(reachable(Some(&a), b.ip), "healed b");
    }
}
