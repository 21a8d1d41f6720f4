//! Deterministic db UIDs: `decide` is pure, so a new UID is derived from the keeper, the time
//! and the existing UIDs (FNV-1a), as 8 hex digits like stolon's random ones.

use crate::model::{ClusterData, Timestamp};

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A UID not used by any db of `cd`.
pub(super) fn new_db_uid(cd: &ClusterData, keeper: &str, now: Timestamp) -> String {
    let nanos = now.unix_nanos().to_le_bytes();
    (0u32..)
        .map(|n| {
            let h = fnv1a(&[
                keeper.as_bytes(),
                &nanos,
                cd.cluster.uid.as_bytes(),
                &n.to_le_bytes(),
            ]);
            format!("{:08x}", h as u32)
        })
        .find(|uid| !cd.dbs.contains_key(uid))
        .unwrap_or_default()
}
