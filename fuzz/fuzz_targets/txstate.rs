//! Fuzz the relay's transaction tracking (every plaintext or terminated session's bytes go
//! through it, both directions): any bytes never panic, and a conversation whose reads are
//! split differently (TCP gives whatever chunks it likes) ends in the same state, also when
//! fed one byte at a time (which never takes the whole-message fast path).
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::txstate::{Start, TxState};

/// The first byte picks how the stream starts and where each read is cut; then each read is
/// a length byte (its top bit: from the client) and up to 127 bytes.
fn reads(data: &[u8]) -> Option<(Start, u8, Vec<(bool, &[u8])>)> {
    let (&head, mut rest) = data.split_first()?;
    let start = match head % 3 {
        0 => Start::Startup,
        1 => Start::SslRequest,
        _ => Start::DirectTls,
    };
    let mut out = Vec::new();
    while let Some((&len, tail)) = rest.split_first() {
        let n = usize::from(len & 0x7f).min(tail.len());
        out.push((len & 0x80 != 0, &tail[..n]));
        rest = &tail[n..];
    }
    Some((start, head / 3, out))
}

fn feed(tx: &mut TxState, client: bool, bytes: &[u8]) {
    if client {
        tx.from_client(bytes);
    } else {
        tx.from_server(bytes);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((start, cut, reads)) = reads(data) else {
        return;
    };
    let mut whole = TxState::new(start, &[]);
    let (mut split, mut bytewise) = (whole.clone(), whole.clone());
    for (client, bytes) in reads {
        feed(&mut whole, client, bytes);
        let at = usize::from(cut).min(bytes.len());
        feed(&mut split, client, &bytes[..at]);
        feed(&mut split, client, &bytes[at..]);
        for b in bytes.chunks(1) {
            feed(&mut bytewise, client, b);
        }
    }
    for other in [&split, &bytewise] {
        assert_eq!(whole.idle(), other.idle(), "idle differs by the split");
        assert_eq!(whole.settled(), other.settled(), "settled differs by the split");
        assert_eq!(whole.opaque(), other.opaque(), "opaque differs by the split");
    }
});
