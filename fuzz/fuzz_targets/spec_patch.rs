//! Fuzz `stolonctl update --patch` (an RFC 7386 merge patch on the current spec, validated
//! as an update): it must never panic, and an accepted result must be a valid spec.
#![no_main]

use control::model::{ClusterSpec, GoDuration};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(patch) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let base = ClusterSpec {
        synchronous_replication: Some(true),
        min_synchronous_standbys: Some(1),
        fail_interval: Some(GoDuration::from_secs(20)),
        ..ClusterSpec::default()
    };
    if let Ok(new) = base.merge_patch(&patch) {
        new.validate().expect("a patched spec that was accepted is valid");
    }
});
