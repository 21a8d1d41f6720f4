//! The sentinel's `decide` at 3 and at 100 keepers: a steady round (fresh infos, nothing to
//! change) and a failover round (the master's info stale past failInterval).

use control::model::{ClusterSpec, GoDuration};
use control::sentinel::decide;
use control::sentinel::sim::{test_spec, World};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};

fn world(keepers: usize) -> World {
    // Every keeper hosts a db, so the 100-keeper case has 100 dbs to judge.
    let standbys = u16::try_from(keepers).unwrap_or(u16::MAX);
    let spec = ClusterSpec {
        max_standbys: Some(standbys),
        max_standbys_per_sender: Some(standbys),
        ..test_spec()
    };
    World::healthy(spec, keepers, 3)
}

fn bench_decide(c: &mut Criterion) {
    let mut group = c.benchmark_group("sentinel_decide");
    for n in [3usize, 100] {
        let mut w = world(n);
        w.act_keepers();
        w.act_proxies();
        let obs = w.observations();
        group.bench_with_input(BenchmarkId::new("steady", n), &n, |b, _| {
            b.iter(|| decide(black_box(&w.cd), black_box(&w.mem), black_box(&obs), w.now))
        });
        // Take in the infos the steady case used, so the master's last one is then seen aging.
        w.round();
        let master = w.master_keeper();
        w.keeper(&master).alive = false;
        w.now = w.now.plus(GoDuration::from_secs(11));
        w.act_keepers();
        let obs = w.observations();
        let (after, _, reasons) = decide(&w.cd, &w.mem, &obs, w.now);
        assert_ne!(
            after.cluster.status.master, w.cd.cluster.status.master,
            "must fail over: {reasons:?}"
        );
        group.bench_with_input(BenchmarkId::new("failover", n), &n, |b, _| {
            b.iter(|| decide(black_box(&w.cd), black_box(&w.mem), black_box(&obs), w.now))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_decide);
criterion_main!(benches);
