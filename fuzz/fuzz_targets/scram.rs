//! Fuzz the proxy's SCRAM and authentication-message parsers with what a client (or a
//! server) may send: the client-first and client-final messages (through a whole server
//! exchange), a stored verifier, a SASLInitialResponse, an AuthenticationRequest. None may
//! panic, and a proof made of noise is never accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::auth::{exchange, scram, wire, Secret};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = scram::ClientFirst::parse(&text);
    let _ = scram::ClientFinal::parse(&text);
    let _ = scram::Verifier::parse(&text);
    let _ = Secret::parse(&text);
    let _ = wire::sasl_initial(data);
    let _ = wire::mechanisms(data);
    let _ = wire::auth_code(data);
    let _ = exchange::asked(data);
    let _ = scram::end_point(data);
    // A server exchange: the input split into a client-first and a client-final.
    let (v, _) = scram::Verifier::from_password("pw", b"salt", 1);
    let (first, last) = text.split_once('\n').unwrap_or((&text, ""));
    for (plus, offered) in [(false, false), (true, true), (false, true)] {
        if let Ok(server) = scram::Server::start(v.clone(), first, plus, offered) {
            let proof = server.finish(last, Some(b"end-point"));
            assert!(!matches!(proof, Ok(_)), "noise accepted as a proof");
        }
    }
    let mut client = scram::Client::new(scram::ClientSecret::Password("pw".into()));
    if client.client_final(first).is_ok() {
        let _ = client.verify(last);
    }
});
