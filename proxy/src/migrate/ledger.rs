//! What the proxy can prove of a session's state without asking its server, so that the
//! session can move after an unplanned failover (issue 20, point 2). The rule:
//!
//! - the proxy knows a state exactly when a server showed it: at the session's start
//!   (nothing but the startup parameters and the role's own defaults, which any new session
//!   of the role gets too), or by an inspection (`state::INSPECT`) of an idle session;
//! - it keeps trusting that state while every message the client sends since is one that
//!   cannot change it: Bind, Execute, Describe, Sync, Flush, the close of a portal, an
//!   unnamed Parse and a simple Query whose texts are clean (`classify`);
//! - anything else (a named Parse, the close of a statement, a FunctionCall, a text that is
//!   not clean, a message the proxy does not know or cannot read whole) makes the session
//!   dirty; the relay then inspects it again at its next idle moment (one round trip), and
//!   the new answer is the state it trusts;
//! - the session moves after a failover only if it was idle when its server went away (the
//!   last answer ReadyForQuery 'I', nothing asked since, nothing but notices after it) and
//!   clean: it gets exactly the state it had. Anything else is closed as before.
//!
//! Only the client's Query, Parse and Close bodies are read (up to `MAX_BODY`); the other
//! messages are skipped by their length, so a client that only binds and executes prepared
//! statements pays for headers alone.

use super::classify;
use super::state::SessionState;

/// The longest Query or Parse the ledger reads; a longer one makes the session dirty.
const MAX_BODY: usize = 64 << 10;

#[derive(Clone, Debug, Default)]
pub struct Ledger {
    /// The state a server last showed (`None`: not known, e.g. an inspection failed).
    known: Option<SessionState>,
    dirty: bool,
    /// The current message: its header so far, its kind and the body bytes still to come.
    header: Vec<u8>,
    kind: u8,
    left: usize,
    /// Its body, when it is one the ledger reads.
    body: Option<Vec<u8>>,
}

impl Ledger {
    /// A session just started: nothing but its start is set on it.
    pub fn started() -> Ledger {
        Ledger {
            known: Some(SessionState::default()),
            ..Ledger::default()
        }
    }

    /// The server showed `state` (an inspection of the idle session): trusted from now on.
    pub fn shown(&mut self, state: Option<SessionState>) {
        self.known = state;
        self.dirty = false;
    }

    /// Whether the relay should inspect the session at its next idle moment.
    pub fn wants_inspection(&self) -> bool {
        self.dirty && self.known.is_some()
    }

    /// The state the session has for sure, if the proxy can prove it.
    pub fn proven(&self) -> Option<&SessionState> {
        (!self.dirty && self.left == 0 && self.header.is_empty())
            .then_some(self.known.as_ref())
            .flatten()
    }

    /// Bytes the client sent, as they are forwarded.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.left == 0 && self.body.is_none() {
                let take = (5 - self.header.len()).min(bytes.len());
                self.header.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if self.header.len() < 5 {
                    return;
                }
                self.start_message();
                continue;
            }
            let take = self.left.min(bytes.len());
            if let Some(body) = &mut self.body {
                body.extend_from_slice(&bytes[..take]);
            }
            self.left -= take;
            bytes = &bytes[take..];
            if self.left == 0 {
                self.end_message();
            }
        }
    }

    fn start_message(&mut self) {
        let h = std::mem::take(&mut self.header);
        self.kind = h[0];
        let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
        self.left = len.saturating_sub(4);
        match self.kind {
            b'Q' | b'P' | b'C' if self.left <= MAX_BODY => {
                self.body = Some(Vec::with_capacity(self.left));
            }
            // Bind, Execute, Describe, Sync, Flush, Terminate, COPY data/done/fail.
            b'B' | b'E' | b'D' | b'S' | b'H' | b'X' | b'd' | b'c' | b'f' => {}
            _ => self.dirty = true,
        }
        if self.left == 0 {
            self.end_message();
        }
    }

    fn end_message(&mut self) {
        let Some(body) = self.body.take() else {
            return;
        };
        let clean = match self.kind {
            b'Q' => classify::clean(cstr(&body).unwrap_or(b"\xff")),
            b'P' => parse_is_clean(&body),
            // Closing a portal changes nothing that outlives the transaction; a statement's
            // name is state.
            b'C' => body.first() == Some(&b'P'),
            _ => false,
        };
        self.dirty |= !clean;
    }
}

/// An unnamed Parse of a clean text.
fn parse_is_clean(body: &[u8]) -> bool {
    let Some(name) = cstr(body) else { return false };
    let Some(query) = cstr(&body[name.len() + 1..]) else {
        return false;
    };
    name.is_empty() && classify::clean(query)
}

/// The NUL-terminated string at the start of `b`, without its NUL.
fn cstr(b: &[u8]) -> Option<&[u8]> {
    b.iter().position(|&x| x == 0).map(|n| &b[..n])
}

#[cfg(test)]
#[path = "ledger_tests.rs"]
mod tests;
