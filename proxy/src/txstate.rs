//! Where a relayed session stands between transactions, for a drain: a session may be
//! closed cleanly only when everything the client asked for has been answered and the
//! server's last answer is ReadyForQuery with status idle ('I'), never inside a transaction.
//!
//! Each request that ends a cycle of the protocol (a simple Query 'Q', a Sync 'S', a
//! FunctionCall 'F', and the startup packet itself) is answered by exactly one
//! ReadyForQuery 'Z' ("Message Flow" in the protocol docs), so counting them in both
//! directions tells whether anything is in flight, also for a pipelining client. Only the
//! message headers are read (the bodies are skipped), so the cost is per message, not per
//! byte. A stream the proxy cannot read (TLS, after the server accepted SSL or a direct TLS
//! start) is opaque: it is never idle, and a drain ends it at its timeout.

/// What the relayed stream starts with, from the client's first packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// A StartupMessage, replayed to the server: both streams are typed messages.
    Startup,
    /// An SSLRequest: the server answers one byte, 'N' (then the client sends an untyped
    /// StartupMessage in the clear) or 'S' (TLS: opaque).
    SslRequest,
    /// A TLS ClientHello: opaque.
    DirectTls,
}

/// What the client's current extended-protocol cycle has asked for so far.
#[derive(Clone, Copy, Debug, Default)]
struct Cycle {
    /// Parse or Describe: a statement is being prepared or described.
    prepares: bool,
    /// Execute: a statement runs.
    executes: bool,
}

/// Message framing in one direction, headers only.
#[derive(Clone, Debug)]
struct Frames {
    /// The next message has no type byte (a StartupMessage after a declined SSLRequest).
    untyped_next: bool,
    header: [u8; 5],
    header_len: usize,
    kind: u8,
    /// Body bytes of the current message not yet seen (0: at a boundary once the header
    /// is empty).
    body_left: usize,
    /// The first body byte of the current message, once seen (ReadyForQuery's status).
    first: Option<u8>,
}

impl Frames {
    fn new(untyped_next: bool) -> Frames {
        Frames {
            untyped_next,
            header: [0; 5],
            header_len: 0,
            kind: 0,
            body_left: 0,
            first: None,
        }
    }

    fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.body_left == 0
    }

    /// Feeds bytes; calls `done(kind, first_body_byte)` for each message that completes.
    /// `Err` for a length no message can have (the stream is then opaque).
    /// `done` also gets how many of `bytes` follow the message.
    fn feed(
        &mut self,
        mut bytes: &[u8],
        mut done: impl FnMut(u8, Option<u8>, usize),
    ) -> Result<(), ()> {
        while !bytes.is_empty() {
            // Whole messages within this read, the common case: their headers are read in
            // place, with no copy into `header` and no state kept between them.
            if self.at_boundary() && !self.untyped_next {
                if let Some((&[kind, a, b, c, d], after)) = bytes.split_first_chunk::<5>() {
                    let body = body_len(u32::from_be_bytes([a, b, c, d]))?;
                    if let Some(rest) = after.get(body..) {
                        done(
                            kind,
                            after.first().copied().filter(|_| body > 0),
                            rest.len(),
                        );
                        bytes = rest;
                        continue;
                    }
                }
            }
            if self.body_left == 0 {
                let want = if self.untyped_next { 4 } else { 5 };
                let take = (want - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + take]
                    .copy_from_slice(&bytes[..take]);
                self.header_len += take;
                bytes = &bytes[take..];
                if self.header_len < want {
                    return Ok(());
                }
                let (kind, len) = if self.untyped_next {
                    let h = &self.header;
                    (0, u32::from_be_bytes([h[0], h[1], h[2], h[3]]))
                } else {
                    let h = &self.header;
                    (h[0], u32::from_be_bytes([h[1], h[2], h[3], h[4]]))
                };
                self.untyped_next = false;
                self.header_len = 0;
                self.body_left = body_len(len)?;
                self.kind = kind;
                self.first = None;
                if self.body_left == 0 {
                    done(kind, None, bytes.len());
                }
                continue;
            }
            let take = self.body_left.min(bytes.len());
            if self.first.is_none() {
                self.first = bytes.first().copied();
            }
            self.body_left -= take;
            bytes = &bytes[take..];
            if self.body_left == 0 {
                done(self.kind, self.first, bytes.len());
            }
        }
        Ok(())
    }
}

