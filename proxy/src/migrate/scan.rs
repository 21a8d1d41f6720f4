//! Custom (dotted) settings are never listed by `pg_settings` (PostgreSQL hides placeholder
//! variables from it), so the old server cannot tell the proxy that a session set one, and
//! a move would lose it silently: an application's `SET app.tenant = ...` for row-level
//! security, gone without an error. The proxy therefore watches what the client sends for
//! a SET of a dotted name and for set_config; a session that did either is never moved.
//!
//! The rule errs on the side of not moving: a whole-word `set` followed, before the value
//! starts (`=`, `TO`, a quote) or the statement ends (`;`, the end of the query string),
//! by a dot; or `set_config` anywhere. Bytes are matched as they come, in any message (a
//! parameter value that looks like one also counts), across the reads' boundaries. What a
//! function does inside the server is not seen: see the README.

/// Bytes kept from one read for a match that straddles the next one.
const CARRY: usize = 256;
/// How far after `set` the dot may come.
const WINDOW: usize = 200;

/// The scan over one session's client bytes.
#[derive(Clone, Debug)]
pub struct CustomScan {
    carry: [u8; CARRY],
    carry_len: usize,
    found: bool,
}

impl Default for CustomScan {
    fn default() -> Self {
        CustomScan {
            carry: [0; CARRY],
            carry_len: 0,
            found: false,
        }
    }
}

impl CustomScan {
    pub fn found(&self) -> bool {
        self.found
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        if self.found || bytes.is_empty() {
            return;
        }
        if self.carry_len > 0 {
            let head = bytes.len().min(CARRY);
            let mut joint = [0u8; 2 * CARRY];
            joint[..self.carry_len].copy_from_slice(&self.carry[..self.carry_len]);
            joint[self.carry_len..self.carry_len + head].copy_from_slice(&bytes[..head]);
            if sets_custom(&joint[..self.carry_len + head]) {
                self.found = true;
                return;
            }
        }
        if sets_custom(bytes) {
            self.found = true;
            return;
        }
        // The last CARRY bytes seen, this read's after the previous ones'.
        if bytes.len() >= CARRY {
            self.carry.copy_from_slice(&bytes[bytes.len() - CARRY..]);
            self.carry_len = CARRY;
        } else {
            let keep = (CARRY - bytes.len()).min(self.carry_len);
            self.carry
                .copy_within(self.carry_len - keep..self.carry_len, 0);
            self.carry[keep..keep + bytes.len()].copy_from_slice(bytes);
            self.carry_len = keep + bytes.len();
        }
    }
}

fn ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// Whether `text` holds a SET of a dotted name or a set_config call (see the module).
pub fn sets_custom(text: &[u8]) -> bool {
    let mut at = 0;
    while let Some(i) = text[at..]
        .iter()
        .position(|&b| b == b's' || b == b'S')
        .map(|i| at + i)
    {
        at = i + 1;
        let word = |s: &str| {
            text.get(i..i + s.len())
                .is_some_and(|w| w.eq_ignore_ascii_case(s.as_bytes()))
        };
        if !word("set") || (i > 0 && ident(text[i - 1])) {
            continue;
        }
        if word("set_config") {
            return true;
        }
        if text.get(i + 3).is_some_and(|&b| ident(b)) {
            continue;
        }
        if dot_before_value(&text[i + 3..]) {
            return true;
        }
    }
    false
}

/// A dot in `rest` (what follows `set`) before the value or the statement's end.
fn dot_before_value(rest: &[u8]) -> bool {
    let end = rest.len().min(WINDOW);
    for (j, &b) in rest[..end].iter().enumerate() {
        match b {
            b'.' => return true,
            b'=' | b';' | 0 | b'\'' => return false,
            b't' | b'T'
                if j > 0
                    && !ident(rest[j - 1])
                    && rest
                        .get(j..j + 2)
                        .is_some_and(|w| w.eq_ignore_ascii_case(b"to"))
                    && !rest.get(j + 2).is_some_and(|&c| ident(c)) =>
            {
                return false
            }
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_of_dotted_names_and_set_config_are_seen() {
        for sql in [
            "SET app.tenant = 'x'",
            "set app.tenant to 'x'",
            "SET SESSION app.tenant = 1",
            "select 1; SET /* why */ app.tenant = 1",
            "SET \"app\".\"tenant\" = 1",
            "select set_config('app.tenant', $1, false)",
            "SELECT pg_catalog.SET_CONFIG('a.b', 'c', false)",
            "\tset\napp.x=1",
        ] {
            assert!(sets_custom(sql.as_bytes()), "{sql}");
        }
    }

    #[test]
    fn other_statements_are_not_taken_for_one() {
        for sql in [
            "SET statement_timeout = '1.5s'",
            "SET statement_timeout TO '1.5s'",
            "SET search_path = a.b",
            "UPDATE s.t SET x = a.b WHERE y = 1",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 5;",
            "RESET app.tenant",
            "select offset_x.y from t offset 1",
            "select * from sets.x",
            "",
        ] {
            assert!(!sets_custom(sql.as_bytes()), "{sql}");
        }
    }

    #[test]
    fn a_set_split_across_reads_is_seen_at_every_cut() {
        let mut stream = b"Q\0\0\0\x40select 1;".to_vec();
        stream.extend(b" SET app.tenant = 'acme'\0");
        for cut in 0..=stream.len() {
            for second in cut..=stream.len() {
                let mut s = CustomScan::default();
                s.feed(&stream[..cut]);
                s.feed(&stream[cut..second]);
                s.feed(&stream[second..]);
                assert!(s.found(), "cuts {cut} {second}");
            }
        }
        let mut s = CustomScan::default();
        for b in b"SELECT 1; SET statement_timeout = 5; select 2" {
            s.feed(&[*b]);
        }
        assert!(!s.found(), "one byte at a time, nothing to see");
        let mut s = CustomScan::default();
        for b in b"SET app.x = 1" {
            s.feed(&[*b]);
        }
        assert!(s.found(), "one byte at a time");
    }
}
