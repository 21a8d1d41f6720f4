use super::*;

fn packet(code: u32, body: &[u8]) -> Vec<u8> {
    let mut p = ((8 + body.len()) as u32).to_be_bytes().to_vec();
    p.extend(code.to_be_bytes());
    p.extend(body);
    p
}

fn startup(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
    startup_packet(version, params)
}

/// The linkerd-style check: every proper prefix is incomplete, the whole packet and any
/// longer input parse to the same message and length.
fn check_every_prefix(bytes: &[u8], want: &Startup<'_>) {
    for n in 0..bytes.len() {
        assert_eq!(parse(&bytes[..n]), Ok(None), "prefix of {n} bytes");
    }
    let mut longer = bytes.to_vec();
    for extra in [0usize, 1, 7, 100] {
        longer.truncate(bytes.len());
        longer.extend(std::iter::repeat_n(0xAB, extra));
        let (msg, len) = parse(&longer).expect("ok").expect("complete");
        assert_eq!(&msg, want);
        assert_eq!(len, bytes.len());
    }
}

#[test]
fn ssl_and_gssenc_requests() {
    check_every_prefix(&packet(SSL_REQUEST_CODE, &[]), &Startup::SslRequest);
    check_every_prefix(&packet(GSSENC_REQUEST_CODE, &[]), &Startup::GssEncRequest);
}

#[test]
fn cancel_request_protocol_3_0() {
    let p = packet(CANCEL_REQUEST_CODE, &[0, 0, 0x30, 0x39, 1, 2, 3, 4]);
    check_every_prefix(
        &p,
        &Startup::Cancel {
            pid: 12345,
            key: &[1, 2, 3, 4],
        },
    );
}

#[test]
fn cancel_request_protocol_3_2_long_keys() {
    for key_len in [32usize, 256] {
        let key: Vec<u8> = (0..key_len).map(|i| i as u8).collect();
        let mut body = 77u32.to_be_bytes().to_vec();
        body.extend(&key);
        let p = packet(CANCEL_REQUEST_CODE, &body);
        check_every_prefix(&p, &Startup::Cancel { pid: 77, key: &key });
    }
    let mut body = 77u32.to_be_bytes().to_vec();
    body.extend(vec![0u8; 257]);
    assert_eq!(
        parse(&packet(CANCEL_REQUEST_CODE, &body)),
        Err(ParseError::BadLength(8 + 4 + 257))
    );
}

#[test]
fn startup_message_3_0_and_3_2() {
    for (version, minor) in [(196_608u32, 0u16), (196_610, 2)] {
        let p = startup(
            version,
            &[
                ("user", "app"),
                ("database", "db1"),
                ("application_name", "x"),
            ],
        );
        let want = Startup::Startup {
            major: 3,
            minor,
            params: vec![
                (b"user".as_slice(), b"app".as_slice()),
                (b"database".as_slice(), b"db1".as_slice()),
                (b"application_name".as_slice(), b"x".as_slice()),
            ],
        };
        check_every_prefix(&p, &want);
    }
}

#[test]
fn startup_message_builder_matches_the_layout() {
    // Spelled out from the protocol docs: Int32 length, Int32 196608, name\0value\0..., \0.
    let want: &[u8] = b"\0\0\0\x1f\0\x03\0\0user\0app\0database\0db1\0\0";
    assert_eq!(
        startup_message(&[("user", "app"), ("database", "db1")]),
        want
    );
}

#[test]
fn direct_tls_client_hello() {
    let hello = [0x16, 0x03, 0x01, 0x00, 0xf4, 0x01];
    for n in 1..hello.len() {
        assert_eq!(parse(&hello[..n]), Ok(Some((Startup::DirectTls, 0))));
    }
}