/// The body length a message header's length field gives (it counts itself); `Err` for
/// one shorter than that.
fn body_len(len: u32) -> Result<usize, ()> {
    usize::try_from(len).map_err(drop)?.checked_sub(4).ok_or(())
}

/// One session's transaction state, fed by both directions of the relay.
#[derive(Clone, Debug)]
pub struct TxState {
    client: Frames,
    server: Frames,
    /// Before the server's one-byte answer to an SSLRequest.
    awaiting_ssl_answer: bool,
    opaque: bool,
    /// Requests sent that ReadyForQuery has not answered yet.
    outstanding: u64,
    /// The last ReadyForQuery said idle ('I'), not in a transaction ('T') or failed ('E').
    last_idle: bool,
    /// The client sent messages of an extended-protocol cycle (Parse, Bind, Execute, ...)
    /// that no Sync has closed yet: mid-cycle, even if nothing is counted as in flight.
    cycle_open: bool,
    cycle: Cycle,
    /// The client's last exchange was the first half of a pair whose second half follows
    /// at once: a cycle that prepared or described a statement and ran none (tokio-postgres,
    /// pgx and others prepare, wait for the answer, then bind and execute), or the startup
    /// (the first query follows the authentication). Idle then, but not settled: a drain
    /// closing it would race the client's next message.
    half_pair: bool,
    /// Reads relayed so far (either direction): unchanged over an interval means no byte
    /// moved in it.
    pub(crate) activity: u64,
    /// When the last ReadyForQuery said idle: a session idle when a drain starts has been
    /// so since then (one clock read per transaction, not per read).
    pub(crate) idle_at: std::time::Instant,
    /// A drain that has waited long enough for this session to fall quiet: it closes it
    /// at its next transaction boundary instead.
    pub(crate) forced: bool,
    /// Whether the client set a custom setting, which no view shows (a move would lose it):
    /// watched only in sessions the proxy could move (it authenticated the client), so the
    /// others pay nothing for it on their reads.
    custom: Option<Box<crate::migrate::scan::CustomScan>>,
    /// What the proxy can prove of the session's state without its server (a move after a
    /// failover), kept beside `custom` for the same sessions.
    ledger: Option<Box<crate::migrate::ledger::Ledger>>,
    /// The server sent nothing but notices, notifications and parameter changes since its
    /// last ReadyForQuery, or an error answering no request (see `lost_with_error`).
    quiet_since_ready: bool,
    /// The server sent an ErrorResponse that answers no request: a FATAL as its backend
    /// ends (its postmaster died, a shutdown, an administrator's command).
    pub(crate) lost_with_error: bool,
    /// Where that error begins in the read that carried it (what comes before it is the
    /// client's: passed on).
    pub(crate) lost_from: Option<usize>,
    /// The bytes from that error on, held back from a movable session's client (see
    /// `relay::Drain::hold_if_lost`): sent on if the session does not move.
    pub(crate) held: Vec<u8>,
    /// The client sent Terminate: the session ends by its will (never moved).
    pub(crate) client_terminated: bool,
}

