//! What the proxy can prove of a session's state without asking its server, so that the
//! session can move after an unplanned failover (issue 20, point 2). The rule:
//!
//! - the proxy knows a state exactly when a server showed it: at the session's start
//!   (nothing but the startup parameters and the role's own defaults, which any new session
//!   of the role gets too), or by an inspection (`state::INSPECT`) of an idle session;
//! - it tracks what the protocol shows exactly: a named Parse the server completed
//!   (ParseComplete) adds a statement, a completed Close removes it, an error drops the rest
//!   of its cycle up to the Sync, as the server does;
//! - it keeps trusting the rest while every statement the session runs cannot change it: a
//!   simple Query, or the execution (Bind) of a prepared statement, whose text is clean
//!   (`classify`). Anything else (a text that is not clean, a Bind of a statement the proxy
//!   does not know, a FunctionCall, a message it does not know or cannot read whole, an
//!   answer it cannot match) makes the session dirty; the relay then inspects it again at
//!   its next idle moment (one round trip), and the new answer is the state it trusts;
//! - the session moves after a failover only if it was idle when its server went away (the
//!   last answer ReadyForQuery 'I', nothing asked since, nothing but notices after it or the
//!   backend's own FATAL, held back) and clean: it gets exactly the state it had. Anything
//!   else is closed as before.
//!
//! Only the client's Query, Parse, Close bodies and the names at the head of a Bind are read
//! (up to `MAX_BODY`); the other messages are skipped by their length.

use super::classify;
use super::state::{Prepared, SessionState};
use std::collections::{BTreeMap, VecDeque};

/// The longest Query or Parse the ledger reads; a longer one makes the session dirty.
const MAX_BODY: usize = 64 << 10;
/// The most the ledger keeps of statements waiting for their ParseComplete (a client
/// pipelining more stops being tracked: dirty until an inspection).
const MAX_PENDING_BYTES: usize = 1 << 20;
/// The largest buffer kept from one message to the next.
const SPARE_MAX: usize = 4096;
/// What the ledger reads of a Bind: its portal's and statement's names (at most 63 bytes
/// each in PostgreSQL).
const BIND_HEAD: usize = 256;

/// A named statement the session holds, and whether its text is clean.
#[derive(Clone, Debug)]
struct Statement {
    query: String,
    param_types: Vec<u32>,
    clean: bool,
}

/// What the proxy knows of the session.
#[derive(Clone, Debug, Default)]
struct Known {
    settings: Vec<(String, String)>,
    role: Option<String>,
    statements: BTreeMap<String, Statement>,
}

/// A client message whose answer changes what the ledger knows, waiting for it.
#[derive(Clone, Debug)]
enum Op {
    Parse(String, Statement),
    /// A Close: of the named statement, or (`None`) of a portal.
    Close(Option<String>),
    /// A Sync, a simple Query or a FunctionCall: answered by ReadyForQuery.
    Ready,
}

#[derive(Clone, Debug, Default)]
pub struct Ledger {
    /// `None`: not known (an inspection found the session unmovable, or failed).
    known: Option<Known>,
    dirty: bool,
    /// Whether the unnamed statement's text (if any) is clean.
    unnamed_clean: Option<bool>,
    pending: VecDeque<Op>,
    /// The bytes of the statements in `pending`.
    pending_bytes: usize,
    /// The current client message: its header so far, its kind, the body bytes still to
    /// come, and the head of its body the ledger reads.
    header: Vec<u8>,
    kind: u8,
    left: usize,
    body: Option<Vec<u8>>,
    keep: usize,
    /// The last body's buffer, for the next (see `start_message`).
    spare: Vec<u8>,
}

impl Ledger {
    /// A session just started: nothing but its start is set on it.
    pub fn started() -> Ledger {
        Ledger {
            known: Some(Known::default()),
            ..Ledger::default()
        }
    }

