//! Sever time and idle-session memory: N sessions open through the proxy; the clusterdata
//! write that removes their master is timed to the last session seeing its connection
//! closed (end to end), and the proxy's own log gives the time from the watch event to the
//! last session closed. RSS before and after opening the sessions gives memory per session.

use crate::procstat::rss_kib;
use crate::targets;
use anyhow::{bail, Context, Result};
use control::store::{CasOutcome, ClusterStore};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Options {
    pub sessions: usize,
    pub tries: usize,
    pub engine: String,
    /// Sessions end on a minimal PostgreSQL-speaking backend instead of real PostgreSQL,
    /// so that hundreds of backends exiting do not share the 2 cores with the measurement.
    pub fake_backend: bool,
}

/// A backend that answers any startup with AuthenticationOk and ReadyForQuery, then holds
/// the connection until the peer closes it. Runs on its own thread.
fn start_fake_backend() -> Result<(u16, std::thread::JoinHandle<()>)> {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let port = std_listener.local_addr()?.port();
    let handle = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
                return;
            };
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut len = [0u8; 4];
                    if s.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let mut rest = vec![0u8; (u32::from_be_bytes(len) as usize).saturating_sub(4)];
                    if s.read_exact(&mut rest).await.is_err() {
                        return;
                    }
                    let hello = [b'R', 0, 0, 0, 8, 0, 0, 0, 0, b'Z', 0, 0, 0, 5, b'I'];
                    if s.write_all(&hello).await.is_err() {
                        return;
                    }
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                });
            }
        });
    });
    Ok((port, handle))
}

/// Opens a session and reads until ReadyForQuery.
async fn open_session(port: u16) -> Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(&proxy::protocol::startup_message(&[
        ("user", "postgres"),
        ("database", "postgres"),
    ]))
    .await?;
    loop {
        let mut head = [0u8; 5];
        s.read_exact(&mut head).await?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        s.read_exact(&mut body).await?;
        match head[0] {
            b'Z' => return Ok(s),
            b'E' => bail!("server refused: {}", String::from_utf8_lossy(&body)),
            _ => {}
        }
    }
}

pub fn run(opts: &Options) -> Result<()> {
    let max = (opts.sessions + 50).to_string();
    let pg = testkit::Postgres::start(&[("max_connections", &max)])?;
    let etcd = testkit::Etcd::start()?;
    let logs = testkit::temp_dir("sever-logs")?;
    let uid = "sever".to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let store = rt.block_on(connect(&etcd))?;
    let backend_port = if opts.fake_backend {
        start_fake_backend()?.0
    } else {
        pg.port()
    };
    let mut cd = targets::routing_clusterdata(backend_port, std::slice::from_ref(&uid));
    rt.block_on(put(&store, &cd))?;
    let proxy = targets::stolon_proxy(&etcd, "bench", &uid, &opts.engine, logs.path(), &[])?;
    let pid = proxy.pid.context("proxy pid")?;
    let log_path = logs.path().join(format!("{uid}.log"));
    if std::env::var_os("STOLON_SEVER_PAUSE").is_some() {
        eprintln!("proxy pid {pid}; pausing 5s (STOLON_SEVER_PAUSE)");
        std::thread::sleep(Duration::from_secs(5));
    }
    let (mut e2e, mut in_proxy, mut clients_cut) = (Vec::new(), Vec::new(), Vec::new());
    let mut per_session_kib = Vec::new();
    for attempt in 0..opts.tries {
        let rss0 = rss_kib(pid);
        let sessions = rt.block_on(open_all(proxy.port, opts.sessions))?;
        std::thread::sleep(Duration::from_millis(200));
        let rss1 = rss_kib(pid);
        per_session_kib.push((rss1 as f64 - rss0 as f64) / opts.sessions as f64);
        // Remove the master, as the sentinel's fencing step does.
        cd.proxy.generation += 1;
        cd.proxy.spec.master_db_uid.clear();
        let (elapsed, closed) = rt.block_on(sever(&store, &cd, sessions))?;
        if closed != opts.sessions {
            bail!("only {closed} of {} sessions were closed", opts.sessions);
        }
        e2e.push(elapsed.as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(300));
        if let Some(us) = last_logged_us(&log_path, "sever_us") {
            in_proxy.push(us as f64 / 1e3);
        }
        if let Some(us) = last_logged_us(&log_path, "clients_cut_us") {
            clients_cut.push(us as f64 / 1e3);
        }
        // Route again for the next try.
        cd.proxy.generation += 1;
        cd.proxy.spec.master_db_uid = "db0".into();
        rt.block_on(put(&store, &cd))?;
        std::thread::sleep(Duration::from_millis(300));
        eprintln!(
            "try {attempt}: end to end {:.2} ms, in proxy {:.2} ms, RSS +{:.1} KiB/session",
            e2e.last().copied().unwrap_or(f64::NAN),
            in_proxy.last().copied().unwrap_or(f64::NAN),
            per_session_kib.last().copied().unwrap_or(f64::NAN)
        );
    }
    if in_proxy.is_empty() {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        eprintln!("no sever_us in the proxy log; its last lines:");
        for l in text.lines().rev().take(8) {
            eprintln!("  {l}");
        }
    }
    println!(
        "### sever time, {} sessions, {} tries, engine {}, backend {}\n\n\
         | measure | p50 | p99 | max |\n|---|---|---|---|\n\
         | clusterdata write returned -> last session closed (ms; 0: closed before the write's reply arrived) | {:.2} | {:.2} | {:.2} |\n\
         | watch event -> every client socket shut down (FIN sent), proxy log (ms) | {:.2} | {:.2} | {:.2} |\n\
         | watch event -> every session task ended, proxy log (ms) | {:.2} | {:.2} | {:.2} |\n\
         | proxy RSS per idle session (KiB) | {:.2} | {:.2} | {:.2} |\n",
        opts.sessions,
        opts.tries,
        opts.engine,
        if opts.fake_backend { "fake (in-process)" } else { "PostgreSQL 15" },
        pct(&e2e, 0.5), pct(&e2e, 0.99), pct(&e2e, 1.0),
        pct(&clients_cut, 0.5), pct(&clients_cut, 0.99), pct(&clients_cut, 1.0),
        pct(&in_proxy, 0.5), pct(&in_proxy, 0.99), pct(&in_proxy, 1.0),
        pct(&per_session_kib, 0.5), pct(&per_session_kib, 0.99), pct(&per_session_kib, 1.0),
    );
    Ok(())
}

