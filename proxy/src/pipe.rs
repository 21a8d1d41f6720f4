//! The one byte loop of every relay: a direction of a session, plain TCP or TLS either
//! side. Readiness-driven: a session holds no buffer while idle. Each read goes into a
//! per-thread buffer and is written straight on in the same poll; only bytes the
//! destination cannot take yet are copied into a buffer the session owns until they are
//! written.

use crate::metrics::{Direction, Metrics};
use crate::relay::{Drain, Stop, METRIC_FLUSH};
use std::cell::RefCell;
use std::io::{self, ErrorKind};
use std::os::fd::AsFd;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Large enough that a big result set or COPY moves in few syscalls (and more than a TLS
/// record's plaintext, so a terminated stream gives what it has decrypted in one read).
const READ_BUF: usize = 64 * 1024;

thread_local! {
    static BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; READ_BUF].into_boxed_slice());
}

/// Copies `src` to `dst` until EOF on `src` (passed on as a shutdown of `dst`'s writing:
/// TLS's close_notify, or the socket's half-close), or, server to client with `drain`,
/// until a chunk leaves the session where the drain or an inspection stops it and the
/// client (`client`) has nothing unread.
pub(crate) async fn pipe<R, W>(
    src: &mut R,
    dst: &mut W,
    client: &impl AsFd,
    metrics: &Metrics,
    direction: Direction,
    drain: Option<Drain<'_>>,
) -> io::Result<Stop>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut unflushed = 0u64;
    let mut pending: Vec<u8> = Vec::new();
    let result = loop {
        let chunk = std::future::poll_fn(|cx| step(cx, src, dst, &mut pending, direction, drain));
        let (n, lost) = match chunk.await {
            Ok(Some(step)) => step,
            Ok(None) => break Ok(Stop::Eof),
            // libpq closes its socket without TLS's close_notify: the session has ended as
            // surely as with one.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => break Ok(Stop::Eof),
            Err(e) => break Err(e),
        };
        unflushed += n as u64;
        if !pending.is_empty() {
            if let Err(e) = dst.write_all(&pending).await {
                break Err(e);
            }
            // Give the memory back: an idle session keeps no buffer.
            pending = Vec::new();
        }
        // A TLS writer may keep the end of a record; a socket has nothing to flush.
        if let Err(e) = dst.flush().await {
            break Err(e);
        }
        if lost {
            break Ok(Stop::Lost);
        }
        if direction == Direction::ServerToClient {
            if let Some(stop) = drain.and_then(|d| d.stop_after_chunk()) {
                if !has_unread(client) {
                    break Ok(stop);
                }
            }
        }
        if unflushed >= METRIC_FLUSH {
            metrics.add_bytes(direction, unflushed);
            unflushed = 0;
        }
    };
    // A movable session's client is not told its server's end: it may move.
    let keep = direction == Direction::ServerToClient && drain.is_some_and(|d| d.movable);
    if matches!(result, Ok(Stop::Eof)) && !keep {
        let _ = dst.shutdown().await;
    }
    metrics.add_bytes(direction, unflushed);
    result
}

/// One read into the thread's buffer and as much of it written on as `dst` takes now;
/// the rest goes to `pending`. `Ok(None)`: EOF. Else the bytes read, and whether a server's
/// unasked error stopped the chunk (see `Drain::hold_if_lost`).
fn step<R, W>(
    cx: &mut Context<'_>,
    src: &mut R,
    dst: &mut W,
    pending: &mut Vec<u8>,
    direction: Direction,
    drain: Option<Drain<'_>>,
) -> Poll<io::Result<Option<(usize, bool)>>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    BUF.with(|cell| {
        let mut buf = cell.borrow_mut();
        let mut read = ReadBuf::new(&mut buf[..]);
        ready!(Pin::new(&mut *src).poll_read(cx, &mut read))?;
        let n = read.filled().len();
        if n == 0 {
            return Poll::Ready(Ok(None));
        }
        // With a server's unasked error in it, only what comes before it goes on.
        let (mut upto, mut lost) = (n, false);
        if let Some(d) = drain {
            d.feed(direction, &buf[..n]);
            if direction == Direction::ServerToClient {
                if let Some(from) = d.hold_if_lost(&buf[..n]) {
                    (upto, lost) = (from, true);
                }
            }
        }
        let mut off = 0;
        while off < upto {
            match Pin::new(&mut *dst).poll_write(cx, &buf[off..upto]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(w)) => off += w,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        pending.extend_from_slice(&buf[off..upto]);
        Poll::Ready(Ok(Some((n, lost))))
    })
}

/// A plain socket shared by both directions (and by the route's sever, which holds it
/// too), read and written through readiness.
#[derive(Clone, Copy)]
pub(crate) struct Tcp<'a>(pub &'a TcpStream);

impl AsyncRead for Tcp<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            match read_once(self.0, buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Tcp<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            let sent = self.0.try_io(Interest::WRITABLE, || {
                rustix::net::send(self.0, buf, rustix::net::SendFlags::NOSIGNAL)
                    .map_err(io::Error::from)
            });
            match sent {
                Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Nothing: the session state machine (`relay::drive`) half-closes the socket itself
    /// when a direction ends, for plain and TLS sides alike (a TLS side's shutdown only
    /// adds its close_notify before that).
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// One read. A read shorter than the buffer emptied the socket's receive queue, so the
/// readiness is cleared at once instead of by a second read that returns EAGAIN: one
/// syscall less per message in each direction. Safe with edge-triggered epoll: bytes that
/// arrive after the read raise a new event, and tokio does not clear readiness an event
/// newer than the read has set (tokio's own `poll_read` does the same).
fn read_once(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = None;
    let r = src.try_io(Interest::READABLE, || {
        let (n, _) = rustix::net::recv(src, &mut *buf, rustix::net::RecvFlags::empty())
            .map_err(io::Error::from)?;
        if n > 0 && n < buf.len() {
            got = Some(n);
            return Err(ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (r, got) {
        (_, Some(n)) => Ok(n),
        (r, None) => r,
    }
}

/// Whether the client has sent bytes the relay has not read yet (still in the socket's
/// receive queue): a drain must not close a session whose next request is on its way. The
/// relay's reads and the drain's checks run in one task, so on a busy machine a check can
/// come after the client sent and before the read; without this, the close crossed the
/// request and the client saw a failed transaction. One syscall, at a drain's close only.
pub(crate) fn has_unread(sock: &impl AsFd) -> bool {
    use nix::sys::socket::{recv, MsgFlags};
    use std::os::fd::AsRawFd;
    let mut byte = [0u8; 1];
    let fd = sock.as_fd().as_raw_fd();
    matches!(
        recv(fd, &mut byte, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT),
        Ok(n) if n > 0
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::time::Duration;

    #[test]
    fn unread_bytes_are_seen_without_being_consumed() {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (mut proxied, _) = listener.accept().expect("accept");
        assert!(!has_unread(&proxied), "nothing sent yet");
        client.write_all(b"Q").expect("send");
        let mut seen = false;
        for _ in 0..1000 {
            if has_unread(&proxied) {
                seen = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(seen, "the queued byte is seen");
        let mut b = [0u8; 1];
        proxied.read_exact(&mut b).expect("still there to read");
        assert_eq!(&b, b"Q");
        assert!(!has_unread(&proxied), "read: nothing left");
        drop(client);
        assert!(!has_unread(&proxied), "end of stream is not a request");
    }
}