    /// The session's start is not answered yet: its ReadyForQuery is still to come.
    pub fn expect_ready(&mut self) {
        self.pending.push_back(Op::Ready);
    }

    /// The server showed `state` (an inspection of the idle session): trusted from now on.
    pub fn shown(&mut self, state: Option<SessionState>) {
        self.known = state.map(|s| Known {
            settings: s.settings,
            role: s.role,
            statements: (s.prepared.into_iter())
                .map(|p| {
                    let clean = classify::clean(p.query.as_bytes());
                    let st = Statement {
                        query: p.query,
                        param_types: p.param_types,
                        clean,
                    };
                    (p.name, st)
                })
                .collect(),
        });
        self.dirty = false;
        self.pending.clear();
        self.pending_bytes = 0;
    }

    /// Whether the relay should inspect the session at its next idle moment.
    pub fn wants_inspection(&self) -> bool {
        self.dirty && self.known.is_some()
    }

    /// The state the session has for sure, if the proxy can prove it.
    pub fn proven(&self) -> Option<SessionState> {
        let whole = self.left == 0 && self.header.is_empty() && self.pending.is_empty();
        let k = self.known.as_ref().filter(|_| !self.dirty && whole)?;
        Some(SessionState {
            settings: k.settings.clone(),
            role: k.role.clone(),
            prepared: (k.statements.iter())
                .map(|(name, s)| Prepared {
                    name: name.clone(),
                    query: s.query.clone(),
                    param_types: s.param_types.clone(),
                })
                .collect(),
        })
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
                let room = self.keep.saturating_sub(body.len()).min(take);
                body.extend_from_slice(&bytes[..room]);
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
        self.keep = match self.kind {
            b'Q' | b'P' | b'C' if self.left <= MAX_BODY => self.left,
            b'B' => self.left.min(BIND_HEAD),
            // Execute, Describe, Flush, Terminate, COPY data/done/fail: no state.
            b'E' | b'D' | b'H' | b'X' | b'd' | b'c' | b'f' => 0,
            b'S' | b'F' => {
                self.pending.push_back(Op::Ready);
                self.dirty |= self.kind == b'F';
                0
            }
            _ => {
                self.dirty = true;
                0
            }
        };
        if self.keep > 0 || matches!(self.kind, b'Q' | b'P' | b'C' | b'B') {
            // The buffer of the last message read, reused: no allocation per message.
            let mut body = std::mem::take(&mut self.spare);
            body.clear();
            body.reserve(self.keep);
            self.body = Some(body);
        }
        if self.left == 0 {
            self.end_message();
        }
    }

    fn end_message(&mut self) {
        let Some(body) = self.body.take() else {
            return;
        };
        let ok = match self.kind {
            b'Q' => {
                self.pending.push_back(Op::Ready);
                cstr(&body).is_some_and(classify::clean)
            }
            b'P' if body.len() == self.keep => self.parse(&body),
            b'C' if body.len() == self.keep => self.close(&body),
            b'B' => self.bind(&body),
            _ => false,
        };
        self.dirty |= !ok;
        // A large one's memory goes back: an idle session keeps little.
        if body.capacity() <= SPARE_MAX {
            self.spare = body;
        }
    }

    /// A Parse: waits for its ParseComplete. False if it cannot be read.
    fn parse(&mut self, body: &[u8]) -> bool {
        let Some(name) = cstr(body) else { return false };
        let rest = &body[name.len() + 1..];
        let Some(query) = cstr(rest) else {
            return false;
        };
        let types = &rest[query.len() + 1..];
        let n = types
            .get(..2)
            .map(|t| u16::from_be_bytes([t[0], t[1]]) as usize);
        let param_types: Option<Vec<u32>> = n.and_then(|n| {
            (0..n)
                .map(|i| {
                    let t = types.get(2 + 4 * i..6 + 4 * i)?;
                    Some(u32::from_be_bytes([t[0], t[1], t[2], t[3]]))
                })
                .collect()
        });
        let (Ok(name), Ok(query), Some(param_types)) = (
            String::from_utf8(name.to_vec()),
            String::from_utf8(query.to_vec()),
            param_types,
        ) else {
            return false;
        };
        let clean = classify::clean(query.as_bytes());
        let st = Statement {
            query,
            param_types,
            clean,
        };
        if self.pending_bytes + st.query.len() > MAX_PENDING_BYTES {
            return false;
        }
        self.pending_bytes += st.query.len();
        self.pending.push_back(Op::Parse(name, st));
        true
    }

