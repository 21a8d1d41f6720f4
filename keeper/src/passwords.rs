//! The superuser's and the replication user's passwords as Go stolon's keeper takes them:
//! trailing CR/LF removed (with its warning; a password that is empty after it is refused),
//! and one user for both roles only with one auth method and one password. The messages are
//! Go's own, word for word: operators' log alerts match them.

use crate::config::AuthMethod;

/// One of the two roles the keeper manages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Superuser,
    Replication,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Superuser => "superuser",
            Role::Replication => "replication user",
        }
    }
}

/// A password, and the warning to log about it.
pub type Trimmed = (String, Option<String>);

/// A password with its trailing CR/LF removed (all of them, as Go's `TrimRight(p, "\r\n")`)
/// and the warning to log when there were some.
pub fn trim(role: Role, raw: &str) -> Result<Trimmed, String> {
    let trimmed = raw.trim_end_matches(['\r', '\n']);
    if trimmed.len() == raw.len() {
        return Ok((raw.to_string(), None));
    }
    if trimmed.is_empty() {
        return Err(format!(
            "{} password is empty after removing trailing new line",
            role.name()
        ));
    }
    let warning = format!(
        "{} password contain trailing new line, removing",
        role.name()
    );
    Ok((trimmed.to_string(), Some(warning)))
}

/// A user and how it authenticates.
#[derive(Clone, Copy, Debug)]
pub struct Login<'a> {
    pub user: &'a str,
    pub method: AuthMethod,
    pub password: Option<&'a str>,
}

/// Go's check of one user for both roles: a warning when they share a name, an error when
/// they then differ in auth method or password.
pub fn check_same_user(su: Login<'_>, repl: Login<'_>) -> Result<Option<&'static str>, String> {
    if su.user != repl.user {
        return Ok(None);
    }
    if su.method != repl.method {
        return Err(
            "do not support different auth methods when utilizing superuser for replication."
                .into(),
        );
    }
    let trust = su.method == AuthMethod::Trust;
    if !trust && su.password != repl.password {
        return Err(
            "provided superuser name and replication user name are the same but \
                    provided passwords are different"
                .into(),
        );
    }
    Ok(Some(
        "superuser name and replication user name are the same. Different users are suggested.",
    ))
}

/// Go's warning for a password file readable by others than its owner (it goes on).
pub fn too_open(mode: u32) -> bool {
    mode & 0o777 > 0o600
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_cr_lf_is_removed_with_gos_warning_and_an_empty_result_refused() {
        let warn = |r: &str| Some(format!("{r} password contain trailing new line, removing"));
        #[rustfmt::skip]
        let cases: Vec<(Role, &str, Result<Trimmed, String>)> = vec![
            (Role::Superuser, "s3cret", Ok(("s3cret".into(), None))),
            (Role::Superuser, "s3cret\n", Ok(("s3cret".into(), warn("superuser")))),
            (Role::Replication, "s3cret\r\n", Ok(("s3cret".into(), warn("replication user")))),
            (Role::Replication, "s3cret\n\n\r", Ok(("s3cret".into(), warn("replication user")))),
            (Role::Superuser, "two\nlines", Ok(("two\nlines".into(), None))),
            (Role::Superuser, " spaced ", Ok((" spaced ".into(), None))),
            (Role::Superuser, "\n",
                Err("superuser password is empty after removing trailing new line".into())),
            (Role::Replication, "\r\n",
                Err("replication user password is empty after removing trailing new line"
                    .into())),
        ];
        for (role, raw, want) in cases {
            assert_eq!(trim(role, raw), want, "{raw:?}");
        }
    }

    #[test]
    fn one_user_for_both_roles_needs_one_method_and_one_password() {
        let login = |user, method, password| Login {
            user,
            method,
            password,
        };
        let (md5, trust) = (AuthMethod::Md5, AuthMethod::Trust);
        let same = Ok(Some(
            "superuser name and replication user name are the same. Different users are suggested.",
        ));
        #[rustfmt::skip]
        let cases = vec![
            ("different users", login("su", md5, Some("a")), login("repl", md5, Some("b")),
                Ok(None)),
            ("same user, same password", login("u", md5, Some("a")), login("u", md5, Some("a")),
                same.clone()),
            ("same user, trust", login("u", trust, None), login("u", trust, None), same),
            ("same user, two passwords", login("u", md5, Some("a")), login("u", md5, Some("b")),
                Err("provided superuser name and replication user name are the same but \
                     provided passwords are different".to_string())),
            ("same user, two methods", login("u", md5, Some("a")), login("u", trust, None),
                Err("do not support different auth methods when utilizing superuser for \
                     replication.".to_string())),
        ];
        for (name, su, repl, want) in cases {
            assert_eq!(check_same_user(su, repl), want, "{name}");
        }
    }

    #[test]
    fn a_file_readable_by_others_is_too_open() {
        for (mode, open) in [(0o600, false), (0o400, false), (0o640, true), (0o644, true)] {
            assert_eq!(too_open(mode), open, "{mode:o}");
        }
    }
}
