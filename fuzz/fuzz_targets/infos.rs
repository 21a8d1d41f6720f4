//! Fuzz the readers of the infos every component publishes (KeeperInfo, SentinelInfo,
//! ProxyInfo): the sentinel decodes whatever is under the keepers' and proxies' keys. They
//! must never panic, and what they accept must write back to the same value.
#![no_main]

use control::model::{decode, KeeperInfo, ProxyInfo, SentinelInfo};
use libfuzzer_sys::fuzz_target;

fn round_trip<T>(what: &'static str, data: &[u8])
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    let Ok(v) = decode::<T>(what, data) else {
        return;
    };
    let written = serde_json::to_vec(&v).expect("an accepted info writes back");
    let again: T = decode(what, &written).expect("what we write reads back");
    assert_eq!(again, v);
}

fuzz_target!(|data: &[u8]| {
    round_trip::<KeeperInfo>("keeper info", data);
    round_trip::<SentinelInfo>("sentinel info", data);
    round_trip::<ProxyInfo>("proxy info", data);
});
