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

/// A conversation as (from client?, bytes) steps, and whether the session is idle after.
type Step = (bool, Vec<u8>);

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

fn conversations() -> Vec<(&'static str, Start, Vec<Step>, bool)> {
    let mut after_auth = auth_ok();
    after_auth.extend(ready(b'I'));
    let mut ssl_n_then_auth = vec![b'N'];
    ssl_n_then_auth.extend(&after_auth);
    let mut pipelined = query("select 1");
    pipelined.extend(query("select 2"));
    vec![
        ("before authentication", Start::Startup, vec![], false),
        (
            "authenticated, idle",
            Start::Startup,
            vec![(false, after_auth.clone())],
            true,
        ),
        (
            "a query in flight",
            Start::Startup,
            vec![(false, after_auth.clone()), (true, query("select 1"))],
            false,
        ),
        (
            "a query answered",
            Start::Startup,
            vec![
                (false, after_auth.clone()),
                (true, query("select 1")),
                (false, result_then(b'I')),
            ],
            true,
        ),
        (
            "inside a transaction",
            Start::Startup,
            vec![
                (false, after_auth.clone()),
                (true, query("begin")),
                (false, result_then(b'T')),
            ],
            false,
        ),
        (
            "a failed transaction",
            Start::Startup,
            vec![
                (false, after_auth.clone()),
                (true, query("begin")),
                (false, result_then(b'E')),
            ],
            false,
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
            true,
        ),
        (
            "pipelined: one of two answered",
            Start::Startup,
            vec![
                (false, after_auth.clone()),
                (true, pipelined.clone()),
                (false, result_then(b'I')),
            ],
            false,
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
            true,
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
            true,
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
            false,
        ),
        (
            "half a query sent",
            Start::Startup,
            vec![
                (false, after_auth.clone()),
                (true, query("select 1")[..3].to_vec()),
            ],
            false,
        ),
        (
            "ssl declined, startup in the clear, idle",
            Start::SslRequest,
            vec![
                (false, vec![b'N']),
                (true, startup()),
                (false, after_auth.clone()),
            ],
            true,
        ),
        (
            "ssl declined, the answer and the rest in one read",
            Start::SslRequest,
            vec![(true, startup()), (false, ssl_n_then_auth)],
            true,
        ),
        (
            "ssl accepted: opaque",
            Start::SslRequest,
            vec![
                (false, vec![b'S']),
                (true, vec![0x16, 3, 1, 0, 5]),
                (false, after_auth.clone()),
            ],
            false,
        ),
        (
            "direct tls: opaque",
            Start::DirectTls,
            vec![(false, after_auth.clone())],
            false,
        ),
        (
            "a length no message has: opaque",
            Start::Startup,
            vec![(false, after_auth.clone()), (false, vec![b'Z', 0, 0, 0, 2])],
            false,
        ),
    ]
}

#[test]
fn idle_only_between_transactions_with_nothing_in_flight() {
    for (name, start, steps, idle) in conversations() {
        assert_eq!(run(start, &steps).idle(), idle, "{name}");
    }
}

proptest! {
    /// Reads split anywhere give the same answer: the relay sees whatever chunks TCP gives.
    #[test]
    fn any_split_of_the_reads_gives_the_same_answer(cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6)) {
        for (name, start, steps, idle) in conversations() {
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
            prop_assert_eq!(run(start, &split).idle(), idle, "{}", name);
        }
    }

    /// Any bytes at all never panic.
    #[test]
    fn arbitrary_bytes_never_panic(steps in prop::collection::vec((any::<bool>(), prop::collection::vec(any::<u8>(), 0..64)), 0..16)) {
        for start in [Start::Startup, Start::SslRequest, Start::DirectTls] {
            let _ = run(start, &steps).idle();
        }
    }
}