    /// A Close: waits for its CloseComplete.
    fn close(&mut self, body: &[u8]) -> bool {
        let name = cstr(body.get(1..).unwrap_or_default());
        let op = match (body.first(), name) {
            (Some(b'S'), Some(n)) => match String::from_utf8(n.to_vec()) {
                Ok(n) => Op::Close(Some(n)),
                Err(_) => return false,
            },
            (Some(b'P'), Some(_)) => Op::Close(None),
            _ => return false,
        };
        self.pending.push_back(op);
        true
    }

    /// A Bind runs a statement: clean only if the proxy knows that statement's text is.
    fn bind(&self, body: &[u8]) -> bool {
        let Some(portal) = cstr(body) else {
            return false;
        };
        let Some(name) = cstr(&body[portal.len() + 1..]) else {
            return false;
        };
        // The latest Parse or Close of that name still in flight decides, else the known.
        let in_flight = self.pending.iter().rev().find_map(|op| match op {
            Op::Parse(n, s) if n.as_bytes() == name => Some(s.clean),
            Op::Close(Some(n)) if n.as_bytes() == name => Some(false),
            _ => None,
        });
        in_flight
            .or_else(|| {
                if name.is_empty() {
                    return self.unnamed_clean;
                }
                let k = self.known.as_ref()?;
                let s = k.statements.get(std::str::from_utf8(name).ok()?)?;
                Some(s.clean)
            })
            .unwrap_or(false)
    }

    /// A message the server sent (its kind), as it is forwarded.
    pub fn server(&mut self, kind: u8) {
        match kind {
            b'1' => match self.pop() {
                Some(Op::Parse(name, st)) if name.is_empty() => self.unnamed_clean = Some(st.clean),
                Some(Op::Parse(name, st)) => {
                    if let Some(k) = &mut self.known {
                        k.statements.insert(name, st);
                    }
                }
                _ => self.lost_track(),
            },
            b'3' => match self.pop() {
                Some(Op::Close(Some(name))) => {
                    if let Some(k) = &mut self.known {
                        k.statements.remove(&name);
                    }
                }
                Some(Op::Close(None)) => {}
                _ => self.lost_track(),
            },
            // An error in an extended-protocol cycle: the server skips the rest of it up to
            // the Sync (a simple Query's error is its own, its ReadyForQuery follows).
            b'E' => {
                while matches!(self.pending.front(), Some(Op::Parse(..) | Op::Close(_))) {
                    self.pop();
                }
            }
            b'Z' => match self.pop() {
                Some(Op::Ready) => {}
                _ => self.lost_track(),
            },
            _ => {}
        }
    }

    /// An answer the ledger cannot match to what the client asked: it no longer knows.
    fn lost_track(&mut self) {
        self.pending.clear();
        self.pending_bytes = 0;
        self.dirty = true;
    }

    /// The oldest request waiting for its answer.
    fn pop(&mut self) -> Option<Op> {
        let op = self.pending.pop_front();
        if let Some(Op::Parse(_, st)) = &op {
            self.pending_bytes = self.pending_bytes.saturating_sub(st.query.len());
        }
        op
    }
}

/// The NUL-terminated string at the start of `b`, without its NUL.
fn cstr(b: &[u8]) -> Option<&[u8]> {
    b.iter().position(|&x| x == 0).map(|n| &b[..n])
}

#[cfg(test)]
#[path = "ledger_tests.rs"]
mod tests;
