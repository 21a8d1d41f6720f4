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
    msg(b'P', format!("{name}\0{sql}\0\0\x01\0\0\0\x17").as_bytes())
}

fn bind(statement: &str) -> Vec<u8> {
    msg(b'B', format!("\0{statement}\0\0\0\0\0\0\0").as_bytes())
}

fn close(statement: &str) -> Vec<u8> {
    msg(b'C', format!("S{statement}\0").as_bytes())
}

fn sync() -> Vec<u8> {
    msg(b'S', b"")
}

fn execute() -> Vec<u8> {
    msg(b'E', b"\0\0\0\0\0")
}

/// One exchange: what the client sent, then the kinds of the server's answers.
struct Step(Vec<u8>, &'static [u8]);

/// Runs the steps with the client's bytes whole and cut at every offset: the same verdict
/// either way. Returns the proven state, if any.
fn after(steps: &[Step]) -> Option<SessionState> {
    let run = |cut: Option<usize>| {
        let mut l = Ledger::started();
        for Step(bytes, answers) in steps {
            match cut.map(|c| c.min(bytes.len())) {
                Some(c) => {
                    l.feed(&bytes[..c]);
                    l.feed(&bytes[c..]);
                }
                None => l.feed(bytes),
            }
            for &k in *answers {
                l.server(k);
            }
        }
        l.proven()
    };
    let whole = run(None);
    let longest = steps.iter().map(|s| s.0.len()).max().unwrap_or(0);
    for cut in 0..longest {
        assert_eq!(run(Some(cut)), whole, "cut at {cut}");
    }
    whole
}

fn names(s: &SessionState) -> Vec<&str> {
    s.prepared.iter().map(|p| p.name.as_str()).collect()
}

#[test]
fn the_protocol_is_tracked_exactly() {
    // A named statement prepared (ParseComplete), executed, then closed (CloseComplete).
    let prepared = after(&[
        Step([parse("s1", "SELECT $1"), sync()].concat(), b"1Z"),
        Step([bind("s1"), execute(), sync()].concat(), b"2DCZ"),
    ])
    .expect("proven");
    assert_eq!(names(&prepared), ["s1"]);
    assert_eq!(prepared.prepared[0].query, "SELECT $1");
    assert_eq!(prepared.prepared[0].param_types, [23]);
    let closed = after(&[
        Step([parse("s1", "SELECT $1"), sync()].concat(), b"1Z"),
        Step([close("s1"), sync()].concat(), b"3Z"),
    ])
    .expect("proven");
    assert!(closed.prepared.is_empty());
    // A Parse that failed: the server skipped its cycle; nothing was added.
    let failed = after(&[
        Step([parse("s1", "SELEC"), bind("s1"), sync()].concat(), b"EZ"),
        Step(query("SELECT 1"), b"TDCZ"),
    ]);
    assert_eq!(
        failed, None,
        "a Bind of a statement that never was is not trusted"
    );
    let failed = after(&[Step([parse("s1", "SELEC"), sync()].concat(), b"EZ")]).expect("proven");
    assert!(failed.prepared.is_empty());
    // Pipelined: two statements in one cycle, the second failing; only the first is held.
    let one = after(&[Step(
        [parse("a", "SELECT 1"), parse("b", "SELEC"), sync()].concat(),
        b"1EZ",
    )])
    .expect("proven");
    assert_eq!(names(&one), ["a"]);
}

#[test]
fn what_keeps_the_state_proven_and_what_does_not() {
    let cases: Vec<(&str, Vec<Step>, bool)> = vec![
        ("nothing sent", vec![], true),
        (
            "a clean query",
            vec![Step(query("SELECT 1"), b"TDCZ")],
            true,
        ),
        (
            "a clean query that failed",
            vec![Step(query("SELECT 1/0"), b"EZ")],
            true,
        ),
        (
            "an unnamed statement, clean, executed",
            vec![Step(
                [parse("", "SELECT $1"), bind(""), execute(), sync()].concat(),
                b"12DCZ",
            )],
            true,
        ),
        (
            "describe, flush, close of a portal",
            vec![Step(
                [
                    msg(b'D', b"S\0"),
                    msg(b'H', b""),
                    msg(b'C', b"Pp\0"),
                    sync(),
                ]
                .concat(),
                b"n3Z",
            )],
            true,
        ),
        (
            "a SET",
            vec![Step(query("SET statement_timeout = 1"), b"CZ")],
            false,
        ),
        (
            "a named statement that takes a lock, only prepared",
            vec![Step(
                [parse("s1", "SELECT pg_advisory_lock(1)"), sync()].concat(),
                b"1Z",
            )],
            true,
        ),
        (
            "the same, executed",
            vec![
                Step(
                    [parse("s1", "SELECT pg_advisory_lock(1)"), sync()].concat(),
                    b"1Z",
                ),
                Step([bind("s1"), execute(), sync()].concat(), b"2DCZ"),
            ],
            false,
        ),
        (
            "an unnamed SET, executed",
            vec![Step(
                [parse("", "SET a = 1"), bind(""), execute(), sync()].concat(),
                b"12CZ",
            )],
            false,
        ),
        (
            "a Bind of a statement never prepared",
            vec![Step([bind("x"), sync()].concat(), b"EZ")],
            false,
        ),
        (
            "a function call",
            vec![Step(msg(b'F', b"\0\0\0\x01"), b"VZ")],
            false,
        ),
        ("an unknown message", vec![Step(msg(b'z', b""), b"")], false),
        (
            "a query without its NUL",
            vec![Step(msg(b'Q', b"SELECT 1"), b"EZ")],
            false,
        ),
        (
            "half a message",
            vec![Step(query("SELECT 1")[..7].to_vec(), b"")],
            false,
        ),
        (
            "a request not answered yet",
            vec![Step(query("SELECT 1"), b"TD")],
            false,
        ),
        (
            "a ParseComplete nobody asked for",
            vec![Step(vec![], b"1")],
            false,
        ),
    ];
    for (what, steps, want) in cases {
        assert_eq!(after(&steps).is_some(), want, "{what}");
    }
}

#[test]
fn an_inspection_makes_a_dirty_session_proven_again() {
    let mut l = Ledger::started();
    l.feed(&query("SET statement_timeout = 1"));
    l.server(b'C');
    l.server(b'Z');
    assert!(l.proven().is_none() && l.wants_inspection());
    let shown = SessionState {
        settings: vec![("statement_timeout".into(), "1ms".into())],
        prepared: vec![Prepared {
            name: "lock".into(),
            query: "SELECT pg_advisory_lock($1)".into(),
            param_types: vec![20],
        }],
        ..SessionState::default()
    };
    l.shown(Some(shown.clone()));
    assert_eq!(l.proven(), Some(shown.clone()));
    assert!(!l.wants_inspection());
    l.feed(&query("SELECT 1"));
    l.server(b'Z');
    assert_eq!(l.proven(), Some(shown), "a clean query keeps it");
    // A statement the inspection showed keeps its text's verdict.
    l.feed(&[bind("lock"), execute(), sync()].concat());
    assert!(l.proven().is_none(), "executing a lock is not clean");
    // An inspection that failed: nothing is known, and no new inspection is asked for.
    l.shown(None);
    assert!(l.proven().is_none() && !l.wants_inspection());
}

#[test]
fn a_body_too_long_to_read_makes_the_session_dirty_and_is_skipped_whole() {
    let long = format!("SELECT '{}'", "x".repeat(MAX_BODY));
    let mut l = Ledger::started();
    l.feed(&query(&long));
    l.server(b'Z');
    assert!(l.proven().is_none());
    l.shown(Some(SessionState::default()));
    l.feed(&query("SELECT 1"));
    l.server(b'Z');
    assert!(
        l.proven().is_some(),
        "the next message is read from its header"
    );
}

#[test]
fn the_start_is_answered_before_the_first_request() {
    let mut l = Ledger::started();
    l.expect_ready();
    assert!(l.proven().is_none(), "the start is not answered yet");
    l.server(b'Z');
    assert!(l.proven().is_some());
}

#[test]
fn a_client_pipelining_more_than_the_budget_is_not_tracked_until_inspected() {
    let mut l = Ledger::started();
    let big = format!("SELECT '{}'", "x".repeat(60_000));
    for i in 0..20 {
        l.feed(&parse(&format!("s{i}"), &big));
    }
    l.feed(&sync());
    assert!(l.pending_bytes <= MAX_PENDING_BYTES, "bounded");
    for _ in 0..20 {
        l.server(b'1');
    }
    l.server(b'Z');
    assert!(l.proven().is_none(), "past the budget: dirty");
    l.shown(Some(SessionState::default()));
    assert!(l.proven().is_some() && l.pending_bytes == 0);
}
