//! SQL helpers with deadlines: every call the suite makes is bounded, since a fenced master
//! may hold a commit forever.

use std::time::Duration;
use tokio_postgres::{Client, NoTls};

pub const SU: &str = "postgres";
pub const SU_PASSWORD: &str = "su-secret";
pub const REPL_PASSWORD: &str = "repl-secret";

/// Connects as the superuser, giving up after `timeout`.
pub async fn connect(addr: &str, port: u16, timeout: Duration) -> anyhow::Result<Client> {
    connect_as(addr, port, SU, SU_PASSWORD, timeout).await
}

pub async fn connect_as(
    addr: &str,
    port: u16,
    user: &str,
    password: &str,
    timeout: Duration,
) -> anyhow::Result<Client> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(addr)
        .port(port)
        .user(user)
        .password(password)
        .dbname("postgres")
        .connect_timeout(timeout);
    let (client, conn) = tokio::time::timeout(timeout, cfg.connect(NoTls)).await??;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Runs `sql` on a fresh connection; Err on any failure or after `timeout`.
pub async fn exec(addr: &str, port: u16, sql: &str, timeout: Duration) -> anyhow::Result<()> {
    let c = connect(addr, port, timeout).await?;
    tokio::time::timeout(timeout, c.batch_execute(sql)).await??;
    Ok(())
}

/// The first column of the first row of `sql` as text (cast it in the query).
pub async fn query_text(addr: &str, port: u16, sql: &str) -> anyhow::Result<String> {
    let t = Duration::from_secs(3);
    let c = connect(addr, port, t).await?;
    let row = tokio::time::timeout(t, c.query_one(sql, &[])).await??;
    Ok(row.get::<_, String>(0))
}

/// The port of the PostgreSQL a fresh session through addr:port lands on (through a proxy
/// or HAProxy: which backend it chose).
pub async fn server_port(addr: &str, port: u16) -> anyhow::Result<u16> {
    let p = query_text(addr, port, "SELECT inet_server_port()::text").await?;
    p.parse().map_err(|_| anyhow::anyhow!("not a port: {p:?}"))
}

/// Whether the PostgreSQL at addr:port is in recovery; None when it does not answer.
pub async fn in_recovery(addr: &str, port: u16) -> Option<bool> {
    query_text(addr, port, "SELECT pg_is_in_recovery()::text")
        .await
        .ok()
        .map(|s| s == "true")
}

/// Parses a PostgreSQL LSN (`16/B374D848`) into a byte position.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// `pgbench -i -q -s 1` as the superuser on addr:port (a keeper's PostgreSQL or a proxy).
pub fn pgbench_init(addr: &str, port: u16) -> anyhow::Result<()> {
    let out = std::process::Command::new(testkit::postgres::pg_bin_dir().join("pgbench"))
        .args(["-i", "-q", "-s", "1", "-h", addr, "-p", &port.to_string()])
        .args(["-U", SU, "postgres"])
        .env("PGPASSWORD", SU_PASSWORD)
        .stdin(std::process::Stdio::null())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "pgbench -i failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn lsn() {
        assert_eq!(super::parse_lsn("0/3000060"), Some(0x3000060));
        assert_eq!(super::parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(super::parse_lsn("x"), None);
    }
}