#[test]
fn malformed_table() {
    let mut too_long = 10_001u32.to_be_bytes().to_vec();
    too_long.extend(196_608u32.to_be_bytes());
    let cases: Vec<(&str, Vec<u8>, ParseError)> = vec![
        ("length below 8", vec![0, 0, 0, 4], ParseError::BadLength(4)),
        (
            "length zero",
            vec![0, 0, 0, 0, 1, 2, 3, 4],
            ParseError::BadLength(0),
        ),
        (
            "oversize, rejected before the body",
            too_long,
            ParseError::BadLength(10_001),
        ),
        (
            "huge length",
            vec![0x7f, 0xff, 0xff, 0xff],
            ParseError::BadLength(0x7fff_ffff),
        ),
        (
            "ssl request with body",
            packet(SSL_REQUEST_CODE, &[0]),
            ParseError::BadLength(9),
        ),
        (
            "short cancel",
            packet(CANCEL_REQUEST_CODE, &[0, 0, 0, 1]),
            ParseError::BadLength(12),
        ),
        (
            "protocol 2",
            startup(131_072, &[("user", "u")]),
            ParseError::UnsupportedProtocol { major: 2, minor: 0 },
        ),
        (
            "unknown request code",
            packet(1234 << 16 | 9999, &[0]),
            ParseError::UnsupportedProtocol {
                major: 1234,
                minor: 9999,
            },
        ),
        (
            "no terminator",
            packet(196_608, b"user\0app\0"),
            ParseError::Layout("expected terminator as last byte"),
        ),
        (
            "name without value",
            packet(196_608, b"user\0"),
            ParseError::Layout("parameter without a value"),
        ),
        (
            "bytes after terminator",
            packet(196_608, b"user\0app\0\0junk\0"),
            ParseError::Layout("bytes after the terminator"),
        ),
    ];
    for (name, bytes, want) in cases {
        assert_eq!(parse(&bytes), Err(want), "{name}");
    }
}

#[test]
fn error_response_layout() {
    let e = error_response("57P03", "no primary available");
    assert_eq!(e[0], b'E');
    let len = u32::from_be_bytes([e[1], e[2], e[3], e[4]]) as usize;
    assert_eq!(len + 1, e.len());
    let body = &e[5..];
    assert_eq!(body, b"SFATAL\0VFATAL\0C57P03\0Mno primary available\0\0");
    let with_nul = error_response("08P01", "a\0b");
    assert!(with_nul.ends_with(b"Mab\0\0"));
}

#[test]
fn error_fields_of_a_whole_error_response_only() {
    let e = error_response(
        "57P01",
        "terminating connection due to unexpected postmaster exit",
    );
    assert_eq!(
        error_fields(&e),
        Some((
            "57P01",
            "terminating connection due to unexpected postmaster exit"
        ))
    );
    let mut then_more = e.clone();
    then_more.extend(b"Z\0\0\0\x05I");
    assert_eq!(error_fields(&then_more).map(|f| f.0), Some("57P01"));
    for cut in 0..e.len() {
        assert_eq!(error_fields(&e[..cut]), None, "a partial one, cut at {cut}");
    }
    // AuthenticationOk, an ErrorResponse without a code, a length shorter than its header.
    assert_eq!(error_fields(b"R\0\0\0\x08\0\0\0\0"), None);
    assert_eq!(error_fields(b"E\0\0\0\x0bMabc\0\0"), None);
    assert_eq!(error_fields(b"E\0\0\0\x02"), None);
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn error_fields_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut e = vec![b'E'];
            e.extend(bytes);
            let _ = error_fields(&e);
        }

        #[test]
        fn never_panics_and_consumes_within_bounds(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Some((_, len))) = parse(&bytes) {
                prop_assert!(len <= bytes.len());
            }
        }

        #[test]
        fn startup_params_round_trip(params in proptest::collection::vec(("[a-z_]{1,12}", "[ -~]{0,20}"), 0..8)) {
            let pairs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let bytes = startup(196_608, &pairs);
            prop_assume!(bytes.len() <= MAX_STARTUP_PACKET as usize);
            let (msg, len) = parse(&bytes).expect("ok").expect("complete");
            prop_assert_eq!(len, bytes.len());
            let Startup::Startup { params: got, .. } = msg else { panic!("not a startup") };
            let want: Vec<(&[u8], &[u8])> = pairs.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())).collect();
            prop_assert_eq!(got, want);
        }
    }
}
