//! The clients of the `switchover`/`failover` scenarios. Each writes through one target
//! (stolon-proxy or HAProxy) and records every attempt, so what clients saw can be counted
//! afterwards: a connection attempt that failed, a transaction that failed, a commit.
//! - `PerTxn` opens a session for each transaction (`pgbench -C`-like);
//! - `Persistent` keeps its session and opens a new one when it finds it closed (a closed
//!   session found between transactions is not an error: that is what a pool does).

use serde::Serialize;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    PerTxn,
    Persistent,
    /// Application writers in other languages (`apps`).
    Psycopg2,
    Pgx,
    Pgjdbc,
    /// `pgbench -M prepared`, one client, restarted after an abort.
    Pgbench,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::PerTxn,
        Kind::Persistent,
        Kind::Psycopg2,
        Kind::Pgx,
        Kind::Pgjdbc,
        Kind::Pgbench,
    ];

    /// Its name in the summary and the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Kind::PerTxn => "per-txn",
            Kind::Persistent => "persistent",
            Kind::Psycopg2 => "psycopg2",
            Kind::Pgx => "pgx",
            Kind::Pgjdbc => "pgjdbc",
            Kind::Pgbench => "pgbench",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Outcome {
    /// A connection attempt that ended in a session (it may have been held).
    Connected,
    ConnectFailed(String),
    Committed(i64),
    TxnFailed(String),
}

/// One attempt: times in seconds since the run's start.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub target: usize,
    pub kind: Kind,
    pub start: f64,
    pub end: f64,
    pub outcome: Outcome,
}

#[derive(Clone)]
pub struct Endpoint {
    pub target: usize,
    pub addr: String,
    pub port: u16,
}

pub type Log = Arc<Mutex<Vec<Sample>>>;

/// The clock and id source every client shares.
pub struct Shared {
    pub t0: Instant,
    pub log: Log,
    pub next_id: AtomicI64,
    pub stop: CancellationToken,
    /// A client's connect timeout: longer than the no-master window, so a proxy that holds
    /// can hold it.
    pub connect_timeout: Duration,
    /// Pause after each transaction (keeps the 2-core machine from saturating).
    pub think: Duration,
    /// Connect with TLS (sslmode=require: encrypted, the certificate not verified).
    pub tls: bool,
    /// The role and password every client logs in with.
    pub login: (String, String),
}

impl Shared {
    fn secs(&self, t: Instant) -> f64 {
        t.duration_since(self.t0).as_secs_f64()
    }

    fn record(&self, e: &Endpoint, kind: Kind, start: Instant, outcome: Outcome) {
        let s = Sample {
            target: e.target,
            kind,
            start: self.secs(start),
            end: self.secs(Instant::now()),
            outcome,
        };
        self.push(s);
    }

    /// Adds one attempt to the log.
    pub fn push(&self, s: Sample) {
        if let Ok(mut log) = self.log.lock() {
            log.push(s);
        }
    }
}

pub const INSERT: &str = "INSERT INTO lt_writes (id, client) VALUES ($1, $2)";

/// A short name for what went wrong: the SQLSTATE when the server (or the proxy) sent an
/// ErrorResponse, else what the socket did.
pub fn error_kind(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.code().code().to_string();
    }
    if e.is_closed() {
        return "closed".into();
    }
    let text = e.to_string();
    if text.contains("timeout") || text.contains("timed out") {
        "timeout".into()
    } else if text.contains("refused") {
        "refused".into()
    } else if text.contains("reset") {
        "reset".into()
    } else if text.contains("unexpected EOF") || text.contains("closed") {
        "closed".into()
    } else {
        "io".into()
    }
}

/// libpq's sslmode=require: TLS, the server's certificate not verified.
fn tls_connector() -> postgres_openssl::MakeTlsConnector {
    let mut b = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls())
        .expect("OpenSSL connector");
    b.set_verify(openssl::ssl::SslVerifyMode::NONE);
    postgres_openssl::MakeTlsConnector::new(b.build())
}

pub async fn connect(sh: &Shared, e: &Endpoint, kind: Kind) -> Option<Client> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&e.addr)
        .port(e.port)
        .user(&sh.login.0)
        .password(&sh.login.1)
        .dbname("postgres")
        .connect_timeout(sh.connect_timeout);
    let start = Instant::now();
    let r = if sh.tls {
        cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
        let connected = tokio::time::timeout(sh.connect_timeout, async {
            let (client, conn) = cfg.connect(tls_connector()).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(client)
        });
        connected.await
    } else {
        let connected = tokio::time::timeout(sh.connect_timeout, async {
            let (client, conn) = cfg.connect(NoTls).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(client)
        });
        connected.await
    };
    match r {
        Ok(Ok(client)) => {
            sh.record(e, kind, start, Outcome::Connected);
            Some(client)
        }
        Ok(Err(err)) => {
            sh.record(e, kind, start, Outcome::ConnectFailed(error_kind(&err)));
            None
        }
        Err(_) => {
            sh.record(e, kind, start, Outcome::ConnectFailed("timeout".into()));
            None
        }
    }
}

/// One transaction (an autocommit insert of a unique id); false if it failed.
pub async fn transact(sh: &Shared, e: &Endpoint, kind: Kind, c: &Client, client_no: i32) -> bool {
    let id = sh.next_id.fetch_add(1, Ordering::Relaxed);
    let start = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        c.execute(INSERT, &[&id, &client_no]),
    )
    .await;
    let outcome = match r {
        Ok(Ok(_)) => Outcome::Committed(id),
        Ok(Err(err)) => Outcome::TxnFailed(error_kind(&err)),
        Err(_) => Outcome::TxnFailed("timeout".into()),
    };
    let ok = matches!(outcome, Outcome::Committed(_));
    sh.record(e, kind, start, outcome);
    ok
}

/// Runs one client until the run stops.
pub async fn run(sh: Arc<Shared>, e: Endpoint, kind: Kind, client_no: i32) {
    let mut session: Option<Client> = None;
    while !sh.stop.is_cancelled() {
        if session.as_ref().is_none_or(Client::is_closed) {
            session = connect(&sh, &e, kind).await;
            if session.is_none() {
                // A client retries at once, as pgbench -C and most pools do.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        }
        let Some(c) = session.as_ref() else { continue };
        let ok = transact(&sh, &e, kind, c, client_no).await;
        if kind == Kind::PerTxn || !ok {
            session = None;
        }
        tokio::time::sleep(sh.think).await;
    }
}
