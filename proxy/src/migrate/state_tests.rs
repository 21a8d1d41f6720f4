use super::*;

fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
    wire::message(kind, body)
}

fn row(cols: &[Option<&str>]) -> Vec<u8> {
    let mut b = (cols.len() as u16).to_be_bytes().to_vec();
    for c in cols {
        match c {
            Some(v) => {
                b.extend((v.len() as i32).to_be_bytes());
                b.extend_from_slice(v.as_bytes());
            }
            None => b.extend((-1i32).to_be_bytes()),
        }
    }
    msg(b'D', &b)
}

fn set(rows: &[Vec<u8>]) -> Vec<u8> {
    let mut v = msg(b'T', b"\0\0");
    for r in rows {
        v.extend_from_slice(r);
    }
    v.extend(msg(b'C', b"SELECT 1\0"));
    v
}

fn kinds(counts: [&str; 5], users: (&str, &str)) -> Vec<u8> {
    let mut cols: Vec<Option<&str>> = counts.iter().map(|c| Some(*c)).collect();
    cols.push(Some(users.0));
    cols.push(Some(users.1));
    set(&[row(&cols)])
}

fn inspected(counts: [&str; 5], users: (&str, &str)) -> Vec<Rows> {
    let mut bytes = kinds(counts, users);
    bytes.extend(set(&[row(&[Some("statement_timeout"), Some("1234ms")])]));
    bytes.extend(set(&[row(&[
        Some("s1"),
        Some("select $1::int"),
        Some("{23}"),
    ])]));
    bytes.extend(msg(b'Z', b"I"));
    answer(&bytes).expect("whole").expect("valid").sets
}

#[test]
fn a_session_with_settings_and_prepared_statements_moves_with_them() {
    let sets = inspected(["0"; 5], ("alice", "alice"));
    let state = judge(&sets, "alice").expect("movable");
    assert_eq!(
        state,
        SessionState {
            settings: vec![("statement_timeout".into(), "1234ms".into())],
            role: None,
            prepared: vec![Prepared {
                name: "s1".into(),
                query: "select $1::int".into(),
                param_types: vec![23],
            }],
        }
    );
}

#[test]
fn each_unmovable_kind_is_named() {
    let cases = [
        (0, Unmovable::Listen),
        (1, Unmovable::AdvisoryLock),
        (2, Unmovable::TempTable),
        (3, Unmovable::HoldCursor),
        (4, Unmovable::SqlPrepare),
    ];
    for (i, want) in cases {
        let mut counts = ["0"; 5];
        counts[i] = "2";
        let sets = inspected(counts, ("alice", "alice"));
        assert_eq!(judge(&sets, "alice"), Err(want), "column {i}");
    }
    let sets = inspected(["0"; 5], ("bob", "bob"));
    assert_eq!(
        judge(&sets, "alice"),
        Err(Unmovable::SessionAuthorization),
        "SET SESSION AUTHORIZATION"
    );
    let sets = inspected(["0"; 5], ("alice", "reporting"));
    assert_eq!(
        judge(&sets, "alice").expect("movable").role.as_deref(),
        Some("reporting"),
        "SET ROLE is replayed"
    );
}

#[test]
fn an_answer_that_is_not_the_inspections_shape_is_not_trusted() {
    let mut bytes = kinds(["0"; 5], ("a", "a"));
    bytes.extend(msg(b'Z', b"I"));
    let sets = answer(&bytes).expect("whole").expect("valid").sets;
    assert_eq!(
        judge(&sets, "a"),
        Err(Unmovable::Inspect),
        "one set of three"
    );
    let mut bytes = kinds(["x", "0", "0", "0", "0"], ("a", "a"));
    bytes.extend(set(&[]));
    bytes.extend(set(&[]));
    bytes.extend(msg(b'Z', b"I"));
    let sets = answer(&bytes).expect("whole").expect("valid").sets;
    assert_eq!(judge(&sets, "a"), Err(Unmovable::Inspect), "not a count");
    let mut bytes = kinds(["0"; 5], ("a", "a"));
    bytes.extend(set(&[]));
    bytes.extend(set(&[row(&[Some("s"), Some("q"), Some("{x}")])]));
    bytes.extend(msg(b'Z', b"I"));
    let sets = answer(&bytes).expect("whole").expect("valid").sets;
    assert_eq!(judge(&sets, "a"), Err(Unmovable::Inspect), "bad oid[]");
}

#[test]
fn an_answer_is_read_whole_from_any_prefix_and_keeps_what_the_client_must_see() {
    let mut bytes = msg(b'A', b"\0\0\0\x07chan\0payload\0");
    bytes.extend(kinds(["0"; 5], ("a", "a")));
    bytes.extend(msg(b'N', b"SNOTICE\0Mhello\0\0"));
    bytes.extend(msg(b'Z', b"I"));
    for cut in 0..bytes.len() {
        assert!(answer(&bytes[..cut]).is_none(), "cut {cut}");
    }
    let a = answer(&bytes).expect("whole").expect("valid");
    assert_eq!(a.sets.len(), 1);
    assert!(a.error.is_none());
    let mut passed = msg(b'A', b"\0\0\0\x07chan\0payload\0");
    passed.extend(msg(b'N', b"SNOTICE\0Mhello\0\0"));
    assert_eq!(
        a.passed, passed,
        "the notification and notice go on to the client"
    );

    let mut err = msg(b'E', b"SERROR\0C42501\0Mpermission denied\0\0");
    err.extend(msg(b'Z', b"I"));
    let a = answer(&err).expect("whole").expect("valid");
    assert_eq!(a.error.as_deref(), Some("42501: permission denied"));
    assert!(answer(&[b'D', 0, 0, 0, 1]).expect("complete").is_err());
    assert!(
        answer(&msg(b'D', &[0, 1, 0, 0, 0, 9]))
            .expect("complete")
            .is_err(),
        "a column longer than its row"
    );
    assert!(answer(&msg(b'C', b"SELECT 1\0")).is_none(), "no Z yet");
}

#[test]
fn the_replay_sets_each_setting_as_a_parameter_then_prepares_each_statement() {
    let state = SessionState {
        settings: vec![("search_path".into(), "a, 'b'".into())],
        role: Some("reporting".into()),
        prepared: vec![Prepared {
            name: "s1".into(),
            query: "select $1".into(),
            param_types: vec![25],
        }],
    };
    let bytes = replay(&state);
    let mut kinds = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len = u32::from_be_bytes(bytes[at + 1..at + 5].try_into().expect("4")) as usize;
        kinds.push(bytes[at]);
        at += 1 + len;
    }
    assert_eq!(kinds, b"PBEBEPS".to_vec());
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        text.contains("a, 'b'"),
        "the value travels as it is, unquoted"
    );
    assert!(text.contains("reporting"));
    assert_eq!(
        replay(&SessionState::default()),
        msg(b'S', &[]),
        "nothing to give"
    );
}
