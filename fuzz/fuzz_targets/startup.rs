//! Fuzz the startup-phase parser: it must never panic, never claim more bytes than it was
//! given, and answer the same for any longer input once complete. The terminated-TLS
//! startup's refusal (`--client-tls-required`), which reads the user and database from the
//! same packet, must not panic either.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((msg, len))) = proxy::protocol::parse(data) {
        assert!(len <= data.len());
        let mut longer = data.to_vec();
        longer.extend_from_slice(&[0xAB; 16]);
        let again = proxy::protocol::parse(&longer).expect("longer input still parses");
        assert_eq!(again, Some((msg, len)));
    }
    let refusal = proxy::terminate::tls_required_message(data);
    assert!(refusal.contains("no encryption"));
});
