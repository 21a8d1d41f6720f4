//! The catalog check a move after a failover makes on the new master (issue 20, point 2),
//! against a real PostgreSQL: a database whose triggers, defaults, views or policies call
//! only built-ins without session state passes; one where any of them calls a user function
//! or a built-in with session state does not (a statement the proxy found clean may have
//! run it).

use testkit::postgres::Postgres;

fn check(pg: &Postgres) -> String {
    pg.psql(&proxy::migrate::catalog_check())
        .expect("the check runs")
        .trim()
        .to_string()
}

#[test]
fn implicit_calls_of_user_functions_and_session_state_built_ins_are_found() {
    let pg = Postgres::start(&[]).expect("postgres");
    assert_eq!(check(&pg), "f", "a fresh database");
    pg.psql(
        "CREATE TABLE t (id serial PRIMARY KEY, at timestamptz DEFAULT now(), v text CHECK (length(v) < 10)); \
         CREATE VIEW v AS SELECT id, lower(v) FROM t",
    )
    .expect("pure defaults, checks and views");
    assert_eq!(
        check(&pg),
        "f",
        "serial, now(), length(), lower() hold no session state"
    );
    let implicit = [
        (
            "a trigger",
            "CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$; \
             CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()",
            "DROP TRIGGER tr ON t; DROP FUNCTION f()",
        ),
        (
            "a view calling set_config",
            "CREATE VIEW w AS SELECT set_config('a.b', 'c', false)",
            "DROP VIEW w",
        ),
        (
            "a default calling a user function",
            "CREATE FUNCTION g() RETURNS text LANGUAGE sql AS 'SELECT 1::text'; \
             ALTER TABLE t ADD w text DEFAULT g()",
            "ALTER TABLE t DROP w; DROP FUNCTION g()",
        ),
        (
            "a policy calling an advisory lock",
            "ALTER TABLE t ENABLE ROW LEVEL SECURITY; \
             CREATE POLICY p ON t USING (pg_try_advisory_lock(id))",
            "DROP POLICY p ON t",
        ),
    ];
    for (what, create, drop) in implicit {
        pg.psql(create).expect(what);
        assert_eq!(check(&pg), "t", "{what}");
        pg.psql(drop).expect(what);
        assert_eq!(check(&pg), "f", "{what} dropped");
    }
}
