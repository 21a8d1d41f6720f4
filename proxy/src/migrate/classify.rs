//! Whether a statement text the client sent can have changed its session's state, for a
//! move after an unplanned failover (see `ledger`): the proxy cannot ask a dead server what
//! the session held, so it keeps the state the server last showed it (an inspection, as at
//! a switchover) and trusts it only while every statement since is one of these "clean"
//! ones. A statement is clean when each of its parts (split at `;`) starts with a keyword
//! that runs a query or ends a transaction, it names no temporary object, and every function
//! it calls is a built-in without session state. Anything else (SET, PREPARE, DECLARE,
//! LISTEN, DDL, DO, a call of any other function, a quoted or qualified name the proxy cannot
//! place) makes the session dirty: the proxy inspects it again at its next idle moment. Being
//! wrong towards dirty costs one round trip; the lexer knows comments, quoted strings
//! (standard, escape and dollar quoting) and quoted identifiers, so text inside them is never
//! taken for a keyword or a call. Calls the text does not show (triggers, defaults, views,
//! policies) are checked on the new master's catalog at the move (`migrate::catalog_check`).

/// Statement leads that run a query or end a transaction, and change no session state.
const CLEAN_LEADS: &[&str] = &[
    "select",
    "insert",
    "update",
    "delete",
    "merge",
    "with",
    "values",
    "table",
    "begin",
    "start",
    "commit",
    "end",
    "rollback",
    "abort",
    "savepoint",
    "release",
    "show",
];

/// Built-in functions with no session state (their result aside), and type names that take
/// a modifier in parentheses. `nextval` and friends are here: what they change (`currval`)
/// is lost by every move, as documented.
pub const PURE_FUNCTIONS: &[&str] = &[
    "abs",
    "age",
    "array_agg",
    "array_append",
    "array_cat",
    "array_length",
    "array_position",
    "array_remove",
    "array_to_string",
    "avg",
    "bit",
    "bool_and",
    "bool_or",
    "btrim",
    "cardinality",
    "ceil",
    "ceiling",
    "char",
    "char_length",
    "character",
    "clock_timestamp",
    "coalesce",
    "concat",
    "concat_ws",
    "count",
    "current_database",
    "current_schema",
    "current_setting",
    "currval",
    "date_part",
    "date_trunc",
    "decimal",
    "dense_rank",
    "every",
    "exp",
    "extract",
    "first_value",
    "floor",
    "format",
    "gen_random_uuid",
    "generate_series",
    "greatest",
    "inet_server_addr",
    "inet_server_port",
    "interval",
    "json_agg",
    "json_array_elements",
    "json_build_array",
    "json_build_object",
    "json_each",
    "json_extract_path",
    "json_object_agg",
    "jsonb_agg",
    "jsonb_array_elements",
    "jsonb_build_array",
    "jsonb_build_object",
    "jsonb_each",
    "jsonb_extract_path",
    "jsonb_object_agg",
    "jsonb_pretty",
    "jsonb_set",
    "lag",
    "last_value",
    "lastval",
    "lead",
    "least",
    "left",
    "length",
    "ln",
    "log",
    "lower",
    "lpad",
    "ltrim",
    "make_date",
    "make_interval",
    "make_timestamp",
    "max",
    "md5",
    "min",
    "mod",
    "nextval",
    "now",
    "ntile",
    "nullif",
    "numeric",
    "octet_length",
    "pg_backend_pid",
    "pg_current_xact_id",
    "pg_is_in_recovery",
    "pg_sleep",
    "position",
    "power",
    "random",
    "rank",
    "regexp_match",
    "regexp_matches",
    "regexp_replace",
    "repeat",
    "replace",
    "reverse",
    "right",
    "round",
    "row_number",
    "row_to_json",
    "rpad",
    "rtrim",
    "sign",
    "split_part",
    "sqrt",
    "starts_with",
    "statement_timestamp",
    "string_agg",
    "string_to_array",
    "strpos",
    "substr",
    "substring",
    "sum",
    "time",
    "timeofday",
    "timestamp",
    "timestamptz",
    "timetz",
    "to_char",
    "to_date",
    "to_json",
    "to_jsonb",
    "to_number",
    "to_timestamp",
    "transaction_timestamp",
    "trim",
    "trunc",
    "txid_current",
    "unnest",
    "upper",
    "varbit",
    "varchar",
    "version",
];

