//! `loadtest relay-proto`: a bare TCP relay to one PostgreSQL, no protocol, no routing, as a
//! floor for `compare` (engines `proto-tokio` and `proto-epoll`). It answers one question
//! of issue 19: how much of stolon-proxy's CPU per transaction is the runtime (a tokio task
//! per session, as the proxy's relay threads run them) and how much the proxy's own work,
//! against one raw epoll loop (PgBouncer's shape). Not a product: it never stops by itself
//! and handles a destination that cannot take a write by blocking on it.

use anyhow::{Context, Result};
use rustix::event::epoll;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Mode {
    /// A tokio current-thread runtime, a task per session (both directions in it).
    Tokio,
    /// One thread, one epoll set, edge-triggered, no task.
    Epoll,
    /// A tokio current-thread runtime whose one relay task owns an epoll set of its own
    /// (edge-triggered), nested in tokio's: the shape of a relay lane inside the proxy's
    /// runtime, which keeps its timers and tokens in tokio.
    Nested,
}

pub fn run(mode: Mode, listen: u16, backend: u16) -> Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", listen)).context("bind")?;
    match mode {
        Mode::Tokio => tokio_relay(listener, backend),
        Mode::Epoll => epoll_relay(listener, backend),
        Mode::Nested => nested_relay(listener, backend),
    }
}

fn tokio_relay(listener: TcpListener, backend: u16) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    rt.block_on(async move {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        loop {
            let (mut client, _) = listener.accept().await?;
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", backend)).await
                else {
                    return;
                };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let ((cr, cw), (sr, sw)) = (client.split(), server.split());
                tokio::join!(one_way(cr, sw), one_way(sr, cw));
            });
        }
    })
}

/// Copies until EOF or an error: each read written on before the next. Through tokio's
/// `AsyncRead`, which takes a short read as the socket drained (as the proxy's relay does),
/// so a message costs one recv, not a second one that finds nothing.
async fn one_way(mut src: tokio::net::tcp::ReadHalf<'_>, mut dst: tokio::net::tcp::WriteHalf<'_>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match src.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if dst.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

const LISTENER: u64 = u64::MAX;

fn nested_relay(listener: TcpListener, backend: u16) -> Result<()> {
    use std::sync::{Arc, Mutex};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let ep = Arc::new(epoll::create(epoll::CreateFlags::CLOEXEC)?);
    let sessions: Arc<Mutex<Sessions>> = Arc::default();
    rt.block_on(async move {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        // The deprecated safe constructor: the set's descriptor is owned by what it holds.
        #[allow(deprecated)]
        let lane = tokio::io::unix::AsyncFd::new(ep.clone())?;
        let lane_sessions = sessions.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let Ok(mut ready) = lane.readable().await else {
                    return;
                };
                if !drain_set(lane.get_ref(), &lane_sessions, &mut buf) {
                    return;
                }
                ready.clear_ready();
            }
        });
        loop {
            let (client, _) = listener.accept().await?;
            let client = client.into_std()?;
            let Ok(server) = TcpStream::connect(("127.0.0.1", backend)) else {
                continue;
            };
            add_session(&*ep, &mut sessions.lock().expect("lock"), client, server)?;
        }
    })
}

thread_local! {
    /// The set's events (`epoll::Event` holds a pointer, so it cannot live in a task).
    static EVENTS: std::cell::RefCell<Vec<epoll::Event>> =
        std::cell::RefCell::new(Vec::with_capacity(256));
}

type Sessions = Vec<Option<(TcpStream, TcpStream)>>;

/// Relays every event the nested set has; false if it cannot be read.
fn drain_set(
    ep: &impl std::os::fd::AsFd,
    sessions: &std::sync::Mutex<Sessions>,
    buf: &mut [u8],
) -> bool {
    EVENTS.with_borrow_mut(|events| loop {
        events.clear();
        let spare = rustix::buffer::spare_capacity(&mut *events);
        if epoll::wait(ep, spare, Some(&rustix::event::Timespec::default())).is_err() {
            return false;
        }
        let Ok(mut all) = sessions.lock() else {
            return false;
        };
        relay_events(events, &mut all, buf);
        if events.len() < events.capacity() {
            return true;
        }
    })
}

