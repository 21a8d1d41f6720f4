//! The rail's thread: one edge-triggered epoll set, both sockets of each session in it,
//! each readiness event relayed at once with no task, waker or runtime in between. What a
//! session's relay does per chunk is `relay`'s own (`Drain`: transaction tracking, a
//! server's unasked error held back, the balancer's and an inspection's stops); half-closes
//! are passed on as `relay::drive` does. A session leaves with the `End` its tokio relay
//! would have given, or when its task asks for it back.

use super::{Back, Cmd, Left, Rail, Session};
use crate::metrics::Direction;
use crate::pipe::has_unread;
use crate::relay::{Drain, End, Stop, METRIC_FLUSH};
use rustix::event::epoll;
use std::collections::HashMap;
use std::io::{self, ErrorKind};
use std::net::{Shutdown, TcpStream};

/// The eventfd's key in the set; a session's sockets are 2i (client) and 2i+1 (server).
pub(super) const WAKE: u64 = u64::MAX;

/// Large enough that a big result set moves in few syscalls (as `pipe`'s).
pub(super) const READ_BUF: usize = 64 * 1024;

/// Reads of one socket per turn: a session streaming a big result or a COPY gives the
/// others their turn every this many reads (1 MiB), as tokio's budget did for its task.
pub(super) const TURN: usize = 16;

/// Client to server (index 0) and server to client (1): a direction's index is its source
/// socket's (0 the client, 1 the server), and `1 - side` the direction writing to `side`.
const C2S: usize = 0;
const S2C: usize = 1;

/// A session on the rail and what its relay holds between events.
pub(super) struct Entry {
    pub(super) id: u64,
    pub(super) s: Session,
    pub(super) done: tokio::sync::oneshot::Sender<Left>,
    /// Bytes read in each direction that its destination could not take yet: the direction
    /// reads nothing more until they are written.
    pending: [Vec<u8>; 2],
    /// A direction's source reached EOF (passed on as a half-close).
    eof: [bool; 2],
    /// A socket (client, server) whose peer has closed or failed: its end is queued behind
    /// its bytes, so a short read no longer means a new event will come for it.
    closing: [bool; 2],
    unflushed: [u64; 2],
    /// The server's unasked error came: the session leaves once what came before it is
    /// written.
    lost: bool,
    /// A socket (client, server) had more to read when its turn ended: the loop comes
    /// back to it.
    again: [bool; 2],
}

impl Entry {
    pub(super) fn new(id: u64, s: Session, done: tokio::sync::oneshot::Sender<Left>) -> Entry {
        Entry {
            id,
            s,
            done,
            pending: [Vec::new(), Vec::new()],
            eof: [false; 2],
            closing: [false; 2],
            unflushed: [0; 2],
            lost: false,
            again: [false; 2],
        }
    }

    /// `side` (0 client, 1 server) is ready for something: what waits to be written to it
    /// goes, then what it has to read. `Some`: the session leaves the rail.
    fn on_ready(&mut self, side: usize, flags: epoll::EventFlags, buf: &mut [u8]) -> Option<End> {
        let ended = epoll::EventFlags::RDHUP | epoll::EventFlags::HUP | epoll::EventFlags::ERR;
        self.closing[side] |= flags.intersects(ended);
        // The direction writing to `side` is the other one than the one reading from it.
        let into = 1 - side;
        if !self.pending[into].is_empty() {
            if let Some(end) = self.flush(into) {
                return Some(end);
            }
            if self.pending[into].is_empty() {
                if let Some(end) = self.pump(into, buf) {
                    return Some(end);
                }
            }
        }
        self.pump(side, buf)
    }

    /// Writes what `dir` holds; at its end the chunk's stops are checked as after a chunk
    /// written at once.
    fn flush(&mut self, dir: usize) -> Option<End> {
        let mut bytes = std::mem::take(&mut self.pending[dir]);
        let off = match send_some(socks(&self.s, dir).1, &bytes) {
            Ok(off) => off,
            Err(e) => return Some(self.error(dir, e)),
        };
        if off < bytes.len() {
            bytes.drain(..off);
            self.pending[dir] = bytes;
            return None;
        }
        self.after_chunk(dir)
    }