/// Built-ins whose effect outlives the transaction in the session: what the catalog check
/// looks for in stored expressions (`catalog_check`). A direct call of one in a statement is
/// not clean anyway (none is in `PURE_FUNCTIONS`).
pub const SESSION_STATE_FUNCTIONS: &[&str] = &[
    "set_config",
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_advisory_unlock",
    "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
    "setseed",
    "pg_create_logical_replication_slot",
    "pg_create_physical_replication_slot",
    "pg_backup_start",
    "pg_start_backup",
    "pg_backup_stop",
    "pg_stop_backup",
];

/// Keywords a parenthesis follows without a call (a list, a subquery, a clause).
const KEYWORDS_BEFORE_PAREN: &[&str] = &[
    "all",
    "and",
    "any",
    "array",
    "as",
    "between",
    "by",
    "case",
    "cast",
    "conflict",
    "distinct",
    "else",
    "except",
    "exists",
    "filter",
    "from",
    "group",
    "having",
    "in",
    "intersect",
    "is",
    "join",
    "lateral",
    "like",
    "ilike",
    "limit",
    "not",
    "offset",
    "on",
    "or",
    "over",
    "partition",
    "returning",
    "row",
    "select",
    "set",
    "some",
    "then",
    "union",
    "using",
    "values",
    "when",
    "where",
    "window",
];

/// Names that make a statement dirty wherever they appear (a temporary object).
const DIRTY_WORDS: &[&str] = &["temp", "temporary", "pg_temp"];

/// An unquoted name, lowercased in place (no allocation per word: the classifier runs on
/// every query of a tracked session). One longer than any name the lists hold reads as "".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Name {
    buf: [u8; NAME_MAX],
    len: usize,
}

const NAME_MAX: usize = 24;