fn relay_events(
    events: &[epoll::Event],
    sessions: &mut [Option<(TcpStream, TcpStream)>],
    buf: &mut [u8],
) {
    for e in events {
        relay_key(e, sessions, buf);
    }
}

/// Relays what the event's socket has (key 2i: session i's client, 2i+1 its server).
fn relay_key(e: &epoll::Event, sessions: &mut [Option<(TcpStream, TcpStream)>], buf: &mut [u8]) {
    let key = e.data.u64();
    // Its end came with its last bytes: read to the end, not only to a short read.
    let ended = epoll::EventFlags::RDHUP | epoll::EventFlags::HUP | epoll::EventFlags::ERR;
    let flags = e.flags;
    let closing = flags.intersects(ended);
    let idx = (key / 2) as usize;
    let Some((client, server)) = sessions.get(idx).and_then(|s| s.as_ref()) else {
        return;
    };
    let (src, dst) = if key.is_multiple_of(2) {
        (client, server)
    } else {
        (server, client)
    };
    if !copy_ready(src, dst, buf, closing) {
        // Dropping the sockets closes them, which takes them out of the set.
        sessions[idx] = None;
    }
}

fn epoll_relay(listener: TcpListener, backend: u16) -> Result<()> {
    listener.set_nonblocking(true)?;
    let ep = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    epoll::add(
        &ep,
        &listener,
        epoll::EventData::new_u64(LISTENER),
        epoll::EventFlags::IN,
    )?;
    let mut sessions: Vec<Option<(TcpStream, TcpStream)>> = Vec::new();
    let mut events: Vec<epoll::Event> = Vec::with_capacity(256);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        events.clear();
        match epoll::wait(&ep, rustix::buffer::spare_capacity(&mut events), None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        for e in &events {
            let key = e.data.u64();
            if key == LISTENER {
                accept_all(&listener, backend, &ep, &mut sessions)?;
                continue;
            }
            relay_key(e, &mut sessions, &mut buf);
        }
    }
}

fn accept_all(
    listener: &TcpListener,
    backend: u16,
    ep: &impl std::os::fd::AsFd,
    sessions: &mut Vec<Option<(TcpStream, TcpStream)>>,
) -> Result<()> {
    loop {
        let client = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let Ok(server) = TcpStream::connect(("127.0.0.1", backend)) else {
            continue;
        };
        add_session(ep, sessions, client, server)?;
    }
}

fn add_session(
    ep: &impl std::os::fd::AsFd,
    sessions: &mut Vec<Option<(TcpStream, TcpStream)>>,
    client: TcpStream,
    server: TcpStream,
) -> Result<()> {
    {
        for s in [&client, &server] {
            s.set_nonblocking(true)?;
            s.set_nodelay(true)?;
        }
        let idx = match sessions.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                sessions.push(None);
                sessions.len() - 1
            }
        };
        let flags = epoll::EventFlags::IN | epoll::EventFlags::RDHUP | epoll::EventFlags::ET;
        let key = idx as u64 * 2;
        epoll::add(ep, &client, epoll::EventData::new_u64(key), flags)?;
        epoll::add(ep, &server, epoll::EventData::new_u64(key + 1), flags)?;
        sessions[idx] = Some((client, server));
    }
    Ok(())
}

/// Copies what `src` has to `dst`; false when the session is over. A read shorter than the
/// buffer emptied the socket (edge-triggered: a later arrival raises a new event), unless
/// its end was already queued (`closing`): then no event comes for it, so it is read too.
fn copy_ready(mut src: &TcpStream, dst: &TcpStream, buf: &mut [u8], closing: bool) -> bool {
    loop {
        let n = match src.read(buf) {
            Ok(0) => return false,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        };
        if !write_all_waiting(dst, &buf[..n]) {
            return false;
        }
        if n < buf.len() && !closing {
            return true;
        }
    }
}

/// Writes all of `bytes`, waiting (blocking the loop: rare with small messages) while the
/// destination cannot take more.
fn write_all_waiting(mut dst: &TcpStream, mut bytes: &[u8]) -> bool {
    use rustix::event::{poll, PollFd, PollFlags};
    while !bytes.is_empty() {
        match dst.write(bytes) {
            Ok(0) => return false,
            Ok(w) => bytes = &bytes[w..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if poll(&mut [PollFd::new(&dst, PollFlags::OUT)], None).is_err() {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    true
}