    /// Relays what `dir`'s source has, until it would block, its destination cannot take
    /// more, or the session leaves.
    fn pump(&mut self, dir: usize, buf: &mut [u8]) -> Option<End> {
        for _ in 0..TURN {
            if self.eof[dir] || !self.pending[dir].is_empty() || self.lost {
                return None;
            }
            let src = socks(&self.s, dir).0;
            let n = match rustix::net::recv(src, &mut *buf, rustix::net::RecvFlags::empty()) {
                Ok((0, _)) => return self.at_eof(dir),
                Ok((n, _)) => n,
                Err(e) if e == rustix::io::Errno::AGAIN || e == rustix::io::Errno::INTR => {
                    return None
                }
                Err(e) => return Some(self.error(dir, e.into())),
            };
            let (upto, lost) = track(&self.s, dir, &buf[..n]);
            self.lost |= lost;
            let off = match send_some(socks(&self.s, dir).1, &buf[..upto]) {
                Ok(off) => off,
                Err(e) => return Some(self.error(dir, e)),
            };
            self.count(dir, n as u64);
            if off < upto {
                self.pending[dir].extend_from_slice(&buf[off..upto]);
                return None;
            }
            if let Some(end) = self.after_chunk(dir) {
                return Some(end);
            }
            // A short read emptied the socket: its next bytes raise a new event (not its
            // end, if that came with the bytes read: then it is read as well).
            if n < buf.len() && !self.closing[dir] {
                return None;
            }
        }
        // No new event comes for what is left unread.
        self.again[dir] = true;
        None
    }

    /// A chunk of `dir` is all written: where the session stops after it, as `pipe` does.
    fn after_chunk(&mut self, dir: usize) -> Option<End> {
        if self.lost {
            return Some(End::ServerLost);
        }
        if dir != S2C {
            return None;
        }
        let stop = drain(&self.s)?.stop_after_chunk()?;
        if has_unread(&*self.s.client) {
            return None;
        }
        Some(match stop {
            Stop::Inspect => End::Inspect,
            Stop::Rebalance => End::Rebalance,
            // Not here: it needs the drain's signal, which the rail does not watch (the
            // task takes the session back when it comes).
            Stop::Drained => End::Drained,
            Stop::Lost => End::ServerLost,
            Stop::Eof | Stop::Rail => return None,
        })
    }

    /// `dir`'s source ended: passed on as a half-close, the other direction goes on (an
    /// answer in flight still arrives), as `relay::drive` does.
    fn at_eof(&mut self, dir: usize) -> Option<End> {
        let movable = self.s.movable;
        if dir == S2C && movable && !self.eof[C2S] {
            // The client's side stays open: the caller may move the session.
            return Some(End::ServerLost);
        }
        self.eof[dir] = true;
        let (_, dst) = socks(&self.s, dir);
        let _ = dst.shutdown(Shutdown::Write);
        match (self.eof[C2S], self.eof[S2C]) {
            (true, true) if dir == C2S => Some(End::ClientClosed),
            (true, true) => Some(End::ServerClosed),
            _ => None,
        }
    }

    /// An error in `dir` (reading its source or writing its destination), as
    /// `relay::drive` takes it.
    fn error(&self, dir: usize, e: io::Error) -> End {
        if dir == S2C && self.s.movable && !self.eof[C2S] {
            tracing::debug!(error = %e, "server side lost");
            return End::ServerLost;
        }
        End::Error(e)
    }

    fn count(&mut self, dir: usize, n: u64) {
        self.unflushed[dir] += n;
        if self.unflushed[dir] >= METRIC_FLUSH {
            self.s
                .metrics
                .add_bytes(direction(dir), self.unflushed[dir]);
            self.unflushed[dir] = 0;
        }
    }

