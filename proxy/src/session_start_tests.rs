//! The session start's message reading: keys minted, parameters kept, a server going away
//! held back.

use super::*;

fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![kind];
    v.extend(((body.len() + 4) as u32).to_be_bytes());
    v.extend(body);
    v
}

/// A start as PostgreSQL sends it after a password exchange, and a query's answer
/// right behind it (a client that pipelined its first query).
fn start(key: &[u8]) -> Vec<u8> {
    let mut v = msg(b'R', &[0, 0, 0, 0]);
    v.extend(msg(b'S', b"server_version\x0015\x00"));
    v.extend(msg(b'K', key));
    v.extend(msg(b'Z', b"I"));
    v.extend(msg(b'C', b"SELECT 1\x00"));
    v
}

#[test]
fn the_key_is_replaced_in_any_split_of_the_stream_and_the_rest_passes_as_it_is() {
    let key = [0, 0, 0x30, 0x39, 1, 2, 3, 4];
    let minted = [0xa0, 0, 0, 1, 9, 9, 9, 9];
    let stream = start(&key);
    let mut want = msg(b'R', &[0, 0, 0, 0]);
    want.extend(msg(b'S', b"server_version\x0015\x00"));
    want.extend(msg(b'K', &minted));
    want.extend(msg(b'Z', b"I"));
    want.extend(msg(b'C', b"SELECT 1\x00"));
    for cut in 0..=stream.len() {
        let mut m = ServerMessages::default();
        let mut out = Vec::new();
        let mut seen = Vec::new();
        let mut steps = Vec::new();
        for (i, part) in [&stream[..cut], &stream[cut..]].into_iter().enumerate() {
            m.buf.extend_from_slice(part);
            steps.push(m.drain(&mut out, |real| {
                seen.push(real.to_vec());
                minted.to_vec()
            }));
            if steps.last() == Some(&Step::Done) {
                if i == 0 {
                    // The relay has the rest, as it is.
                    out.extend_from_slice(&stream[cut..]);
                }
                break;
            }
        }
        assert_eq!(out, want, "cut {cut}");
        assert_eq!(seen, vec![key.to_vec()], "cut {cut}");
    }
}

#[test]
fn the_parameters_the_server_reports_are_kept() {
    let mut m = ServerMessages::default();
    let mut out = Vec::new();
    m.buf = start(&[0, 0, 0, 1, 2, 2, 2, 2]);
    assert_eq!(m.drain(&mut out, |k| k.to_vec()), Step::Done);
    assert_eq!(
        m.reported,
        vec![("server_version".to_string(), "15".to_string())]
    );
}

#[test]
fn a_server_going_away_is_held_back_when_the_session_can_start_elsewhere() {
    let going = msg(
        b'E',
        b"SFATAL\0C57P01\0Mterminating connection due to unexpected postmaster exit\0\0",
    );
    let refused = msg(b'E', b"SFATAL\0C28P01\0Mpassword authentication failed\0\0");
    let mut stream = msg(b'R', &[0, 0, 0, 0]);
    stream.extend(msg(b'S', b"server_version\x0015\x00"));
    let before = stream.clone();
    stream.extend(&going);
    for cut in 0..=stream.len() {
        let mut m = ServerMessages {
            hold_loss: true,
            ..Default::default()
        };
        let mut out = Vec::new();
        let mut last = Step::More;
        for part in [&stream[..cut], &stream[cut..]] {
            m.buf.extend_from_slice(part);
            last = m.drain(&mut out, |_| unreachable!());
            if last != Step::More {
                break;
            }
        }
        assert_eq!(last, Step::Lost, "cut {cut}");
        assert_eq!(
            out, before,
            "cut {cut}: what came before passes, the error does not"
        );
        assert_eq!(m.lost.as_deref(), Some(&going[..]), "cut {cut}");
    }
    // Other errors are the client's; without hold_loss every error is.
    for (hold_loss, e) in [(true, &refused), (false, &going)] {
        let mut m = ServerMessages {
            hold_loss,
            ..Default::default()
        };
        let mut out = Vec::new();
        m.buf.extend_from_slice(e);
        assert_eq!(m.drain(&mut out, |_| unreachable!()), Step::More);
        assert_eq!(&out, e);
        assert!(m.lost.is_none());
    }
}

#[test]
fn an_error_before_ready_for_query_passes_and_nonsense_ends_the_reading() {
    let mut m = ServerMessages::default();
    let mut out = Vec::new();
    let err = msg(b'E', b"SFATAL\0C28P01\0Mpassword authentication failed\0\0");
    m.buf.extend_from_slice(&err);
    assert_eq!(m.drain(&mut out, |_| unreachable!()), Step::More);
    assert_eq!(out, err);
    // A length no start message has: the rest goes as it is.
    let mut m = ServerMessages::default();
    let mut out = Vec::new();
    let junk = [b'X', 0xff, 0xff, 0xff, 0xff, 1, 2, 3];
    m.buf.extend_from_slice(&junk);
    assert_eq!(m.drain(&mut out, |_| unreachable!()), Step::Done);
    assert_eq!(out, junk);
    // A key too short to be one is passed unchanged.
    let mut m = ServerMessages::default();
    let mut out = Vec::new();
    let short = msg(b'K', &[1, 2, 3]);
    m.buf.extend_from_slice(&short);
    assert_eq!(m.drain(&mut out, |_| unreachable!()), Step::More);
    assert_eq!(out, short);
}

/// The start relayed until the server closes: held as lost (the session may start
/// elsewhere) unless the client sent something meanwhile, which went to the lost server.
#[tokio::test]
async fn a_lost_start_is_held_only_while_the_client_sent_nothing() {
    use tokio::io::AsyncWriteExt;
    for client_sends in [false, true] {
        let (mut client, mut client_far) = tokio::io::duplex(4096);
        let (mut server, mut server_far) = tokio::io::duplex(4096);
        let mut tx = TxState::new(crate::txstate::Start::Startup, &[]);
        let keys = Arc::new(Keys::new(1));
        let addr: Arc<str> = Arc::from("127.0.0.1:1");
        let metrics = Metrics::default();
        let token = CancellationToken::new();
        let far = async {
            if client_sends {
                client_far
                    .write_all(&msg(b'Q', b"SELECT 1\0"))
                    .await
                    .expect("query");
                let mut got = vec![0u8; 5];
                server_far.read_exact(&mut got).await.expect("relayed");
            }
            server_far
                .write_all(&msg(b'S', b"a\0b\0"))
                .await
                .expect("param");
            drop(server_far);
            client_far
        };
        let start = run(
            &mut client,
            &mut server,
            msg(b'R', &[0, 0, 0, 0]),
            &mut tx,
            &token,
            (&keys, &addr),
            true,
            &metrics,
        );
        let (end, _client_far) = tokio::join!(start, far);
        match (client_sends, end) {
            (false, Ok(e)) => {
                assert_eq!(e.lost, Some(Vec::new()), "lost, with no server error");
                assert!(e.told_ok);
                assert_eq!(e.reported, vec![("a".into(), "b".into())]);
            }
            (true, Err(End::ServerClosed)) => {}
            (sent, other) => panic!("client sent {sent}: {:?}", other.map(|e| e.lost)),
        }
    }
}
