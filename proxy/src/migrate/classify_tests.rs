use super::*;

#[test]
fn statements_that_cannot_change_session_state_are_clean() {
    let clean_ones = [
        "SELECT 1",
        "select abalance from pgbench_accounts where aid = $1",
        "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;",
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)",
        "INSERT INTO app.items (a, b) VALUES (1, 2) ON CONFLICT (a) DO UPDATE SET b = excluded.b RETURNING (a)",
        "BEGIN; SELECT count(*), max(x), now() FROM t WHERE y IN (1, 2) AND EXISTS (SELECT 1); COMMIT",
        "WITH t AS (SELECT 1 AS x) SELECT pg_catalog.lower(x::text) FROM t",
        "SELECT CAST(x AS varchar(10)), numeric(3,1) 'x' FROM generate_series(1, 3) AS g (x)",
        "SELECT 'SET x = 1; LISTEN y; set_config(' AS s -- DISCARD ALL; set_config(\n",
        "SELECT $$ SET a.b = 1 $$, $tag$ pg_advisory_lock(1) $tag$, E'it\\'s set_config(', \"temp col\"",
        "/* nested /* SET x */ set_config( */ SELECT 1",
        "START TRANSACTION ISOLATION LEVEL SERIALIZABLE; SAVEPOINT a; RELEASE a; ROLLBACK; END; ABORT",
        "SHOW statement_timeout",
        "SELECT nextval('s'), currval('s'), 1.5, t.x FROM t",
        "",
        ";;",
        "SELECT COUNT(*), Now(), LOWER(\"Name\") FROM T WHERE X IN (1)",
    ];
    for sql in clean_ones {
        assert!(clean(sql.as_bytes()), "clean: {sql}");
    }
}

/// Every statement kind the rule must refuse to trust: what changes session state, what
/// could, and what the lexer cannot read to its end.
#[test]
fn statements_that_can_change_session_state_are_dirty() {
    let dirty = [
        "SET statement_timeout = 5",
        "set local x = 1",
        "RESET ALL",
        "DISCARD ALL",
        "PREPARE p AS SELECT 1",
        "DEALLOCATE p",
        "LISTEN chan",
        "UNLISTEN *",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "CLOSE c",
        "FETCH c",
        "LOAD 'auto_explain'",
        "SET SESSION AUTHORIZATION bob",
        "SET ROLE bob",
        "CREATE TEMP TABLE t (x int)",
        "CREATE TABLE t (x int)",
        "DROP TABLE t",
        "ALTER TABLE t ADD y int",
        "DO $$ BEGIN PERFORM set_config('a', 'b', false); END $$",
        "CALL p()",
        "COPY t FROM STDIN",
        "LOCK TABLE t",
        "VACUUM t",
        "SELECT 1 INTO TEMP t",
        "SELECT * FROM pg_temp.t",
        "SELECT set_config('search_path', 'x', false)",
        "SELECT pg_catalog.set_config('a.b', 'c', false)",
        "SELECT pg_advisory_lock(1)",
        "SELECT pg_try_advisory_lock(1)",
        "SELECT pg_advisory_xact_lock(1)",
        "SELECT my_function(1)",
        "SELECT app.my_function(1)",
        "SELECT \"MyFunction\"(1)",
        "SELECT 1; SET x = 1",
        "SELECT 1; (SELECT 1)",
        "SELECT * FROM f() AS x",
        "SELECT 'unterminated",
        "SELECT 1 /* open comment",
        "SELECT $$ open dollar quote",
        "SELECT \"open identifier",
        "SELECT SET_CONFIG('a', 'b', false)",
        "SELECT a_function_name_longer_than_any_listed(1)",
    ];
    for sql in dirty {
        assert!(!clean(sql.as_bytes()), "dirty: {sql}");
    }
    assert!(!clean(b"SELECT \xff"), "not UTF-8");
}

#[test]
fn dollar_signs_that_are_not_quotes() {
    assert_eq!(dollar_tag(b"$1", 0), None);
    assert_eq!(dollar_tag(b"$$x$$", 0), Some("$$"));
    assert_eq!(dollar_tag(b"$a_1$x$a_1$", 0), Some("$a_1$"));
    assert_eq!(dollar_tag(b"$a", 0), None);
    assert!(clean(b"SELECT $1 + $2"));
}
