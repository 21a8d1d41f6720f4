//! Fuzz the read-only listener's cancel-key sniffer over a server's stream: it must never
//! panic, never yield a key outside BackendKeyData's bounds, and find the same key whatever
//! way the stream is cut into reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::cancel::KeySniffer;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let whole = KeySniffer::default().feed(stream);
    if let Some(k) = &whole {
        assert!((8..=260).contains(&k.len()));
    }
    let cut = usize::from(cut).min(stream.len());
    let mut s = KeySniffer::default();
    let split = s.feed(&stream[..cut]).or_else(|| s.feed(&stream[cut..]));
    assert_eq!(split, whole);
});
