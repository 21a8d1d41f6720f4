//! Fuzz the clusterdata reader (every proxy, keeper and sentinel reads this document from
//! the store, written by any version or by hand): it must never panic, and a document it
//! accepts must write back to one that reads as the same clusterdata.
#![no_main]

use control::model::ClusterData;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(cd) = ClusterData::from_json(data) else {
        return;
    };
    let written = cd.to_json().expect("an accepted document writes back");
    let again = ClusterData::from_json(&written).expect("what we write reads back");
    assert_eq!(again, cd);
});