    fn flush_metrics(&mut self) {
        for dir in [C2S, S2C] {
            self.s
                .metrics
                .add_bytes(direction(dir), self.unflushed[dir]);
            self.unflushed[dir] = 0;
        }
    }
}

/// A direction's source and destination.
fn socks(s: &Session, dir: usize) -> (&TcpStream, &TcpStream) {
    if dir == C2S {
        (&s.client, &s.server)
    } else {
        (&s.server, &s.client)
    }
}

/// The session's tracking, as its tokio relay has it (without the drain's signal: the
/// session's task takes it back when that comes).
fn drain(s: &Session) -> Option<Drain<'_>> {
    Some(Drain {
        signal: None,
        tx: s.tx.as_deref()?,
        movable: s.movable,
        thread: s.thread.as_ref().map(|(seats, i)| &seats.threads[*i]),
        to_rail: false,
    })
}

/// Feeds the session's tracking with a chunk of `dir`; how much of it goes on, and whether
/// a server's unasked error is held back from there (see `Drain::hold_if_lost`).
fn track(s: &Session, dir: usize, chunk: &[u8]) -> (usize, bool) {
    let Some(d) = drain(s) else {
        return (chunk.len(), false);
    };
    d.feed(direction(dir), chunk);
    if dir == S2C {
        if let Some(from) = d.hold_if_lost(chunk) {
            return (from, true);
        }
    }
    (chunk.len(), false)
}

fn direction(dir: usize) -> Direction {
    if dir == C2S {
        Direction::ClientToServer
    } else {
        Direction::ServerToClient
    }
}