impl Name {
    fn new(word: &[u8]) -> Name {
        let mut n = Name {
            buf: [0; NAME_MAX],
            len: 0,
        };
        if word.len() <= NAME_MAX {
            n.buf[..word.len()].copy_from_slice(word);
            n.buf[..word.len()].make_ascii_lowercase();
            n.len = word.len();
        }
        n
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Token {
    /// An unquoted name, lowercased.
    Word(Name),
    /// A quoted identifier.
    Quoted,
    Open,
    Dot,
    Semicolon,
    /// Anything else: an operator, a literal, a parameter.
    Other,
}

/// Whether `sql` (one Query's or Parse's text) is clean. Text that is not UTF-8, or a
/// string or comment left open, is not.
pub fn clean(sql: &[u8]) -> bool {
    let Some(tokens) = lex(sql) else { return false };
    let mut lead = true;
    for (i, t) in tokens.iter().enumerate() {
        match t {
            Token::Semicolon => {
                lead = true;
                continue;
            }
            Token::Word(w) if lead && !CLEAN_LEADS.contains(&w.as_str()) => return false,
            Token::Word(w) if DIRTY_WORDS.contains(&w.as_str()) => return false,
            Token::Open if !lead && !not_a_call(&tokens[..i]) => return false,
            Token::Word(_) => {}
            // A statement that starts with anything but a keyword.
            _ if lead => return false,
            _ => {}
        }
        lead = false;
    }
    true
}

/// Whether the parenthesis after `before` opens something other than a call of a function
/// with session state: a clause, a list, a column list, or a call of a pure built-in.
fn not_a_call(before: &[Token]) -> bool {
    fn word(t: Option<&Token>) -> Option<&str> {
        match t {
            Some(Token::Word(w)) => Some(w.as_str()),
            _ => None,
        }
    }
    let n = before.len();
    let Some(name) = word(before.last()) else {
        // After an operator, a comma, another parenthesis: a grouping.
        return !matches!(before.last(), Some(Token::Quoted));
    };
    if KEYWORDS_BEFORE_PAREN.contains(&name) {
        return true;
    }
    // A qualified name: a table's column list after INTO, or a pg_catalog function.
    if n >= 2 && before[n - 2] == Token::Dot {
        return match word(n.checked_sub(3).and_then(|i| before.get(i))) {
            Some("pg_catalog") => PURE_FUNCTIONS.contains(&name),
            Some(_) => word(n.checked_sub(4).and_then(|i| before.get(i))) == Some("into"),
            None => false,
        };
    }
    // `INSERT INTO t (a, b)`, `... AS t (a, b)`: a column list.
    if matches!(
        word(n.checked_sub(2).and_then(|i| before.get(i))),
        Some("into" | "as")
    ) {
        return true;
    }
    PURE_FUNCTIONS.contains(&name)
}

/// The tokens of `sql`, or `None` for text the proxy cannot read to its end.
fn lex(sql: &[u8]) -> Option<Vec<Token>> {
    let sql = std::str::from_utf8(sql).ok()?;
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            _ if c.is_ascii_whitespace() => i += 1,
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i = b[i..]
                    .iter()
                    .position(|&x| x == b'\n')
                    .map_or(b.len(), |p| i + p);
            }
            b'/' if b.get(i + 1) == Some(&b'*') => i = block_comment(b, i)?,
            b'\'' => {
                // E'...' takes backslash escapes (the E was lexed as a word just before).
                let escapes = matches!(out.last(), Some(Token::Word(w)) if w.as_str() == "e")
                    && i > 0
                    && b[i - 1].eq_ignore_ascii_case(&b'e');
                if escapes {
                    out.pop();
                }
                i = quoted(b, i, b'\'', escapes)?;
                out.push(Token::Other);
            }
            b'"' => {
                i = quoted(b, i, b'"', false)?;
                out.push(Token::Quoted);
            }
            b'$' => match dollar_tag(b, i) {
                Some(tag) => {
                    let body = i + tag.len();
                    let end = sql[body..].find(tag)?;
                    i = body + end + tag.len();
                    out.push(Token::Other);
                }
                // A parameter ($1) or an operator.
                None => {
                    i += 1;
                    while i < b.len() && b[i].is_ascii_digit() {
                        i += 1;
                    }
                    out.push(Token::Other);
                }
            },
            b'(' => {
                out.push(Token::Open);
                i += 1;
            }
            b'.' if !b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                out.push(Token::Dot);
                i += 1;
            }
            b';' => {
                out.push(Token::Semicolon);
                i += 1;
            }
            _ if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let start = i;
                while i < b.len()
                    && (b[i].is_ascii_alphanumeric() || matches!(b[i], b'_' | b'$') || b[i] >= 0x80)
                {
                    i += 1;
                }
                out.push(Token::Word(Name::new(&b[start..i])));
            }
            _ => {
                out.push(Token::Other);
                i += 1;
            }
        }
    }
    Some(out)
}

/// The index after a (nested) block comment that starts at `i`.
fn block_comment(b: &[u8], mut i: usize) -> Option<usize> {
    let mut depth = 0usize;
    while i + 1 < b.len() {
        match (b[i], b[i + 1]) {
            (b'/', b'*') => {
                depth += 1;
                i += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// The index after a string or identifier quoted with `q` that starts at `i` (a doubled
/// quote is one; with `escapes`, a backslash escapes the next byte).
fn quoted(b: &[u8], mut i: usize, q: u8, escapes: bool) -> Option<usize> {
    i += 1;
    while i < b.len() {
        match b[i] {
            b'\\' if escapes => i += 2,
            x if x == q && b.get(i + 1) == Some(&q) => i += 2,
            x if x == q => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// The tag (`$$`, `$body$`) of a dollar quote that starts at `i`, if one does.
fn dollar_tag(b: &[u8], i: usize) -> Option<&str> {
    let rest = &b[i + 1..];
    let len = rest
        .iter()
        .position(|&x| !(x.is_ascii_alphanumeric() || x == b'_' || x >= 0x80))?;
    let tag_ok = rest.get(len) == Some(&b'$') && !rest.first().is_some_and(u8::is_ascii_digit);
    tag_ok.then(|| std::str::from_utf8(&b[i..i + len + 2]).ok())?
}

#[cfg(test)]
#[path = "classify_tests.rs"]
mod tests;
