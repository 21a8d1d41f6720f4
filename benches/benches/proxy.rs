//! The proxy's hot-path pieces: parsing a startup packet, and loading the route table
//! while another thread swaps it (what every new connection does during a failover).

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use proxy::protocol;
use proxy::route::{NoMaster, Routes};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn parser(c: &mut Criterion) {
    let startup = protocol::startup_message(&[
        ("user", "app_user"),
        ("database", "orders"),
        ("application_name", "pgbench"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO"),
    ]);
    let ssl = [0u8, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    let mut g = c.benchmark_group("startup_parser");
    g.bench_function("startup_message_5_params", |b| {
        b.iter(|| protocol::parse(black_box(&startup)))
    });
    g.bench_function("ssl_request", |b| {
        b.iter(|| protocol::parse(black_box(&ssl)))
    });
    g.bench_function("incomplete_half_packet", |b| {
        b.iter(|| protocol::parse(black_box(&startup[..startup.len() / 2])))
    });
    g.bench_function("error_response", |b| {
        b.iter(|| protocol::error_response(black_box("57P03"), black_box("no primary available")))
    });
    g.finish();
}

fn route_load(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_load");
    for swappers in [0usize, 1] {
        g.bench_with_input(
            BenchmarkId::new("load_with_swapping_threads", swappers),
            &swappers,
            |b, &n| {
                let routes = Arc::new(Routes::default());
                routes.apply(1, Ok("127.0.0.1:5432".into()));
                let stop = Arc::new(AtomicBool::new(false));
                let handles: Vec<_> = (0..n)
                    .map(|_| {
                        let (routes, stop) = (routes.clone(), stop.clone());
                        std::thread::spawn(move || {
                            let mut g = 2;
                            while !stop.load(Ordering::Relaxed) {
                                let master = if g % 2 == 0 {
                                    Err(NoMaster::NoMasterDb)
                                } else {
                                    Ok("127.0.0.1:5432".into())
                                };
                                routes.apply(g, master);
                                g += 1;
                            }
                        })
                    })
                    .collect();
                b.iter(|| {
                    let r = routes.load();
                    black_box(r.master.is_ok());
                });
                stop.store(true, Ordering::Relaxed);
                for h in handles {
                    let _ = h.join();
                }
            },
        );
    }
    g.finish();
}

/// What the drain's transaction tracking costs per transaction of `pgbench -S` (one Query
/// out; RowDescription, DataRow, CommandComplete, ReadyForQuery back), through the Mutex the
/// relay holds it in. Compare with the ~20 us a transaction costs through the proxy.
fn tx_tracking(c: &mut Criterion) {
    use proxy::txstate::{Start, TxState};
    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend(((body.len() + 4) as u32).to_be_bytes());
        m.extend(body);
        m
    }
    let query = msg(
        b'Q',
        b"SELECT abalance FROM pgbench_accounts WHERE aid = 48213;\0",
    );
    let mut answer = msg(
        b'T',
        &[
            0, 1, b'a', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 23, 0, 4, 255, 255, 255, 255, 0, 0,
        ],
    );
    answer.extend(msg(b'D', &[0, 1, 0, 0, 0, 1, b'0']));
    answer.extend(msg(b'C', b"SELECT 1\0"));
    answer.extend(msg(b'Z', b"I"));
    let tx = std::sync::Mutex::new(TxState::new(Start::Startup, &[]));
    if let Ok(mut t) = tx.lock() {
        t.from_server(&msg(b'Z', b"I"));
    }
    c.bench_function("tx_tracking_per_select_transaction", |b| {
        b.iter(|| {
            if let Ok(mut t) = tx.lock() {
                t.from_client(black_box(&query));
            }
            if let Ok(mut t) = tx.lock() {
                t.from_server(black_box(&answer));
                black_box(t.idle());
            }
        })
    });
}

criterion_group!(benches, parser, route_load, tx_tracking);
criterion_main!(benches);
