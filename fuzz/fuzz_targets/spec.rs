//! Fuzz the cluster spec reader (`stolonctl init`/`update`, `--initial-cluster-spec`): Go's
//! case-insensitive keys, then validation. It must never panic, and a spec it accepts must
//! write back to one that reads as the same spec.
#![no_main]

use control::model::spec_keys::spec_from_value;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let Ok((spec, unknown)) = spec_from_value(doc) else {
        return;
    };
    let _ = spec.validate();
    let _ = spec.with_defaults();
    let written = serde_json::to_value(&spec).expect("a spec writes");
    let (again, unknown_again) = spec_from_value(written).expect("what we write reads back");
    // Unknown keys are kept (as Go keeps them), so they are unknown again, and only they.
    assert!(unknown_again.iter().all(|k| unknown.contains(k)), "{unknown_again:?} {unknown:?}");
    assert_eq!(again, spec);
});
