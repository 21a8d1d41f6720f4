//! Fuzz what a session move reads: the old server's answer to the inspection (cut into
//! result sets, then judged) must never panic, and an answer found whole is found the same
//! from every prefix on; the scan of the client's bytes for custom settings must never
//! panic, and what it finds in one read it also finds when the bytes come in two (a split
//! may see more, never less: it errs towards not moving); the ledger of a session's state
//! (client bytes, then the same bytes read as the server's message kinds) never panics and
//! proves the same state whether the client's bytes come in one read or two; the statement
//! classifier never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::migrate::{classify, ledger, scan, state};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut).min(bytes.len());
    if let Some(Ok(a)) = state::answer(bytes) {
        let _ = state::judge(&a.sets, "alice");
        let _ = state::replay(&state::SessionState::default());
        // A prefix is still incomplete, or (the answer ended before the cut) the same answer.
        match state::answer(&bytes[..cut]) {
            None => {}
            Some(Ok(b)) => assert_eq!(b.sets, a.sets, "a prefix read another answer"),
            Some(Err(e)) => panic!("a prefix of a good answer read as bad: {e}"),
        }
    }
    let mut whole = scan::CustomScan::default();
    whole.feed(bytes);
    let mut split = scan::CustomScan::default();
    split.feed(&bytes[..cut]);
    split.feed(&bytes[cut..]);
    assert!(!whole.found() || split.found(), "a split read missed what one read found");
    let _ = classify::clean(bytes);
    let run = |parts: &[&[u8]]| {
        let mut l = ledger::Ledger::started();
        for p in parts {
            l.feed(p);
        }
        for &k in bytes {
            l.server(k);
        }
        l.proven()
    };
    assert_eq!(
        run(&[bytes]),
        run(&[&bytes[..cut], &bytes[cut..]]),
        "the ledger's verdict depends on how the client's bytes were read"
    );
});