impl TxState {
    /// The state at the start of the relay. `replayed_tail` is what the client sent after
    /// its first packet before the relay started (a pipelining client), already forwarded.
    pub fn new(start: Start, replayed_tail: &[u8]) -> TxState {
        let mut st = TxState {
            client: Frames::new(start == Start::SslRequest),
            server: Frames::new(false),
            awaiting_ssl_answer: start == Start::SslRequest,
            opaque: start == Start::DirectTls,
            // The startup packet is answered by ReadyForQuery once authentication is done.
            outstanding: u64::from(start == Start::Startup),
            last_idle: false,
            cycle_open: false,
            cycle: Cycle::default(),
            half_pair: start != Start::DirectTls,
            activity: 0,
            idle_at: std::time::Instant::now(),
            forced: false,
            custom: None,
            ledger: None,
            quiet_since_ready: false,
            lost_with_error: false,
            lost_from: None,
            held: Vec::new(),
            client_terminated: false,
        };
        st.from_client(replayed_tail);
        st
    }

    /// A session just moved to a new server (its start done, `state` replayed): idle and
    /// settled, nothing custom set on it (else it would not have moved), and its state known.
    pub fn moved(state: crate::migrate::state::SessionState, after_failover: bool) -> TxState {
        let mut st = TxState::new(Start::Startup, &[]);
        st.from_server(&[b'Z', 0, 0, 0, 5, b'I']);
        st.half_pair = false;
        st.watch_for_moves(after_failover);
        st.inspected(Some(state));
        st
    }

    /// Whether the session is watched for a move after a failover (see `watch_for_moves`).
    pub fn tracked(&self) -> bool {
        self.ledger.is_some()
    }

    /// From now on, the client's bytes are watched for custom settings and (for a move
    /// after a failover) for what could change the session's state (a session the proxy
    /// authenticated: it may move). Called at the end of the start: only the startup is set
    /// on the session so far.
    pub fn watch_for_moves(&mut self, after_failover: bool) {
        self.custom.get_or_insert_with(Default::default);
        if after_failover && self.ledger.is_none() {
            let mut l = crate::migrate::ledger::Ledger::started();
            if self.outstanding > 0 {
                l.expect_ready();
            }
            self.ledger = Some(Box::new(l));
        }
    }

    /// Whether the relay should inspect the session now: it changed what the proxy knows
    /// of it, and it is between transactions, not between a prepare and its execute.
    pub fn wants_inspection(&self) -> bool {
        self.ledger.as_ref().is_some_and(|l| l.wants_inspection()) && self.settled()
    }

    /// The server showed the session's state (`None`: the inspection found it unmovable or
    /// failed).
    pub fn inspected(&mut self, state: Option<crate::migrate::state::SessionState>) {
        if let Some(l) = &mut self.ledger {
            l.shown(state);
        }
    }

    /// The session's state if it can move without its server (which went away): it was
    /// idle, the server said nothing but notices since, and its state is proven.
    pub fn provable(&self) -> Option<crate::migrate::state::SessionState> {
        if !self.idle() || !self.quiet_since_ready || self.custom_settings() {
            return None;
        }
        self.ledger.as_ref()?.proven()
    }

    /// The client set a custom (dotted) setting or called set_config (see `migrate::scan`).
    pub fn custom_settings(&self) -> bool {
        self.custom.as_ref().is_some_and(|c| c.found())
    }

    /// Bytes the client sent, as they are forwarded.
    pub fn from_client(&mut self, bytes: &[u8]) {
        self.activity = self.activity.wrapping_add(1);
        if self.opaque || bytes.is_empty() {
            return;
        }
        if self.client.untyped_next && self.client.header_len == 0 && bytes[0] == 0x16 {
            // A TLS ClientHello after the server accepted SSL.
            self.opaque = true;
            return;
        }
        if let Some(c) = &mut self.custom {
            c.feed(bytes);
        }
        if let Some(l) = &mut self.ledger {
            l.feed(bytes);
        }
        let mut requests = 0u64;
        let (mut cycle_open, mut cycle, mut half_pair) =
            (self.cycle_open, self.cycle, self.half_pair);
        let mut terminated = self.client_terminated;
        let fed = self.client.feed(bytes, |kind, _, _| {
            terminated |= kind == b'X';
            match kind {
                // Kind 0: the untyped StartupMessage (no typed message has type byte 0).
                b'Q' | b'F' | 0 => half_pair = kind == 0,
                b'S' => half_pair = cycle.prepares && !cycle.executes,
                b'P' | b'D' => cycle.prepares = true,
                b'E' => cycle.executes = true,
                _ => {}
            }
            if matches!(kind, b'Q' | b'S' | b'F' | 0) {
                requests += 1;
                cycle_open = false;
                cycle = Cycle::default();
            } else {
                cycle_open = true;
            }
        });
        self.client_terminated = terminated;
        self.outstanding += requests;
        self.cycle_open = cycle_open;
        self.cycle = cycle;
        self.half_pair = half_pair;
        if fed.is_err() {
            self.opaque = true;
        }
    }