/// Writes as much of `bytes` as `dst` takes now; how much that was.
fn send_some(dst: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    let mut off = 0;
    while off < bytes.len() {
        match rustix::net::send(dst, &bytes[off..], rustix::net::SendFlags::NOSIGNAL) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(w) => off += w,
            Err(e) if e == rustix::io::Errno::AGAIN => break,
            Err(e) if e == rustix::io::Errno::INTR => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(off)
}

/// The rail's sessions, by slot (a socket's key is twice its slot, plus one for the
/// server's) and by id (what a task asks back with).
#[derive(Default)]
pub(super) struct Slots {
    slots: Vec<Option<Box<Entry>>>,
    by_id: HashMap<u64, usize>,
}

#[cfg(test)]
impl Slots {
    /// One session in slot 0, outside any epoll set (a test drives it).
    pub(super) fn with(entry: Entry) -> Slots {
        Slots {
            by_id: HashMap::from([(entry.id, 0)]),
            slots: vec![Some(Box::new(entry))],
        }
    }

    /// Bytes slot `slot`'s session relayed in `dir` so far.
    pub(super) fn relayed(&self, slot: usize, dir: usize) -> u64 {
        let Some(Some(e)) = self.slots.get(slot) else {
            return 0;
        };
        let label = crate::metrics::DirectionLabel {
            direction: direction(dir),
        };
        e.s.metrics.bytes.get_or_create(&label).get() + e.unflushed[dir]
    }
}

/// The loop: until the rail is stopped. Err: the set cannot be waited on.
pub(super) fn run(rail: &Rail) -> io::Result<()> {
    let mut all = Slots::default();
    let mut events: Vec<epoll::Event> = Vec::with_capacity(256);
    let mut buf = vec![0u8; READ_BUF].into_boxed_slice();
    // Sockets whose turn ended with bytes left: served after the next events, which are
    // then only looked for, not waited for.
    let (mut again, mut next) = (Vec::new(), Vec::new());
    let now = rustix::event::Timespec::default();
    loop {
        events.clear();
        let timeout = (!again.is_empty()).then_some(&now);
        match epoll::wait(
            &rail.ep,
            rustix::buffer::spare_capacity(&mut events),
            timeout,
        ) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        for (key, flags) in events.iter().map(|e| (e.data.u64(), e.flags)) {
            if key == WAKE {
                if !commands(rail, &mut all) {
                    return Ok(());
                }
                continue;
            }
            ready(rail, &mut all, (key, flags), &mut buf, &mut next);
        }
        for key in again.drain(..) {
            ready(
                rail,
                &mut all,
                (key, epoll::EventFlags::empty()),
                &mut buf,
                &mut next,
            );
        }
        std::mem::swap(&mut again, &mut next);
    }
}

/// Relays what socket `key` is ready for; `again` gets it if its turn ended first.
pub(super) fn ready(
    rail: &Rail,
    all: &mut Slots,
    (key, flags): (u64, epoll::EventFlags),
    buf: &mut [u8],
    again: &mut Vec<u64>,
) {
    let (slot, side) = ((key / 2) as usize, (key % 2) as usize);
    let Some(Some(entry)) = all.slots.get_mut(slot) else {
        return;
    };
    if let Some(end) = entry.on_ready(side, flags, buf) {
        return leave(rail, all, slot, Back::End(end));
    }
    for (side, more) in entry.again.iter_mut().enumerate() {
        if std::mem::take(more) {
            again.push(slot as u64 * 2 + side as u64);
        }
    }
}

/// Takes the tasks' commands; false when the rail stops.
fn commands(rail: &Rail, all: &mut Slots) -> bool {
    let mut count = [0u8; 8];
    let _ = rustix::io::read(&rail.wake, &mut count);
    let cmds = std::mem::take(&mut rail.inbox.lock().unwrap_or_else(|p| p.into_inner()).cmds);
    for cmd in cmds {
        match cmd {
            Cmd::Add(entry) => enter(rail, all, entry),
            Cmd::Back(id) => {
                if let Some(&slot) = all.by_id.get(&id) {
                    leave(rail, all, slot, Back::Asked);
                }
            }
            Cmd::Stop => {
                for slot in 0..all.slots.len() {
                    if all.slots[slot].is_some() {
                        leave(rail, all, slot, Back::Asked);
                    }
                }
                return false;
            }
        }
    }
    true
}

fn enter(rail: &Rail, all: &mut Slots, entry: Box<Entry>) {
    let slot = match all.slots.iter().position(Option::is_none) {
        Some(i) => i,
        None => {
            all.slots.push(None);
            all.slots.len() - 1
        }
    };
    let flags = epoll::EventFlags::IN
        | epoll::EventFlags::OUT
        | epoll::EventFlags::RDHUP
        | epoll::EventFlags::ET;
    let key = slot as u64 * 2;
    let added = epoll::add(
        &rail.ep,
        &*entry.s.client,
        epoll::EventData::new_u64(key),
        flags,
    )
    .and_then(|()| {
        epoll::add(
            &rail.ep,
            &*entry.s.server,
            epoll::EventData::new_u64(key + 1),
            flags,
        )
    });
    let id = entry.id;
    entry.s.metrics.rail_sessions.inc();
    all.slots[slot] = Some(entry);
    all.by_id.insert(id, slot);
    if let Err(e) = added {
        // Its task relays it in tokio instead.
        tracing::warn!(error = %e, "cannot put a session on the relay rail");
        leave(rail, all, slot, Back::Asked);
    }
}

/// Takes a session off the rail and tells its task how it left. The rail's handles on
/// its sockets are dropped first: the task takes them back as its own.
fn leave(rail: &Rail, all: &mut Slots, slot: usize, back: Back) {
    let Some(mut entry) = all.slots.get_mut(slot).and_then(Option::take) else {
        return;
    };
    all.by_id.remove(&entry.id);
    let _ = epoll::delete(&rail.ep, &*entry.s.client);
    let _ = epoll::delete(&rail.ep, &*entry.s.server);
    entry.flush_metrics();
    entry.s.metrics.rail_sessions.dec();
    let Entry {
        s, done, pending, ..
    } = *entry;
    drop(s);
    let _ = done.send(Left { back, pending });
}
