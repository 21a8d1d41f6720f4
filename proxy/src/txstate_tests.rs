use super::*;
use proptest::prelude::*;

fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind];
    m.extend(((body.len() + 4) as u32).to_be_bytes());
    m.extend(body);
    m
}

fn startup() -> Vec<u8> {
    let body = b"\0\x03\0\0user\0u\0\0";
    let mut m = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    m.extend(body);
    m
}

fn ready(status: u8) -> Vec<u8> {
    msg(b'Z', &[status])
}

fn auth_ok() -> Vec<u8> {
    let mut v = msg(b'R', &[0, 0, 0, 0]);
    v.extend(msg(b'S', b"server_version\x0015\0"));
    v.extend(msg(b'K', &[0, 0, 0, 1, 0, 0, 0, 2]));
    v
}

fn query(sql: &str) -> Vec<u8> {
    let mut b = sql.as_bytes().to_vec();
    b.push(0);
    msg(b'Q', &b)
}

fn result_then(status: u8) -> Vec<u8> {
    let mut v = msg(
        b'T',
        &[
            0, 1, b'x', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 23, 0, 4, 255, 255, 255, 255, 0, 0,
        ],
    );
    v.extend(msg(b'D', &[0, 1, 0, 0, 0, 1, b'1']));
    v.extend(msg(b'C', b"SELECT 1\0"));
    v.extend(ready(status));
    v
}

/// A conversation as (from client?, bytes) steps, and where the session stands after.
type Step = (bool, Vec<u8>);

/// Where a session stands after a conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stands {
    /// Something in flight, inside a transaction, or opaque.
    Busy,
    /// Idle, between the halves of a pair (startup and first query, prepare and execute).
    Half,
    /// Idle and settled.
    Settled,
}
use Stands::*;

fn stands(st: &TxState) -> Stands {
    match (st.idle(), st.settled()) {
        (false, false) => Busy,
        (true, false) => Half,
        (true, true) => Settled,
        (false, true) => panic!("settled but not idle"),
    }
}

fn run(start: Start, steps: &[Step]) -> TxState {
    let mut st = TxState::new(start, &[]);
    for (client, bytes) in steps {
        if *client {
            st.from_client(bytes);
        } else {
            st.from_server(bytes);
        }
    }
    st
}