    /// Bytes the server sent, as they are forwarded.
    pub fn from_server(&mut self, mut bytes: &[u8]) {
        self.activity = self.activity.wrapping_add(1);
        if self.opaque || bytes.is_empty() {
            return;
        }
        if self.awaiting_ssl_answer {
            self.awaiting_ssl_answer = false;
            if bytes[0] != b'N' {
                self.opaque = true;
                return;
            }
            bytes = &bytes[1..];
        }
        let (mut answered, mut last) = (0u64, None);
        let (mut quiet, mut lost) = (self.quiet_since_ready, self.lost_with_error);
        // Where in `bytes` the message being read began (`None`: in an earlier read, whose
        // bytes went on already), and where an unasked error begins.
        let total = bytes.len();
        let mut start = self.server.at_boundary().then_some(0);
        let mut lost_from = None;
        // Requests that ReadyForQuery will answer, and an extended-protocol cycle not closed
        // by a Sync yet: an error may answer either.
        let (mut pending, cycle_open) = (self.outstanding, self.cycle_open);
        let ledger = &mut self.ledger;
        let fed = self.server.feed(bytes, |kind, first, rest| {
            if let Some(l) = ledger {
                l.server(kind);
            }
            let began = start;
            start = Some(total - rest);
            match kind {
                b'Z' => {
                    answered += 1;
                    pending = pending.saturating_sub(1);
                    last = Some(first == Some(b'I'));
                    quiet = true;
                }
                b'N' | b'A' | b'S' => {}
                // Only a FATAL comes unasked: the backend is ending.
                // Held from its first byte; one begun in an earlier read reached the client
                // in part: it ends the session as without moves.
                b'E' if pending == 0 && !cycle_open && !lost => match began {
                    Some(at) => {
                        lost = true;
                        lost_from = Some(at);
                    }
                    None => quiet = false,
                },
                _ => quiet = false,
            }
        });
        self.quiet_since_ready = quiet;
        self.lost_with_error = lost;
        if lost_from.is_some() {
            self.lost_from = lost_from;
        }
        self.outstanding = self.outstanding.saturating_sub(answered);
        if let Some(idle) = last {
            self.last_idle = idle;
            if idle {
                self.idle_at = std::time::Instant::now();
            }
        }
        if fed.is_err() {
            self.opaque = true;
        }
    }

    /// The stream cannot be read (TLS end to end).
    pub fn opaque(&self) -> bool {
        self.opaque
    }

    /// Nothing is in flight and the session is outside any transaction: closing it now
    /// loses nothing the client was told.
    pub fn idle(&self) -> bool {
        !self.opaque
            && !self.awaiting_ssl_answer
            && self.outstanding == 0
            && !self.cycle_open
            && self.last_idle
            && self.client.at_boundary()
            && self.server.at_boundary()
    }

    /// Idle, and not between the two halves of a pair (a prepare and its execute, the
    /// startup and the first query): the client has no reason to send at once, so a close
    /// now is unlikely to cross its next message.
    pub fn settled(&self) -> bool {
        self.idle() && !self.half_pair
    }
}

#[cfg(test)]
#[path = "txstate_tests.rs"]
mod tests;