fn pct(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let idx = ((s.len() as f64 - 1.0) * q).round() as usize;
    s[idx.min(s.len() - 1)]
}

async fn connect(etcd: &testkit::Etcd) -> Result<ClusterStore> {
    let cfg = control::store::etcd::EtcdConfig {
        endpoints: vec![etcd.endpoint()],
        connect_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let store = Arc::new(control::store::etcd::EtcdStore::connect(&cfg).await?);
    Ok(ClusterStore::new(store, "stolon/cluster", "bench"))
}

async fn put(store: &ClusterStore, cd: &control::model::ClusterData) -> Result<()> {
    let rev = store
        .store()
        .get(&store.clusterdata_key())
        .await?
        .map_or(0, |kv| kv.mod_revision);
    match store.put_cluster_data(cd, rev, None).await? {
        CasOutcome::Written(_) => Ok(()),
        CasOutcome::Conflict => bail!("clusterdata changed under the benchmark"),
    }
}

async fn open_all(port: u16, n: usize) -> Result<Vec<TcpStream>> {
    let mut out = Vec::with_capacity(n);
    // In batches, so PostgreSQL is not flooded with forks.
    for chunk in (0..n).collect::<Vec<_>>().chunks(50) {
        let opens = chunk.iter().map(|_| tokio::spawn(open_session(port)));
        for h in opens.collect::<Vec<_>>() {
            out.push(h.await??);
        }
    }
    Ok(out)
}

/// Writes `cd` and waits until every session reads EOF; returns the time from the write
/// returning to the last close, and how many closed.
async fn sever(
    store: &ClusterStore,
    cd: &control::model::ClusterData,
    sessions: Vec<TcpStream>,
) -> Result<(Duration, usize)> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for mut s in sessions {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 256];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            let _ = tx.send(Instant::now());
        });
    }
    drop(tx);
    put(store, cd).await?;
    let written = Instant::now();
    let mut last = written;
    let mut closed = 0;
    while let Ok(Some(t)) = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
        last = last.max(t);
        closed += 1;
    }
    Ok((last.saturating_duration_since(written), closed))
}

/// A field of the last sever the proxy logged (JSON lines), in microseconds.
fn last_logged_us(log: &std::path::Path, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().rev().find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        v.get("fields")?.get(field)?.as_u64()
    })
}