fn conversations() -> Vec<(&'static str, Start, Vec<Step>, Stands)> {
    let mut after_auth = auth_ok();
    after_auth.extend(ready(b'I'));
    let mut ssl_n_then_auth = vec![b'N'];
    ssl_n_then_auth.extend(&after_auth);
    let mut pipelined = query("select 1");
    pipelined.extend(query("select 2"));
    // tokio-postgres' `execute(sql, params)`: a prepare round trip, then bind and execute.
    let prepare = [
        msg(b'P', b"\0insert\0\0\0"),
        msg(b'D', b"S\0"),
        msg(b'S', b""),
    ]
    .concat();
    let prepared = [
        msg(b'1', b""),
        msg(b't', b"\0\0"),
        msg(b'n', b""),
        ready(b'I'),
    ]
    .concat();
    let execute = [
        msg(b'B', b"\0\0\0\0\0\0\0\0"),
        msg(b'E', b"\0\0\0\0\0"),
        msg(b'S', b""),
    ]
    .concat();
    let executed = [msg(b'2', b""), msg(b'C', b"INSERT 0 1\0"), ready(b'I')].concat();
    vec![
        (
            "a prepare answered: idle, its execute follows",
            Start::Startup,
            vec![
                (false, after_auth.clone()),
                (true, prepare.clone()),
                (false, prepared.clone()),
            ],
            Half,
        ),
        (
            "a prepare and its execute answered",
            Start::Startup,
            vec![
                (false, after_auth.clone()),
                (true, prepare.clone()),
                (false, prepared.clone()),
                (true, execute.clone()),
                (false, executed.clone()),
            ],
            Settled,
        ),
        (
            "a prepare and its execute pipelined, answered",
            Start::Startup,
            vec![
                (false, after_auth.clone()),
                (true, [prepare.clone(), execute].concat()),
                (false, [prepared, executed].concat()),
            ],
            Settled,
        ),
        (
            "a statement closed",
            Start::Startup,
            vec![
                (false, after_auth.clone()),
                (true, [msg(b'C', b"Sx\0"), msg(b'S', b"")].concat()),
                (false, [msg(b'3', b""), ready(b'I')].concat()),
            ],
            Settled,
        ),
        ("before authentication", Start::Startup, vec![], Busy),
        (
            "authenticated, idle",
            Start::Startup,
            vec![(false, after_auth.clone())],
            Half,
        ),
        (
            "a query in flight",
            Start::Startup,
            vec![(false, after_auth.clone()), (true, query("select 1"))],
            Busy,
        ),
        (
            "a query answered",
            Start::Startup,
            vec![
                (false, after_auth.clone()),
                (true, query("select 1")),
                (false, result_then(b'I')),
            ],
            Settled,
        ),
        (
            "inside a transaction",
            Start::Startup,
            vec![
                (false, after_auth.clone()),
                (true, query("begin")),
                (false, result_then(b'T')),
            ],
            Busy,
        ),
        (
            "a failed transaction",
            Start::Startup,
            vec![
                (false, after_auth.clone()),
                (true, query("begin")),
                (false, result_then(b'E')),
            ],
            Busy,
        ),
        (
            "committed",
            Start::Startup,
            vec![
                (false, after_auth.clone()),
                (true, query("begin")),
                (false, result_then(b'T')),
                (true, query("commit")),
                (false, result_then(b'I')),
            ],
            Settled,
        ),
        (
            "pipelined: one of two answered",
            Start::Startup,
            vec![
                (false, after_auth.clone()),
                (true, pipelined.clone()),
                (false, result_then(b'I')),
            ],
            Busy,
        ),
        (
            "pipelined: both answered",
            Start::Startup,
            vec![
                (false, after_auth.clone()),
                (true, pipelined),
                (false, result_then(b'I')),
                (false, result_then(b'I')),
            ],
            Settled,
        ),
        (
            "extended protocol up to Sync",
            Start::Startup,
            vec![
                (false, after_auth.clone()),
                (
                    true,
                    [
                        msg(b'P', b"\0select 1\0\0\0"),
                        msg(b'B', b"\0\0\0\0\0\0\0\0"),
                        msg(b'E', b"\0\0\0\0\0"),
                        msg(b'S', b""),
                    ]
                    .concat(),
                ),
                (false, result_then(b'I')),
            ],
            Settled,
        ),
        (
            "extended protocol before Sync",
            Start::Startup,
            vec![
                (false, after_auth.clone()),
                (
                    true,
                    [msg(b'P', b"\0select 1\0\0\0"), msg(b'H', b"")].concat(),
                ),
                (false, msg(b'1', b"")),
            ],
            Busy,
        ),
        (
            "half a query sent",
            Start::Startup,
            vec![
                (false, after_auth.clone()),
                (true, query("select 1")[..3].to_vec()),
            ],
            Busy,
        ),
        (
            "ssl declined, startup in the clear, idle",
            Start::SslRequest,
            vec![
                (false, vec![b'N']),
                (true, startup()),
                (false, after_auth.clone()),
            ],
            Half,
        ),
        (
            "ssl declined, the answer and the rest in one read",
            Start::SslRequest,
            vec![(true, startup()), (false, ssl_n_then_auth)],
            Half,
        ),
        (
            "ssl accepted: opaque",
            Start::SslRequest,
            vec![
                (false, vec![b'S']),
                (true, vec![0x16, 3, 1, 0, 5]),
                (false, after_auth.clone()),
            ],
            Busy,
        ),
        (
            "direct tls: opaque",
            Start::DirectTls,
            vec![(false, after_auth.clone())],
            Busy,
        ),
        (
            "a length no message has: opaque",
            Start::Startup,
            vec![(false, after_auth.clone()), (false, vec![b'Z', 0, 0, 0, 2])],
            Busy,
        ),
    ]
}

#[test]
fn idle_only_between_transactions_with_nothing_in_flight() {
    for (name, start, steps, expected) in conversations() {
        assert_eq!(stands(&run(start, &steps)), expected, "{name}");
    }
}

