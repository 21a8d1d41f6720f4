use super::*;

fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn query(sql: &str) -> Vec<u8> {
    msg(b'Q', format!("{sql}\0").as_bytes())
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    msg(b'P', format!("{name}\0{sql}\0\0\0").as_bytes())
}

/// The client's bytes, whole and cut at every offset, give the same verdict.
fn proven_after(bytes: &[u8]) -> bool {
    let mut whole = Ledger::started();
    whole.feed(bytes);
    for cut in 0..bytes.len() {
        let mut split = Ledger::started();
        split.feed(&bytes[..cut]);
        split.feed(&bytes[cut..]);
        assert_eq!(
            split.proven().is_some(),
            whole.proven().is_some(),
            "cut at {cut}"
        );
    }
    whole.proven().is_some()
}

#[test]
fn what_keeps_the_state_proven_and_what_does_not() {
    let bind_execute = [
        msg(b'B', b"\0s1\0\0\0\0\0\0\0"),
        msg(b'E', b"\0\0\0\0\0"),
        msg(b'S', b""),
    ]
    .concat();
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("nothing sent", vec![], true),
        ("a clean query", query("SELECT 1"), true),
        ("bind, execute, sync", bind_execute.clone(), true),
        (
            "an unnamed parse of a clean text",
            parse("", "SELECT $1"),
            true,
        ),
        (
            "describe, flush, close of a portal",
            [msg(b'D', b"S\0"), msg(b'H', b""), msg(b'C', b"Pp\0")].concat(),
            true,
        ),
        ("a SET", query("SET statement_timeout = 1"), false),
        ("a named parse", parse("s1", "SELECT 1"), false),
        ("an unnamed parse of a SET", parse("", "SET a = 1"), false),
        ("the close of a statement", msg(b'C', b"Ss1\0"), false),
        ("a function call", msg(b'F', b"\0\0\0\x01"), false),
        ("an unknown message", msg(b'z', b""), false),
        ("a query without its NUL", msg(b'Q', b"SELECT 1"), false),
        ("half a message", query("SELECT 1")[..7].to_vec(), false),
        ("half a header", vec![b'Q', 0], false),
    ];
    for (what, bytes, want) in cases {
        assert_eq!(proven_after(&bytes), want, "{what}");
    }
}

#[test]
fn an_inspection_makes_a_dirty_session_proven_again() {
    let mut l = Ledger::started();
    l.feed(&query("SET statement_timeout = 1"));
    assert!(l.proven().is_none() && l.wants_inspection());
    let shown = SessionState {
        settings: vec![("statement_timeout".into(), "1ms".into())],
        ..SessionState::default()
    };
    l.shown(Some(shown.clone()));
    assert_eq!(l.proven(), Some(&shown));
    assert!(!l.wants_inspection());
    l.feed(&query("SELECT 1"));
    assert_eq!(l.proven(), Some(&shown), "a clean query keeps it");
    // An inspection that failed: nothing is known, and no new inspection is asked for.
    l.feed(&query("LISTEN x"));
    l.shown(None);
    assert!(l.proven().is_none() && !l.wants_inspection());
}

#[test]
fn a_body_too_long_to_read_makes_the_session_dirty_and_is_skipped_whole() {
    let long = format!("SELECT '{}'", "x".repeat(MAX_BODY));
    let mut l = Ledger::started();
    l.feed(&query(&long));
    assert!(l.proven().is_none());
    l.shown(Some(SessionState::default()));
    l.feed(&query("SELECT 1"));
    assert!(
        l.proven().is_some(),
        "the next message is read from its header"
    );
}
