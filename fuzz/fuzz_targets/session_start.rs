//! Fuzz the session start's reader of a server's messages (the part that replaces its
//! BackendKeyData with the proxy's key): it must never panic; with a mint that gives the
//! key back unchanged it passes on exactly the bytes it was given (a prefix of them), and
//! where the start ends does not depend on how the stream is cut into reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::session_start::pass_start;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let same = |k: &[u8]| k.to_vec();
    let (whole, whole_done) = pass_start(&[stream], same);
    assert!(stream.starts_with(&whole));
    let cut = usize::from(cut).min(stream.len());
    let (split, split_done) = pass_start(&[&stream[..cut], &stream[cut..]], same);
    assert!(stream.starts_with(&split));
    assert_eq!(split_done, whole_done);
    // A real mint (a fixed 8-byte key): only no panic.
    let _ = pass_start(&[&stream[..cut], &stream[cut..]], |_| vec![0x80, 0, 0, 1, 1, 2, 3, 4]);
});
