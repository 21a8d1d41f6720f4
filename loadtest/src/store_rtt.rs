//! `store`: an etcd round trip as the daemons' store client makes it, beside etcd-client's
//! stock connection (the transport the store used before `store/src/etcd_channel.rs`, with
//! Nagle's algorithm on) in the same run, alternating call by call against one etcd.

use crate::ha::report::percentile;
use anyhow::{Context, Result};
use control::store::etcd::{EtcdConfig, EtcdStore};
use control::store::{Compare, Op, Store};
use etcd_client::{Compare as EtcdCompare, CompareOp, Txn, TxnOp};
use std::time::{Duration, Instant};

pub struct Options {
    /// Calls of each kind per client.
    pub calls: usize,
    /// Size of the value each txn writes (a clusterdata is a few KiB).
    pub value_bytes: usize,
    /// Pause between calls (a daemon does not call in a tight loop).
    pub pause: Duration,
}

#[derive(Default)]
struct Timings {
    txn: Vec<f64>,
    get: Vec<f64>,
}

pub fn run(o: &Options) -> Result<()> {
    let etcd = testkit::Etcd::start().context("starting etcd")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (ours, stock) = rt.block_on(measure(&etcd.endpoint(), o))?;
    println!(
        "`loadtest store --calls {} --value-bytes {} --pause {:?}`\n",
        o.calls, o.value_bytes, o.pause
    );
    println!(
        "| client | txn p50 ms | txn p90 ms | txn p99 ms | get p50 ms | get p90 ms | get p99 ms |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, t) in [
        ("stolon store (TCP_NODELAY)", ours),
        ("etcd-client stock", stock),
    ] {
        let (txn, get) = (quantiles(&t.txn), quantiles(&t.get));
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            txn[0], txn[1], txn[2], get[0], get[1], get[2]
        );
    }
    Ok(())
}

async fn measure(endpoint: &str, o: &Options) -> Result<(Timings, Timings)> {
    let cfg = EtcdConfig {
        endpoints: vec![endpoint.to_string()],
        connect_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let store = EtcdStore::connect(&cfg).await?;
    let stock = etcd_client::Client::connect([endpoint], None).await?;
    let value = vec![b'x'; o.value_bytes];
    let (mut ours, mut theirs) = (Timings::default(), Timings::default());
    let (mut rev_ours, mut rev_theirs) = (0i64, 0i64);
    for _ in 0..o.calls {
        // A compare-and-swap as the sentinel writes the clusterdata.
        let t = Instant::now();
        let r = (store.txn(
            vec![Compare::ModRevision {
                key: "/rtt/ours".into(),
                revision: rev_ours,
            }],
            vec![Op::put("/rtt/ours", value.clone())],
        ))
        .await?;
        ours.txn.push(ms(t));
        rev_ours = r.revision;
        tokio::time::sleep(o.pause).await;
        let t = Instant::now();
        let txn = Txn::new()
            .when([EtcdCompare::mod_revision(
                "/rtt/stock",
                CompareOp::Equal,
                rev_theirs,
            )])
            .and_then([TxnOp::put("/rtt/stock", value.clone(), None)]);
        let r = stock.kv_client().txn(txn).await?;
        theirs.txn.push(ms(t));
        rev_theirs = r.header().map_or(0, |h| h.revision());
        tokio::time::sleep(o.pause).await;
        let t = Instant::now();
        store.get("/rtt/ours").await?;
        ours.get.push(ms(t));
        tokio::time::sleep(o.pause).await;
        let t = Instant::now();
        stock.kv_client().get("/rtt/stock", None).await?;
        theirs.get.push(ms(t));
        tokio::time::sleep(o.pause).await;
    }
    Ok((ours, theirs))
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// p50, p90, p99.
fn quantiles(v: &[f64]) -> [f64; 3] {
    [50.0, 90.0, 99.0].map(|p| percentile(v, p))
}
