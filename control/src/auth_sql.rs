//! The lookup function through which stolon-proxy's `--auth-user` reads a role's stored
//! password (the way PgBouncer's `auth_query` does), created by the keeper on the master
//! (`--pg-auth-username`) and shown in the README for those who create it by hand.
//!
//! It answers only for roles that can log in and are not superusers: a superuser's md5 hash
//! would be a login of its own, so superusers are authenticated by the server (pass-through).
//! A role it does not answer for gets one row of NULLs.

/// The statements, run as a superuser in the database the proxy's lookups log into
/// (`--auth-dbname`, default postgres), for the auth role `auth_user` (quoted here).
pub fn lookup_function_sql(auth_user: &str) -> String {
    let role = format!("\"{}\"", auth_user.replace('"', "\"\""));
    format!(
        "CREATE SCHEMA IF NOT EXISTS stolon_auth;
REVOKE ALL ON SCHEMA stolon_auth FROM PUBLIC;
CREATE OR REPLACE FUNCTION stolon_auth.lookup(i_username text, OUT password text, OUT expired boolean)
RETURNS record LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
  SELECT rolpassword::text, coalesce(rolvaliduntil < now(), false)
  FROM pg_catalog.pg_authid
  WHERE rolname = i_username AND rolcanlogin AND NOT rolsuper
$fn$;
REVOKE ALL ON FUNCTION stolon_auth.lookup(text) FROM PUBLIC;
GRANT USAGE ON SCHEMA stolon_auth TO {role};
GRANT EXECUTE ON FUNCTION stolon_auth.lookup(text) TO {role};"
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_role_is_quoted() {
        let sql = super::lookup_function_sql("a\"b");
        assert!(sql.contains("TO \"a\"\"b\";"), "{sql}");
    }
}

#[cfg(test)]
mod readme {
    /// The README's SQL for those who create the function by hand is this module's.
    #[test]
    fn the_readme_shows_this_sql() {
        let readme = include_str!("../../README.md");
        let sql = super::lookup_function_sql("proxyauth");
        assert!(
            readme.contains(&sql),
            "README.md \"TLS and authentication\" differs from lookup_function_sql"
        );
    }
}