proptest! {
    /// Reads split anywhere give the same answer: the relay sees whatever chunks TCP gives.
    #[test]
    fn any_split_of_the_reads_gives_the_same_answer(cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6)) {
        for (name, start, steps, expected) in conversations() {
            let mut split = Vec::new();
            for (client, bytes) in &steps {
                let mut points: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
                points.sort_unstable();
                points.dedup();
                let mut last = 0;
                for p in points.into_iter().chain([bytes.len()]) {
                    if p > last {
                        split.push((*client, bytes[last..p].to_vec()));
                        last = p;
                    }
                }
            }
            prop_assert_eq!(stands(&run(start, &split)), expected, "{}", name);
        }
    }

    /// Any bytes at all never panic.
    #[test]
    fn arbitrary_bytes_never_panic(steps in prop::collection::vec((any::<bool>(), prop::collection::vec(any::<u8>(), 0..64)), 0..16)) {
        for start in [Start::Startup, Start::SslRequest, Start::DirectTls] {
            let st = run(start, &steps);
            prop_assert!(st.idle() || !st.settled());
        }
    }
}

#[test]
fn custom_settings_are_watched_only_once_asked_and_after_a_move() {
    let set = query("SET app.tenant = 'acme'");
    let mut tx = TxState::new(Start::Startup, &[]);
    tx.from_client(&set);
    assert!(
        !tx.custom_settings(),
        "a session that cannot move is not watched"
    );
    tx.watch_for_moves(true);
    tx.from_client(&query("SELECT 1"));
    assert!(!tx.custom_settings());
    tx.from_client(&set);
    assert!(tx.custom_settings());
    let mut moved = TxState::moved(Default::default(), true);
    assert!(moved.idle() && moved.settled());
    moved.from_client(&set);
    assert!(moved.custom_settings(), "a moved session is watched");
}

#[test]
fn an_error_answering_no_request_marks_the_server_lost_and_keeps_the_state_provable() {
    let mut tx = TxState::new(Start::Startup, &[]);
    tx.from_server(&[auth_ok(), ready(b'I')].concat());
    tx.watch_for_moves(true);
    tx.from_client(&query("SELECT 1"));
    tx.from_server(&result_then(b'I'));
    assert!(tx.provable().is_some(), "a clean query keeps it proven");
    assert!(!tx.lost_with_error);
    let fatal = msg(b'E', b"SFATAL\0C57P01\0Mterminating connection\0\0");
    tx.from_server(&fatal);
    assert!(tx.lost_with_error, "an error answering no request");
    assert!(
        tx.provable().is_some(),
        "still provable: the client has not seen it"
    );
    // An error that answers a request is the request's.
    let mut tx = TxState::new(Start::Startup, &[]);
    tx.from_server(&[auth_ok(), ready(b'I')].concat());
    tx.from_client(&query("SELECT 1/0"));
    tx.from_server(&[fatal.clone(), ready(b'I')].concat());
    assert!(!tx.lost_with_error);
    assert!(!tx.client_terminated);
    tx.from_client(&msg(b'X', b""));
    assert!(
        tx.client_terminated,
        "a Terminate: the session ends by the client's will"
    );
    // So is one answering a cycle with no Sync yet (a Flush).
    tx.from_client(&[msg(b'P', b"\0SELECT 1/0\0\0\0"), msg(b'H', b"")].concat());
    tx.from_server(&fatal);
    assert!(!tx.lost_with_error);
}

#[test]
fn an_unasked_error_after_an_answer_in_the_same_read_is_found_where_it_begins() {
    let fatal = msg(b'E', b"SFATAL\0C57P01\0Mterminating connection\0\0");
    let mut tx = TxState::new(Start::Startup, &[]);
    tx.from_server(&[auth_ok(), ready(b'I')].concat());
    tx.watch_for_moves(true);
    tx.from_client(&query("SELECT 1"));
    // The answer, then the backend's FATAL as its postmaster dies, in one read: the answer
    // is the client's, the error is held from its first byte.
    let answer = result_then(b'I');
    tx.from_server(&[answer.clone(), fatal.clone()].concat());
    assert!(tx.lost_with_error);
    assert_eq!(tx.lost_from, Some(answer.len()));
    assert!(tx.provable().is_some(), "the answer came: idle and clean");
    // An unasked error whose first bytes went on in an earlier read: the client saw part of
    // it, the session cannot move.
    let mut tx = TxState::new(Start::Startup, &[]);
    tx.from_server(&[auth_ok(), ready(b'I')].concat());
    tx.watch_for_moves(true);
    tx.from_server(&fatal[..3]);
    tx.from_server(&fatal[3..]);
    assert!(!tx.lost_with_error && tx.lost_from.is_none());
    assert!(tx.provable().is_none());
}
