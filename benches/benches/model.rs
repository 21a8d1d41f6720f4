//! Reading and writing the clusterdata document (every watch event in every component).

use control::model::ClusterData;
use criterion::{black_box, criterion_group, criterion_main, Criterion};

fn clusterdata(c: &mut Criterion) {
    let doc = include_str!("../../control/core/tests/golden/clusterdata-go.json");
    let cd = ClusterData::from_json(doc.as_bytes()).expect("golden");
    c.bench_function("clusterdata_parse_go_golden", |b| {
        b.iter(|| ClusterData::from_json(black_box(doc.as_bytes())))
    });
    // A running three-keeper cluster's document (5.4 KB), as `loadtest swarm` leaves it.
    let three = include_str!("../data/clusterdata-3-keepers.json");
    c.bench_function("clusterdata_parse_3_keepers", |b| {
        b.iter(|| ClusterData::from_json(black_box(three.as_bytes())))
    });
    c.bench_function("clusterdata_write", |b| {
        b.iter(|| black_box(&cd).to_json().expect("json"))
    });
}

criterion_group!(benches, clusterdata);
criterion_main!(benches);
