//! The keeper's state session against a real PostgreSQL: kept between rounds, replaced
//! when it breaks or grows old, and never the cause of a round reported as not answering.

use keeper::sql::{observe, Conn, StateSession};
use std::time::Duration;
use testkit::postgres::Postgres;

const LIMIT: Duration = Duration::from_secs(10);
const LONG: Duration = Duration::from_secs(3600);

fn conn(pg: &Postgres) -> Conn {
    Conn {
        socket_dir: pg.socket_dir().display().to_string(),
        port: pg.port(),
        user: "postgres".into(),
        password: None,
    }
}

async fn pid(s: &StateSession) -> i32 {
    s.backend_pid().await.expect("backend pid")
}

#[tokio::test]
async fn the_state_session_is_kept_and_replaced_when_broken_or_old() {
    let pg = Postgres::start(&[]).expect("postgres");
    let c = conn(&pg);
    let data = pg.data_dir();

    let (st, s, reused) = observe(None, &c, &data, LIMIT, LONG).await.expect("first");
    assert!(!reused);
    assert!(!st.in_recovery);
    assert_eq!(st.timeline, 1);
    assert!(st.xlog_pos > 0, "{st:?}");
    assert!(!st.system_id.is_empty());
    assert_eq!(st.older_wal_file.len(), 24, "{st:?}");
    assert!(st.sync_standbys.is_empty());
    let first = pid(&s).await;

    // Kept: the same backend answers the next round.
    let (_, s, reused) = observe(Some(s), &c, &data, LIMIT, LONG)
        .await
        .expect("second");
    assert!(reused);
    assert_eq!(pid(&s).await, first);

    // Its backend terminated: the round still answers, on a new session.
    pg.psql(&format!("SELECT pg_terminate_backend({first})"))
        .expect("terminate");
    let (st, s, reused) = observe(Some(s), &c, &data, LIMIT, LONG)
        .await
        .expect("a broken session is replaced within the round");
    assert!(!reused);
    assert!(st.xlog_pos > 0);
    let second = pid(&s).await;
    assert_ne!(second, first);

    // Too old: replaced even though it still works.
    let (_, s, reused) = observe(Some(s), &c, &data, LIMIT, Duration::ZERO)
        .await
        .expect("old");
    assert!(!reused);
    assert_ne!(pid(&s).await, second);
}

#[tokio::test]
async fn a_state_session_sees_a_new_wal_position_and_no_answer_once_stopped() {
    let mut pg = Postgres::start(&[]).expect("postgres");
    let c = conn(&pg);
    let data = pg.data_dir();
    let (before, s, _) = observe(None, &c, &data, LIMIT, LONG).await.expect("first");
    // Committed with a flush: the test PostgreSQL runs synchronous_commit=off, where the
    // write position (what the round reads) moves only when the WAL writer next runs.
    pg.psql("SET synchronous_commit = on; CREATE TABLE t AS SELECT generate_series(1, 1000) AS i")
        .expect("write");
    let (after, s, reused) = observe(Some(s), &c, &data, LIMIT, LONG)
        .await
        .expect("kept");
    assert!(reused);
    assert!(after.xlog_pos > before.xlog_pos, "{before:?} {after:?}");

    pg.stop();
    assert!(
        observe(Some(s), &c, &data, LIMIT, LONG).await.is_none(),
        "a stopped PostgreSQL does not answer through a kept session"
    );
}

/// Why a session is replaced when old: a frozen postmaster (SIGSTOP) still lets an open
/// session answer, but accepts no new one, so it is seen as not answering once the kept
/// session is due for replacement.
#[tokio::test]
async fn a_frozen_postmaster_is_not_answering_once_the_session_is_due() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let pg = Postgres::start(&[]).expect("postgres");
    let c = conn(&pg);
    let data = pg.data_dir();
    let pid: i32 = std::fs::read_to_string(data.join("postmaster.pid"))
        .expect("postmaster.pid")
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("pid");
    let (_, s, _) = observe(None, &c, &data, LIMIT, LONG).await.expect("first");
    kill(Pid::from_raw(pid), Signal::SIGSTOP).expect("freeze");
    let kept = observe(Some(s), &c, &data, LIMIT, LONG).await;
    let (_, s, reused) = kept.expect("the open session still answers");
    assert!(reused);
    let due = observe(Some(s), &c, &data, LIMIT, Duration::ZERO).await;
    kill(Pid::from_raw(pid), Signal::SIGCONT).expect("thaw");
    assert!(
        due.is_none(),
        "a new session to a frozen postmaster does not answer"
    );
}
