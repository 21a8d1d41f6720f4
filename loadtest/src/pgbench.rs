//! Running pgbench and reading its summary.

use anyhow::{bail, Context, Result};
use std::process::{Command, Stdio};
use testkit::postgres::pg_bin_dir;

#[derive(Clone, Debug)]
pub struct Workload {
    pub name: &'static str,
    pub args: &'static [&'static str],
}

/// The workloads of the proxy issue, in its order.
pub const WORKLOADS: &[Workload] = &[
    Workload {
        name: "-S -c16",
        args: &["-S", "-c", "16", "-j", "2"],
    },
    Workload {
        name: "-S -M prepared -c16",
        args: &["-S", "-M", "prepared", "-c", "16", "-j", "2"],
    },
    Workload {
        name: "-S -c1",
        args: &["-S", "-c", "1", "-j", "1"],
    },
    Workload {
        name: "-S -C -c8",
        args: &["-S", "-C", "-c", "8", "-j", "2"],
    },
    Workload {
        name: "tpcb -c16",
        args: &["-c", "16", "-j", "2"],
    },
];

#[derive(Clone, Copy, Debug, Default)]
pub struct Outcome {
    pub tps: f64,
    pub latency_ms: f64,
    pub transactions: f64,
}

/// How pgbench logs in: its user and libpq environment (PGSSLMODE, PGPASSWORD).
#[derive(Clone, Debug)]
pub struct Login {
    pub user: String,
    pub env: Vec<(String, String)>,
}

impl Default for Login {
    fn default() -> Self {
        Login {
            user: "postgres".into(),
            env: Vec::new(),
        }
    }
}

/// pgbench connecting to `port` over TCP, as the superuser.
fn pgbench(port: u16) -> Command {
    pgbench_as(port, &Login::default())
}

fn pgbench_as(port: u16, login: &Login) -> Command {
    let mut cmd = Command::new(pg_bin_dir().join("pgbench"));
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        &login.user,
    ])
    .envs(login.env.iter().map(|(k, v)| (k, v)))
    .stdin(Stdio::null());
    cmd
}

pub fn init(port: u16, scale: u32) -> Result<()> {
    let out = pgbench(port)
        .args(["-i", "-q", "-s", &scale.to_string(), "postgres"])
        .output()
        .context("running pgbench -i")?;
    if !out.status.success() {
        bail!(
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

pub fn run(port: u16, login: &Login, workload: &Workload, seconds: u32) -> Result<Outcome> {
    let out = pgbench_as(port, login)
        .args(["-n", "-T", &seconds.to_string()])
        .args(workload.args)
        .arg("postgres")
        .output()
        .context("running pgbench")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "pgbench {} failed: {}{}",
            workload.name,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse(&text).with_context(|| format!("reading pgbench output: {text}"))
}

fn number_after(text: &str, prefix: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.trim_start().starts_with(prefix))?;
    line.trim_start()[prefix.len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub fn parse(text: &str) -> Option<Outcome> {
    Some(Outcome {
        tps: number_after(text, "tps = ")?,
        latency_ms: number_after(text, "latency average = ")?,
        transactions: number_after(text, "number of transactions actually processed: ")?,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_pgbench_15_summary() {
        let text = "transaction type: <builtin: select only>\nnumber of transactions actually processed: 123456\n\
                    number of failed transactions: 0 (0.000%)\nlatency average = 1.296 ms\n\
                    initial connection time = 10.502 ms\ntps = 12345.678901 (without initial connection time)\n";
        let o = super::parse(text).expect("parse");
        assert_eq!(
            (o.tps, o.latency_ms, o.transactions),
            (12345.678901, 1.296, 123456.0)
        );
    }
}
